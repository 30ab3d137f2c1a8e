# Shared inline helpers of the Cython kernels (cimported by _lstm_cy, _train_cy, _rollout_cy,
# _policy_cy): elementwise exp / tanh / sigmoid accurate to a few ulp and vectorisable, a small-M
# matrix product, a tiled transpose, and row-major wrappers of SciPy's Cython BLAS (one call, or
# split over OpenMP threads). Everything here is `inline` or `static`: each extension module that
# cimports this file gets its own copy, so nothing links across modules.
#
# Why our own exp/tanh: libm's are scalar calls that GCC vectorises only under -ffast-math
# (libmvec), and -ffast-math is forbidden (it flips FTZ/DAZ for the whole process and breaks the
# ±inf that masking and log-softmax rely on). The functions below are branch-free C (bit-mask
# selects, no call), so GCC -O3 vectorises the loops that use them.
#
# Instruction sets: setup.py compiles for the baseline x86-64 (SSE2; -march=native only on
# request), which runs these loops 4 floats at a time and the float64 ones scalar (SSE2 has no
# vector conversion from a double comparison to a 64-bit mask). The hot row kernels (RR_CLONES:
# the LSTM cell and its backward in _lstm_cy.pxd, the exp/tanh/sigmoid rows, the small-M product)
# are therefore compiled three times, for AVX-512, AVX2 and the baseline, and the loader picks one
# (GCC/Clang target_clones, an ifunc; x86-64 glibc Linux, elsewhere the baseline only). Measured
# on one AVX-512 core: the LSTM cell row (H = 128) 0.26 µs against 0.94 µs at the baseline.
#
# Two habits keep GCC vectorising (checked with -fopt-info-vec): loop indices are Py_ssize_t /
# ptrdiff_t and blocks of a row are addressed through their own pointers, because Python's CFLAGS
# carry -fwrapv, under which GCC cannot prove that int or k·H + j index arithmetic does not wrap;
# and kernels whose arguments never overlap say so (restrict), else GCC gives up its runtime
# overlap checks in loops with many arrays and runs them scalar.
#
#   exp(x):  x = n·ln2 + r, |r| ≤ ln2/2 (Cody–Waite: ln2 in a high part with trailing zero bits,
#            so n·ln2_hi is exact, and a low part), exp(r) by its Taylor polynomial (degree 13 in
#            float64, 7 in float32: truncation below eps/2 at |r| = ln2/2) in Horner form, times 2^n
#            built from the exponent bits in two normal factors 2^n1·2^n2 (so overflow gives inf
#            and gradual underflow gives subnormals / 0 with one rounding). n = rint(x/ln2) by the
#            1.5·2^52 (2^23) shifter trick, which needs IEEE arithmetic (no fast-math).
#            ±inf → inf / 0, NaN → NaN.
#   tanh(x): Cephes (Moshier) tanh / tanhf: for |x| < 0.625 the odd rational (float64) or
#            polynomial (float32) approximation, else sign(x)·(1 − 2/(exp(2|x|) + 1)); both are
#            computed and one is selected, so the loop stays branch-free.
#   sigmoid(x) = 1/(1 + exp(−x)): exp(−x) = inf gives exactly 0, no overflow warning.
#
# Measured against NumPy (tests/test_cython_backend.py::test_elementwise_accuracy), in the clones
# and the baseline alike: exp ≤ 1.0 ulp, tanh ≤ 1.3 ulp (float32) / 2.0 (float64), sigmoid ≤ 2.0 /
# 4.0 ulp (over x where σ(x) underflows towards 0; NumPy's 0.5·(1 + tanh(x/2)) loses all its
# relative accuracy there).

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport log, log1p, exp as libm_exp, INFINITY
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

from ._isa_cy cimport RR_HAVE_CLONES     # RR_UNUSED, RR_CLONES (its C block comes first)

