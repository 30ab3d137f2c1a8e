"""Cython twin of ``rlhf_ref/lstm.py``: the LSTM body over a batch of sequences, and ``linear``.

The same equations as the reference (its docstring), gate order i, f, g, o. Layout and cost:

* Buffers are **time-major** so that every step's batch is one contiguous block::

      gates (T, B, 4H)   post-activation gates (forward); ∂L/∂(pre-activations) after backward
      cs, hs (T+1, B, H) cs[t+1], hs[t+1] = c, h after token t; cs[0] = hs[0] = 0 (h0 = c0 = 0)

  which is all the backward pass keeps (gates and cell states for every step, docs/conventions.md memory
  rule; hs[t] is also the input of the heads at position t).
* The input projection is hoisted out of the time loop as a **table of the tokens present**:
  the U distinct ids of the batch (U ≤ min(V, B·T), in order of first appearance) get their rows
  P = E[uids] W_ihᵀ + b_ih + b_hh (U, 4H) in one GEMM, and each step copies its row in. This
  never costs more than the gathered-inputs product X W_ihᵀ over the B·T positions and is far
  cheaper when ids repeat. Per step only h W_hhᵀ remains (skipped at t = 0 where h = 0), one
  product per block of rows — ``_common_cy.smm`` for 4..64 rows (it does not repack W_hh on
  every call as BLAS does) and for one row where the instruction-set clones are built (it
  streams W_hhᵀ faster than OpenBLAS's gemv there), BLAS otherwise — then the fused cell per row
  (``_lstm_cy.pxd``: C compiled for AVX-512, AVX2 and the baseline, picked at load time).
* Backward: per step the fused cell backward per row and one product da W_hh per block of rows;
  then the weight gradients as whole-sequence GEMMs: dW_hh = DAᵀ HS, db = Σ DA, and from the
  table's gradient dP (U, 4H) (the scatter-add of the DA rows by slot): dW_ih = dPᵀ E[uids] and
  the embedding rows dE[uids] = dP W_ih (the other rows are 0).
* Padding: where t ≥ length_b the state is carried (hs[t+1] = hs[t]), the gates row is 0 (so its
  ∂L/∂a is 0 and it adds nothing to any gradient) and the padded id is never read.
* The caller chooses how many tokens to feed (T, the first dimension of ids): the policy feeds
  T − 1 (its heads read hs[0:T]; the state after the last token feeds nothing), the reward model
  all of them (it reads hs[T]).

Threads: rows are independent through the whole recurrence, so with ``nchunks > 1`` the batch is
cut into blocks of rows and each OpenMP thread runs its block through all T steps (its own
products on its rows): no synchronisation per step. The whole-sequence products are split by
blocks of the output (``_common_cy.pgemm``, ``nthreads``), the column sums and scatter-adds by
columns. BLAS itself must run single-threaded meanwhile (the backend sets OpenBLAS to one thread
for the duration of a call). Every entry is computed by one thread in a fixed order, so results
are bit-identical from run to run for a given thread count.

Every entry point checks the shapes (and the ids at real positions) its kernel relies on and
raises ValueError otherwise: bounds checks are off inside.

    input_table(E, W_ih, b_ih, b_hh, P, nthreads)          the full table (V, 4H), for sampling
    forward(E, W_ih, W_hh, WT, b_ih, b_hh, ids, lengths, slot, uids, Xu, P, gates, cs, hs,
            nthreads, nchunks) -> U
    backward(E, W_ih, W_hh, ids, lengths, slot, uids, U, Xu, P, gates, cs, hs, dHS, dh, dc, tmp,
             dE, dW_ih, dW_hh, db, nthreads, nchunks)
    linear(HS, W, b, out, nthreads)                          out = HS Wᵀ + b
    linear_backward(HS, W, dout, row0, dW, db, dHS, nthreads)
    transpose(A, out)                                        out = Aᵀ
    elementwise(name, x, out, rows)                          the kernels' exp/tanh/sigmoid (tests)
    isa_clones() -> bool
    openmp() -> (compiled with OpenMP, max threads)
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.stdint cimport int64_t
from libc.string cimport memcpy, memset

from ._common_cy cimport (gemm, pgemm, smm, use_smm, transpose as _transpose, colsum, rr_openmp, rr_max_threads,
                         RR_HAVE_CLONES, PAR_MIN_ENTRIES, vexp, vtanh, vsigmoid, rr_exp_row_f32, rr_exp_row_f64,
                         rr_tanh_row_f32, rr_tanh_row_f64, rr_sigmoid_row_f32, rr_sigmoid_row_f64)
from ._lstm_cy cimport cell, cell_backward


cdef inline void need(bint ok, str what) except *:
    """The entry points check the shapes their kernel relies on (bounds checks are off inside)."""
    if not ok:
        raise ValueError(f"_lstm_cy: {what}")


cdef extern from *:
    """
    #ifndef RLHF_REF_CYTHON_DEBUG
    #define RLHF_REF_CYTHON_DEBUG 0
    #endif
    """
    int RLHF_REF_CYTHON_DEBUG

#: True in the bounds-checking build (RLHF_REF_CYTHON_DEBUG=1, setup.py): the test that runs the
#: suites on that build checks it imported that build, not the release one
DEBUG_BUILD = bool(RLHF_REF_CYTHON_DEBUG)


def openmp():
    """(whether this extension was compiled with OpenMP, omp_get_max_threads() or 1)."""
    return bool(rr_openmp()), int(rr_max_threads())


def isa_clones():
    """Whether the row kernels were compiled in AVX-512 / AVX2 / baseline clones picked at load."""
    return bool(RR_HAVE_CLONES)


def elementwise(str name, const floating[::1] x, floating[::1] out, bint rows=True):
    """out = exp, tanh or sigmoid of x with the kernels' own functions (for tests): rows=True the
    instruction-set clones of the row loops (what the cell and the policy rows run), rows=False
    the baseline inline functions of ``_common_cy`` (what the other Cython loops run)."""
    cdef Py_ssize_t n = x.shape[0], k
    cdef int which = {"exp": 0, "tanh": 1, "sigmoid": 2}[name]
    if out.shape[0] != n:
        raise ValueError("out must have the shape of x")
    if n == 0:
        return
    with nogil:
        if rows:
            if floating is float:
                if which == 0:
                    rr_exp_row_f32(&x[0], n, 1, 0, &out[0])
                elif which == 1:
                    rr_tanh_row_f32(&x[0], n, 1, 0, &out[0])
                else:
                    rr_sigmoid_row_f32(&x[0], n, 1, 0, &out[0])
            else:
                if which == 0:
                    rr_exp_row_f64(&x[0], n, 1, 0, &out[0])
                elif which == 1:
                    rr_tanh_row_f64(&x[0], n, 1, 0, &out[0])
                else:
                    rr_sigmoid_row_f64(&x[0], n, 1, 0, &out[0])
        else:
            for k in range(n):
                if which == 0:
                    out[k] = vexp(x[k])
                elif which == 1:
                    out[k] = vtanh(x[k])
                else:
                    out[k] = vsigmoid(x[k])


# ----------------------------------------------------------------------------- forward

cdef void _bias_rows(floating* out, const floating* b_ih, const floating* b_hh,
                     Py_ssize_t n, Py_ssize_t G) noexcept nogil:
    cdef Py_ssize_t r, k
    for r in range(n):
        for k in range(G):
            out[r * G + k] = b_ih[k] + b_hh[k]


cdef void _input_table(const floating* E, const floating* W_ih, const floating* b_ih, const floating* b_hh,
                       floating* P, Py_ssize_t V, Py_ssize_t Ed, Py_ssize_t G, int nthreads) noexcept nogil:
    # P (V, G) = E W_ihᵀ + b_ih + b_hh: the input part of the pre-activations for every token id
    _bias_rows(P, b_ih, b_hh, V, G)
    pgemm(c'N', c'T', <int>V, <int>G, <int>Ed, <floating>1, E, <int>Ed, W_ih, <int>Ed, <floating>1, P, <int>G,
          nthreads)


def input_table(const floating[:, ::1] E, const floating[:, ::1] W_ih, const floating[::1] b_ih,
                const floating[::1] b_hh, floating[:, ::1] P, int nthreads=1):
    """P (V, 4H) = E W_ihᵀ + b_ih + b_hh."""
    cdef Py_ssize_t V = E.shape[0], Ed = E.shape[1], G = W_ih.shape[0]
    need(W_ih.shape[1] == Ed and b_ih.shape[0] == G and b_hh.shape[0] == G, "input_table: E, W_ih, biases disagree")
    need(P.shape[0] == V and P.shape[1] == G and V > 0 and G > 0, "input_table: P must be (V, 4H)")
    with nogil:
        _input_table(&E[0, 0], &W_ih[0, 0], &b_ih[0], &b_hh[0], &P[0, 0], E.shape[0], E.shape[1], W_ih.shape[0],
                     nthreads)


cdef void _forward_rows(const floating* W_hh, const floating* WT, const floating* P, const int64_t* ids,
                        const int64_t* slot,
                        const int64_t* lengths, floating* gates, floating* cs, floating* hs,
                        Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Rows [b0, b1) through all T steps."""
    cdef Py_ssize_t G = 4 * H, t, b, now, nxt
    cdef floating* a
    for b in range(b0, b1):
        memset(cs + b * H, 0, H * sizeof(floating))
        memset(hs + b * H, 0, H * sizeof(floating))
    for t in range(T):
        for b in range(b0, b1):
            if t < lengths[b]:          # the input part: the table row of token t
                memcpy(gates + (t * B + b) * G, P + slot[ids[t * B + b]] * G, G * sizeof(floating))
        if t > 0:                       # gates[t] += h_{t-1} W_hhᵀ (h is 0 at t = 0)
            if use_smm(b1 - b0):
                smm(b1 - b0, G, H, hs + (t * B + b0) * H, H, WT, G, True, gates + (t * B + b0) * G, G)
            else:
                gemm(c'N', c'T', <int>(b1 - b0), <int>G, <int>H, <floating>1, hs + (t * B + b0) * H, <int>H,
                     W_hh, <int>H, <floating>1, gates + (t * B + b0) * G, <int>G)
        for b in range(b0, b1):
            a = gates + (t * B + b) * G
            now = (t * B + b) * H
            nxt = ((t + 1) * B + b) * H
            if t < lengths[b]:
                cell(a, cs + now, cs + nxt, hs + nxt, H)
            else:
                # padding carries the state unchanged; its gates are 0 (no gradient flows through it)
                memcpy(cs + nxt, cs + now, H * sizeof(floating))
                memcpy(hs + nxt, hs + now, H * sizeof(floating))
                memset(a, 0, G * sizeof(floating))


