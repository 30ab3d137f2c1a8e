"""The one tolerance rule of the test suite, the central-difference gradient checker, and the
tie-aware comparison of sampled tokens (docs/conventions.md §4). Every numeric comparison in the project
goes through here, so a tolerance is derived in one place and an override is visible.

Comparison (llm.c ``dev/cuda/common.h``: ``tolerance + |ref|·epsilon``; numpy's asymmetric
``assert_allclose`` with the reference on the *desired* side)::

    |actual − desired| <= tol·scale + |desired|·tol        with   tol = C·eps(dtype)·(n + K)

``eps(dtype)`` is the machine epsilon of the dtype the *actual* side was computed in (the desired
side, the reference, is float64). ``n`` is the number of rounding steps that feed one output:
the reduction length of a sum or dot product (H, V, ...), or a bound on the chain of them for a
recurrence (e.g. T·(E + H) for the LSTM). The standard error analysis of a recursive sum of n
terms bounds its relative error by (n − 1)·eps·Σ|x_i|/|Σ x_i| (Higham, *Accuracy and Stability of
Numerical Algorithms*, §4.2); C = 8 covers the few elementwise operations (exp, log, tanh, the
products of the LSTM cell) that surround each reduction, and K = 4 keeps a tolerance for
n = 1 (a single elementwise op) above the 1/2-ulp rounding of each of them. ``scale`` is the
magnitude of the terms that were summed when it differs from 1 (a difference of large
numbers near 0 is only as accurate as those numbers).

Gradients: ``gradcheck`` compares an analytic gradient with a central difference in float64,
``(f(θ + h e_i) − f(θ − h e_i)) / 2h`` with h = 1e-5, under the mixed criterion
``|analytic − numeric| <= atol + rtol·|numeric|`` with atol = 1e-8, rtol = 1e-6. The truncation error
of a central difference is h²·f'''/6 ≈ 1e-10·f''' and its rounding error about eps·|f|/h ≈
2e-11·|f|, both far below atol for the O(1) losses of the tests; rtol = 1e-6 is what makes an
analytic gradient that is 0.05 % off (scaled by 1.0005) fail, which the default tolerances of
``torch.autograd.gradcheck`` (atol 1e-5, rtol 1e-3) let through (research notes §4.1).
``tests/test_tol.py::test_gradcheck_catches_a_gradient_0_05_percent_off`` proves that.
"""

from __future__ import annotations

import numpy as np

C = 8.0   #: safety factor on eps·(n + K): a few elementwise ops around each reduction
K = 4.0   #: keeps the tolerance of a single elementwise op (n = 1) above half an ulp of each step

GRAD_H = 1e-5       #: central-difference step in float64 (error ≈ 4e-11 at h = 1e-5, research notes §4.1)
GRAD_ATOL = 1e-8    #: absolute part of the gradient criterion
GRAD_RTOL = 1e-6    #: relative part: a gradient 0.05 % off fails


def eps(dtype):
    """Machine epsilon of a float dtype (float32: 2^-23, float64: 2^-52)."""
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise TypeError(f"dtype must be a float dtype, got {dt}")
    return float(np.finfo(dt).eps)


def kernel_tol(dtype, n=1):
    """tol = C·eps(dtype)·(n + K): the absolute and relative tolerance of a result computed in
    ``dtype`` from ``n`` rounding steps (reduction length), compared with the float64 reference."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return C * eps(dtype) * (n + K)


def _worst(actual, desired, atol, rtol):
    """(index of the worst entry, its excess ratio |a−d| / (atol + rtol|d|))."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        err = np.abs(actual - desired)
        bound = atol + rtol * np.abs(desired)
        ratio = np.where(np.isfinite(desired), np.where(np.isfinite(err), err / bound, np.inf), 0.0)
    idx = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else ()
    return tuple(int(i) for i in idx), (float(ratio[idx]) if ratio.size else 0.0)


