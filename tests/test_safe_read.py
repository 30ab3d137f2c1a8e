"""rlhf_ref.safe_read: regular files inside their folder, limits checked before reading, every
failure a FileReadError '<file>[:<line>]: <what>'."""

from __future__ import annotations

import io
import os
import threading
import zipfile

import numpy as np
import pytest

from rlhf_ref import safe_read as sr
from rlhf_ref.safe_read import FileReadError


def npz(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ----------------------------------------------------------------------------- resolve_inside
def test_resolve_inside_accepts_plain_relative_names(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.npz").write_bytes(b"x")
    assert sr.resolve_inside(tmp_path, "sub/a.npz") == os.path.join(str(tmp_path), "sub", "a.npz")


@pytest.mark.parametrize("name", ["../a", "sub/../../a", "/etc/passwd", "", ".", "a//b", "./a", "C:/x", "\\\\srv\\x",
                                  "a\x00b", 3, None])
def test_resolve_inside_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(FileReadError) as e:
        sr.resolve_inside(tmp_path, name, what="arrays")
    assert str(e.value).startswith(f"{tmp_path}: arrays name")


def test_resolve_inside_refuses_a_symlink_on_the_way_and_names_missing_files(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(FileReadError, match=r"link: file is a symbolic link"):
        sr.resolve_inside(tmp_path, "link/a")
    with pytest.raises(FileReadError, match=r"nope: file not found"):
        sr.resolve_inside(tmp_path, "nope")


# ----------------------------------------------------------------------------- read_bytes / read_text
def test_read_bytes_reads_a_regular_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert sr.read_bytes(tmp_path / "f") == b"abc" * 1000


def test_read_bytes_refuses_what_is_not_a_regular_file(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    os.symlink(tmp_path / "f", tmp_path / "link")
    os.symlink("/dev/zero", tmp_path / "zero")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, kind in [("link", "a symbolic link"), ("zero", "a symbolic link"), ("fifo", "a FIFO"),
                       ("dir", "a folder")]:
        with pytest.raises(FileReadError, match=rf"^{tmp_path / name}: preferences is {kind}"):
            sr.read_bytes(tmp_path / name, what="preferences")
    with pytest.raises(FileReadError, match=r"/dev/null: file is a character device"):
        sr.read_bytes("/dev/null")
    with pytest.raises(FileReadError, match=r"missing: file not found"):
        sr.read_bytes(tmp_path / "missing")


def test_a_fifo_never_blocks(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    result = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(FileReadError, sr.read_bytes, tmp_path / "fifo")))
    t.start()
    t.join(10)
    assert not t.is_alive() and result, "read_bytes blocked on a FIFO"


def test_size_limit_checked_before_reading(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 2000)
    with pytest.raises(FileReadError, match=r"f: file is 2000 bytes, over the limit of 1000 bytes .*--max-file-mb"):
        sr.read_bytes(tmp_path / "f", max_bytes=1000)
    with sr.limits_override(max_file_bytes=1500):
        with pytest.raises(FileReadError, match="over the limit of 1500 bytes"):
            sr.read_bytes(tmp_path / "f")
    assert sr.limits().max_file_bytes == sr.Limits().max_file_bytes            # restored
    assert len(sr.read_bytes(tmp_path / "f", max_bytes=2000)) == 2000


def test_set_limits_checks_its_arguments():
    with pytest.raises(TypeError, match="unknown limit"):
        sr.set_limits(max_bytes=3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            sr.set_limits(max_file_bytes=bad)
    old = sr.set_limits(max_json_depth=5)
    try:
        assert sr.limits().max_json_depth == 5
    finally:
        sr.set_limits(**{k: getattr(old, k) for k in old.__dataclass_fields__})


def test_read_text_names_the_line_of_invalid_utf8(tmp_path):
    (tmp_path / "f").write_bytes(b"ok\nok\nbad \xff here\n")
    with pytest.raises(FileReadError, match=r"f:3: file is not valid UTF-8 \(byte 10\)"):
        sr.read_text(tmp_path / "f")
    (tmp_path / "g").write_bytes("héllo\n".encode())
    assert sr.read_text(tmp_path / "g") == "héllo\n"


# ----------------------------------------------------------------------------- loads_json
def test_loads_json_accepts_ordinary_json():
    assert sr.loads_json('{"a": [1, 2.5, "x\\ud83d\\ude00"], "b": null}') == {"a": [1, 2.5, "x😀"], "b": None}
    assert sr.loads_json(b'{"a": 1}') == {"a": 1}
    assert sr.loads_json("[" * 64 + "]" * 64) is not None                     # exactly the depth limit


@pytest.mark.parametrize("text, why", [
    ("[" * 65 + "]" * 65, "nests deeper than 64 levels"),
    ("[" * 100000, "nests deeper than 64 levels"),
    ('{"a": ' * 1000 + "1" + "}" * 1000, "nests deeper than 64 levels"),
    ('{"a": NaN}', "NaN is not valid JSON"),
    ('[Infinity]', "Infinity is not valid JSON"),
    ('[-Infinity]', "-Infinity is not valid JSON"),
    ("[1" + "0" * 5000 + "]", "Exceeds the limit"),
    ('["\\ud800"]', "lone surrogate"),
    ('{"\\udfff": 1}', "lone surrogate"),
    ('["a\\uDBFFb"]', "lone surrogate"),
    ('{"a": 1', "not valid JSON"),
    (b'"\xff"', "not valid UTF-8"),
])
def test_loads_json_refuses(text, why):
    with pytest.raises(FileReadError) as e:
        sr.loads_json(text, "f.jsonl", 7, what="line")
    assert str(e.value).startswith("f.jsonl:7: line ") and why in str(e.value), str(e.value)


def test_brackets_inside_strings_do_not_count_as_nesting():
    assert sr.loads_json('["' + "[" * 1000 + '"]') == ["[" * 1000]


def test_no_duplicate_keys():
    with pytest.raises(FileReadError, match="duplicate key 'a'"):
        sr.loads_json('{"a": 1, "a": 2}', "f", object_pairs_hook=sr.no_duplicate_keys)
    assert sr.loads_json('{"a": {"a": 1}}', "f", object_pairs_hook=sr.no_duplicate_keys) == {"a": {"a": 1}}


# ----------------------------------------------------------------------------- load_npz
def test_load_npz_round_trip_and_expected():
    x, y = np.arange(6.0).reshape(2, 3), np.array([1, 2], np.int32)
    got = sr.load_npz(npz(x=x, y=y), "f.npz", expected={"x": ([2, 3], "<f8"), "y": ([2], "<i4")})
    np.testing.assert_array_equal(got["x"], x)
    np.testing.assert_array_equal(got["y"], y)


@pytest.mark.parametrize("expected, why", [
    ({"x": ([3], "<f8")}, "array 'x' has shape [2] dtype <f8; the manifest says shape [3]"),
    ({"x": ([2], "<f4")}, "the manifest says shape [2] dtype <f4"),
    ({"x": ([2], "<f8"), "z": ([1], "<f8")}, "lacks arrays ['z']"),
    ({}, "holds array 'x' that its manifest does not list"),
])
def test_load_npz_checks_the_manifest(expected, why):
    with pytest.raises(FileReadError) as e:
        sr.load_npz(npz(x=np.ones(2)), "f.npz", what="checkpoint", expected=expected)
    assert str(e.value).startswith("f.npz: checkpoint ") and why in str(e.value), str(e.value)


def test_load_npz_refuses_pickles_without_unpickling(monkeypatch):
    import pickle
    data = npz(x=np.array([{"a": 1}], dtype=object))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unpickled")))
    with pytest.raises(FileReadError, match="dtype object .*never loads pickles"):
        sr.load_npz(data, "f.npz")


def _zip(members, compress=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _header(shape, descr="<f8"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_load_npz_refuses_huge_declared_shapes_before_reading():
    with pytest.raises(FileReadError, match=r"declares .* of arrays or more, over the limit"):
        sr.load_npz(_zip({"x.npy": _header((1 << 40,))}), "f.npz")
    # a member that declares more than it holds
    with pytest.raises(FileReadError, match=r"declares shape \[1000\] <f8 \(8000 bytes\) but its member holds"):
        sr.load_npz(_zip({"x.npy": _header((1000,)) + b"\0" * 16}), "f.npz")


def test_load_npz_zip_bomb_is_refused_by_the_declared_size():
    bomb = _zip({"x.npy": _header((4 << 20,)) + b"\0" * (32 << 20)}, zipfile.ZIP_DEFLATED)   # 32 MiB in
    assert len(bomb) < 100_000
    with sr.limits_override(max_array_bytes=1 << 20):
        with pytest.raises(FileReadError, match="over the limit of 1.0 MiB"):
            sr.load_npz(bomb, "f.npz")


@pytest.mark.parametrize("members, why", [
    ({"x.txt": b"hi"}, "member 'x.txt' is not a .npy array"),
    ({"x.npy": b"not a header"}, "bad .npy header"),
    ({"x.npy": _header((2,), "|V8") + b"\0" * 16}, "structured record"),
])
def test_load_npz_refuses_bad_members(members, why):
    with pytest.raises(FileReadError, match=why):
        sr.load_npz(_zip(members), "f.npz")


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04", b"hello", npz(x=np.ones(100))[:300]])
def test_load_npz_refuses_truncated_or_foreign_archives(data):
    with pytest.raises(FileReadError, match=r"^f\.npz: "):
        sr.load_npz(data, "f.npz")


def test_too_many_members():
    with sr.limits_override(max_members=2):
        with pytest.raises(FileReadError, match="3 members, over the limit of 2"):
            sr.load_npz(npz(a=np.ones(1), b=np.ones(1), c=np.ones(1)), "f.npz")
