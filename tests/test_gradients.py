"""Central-difference gradient checks in float64 (tests/_tol.py: h = 1e-5, atol 1e-8, rtol 1e-6) with
random upstream weights, for every backward pass of the reference: the LSTM (with h0/c0 and padding),
the heads, the policy's log-prob and entropy gradients, SFT, the Bradley–Terry loss, and the whole
REINFORCE objective end to end for every convention.

The REINFORCE loss holds A, G, the baselines, the whitening statistics, R and β·k constant, so a
finite difference of out['loss'] is *not* its gradient. The test builds the surrogate of docs/conventions.md §3
itself (``design_pieces`` below, written from the formulas with plain per-row loops, not from
reinforce.py): A, G and the weights are computed once at θ and frozen, and the surrogate
    L(θ) = −Σ w·A·log π_θ,ε(a_t|s_t) − c_H Σ w·H(π_θ,ε(·|s_t)) + c_V ½ Σ w (pred_θ − G)²
is differentiated numerically, term by term. Issue 9's conventions are in the same surrogate:
kl_in="loss" adds + β Σ w·k(log π_θ − log π_ref) (differentiated), surrogate="ppo_clip" replaces the
first term by Σ w·−min(ρA, clip(ρ)A) with ρ = exp(log π_θ − old_logp) and a perturbed old_logp
(clipping active on both sides), value_clip > 0 takes max((V − G)², (V_clip − G)²) with V_clip
around a perturbed old_values; GAE, the group baselines, group_scale and fixed_len change the
frozen constants (written below with per-row loops from i9-spec / docs/conventions.md §3).
"""

import itertools

import numpy as np
import pytest

from _tol import assert_close, compare_gradients, gradcheck, numerical_gradient
from rlhf_ref import conventions, lstm, model, policy, reinforce, reward_model, sft

# ---------------------------------------------------------------------------------------------
# shared tiny problem: V ≤ 7, E ≤ 4, H ≤ 5, B ≤ 4, T ≤ 7

V, E, H = 6, 3, 4


def params(seed=0, heads=("head", "value"), scale=1.0):
    p = lstm.init_params(V, E, H, np.random.default_rng(seed), heads=heads)
    # larger than PyTorch's default init so that gates leave their linear regime and the
    # second-order terms of the backward pass matter
    return {k: np.ascontiguousarray(v * (scale if k != "embedding.weight" else 1.0)) for k, v in p.items()}


def batch():
    """Right-padded rows of different lengths; row 2 is all prompt (no action); padding holds
    garbage ids (even out of range), which must never be read."""
    tokens = np.array([[1, 4, 5, 2, 3, 5, 2],
                       [1, 3, 4, 4, 5, 99, -7],     # length 5
                       [1, 5, 4, 0, 0, 0, 0],       # length 3, prompt 3: no action
                       [1, 2, 5, 4, 77, 77, 77]])   # length 4
    mask = np.array([[1, 1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 0, 0],
                     [1, 1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0, 0]], float)
    prompt_len = np.array([1, 2, 3, 1])
    return tokens, mask, prompt_len


# ---------------------------------------------------------------------------------------------
# LSTM body, with initial state and padding

@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "h0-c0"])
def test_lstm_backward(with_state):
    rng = np.random.default_rng(1)
    p = params(1, heads=(), scale=1.5)
    tokens, mask, _ = batch()
    tokens = np.vstack([tokens, np.full((1, 7), 55)])   # plus an all-padding row
    mask = np.vstack([mask, np.zeros((1, 7))])
    B, T = tokens.shape
    x = dict(p)
    if with_state:
        x["h0"] = rng.normal(0, 0.5, (B, H))
        x["c0"] = rng.normal(0, 0.5, (B, H))
    w_hs = rng.standard_normal((B, T, H))                # random upstream weights
    w_h, w_c = rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def f(q):
        hs, cache = lstm.forward({k: q[k] for k in p}, tokens, mask, h0=q.get("h0"), c0=q.get("c0"))
        hf, cf = lstm.final_state(cache)
        return np.sum(hs * w_hs) + np.sum(hf * w_h) + np.sum(cf * w_c)

    hs, cache = lstm.forward(p, tokens, mask, h0=x.get("h0"), c0=x.get("c0"))
    g = lstm.backward(w_hs, cache, dh_final=w_h, dc_final=w_c)
    assert set(g) == set(p) | {"h0", "c0"}
    # the two biases enter the gates identically, so their gradients are equal (PyTorch's layout)
    assert np.array_equal(g["lstm.bias_ih_l0"], g["lstm.bias_hh_l0"])
    numeric = gradcheck(f, x, g, name="lstm")
    # the all-padding row carries its initial state through: dh0 = w_h, dc0 = w_c exactly there
    assert np.array_equal(g["h0"][-1], w_h[-1]) and np.array_equal(g["c0"][-1], w_c[-1])
    # the checks are not vacuous: every parameter gets a gradient of size O(1e-2) or more
    for k in p:
        assert np.max(np.abs(numeric[k])) > 1e-2, k


