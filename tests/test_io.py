"""Atomic writes and checkpoints: every failure leaves the destination untouched or gives CheckpointError."""

import json
import os
import zipfile

import numpy as np
import pytest

from rlhf_ref import io as rio
from rlhf_ref.io import (CheckpointError, atomic_open, atomic_write_bytes, atomic_write_text, generator_from_state,
                         generator_state, load_checkpoint, save_checkpoint)
from rlhf_ref.tokenizer import Vocab


def arrays(rng=None):
    rng = rng or np.random.default_rng(0)
    return {
        "policy/embedding.weight": rng.standard_normal((5, 3)),
        "ref/head.bias": rng.standard_normal(5).astype(np.float32),
        "adam/m/policy/embedding.weight": np.zeros((5, 3)),
        "step": np.array(7, dtype=np.int64),
        "flags": np.array([True, False]),
        "fortran": np.asfortranarray(rng.standard_normal((2, 3))),
        "empty": np.zeros((0, 4)),
        "file": np.arange(3),                      # a name np.savez(file, **kw) could not take
    }


def manifest(rng=None):
    rng = rng or np.random.default_rng(1)
    return {"config": {"alpha": 1.0, "beta": 0.05, "H": 8, "kl": "k1", "steps": np.int64(3)},
            "vocab": Vocab("ab ").to_json(),
            "state": {"step": 3, "rng": generator_state(rng)}}


def listing(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_whole_files(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one\n")
    atomic_write_bytes(p, b"two\n")
    assert p.read_bytes() == b"two\n"
    with atomic_open(p, "w") as f:
        f.write("three\n")
    assert p.read_text() == "three\n"
    assert listing(tmp_path) == ["f.txt"]
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o666 & ~rio._UMASK)      # not mkstemp's 0600


def test_atomic_write_keeps_the_destination_when_writing_fails_midway(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"original")
    os.chmod(p, 0o640)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_open(p, "wb") as f:
            f.write(b"half of the new conte")
            raise Boom()
    assert p.read_bytes() == b"original"
    assert listing(tmp_path) == ["f.bin"]                   # the temporary file is gone
    atomic_write_bytes(p, b"new")
    assert os.stat(p).st_mode & 0o777 == 0o640              # a replaced file keeps its mode
    with pytest.raises(TypeError, match="data must be bytes-like"):
        atomic_write_bytes(p, "text")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "no" / "such" / "f", b"x")
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(p, "ab"):
            pass


# ----------------------------------------------------------------------------- checkpoints
def test_round_trip_is_exact_and_deterministic(tmp_path):
    a, m = arrays(), manifest()
    written = save_checkpoint(tmp_path / "ck", a, m)
    assert listing(tmp_path) == ["ck.json", "ck.npz"]
    got, meta = load_checkpoint(tmp_path / "ck")
    assert sorted(got) == sorted(a)
    for k in a:
        assert got[k].dtype == a[k].dtype and got[k].shape == a[k].shape and np.array_equal(got[k], a[k]), k
    assert meta == written
    assert meta["schema"] == "rlhf_ref.checkpoint" and meta["schema_version"] == 1
    assert meta["config"]["steps"] == 3 and meta["vocab"] == {"chars": "ab ", "specials": ["<pad>", "<bos>", "<eos>", "<unk>"]}
    assert meta["arrays"]["ref/head.bias"] == {"shape": [5], "dtype": "<f4"}
    assert Vocab.from_json(meta["vocab"]) == Vocab("ab ")
    # the same content gives the same bytes (fixed zip timestamps)
    save_checkpoint(tmp_path / "ck2.npz", a, m)              # a .npz suffix names the same stem
    assert (tmp_path / "ck.npz").read_bytes() == (tmp_path / "ck2.npz").read_bytes()
    # np.load reads it like any npz
    with np.load(tmp_path / "ck.npz", allow_pickle=False) as z:
        assert np.array_equal(z["policy/embedding.weight"], a["policy/embedding.weight"])


def test_rng_state_survives_the_manifest(tmp_path):
    rng = np.random.default_rng(42)
    rng.random(10)
    save_checkpoint(tmp_path / "ck", {"x": np.zeros(1)}, {"state": {"rng": generator_state(rng)}})
    _, meta = load_checkpoint(tmp_path / "ck")
    resumed = generator_from_state(meta["state"]["rng"])
    assert np.array_equal(resumed.random(5), rng.random(5))
    with pytest.raises(ValueError, match="unknown bit generator"):
        generator_from_state({"bit_generator": "Nope"})


