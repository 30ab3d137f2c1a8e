"""Numba plumbing shared by the ``_*_nb.py`` kernels: the jit decorator, typed constants, SIMD math.

Imported only when the numba backend is asked for (``rlhf_ref.backends`` imports
``_backend_numba`` lazily), so ``import rlhf_ref`` never needs numba.

* ``kernel(...)`` is ``numba.njit`` with ``cache=True`` (unless ``RLHF_REF_NUMBA_CACHE=0``) and
  the cache stamp salted with the hash of *every* kernel file in this folder. Numba stamps a
  cached function with its own file only, so an edit to a helper in another file (say the
  exp here) would otherwise leave stale machine code behind (reproduced in the founding
  team's research notes, ``packaging-numba-gym-notes.md`` §2). A read-only install with no writable
  cache location falls back to ``cache=False`` (numba #4908) instead of failing at import.
* ``error_model="numpy"``: a float division by zero gives ±inf/NaN as in NumPy instead of
  raising ZeroDivisionError; the check Numba otherwise inserts is a branch in every division
  and keeps LLVM from vectorising σ and tanh (measured: 4–6 ns against 0.4 ns per element).
* No ``fastmath=True``: it licenses the compiler to assume no ±inf/NaN, which masking and
  log-softmax rely on. Elementwise kernels use ``fastmath={"contract"}`` only: it lets LLVM
  fuse ``a*b + c`` into one FMA (one rounding instead of two); it changes no inf/NaN rule.
  Never where the rounding order is part of the convention: the policy's α·z − m must round
  α·z first (fused, the maximum's term is no longer exp(0) and large α samples other tokens,
  issue 10), so ``softmax_row`` and ``grad_row`` (``_policy_nb``) have no fast-math at all; the
  LSTM cell and its backward keep it (a one-ulp difference that nothing amplifies).
* ``cst(like, v)``: the constant ``v`` in the float type of ``like`` (a float or an array).
  Numba types a Python float literal as float64, and float32 × float64 is float64, which
  would silently run the float32 kernels in float64 and stop them vectorising.
* ``vexp``, ``vsigmoid``, ``vtanh``: branch-free exp / σ / tanh that LLVM vectorises. The
  llvmlite wheel has no SVML, so ``math.exp`` and ``math.tanh`` in a loop are scalar libm
  calls (1.8 ns and 13.6 ns per element, measured); these run at about 0.3 ns (float32).
  exp: Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, a polynomial for e^r (Cephes
  ``expf`` coefficients in float32; Taylor to r¹³ in float64), scaled by 2ⁿ built in the
  exponent bits. Errors: ≤ 1 ulp (float32), ≤ 2 ulp (float64) in the normal range; results
  below the smallest normal flush to 0; exp(−inf) = 0, NaN propagates.
  tanh: Cephes' rational (float64) / polynomial (float32) for |x| < 0.625, else
  1 − 2/(e^{2|x|} + 1) with the sign restored, so small arguments keep full relative precision.
  They are plain ``@overload``s: LLVM inlines and vectorises them in the calling loop
  (``inline="always"``, Numba's IR-level inlining, only adds pedantic SSA warnings).
* ``fma(a, b, c)``: llvm.fma, one rounding whether LLVM vectorises the loop or not (fast-math
  contraction is a licence, not a promise); ``tile_buffer``/``tile_rows``/``TILE_COLS``: the stack
  tile of ``_lstm_nb.smm`` that LLVM keeps in registers.
* Loops that should vectorise run from 0 (``for j in range(H): a[2*H + j]``): LLVM left
  ``for j in range(2*H, 3*H)`` scalar (measured 18× slower for the tanh gate).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import numba
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from llvmlite import ir

HERE = os.path.dirname(os.path.abspath(__file__))
ELEMENTWISE = {"contract"}          # the only fast-math flag used (see the module docstring)


def _kernel_files():
    return sorted(f for f in os.listdir(HERE) if f.endswith("_nb.py") or f == "_nb_common.py")


def _salt():
    h = hashlib.sha256()
    for f in _kernel_files():
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()


CACHE = os.environ.get("RLHF_REF_NUMBA_CACHE", "1") == "1"
SALT = _salt()
CACHE_STATE = {"requested": CACHE, "salted": 0, "uncached": []}


def kernel(fn=None, **opts):
    """``numba.njit`` with a salted on-disk cache; ``opts`` go to njit (``parallel``, ``fastmath``)."""
    if fn is None:
        return lambda f: kernel(f, **opts)
    opts.setdefault("error_model", "numpy")     # x/0 gives inf/NaN, no ZeroDivisionError branch (which stops SIMD)
    if not CACHE:
        return numba.njit(cache=False, **opts)(fn)
    try:
        disp = numba.njit(cache=True, **opts)(fn)
    except RuntimeError:            # "cannot cache function ...: no locator available" (read-only install)
        CACHE_STATE["uncached"].append(fn.__name__)
        return numba.njit(cache=False, **opts)(fn)
    try:
        cf = disp._cache._cache_file
        cf._source_stamp = (cf._source_stamp, SALT)
        CACHE_STATE["salted"] += 1
    except AttributeError:          # numba internals moved: never risk a stale cache
        from numba.core.caching import NullCache
        disp._cache = NullCache()
        CACHE_STATE["uncached"].append(fn.__name__)
    return disp


# ----------------------------------------------------------------------------- typed constants

def cst(like, v):
    """The constant ``v`` as the float type of ``like`` (float or float array). Numba-only."""
    raise NotImplementedError("cst is only callable inside a numba kernel")


@overload(cst)
def _cst(like, v):
    t = like.dtype if isinstance(like, types.Array) else like
    if t == types.float32:
        return lambda like, v: np.float32(v)
    if t == types.float64:
        return lambda like, v: np.float64(v)
    raise numba.TypingError(f"cst: need a float32/float64 value or array, got {like}")


# ----------------------------------------------------------------------------- bit casts

@intrinsic
def _i32_as_f32(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _i64_as_f64(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


# ----------------------------------------------------------------------------- fma, register tiles

def fma(a, b, c):
    """a·b + c with one rounding (llvm.fma), in every loop that calls it, vectorised or not."""
    raise NotImplementedError("fma is only callable inside a numba kernel")


@intrinsic
def _fma(typingctx, a, b, c):
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        f = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(f, args)
    return sig, codegen


@overload(fma)
def _fma_ov(a, b, c):
    if isinstance(a, types.Float) and a == b == c:
        return lambda a, b, c: _fma(a, b, c)


TILE_COLS = 64            # a register tile: 64 columns × 4 rows (float32) or 2 rows (float64) = 16 AVX-512 registers


def tile_rows(like):
    """The rows of a register tile for like's dtype (4 float32, 2 float64), a compile-time constant."""
    raise NotImplementedError("tile_rows is only callable inside a numba kernel")


