"""THE equivalence suite: every available backend against the float64 NumPy reference.

Parametrized over every backend the registry (``rlhf_ref.backends``) reports available, the
reference ``numpy`` included (it runs through the same checks in float32 and float64); an
unavailable backend shows up as a skip with its reason. A backend function that raises
``NotImplementedError`` (the CUDA backend has no training step) is skipped, by name.

Hypothesis draws the shapes (B ≤ 4, T ≤ 8, E, H ≤ 16, V ≤ 11), the dtype (float32/float64),
bounded parameter values (PyTorch-like initialisation times a drawn scale), right-padded masks
(empty rows included, out-of-range ids in the padding that must never be read) and every
convention. The reference, run in float64 on the *same* (dtype-rounded) values, is always the
desired side. Tolerances come from ``tests/_tol.py``: ``kernel_tol(dtype, n)`` with ``n`` the
length of the chain of reductions behind an output (stated per check), ``scale`` the magnitude of
the array compared. Sampled tokens are compared tie-aware (``compare_sampled_tokens``): each row
up to its first divergence, which is accepted only where u lies within rounding distance of a
CDF boundary; the other rollout outputs are compared over each row's common prefix.

Errors: where the reference raises ValueError/TypeError on a drawn input, the backend must raise
the same type with the same message (the same checks, before any kernel runs).

The number of examples per test is the Hypothesis profile's (``tests/conftest.py``: ``ci`` 50,
derandomized; ``dev`` 30); ``RLHF_REF_EQUIV_EXAMPLES=1000`` asks for more.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rlhf_ref import backends, conventions, lstm, model, policy, reinforce, reward_model, rollout as ref_rollout, sft
from rlhf_ref.tokenizer import EOS

try:
    from _tol import assert_close, compare_sampled_tokens, kernel_tol
except ImportError:                                   # run from the repository root
    from tests._tol import assert_close, compare_sampled_tokens, kernel_tol

_N = os.environ.get("RLHF_REF_EQUIV_EXAMPLES")          # else the profile's (tests/conftest.py)
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    **({"max_examples": int(_N)} if _N else {}))
DTYPES = (np.float64, np.float32)


# ---------------------------------------------------------------------------------------------
# the backends under test

def _discover():
    """[(name, backend or None, reason)] for every backend of the registry."""
    found = []
    for name, status in backends.available().items():
        found.append((name, backends.get(name) if status.available else None, status.reason))
    return found


BACKENDS = _discover()


def _marks(name, be, why):
    # the cuda backend's cases carry the cuda marker, so CI's simulator run (-m cuda under
    # NUMBA_ENABLE_CUDASIM=1) puts the CUDA kernels through this same suite
    marks = [pytest.mark.cuda] if name == "cuda" else []
    if be is None:
        marks.append(pytest.mark.skip(reason=f"{name}: {why}"))
    return marks


BACKEND_PARAMS = [pytest.param(be, id=name, marks=_marks(name, be, why)) for name, be, why in BACKENDS]


def params_for(*fnames):
    """BACKEND_PARAMS less the backends that declare (IMPLEMENTED) they do not do ``fnames`` by
    design: the cuda backend does rollouts only (rlhf_ref/backends.py), so it gets no training case."""
    return [p for p, (name, be, why) in zip(BACKEND_PARAMS, BACKENDS)
            if be is None or all(f in getattr(be, "IMPLEMENTED", fnames) for f in fnames)]


def call(be, fname, *args, **kw):
    """be.fname(*args) or a skip naming what the backend does not implement."""
    try:
        return getattr(be, fname)(*args, **kw)
    except NotImplementedError as e:
        pytest.skip(f"{fname} not implemented by this backend: {e}")


def same_error(be, fname, ref_fn, args, kw=None):
    """Run the reference; if it raises ValueError/TypeError, the backend must raise the same.

    Returns the reference's result, or None after checking the error."""
    kw = kw or {}
    try:
        return ref_fn(*args, **kw)
    except (ValueError, TypeError) as e:
        with pytest.raises(type(e)) as got:
            call(be, fname, *args, **kw)
        assert str(got.value) == str(e), f"{fname}: reference says {e!r}, backend says {got.value!r}"
        return None


def cast(p, dt):
    return {k: np.ascontiguousarray(v, dtype=dt) for k, v in p.items()}


def scale_of(x):
    """The magnitude of an array's entries (at least the smallest normal float64)."""
    x = np.asarray(x, dtype=np.float64)
    return max(float(np.max(np.abs(x))) if x.size else 0.0, 1e-300)


