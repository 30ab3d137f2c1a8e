"""Tests of what is particular to the ``cython`` backend (rlhf_ref/_core/_backend_cython.py and
the ``_*_cy`` extensions). The equivalence with the reference over every backend and convention
is tests/test_equivalence.py; here:

* the extensions are built (a failure, not a skip, when RLHF_REF_REQUIRE_EXT=1), report their
  OpenMP state, and say why when one is missing;
* the kernels' own exp / tanh / sigmoid are accurate to a few ulp against NumPy in float32 and
  float64, both in the instruction-set clones and in the baseline build, ±inf and NaN included;
* float32 and float64 are both compiled and keep their dtype;
* one seed, one backend, one thread count: bit-identical results from run to run; other thread
  counts agree within tolerance;
* shapes large enough for the paths the small shapes of the equivalence suite never reach (blocks
  of rows on several threads, the small-matrix product, the split whole-sequence products, column
  sums and scatter-adds) still match the float64 reference;
* every OpenBLAS is back to its thread count after a call, the work buffers are reused and can
  be freed, and loading the extensions leaves the environment as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_ref import backends, lstm, model, policy, reinforce, reward_model, rollout as ref_rollout, sft
from rlhf_ref._core import _blas
from rlhf_ref.tokenizer import EOS

try:
    from _tol import assert_close, compare_sampled_tokens, kernel_tol
except ImportError:                                   # run from the repository root
    from tests._tol import assert_close, compare_sampled_tokens, kernel_tol

STATUS = backends.status("cython")
REQUIRED = os.environ.get("RLHF_REF_REQUIRE_EXT", "").strip().lower() in ("1", "true", "yes", "on")
needs_cython = pytest.mark.skipif(not STATUS.available, reason=f"cython backend unavailable: {STATUS.reason}")


def test_built_when_required():
    """CI builds strictly (RLHF_REF_REQUIRE_EXT=1): then a missing extension is a failure."""
    if REQUIRED:
        assert STATUS.available, f"RLHF_REF_REQUIRE_EXT=1 but the cython backend is unavailable: {STATUS.reason}"
    elif not STATUS.available:
        pytest.skip(f"cython backend unavailable: {STATUS.reason}")


def _cy():
    from rlhf_ref._core import _backend_cython as cy
    return cy


# ---------------------------------------------------------------------------------------------
# the extensions themselves

@needs_cython
def test_extensions_report_openmp_and_isa_clones():
    cy = _cy()
    K = cy._require()
    for mod in (K.lstm,):
        omp, n = mod.openmp()
        assert isinstance(omp, bool) and isinstance(n, int) and n >= 1
        if not omp:
            assert n == 1
    assert cy.openmp() == K.lstm.openmp()
    assert isinstance(K.lstm.isa_clones(), bool)
    if sys.platform.startswith("linux") and os.uname().machine == "x86_64":
        assert K.lstm.isa_clones(), "GCC/Clang on x86-64 Linux should build the AVX-512/AVX2/baseline clones"


@needs_cython
def test_probe_names_a_missing_extension(monkeypatch):
    cy = _cy()
    monkeypatch.setattr(cy, "_K", None)
    monkeypatch.setitem(sys.modules, "rlhf_ref._core._train_cy", None)     # import of it now fails
    why = cy.probe()
    assert why is not None and "rlhf_ref._core._train_cy" in why and "not built" in why
    with pytest.raises(RuntimeError, match="not built"):
        cy._require()


@needs_cython
def test_loading_leaves_the_environment_alone():
    """_load sets OMP_WAIT_POLICY=passive only while libgomp loads; a user's setting is kept."""
    code = ("import os, rlhf_ref._core._backend_cython as cy; cy._require(); "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    env["OMP_WAIT_POLICY"] = "active"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "active"


def _ulps(actual, desired, dt):
    """|actual − desired| in units of the spacing of dt at |desired| (desired computed in float64)."""
    d = np.asarray(desired, np.float64)
    sp = np.spacing(np.abs(d).astype(dt)).astype(np.float64)
    return np.abs(np.asarray(actual, np.float64) - d) / sp


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rows", [True, False], ids=["clones", "inline"])
@pytest.mark.parametrize("name,ref,max_ulp", [
    ("exp", np.exp, 1.5),
    ("tanh", np.tanh, 2.5),
    ("sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x)), 4.5),
])
def test_elementwise_accuracy(dt, rows, name, ref, max_ulp):
    """The kernels' exp/tanh/sigmoid against NumPy's float64 functions: within max_ulp ulp of the
    kernel's dtype (measured: exp 1.0, tanh 1.3 (float32) / 2.0 (float64), sigmoid 2.0 / 4.0)."""
    K = _cy()._require()
    rng = np.random.default_rng(7)
    big = 87.0 if dt == np.float32 else 700.0
    x = np.concatenate([rng.uniform(-big, big, 100_000), rng.uniform(-2, 2, 100_000),
                        rng.uniform(-1e-4, 1e-4, 10_000), np.geomspace(1e-30, 30, 2000),
                        -np.geomspace(1e-30, 30, 2000), [0.0, -0.0, 0.625, -0.625]]).astype(dt)
    out = np.empty_like(x)
    K.lstm.elementwise(name, x, out, rows)
    with np.errstate(over="ignore"):
        want = ref(x.astype(np.float64))
    normal = np.abs(want) >= np.finfo(dt).tiny                       # subnormal results: absolute error
    err = _ulps(out[normal], want[normal], dt)
    assert err.max() <= max_ulp, f"{name} {np.dtype(dt)}: {err.max():.2f} ulp at x={x[normal][err.argmax()]!r}"
    assert np.all(np.abs(out[~normal] - want[~normal]) <= np.finfo(dt).tiny)


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rows", [True, False], ids=["clones", "inline"])
def test_elementwise_nonfinite_and_range_ends(dt, rows):
    """±inf, NaN, overflow and underflow as NumPy has them (masking and log-softmax rely on ±inf)."""
    K = _cy()._require()
    fi = np.finfo(dt)
    x = np.array([np.inf, -np.inf, np.nan, 1e4, -1e4, float(np.log(fi.max)) * 1.01, -800.0], dt)
    cases = {"exp": [np.inf, 0.0, np.nan, np.inf, 0.0, np.inf, 0.0],
             "tanh": [1.0, -1.0, np.nan, 1.0, -1.0, 1.0, -1.0],
             "sigmoid": [1.0, 0.0, np.nan, 1.0, 0.0, 1.0, 0.0]}
    for name, want in cases.items():
        out = np.empty_like(x)
        K.lstm.elementwise(name, x, out, rows)
        np.testing.assert_array_equal(out, np.array(want, dt), err_msg=name)
    # gradual underflow: exp lands on the subnormals like NumPy's
    xs = np.array([np.log(fi.tiny) - 3.0], dt)
    out = np.empty_like(xs)
    K.lstm.elementwise("exp", xs, out, rows)
    assert 0 < out[0] < fi.tiny
    assert abs(float(out[0]) - float(np.exp(xs.astype(np.float64))[0])) <= float(fi.smallest_subnormal)


# ---------------------------------------------------------------------------------------------
# dtypes, determinism, threads

def _policy_batch(B, T, V, H, E=None, seed=0, dt=np.float64, heads=("head", "value")):
    rng = np.random.default_rng(seed)
    E = H if E is None else E
    p = lstm.init_params(V, E, H, rng, heads=heads, dtype=dt)
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(float)
    tokens = np.where(mask > 0, rng.integers(0, V, (B, T)), 0)
    pl = np.minimum(rng.integers(1, 4, B), lengths)
    reward = rng.standard_normal(B)
    ref_logp = -np.abs(rng.standard_normal((B, T)))
    return p, tokens, mask, pl, reward, ref_logp


@needs_cython
def test_float32_and_float64_both_compiled():
    cy = _cy()
    for dt in (np.float32, np.float64):
        p, tokens, mask, pl, reward, rl = _policy_batch(3, 6, 9, 5, dt=dt)
        out, g = cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, ref_logp=rl)
        assert all(g[k].dtype == dt for k in g)
        assert out["logp"].dtype == dt
        assert cy.sequence_logprobs(p, tokens, mask, pl).dtype == dt
        _, g = cy.sft_loss_and_grad(p, tokens, mask)
        assert all(v.dtype == dt for v in g.values())
        r = cy.rollout(p, tokens, np.ones(3, np.int64), np.random.default_rng(0).random((3, 6)), values=True)
        assert r["tokens"].dtype == np.int64 and r["logp"].dtype == np.float64


def _run_all(cy, p, tokens, mask, pl, reward, rl, cfg, u, pr=None):
    out, g = cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, cfg, ref_logp=rl)
    r = cy.rollout(p, tokens, pl, u, alpha=cfg.alpha, eps=cfg.eps, values=True, ref_params=pr)
    so, sg = cy.sft_loss_and_grad(p, tokens, mask)
    return out, g, r, so, sg


