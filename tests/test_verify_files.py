"""The verifier's file handling (issue 10): every file a golden manifest names is resolved inside
the golden folder before it is read or hashed, hostile files and broken manifests give
``rlhf-ref verify: error: <file>[:<line>]: <what>`` and exit status 2 — never a traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from rlhf_ref import safe_read, vectors as gv, verify as vf

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GOLDEN = os.path.join(HERE, "golden")


def _golden_copy(dst, cases=("base",)):
    """A golden folder with only ``cases`` (the stored files copied, the manifest cut down)."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(GOLDEN, gv.MANIFEST), encoding="utf-8") as f:
        man = json.load(f)
    man["cases"] = [e for e in man["cases"] if e["name"] in cases]
    for e in man["cases"]:
        shutil.copy(os.path.join(GOLDEN, e["file"]), os.path.join(dst, e["file"]))
    _write_manifest(dst, man)
    return man


def _write_manifest(folder, man):
    with open(os.path.join(folder, gv.MANIFEST), "w", encoding="utf-8") as f:
        json.dump(man, f)


def _base_outputs(folder):
    m = gv.load_manifest(GOLDEN)
    e = next(x for x in m["cases"] if x["name"] == "base")
    np.savez(os.path.join(folder, "base.npz"), **gv.outputs_of(e, gv.load_case(m, e)))


# ============================================================================ paths a manifest names

@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_manifest_cannot_name_a_file_outside_its_folder(tmp_path, how):
    """'../x.npz', an absolute path or a symlink leaving the folder is refused before the file is
    read, and the error does not depend on the file's contents (no oracle)."""
    outside = tmp_path / "outside.npz"
    shutil.copy(os.path.join(GOLDEN, "base.npz"), outside)
    msgs = []
    for content_matches in (True, False):
        g = tmp_path / f"g_{how}_{content_matches}"
        man = _golden_copy(g)
        e = man["cases"][0]
        if not content_matches:
            e["sha256"] = "0" * 64
        if how == "dotdot":
            e["file"] = "../outside.npz"
        elif how == "absolute":
            e["file"] = str(outside)
        elif how == "symlink":
            os.remove(g / "base.npz")
            os.symlink(outside, g / "base.npz")
        else:
            os.makedirs(tmp_path / "realdir", exist_ok=True)
            shutil.copy(outside, tmp_path / "realdir" / "base.npz")
            os.remove(g / "base.npz")
            os.symlink(tmp_path / "realdir", g / "sub")
            e["file"] = "sub/base.npz"
        _write_manifest(g, man)
        m = gv.load_manifest(str(g))
        with pytest.raises(gv.GoldenError) as ei:
            gv.load_case(m, m["cases"][0])
        msg = str(ei.value)
        assert "sha256" not in msg and ("symbolic link" in msg or "plain relative path" in msg), msg
        msgs.append(msg.replace(str(g), "<folder>"))
    assert msgs[0] == msgs[1]           # the same error whether the outside file's hash matches or not


def test_list_mistakes(capsys):
    from rlhf_ref.golden import mistakes as mk
    assert vf.main(_ns(list_mistakes=True)) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(mk.MISTAKES)
    for line, m in zip(out, mk.MISTAKES):
        assert line.split()[0] == m.name and "\n" not in m.line()


def _ns(**kw):
    from argparse import Namespace
    d = dict(cases=None, outputs=None, layout=None, names=None, lenient_mask=False, verbose=False,
             max_file_mb=None, list_mistakes=False)
    d.update(kw)
    return Namespace(**d)


# ============================================================================ hostile files, one subprocess

