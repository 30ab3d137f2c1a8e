"""The Numba CUDA backend (``rlhf_ref._core._backend_cuda``): kernel-specific tests.

Tests marked ``cuda`` need ``numba.cuda.is_available()``: a real GPU, or the simulator
(``NUMBA_ENABLE_CUDASIM=1 pytest -m cuda``, set before Python starts). They run with tiny
blocks (2 threads, 2 rows per block, a grid of 2 blocks over 4 tiles), so several blocks run
and the grid-stride loop is exercised. The simulator is slow: shapes stay tiny.

The unmarked tests need no GPU and run in the main suite: the probe's reason, the
NotImplementedError of the training functions, and a compile check that types and lowers the
kernel for a real CUDA target (compute capability 8.0) with plain numba, proving that the float32
build does its arithmetic in float32 (the simulator has no type inference, so it cannot show this).
"""

import os

import numpy as np
import pytest

from rlhf_ref import lstm, model, policy, reinforce, rollout as ref_rollout
from rlhf_ref._core import _backend_cuda as be
from rlhf_ref.tokenizer import EOS

from _tol import assert_close, compare_sampled_tokens

# sizes: B rows, T steps, policy (E, H), reference policy (Er, Hr), vocabulary V
B, T, E, H, Er, Hr, V = 7, 8, 5, 6, 4, 3, 7
CASES = [("boltzmann", 1.0, 0.0), ("boltzmann", 2.5, 0.3), ("boltzmann", 0.7, 1.0),
         ("eps_greedy", 1.0, 0.3), ("greedy", 1.0, 0.0)]
DTYPES = [np.float64, np.float32]
SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")
CUDA_WHY = be.probe()


def cuda_test(f):
    """Marked ``cuda`` (the conftest skips those without a GPU) and skipped here too, with the reason."""
    return pytest.mark.cuda(pytest.mark.skipif(CUDA_WHY is not None, reason=str(CUDA_WHY))(f))


@pytest.fixture
def tiny_blocks(monkeypatch):
    """2 threads, 2 rows per block, at most 2 blocks: 4 tiles of B = 7 rows, so blocks loop."""
    from rlhf_ref._core import _config, _rollout_cuda
    monkeypatch.setattr(_config, "CUDA", _config.CudaConfig(tpb=2, rows=2, max_blocks=2))
    return _rollout_cuda


def make_problem(seed=0, eos_bias=1.0):
    rng = np.random.default_rng(seed)
    p = lstm.init_params(V, E, H, rng, heads=("head", "value"))
    p["head.bias"][EOS] += eos_bias                      # some rows end early, some run to T
    pr = lstm.init_params(V, Er, Hr, rng, heads=("head",))
    prompt = rng.integers(3, V, (B, T))
    prompt[:, 0] = 1
    pl = np.array([1, 2, 3, 1, T, 2, 1])                 # row 4 is all prompt: no action
    u = rng.random((B, T))
    return p, pr, prompt, pl, u


def cast(p, dt):
    return {k: v.astype(dt) for k, v in p.items()}


def reference_cdf(p64, ref, alpha, eps, kind):
    """cdf_ref (B, T, V): the reference's sampling CDF at every step of its own rows."""
    fwd, _ = model.forward(p64, ref["tokens"], ref["mask"])
    return np.cumsum(np.exp(policy.logprobs(fwd["scores"], alpha, eps, kind)), axis=-1)


def assert_close_prefix(x, ref, div, dtype, n, name):
    """Compare a (B, T) output over each row's common prefix with the reference."""
    for b in range(x.shape[0]):
        assert_close(x[b, :div[b]], ref[b, :div[b]], dtype, n, name=f"{name} row {b}")


# ---------------------------------------------------------------------------------------------
# no GPU needed

def test_training_functions_raise_not_implemented():
    for name, args in (("reinforce_loss_and_grad", (None,) * 5), ("sft_loss_and_grad", (None,) * 3),
                       ("reward_forward", (None,) * 3), ("bt_loss_and_grad", (None,) * 5)):
        with pytest.raises(NotImplementedError, match=name):
            getattr(be, name)(*args)
    assert be.IMPLEMENTED == {"rollout", "sequence_logprobs"}


def test_probe_gives_reason_or_none():
    why = be.probe()
    try:
        from numba import cuda
    except Exception:
        assert why is not None and "numba" in why
        return
    if cuda.is_available():
        assert why is None
    else:
        assert why.startswith("no CUDA GPU") and "NUMBA_ENABLE_CUDASIM=1" in why
        p, _, prompt, pl, u = make_problem()
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            be.rollout(p, prompt, pl, u)


