# The LSTM cell of rlhf_ref/lstm.py for one row, forward and backward (cimported by _lstm_cy.pyx
# for the sequence kernels and by _rollout_cy.pyx for sampling). Gate order i, f, g, o.
#
# The two row kernels are written in C (below) so that they can be compiled for several
# instruction sets and picked at load time (GCC/Clang `target_clones`, an ifunc: AVX-512, AVX2,
# or the baseline): they are the elementwise work of every step, and the baseline x86-64 build
# (SSE2, no -march flags, never -ffast-math) runs their exp/tanh 4 floats at a time where AVX-512
# runs 16. The C is the reference's arithmetic line by line (lstm.py `_cell` and `backward`).
# The gate blocks are addressed through their own pointers (i, f, g, o), not a[k·H + j]: under
# Python's -fwrapv, GCC cannot prove k·H + j does not wrap and leaves such a loop scalar.

from cython cimport floating
from ._common_cy cimport rr_exp, rr_expf   # noqa: the C below uses rr_exp, rr_tanh, ... from _common_cy

cdef extern from *:
    """
    /* one LSTM step for one row: a (4H) pre-activations in, post-activation gates [i|f|g|o] out;
       c' = f*c + i*g, h' = o*tanh(c'). No argument may overlap another (restrict: without it GCC
       gives up on the runtime overlap checks of the last loop and leaves it scalar). */
    #define RR_CELL(NAME, T, SIG, TANH)                                                         \\
    RR_CLONES static void NAME(T* restrict a, const T* restrict c_prev, T* restrict c_out,       \\
                           T* restrict h_out, ptrdiff_t H) {                                \\
        T *i = a, *f = a + H, *g = a + 2 * H, *o = a + 3 * H;                                   \\
        ptrdiff_t j;                                                                            \\
        for (j = 0; j < 2 * H; j++) i[j] = SIG(i[j]);                  /* i, f = sigma(a) */    \\
        for (j = 0; j < H; j++) g[j] = TANH(g[j]);                     /* g = tanh(a) */        \\
        for (j = 0; j < H; j++) o[j] = SIG(o[j]);                      /* o = sigma(a) */       \\
        for (j = 0; j < H; j++) {                                                               \\
            T c = f[j] * c_prev[j] + i[j] * g[j];                                               \\
            c_out[j] = c;                                                                       \\
            h_out[j] = o[j] * TANH(c);                                                          \\
        }                                                                                       \\
    }
    RR_CELL(rr_cell_f32, float, rr_sigmoidf, rr_tanhf)
    RR_CELL(rr_cell_f64, double, rr_sigmoid, rr_tanh)

    /* backprop one step for one row, as lstm.backward: a (4H) post-activation gates in,
       dL/d(pre-activations) out; dh (H) = dL/dh_t (upstream added); dc (H): dL/dc_t in,
       dL/dc_{t-1} = f*dc_t out. The caller forms dL/dh_{t-1} = da W_hh for the whole block. */
    #define RR_CELL_BACKWARD(NAME, T, TANH)                                                      \\
    RR_CLONES static void NAME(T* restrict a, const T* restrict c_prev, const T* restrict c,     \\
                           const T* restrict dh, T* restrict dc, ptrdiff_t H) {             \\
        T *di = a, *df = a + H, *dg = a + 2 * H, *dO = a + 3 * H;  /* in: i, f, g, o; out: da */ \\
        ptrdiff_t j;                                                                            \\
        for (j = 0; j < H; j++) {                                                               \\
            T i = di[j], f = df[j], g = dg[j], o = dO[j];                                        \\
            T tc = TANH(c[j]), d = dh[j];                                                       \\
            T dct = dc[j] + d * o * (1 - tc * tc);      /* through h = o*tanh(c) */              \\
            di[j] = dct * g * i * (1 - i);              /* through c = f*c_prev + i*g, sigma' */ \\
            df[j] = dct * c_prev[j] * f * (1 - f);                                              \\
            dg[j] = dct * i * (1 - g * g);              /* tanh' = 1 - tanh^2 */                 \\
            dO[j] = d * tc * o * (1 - o);                                                       \\
            dc[j] = dct * f;                                                                    \\
        }                                                                                       \\
    }
    RR_CELL_BACKWARD(rr_cell_backward_f32, float, rr_tanhf)
    RR_CELL_BACKWARD(rr_cell_backward_f64, double, rr_tanh)
    """
    void rr_cell_f32(float* a, const float* c_prev, float* c_out, float* h_out, Py_ssize_t H) noexcept nogil
    void rr_cell_f64(double* a, const double* c_prev, double* c_out, double* h_out, Py_ssize_t H) noexcept nogil
    void rr_cell_backward_f32(float* a, const float* c_prev, const float* c, const float* dh, float* dc,
                              Py_ssize_t H) noexcept nogil
    void rr_cell_backward_f64(double* a, const double* c_prev, const double* c, const double* dh, double* dc,
                              Py_ssize_t H) noexcept nogil


cdef inline void cell(floating* a, const floating* c_prev, floating* c_out, floating* h_out,
                      Py_ssize_t H) noexcept nogil:
    """One step for one row. a (4H): pre-activations in, post-activation gates [i|f|g|o] out.

        c' = f ⊙ c + i ⊙ g        h' = o ⊙ tanh(c')

    No two arguments may overlap (c_out is not c_prev).
    """
    if floating is float:
        rr_cell_f32(a, c_prev, c_out, h_out, H)
    else:
        rr_cell_f64(a, c_prev, c_out, h_out, H)


cdef inline void cell_backward(floating* a, const floating* c_prev, const floating* c,
                               const floating* dh, floating* dc, Py_ssize_t H) noexcept nogil:
    """Backprop one step for one row, as lstm.backward does.

    a (4H): the post-activation gates in, ∂L/∂(pre-activations) out. dh (H): ∂L/∂h_t (the
    upstream already added); dc (H): ∂L/∂c_t in, ∂L/∂c_{t−1} = f ⊙ dc_t out. The caller sets
    ∂L/∂h_{t−1} = da W_hh with one product for the block of rows.
    """
    if floating is float:
        rr_cell_backward_f32(a, c_prev, c, dh, dc, H)
    else:
        rr_cell_backward_f64(a, c_prev, c, dh, dc, H)
