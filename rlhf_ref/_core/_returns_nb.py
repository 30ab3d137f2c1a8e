"""Numba twin of ``rlhf_ref/returns.py`` (and ``reinforce.aggregation_weights``): per-token scalars.

KL estimates, shaped rewards, returns, baselines, whitening and the aggregation weights, on
(B, T) float64 arrays, token-aligned, 0 off the action mask m, with the reference's
formulas and loops (see its module docstring). They cost O(B·T) and would be negligible but
for Python: the reference's reward-to-go loop is T NumPy calls, ~0.2 ms at T = 64, a third of
a whole training step at B = 1; here the whole chain is one kernel call.

Codes: a value's index in its row of ``rlhf_ref/conventions.py`` (``_host.chain_codes``): kl
k1/k2/k3 = 0/1/2; returns rtg/total/gae = 0/1/2; baseline value/qvalue/mean/loo/none/group_mean/
group_loo = 0/1/2/3/4/5/6; whiten off/population/bessel = 0/1/2; aggregation token_mean/seq_mean/
seq_sum/fixed_len = 0/1/2/3; group_scale off/std = 0/1.
The callers check the error cases (no action, ``loo`` with < 2 rows, whitening with too few
actions) before the kernel runs, with the reference's messages.
"""

from __future__ import annotations

import math

import numpy as np

from ._nb_common import kernel

WHITEN_EPS = 1e-8


@kernel
def kl_per_token(logp, ref_logp, am, kind, out):
    """k_t with x = logp − ref_logp: k1 = x, k2 = x²/2, k3 = expm1(−x) + x; 0 off the mask."""
    B, T = logp.shape
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                x = logp[b, t] - ref_logp[b, t]
                if kind == 0:
                    out[b, t] = x
                elif kind == 1:
                    out[b, t] = 0.5 * x * x
                else:
                    out[b, t] = math.expm1(-x) + x
            else:
                out[b, t] = 0.0


@kernel
def shaped_rewards(kl, reward, am, beta, out):
    """r_t = −β·k_t at every action, plus R at the row's last action."""
    B, T = kl.shape
    for b in range(B):
        last = -1
        for t in range(T):
            if am[b, t] > 0:
                out[b, t] = -beta * kl[b, t]
                last = t
            else:
                out[b, t] = 0.0
        if last >= 0:
            out[b, last] += reward[b]


@kernel
def discounted_returns(r, am, gamma, kind, out):
    """rtg: G_t = r_t + γ G_{t+1} over actions; total: G = Σ_j γ^j r_j at every action."""
    B, T = r.shape
    for b in range(B):
        if kind == 0:
            g = 0.0
            for t in range(T - 1, -1, -1):
                if am[b, t] > 0:
                    g = r[b, t] + gamma * g
                    out[b, t] = g
                else:
                    out[b, t] = 0.0
        else:
            total = 0.0
            disc = 1.0
            for t in range(T):
                if am[b, t] > 0:
                    total = total + disc * r[b, t]
                    disc = disc * gamma
            for t in range(T):
                out[b, t] = total if am[b, t] > 0 else 0.0


@kernel
def gae_returns(r, am, values, gamma, lam, out):
    """GAE over each row's actions: δ_t = r_t + γ V_next − V_t (V_next = 0 after the last action),
    A_t = δ_t + γλ A_next; out = A + V (the value target)."""
    B, T = r.shape
    for b in range(B):
        a_next = 0.0
        v_next = 0.0
        for t in range(T - 1, -1, -1):
            if am[b, t] > 0:
                delta = r[b, t] + gamma * v_next - values[b, t]
                a_next = delta + gamma * lam * a_next
                v_next = values[b, t]
                out[b, t] = a_next + values[b, t]
            else:
                out[b, t] = 0.0