cdef extern from *:
    """
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #include <math.h>

    static inline uint64_t rr_bits64(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
    static inline double rr_from64(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }
    static inline uint32_t rr_bits32(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
    static inline float rr_from32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

    /* c ? a : b with a bit mask instead of a branch. With -ftrapping-math (GCC's default, kept:
       no fast-math) GCC may neither speculate nor vectorise arithmetic that it has sunk into one
       arm of a ?:, so the selects are written so that both values are always computed. */
    static inline double rr_sel64(int c, double a, double b) {
        uint64_t m = (uint64_t)0 - (uint64_t)(c != 0);
        return rr_from64((rr_bits64(a) & m) | (rr_bits64(b) & ~m));
    }
    static inline float rr_sel32(int c, float a, float b) {
        uint32_t m = (uint32_t)0 - (uint32_t)(c != 0);
        return rr_from32((rr_bits32(a) & m) | (rr_bits32(b) & ~m));
    }

    static inline double rr_exp(double x) {
        const double SHIFT = 6755399441055744.0;                 /* 1.5 * 2^52 */
        const double LOG2E = 1.4426950408889634;
        const double LN2HI = 6.93147180369123816490e-01;         /* 0x3fe62e42fee00000 */
        const double LN2LO = 1.90821492927058770002e-10;
        double t, nd, r, p, t1, n1d, t2, y;
        const uint64_t bs = 0x4338000000000000ull;               /* the bits of SHIFT */
        t = x * LOG2E + SHIFT;
        nd = t - SHIFT;                                          /* n = rint(x / ln2) */
        r = (x - nd * LN2HI) - nd * LN2LO;
        p = 1.0 / 6227020800.0;                                  /* 1/13! */
        p = p * r + 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        t1 = nd * 0.5 + SHIFT;                                   /* n1 = rint(n/2), n2 = n - n1 */
        n1d = t1 - SHIFT;
        t2 = (nd - n1d) + SHIFT;
        y = p * rr_from64((rr_bits64(t1) - bs + 1023u) << 52)
              * rr_from64((rr_bits64(t2) - bs + 1023u) << 52);
        y = rr_sel64(x < -746.0, 0.0, y);                        /* -inf and underflow: 0 */
        y = rr_sel64(x > 710.0, (double)INFINITY, y);            /* +inf and overflow: inf; NaN stays */
        return y;
    }

    static inline float rr_expf(float x) {
        const float SHIFT = 12582912.0f;                         /* 1.5 * 2^23 */
        const float LOG2E = 1.44269504088896341f;
        const float LN2HI = 0.693145751953125f;                  /* 0x3f317200 */
        const float LN2LO = 1.428606765330187045e-06f;
        float t, nd, r, p, t1, n1d, t2, y;
        const uint32_t bs = 0x4b400000u;                         /* the bits of SHIFT */
        t = x * LOG2E + SHIFT;
        nd = t - SHIFT;
        r = (x - nd * LN2HI) - nd * LN2LO;
        p = 1.0f / 5040.0f;
        p = p * r + 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        t1 = nd * 0.5f + SHIFT;
        n1d = t1 - SHIFT;
        t2 = (nd - n1d) + SHIFT;
        y = p * rr_from32((rr_bits32(t1) - bs + 127u) << 23)
              * rr_from32((rr_bits32(t2) - bs + 127u) << 23);
        y = rr_sel32(x < -104.0f, 0.0f, y);
        y = rr_sel32(x > 89.0f, INFINITY, y);
        return y;
    }

    static inline double rr_tanh(double x) {
        double ax = rr_from64(rr_bits64(x) & 0x7fffffffffffffffull);
        double z = x * x;
        double small = x + x * z * (((-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
                                     - 1.61468768441708447952e3)
                                    / (((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
                                       + 4.84406305325125486048e3));
        double big = 1.0 - 2.0 / (rr_exp(ax + ax) + 1.0);
        big = rr_from64(rr_bits64(big) | (rr_bits64(x) & 0x8000000000000000ull));     /* copysign */
        return rr_sel64(ax < 0.625, small, big);
    }

    static inline float rr_tanhf(float x) {
        float ax = rr_from32(rr_bits32(x) & 0x7fffffffu);
        float z = x * x;
        float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                        + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
        float big = 1.0f - 2.0f / (rr_expf(ax + ax) + 1.0f);
        big = rr_from32(rr_bits32(big) | (rr_bits32(x) & 0x80000000u));
        return rr_sel32(ax < 0.625f, small, big);
    }

    static inline double rr_sigmoid(double x) { return 1.0 / (1.0 + rr_exp(-x)); }
    static inline float rr_sigmoidf(float x) { return 1.0f / (1.0f + rr_expf(-x)); }

    /* out[k] = f(alpha * x[k] + beta) for f = exp, tanh, sigmoid: the vectorised row loops of the
       policy (softmax rows) with the instruction-set clones. out may be x (in place). */
    #define RR_ROW(NAME, T, F)                                                                  \\
    RR_CLONES static void NAME(const T* x, ptrdiff_t n, T alpha, T beta, T* out) {              \\
        ptrdiff_t k;                                                                            \\
        for (k = 0; k < n; k++) out[k] = F(alpha * x[k] + beta);                                \\
    }
    RR_ROW(rr_exp_row_f32, float, rr_expf)
    RR_ROW(rr_exp_row_f64, double, rr_exp)
    RR_ROW(rr_tanh_row_f32, float, rr_tanhf)
    RR_ROW(rr_tanh_row_f64, double, rr_tanh)
    RR_ROW(rr_sigmoid_row_f32, float, rr_sigmoidf)
    RR_ROW(rr_sigmoid_row_f64, double, rr_sigmoid)

    /* Small-M matrix product C (M x N) = [C +] A (M x K) @ Bt (K x N), all row-major: the
       per-step products of the recurrences (M = the rows of a block, N = 4H or H). OpenBLAS packs
       the whole Bt (the weights) on every call, which for M = 8..16 costs more than the product
       (47-64 GFLOP/s measured, against ~190 here on one AVX-512 core). Blocks of MB rows x NB
       columns are accumulated in registers over k, in order; every entry of C is the same
       sequence of multiply-adds whichever path (block or remainder) computes it, so the result
       does not depend on M or on how the rows are split. A row outside the blocks of MB (and
       M = 1: the B = 1 rollout's gemv) is accumulated NB1 = 2 NB columns at a time (8 AVX-512 /
       16 AVX2 registers), in one pass over k per block: the W_hh (512 x 128) product of one row
       then streams the weights from L2 at 2.25 us against OpenBLAS sgemv's 2.75 us (AVX-512; AVX2
       2.35 us; measured in C on one core, the weights in L2). The baseline build (16 SSE
       registers) runs it at 3.5 us: one row goes to smm only where the clones are built
       (use_smm). */
    #define RR_SMM(NAME, T, NB)                                                                 \\
    RR_CLONES static void NAME(ptrdiff_t M, ptrdiff_t N, ptrdiff_t K, const T* restrict A,        \\
                               ptrdiff_t lda, const T* restrict Bt, ptrdiff_t ldb, int accumulate, \\
                               T* restrict C, ptrdiff_t ldc) {                                  \\
        enum { MB = 4 };                                                                        \\
        ptrdiff_t n0, m0, k, nb, n, Mb = M - M % MB, Nb = N - N % NB;                        \\
        int m;                                                                                  \\
        for (n0 = 0; n0 < Nb; n0 += NB)                 /* blocks of MB rows x NB columns */     \\
            for (m0 = 0; m0 < Mb; m0 += MB) {                                                   \\
                T acc[MB][NB];                                                                  \\
                for (m = 0; m < MB; m++)                                                        \\
                    for (n = 0; n < NB; n++)                                                    \\
                        acc[m][n] = accumulate ? C[(m0 + m) * ldc + n0 + n] : (T)0;             \\
                for (k = 0; k < K; k++) {                                                       \\
                    const T* b = Bt + k * ldb + n0;                                             \\
                    for (m = 0; m < MB; m++) {                                                  \\
                        T a = A[(m0 + m) * lda + k];                                            \\
                        for (n = 0; n < NB; n++) acc[m][n] += a * b[n];                         \\
                    }                                                                           \\
                }                                                                               \\
                for (m = 0; m < MB; m++)                                                        \\
                    for (n = 0; n < NB; n++) C[(m0 + m) * ldc + n0 + n] = acc[m][n];            \\
            }                                                                                   \\
        /* one row at a time, 2 NB columns per pass over k (then NB, then what is left: loops of
           constant length keep acc in registers): the columns from Nb on of the rows in
           blocks, then every column of the rows left over */                                   \\
        for (m0 = 0; m0 < M; m0++)                                                              \\
            for (n0 = m0 < Mb ? Nb : 0; n0 < N; n0 += nb) {                                     \\
                T acc[2 * NB];                                                                  \\
                T* c = C + m0 * ldc + n0;                                                       \\
                const T* a = A + m0 * lda;                                                      \\
                nb = N - n0 >= 2 * NB ? 2 * NB : N - n0 >= NB ? NB : N - n0;                    \\
                if (nb == 2 * NB) {                                                             \\
                    for (n = 0; n < 2 * NB; n++) acc[n] = accumulate ? c[n] : (T)0;             \\
                    for (k = 0; k < K; k++)                                                     \\
                        for (n = 0; n < 2 * NB; n++) acc[n] += a[k] * Bt[k * ldb + n0 + n];     \\
                    for (n = 0; n < 2 * NB; n++) c[n] = acc[n];                                 \\
                } else if (nb == NB) {                                                          \\
                    for (n = 0; n < NB; n++) acc[n] = accumulate ? c[n] : (T)0;                 \\
                    for (k = 0; k < K; k++)                                                     \\
                        for (n = 0; n < NB; n++) acc[n] += a[k] * Bt[k * ldb + n0 + n];         \\
                    for (n = 0; n < NB; n++) c[n] = acc[n];                                     \\
                } else {                                                                        \\
                    for (n = 0; n < nb; n++) acc[n] = accumulate ? c[n] : (T)0;                 \\
                    for (k = 0; k < K; k++)                                                     \\
                        for (n = 0; n < nb; n++) acc[n] += a[k] * Bt[k * ldb + n0 + n];         \\
                    for (n = 0; n < nb; n++) c[n] = acc[n];                                     \\
                }                                                                               \\
            }                                                                                   \\
    }
    RR_SMM(rr_smm_f32, float, 64)
    RR_SMM(rr_smm_f64, double, 32)

    /* B (C x R) = A (R x C)^T, row-major. Tiles of RR_TI rows x RR_TJ columns of A, each cut
       into 4 x 4 blocks transposed in registers (two rounds of two-source shuffles: GCC/Clang
       vector extensions, lowered to SSE2 shuffles in the baseline build); the edges that do not
       fill a block are copied one entry at a time. The tile shape keeps the TJ rows of B that a
       tile writes (at a stride of R, a power of two for the LSTM's 4H x H) to a few L1 sets:
       W_hh (512 x 128) 7 us against 60-110 us by 16 x 16 scalar tiles (measured on one AVX-512
       core). A pure copy: the result is exact whichever path moves an entry. */
    #if defined(__GNUC__) || defined(__clang__)
    typedef int rr_v4i __attribute__((vector_size(16)));
    typedef long long rr_v4l __attribute__((vector_size(32)));
    typedef float rr_v4f __attribute__((vector_size(16)));
    typedef double rr_v4d __attribute__((vector_size(32)));
    #define RR_HAVE_V4 1
    #else
    #define RR_HAVE_V4 0
    #endif
    enum { RR_TI = 64, RR_TJ = 8 };
    #if RR_HAVE_V4
    #if defined(__clang__)
    #define RR_BLOCK4(T, VT, IT)                                                                \\
        do {                                                                                    \\
            VT r0, r1, r2, r3, t0, t1, t2, t3;                                                  \\
            memcpy(&r0, A + i * C + j, sizeof r0); memcpy(&r1, A + (i + 1) * C + j, sizeof r1);  \\
            memcpy(&r2, A + (i + 2) * C + j, sizeof r2); memcpy(&r3, A + (i + 3) * C + j, sizeof r3); \\
            t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5); t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7); \\
            t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5); t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7); \\
            r0 = __builtin_shufflevector(t0, t2, 0, 1, 4, 5); r1 = __builtin_shufflevector(t0, t2, 2, 3, 6, 7); \\
            r2 = __builtin_shufflevector(t1, t3, 0, 1, 4, 5); r3 = __builtin_shufflevector(t1, t3, 2, 3, 6, 7); \\
            memcpy(B + j * R + i, &r0, sizeof r0); memcpy(B + (j + 1) * R + i, &r1, sizeof r1);  \\
            memcpy(B + (j + 2) * R + i, &r2, sizeof r2); memcpy(B + (j + 3) * R + i, &r3, sizeof r3); \\
        } while (0)
    #else
    #define RR_BLOCK4(T, VT, IT)                                                                \\
        do {                                                                                    \\
            VT r0, r1, r2, r3, t0, t1, t2, t3;                                                  \\
            memcpy(&r0, A + i * C + j, sizeof r0); memcpy(&r1, A + (i + 1) * C + j, sizeof r1);  \\
            memcpy(&r2, A + (i + 2) * C + j, sizeof r2); memcpy(&r3, A + (i + 3) * C + j, sizeof r3); \\
            t0 = __builtin_shuffle(r0, r1, (IT){0, 4, 1, 5}); t1 = __builtin_shuffle(r0, r1, (IT){2, 6, 3, 7}); \\
            t2 = __builtin_shuffle(r2, r3, (IT){0, 4, 1, 5}); t3 = __builtin_shuffle(r2, r3, (IT){2, 6, 3, 7}); \\
            r0 = __builtin_shuffle(t0, t2, (IT){0, 1, 4, 5}); r1 = __builtin_shuffle(t0, t2, (IT){2, 3, 6, 7}); \\
            r2 = __builtin_shuffle(t1, t3, (IT){0, 1, 4, 5}); r3 = __builtin_shuffle(t1, t3, (IT){2, 3, 6, 7}); \\
            memcpy(B + j * R + i, &r0, sizeof r0); memcpy(B + (j + 1) * R + i, &r1, sizeof r1);  \\
            memcpy(B + (j + 2) * R + i, &r2, sizeof r2); memcpy(B + (j + 3) * R + i, &r3, sizeof r3); \\
        } while (0)
    #endif
    #else
    #define RR_BLOCK4(T, VT, IT)                                                                \\
        do {                                                                                    \\
            ptrdiff_t ii, jj;                                                                   \\
            for (jj = j; jj < j + 4; jj++)                                                      \\
                for (ii = i; ii < i + 4; ii++) B[jj * R + ii] = A[ii * C + jj];                  \\
        } while (0)
    #endif
    #define RR_TRANSPOSE(NAME, T, VT, IT)                                                       \\
    RR_UNUSED static void NAME(const T* restrict A, ptrdiff_t R, ptrdiff_t C, T* restrict B) {  \\
        ptrdiff_t R4 = R - R % 4, C4 = C - C % 4, i0, j0, i1, j1, i, j;                          \\
        for (j0 = 0; j0 < C4; j0 += RR_TJ) {                                                    \\
            j1 = j0 + RR_TJ < C4 ? j0 + RR_TJ : C4;                                              \\
            for (i0 = 0; i0 < R4; i0 += RR_TI) {                                                \\
                i1 = i0 + RR_TI < R4 ? i0 + RR_TI : R4;                                          \\
                for (i = i0; i < i1; i += 4)                                                    \\
                    for (j = j0; j < j1; j += 4) RR_BLOCK4(T, VT, IT);                           \\
            }                                                                                   \\
        }                                                                                       \\
        for (i = R4; i < R; i++)                          /* the last R % 4 rows of A */         \\
            for (j = 0; j < C; j++) B[j * R + i] = A[i * C + j];                                \\
        for (j = C4; j < C; j++)                          /* the last C % 4 columns */           \\
            for (i = 0; i < R4; i++) B[j * R + i] = A[i * C + j];                               \\
    }
    RR_TRANSPOSE(rr_transpose_f32, float, rr_v4f, rr_v4i)
    RR_TRANSPOSE(rr_transpose_f64, double, rr_v4d, rr_v4l)

    /* Whether this module was compiled with OpenMP, and its thread count. */
    #ifdef _OPENMP
    #include <omp.h>
    static inline int rr_openmp(void) { return 1; }
    static inline int rr_max_threads(void) { return omp_get_max_threads(); }
    #else
    static inline int rr_openmp(void) { return 0; }
    static inline int rr_max_threads(void) { return 1; }
    #endif
    """
    double rr_exp(double x) noexcept nogil
    float rr_expf(float x) noexcept nogil
    double rr_tanh(double x) noexcept nogil
    float rr_tanhf(float x) noexcept nogil
    double rr_sigmoid(double x) noexcept nogil
    float rr_sigmoidf(float x) noexcept nogil
    int rr_openmp() noexcept nogil
    int rr_max_threads() noexcept nogil
    void rr_exp_row_f32(const float* x, Py_ssize_t n, float alpha, float beta, float* out) noexcept nogil
    void rr_exp_row_f64(const double* x, Py_ssize_t n, double alpha, double beta, double* out) noexcept nogil
    void rr_tanh_row_f32(const float* x, Py_ssize_t n, float alpha, float beta, float* out) noexcept nogil
    void rr_tanh_row_f64(const double* x, Py_ssize_t n, double alpha, double beta, double* out) noexcept nogil
    void rr_sigmoid_row_f32(const float* x, Py_ssize_t n, float alpha, float beta, float* out) noexcept nogil
    void rr_sigmoid_row_f64(const double* x, Py_ssize_t n, double alpha, double beta, double* out) noexcept nogil
    void rr_transpose_f32(const float* A, Py_ssize_t R, Py_ssize_t C, float* B) noexcept nogil
    void rr_transpose_f64(const double* A, Py_ssize_t R, Py_ssize_t C, double* B) noexcept nogil
    void rr_smm_f32(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float* A, Py_ssize_t lda, const float* Bt,
                    Py_ssize_t ldb, int accumulate, float* C, Py_ssize_t ldc) noexcept nogil
    void rr_smm_f64(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const double* A, Py_ssize_t lda, const double* Bt,
                    Py_ssize_t ldb, int accumulate, double* C, Py_ssize_t ldc) noexcept nogil


