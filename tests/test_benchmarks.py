"""The benchmark's own machinery: its correctness checks reject wrong answers, its per-thread CPU
accounting sees work, and its modules import without a cycle. (The timings themselves are never
asserted; `python -m benchmarks --smoke` in CI runs every implementation's correctness check.)"""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import harness  # noqa: E402
from rlhf_ref import reinforce, rollout  # noqa: E402
from rlhf_ref.tokenizer import EOS  # noqa: E402


def test_harness_imports_without_run_or_report():
    code = ("import sys; import benchmarks.harness as h; "
            "assert 'benchmarks.run' not in sys.modules and 'benchmarks.report' not in sys.modules, sorted(sys.modules); "
            "assert not hasattr(h, '_is_avail'); print(h.CASES)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "(1, 128, 64)" in p.stdout


@pytest.fixture(scope="module")
def case():
    B, H, V, T = 4, 8, 7, 10
    p64, prompt, pl, u, reward = harness.make_case(B, H, V, T)
    ref = rollout.rollout(p64, prompt, pl, u, eos_id=EOS)
    ref_logp = np.where(ref["action_mask"] > 0, ref["logp"] + 0.01, 0.0)
    out, grads = reinforce.loss_and_grad(p64, ref["tokens"], ref["mask"], pl, reward, ref_logp=ref_logp)
    return p64, ref, out, grads


def test_check_rollout_accepts_the_reference_and_rejects_changes(case):
    p64, ref, _, _ = case
    assert harness.check_rollout(ref, ref, np.float32)["ok"]
    wrong = {k: v.copy() for k, v in ref.items()}
    wrong["tokens"][:, -1] = (wrong["tokens"][:, -1] + 1) % p64["head.weight"].shape[0]   # every row differs
    assert not harness.check_rollout(wrong, ref, np.float32)["ok"]
    off = {k: v.copy() for k, v in ref.items()}
    off["logp"] = off["logp"] * (1 + 1e-3)
    assert not harness.check_rollout(off, ref, np.float32)["ok"]


def test_check_train_rejects_a_wrong_gradient_a_wrong_loss_and_a_missing_key(case):
    _, _, out, grads = case
    assert harness.check_train(out["loss"], grads, out, grads, np.float32)["ok"]
    bad = dict(grads, **{"lstm.weight_hh_l0": grads["lstm.weight_hh_l0"] * 1.01})
    assert not harness.check_train(out["loss"], bad, out, grads, np.float32)["ok"]
    assert not harness.check_train(out["loss"] * 1.01, grads, out, grads, np.float32)["ok"]
    missing = {k: v for k, v in grads.items() if k != "value.bias"}
    assert not harness.check_train(out["loss"], missing, out, grads, np.float32)["ok"]


def test_thread_cpu_accounting_sees_this_threads_work():
    if not os.path.exists("/proc/self/task"):
        pytest.skip("no /proc (not Linux): the benchmark reports no per-thread CPU time here")
    a = np.ones((256, 256), np.float32)
    times, use = harness.time_round_robin({"busy": lambda: float((a * a).sum())}, 1, 0.3)
    u = use["busy"]
    assert len(times["busy"]) == 1 and times["busy"][0] > 0
    assert u["threads_over_5pct"] >= 1
    assert 0.0 < u["cpu_per_wall"] <= os.cpu_count() + 0.1


def test_b1_roofline_is_the_table_at_peak_plus_the_weights_at_cache_bandwidth():
    """At H = E = 128, V = 64, T = 64, 100 GB/s and 100 GFLOP/s: the table is 2·64·128·512 FLOP =
    83.886 µs; each of the 63 steps reads (512 + 64)·128·4 = 294,912 B = 2.94912 µs; 63 tokens in
    269.68 µs is 233.6k tokens/s (worked by hand from the definitions in the report's docstring)."""
    from benchmarks import report
    run = {"cache_bw": {"gb_per_s": 100.0}, "gemm_peak": {"gflops_median": 100.0}}
    rl = report.roofline(run, {"H": 128, "V": 64, "E": 128, "T": 64})
    assert rl["bytes"] == 294912
    assert rl["table_s"] == pytest.approx(83.886e-6, rel=1e-4)
    assert rl["tokens_per_s"] == pytest.approx(1 / 2.94912e-6, rel=1e-6)
    assert rl["call_tokens_per_s"] == pytest.approx(63 / 269.68e-6, rel=1e-4)
