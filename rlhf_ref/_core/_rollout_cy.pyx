"""Cython twin of ``rlhf_ref/rollout.py``: batched autoregressive sampling in one kernel call.

The whole time loop runs in C with the GIL released. Per step t = 1 … T−1 (feeding token t−1,
so that h becomes h_{t−1}, the state token t is chosen in), exactly in the reference's order:

1. the input part of the pre-activations is a row of the table P = E W_ihᵀ + b_ih + b_hh
   (``_lstm_cy.input_table``), then one BLAS product a += h W_hhᵀ for the batch (skipped at
   t = 1, where h = 0), then the fused cell (``_lstm_cy.cell``) per live row;
2. one BLAS product for the stacked heads z = h W_cᵀ + b_c (``head`` and, when asked, ``value``);
3. per live row: the mask, the value, and at t ≥ prompt_len the policy and the inverse-CDF draw
   with u[b, t] (``_policy_cy.sample_row``), the log-probability of the drawn token under the
   frozen reference policy when given (which runs beside with its own state), and EOS.

Rows that have ended are not stepped (the reference steps them and discards the result). Rows
are independent through the whole loop, so with ``nchunks > 1`` the batch is cut into blocks of
rows and each OpenMP thread runs its block through all T steps with its own BLAS calls: no
synchronisation per step (BLAS must run single-threaded meanwhile; the backend sets that).
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy, memset

from ._common_cy cimport gemm, smm, use_smm
from ._lstm_cy cimport cell
from ._policy_cy cimport sample_row, logprob_row

KIND_CODES = {"boltzmann": 0, "eps_greedy": 1, "greedy": 2}


cdef inline void _policy_row(const floating* z, Py_ssize_t Kc, bint has_value, const floating* zr, Py_ssize_t Kr,
                             bint has_ref, int64_t* tokens, const int64_t* prompt_len, const double* u,
                             Py_ssize_t V, double alpha, double eps, int kind, int64_t eos_id,
                             double* mask, double* am, double* logp, double* ref_logp, double* vals,
                             uint8_t* done, floating* e, Py_ssize_t b, Py_ssize_t t, Py_ssize_t T) noexcept nogil:
    cdef Py_ssize_t i = b * T + t, tok
    cdef double lp
    cdef const floating* zb = z + b * Kc
    if done[b]:
        return                              # tokens PAD, masks and log-probs 0
    mask[i] = 1
    if has_value:
        vals[i] = zb[V]
    if t < prompt_len[b]:
        return                              # a prompt token: kept, not an action
    tok = sample_row(zb, V, alpha, eps, kind, u[i], e, &lp)
    tokens[i] = tok
    am[i] = 1
    logp[i] = lp
    if has_ref:
        ref_logp[i] = logprob_row(zr + b * Kr, V, tok, alpha, eps, kind, e)
    if tok == eos_id:
        done[b] = 1


cdef void _step_body(const floating* P, const floating* W_hh, const floating* WT, const floating* Wc,
                     const floating* WcT, const floating* bc,
                     floating* h, floating* c, floating* cn, floating* a, floating* z, const int64_t* tokens,
                     const uint8_t* done, Py_ssize_t T, Py_ssize_t t, Py_ssize_t H,
                     Py_ssize_t Kc, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Rows [b0, b1): h, c ← one LSTM step on token t−1 for every live row; z = h W_cᵀ + b_c."""
    cdef Py_ssize_t G = 4 * H, b, k
    for b in range(b0, b1):
        if not done[b]:
            memcpy(a + b * G, P + tokens[b * T + t - 1] * G, G * sizeof(floating))
    if t > 1 and use_smm(b1 - b0):
        smm(b1 - b0, G, H, h + b0 * H, H, WT, G, True, a + b0 * G, G)
    elif t > 1:
        gemm(c'N', c'T', <int>(b1 - b0), <int>G, <int>H, <floating>1, h + b0 * H, <int>H, W_hh, <int>H,
             <floating>1, a + b0 * G, <int>G)
    for b in range(b0, b1):
        if not done[b]:
            cell(a + b * G, c + b * H, cn + b * H, h + b * H, H)
            memcpy(c + b * H, cn + b * H, H * sizeof(floating))
    for b in range(b0, b1):
        for k in range(Kc):
            z[b * Kc + k] = bc[k]
    if use_smm(b1 - b0):
        smm(b1 - b0, Kc, H, h + b0 * H, H, WcT, Kc, True, z + b0 * Kc, Kc)
    else:
        gemm(c'N', c'T', <int>(b1 - b0), <int>Kc, <int>H, <floating>1, h + b0 * H, <int>H, Wc, <int>H,
             <floating>1, z + b0 * Kc, <int>Kc)


