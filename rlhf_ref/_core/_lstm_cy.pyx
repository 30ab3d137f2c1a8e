"""Cython twin of ``rlhf_ref/lstm.py``: the LSTM body over a batch of sequences, and ``linear``.

The same equations as the reference (its docstring), gate order i, f, g, o. Layout and cost:

* Buffers are **time-major** so that every step's batch is one contiguous block::

      gates (T, B, 4H)   post-activation gates (forward); ∂L/∂(pre-activations) after backward
      cs, hs (T+1, B, H) cs[t+1], hs[t+1] = c, h after token t; cs[0] = hs[0] = 0 (h0 = c0 = 0)

  which is all the backward pass keeps (gates and cell states for every step, DESIGN.md memory
  rule; hs[t] is also the input of the heads at position t).
* The input projection is hoisted out of the time loop: either the **table**
  P = E W_ihᵀ + b_ih + b_hh (V, 4H), one GEMM, then one row copy per token (when V ≤ B·T), or the
  gathered inputs X (T·B, E) times W_ihᵀ in one GEMM. Per step only h W_hhᵀ remains (one BLAS
  call for the batch; skipped at t = 0 where h = 0), then the fused cell per row.
* Backward: per step the fused cell backward per row and one product da W_hh for the batch; then
  the weight gradients as whole-sequence GEMMs: dW_hh = DAᵀ HS, db = Σ DA, and dW_ih, dE from the
  table gradient dP (scatter-add of DA rows by token id, then two GEMMs) or from X.
* Padding: where t ≥ length_b the state is carried (hs[t+1] = hs[t]), the gates row is 0 (so its
  ∂L/∂a is 0 and it adds nothing to any gradient) and the padded id is never read.

Rows are independent inside a step: with ``nthreads > 1`` they are split over OpenMP threads
(``prange``), which changes no result bit (each row is computed by one thread, in one order);
BLAS runs its own threads. Every reduction (db, the scatter-adds) is serial in a fixed order.

    input_table(E, W_ih, b_ih, b_hh, P)
    forward(E, W_ih, W_hh, b_ih, b_hh, ids, lengths, use_table, P, X, gates, cs, hs, nthreads)
    backward(E, W_ih, W_hh, ids, lengths, use_table, P, X, gates, cs, hs, dHS, has_dHS, dh, dc, tmp,
             dE, dW_ih, dW_hh, db, nthreads)
    linear(HS, W, b, out)                       out = HS Wᵀ + b
    linear_backward(HS, W, dout, row0, dW, db, dHS)
    openmp() -> (compiled with OpenMP, max threads)
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from ._common_cy cimport gemm, rr_openmp, rr_max_threads
from ._lstm_cy cimport cell, cell_backward


def openmp():
    """(whether this extension was compiled with OpenMP, omp_get_max_threads() or 1)."""
    return bool(rr_openmp()), int(rr_max_threads())


# ----------------------------------------------------------------------------- forward

cdef void _bias_rows(floating* out, const floating* b_ih, const floating* b_hh,
                     Py_ssize_t n, Py_ssize_t G) noexcept nogil:
    cdef Py_ssize_t r, k
    for r in range(n):
        for k in range(G):
            out[r * G + k] = b_ih[k] + b_hh[k]


cdef void _input_table(const floating* E, const floating* W_ih, const floating* b_ih, const floating* b_hh,
                       floating* P, Py_ssize_t V, Py_ssize_t Ed, Py_ssize_t G) noexcept nogil:
    # P (V, G) = E W_ihᵀ + b_ih + b_hh: the input part of the pre-activations for every token id
    _bias_rows(P, b_ih, b_hh, V, G)
    gemm(c'N', c'T', <int>V, <int>G, <int>Ed, <floating>1, E, <int>Ed, W_ih, <int>Ed, <floating>1, P, <int>G)


def input_table(const floating[:, ::1] E, const floating[:, ::1] W_ih, const floating[::1] b_ih,
                const floating[::1] b_hh, floating[:, ::1] P):
    """P (V, 4H) = E W_ihᵀ + b_ih + b_hh."""
    with nogil:
        _input_table(&E[0, 0], &W_ih[0, 0], &b_ih[0], &b_hh[0], &P[0, 0], E.shape[0], E.shape[1], W_ih.shape[0])


cdef inline void _forward_row(floating* gates, floating* cs, floating* hs, const int64_t* lengths,
                              Py_ssize_t t, Py_ssize_t b, Py_ssize_t B, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t G = 4 * H
    cdef floating* a = gates + (t * B + b) * G
    cdef Py_ssize_t now = (t * B + b) * H, nxt = ((t + 1) * B + b) * H
    if t < lengths[b]:
        cell(a, cs + now, cs + nxt, hs + nxt, H)
    else:
        # padding carries the state unchanged; its gates are 0 (no gradient flows through it)
        memcpy(cs + nxt, cs + now, H * sizeof(floating))
        memcpy(hs + nxt, hs + now, H * sizeof(floating))
        memset(a, 0, G * sizeof(floating))


cdef void _forward(const floating* E, const floating* W_ih, const floating* W_hh,
                   const floating* b_ih, const floating* b_hh, const int64_t* ids, const int64_t* lengths,
                   bint use_table, floating* P, floating* X, floating* gates, floating* cs, floating* hs,
                   Py_ssize_t T, Py_ssize_t B, Py_ssize_t V, Py_ssize_t Ed, Py_ssize_t H, int nthreads) noexcept nogil:
    cdef Py_ssize_t G = 4 * H, t, b, r, k
    cdef floating* row
    # the input part of the pre-activations for every position: gates[t, b] = W_ih x + b_ih + b_hh
    if use_table:
        _input_table(E, W_ih, b_ih, b_hh, P, V, Ed, G)
        for t in range(T):
            for b in range(B):
                row = gates + (t * B + b) * G
                if t < lengths[b]:
                    memcpy(row, P + ids[t * B + b] * G, G * sizeof(floating))
    else:
        for t in range(T):
            for b in range(B):
                r = t * B + b
                if t < lengths[b]:
                    memcpy(X + r * Ed, E + ids[r] * Ed, Ed * sizeof(floating))
                else:
                    memset(X + r * Ed, 0, Ed * sizeof(floating))
        _bias_rows(gates, b_ih, b_hh, T * B, G)
        gemm(c'N', c'T', <int>(T * B), <int>G, <int>Ed, <floating>1, X, <int>Ed, W_ih, <int>Ed,
             <floating>1, gates, <int>G)
    memset(cs, 0, B * H * sizeof(floating))
    memset(hs, 0, B * H * sizeof(floating))
    for t in range(T):
        if t > 0:       # gates[t] += h_{t-1} W_hhᵀ (h is 0 at t = 0)
            gemm(c'N', c'T', <int>B, <int>G, <int>H, <floating>1, hs + t * B * H, <int>H, W_hh, <int>H,
                 <floating>1, gates + t * B * G, <int>G)
        if nthreads > 1 and B > 1:
            for b in prange(B, num_threads=nthreads, schedule="static"):
                _forward_row(gates, cs, hs, lengths, t, b, B, H)
        else:
            for b in range(B):
                _forward_row(gates, cs, hs, lengths, t, b, B, H)


def forward(const floating[:, ::1] E, const floating[:, ::1] W_ih, const floating[:, ::1] W_hh,
            const floating[::1] b_ih, const floating[::1] b_hh, const int64_t[:, ::1] ids,
            const int64_t[::1] lengths, bint use_table, floating[:, ::1] P, floating[:, ::1] X,
            floating[:, :, ::1] gates, floating[:, :, ::1] cs, floating[:, :, ::1] hs, int nthreads=1):
    """The body forward over a time-major batch.

    ids (T, B) token ids (0 on padding), lengths (B,). use_table: P (V, 4H) is filled and used;
    else X (T·B, E) receives the gathered inputs (kept for the backward). Outputs gates, cs, hs
    as in the module docstring.
    """
    cdef Py_ssize_t T = ids.shape[0], B = ids.shape[1]
    with nogil:
        _forward(&E[0, 0], &W_ih[0, 0], &W_hh[0, 0], &b_ih[0], &b_hh[0], &ids[0, 0], &lengths[0],
                 use_table, &P[0, 0], &X[0, 0], &gates[0, 0, 0], &cs[0, 0, 0], &hs[0, 0, 0],
                 T, B, E.shape[0], E.shape[1], W_hh.shape[1], nthreads)


# ----------------------------------------------------------------------------- backward

cdef inline void _backward_row(floating* gates, const floating* cs, const floating* dHS, bint has_dHS,
                               floating* dh, floating* dc, const int64_t* lengths,
                               Py_ssize_t t, Py_ssize_t T, Py_ssize_t b, Py_ssize_t B, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating* dhb = dh + b * H
    cdef const floating* up
    if t >= lengths[b]:
        return              # padding passes dh and dc through; its gates row is 0
    if has_dHS and t + 1 < T:
        # the output after token t is hs[t+1], read by the heads at position t+1
        up = dHS + ((t + 1) * B + b) * H
        for j in range(H):
            dhb[j] = dhb[j] + up[j]
    cell_backward(gates + (t * B + b) * 4 * H, cs + (t * B + b) * H, cs + ((t + 1) * B + b) * H,
                  dhb, dc + b * H, H)


cdef void _backward(const floating* E, const floating* W_ih, const floating* W_hh, const int64_t* ids,
                    const int64_t* lengths, bint use_table, floating* P, floating* X, floating* gates,
                    const floating* cs, const floating* hs, const floating* dHS, bint has_dHS,
                    floating* dh, floating* dc, floating* tmp,
                    floating* dE, floating* dW_ih, floating* dW_hh, floating* db,
                    Py_ssize_t T, Py_ssize_t B, Py_ssize_t V, Py_ssize_t Ed, Py_ssize_t H, int nthreads) noexcept nogil:
    cdef Py_ssize_t G = 4 * H, t, b, r, k, minlen = T
    cdef floating* src
    cdef floating* dst
    for b in range(B):
        if lengths[b] < minlen:
            minlen = lengths[b]
    for t in range(T - 1, -1, -1):
        if nthreads > 1 and B > 1:
            for b in prange(B, num_threads=nthreads, schedule="static"):
                _backward_row(gates, cs, dHS, has_dHS, dh, dc, lengths, t, T, b, B, H)
        else:
            for b in range(B):
                _backward_row(gates, cs, dHS, has_dHS, dh, dc, lengths, t, T, b, B, H)
        if t == 0:
            break           # ∂L/∂h0 is not needed (h0 = 0 is no parameter)
        # dh_{t-1} = da_t W_hh on the rows that are real at t; padding rows keep theirs
        if t < minlen:
            gemm(c'N', c'N', <int>B, <int>H, <int>G, <floating>1, gates + t * B * G, <int>G, W_hh, <int>H,
                 <floating>0, dh, <int>H)
        else:
            gemm(c'N', c'N', <int>B, <int>H, <int>G, <floating>1, gates + t * B * G, <int>G, W_hh, <int>H,
                 <floating>0, tmp, <int>H)
            for b in range(B):
                if t < lengths[b]:
                    memcpy(dh + b * H, tmp + b * H, H * sizeof(floating))
    # weight gradients, whole-sequence: DA = gates (T·B, G), HS = hs[0:T] (T·B, H) (hs[0] = 0)
    gemm(c'T', c'N', <int>G, <int>H, <int>((T - 1) * B), <floating>1, gates + B * G, <int>G,
         hs + B * H, <int>H, <floating>0, dW_hh, <int>H)
    memset(db, 0, G * sizeof(floating))
    for r in range(T * B):
        src = gates + r * G
        for k in range(G):
            db[k] = db[k] + src[k]
    if use_table:
        # dP[v] = Σ of the DA rows of the positions that read token v (P's buffer is reused)
        memset(P, 0, V * G * sizeof(floating))
        for t in range(T):
            for b in range(B):
                if t < lengths[b]:
                    src = gates + (t * B + b) * G
                    dst = P + ids[t * B + b] * G
                    for k in range(G):
                        dst[k] = dst[k] + src[k]
        gemm(c'T', c'N', <int>G, <int>Ed, <int>V, <floating>1, P, <int>G, E, <int>Ed, <floating>0, dW_ih, <int>Ed)
        gemm(c'N', c'N', <int>V, <int>Ed, <int>G, <floating>1, P, <int>G, W_ih, <int>Ed, <floating>0, dE, <int>Ed)
    else:
        gemm(c'T', c'N', <int>G, <int>Ed, <int>(T * B), <floating>1, gates, <int>G, X, <int>Ed,
             <floating>0, dW_ih, <int>Ed)
        # dX = DA W_ih into X's buffer, then scatter-add into the embedding rows read
        gemm(c'N', c'N', <int>(T * B), <int>Ed, <int>G, <floating>1, gates, <int>G, W_ih, <int>Ed,
             <floating>0, X, <int>Ed)
        memset(dE, 0, V * Ed * sizeof(floating))
        for t in range(T):
            for b in range(B):
                if t < lengths[b]:
                    src = X + (t * B + b) * Ed
                    dst = dE + ids[t * B + b] * Ed
                    for k in range(Ed):
                        dst[k] = dst[k] + src[k]


def backward(const floating[:, ::1] E, const floating[:, ::1] W_ih, const floating[:, ::1] W_hh,
             const int64_t[:, ::1] ids, const int64_t[::1] lengths, bint use_table,
             floating[:, ::1] P, floating[:, ::1] X, floating[:, :, ::1] gates,
             const floating[:, :, ::1] cs, const floating[:, :, ::1] hs,
             const floating[:, ::1] dHS, bint has_dHS, floating[:, ::1] dh, floating[:, ::1] dc,
             floating[:, ::1] tmp, floating[:, ::1] dE, floating[:, ::1] dW_ih, floating[:, ::1] dW_hh,
             floating[::1] db, int nthreads=1):
    """Backpropagation through time after ``forward`` (same buffers).

    dHS (T·B, H): ∂L/∂hs[0:T] from the heads (read when has_dHS; hs[t+1] is the output after
    token t). dh, dc (B, H): ∂L/∂ of the final state on entry (e.g. the reward head), scratch
    after. tmp (B, H) scratch. Outputs dE, dW_ih, dW_hh, db (= ∂L/∂b_ih = ∂L/∂b_hh). gates
    holds ∂L/∂(pre-activations) afterwards; P or X are overwritten.
    """
    cdef Py_ssize_t T = ids.shape[0], B = ids.shape[1]
    with nogil:
        _backward(&E[0, 0], &W_ih[0, 0], &W_hh[0, 0], &ids[0, 0], &lengths[0], use_table, &P[0, 0], &X[0, 0],
                  &gates[0, 0, 0], &cs[0, 0, 0], &hs[0, 0, 0], &dHS[0, 0], has_dHS, &dh[0, 0], &dc[0, 0],
                  &tmp[0, 0], &dE[0, 0], &dW_ih[0, 0], &dW_hh[0, 0], &db[0],
                  T, B, E.shape[0], E.shape[1], W_hh.shape[1], nthreads)


# ----------------------------------------------------------------------------- linear heads

def linear(const floating[:, ::1] HS, const floating[:, ::1] W, const floating[::1] b, floating[:, ::1] out):
    """out (N, K) = HS (N, H) Wᵀ + b: lstm.linear for a stack of rows."""
    cdef Py_ssize_t N = HS.shape[0], H = HS.shape[1], K = W.shape[0], r, k
    with nogil:
        for r in range(N):
            for k in range(K):
                out[r, k] = b[k]
        gemm(c'N', c'T', <int>N, <int>K, <int>H, <floating>1, &HS[0, 0], <int>H, &W[0, 0], <int>H,
             <floating>1, &out[0, 0], <int>K)


def linear_backward(const floating[:, ::1] HS, const floating[:, ::1] W, const floating[:, ::1] dout,
                    Py_ssize_t row0, floating[:, ::1] dW, floating[::1] db, floating[:, ::1] dHS):
    """Backprop through out = HS Wᵀ + b: dW = doutᵀ HS, db = Σ dout, dHS = dout W.

    Rows below row0 of dout are known to be 0 (position 0, read by no head): they are skipped
    and dHS there is set to 0.
    """
    cdef Py_ssize_t N = HS.shape[0], H = HS.shape[1], K = W.shape[0], r, k
    with nogil:
        gemm(c'T', c'N', <int>K, <int>H, <int>(N - row0), <floating>1, &dout[0, 0] + row0 * K, <int>K,
             &HS[0, 0] + row0 * H, <int>H, <floating>0, &dW[0, 0], <int>H)
        for k in range(K):
            db[k] = 0
        for r in range(row0, N):
            for k in range(K):
                db[k] = db[k] + dout[r, k]
        for r in range(row0):
            for k in range(H):
                dHS[r, k] = 0
        gemm(c'N', c'N', <int>(N - row0), <int>H, <int>K, <floating>1, &dout[0, 0] + row0 * K, <int>K,
             &W[0, 0], <int>H, <floating>0, &dHS[0, 0] + row0 * H, <int>H)
