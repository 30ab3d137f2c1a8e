"""Exact-enumeration tests (rlhf_ref/exact.py) and a Monte-Carlo test of the sampled estimator.

The targets are computed here independently of exact.py and reinforce.py: the responses are listed
by a recursion of this file, the objective E[Σ_j γ^j r_j] (at γ = 1: J − β·KL) is summed over them
from the token log-probs (reinforce.sequence_logprobs, itself cross-checked against PyTorch), and
its gradient is a central difference of that sum (tests/_tol.py). The exact expectation of the
REINFORCE estimator (exact.expected_estimator, which enumerates batches and calls
reinforce.loss_and_grad) must equal it for the unbiased conventions of docs/conventions.md §3, and must
differ from it, by the stated amount where a formula exists, for the biased ones.
"""

import itertools
from statistics import NormalDist

import numpy as np
import pytest

from _tol import assert_close, compare_gradients, kernel_tol, numerical_gradient
from rlhf_ref import exact, lstm, model, policy, reinforce, returns, rollout
from rlhf_ref.reinforce import ReinforceConfig as Cfg
from rlhf_ref.tokenizer import EOS

E, H = 3, 3


def prompt_for(V):
    """BOS, then one token: two LSTM steps before the first action. (Id 0 is PAD to the tokenizer,
    but to the model every id is a token; only the mask says what is padding.)"""
    return (1, 3) if V > 3 else (1, 0)


def make(V, seed=0, heads=("head", "value")):
    rng = np.random.default_rng(seed)
    p = lstm.init_params(V, E, H, rng, heads=heads)
    p = {k: v * (1.0 if k == "embedding.weight" else 2.0) for k, v in p.items()}   # a far-from-uniform policy
    ref = lstm.init_params(V, E, H, np.random.default_rng(seed + 1000), heads=("head",))
    ref = {k: v * 2.0 for k, v in ref.items()}
    return p, ref


def reward_fn(y):
    """A reward that depends on content, length and termination."""
    return float(sum(1.0 for a in y if a == 3 or a == 0) - 0.4 * len(y) + 0.8 * (y[-1] == EOS))


def my_responses(V, L, eos=EOS):
    """Every response by recursion: stop at the first EOS, or after L tokens."""
    out = []

    def rec(prefix):
        for a in range(V):
            y = prefix + (a,)
            if a == eos or len(y) == L:
                out.append(y)
            else:
                rec(y)
    rec(())
    return out


def my_batch(ys, L, PROMPT):
    T = len(PROMPT) + L
    tokens = np.zeros((len(ys), T), np.int64)
    mask = np.zeros((len(ys), T))
    for i, y in enumerate(ys):
        s = PROMPT + y
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1.0
    return tokens, mask, np.full(len(ys), len(PROMPT))


class Problem:
    """The enumeration of one (V, L) problem and the objectives written from docs/conventions.md §3."""

    def __init__(self, V, L, alpha=1.0, eps=0.0, seed=0, heads=("head", "value")):
        self.V, self.L, self.alpha, self.eps = V, L, alpha, eps
        self.p, self.ref = make(V, seed, heads)
        self.ys = my_responses(V, L)
        self.prompt = prompt_for(V)
        self.tokens, self.mask, self.pl = my_batch(self.ys, L, self.prompt)
        self.R = np.array([reward_fn(y) for y in self.ys])
        self.ref_lp = reinforce.sequence_logprobs(self.ref, self.tokens, self.mask, self.pl, alpha, eps)
        self.am = model.action_mask(self.mask, self.pl) > 0

    def token_logp(self, p):
        return reinforce.sequence_logprobs(p, self.tokens, self.mask, self.pl, self.alpha, self.eps)

    def probs(self, p):
        return np.exp(self.token_logp(p).sum(1))

    def discounted(self, p, gamma, beta, length_normalised=False):
        """E_y[Σ_j γ^j r_j] with r_j = −β·k1_j (+ R at the last action), k1 at θ = p (not frozen)."""
        lp = self.token_logp(p)
        x = np.where(self.am, lp - self.ref_lp, 0.0)
        total = np.zeros(len(self.ys))
        for i, y in enumerate(self.ys):
            acts = np.flatnonzero(self.am[i])
            r = -beta * x[i, acts]
            r[-1] += self.R[i]
            total[i] = sum(gamma ** j * r[j] for j in range(len(acts)))
            if length_normalised:
                total[i] /= len(acts)
        return float(np.exp(lp.sum(1)) @ total)

    def grad(self, f):
        g = numerical_gradient(f, self.p)
        return g

    def expected(self, cfg, batch_size=1):
        return exact.expected_estimator(self.p, self.ref, self.prompt, self.L, lambda y: reward_fn(y), cfg,
                                        batch_size=batch_size)


