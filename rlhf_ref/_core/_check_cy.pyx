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

    /* 1 when some entry is NaN or +-inf: all eight (eleven) exponent bits set. */
    RR_CLONES static int rrc_nonfinite_f32(const float* x, ptrdiff_t n) {
        uint32_t acc = 0;
        for (ptrdiff_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, x + i, 4);
            acc |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
        }
        return acc != 0;
    }
    RR_CLONES static int rrc_nonfinite_f64(const double* x, ptrdiff_t n) {
        uint64_t acc = 0;
        for (ptrdiff_t i = 0; i < n; i++) {
            uint64_t u;
            memcpy(&u, x + i, 8);
            acc |= (uint64_t)((u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
        }
        return acc != 0;
    }
    /* float64 entries that are not finite once rounded to float32 (what astype(float32) gives:
       round to nearest, so |x| >= 2^128 - 2^103 becomes inf), or not finite at all. */
    RR_CLONES static int rrc_nonfinite_f64_as_f32(const double* x, ptrdiff_t n) {
        uint32_t acc = 0;
        for (ptrdiff_t i = 0; i < n; i++) {
            float f = (float)x[i];
            uint32_t u;
            memcpy(&u, &f, 4);
            acc |= (uint32_t)((u & 0x7f800000u) == 0x7f800000u);
        }
        return acc != 0;
    }
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
