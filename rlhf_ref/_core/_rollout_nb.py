"""Numba twin of ``rlhf_ref/rollout.py``: batched autoregressive sampling in one kernel call.

The whole time loop runs inside the kernel: per step the fused cell (the input projection is a
row of the table ``P = E W_ihᵀ + b_ih + b_hh``, see ``_lstm_nb``), one product of the new
state with ``[W_hhᵀ | heads ᵀ]`` (the heads are ``head`` and, when asked, ``value``;
``_lstm_nb.smm`` for blocks of NUMBA_SMM_ROWS rows, else BLAS), then per row the policy and the
inverse-CDF draw (``_policy_nb.sample_row``) and the EOS bookkeeping, exactly as the reference
orders them. The frozen reference policy, when given, runs beside it with its own state. Rows
that have ended are not stepped (the reference steps them and discards the result). Rows are
independent, so ``rollout_par`` runs row blocks on Numba's threads (see ``_lstm_nb`` for why this
beats threaded BLAS).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._lstm_nb import cell, smm, use_smm
from ._nb_common import kernel
from ._policy_nb import logprob_row, row_ok, sample_row

PAD = 0


@kernel
def rollout_rows(P, Wcat, bc, has_value, Pr, Wcatr, bcr, has_ref,
                 tokens, prompt_len, u, V, alpha, eps, kind, eos_id,
                 mask, am, logp, ref_logp, vals, smm_min, smm_max, r0, r1):
    """Sample rows r0:r1 (rows are independent). tokens (B, T) holds the prompts (PAD after) on
    entry, the batch on exit.

    P (V, 4H): the input table; Wcat = [W_hhᵀ | Wcᵀ | 0] (H, ≥ 4H + K) with Wc the stacked head
    (and value) rows, K = len(bc) their number and bc their biases (zero columns may pad Wcat); Pr, Wcatr, bcr the same for the reference policy (has_ref).
    One product per step, h_t Wcat, gives both the recurrent part of step t+1 and the scores of
    step t (they read the same h_t); in the C-contiguous transposed layout OpenBLAS runs the
    B = 1 product 2–3× faster than with W itself (measured).
    Outputs (B, T), zero on entry: mask, am (action mask), logp, ref_logp, vals.
    The block's work buffers are its own (one block per thread in ``rollout_par``). The cell state
    alternates between two buffers (c_{t-1} in one, c_t into the other): an in-place update
    would make the cell's input and output overlap, and LLVM then runs the cell unvectorised.
    """
    T = tokens.shape[1]
    n = r1 - r0
    dt = P.dtype
    G = P.shape[1]
    H = G // 4
    K = bc.shape[0]
    h = np.zeros((n, H), dt)
    c = np.zeros((2, n, H), dt)
    out = np.zeros((n, Wcat.shape[1]), dt)                           # [a | z]; a = h_{-1} W_hhᵀ = 0 at first
    Gr = Pr.shape[1] if has_ref else 0
    hr = np.zeros((n, Gr // 4), dt)
    cr = np.zeros((2, n, Gr // 4), dt)
    outr = np.zeros((n, Wcatr.shape[1] if has_ref else 0), dt)
    e = np.empty(V, dt)
    cdf = np.empty(V, np.float64)
    done = np.zeros(n, np.bool_)
    for b in range(r0, r1):
        mask[b, 0] = 1.0
    for t in range(1, T):
        # feed token t−1: h becomes h_{t−1}, the state token t is chosen in
        for i in range(n):
            if not done[i]:
                cell(out[i, :G], P[tokens[r0 + i, t - 1]], c[t % 2, i], c[(t + 1) % 2, i], h[i])
        # next step's h W_hhᵀ and this step's scores
        if use_smm(n, Wcat.shape[0], Wcat.shape[1], smm_min, smm_max):
            smm(h, Wcat, out)
        else:
            np.dot(h, Wcat, out)
        if has_ref:
            for i in range(n):
                if not done[i]:
                    cell(outr[i, :Gr], Pr[tokens[r0 + i, t - 1]], cr[t % 2, i], cr[(t + 1) % 2, i], hr[i])
            if use_smm(n, Wcatr.shape[0], Wcatr.shape[1], smm_min, smm_max):
                smm(hr, Wcatr, outr)
            else:
                np.dot(hr, Wcatr, outr)
        for i in range(n):
            b = r0 + i
            if done[i]:
                continue                                     # tokens PAD, masks and log-probs 0
            mask[b, t] = 1.0
            zb = out[i, G:G + K]
            for k in range(K):
                zb[k] += bc[k]
            if has_value:
                vals[b, t] = zb[V]
            if t < prompt_len[b]:
                continue                                     # prompt token: kept, not an action
            zrb = outr[i, Gr:Gr + bcr.shape[0]]                 # empty without a reference policy
            if has_ref:
                for k in range(zrb.shape[0]):
                    zrb[k] += bcr[k]
            # no policy at this state (non-finite α·z): end the row with the status token −1 (−2
            # for the reference policy), which the backend turns into policy.scores_error
            if not row_ok(zb, V, alpha, kind):
                tokens[b, t] = -1
                done[i] = True
                continue
            if has_ref and not row_ok(zrb, V, alpha, kind):
                tokens[b, t] = -2
                done[i] = True
                continue
            tok, lp = sample_row(zb, V, alpha, eps, kind, u[b, t], e, cdf)
            if tok < 0 or tok >= V:                          # cannot happen on a row_ok row
                tokens[b, t] = -1
                done[i] = True
                continue
            tokens[b, t] = tok
            am[b, t] = 1.0
            logp[b, t] = lp
            if has_ref:
                ref_logp[b, t] = logprob_row(zrb, V, tok, alpha, eps, kind, e)
            if tok == eos_id:
                done[i] = True


@kernel
def rollout(P, Wcat, bc, has_value, Pr, Wcatr, bcr, has_ref,
            tokens, prompt_len, u, V, alpha, eps, kind, eos_id, mask, am, logp, ref_logp, vals, smm_min, smm_max):
    """``rollout_rows`` over the whole batch in one block (BLAS may thread each product)."""
    rollout_rows(P, Wcat, bc, has_value, Pr, Wcatr, bcr, has_ref,
                 tokens, prompt_len, u, V, alpha, eps, kind, eos_id, mask, am, logp, ref_logp, vals,
                 smm_min, smm_max, 0, tokens.shape[0])


@kernel(parallel=True)
def rollout_par(P, Wcat, bc, has_value, Pr, Wcatr, bcr, has_ref,
                tokens, prompt_len, u, V, alpha, eps, kind, eos_id, mask, am, logp, ref_logp, vals,
                smm_min, smm_max, nblk):
    """``rollout_rows`` over nblk row blocks, one per thread, each with its own buffers and
    single-threaded BLAS products (the caller holds BLAS to one thread). The split depends on
    nblk only: a fixed thread count gives bit-identical results."""
    B = tokens.shape[0]
    for j in prange(nblk):
        rollout_rows(P, Wcat, bc, has_value, Pr, Wcatr, bcr, has_ref,
                     tokens, prompt_len, u, V, alpha, eps, kind, eos_id, mask, am, logp, ref_logp, vals,
                     smm_min, smm_max, j * B // nblk, (j + 1) * B // nblk)
