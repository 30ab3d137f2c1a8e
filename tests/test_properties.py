"""Property tests (Hypothesis, small shapes): invariants that must hold for every input.

- probabilities sum to 1 (Boltzmann, ε-mixture, classic ε-greedy, greedy) and equal their definitions;
- α → large approaches ε-greedy when the maximum is unique, within the derived bound V·e^{−α·gap};
- Bradley–Terry: ln 2 at a tie, exact asymptotes at ±1000, L(Δ) − L(−Δ) = −Δ;
- padding columns and all-padding rows change no result (outputs, losses, gradients);
- recomputed log-probs equal the sampling log-probs to a few ulps; one seed is bit-identical;
- whitening is affine-invariant (up to its 1e-8, bounded below); a constant added to the reward leaves
  the loo/mean-baseline policy gradient unchanged;
- the LSTM's single step agrees with the sequence forward; the tokenizer round-trips.

Profiles (number of examples, determinism) come from tests/conftest.py; ``deadline=None`` is set
here too because an LSTM call can take milliseconds on a loaded machine.
"""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from _tol import assert_close, kernel_tol
from rlhf_ref import lstm, model, policy, reinforce, returns, reward_model, rollout, sft, tokenizer
from rlhf_ref.reinforce import ReinforceConfig as Cfg

FINITE = dict(allow_nan=False, allow_infinity=False, allow_subnormal=False)
SETTINGS = settings(deadline=None)


def scores(max_v=9, bound=20.0):
    return st.integers(2, max_v).flatmap(
        lambda V: hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.just(V)),
                             elements=st.floats(-bound, bound, **FINITE)))


# ---------------------------------------------------------------------------------------------
# the policy

@SETTINGS
@given(z=scores(), alpha=st.floats(0.05, 20.0), eps=st.sampled_from([0.0, 1e-6, 0.1, 0.5, 1.0]) | st.floats(0, 1))
def test_boltzmann_and_eps_mixture_are_distributions(z, alpha, eps):
    V = z.shape[-1]
    lq = policy.logprobs(z, alpha, eps)
    q = np.exp(lq)
    assert_close(q.sum(-1), np.ones(len(z)), n=V, name="Σ π_ε")
    # the definition, computed the plain way in float64: (1−ε)·softmax(α z) + ε/V
    e = np.exp(alpha * z - np.max(alpha * z, -1, keepdims=True))
    want = (1 - eps) * e / e.sum(-1, keepdims=True) + eps / V
    assert_close(q, want, n=V, name="π_ε")
    assert np.all(lq <= 0) and not np.any(np.isnan(lq))
    H = policy.entropy(lq)
    assert np.all(H >= -kernel_tol(np.float64, V)) and np.all(H <= np.log(V) + kernel_tol(np.float64, V))


@SETTINGS
@given(z=scores(bound=5.0), eps=st.floats(0, 1), tie=st.booleans())
def test_eps_greedy_and_greedy(z, eps, tie):
    V = z.shape[-1]
    z = np.round(z)                                          # integer scores: ties are frequent
    if tie:
        z[:, -1] = z.max(-1)                                 # a tie with a later index
    g = np.array([min(np.flatnonzero(row == row.max())) for row in z])   # argmax, ties to the lowest index
    q = np.exp(policy.logprobs(z, 1.0, eps, "eps_greedy"))
    want = np.full(z.shape, eps / V)
    want[np.arange(len(z)), g] += 1 - eps
    assert_close(q, want, n=2, name="ε-greedy")
    assert_close(q.sum(-1), np.ones(len(z)), n=V, name="Σ ε-greedy")
    qg = np.exp(policy.logprobs(z, 1.0, 0.0, "greedy"))
    assert np.array_equal(qg, (np.arange(V) == g[:, None]).astype(float))
    # greedy sampling picks the argmax for every u in [0, 1)
    for u in (0.0, 0.5, np.nextafter(1.0, 0.0)):
        assert np.array_equal(policy.sample(policy.logprobs(z, 1.0, 0.0, "greedy"), np.full(len(z), u)), g)