def close(actual, desired, dtype, n, name, scale=None):
    """assert_close with atol = kernel_tol·scale, scale the magnitude of the terms behind the result:
    by default the desired array's largest entry (every entry carries rounding of order
    eps·n·max|result|, so tiny entries are compared absolutely and large ones relatively); callers
    pass a larger scale where a result is a difference of larger terms (stated there)."""
    scale = scale_of(desired) if scale is None else max(scale, scale_of(desired))
    # atol override: never below the dtype's smallest normal number, where results legitimately
    # flush to 0 (Hypothesis draws coefficients like 1e-81, whose float32 gradients underflow)
    atol = max(kernel_tol(dtype, n) * scale, 4 * float(np.finfo(dtype).tiny))
    assert_close(np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64), dtype=dtype, n=n,
                 name=name, atol=atol)


def grad_scale(grads):
    """The gradient's magnitude over every parameter: one loss's gradient entries are sums of
    products of the same upstream terms, so an entry that cancels to ~0 carries the rounding of
    the largest ones."""
    return max(scale_of(v) for k, v in grads.items() if k != "terms")


def whitening_condition(out, cfg):
    """How much whitening amplifies rounding: A = (x − μ)/σ̃ with x = G − b loses the digits x and μ
    share, so an absolute error eps·max|x| in x becomes eps·max|x|/σ̃ in A, against max|A| =
    max|x − μ|/σ̃: the factor max|x| / max|x − μ| (≥ 1; huge when every advantage is the same)."""
    if cfg.whiten == "off":
        return 1.0
    m = out["action_mask"] > 0
    x = (out["returns"] - out["baseline"])[m]
    if x.size == 0:
        return 1.0
    spread = np.max(np.abs(x - x.mean()))
    return max(1.0, float(np.max(np.abs(x))) / max(float(spread), 1e-300))


# ---------------------------------------------------------------------------------------------
# strategies

@st.composite
def shapes(draw):
    return dict(B=draw(st.integers(1, 4)), T=draw(st.integers(1, 8)), E=draw(st.integers(1, 16)),
                H=draw(st.integers(1, 16)), V=draw(st.integers(3, 11)))


def draw_params(draw, V, E, H, heads, dtype, name="params"):
    """PyTorch-like initial values times a drawn scale, rounded to dtype; returns (p_dtype, p64)."""
    seed = draw(st.integers(0, 2 ** 32 - 1), label=f"{name} seed")
    scale = draw(st.floats(0.05, 3.0), label=f"{name} scale")
    p = lstm.init_params(V, E, H, np.random.default_rng(seed), heads=heads)
    p = {k: v * scale for k, v in p.items()}
    if "head.weight" in p:
        p["head.bias"][EOS] += draw(st.floats(-2.0, 2.0), label="eos bias")   # rows of varied length
    pd = cast(p, dtype)
    return pd, cast(pd, np.float64)


@st.composite
def batches(draw, B, T, V, empty_rows=True):
    """tokens (B, T) with junk ids in the padding, right-padded mask, prompt_len."""
    seed = draw(st.integers(0, 2 ** 32 - 1), label="batch seed")
    rng = np.random.default_rng(seed)
    lengths = np.array(draw(st.lists(st.integers(0 if empty_rows else 1, T), min_size=B, max_size=B)), np.int64)
    tokens = rng.integers(0, V, (B, T))
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    tokens = np.where(mask > 0, tokens, rng.choice([-7, V, V + 3], (B, T)))      # never read
    pl = np.array([draw(st.integers(1, max(1, int(n)))) if n > 0 else 0 for n in lengths], np.int64)
    return tokens, mask, pl


@st.composite
def policy_args(draw, kinds=conventions.values("policy")):
    kind = draw(st.sampled_from(kinds))
    alpha = draw(st.floats(0.25, 4.0)) if kind == "boltzmann" else 1.0
    if kind == "greedy":
        eps = 0.0
    else:
        eps = draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.999), st.just(1.0)))
    return alpha, eps, kind


# chain lengths n for kernel_tol: one LSTM step reduces over E + H inputs; T steps chain
def n_forward(T, E, H, V):
    """A head output after T recurrent steps: T·(E + H) for the body, H for the head, V for the softmax."""
    return T * (E + H) + H + V


def n_grad(B, T, E, H, V):
    """A gradient: a forward chain, the backward chain through T steps (4H per step) and a sum over B·T."""
    return n_forward(T, E, H, V) + T * (4 * H + V) + B * T


# ---------------------------------------------------------------------------------------------
# rollout