# ---------------------------------------------------------------------------------------------
# the heads (action scores, value, Q) through the body

def test_model_heads_backward():
    rng = np.random.default_rng(2)
    p = params(2, heads=("head", "value", "qvalue"), scale=1.5)
    tokens, mask, _ = batch()
    B, T = tokens.shape
    w_s, w_v, w_q = rng.standard_normal((B, T, V)), rng.standard_normal((B, T)), rng.standard_normal((B, T, V))

    def f(q):
        out, _ = model.forward(q, tokens, mask)
        return np.sum(out["scores"] * w_s) + np.sum(out["values"] * w_v) + np.sum(out["qvalues"] * w_q)

    out, cache = model.forward(p, tokens, mask)
    g = model.backward(cache, dscores=w_s, dvalues=w_v, dqvalues=w_q)
    assert set(g) == set(p)
    gradcheck(f, p, g, name="heads")
    # one head at a time: the others get exactly zero
    g_v = model.backward(cache, dvalues=w_v)
    assert not g_v["head.weight"].any() and not g_v["qvalue.weight"].any() and g_v["value.weight"].any()


# ---------------------------------------------------------------------------------------------
# the policy over scores: log-prob and entropy gradients at several α, ε

ALPHA_EPS = [(1.0, 0.0), (2.5, 0.0), (0.4, 0.3), (1.7, 0.05), (1.0, 1.0), (3.0, 0.9)]


@pytest.mark.parametrize("alpha,eps", ALPHA_EPS)
def test_grad_logprob(alpha, eps):
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, (3, 4, V))
    actions = rng.integers(0, V, (3, 4))
    up = rng.standard_normal((3, 4))

    def f(q):
        lq = policy.logprobs(q["z"], alpha, eps)
        return np.sum(up * np.take_along_axis(lq, actions[..., None], -1)[..., 0])

    g = {"z": policy.grad_logprob(z, actions, up, alpha, eps)}
    gradcheck(f, {"z": z}, g, name=f"grad_logprob α={alpha} ε={eps}")
    if eps == 1.0:           # the uniform distribution does not depend on z
        assert not g["z"].any()


@pytest.mark.parametrize("alpha,eps", ALPHA_EPS)
def test_grad_entropy(alpha, eps):
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1.5, (3, 4, V))
    up = rng.standard_normal((3, 4))

    def f(q):
        return np.sum(up * policy.entropy(policy.logprobs(q["z"], alpha, eps)))

    g = {"z": policy.grad_entropy(z, up, alpha, eps)}
    gradcheck(f, {"z": z}, g, name=f"grad_entropy α={alpha} ε={eps}")


# ---------------------------------------------------------------------------------------------
# SFT and the reward model

def test_sft_loss_and_grad():
    p = params(5, scale=1.5)
    tokens, mask, _ = batch()
    out, g = sft.loss_and_grad(p, tokens, mask)
    assert set(g) == set(p)
    gradcheck(lambda q: sft.loss_and_grad(q, tokens, mask)[0]["loss"], p, g, name="sft")
    assert not g["value.weight"].any() and not g["value.bias"].any()   # other heads get 0


def rm_params(seed):
    return params(seed, heads=("reward",), scale=1.5)


def test_reward_forward_backward():
    rng = np.random.default_rng(6)
    p = rm_params(6)
    tokens, mask, _ = batch()
    w = rng.standard_normal(tokens.shape[0])
    r, cache = reward_model.forward(p, tokens, mask)
    g = reward_model.backward(w, cache)
    assert set(g) == set(p)
    gradcheck(lambda q: np.sum(reward_model.forward(q, tokens, mask)[0] * w), p, g, name="reward")