@SETTINGS
@given(z=scores(bound=3.0), eps=st.sampled_from([0.0, 0.2, 1.0]), gap=st.floats(0.05, 2.0))
def test_large_alpha_approaches_eps_greedy(z, eps, gap):
    """With a unique maximum ahead of the runner-up by ``gap``, every non-max Boltzmann probability is at
    most e^{−α·gap}, so |π_ε,α − q_ε-greedy| <= (1−ε)·(V−1)·e^{−α·gap} <= V·e^{−α·gap} entrywise."""
    V = z.shape[-1]
    z = z.copy()
    top = np.argmax(z, -1)
    z[np.arange(len(z)), top] = np.max(z, -1) + gap          # unique max by at least gap
    greedy = np.exp(policy.logprobs(z, 1.0, eps, "eps_greedy"))
    prev = None
    for alpha in (1.0, 10.0 / gap, 50.0 / gap, 1e6):
        q = np.exp(policy.logprobs(z, alpha, eps))
        err = np.max(np.abs(q - greedy))
        assert err <= V * math.exp(-alpha * gap) + kernel_tol(np.float64, V)
        if prev is not None:   # monotone in α: the largest error is the top entry's, (1−ε)(1 − π_max)
            assert err <= prev + kernel_tol(np.float64, V)
        prev = err
    assert np.all(np.isfinite(policy.logprobs(z, 1e6, eps)))
    # ... and it samples the same tokens away from the boundaries
    u = np.linspace(0.0, 0.999, len(z))
    assert np.array_equal(policy.sample(policy.logprobs(z, 1e6, eps), u),
                          policy.sample(policy.logprobs(z, 1.0, eps, "eps_greedy"), u))


# ---------------------------------------------------------------------------------------------
# Bradley–Terry

def test_bradley_terry_tie_and_asymptotes():
    assert reward_model.bt_loss(np.array(0.0)) == np.log(2.0)
    assert_close(reward_model.bt_loss(np.array([0.0, -0.0])), np.full(2, math.log(2)), name="ln 2")
    # asymptotes: L(Δ) → 0 (as e^{−Δ}) for Δ → +∞, L(Δ) → −Δ for Δ → −∞; e^{−1000} underflows to 0
    big = reward_model.bt_loss(np.array([1000.0, -1000.0, 40.0, -40.0]))
    assert np.all(np.isfinite(big))
    assert big[0] == 0.0 and big[1] == 1000.0
    assert_close(big[2:], np.array([math.exp(-40.0), 40.0 + math.exp(-40.0)]), n=2, scale=40.0, name="±40")


@SETTINGS
@given(delta=st.floats(-1000, 1000, **FINITE))
def test_bradley_terry_antisymmetry_and_exact_form(delta):
    d = np.array(delta)
    L, Lm = reward_model.bt_loss(d), reward_model.bt_loss(-d)
    # L(Δ) − L(−Δ) = −Δ; the two losses are as large as |Δ|, so the rounding scale is max(1, |Δ|)
    assert_close(L - Lm, -d, n=4, scale=max(1.0, abs(delta)), name="antisymmetry")
    # the overflow-free closed form max(−Δ, 0) + log1p(e^{−|Δ|})
    assert_close(L, max(-delta, 0.0) + math.log1p(math.exp(-abs(delta))), n=4, scale=max(1.0, abs(delta)))


def _rm_setup(seed):
    rng = np.random.default_rng(seed)
    p = lstm.init_params(6, 3, 4, rng, heads=("reward",))
    c = rng.integers(0, 6, (3, 5))
    r = rng.integers(0, 6, (3, 5))
    cm = (np.arange(5)[None, :] < np.array([5, 3, 2])[:, None]).astype(float)
    rm = (np.arange(5)[None, :] < np.array([4, 5, 1])[:, None]).astype(float)
    return p, c, cm, r, rm


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bradley_terry_at_margins_of_1000_through_the_model(sign):
    """Δ = r_c − r_r − m with m = ∓1000: the loss and gradient are finite and equal their asymptotes:
    at Δ ≈ +1000 both vanish; at Δ ≈ −1000 L = −mean Δ and ∇L = −mean ∇(r_c − r_r)."""
    p, c, cm, r, rm = _rm_setup(0)
    m = np.full(3, -sign * 1000.0)
    out, g = reward_model.bt_loss_and_grad(p, c, cm, r, rm, margin=m)
    assert np.isfinite(out["loss"]) and all(np.all(np.isfinite(v)) for v in g.values())
    if sign > 0:
        assert out["loss"] == 0.0 and all(not v.any() for v in g.values())
    else:
        assert_close(out["loss"], -np.mean(out["delta"]), n=4, scale=1000.0, name="L at −1000")
        r_c, cache_c = reward_model.forward(p, c, cm)
        r_r, cache_r = reward_model.forward(p, r, rm)
        gc = reward_model.backward(np.full(3, -1 / 3), cache_c)
        gr = reward_model.backward(np.full(3, 1 / 3), cache_r)
        for k in p:
            assert_close(g[k], gc[k] + gr[k], n=16, name=k)