def _assert_same_bits(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same_bits(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_bits(x, y, f"{where}[{i}]")
    else:
        x, y = np.asarray(a), np.asarray(b)
        assert x.dtype == y.dtype and x.shape == y.shape, where
        assert x.tobytes() == y.tobytes(), f"{where}: not bit-identical"


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("B", [1, 16, 70])
def test_bit_identical_from_run_to_run(dt, B):
    """One seed, one backend, one thread count: the same bits every time (rows on several threads
    and BLAS or smm products included; B = 70 gives blocks above the smm limit on one thread)."""
    cy = _cy()
    p, tokens, mask, pl, reward, rl = _policy_batch(B, 9, 13, 24, dt=dt)
    cfg = reinforce.ReinforceConfig(entropy_coef=0.01, eps=0.1, baseline="loo" if B > 1 else "value")
    u = np.random.default_rng(1).random(tokens.shape)
    first = _run_all(cy, p, tokens, mask, pl, reward, rl, cfg, u)
    for _ in range(2):
        _assert_same_bits(first, _run_all(cy, p, tokens, mask, pl, reward, rl, cfg, u))


@needs_cython
@pytest.mark.parametrize("nthreads", [1, 2, 3])
def test_thread_counts_agree(monkeypatch, nthreads):
    """Other thread counts cut the batch into other blocks (and another product may run a block):
    each count is deterministic, and all agree with one thread within float64 rounding."""
    cy = _cy()
    if not cy.openmp()[0] and nthreads > 1:
        pytest.skip("built without OpenMP")
    p, tokens, mask, pl, reward, rl = _policy_batch(24, 10, 11, 20)
    cfg = reinforce.ReinforceConfig(baseline="mean", whiten="population")
    u = np.random.default_rng(2).random(tokens.shape)
    monkeypatch.setattr(cy, "_nthreads", lambda: 1)
    one = _run_all(cy, p, tokens, mask, pl, reward, rl, cfg, u)
    monkeypatch.setattr(cy, "_nthreads", lambda: nthreads)
    got = _run_all(cy, p, tokens, mask, pl, reward, rl, cfg, u)
    _assert_same_bits(got, _run_all(cy, p, tokens, mask, pl, reward, rl, cfg, u))
    out1, g1, r1, so1, sg1 = one
    out, g, r, so, sg = got
    np.testing.assert_array_equal(r["tokens"], r1["tokens"])
    for k in g1:
        assert_close(g[k], g1[k], np.float64, n=1000, scale=max(1e-300, np.abs(g1[k]).max()), name=k)
    assert_close(out["loss"], out1["loss"], np.float64, n=1000, scale=abs(out1["loss_pg"]) + 1)


# ---------------------------------------------------------------------------------------------
# larger shapes against the reference

def _n(T, E, H, V, B=1):
    return T * (E + H) + H + V + T * (4 * H + V) + B * T


def _gscale(g):
    return max(float(np.max(np.abs(v))) for v in g.values())


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("B,T,V,E,H,nthreads", [
    (5, 7, 11, 6, 9, 1),          # 5 rows in one block: smm with a remainder row
    (8, 12, 40, 12, 33, 2),       # two blocks of 4: smm; H not a multiple of the SIMD width
    (16, 9, 7, 8, 16, 3),         # three blocks of 5-6 rows
    (70, 6, 30, 10, 12, 1),       # one block of 70: BLAS products
    (64, 32, 64, 16, 64, 2),      # whole-sequence products, column sums, scatter-adds split
])
def test_reinforce_matches_reference_on_larger_shapes(monkeypatch, dt, B, T, V, E, H, nthreads):
    cy = _cy()
    if nthreads > 1 and not cy.openmp()[0]:
        pytest.skip("built without OpenMP")
    monkeypatch.setattr(cy, "_nthreads", lambda: nthreads)
    p64, tokens, mask, pl, reward, rl = _policy_batch(B, T, V, H, E=E, seed=B + T, heads=("head", "value", "qvalue"))
    p = {k: v.astype(dt) for k, v in p64.items()}
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    pr64 = lstm.init_params(V, E, H + 3, np.random.default_rng(5), heads=("head",))
    pr = {k: v.astype(dt) for k, v in pr64.items()}
    pr64 = {k: v.astype(np.float64) for k, v in pr.items()}
    n = _n(T, E, H + 3, V, B)
    for cfg in (reinforce.ReinforceConfig(entropy_coef=0.05, eps=0.2, gamma=0.9, kl="k3", aggregation="seq_mean"),
                reinforce.ReinforceConfig(baseline="qvalue", alpha=1.7, returns="total", whiten="bessel")):
        ref_out, ref_g = reinforce.loss_and_grad(p64, tokens, mask, pl, reward, cfg, ref_params=pr64)
        out, g = cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, cfg, ref_params=pr)
        chain = max(np.abs(ref_out[k]).max() for k in ("logp", "ref_logp", "returns", "baseline", "rewards"))
        for k in ("logp", "ref_logp", "entropy", "kl", "returns", "values", "qvalues"):
            assert_close(out[k], ref_out[k], dt, n=n, scale=max(chain, np.abs(ref_out[k]).max()), name=k)
        assert_close(out["loss"], ref_out["loss"], dt, n=n, scale=chain * 10, name="loss")
        gs = _gscale(ref_g) * 10
        for k in p:
            assert g[k].dtype == dt
            assert_close(g[k], ref_g[k], dt, n=n, scale=gs, name=f"grad {k}")


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("B,nthreads", [(12, 1), (12, 2), (70, 2)])
def test_sft_and_reward_model_match_reference_on_larger_shapes(monkeypatch, dt, B, nthreads):
    cy = _cy()
    if nthreads > 1 and not cy.openmp()[0]:
        pytest.skip("built without OpenMP")
    monkeypatch.setattr(cy, "_nthreads", lambda: nthreads)
    T, V, H = 11, 17, 20
    p, tokens, mask, _, _, _ = _policy_batch(B, T, V, H, seed=3, dt=dt)
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    n = _n(T, H, H, V, B)
    ref_out, ref_g = sft.loss_and_grad(p64, tokens, mask)
    out, g = cy.sft_loss_and_grad(p, tokens, mask)
    assert_close(out["loss"], ref_out["loss"], dt, n=n, scale=abs(ref_out["loss"]) + 1, name="sft loss")
    for k in p:
        assert_close(g[k], ref_g[k], dt, n=n, scale=_gscale(ref_g) * 10, name=f"sft grad {k}")

    rm = lstm.init_params(V, H, H, np.random.default_rng(4), heads=("reward",), dtype=dt)
    rm64 = {k: v.astype(np.float64) for k, v in rm.items()}
    rej, rmask = np.roll(tokens, 1, axis=0), np.roll(mask, 1, axis=0)[:, : T - 2]
    rej = rej[:, : T - 2]
    rmask[:, 0] = 1
    ref_out, ref_g = reward_model.bt_loss_and_grad(rm64, tokens, mask, rej, rmask)
    out, g = cy.bt_loss_and_grad(rm, tokens, mask, rej, rmask)
    for k in ("reward_chosen", "reward_rejected", "loss"):
        assert_close(out[k], ref_out[k], dt, n=n, scale=max(1.0, np.abs(ref_out["reward_chosen"]).max()), name=k)
    for k in rm:
        assert_close(g[k], ref_g[k], dt, n=n, scale=_gscale(ref_g) * 10 + 1e-3, name=f"bt grad {k}")
    assert np.all(g["reward.bias"] == 0)


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("B,nthreads,kind", [(16, 2, "boltzmann"), (9, 1, "eps_greedy"), (70, 2, "boltzmann"),
                                              (8, 2, "greedy")])
def test_rollout_matches_reference_on_larger_shapes(monkeypatch, dt, B, nthreads, kind):
    """Rows in blocks on several threads, smm or BLAS per step, early EOS, a reference policy of
    another size and the values: tie-aware against the reference (docs/conventions.md §4)."""
    cy = _cy()
    if nthreads > 1 and not cy.openmp()[0]:
        pytest.skip("built without OpenMP")
    monkeypatch.setattr(cy, "_nthreads", lambda: nthreads)
    T, V, H = 20, 9, 16
    rng = np.random.default_rng(B)
    p = lstm.init_params(V, H, H, rng, heads=("head", "value"), dtype=dt)
    p["head.bias"][EOS] += 1.0                                        # rows of varied length
    pr = lstm.init_params(V, H, H + 5, rng, heads=("head",), dtype=dt)
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    pr64 = {k: v.astype(np.float64) for k, v in pr.items()}
    prompt = rng.integers(3, V, (B, T))
    pl = rng.integers(1, 4, B)
    u = rng.random((B, T))
    eps = 0.0 if kind == "greedy" else 0.15
    kw = dict(alpha=1.3 if kind == "boltzmann" else 1.0, eps=eps, kind=kind, eos_id=EOS, values=True)
    ref = ref_rollout.rollout(p64, prompt, pl, u, ref_params=pr64, **kw)
    out = cy.rollout(p, prompt, pl, u, ref_params=pr, **kw)
    assert ref["action_mask"][:, -1].sum() < B, "no row ended early: raise the EOS bias"
    fwd, _ = model.forward(p64, ref["tokens"], ref["mask"])
    cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], kw["alpha"], eps, kind)), axis=-1)
    n = T * (2 * H + 5) + H + V
    div = compare_sampled_tokens(out["tokens"], ref["tokens"], u, cdf, ref["action_mask"], dtype=dt, n=n)
    assert np.mean(div == T) > 0.8
    for b in range(B):
        m = int(div[b])
        np.testing.assert_array_equal(out["mask"][b, :m], ref["mask"][b, :m])
        for k in ("logp", "ref_logp", "values"):
            assert_close(out[k][b, :m], ref[k][b, :m], dt, n=n, scale=max(1.0, np.abs(ref[k]).max()), name=k)


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
def test_transpose_is_exact_on_every_shape(dt):
    """The kernels' transposed copy (4 x 4 register blocks in tiles, entries one by one at the
    edges) equals NumPy's transpose bit for bit, whatever R and C are modulo the block and tile."""
    K = _cy()._require()
    rng = np.random.default_rng(3)
    for R in (1, 2, 3, 4, 5, 7, 8, 9, 17, 63, 64, 65, 129, 512):
        for C in (1, 3, 4, 5, 8, 9, 12, 17, 128, 131):
            A = rng.standard_normal((R, C)).astype(dt)
            out = np.full((C, R), np.nan, dt)
            K.lstm.transpose(A, out)
            assert out.tobytes() == np.ascontiguousarray(A.T).tobytes(), (R, C)


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("H,V", [(24, 13), (70, 150)])
def test_a_rows_rollout_does_not_depend_on_its_batch(monkeypatch, dt, H, V):
    """Where the instruction-set clones are built, a row's per-step products are the same sequence
    of multiply-adds whether the row runs alone (B = 1: smm's one-row pass), in a block of 4
    (smm's register blocks) or left over after the blocks: the same bits. H = 70, V = 150 give
    column blocks that end inside smm's block widths. Without the clones one row goes to BLAS's
    gemv: the same tokens, the numbers within rounding."""
    cy = _cy()
    monkeypatch.setattr(cy, "_nthreads", lambda: 1)
    B, T = 6, 12
    rng = np.random.default_rng(4)
    p = lstm.init_params(V, H, H, rng, heads=("head", "value"), dtype=dt)
    p["head.bias"][EOS] = -30.0
    prompt = rng.integers(3, V, (B, T))
    pl = rng.integers(1, 4, B)
    u = rng.random((B, T))
    whole = cy.rollout(p, prompt, pl, u, eos_id=EOS, values=True)
    same_bits = cy._require().lstm.isa_clones()
    for b in (0, 3, 4, 5):                          # in the block of 4, and the two rows after it
        one = cy.rollout(p, prompt[b:b + 1], pl[b:b + 1], u[b:b + 1], eos_id=EOS, values=True)
        np.testing.assert_array_equal(one["tokens"][0], whole["tokens"][b])
        for k in ("logp", "values"):
            if same_bits:
                assert one[k][0].tobytes() == whole[k][b].tobytes(), (b, k)
            else:
                assert_close(one[k][0], whole[k][b], dt, n=T * H, scale=max(1.0, np.abs(whole[k]).max()), name=k)


