"""Hostile files through the real commands: every one ends in ``rlhf-ref <cmd>: error: <file>[:<line>]: …``
and exit status 2 — never a traceback, a hang, or a read of something outside the folder given.

One subprocess (this file run as a script) builds a small run folder, then runs every case
in-process through ``rlhf_ref.cli.main([...])`` with stderr captured, each in a fresh copy of the
folder, under an alarm (a FIFO that blocks is reported as a hang), and prints a JSON report; the
test asserts on that report. ``python tests/test_hostile_files.py --report`` prints a summary
(tried / tracebacks / hangs / other exit codes) for any tree on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_SECONDS = 20          # a case still running after this is a hang

PRETRAIN = ["--set", "hidden=8", "--set", "embed=8", "--set", "steps=4", "--set", "batch_size=4",
            "--set", "eval_every=0", "--set", "ckpt_every=2", "--progress", "off", "--backend", "numpy"]
RM = ["--set", "steps=2", "--set", "batch_size=4", "--set", "eval_every=0", "--set", "ckpt_every=2",
      "--set", "heldout_frac=0.25", "--progress", "off", "--backend", "numpy"]
RL = ["--set", "steps=2", "--set", "batch_size=4", "--set", "norm_samples=4", "--set", "max_new=4",
      "--set", "ckpt_every=2", "--progress", "off", "--backend", "numpy"]


# ---------------------------------------------------------------------------------------------
# the child: build a run folder, run every case

def _prefs():
    return [{"prompt": "the cat ", "chosen": f"sat on the mat {i}.", "rejected": f"sat {i}", "margin": 0.5}
            for i in range(8)]


def _build(base):
    from rlhf_ref import cli
    from rlhf_ref.label import write_candidates
    from rlhf_ref.preferences import save_preferences
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train-pretrain", "--out", base, *PRETRAIN]) == 0
        save_preferences(os.path.join(base, "prefs.jsonl"), _prefs())
        assert cli.main(["train-rm", "--out", base, "--preferences", os.path.join(base, "prefs.jsonl"), *RM]) == 0
    write_candidates(os.path.join(base, "cands.jsonl"), [("the cat ", "sat.", "ran."), ("a dog ", "ran.", "sat.")])
    with open(os.path.join(base, "prompts.txt"), "w") as f:
        f.write("the cat \na dog \n")


def _ck(d, stage="pretrain"):
    """The stem of the stage's one checkpoint in run folder d."""
    folder = os.path.join(d, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith(stage + "-") and n.endswith(".json"))
    return os.path.join(folder, names[-1][:-5])


def _manifest(stem):
    with open(stem + ".json") as f:
        return json.load(f)


def _write_manifest(stem, m):
    with open(stem + ".json", "w") as f:
        json.dump(m, f)


def _write_npz(stem, arrays, compress=False, rehash=True, update_table=True):
    """Replace the checkpoint's npz by ``arrays`` ({name: ndarray or raw .npy bytes}); rehash the
    manifest so that only the content is wrong."""
    import numpy as np
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            if isinstance(a, bytes):
                zf.writestr(name if name.endswith((".npy", ".txt")) else name + ".npy", a)
            else:
                with zf.open(name + ".npy", "w", force_zip64=True) as m:
                    np.lib.format.write_array(m, a, allow_pickle=a.dtype.hasobject)
    data = buf.getvalue()
    with open(stem + ".npz", "wb") as f:
        f.write(data)
    if rehash:
        m = _manifest(stem)
        m["sha256"] = hashlib.sha256(data).hexdigest()
        if update_table:
            m["arrays"] = {k: {"shape": list(a.shape), "dtype": a.dtype.str} for k, a in arrays.items()
                           if not isinstance(a, bytes)}
        _write_manifest(stem, m)


def _arrays(stem):
    import numpy as np
    with np.load(stem + ".npz") as z:
        return {k: z[k] for k in z.files}


def _rewrite_npz(stem, change, **kw):
    a = _arrays(stem)
    change(a)
    _write_npz(stem, a, **kw)


def _npy_header(shape, dtype="<f4"):
    """The bytes of a .npy header declaring ``shape`` (and no data)."""
    import numpy as np
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _fifo(path):
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


def _symlink(target, path):
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def _folder(path):
    if os.path.lexists(path):
        os.unlink(path)
    os.mkdir(path)


