# The LSTM cell of rlhf_ref/lstm.py for one row, forward and backward (inline: cimported by
# _lstm_cy.pyx for the sequence kernels and by _rollout_cy.pyx for sampling). Gate order i, f, g, o.

from cython cimport floating
from ._common_cy cimport vsigmoid, vtanh


cdef inline void cell(floating* a, const floating* c_prev, floating* c_out, floating* h_out,
                      Py_ssize_t H) noexcept nogil:
    """One step for one row. a (4H): pre-activations in, post-activation gates [i|f|g|o] out.

        c' = f ⊙ c + i ⊙ g        h' = o ⊙ tanh(c')

    c_out may be c_prev (in place). Each loop is branch-free so that GCC vectorises it.
    """
    cdef Py_ssize_t j
    cdef floating c
    for j in range(2 * H):                      # i, f = σ(a)
        a[j] = vsigmoid(a[j])
    for j in range(2 * H, 3 * H):               # g = tanh(a)
        a[j] = vtanh(a[j])
    for j in range(3 * H, 4 * H):               # o = σ(a)
        a[j] = vsigmoid(a[j])
    for j in range(H):
        c = a[H + j] * c_prev[j] + a[j] * a[2 * H + j]
        c_out[j] = c
        h_out[j] = a[3 * H + j] * vtanh(c)


cdef inline void cell_backward(floating* a, const floating* c_prev, const floating* c,
                               floating* dh, floating* dc, Py_ssize_t H) noexcept nogil:
    """Backprop one step for one row, as lstm.backward does.

    a (4H): the post-activation gates in, ∂L/∂(pre-activations) out. dh (H): ∂L/∂h_t in (the
    upstream already added); dc (H): ∂L/∂c_t in, ∂L/∂c_{t−1} out. dh is not changed here: the
    caller sets ∂L/∂h_{t−1} = da W_hh with one product for the whole batch.
    """
    cdef Py_ssize_t j
    cdef floating i, f, g, o, tc, dct, d
    for j in range(H):
        i = a[j]
        f = a[H + j]
        g = a[2 * H + j]
        o = a[3 * H + j]
        tc = vtanh(c[j])
        d = dh[j]
        # backprop through h_t = o ⊙ tanh(c_t)
        dct = dc[j] + d * o * (1 - tc * tc)
        # backprop through c_t = f ⊙ c_{t-1} + i ⊙ g, then the gate nonlinearities
        a[j] = dct * g * i * (1 - i)
        a[H + j] = dct * c_prev[j] * f * (1 - f)
        a[2 * H + j] = dct * i * (1 - g * g)
        a[3 * H + j] = d * tc * o * (1 - o)
        # dc_{t-1} = f ⊙ dc_t
        dc[j] = dct * f