def test_bradley_terry_tie_and_swap_through_the_model():
    p, c, cm, r, rm = _rm_setup(1)
    out, g = reward_model.bt_loss_and_grad(p, c, cm, c, cm)          # chosen == rejected
    assert out["loss"] == math.log(2.0) and all(not v.any() for v in g.values())
    o1, _ = reward_model.bt_loss_and_grad(p, c, cm, r, rm)
    o2, _ = reward_model.bt_loss_and_grad(p, r, rm, c, cm)
    assert_close(o1["loss"] - o2["loss"], -np.mean(o1["delta"]), n=8, name="swap")


# ---------------------------------------------------------------------------------------------
# padding

V, E, H = 6, 3, 4
RCFGS = [Cfg(), Cfg(alpha=1.5, eps=0.2, gamma=0.9, kl="k3", returns="total", baseline="loo", whiten="population",
                     aggregation="seq_mean", entropy_coef=0.1),
         Cfg(kl="k2", baseline="mean", whiten="bessel", shift_mean=False, aggregation="seq_sum", gamma=0.8),
         Cfg(baseline="qvalue", aggregation="seq_mean", entropy_coef=0.05, eps=0.3),
         Cfg(baseline="none", returns="total", gamma=0.7, aggregation="token_mean", whiten="population")]


@st.composite
def episode_batches(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(2, 5))
    lengths = draw(st.lists(st.integers(2, T), min_size=B, max_size=B))
    pl = [draw(st.integers(1, n - 1)) for n in lengths]               # every row has an action
    tokens = draw(hnp.arrays(np.int64, (B, T), elements=st.integers(0, V - 1)))
    mask = (np.arange(T)[None, :] < np.array(lengths)[:, None]).astype(float)
    extra_cols = draw(st.integers(0, 2))
    empty_at = draw(st.lists(st.integers(0, B), max_size=2))
    return tokens, mask, np.array(pl), extra_cols, sorted(empty_at)


def pad(tokens, mask, pl, extra_cols, empty_at, rng):
    """Add padding columns and all-padding rows (garbage ids in all padding: never read).
    Returns the padded batch and the index of the original rows in it."""
    B, T = tokens.shape
    tok = np.concatenate([tokens, rng.integers(-5, 50, (B, extra_cols))], 1)
    msk = np.concatenate([mask, np.zeros((B, extra_cols))], 1)
    tok = np.where(msk > 0, tok, rng.integers(-5, 50, tok.shape))
    rows, keep = [], []
    p_out = []
    j = 0
    for b in range(B + 1):
        for _ in range(empty_at.count(b)):
            rows.append((rng.integers(-5, 50, T + extra_cols), np.zeros(T + extra_cols)))
            p_out.append(int(rng.integers(0, T + extra_cols + 1)))   # any prompt_len on an empty row
            j += 1
        if b < B:
            rows.append((tok[b], msk[b]))
            p_out.append(int(pl[b]))
            keep.append(j)
            j += 1
    return (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), np.array(p_out),
            np.array(keep))


def net(seed, heads):
    p = lstm.init_params(V, E, H, np.random.default_rng(seed), heads=heads)
    return {k: v * 1.5 for k, v in p.items()}


