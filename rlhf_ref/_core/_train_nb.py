"""Numba twin of the losses in ``rlhf_ref/reinforce.py``, ``sft.py`` and ``reward_model.py``.

Between the network's forward pass (``_lstm_nb.forward`` + ``_model_nb.heads_forward``, which
leave the head outputs in ``logits (T·B, K)``) and its backward pass, a loss needs per-position
statistics of the policy and then ∂L/∂logits. Both are row kernels over the logits buffer:

    pass 1  ``policy_stats``: at every scored position, log π_ε(a_t), entropy, Σ π_ε Q, and the
            lse and Σ π log π_ε the gradient needs; no (B, T, V) array is made
    chain   ``reinforce_chain``: KL, shaped rewards, returns, baseline, whitening, weights, the
            three losses and the upstream gradients ∂L/∂logp, ∂L/∂H, ∂L/∂pred (``_returns_nb``)
    pass 2  ``policy_grads``: ∂L/∂logits written over the logits, in place (so the backward pass
            keeps the logits buffer and nothing else of size B·T·V)

Per-position (B, T) arrays are float64 (they are O(B·T)); the logits are in the kernel dtype.
"""

from __future__ import annotations

import math

from ._nb_common import kernel
from ._policy_nb import grad_row, logprob_stats_row
from ._returns_nb import (aggregation_weights, baseline, discounted_returns, gae_returns, group_baseline,
                          kl_per_token, shaped_rewards, whiten)


@kernel
def policy_stats(logits, tokens, sel, V, alpha, eps, qoff, has_q, logp, ent, qb, lse, plq, e):
    """Pass 1 at every position with sel[b, t] > 0 (the action mask, or the position mask for SFT).

    logits (T·B, K) time-major; writes logp, ent, qb (Σ π_ε Q when has_q), lse, plq (B, T), 0 elsewhere.
    """
    B, T = tokens.shape
    for b in range(B):
        for t in range(T):
            if sel[b, t] > 0:
                z = logits[t * B + b]
                qz = z[qoff:qoff + V] if has_q else z[0:V]
                lp, h, q, l, pq = logprob_stats_row(z, V, tokens[b, t], alpha, eps, qz, has_q, e)
                logp[b, t] = lp
                ent[b, t] = h
                qb[b, t] = q
                lse[b, t] = l
                plq[b, t] = pq
            else:
                logp[b, t] = 0.0
                ent[b, t] = 0.0
                qb[b, t] = 0.0
                lse[b, t] = 0.0
                plq[b, t] = 0.0


@kernel
def read_column(logits, B, col, lengths, out):
    """out (B, T) = logits[t·B + b, col] (the value head), 0 off the position mask (already 0 there)."""
    T = out.shape[1]
    for b in range(B):
        for t in range(T):
            out[b, t] = logits[t * B + b, col]