cdef void _rollout_rows(const floating* P, const floating* W_hh, const floating* WT, const floating* Wc,
                        const floating* WcT, const floating* bc, bint has_value, const floating* Pr,
                        const floating* W_hhr, const floating* WTr, const floating* Wcr, const floating* WcTr,
                        const floating* bcr, bint has_ref, int64_t* tokens, const int64_t* prompt_len,
                        const double* u, Py_ssize_t V, double alpha, double eps, int kind, int64_t eos_id,
                        double* mask, double* am, double* logp, double* ref_logp, double* vals,
                        floating* h, floating* c, floating* cn, floating* a, floating* z, floating* hr,
                        floating* cr, floating* cnr, floating* ar, floating* zr, floating* e, uint8_t* done,
                        Py_ssize_t T,
                        Py_ssize_t H, Py_ssize_t Kc, Py_ssize_t Hr, Py_ssize_t Kr,
                        Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Rows [b0, b1) through the whole sampling loop."""
    cdef Py_ssize_t b, t
    memset(h + b0 * H, 0, (b1 - b0) * H * sizeof(floating))
    memset(c + b0 * H, 0, (b1 - b0) * H * sizeof(floating))
    if has_ref:
        memset(hr + b0 * Hr, 0, (b1 - b0) * Hr * sizeof(floating))
        memset(cr + b0 * Hr, 0, (b1 - b0) * Hr * sizeof(floating))
    for b in range(b0, b1):
        done[b] = 0
        mask[b * T] = 1
    for t in range(1, T):
        _step_body(P, W_hh, WT, Wc, WcT, bc, h, c, cn, a, z, tokens, done, T, t, H, Kc, b0, b1)
        if has_ref:
            _step_body(Pr, W_hhr, WTr, Wcr, WcTr, bcr, hr, cr, cnr, ar, zr, tokens, done, T, t, Hr, Kr, b0, b1)
        for b in range(b0, b1):
            _policy_row(z, Kc, has_value, zr, Kr, has_ref, tokens, prompt_len, u, V, alpha, eps, kind,
                        eos_id, mask, am, logp, ref_logp, vals, done, e, b, t, T)


def rollout(const floating[:, ::1] P, const floating[:, ::1] W_hh, const floating[:, ::1] WT,
            const floating[:, ::1] Wc, const floating[:, ::1] WcT, const floating[::1] bc, bint has_value,
            const floating[:, ::1] Pr, const floating[:, ::1] W_hhr, const floating[:, ::1] WTr,
            const floating[:, ::1] Wcr, const floating[:, ::1] WcTr, const floating[::1] bcr, bint has_ref,
            int64_t[:, ::1] tokens, const int64_t[::1] prompt_len, const double[:, ::1] u,
            Py_ssize_t V, double alpha, double eps, int kind, int64_t eos_id,
            double[:, ::1] mask, double[:, ::1] am, double[:, ::1] logp, double[:, ::1] ref_logp,
            double[:, ::1] vals, floating[:, ::1] h, floating[:, ::1] c, floating[:, ::1] cn, floating[:, ::1] a,
            floating[:, ::1] z, floating[:, ::1] hr, floating[:, ::1] cr, floating[:, ::1] cnr, floating[:, ::1] ar,
            floating[:, ::1] zr, floating[:, ::1] work, uint8_t[::1] done, int nchunks=1):
    """Sample every row. tokens (B, T) holds the prompts (PAD after) on entry, the batch on exit.

    P (V, 4H) input table, W_hh (4H, H) and WT = W_hhᵀ, Wc (K, H) and WcT = Wcᵀ, bc (K,): the
    stacked head [head; value] (WT, WcT are read only when blocks go to smm: see use_smm) — and the same for the reference policy (Pr, W_hhr, WTr, Wcr, WcTr,
    bcr) when has_ref. Outputs (B, T)
    float64, zero on entry: mask, am (action mask), logp, ref_logp, vals. Work: h, c, cn (B, H),
    a (B, 4H), z (B, K); hr, cr, cnr, ar, zr likewise; work (n, V) with n ≥ nchunks; done (B,).
    nchunks (≤ B): blocks of rows, each run through the whole loop on its own OpenMP thread.
    """
    cdef Py_ssize_t B = tokens.shape[0], T = tokens.shape[1], H = W_hh.shape[1], Kc = Wc.shape[0]
    cdef Py_ssize_t Hr = W_hhr.shape[1], Kr = Wcr.shape[0], ch, b0, b1
    cdef floating* w = &work[0, 0]
    with nogil:
        if nchunks > 1:
            for ch in prange(nchunks, num_threads=nchunks, schedule="static"):
                b0 = (B * ch) // nchunks
                b1 = (B * (ch + 1)) // nchunks
                _rollout_rows(&P[0, 0], &W_hh[0, 0], &WT[0, 0], &Wc[0, 0], &WcT[0, 0], &bc[0], has_value,
                              &Pr[0, 0], &W_hhr[0, 0], &WTr[0, 0], &Wcr[0, 0], &WcTr[0, 0], &bcr[0], has_ref, &tokens[0, 0], &prompt_len[0], &u[0, 0], V, alpha,
                              eps, kind, eos_id, &mask[0, 0], &am[0, 0], &logp[0, 0], &ref_logp[0, 0],
                              &vals[0, 0], &h[0, 0], &c[0, 0], &cn[0, 0], &a[0, 0], &z[0, 0], &hr[0, 0], &cr[0, 0], &cnr[0, 0],
                              &ar[0, 0], &zr[0, 0], w + ch * V, &done[0], T, H, Kc, Hr, Kr, b0, b1)
        else:
            _rollout_rows(&P[0, 0], &W_hh[0, 0], &WT[0, 0], &Wc[0, 0], &WcT[0, 0], &bc[0], has_value,
                          &Pr[0, 0], &W_hhr[0, 0], &WTr[0, 0], &Wcr[0, 0], &WcTr[0, 0], &bcr[0], has_ref, &tokens[0, 0], &prompt_len[0], &u[0, 0], V, alpha,
                          eps, kind, eos_id, &mask[0, 0], &am[0, 0], &logp[0, 0], &ref_logp[0, 0],
                          &vals[0, 0], &h[0, 0], &c[0, 0], &cn[0, 0], &a[0, 0], &z[0, 0], &hr[0, 0], &cr[0, 0], &cnr[0, 0],
                          &ar[0, 0], &zr[0, 0], w, &done[0], T, H, Kc, Hr, Kr, 0, B)
