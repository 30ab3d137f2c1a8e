"""The checkers of tests/_tol.py are themselves tested: each must fail where it should.

- gradcheck rejects an analytic gradient scaled by 1.0005 (0.05 % off), which torch.autograd.gradcheck's
  default tolerances accept (research notes §4.1), and names the worst entry's key and index;
- assert_close passes at the derived tolerance and fails just past it, on either side, and treats
  non-finite reference values as part of the contract;
- compare_sampled_tokens accepts a divergence exactly at a CDF tie and rejects any other.
"""

import numpy as np
import pytest

from _tol import (GRAD_ATOL, GRAD_RTOL, assert_close, compare_sampled_tokens, eps, gradcheck, kernel_tol,
                  numerical_gradient)
from rlhf_ref import policy


def _f_and_grad(seed=0):
    """f(W, b) = Σ_i c_i·logsumexp(W x_i + b): smooth, gradients of order 1, known in closed form."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((5, 4))
    c = rng.standard_normal(5)
    p = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)}

    def f(q):
        z = X @ q["W"].T + q["b"]
        return float(np.sum(c * policy.logsumexp(z)))

    z = X @ p["W"].T + p["b"]
    s = np.exp(z - policy.logsumexp(z)[:, None]) * c[:, None]       # ∂f/∂z = c·softmax(z)
    return f, p, {"W": s.T @ X, "b": s.sum(0)}


def test_gradcheck_passes_the_exact_gradient():
    f, p, g = _f_and_grad()
    numeric = gradcheck(f, p, g)
    # the central difference is far more accurate than the criterion needs (error ≈ 1e-10)
    assert max(np.max(np.abs(numeric[k] - g[k])) for k in g) < 1e-9


@pytest.mark.parametrize("factor", [1.0005, 0.9995])
def test_gradcheck_catches_a_gradient_0_05_percent_off(factor):
    f, p, g = _f_and_grad()
    assert max(np.max(np.abs(v)) for v in g.values()) * 5e-4 > GRAD_ATOL + GRAD_RTOL   # the premise
    bad = {k: v * factor for k, v in g.items()}
    with pytest.raises(AssertionError, match=r"worst (W|b)\[\d+(, \d+)?\]"):
        gradcheck(f, p, bad)


def test_gradcheck_catches_a_single_wrong_entry_and_names_it():
    f, p, g = _f_and_grad()
    bad = {k: v.copy() for k, v in g.items()}
    bad["W"][2, 1] += 1e-6 + 2e-6 * abs(bad["W"][2, 1])
    with pytest.raises(AssertionError, match=r"1 gradient entries fail.*worst W\[2, 1\]"):
        gradcheck(f, p, bad)


def test_gradcheck_restores_params_and_wants_float64():
    f, p, g = _f_and_grad()
    before = {k: v.copy() for k, v in p.items()}
    gradcheck(f, p, g)
    assert all(np.array_equal(before[k], p[k]) for k in p)
    with pytest.raises(TypeError, match="float64"):
        numerical_gradient(f, {k: v.astype(np.float32) for k, v in p.items()})


def test_kernel_tol_is_derived_from_eps_and_n():
    assert eps(np.float32) == 2.0 ** -23 and eps(np.float64) == 2.0 ** -52
    assert kernel_tol(np.float64, 0) == 8 * 4 * 2.0 ** -52
    assert kernel_tol(np.float32, 12) == 8 * 16 * 2.0 ** -23
    assert kernel_tol(np.float64, 100) > kernel_tol(np.float64, 10)
    with pytest.raises(TypeError):
        eps(np.int64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [0.0, 1e-3, -2.5, 1e4])
def test_assert_close_boundary(dtype, d):
    n = 7
    tol = kernel_tol(dtype, n)
    bound = tol + abs(d) * tol
    assert_close(np.array([d + 0.9 * bound]), np.array([d]), dtype, n)
    assert_close(np.array([d - 0.9 * bound]), np.array([d]), dtype, n)
    for off in (1.1 * bound, -1.1 * bound):
        with pytest.raises(AssertionError, match=r"worst at \(0,\)"):
            assert_close(np.array([d + off]), np.array([d]), dtype, n, name="x")


def test_assert_close_shapes_and_nonfinite():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros((3, 1)))
    assert_close(np.array([-np.inf, 1.0, np.nan]), np.array([-np.inf, 1.0, np.nan]))
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(np.array([-1e300, 1.0]), np.array([-np.inf, 1.0]))
    with pytest.raises(AssertionError):
        assert_close(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(AssertionError):
        assert_close(np.array([np.inf]), np.array([1.0]))


def _cdf_problem():
    q = np.array([0.1, 0.25, 0.0, 0.4, 0.25])                    # a zero-probability token inside
    cdf = np.cumsum(q)
    B, T, V = 2, 3, q.size
    cdf_ref = np.broadcast_to(cdf, (B, T, V)).copy()
    am = np.array([[0, 1, 1], [0, 1, 1]])
    return cdf, cdf_ref, am


def test_compare_sampled_tokens_accepts_only_ties():
    cdf, cdf_ref, am = _cdf_problem()
    tol = kernel_tol(np.float32, 5)
    # row 0: u just below the boundary cdf_1 = 0.35: the reference picks 1, a float32 backend 3
    # (token 2 has probability 0, so 3 is the next token); row 1: identical
    u = np.array([[0.0, cdf[1] - tol / 4, 0.9], [0.0, 0.5, 0.2]])
    ref = np.array([[1, 1, 4], [1, 3, 1]])
    out = np.array([[1, 3, 0], [1, 3, 1]])      # after the tie anything goes
    div = compare_sampled_tokens(out, ref, u, cdf_ref, am, np.float32)
    assert div.tolist() == [1, 3]
    # the same divergence where u is far from every boundary is rejected
    u_far = u.copy()
    u_far[0, 1] = 0.2
    with pytest.raises(AssertionError, match="row 0 diverges at t=1.*not a tie"):
        compare_sampled_tokens(out, ref, u_far, cdf_ref, am, np.float32)
    # at a tie, a pick that is not adjacent to the boundary is rejected too
    wrong = out.copy()
    wrong[0, 1] = 4
    with pytest.raises(AssertionError, match="not a tie"):
        compare_sampled_tokens(wrong, ref, u, cdf_ref, am, np.float32)
    # ... and so is a token of reference probability 0, even though its empty interval touches u
    zero = out.copy()
    zero[0, 1] = 2
    with pytest.raises(AssertionError, match="not a tie"):
        compare_sampled_tokens(zero, ref, u, cdf_ref, am, np.float32)
    # a difference at a position the reference did not sample (prompt, padding) is always an error
    pad = ref.copy()
    pad[1, 0] = 2
    with pytest.raises(AssertionError, match="did not sample"):
        compare_sampled_tokens(pad, ref, u, cdf_ref, am, np.float32)