@kernel
def group_baseline(kind, G, am, group, with_sd, out, S, sd):
    """group_mean (5): mean of S_j = G at row j's first action over the rows of the row's group with
    an action; group_loo (6): over the other ones. sd (B,): the Bessel std of S over the group when
    with_sd (else 0). Broadcast to the row's actions."""
    B, T = G.shape
    has = np.zeros(B, np.bool_)
    for b in range(B):
        S[b] = 0.0
        for t in range(T):
            if am[b, t] > 0:
                S[b] = G[b, t]
                has[b] = True
                break
    for b in range(B):
        s = 0.0
        n = 0.0
        mu = 0.0
        ng = 0.0
        sd[b] = 0.0
        if has[b]:
            for j in range(B):
                if has[j] and group[j] == group[b]:
                    mu += S[j]
                    ng += 1.0
                    if j != b or kind == 5:
                        s += S[j]
                        n += 1.0
            if with_sd:
                mu = mu / ng
                v = 0.0
                for j in range(B):
                    if has[j] and group[j] == group[b]:
                        v += (S[j] - mu) * (S[j] - mu)
                sd[b] = math.sqrt(v / (ng - 1.0))
        for t in range(T):
            out[b, t] = s / n if am[b, t] > 0 else 0.0


@kernel
def baseline(kind, G, am, values, qb, out):
    """value: V(s_t); qvalue: Σ_a π_ε Q (qb); mean: mean G over all actions; loo: mean over the other rows; none: 0."""
    B, T = G.shape
    if kind == 0 or kind == 1:
        src = values if kind == 0 else qb
        for b in range(B):
            for t in range(T):
                out[b, t] = src[b, t] if am[b, t] > 0 else 0.0
        return
    if kind == 4:
        out[:] = 0.0
        return
    N = 0.0
    S = 0.0
    n_row = np.zeros(B)
    s_row = np.zeros(B)
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                n_row[b] += 1.0
                s_row[b] += G[b, t]
        N += n_row[b]
        S += s_row[b]
    for b in range(B):
        v = S / N if kind == 2 else ((S - s_row[b]) / (N - n_row[b]) if N - n_row[b] > 0 else np.nan)
        for t in range(T):
            out[b, t] = v if am[b, t] > 0 else 0.0


@kernel
def whiten(adv, am, kind, shift_mean, out):
    """(A − μ)/sqrt(σ² + 1e-8) over all actions (σ² population or Bessel); μ added back if not shift_mean."""
    B, T = adv.shape
    if kind == 0:
        out[:] = adv
        return
    N = 0.0
    S = 0.0
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                N += 1.0
                S += adv[b, t]
    mu = S / N
    ss = 0.0
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                d = adv[b, t] - mu
                ss += d * d
    var = ss / (N - 1.0 if kind == 2 else N)
    sd = math.sqrt(var + WHITEN_EPS)
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                o = (adv[b, t] - mu) / sd
                out[b, t] = o if shift_mean else o + mu
            else:
                out[b, t] = 0.0


@kernel
def aggregation_weights(am, kind, norm_len, out):
    """w (B, T): token_mean m/N, seq_mean m/(n_b·n_rows), seq_sum m/n_rows, fixed_len m/(B·L) with
    L = norm_len if > 0 else T."""
    B, T = am.shape
    N = 0.0
    n_rows = 0.0
    for b in range(B):
        n = 0.0
        for t in range(T):
            if am[b, t] > 0:
                n += 1.0
        N += n
        if n > 0:
            n_rows += 1.0
    for b in range(B):
        n = 0.0
        for t in range(T):
            if am[b, t] > 0:
                n += 1.0
        for t in range(T):
            if am[b, t] > 0:
                if kind == 0:
                    out[b, t] = 1.0 / N
                elif kind == 2:
                    out[b, t] = 1.0 / n_rows
                elif kind == 3:
                    out[b, t] = 1.0 / (B * (norm_len if norm_len > 0 else T))
                else:
                    out[b, t] = 1.0 / n / n_rows
            else:
                out[b, t] = 0.0