@needs_cython
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("V", [17, 600])
def test_rollout_row_scans_on_wide_vocabularies(dt, V):
    """The policy's row scans (_policy_cy.pxd: the checked maximum, its first index, the float64
    CDF search) run 16 lanes and a remainder (V = 17), and the CDF search keeps its running sums
    only up to V = 512 (V = 600: the two-pass path): tokens tie-aware against the reference,
    log-probabilities within tolerance, u at both ends of [0, 1) included."""
    cy = _cy()
    B, T, H = 5, 10, 12
    rng = np.random.default_rng(V)
    p = lstm.init_params(V, H, H, rng, heads=("head",), dtype=dt)
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    prompt = rng.integers(3, V, (B, T))
    pl = rng.integers(1, 3, B)
    u = rng.random((B, T))
    u[0], u[1] = 0.0, 1.0 - 2.0 ** -53
    kw = dict(alpha=1.4, eps=0.0, kind="boltzmann", eos_id=EOS)
    ref = ref_rollout.rollout(p64, prompt, pl, u, **kw)
    out = cy.rollout(p, prompt, pl, u, **kw)
    fwd, _ = model.forward(p64, ref["tokens"], ref["mask"])
    cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], kw["alpha"], 0.0, "boltzmann")), axis=-1)
    n = T * 2 * H + H + V
    div = compare_sampled_tokens(out["tokens"], ref["tokens"], u, cdf, ref["action_mask"], dtype=dt, n=n)
    assert np.mean(div == T) >= 0.8
    for b in range(B):
        m = int(div[b])
        assert_close(out["logp"][b, :m], ref["logp"][b, :m], dt, n=n, scale=max(1.0, np.abs(ref["logp"]).max()),
                     name="logp")