@SETTINGS
@given(batch=episode_batches(), cfg=st.sampled_from(RCFGS), seed=st.integers(0, 2 ** 16))
def test_padding_changes_nothing(batch, cfg, seed):
    tokens, mask, pl, extra_cols, empty_at = batch
    rng = np.random.default_rng(seed)
    B, T = tokens.shape
    assume(cfg.baseline != "loo" or B >= 2)
    assume(cfg.whiten != "bessel" or (mask * (np.arange(T)[None, :] >= pl[:, None])).sum() >= 2)
    heads = ("head", "qvalue") if cfg.baseline == "qvalue" else ("head", "value")
    p, ref = net(seed, heads), net(seed + 1, ("head",))
    R = rng.normal(0, 1, B)
    tok2, mask2, pl2, keep = pad(tokens, mask, pl, extra_cols, empty_at, rng)
    R2 = rng.normal(0, 100, len(tok2))                     # rewards of empty rows are never used
    R2[keep] = R
    n = T * (E + H) + V + 2 * B * T                          # rounding steps: recurrence, head, batch sums

    def same(a, b, name, scale=1.0):
        assert_close(a, b, n=n, scale=scale, name=name)

    # the model: token-aligned outputs on the original rows/columns, exactly 0 on all padding
    o1, _ = model.forward(p, tokens, mask)
    o2, _ = model.forward(p, tok2, mask2)
    for k in o1:
        same(o2[k][keep][:, :T], o1[k], f"model {k}")
        pad_mask = np.ones(o2[k].shape[:2], bool)
        pad_mask[keep, :T] = mask == 0
        pad_mask[keep, :T] |= np.arange(T)[None, :] == 0
        assert not o2[k][pad_mask].any(), f"{k} is not 0 on padding"

    # REINFORCE: every per-token array, the losses and the gradients
    r1, g1 = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref)
    r2, g2 = reinforce.loss_and_grad(p, tok2, mask2, pl2, R2, cfg, ref_params=ref)
    for k, v in r1.items():
        if np.ndim(v) >= 2:
            w = r2[k][keep][:, :T]
            same(w, v, f"reinforce {k}", scale=max(1.0, float(np.max(np.abs(v)))))
        else:
            same(r2[k], v, f"reinforce {k}", scale=10.0)
    for k in p:
        same(g2[k], g1[k], f"reinforce grad {k}", scale=max(1.0, float(np.max(np.abs(g1[k])))))
    for k in ("logp", "advantages", "returns", "entropy", "kl", "rewards", "baseline", "weights"):
        extra = np.ones(r2[k].shape, bool)
        extra[keep, :T] = False
        assert not r2[k][extra].any(), f"{k} is not 0 on added padding"

    # sequence log-probs, SFT
    s1 = reinforce.sequence_logprobs(p, tokens, mask, pl, cfg.alpha, cfg.eps)
    s2 = reinforce.sequence_logprobs(p, tok2, mask2, pl2, cfg.alpha, cfg.eps)
    same(s2[keep][:, :T], s1, "sequence_logprobs")
    f1, h1 = sft.loss_and_grad(p, tokens, mask)
    f2, h2 = sft.loss_and_grad(p, tok2, mask2)
    same(f2["loss"], f1["loss"], "sft loss", scale=10.0)
    for k in p:
        same(h2[k], h1[k], f"sft grad {k}")


@SETTINGS
@given(batch=episode_batches(), seed=st.integers(0, 2 ** 16))
def test_padding_columns_change_no_reward(batch, seed):
    """The reward model reads the last real token: padding columns change nothing. (All-padding rows are
    rejected by the reward model with an error naming the row: a sequence with no token has no reward.)"""
    tokens, mask, _, extra_cols, _ = batch
    rng = np.random.default_rng(seed)
    p = net(seed, ("reward",))
    tok2, mask2, _, _ = pad(tokens, mask, np.ones(len(tokens), int), extra_cols + 1, [], rng)
    r1, _ = reward_model.forward(p, tokens, mask)
    r2, _ = reward_model.forward(p, tok2, mask2)
    assert_close(r2, r1, n=tokens.shape[1] * (E + H) + H, name="reward")
    o1, g1 = reward_model.bt_loss_and_grad(p, tokens, mask, tokens[::-1], mask[::-1])
    o2, g2 = reward_model.bt_loss_and_grad(p, tok2, mask2, tok2[::-1], mask2[::-1])
    assert_close(o2["loss"], o1["loss"], n=64, name="bt")
    for k in p:
        assert_close(g2[k], g1[k], n=64, name=f"bt grad {k}")
    empty = np.vstack([tokens, np.zeros((1, tokens.shape[1]), np.int64)])
    with pytest.raises(ValueError, match=f"tokens row {len(tokens)} is empty"):
        reward_model.forward(p, empty, np.vstack([mask, np.zeros((1, tokens.shape[1]))]))


