"""Supervised next-token cross-entropy (pretraining): the readable reference.

Minimised; always a token mean over the N_real real positions t ≥ 1 (docs/conventions.md §3)::

    L_sft = −(1/N_real) Σ_{real t ≥ 1} log softmax(z_t)[tokens_t],   z_t = head(h_{t−1})
    ∂L/∂z_t = −(1/N_real)·(onehot(tokens_t) − softmax(z_t))

α = 1 and ε = 0: pretraining fits the plain softmax of the head. N_real = 0 is an error.
The pretrained policy becomes the frozen reference policy π_ref.

    loss_and_grad(params, tokens (B, T), mask (B, T)) -> out {'logp', 'loss'}, grads
"""

from __future__ import annotations

import numpy as np

from . import model, policy
from ._validate import check_finite_result


def prepare(params, tokens, mask):
    """Validate an SFT batch; returns (tokens, mask, pm, n_real) with pm the positions predicted
    (real and t ≥ 1). Every backend runs this same check before its kernels."""
    _, tokens, mask, _ = model.prepare(params, tokens, mask, None)
    pm = model.position_mask(mask)
    n_real = pm.sum()
    if n_real == 0:
        raise ValueError("the batch has no next-token target (every row is shorter than 2 real tokens)")
    return tokens, mask, pm, n_real


def loss_and_grad(params, tokens, mask):
    """L_sft, the next-token log-probs (B, T) and ∇L_sft for every parameter (other heads get 0)."""
    tokens, mask, pm, n_real = prepare(params, tokens, mask)
    fwd, cache = model.forward(params, tokens, mask)
    fwd["scores"] = policy.check_scores(fwd["scores"], pm > 0)          # a policy at every target
    logq = policy.log_softmax(fwd["scores"])                            # (B, T, V)
    logp = np.where(pm > 0, np.take_along_axis(logq, tokens[:, :, None], -1)[:, :, 0], 0.0)
    loss = -logp.sum() / n_real
    dz = policy.grad_logprob(fwd["scores"], tokens, -pm / n_real)       # −(1/N)(onehot − π)
    check_finite_result(fwd["scores"].dtype, loss, dz)                  # an overflow is an error
    grads = model.backward(cache, dscores=dz)
    check_finite_result(fwd["scores"].dtype, *grads.values())
    return {"logp": logp, "loss": loss, "n_real": n_real}, grads