def assert_close(actual, desired, dtype=np.float64, n=1, name="", scale=1.0, atol=None, rtol=None):
    """Assert ``|actual − desired| <= atol + |desired|·rtol`` elementwise (``desired`` = the reference).

    atol = kernel_tol(dtype, n)·scale and rtol = kernel_tol(dtype, n) unless given; a caller that
    gives atol or rtol must say why in a comment. Shapes must match exactly (no broadcasting).
    Non-finite desired entries must be matched exactly (same inf, NaN for NaN): llm.c skips them,
    but masking and log-softmax rely on ±inf, so here they are part of the contract.
    """
    a = np.asarray(actual)
    d = np.asarray(desired)
    label = f"{name}: " if name else ""
    if a.shape != d.shape:
        raise AssertionError(f"{label}shape {a.shape} != desired shape {d.shape}")
    tol = kernel_tol(dtype, n)
    atol = tol * float(scale) if atol is None else float(atol)
    rtol = tol if rtol is None else float(rtol)
    a = a.astype(np.float64)
    d = d.astype(np.float64)
    fin = np.isfinite(d)
    same_nonfinite = np.where(fin, True, (a == d) | (np.isnan(a) & np.isnan(d)))
    if not np.all(same_nonfinite):
        i = tuple(int(j) for j in np.argwhere(~same_nonfinite)[0])
        raise AssertionError(f"{label}non-finite desired[{i}] = {d[i]!r} but actual = {a[i]!r}")
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.where(fin, np.abs(a - d) <= atol + rtol * np.abs(d), True)
    ok &= np.where(fin, np.isfinite(a), True)
    if not np.all(ok):
        idx, ratio = _worst(a, d, atol, rtol)
        nbad = int(np.count_nonzero(~ok))
        raise AssertionError(
            f"{label}{nbad} of {a.size} entries differ beyond atol={atol:.3g} + rtol={rtol:.3g}·|desired|; "
            f"worst at {idx}: actual={a[idx]!r} desired={d[idx]!r} |diff|={abs(a[idx] - d[idx]):.3g} "
            f"({ratio:.3g}x the bound)")


# ---------------------------------------------------------------------------------------------
# gradients

def numerical_gradient(f, params, h=GRAD_H, keys=None):
    """Central differences of ``f(params)`` (a scalar, or a 1-D array of m scalars) in float64.

    Returns {key: array of params[key].shape (+ (m,) when f returns m values)}. ``params`` is
    perturbed in place one entry at a time and restored exactly.
    """
    keys = list(params) if keys is None else list(keys)
    for k in keys:
        if params[k].dtype != np.float64:
            raise TypeError(f"gradcheck needs float64 arrays; params[{k!r}] is {params[k].dtype}")
        if not params[k].flags.c_contiguous:
            raise ValueError(f"gradcheck perturbs in place: params[{k!r}] must be C-contiguous")
    f0 = np.asarray(f(params), dtype=np.float64)
    out = {}
    for k in keys:
        a = params[k]
        g = np.zeros(a.shape + f0.shape)
        flat = a.reshape(-1)                 # a view: writing it perturbs params[k]
        gflat = g.reshape((-1,) + f0.shape)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            fp = np.asarray(f(params), dtype=np.float64)
            flat[i] = old - h
            fm = np.asarray(f(params), dtype=np.float64)
            flat[i] = old
            gflat[i] = (fp - fm) / (2 * h)
        out[k] = g
    return out


def compare_gradients(analytic, numeric, atol=GRAD_ATOL, rtol=GRAD_RTOL, name=""):
    """Assert |analytic − numeric| <= atol + rtol·|numeric| for every key of ``numeric``;
    the message names the worst entry (key and index) over all keys."""
    worst = (0.0, None, None)
    nbad = 0
    for k, n in numeric.items():
        if k not in analytic:
            raise AssertionError(f"{name}: analytic gradient has no {k!r}")
        a = np.asarray(analytic[k], dtype=np.float64)
        if a.shape != n.shape:
            raise AssertionError(f"{name}: gradient {k!r} has shape {a.shape}, expected {n.shape}")
        bad = np.abs(a - n) > atol + rtol * np.abs(n)
        nbad += int(np.count_nonzero(bad))
        if a.size:
            idx, ratio = _worst(a, n, atol, rtol)
            if ratio > worst[0]:
                worst = (ratio, k, idx)
    if nbad:
        ratio, k, idx = worst
        a, n = np.asarray(analytic[k], dtype=np.float64)[idx], numeric[k][idx]
        raise AssertionError(f"{name + ': ' if name else ''}{nbad} gradient entries fail "
                             f"|analytic − numeric| <= {atol:g} + {rtol:g}·|numeric|; worst {k}{list(idx)}: "
                             f"analytic={a!r} numeric={n!r} ({ratio:.3g}x the bound)")
    return worst