@pytest.mark.parametrize("be", BACKEND_PARAMS)
@SETTINGS
@given(data=st.data())
def test_rollout(be, data):
    d = data.draw
    s = d(shapes())
    B, T, E, H, V = s["B"], s["T"], s["E"], s["H"], s["V"]
    dt = d(st.sampled_from(DTYPES), label="dtype")
    values = d(st.booleans(), label="values")
    with_ref = d(st.booleans(), label="ref_params")
    p, p64 = draw_params(d, V, E, H, ("head", "value") if values else ("head",), dt)
    if with_ref:
        Hr = d(st.integers(1, 16), label="ref H")
        pr, pr64 = draw_params(d, V, E, Hr, ("head",), dt, "ref_params")
    else:
        pr = pr64 = None
    alpha, eps, kind = d(policy_args())
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1), label="u seed"))
    prompt = rng.integers(0, V, (B, T))
    pl = np.array(d(st.lists(st.integers(1, T), min_size=B, max_size=B), label="prompt_len"), np.int64)
    u = rng.random((B, T))

    args = (p64, prompt, pl, u)
    kw = dict(alpha=alpha, eps=eps, kind=kind, eos_id=EOS, ref_params=pr64, values=values)
    ref = same_error(be, "rollout", ref_rollout.rollout, args, kw)
    if ref is None:
        return
    out = call(be, "rollout", p, prompt, pl, u, alpha=alpha, eps=eps, kind=kind, eos_id=EOS, ref_params=pr,
               values=values)
    assert set(out) == set(ref), f"keys {sorted(out)} != reference {sorted(ref)}"
    for k in ref:
        assert out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype, \
            f"{k}: {out[k].shape} {out[k].dtype} != reference {ref[k].shape} {ref[k].dtype}"

    # the reference's sampling distribution along its own rows, teacher-forced
    fwd, _ = model.forward(p64, ref["tokens"], ref["mask"])
    cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], alpha, eps, kind)), axis=-1)
    n = n_forward(T, E, max(H, pr64["lstm.weight_hh_l0"].shape[1] if with_ref else H), V)
    # log π = α·z_a − max − log Σ: every log-prob carries rounding of order eps·max|α·z|, not eps·|log π|
    zscale = alpha * scale_of(fwd["scores"])
    if with_ref:
        zscale = max(zscale, alpha * scale_of(model.forward(pr64, ref["tokens"], ref["mask"])[0]["scores"]))
    div = compare_sampled_tokens(out["tokens"], ref["tokens"], u, cdf, ref["action_mask"], dtype=dt, n=n)
    for b in range(B):
        m = int(div[b])
        np.testing.assert_array_equal(out["mask"][b, :m + 1 if m < T else T], ref["mask"][b, :m + 1 if m < T else T])
        np.testing.assert_array_equal(out["action_mask"][b, :m + 1 if m < T else T],
                                      ref["action_mask"][b, :m + 1 if m < T else T])
        np.testing.assert_array_equal(out["tokens"][b, :m], ref["tokens"][b, :m])
        for k in ("logp", "ref_logp", "values"):
            if k in ref:
                close(out[k][b, :m], ref[k][b, :m], dt, n, f"rollout {k} row {b}",
                      scale=None if k == "values" else zscale)


# ---------------------------------------------------------------------------------------------
# sequence log-probs

@pytest.mark.parametrize("be", BACKEND_PARAMS)
@SETTINGS
@given(data=st.data())
def test_sequence_logprobs(be, data):
    d = data.draw
    s = d(shapes())
    B, T, E, H, V = s["B"], s["T"], s["E"], s["H"], s["V"]
    dt = d(st.sampled_from(DTYPES), label="dtype")
    p, p64 = draw_params(d, V, E, H, d(st.sampled_from([("head",), ("head", "value")])), dt)
    alpha, eps, _ = d(policy_args(kinds=("boltzmann",)))
    tokens, mask, pl = d(batches(B, T, V))
    ref = same_error(be, "sequence_logprobs", reinforce.sequence_logprobs, (p64, tokens, mask, pl, alpha, eps))
    if ref is None:
        return
    out = call(be, "sequence_logprobs", p, tokens, mask, pl, alpha, eps)
    assert out.shape == ref.shape
    # log π = α·z_a − max − log Σ: rounding of order eps·max|α·z| (see test_rollout)
    zscale = alpha * scale_of(model.forward(p64, tokens, mask)[0]["scores"])
    close(out, ref, dt, n_forward(T, E, H, V), "sequence_logprobs", scale=zscale)


# ---------------------------------------------------------------------------------------------
# REINFORCE: outputs and every gradient, over every convention

# the strategies of the numeric switches; the choices are drawn from the table of conventions, so a
# value added there is tested on every backend (and a switch with no strategy here fails at import)
NUMERIC = {
    "alpha": st.floats(0.25, 4.0),
    "eps": st.one_of(st.just(0.0), st.floats(1e-3, 0.999), st.just(1.0)),
    "gamma": st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 1.0)),
    "beta": st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    "entropy_coef": st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    "value_coef": st.one_of(st.just(0.0), st.just(0.5), st.floats(0.0, 2.0)),
    "lam": st.one_of(st.just(1.0), st.just(0.95), st.floats(0.0, 1.0)),
    "group_eps": st.one_of(st.just(1e-4), st.floats(0.0, 1.0)),
    "clip_low": st.one_of(st.just(0.2), st.floats(0.0, 1.0)),
    "clip_high": st.one_of(st.just(0.2), st.just(0.28), st.floats(0.0, 1.0)),
    "value_clip": st.one_of(st.just(0.0), st.floats(0.01, 1.0)),
    "norm_len": st.one_of(st.just(0.0), st.floats(1.0, 16.0)),
}
SWITCH_STRATEGIES = {sw.name: (st.sampled_from(sw.values) if sw.values is not None else NUMERIC[sw.name])
                     for sw in conventions.SWITCHES}