def test_object_arrays_are_refused_before_anything_is_written(tmp_path):
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)}, {"v": 1})
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}
    bad = {"x": np.ones(2), "obj": np.array([{"a": 1}, None], dtype=object)}
    with pytest.raises(CheckpointError, match=r"arrays\['obj'\] has dtype object .*pickle"):
        save_checkpoint(tmp_path / "ck", bad, {"v": 2})
    with pytest.raises(ValueError, match="must be finite"):
        save_checkpoint(tmp_path / "ck", {"x": np.ones(2)}, {"lr": float("nan")})
    with pytest.raises(TypeError, match="cannot hold"):
        save_checkpoint(tmp_path / "ck", {"x": np.ones(2)}, {"f": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "ck", {"x": np.ones(2)}, {"sha256": "x"})
    with pytest.raises(ValueError, match="array names"):
        save_checkpoint(tmp_path / "ck", {"": np.ones(2)})
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before


def test_a_failure_while_writing_the_npz_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)}, {"v": 1})
    before = {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)}
    real = os.replace

    def exploding_replace(src, dst):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(os, "replace", exploding_replace)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path / "ck", {"x": np.zeros(2)}, {"v": 2})
    monkeypatch.setattr(os, "replace", real)
    assert {n: (tmp_path / n).read_bytes() for n in listing(tmp_path)} == before
    assert load_checkpoint(tmp_path / "ck")[1]["v"] == 1


def test_truncated_npz(tmp_path):
    save_checkpoint(tmp_path / "ck", arrays(), manifest())
    npz = tmp_path / "ck.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ck\.npz.*do not match manifest.*sha256"):
        load_checkpoint(tmp_path / "ck")
    # truncated and the manifest "agrees" (someone re-hashed it): the archive itself is refused
    m = json.loads((tmp_path / "ck.json").read_text())
    import hashlib
    m["sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    (tmp_path / "ck.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"ck\.npz: checkpoint is not a NumPy \.npz \(zip\) archive"):
        load_checkpoint(tmp_path / "ck")


def test_wrong_schema_version_names_found_and_supported(tmp_path):
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)})
    m = json.loads((tmp_path / "ck.json").read_text())
    m["schema_version"] = 99
    (tmp_path / "ck.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"ck\.json.*schema_version 99.*supports schema_version 1"):
        load_checkpoint(tmp_path / "ck")
    m["schema_version"] = "1"
    (tmp_path / "ck.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="expected an integer"):
        load_checkpoint(tmp_path / "ck")
    m["schema_version"], m["schema"] = 1, "something.else"
    (tmp_path / "ck.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="has schema 'something.else'"):
        load_checkpoint(tmp_path / "ck")


def _with_pickled_member(tmp_path):
    """A checkpoint whose npz holds a pickled object array and whose manifest matches its hash."""
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)})
    np.savez(tmp_path / "ck.npz", x=np.ones(2), evil=np.array([{"run": "code"}], dtype=object), allow_pickle=True)
    import hashlib
    m = json.loads((tmp_path / "ck.json").read_text())
    m["sha256"] = hashlib.sha256((tmp_path / "ck.npz").read_bytes()).hexdigest()
    m["arrays"]["evil"] = {"shape": [1], "dtype": "|O"}
    (tmp_path / "ck.json").write_text(json.dumps(m))


def test_a_pickle_inside_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    _with_pickled_member(tmp_path)
    import pickle

    def no_unpickling(*a, **k):
        raise AssertionError("load_checkpoint tried to unpickle")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(CheckpointError, match=r"ck\.npz: .*dtype object.*never loads pickles"):
        load_checkpoint(tmp_path / "ck")


def test_hash_mismatch(tmp_path):
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)})
    good = (tmp_path / "ck.npz").read_bytes()
    save_checkpoint(tmp_path / "other", {"x": np.zeros(2)})
    (tmp_path / "ck.npz").write_bytes((tmp_path / "other.npz").read_bytes())    # a different, valid npz
    with pytest.raises(CheckpointError, match=r"do not match manifest .*ck\.json"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck.npz").write_bytes(good)
    load_checkpoint(tmp_path / "ck")


def test_missing_files(tmp_path):
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)})
    os.remove(tmp_path / "ck.json")
    with pytest.raises(CheckpointError, match=r"ck\.json: checkpoint manifest not found.*interrupted"):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)})
    os.remove(tmp_path / "ck.npz")
    with pytest.raises(CheckpointError, match=r"ck\.npz.* not found"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing")


def test_bad_manifest_and_mismatched_tables(tmp_path):
    save_checkpoint(tmp_path / "ck", {"x": np.ones(2)})
    good = (tmp_path / "ck.json").read_text()
    (tmp_path / "ck.json").write_text(good[:20])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_checkpoint(tmp_path / "ck")
    m = json.loads(good)
    m["arrays"]["x"]["shape"] = [3]
    (tmp_path / "ck.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"ck\.npz: checkpoint array 'x' has shape \[2\] dtype <f8; the manifest says shape \[3\]"):
        load_checkpoint(tmp_path / "ck")
    m = json.loads(good)
    m["arrays"]["y"] = {"shape": [2], "dtype": "<f8"}
    (tmp_path / "ck.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"ck\.npz: checkpoint lacks arrays \['y'\] that its manifest lists"):
        load_checkpoint(tmp_path / "ck")


def test_npz_written_with_pickle_disabled_contains_no_pickle(tmp_path):
    save_checkpoint(tmp_path / "ck", arrays())
    with zipfile.ZipFile(tmp_path / "ck.npz") as z:
        names = z.namelist()
        assert all(n.endswith(".npy") for n in names)
        for n in names:
            header = z.read(n)[:128]
            assert b"'descr': '|O'" not in header