@kernel
def reinforce_chain(logp, ref_logp, am, reward, values, qb, pred_q, critic_q,
                    beta, kl_kind, gamma, ret_kind, base_kind, wh_kind, shift_mean, agg_kind, c_ent, c_val, ent,
                    kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred,
                    kl_in_loss, lam, group, gscale, group_eps, surr, clip_low, clip_high, old_logp, value_clip,
                    old_values, norm_len, ratio, S, sd):
    """Everything between pass 1 and pass 2; returns (loss_pg, loss_ent, loss_value, loss_kl).

    pred_q (B, T): Q(s_t, a_t) read by the caller when critic_q; else the prediction is V(s_t).
    Issue 9 (docs/conventions.md §3.1): kl_in_loss, GAE (ret_kind 2, lam), the group baselines
    (base_kind 5/6 over group (B,); S, sd (B,) scratch: sd is σ_g, read by the caller), group_scale
    (gscale 1), PPO clip (surr 1, old_logp: logp itself when on-policy; writes ratio), value_clip
    around old_values, fixed_len (agg_kind 3, norm_len).
    """
    B, T = logp.shape
    kl_per_token(logp, ref_logp, am, kl_kind, kl)
    shaped_rewards(kl, reward, am, 0.0 if kl_in_loss else beta, rewards)
    if ret_kind == 2:
        gae_returns(rewards, am, values, gamma, lam, G)
    else:
        discounted_returns(rewards, am, gamma, ret_kind, G)
    if base_kind == 5 or base_kind == 6:
        group_baseline(base_kind, G, am, group, gscale == 1, bl, S, sd)
    else:
        baseline(base_kind, G, am, values, qb, bl)
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                a = G[b, t] - bl[b, t]
                adv[b, t] = a / (sd[b] + group_eps) if gscale == 1 else a
            else:
                adv[b, t] = 0.0
    whiten(adv, am, wh_kind, shift_mean, adv)
    aggregation_weights(am, agg_kind, norm_len, w)
    loss_pg = 0.0
    loss_ent = 0.0
    loss_val = 0.0
    loss_kl = 0.0
    for b in range(B):
        for t in range(T):
            if am[b, t] > 0:
                p = pred_q[b, t] if critic_q else values[b, t]
                pred[b, t] = p
                rho = math.exp(logp[b, t] - old_logp[b, t])
                ratio[b, t] = rho
                if surr == 0:
                    loss_pg -= w[b, t] * adv[b, t] * logp[b, t]
                    d_logp[b, t] = -w[b, t] * adv[b, t]          # ∂L_pg/∂logp
                else:                                        # −min(ρA, clip(ρ)A)
                    un = rho * adv[b, t]
                    cr = min(max(rho, 1.0 - clip_low), 1.0 + clip_high)
                    cl = cr * adv[b, t]
                    loss_pg += w[b, t] * -(un if un <= cl else cl)
                    d_logp[b, t] = -w[b, t] * adv[b, t] * rho if un <= cl else 0.0
                if kl_in_loss:                               # + β·w·k, ∂/∂logp = β·w·k'(x)
                    x = logp[b, t] - ref_logp[b, t]
                    loss_kl += w[b, t] * kl[b, t]
                    kp = 1.0 if kl_kind == 0 else (x if kl_kind == 1 else -math.expm1(-x))
                    d_logp[b, t] += beta * w[b, t] * kp
                loss_ent -= c_ent * w[b, t] * ent[b, t]
                r = p - G[b, t]
                if value_clip > 0:                           # max((V − G)², (V_clip − G)²)
                    dv = p - old_values[b, t]
                    rc = old_values[b, t] + min(max(dv, -value_clip), value_clip) - G[b, t]
                    dd = dv - min(max(dv, -value_clip), value_clip)      # r − rc exactly (the reference's test)
                    if dd == 0.0 or dd * (r + rc) >= 0.0:
                        loss_val += c_val * 0.5 * w[b, t] * r * r
                        d_pred[b, t] = c_val * w[b, t] * r
                    else:
                        loss_val += c_val * 0.5 * w[b, t] * rc * rc
                        d_pred[b, t] = c_val * w[b, t] * rc if abs(dv) < value_clip else 0.0
                else:
                    loss_val += c_val * 0.5 * w[b, t] * r * r
                    d_pred[b, t] = c_val * w[b, t] * r           # ∂L_value/∂pred
                d_ent[b, t] = -c_ent * w[b, t]               # ∂L_ent/∂H
            else:
                pred[b, t] = 0.0
                d_logp[b, t] = 0.0
                d_ent[b, t] = 0.0
                d_pred[b, t] = 0.0
                ratio[b, t] = 0.0
    return loss_pg, loss_ent, loss_val, beta * loss_kl


@kernel
def policy_grads(logits, tokens, sel, V, alpha, eps, lse, logp, plq, d_logp, d_ent,
                 d_pred, pred_col, pred_is_q):
    """Pass 2: ∂L/∂logits over the logits, in place; rows with sel = 0 become 0.

    Columns [0, V) get the policy terms; the critic's column (pred_col, or pred_col + a_t for Q)
    gets d_pred when pred_col ≥ 0; every other column becomes 0.
    """
    B, T = tokens.shape
    K = logits.shape[1]
    for b in range(B):
        for t in range(T):
            z = logits[t * B + b]
            if sel[b, t] > 0:
                a = tokens[b, t]
                grad_row(z, V, a, alpha, eps, lse[b, t], logp[b, t], plq[b, t], d_logp[b, t], d_ent[b, t])
                for k in range(V, K):
                    z[k] = 0.0
                if pred_col >= 0:
                    z[pred_col + a if pred_is_q else pred_col] = d_pred[b, t]
            else:
                z[:] = 0.0


@kernel
def sft_chain(logp, pm, d_logp):
    """L_sft = −Σ_pm logp / N_real and ∂L/∂logp = −pm/N_real; returns the loss."""
    B, T = logp.shape
    n = 0.0
    for b in range(B):
        for t in range(T):
            if pm[b, t] > 0:
                n += 1.0
    loss = 0.0
    for b in range(B):
        for t in range(T):
            if pm[b, t] > 0:
                loss -= logp[b, t]
                d_logp[b, t] = -1.0 / n
            else:
                d_logp[b, t] = 0.0
    return loss / n


@kernel
def reward_readout(h_last, w, bias, r):
    """r (B,) = h_last w + bias, the scalar head at each row's final state."""
    B, H = h_last.shape
    for b in range(B):
        s = h_last[b, 0] * 0
        for j in range(H):
            s += h_last[b, j] * w[j]
        r[b] = s + bias