@pytest.mark.parametrize("margin", [None, "random"])
def test_bt_loss_and_grad(margin):
    rng = np.random.default_rng(7)
    p = rm_params(7)
    chosen, cmask, _ = batch()
    rejected = np.array([[1, 5, 5, 2, 0, 0, 0], [1, 3, 0, 0, 0, 0, 0], [1, 4, 4, 4, 4, 4, 2], [1, 2, 3, 0, 0, 0, 0]])
    rmask = np.array([[1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]], float)
    m = None if margin is None else rng.normal(0, 1, 4)

    def f(q):
        return reward_model.bt_loss_and_grad(q, chosen, cmask, rejected, rmask, margin=m)[0]["loss"]

    out, g = reward_model.bt_loss_and_grad(p, chosen, cmask, rejected, rmask, margin=m)
    assert set(g) == set(p)
    gradcheck(f, p, g, name="bt")
    # the offset of the reward cancels in Δ
    assert np.array_equal(g["reward.bias"], np.zeros(1))
    # the loss itself, from its definition −mean log σ(Δ) with Δ = r_c − r_r − m
    r_c = reward_model.forward(p, chosen, cmask)[0]
    r_r = reward_model.forward(p, rejected, rmask)[0]
    delta = r_c - r_r - (0.0 if m is None else m)
    assert_close(out["loss"], np.mean(-np.log(1.0 / (1.0 + np.exp(-delta)))), n=8, name="bt loss")


# ---------------------------------------------------------------------------------------------
# REINFORCE end to end: the docs/conventions.md §3 surrogate, written here independently of reinforce.py

def log_mix(scores, alpha, eps):
    """log π_ε(·|s) = log((1−ε)·softmax(α z) + ε/V), straight from the definition."""
    a = alpha * scores
    e = np.exp(a - a.max(-1, keepdims=True))
    pi = e / e.sum(-1, keepdims=True)
    return np.log((1 - eps) * pi + eps / scores.shape[-1])


GROUP = np.array([0, 0, 1, 0])         # rows 0, 1, 3 answer one prompt; row 2 (no action) another


def design_pieces(p, tokens, mask, prompt_len, R, ref_logp, cfg, group=GROUP):
    """Every constant of the surrogate at θ = p, from docs/conventions.md §3 with per-row loops."""
    fwd, _ = model.forward(p, tokens, mask)
    B, T = tokens.shape
    am = np.array([[mask[b, t] == 1 and t >= prompt_len[b] for t in range(T)] for b in range(B)])
    logq = log_mix(fwd["scores"], cfg.alpha, cfg.eps)
    logp = np.zeros((B, T))
    for b, t in zip(*np.nonzero(am)):
        logp[b, t] = logq[b, t, tokens[b, t]]
    x = np.where(am, logp - ref_logp, 0.0)
    k = {"k1": x, "k2": x * x / 2, "k3": np.exp(-x) - 1 + x}.get(cfg.kl)
    if k is None:
        pytest.fail(f"design_pieces has no formula for KL estimator {cfg.kl!r}: write it out here")
    k = k * am
    r = -cfg.beta * k if cfg.kl_in == "reward" else np.zeros((B, T))
    acts = [list(np.flatnonzero(am[b])) for b in range(B)]
    G = np.zeros((B, T))
    for b in range(B):
        if not acts[b]:
            continue
        r[b, acts[b][-1]] += R[b]                           # R at the row's last action
        if cfg.returns == "rtg":                            # G_t = r_t + γ G_{t+1} over actions
            g = 0.0
            for t in reversed(acts[b]):
                g = r[b, t] + cfg.gamma * g
                G[b, t] = g
        elif cfg.returns == "gae":                          # A_t = Σ_l (γλ)^l δ_{t+l}, G = A + V
            v = [fwd["values"][b, t] for t in acts[b]] + [0.0]
            n = len(acts[b])
            delta = [r[b, acts[b][j]] + cfg.gamma * v[j + 1] - v[j] for j in range(n)]
            for j in range(n):
                G[b, acts[b][j]] = sum((cfg.gamma * cfg.lam) ** l * delta[j + l] for l in range(n - j)) + v[j]
        else:                                               # G = Σ_j γ^j r_j at every action
            total = sum(cfg.gamma ** j * r[b, t] for j, t in enumerate(acts[b]))
            G[b, acts[b]] = total
    allG = G[am]
    if cfg.baseline == "value":
        base = fwd["values"] * am
    elif cfg.baseline == "qvalue":
        base = np.sum(np.exp(logq) * fwd["qvalues"], -1) * am
    elif cfg.baseline == "mean":
        base = allG.mean() * am
    elif cfg.baseline == "loo":
        base = np.zeros((B, T))
        for b in range(B):
            others = [G[c, t] for c in range(B) if c != b for t in acts[c]]
            base[b, acts[b]] = np.mean(others) if acts[b] else 0.0
    elif cfg.baseline in ("group_mean", "group_loo"):
        base = np.zeros((B, T))
        S = {b: G[b, acts[b][0]] for b in range(B) if acts[b]}
        for b in S:
            mates = [c for c in S if group[c] == group[b] and (c != b or cfg.baseline == "group_mean")]
            base[b, acts[b]] = np.mean([S[c] for c in mates])
    else:
        base = np.zeros((B, T))
    A = (G - base) * am
    if cfg.group_scale == "std":
        for b in range(B):
            if acts[b]:
                s = [G[c, acts[c][0]] for c in range(B) if acts[c] and group[c] == group[b]]
                A[b] = A[b] / (np.std(s, ddof=1) + cfg.group_eps)
    if cfg.whiten != "off":
        a = A[am]
        mu = a.mean()
        var = a.var(ddof=1 if cfg.whiten == "bessel" else 0)
        A = ((A - mu) / np.sqrt(var + 1e-8) + (0.0 if cfg.shift_mean else mu)) * am
    n_b = am.sum(1)
    rows = np.count_nonzero(n_b)
    if cfg.aggregation == "token_mean":
        w = am / am.sum()
    elif cfg.aggregation == "seq_sum":
        w = am / rows
    elif cfg.aggregation == "fixed_len":
        w = am / (B * (cfg.norm_len if cfg.norm_len > 0 else T))
    else:
        w = np.where(am, 1.0 / np.maximum(n_b, 1)[:, None] / rows, 0.0)
    return {"am": am, "logp": logp, "kl": k, "rewards": r * am, "returns": G, "baseline": base,
            "advantages": A, "weights": w}


