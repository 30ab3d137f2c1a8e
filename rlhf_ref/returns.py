"""KL estimators, shaped rewards, returns, baselines and advantages: the readable reference.

All arrays are token-aligned (B, T) and hold exactly 0 where ``action_mask`` (m) is 0;
time steps are the actions only (prompt and padding do not count). docs/conventions.md §3.

KL to the frozen reference, with x = log π(a_t|s_t) − log π_ref(a_t|s_t) (x ~ π):

    k1 = x                  unbiased, can be negative
    k2 = x²/2               ≥ 0, biased
    k3 = expm1(−x) + x      ≥ 0, unbiased (Schulman); expm1, never exp(−x) − 1
    E_π[Σ_t k1_t] = E_π[Σ_t k3_t] = KL(π‖π_ref)

Shaped rewards:   r_t = −β·k_t at every action, + R at the row's last action.
                  (kl_in="loss": r_t = R at the last action only; β·k goes to the loss, reinforce.py)
Returns:          "rtg"   G_t = r_t + γ·G_{t+1}   (0 after the last action; CleanRL's reversed loop)
                  "total" G   = Σ_j γ^j r_j, j = 0 at the row's first action, written at every action
                  "gae"   δ_t = r_t + γ·V_{next(t)} − V_t  (V_next = 0 after the row's last action),
                          A_t = Σ_l (γλ)^l δ_{t+l} over later actions,  G_t = A_t + V_t  (the value
                          target, TRL/CleanRL). λ = 1 telescopes to G = rtg.
Baselines b_t:    "value"  V(s_t);  "qvalue" Σ_a π_ε(a|s_t) Q(s_t, a);  "mean" mean of G over
                  all actions (the row included: biased, see ``baseline``); "loo" mean of G over
                  the other rows' actions;  "none" 0.
                  With S_i = G at row i's first action and g(i) its group (rows with an action only):
                  "group_mean" b_i = mean_{j ∈ g(i)} S_j         (Dr. GRPO; the row included: biased)
                  "group_loo"  b_i = mean_{j ∈ g(i), j ≠ i} S_j  (RLOO; unbiased)
                  b_i broadcast to row i's actions.
Advantage:        A = G − b;  group_scale="std": A/(σ_g + group_eps), σ_g the Bessel (N − 1) std of
                  S over the group (GRPO); then optionally whitened over all actions:
                  (A − μ)/sqrt(σ² + 1e-8), σ² population ("population") or Bessel ("bessel");
                  μ added back when shift_mean=False.
"""

from __future__ import annotations

import numpy as np

from . import conventions
from ._validate import as_float_array, check_choice, check_range

# the allowed values, from the table of conventions (conventions.py)
KL_ESTIMATORS = conventions.values("kl")
RETURNS = conventions.values("returns")
BASELINES = conventions.values("baseline")
WHITEN = conventions.values("whiten")
GROUP_SCALE = conventions.values("group_scale")
GROUP_BASELINES = ("group_mean", "group_loo")
WHITEN_EPS = 1e-8


def kl_estimate(x, estimator="k1"):
    """The KL estimate k(x) of each log-ratio x = log π − log π_ref (any shape)."""
    check_choice(estimator, "kl", KL_ESTIMATORS)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return np.expm1(-x) + x
    raise NotImplementedError(f"kl_estimate has no formula for {estimator!r}")   # in the table only


def kl_estimate_grad(x, estimator="k1"):
    """dk/dx of ``kl_estimate``: k1 → 1, k2 → x, k3 → 1 − exp(−x) = −expm1(−x)."""
    check_choice(estimator, "kl", KL_ESTIMATORS)
    if estimator == "k1":
        return np.ones_like(x)
    if estimator == "k2":
        return x
    if estimator == "k3":
        return -np.expm1(-x)
    raise NotImplementedError(f"kl_estimate_grad has no formula for {estimator!r}")


def kl_per_token(logp, ref_logp, action_mask, estimator="k1"):
    """Per-token KL estimate k_t (B, T), 0 off the action mask."""
    check_choice(estimator, "kl", KL_ESTIMATORS)
    m = action_mask > 0
    x = np.where(m, logp - ref_logp, 0.0)
    return np.where(m, kl_estimate(x, estimator), 0.0)


def last_action_index(action_mask):
    """Index of each row's last action (B,), −1 for a row with no action."""
    m = action_mask > 0
    T = m.shape[1]
    last = T - 1 - np.argmax(m[:, ::-1], axis=1)
    return np.where(m.any(axis=1), last, -1)


