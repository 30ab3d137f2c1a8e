"""Every file the project writes survives a SIGKILL at any instant.

For each writer (pipeline checkpoints, the metrics log on resume, the labeler's append and undo,
``save_preferences``, ``python -m rlhf_ref vectors --out DIR``) a subprocess writes in a loop and is
killed at seeded random instants; after each kill the file is read back and must hold the old or
the new complete state (no row before the resume point lost, nothing half-written), and the next
round resumes from it. Bounded: a few dozen kills, well under two minutes in all.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
           OPENBLAS_NUM_THREADS="1")

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")


def _kill_at(code, args, delay, cwd, wait_ready=True):
    """Run ``python -c code *args``; SIGKILL it ``delay`` seconds after it prints 'ready' (or after
    the start when ``wait_ready`` is False). Returns the integers it printed (one per completed write)."""
    p = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if wait_ready:
            line = p.stdout.readline()
            assert line.strip() == "ready", line + p.stderr.read()
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode in (-signal.SIGKILL, 0), err[-2000:]
    return [int(x) for x in out.split() if x.lstrip("-").isdigit()]


def _temps(folder):
    return [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
CHECKPOINT = r"""
import sys, numpy as np
from rlhf_ref import lstm
from rlhf_ref.data import corpus
from rlhf_ref.pipeline import common
from rlhf_ref.pipeline.pretrain import PretrainConfig
run, start = sys.argv[1], int(sys.argv[2])
vocab = corpus.default_vocab()
base = lstm.init_params(len(vocab), 8, 8, np.random.default_rng(0), heads=("head", "value"), dtype=np.float32)
cfg = PretrainConfig(embed=8, hidden=8)
print("ready", flush=True)
for step in range(start + 1, 10 ** 9):
    params = {k: v + np.float32(step) for k, v in base.items()}
    common.save_and_prune(run, "pretrain", step, done=False, cfg=cfg, vocab=vocab, groups={"policy": params},
                          rng=np.random.default_rng(step))
    print(step, flush=True)
"""


def test_checkpoints_survive_kills(tmp_path):
    from rlhf_ref import lstm
    from rlhf_ref.data import corpus
    from rlhf_ref.pipeline import common
    from rlhf_ref.pipeline.pretrain import PretrainConfig
    vocab = corpus.default_vocab()
    base = lstm.init_params(len(vocab), 8, 8, np.random.default_rng(0), heads=("head", "value"), dtype=np.float32)
    cfg = PretrainConfig(embed=8, hidden=8)
    run, folder = str(tmp_path), str(tmp_path / "checkpoints")
    rng = np.random.default_rng(10)
    step, kills = 0, 0
    for _ in range(8):
        done = _kill_at(CHECKPOINT, [run, step], rng.uniform(0.0, 0.4), run)
        said = []
        ck = common.find_resume(run, "pretrain", cfg, log=said.append)      # cleans what the kill left
        kills += 1
        if not done and step == 0 and ck is None:
            continue
        assert ck is not None, f"no readable checkpoint after a kill (folder: {os.listdir(folder)}; {said})"
        assert ck["step"] >= max(done + [step]), (ck["step"], done, step)   # nothing completed is lost
        for k, v in ck["groups"]["policy"].items():                         # arrays of that very step
            np.testing.assert_array_equal(v, base[k] + np.float32(ck["step"]))
        assert ck["rng"].random() == np.random.default_rng(ck["step"]).random()
        assert not _temps(folder), _temps(folder)
        assert all(os.path.exists(os.path.join(folder, n[:-4] + ".json")) for n in os.listdir(folder)
                   if n.endswith(".npz")), os.listdir(folder)                # no orphan npz
        step = ck["step"]
    assert kills == 8 and step > 0


# ---------------------------------------------------------------------------------------------
METRICS = r"""
import sys
from rlhf_ref.metrics import MetricsLogger
path, resume = sys.argv[1], int(sys.argv[2])
log = MetricsLogger(path, resume_step=resume)
print("ready", flush=True)
step = resume
while True:
    step += 1
    log.log({"stage": "x", "step": step, "loss": 0.5, "pad": "." * 80})