# ---------------------------------------------------------------------------------------------
# process state: BLAS threads, work buffers

@needs_cython
def test_openblas_threads_are_restored():
    cy = _cy()
    controls = _blas.controls()
    if not controls:
        pytest.skip("no OpenBLAS thread control found here")
    before = [get() for get, _ in controls]
    p, tokens, mask, pl, reward, rl = _policy_batch(4, 6, 9, 8)
    with cy._call():
        assert all(get() == 1 for get, _ in controls)
    cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, ref_logp=rl)
    cy.rollout(p, tokens, pl, np.zeros(tokens.shape))
    assert [get() for get, _ in controls] == before


@needs_cython
def test_work_buffers_are_reused_and_freed():
    cy = _cy()
    p, tokens, mask, pl, reward, rl = _policy_batch(6, 8, 10, 12)
    cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, ref_logp=rl)       # earlier tests' buffers go
    first = cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, ref_logp=rl)
    kept = cy.workspace_nbytes()
    assert kept > 0
    again = cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, ref_logp=rl)
    assert cy.workspace_nbytes() == kept
    _assert_same_bits(first, again)
    cy.clear_workspace()
    assert cy.workspace_nbytes() == 0
    _assert_same_bits(first, cy.reinforce_loss_and_grad(p, tokens, mask, pl, reward, ref_logp=rl))
    # another shape: the first shape's buffers go after one more call
    p2, t2, m2, pl2, r2, rl2 = _policy_batch(3, 5, 10, 12)
    cy.reinforce_loss_and_grad(p2, t2, m2, pl2, r2, ref_logp=rl2)
    cy.reinforce_loss_and_grad(p2, t2, m2, pl2, r2, ref_logp=rl2)
    assert cy.workspace_nbytes() < kept


