"""The argument checks' fast paths answer exactly what their plain NumPy statements answer.

Issue 12 made the per-call checks cheap (a compiled finiteness pass, one-pass batch checks, a
comparison instead of an errstate cast); these tests hold each against the plain definition.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_ref import _validate, backends, policy
from rlhf_ref._validate import check_batch, first_nonfinite

F32_HALFWAY = 2.0 ** 128 - 2.0 ** 103       # the smallest float64 that rounds to inf in float32


def _plain(arrays, dtype=None):
    """The definition: index of the first array not all finite after astype(dtype), else -1."""
    with np.errstate(over="ignore"):
        for i, a in enumerate(arrays):
            a = np.asarray(a)
            if not np.isfinite(a.astype(dtype) if dtype is not None else a).all():
                return i
    return -1


def test_compiled_pass_is_built_with_the_kernels():
    """A build that has the Cython kernels has the finiteness pass too (no silent NumPy fallback)."""
    if backends.status("cython").available:
        assert _validate._first_nonfinite_compiled is not None


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_first_nonfinite_is_the_plain_test(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    arrays = []
    for _ in range(data.draw(st.integers(0, 5))):
        dt = data.draw(st.sampled_from([np.float32, np.float64]))
        n = data.draw(st.sampled_from([0, 1, 3, 16, 17, 63, 64, 1000]))
        a = rng.standard_normal(n).astype(dt)
        if n and data.draw(st.booleans()):
            bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 3.5e38, -F32_HALFWAY,
                                             float(np.nextafter(F32_HALFWAY, 0)), 1e300]))
            with np.errstate(over="ignore"):
                a[data.draw(st.integers(0, n - 1))] = bad
        if data.draw(st.booleans()) and n >= 4:
            a = a.reshape(-1, 2 if n % 2 == 0 else 1)
        arrays.append(a)
    for dtype in (None, np.float32, np.float64):
        assert first_nonfinite(arrays, dtype) == _plain(arrays, dtype)


def test_first_nonfinite_layouts_the_compiled_pass_does_not_read():
    """Strided, byte-swapped, integer and 0-d inputs go to NumPy and still get the right answer."""
    a = np.zeros((4, 6), np.float32)
    a[1, 3] = np.nan
    cases = [[a[:, ::2]], [a[:, 1::2]], [np.array([1.0, np.inf], ">f8")], [np.arange(5)], [np.float64(np.nan)],
             [np.zeros(3), np.array(np.inf)], [3.0, float("nan")]]
    for arrays in cases:
        assert first_nonfinite(arrays) == _plain(arrays)
    if _validate._first_nonfinite_compiled is not None:
        assert _validate._first_nonfinite_compiled([a[:, ::2]], False) is None
        assert _validate._first_nonfinite_compiled([np.zeros(2, ">f4")], False) is None


@pytest.mark.parametrize("alpha", [1.0, 3.4e38, F32_HALFWAY, float(np.nextafter(F32_HALFWAY, 0)), -F32_HALFWAY,
                                   1e308, float(np.finfo(np.float64).max), np.inf, -np.inf, np.nan,
                                   np.float32(2.5), np.float64(-1e39)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alpha_finite_in_the_dtype_is_the_cast(alpha, dtype):
    with np.errstate(over="ignore"):
        finite = bool(np.isfinite(np.dtype(dtype).type(alpha)))
    if finite:
        policy.check_alpha_dtype(alpha, dtype)
    else:
        with pytest.raises(ValueError, match="non-finite action scores"):
            policy.check_alpha_dtype(alpha, dtype)


def _batch_error(tokens, mask, pl, V):
    """The plain definition of a valid batch (docs/conventions.md §2), or the first rule broken."""
    m = np.asarray(mask, np.float64)
    if not np.isin(m, (0, 1)).all():
        return "only 0 and 1"
    lengths = m.sum(1).astype(int)
    if any(not np.array_equal(m[b], np.arange(m.shape[1]) < lengths[b]) for b in range(m.shape[0])):
        return "right-padded"
    if any(not 0 <= tokens[b, t] < V for b, t in zip(*np.nonzero(m))):
        return "tokens must lie"
    for b in range(m.shape[0]):
        if lengths[b] > 0 and pl[b] < 1:
            return "BOS included"
    for b in range(m.shape[0]):
        if not 0 <= pl[b] <= (lengths[b] if lengths[b] > 0 else m.shape[1]):
            return "row length"
    return None


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_check_batch_accepts_and_refuses_as_the_definition(data):
    B, T, V = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 6)), 5
    lengths = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = (np.arange(T)[None, :] < np.array(lengths, int).reshape(B, 1)).astype(float)
    tokens = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=B * T, max_size=B * T)), int).reshape(B, T)
    pl = np.array([data.draw(st.integers(1, max(n, 1))) for n in lengths], int)
    if B and T:
        b, t = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, T - 1))
        what = data.draw(st.sampled_from(["none", "mask2", "hole", "token", "pl0", "pl_long", "pl_neg"]))
        if what == "mask2":
            mask[b, t] = 2
        elif what == "hole":
            mask[b, t] = 1 - mask[b, t]
        elif what == "token":
            tokens[b, t] = data.draw(st.sampled_from([-1, V, 10 ** 9]))
        elif what == "pl0":
            pl[b] = 0
        elif what == "pl_long":
            pl[b] = T + 1
        elif what == "pl_neg":
            pl[b] = -1
    if data.draw(st.booleans()):
        mask = np.asfortranarray(mask)
    want = _batch_error(tokens, mask, pl, V)
    if want is None:
        tok, m, p = check_batch(tokens, mask, pl, vocab_size=V)
        assert m.flags.c_contiguous and m.dtype == np.float64 and np.array_equal(m, mask)
        assert np.array_equal(tok, np.where(mask > 0, tokens, 0)) and np.array_equal(p, pl)
    else:
        with pytest.raises(ValueError, match=want):
            check_batch(tokens, mask, pl, vocab_size=V)


def test_unaligned_arrays_are_read_by_numpy():
    """An array that is not aligned for its dtype (a view into a byte buffer at an odd offset) is not
    handed to the compiled pass (which reads whole float32/float64 values); NumPy answers."""
    buf = np.zeros(8 * 9 + 1, np.uint8)
    a = np.frombuffer(buf.data, np.float64, count=9, offset=1)
    assert not a.flags.aligned
    assert first_nonfinite([a]) == -1
    b = a.copy()
    b[4] = np.inf
    buf[1:] = np.frombuffer(b.tobytes(), np.uint8)
    assert first_nonfinite([a]) == 0 and first_nonfinite([a], np.float32) == 0
    if _validate._first_nonfinite_compiled is not None:
        assert _validate._first_nonfinite_compiled([a], False) is None


def test_params_errors_keep_the_per_key_order():
    """Per key in the expected order: dtype, shape, finite; so a non-finite earlier key is reported
    before a later key's wrong dtype or shape, and a wrong earlier key before a later non-finite one."""
    from rlhf_ref._validate import check_params
    expected = {"a": (2,), "b": (3,), "c": (2,)}
    good = {"a": np.zeros(2), "b": np.zeros(3), "c": np.zeros(2)}
    check_params(good, expected)
    cases = [({"a": np.array([np.nan, 0.0]), "b": np.zeros(4)}, ValueError, r"params\['a'\] must be finite"),
             ({"a": np.array([np.nan, 0.0]), "c": np.zeros(2, np.int64)}, ValueError, r"params\['a'\] must be finite"),
             ({"a": np.zeros(3), "b": np.array([np.inf, 0, 0])}, ValueError, r"params\['a'\] must have shape"),
             ({"b": np.zeros(3, np.int32), "c": np.array([np.nan, 0])}, TypeError, r"params\['b'\] must be a float"),
             ({"b": np.array([0.0, np.inf, 0.0]), "c": np.array([np.nan, 0])}, ValueError, r"params\['b'\] must be finite")]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            check_params({**good, **change}, expected)