def neg(g):
    return {k: -v for k, v in g.items()}


def max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in b)


def assert_same_exact_sums(got, want, n_terms, name):
    """Two exact expectations that must agree up to rounding: each is a sum of ``n_terms`` products
    (probability × gradient over T positions), so the tolerance is kernel_tol(float64, n_terms·T)
    scaled by the gradient's magnitude."""
    for k in want:
        assert_close(got[k], want[k], n=n_terms * 8, scale=max(1.0, float(np.max(np.abs(want[k])))), name=f"{name} {k}")


def gnorm(g):
    return float(np.sqrt(sum(np.sum(v * v) for v in g.values())))


# ---------------------------------------------------------------------------------------------
# the enumeration itself

@pytest.mark.parametrize("V,L", [(3, 1), (3, 3), (4, 3), (5, 2)])
def test_enumeration_lists_every_response_once(V, L):
    ys = exact.enumerate_responses(V, L)
    assert len(ys) == len(set(ys)) == exact.count_responses(V, L)
    assert set(ys) == set(my_responses(V, L))
    assert exact.count_responses(V, L) == sum((V - 1) ** (k - 1) for k in range(1, L + 1)) + (V - 1) ** L


@pytest.mark.parametrize("alpha,eps", [(1.0, 0.0), (2.0, 0.0), (0.7, 0.3), (1.5, 1.0)])
def test_probabilities_sum_to_one_and_J_KL(alpha, eps):
    pr = Problem(4, 3, alpha, eps)
    ex = exact.exact_objective(pr.p, pr.ref, pr.prompt, 3, reward_fn, alpha, eps)
    p = pr.probs(pr.p)
    n = len(pr.ys)
    assert_close(p.sum(), 1.0, n=n * 3, name="Σ p(y)")
    # exact.py orders the responses differently: compare through a dict
    mine = dict(zip(pr.ys, p))
    assert_close(ex["probs"], np.array([mine[y] for y in ex["responses"]]), n=3 * 3, name="p(y)")
    assert_close(ex["J"], float(p @ pr.R), n=n, scale=3.0, name="J")          # scale: |R| <= 3
    # KL by the chain rule, an independent formula: KL(p‖p_ref) = E_y[Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))]
    fwd, _ = model.forward(pr.p, pr.tokens, pr.mask)
    rfwd, _ = model.forward(pr.ref, pr.tokens, pr.mask)
    lq, lr = policy.logprobs(fwd["scores"], alpha, eps), policy.logprobs(rfwd["scores"], alpha, eps)
    step_kl = np.sum(np.exp(lq) * (lq - lr), -1)                           # (N, T)
    kl_chain = float(p @ np.where(pr.am, step_kl, 0.0).sum(1))
    assert_close(ex["KL"], kl_chain, n=n * 3 * 4, name="KL")
    if eps < 1:
        assert ex["KL"] > 1e-2                                            # not vacuous
    # ∇J and ∇KL against central differences of the enumerated sums
    gJ = numerical_gradient(lambda q: float(pr.probs(q) @ pr.R), pr.p)
    gKL = numerical_gradient(lambda q: float(pr.probs(q) @ (pr.token_logp(q).sum(1) - pr.ref_lp.sum(1))), pr.p)
    compare_gradients(ex["grad_J"], gJ, name="grad J")
    compare_gradients(ex["grad_KL"], gKL, name="grad KL")