def gradcheck(f, params, grads, h=GRAD_H, atol=GRAD_ATOL, rtol=GRAD_RTOL, keys=None, name=""):
    """Check ``grads`` (a dict mirroring ``params``) against central differences of the scalar
    ``f(params)`` in float64. For an array-valued function, pass ``f = lambda p: np.sum(out(p) * w)``
    with a random upstream weighting ``w`` (and backpropagate the same ``w``), so that every output
    entry is checked with a distinct weight and errors cannot cancel.

    Returns the numerical gradient. Raises AssertionError naming the worst entry's key and index.
    """
    keys = list(params) if keys is None else list(keys)
    numeric = numerical_gradient(lambda p: float(f(p)), params, h, keys)
    compare_gradients(grads, numeric, atol, rtol, name)
    return numeric


# ---------------------------------------------------------------------------------------------
# sampled tokens (docs/conventions.md §4)

def first_divergence(tokens_a, tokens_b):
    """Column of each row's first differing token; T (the row length) where the rows are equal."""
    a, b = np.asarray(tokens_a), np.asarray(tokens_b)
    diff = a != b
    return np.where(diff.any(axis=1), diff.argmax(axis=1), a.shape[1])


def compare_sampled_tokens(tokens_a, tokens_b, u, cdf_ref, action_mask_ref=None, dtype=np.float32, n=None,
                           tol=None):
    """Tie-aware comparison of two backends' sampled tokens (docs/conventions.md §4).

    tokens_a (B, T)      tokens of the backend under test
    tokens_b (B, T)      tokens of the reference (float64) run, from the same uniforms
    u (B, T)             the uniforms; u[:, t] drew token t
    cdf_ref (B, T, V)    cumulative sum of the reference's sampling distribution at each step
                         of the *reference's* row (cdf_ref[b, t, k] = Σ_{j<=k} q(j|s_t))
    action_mask_ref      (B, T) the reference's action mask (positions that were sampled)
    tol                  rounding distance; default kernel_tol(dtype, n) with n = V

    Each row is compared up to its first divergence. Up to there the states are identical, so
    cdf_ref at the divergence is the distribution both backends sampled from. A divergence is
    accepted only at a sampled position where *both* picks are valid for u up to ``tol``:
    token k is valid when its reference probability is positive and cdf_{k−1} − tol <= u < cdf_k + tol
    (cdf_{−1} = 0), i.e. u lies within rounding distance of the boundary between them. Everything after the divergence differs
    legitimately and is not compared. Returns the first-divergence column of each row (T where
    the rows agree), so callers can compare other outputs over each row's common prefix.
    """
    a, b = np.asarray(tokens_a), np.asarray(tokens_b)
    u = np.asarray(u, dtype=np.float64)
    cdf = np.asarray(cdf_ref, dtype=np.float64)
    if a.shape != b.shape or u.shape != a.shape or cdf.shape[:2] != a.shape:
        raise ValueError(f"shapes disagree: tokens_a {a.shape}, tokens_b {b.shape}, u {u.shape}, cdf_ref {cdf.shape}")
    B, T = a.shape
    V = cdf.shape[2]
    tol = kernel_tol(dtype, V if n is None else n) if tol is None else float(tol)
    am = np.ones((B, T), bool) if action_mask_ref is None else np.asarray(action_mask_ref) > 0
    div = first_divergence(a, b)
    for row in np.flatnonzero(div < T):
        t = int(div[row])
        if not am[row, t]:
            raise AssertionError(f"row {row} differs at t={t}, which the reference did not sample "
                                 f"(prompt or padding): {a[row, t]} vs {b[row, t]}")
        c = cdf[row, t]
        lo = np.concatenate([[0.0], c[:-1]])          # cdf_{k−1}
        ut = u[row, t]

        def valid(k):          # a token of positive reference probability whose interval reaches u
            return 0 <= k < V and c[k] > lo[k] and lo[k] - tol <= ut < c[k] + tol

        if not (valid(int(a[row, t])) and valid(int(b[row, t]))):
            gap = float(np.min(np.abs(c - ut)))
            raise AssertionError(f"row {row} diverges at t={t} (token {a[row, t]} vs reference {b[row, t]}) where "
                                 f"u={ut!r} is {gap:.3g} from the nearest CDF boundary, beyond the rounding "
                                 f"distance {tol:.3g}: not a tie")
    return div