@st.composite
def configs(draw):
    kw = {name: draw(s) for name, s in SWITCH_STRATEGIES.items()}
    # the table's combinations ReinforceConfig refuses (its own test: tests/test_conventions.py)
    if kw["returns"] == "gae":
        kw["baseline"] = "value"
    if kw["baseline"] not in ("group_mean", "group_loo"):
        kw["group_scale"] = "off"
    return reinforce.ReinforceConfig(**kw)


OUT_KEYS = ("action_mask", "logp", "ref_logp", "entropy", "kl", "rewards", "returns", "baseline", "advantages",
            "ratio", "weights", "loss_pg", "loss_ent", "loss_value", "loss_kl", "loss")


@pytest.mark.parametrize("be", params_for("reinforce_loss_and_grad"))
@SETTINGS
@given(data=st.data())
def test_reinforce_loss_and_grad(be, data):
    d = data.draw
    s = d(shapes())
    B, T, E, H, V = s["B"], s["T"], s["E"], s["H"], s["V"]
    dt = d(st.sampled_from(DTYPES), label="dtype")
    cfg = d(configs(), label="cfg")
    heads = ("head", "qvalue") if cfg.critic == "qvalue" else ("head", "value")
    if d(st.booleans(), label="all heads"):
        heads = ("head", "value", "qvalue")
    p, p64 = draw_params(d, V, E, H, heads, dt)
    tokens, mask, pl = d(batches(B, T, V))
    rng = np.random.default_rng(d(st.integers(0, 2 ** 32 - 1), label="reward seed"))
    reward = rng.standard_normal(B) * d(st.floats(0.0, 3.0), label="reward scale")
    if d(st.booleans(), label="ref_params"):
        pr, pr64 = draw_params(d, V, E, d(st.integers(1, 16), label="ref H"), ("head",), dt, "ref_params")
        kw, kw64 = dict(ref_params=pr), dict(ref_params=pr64)
    else:
        rl = -np.abs(rng.standard_normal((B, T))) * 2
        kw = kw64 = dict(ref_logp=rl)
    # issue 9's inputs: group ids (groups of the drawn rows), a perturbed old_logp, old_values
    kw["group"] = kw64["group"] = np.array(d(st.lists(st.integers(0, 2), min_size=B, max_size=B), label="group"))
    if d(st.booleans(), label="old_logp"):
        lp = reinforce.sequence_logprobs(p64, tokens, mask, pl, cfg.alpha, cfg.eps)
        kw["old_logp"] = kw64["old_logp"] = lp + rng.normal(0, 0.3, (B, T))
    if cfg.value_clip > 0 or d(st.booleans(), label="old_values"):
        kw["old_values"] = kw64["old_values"] = rng.standard_normal((B, T))
    args64 = (p64, tokens, mask, pl, reward, cfg)
    ref = same_error(be, "reinforce_loss_and_grad", reinforce.loss_and_grad, args64, kw64)
    if ref is None:
        return
    ref_out, ref_g = ref
    out, g = call(be, "reinforce_loss_and_grad", p, tokens, mask, pl, reward, cfg, **kw)

    n = n_grad(B, T, E, H, V)
    kappa = whitening_condition(ref_out, cfg)
    # the per-token chain mixes values across the batch (returns, baselines, whitening): its entries
    # carry the rounding of the batch's largest terms; the advantages are differences G − b
    # log π = α·z_a − max − log Σ: rounding of order eps·max|α·z| (as in test_sequence_logprobs), which
    # the log-prob of a near-certain token (|log π| ≪ 1) does not show
    zscale = cfg.alpha * scale_of(ref_out["scores"])
    chain = max([zscale] + [scale_of(ref_out[k]) for k in ("logp", "ref_logp", "kl", "rewards", "returns", "baseline")])
    for k in OUT_KEYS + tuple(k for k in ("values", "qvalues") if k in ref_out):
        assert k in out, f"reinforce out lacks {k!r}"
        sc = zscale if k == "logp" else None
        if k in ("kl", "rewards", "returns", "baseline", "advantages", "loss_pg", "loss_kl", "loss"):
            sc = chain * (kappa if k in ("advantages", "loss_pg", "loss") else 1.0)
        close(out[k], ref_out[k], dt, n, f"reinforce {k}", scale=sc)
    assert set(g) == set(p64), f"grads keys {sorted(g)} != params keys {sorted(p64)}"
    # ∂log π_a/∂z = α·(onehot(a) − π): for a near-certain token 1 − π_a cancels, so a gradient entry
    # carries rounding of order eps·α·|w·A·ρ| (the upstream of the policy-gradient term) even when small
    # and ∂H/∂z_j = −α·π_j·(log π_j + H) (× the ε-mixture's factor) cancels near the uniform distribution:
    # terms of order c_H·w·α·max|log π_ε|
    upstream = cfg.alpha * scale_of(ref_out["weights"] * ref_out["advantages"] * ref_out["ratio"])
    upstream_ent = cfg.entropy_coef * cfg.alpha * scale_of(ref_out["weights"]) * scale_of(ref_out["logq"])
    gs = max(grad_scale(ref_g), upstream, upstream_ent) * kappa
    for k in ref_g:
        if k == "terms":
            continue
        assert g[k].shape == ref_g[k].shape, k
        assert g[k].dtype == np.dtype(dt), f"grad {k} is {g[k].dtype}, params are {np.dtype(dt)}"
        close(g[k], ref_g[k], dt, n, f"reinforce grad {k}", scale=gs)


