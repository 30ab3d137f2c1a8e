"""The policy over action scores: the readable reference; the kernels in ``_core`` must match it.

Given action scores z (..., V) from the head, docs/conventions.md §3 (seed §4.2):

    Boltzmann           log π(a|s)   = α·z_a − logsumexp(α·z)                (max-shifted)
    ε-mixture           π_ε(a|s)     = (1−ε)·softmax(α·z)_a + ε/V
                        log π_ε(a|s) = logaddexp(log1p(−ε) + log π(a|s), log(ε/V))   (ε = 0: log π)
    gradient            ∂ log π_ε(a)/∂z = (1−ε)·(π_a/π_ε,a)·α·(onehot(a) − π)
    entropy             H = −Σ_a π_ε(a) log π_ε(a),  0·log 0 = 0
                        ∂H/∂z_j = −(1−ε)·α·π_j·(log π_ε,j − Σ_k π_k log π_ε,k)
    classic ε-greedy    q = (1−ε)·onehot(argmax z) + ε/V   (ties to the lowest index; ε = 0 is greedy)
                        zero gradient: for decoding and evaluation, never for training.

Sampling is by inverse CDF from a pre-drawn uniform u ∈ [0, 1): a = #{k : cdf_k ≤ u·cdf_{V−1}}
with cdf the running sum of q from index 0, accumulated in float64 whatever the dtype of q, and u
scaled by its own total (≈ 1): a float32 running sum over a large vocabulary drifts by up to
V·eps32 (1 % at V = 200k), and the float32 rounding of logsumexp scales every q alike, which the
total cancels; so float32 and float64 scores sample the same token except where u lies within a
few float32 ulps of a q_k of a CDF boundary (docs/conventions.md, "Sampling"); if rounding leaves u ≥ cdf_{V−1}, the last token with
q > 0 (docs/conventions.md §4). The distribution that samples is the one whose log-probs enter the loss.

Shapes: any leading shape ``(...)``; the last axis is the vocabulary V.
"""

from __future__ import annotations

import numpy as np

from . import conventions
from ._validate import as_float_array, as_int_array, check_range, check_choice

KINDS = conventions.values("policy")


def check_policy_args(alpha, eps, kind="boltzmann"):
    """Validate α > 0, ε ∈ [0, 1] and the policy kind; returns (alpha, eps, kind)."""
    check_choice(kind, "policy", KINDS)
    alpha = check_range(alpha, "alpha", lo=0.0, lo_open=True)
    eps = check_range(eps, "eps", lo=0.0, hi=1.0)
    if kind == "greedy" and eps != 0.0:
        raise ValueError(f"eps must be 0 for the greedy policy, got {eps!r}")
    return alpha, eps, kind


def _check_scores(z, name="z"):
    """Scores (..., V): a float array with at least one dimension, V >= 1, and a finite maximum in
    every row (no NaN, no +inf, not all −inf; a −inf score is a token of probability 0)."""
    z = as_float_array(z, name, finite=False)
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {z.shape}")
    if z.size and not np.all(np.isfinite(np.max(z, axis=-1))):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(np.max(z, axis=-1)))[0])
        raise ValueError(f"{name} must be finite: no NaN or +inf, and a finite maximum in every row (a -inf "
                         f"score is a token of probability 0); row {bad} has max {np.max(z[bad])}")
    return z


def scores_error(name, alpha, kind, dtype):
    """The error of every backend when the action scores give no policy: max_k α·z_k (max_k z_k
    for the greedy kinds) is NaN or ±inf at a position where the policy is read. It is the same
    message on every backend (kernels report only that it happened), so it names no position."""
    if kind == "boltzmann":
        return ValueError(f"{name} and alpha={alpha!r} give non-finite action scores alpha*z in {np.dtype(dtype)} "
                          f"(NaN, +inf or all -inf: the head's scores or their product with alpha overflow); "
                          f"use a smaller alpha or check {name} for huge or non-finite weights")
    return ValueError(f"{name} give non-finite action scores z in {np.dtype(dtype)} (NaN, +inf or all -inf: "
                      f"the head's scores overflow); check {name} for huge or non-finite weights")


def check_alpha_dtype(alpha, dtype, name="params"):
    """α itself must be finite in the dtype of the scores (else α·z is non-finite at every state)."""
    if not abs(float(alpha)) < (_F32_ROUNDS_FINITE if np.dtype(dtype) == np.float32 else np.inf):
        raise scores_error(name, alpha, "boltzmann", dtype)


# |x| below which a float64 rounds to a finite float32: FLT_MAX + half its last ulp, 2^128 − 2^103
# (round to nearest, ties to even: that midpoint itself goes to 2^128 = inf). A comparison, because
# np.errstate around a cast costs microseconds, on every call (issue 12).
_F32_ROUNDS_FINITE = 2.0 ** 128 - 2.0 ** 103


def check_rows(ok, where, alpha, kind, name, dtype):
    """A compiled backend's side of ``check_scores``: ``ok`` (per position) says whether its kernel
    found a policy there (a finite max_k α·z_k); any position read (``where``) without one raises."""
    if kind == "boltzmann":
        check_alpha_dtype(alpha, dtype, name)
    if np.any((np.asarray(where) > 0) & ~np.asarray(ok, bool)):
        raise scores_error(name, alpha, kind, dtype)