@pytest.mark.skipif(SIM, reason="the simulator replaces numba's CUDA compiler")
def test_kernel_types_and_lowers_for_a_real_gpu(monkeypatch):
    """Type inference and LLVM lowering of the kernel for cc 8.0, no GPU or NVVM needed.

    In the float32 build, only the ε-mixture (float64 by design, as in the reference) and the
    comparison with the float64 uniform may hold float64 values.
    """
    pytest.importorskip("numba")
    from numba import types as nt
    try:
        import numba.cuda.dispatcher as disp
        from numba.cuda.compiler import compile_cuda
        from rlhf_ref._core import _rollout_cuda as C
    except Exception as e:                  # numba-cuda's layout, or a numba without CUDA
        pytest.skip(f"numba's CUDA compiler internals not reachable: {e}")
    if not hasattr(disp, "get_current_device"):
        pytest.skip("numba's CUDA dispatcher layout changed")

    class FakeDevice:
        compute_capability = (8, 0)
    monkeypatch.setattr(disp, "get_current_device", lambda: FakeDevice())

    def A(d, n):
        return nt.Array(d, n, "C")
    i64, f64 = nt.int64, nt.float64
    for dt in (nt.float32, nt.float64):
        mdl = (A(dt, 2), A(dt, 2), A(dt, 2), A(dt, 1), A(dt, 1), A(dt, 2), A(dt, 1))
        sig = (A(i64, 2), A(i64, 1), A(i64, 1), A(f64, 2), i64, i64, i64, nt.boolean, i64, i64,
               *mdl, A(dt, 1), A(f64, 1), nt.boolean, *mdl, A(dt, 1),
               A(dt, 3), A(dt, 2), A(dt, 2), A(dt, 3), A(dt, 2), A(dt, 2), A(nt.int32, 1), *([A(f64, 2)] * 5))
        cres = compile_cuda(C._rollout_kernel.py_func, nt.void, sig, cc=(8, 0))
        assert "define" in cres.library.get_llvm_str()
    allowed = {"_logaddexp", "_logq_mix", "_sample_mix", "_logp_at", "_sample_dt"}
    for name, f in vars(C).items():
        if not isinstance(f, disp.CUDADispatcher) or name == "_rollout_kernel":
            continue
        for args, res in f.overloads.items():
            if nt.float32 in [getattr(a, "dtype", a) for a in args] and name not in allowed:
                f64vars = sorted(k for k, v in res.type_annotation.typemap.items() if v == nt.float64)
                assert not f64vars, f"{name} promotes float32 to float64: {f64vars}"
    # _sample_dt: q stays float32; the cdf and its total are float64 by design (issue 10,
    # docs/conventions.md "Sampling in float32"), as in policy.sample
    for args, res in C._sample_dt.overloads.items():
        if nt.float32 in [getattr(a, "dtype", a) for a in args]:
            tm = res.type_annotation.typemap
            assert tm["cdf"] == nt.float64 and tm["tot"] == nt.float64 and tm["q"] == nt.float32


@pytest.mark.skipif(SIM, reason="the simulator replaces numba's CUDA compiler")
def test_kernel_compiles_to_ptx_for_sm90(monkeypatch):
    """NVVM accepts the kernel (PTX for sm_90, the H100/H200), where the CUDA toolkit's NVVM is
    installed (numba-cuda[cu12] brings it); skipped otherwise. No GPU needed."""
    pytest.importorskip("numba")
    from numba import cuda, types as nt
    import numba.cuda.dispatcher as disp
    from rlhf_ref._core import _rollout_cuda as C

    class FakeDevice:
        compute_capability = (9, 0)
    if hasattr(disp, "get_current_device"):
        monkeypatch.setattr(disp, "get_current_device", lambda: FakeDevice())

    def A(d, n):
        return nt.Array(d, n, "C")
    i64, f64, dt = nt.int64, nt.float64, nt.float32
    mdl = (A(dt, 2), A(dt, 2), A(dt, 2), A(dt, 1), A(dt, 1), A(dt, 2), A(dt, 1))
    sig = (A(i64, 2), A(i64, 1), A(i64, 1), A(f64, 2), i64, i64, i64, nt.boolean, i64, i64,
           *mdl, A(dt, 1), A(f64, 1), nt.boolean, *mdl, A(dt, 1),
           A(dt, 3), A(dt, 2), A(dt, 2), A(dt, 3), A(dt, 2), A(dt, 2), A(nt.int32, 1), *([A(f64, 2)] * 5))
    try:
        ptx, _ = cuda.compile_ptx(C._rollout_kernel.py_func, sig, cc=(9, 0))
    except Exception as e:
        if "NVVM" in str(e) or "nvvm" in str(e) or "CUDA driver" in str(e) or "libdevice" in str(e):
            pytest.skip(f"no NVVM here: {type(e).__name__}")
        raise
    assert ".entry" in ptx and "bar.sync" in ptx


