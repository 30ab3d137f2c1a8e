"""Optimisers as separate functions: SGD, Adam and global-norm clipping.

Nothing in a loss clips or logs; these run after the gradient (docs/conventions.md §3)::

    SGD     θ ← θ − η·g
    Adam    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  m̂ = m/(1−β1ᵗ);  v̂ = v/(1−β2ᵗ)
            θ ← θ − η·m̂/(√v̂ + ε)                       (Kingma & Ba 2015; torch.optim.Adam)
    clip    g ← g·min(1, max_norm/(‖g‖₂ + 1e-6))        (torch.nn.utils.clip_grad_norm_)

Parameters and state are dicts of arrays updated in place; the functions also return them.
"""

from __future__ import annotations

import numpy as np

from ._validate import check_range


def _check(params, grads):
    missing = sorted(set(params) - set(grads))
    if missing:
        raise ValueError(f"grads is missing {missing}")
    extra = sorted(set(grads) - set(params))
    if extra:
        raise ValueError(f"grads has unexpected keys {extra}; expected the keys of params {sorted(params)}")
    for k in params:
        if np.shape(grads[k]) != params[k].shape:
            raise ValueError(f"grads[{k!r}] must have shape {params[k].shape}, got {np.shape(grads[k])}")
        if not np.all(np.isfinite(grads[k])):
            raise ValueError(f"grads[{k!r}] must be finite")


def global_norm(grads, keys=None):
    """‖g‖₂ over every array (or the given keys)."""
    keys = sorted(grads) if keys is None else keys
    return float(np.sqrt(sum(float(np.sum(np.square(grads[k], dtype=np.float64))) for k in keys)))


def clip_grad_norm(grads, max_norm):
    """Scale grads so that their global norm is at most max_norm; returns (clipped copy, norm before)."""
    max_norm = check_range(max_norm, "max_norm", lo=0.0, lo_open=True)
    if not isinstance(grads, dict):
        raise TypeError(f"grads must be a dict of arrays, got {type(grads).__name__}")
    for k, g in grads.items():
        if not np.all(np.isfinite(g)):
            raise ValueError(f"grads[{k!r}] must be finite")
    norm = global_norm(grads)
    scale = min(1.0, max_norm / (norm + 1e-6))
    return {k: g * scale for k, g in grads.items()}, norm


def sgd_step(params, grads, lr):
    """θ ← θ − lr·g, in place."""
    lr = check_range(lr, "lr", lo=0.0)
    _check(params, grads)
    for k in params:
        params[k] -= (lr * grads[k]).astype(params[k].dtype)
    return params


def adam_init(params):
    """Adam state: step count and first/second moments (zeros)."""
    return {"t": 0, "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.zeros_like(v) for k, v in params.items()}}


def adam_step(params, grads, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """One Adam update of params and state, in place."""
    lr = check_range(lr, "lr", lo=0.0)
    b1 = check_range(betas[0], "betas[0]", lo=0.0, hi=1.0, hi_open=True)
    b2 = check_range(betas[1], "betas[1]", lo=0.0, hi=1.0, hi_open=True)
    eps = check_range(eps, "eps", lo=0.0, lo_open=True)
    _check(params, grads)
    state["t"] += 1
    t = state["t"]
    for k in params:
        g = grads[k]
        m, v = state["m"][k], state["v"][k]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        params[k] -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(params[k].dtype)
    return params, state
