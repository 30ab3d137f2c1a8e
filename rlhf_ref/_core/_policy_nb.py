"""Numba twin of ``rlhf_ref/policy.py``: the policy over one row of action scores.

The same formulas as the reference (module docstring there), one score row z (V,) at a
time, so that the rollout and the training passes run them fused with no (B, T, V)
temporaries:

    Boltzmann      log π(a)  = α·z_a − lse,  lse = m + log Σ_k exp(α·z_k − m),  m = max α·z
    ε-mixture      log π_ε(a) = logaddexp(log1p(−ε) + log π(a), log(ε/V))        (ε = 0: log π)
    classic ε-greedy / greedy   q = (1−ε)·onehot(argmax z) + ε/V, computed in float64 as the
                   reference does, then rounded to the kernel's dtype
    sampling       a = #{k : cdf_k ≤ u·cdf_{V−1}}, cdf the running sum of q from index 0 (q in the
                   kernel's dtype, accumulated in float64, u scaled by the total, as policy.sample);
                   if u ≥ cdf_{V−1}, the last token with q > 0                 (docs/conventions.md §4)

``e`` arguments are (V,) work rows; α and ε arrive as float64 and are rounded to the row's
dtype, as NumPy does for ``alpha * z``.
"""

from __future__ import annotations

import math

import numpy as np

from ._nb_common import cst, kernel, vexp

BOLTZMANN, EPS_GREEDY, GREEDY = 0, 1, 2        # the codes of conventions.POLICY (checked by a test)


@kernel
def logaddexp(x, y):
    """log(eˣ + eʸ) for float64 scalars; −inf when both are −inf."""
    m = max(x, y)
    if m == -np.inf:
        return m
    return m + math.log1p(math.exp(-abs(x - y)))


@kernel
def log1m(eps):
    """log1p(−ε), −inf at ε = 1."""
    return -np.inf if eps >= 1.0 else math.log1p(-eps)


@kernel
def row_ok(z, V, alpha, kind):
    """The row gives a policy (policy.check_scores): max_k α·z_k (max_k z_k for the greedy kinds),
    NaN-propagating, is finite. α·z is rounded to the row's dtype, as the reference rounds it."""
    al = cst(z, alpha) if kind == BOLTZMANN else cst(z, 1.0)
    m = cst(z, -np.inf)
    for k in range(V):
        x = al * z[k]
        if x != x or x == np.inf:                            # NaN or +inf
            return False
        if x > m:
            m = x
    return m > -np.inf


# No fast-math contraction here (issue 10): with {"contract"} LLVM fused α·z_k − m into one FMA, so
# the maximum's term was no longer exactly exp(0) and the rounding of α·z the reference does was
# skipped; at large α (1e7 in float32) that moved the log-probs by 0.1 nats and sampled other tokens.
# The rounding order of α·z − m is part of the convention; this loop must not be contracted.
@kernel
def softmax_row(z, V, alpha, e):
    """e[k] = exp(α z_k − m) for k < V; returns (m, Σ e, log Σ e): lse = m + log Σ e."""
    al = cst(z, alpha)
    m = al * z[0]
    for k in range(1, V):
        m = max(m, al * z[k])
    for k in range(V):                       # vectorised exp
        e[k] = vexp(al * z[k] - m)
    s = e[0] * 0
    for k in range(V):                       # sequential sum: a fixed order
        s += e[k]
    return m, s, cst(z, math.log(s))


@kernel
def argmax_row(z, V):
    """Index of the first maximum of z[:V] (NumPy's argmax: ties to the lowest index)."""
    best = 0
    for k in range(1, V):
        if z[k] > z[best]:
            best = k
    return best


@kernel
def sample_row(z, V, alpha, eps, kind, u, e, cdf):
    """Sample one token from the policy over scores z[:V] with the uniform u; returns (a, log q(a)).
    cdf (V,) float64 is a work row (the running sums of q).

    The log-probability is in the row's dtype (float64 intermediate for the ε-mixture, as in
    the reference).
    """
    zero = cst(z, 0.0)
    if kind == BOLTZMANN:
        m, S, ls = softmax_row(z, V, alpha, e)
        if eps > 0.0:
            w1 = cst(z, 1.0 - eps)
            w2 = cst(z, eps / V)
            for k in range(V):
                e[k] = w1 * (e[k] / S) + w2
        else:
            for k in range(V):
                e[k] = e[k] / S
    else:
        g = argmax_row(z, V)
        hi = cst(z, (1.0 - eps) + eps / V)
        lo = cst(z, eps / V)
        for k in range(V):
            e[k] = lo
        e[g] = hi
    # inverse CDF: a = #{k : cdf_k ≤ u·cdf_{V−1}}, the first k with cdf_k > u·cdf_{V-1} (cdf is
    # non-decreasing: the running sums of q ≥ 0 in float64); the count is a vectorised pass, not a
    # second dependent chain of additions
    tot = 0.0
    for k in range(V):
        tot += np.float64(e[k])
        cdf[k] = tot
    u = u * tot                                              # the CDF in float64, u scaled by its total
    a = 0
    for k in range(V):
        a += cdf[k] <= u
    if a >= V or not cdf[a] > u:                             # rounding left u ≥ cdf_{V−1}
        a = -1
        for k in range(V - 1, -1, -1):
            if e[k] > zero:
                a = k
                break
    if kind == BOLTZMANN:
        lp = cst(z, alpha) * z[a] - m - ls
        if eps > 0.0:
            lp = cst(z, logaddexp(log1m(eps) + lp, math.log(eps / V)))
    else:
        lp = _greedy_logprob(z, V, a, eps)
    return a, lp