# ---------------------------------------------------------------------------------------------
# on a GPU or the simulator

@cuda_test
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind,alpha,eps", CASES)
def test_rollout_matches_reference(tiny_blocks, dtype, kind, alpha, eps):
    p, pr, prompt, pl, u = make_problem()
    p, pr = cast(p, dtype), cast(pr, dtype)
    p64, pr64 = cast(p, np.float64), cast(pr, np.float64)          # the desired side: float64
    out = be.rollout(p, prompt, pl, u, alpha, eps, kind, ref_params=pr, values=True)
    ref = ref_rollout.rollout(p64, prompt, pl, u, alpha, eps, kind, ref_params=pr64, values=True)
    assert set(out) == set(ref)
    assert out["tokens"].dtype == np.int64
    for k in ref:
        assert out[k].shape == ref[k].shape, k
    n = T * (E + H) + V                              # the recurrence's chain of roundings, then the head
    div = compare_sampled_tokens(out["tokens"], ref["tokens"], u, reference_cdf(p64, ref, alpha, eps, kind),
                                 ref["action_mask"], dtype, n)
    if dtype == np.float64:
        assert (div == T).all(), "float64 must sample the reference's tokens"
    for k in ("mask", "action_mask"):
        for b in range(B):
            np.testing.assert_array_equal(out[k][b, :div[b]], ref[k][b, :div[b]], err_msg=f"{k} row {b}")
    for k in ("logp", "ref_logp", "values"):     # −inf (greedy π_ref off its argmax) must match exactly
        assert_close_prefix(out[k], ref[k], div, dtype, n, k)
    # the row structure: everything after EOS is padding, masks 0, per-action arrays 0
    am = out["action_mask"]
    assert np.all(out["logp"][am == 0] == 0) and np.all(out["values"][out["mask"] == 0] == 0)
    assert am[4].sum() == 0                           # an all-prompt row takes no action


@cuda_test
def test_rollout_without_optional_outputs_and_eos(tiny_blocks):
    """No ref_params, no values: the reference's keys only; a strong EOS ends rows at once."""
    p, _, prompt, pl, u = make_problem(seed=3, eos_bias=6.0)
    out = be.rollout(p, prompt, pl, u)
    ref = ref_rollout.rollout(p, prompt, pl, u)
    assert set(out) == set(ref) == {"tokens", "mask", "action_mask", "logp"}
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_array_equal(out["mask"], ref["mask"])
    assert (out["tokens"] == EOS).any()
    assert_close(out["logp"], ref["logp"], np.float64, T * (E + H) + V, name="logp")


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_deterministic_and_independent_of_launch_config(monkeypatch, dtype):
    """Repeat → bit-identical; and every launch configuration gives the same bits (one thread
    computes each number in a fixed order)."""
    from rlhf_ref._core import _config, _rollout_cuda as C
    p, pr, prompt, pl, u = make_problem(seed=1)
    p, pr = cast(p, dtype), cast(pr, dtype)
    runs = []
    for cfg in (C.CudaConfig(tpb=2, rows=2, max_blocks=2), C.CudaConfig(tpb=2, rows=2, max_blocks=2),
                C.CudaConfig(tpb=3, rows=3, max_blocks=0), C.CudaConfig(tpb=5, rows=1, max_blocks=3)):
        monkeypatch.setattr(_config, "CUDA", cfg)
        runs.append(be.rollout(p, prompt, pl, u, 1.3, 0.2, ref_params=pr, values=True))
    for r in runs[1:]:
        for k in runs[0]:
            np.testing.assert_array_equal(r[k], runs[0][k], err_msg=k)


