"""Regression tests of issue 10's kernel items, on every backend that runs here.

1. the Cython rollout read out of bounds (SIGSEGV at V = 4096, H = 512) when α·z overflowed float32:
   non-finite action scores are now one ValueError on every backend (policy.scores_error), and no
   kernel ever stores a token id outside [0, V) where a later step reads it (run in a subprocess:
   a crash fails the test instead of ending the run);
2. the Numba softmax was compiled with FMA contraction, so α·z − m skipped the rounding of α·z the
   reference does: wrong tokens and log-probs at low temperature (large α);
8. eos_id of the wrong type, a Fortran-order SFT mask, the reference's internal names;
9. float32 sampling drifted from exact float64 sampling at a large vocabulary (the float32 CDF).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

from rlhf_ref import backends, lstm, policy, reinforce, rollout, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ("numpy", "cython", "numba")
CPU_AND_CUDA = CPU + (pytest.param("cuda", marks=pytest.mark.cuda),)   # run by `pytest -m cuda` (GPU or simulator)


def backend(name):
    st = backends.status(name)
    if not st.available:
        if name == "cuda":
            pytest.skip(f"cuda: {st.reason}")
        pytest.skip(f"{name} unavailable here: {st.reason} (tests/test_packaging.py fails when it is required)")
    return backends.get(name)


# ------------------------------------------------------------------------------------ the debug build

def test_the_cython_build_is_the_one_expected():
    """scripts/test.sh runs this file, the equivalence and the hostile suites a second time on a
    bounds-checking AddressSanitizer build (RLHF_REF_CYTHON_DEBUG=1 RLHF_REF_ASAN=1) made in a
    temporary copy of the tree, with RLHF_REF_EXPECT_DEBUG_BUILD=1: that run must import that build
    (from its own tree), every other run the release build."""
    if not backends.status("cython").available:
        pytest.skip("the cython backend is not built here (tests/test_packaging.py fails when it is required)")
    from rlhf_ref._core import _lstm_cy
    assert os.path.realpath(_lstm_cy.__file__).startswith(os.path.realpath(ROOT) + os.sep)
    assert _lstm_cy.DEBUG_BUILD == (os.environ.get("RLHF_REF_EXPECT_DEBUG_BUILD") == "1")


# ------------------------------------------------------------------------------------ item 1

_REPRO = r"""
import json, sys
import numpy as np
from rlhf_ref import backends, lstm
be = backends.get(sys.argv[1])
out = []
Vb, Hb = (4096, 512) if sys.argv[2] == "big" else (256, 8)     # the simulator runs each GPU thread in Python
for V, H, alpha in ((Vb, Hb, 1e39), (Vb, Hb, 3e38), (30, 8, 1e39), (30, 8, 1e30)):
    p = lstm.init_params(V, 8, H, np.random.default_rng(0), heads=("head",), dtype=np.float32)
    try:
        r = be.rollout(p, np.ones((8, 16), np.int64), np.ones(8, np.int64), np.full((8, 16), 0.5), alpha=alpha)
        out.append(["ok", int(r["tokens"].min()), int(r["tokens"].max())])
    except Exception as e:
        out.append([type(e).__name__, str(e)])