# ---------------------------------------------------------------------------------------------
# SFT

@pytest.mark.parametrize("be", params_for("sft_loss_and_grad"))
@SETTINGS
@given(data=st.data())
def test_sft_loss_and_grad(be, data):
    d = data.draw
    s = d(shapes())
    B, T, E, H, V = s["B"], s["T"], s["E"], s["H"], s["V"]
    dt = d(st.sampled_from(DTYPES), label="dtype")
    p, p64 = draw_params(d, V, E, H, d(st.sampled_from([("head",), ("head", "value"), ("head", "value", "qvalue")])), dt)
    tokens, mask, _ = d(batches(B, T, V))
    ref = same_error(be, "sft_loss_and_grad", sft.loss_and_grad, (p64, tokens, mask))
    if ref is None:
        return
    ref_out, ref_g = ref
    out, g = call(be, "sft_loss_and_grad", p, tokens, mask)
    n = n_grad(B, T, E, H, V)
    close(out["logp"], ref_out["logp"], dt, n_forward(T, E, H, V), "sft logp")
    close(out["loss"], ref_out["loss"], dt, n, "sft loss")
    assert set(g) == set(p64)
    gs = grad_scale(ref_g)
    for k in ref_g:
        assert g[k].dtype == np.dtype(dt), f"grad {k} is {g[k].dtype}"
        close(g[k], ref_g[k], dt, n, f"sft grad {k}", scale=gs)


# ---------------------------------------------------------------------------------------------
# reward model

@pytest.mark.parametrize("be", params_for("reward_forward"))
@SETTINGS
@given(data=st.data())
def test_reward_forward(be, data):
    d = data.draw
    s = d(shapes())
    B, T, E, H, V = s["B"], s["T"], s["E"], s["H"], s["V"]
    dt = d(st.sampled_from(DTYPES), label="dtype")
    p, p64 = draw_params(d, V, E, H, ("reward",), dt)
    tokens, mask, _ = d(batches(B, T, V, empty_rows=d(st.booleans(), label="allow empty rows")))
    ref = same_error(be, "reward_forward", lambda *a: reward_model.forward(*a)[0], (p64, tokens, mask))
    if ref is None:
        return
    out = call(be, "reward_forward", p, tokens, mask)
    assert out.shape == ref.shape
    close(out, ref, dt, n_forward(T, E, H, V), "reward_forward")


@pytest.mark.parametrize("be", params_for("bt_loss_and_grad"))
@SETTINGS
@given(data=st.data())
def test_bt_loss_and_grad(be, data):
    d = data.draw
    s = d(shapes())
    B, T, E, H, V = s["B"], s["T"], s["E"], s["H"], s["V"]
    dt = d(st.sampled_from(DTYPES), label="dtype")
    p, p64 = draw_params(d, V, E, H, ("reward",), dt)
    Tr = d(st.integers(1, 8), label="rejected T")
    chosen, cmask, _ = d(batches(B, T, V, empty_rows=False))
    rejected, rmask, _ = d(batches(B, Tr, V, empty_rows=False))
    margin = None
    if d(st.booleans(), label="margin"):
        margin = np.array(d(st.lists(st.floats(-2, 2), min_size=B, max_size=B)))
    args = (p64, chosen, cmask, rejected, rmask, margin)
    ref = same_error(be, "bt_loss_and_grad", reward_model.bt_loss_and_grad, args)
    if ref is None:
        return
    ref_out, ref_g = ref
    out, g = call(be, "bt_loss_and_grad", p, chosen, cmask, rejected, rmask, margin)
    n = n_grad(2 * B, max(T, Tr), E, H, 1)
    rs = max(scale_of(ref_out["reward_chosen"]), scale_of(ref_out["reward_rejected"]))
    for k in ("reward_chosen", "reward_rejected", "delta", "loss"):
        close(out[k], ref_out[k], dt, n, f"bt {k}", scale=rs if k == "delta" else None)
    assert set(g) == set(p64)
    # the gradient is (chosen side) − (rejected side): it cancels when pairs are alike, so its
    # scale is that of one side, ∂(mean r(chosen))/∂θ
    _, cache = reward_model.forward(p64, chosen, cmask)
    gs = max(grad_scale(ref_g), grad_scale(reward_model.backward(np.full(B, 1.0 / B), cache)))
    for k in ref_g:
        assert g[k].dtype == np.dtype(dt), f"grad {k} is {g[k].dtype}"
        close(g[k], ref_g[k], dt, n, f"bt grad {k}", scale=gs)
    assert np.all(g["reward.bias"] == 0.0), "reward.bias gets exactly zero gradient from L_RM"