@needs_cython
def test_kernel_entry_points_check_shapes():
    """Bounds checks are off inside the kernels: each entry point refuses inconsistent shapes and
    out-of-range ids with a ValueError instead of reading past a buffer."""
    K = _cy()._require()
    f4 = np.float32
    z = [np.zeros((2, 3)) for _ in range(6)]
    with pytest.raises(ValueError, match="policy_stats"):          # sel (T, B) instead of (B, T)
        K.train.policy_stats(np.zeros((6, 8), f4), np.zeros((3, 2), np.int64), np.ones((3, 2)), 5, 1.0, 0.0, 0,
                             False, *z, np.zeros((1, 5), f4), 1)
    with pytest.raises(ValueError, match="outside"):                # an action id ≥ V
        K.train.policy_stats(np.zeros((6, 8), f4), np.full((3, 2), 7, np.int64), np.ones((2, 3)), 5, 1.0, 0.0, 0,
                             False, *z, np.zeros((1, 5), f4), 1)
    E, W_ih, W_hh = np.zeros((5, 3), f4), np.zeros((8, 3), f4), np.zeros((8, 2), f4)
    b = np.zeros(8, f4)
    ids, L = np.array([[0], [9]]), np.array([2])                    # id 9 ≥ V = 5 at a real position
    args = (E, W_ih, W_hh, np.zeros((2, 8), f4), b, b, ids, L, np.zeros(5, np.int64), np.zeros(2, np.int64),
            np.zeros((2, 3), f4), np.zeros((2, 8), f4), np.zeros((2, 1, 8), f4), np.zeros((3, 1, 2), f4),
            np.zeros((3, 1, 2), f4))
    with pytest.raises(ValueError, match="id outside"):
        K.lstm.forward(*args)
    with pytest.raises(ValueError, match="linear"):
        K.lstm.linear(np.zeros((4, 2), f4), np.zeros((3, 5), f4), np.zeros(3, f4), np.zeros((4, 3), f4))


@needs_cython
def test_concurrent_calls_from_threads():
    """The kernels release the GIL: calls from several Python threads run at once, each with its
    own work buffers, give the same bits as one at a time, and leave OpenBLAS's threads as found."""
    import threading
    cy = _cy()
    controls = _blas.controls()
    before = [get() for get, _ in controls]
    jobs = [_policy_batch(B, 12, 11, 16, seed=B) for B in (1, 5, 8, 12)]
    want = [cy.reinforce_loss_and_grad(p, t, m, pl, r, ref_logp=rl) for p, t, m, pl, r, rl in jobs]
    got = [None] * len(jobs)

    def work(i):
        for _ in range(5):
            p, t, m, pl, r, rl = jobs[i]
            got[i] = cy.reinforce_loss_and_grad(p, t, m, pl, r, ref_logp=rl)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for w, g in zip(want, got):
        _assert_same_bits(w, g)
    assert [get() for get, _ in controls] == before