cdef Py_ssize_t _present(const int64_t* ids, const int64_t* lengths, Py_ssize_t T, Py_ssize_t B, Py_ssize_t V,
                         int64_t* slot, int64_t* uids) noexcept nogil:
    """The distinct ids at real positions in order of first appearance: uids[:U], slot[uids[i]] = i
    (slot −1 for ids absent). Returns U."""
    cdef Py_ssize_t t, b, v, U = 0
    cdef int64_t i
    for v in range(V):
        slot[v] = -1
    for t in range(T):
        for b in range(B):
            if t < lengths[b]:
                i = ids[t * B + b]
                if slot[i] < 0:
                    slot[i] = U
                    uids[U] = i
                    U += 1
    return U


cdef Py_ssize_t _forward(const floating* E, const floating* W_ih, const floating* W_hh, floating* WT,
                         const floating* b_ih, const floating* b_hh, const int64_t* ids, const int64_t* lengths,
                         int64_t* slot, int64_t* uids, floating* Xu, floating* P, floating* gates,
                         floating* cs, floating* hs, Py_ssize_t T, Py_ssize_t B, Py_ssize_t V, Py_ssize_t Ed,
                         Py_ssize_t H, int nthreads, int nchunks) noexcept nogil:
    cdef Py_ssize_t G = 4 * H, i, j, U, c, b0, b1
    if use_smm(B // nchunks) or use_smm((B + nchunks - 1) // nchunks):
        _transpose(W_hh, G, H, WT)      # W_hhᵀ (H, G) for smm
    # the table of the tokens present: P[i] = W_ih E[uids[i]] + b_ih + b_hh
    U = _present(ids, lengths, T, B, V, slot, uids)
    for i in range(U):
        memcpy(Xu + i * Ed, E + uids[i] * Ed, Ed * sizeof(floating))
    _input_table(Xu, W_ih, b_ih, b_hh, P, U, Ed, G, nthreads)
    if nchunks > 1:
        for c in prange(nchunks, num_threads=nchunks, schedule="static"):
            b0 = (B * c) // nchunks          # rows [b0, b1): block c of nchunks near-equal blocks
            b1 = (B * (c + 1)) // nchunks
            _forward_rows(W_hh, WT, P, ids, slot, lengths, gates, cs, hs, T, B, H, b0, b1)
    else:
        _forward_rows(W_hh, WT, P, ids, slot, lengths, gates, cs, hs, T, B, H, 0, B)
    return U


cdef bint _ids_ok(const int64_t* ids, const int64_t* lengths, Py_ssize_t T, Py_ssize_t B,
                  Py_ssize_t V) noexcept nogil:
    cdef Py_ssize_t t, b
    for b in range(B):
        if lengths[b] < 0 or lengths[b] > T:
            return False
    for t in range(T):
        for b in range(B):
            if t < lengths[b] and (ids[t * B + b] < 0 or ids[t * B + b] >= V):
                return False
    return True


def forward(const floating[:, ::1] E, const floating[:, ::1] W_ih, const floating[:, ::1] W_hh,
            floating[:, ::1] WT, const floating[::1] b_ih, const floating[::1] b_hh, const int64_t[:, ::1] ids,
            const int64_t[::1] lengths, int64_t[::1] slot, int64_t[::1] uids, floating[:, ::1] Xu,
            floating[:, ::1] P, floating[:, :, ::1] gates, floating[:, :, ::1] cs, floating[:, :, ::1] hs,
            int nthreads=1, int nchunks=1):
    """The body forward over a time-major batch; returns U, the number of distinct ids.

    WT (H, 4H) work: W_hhᵀ, for the per-step products of blocks that go to smm (use_smm).
    ids (T, B) token ids, read only at real positions (t < lengths[b]); lengths (B,). Work kept
    for the backward: slot (V,), uids (n,), Xu (n, E) = E[uids], P (n, 4H), n ≥ U (n = min(V, B·T)
    always suffices). Outputs gates, cs, hs as in the module docstring. nthreads: OpenMP threads
    for the whole-sequence products; nchunks (≤ B): blocks of rows run through the recurrence on
    their own threads.
    """
    cdef Py_ssize_t T = ids.shape[0], B = ids.shape[1], U, V = E.shape[0], Ed = E.shape[1], H = W_hh.shape[1]
    cdef Py_ssize_t G = 4 * H, n = min(V, B * T)
    need(V > 0 and H > 0 and W_hh.shape[0] == G and W_ih.shape[0] == G and W_ih.shape[1] == Ed
         and b_ih.shape[0] == G and b_hh.shape[0] == G, "forward: parameter shapes disagree")
    need(WT.shape[0] == H and WT.shape[1] == G, "forward: WT must be (H, 4H)")
    need(lengths.shape[0] == B and slot.shape[0] == V and uids.shape[0] >= max(n, 1)
         and Xu.shape[0] >= max(n, 1) and Xu.shape[1] == Ed and P.shape[0] >= max(n, 1) and P.shape[1] == G,
         "forward: work buffers too small")
    need(gates.shape[0] == T and gates.shape[1] == B and gates.shape[2] == G, "forward: gates must be (T, B, 4H)")
    need(cs.shape[0] == T + 1 and cs.shape[1] == B and cs.shape[2] == H and hs.shape[0] == T + 1
         and hs.shape[1] == B and hs.shape[2] == H, "forward: cs, hs must be (T + 1, B, H)")
    need(1 <= nchunks <= max(B, 1), "forward: 1 <= nchunks <= B")
    need(T * B == 0 or _ids_ok(&ids[0, 0], &lengths[0], T, B, V),
         "forward: a length outside [0, T] or an id outside [0, V) at a real position")
    if T == 0 or B == 0:                # no token fed: hs[0] = cs[0] = 0 is all there is
        cs[...] = 0
        hs[...] = 0
        return 0
    with nogil:
        U = _forward(&E[0, 0], &W_ih[0, 0], &W_hh[0, 0], &WT[0, 0], &b_ih[0], &b_hh[0], &ids[0, 0], &lengths[0],
                     &slot[0], &uids[0], &Xu[0, 0], &P[0, 0], &gates[0, 0, 0], &cs[0, 0, 0], &hs[0, 0, 0],
                     T, B, E.shape[0], E.shape[1], W_hh.shape[1], nthreads, nchunks)
    return U


# ----------------------------------------------------------------------------- backward

cdef void _backward_rows(const floating* W_hh, floating* gates, const floating* cs, const floating* dHS,
                         Py_ssize_t nup, floating* dh, floating* dc, floating* tmp, const int64_t* lengths,
                         Py_ssize_t T, Py_ssize_t B, Py_ssize_t H, Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    """Rows [b0, b1) backwards through all T steps: gates[t] becomes ∂L/∂(pre-activations)."""
    cdef Py_ssize_t G = 4 * H, t, b, j, minlen = T
    cdef floating* dhb
    cdef floating* out
    cdef const floating* up
    for b in range(b0, b1):
        if lengths[b] < minlen:
            minlen = lengths[b]
    for t in range(T - 1, -1, -1):
        for b in range(b0, b1):
            if t >= lengths[b]:
                continue        # padding passes dh and dc through; its gates row is 0
            dhb = dh + b * H
            if t + 1 < nup:
                # the output after token t is hs[t+1], read by the heads at position t+1
                up = dHS + ((t + 1) * B + b) * H
                for j in range(H):
                    dhb[j] = dhb[j] + up[j]
            cell_backward(gates + (t * B + b) * G, cs + (t * B + b) * H, cs + ((t + 1) * B + b) * H,
                          dhb, dc + b * H, H)
        if t == 0:
            break           # ∂L/∂h0 is not needed (h0 = 0 is no parameter)
        # dh_{t-1} = da_t W_hh on the rows that are real at t; padding rows keep theirs
        out = dh if t < minlen else tmp
        if use_smm(b1 - b0):
            smm(b1 - b0, H, G, gates + (t * B + b0) * G, G, W_hh, H, False, out + b0 * H, H)
        else:
            gemm(c'N', c'N', <int>(b1 - b0), <int>H, <int>G, <floating>1, gates + (t * B + b0) * G, <int>G,
                 W_hh, <int>H, <floating>0, out + b0 * H, <int>H)
        if t >= minlen:
            for b in range(b0, b1):
                if t < lengths[b]:
                    memcpy(dh + b * H, tmp + b * H, H * sizeof(floating))


cdef void _scatter_rows(const floating* src, Py_ssize_t width, const int64_t* ids, const int64_t* slot,
                        const int64_t* lengths, Py_ssize_t T, Py_ssize_t B, floating* dst,
                        Py_ssize_t k0, Py_ssize_t k1) noexcept nogil:
    """dst[slot[ids[t, b]], k0:k1] += src[t·B + b, k0:k1] over the real positions, in (t, b) order."""
    cdef Py_ssize_t t, b, k
    cdef const floating* s
    cdef floating* d
    for t in range(T):
        for b in range(B):
            if t < lengths[b]:
                s = src + (t * B + b) * width
                d = dst + slot[ids[t * B + b]] * width
                for k in range(k0, k1):
                    d[k] = d[k] + s[k]


cdef void scatter_add(const floating* src, Py_ssize_t width, const int64_t* ids, const int64_t* slot,
                      const int64_t* lengths, Py_ssize_t T, Py_ssize_t B, floating* dst, Py_ssize_t U,
                      int nthreads) noexcept nogil:
    """dst (U, width) = 0, then the scatter-add of _scatter_rows; columns split over threads."""
    cdef Py_ssize_t p, k0, k1, per
    memset(dst, 0, U * width * sizeof(floating))
    if nthreads <= 1 or T * B * width < PAR_MIN_ENTRIES:
        _scatter_rows(src, width, ids, slot, lengths, T, B, dst, 0, width)
        return
    per = ((width + nthreads - 1) // nthreads + 15) // 16 * 16
    for p in prange(nthreads, num_threads=nthreads, schedule="static"):
        k0 = p * per
        k1 = k0 + per
        if k1 > width:
            k1 = width
        if k0 < k1:
            _scatter_rows(src, width, ids, slot, lengths, T, B, dst, k0, k1)


cdef void _backward(const floating* E, const floating* W_ih, const floating* W_hh, const int64_t* ids,
                    const int64_t* lengths, const int64_t* slot, const int64_t* uids, Py_ssize_t U,
                    floating* Xu, floating* P, floating* gates, const floating* cs, const floating* hs,
                    const floating* dHS, Py_ssize_t nup, floating* dh, floating* dc, floating* tmp,
                    floating* dE, floating* dW_ih, floating* dW_hh, floating* db,
                    Py_ssize_t T, Py_ssize_t B, Py_ssize_t V, Py_ssize_t Ed, Py_ssize_t H, int nthreads,
                    int nchunks) noexcept nogil:
    cdef Py_ssize_t G = 4 * H, c, b0, b1, i
    if nchunks > 1:
        for c in prange(nchunks, num_threads=nchunks, schedule="static"):
            b0 = (B * c) // nchunks
            b1 = (B * (c + 1)) // nchunks
            _backward_rows(W_hh, gates, cs, dHS, nup, dh, dc, tmp, lengths, T, B, H, b0, b1)
    else:
        _backward_rows(W_hh, gates, cs, dHS, nup, dh, dc, tmp, lengths, T, B, H, 0, B)
    # weight gradients, whole-sequence: DA = gates (T·B, G), HS = hs[0:T] (T·B, H) (hs[0] = 0)
    pgemm(c'T', c'N', <int>G, <int>H, <int>((T - 1) * B), <floating>1, gates + B * G, <int>G,
          hs + B * H, <int>H, <floating>0, dW_hh, <int>H, nthreads)
    colsum(gates, T * B, G, G, db, nthreads)
    # the table's gradient dP (U, G) in P's buffer, then dW_ih = dPᵀ E[uids], dE[uids] = dP W_ih
    scatter_add(gates, G, ids, slot, lengths, T, B, P, U, nthreads)
    pgemm(c'T', c'N', <int>G, <int>Ed, <int>U, <floating>1, P, <int>G, Xu, <int>Ed, <floating>0, dW_ih,
          <int>Ed, nthreads)
    pgemm(c'N', c'N', <int>U, <int>Ed, <int>G, <floating>1, P, <int>G, W_ih, <int>Ed, <floating>0, Xu,
          <int>Ed, nthreads)
    memset(dE, 0, V * Ed * sizeof(floating))
    for i in range(U):
        memcpy(dE + uids[i] * Ed, Xu + i * Ed, Ed * sizeof(floating))


def backward(const floating[:, ::1] E, const floating[:, ::1] W_ih, const floating[:, ::1] W_hh,
             const int64_t[:, ::1] ids, const int64_t[::1] lengths, const int64_t[::1] slot,
             const int64_t[::1] uids, Py_ssize_t U, floating[:, ::1] Xu, floating[:, ::1] P,
             floating[:, :, ::1] gates, const floating[:, :, ::1] cs, const floating[:, :, ::1] hs,
             const floating[:, ::1] dHS, floating[:, ::1] dh, floating[:, ::1] dc,
             floating[:, ::1] tmp, floating[:, ::1] dE, floating[:, ::1] dW_ih, floating[:, ::1] dW_hh,
             floating[::1] db, int nthreads=1, int nchunks=1):
    """Backpropagation through time after ``forward`` (same buffers, U what it returned).

    dHS (n·B, H): ∂L/∂hs[0:n] from the heads (n = 0: none; hs[t+1] is the output after token t,
    and n = T + 1 when the heads read the state after the last token too). dh, dc (B, H): ∂L/∂ of
    the final state hs[T] on entry (e.g. the reward head), scratch after. tmp (B, H) scratch.
    Outputs dE, dW_ih, dW_hh, db (= ∂L/∂b_ih = ∂L/∂b_hh). gates holds ∂L/∂(pre-activations)
    afterwards; P and Xu are overwritten.
    """
    cdef Py_ssize_t T = ids.shape[0], B = ids.shape[1], V = E.shape[0], Ed = E.shape[1], H = W_hh.shape[1]
    cdef Py_ssize_t G = 4 * H
    need(W_hh.shape[0] == G and W_ih.shape[0] == G and W_ih.shape[1] == Ed, "backward: parameter shapes disagree")
    need(lengths.shape[0] == B and slot.shape[0] == V and 0 <= U <= uids.shape[0] and U <= Xu.shape[0]
         and Xu.shape[1] == Ed and U <= P.shape[0] and P.shape[1] == G, "backward: not forward's work buffers")
    need(gates.shape[0] == T and gates.shape[1] == B and gates.shape[2] == G and cs.shape[0] == T + 1
         and cs.shape[1] == B and cs.shape[2] == H and hs.shape[0] == T + 1 and hs.shape[1] == B and hs.shape[2] == H,
         "backward: gates, cs, hs are not forward's")
    need(dHS.shape[0] == 0 or (B > 0 and dHS.shape[0] % B == 0 and dHS.shape[0] // B <= T + 1 and dHS.shape[1] == H),
         "backward: dHS must be (n·B, H) with n <= T + 1")
    need(dh.shape[0] == B and dh.shape[1] == H and dc.shape[0] == B and dc.shape[1] == H and tmp.shape[0] == B
         and tmp.shape[1] == H, "backward: dh, dc, tmp must be (B, H)")
    need(dE.shape[0] == V and dE.shape[1] == Ed and dW_ih.shape[0] == G and dW_ih.shape[1] == Ed
         and dW_hh.shape[0] == G and dW_hh.shape[1] == H and db.shape[0] == G, "backward: gradient shapes")
    need(1 <= nchunks <= max(B, 1), "backward: 1 <= nchunks <= B")
    if T == 0 or B == 0:                # no token fed: no parameter was used
        dE[...] = 0
        dW_ih[...] = 0
        dW_hh[...] = 0
        db[...] = 0
        return
    cdef const floating* pdHS = &dHS[0, 0] if dHS.shape[0] > 0 else NULL
    with nogil:
        _backward(&E[0, 0], &W_ih[0, 0], &W_hh[0, 0], &ids[0, 0], &lengths[0], &slot[0], &uids[0], U,
                  &Xu[0, 0], &P[0, 0], &gates[0, 0, 0], &cs[0, 0, 0], &hs[0, 0, 0], pdHS,
                  dHS.shape[0] // B if B > 0 else 0,
                  &dh[0, 0], &dc[0, 0], &tmp[0, 0], &dE[0, 0], &dW_ih[0, 0], &dW_hh[0, 0], &db[0],
                  T, B, E.shape[0], E.shape[1], W_hh.shape[1], nthreads, nchunks)


def transpose(const floating[:, ::1] A, floating[:, ::1] out):
    """out = Aᵀ (a tiled copy; NumPy's transposed copy is 3-25x slower on these shapes)."""
    need(out.shape[0] == A.shape[1] and out.shape[1] == A.shape[0], "transpose: out must be Aᵀ's shape")
    if A.shape[0] * A.shape[1] == 0:
        return
    with nogil:
        _transpose(&A[0, 0], A.shape[0], A.shape[1], &out[0, 0])


# ----------------------------------------------------------------------------- linear heads

def linear(const floating[:, ::1] HS, const floating[:, ::1] W, const floating[::1] b, floating[:, ::1] out,
           int nthreads=1):
    """out (N, K) = HS (N, H) Wᵀ + b: lstm.linear for a stack of rows."""
    cdef Py_ssize_t N = HS.shape[0], H = HS.shape[1], K = W.shape[0], r, k
    need(W.shape[1] == H and b.shape[0] == K and out.shape[0] == N and out.shape[1] == K and H > 0 and K > 0,
         "linear: HS (N, H), W (K, H), b (K,), out (N, K)")
    if N == 0:
        return
    with nogil:
        for r in range(N):
            for k in range(K):
                out[r, k] = b[k]
        pgemm(c'N', c'T', <int>N, <int>K, <int>H, <floating>1, &HS[0, 0], <int>H, &W[0, 0], <int>H,
              <floating>1, &out[0, 0], <int>K, nthreads)


def linear_backward(const floating[:, ::1] HS, const floating[:, ::1] W, const floating[:, ::1] dout,
                    Py_ssize_t row0, floating[:, ::1] dW, floating[::1] db, floating[:, ::1] dHS,
                    int nthreads=1):
    """Backprop through out = HS Wᵀ + b: dW = doutᵀ HS, db = Σ dout, dHS = dout W.

    Rows below row0 of dout are known to be 0 (position 0, read by no head): they are skipped
    and dHS there is set to 0.
    """
    cdef Py_ssize_t N = HS.shape[0], H = HS.shape[1], K = W.shape[0], r, k
    need(W.shape[1] == H and dout.shape[0] == N and dout.shape[1] == K and dW.shape[0] == K and dW.shape[1] == H
         and db.shape[0] == K and dHS.shape[0] == N and dHS.shape[1] == H and 0 <= row0 <= N and H > 0 and K > 0,
         "linear_backward: HS (N, H), W (K, H), dout (N, K), dW (K, H), db (K,), dHS (N, H), 0 <= row0 <= N")
    if N == 0:
        dW[...] = 0
        db[...] = 0
        return
    with nogil:
        pgemm(c'T', c'N', <int>K, <int>H, <int>(N - row0), <floating>1, &dout[0, 0] + row0 * K, <int>K,
              &HS[0, 0] + row0 * H, <int>H, <floating>0, &dW[0, 0], <int>H, nthreads)
        colsum(&dout[0, 0] + row0 * K, N - row0, K, K, &db[0], nthreads)
        for r in range(row0):
            for k in range(H):
                dHS[r, k] = 0
        pgemm(c'N', c'N', <int>(N - row0), <int>H, <int>K, <floating>1, &dout[0, 0] + row0 * K, <int>K,
              &W[0, 0], <int>H, <floating>0, &dHS[0, 0] + row0 * H, <int>H, nthreads)