# ---------------------------------------------------------------------------------------------
# the same checks: bad inputs give the reference's error, before any kernel runs

def _small(dt=np.float64, heads=("head", "value")):
    p = lstm.init_params(5, 3, 4, np.random.default_rng(0), heads=heads, dtype=dt)
    tokens = np.array([[1, 3, 4, 2], [1, 4, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], float)
    return p, tokens, mask, np.array([1, 1])


BAD_CALLS = [
    ("rollout", lambda p, t, m, pl: (p, t, pl, np.full(t.shape, 1.0)), {}),                    # u must be < 1
    ("rollout", lambda p, t, m, pl: (p, t, pl, np.zeros(t.shape)), {"kind": "greedy", "eps": 0.1}),
    ("rollout", lambda p, t, m, pl: (p, t, np.array([0, 1]), np.zeros(t.shape)), {}),         # prompt_len 0
    ("rollout", lambda p, t, m, pl: (p, t, pl, np.zeros(t.shape)), {"eos_id": 5}),
    ("rollout", lambda p, t, m, pl: ({k: v for k, v in p.items() if k != "head.bias"}, t, pl, np.zeros(t.shape)), {}),
    ("sequence_logprobs", lambda p, t, m, pl: (p, t, 1 - m, pl), {}),                          # left padding
    ("sequence_logprobs", lambda p, t, m, pl: (p, t + 5, m, pl), {}),                          # ids ≥ V
    ("sequence_logprobs", lambda p, t, m, pl: (p, t, m, pl), {"alpha": 0.0}),
    ("reinforce_loss_and_grad", lambda p, t, m, pl: (p, t, m, pl, np.zeros(2)), {}),           # no reference
    ("reinforce_loss_and_grad", lambda p, t, m, pl: (p, t, m, np.array([4, 2]), np.zeros(2)), {"ref_logp": np.zeros((2, 4))}),
    ("reinforce_loss_and_grad", lambda p, t, m, pl: (p, t, m, pl, np.zeros(3)), {"ref_logp": np.zeros((2, 4))}),
    ("reinforce_loss_and_grad", lambda p, t, m, pl: (p, t, m, pl, np.zeros(2), reinforce.ReinforceConfig(baseline="qvalue")),
     {"ref_logp": np.zeros((2, 4))}),                                                          # no qvalue head
    ("reinforce_loss_and_grad", lambda p, t, m, pl: (p, t, m, np.array([1, 2]), np.zeros(2),
                                                     reinforce.ReinforceConfig(baseline="loo")), {"ref_logp": np.zeros((2, 4))}),
    ("sft_loss_and_grad", lambda p, t, m, pl: (p, t[:, :1], m[:, :1]), {}),                    # nothing to predict
    ("sft_loss_and_grad", lambda p, t, m, pl: ({**p, "head.weight": p["head.weight"].astype(np.float32)}, t, m), {}),
]


@pytest.mark.parametrize("be", BACKEND_PARAMS)
@pytest.mark.parametrize("i", range(len(BAD_CALLS)))
def test_same_errors_as_the_reference(be, i):
    fname, make, kw = BAD_CALLS[i]
    ref_fn = {"rollout": ref_rollout.rollout, "sequence_logprobs": reinforce.sequence_logprobs,
              "reinforce_loss_and_grad": reinforce.loss_and_grad, "sft_loss_and_grad": sft.loss_and_grad}[fname]
    args = make(*_small())
    with pytest.raises((ValueError, TypeError)):
        ref_fn(*args, **kw)
    assert same_error(be, fname, ref_fn, args, kw) is None


@pytest.mark.parametrize("be", params_for("reward_forward", "bt_loss_and_grad"))
def test_reward_model_errors(be):
    p = lstm.init_params(5, 3, 4, np.random.default_rng(0), heads=("reward",))
    tok = np.array([[1, 3], [1, 2]])
    same_error(be, "reward_forward", lambda *a: reward_model.forward(*a)[0], (p, tok, np.array([[1, 1], [0, 0]])))
    same_error(be, "bt_loss_and_grad", reward_model.bt_loss_and_grad, (p, tok, np.ones((2, 2)), tok[:1], np.ones((1, 2))))
    same_error(be, "bt_loss_and_grad", reward_model.bt_loss_and_grad,
               (p, tok, np.ones((2, 2)), tok, np.ones((2, 2)), np.zeros(3)))


# ---------------------------------------------------------------------------------------------
# padding never changes a result

@pytest.mark.parametrize("be", params_for("reinforce_loss_and_grad", "sequence_logprobs"))
@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
def test_padding_columns_and_rows_change_nothing(be, dt):
    rng = np.random.default_rng(3)
    p = lstm.init_params(7, 5, 6, rng, heads=("head", "value"), dtype=dt)
    tokens = rng.integers(0, 7, (3, 5))
    mask = (np.arange(5)[None, :] < np.array([5, 3, 2])[:, None]).astype(float)
    pl = np.array([1, 2, 1])
    reward = rng.standard_normal(3)
    rl = -np.abs(rng.standard_normal((3, 5)))
    tokens2 = np.concatenate([np.pad(tokens, ((0, 0), (0, 3))), np.zeros((2, 8), np.int64)])
    mask2 = np.concatenate([np.pad(mask, ((0, 0), (0, 3))), np.zeros((2, 8))])
    pl2 = np.concatenate([pl, [0, 0]])
    rl2 = np.concatenate([np.pad(rl, ((0, 0), (0, 3))), np.zeros((2, 8))])
    reward2 = np.concatenate([reward, [5.0, -5.0]])
    cfg = reinforce.ReinforceConfig(baseline="loo", whiten="population", entropy_coef=0.1, eps=0.2)
    o1, g1 = call(be, "reinforce_loss_and_grad", p, tokens, mask, pl, reward, cfg, ref_logp=rl)
    o2, g2 = call(be, "reinforce_loss_and_grad", p, tokens2, mask2, pl2, reward2, cfg, ref_logp=rl2)
    n = n_grad(5, 8, 5, 6, 7)
    close(o2["loss"], o1["loss"], dt, n, "loss with padding")
    close(o2["logp"][:3, :5], o1["logp"], dt, n, "logp with padding")
    for k in g1:
        close(g2[k], g1[k], dt, n, f"grad {k} with padding")
    lp1 = call(be, "sequence_logprobs", p, tokens, mask, pl)
    lp2 = call(be, "sequence_logprobs", p, tokens2, mask2, pl2)
    close(lp2[:3, :5], lp1, dt, n, "sequence_logprobs with padding")
    assert np.all(lp2[3:] == 0) and np.all(lp2[:, 5:] == 0)


# ---------------------------------------------------------------------------------------------
# larger shapes than Hypothesis draws, for every backend: row blocks on several threads, the
# small-matrix and BLAS products, rows ending early (EOS), a reference policy of another size

def _large_shapes(be):
    """(B, T, V, E, H) cases; small for cuda, whose simulator runs one OS thread per CUDA thread."""
    if getattr(be, "NAME", None) == "cuda":
        return [(9, 8, 7, 5, 6)]
    return [(16, 12, 33, 12, 20), (70, 6, 30, 10, 12)]


def _large_problem(B, T, V, E, H, dt, heads, seed):
    rng = np.random.default_rng(seed)
    p = cast(lstm.init_params(V, E, H, rng, heads=heads), dt)
    p["head.bias"][EOS] += 1.0                                        # rows of varied length
    pr = cast(lstm.init_params(V, E, H + 5, rng, heads=("head",)), dt)
    return p, cast(p, np.float64), pr, cast(pr, np.float64), rng


@pytest.mark.parametrize("be", BACKEND_PARAMS)
@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
def test_rollout_and_logprobs_larger_shapes(be, dt):
    for B, T, V, E, H in _large_shapes(be):
        p, p64, pr, pr64, rng = _large_problem(B, T, V, E, H, dt, ("head", "value"), seed=B + T)
        prompt = rng.integers(3, V, (B, T))
        pl = rng.integers(1, 4, B)
        u = rng.random((B, T))
        kw = dict(alpha=1.3, eps=0.15, kind="boltzmann", eos_id=EOS, values=True)
        ref = ref_rollout.rollout(p64, prompt, pl, u, ref_params=pr64, **kw)
        out = call(be, "rollout", p, prompt, pl, u, ref_params=pr, **kw)
        assert ref["action_mask"][:, -1].sum() < B, "no row ended early: raise the EOS bias"
        fwd, _ = model.forward(p64, ref["tokens"], ref["mask"])
        cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], kw["alpha"], kw["eps"])), axis=-1)
        n = n_forward(T, E, H + 5, V)
        zscale = kw["alpha"] * max(scale_of(fwd["scores"]),
                                   scale_of(model.forward(pr64, ref["tokens"], ref["mask"])[0]["scores"]))
        div = compare_sampled_tokens(out["tokens"], ref["tokens"], u, cdf, ref["action_mask"], dtype=dt, n=n)
        assert np.mean(div == T) > 0.8, f"{np.mean(div < T):.0%} of the rows diverge"
        for b in range(B):
            m = int(div[b])
            np.testing.assert_array_equal(out["mask"][b, :m], ref["mask"][b, :m])
            for k in ("logp", "ref_logp", "values"):
                close(out[k][b, :m], ref[k][b, :m], dt, n, f"rollout {k} row {b}",
                      scale=None if k == "values" else zscale)
        # teacher-forced log-probs of the reference's own rows
        lp = call(be, "sequence_logprobs", p, ref["tokens"], ref["mask"], pl, 1.3, 0.15)
        close(lp, reinforce.sequence_logprobs(p64, ref["tokens"], ref["mask"], pl, 1.3, 0.15), dt, n,
              "sequence_logprobs", scale=zscale)