def test_kl_estimators_expectations_and_signs():
    pr = Problem(4, 3, 1.3, 0.1)
    cfg = Cfg(alpha=1.3, eps=0.1)
    acc = pr.expected(cfg)
    KL = acc["exact"]["KL"]
    n = len(pr.ys)
    assert KL > 1e-2
    assert_close(acc["kl_seq"]["k1"], KL, n=n * 3, name="E[Σ k1]")
    assert_close(acc["kl_seq"]["k3"], KL, n=n * 3 * 4, name="E[Σ k3]")
    # k2 is biased: E[Σ k2] is a different number (for this problem)
    assert abs(acc["kl_seq"]["k2"] - KL) > 1e-3
    # k2, k3 >= 0 at every token of every response, via the reference's own function
    lp = pr.token_logp(pr.p)
    for est in ("k2", "k3"):
        k = returns.kl_per_token(lp, pr.ref_lp, pr.am.astype(float), est)
        assert np.all(k >= 0), est
    k1 = returns.kl_per_token(lp, pr.ref_lp, pr.am.astype(float), "k1")
    assert np.any(k1 < 0)                                  # k1 can be negative, as documented


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_k3_is_nonnegative_and_accurate_near_zero(dtype):
    """expm1, never exp(−x) − 1: k3(x) = x²/2 − x³/6 + … keeps full relative accuracy at tiny x, and
    k3 >= 0 holds in floating point at every x (a correctly rounded expm1(−x) never passes −x)."""
    top = 2 if dtype == np.float64 else 1.5              # e^{|x|} stays finite in the dtype
    x = np.concatenate([-np.logspace(-12, top, 300), [0.0], np.logspace(-12, top, 300)]).astype(dtype)
    lp, zero = x[None, :], np.zeros((1, x.size), dtype)
    k3 = returns.kl_per_token(lp, zero, np.ones((1, x.size)), "k3")[0]
    assert np.all(k3 >= 0)
    small = np.abs(x) < 1e-3
    xs = x[small].astype(np.float64)
    series = xs ** 2 / 2 - xs ** 3 / 6 + xs ** 4 / 24                     # truncation error < x⁵/120
    assert_close(k3[small], series, dtype, n=4, name="k3 near 0")


# ---------------------------------------------------------------------------------------------
# the unbiased conventions: E[−∇L_pg] = ∇E[Σ_j γ^j r_j]  (γ = 1: ∇(J − β·KL))

UNBIASED = [
    # (baseline, returns, gamma, batch_size, alpha, eps, beta)
    ("value", "rtg", 1.0, 1, 1.0, 0.0, 0.2),
    ("value", "total", 1.0, 1, 1.5, 0.2, 0.2),
    ("qvalue", "rtg", 1.0, 1, 0.8, 0.1, 0.3),
    ("qvalue", "total", 0.8, 1, 1.0, 0.0, 0.2),
    ("none", "rtg", 1.0, 1, 1.0, 0.0, 0.5),
    ("none", "total", 1.0, 1, 1.0, 0.0, 0.0),
    ("none", "total", 0.7, 1, 1.2, 0.05, 0.3),
    ("value", "total", 0.5, 1, 1.0, 0.0, 0.1),
    ("loo", "rtg", 1.0, 2, 1.0, 0.0, 0.2),
    ("loo", "total", 0.8, 2, 1.0, 0.1, 0.2),
]


@pytest.mark.parametrize("baseline,ret,gamma,bs,alpha,eps,beta", UNBIASED,
                         ids=[f"{b}-{r}-g{g}-B{n}-a{a}-e{e}-b{be}" for b, r, g, n, a, e, be in UNBIASED])
def test_expected_gradient_is_unbiased(baseline, ret, gamma, bs, alpha, eps, beta):
    V, L = (3, 3) if bs == 2 else (4, 3)
    heads = ("head", "qvalue") if baseline == "qvalue" else ("head", "value")
    pr = Problem(V, L, alpha, eps, seed=30 + [u[:4] for u in UNBIASED].index((baseline, ret, gamma, bs)), heads=heads)
    cfg = Cfg(alpha=alpha, eps=eps, gamma=gamma, beta=beta, kl="k1", returns=ret, baseline=baseline,
              whiten="off", aggregation="seq_sum", entropy_coef=0.0)
    acc = pr.expected(cfg, bs)
    target = pr.grad(lambda q: pr.discounted(q, gamma, beta))
    got = neg(acc["terms"]["pg"])
    compare_gradients(got, target, name="E[−∇L_pg] vs ∇E[Σγ^j r_j]")
    assert gnorm(target) > 1e-2                                            # not vacuous
    if gamma == 1.0:
        ex = acc["exact"]
        jkl = {k: ex["grad_J"][k] - beta * ex["grad_KL"][k] for k in pr.p}
        assert_same_exact_sums(got, jkl, len(pr.ys) ** bs, "E[−∇L_pg] vs ∇J − β∇KL")