def shaped_rewards(kl, sequence_reward, action_mask, beta=0.05):
    """r_t = −β·k_t, plus the sequence reward R added at the row's last action. (B, T)"""
    beta = check_range(beta, "beta", lo=0.0)
    r = np.where(action_mask > 0, -beta * kl, 0.0)
    sequence_reward = as_float_array(sequence_reward, "sequence_reward", shape=(r.shape[0],))
    last = last_action_index(action_mask)
    rows = np.nonzero(last >= 0)[0]
    r[rows, last[rows]] += sequence_reward.astype(r.dtype, copy=False)[rows]
    return r


def first_action_index(action_mask):
    """Index of each row's first action (B,), −1 for a row with no action."""
    m = action_mask > 0
    return np.where(m.any(axis=1), np.argmax(m, axis=1), -1)


def discounted_returns(rewards, action_mask, gamma=1.0, kind="rtg", values=None, lam=1.0):
    """Returns G (B, T) over actions only: reward-to-go, the total discounted return, or the GAE
    value target A^GAE + V (``values`` (B, T), the critic's V(s_t), a constant)."""
    gamma = check_range(gamma, "gamma", lo=0.0, hi=1.0)
    check_choice(kind, "returns", RETURNS)
    B, T = rewards.shape
    m = action_mask > 0
    G = np.zeros_like(rewards)
    if kind == "gae":
        lam = check_range(lam, "lam", lo=0.0, hi=1.0)
        if values is None:
            raise ValueError("returns='gae' needs values (B, T) from the value head")
        v = np.where(m, values, 0.0)
        a = np.zeros(B, rewards.dtype)               # A_{next(t)}
        v_next = np.zeros(B, rewards.dtype)          # V_{next(t)}, 0 after the row's last action
        for t in reversed(range(T)):                 # A_t = δ_t + γλ·A_{next(t)}
            delta = rewards[:, t] + gamma * v_next - v[:, t]
            a = np.where(m[:, t], delta + gamma * lam * a, a)
            v_next = np.where(m[:, t], v[:, t], v_next)
            G[:, t] = np.where(m[:, t], a + v[:, t], 0.0)
        return G
    if kind == "rtg":
        g = np.zeros(B, rewards.dtype)
        for t in reversed(range(T)):                 # G_t = r_t + γ G_{t+1}, skipping non-actions
            g = np.where(m[:, t], rewards[:, t] + gamma * g, g)
            G[:, t] = np.where(m[:, t], g, 0.0)
        return G
    total = np.zeros(B, rewards.dtype)
    disc = np.ones(B, rewards.dtype)
    for t in range(T):                               # G = Σ_j γ^j r_j, j counts actions from 0
        total = total + np.where(m[:, t], disc * rewards[:, t], 0.0)
        disc = np.where(m[:, t], disc * gamma, disc)
    return np.where(m, total[:, None], 0.0)


def check_group(group, action_mask, baseline_kind, group_scale="off"):
    """The integer group ids (B,) checked for the group baselines; None when neither needs them.

    group_loo needs two rows with an action in every group that has one; group_scale='std' too
    (a Bessel σ of one row is undefined)."""
    m = action_mask > 0
    B = m.shape[0]
    if group is not None:
        group = np.asarray(group)
        if group.dtype.kind not in "iu":
            raise TypeError(f"group must be an integer array of shape ({B},), got dtype {group.dtype}")
        if group.shape != (B,):
            raise ValueError(f"group must have shape ({B},) (one id per row), got {group.shape}")
        group = group.astype(np.int64)
    if baseline_kind not in GROUP_BASELINES:
        if group_scale != "off":
            raise ValueError(f"group_scale={group_scale!r} needs a group baseline (baseline='group_mean' or "
                             f"'group_loo'), got baseline={baseline_kind!r}")
        return group
    if group is None:
        raise ValueError(f"baseline={baseline_kind!r} needs group: integer ids (B,) of the rows that answer "
                         f"the same prompt")
    if baseline_kind == "group_loo" or group_scale == "std":
        has = m.any(axis=1)
        ids, counts = np.unique(group[has], return_counts=True)
        if np.any(counts < 2):
            g = int(ids[np.argmax(counts < 2)])
            why = "baseline='group_loo'" if baseline_kind == "group_loo" else "group_scale='std'"
            raise ValueError(f"{why} needs two or more rows with an action in every group; group {g} of "
                             f"group has 1")
    return group


def sequence_returns(returns, action_mask):
    """S (B,): G at each row's first action (0 for a row with no action)."""
    first = first_action_index(action_mask)
    rows = np.arange(returns.shape[0])
    return np.where(first >= 0, returns[rows, np.maximum(first, 0)], 0.0)