@pytest.mark.parametrize("be", params_for("reinforce_loss_and_grad"))
@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
def test_reinforce_larger_shapes(be, dt):
    for B, T, V, E, H in _large_shapes(be):
        p, p64, pr, pr64, rng = _large_problem(B, T, V, E, H, dt, ("head", "value", "qvalue"), seed=B * T)
        tokens = rng.integers(3, V, (B, T))
        mask = (np.arange(T)[None, :] < rng.integers(2, T + 1, B)[:, None]).astype(np.float64)
        pl = np.ones(B, np.int64)
        reward = rng.standard_normal(B)
        n = n_grad(B, T, E, H + 5, V)
        for cfg in (reinforce.ReinforceConfig(entropy_coef=0.05, eps=0.2, gamma=0.9, kl="k3", aggregation="seq_mean"),
                    reinforce.ReinforceConfig(baseline="qvalue", alpha=1.7, returns="total", whiten="bessel")):
            ref_out, ref_g = reinforce.loss_and_grad(p64, tokens, mask, pl, reward, cfg, ref_params=pr64)
            out, g = call(be, "reinforce_loss_and_grad", p, tokens, mask, pl, reward, cfg, ref_params=pr)
            kappa = whitening_condition(ref_out, cfg)
            chain = max(scale_of(ref_out[k]) for k in ("logp", "ref_logp", "kl", "rewards", "returns", "baseline"))
            for k in OUT_KEYS + ("values", "qvalues"):
                sc = None
                if k in ("kl", "rewards", "returns", "baseline", "advantages", "loss_pg", "loss"):
                    sc = chain * (kappa if k in ("advantages", "loss_pg", "loss") else 1.0)
                close(out[k], ref_out[k], dt, n, f"reinforce {k}", scale=sc)
            gs = grad_scale(ref_g) * kappa
            for k in p:
                assert g[k].dtype == np.dtype(dt), k
                close(g[k], ref_g[k], dt, n, f"reinforce grad {k}", scale=gs)