def test_beta_zero_makes_any_kl_estimator_unbiased():
    pr = Problem(4, 3, seed=5)
    target = pr.grad(lambda q: pr.discounted(q, 1.0, 0.0))
    for kl in ("k2", "k3"):
        acc = pr.expected(Cfg(beta=0.0, kl=kl, aggregation="seq_sum", baseline="value"))
        compare_gradients(neg(acc["terms"]["pg"]), target, name=f"β=0 {kl}")


# ---------------------------------------------------------------------------------------------
# the biased conventions: the bias is stated, and matched to its formula where one exists

def test_token_mean_optimises_the_length_normalised_return():
    """B = 1, token_mean: L_pg = −(1/n)Σ_t A logπ, so with β = 0 and total returns E[−∇L_pg] is the
    gradient of E[R(y)/|y|], not of E[R(y)]: the bias is a reward divided by the response length."""
    pr = Problem(4, 3, seed=7)
    cfg = Cfg(beta=0.0, returns="total", baseline="none", aggregation="token_mean")
    got = neg(pr.expected(cfg)["terms"]["pg"])
    unbiased = pr.grad(lambda q: pr.discounted(q, 1.0, 0.0))
    normalised = pr.grad(lambda q: pr.discounted(q, 1.0, 0.0, length_normalised=True))
    compare_gradients(got, normalised, name="token_mean = ∇E[R/|y|]")
    assert max_diff(got, unbiased) > 1e-2 * gnorm(unbiased)                # and that is not ∇J
    # with seq_sum the same estimator is unbiased (lengths vary: 1, 2 or 3)
    got_sum = neg(pr.expected(cfg.__class__(**{**cfg.to_dict(), "aggregation": "seq_sum"}))["terms"]["pg"])
    compare_gradients(got_sum, unbiased, name="seq_sum")


def test_reward_to_go_with_discount_is_biased():
    pr = Problem(4, 3, seed=8)
    gamma, beta = 0.6, 0.2
    target = pr.grad(lambda q: pr.discounted(q, gamma, beta))
    rtg = neg(pr.expected(Cfg(gamma=gamma, beta=beta, returns="rtg", aggregation="seq_sum"))["terms"]["pg"])
    total = neg(pr.expected(Cfg(gamma=gamma, beta=beta, returns="total", aggregation="seq_sum"))["terms"]["pg"])
    compare_gradients(total, target, name="total returns at γ<1")
    assert max_diff(rtg, target) > 1e-2 * gnorm(target)


def test_k3_in_the_reward_is_biased_by_beta_times_E_grad_k3():
    """With k3 in the reward, E[Σ_t G_t ∇logπ_t] = ∇J − β·E[Σk3·∇log p(y)]. Since E_θ[Σk3_θ] = KL(θ)
    for every θ, ∇KL = E[Σk3 ∇log p] + E[Σ_t ∇k3_t], so the estimator's expectation is
    ∇(J − β·KL) + β·E_{y~p}[Σ_t ∇_θ k3_t(y)]: a bias of β times the expected pathwise gradient of k3."""
    pr = Problem(4, 3, seed=9)
    beta = 0.5
    got = neg(pr.expected(Cfg(beta=beta, kl="k3", aggregation="seq_sum"))["terms"]["pg"])
    unbiased = pr.grad(lambda q: pr.discounted(q, 1.0, beta))
    p0 = pr.probs(pr.p)                                               # p(y) frozen at θ

    def expected_k3_frozen(q):
        x = np.where(pr.am, pr.token_logp(q) - pr.ref_lp, 0.0)
        return float(p0 @ np.where(pr.am, np.expm1(-x) + x, 0.0).sum(1))

    path = pr.grad(expected_k3_frozen)
    compare_gradients(got, {k: unbiased[k] + beta * path[k] for k in pr.p}, name="k3 bias formula")
    assert max_diff(got, unbiased) > 1e-2 * gnorm(unbiased)


@pytest.mark.parametrize("B", [2, 3])
def test_mean_baseline_scales_by_one_minus_one_over_B_with_equal_lengths(B):
    """Every response has length 1 (L = 1): the mean baseline includes the row itself, so
    E[ĝ_mean] = (1 − 1/B)·E[ĝ_unbiased] exactly."""
    pr = Problem(4, 1, seed=10)
    base = dict(beta=0.3, aggregation="seq_sum", returns="total")
    unbiased = neg(pr.expected(Cfg(baseline="none", **base))["terms"]["pg"])
    target = pr.grad(lambda q: pr.discounted(q, 1.0, 0.3))
    compare_gradients(unbiased, target, name="none, L=1")
    got = neg(pr.expected(Cfg(baseline="mean", **base), B)["terms"]["pg"])
    scaled = {k: (1 - 1 / B) * v for k, v in unbiased.items()}
    assert_same_exact_sums(got, scaled, len(pr.ys) ** B, f"mean baseline = (1 − 1/{B})·unbiased")
    assert max_diff(got, unbiased) > 1e-2 * gnorm(unbiased)


