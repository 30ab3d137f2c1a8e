"""Numba twin of ``rlhf_ref/model.py``: the linear heads over every position at once.

The heads a call needs are stacked into one matrix ``Wc (K, H)`` (rows: ``head`` V, then
``value`` 1 and/or ``qvalue`` V), so the forward pass is one GEMM over all positions and the
backward pass one (the weight gradient; ∂L/∂h enters the recurrence step by step). Token alignment as in the reference:
``logits[t, b] = heads(hs[t])`` with ``hs[t] = h_{t−1}``; positions outside the position mask
(column 0 and padding) are set to exactly 0, like the reference's ``* pm``.
Layout: time-major, position p = t·B + b.
"""

from __future__ import annotations

import numpy as np

from ._nb_common import kernel


@kernel
def heads_forward(HS, Wc, bc, lengths, logits):
    """logits (T·B, K) = HS Wcᵀ + bc at positions 1 ≤ t < length, 0 elsewhere.  HS (T·B, H)."""
    np.dot(HS, Wc.T, logits)
    B = lengths.shape[0]
    N, K = logits.shape
    for p in range(N):
        t = p // B
        if t >= 1 and t < lengths[p - t * B]:
            for k in range(K):
                logits[p, k] += bc[k]
        else:
            logits[p] = 0.0


@kernel
def heads_backward(HS, dlogits, dWc, dbc):
    """dWc = dlogitsᵀ HS (one GEMM), dbc = Σ dlogits; dlogits is 0 off the mask. ∂L/∂HS = dlogits Wc
    is taken one step at a time inside the backward pass (``_lstm_nb.backward_rows``)."""
    np.dot(dlogits.T, HS, dWc)
    dbc[:] = 0.0
    for p in range(dlogits.shape[0]):
        for k in range(dlogits.shape[1]):
            dbc[k] += dlogits[p, k]