def _npy_bytes(a):
    b = io.BytesIO()
    np.lib.format.write_array(b, a, allow_pickle=False)
    return b.getvalue()


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _hostile(tmp_path):
    """[(label, argv)] of `rlhf-ref verify` runs that must each end in a clean error (exit 2)."""
    good = tmp_path / "good"
    _golden_copy(good)
    outs = tmp_path / "outs"
    outs.mkdir()
    _base_outputs(outs)
    runs = []

    def golden_variant(label, edit):
        g = tmp_path / ("g_%d" % len(runs))
        man = _golden_copy(g)
        edit(g, man)
        runs.append((label, ["verify", str(g), str(outs)]))

    def outputs_variant(label, make, extra=()):
        o = tmp_path / ("o_%d" % len(runs))
        o.mkdir()
        make(o / "base.npz")
        runs.append((label, ["verify", str(good), str(o), *extra]))

    # the golden folder or its manifest is not a regular file
    os.symlink("/dev/zero", tmp_path / "golden_is_dev_zero")
    runs.append(("golden folder -> /dev/zero", ["verify", str(tmp_path / "golden_is_dev_zero"), str(outs)]))
    fifo_dir = tmp_path / "g_fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / gv.MANIFEST)
    runs.append(("manifest is a FIFO", ["verify", str(fifo_dir), str(outs)]))
    # broken manifests
    golden_variant("manifest not JSON", lambda g, m: (g / gv.MANIFEST).write_text("{not json"))
    golden_variant("manifest NaN", lambda g, m: (g / gv.MANIFEST).write_text('{"schema": NaN}'))
    golden_variant("manifest deeply nested", lambda g, m: (g / gv.MANIFEST).write_text("[" * 100000 + "]" * 100000))
    golden_variant("manifest not UTF-8", lambda g, m: (g / gv.MANIFEST).write_bytes(b'{"a": "\xff"}'))
    golden_variant("cases not a list", lambda g, m: _write_manifest(g, dict(m, cases={"base": 1})))
    golden_variant("case not an object", lambda g, m: _write_manifest(g, dict(m, cases=[3])))
    golden_variant("case without outputs", lambda g, m: _write_manifest(
        g, dict(m, cases=[{k: v for k, v in m["cases"][0].items() if k != "outputs"}])))
    golden_variant("dims a string", lambda g, m: _write_manifest(
        g, dict(m, cases=[dict(m["cases"][0], dims=dict(m["cases"][0]["dims"], B="4"))])))
    golden_variant("dims huge", lambda g, m: _write_manifest(
        g, dict(m, cases=[dict(m["cases"][0], dims=dict(m["cases"][0]["dims"], T=10 ** 12))])))
    golden_variant("dims disagree with the arrays", lambda g, m: _write_manifest(
        g, dict(m, cases=[dict(m["cases"][0], dims=dict(m["cases"][0]["dims"], B=5))])))
    golden_variant("config dtype wrong", lambda g, m: _write_manifest(
        g, dict(m, cases=[dict(m["cases"][0], config=dict(m["cases"][0]["config"], dtype="object"))])))
    golden_variant("unknown array name", lambda g, m: _write_manifest(
        g, dict(m, cases=[dict(m["cases"][0], outputs=m["cases"][0]["outputs"] + ["../../x"])])))
    golden_variant("file ../", lambda g, m: _write_manifest(g, dict(m, cases=[dict(m["cases"][0], file="../x.npz")])))
    golden_variant("file /etc/hostname", lambda g, m: _write_manifest(
        g, dict(m, cases=[dict(m["cases"][0], file="/etc/hostname")])))
    golden_variant("case file is /dev/zero", lambda g, m: (os.remove(g / "base.npz"),
                                                           os.symlink("/dev/zero", g / "base.npz")))
    golden_variant("case file truncated", lambda g, m: (g / "base.npz").write_bytes(
        (g / "base.npz").read_bytes()[:1000]))

    def truncated_with_hash(g, m):
        data = (g / "base.npz").read_bytes()[:3000]
        (g / "base.npz").write_bytes(data)
        _write_manifest(g, dict(m, cases=[dict(m["cases"][0], sha256=hashlib.sha256(data).hexdigest())]))
    golden_variant("case file truncated, hash updated", truncated_with_hash)

    def token_out_of_range(g, m):
        arrays = dict(np.load(g / "base.npz"))
        arrays["tokens"] = arrays["tokens"].copy()
        arrays["tokens"][0, 1] = 99
        data = gv.npz_bytes(arrays)
        (g / "base.npz").write_bytes(data)
        _write_manifest(g, dict(m, cases=[dict(m["cases"][0], sha256=hashlib.sha256(data).hexdigest())]))
    golden_variant("token id out of range, hash updated", token_out_of_range)
    # hostile outputs
    runs.append(("outputs -> /dev/zero", ["verify", str(good), "/dev/zero"]))
    os.symlink("/dev/zero", tmp_path / "outs_link")
    runs.append(("outputs folder symlink -> /dev/zero", ["verify", str(good), str(tmp_path / "outs_link")]))
    outputs_variant("outputs file -> /dev/zero", lambda p: os.symlink("/dev/zero", p))
    outputs_variant("outputs file is a FIFO", lambda p: os.mkfifo(p))
    outputs_variant("outputs truncated", lambda p: p.write_bytes((outs / "base.npz").read_bytes()[:700]))
    outputs_variant("outputs is a .npy", lambda p: p.write_bytes(_npy_bytes(np.zeros(3))))
    outputs_variant("outputs object array", lambda p: _zip(p, {"logp.npy": _npy_bytes_obj()}))
    outputs_variant("outputs not .npy members", lambda p: _zip(p, {"logp.txt": b"1 2 3"}))
    # a bomb: 64 MiB of zeros in ~64 KiB, read with a 1 MiB limit; and a header declaring 8 TiB
    outputs_variant("outputs zip bomb", lambda p: _zip(p, {"logp.npy": _npy_bytes(np.zeros(8 << 20))},
                                                       zipfile.ZIP_DEFLATED), extra=("--max-file-mb", "1"))
    outputs_variant("outputs declares 8 TiB", lambda p: _zip(p, {"logp.npy": _npy_header((1 << 40,))}))
    runs.append(("file over --max-file-mb", ["verify", str(good), str(outs), "--max-file-mb", "0.001"]))
    runs.append(("bad --max-file-mb", ["verify", str(good), str(outs), "--max-file-mb", "-3"]))
    runs.append(("no such golden folder", ["verify", str(tmp_path / "nope"), str(outs)]))
    runs.append(("no such outputs", ["verify", str(good), str(tmp_path / "nope")]))
    return runs


