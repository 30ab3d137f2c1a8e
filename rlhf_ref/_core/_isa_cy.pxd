# The instruction-set clones of the compiled kernels' hot loops, on their own so that a module
# can use them without cimporting _common_cy (which cimports SciPy's BLAS: importing such a module
# imports scipy, and the argument checks' _check_cy must import with NumPy alone).

cdef extern from *:
    """
    #if defined(__GNUC__)
    #define RR_UNUSED __attribute__((unused))       /* not every module calls every kernel */
    #else
    #define RR_UNUSED
    #endif
    /* RR_CLONES: compile a row kernel for AVX-512, AVX2 and the baseline, the best picked when the
       module loads (an ifunc; GCC >= 8 or Clang >= 14 on x86-64 glibc Linux; elsewhere one
       baseline build). Define RLHF_REF_NO_CLONES to turn it off. */
    #if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(RLHF_REF_NO_CLONES) && \\
        ((defined(__clang__) && __clang_major__ >= 14) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8))
    #define RR_CLONES RR_UNUSED __attribute__((target_clones("avx512f", "avx2", "default")))
    #define RR_HAVE_CLONES 1
    #else
    #define RR_CLONES RR_UNUSED
    #define RR_HAVE_CLONES 0
    #endif
    """
    int RR_HAVE_CLONES