@overload(tile_rows)
def _tile_rows(like):
    if isinstance(like, types.Array) and like.dtype in (types.float32, types.float64):
        n = 4 if like.dtype == types.float32 else 2
        return lambda like: n


@intrinsic
def tile_buffer(typingctx, like):
    """A pointer to a 4 × TILE_COLS buffer of like's dtype (an array) on the stack. A kernel that indexes
    it only at indices LLVM can resolve at compile time (fully unrolled loops) gets it promoted to
    registers (``_lstm_nb.smm``; a heap array from np.empty never is)."""
    if not (isinstance(like, types.Array) and like.dtype in (types.float32, types.float64)):
        return None
    dt = like.dtype
    n = 4 * TILE_COLS

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dt), size=context.get_constant(types.intp, n))
    return types.CPointer(dt)(like), codegen


# ----------------------------------------------------------------------------- exp, σ, tanh

def vexp(x):
    raise NotImplementedError("vexp is only callable inside a numba kernel")


def vsigmoid(x):
    raise NotImplementedError("vsigmoid is only callable inside a numba kernel")


def vtanh(x):
    raise NotImplementedError("vtanh is only callable inside a numba kernel")


@overload(vexp)
def _vexp(x):
    if x == types.float32:
        def impl(x):
            xc = min(max(x, np.float32(-87.4)), np.float32(88.75))
            n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
            r = xc - n * np.float32(0.693359375)
            r = r - n * np.float32(-2.12194440e-4)
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * (r * r) + r + np.float32(1.0)
            ni = np.int32(n)
            n1 = ni >> np.int32(1)                                    # 2ⁿ = 2^n1 · 2^(n−n1): no overflow at the ends
            y = p * _i32_as_f32((n1 + np.int32(127)) << np.int32(23)) * _i32_as_f32((ni - n1 + np.int32(127)) << np.int32(23))
            y = y if x > np.float32(-87.33) else np.float32(0.0)      # below the normal range, and -inf
            y = y if x < np.float32(88.72) else np.float32(np.inf)
            return y if x == x else x                                 # NaN propagates
        return impl
    if x == types.float64:
        def impl(x):
            xc = min(max(x, -708.4), 709.8)
            n = np.floor(xc * 1.4426950408889634 + 0.5)
            r = xc - n * 6.93147180369123816490e-01
            r = r - n * 1.90821492927058770002e-10
            p = 1.0 / 6227020800.0
            p = p * r + 1.0 / 479001600.0
            p = p * r + 1.0 / 39916800.0
            p = p * r + 1.0 / 3628800.0
            p = p * r + 1.0 / 362880.0
            p = p * r + 1.0 / 40320.0
            p = p * r + 1.0 / 5040.0
            p = p * r + 1.0 / 720.0
            p = p * r + 1.0 / 120.0
            p = p * r + 1.0 / 24.0
            p = p * r + 1.0 / 6.0
            p = p * r + 0.5
            p = p * (r * r) + r + 1.0
            ni = np.int64(n)
            n1 = ni >> np.int64(1)
            y = p * _i64_as_f64((n1 + np.int64(1023)) << np.int64(52)) * _i64_as_f64((ni - n1 + np.int64(1023)) << np.int64(52))
            y = y if x > -708.39 else 0.0
            y = y if x < 709.78 else np.inf
            return y if x == x else x
        return impl