def surrogate_terms(p, tokens, mask, pc, cfg, ref_logp=None, old_logp=None, old_values=None):
    """[L_pg, L_ent, L_value, L_kl] at θ = p with A, G, w frozen in ``pc`` (the stop-gradients)."""
    fwd, _ = model.forward(p, tokens, mask)
    am, w = pc["am"], pc["weights"]
    logq = log_mix(fwd["scores"], cfg.alpha, cfg.eps)
    logp = np.where(am, np.take_along_axis(logq, tokens.clip(0, V - 1)[:, :, None], -1)[:, :, 0], 0.0)
    q = np.exp(logq)
    ent = -np.sum(q * logq, -1)                             # no zero probabilities here (α·z finite)
    if cfg.baseline == "qvalue":
        pred = np.take_along_axis(fwd["qvalues"], tokens.clip(0, V - 1)[:, :, None], -1)[:, :, 0]
    else:
        pred = fwd["values"]
    A = pc["advantages"]
    if cfg.surrogate == "reinforce":
        l_pg = -np.sum(w * A * logp)
    else:                                                   # −min(ρA, clip(ρ, 1 − c_lo, 1 + c_hi)·A)
        rho = np.exp(logp - (pc["logp"] if old_logp is None else old_logp))
        l_pg = np.sum(w * am * -np.minimum(rho * A, np.clip(rho, 1 - cfg.clip_low, 1 + cfg.clip_high) * A))
    l_ent = -cfg.entropy_coef * np.sum(w * ent * am)
    G = pc["returns"]
    if cfg.value_clip > 0:
        v_clip = old_values + np.clip(pred - old_values, -cfg.value_clip, cfg.value_clip)
        l_val = cfg.value_coef * 0.5 * np.sum(w * am * np.maximum((pred - G) ** 2, (v_clip - G) ** 2))
    else:
        l_val = cfg.value_coef * 0.5 * np.sum(w * am * (pred - G) ** 2)
    l_kl = 0.0
    if cfg.kl_in == "loss":
        x = np.where(am, logp - ref_logp, 0.0)
        k = {"k1": x, "k2": x * x / 2, "k3": np.exp(-x) - 1 + x}[cfg.kl]
        l_kl = cfg.beta * np.sum(w * am * k)
    return np.array([l_pg, l_ent, l_val, l_kl])


