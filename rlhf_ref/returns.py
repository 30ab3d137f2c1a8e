"""KL estimators, shaped rewards, returns, baselines and advantages: the readable reference.

All arrays are token-aligned (B, T) and hold exactly 0 where ``action_mask`` (m) is 0;
time steps are the actions only (prompt and padding do not count). DESIGN.md §3.

KL to the frozen reference, with x = log π(a_t|s_t) − log π_ref(a_t|s_t) (x ~ π):

    k1 = x                  unbiased, can be negative
    k2 = x²/2               ≥ 0, biased
    k3 = expm1(−x) + x      ≥ 0, unbiased (Schulman); expm1, never exp(−x) − 1
    E_π[Σ_t k1_t] = E_π[Σ_t k3_t] = KL(π‖π_ref)

Shaped rewards:   r_t = −β·k_t at every action, + R at the row's last action.
Returns:          "rtg"   G_t = r_t + γ·G_{t+1}   (0 after the last action; CleanRL's reversed loop)
                  "total" G   = Σ_j γ^j r_j, j = 0 at the row's first action, written at every action
Baselines b_t:    "value"  V(s_t);  "qvalue" Σ_a π_ε(a|s_t) Q(s_t, a);  "mean" mean of G over
                  all actions (the row included: biased, see ``baseline``); "loo" mean of G over
                  the other rows' actions;  "none" 0.
Advantage:        A = G − b, optionally whitened over all actions:
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


def discounted_returns(rewards, action_mask, gamma=1.0, kind="rtg"):
    """Returns G (B, T) over actions only: reward-to-go or the total discounted return."""
    gamma = check_range(gamma, "gamma", lo=0.0, hi=1.0)
    check_choice(kind, "returns", RETURNS)
    B, T = rewards.shape
    m = action_mask > 0
    G = np.zeros_like(rewards)
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


def baseline(kind, returns, action_mask, values=None, qvalues=None, logq=None):
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