@kernel
def _greedy_logprob(z, V, a, eps):
    qa = ((1.0 - eps) + eps / V) if a == argmax_row(z, V) else eps / V
    return cst(z, math.log(qa)) if qa > 0.0 else cst(z, -np.inf)


@kernel
def logprob_row(z, V, a, alpha, eps, kind, e):
    """log q(a) of the policy over scores z[:V] (any kind): the reference policy at a sampled token."""
    if kind == BOLTZMANN:
        m, S, ls = softmax_row(z, V, alpha, e)
        lp = cst(z, alpha) * z[a] - m - ls
        if eps > 0.0:
            lp = cst(z, logaddexp(log1m(eps) + lp, math.log(eps / V)))
        return lp
    return _greedy_logprob(z, V, a, eps)


@kernel
def logprob_stats_row(z, V, a, alpha, eps, qz, has_q, e):
    """For one action position: (log π_ε(a), entropy, Σ_k π_ε,k Q_k, lse, Σ_k π_k log π_ε,k).

    Boltzmann ε-mixture over z[:V]; qz[:V] are Q-values (read when has_q). The last two are
    what the gradient pass needs (``policy.grad_logprob``, ``policy.grad_entropy``).
    """
    m, S, ls = softmax_row(z, V, alpha, e)
    lse = m + ls
    al = cst(z, alpha)
    zero = cst(z, 0.0)
    lp = al * z[a] - lse
    ent = zero
    plq = zero
    qb = zero
    if eps > 0.0:
        l1 = log1m(eps)
        le = math.log(eps / V)
        lp = cst(z, logaddexp(l1 + lp, le))
        for k in range(V):
            pk = e[k] / S
            lq = cst(z, logaddexp(l1 + (al * z[k] - lse), le))
            qk = cst(z, math.exp(lq))
            ent -= qk * lq
            if pk > zero:
                plq += pk * lq
            if has_q:
                qb += qk * qz[k]
    else:
        for k in range(V):
            pk = e[k] / S
            if pk > zero:                                    # 0·log 0 = 0
                plq += pk * (al * z[k] - lse)
            if has_q:
                qb += pk * qz[k]
        ent = -plq
    return lp, ent, qb, lse, plq


@kernel                       # no contraction: α·z_k − lse must round as the reference rounds it
def grad_row(z, V, a, alpha, eps, lse, lq_a, plq, d_logp, d_ent):
    """z[:V] becomes ∂/∂z of d_logp·log π_ε(a) + d_ent·H(π_ε) for one position, in place.

    ∂ log π_ε(a)/∂z = (1−ε)·(π_a/π_ε,a)·α·(onehot(a) − π)
    ∂H/∂z_j         = −(1−ε)·α·(π_j log π_ε,j − π_j Σ_k π_k log π_ε,k)

    (In place through one array on purpose: with a separate output that happens to be the same
    memory, LLVM's overlap check fails at run time and the loop runs scalar, 5× slower.)
    """
    al = cst(z, alpha)
    zero = cst(z, 0.0)
    pa = vexp(al * z[a] - lse)
    scale = cst(z, d_logp * alpha)
    if eps > 0.0:
        scale = scale * cst(z, (1.0 - eps)) * pa / vexp(lq_a)
    ce = cst(z, -d_ent * (1.0 - eps) * alpha)
    if eps > 0.0:
        l1 = log1m(eps)
        le = math.log(eps / V)
        for k in range(V):
            pk = vexp(al * z[k] - lse)
            lqk = cst(z, logaddexp(l1 + (al * z[k] - lse), le))
            pl = pk * lqk if pk > zero else zero
            z[k] = -scale * pk + ce * (pl - pk * plq)
    elif d_ent != 0.0:
        for k in range(V):
            pk = vexp(al * z[k] - lse)
            pl = pk * (al * z[k] - lse) if pk > zero else zero
            z[k] = -scale * pk + ce * (pl - pk * plq)
    else:
        for k in range(V):
            z[k] = -scale * vexp(al * z[k] - lse)
    z[a] += scale