def configs():
    """A covering set: every valid (baseline, aggregation, returns) triple (gae needs the value
    baseline), the other options cycled with co-prime periods so that each value of each option
    appears several times; issue 9's switches cycled on top (group_scale only with group baselines)."""
    whitenings = [("off", True), ("population", True), ("bessel", True), ("population", False), ("bessel", False)]
    alpha_eps = [(1.0, 0.0), (1.6, 0.2), (0.7, 0.0), (1.0, 1.0), (2.2, 0.05), (1.3, 0.0), (0.9, 0.5)]
    out = []
    V = conventions.values
    triples = [(bl, agg, rt) for bl, agg, rt in itertools.product(V("baseline"), V("aggregation"), V("returns"))
               if rt != "gae" or bl == "value"]
    for i, (bl, agg, rt) in enumerate(triples):
        wh, sm = whitenings[i % 5]
        a, e = alpha_eps[i % 7]
        group_bl = bl in ("group_mean", "group_loo")
        out.append(reinforce.ReinforceConfig(
            alpha=a, eps=e, gamma=(1.0, 0.9)[(i // 2) % 2], beta=(0.05, 0.3, 0.0, 0.2)[(i // 3) % 4],
            kl=V("kl")[i % len(V("kl"))], returns=rt, baseline=bl, whiten=wh, shift_mean=sm,
            aggregation=agg, entropy_coef=(0.0, 0.1, 0.03)[(i // 4) % 3], value_coef=(0.5, 1.3)[(i // 5) % 2],
            kl_in=("reward", "loss")[(i // 2) % 2], lam=(1.0, 0.95, 0.0)[(i // 3) % 3],
            group_scale=("std", "off")[i % 2] if group_bl else "off", group_eps=(1e-4, 0.3)[(i // 3) % 2],
            surrogate=("reinforce", "ppo_clip")[(i // 3) % 2 if i % 6 else 1], clip_low=(0.2, 0.1)[i % 2],
            clip_high=(0.2, 0.28, 0.15)[i % 3], value_clip=(0.0, 0.05)[(i // 5) % 2 if bl != "qvalue" else i % 2],
            norm_len=(0.0, 9.0)[i % 2]))
    return out


CONFIGS = configs()


def test_configs_cover_every_option():
    seen = {f: {getattr(c, f) for c in CONFIGS} for f in ("baseline", "returns", "gamma", "kl", "whiten",
                                                           "shift_mean", "aggregation", "kl_in", "group_scale",
                                                           "surrogate")}
    want = {f: set(conventions.values(f)) for f in seen if f != "gamma"}       # every value of the table
    assert seen == dict(want, gamma={1.0, 0.9})
    assert {c.kl for c in CONFIGS if c.kl_in == "loss" and c.beta > 0} == set(conventions.values("kl"))
    assert {c.lam for c in CONFIGS if c.returns == "gae"} == {1.0, 0.95, 0.0}
    assert {c.baseline for c in CONFIGS if c.group_scale == "std"} == {"group_mean", "group_loo"}
    assert any(c.value_clip > 0 and c.value_coef > 0 for c in CONFIGS)
    assert any(c.aggregation == "fixed_len" and c.norm_len > 0 for c in CONFIGS)
    assert any(c.surrogate == "ppo_clip" and c.clip_high != c.clip_low for c in CONFIGS)
    assert any(c.entropy_coef > 0 for c in CONFIGS) and any(c.eps == 1.0 for c in CONFIGS)
    assert {(c.returns, c.gamma) for c in CONFIGS} == set(itertools.product(conventions.values("returns"), (1.0, 0.9)))


def cfg_id(c):
    return (f"{c.baseline}-{c.aggregation}-{c.returns}-g{c.gamma}-{c.kl}-{c.whiten}{'' if c.shift_mean else '+mu'}"
            f"-a{c.alpha}-e{c.eps}-H{c.entropy_coef}-{c.kl_in}-{c.surrogate}-vc{c.value_clip}-{c.group_scale}"
            f"-l{c.lam}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_reinforce_end_to_end(cfg):
    seed = CONFIGS.index(cfg)
    rng = np.random.default_rng(100 + seed)
    heads = ("head", "qvalue") if cfg.baseline == "qvalue" else ("head", "value")
    if seed % 5 == 0:
        heads = ("head", "value", "qvalue")                 # an unused head gets exactly zero gradient
    p = params(100 + seed, heads=heads, scale=1.5)
    ref = params(200 + seed, heads=("head",), scale=1.5)
    tokens, mask, pl = batch()
    R = rng.normal(0, 2, tokens.shape[0])

    # the constants, recomputed from docs/conventions.md §3 (n: the longest reduction, over the 4·7 positions)
    ref_fwd, _ = model.forward(ref, tokens, mask)
    am0 = model.action_mask(mask, pl) > 0
    ref_logp = np.where(am0, np.take_along_axis(log_mix(ref_fwd["scores"], cfg.alpha, cfg.eps),
                                                tokens.clip(0, V - 1)[:, :, None], -1)[:, :, 0], 0.0)
    pc = design_pieces(p, tokens, mask, pl, R, ref_logp, cfg)
    # the sampling policy's log-probs and values: θ's, perturbed (ratio ≠ 1, clipping on both sides)
    old_logp = old_values = None
    if cfg.surrogate == "ppo_clip" and seed % 2:
        old_logp = np.where(am0, pc["logp"] + rng.normal(0, 0.4, pc["logp"].shape), 0.0)
    if cfg.value_clip > 0:
        crit = model.forward(p, tokens, mask)[0]
        pred0 = (crit["values"] if cfg.critic == "value" else
                 np.take_along_axis(crit["qvalues"], tokens.clip(0, V - 1)[:, :, None], -1)[:, :, 0])
        old_values = np.where(am0, pred0 + rng.normal(0, 0.08, pc["logp"].shape), 0.0)
    extra = dict(group=GROUP, old_logp=old_logp, old_values=old_values)

    out, g = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref, term_grads=True, **extra)
    assert set(g) == set(p) | {"terms"} and all(set(g["terms"][t]) == set(p) for t in ("pg", "ent", "value", "kl"))
    _, g_plain = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref, **extra)
    assert set(g_plain) == set(p)

    for k in ("logp", "kl", "rewards", "returns", "baseline", "advantages", "weights"):
        assert_close(out[k], pc[k], n=4 * 7 + V, scale=max(1.0, np.max(np.abs(pc[k]))), name=k)
    assert np.array_equal(out["action_mask"], pc["am"].astype(float))
    want_ratio = np.where(am0, np.exp(pc["logp"] - (pc["logp"] if old_logp is None else old_logp)), 0.0)
    assert_close(out["ratio"], want_ratio, n=4, scale=max(1.0, np.max(want_ratio)), name="ratio")
    terms = surrogate_terms(p, tokens, mask, pc, cfg, ref_logp, old_logp, old_values)
    # scale: the size of the summed terms (|w·A·log π|, |w·H|, |w·(V − G)²| are all below 10 here)
    for name, v in zip(("loss_pg", "loss_ent", "loss_value", "loss_kl"), terms):
        assert_close(out[name], v, n=4 * 7 + V, scale=10.0, name=name)
    assert_close(out["loss"], terms.sum(), n=4 * 7 + V, scale=10.0, name="loss")

    # gradients: numerically, each term of the frozen surrogate; analytically, grads['terms']
    numeric = numerical_gradient(
        lambda q: surrogate_terms(q, tokens, mask, pc, cfg, ref_logp, old_logp, old_values), p)
    for i, t in enumerate(("pg", "ent", "value", "kl")):
        compare_gradients(g["terms"][t], {k: v[..., i] for k, v in numeric.items()}, name=f"term {t}")
    compare_gradients(g, {k: v.sum(-1) for k, v in numeric.items()}, name="total")
    # the terms sum to the total (four backward passes summed vs one: a few roundings apart)
    for k in p:
        assert_close(sum(g["terms"][t][k] for t in ("pg", "ent", "value", "kl")), g[k], n=8,
                     scale=max(1.0, np.max(np.abs(g[k]))), name=f"terms sum {k}")
        assert np.array_equal(g[k], g_plain[k])             # term_grads changes nothing else
    # unused heads get exactly zero; the entropy term is zero iff c_H = 0
    for h in set(("value", "qvalue")) - {cfg.critic}:
        if f"{h}.weight" in p:
            assert not g[f"{h}.weight"].any() and not g[f"{h}.bias"].any()
    if cfg.entropy_coef == 0:
        assert all(not v.any() for v in g["terms"]["ent"].values())
    elif cfg.eps < 1:
        assert np.max(np.abs(g["terms"]["ent"]["head.weight"])) > 1e-6
    # not vacuous: the policy-gradient term is a real gradient (except ε = 1: π_ε is uniform)
    if cfg.eps < 1:
        assert np.max(np.abs(numeric["head.weight"][..., 0])) > 1e-3
    if cfg.kl_in == "reward" or cfg.beta == 0:
        assert out["loss_kl"] == 0.0 and all(not v.any() for v in g["terms"]["kl"].values())
    elif cfg.eps < 1:
        assert np.max(np.abs(numeric["head.weight"][..., 3])) > 1e-6


def test_clipping_is_active_on_both_sides():
    """Not vacuous: among the end-to-end configs, the PPO ratio is clipped above (A > 0, ρ > 1 + c_hi)
    and below (A < 0, ρ < 1 − c_lo) somewhere, and the value clip takes the clipped branch somewhere."""
    hi = lo = vclip = False
    for seed, cfg in enumerate(CONFIGS):
        if not ((cfg.surrogate == "ppo_clip" and seed % 2) or cfg.value_clip > 0):
            continue
        heads = ("head", "qvalue") if cfg.baseline == "qvalue" else ("head", "value")
        if seed % 5 == 0:
            heads = ("head", "value", "qvalue")
        p = params(100 + seed, heads=heads, scale=1.5)
        ref = params(200 + seed, heads=("head",), scale=1.5)
        tokens, mask, pl = batch()
        rng = np.random.default_rng(100 + seed)
        R = rng.normal(0, 2, tokens.shape[0])
        am0 = model.action_mask(mask, pl) > 0
        logp = reinforce.sequence_logprobs(p, tokens, mask, pl, cfg.alpha, cfg.eps)
        old_logp = old_values = None
        if cfg.surrogate == "ppo_clip" and seed % 2:
            old_logp = np.where(am0, logp + rng.normal(0, 0.4, logp.shape), 0.0)
        if cfg.value_clip > 0:
            crit = model.forward(p, tokens, mask)[0]
            pred0 = (crit["values"] if cfg.critic == "value" else
                     np.take_along_axis(crit["qvalues"], tokens.clip(0, V - 1)[:, :, None], -1)[:, :, 0])
            old_values = np.where(am0, pred0 + rng.normal(0, 0.08, logp.shape), 0.0)
        out, _ = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref, group=GROUP,
                                         old_logp=old_logp, old_values=old_values)
        A, rho = out["advantages"], out["ratio"]
        if old_logp is not None:
            hi |= bool(np.any(am0 & (A > 0) & (rho > 1 + cfg.clip_high)))
            lo |= bool(np.any(am0 & (A < 0) & (rho < 1 - cfg.clip_low)))
        if old_values is not None:
            pred = out["values"] if cfg.critic == "value" else np.take_along_axis(
                out["qvalues"], tokens.clip(0, V - 1)[:, :, None], -1)[:, :, 0]
            v_clip = old_values + np.clip(pred - old_values, -cfg.value_clip, cfg.value_clip)
            vclip |= bool(np.any(am0 & ((v_clip - out["returns"]) ** 2 > (pred - out["returns"]) ** 2)))
    assert hi and lo and vclip


def test_reinforce_with_ref_logp_equals_ref_params():
    """Passing π_ref's token log-probs instead of its parameters gives bit-identical results."""
    cfg = reinforce.ReinforceConfig(alpha=1.3, eps=0.1, kl="k3", beta=0.2, gamma=0.9, entropy_coef=0.05)
    p, ref = params(11, scale=1.5), params(12, heads=("head",), scale=1.5)
    tokens, mask, pl = batch()
    R = np.array([1.0, -0.5, 2.0, 0.3])
    o1, g1 = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_params=ref)
    rl = reinforce.sequence_logprobs(ref, tokens, mask, pl, cfg.alpha, cfg.eps)
    o2, g2 = reinforce.loss_and_grad(p, tokens, mask, pl, R, cfg, ref_logp=rl)
    assert o1["loss"] == o2["loss"] and all(np.array_equal(g1[k], g2[k]) for k in p)