"""


def test_metrics_survive_kills_during_resume_and_appends(tmp_path):
    from rlhf_ref.metrics import read_metrics
    path = tmp_path / "metrics.jsonl"
    n_rows = 60_000                    # large enough that a kill can land inside the resume's rewrite
    with open(path, "w") as f:
        for s in range(1, n_rows + 1):
            f.write(json.dumps({"stage": "x", "step": s, "loss": 0.5, "pad": "." * 80}) + "\n")
    rng = np.random.default_rng(11)
    lost = 0
    for r in range(8):
        resume = max(0, n_rows - int(rng.integers(0, 5000)))       # a resume from an earlier checkpoint
        # about half the kills land during start-up and the rewrite, the others while appending
        _kill_at(METRICS, [path, resume], rng.uniform(0.05, 0.9), str(tmp_path), wait_ready=False)
        steps = [row["step"] for row in read_metrics(path)]          # a torn last line is dropped
        assert steps == list(range(1, len(steps) + 1)), "rows out of order or duplicated after a kill"
        lost += max(0, resume - len(steps))
        n_rows = len(steps)
    assert lost == 0, f"{lost} rows at or before the resume step were lost"
    from rlhf_ref.metrics import MetricsLogger
    MetricsLogger(path, resume_step=n_rows).close()                  # resume works, and cleans up
    assert not _temps(tmp_path) and [r["step"] for r in read_metrics(path)] == list(range(1, n_rows + 1))


# ---------------------------------------------------------------------------------------------
LABELER = r"""
import sys
from rlhf_ref.label import _drop_last_line, _open_append
from rlhf_ref.preferences import append_preference
path, i = sys.argv[1], int(sys.argv[2])
def rec(i):
    return {"prompt": "p", "chosen": "a" * 50, "rejected": "b", "pair_id": str(i)}
fh = _open_append(path)
print("ready", flush=True)
while True:
    append_preference(fh, rec(i))
    if i % 3 == 2:                      # the labeler's undo (u): drop the last judgement, judge it again
        fh.close()
        _drop_last_line(path)
        fh = _open_append(path)
        append_preference(fh, rec(i))
    print(i, flush=True)
    i += 1
"""

SAVER = r"""
import sys
from rlhf_ref.preferences import save_preferences
path = sys.argv[1]
print("ready", flush=True)
for i in range(10 ** 9):
    save_preferences(path, [{"prompt": "p", "chosen": "a" * 50, "rejected": "b", "pair_id": str(j)}
                            for j in range(i + 1)])
    print(i, flush=True)
"""


@pytest.mark.parametrize("writer", ["labeler", "save_preferences"])
def test_preference_files_survive_kills(tmp_path, writer):
    from rlhf_ref.preferences import load_preferences
    path = tmp_path / "prefs.jsonl"
    rng = np.random.default_rng(12 if writer == "labeler" else 13)
    m = 0
    for _ in range(6):
        done = _kill_at(LABELER if writer == "labeler" else SAVER, [path, m] if writer == "labeler" else [path],
                        rng.uniform(0.0, 0.3), str(tmp_path))
        if not os.path.exists(path):
            assert not done
            continue
        ids = [int(p.meta["pair_id"]) for p in load_preferences(path)]   # a resume reads it like this
        assert ids == list(range(len(ids))), "records lost, duplicated or out of order"
        if done:
            assert len(ids) >= done[-1] + 1, (len(ids), done[-1])         # every completed write is there
        if writer == "labeler":
            m = len(ids)
    if writer == "labeler":             # the next session (its first open) removes what an undo's kill left
        subprocess.run([sys.executable, "-c", "import sys\nfrom rlhf_ref.label import _open_append\n"
                        "_open_append(sys.argv[1]).close()", str(path)], env=ENV, check=True, timeout=60)
        assert m > 0 and not _temps(tmp_path), _temps(tmp_path)


# ---------------------------------------------------------------------------------------------
def _vectors_state(folder):
    """'empty' (no manifest yet) or 'complete' (every case the manifest lists is there, its sha256
    matching); anything else fails."""
    mpath = os.path.join(folder, "manifest.json")
    if not os.path.exists(mpath):
        return "empty"
    with open(mpath, encoding="utf-8") as f:
        man = json.load(f)                                         # whole JSON: never half a manifest
    assert man["cases"], "a manifest listing no case"
    for entry in man["cases"]:
        with open(os.path.join(folder, entry["file"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"], entry["file"]
    return "complete"


def test_vectors_survive_kills(tmp_path):
    out = str(tmp_path / "golden")
    code = "import sys\nfrom rlhf_ref.cli import main\nsys.exit(main(['vectors', '--out', sys.argv[1]]))"
    rng = np.random.default_rng(14)
    states = []
    for _ in range(5):
        _kill_at(code, [out], rng.uniform(0.2, 1.5), str(tmp_path), wait_ready=False)
        states.append(_vectors_state(out) if os.path.isdir(out) else "empty")
    p = subprocess.run([sys.executable, "-c", code, out], cwd=str(tmp_path), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]                     # a rerun completes over what kills left
    assert _vectors_state(out) == "complete"