cdef inline floating vexp(floating x) noexcept nogil:
    """exp(x), about 1 ulp, vectorisable."""
    if floating is float:
        return rr_expf(x)
    else:
        return rr_exp(x)


cdef inline floating vtanh(floating x) noexcept nogil:
    """tanh(x), about 1 ulp, vectorisable."""
    if floating is float:
        return rr_tanhf(x)
    else:
        return rr_tanh(x)


cdef inline floating vsigmoid(floating x) noexcept nogil:
    """σ(x) = 1/(1 + e^{−x}), vectorisable; 0 (not NaN) for very negative x."""
    if floating is float:
        return rr_sigmoidf(x)
    else:
        return rr_sigmoid(x)


cdef inline void exp_row(const floating* x, Py_ssize_t n, floating alpha, floating beta,
                         floating* out) noexcept nogil:
    """out[k] = exp(α·x[k] + β), k < n (out may be x): the instruction-set clone of the row loop."""
    if floating is float:
        rr_exp_row_f32(x, n, alpha, beta, out)
    else:
        rr_exp_row_f64(x, n, alpha, beta, out)


cdef inline double logaddexp(double x, double y) noexcept nogil:
    """log(eˣ + eʸ) in float64; −inf when both are −inf (NumPy's logaddexp)."""
    cdef double m = x if x > y else y
    if m == -INFINITY:
        return m
    cdef double d = x - y
    if d < 0:
        d = -d
    return m + log1p(libm_exp(-d))