def _text(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)


def _bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def cases(outside):
    """(name, command, setup(d) -> (argv, file whose name the error must give)). ``outside`` is a
    folder beside the run folder holding valid files (a read of one of them is a read outside)."""
    import numpy as np
    C = []

    def case(name, cmd):
        def deco(fn):
            C.append((name, cmd, fn))
            return fn
        return deco

    # ---- checkpoints, through `sample --checkpoint <stem>` and `sample --checkpoint <run folder>`
    def ck_case(name, mutate, which=".json", folder=False):
        def setup(d):
            stem = _ck(d)
            mutate(stem, d)
            target = d if folder else stem + ".npz"
            return ["sample", "--checkpoint", target, "--n", "1", "--max-len", "3", "--backend", "numpy"], \
                os.path.basename(stem + which)
        C.append(("checkpoint: " + name, "sample", setup))

    ck_case("manifest symlink to /dev/zero", lambda s, d: _symlink("/dev/zero", s + ".json"))
    ck_case("npz symlink to /dev/zero", lambda s, d: _symlink("/dev/zero", s + ".npz"), ".npz")
    ck_case("manifest is a FIFO", lambda s, d: _fifo(s + ".json"))
    ck_case("npz is a FIFO", lambda s, d: _fifo(s + ".npz"), ".npz")
    ck_case("manifest is a folder", lambda s, d: (os.unlink(s + ".json"), _folder(s + ".json")))
    ck_case("npz is a folder", lambda s, d: (os.unlink(s + ".npz"), _folder(s + ".npz")), ".npz")
    ck_case("npz symlink to another checkpoint's npz (outside)",
            lambda s, d: _symlink(os.path.join(outside, "other.npz"), s + ".npz"), ".npz")
    ck_case("manifest symlink to another checkpoint's manifest (outside)",
            lambda s, d: _symlink(os.path.join(outside, "other.json"), s + ".json"))
    ck_case("run folder: manifest symlink outside", lambda s, d: _symlink(os.path.join(outside, "other.json"),
                                                                        s + ".json"), folder=True)
    ck_case("run folder: manifest is a FIFO", lambda s, d: _fifo(s + ".json"), folder=True)
    for entry in ("../other.npz", "/etc/passwd", "sub/x.npz", "..", 123, None, ""):
        ck_case(f"manifest npz entry {entry!r}",
                lambda s, d, e=entry: _write_manifest(s, {**_manifest(s), "npz": e}))
    ck_case("manifest nested 100000 deep", lambda s, d: _text(s + ".json", "[" * 100000 + "]" * 100000))
    ck_case("manifest nested object 5000 deep in state",
            lambda s, d: _text(s + ".json", json.dumps({**_manifest(s), "x": 0})[:-1] + ', "deep": '
                               + '{"a": ' * 5000 + "1" + "}" * 5000 + "}"))
    ck_case("manifest 401-digit schema_version", lambda s, d: _write_manifest(s, {**_manifest(s),
                                                                                  "schema_version": 10 ** 400}))
    ck_case("manifest 5000-digit integer", lambda s, d: _text(s + ".json", '{"schema": ' + "9" * 5000 + "}"))
    ck_case("manifest NaN", lambda s, d: _text(s + ".json", json.dumps({**_manifest(s), "x": float("nan")})))
    ck_case("manifest duplicate keys", lambda s, d: _text(s + ".json", json.dumps(_manifest(s))[:-1]
                                                          + ', "schema": "rlhf_ref.checkpoint"}'))
    ck_case("manifest invalid UTF-8", lambda s, d: _bytes(s + ".json", b'{"schema": "\xff\xfe"}'))
    ck_case("manifest lone surrogate in the vocabulary",
            lambda s, d: _text(s + ".json", json.dumps(_manifest(s)).replace('"vocab": {', '"vocab": {"x": "\\ud800", ', 1)))
    ck_case("manifest is a JSON array", lambda s, d: _text(s + ".json", "[]"))
    ck_case("manifest empty", lambda s, d: _text(s + ".json", ""))
    ck_case("manifest truncated", lambda s, d: _text(s + ".json", json.dumps(_manifest(s))[:50]))
    ck_case("manifest wrong schema", lambda s, d: _write_manifest(s, {**_manifest(s), "schema": "x"}))
    ck_case("manifest arrays table a list", lambda s, d: _write_manifest(s, {**_manifest(s), "arrays": []}))
    ck_case("manifest negative shape", lambda s, d: _write_manifest(s, {
        **_manifest(s), "arrays": {**_manifest(s)["arrays"], "policy/head.bias": {"shape": [-1], "dtype": "<f4"}}}))
    ck_case("manifest shape of strings", lambda s, d: _write_manifest(s, {
        **_manifest(s), "arrays": {**_manifest(s)["arrays"], "policy/head.bias": {"shape": ["a"], "dtype": "<f4"}}}))
    ck_case("manifest state.step a string", lambda s, d: _write_manifest(s, {
        **_manifest(s), "state": {**_manifest(s)["state"], "step": "four"}}))
    ck_case("manifest state.step 401 digits", lambda s, d: _write_manifest(s, {
        **_manifest(s), "state": {**_manifest(s)["state"], "step": 10 ** 400}}))
    ck_case("manifest state a list", lambda s, d: _write_manifest(s, {**_manifest(s), "state": [1]}))
    ck_case("manifest vocabulary a number", lambda s, d: _write_manifest(s, {**_manifest(s), "vocab": 3}))
    ck_case("manifest rng_state garbage", lambda s, d: _write_manifest(s, {
        **_manifest(s), "state": {**_manifest(s)["state"], "rng_state": {"bit_generator": "PCG64", "state": 7}}}))
    ck_case("manifest rng_state names a non-generator", lambda s, d: _write_manifest(s, {
        **_manifest(s), "state": {**_manifest(s)["state"], "rng_state": {"bit_generator": "Generator"}}}))
    ck_case("npz truncated", lambda s, d: _bytes(s + ".npz", open(s + ".npz", "rb").read()[:200]), ".npz")
    ck_case("npz truncated, manifest rehashed",
            lambda s, d: (_bytes(s + ".npz", open(s + ".npz", "rb").read()[:200]),
                          _write_manifest(s, {**_manifest(s), "sha256": hashlib.sha256(
                              open(s + ".npz", "rb").read()).hexdigest()})), ".npz")
    ck_case("npz is text, manifest rehashed",
            lambda s, d: (_bytes(s + ".npz", b"hello"),
                          _write_manifest(s, {**_manifest(s), "sha256": hashlib.sha256(b"hello").hexdigest()})), ".npz")
    ck_case("npz empty", lambda s, d: _bytes(s + ".npz", b""), ".npz")
    for dt in ("float16", "int64", "<U3", "complex64", "bool"):
        ck_case(f"policy array of dtype {dt}", lambda s, d, dt=dt: _rewrite_npz(
            s, lambda a: a.__setitem__("policy/lstm.weight_hh_l0", a["policy/lstm.weight_hh_l0"].astype(dt))), ".npz")
    ck_case("every policy array float16", lambda s, d: _rewrite_npz(
        s, lambda a: [a.__setitem__(k, v.astype("float16")) for k, v in list(a.items())]), ".npz")
    ck_case("policy embedding 1-D", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/embedding.weight", a["policy/embedding.weight"].ravel())), ".npz")
    ck_case("policy lstm weight 1-D", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/lstm.weight_hh_l0", a["policy/lstm.weight_hh_l0"].ravel())), ".npz")
    ck_case("policy head 3-D", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.weight", a["policy/head.weight"][None])), ".npz")
    ck_case("policy head wrong width", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.weight", a["policy/head.weight"][:, :3])), ".npz")
    ck_case("policy array missing", lambda s, d: _rewrite_npz(s, lambda a: a.pop("policy/head.bias")), ".npz")
    ck_case("policy weights NaN", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.bias", a["policy/head.bias"] * np.nan)), ".npz")
    ck_case("policy mixed float32/float64", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.bias", a["policy/head.bias"].astype("float64"))), ".npz")
    ck_case("Adam moment of the wrong shape", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("adam_m/head.bias", a["adam_m/head.bias"][:2])), ".npz")
    ck_case("object (pickled) array", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.bias", np.array([{"evil": 1}], dtype=object))), ".npz")
    ck_case("structured array", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.bias", np.zeros(3, dtype=[("a", "<f4")]))), ".npz")
    ck_case("npz member that is not .npy", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("evil.txt", b"hello")), ".npz")
    ck_case("npz holds an array the manifest lacks", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("extra", np.zeros(2, np.float32)), update_table=False), ".npz")
    ck_case("huge declared shape (header only)", lambda s, d: _rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.bias", _npy_header((1 << 40,))), update_table=False), ".npz")
    ck_case("huge declared shape in manifest and header", lambda s, d: (_rewrite_npz(
        s, lambda a: a.__setitem__("policy/head.bias", _npy_header((1 << 20, 1 << 20))), update_table=False),
        _write_manifest(s, {**_manifest(s), "arrays": {**_manifest(s)["arrays"], "policy/head.bias": {
            "shape": [1 << 20, 1 << 20], "dtype": "<f4"}}})), ".npz")

    def zip_bomb(s, d):          # 16 MiB of zeros deflated to ~16 KiB, declared as it is
        a = _arrays(s)
        a["policy/head.bias"] = np.zeros(4 << 20, np.float32)
        _write_npz(s, a, compress=True)

    C.append(("checkpoint: zip bomb (16 MiB of arrays in a small file, limit 1 MiB)", "sample",
              lambda d: (["sample", "--checkpoint", _ck(d) + ".npz", "--n", "1", "--max-file-mb", "1",
                          "--backend", "numpy"], (zip_bomb(_ck(d), d), os.path.basename(_ck(d) + ".npz"))[1])))
    C.append(("checkpoint: npz over --max-file-mb", "sample",
              lambda d: (["sample", "--checkpoint", _ck(d), "--n", "1", "--max-file-mb", "0.01",
                          "--backend", "numpy"], os.path.basename(_ck(d) + ".npz"))))
    C.append(("checkpoint: reward model given as the policy", "sample",
              lambda d: (["sample", "--checkpoint", _ck(d, "reward"), "--n", "1", "--backend", "numpy"],
                         os.path.basename(_ck(d, "reward")))))

    # ---- preferences, through `train-rm --preferences`
    def pref_case(name, make, line=None, extra=()):
        def setup(d):
            p = os.path.join(d, "p.jsonl")
            make(p)
            return ["train-rm", "--out", d, "--preferences", p, *RM, *extra], \
                "p.jsonl" + ("" if line is None else f":{line}")
        C.append(("preferences: " + name, "train-rm", setup))

    good = json.dumps(_prefs()[0]) + "\n"

    def line(s):
        return lambda p: _text(p, good + s + "\n" + good)

    pref_case("symlink to /dev/zero", lambda p: _symlink("/dev/zero", p))
    pref_case("symlink to a valid file outside", lambda p: _symlink(os.path.join(outside, "prefs.jsonl"), p))
    pref_case("FIFO", _fifo)
    pref_case("folder", _folder)
    pref_case("over --max-file-mb", lambda p: _text(p, good * 20000), extra=("--max-file-mb", "1"))
    pref_case("nested 100000 deep", line("[" * 100000 + "]" * 100000), 2)
    pref_case("nested inside a metadata field", line(good.strip()[:-1] + ', "m": ' + "[" * 1000 + "]" * 1000 + "}"), 2)
    pref_case("401-digit margin", line('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1' + "0" * 400 + "}"), 2)
    pref_case("5000-digit margin", line('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1' + "0" * 5000 + "}"), 2)
    pref_case("1e999 margin", line('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": 1e999}'), 2)
    pref_case("NaN margin", line('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}'), 2)
    pref_case("lone surrogate in chosen", line('{"prompt": "a", "chosen": "\\ud800", "rejected": "c"}'), 2)
    pref_case("lone surrogate as a key", line('{"prompt": "a", "chosen": "b", "rejected": "c", "\\udfff": 1}'), 2)
    pref_case("duplicate keys", line('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}'), 2)
    pref_case("missing field", line('{"prompt": "a", "chosen": "b"}'), 2)
    pref_case("chosen a number", line('{"prompt": "a", "chosen": 1, "rejected": "c"}'), 2)
    pref_case("a JSON array line", line("[1, 2]"), 2)
    pref_case("invalid UTF-8", lambda p: _bytes(p, good.encode() + b'{"prompt": "\xc3\x28"}\n'), 2)
    pref_case("cut off mid-line", lambda p: _text(p, good + good[:30]), 2)
    pref_case("tie not a boolean", line('{"prompt": "a", "chosen": "b", "rejected": "c", "tie": "yes"}'), 2)
    pref_case("empty file", lambda p: _text(p, ""))
    pref_case("NUL bytes", lambda p: _bytes(p, b"\x00" * 100), 1)

    # ---- candidates and the labeler's output, through `label`
    def label_case(name, make, make_out=None, line=None, which="c.jsonl"):
        def setup(d):
            c = os.path.join(d, "c.jsonl")
            shutil.copy(os.path.join(d, "cands.jsonl"), c)
            make(c)
            o = os.path.join(d, "o.jsonl")
            if make_out:
                make_out(o)
            return ["label", c, "-o", o], which + ("" if line is None else f":{line}")
        C.append(("label: " + name, "label", setup))

    cgood = '{"id": "x1", "prompt": "p", "a": "A", "b": "B"}\n'
    label_case("candidates symlink to /dev/zero", lambda c: _symlink("/dev/zero", c))
    label_case("candidates FIFO", _fifo)
    label_case("candidates folder", _folder)
    label_case("candidates nested", lambda c: _text(c, cgood + "[" * 100000 + "\n"), line=2)
    label_case("candidates lone surrogate", lambda c: _text(c, cgood + '{"id": "x2", "prompt": "p", "a": "\\ud800", '
                                                               '"b": "B"}\n'), line=2)
    label_case("candidates duplicate id", lambda c: _text(c, cgood + cgood), line=2)
    label_case("candidates duplicate key", lambda c: _text(c, '{"id": "x1", "id": "x2", "prompt": "p", "a": "A", '
                                                              '"b": "B"}\n'), line=1)
    label_case("candidates missing b", lambda c: _text(c, '{"id": "x1", "prompt": "p", "a": "A"}\n'), line=1)
    label_case("candidates invalid UTF-8", lambda c: _bytes(c, b'{"id": "\xff"}\n'), line=1)
    label_case("candidates id a 401-digit number", lambda c: _text(c, '{"id": 1' + "0" * 400 + ', "prompt": "p", '
                                                                      '"a": "A", "b": "B"}\n'), line=1)
    label_case("output symlink to /dev/zero", lambda c: None, lambda o: _symlink("/dev/zero", o), which="o.jsonl")
    label_case("output FIFO", lambda c: None, _fifo, which="o.jsonl")
    label_case("output dangling symlink outside", lambda c: None,
               lambda o: _symlink(os.path.join(outside, "new.jsonl"), o), which="o.jsonl")
    label_case("output with a lone surrogate", lambda c: None,
               lambda o: _text(o, '{"prompt": "p", "chosen": "\\udbff", "rejected": "B", "pair_id": "x"}\n'),
               line=1, which="o.jsonl")
    label_case("output nested", lambda c: None, lambda o: _text(o, "{" * 50000 + "\n"), line=1, which="o.jsonl")

    # ---- train-rl: the reward model and the prompts file
    def rl_case(name, setup_rl):
        C.append(("train-rl: " + name, "train-rl", setup_rl))

    rl_case("--prompts FIFO", lambda d: (_fifo(os.path.join(d, "pr.txt")),
                                         (["train-rl", "--out", d, "--prompts", os.path.join(d, "pr.txt"), *RL],
                                          "pr.txt"))[1])
    rl_case("--prompts symlink to /dev/zero", lambda d: (_symlink("/dev/zero", os.path.join(d, "pr.txt")),
                                                        (["train-rl", "--out", d, "--prompts",
                                                          os.path.join(d, "pr.txt"), *RL], "pr.txt"))[1])
    rl_case("--prompts invalid UTF-8", lambda d: (_bytes(os.path.join(d, "pr.txt"), b"the \xff\n"),
                                                 (["train-rl", "--out", d, "--prompts", os.path.join(d, "pr.txt"),
                                                   *RL], "pr.txt:1"))[1])
    rl_case("--reward-model npz float16", lambda d: (_rewrite_npz(_ck(d, "reward"), lambda a: a.__setitem__(
        "rm/reward.weight", a["rm/reward.weight"].astype("float16"))),
        (["train-rl", "--out", d, "--reward-model", _ck(d, "reward"), *RL],
         os.path.basename(_ck(d, "reward")) + ".npz"))[1])
    rl_case("run folder's reward manifest symlink to /dev/zero",
            lambda d: (_symlink("/dev/zero", _ck(d, "reward") + ".json"),
                       (["train-rl", "--out", d, *RL], os.path.basename(_ck(d, "reward")) + ".json"))[1])
    rl_case("reward model missing its reward head", lambda d: (_rewrite_npz(_ck(d, "reward"), lambda a: (
        a.pop("rm/reward.weight"), a.pop("rm/reward.bias"))),
        (["train-rl", "--out", d, *RL], os.path.basename(_ck(d, "reward")) + ".npz"))[1])

    # ---- resume: train-pretrain (metrics on resume) and demo --out
    def resume_case(name, mutate_metrics, line=None):
        def setup(d):
            stem = _ck(d)
            m = _manifest(stem)
            m["state"] = {**m["state"], "done": False, "step": 2}       # a run stopped at step 2 of 4
            _write_manifest(stem, m)
            p = os.path.join(d, "metrics", "pretrain.jsonl")
            mutate_metrics(p)
            return ["train-pretrain", "--out", d, *PRETRAIN], "pretrain.jsonl" + ("" if line is None else f":{line}")
        C.append(("resume: metrics " + name, "train-pretrain", setup))

    resume_case("symlink to /dev/zero", lambda p: _symlink("/dev/zero", p))
    resume_case("FIFO", _fifo)
    resume_case("folder", lambda p: (os.unlink(p), _folder(p)))
    resume_case("nested", lambda p: _text(p, "[" * 100000 + "\n", "a"), line=5)
    resume_case("step a string", lambda p: _text(p, '{"stage": "pretrain", "step": "1"}\n', "a"), line=5)
    resume_case("a row that is not an object", lambda p: _text(p, "[1]\n", "a"), line=5)
    resume_case("a broken line before the last", lambda p: _text(p, '{"sta\n{"stage": "pretrain", "step": 1}\n',
                                                                 "a"), line=5)
    resume_case("lone surrogate", lambda p: _text(p, '{"stage": "\\ud800", "step": 1}\n', "a"), line=5)

    def demo_case(name, mutate, which):
        def setup(d):
            os.makedirs(os.path.join(d, "checkpoints"), exist_ok=True)
            stem = os.path.join(d, "checkpoints", "pretrain-000120")
            mutate(stem, d)
            return ["demo", "--quick", "--out", d, "--backend", "numpy", "--progress", "off"], which
        C.append(("demo: " + name, "demo", setup))

    demo_case("checkpoint manifest FIFO", lambda s, d: (shutil.rmtree(os.path.join(d, "checkpoints")),
                                                        os.makedirs(os.path.join(d, "checkpoints")),
                                                        _fifo(s + ".json")), "pretrain-000120.json")
    demo_case("checkpoint manifest symlink to /dev/zero",
              lambda s, d: (shutil.rmtree(os.path.join(d, "checkpoints")), os.makedirs(os.path.join(d, "checkpoints")),
                            _symlink("/dev/zero", s + ".json")), "pretrain-000120.json")
    demo_case("checkpoint manifest symlink outside",
              lambda s, d: (shutil.rmtree(os.path.join(d, "checkpoints")), os.makedirs(os.path.join(d, "checkpoints")),
                            _symlink(os.path.join(outside, "other.json"), s + ".json")), "pretrain-000120.json")
    demo_case("checkpoint npz symlink outside",
              lambda s, d: (shutil.rmtree(os.path.join(d, "checkpoints")), os.makedirs(os.path.join(d, "checkpoints")),
                            shutil.copy(os.path.join(outside, "other.json"), s + ".json"),
                            _symlink(os.path.join(outside, "other.npz"), s + ".npz")), "pretrain-000120.npz")
    return C


class _Hang(Exception):
    pass


def _run_cases(work):
    import resource
    import signal
    # an unbounded read (a symlink to /dev/zero) must fail here with MemoryError, not invite the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    from rlhf_ref import cli
    from rlhf_ref.safe_read import limits, set_limits
    base, outside = os.path.join(work, "base"), os.path.join(work, "outside")
    _build(base)
    os.makedirs(outside)
    stem = _ck(base)
    shutil.copy(stem + ".json", os.path.join(outside, "other.json"))
    shutil.copy(stem + ".npz", os.path.join(outside, "other.npz"))
    shutil.copy(os.path.join(base, "prefs.jsonl"), os.path.join(outside, "prefs.jsonl"))
    # the labeler wants a terminal: give it a pseudo-terminal with 'q' (quit) typed ahead
    master, slave = os.openpty()
    sys.stdin = os.fdopen(slave, "r")

    def on_alarm(signum, frame):
        raise _Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    default = limits()
    report = []
    for i, (name, cmd, setup) in enumerate(cases(outside)):
        d = os.path.join(work, f"case{i:03d}")
        shutil.copytree(base, d, symlinks=True)
        argv, file = setup(d)
        if cmd == "label":
            os.write(master, b"q")       # a labeler that (wrongly) accepted its files quits at once
        err, out = io.StringIO(), io.StringIO()
        row = {"name": name, "cmd": cmd, "file": file, "argv": argv}
        t = time.perf_counter()
        signal.alarm(CASE_SECONDS)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    row["code"] = cli.main(argv)
                except SystemExit as e:
                    row["code"] = e.code if isinstance(e.code, int) else 2
        except _Hang:
            row["hang"] = True
        except BaseException:
            import traceback
            row["traceback"] = traceback.format_exc()[-2000:]
        finally:
            signal.alarm(0)
            set_limits(**{k: getattr(default, k) for k in default.__dataclass_fields__})
        row["seconds"] = round(time.perf_counter() - t, 2)
        row["stderr"] = err.getvalue()[-2000:]
        report.append(row)
    return report


# ---------------------------------------------------------------------------------------------
# the parent

def run_report(tmp, pythonpath=ROOT, timeout=600):
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(tmp)], cwd=str(tmp), env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"the child failed (exit {p.returncode}): {p.stderr[-3000:]}"
    return json.loads(p.stdout.splitlines()[-1])


def _problems(report):
    bad = []
    for r in report:
        if r.get("hang"):
            bad.append(f"{r['name']}: hangs (over {CASE_SECONDS} s)")
        elif "traceback" in r:
            bad.append(f"{r['name']}: traceback\n{r['traceback']}")
        elif r["code"] != 2:
            bad.append(f"{r['name']}: exit {r['code']}, expected 2 (stderr: {r['stderr'][-300:]!r})")
        else:
            m = re.match(rf"rlhf-ref {re.escape(r['cmd'])}: error: (\S+?)(?::(\d+))?: \S", r["stderr"])
            if m is None or "Traceback" in r["stderr"]:
                bad.append(f"{r['name']}: stderr is not 'rlhf-ref {r['cmd']}: error: <file>[:<line>]: …': "
                           f"{r['stderr'][-300:]!r}")
                continue
            where = os.path.basename(m.group(1)) + (f":{m.group(2)}" if m.group(2) else "")
            want = r["file"]
            if where != want and not (":" not in want and os.path.basename(m.group(1)) == want):
                bad.append(f"{r['name']}: the error names {where!r}, expected {want!r}: {r['stderr'][-300:]!r}")
    return bad


def test_hostile_files_give_a_clear_error_and_exit_2(tmp_path):
    report = run_report(tmp_path)
    assert len(report) >= 60
    bad = _problems(report)
    assert not bad, f"{len(bad)} of {len(report)} hostile files misbehave:\n" + "\n".join(bad)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        rep = _run_cases(sys.argv[2])
        sys.stdout.write("\n" + json.dumps(rep) + "\n")
    elif len(sys.argv) >= 2 and sys.argv[1] == "--report":
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            rep = run_report(tmp, pythonpath=os.environ.get("PYTHONPATH", ROOT))
        probs = _problems(rep)
        print(f"hostile files tried: {len(rep)}; tracebacks: {sum('traceback' in r for r in rep)}; "
              f"hangs: {sum(bool(r.get('hang')) for r in rep)}; exit 0 (accepted): "
              f"{sum(r.get('code') == 0 for r in rep)}; misbehaving in any way: {len(probs)}")
        for p in probs:
            print(" -", p.splitlines()[0][:300])
    else:
        sys.exit("usage: test_hostile_files.py --report")
