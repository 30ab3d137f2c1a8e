"""Cython twin of ``rlhf_ref/rollout.py``: batched autoregressive sampling in one kernel call.

The whole time loop runs in C with the GIL released. Per step t = 1 … T−1 (feeding token t−1,
so that h becomes h_{t−1}, the state token t is chosen in), exactly in the reference's order:

1. the input part of the pre-activations is a row of the table P = E W_ihᵀ + b_ih + b_hh
   (``_lstm_cy.input_table``), then one product a += h W_hhᵀ per block of rows (skipped at
   t = 1, where h = 0; ``_common_cy.smm`` for 4..64 rows, and for one row where the instruction-
   set clones are built, when the transposed weights are given (``use_smm``), BLAS otherwise),
   then the fused cell (``_lstm_cy.cell``) per live row;
2. one product for the stacked heads z = h W_cᵀ + b_c (``head`` and, when asked, ``value``);
3. per live row: the mask, the value, and at t ≥ prompt_len the policy and the inverse-CDF draw
   with u[b, t] (``_policy_cy.sample_row``), the log-probability of the drawn token under the
   frozen reference policy when given (which runs beside with its own state), and EOS.

Rows that have ended are not stepped (the reference steps them and discards the result). Rows
are independent through the whole loop, so with ``nchunks > 1`` the batch is cut into blocks of
rows and each OpenMP thread runs its block through all T steps with its own products: no
synchronisation per step (BLAS must run single-threaded meanwhile; the backend sets that). The
entry point checks every shape and the prompt ids (bounds checks are off inside).
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy, memset

from ._common_cy cimport gemm, smm, use_smm
from ._lstm_cy cimport cell
from ._policy_cy cimport sample_row, logprob_row, row_ok

# the policy kind arrives as its code in conventions.POLICY (BOLTZMANN, EPS_GREEDY, GREEDY of _policy_cy.pxd)


cdef inline void need(bint ok, str what) except *:
    """The entry point checks the shapes the kernel relies on (bounds checks are off inside)."""
    if not ok:
        raise ValueError(f"_rollout_cy.rollout: {what}")


# The first element's address, NULL for an empty buffer (an unused argument): &a[0, 0] of an empty
# view is an IndexError in the debug build (RLHF_REF_CYTHON_DEBUG=1, bounds checks on).
cdef inline const floating* cp2(const floating[:, ::1] a):
    return &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL


cdef inline const floating* cp1(const floating[::1] a):
    return &a[0] if a.shape[0] > 0 else NULL


cdef inline floating* p2(floating[:, ::1] a):
    return &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL


cdef inline double* d2(double[:, ::1] a):
    return &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL


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
    # no policy at this state (non-finite α·z): end the row with the status token −1 (−2 for the
    # reference policy) that the backend turns into policy.scores_error; no id outside [0, V) is
    # ever stored where a later step reads it
    if not row_ok(zb, V, alpha, kind):
        tokens[i] = -1
        done[b] = 1
        return
    if has_ref and not row_ok(zr + b * Kr, V, alpha, kind):
        tokens[i] = -2
        done[b] = 1
        return
    tok = sample_row(zb, V, alpha, eps, kind, u[i], e, &lp)
    if tok < 0 or tok >= V:                     # cannot happen on a row_ok row; never index with it
        tokens[i] = -1
        done[b] = 1
        return
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
    if t > 1 and WT != NULL and use_smm(b1 - b0):
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
    if WcT != NULL and use_smm(b1 - b0):
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
    """Sample every row. tokens (B, T) holds the prompts on entry (what follows each prompt is set
    to PAD here, before sampling), the batch on exit.

    P (V, 4H) input table, W_hh (4H, H) and WT = W_hhᵀ, Wc (K, H) and WcT = Wcᵀ, bc (K,): the
    stacked head [head; value]. WT, WcT may be empty: then every block's products go to BLAS
    (blocks of use_smm rows go to smm when they are given). — and the same for the reference policy (Pr, W_hhr, WTr, Wcr, WcTr,
    bcr) when has_ref. Outputs (B, T)
    float64, zero on entry: mask, am (action mask), logp, ref_logp, vals. Work: h, c, cn (B, H),
    a (B, 4H), z (B, K); hr, cr, cnr, ar, zr likewise; work (n, V) with n ≥ nchunks; done (B,).
    nchunks (≤ B): blocks of rows, each run through the whole loop on its own OpenMP thread.
    """
    cdef Py_ssize_t B = tokens.shape[0], T = tokens.shape[1], H = W_hh.shape[1], Kc = Wc.shape[0]
    cdef Py_ssize_t Hr = W_hhr.shape[1], Kr = Wcr.shape[0], ch, b0, b1, V_ = P.shape[0], b, t
    need(H > 0 and W_hh.shape[0] == 4 * H and P.shape[1] == 4 * H and Wc.shape[1] == H and bc.shape[0] == Kc
         and 0 < V <= V_ and Kc >= V + (1 if has_value else 0), "P (V, 4H), W_hh (4H, H), Wc (K, H), bc (K,)")
    need(not has_ref or (Hr > 0 and W_hhr.shape[0] == 4 * Hr and Pr.shape[0] == V_ and Pr.shape[1] == 4 * Hr
                         and Wcr.shape[1] == Hr and bcr.shape[0] == Kr and Kr >= V), "the reference policy's shapes")
    need((WT.shape[0] == H and WT.shape[1] == 4 * H) or WT.shape[0] * WT.shape[1] == 0, "WT is W_hhᵀ or empty")
    need((WcT.shape[0] == H and WcT.shape[1] == Kc) or WcT.shape[0] * WcT.shape[1] == 0, "WcT is Wcᵀ or empty")
    need(not has_ref or (WTr.shape[0] == Hr and WTr.shape[1] == 4 * Hr) or WTr.shape[0] * WTr.shape[1] == 0,
         "WTr is W_hhrᵀ or empty")
    need(not has_ref or (WcTr.shape[0] == Hr and WcTr.shape[1] == Kr) or WcTr.shape[0] * WcTr.shape[1] == 0,
         "WcTr is Wcrᵀ or empty")
    need(prompt_len.shape[0] == B and u.shape[0] == B and u.shape[1] == T and mask.shape[0] == B
         and mask.shape[1] == T and am.shape[0] == B and am.shape[1] == T and logp.shape[0] == B
         and logp.shape[1] == T, "tokens, u, mask, am, logp (B, T), prompt_len (B,)")
    need(not has_ref or (ref_logp.shape[0] == B and ref_logp.shape[1] == T), "ref_logp (B, T)")
    need(not has_value or (vals.shape[0] == B and vals.shape[1] == T), "vals (B, T)")
    need(h.shape[0] == B and h.shape[1] == H and c.shape[0] == B and c.shape[1] == H and cn.shape[0] == B
         and cn.shape[1] == H and a.shape[0] == B and a.shape[1] == 4 * H and z.shape[0] == B and z.shape[1] == Kc,
         "h, c, cn (B, H), a (B, 4H), z (B, K)")
    need(not has_ref or (hr.shape[0] == B and hr.shape[1] == Hr and cr.shape[0] == B and cr.shape[1] == Hr
                         and cnr.shape[0] == B and cnr.shape[1] == Hr and ar.shape[0] == B and ar.shape[1] == 4 * Hr
                         and zr.shape[0] == B and zr.shape[1] == Kr), "the reference policy's work buffers")
    need(1 <= nchunks <= max(B, 1) and work.shape[0] >= nchunks and work.shape[1] >= V and done.shape[0] == B,
         "work (nchunks, V), done (B,), 1 <= nchunks <= B")
    for b in range(B):
        need(1 <= prompt_len[b] <= T, "prompt_len in [1, T]")
        for t in range(prompt_len[b]):
            need(0 <= tokens[b, t] < V, "prompt tokens in [0, V)")
    for b in range(B):                      # after the prompt: PAD (0) until sampled
        for t in range(prompt_len[b], T):
            tokens[b, t] = 0
    if B * T == 0:
        return
    cdef floating* w = &work[0, 0]
    cdef const floating* pWT = cp2(WT)
    cdef const floating* pWcT = cp2(WcT)
    cdef const floating* pWTr = cp2(WTr) if has_ref else NULL
    cdef const floating* pWcTr = cp2(WcTr) if has_ref else NULL
    cdef const floating* pP = cp2(P)
    cdef const floating* pW_hh = cp2(W_hh)
    cdef const floating* pWc = cp2(Wc)
    cdef const floating* pbc = cp1(bc)
    cdef const floating* pPr = cp2(Pr)
    cdef const floating* pW_hhr = cp2(W_hhr)
    cdef const floating* pWcr = cp2(Wcr)
    cdef const floating* pbcr = cp1(bcr)
    cdef double* pref = d2(ref_logp)
    cdef double* pvals = d2(vals)
    cdef floating* ph = p2(h)
    cdef floating* pc = p2(c)
    cdef floating* pcn = p2(cn)
    cdef floating* pa = p2(a)
    cdef floating* pz = p2(z)
    cdef floating* phr = p2(hr)
    cdef floating* pcr = p2(cr)
    cdef floating* pcnr = p2(cnr)
    cdef floating* par = p2(ar)
    cdef floating* pzr = p2(zr)
    with nogil:
        if nchunks > 1:
            for ch in prange(nchunks, num_threads=nchunks, schedule="static"):
                b0 = (B * ch) // nchunks
                b1 = (B * (ch + 1)) // nchunks
                _rollout_rows(pP, pW_hh, pWT, pWc, pWcT, pbc, has_value, pPr, pW_hhr, pWTr, pWcr, pWcTr, pbcr,
                              has_ref, &tokens[0, 0], &prompt_len[0], &u[0, 0], V, alpha, eps, kind, eos_id,
                              &mask[0, 0], &am[0, 0], &logp[0, 0], pref, pvals, ph, pc, pcn, pa, pz, phr, pcr, pcnr,
                              par, pzr, w + ch * V, &done[0], T, H, Kc, Hr, Kr, b0, b1)
        else:
            _rollout_rows(pP, pW_hh, pWT, pWc, pWcT, pbc, has_value, pPr, pW_hhr, pWTr, pWcr, pWcTr, pbcr,
                          has_ref, &tokens[0, 0], &prompt_len[0], &u[0, 0], V, alpha, eps, kind, eos_id,
                          &mask[0, 0], &am[0, 0], &logp[0, 0], pref, pvals, ph, pc, pcn, pa, pz, phr, pcr, pcnr,
                          par, pzr, w, &done[0], T, H, Kc, Hr, Kr, 0, B)
