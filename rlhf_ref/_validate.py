"""Input validation shared by the reference and every backend wrapper.

Every public function validates once, at its boundary, and raises an error that
names the argument, what was expected and what was got (numpy/torch style).
Kernels run with bounds checks off, so nothing past this point catches mistakes.
"""

from __future__ import annotations

import numbers

import numpy as np

try:            # the compiled finiteness pass (rlhf_ref/_core/_check_cy.pyx); NumPy below answers the same
    from ._core._check_cy import first_nonfinite as _first_nonfinite_compiled
except ImportError:
    _first_nonfinite_compiled = None

FLOAT_DTYPES = (np.float32, np.float64)


def as_int_array(x, name, ndim=None, shape=None):
    """Return ``x`` as an int64 array; refuse floats, bools and wrong shapes."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if shape is not None:
        check_shape(a, name, shape)
    return a.astype(np.int64, copy=False)


def as_float_array(x, name, ndim=None, shape=None, dtype=None, finite=True):
    """Return ``x`` as a float array (``dtype`` if given, else float64 unless already float32/64)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    elif a.dtype not in FLOAT_DTYPES:
        a = a.astype(np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if shape is not None:
        check_shape(a, name, shape)
    if finite and a.size and first_nonfinite([a]) >= 0:
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise ValueError(f"{name} must be finite, got {a[bad]} at index {bad}")
    return a


def check_shape(a, name, shape):
    """``shape`` may contain None for free dimensions."""
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")


def check_range(value, name, lo=None, hi=None, lo_open=False, hi_open=False):
    is_number = isinstance(value, numbers.Real) or (isinstance(value, np.ndarray) and value.ndim == 0
                                                     and value.dtype.kind in "iuf")
    if not is_number or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def check_finite_result(dtype, *arrays):
    """A training step's loss, upstream gradients and gradients must be finite: with finite, valid
    inputs a non-finite one is an overflow of the dtype (huge weights, a huge alpha, huge rewards),
    and every backend raises this same error for it instead of returning inf or NaN."""
    dt = np.dtype(dtype)
    if first_nonfinite([np.asarray(a) for a in arrays], dt) >= 0:      # finite in the params' dtype
        raise ValueError(f"params, alpha or the rewards give a non-finite loss or gradient in {dt} (an "
                         f"overflow): the weights, alpha or the rewards are too large for {dt}")


def check_eos_id(eos_id, V):
    """eos_id: an integer token id in [0, V) (bools, floats and strings are refused)."""
    if isinstance(eos_id, (bool, np.bool_)) or not isinstance(eos_id, numbers.Integral):
        raise TypeError(f"eos_id must be an integer token id in [0, {V}), got {type(eos_id).__name__} {eos_id!r}")
    if not 0 <= int(eos_id) < V:
        raise ValueError(f"eos_id must lie in [0, {V}), got {eos_id!r}")
    return int(eos_id)


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_tokens(tokens, vocab_size, name="tokens"):
    """tokens (B, T) int; ids must lie in [0, V) where they are read (checked by caller with mask)."""
    t = as_int_array(tokens, name, ndim=2)
    return t


def check_batch(tokens, mask, prompt_len=None, vocab_size=None):
    """Validate an episode batch (docs/conventions.md §2) and return (tokens int64, mask float64, prompt_len int64).

    mask must be 0/1 and right-padded (each row a prefix of ones); token ids at
    real positions must lie in [0, vocab_size); prompt_len must be >= 1 on every
    non-empty row and <= the row length. All-padding rows are allowed (their prompt_len
    may be anything in [0, T]); they take part in no result. Padded ids are never read: the
    tokens returned hold PAD (0) at every padding position, whatever the caller put there.
    """
    tokens = as_int_array(tokens, "tokens", ndim=2)
    B, T = tokens.shape
    m = np.asarray(mask)
    if m.dtype.kind not in "biuf":
        raise TypeError(f"mask must be a 0/1 numeric or bool array, got dtype {m.dtype}")
    check_shape(m, "mask", (B, T))
    # Every check below is one pass or two; the messages are worked out only on failure (every call
    # runs this, and np.any / np.array_equal's dispatch cost microseconds each: issue 12).
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("mask must contain only 0 and 1")
    m = m.astype(np.float64, order="C")                    # C order whatever the caller's layout (kernels read it so)
    gap = m[:, 1:] > m[:, :-1]                             # a 1 after a 0: not a prefix of ones
    if gap.any():
        row = int(np.argwhere(gap.any(axis=1))[0, 0])
        raise ValueError(f"mask must be right-padded (each row a prefix of ones); row {row} is {m[row].astype(int).tolist()}")
    lengths = m.sum(axis=1).astype(np.int64)
    real = m > 0
    if vocab_size is not None and tokens.size:
        out = real & ((tokens < 0) | (tokens >= vocab_size))
        if out.any():
            b, t = (int(i) for i in np.argwhere(out)[0])
            raise ValueError(f"tokens must lie in [0, {vocab_size}) on real positions; tokens[{b}, {t}] = {tokens[b, t]}")
    tokens = np.where(real, tokens, 0)                     # padded ids are never read (docs/conventions.md §2)
    if prompt_len is None:
        return tokens, m, None
    pl = as_int_array(prompt_len, "prompt_len", ndim=1, shape=(B,))
    nonempty = lengths > 0
    hi = np.where(nonempty, lengths, T)                    # an all-padding row: any value in [0, T]
    if ((pl < nonempty) | (pl > hi)).any():                # >= 1 on a non-empty row, >= 0 on an empty one
        if (nonempty & (pl < 1)).any():
            b = int(np.argwhere(nonempty & (pl < 1))[0, 0])
            raise ValueError(f"prompt_len must be >= 1 (BOS included) on non-empty rows; prompt_len[{b}] = {pl[b]}")
        b = int(np.argwhere((pl < 0) | (pl > hi))[0, 0])
        raise ValueError(f"prompt_len must lie in [1, row length]; prompt_len[{b}] = {pl[b]} with row length "
                         f"{lengths[b]} (on an all-padding row: in [0, T], T = {T})")
    return tokens, m, np.ascontiguousarray(pl)


def first_nonfinite(arrays, dtype=None):
    """Index of the first array in ``arrays`` with an entry that is not finite — in ``dtype`` when
    given (a float64 entry beyond float32's range is not finite in float32) — or −1 if none.

    The argument checks run this on every call (all parameters, every gradient), so its fixed cost
    per array matters at small shapes (issue 12): the compiled pass (``_core/_check_cy``) reads each
    array once, 35 → 12 µs for the nine arrays of an H = 128 model (measured); this NumPy loop is
    the same test and runs where that module is not built or an array is not contiguous."""
    as32 = dtype is not None and np.dtype(dtype) == np.float32
    if _first_nonfinite_compiled is not None:
        i = _first_nonfinite_compiled(arrays, as32)
        if i is not None:
            return i
    with np.errstate(over="ignore", invalid="ignore"):
        for i, a in enumerate(arrays):
            a = np.asarray(a)
            if dtype is not None:
                a = a.astype(dtype)
            if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
                return i
    return -1


def check_params(params, expected, name="params"):
    """``expected`` maps key -> shape. Missing, extra, non-finite or misshapen entries raise."""
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}")
    missing = sorted(set(expected) - set(params))
    if missing:
        raise ValueError(f"{name} is missing {missing}; expected keys {sorted(expected)}")
    keys = list(expected)
    for j, k in enumerate(keys):                    # per key: dtype, then shape, then finite (in that order)
        a, shape = params[k], tuple(expected[k])
        if not isinstance(a, np.ndarray) or a.dtype not in FLOAT_DTYPES:
            err = TypeError(f"{name}[{k!r}] must be a float32 or float64 ndarray, got "
                            f"{type(a).__name__}{'' if not hasattr(a, 'dtype') else ' ' + str(a.dtype)}")
        elif a.shape != shape:
            err = ValueError(f"{name}[{k!r}] must have shape {shape}, got {a.shape}")
        else:
            continue
        _raise_nonfinite(params, keys[:j], name)     # an earlier key's non-finite entry is reported first
        raise err
    _raise_nonfinite(params, keys, name)            # one pass over every array (the common case: all good)


def _raise_nonfinite(params, keys, name):
    bad = first_nonfinite([params[k] for k in keys])
    if bad >= 0:
        raise ValueError(f"{name}[{keys[bad]!r}] must be finite")
