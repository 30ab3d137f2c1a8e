"""The hostile-input suite (issue 10): every public entry point of every backend, fed hostile values.

For each call, every backend either returns what the reference returns (tests/_tol.py's rule) or
raises the reference's exception type with a message naming the same argument; the reference itself
raises only ValueError/TypeError naming one of the user's arguments (never an internal name, never
IndexError & co). Every call runs in a SUBPROCESS (tests/_hostile.py, batched: one process runs a
whole batch and reports each outcome as a JSON line), so that a signal death (a segfault in a kernel)
is a test failure naming the call that died, not the end of the test run.

    test_hostile_table           the deterministic table: every mutation of every argument of every
                                 entry point, float32 and float64 (_hostile.table(), ~4000 calls;
                                 reinforce_loss_and_grad under 7 configs of issue 9, by seed)
    test_hostile_random_batches  Hypothesis-drawn batches (random seeds, values, arguments)
    test_hostile_cuda            the cuda backend's two functions (under NUMBA_ENABLE_CUDASIM=1 in CI)
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _hostile as H            # noqa: E402
import _hostile_runner as R     # noqa: E402

from rlhf_ref import backends  # noqa: E402


def _compiled():
    """The compiled CPU backends that can run here (RLHF_REF_REQUIRE_BACKENDS makes missing ones fail
    in tests/test_packaging.py; here an unavailable one is simply not compared). The bounds-check
    build's run (scripts/test.sh) sets RLHF_REF_HOSTILE_BACKENDS=cython."""
    names = os.environ.get("RLHF_REF_HOSTILE_BACKENDS", "cython,numba").split(",")
    return tuple(n for n in names if n and backends.status(n).available)


def _check(specs, names):
    results = R.run(specs, names)
    counts, problems = R.summary(specs, results, names)
    lines = [f"[{i}] {b} {cat}: {spec} -> {d[:500]}" for i, spec, b, cat, d in problems[:25]]
    assert not problems, (f"{len(problems)} problems in {len(specs)} hostile calls; per backend {counts}\n"
                          + "\n".join(lines))
    return counts


def test_runner_reports_a_process_killed_by_a_signal():
    """A spec that dies (SIGSEGV) is reported as a crash of that spec, and the specs after it still run."""
    ok = dict(fn="sft_loss_and_grad", dt="float64", seed=0, mut="none", arg="", val="")
    specs = [ok, dict(ok, fn="__crash__"), dict(ok, seed=1)]
    results = R.run(specs, ())
    assert "crash" in results[1] and results[1]["crash"] != 0
    assert results[0]["ref"]["s"] == "ok" and results[2]["ref"]["s"] == "ok"
    counts, problems = R.summary(specs, results, ())
    assert counts["numpy"]["crash"] == 1 and [p[0] for p in problems] == [1]


def test_judge_catches_each_kind_of_problem():
    """The comparison can fail: a different answer, a different error, an internal name, a wrong type."""
    spec = dict(fn="rollout", dt="float32", seed=0, mut="none", arg="", val="")
    ok, err = {"s": "ok"}, {"s": "raise", "t": "ValueError", "m": "alpha must be > 0, got 0"}
    assert R.judge(spec, {"ref": ok, "backends": {"c": ok}}) == []
    assert R.judge(spec, {"ref": err, "backends": {"c": dict(err)}}) == []
    assert R.judge(spec, {"ref": ok, "backends": {"c": {"s": "mismatch", "d": "x"}}})[0][1] == "mismatch"
    assert R.judge(spec, {"ref": ok, "backends": {"c": err}})[0][1] == "mismatch"
    assert R.judge(spec, {"ref": err, "backends": {"c": ok}})[0][1] == "mismatch"
    other = {"s": "raise", "t": "ValueError", "m": "eps must be <= 1"}
    assert R.judge(spec, {"ref": err, "backends": {"c": other}})[0][1] == "mismatch"
    idx = {"s": "raise", "t": "IndexError", "m": "index 0 is out of bounds"}
    assert R.judge(spec, {"ref": idx, "backends": {}})[0][1] == "traceback"
    internal = {"s": "raise", "t": "ValueError", "m": "dhs must be finite"}
    assert R.judge(spec, {"ref": internal, "backends": {}})[0][1] == "traceback"


def test_hostile_table():
    """Every mutation of every argument of every entry point (the table of _hostile.py): zero
    crashes, zero silent mismatches, zero tracebacks on every CPU backend."""
    _check(H.table(), _compiled())


@st.composite
def hostile_spec(draw, fns=H.FNS):
    fn = draw(st.sampled_from(fns))
    arrays, scalars, plike = H.args_of(fn)
    spec = dict(fn=fn, dt=draw(st.sampled_from(["float32", "float64"])), seed=draw(st.integers(0, 2 ** 20)),
                arg="", val="")
    kinds = ["batch"] + ["array"] * bool(arrays) + ["scalar"] * bool(scalars) + ["param"] * bool(plike)
    kind = draw(st.sampled_from(kinds))
    codes = st.sampled_from(sorted(H.VALUES))
    if kind == "batch":
        spec["mut"] = draw(st.sampled_from(H.BATCH_MUTS))
    elif kind == "array":
        spec.update(arg=draw(st.sampled_from(arrays)), mut=draw(st.sampled_from(H.ARRAY_MUTS)), val=draw(codes))
    elif kind == "scalar":
        spec.update(arg=draw(st.sampled_from(scalars)), mut="scalar_value", val=draw(codes))
    else:
        spec.update(arg=draw(st.sampled_from(plike)), mut=draw(st.sampled_from(H.PARAM_MUTS + H.PARAM_ARRAY_MUTS)),
                    val=draw(st.sampled_from(H.PARAM_VALUES + ("1e39", "-3e38", "1e20", "1e-320"))))
    return spec


# One process per example runs a batch of 150 calls; no shrinking (each try is a subprocess): a
# failure prints every failing spec of the batch, which rebuilds the call exactly (_hostile.build).
@settings(max_examples=20, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=list(HealthCheck))
@given(st.lists(hostile_spec(), min_size=150, max_size=150))
def test_hostile_random_batches(batch):
    _check(batch, _compiled())


@pytest.mark.cuda
def test_hostile_cuda():
    """The cuda backend (rollout, sequence_logprobs) on every 11th spec of their table, small sizes
    (the simulator runs each GPU thread in Python)."""
    specs = [s for i, s in enumerate(H.table(("rollout", "sequence_logprobs"))) if i % 11 == 0]
    specs += [dict(fn="rollout", dt=dt, seed=1, mut="scalar_value", arg="alpha", val=v)
              for dt in ("float32", "float64") for v in ("1e39", "1e300", "3e38", "1e20")]
    specs += [dict(fn=fn, dt="float32", seed=s, mut="pscale", arg="params", val="")
              for fn in ("rollout", "sequence_logprobs") for s in range(8)]
    _check(specs, ("cuda",))