@cuda_test
def test_launch_config_env_override(monkeypatch):
    from rlhf_ref._core import _config, _rollout_cuda as C
    monkeypatch.setattr(_config, "CUDA", C.CudaConfig())
    monkeypatch.setenv("RLHF_REF_CUDA_TPB", "2")
    monkeypatch.setenv("RLHF_REF_CUDA_ROWS", "2")
    monkeypatch.setenv("RLHF_REF_CUDA_MAX_BLOCKS", "3")
    assert C.launch_config(7) == (3, 2, 2)
    assert C.launch_config(4) == (2, 2, 2)
    monkeypatch.delenv("RLHF_REF_CUDA_MAX_BLOCKS")
    assert C.launch_config(7) == (4, 2, 2)
    monkeypatch.setattr(_config, "CUDA", C.CudaConfig(tpb=4))       # the config setting wins
    assert C.launch_config(7)[1] == 4


@cuda_test
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_sequence_logprobs_matches_reference_and_rollout(tiny_blocks, dtype, eps):
    p, _, prompt, pl, u = make_problem(seed=2)
    p = cast(p, dtype)
    p64 = cast(p, np.float64)
    roll = be.rollout(p, prompt, pl, u, 1.5, eps)
    tokens, mask = roll["tokens"], roll["mask"].copy()
    mask[6] = 0                                           # an all-padding row
    got = be.sequence_logprobs(p, tokens, mask, pl, 1.5, eps)
    want = reinforce.sequence_logprobs(p64, tokens, mask, pl, 1.5, eps)
    assert got.shape == want.shape
    assert got.dtype == reinforce.sequence_logprobs(p, tokens, mask, pl, 1.5, eps).dtype
    assert_close(got, want, dtype, T * (E + H) + V, name="sequence_logprobs")
    assert np.all(got[6] == 0)
    # one code path samples and scores: the recomputed log-probs equal the sampling ones bit for bit
    np.testing.assert_array_equal(got[:6], roll["logp"][:6].astype(got.dtype))


@cuda_test
def test_validates_like_the_reference(tiny_blocks):
    p, pr, prompt, pl, u = make_problem()
    bad = [dict(u=np.full((B, T), 1.0)), dict(alpha=0.0), dict(eps=1.5), dict(kind="nope"),
           dict(kind="greedy", eps=0.1), dict(pl=np.zeros(B, np.int64)), dict(eos_id=V)]
    for b in bad:
        args = dict(u=u, alpha=1.0, eps=0.0, kind="boltzmann", pl=pl, eos_id=EOS)
        args.update(b)
        call = (lambda f: f(p, prompt, args["pl"], args["u"], args["alpha"], args["eps"], args["kind"], args["eos_id"]))
        with pytest.raises(Exception) as want:
            call(ref_rollout.rollout)
        with pytest.raises(type(want.value), match=None) as got:
            call(be.rollout)
        assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="mask must be right-padded"):
        be.sequence_logprobs(p, prompt, np.tile([1, 0, 1, 0, 0, 0, 0, 0], (B, 1)), pl)


@cuda_test
def test_empty_batch_and_single_step(tiny_blocks):
    p, _, prompt, pl, u = make_problem()
    out = be.rollout(p, prompt[:0], pl[:0], u[:0], values=True)
    ref = ref_rollout.rollout(p, prompt[:0], pl[:0], u[:0], values=True)
    assert set(out) == set(ref) and all(out[k].shape == ref[k].shape for k in ref)
    out = be.rollout(p, prompt[:, :1], np.ones(B, np.int64), u[:, :1])
    ref = ref_rollout.rollout(p, prompt[:, :1], np.ones(B, np.int64), u[:, :1])
    for k in ref:
        np.testing.assert_array_equal(out[k], ref[k])


@cuda_test
@pytest.mark.parametrize("kind,eps", [("greedy", 0.0), ("eps_greedy", 0.4)])
def test_inverse_cdf_boundaries_with_zero_uniforms(tiny_blocks, kind, eps):
    """u = 0 sits exactly on the CDF's zero steps: a = #{k : cdf_k ≤ 0} is the greedy token
    (not token 0), which pins the ≤ of docs/conventions.md §4."""
    p, _, prompt, pl, _ = make_problem(seed=4)
    u = np.zeros((B, T))
    out = be.rollout(p, prompt, pl, u, 1.0, eps, kind)
    ref = ref_rollout.rollout(p, prompt, pl, u, 1.0, eps, kind)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    if kind == "greedy":
        assert (out["tokens"][out["action_mask"] > 0] != 0).any()
    np.testing.assert_array_equal(out["logp"], ref["logp"])
