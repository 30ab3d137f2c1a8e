"""Numba twin of ``rlhf_ref/rollout.py``: batched autoregressive sampling in one kernel call.

The whole time loop runs inside the kernel: per step one BLAS product ``h W_hhᵀ`` for the
batch (the input projection is a row of the table ``P = E W_ihᵀ + b_ih + b_hh``, see
``_lstm_nb``), the fused cell, one BLAS product for the stacked heads (``head`` and, when
asked, ``value``), then per row the policy and the inverse-CDF draw (``_policy_nb.sample_row``)
and the EOS bookkeeping, exactly as the reference orders them. The frozen reference policy,
when given, runs beside it with its own state. Rows that have ended are not stepped (the
reference steps them and discards the result).
"""

from __future__ import annotations

import numpy as np

from ._lstm_nb import cell
from ._nb_common import kernel
from ._policy_nb import logprob_row, sample_row

PAD = 0


@kernel
def rollout(P, W_hh, Wc, bc, has_value, Pr, W_hhr, Wcr, bcr, has_ref,
            tokens, prompt_len, u, V, alpha, eps, kind, eos_id,
            mask, am, logp, ref_logp, vals,
            h, c, a, z, hr, cr, ar, zr, e):
    """Sample every row. tokens (B, T) holds the prompts (PAD after) on entry, the batch on exit.

    P (V, 4H) input table, W_hh (4H, H), Wc (V[+1], H), bc: the stacked head (and value) —
    and the same for the reference policy (Pr, W_hhr, Wcr, bcr) when has_ref.
    Outputs (B, T), zero on entry: mask, am (action mask), logp, ref_logp, vals.
    Work: h (B, H), c (2, B, H), a (B, 4H), z (B, K); hr, cr, ar, zr likewise; e (V,).
    c alternates between its two halves (c_{t-1} in one, c_t into the other): an in-place update
    would make the cell's input and output overlap, and LLVM then runs the cell unvectorised.
    """
    B, T = tokens.shape
    done = np.zeros(B, np.bool_)
    h[:] = 0.0
    c[:] = 0.0
    if has_ref:
        hr[:] = 0.0
        cr[:] = 0.0
    for b in range(B):
        mask[b, 0] = 1.0
    for t in range(1, T):
        # feed token t−1: h becomes h_{t−1}, the state token t is chosen in
        np.dot(h, W_hh.T, a)
        for b in range(B):
            if not done[b]:
                cell(a[b], P[tokens[b, t - 1]], c[t % 2, b], c[(t + 1) % 2, b], h[b])
        np.dot(h, Wc.T, z)
        if has_ref:
            np.dot(hr, W_hhr.T, ar)
            for b in range(B):
                if not done[b]:
                    cell(ar[b], Pr[tokens[b, t - 1]], cr[t % 2, b], cr[(t + 1) % 2, b], hr[b])
            np.dot(hr, Wcr.T, zr)
        for b in range(B):
            if done[b]:
                continue                                     # tokens PAD, masks and log-probs 0
            mask[b, t] = 1.0
            zb = z[b]
            for k in range(zb.shape[0]):
                zb[k] += bc[k]
            if has_value:
                vals[b, t] = zb[V]
            if t < prompt_len[b]:
                continue                                     # prompt token: kept, not an action
            tok, lp = sample_row(zb, V, alpha, eps, kind, u[b, t], e)
            tokens[b, t] = tok
            am[b, t] = 1.0
            logp[b, t] = lp
            if has_ref:
                zrb = zr[b]
                for k in range(zrb.shape[0]):
                    zrb[k] += bcr[k]
                ref_logp[b, t] = logprob_row(zrb, V, tok, alpha, eps, kind, e)
            if tok == eos_id:
                done[b] = True