def check_scores(z, where, alpha=1.0, kind="boltzmann", name="params"):
    """The policy must exist where it is read: max_k α·z_k (max_k z_k for the greedy kinds) finite
    at every position where ``where`` (z.shape[:-1], bool) is true, else ``scores_error``. Returns z
    with the rows that give no policy and are not read set to 0 (their log-probs are discarded)."""
    if kind == "boltzmann":
        check_alpha_dtype(alpha, z.dtype, name)
    with np.errstate(over="ignore", invalid="ignore"):
        s = alpha * z if kind == "boltzmann" else z          # α·z rounded as logprobs rounds it
        ok = np.isfinite(np.max(s, axis=-1)) if z.shape[-1] else np.ones(z.shape[:-1], bool)
    if np.any(np.asarray(where, bool) & ~ok):
        raise scores_error(name, alpha, kind, z.dtype)
    return z if ok.all() else np.where(ok[..., None], z, 0).astype(z.dtype, copy=False)


def _check_per_state(x, name, z, integer=False):
    """An array with one entry per state: shape z.shape[:-1]."""
    shape = tuple(z.shape[:-1])
    return as_int_array(x, name, shape=shape) if integer else as_float_array(x, name, shape=shape)


def logsumexp(x, axis=-1):
    """log Σ exp(x) along ``axis``, max-shifted; rows of -inf give -inf."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def log_softmax(x, axis=-1):
    """x − logsumexp(x), max-shifted."""
    return x - np.expand_dims(logsumexp(x, axis), axis)


def logprobs(z, alpha=1.0, eps=0.0, kind="boltzmann"):
    """Full log-distribution log q(·|s) (..., V) of the chosen policy over scores z (..., V)."""
    alpha, eps, kind = check_policy_args(alpha, eps, kind)
    z = _check_scores(z)
    V = z.shape[-1]
    if kind == "boltzmann":
        with np.errstate(over="ignore"):
            s = alpha * z
        if not np.all(np.isfinite(np.max(s, axis=-1))):
            raise ValueError(f"alpha={alpha!r} is too large for these scores: alpha*z overflows {z.dtype}")
        logp = log_softmax(s)
        if eps == 0.0:
            return logp
        with np.errstate(divide="ignore"):
            return np.logaddexp(np.log1p(-eps) + logp, np.log(eps / V))
    # classic ε-greedy / greedy: argmax ties to the lowest index
    greedy = np.argmax(z, axis=-1)
    onehot = np.arange(V) == greedy[..., None]
    q = (1.0 - eps) * onehot + eps / V
    with np.errstate(divide="ignore"):
        return np.log(q).astype(z.dtype, copy=False)


def entropy(logq):
    """H = −Σ q log q over the last axis, with 0·log 0 = 0."""
    q = np.exp(logq)
    with np.errstate(invalid="ignore"):                      # 0·(−inf) is discarded by the where
        return -np.sum(np.where(q > 0, q * logq, 0.0), axis=-1)


def grad_logprob(z, actions, upstream, alpha=1.0, eps=0.0):
    """∂/∂z of Σ upstream·log π_ε(actions|s) for the Boltzmann ε-mixture.

    z (..., V), actions (...) int, upstream (...) -> dz (..., V).
    """
    alpha, eps, _ = check_policy_args(alpha, eps)
    z = _check_scores(z)
    V = z.shape[-1]
    actions = _check_per_state(actions, "actions", z, integer=True)
    if actions.size and (actions.min() < 0 or actions.max() >= V):
        bad = tuple(int(i) for i in np.argwhere((actions < 0) | (actions >= V))[0])
        raise ValueError(f"actions must lie in [0, {V}); actions[{bad}] = {actions[bad]}")
    upstream = _check_per_state(upstream, "upstream", z)
    pi = np.exp(log_softmax(alpha * z))                      # softmax(α z)
    onehot = np.arange(V) == actions[..., None]
    scale = upstream * alpha
    if eps > 0.0:
        logq = logprobs(z, alpha, eps)
        pa = np.take_along_axis(pi, actions[..., None], -1)[..., 0]
        qa = np.exp(np.take_along_axis(logq, actions[..., None], -1)[..., 0])
        scale = scale * (1.0 - eps) * pa / qa                # (1−ε)·π_a/π_ε,a
    return scale[..., None] * (onehot - pi)


def grad_entropy(z, upstream, alpha=1.0, eps=0.0):
    """∂/∂z of Σ upstream·H(π_ε(·|s)): −(1−ε)·α·π_j·(log π_ε,j − Σ_k π_k log π_ε,k)."""
    alpha, eps, _ = check_policy_args(alpha, eps)
    z = _check_scores(z)
    upstream = _check_per_state(upstream, "upstream", z)
    pi = np.exp(log_softmax(alpha * z))
    logq = logprobs(z, alpha, eps)
    pl = np.where(pi > 0, pi * logq, 0.0)                    # π_j log π_ε,j with 0·log 0 = 0
    return -(upstream * (1.0 - eps) * alpha)[..., None] * (pl - pi * pl.sum(-1, keepdims=True))


def sample(logq, u):
    """Inverse-CDF sampling from log-distributions logq (N, V) with uniforms u (N,) -> ids (N,)."""
    logq = as_float_array(logq, "logq", ndim=2, finite=False)
    if np.isnan(logq).any() or np.any(logq == np.inf):
        raise ValueError("logq must hold log-probabilities (no NaN, no +inf)")
    u = as_float_array(u, "u", shape=(logq.shape[0],))
    if np.any((u < 0) | (u >= 1)):
        raise ValueError("u must hold uniforms in [0, 1)")
    q = np.exp(logq)
    cdf = np.cumsum(q, axis=-1, dtype=np.float64)            # float64 whatever the dtype (docs/conventions.md §4)
    a = np.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1)     # u scaled by the total (≈ 1)
    over = a >= q.shape[-1]
    if np.any(over):
        # rounding left u >= cdf_{V-1}: the last token with q > 0
        last = q.shape[-1] - 1 - np.argmax((q > 0)[:, ::-1], axis=-1)
        a = np.where(over, last, a)
    return a.astype(np.int64)
