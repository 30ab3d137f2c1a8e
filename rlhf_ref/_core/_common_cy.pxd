# Shared inline helpers of the Cython kernels (cimported by _lstm_cy, _train_cy, _rollout_cy,
# _policy_cy): elementwise exp / tanh / sigmoid accurate to about an ulp and vectorisable, and
# row-major wrappers of SciPy's Cython BLAS. Everything here is `inline`: each extension module
# that cimports this file gets its own copy, so nothing links across modules.
#
# Why our own exp/tanh: libm's are scalar calls that GCC vectorises only under -ffast-math
# (libmvec), and -ffast-math is forbidden (it flips FTZ/DAZ for the whole process and breaks the
# ±inf that masking and log-softmax rely on). The functions below are branch-free C (a select,
# no call), so GCC -O3 vectorises the loops that use them at the baseline ISA (SSE2: 2 doubles or
# 4 floats per instruction) with no special flags.
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
# Measured against numpy (tests/test_cython_backend.py::test_elementwise_accuracy): max error
# about 1 ulp for exp and tanh, 2 ulp for sigmoid, float32 and float64.

from cython cimport floating
from libc.math cimport log, log1p, exp as libm_exp, INFINITY
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t rr_bits64(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
    static inline double rr_from64(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }
    static inline uint32_t rr_bits32(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
    static inline float rr_from32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

    static inline double rr_exp(double x) {
        const double SHIFT = 6755399441055744.0;                 /* 1.5 * 2^52 */
        const double LOG2E = 1.4426950408889634;
        const double LN2HI = 6.93147180369123816490e-01;         /* 0x3fe62e42fee00000 */
        const double LN2LO = 1.90821492927058770002e-10;
        double t, nd, r, p, t1, n1d, t2;
        uint64_t bs = rr_bits64(SHIFT);
        x = x < -746.0 ? -746.0 : x;                             /* keeps NaN */
        x = x > 710.0 ? 710.0 : x;
        t = x * LOG2E + SHIFT;
        nd = t - SHIFT;                                          /* rint(x / ln2) */
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
        return p * rr_from64((rr_bits64(t1) - bs + 1023u) << 52)
                 * rr_from64((rr_bits64(t2) - bs + 1023u) << 52);
    }

    static inline float rr_expf(float x) {
        const float SHIFT = 12582912.0f;                         /* 1.5 * 2^23 */
        const float LOG2E = 1.44269504088896341f;
        const float LN2HI = 0.693145751953125f;                  /* 0x3f317200 */
        const float LN2LO = 1.428606765330187045e-06f;
        float t, nd, r, p, t1, n1d, t2;
        uint32_t bs = rr_bits32(SHIFT);
        x = x < -104.0f ? -104.0f : x;
        x = x > 89.0f ? 89.0f : x;
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
        return p * rr_from32((rr_bits32(t1) - bs + 127u) << 23)
                 * rr_from32((rr_bits32(t2) - bs + 127u) << 23);
    }

    static inline double rr_tanh(double x) {
        double ax = x < 0 ? -x : x;
        double z = x * x;
        double small = x + x * z * (((-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z
                                     - 1.61468768441708447952e3)
                                    / (((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z
                                       + 4.84406305325125486048e3));
        double big = 1.0 - 2.0 / (rr_exp(ax + ax) + 1.0);
        big = x < 0 ? -big : big;
        return ax < 0.625 ? small : big;
    }

    static inline float rr_tanhf(float x) {
        float ax = x < 0 ? -x : x;
        float z = x * x;
        float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z
                        + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
        float big = 1.0f - 2.0f / (rr_expf(ax + ax) + 1.0f);
        big = x < 0 ? -big : big;
        return ax < 0.625f ? small : big;
    }

    static inline double rr_sigmoid(double x) { return 1.0 / (1.0 + rr_exp(-x)); }
    static inline float rr_sigmoidf(float x) { return 1.0f / (1.0f + rr_expf(-x)); }

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


# ------------------------------------------------------------------------------------- BLAS
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