def test_batch_of_only_padding_rows_and_prompts_is_an_error():
    """All-padding rows are accepted, but a batch with no action at all has no loss (docs/conventions.md §3)."""
    p, ref = net(0, ("head", "value")), net(1, ("head",))
    tokens = np.array([[1, 4, 0], [0, 0, 0]])
    mask = np.array([[1, 1, 0], [0, 0, 0]], float)
    with pytest.raises(ValueError, match="no action"):
        reinforce.loss_and_grad(p, tokens, mask, np.array([2, 0]), np.zeros(2), ref_params=ref)


# ---------------------------------------------------------------------------------------------
# sampling: recomputed log-probs, determinism

@st.composite
def rollout_problems(draw, kinds=("boltzmann", "eps_greedy", "greedy")):
    B, T = draw(st.integers(1, 4)), draw(st.integers(2, 7))
    kind = draw(st.sampled_from(kinds))
    alpha = draw(st.floats(0.2, 5.0)) if kind == "boltzmann" else 1.0
    eps = 0.0 if kind == "greedy" else draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    pl = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return B, T, kind, alpha, eps, np.array(pl), draw(st.integers(0, 2 ** 16))


def _rollout(seed, B, T, kind, alpha, eps, pl):
    rng = np.random.default_rng(seed)
    p = net(int(rng.integers(1 << 30)), ("head", "value"))
    ref = net(int(rng.integers(1 << 30)), ("head",))
    prompt = rng.integers(3, V, (B, T))
    prompt[:, 0] = tokenizer.BOS
    u = rng.random((B, T))
    return p, ref, rollout.rollout(p, prompt, pl, u, alpha, eps, kind, ref_params=ref, values=True)


@SETTINGS
@given(prob=rollout_problems())
def test_recomputed_logprobs_equal_sampling_logprobs(prob):
    B, T, kind, alpha, eps, pl, seed = prob
    p, ref, ro = _rollout(seed, B, T, kind, alpha, eps, pl)
    am = ro["action_mask"] > 0
    assert np.array_equal(ro["action_mask"], model.action_mask(ro["mask"], pl))
    if kind == "boltzmann":
        lp = reinforce.sequence_logprobs(p, ro["tokens"], ro["mask"], pl, alpha, eps)
        rl = reinforce.sequence_logprobs(ref, ro["tokens"], ro["mask"], pl, alpha, eps)
    else:                                                   # teacher-forced through the same policy kind
        def score(q):
            out, _ = model.forward(q, ro["tokens"], ro["mask"])
            lq = policy.logprobs(out["scores"], alpha, eps, kind)
            return np.where(am, np.take_along_axis(lq, ro["tokens"][:, :, None], -1)[:, :, 0], 0.0)
        lp, rl = score(p), score(ref)
    # "a few ulps": 4 ulps of max(|logp|, 1) (the log of a probability near 1 is only as exact as 1)
    for got, want, name in ((lp, ro["logp"], "logp"), (rl, ro["ref_logp"], "ref_logp")):
        fin = np.isfinite(want)
        assert np.array_equal(np.isneginf(got), np.isneginf(want)), name
        ulp = np.spacing(np.maximum(np.abs(want[fin]), 1.0))
        assert np.all(np.abs(got[fin] - want[fin]) <= 4 * ulp), name
    vals, _ = model.forward(p, ro["tokens"], ro["mask"])
    assert np.all(np.abs(vals["values"] - ro["values"]) <= 4 * np.spacing(np.maximum(np.abs(ro["values"]), 1.0)))
    # the row structure: a row ends after EOS (or at T); everything after is padding
    for b in range(B):
        n = int(ro["mask"][b].sum())
        acts = ro["tokens"][b, pl[b]:n]
        assert np.all(acts[:-1] != tokenizer.EOS)
        assert n == T or (len(acts) and acts[-1] == tokenizer.EOS)
        assert np.all(ro["tokens"][b, n:] == tokenizer.PAD) and not ro["logp"][b, n:].any()