cdef inline double log1m(double eps) noexcept nogil:
    """log1p(−ε), −inf at ε = 1."""
    if eps >= 1.0:
        return -INFINITY
    return log1p(-eps)


cdef inline void transpose(const floating* A, Py_ssize_t R, Py_ssize_t C, floating* B) noexcept nogil:
    """B (C×R) = Aᵀ for A (R×C), row-major."""
    if floating is float:
        rr_transpose_f32(A, R, C, B)
    else:
        rr_transpose_f64(A, R, C, B)


cdef inline bint use_smm(Py_ssize_t rows) noexcept nogil:
    """Whether a per-step product over ``rows`` rows goes to smm (else to BLAS: the packed GEMM
    from SMM_MAX_ROWS rows on, and below SMM_MIN_ROWS; one row goes to smm where the instruction-
    set clones are built (its one-row pass beats OpenBLAS's gemv there, not in the SSE2 baseline:
    RR_SMM's comment), else to gemv). _backend_cython.smm_rows is this rule in Python."""
    return SMM_MIN_ROWS <= rows <= SMM_MAX_ROWS or (rows == 1 and RR_HAVE_CLONES)


cdef inline void smm(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const floating* A, Py_ssize_t lda,
                     const floating* Bt, Py_ssize_t ldb, bint accumulate, floating* C, Py_ssize_t ldc) noexcept nogil:
    """C (M×N) = [C +] A (M×K) Bt (K×N), row-major, single-threaded: for a few rows (M ≤ SMM_MAX_ROWS)."""
    if floating is float:
        rr_smm_f32(M, N, K, A, lda, Bt, ldb, accumulate, C, ldc)
    else:
        rr_smm_f64(M, N, K, A, lda, Bt, ldb, accumulate, C, ldc)