@overload(vsigmoid)
def _vsigmoid(x):
    if isinstance(x, types.Float):
        def impl(x):
            one = cst(x, 1.0)
            return one / (one + vexp(-x))
        return impl


@overload(vtanh)
def _vtanh(x):
    if x == types.float32:
        def impl(x):
            ax = abs(x)
            z = x * x
            small = (((((np.float32(-5.70498872745e-3) * z + np.float32(2.06390887954e-2)) * z
                        - np.float32(5.37397155531e-2)) * z + np.float32(1.33314422036e-1)) * z
                      - np.float32(3.33332819422e-1)) * z) * x + x
            e = vexp(np.float32(2.0) * ax)
            big = np.float32(1.0) - np.float32(2.0) / (e + np.float32(1.0))
            big = big if x >= np.float32(0.0) else -big
            return small if ax < np.float32(0.625) else big
        return impl
    if x == types.float64:
        def impl(x):
            ax = abs(x)
            s = x * x
            pp = (-9.64399179425052238628e-1 * s - 9.92877231001918586564e1) * s - 1.61468768441708447952e3
            qq = ((s + 1.12811678491632931402e2) * s + 2.23548839060100448583e3) * s + 4.84406305325125486048e3
            small = x + x * s * pp / qq
            e = vexp(2.0 * ax)
            big = 1.0 - 2.0 / (e + 1.0)
            big = big if x >= 0.0 else -big
            return small if ax < 0.625 else big
        return impl


@kernel(fastmath=ELEMENTWISE)
def apply_vexp(x, out):
    """out = vexp(x) elementwise (1-D); for tests and the accuracy check."""
    for i in range(x.shape[0]):
        out[i] = vexp(x[i])


@kernel(fastmath=ELEMENTWISE)
def apply_vtanh(x, out):
    for i in range(x.shape[0]):
        out[i] = vtanh(x[i])


@kernel(fastmath=ELEMENTWISE)
def apply_vsigmoid(x, out):
    for i in range(x.shape[0]):
        out[i] = vsigmoid(x[i])