@SETTINGS
@given(prob=rollout_problems(kinds=("boltzmann",)), cfg=st.sampled_from(RCFGS))
def test_one_seed_is_bit_identical(prob, cfg):
    B, T, kind, alpha, eps, pl, seed = prob
    cfg = Cfg(**{**cfg.to_dict(), "alpha": alpha, "eps": eps})

    def run():
        p, ref, ro = _rollout(seed, B, T, kind, alpha, eps, pl)
        if cfg.baseline == "qvalue":
            p = {**p, **{k: v for k, v in net(seed + 7, ("head", "qvalue")).items() if k.startswith("qvalue")}}
            p = {k: v for k, v in p.items() if not k.startswith("value")}
        R = np.random.default_rng(seed + 1).normal(size=B)
        try:
            out, g = reinforce.loss_and_grad(p, ro["tokens"], ro["mask"], pl, R, cfg, ref_logp=ro["ref_logp"])
        except ValueError as e:                  # no action in the batch, or loo with one row: same error twice
            return ro, str(e), None
        return ro, out, g

    a, b = run(), run()
    for k in a[0]:
        assert np.array_equal(a[0][k], b[0][k]), k
    if isinstance(a[1], str):
        assert a[1] == b[1]
        return
    for k in a[1]:
        assert np.array_equal(a[1][k], b[1][k], equal_nan=True), k
    for k in a[2]:
        assert np.array_equal(a[2][k], b[2][k]), k


# ---------------------------------------------------------------------------------------------
# whitening and constant rewards

@st.composite
def advantages(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    A = draw(hnp.arrays(np.float64, (B, T), elements=st.floats(-10, 10, **FINITE)))
    m = draw(hnp.arrays(np.bool_, (B, T)))
    assume(m.sum() >= 2)
    assume(np.var(A[m]) >= 1e-2)
    return A * m, m.astype(float)


@SETTINGS
@given(am=advantages(), a=st.floats(0.5, 2.0) | st.floats(-2.0, -0.5), c=st.floats(-100, 100, **FINITE),
       kind=st.sampled_from(["population", "bessel"]))
def test_whitening_is_affine_invariant(am, a, c, kind):
    """whiten(a·A + c) = sign(a)·whiten(A), except for the 1e-8 inside the root: the exact ratio is
    sqrt((σ² + 1e-8)/(σ² + 1e-8/a²)), whose relative deviation from 1 is at most ½·1e-8·|1 − 1/a²|/σ².
    With σ² >= 1e-2 and |a| in [0.5, 2] that is <= 1.5e-6; this bound is the rtol, plus rounding
    (n = 4 ops per entry on values of size |c| + |a|·10)."""
    A, m = am
    w = returns.whiten(A, m, kind)
    w2 = returns.whiten(np.where(m > 0, a * A + c, 0.0), m, kind)
    var = np.var(A[m > 0], ddof=1 if kind == "bessel" else 0)
    rtol = 0.5 * 1e-8 * abs(1 - 1 / a ** 2) / var
    tol = kernel_tol(np.float64, 4 + int(m.sum())) * (abs(c) + 10 * abs(a) + 1) / np.sqrt(var * a * a)
    assert_close(w2, np.sign(a) * w, atol=tol, rtol=rtol + tol, name="whiten")   # derived above
    assert_close(w[m > 0].mean(), 0.0, atol=tol, name="mean 0")
    # shift_mean=False adds the raw mean back
    w3 = returns.whiten(A, m, kind, shift_mean=False)
    assert_close(w3, np.where(m > 0, w + A[m > 0].mean(), 0.0), n=4, scale=10.0, name="shift_mean=False")


@SETTINGS
@given(seed=st.integers(0, 2 ** 16), c=st.floats(-50, 50, **FINITE), baseline=st.sampled_from(["loo", "mean"]),
       ret=st.sampled_from(["rtg", "total"]), whiten=st.sampled_from(["off", "population"]))
def test_constant_reward_shift_leaves_the_policy_gradient_unchanged(seed, c, baseline, ret, whiten):
    """At γ = 1 every return of the batch moves by c, and so does the loo (or mean) baseline: A, hence
    the policy-gradient and entropy terms, are unchanged. (The value loss does move: it regresses on G.)"""
    rng = np.random.default_rng(seed)
    p, ref = net(seed, ("head", "value")), net(seed + 1, ("head",))
    B, T = 3, 6
    tokens = rng.integers(0, V, (B, T))
    mask = (np.arange(T)[None, :] < np.array([6, 4, 3])[:, None]).astype(float)
    pl = np.array([1, 2, 1])
    R = rng.normal(0, 1, B)
    cfg = Cfg(beta=0.1, baseline=baseline, returns=ret, whiten=whiten, entropy_coef=0.05, value_coef=0.0,
              aggregation="seq_sum")
    o1, g1 = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref)
    o2, g2 = reinforce.loss_and_grad(p, tokens, mask, pl, R + c, cfg, ref_params=ref)
    scale = 1.0 + abs(c) + float(np.max(np.abs(o1["returns"])))   # A = (G + c) − (b + c): rounding of size |G| + |c|
    assert_close(o2["advantages"], o1["advantages"], n=2 * B * T, scale=scale, name="A")
    for k in p:
        assert_close(g2[k], g1[k], n=2 * B * T + T * (E + H), scale=scale, name=f"grad {k}")