def test_mean_baseline_with_variable_lengths_also_turns_the_gradient():
    pr = Problem(3, 2, seed=11)
    base = dict(beta=0.3, aggregation="seq_sum", returns="total")
    unbiased = neg(pr.expected(Cfg(baseline="none", **base))["terms"]["pg"])
    got = neg(pr.expected(Cfg(baseline="mean", **base), 2)["terms"]["pg"])
    u = np.concatenate([unbiased[k].ravel() for k in pr.p])
    g = np.concatenate([got[k].ravel() for k in pr.p])
    # not a multiple of the unbiased gradient: the residual of the best scaling is far from 0
    c = (g @ u) / (u @ u)
    assert np.linalg.norm(g - c * u) > 1e-2 * np.linalg.norm(g)


@pytest.mark.parametrize("kind", ["population", "bessel"])
def test_whitening_is_biased(kind):
    pr = Problem(3, 3, seed=12)
    cfg = Cfg(beta=0.2, baseline="loo", aggregation="seq_sum", whiten=kind)
    target = pr.grad(lambda q: pr.discounted(q, 1.0, 0.2))
    got = neg(pr.expected(cfg, 2)["terms"]["pg"])
    unwhitened = neg(pr.expected(Cfg(beta=0.2, baseline="loo", aggregation="seq_sum"), 2)["terms"]["pg"])
    compare_gradients(unwhitened, target, name="loo, no whitening")
    assert max_diff(got, target) > 1e-2 * gnorm(target)


# ---------------------------------------------------------------------------------------------
# issue 9: ppo_clip at ratio 1, the group baselines, GAE at λ = 1, the KL term in the loss

def log_mix(scores, alpha, eps):
    """log π_ε(·|s) = log((1−ε)·softmax(α z) + ε/V), written out (not policy.logprobs)."""
    a = alpha * scores
    e = np.exp(a - a.max(-1, keepdims=True))
    return np.log((1 - eps) * e / e.sum(-1, keepdims=True) + eps / scores.shape[-1])


def with_(cfg, **kw):
    return Cfg(**{**cfg.to_dict(), **kw})


PPO_AT_ONE = [
    # (baseline, returns, aggregation, whiten, batch size)
    ("value", "rtg", "seq_sum", "off", 1),
    ("qvalue", "total", "token_mean", "off", 1),
    ("none", "rtg", "seq_mean", "off", 1),
    ("value", "gae", "fixed_len", "off", 1),
    ("loo", "total", "seq_sum", "population", 2),
    ("mean", "rtg", "token_mean", "off", 2),
    ("group_loo", "rtg", "seq_sum", "off", 2),
    ("group_mean", "total", "seq_sum", "bessel", 2),
]


@pytest.mark.parametrize("bl,ret,agg,wh,bs", PPO_AT_ONE, ids=[f"{b}-{r}-{a}-{w}-B{n}" for b, r, a, w, n in PPO_AT_ONE])
def test_ppo_clip_at_ratio_one_is_reinforce(bl, ret, agg, wh, bs):
    """old_logp = log π_θ: ρ = 1, both branches of the min tie, the gradient is −w·A·∇log π, batch by
    batch (bit for bit) and so in expectation: every unbiasedness result carries over."""
    heads = ("head", "qvalue") if bl == "qvalue" else ("head", "value")
    pr = Problem(3, 3 if bs == 2 else 3, alpha=1.2, eps=0.1, seed=60, heads=heads)
    cfg = Cfg(alpha=1.2, eps=0.1, beta=0.2, returns=ret, baseline=bl, aggregation=agg, whiten=wh, lam=0.9,
              clip_low=0.1, clip_high=0.3, entropy_coef=0.05)
    ppo = with_(cfg, surrogate="ppo_clip")
    rows = [0, 3] if bs == 2 else [5]
    args = (pr.p, pr.tokens[rows], pr.mask[rows], pr.pl[rows], pr.R[rows])
    kw = dict(ref_logp=pr.ref_lp[rows], group=np.zeros(len(rows), np.int64))
    o_r, g_r = reinforce.loss_and_grad(*args, cfg, **kw)
    lp = pr.token_logp(pr.p)[rows]
    for old in (None, lp):                                  # the default, and old_logp = logp given
        o_p, g_p = reinforce.loss_and_grad(*args, ppo, old_logp=old, **kw)
        assert np.array_equal(o_p["ratio"], o_r["action_mask"])
        assert all(np.array_equal(g_p[k], g_r[k]) for k in pr.p), "ppo_clip at ρ = 1 is not REINFORCE's gradient"
    got = pr.expected(ppo, bs)["terms"]["pg"]
    want = pr.expected(cfg, bs)["terms"]["pg"]
    assert all(np.array_equal(got[k], want[k]) for k in pr.p)
    assert gnorm(want) > 1e-3


