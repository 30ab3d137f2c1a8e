"""The finiteness checks of the argument validation, in one pass per array (``_validate``).

Every public call checks that the parameters it is given are finite, and every training step
that its loss and gradients are. With NumPy that is a few calls per array, each with a fixed
cost of microseconds (an ``errstate``, a temporary, a reduction): 40 µs for the nine arrays of
a small model, 14 % of a B = 1 rollout (issue 12). Here one call takes every array: a
branch-free OR over the exponent bits (an entry is NaN or ±inf exactly when all its exponent
bits are set), compiled for AVX-512, AVX2 and the baseline (``RR_CLONES`` of ``_isa_cy.pxd``). It
imports with NumPy alone (no SciPy BLAS), as the argument checks must.

``first_nonfinite`` answers the same question as ``np.isfinite(a.astype(dtype)).all()`` for
each array, so ``_validate`` gives the same errors with or without this module.
"""

import numpy as np

from ._isa_cy cimport RR_HAVE_CLONES         # its C block (RR_CLONES) comes before ours; not _common_cy (scipy)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <stddef.h>

    /* NAME(x, n): 1 when some entry of x (IN), converted to OUT (the identity, or float64 rounded to
       float32 as astype(float32) rounds it: |x| >= 2^128 - 2^103 becomes inf), is NaN or +-inf, i.e.
       has every exponent bit (EXP, in OUT's bits UINT) set. */
    #define RRC_NONFINITE(NAME, IN, OUT, UINT, EXP)                                                  \\
    RR_CLONES static int NAME(const IN* x, ptrdiff_t n) {                                           \\
        UINT acc = 0;                                                                               \\
        for (ptrdiff_t i = 0; i < n; i++) {                                                         \\
            OUT v = (OUT)x[i];                                                                      \\
            UINT u;                                                                                 \\
            memcpy(&u, &v, sizeof u);                                                               \\
            acc |= (UINT)((u & EXP) == EXP);                                                        \\
        }                                                                                           \\
        return acc != 0;                                                                            \\
    }
    RRC_NONFINITE(rrc_nonfinite_f32, float, float, uint32_t, 0x7f800000u)
    RRC_NONFINITE(rrc_nonfinite_f64, double, double, uint64_t, 0x7ff0000000000000ull)
    RRC_NONFINITE(rrc_nonfinite_f64_as_f32, double, float, uint32_t, 0x7f800000u)
    """
    int rrc_nonfinite_f32(const float* x, Py_ssize_t n) noexcept nogil
    int rrc_nonfinite_f64(const double* x, Py_ssize_t n) noexcept nogil
    int rrc_nonfinite_f64_as_f32(const double* x, Py_ssize_t n) noexcept nogil


def first_nonfinite(arrays, bint as_float32=False):
    """Index of the first array in ``arrays`` (a sequence of ndarrays) with an entry that is NaN or
    ±inf — with ``as_float32``, NaN or ±inf once cast to float32 — or −1 when every entry of every
    array is finite. Only C-contiguous, aligned, native-order float32 / float64 ndarrays are read
    here; for any other the answer is None and the caller decides with NumPy."""
    cdef Py_ssize_t i
    cdef const float[::1] f
    cdef const double[::1] d
    cdef int bad
    for i in range(len(arrays)):
        a = arrays[i]
        if type(a) is not np.ndarray or not a.flags.c_contiguous or not a.flags.aligned or not a.dtype.isnative:
            return None
        if a.size == 0:
            continue
        ch = a.dtype.char
        if ch == "f":
            f = a.reshape(-1)
            bad = rrc_nonfinite_f32(&f[0], f.shape[0])
        elif ch == "d":
            d = a.reshape(-1)
            bad = rrc_nonfinite_f64_as_f32(&d[0], d.shape[0]) if as_float32 else rrc_nonfinite_f64(&d[0], d.shape[0])
        else:
            return None
        if bad:
            return i
    return -1