# ---------------------------------------------------------------------------------------------
# the LSTM step, the tokenizer

@SETTINGS
@given(seed=st.integers(0, 2 ** 16), B=st.integers(1, 4), T=st.integers(1, 6))
def test_lstm_step_agrees_with_sequence_forward(seed, B, T):
    rng = np.random.default_rng(seed)
    p = net(seed, ())
    tokens = rng.integers(0, V, (B, T))
    hs, cache = lstm.forward(p, tokens, np.ones((B, T)))
    h, c = np.zeros((B, H)), np.zeros((B, H))
    for t in range(T):
        h, c = lstm.step(p, tokens[:, t], h, c)
        assert_close(h, hs[:, t], n=(t + 1) * (E + H), name=f"h_{t}")
    hf, cf = lstm.final_state(cache)
    assert_close(h, hf, n=T * (E + H), name="h_final")
    assert_close(c, cf, n=T * (E + H), name="c_final")


CHARS = "abc xyz.,!?é"


@SETTINGS
@given(text=st.text(alphabet=CHARS, max_size=30), eos=st.booleans())
def test_tokenizer_round_trip(text, eos):
    v = tokenizer.Vocab(CHARS)
    ids = v.encode(text, eos=eos)
    assert ids.dtype == np.int64 and ids[0] == tokenizer.BOS and len(ids) == len(text) + 1 + eos
    assert v.decode(ids) == text
    assert np.all((ids >= 0) & (ids < len(v)))
    assert tokenizer.Vocab.from_json(v.to_json()) == v
    # decoding stops at EOS and skips PAD; pad_batch right-pads with PAD and a prefix mask
    toks, mask = tokenizer.pad_batch([ids, v.encode(text[::-1])], pad_to=len(text) + 3)
    assert v.decode(toks[0]) == text and v.decode(toks[1]) == text[::-1]
    assert np.array_equal(mask.sum(1), [len(ids), len(text) + 1])
    assert v.decode(np.concatenate([v.encode(text, eos=True), v.encode("zzz", bos=False)])) == text


@SETTINGS
@given(text=st.text(alphabet=CHARS + "QW", max_size=20))
def test_tokenizer_unknown_characters(text):
    v = tokenizer.Vocab(CHARS)
    unknown = [i for i, ch in enumerate(text) if ch not in CHARS]
    if unknown:
        with pytest.raises(ValueError, match=f"at position {unknown[0]} of text is not in the vocabulary"):
            v.encode(text)
    ids = v.encode(text, errors="replace")
    assert [i - 1 for i in np.flatnonzero(ids == tokenizer.UNK)] == unknown
    assert v.decode(ids) == "".join("\ufffd" if ch not in CHARS else ch for ch in text)


# ---------------------------------------------------------------------------------------------
# the zeros of docs/conventions.md §2, the reference policy at equal parameters, sampling at the CDF's end

PER_ACTION = ("action_mask", "logp", "ref_logp", "entropy", "kl", "rewards", "returns", "baseline", "advantages",
              "weights")
PER_POSITION = ("scores", "logq", "values", "qvalues")