@pytest.mark.parametrize("ret,gamma", [("rtg", 1.0), ("total", 0.8), ("rtg", 0.8)])
def test_group_loo_is_unbiased(ret, gamma):
    """RLOO over a group of 2: E[ĝ_group_loo] = E[ĝ_none] (the other row's return is independent of
    the row's response); with total returns or γ = 1 that is ∇E[Σγ^j r_j]."""
    pr = Problem(3, 3, seed=41)
    cfg = Cfg(beta=0.2, gamma=gamma, returns=ret, baseline="group_loo", aggregation="seq_sum")
    acc = pr.expected(cfg, 2)
    got = neg(acc["terms"]["pg"])
    none = neg(pr.expected(with_(cfg, baseline="none"), 1)["terms"]["pg"])
    assert_same_exact_sums(got, none, len(pr.ys) ** 2, "group_loo vs none")
    if ret == "total" or gamma == 1.0:
        compare_gradients(got, pr.grad(lambda q: pr.discounted(q, gamma, 0.2)), name="group_loo unbiased")
    # the baseline is not vacuous: it changes the estimator batch by batch
    rows = [1, 4]
    a = reinforce.loss_and_grad(pr.p, pr.tokens[rows], pr.mask[rows], pr.pl[rows], pr.R[rows], cfg,
                                ref_logp=pr.ref_lp[rows], group=np.zeros(2, np.int64))[1]
    b = reinforce.loss_and_grad(pr.p, pr.tokens[rows], pr.mask[rows], pr.pl[rows], pr.R[rows],
                                with_(cfg, baseline="none"), ref_logp=pr.ref_lp[rows])[1]
    assert max_diff(a, b) > 1e-3


@pytest.mark.parametrize("ret,gamma", [("rtg", 1.0), ("total", 0.8), ("rtg", 0.8)])
def test_group_mean_is_biased_by_the_rows_own_share(ret, gamma):
    """group_mean over a group of k = 2 includes S_i with weight 1/k:
    E[ĝ_group_mean] = E[ĝ_none] − (1/k)·∇E[Σ_j γ^j r_j]  (at γ = 1 or total returns: (1 − 1/k)·∇)."""
    k, beta = 2, 0.3
    pr = Problem(3, 3, seed=42)
    cfg = Cfg(beta=beta, gamma=gamma, returns=ret, baseline="group_mean", aggregation="seq_sum")
    got = neg(pr.expected(cfg, k)["terms"]["pg"])
    none = neg(pr.expected(with_(cfg, baseline="none"), 1)["terms"]["pg"])
    grad_total = pr.grad(lambda q: pr.discounted(q, gamma, beta))
    compare_gradients(got, {n: none[n] - grad_total[n] / k for n in pr.p}, name="group_mean bias formula")
    if ret == "total" or gamma == 1.0:
        compare_gradients(got, {n: (1 - 1 / k) * grad_total[n] for n in pr.p}, name="(1 − 1/k)·∇")
    assert max_diff(got, none) > 1e-2 * gnorm(none)