def group_baseline(kind, returns, action_mask, group):
    """b (B, T) of the group baselines: the mean of S_j over the row's group (group_mean) or over its
    other rows (group_loo), rows with an action only, each row weighted 1."""
    m = action_mask > 0
    has = m.any(axis=1)
    S = sequence_returns(returns, action_mask)
    b_row = np.zeros(returns.shape[0], returns.dtype)
    for i in np.nonzero(has)[0]:
        same = has & (group == group[i])
        if kind == "group_loo":
            same[i] = False
        b_row[i] = S[same].sum() / same.sum()
    return np.where(m, b_row[:, None], 0.0)


def group_std(returns, action_mask, group):
    """σ_g (B,): the Bessel (N − 1) std of S over each row's group (rows with an action; 0 elsewhere)."""
    has = (action_mask > 0).any(axis=1)
    S = sequence_returns(returns, action_mask)
    sd = np.zeros(returns.shape[0], returns.dtype)
    for i in np.nonzero(has)[0]:
        s = S[has & (group == group[i])]
        mu = s.sum() / len(s)
        sd[i] = np.sqrt(np.sum((s - mu) ** 2) / (len(s) - 1))
    return sd


def baseline(kind, returns, action_mask, values=None, qvalues=None, logq=None, group=None):
    """The baseline b (B, T), 0 off the action mask.

    ``mean`` is the mean of G over all actions of the batch, the row itself included: with equal
    lengths it scales the expected gradient by (1 − 1/B); with variable lengths it also turns it.
    ``loo`` (leave-one-out) uses the other rows only and is unbiased; it needs two rows with an
    action. ``qvalue`` needs Q (B, T, V) and the policy's full log-distribution logq (B, T, V).
    """
    check_choice(kind, "baseline", BASELINES)
    m = action_mask > 0
    if kind == "none":
        return np.zeros_like(returns)
    if kind == "value":
        if values is None:
            raise ValueError("baseline='value' needs values (B, T) from the value head")
        return np.where(m, values, 0.0)
    if kind == "qvalue":
        if qvalues is None or logq is None:
            raise ValueError("baseline='qvalue' needs qvalues (B, T, V) and logq (B, T, V)")
        return np.where(m, np.sum(np.exp(logq) * qvalues, axis=-1), 0.0)
    if kind in GROUP_BASELINES:
        return group_baseline(kind, returns, action_mask, check_group(group, action_mask, kind))
    N = m.sum()
    if kind == "mean":
        return np.where(m, returns[m].sum() / N, 0.0)
    # leave-one-out
    n_row = m.sum(axis=1)
    if np.count_nonzero(n_row) < 2:
        raise ValueError(f"baseline='loo' needs at least two rows with an action, got {np.count_nonzero(n_row)}")
    s_row = np.where(m, returns, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        b_row = (s_row.sum() - s_row) / (N - n_row)
    return np.where(m, b_row[:, None], 0.0)


def group_scale(adv, returns, action_mask, group, kind="off", eps=1e-4):
    """GRPO's A/(σ_g + eps) with σ_g = ``group_std`` of the row's group (a constant); 'off' is identity."""
    check_choice(kind, "group_scale", GROUP_SCALE)
    if kind == "off":
        return adv
    sd = group_std(returns, action_mask, group)
    check_group_std(sd, action_mask, group, eps)
    den = np.where((action_mask > 0).any(axis=1), sd + eps, 1.0)        # rows without an action: no division
    return np.where(action_mask > 0, adv / den[:, None], 0.0)


def check_group_std(sd, action_mask, group, eps):
    """σ_g + eps = 0 (a group of equal returns with group_eps = 0) is an error, never a nan."""
    has = (action_mask > 0).any(axis=1)
    bad = has & (sd + eps == 0)
    if np.any(bad):
        g = int(group[np.argmax(bad)])
        raise ValueError(f"group_scale='std' with group_eps=0 divides by σ_g = 0: every sequence return of "
                         f"group {g} of group is the same; set group_eps > 0")


def whiten(adv, action_mask, kind="population", shift_mean=True):
    """(A − μ)/sqrt(σ² + 1e-8) over all actions; statistics are constants. kind 'off' is identity."""
    check_choice(kind, "whiten", WHITEN)
    if kind == "off":
        return adv
    m = action_mask > 0
    N = m.sum()
    if N == 0 or (kind == "bessel" and N < 2):
        raise ValueError(f"whiten={kind!r} needs {'two' if kind == 'bessel' else 'one'} or more actions, got {N}")
    x = adv[m]
    mu = x.sum() / N
    var = np.sum((x - mu) ** 2) / (N - 1 if kind == "bessel" else N)
    out = (adv - mu) / np.sqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mu
    return np.where(m, out, 0.0)