@SETTINGS
@given(batch=episode_batches(), cfg=st.sampled_from(RCFGS), seed=st.integers(0, 2 ** 16))
def test_outputs_are_exactly_zero_where_the_design_says(batch, cfg, seed):
    """Every per-action array holds exactly 0 where action_mask is 0; every per-position array (scores,
    next-token log-probs, values, Q) holds exactly 0 where mask is 0 (and, being read from h_{t−1}, in
    column 0, which is never an action)."""
    tokens, mask, pl, extra_cols, empty_at = batch
    rng = np.random.default_rng(seed)
    tokens, mask, pl, _ = pad(tokens, mask, pl, extra_cols, empty_at, rng)
    assume(cfg.baseline != "loo" or np.count_nonzero((model.action_mask(mask, pl)).sum(1)) >= 2)
    assume(cfg.whiten != "bessel" or model.action_mask(mask, pl).sum() >= 2)
    heads = ("head", "qvalue") if cfg.baseline == "qvalue" else ("head", "value")
    p, ref = net(seed, heads), net(seed + 1, ("head",))
    out, _ = reinforce.loss_and_grad(p, tokens, mask, pl, rng.normal(size=len(tokens)), cfg, ref_params=ref)
    am = model.action_mask(mask, pl) > 0
    pm = model.position_mask(mask) > 0
    assert set(PER_ACTION) <= set(out) and {"scores", "logq"} <= set(out)
    for k in PER_ACTION:
        assert not out[k][~am].any(), f"{k} is not 0 off the action mask"
    for k in PER_POSITION:
        if k in out:
            assert not out[k][~pm].any(), f"{k} is not 0 on padding / column 0"


@SETTINGS
@given(prob=rollout_problems(kinds=("boltzmann",)), cfg=st.sampled_from(RCFGS))
def test_reference_policy_equal_to_the_policy_gives_kl_exactly_zero(prob, cfg):
    B, T, kind, alpha, eps, pl, seed = prob
    rng = np.random.default_rng(seed)
    cfg = Cfg(**{**cfg.to_dict(), "alpha": alpha, "eps": eps})
    heads = ("head", "qvalue") if cfg.baseline == "qvalue" else ("head", "value")
    p = net(seed, heads)
    tokens = rng.integers(0, V, (B, T))
    mask = np.ones((B, T))
    assume(model.action_mask(mask, pl).sum() >= 2 and (cfg.baseline != "loo" or
                                                        np.count_nonzero(model.action_mask(mask, pl).sum(1)) >= 2))
    ref = {k: v.copy() for k, v in p.items() if k.startswith(("embedding", "lstm", "head"))}
    out, _ = reinforce.loss_and_grad(p, tokens, mask, pl, rng.normal(size=B), cfg, ref_params=ref)
    assert not out["kl"].any()
    assert np.array_equal(out["logp"], out["ref_logp"])


def test_entropy_of_greedy_and_eps_greedy():
    """0·log 0 = 0: greedy has entropy exactly 0; ε-greedy has the entropy of its two probability levels."""
    z = np.array([[0.3, 2.0, -1.0, 2.0, 0.5]])
    Vz = z.shape[1]
    assert policy.entropy(policy.logprobs(z, 1.0, 0.0, "greedy"))[0] == 0.0
    for eps in (0.1, 0.5, 1.0):
        hi, lo = 1 - eps + eps / Vz, eps / Vz
        want = -hi * np.log(hi) - (Vz - 1) * lo * np.log(lo)
        assert_close(policy.entropy(policy.logprobs(z, 1.0, eps, "eps_greedy")), np.array([want]), n=Vz, name=f"H ε={eps}")
    assert_close(policy.entropy(policy.logprobs(np.zeros((1, Vz)))), np.array([np.log(Vz)]), n=Vz, name="uniform")


def test_sample_at_the_end_of_a_cdf_that_rounds_below_one():
    """docs/conventions.md §4: if rounding leaves u >= cdf_{V−1}, the pick is the last token with q > 0."""
    q = np.array([[0.5, 0.5 - 1e-12, 0.0, 0.0]])
    u = np.array([1.0 - 1e-13])
    with np.errstate(divide="ignore"):
        logq = np.log(q)
    assert policy.sample(logq, u)[0] == 1
    # and the boundary itself: a = #{k : cdf_k <= u}, so u = cdf_0 exactly picks token 1
    assert policy.sample(np.log(np.array([[0.5, 0.5]])), np.array([0.5]))[0] == 1
    assert policy.sample(np.log(np.array([[0.5, 0.5]])), np.array([np.nextafter(0.5, 0)]))[0] == 0