# ------------------------------------------------------------------------------------- BLAS
# Below these sizes a product (M·N·K multiply-adds, ~170 µs on one core at 2^24) or a column sum
# (entries) runs on one thread: waking a sleeping OpenMP thread costs tens of µs on an idle machine
# and up to a scheduler slice on a loaded one.
cdef enum:
    PAR_MIN_MNK = 1 << 24
    PAR_MIN_ENTRIES = 1 << 18
    SMM_MIN_ROWS = 4        # per-step products of SMM_MIN_ROWS..SMM_MAX_ROWS rows (and of one row where
                            # the ISA clones are built: use_smm) use smm, not BLAS
    SMM_MAX_ROWS = 64

# Row-major products on top of the column-major BLAS: C (M×N) = α·op(A)·op(B) + β·C with
# op(X) = X or Xᵀ ('N' / 'T'), A, B, C row-major with leading dimensions lda, ldb, ldc. A
# row-major matrix is its column-major transpose, so this is the column-major call
# C ᵀ = op(B)ᵀ op(A)ᵀ: gemm(tb, ta, N, M, K, α, B, ldb, A, lda, β, C, ldc). One row (M = 1) goes
# to gemv: OpenBLAS's gemm has a per-call setup that dominates a batch-1 step.

cdef inline void gemm(char ta, char tb, int M, int N, int K, floating alpha,
                      const floating* A, int lda, const floating* B, int ldb,
                      floating beta, floating* C, int ldc) noexcept nogil:
    cdef int i, j, one = 1, kk, kk2, nn
    cdef char tr
    if M <= 0 or N <= 0:
        return
    if K <= 0:
        for i in range(M):
            for j in range(N):
                C[i * ldc + j] = 0 if beta == 0 else beta * C[i * ldc + j]
        return
    if lda < 1:
        lda = 1
    if ldb < 1:
        ldb = 1
    if ldc < 1:
        ldc = 1
    if M == 1:
        # c_j = Σ_k a_k op(B)_{kj}; a is the row of A (op(A) = A) or its column (op(A) = Aᵀ,
        # stride lda). y is zeroed first when β = 0: some OpenBLAS versions scale y by β = 0,
        # which turns garbage NaN in an np.empty buffer into NaN instead of overwriting it.
        if beta == 0:
            for j in range(N):
                C[j] = 0
        kk = one if ta == c'N' else lda
        if tb == c'T':
            # op(B) = Bᵀ, B (N×K) row-major = column-major K×N: c = (col-major B)ᵀ a
            tr = c'T'
            kk2 = K
            nn = N
            if floating is float:
                sgemv(&tr, &kk2, &nn, &alpha, <floating*>B, &ldb, <floating*>A, &kk, &beta, C, &one)
            else:
                dgemv(&tr, &kk2, &nn, &alpha, <floating*>B, &ldb, <floating*>A, &kk, &beta, C, &one)
        else:
            # op(B) = B (K×N) row-major = column-major N×K: c = (col-major B) a
            tr = c'N'
            kk2 = K
            nn = N
            if floating is float:
                sgemv(&tr, &nn, &kk2, &alpha, <floating*>B, &ldb, <floating*>A, &kk, &beta, C, &one)
            else:
                dgemv(&tr, &nn, &kk2, &alpha, <floating*>B, &ldb, <floating*>A, &kk, &beta, C, &one)
        return
    if floating is float:
        sgemm(&tb, &ta, &N, &M, &K, &alpha, <floating*>B, &ldb, <floating*>A, &lda, &beta, C, &ldc)
    else:
        dgemm(&tb, &ta, &N, &M, &K, &alpha, <floating*>B, &ldb, <floating*>A, &lda, &beta, C, &ldc)