@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_gae_with_lambda_one_is_rtg(gamma):
    """λ = 1: Σ_l γ^l δ_{t+l} telescopes to rtg_t − V_t, so G^GAE = rtg and A = rtg − V, for every batch;
    λ < 1 changes them (not vacuous)."""
    pr = Problem(4, 3, seed=43)
    base = dict(beta=0.2, gamma=gamma, baseline="value", aggregation="token_mean")
    args = (pr.p, pr.tokens, pr.mask, pr.pl, pr.R)
    o_rtg, g_rtg = reinforce.loss_and_grad(*args, Cfg(returns="rtg", **base), ref_logp=pr.ref_lp)
    o_gae, g_gae = reinforce.loss_and_grad(*args, Cfg(returns="gae", lam=1.0, **base), ref_logp=pr.ref_lp)
    n = len(pr.ys)
    for key in ("returns", "advantages"):
        assert_close(o_gae[key], o_rtg[key], n=8, scale=max(1.0, float(np.max(np.abs(o_rtg[key])))), name=key)
    assert_same_exact_sums(g_gae, g_rtg, n, "gae λ=1 vs rtg gradients")
    o_95, _ = reinforce.loss_and_grad(*args, Cfg(returns="gae", lam=0.95, **base), ref_logp=pr.ref_lp)
    assert np.max(np.abs(o_95["returns"] - o_rtg["returns"])) > 1e-3


def _per_state_kl_grad(pr, kind):
    """∇_θ E_{y~p_θ0}[Σ_t D(s_t)] with the states' distribution frozen at θ0 (central differences):
    D = KL(π_θ‖π_ref) ('forward') or KL(π_ref‖π_θ) ('reverse') at each action's state."""
    p0 = pr.probs(pr.p)
    logr = log_mix(model.forward(pr.ref, pr.tokens, pr.mask)[0]["scores"], pr.alpha, pr.eps)

    def f(q):
        logq = log_mix(model.forward(q, pr.tokens, pr.mask)[0]["scores"], pr.alpha, pr.eps)
        if kind == "forward":
            D = np.sum(np.exp(logq) * (logq - logr), -1)
        else:
            D = np.sum(np.exp(logr) * (logr - logq), -1)
        return float(p0 @ np.where(pr.am, D, 0.0).sum(1))
    return pr.grad(f)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("L", [1, 3])
def test_kl_in_the_loss_expected_gradient(kl, L):
    """kl_in='loss' (GRPO), seq_sum, one row: E[∇L_kl] = β·E[Σ_t k'(x_t)∇log π_t] =
    k1: 0;  k2: β·E[Σ_t ∇KL(π_θ‖π_ref)(s_t)];  k3: β·E[Σ_t ∇KL(π_ref‖π_θ)(s_t)]  (states frozen).
    None equals β·∇KL(π‖π_ref) of the sequence, except k2 on one-token responses (L = 1)."""
    beta = 0.5
    pr = Problem(4, L, alpha=1.3, eps=0.05, seed=44)
    cfg = Cfg(alpha=1.3, eps=0.05, beta=beta, kl=kl, kl_in="loss", baseline="none", returns="total",
              aggregation="seq_sum")
    acc = pr.expected(cfg)
    got = acc["terms"]["kl"]
    zero = {k: np.zeros_like(v) for k, v in pr.p.items()}
    want = zero if kl == "k1" else {k: beta * v for k, v in _per_state_kl_grad(
        pr, "forward" if kl == "k2" else "reverse").items()}
    compare_gradients(got, want, name=f"E[∇L_kl] with {kl} in the loss")
    kl_grad = {k: beta * v for k, v in acc["exact"]["grad_KL"].items()}
    if kl == "k2" and L == 1:
        assert_same_exact_sums(got, kl_grad, len(pr.ys), "k2 in the loss, one token: β∇KL")
    else:
        assert max_diff(got, kl_grad) > 1e-2 * gnorm(kl_grad), f"{kl} in the loss is not β∇KL"
    if kl != "k1":
        assert gnorm(got) > 1e-3                                          # not vacuous
    # the rewards carry no −β·k: the policy-gradient term estimates ∇J alone
    compare_gradients(neg(acc["terms"]["pg"]), acc["exact"]["grad_J"], name="pg term = ∇J")


# ---------------------------------------------------------------------------------------------
# Monte Carlo: sampled estimates (rollout with seeded uniforms, then loss_and_grad) average to the
# exact expectation

def _t_quantile(z, dof):
    """Student-t quantile from the normal one, first-order Cornish–Fisher: t ≈ z + (z³ + z)/(4ν)
    (within 0.1 % of scipy's t.ppf for ν >= 500 at these levels)."""
    return z + (z ** 3 + z) / (4 * dof)