print(json.dumps(out))
"""


@pytest.mark.parametrize("name", CPU_AND_CUDA)
def test_overflowing_alpha_is_an_error_not_a_crash(name):
    """The issue's repro (V = 4096, H = 512, float32, α = 1e39) and smaller ones, in a subprocess."""
    backend(name)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    size = "small" if name == "cuda" else "big"
    p = subprocess.run([sys.executable, "-c", _REPRO, name, size], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    assert p.returncode == 0, f"{name}: the process died ({p.returncode}): {p.stderr[-2000:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    Vb = 4096 if size == "big" else 256
    for (V, alpha), r in zip(((Vb, 1e39), (Vb, 3e38), (30, 1e39), (30, 1e30)), res):
        if r[0] == "ok":                         # α·z finite for every row: valid ids only
            assert 0 <= r[1] and r[2] < V, (name, V, alpha, r)
        else:
            assert r[0] == "ValueError" and r[1] == str(policy.scores_error("params", alpha, "boltzmann", np.float32)), \
                (name, V, alpha, r)
    assert res[0][0] == "ValueError" and res[2][0] == "ValueError"      # α = 1e39 overflows float32 itself


def _overflowing(dtype=np.float32, V=7, seed=0):
    """A policy whose scores overflow through its own weights (α = 1 plays no part): the input
    projections are +inf, so every gate saturates and h = tanh(1) > 0 in every unit; the head's
    first row of 3e38 then sums to z_0 = +inf."""
    p = lstm.init_params(V, 3, 4, np.random.default_rng(seed), heads=("head",), dtype=dtype)
    p["embedding.weight"][:] = 3e38
    p["lstm.weight_ih_l0"][:] = 2
    p["head.weight"][0] = 3e38
    return p


def _batch():
    """Two episodes, BOS first, the second padded after three tokens: (tokens (2, 4), mask)."""
    tokens = np.array([[1, 3, 4, 2], [1, 5, 6, 0]])
    mask = (tokens > 0).astype(float)
    mask[:, 0] = 1
    return tokens, mask


@pytest.mark.parametrize("name", CPU_AND_CUDA)
@pytest.mark.parametrize("kind", ["boltzmann", "greedy"])
def test_overflowing_params_in_rollout_name_params(name, kind):
    be = backend(name)
    p = _overflowing()
    B, T = 4, 6
    with pytest.raises(ValueError) as e:
        be.rollout(p, np.ones((B, T), np.int64), np.ones(B, np.int64), np.full((B, T), 0.3), alpha=1.0, kind=kind)
    assert str(e.value) == str(policy.scores_error("params", 1.0, kind, np.float32))
    # the reference policy too, named ref_params
    ok = lstm.init_params(7, 3, 4, np.random.default_rng(1), heads=("head",), dtype=np.float32)
    with pytest.raises(ValueError) as e:
        be.rollout(ok, np.ones((B, T), np.int64), np.ones(B, np.int64), np.full((B, T), 0.3), kind=kind, ref_params=p)
    assert str(e.value) == str(policy.scores_error("ref_params", 1.0, kind, np.float32))


@pytest.mark.parametrize("name", CPU_AND_CUDA)
def test_overflowing_params_in_sequence_logprobs(name):
    be = backend(name)
    tokens, mask = _batch()
    with pytest.raises(ValueError) as e:
        be.sequence_logprobs(_overflowing(), tokens, mask, np.array([1, 1]))
    assert str(e.value) == str(policy.scores_error("params", 1.0, "boltzmann", np.float32))


@pytest.mark.parametrize("name", CPU)
def test_overflowing_params_in_training_name_the_same_argument(name):
    be = backend(name)
    tokens, mask = _batch()
    p = _overflowing()
    with pytest.raises(ValueError) as e:
        be.sft_loss_and_grad(p, tokens, mask)
    assert str(e.value) == str(policy.scores_error("params", 1.0, "boltzmann", np.float32))
    good = lstm.init_params(7, 3, 4, np.random.default_rng(3), heads=("head", "value"), dtype=np.float32)
    with pytest.raises(ValueError) as e:
        be.reinforce_loss_and_grad(good, tokens, mask, np.array([1, 1]), np.array([1.0, -1.0]), ref_params=p)
    assert str(e.value) == str(policy.scores_error("ref_params", 1.0, "boltzmann", np.float32))
    # an overflow of the gradient only (α·z finite, α·(onehot − π) not): the same error everywhere
    cfg = reinforce.ReinforceConfig(alpha=3e38)
    with pytest.raises(ValueError, match=r"^params, alpha or the rewards give a non-finite loss or gradient"):
        be.reinforce_loss_and_grad(good, tokens, mask, np.array([1, 1]), np.array([1.0, -1.0]), cfg=cfg,
                                   ref_logp=np.zeros((2, 4)))


def test_minus_inf_scores_are_a_token_of_probability_zero():
    """−inf in α·z (a score that overflowed downwards) is π = 0, not an error: the rule is that the
    row's maximum is finite (policy.check_scores)."""
    z = np.array([[0.0, -np.inf, 1.0]])
    q = np.exp(policy.logprobs(z, 1.0))
    assert q[0, 1] == 0 and abs(q.sum() - 1) < 1e-15
    assert policy.check_scores(z, np.array([True])) is z
    with pytest.raises(ValueError, match="give non-finite action scores"):
        policy.check_scores(np.array([[-np.inf, -np.inf]]), np.array([True]))
    with pytest.raises(ValueError, match="give non-finite action scores"):
        policy.check_scores(np.array([[0.0, np.nan]]), np.array([True]))
    # rows that are not read may be anything: they are zeroed, never an error
    out = policy.check_scores(np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([False, True]))
    assert np.array_equal(out, [[0.0, 0.0], [1.0, 2.0]])


# ------------------------------------------------------------------------------------ item 2

def _low_temperature_case(dtype, alpha, seed=0, V=30, B=64, T=12):
    rng = np.random.default_rng(seed)
    p = lstm.init_params(V, 8, 16, rng, heads=("head",), dtype=dtype)
    pl = np.ones(B, np.int64)
    return p, np.ones((B, T), np.int64), pl, rng.random((B, T)), alpha


@pytest.mark.parametrize("name", ["cython", "numba"])
@pytest.mark.parametrize("dtype,alpha", [(np.float32, 1e7), (np.float32, 1e8), (np.float32, 1e10),
                                         (np.float64, 1e20)])
def test_low_temperature_sampling_matches_the_reference(name, dtype, alpha):
    """The issue's sweep: at α = 1e7..1e10 (float32) and 1e20 (float64) the Numba kernel's FMA moved
    the log-probs by up to 0.9 nats and changed 192 of 704 tokens; now tokens are identical and the
    log-probs agree to a few float32 ulps of |α·z| (the size of the numbers whose difference they are)."""
    be = backend(name)
    p, prompt, pl, u, alpha = _low_temperature_case(dtype, alpha)
    want = rollout.rollout(p, prompt, pl, u, alpha=alpha)
    got = be.rollout(p, prompt, pl, u, alpha=alpha)
    assert np.array_equal(got["tokens"], want["tokens"])
    assert got["tokens"].min() >= 0
    am = want["action_mask"] > 0
    assert np.array_equal(got["action_mask"] > 0, am)
    # log π is a difference of numbers of size |α·z| (policy.py: accurate to eps·|m|, the reference too)
    scale = alpha * max(float(np.abs(p["head.weight"]).sum(1).max() + np.abs(p["head.bias"]).max()), 1.0)
    tol = 8 * np.finfo(dtype).eps * scale
    assert np.max(np.abs(got["logp"][am] - want["logp"][am])) <= tol


# ------------------------------------------------------------------------------------ item 8

@pytest.mark.parametrize("name", CPU_AND_CUDA)
@pytest.mark.parametrize("eos", ["2", 2.7, 2.0, True, None, np.float64(2), -1, 7])
def test_eos_id_is_validated(name, eos):
    be = backend(name)
    p = lstm.init_params(7, 3, 4, np.random.default_rng(0), heads=("head",))
    with pytest.raises((TypeError, ValueError), match=r"^eos_id must"):
        be.rollout(p, np.ones((2, 4), np.int64), np.ones(2, np.int64), np.full((2, 4), 0.5), eos_id=eos)


@pytest.mark.parametrize("name", CPU_AND_CUDA)
def test_eos_id_numpy_integer_is_accepted(name):
    be = backend(name)
    p = lstm.init_params(7, 3, 4, np.random.default_rng(0), heads=("head",))
    a = be.rollout(p, np.ones((2, 4), np.int64), np.ones(2, np.int64), np.full((2, 4), 0.5), eos_id=np.int64(3))
    b = rollout.rollout(p, np.ones((2, 4), np.int64), np.ones(2, np.int64), np.full((2, 4), 0.5), eos_id=3)
    assert np.array_equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize("name", CPU)
def test_fortran_and_strided_batches_are_accepted(name):
    """Cython's SFT rejected a Fortran-order mask, its rollout a strided prompt_len; the reference and
    Numba accepted both. The shared checks now hand the kernels C-order arrays."""
    be = backend(name)
    p = lstm.init_params(7, 3, 4, np.random.default_rng(0), heads=("head",))
    tokens = np.array([[1, 3, 4, 2], [1, 5, 6, 0]])
    mask = np.asfortranarray((tokens > 0).astype(float))
    mask[:, 0] = 1
    want = sft.loss_and_grad(p, tokens, mask)[0]["loss"]
    assert abs(be.sft_loss_and_grad(p, np.asfortranarray(tokens), mask)[0]["loss"] - want) < 1e-12
    pl = np.array([1, 9, 1, 9])[::2]
    r = be.rollout(p, np.ones((2, 4), np.int64), pl, np.full((2, 4), 0.5))
    assert np.array_equal(r["tokens"], rollout.rollout(p, np.ones((2, 4), np.int64), pl, np.full((2, 4), 0.5))["tokens"])


@pytest.mark.parametrize("call,match", [
    (lambda p: rollout.rollout(p, np.zeros((0, 0), np.int64), np.zeros(0, np.int64), np.zeros((0, 0))), None),
    (lambda p: reinforce.sequence_logprobs(p, np.ones((2, 0), np.int64), np.ones((2, 0)), np.ones(2, np.int64)),
     r"^prompt_len must lie in \[1, row length\]"),
    (lambda p: lstm.check_model(dict(p, **{"lstm.weight_hh_l0": p["lstm.weight_hh_l0"][0]})),
     r"^params must hold 'embedding.weight' \(V, E\) and 'lstm.weight_hh_l0' \(4H, H\)"),
])
def test_reference_errors_name_the_users_argument(call, match):
    """B = T = 0, T = 0 with prompt_len 1 and a 1-D weight_hh were IndexErrors in the reference."""
    p = lstm.init_params(7, 3, 4, np.random.default_rng(0), heads=("head",))
    if match is None:
        out = call(p)
        assert out["tokens"].shape == (0, 0)
    else:
        with pytest.raises(ValueError, match=match):
            call(p)


# ------------------------------------------------------------------------------------ item 9

@pytest.mark.parametrize("name", CPU_AND_CUDA)
def test_float32_sampling_matches_exact_float64_sampling_at_a_large_vocabulary(name):
    """V = 200k, a nearly uniform policy (every CDF boundary 5e-6 from the next): float32 params
    sample the token of exact float64 inverse-CDF sampling (docs/conventions.md, Sampling). With a
    float32 CDF, 99–140 of 256 draws differed on every float32 path."""
    be = backend(name)
    # the CUDA simulator runs each GPU thread in Python: a smaller case there
    V, E, Hd, B = (200_000, 4, 8, 256) if name != "cuda" else (20_000, 4, 8, 4)
    rng = np.random.default_rng(0)
    p32 = {k: v.astype(np.float32) for k, v in lstm.init_params(V, E, Hd, rng, heads=("head",)).items()}
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    prompt, pl, u = np.ones((B, 2), np.int64), np.ones(B, np.int64), rng.random((B, 2))
    h, _ = lstm.step(p64, prompt[:, 0], np.zeros((B, Hd)), np.zeros((B, Hd)))
    z = h @ p64["head.weight"].T + p64["head.bias"]
    e = np.exp(z - z.max(1, keepdims=True))
    cdf = np.cumsum(e, 1) / e.sum(1, keepdims=True)
    exact = np.array([np.searchsorted(cdf[b], u[b, 1], side="right") for b in range(B)])
    gap = np.array([np.min(np.abs(cdf[b] - u[b, 1])) for b in range(B)])
    assert gap.min() > 1e-9                  # no draw of this seed is a tie at float32 rounding distance
    for p in (p32, p64):
        tok = be.rollout(p, prompt, pl, u)["tokens"][:, 1]
        assert np.array_equal(tok, exact), f"{int(np.sum(tok != exact))} of {B} draws differ ({p['head.weight'].dtype})"


# ------------------------------------------------------------------------------------ issue 9's value clip

def _value_clip_case():
    """Sequence rewards 1e17 (|G| huge), value_clip 0.2 and old_values 0.5 below the prediction on row 0,
    0.5 above it on row 1: |dv| > value_clip everywhere, so err² vs err_clip² is decided by 0.3·|2G|,
    far below the rounding of the two squares (|G|² ~ 1e34)."""
    p = lstm.init_params(5, 3, 4, np.random.default_rng(0), heads=("head", "value"))
    tokens = np.array([[1, 3, 4, 2], [1, 4, 3, 2]])
    mask = np.ones((2, 4))
    pl = np.array([1, 1])
    cfg = reinforce.ReinforceConfig(baseline="none", beta=0.0, value_clip=0.2)
    pred = reinforce.loss_and_grad(p, tokens, mask, pl, np.zeros(2), reinforce.ReinforceConfig(baseline="none"),
                                   ref_logp=np.zeros((2, 4)))[0]["values"]
    old_values = pred + np.array([[-0.5], [0.5]])
    return p, tokens, mask, pl, np.array([1e17, 1e17]), cfg, old_values


def test_value_clip_branch_is_the_exact_one_at_huge_returns():
    """The value-clip loss max((V − G)², (V_clip − G)²) picks its branch by comparing the two squares;
    at |G| = 1e17 the reference compared two equal rounded squares and took the unclipped gradient
    where exact arithmetic takes the clipped one (gradient 0 outside the clip range), and the
    compiled backends, whose G rounds differently, disagreed with it (hostile suite, alpha = 2^63 − 1,
    float32). The branch is now decided from dv − clip(dv), which is exact. Expected: exact rationals."""
    from fractions import Fraction as F
    p, tokens, mask, pl, reward, cfg, old_values = _value_clip_case()
    am = np.zeros((2, 4))
    am[:, 1:] = 1
    pred = np.where(am > 0, reinforce.loss_and_grad(p, tokens, mask, pl, reward, cfg, ref_logp=np.zeros((2, 4)),
                                                    old_values=old_values)[0]["values"], 0.0)
    z = np.zeros((2, 4))
    ch = reinforce.chain(cfg, am, z, z, z, reward, pred, pred, old_values=np.where(am > 0, old_values, 0.0))
    G = ch["returns"]
    for b in range(2):
        for t in range(1, 4):
            v, o, g = F(float(pred[b, t])), F(float(old_values[b, t])), F(float(G[b, t]))
            dv = v - o
            cv = max(min(dv, F(0.2)), F(-0.2))
            err, err_clip = v - g, o + cv - g
            want = err if err ** 2 >= err_clip ** 2 else (err_clip if abs(dv) < F(0.2) else 0)
            w = F(float(ch["weights"][b, t]))
            assert ch["d_pred"][b, t] == pytest.approx(float(F(cfg.value_coef) * w * want), rel=1e-12, abs=0), (b, t)
    assert np.any(ch["d_pred"][am > 0] == 0) and np.any(ch["d_pred"][am > 0] != 0)   # both branches taken


@pytest.mark.parametrize("name", CPU)
def test_value_clip_branch_matches_the_reference_at_huge_returns(name):
    """Every backend takes the reference's value-clip branch at |G| = 1e17 (value-head gradient)."""
    be = backend(name)
    p, tokens, mask, pl, reward, cfg, old_values = _value_clip_case()
    kw = dict(ref_logp=np.zeros((2, 4)), old_values=old_values)
    want = reinforce.loss_and_grad(p, tokens, mask, pl, reward, cfg, **kw)[1]
    got = be.reinforce_loss_and_grad(p, tokens, mask, pl, reward, cfg, **kw)[1]
    for k in ("value.weight", "value.bias"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-9 * np.abs(want[k]).max(), err_msg=k)