cdef inline void pgemm(char ta, char tb, int M, int N, int K, floating alpha,
                       const floating* A, int lda, const floating* B, int ldb,
                       floating beta, floating* C, int ldc, int nthreads) noexcept nogil:
    """``gemm`` split over ``nthreads`` OpenMP threads by blocks of C's rows or columns (the
    longer side), each block one single-threaded BLAS call; one call below PAR_MIN_MNK. Every
    entry of C is computed by one call, in one order: the result does not depend on how the
    blocks are run, only (through BLAS's kernel choice) on the block sizes, i.e. the thread count."""
    cdef int p, n0, n1, per
    if nthreads <= 1 or <double>M * <double>N * <double>K < PAR_MIN_MNK:
        gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc)
        return
    if N >= M:
        per = ((N + nthreads - 1) // nthreads + 15) // 16 * 16
        for p in prange(nthreads, num_threads=nthreads, schedule="static"):
            n0 = p * per
            n1 = n0 + per
            if n1 > N:
                n1 = N
            if n0 < n1:
                gemm(ta, tb, M, n1 - n0, K, alpha, A, lda, B + (n0 if tb == c'N' else n0 * ldb), ldb,
                     beta, C + n0, ldc)
    else:
        per = ((M + nthreads - 1) // nthreads + 3) // 4 * 4
        for p in prange(nthreads, num_threads=nthreads, schedule="static"):
            n0 = p * per
            n1 = n0 + per
            if n1 > M:
                n1 = M
            if n0 < n1:
                gemm(ta, tb, n1 - n0, N, K, alpha, A + (n0 * lda if ta == c'N' else n0), lda, B, ldb,
                     beta, C + n0 * ldc, ldc)


cdef inline void _colsum(const floating* X, Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k0, Py_ssize_t k1,
                         Py_ssize_t ld, floating* out) noexcept nogil:
    cdef Py_ssize_t r, k
    cdef const floating* row
    for k in range(k0, k1):
        out[k] = 0
    for r in range(r0, r1):
        row = X + r * ld
        for k in range(k0, k1):
            out[k] = out[k] + row[k]


cdef inline void colsum(const floating* X, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t ld,
                        floating* out, int nthreads) noexcept nogil:
    """out[k] = Σ_r X[r, k] in row order (a fixed order); columns split over threads."""
    cdef Py_ssize_t r, k, p, k0, k1, per
    if nthreads <= 1 or rows * cols < PAR_MIN_ENTRIES:
        _colsum(X, 0, rows, 0, cols, ld, out)
        return
    per = ((cols + nthreads - 1) // nthreads + 15) // 16 * 16
    for p in prange(nthreads, num_threads=nthreads, schedule="static"):
        k0 = p * per
        k1 = k0 + per
        if k1 > cols:
            k1 = cols
        if k0 < k1:
            _colsum(X, 0, rows, k0, k1, ld, out)
