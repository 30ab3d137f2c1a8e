"""Numba twin of ``rlhf_ref/lstm.py``: the LSTM body, forward and backpropagation through time.

Same equations, gate order (i, f, g, o) and padding rule as the reference (state carried
unchanged over padding; padded ids never read). What differs is only the layout and the
order of the sums:

* **Time-major buffers** so that every per-step matrix product is one contiguous product:
  ``gates (T, B, 4H)`` post-activation, ``cs (T+1, B, H)`` and ``hs (T+1, B, H)`` with
  ``cs[t+1] = c_t``, ``hs[t+1] = h_t`` (carried over padding) and ``hs[0] = h_{-1} = 0``.
  So ``hs[t]`` is the state token t is chosen in (the reference's ``hprev[:, t]``).
* **The input projection by vocabulary row.** ``x_t W_ihᵀ + b_ih + b_hh`` depends on the
  token only, so when the batch has at least as many positions as the vocabulary has rows
  (``B·T ≥ V``) it is read from the table ``P = E W_ihᵀ + b_ih + b_hh`` (V, 4H), one GEMM;
  the backward pass sums ``∂L/∂a`` per token into ``dP`` (V, 4H) and then
  ``dW_ih = dPᵀ E`` and ``dE = dP W_ih``: two (V × 4H × E) GEMMs in place of two
  (B·T × 4H × E) ones. When the batch reads at most ``NUMBA_TABLE_ROWS_FRACTION`` of the rows,
  only those are computed and backpropagated (``*_rows``). Otherwise ``X = E[ids]`` is gathered
  and multiplied directly.
* **Only the recurrent product is per step** (``h_{t-1} W_hhᵀ`` forward, ``da_t W_hh``
  backward); ``dW_hh = Σ_t da_tᵀ h_{t-1}`` is one (4H × B·T × H) GEMM after the loop, and
  ``da`` is written over ``gates`` as the loop goes, and the heads' gradient enters one step at
  a time, so the backward pass keeps gates, cell states, ``hs`` (which the heads need anyway)
  and the logits, and nothing more of size B·T.
* ``tanh(c_t)`` is recomputed in the backward pass rather than stored.
* **Rows are independent in the recurrences**, so ``forward``/``backward`` (one block, BLAS may
  thread each product) have ``*_par`` twins that run row blocks on Numba's threads, each block
  with its own single-threaded products; one body (``*_rows``) serves both. With 2 cores this
  beat one block with 2 BLAS threads at every benchmark size.

The matrix products are ``np.dot`` inside the kernels (SciPy's BLAS, one runtime for the
whole hot loop), except the per-step products of blocks of ``_config.NUMBA_SMM_ROWS`` rows with at
least 64 columns and rows·K ≤ 2^18 (``use_smm``), which run in ``smm`` (register tiles; OpenBLAS packs the weights on every call, which at 16 rows
costs more than the product); the elementwise work is fused loops over SIMD ``vsigmoid``/``vtanh``.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from numba import carray

from ._nb_common import ELEMENTWISE, TILE_COLS as NB, cst, fma, kernel, tile_buffer, tile_rows, vsigmoid, vtanh


@kernel
def transpose(W, Wt):
    """Wt = Wᵀ (Wt may be a column slice of a wider array), by 8 × 8 blocks: constant trip counts, so
    LLVM unrolls each block into shuffles (at (512, 128) float32, 3× faster than 16-row strips and
    NumPy's ``ascontiguousarray(W.T)``; 5× at (2048, 512), measured); the edges by plain loops."""
    R, C = W.shape
    if Wt.shape[0] != C or Wt.shape[1] != R:
        raise ValueError("transpose: Wt must be (C, R) for W (R, C)")
    R8, C8 = R - R % 8, C - C % 8
    for r0 in range(0, R8, 8):
        for c0 in range(0, C8, 8):
            for c in range(8):
                d = Wt[c0 + c, r0:r0 + 8]
                for r in range(8):
                    d[r] = W[r0 + r, c0 + c]
        for c in range(C8, C):
            for r in range(r0, r0 + 8):
                Wt[c, r] = W[r, c]
    for r in range(R8, R):
        for c in range(C):
            Wt[c, r] = W[r, c]


SMM_MAX_AK = 1 << 18      # rows × K: smm does not block over k, so A must stay in L2 (1 MiB of float32)


@kernel
def use_smm(rows, K, N, smm_min, smm_max):
    """Whether a per-step product (rows × K) (K × N) goes to ``smm``: smm_min..smm_max rows, at least
    one full tile of columns (narrower products run its plain edge loops only, slower than BLAS) and
    rows·K ≤ SMM_MAX_AK (measured float32: 128 × 2048 × 512 87 GFLOP/s vs OpenBLAS 79, 256 × 2048 × 512
    36 vs 38)."""
    return smm_min <= rows <= smm_max and N >= NB and rows * K <= SMM_MAX_AK


@kernel
def smm(A, Bt, C):
    """C (M×N) = A (M×K) Bt (K×N), single-threaded, for the per-step products of a few rows (M = the
    rows of a block; ``use_smm`` decides): OpenBLAS packs the whole of Bt (the weights) on every
    call, which at M = 16 costs more than the product itself. As the cython backend's ``rr_smm``:
    tiles of MB rows × NB columns (4 × 64 float32, 2 × 64 float64: 16 AVX-512 registers) accumulate
    over k in order in a stack buffer that LLVM promotes to registers (its indices are constants
    once the tile loops are unrolled; measured 100 GFLOP/s at (16, 128) × (128, 576) float32 against
    55 for OpenBLAS); the last N mod NB columns and M mod MB rows go through plain loops. Every entry
    of C is the same chain fma(A[m,k], Bt[k,n], ·) over k = 0..K−1 from 0, whichever path computes
    it, so a row's result depends neither on M nor on the row split.
    """
    M, K = A.shape
    N = Bt.shape[1]
    if Bt.shape[0] != K or C.shape[0] != M or C.shape[1] != N:
        raise ValueError("smm: A (M, K), Bt (K, N) and C (M, N) do not match")
    MB = tile_rows(A)
    acc = carray(tile_buffer(A), (MB, NB))
    zero = cst(A, 0.0)
    Nt = N - N % NB
    for n0 in range(0, Nt, NB):
        m0 = 0
        while m0 + MB <= M:                                  # MB × NB tiles, in registers
            for m in range(MB):
                for j in range(NB):
                    acc[m, j] = zero
            for k in range(K):
                b = Bt[k, n0:n0 + NB]
                for m in range(MB):
                    a = A[m0 + m, k]
                    for j in range(NB):
                        acc[m, j] = fma(a, b[j], acc[m, j])
            for m in range(MB):
                c = C[m0 + m, n0:n0 + NB]
                for j in range(NB):
                    c[j] = acc[m, j]
            m0 += MB
        for m in range(m0, M):                               # the last M mod MB rows: 1 × NB tiles
            for j in range(NB):
                acc[0, j] = zero
            for k in range(K):
                b = Bt[k, n0:n0 + NB]
                a = A[m, k]
                for j in range(NB):
                    acc[0, j] = fma(a, b[j], acc[0, j])
            c = C[m, n0:n0 + NB]
            for j in range(NB):
                c[j] = acc[0, j]
    if Nt < N:                                               # the last N mod NB columns, in C itself
        for m in range(M):
            c = C[m, Nt:N]
            for j in range(N - Nt):
                c[j] = zero
            for k in range(K):
                b = Bt[k, Nt:N]
                a = A[m, k]
                for j in range(N - Nt):
                    c[j] = fma(a, b[j], c[j])


@kernel
def input_table(E, W_ih, b_ih, b_hh, P):
    """P (V, 4H) = E W_ihᵀ + b_ih + b_hh: the input projection of every vocabulary row."""
    np.dot(E, W_ih.T, P)
    V, G = P.shape
    for v in range(V):
        for g in range(G):
            P[v, g] += b_ih[g] + b_hh[g]


@kernel
def input_table_rows(E, W_ih, b_ih, b_hh, rows, X, XP, P):
    """``input_table`` for the vocabulary rows ``rows`` only (the tokens a batch reads; P's other rows
    are left unwritten): X (U, E) gathers E[rows], XP (U, 4H) = X W_ihᵀ, then P[rows] = XP + b_ih + b_hh."""
    U = rows.shape[0]
    for i in range(U):
        X[i] = E[rows[i]]
    np.dot(X, W_ih.T, XP)
    G = XP.shape[1]
    for i in range(U):
        v = rows[i]
        for g in range(G):
            P[v, g] = XP[i, g] + (b_ih[g] + b_hh[g])


@kernel
def input_direct(E, W_ih, b_ih, b_hh, ids, lengths, X, XP):
    """XP (T·B, 4H) = E[ids] W_ihᵀ + b_ih + b_hh for every position (time-major); X (T·B, E) is the gather."""
    B, T = ids.shape
    for t in range(T):
        for b in range(B):
            X[t * B + b] = E[ids[b, t]]
    np.dot(X, W_ih.T, XP)
    G = XP.shape[1]
    for p in range(XP.shape[0]):
        for g in range(G):
            XP[p, g] += b_ih[g] + b_hh[g]


@kernel(fastmath=ELEMENTWISE)
def cell(a, x, c_prev, c, h):
    """One row of the fused LSTM step, in place.

    a (4H,) holds h_{t-1} W_hhᵀ on entry and the post-activation gates (i, f, g, o) on exit;
    x (4H,) is the input projection with both biases; writes c_t into c and h_t into h.
    """
    H = c.shape[0]
    # (loops run from 0 with an offset: LLVM does not vectorise these over range(2H, 3H))
    for j in range(2 * H):                                   # i, f
        a[j] = vsigmoid(a[j] + x[j])
    for j in range(H):                                       # g
        a[2 * H + j] = vtanh(a[2 * H + j] + x[2 * H + j])
    for j in range(H):                                       # o
        a[3 * H + j] = vsigmoid(a[3 * H + j] + x[3 * H + j])
    for j in range(H):
        cj = a[H + j] * c_prev[j] + a[j] * a[2 * H + j]      # c_t = f ⊙ c_{t-1} + i ⊙ g
        c[j] = cj
        h[j] = a[3 * H + j] * vtanh(cj)                      # h_t = o ⊙ tanh(c_t)


@kernel
def forward_rows(P, XP, use_table, ids, lengths, Wt_hh, gates, cs, hs, smm_min, smm_max, r0, r1):
    """The masked LSTM over rows r0:r1 of the batch (rows are independent), time-major.

    P (V, 4H) with use_table, else XP (T·B, 4H): the input projection (both biases in).
    ids (B, T) int64 (0 on padding), lengths (B,) real tokens per row; Wt_hh = W_hhᵀ (H, 4H),
    C-contiguous (OpenBLAS is 2–3× faster on the B = 1 product in this layout, measured); blocks of
    smm_min..smm_max rows multiply in ``smm``.
    Fills gates (T, B, 4H), cs and hs (T+1, B, H) on these rows, from hs[0] = cs[0] = 0;
    padding carries (h, c).
    """
    B, T = ids.shape
    hs[0, r0:r1] = 0.0
    cs[0, r0:r1] = 0.0
    for t in range(T):
        if use_smm(r1 - r0, Wt_hh.shape[0], Wt_hh.shape[1], smm_min, smm_max):   # h_{t-1} W_hhᵀ (rows, 4H)
            smm(hs[t, r0:r1], Wt_hh, gates[t, r0:r1])
        else:
            np.dot(hs[t, r0:r1], Wt_hh, gates[t, r0:r1])
        for b in range(r0, r1):
            if t < lengths[b]:
                x = P[ids[b, t]] if use_table else XP[t * B + b]
                cell(gates[t, b], x, cs[t, b], cs[t + 1, b], hs[t + 1, b])
            else:                                            # padding carries the state unchanged
                cs[t + 1, b] = cs[t, b]
                hs[t + 1, b] = hs[t, b]


@kernel
def forward(P, XP, use_table, ids, lengths, Wt_hh, gates, cs, hs, smm_min, smm_max):
    """``forward_rows`` over the whole batch in one block (BLAS may thread each product)."""
    forward_rows(P, XP, use_table, ids, lengths, Wt_hh, gates, cs, hs, smm_min, smm_max, 0, ids.shape[0])


@kernel(parallel=True)
def forward_par(P, XP, use_table, ids, lengths, Wt_hh, gates, cs, hs, smm_min, smm_max, nblk):
    """``forward_rows`` over nblk row blocks, one per thread (the caller holds BLAS to one thread).
    The split depends on nblk only: a fixed thread count gives bit-identical results."""
    B = ids.shape[0]
    for i in prange(nblk):
        forward_rows(P, XP, use_table, ids, lengths, Wt_hh, gates, cs, hs, smm_min, smm_max,
                     i * B // nblk, (i + 1) * B // nblk)


@kernel(fastmath=ELEMENTWISE)
def _cell_backward(a, c_prev, c, dh, dc):
    """One row of backprop through the step, in place: a (4H,) gates → ∂L/∂(pre-activations);
    dh, dc (H,) hold ∂L/∂h_t, ∂L/∂c_t on entry; dc becomes ∂L/∂c_{t-1} (f ⊙ dc_t)."""
    H = c.shape[0]
    one = cst(a, 1.0)
    for j in range(H):
        i, f, g, o = a[j], a[H + j], a[2 * H + j], a[3 * H + j]
        tc = vtanh(c[j])
        # backprop through h_t = o ⊙ tanh(c_t)
        do = dh[j] * tc
        dct = dc[j] + dh[j] * o * (one - tc * tc)
        # backprop through c_t = f ⊙ c_{t-1} + i ⊙ g, then the gate nonlinearities
        a[j] = dct * g * i * (one - i)
        a[H + j] = dct * c_prev[j] * f * (one - f)
        a[2 * H + j] = dct * i * (one - g * g)
        a[3 * H + j] = do * o * (one - o)
        dc[j] = dct * f                                      # dc_{t-1} = f ⊙ dc_t


@kernel
def backward_rows(gates, cs, hs, lengths, Wt_hh, W_hh, dlogits, Wc, has_heads, dh, dc, tmp, tmp2,
                  smm_min, smm_max, r0, r1):
    """Backpropagation through time over rows r0:r1, in place.

    The heads' gradient enters step by step: ∂L/∂h_t = dlogits[t+1] Wc (the heads read h_t at
    position t+1), one small product per step instead of a (T, B, H) buffer — dlogits (T·B, K)
    time-major and Wc (K, H), used when has_heads.
    dh, dc (B, H): ∂L/∂h, ∂L/∂c after the last step on entry (dh_final, dc_final);
    ∂L/∂h₀, ∂L/∂c₀ on exit. gates (T, B, 4H) becomes da, ∂L/∂(pre-activations), 0 on padding.
    tmp, tmp2 (B, H) are scratch; Wt_hh = W_hhᵀ (H, 4H) as in ``forward``, W_hh (4H, H) C-contiguous
    (what ``smm`` reads for blocks of smm_min..smm_max rows).
    """
    small = use_smm(r1 - r0, Wt_hh.shape[1], Wt_hh.shape[0], smm_min, smm_max)
    T, B = gates.shape[0], gates.shape[1]
    for t in range(T - 1, -1, -1):
        if has_heads and t + 1 < T:
            if use_smm(r1 - r0, Wc.shape[0], Wc.shape[1], smm_min, smm_max):
                smm(dlogits[(t + 1) * B + r0:(t + 1) * B + r1], Wc, tmp2[r0:r1])
            else:
                np.dot(dlogits[(t + 1) * B + r0:(t + 1) * B + r1], Wc, tmp2[r0:r1])
        for b in range(r0, r1):
            if has_heads and t + 1 < T:
                dh[b] += tmp2[b]                             # the output h_t feeds the heads at t+1
            if t < lengths[b]:
                _cell_backward(gates[t, b], cs[t, b], cs[t + 1, b], dh[b], dc[b])
            else:
                gates[t, b] = 0.0                            # padding: no gradient, dh and dc pass through
        if small:                                            # dh_{t-1} = da_t W_hh
            smm(gates[t, r0:r1], W_hh, tmp[r0:r1])
        else:
            np.dot(gates[t, r0:r1], Wt_hh.T, tmp[r0:r1])
        for b in range(r0, r1):
            if t < lengths[b]:
                dh[b] = tmp[b]


@kernel
def backward(gates, cs, hs, lengths, Wt_hh, W_hh, dlogits, Wc, has_heads, dh, dc, tmp, tmp2, smm_min, smm_max):
    """``backward_rows`` over the whole batch in one block."""
    backward_rows(gates, cs, hs, lengths, Wt_hh, W_hh, dlogits, Wc, has_heads, dh, dc, tmp, tmp2, smm_min, smm_max,
                  0, gates.shape[1])


@kernel(parallel=True)
def backward_par(gates, cs, hs, lengths, Wt_hh, W_hh, dlogits, Wc, has_heads, dh, dc, tmp, tmp2, smm_min, smm_max,
                 nblk):
    """``backward_rows`` over nblk row blocks, one per thread (as ``forward_par``)."""
    B = gates.shape[1]
    for i in prange(nblk):
        backward_rows(gates, cs, hs, lengths, Wt_hh, W_hh, dlogits, Wc, has_heads, dh, dc, tmp, tmp2,
                      smm_min, smm_max, i * B // nblk, (i + 1) * B // nblk)


@kernel
def weight_grads(DA, HS, dW_hh, db):
    """dW_hh = DAᵀ HS (one GEMM over every position), db = Σ DA.  DA (N, 4H), HS (N, H)."""
    np.dot(DA.T, HS, dW_hh)
    db[:] = 0.0
    for p in range(DA.shape[0]):
        for g in range(DA.shape[1]):
            db[g] += DA[p, g]


@kernel
def _sum_per_token(DA, ids, dP):
    """dP (V, 4H) = the rows of DA (T·B, 4H, time-major) summed per token id ids (B, T)."""
    B, T = ids.shape
    G = DA.shape[1]
    dP[:] = 0.0
    for t in range(T):                                       # a fixed order: deterministic
        for b in range(B):
            v = ids[b, t]
            for g in range(G):
                dP[v, g] += DA[t * B + b, g]


@kernel
def input_backward_table(DA, ids, E, W_ih, dP, dW_ih, dE):
    """Sum da per token into dP (V, 4H), then dW_ih = dPᵀ E and dE = dP W_ih.  DA (T·B, 4H) time-major."""
    _sum_per_token(DA, ids, dP)
    np.dot(dP.T, E, dW_ih)
    np.dot(dP, W_ih, dE)


@kernel
def input_backward_table_rows(DA, ids, E, W_ih, rows, dP, X, dPu, dW_ih, dEu, dE):
    """``input_backward_table`` when the batch reads only the vocabulary rows ``rows`` (U of them): dP
    summed per token as there, then the two GEMMs over those U rows (X (U, E), dPu (U, 4H), dEu (U, E)
    scratch): dW_ih = dP[rows]ᵀ E[rows], dE[rows] = dP[rows] W_ih, dE 0 elsewhere."""
    _sum_per_token(DA, ids, dP)
    for i in range(rows.shape[0]):
        dPu[i] = dP[rows[i]]
        X[i] = E[rows[i]]
    np.dot(dPu.T, X, dW_ih)
    np.dot(dPu, W_ih, dEu)
    dE[:] = 0.0
    for i in range(rows.shape[0]):
        dE[rows[i]] = dEu[i]


@kernel
def input_backward_direct(DA, ids, X, W_ih, dX, dW_ih, dE):
    """dW_ih = DAᵀ X, dX = DA W_ih scattered into the embedding rows read."""
    B, T = ids.shape
    np.dot(DA.T, X, dW_ih)
    np.dot(DA, W_ih, dX)
    dE[:] = 0.0
    Ed = dE.shape[1]
    for t in range(T):
        for b in range(B):
            v = ids[b, t]
            for k in range(Ed):
                dE[v, k] += dX[t * B + b, k]