def _npy_bytes_obj():
    """A .npy header declaring an object array (a pickle would follow)."""
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    return b.getvalue() + b"\x80\x04N."


def _npy_header(shape):
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return b.getvalue()


_DRIVER = r"""
import contextlib, io, json, sys, traceback
from rlhf_ref import cli
res = []
for label, argv in json.load(sys.stdin):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = "traceback"
            traceback.print_exc(file=err)
    res.append([label, code, err.getvalue(), out.getvalue()])
print(json.dumps(res))
"""


def test_hostile_golden_folders_and_outputs_give_clean_errors(tmp_path):
    runs = _hostile(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(runs), capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert len(res) == len(runs)
    for label, code, err, out in res:
        assert "Traceback" not in err, (label, err)
        assert code == 2, (label, code, err, out)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rlhf-ref verify: error: "), (label, err)
        where = lines[0][len("rlhf-ref verify: error: "):]
        assert ": " in where, (label, err)
        assert where.startswith((str(tmp_path), "/dev/zero", "--max-file-mb")), (label, err)


def test_limits_come_back_after_the_cli(tmp_path):
    before = safe_read.limits()
    _golden_copy(tmp_path / "g")
    assert vf.main(_ns(cases=str(tmp_path / "g"), outputs=str(tmp_path), max_file_mb=0.5)) == 1   # nothing given
    assert safe_read.limits() == before