def _mc_check(samples, expected, alpha=1e-3):
    """Per coordinate |mean − E| <= t·sd/√n, Bonferroni over the coordinates whose sample sd > 0.

    Each of the n samples is an independent draw of the estimator (fresh uniforms), so by the CLT
    (mean − E)/(sd/√n) is approximately Student-t with n − 1 degrees of freedom. Testing P
    coordinates at level α/P each bounds the chance that a correct implementation fails by α
    (Bonferroni). Coordinates with zero sample variance (parameters no sample touches) must match
    the exact value to rounding. Returns the largest standardised deviation and the quantile.
    """
    X = np.stack(samples)                                       # (n, P)
    n = X.shape[0]
    mean, sd = X.mean(0), X.std(0, ddof=1)
    live = sd > 0
    P = int(live.sum())
    z = NormalDist().inv_cdf(1 - alpha / (2 * P))
    t = _t_quantile(z, n - 1)
    dev = np.abs(mean - expected)
    # a coordinate no sample moves must equal its exact expectation up to the rounding of the sums
    dead_tol = kernel_tol(np.float64, n) * np.maximum(1.0, np.abs(expected[~live]))
    assert np.all(dev[~live] <= dead_tol), "a never-varying coordinate differs from its exact expectation"
    score = dev[live] / (sd[live] / np.sqrt(n))
    return float(score.max()), t


def _flat(g, keys):
    return np.concatenate([np.asarray(g[k]).ravel() for k in keys])


def _sample_estimates(p, ref, V, L, cfg, rows, n, seed):
    """n estimates, each from a batch of ``rows`` fresh rollouts (uniforms from one seeded rng)."""
    PROMPT = prompt_for(V)
    rng = np.random.default_rng(seed)
    T = len(PROMPT) + L
    prompt = np.zeros((rows * n, T), np.int64)
    prompt[:, :len(PROMPT)] = PROMPT
    ro = rollout.rollout(p, prompt, np.full(rows * n, len(PROMPT)), rng.random((rows * n, T)), cfg.alpha, cfg.eps,
                         ref_params=ref)
    keys = sorted(p)
    out = []
    for i in range(n):
        s = slice(i * rows, (i + 1) * rows)
        toks = ro["tokens"][s]
        L_ = ro["mask"][s].sum(1).astype(int)
        R = np.array([reward_fn(tuple(toks[b, len(PROMPT):L_[b]])) for b in range(rows)])
        _, g = reinforce.loss_and_grad(p, toks, ro["mask"][s], np.full(rows, len(PROMPT)), R, cfg,
                                       ref_logp=ro["ref_logp"][s])
        out.append(_flat(g, keys))
    return out, keys


def test_monte_carlo_mean_approaches_the_exact_unbiased_gradient():
    """The unbiased configuration: the mean of 600 sampled gradients (each from 4 rows) lies within the
    Bonferroni-corrected t bound of the exact E[∇L], whose policy part is ∇(J − β·KL); and the same bound
    rejects the token_mean estimator's (biased) expectation, so the test has power."""
    V, L = 4, 3
    pr = Problem(V, L, 1.0, 0.1, seed=20)
    cfg = Cfg(eps=0.1, beta=0.2, aggregation="seq_sum", baseline="value")
    acc = pr.expected(cfg)
    samples, keys = _sample_estimates(pr.p, pr.ref, V, L, cfg, rows=4, n=600, seed=123)
    score, t = _mc_check(samples, _flat(acc["grad"], keys))
    assert score <= t, f"largest standardised deviation {score:.2f} > {t:.2f}"
    biased = pr.expected(Cfg(**{**cfg.to_dict(), "aggregation": "token_mean"}))
    X = np.stack(samples)
    dev = np.abs(X.mean(0) - _flat(biased["grad"], keys)) / (X.std(0, ddof=1) / np.sqrt(len(X)) + 1e-300)
    assert dev.max() > t, "the Monte-Carlo bound cannot tell the token_mean bias apart"


def test_monte_carlo_mean_approaches_a_biased_expectation():
    """exact.expected_estimator is the expectation of the estimator as implemented, whatever its bias:
    batches of two rows with token_mean, the mean baseline, k3 and whitening."""
    V, L = 3, 3
    pr = Problem(V, L, 1.2, 0.0, seed=21)
    cfg = Cfg(alpha=1.2, beta=0.3, kl="k3", aggregation="token_mean", baseline="mean", whiten="population",
              entropy_coef=0.05)
    acc = pr.expected(cfg, 2)
    samples, keys = _sample_estimates(pr.p, pr.ref, V, L, cfg, rows=2, n=1200, seed=321)
    score, t = _mc_check(samples, _flat(acc["grad"], keys))
    assert score <= t, f"largest standardised deviation {score:.2f} > {t:.2f}"
