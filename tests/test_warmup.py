"""``rlhf-ref warmup`` (issue 12's cold start): it fills Numba's on-disk cache, and afterwards a fresh
process's first numba calls load every kernel from it and compile nothing.

Each process gets NUMBA_CACHE_DIR = a fresh tmp folder, so the test neither reads nor changes the
cache of the tree under test. It checks cache hits and misses (Numba's dispatcher stats), never
a time.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rlhf_ref
from rlhf_ref._core import _backend_numba as nbk

ROOT = Path(rlhf_ref.__file__).resolve().parent.parent      # the folder that holds the imported rlhf_ref
WHY = nbk.probe()
needs_numba = pytest.mark.skipif(WHY is not None, reason=f"numba backend unavailable: {WHY}")


def _env(cache):
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["NUMBA_CACHE_DIR"] = str(cache)
    e["RLHF_REF_NUMBA_CACHE"] = "1"
    return e


def _run(args, cache, code=None):
    argv = [sys.executable, "-c", textwrap.dedent(code)] if code else [sys.executable, "-m", "rlhf_ref", *args]
    p = subprocess.run(argv, env=_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"rc={p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p.stdout


# A user's first rollouts after the warm-up, on other shapes than the warm-up's (one row: the serial
# kernel; 5 rows: the row-block kernel when Numba has two or more threads); the kernels' cache stats.
FIRST_CALL = """
    import json
    import numpy as np
    from rlhf_ref import backends, lstm
    from rlhf_ref.tokenizer import EOS
    from rlhf_ref.warmup import cache_counts
    b = backends.get("numba")
    rng = np.random.default_rng(7)
    p = lstm.init_params(20, 12, 24, rng, dtype=np.float32)
    for B, T in ((1, 9), (5, 9)):
        prompt = np.ones((B, T), np.int64)
        b.rollout(p, prompt, np.ones(B, np.int64), rng.random((B, T)), eos_id=EOS)
    compiled, loaded = cache_counts(b._require())
    print(json.dumps({"compiled": compiled, "loaded": loaded}))
"""


@needs_numba
def test_warmup_fills_the_cache_and_a_fresh_first_rollout_compiles_nothing(tmp_path):
    cache = tmp_path / "numba-cache"
    out = _run(["warmup", "--dtype", "float32", "--jobs", "rollout"], cache)
    n = re.search(r"compiled (\d+) kernel specialisations", out)       # an empty cache compiles (the control):
    assert n and int(n.group(1)) > 0 and str(cache) in out, out       # the same counter as FIRST_CALL's
    index = [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".nbi")]
    assert any(f.startswith("_rollout_nb.rollout-") for f in index), index
    assert any(f.startswith("_rollout_nb.rollout_par-") for f in index), index      # whatever the thread count

    first = json.loads(_run(None, cache, FIRST_CALL).strip().splitlines()[-1])
    assert first["compiled"] == 0 and first["loaded"] > 0, first

    again = _run(["warmup", "--dtype", "float32", "--jobs", "rollout"], cache)      # idempotent
    assert "already warm, nothing compiled" in again, again


# A user's first training steps after the warm-up: one row (the input projected directly), a batch
# reading few vocabulary rows (the table over those rows only) and one reading nearly all of them
# (the whole table, forward and backward): _backend_numba._Body's three paths.
FIRST_STEP = """
    import json
    import numpy as np
    from rlhf_ref import backends, lstm
    from rlhf_ref.warmup import cache_counts
    b = backends.get("numba")
    rng = np.random.default_rng(7)
    V, T = 20, 9
    p = lstm.init_params(V, 12, 24, rng, heads=("head", "value"), dtype=np.float32)
    for B, ids in ((1, range(4, V)), (4, range(4, 8)), (6, None)):
        tokens = rng.choice(list(ids), size=(B, T)) if ids is not None else \\
            4 + np.arange(B * T).reshape(B, T) % (V - 4)
        tokens[:, 0] = 1
        b.reinforce_loss_and_grad(p, tokens, np.ones((B, T)), np.ones(B, np.int64), rng.standard_normal(B),
                                  ref_logp=np.zeros((B, T)))
    compiled, loaded = cache_counts(b._require())
    print(json.dumps({"compiled": compiled, "loaded": loaded}))
"""


@needs_numba
def test_warmup_covers_a_first_training_step_on_every_input_path(tmp_path):
    cache = tmp_path / "numba-cache"
    _run(["warmup", "--dtype", "float32", "--jobs", "reinforce"], cache)
    first = json.loads(_run(None, cache, FIRST_STEP).strip().splitlines()[-1])
    assert first["compiled"] == 0 and first["loaded"] > 0, first


@pytest.mark.parametrize("argv, msg", [(["warmup", "--jobs", "rollout,bogus"], "unknown job 'bogus'"),
                                       (["warmup", "--jobs", ","], "at least one of")])
def test_bad_jobs_exit_2_naming_the_argument(argv, msg, capsys):
    from rlhf_ref.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--jobs" in err and msg in err, err


def test_bad_dtype_is_a_usage_error(capsys):
    from rlhf_ref.cli import main
    with pytest.raises(SystemExit) as e:
        main(["warmup", "--dtype", "float16"])
    assert e.value.code == 2
    assert "--dtype" in capsys.readouterr().err


@needs_numba
def test_no_cache_means_nothing_to_warm_exit_1(tmp_path):
    """RLHF_REF_NUMBA_CACHE=0: compiling would keep nothing, so it says why and compiles nothing."""
    e = dict(_env(tmp_path / "cache"), RLHF_REF_NUMBA_CACHE="0")
    p = subprocess.run([sys.executable, "-m", "rlhf_ref", "warmup", "--jobs", "sft"], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "nothing to warm" in p.stderr and "RLHF_REF_NUMBA_CACHE=0" in p.stderr, p
    assert not (tmp_path / "cache").exists()