@pytest.mark.parametrize("be", params_for("sft_loss_and_grad", "bt_loss_and_grad"))
@pytest.mark.parametrize("dt", DTYPES, ids=["float64", "float32"])
def test_sft_and_reward_model_larger_shapes(be, dt):
    for B, T, V, E, H in _large_shapes(be):
        p, p64, _, _, rng = _large_problem(B, T, V, E, H, dt, ("head",), seed=B + 2 * T)
        tokens = rng.integers(3, V, (B, T))
        mask = (np.arange(T)[None, :] < rng.integers(2, T + 1, B)[:, None]).astype(np.float64)
        n = n_grad(B, T, E, H, V)
        ref_out, ref_g = sft.loss_and_grad(p64, tokens, mask)
        out, g = call(be, "sft_loss_and_grad", p, tokens, mask)
        close(out["loss"], ref_out["loss"], dt, n, "sft loss")
        for k in p:
            close(g[k], ref_g[k], dt, n, f"sft grad {k}", scale=grad_scale(ref_g))

        rm = cast(lstm.init_params(V, E, H, rng, heads=("reward",)), dt)
        rm64 = cast(rm, np.float64)
        rej, rmask = np.roll(tokens, 1, axis=0)[:, : T - 2], np.roll(mask, 1, axis=0)[:, : T - 2]
        rmask[:, 0] = 1
        ref_out, ref_g = reward_model.bt_loss_and_grad(rm64, tokens, mask, rej, rmask)
        out, g = call(be, "bt_loss_and_grad", rm, tokens, mask, rej, rmask)
        n = n_grad(2 * B, T, E, H, 1)
        rs = max(scale_of(ref_out["reward_chosen"]), scale_of(ref_out["reward_rejected"]))
        for k in ("reward_chosen", "reward_rejected", "delta", "loss"):
            close(out[k], ref_out[k], dt, n, f"bt {k}", scale=rs if k == "delta" else None)
        _, cache = reward_model.forward(rm64, tokens, mask)
        gs = max(grad_scale(ref_g), grad_scale(reward_model.backward(np.full(B, 1.0 / B), cache)))
        for k in rm:
            close(g[k], ref_g[k], dt, n, f"bt grad {k}", scale=gs)
