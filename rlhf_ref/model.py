"""The policy network over a batch of episodes, token-aligned: the readable reference.

Body (``lstm``) and heads, docs/conventions.md §2. Arrays about actions are token-aligned: entry t
belongs to token t, chosen in state s_t = tokens[:, :t] whose LSTM output is h_{t−1}::

    scores[:, t]  = head(h_{t−1})     = h_{t−1} W_headᵀ + b_head      (B, T, V)   action scores z
    values[:, t]  = value(h_{t−1})                                     (B, T)      V(s_t)
    qvalues[:, t] = qvalue(h_{t−1})                                    (B, T, V)   Q(s_t, ·)

for real positions t ≥ 1; column 0 (BOS, never an action) and padding hold exactly 0.
``h_{T−1}``, the output after a row's last token, is read by no head here (the reward model
reads it).

    forward(params, tokens, mask) -> out {'scores', 'values'?, 'qvalues'?}, cache
    backward(cache, dscores=None, dvalues=None, dqvalues=None) -> grads (same keys as params)
"""

from __future__ import annotations

import numpy as np

from . import lstm
from ._validate import as_float_array, check_batch, check_finite_result


def position_mask(mask):
    """Positions where a head is read: real and t ≥ 1. (B, T)"""
    pm = np.array(mask, dtype=np.float64)
    pm[:, :1] = 0.0
    return pm


def action_mask(mask, prompt_len):
    """action_mask = mask ∧ (t ≥ prompt_len): the tokens the policy produced. (B, T)"""
    T = np.shape(mask)[1]
    return np.asarray(mask, dtype=np.float64) * (np.arange(T)[None, :] >= np.asarray(prompt_len)[:, None])


def shift_right(hs):
    """hprev[:, t] = hs[:, t−1], hprev[:, 0] = 0: the state each token is chosen in."""
    hprev = np.zeros_like(hs)
    hprev[:, 1:] = hs[:, :-1]
    return hprev


def forward(params, tokens, mask):
    """Scores (and values, Q-values when those heads exist), token-aligned."""
    hs, lcache = lstm.forward(params, tokens, mask)
    pm = position_mask(lcache["mask"][:, :, 0]).astype(hs.dtype)
    hprev = shift_right(hs)                                                      # (B, T, H)
    out = {"scores": lstm.linear(params["head.weight"], params["head.bias"], hprev) * pm[:, :, None]}
    if "value.weight" in params:
        out["values"] = lstm.linear(params["value.weight"], params["value.bias"], hprev)[:, :, 0] * pm
    if "qvalue.weight" in params:
        out["qvalues"] = lstm.linear(params["qvalue.weight"], params["qvalue.bias"], hprev) * pm[:, :, None]
    return out, {"lstm": lcache, "hprev": hprev, "pm": pm, "params": params}


def backward(cache, dscores=None, dvalues=None, dqvalues=None):
    """Gradients of every parameter from upstream ∂L/∂scores, ∂L/∂values, ∂L/∂qvalues."""
    p, hprev, pm = cache["params"], cache["hprev"], cache["pm"]
    B, T, H = hprev.shape
    dt = hprev.dtype
    grads = {k: np.zeros_like(v) for k, v in p.items()}
    dhprev = np.zeros((B, T, H), dt)
    for name, arg, d in (("head", "dscores", dscores), ("value", "dvalues", dvalues), ("qvalue", "dqvalues", dqvalues)):
        if d is None:
            continue
        if f"{name}.weight" not in p:
            raise ValueError(f"{arg} given but params has no '{name}' head")
        shape = (B, T) if name == "value" else (B, T, p[f"{name}.weight"].shape[0])
        d = as_float_array(d, arg, shape=shape, dtype=dt)
        d = (d * pm[:, :, None]) if d.ndim == 3 else (d * pm)[:, :, None]        # heads are 0 off pm
        # backprop through the linear head: dW = Σ dᵀ hprev, db = Σ d, dhprev += d W
        grads[f"{name}.weight"] += np.einsum("bto,bth->oh", d, hprev)
        grads[f"{name}.bias"] += d.sum(axis=(0, 1))
        dhprev += d @ p[f"{name}.weight"]
    # hprev[:, t] = hs[:, t−1]: route the gradient back one position
    dhs = np.zeros_like(dhprev)
    dhs[:, :-1] = dhprev[:, 1:]
    check_finite_result(dt, dhs)                       # an overflow through huge head weights is an error
    lgrads = lstm.backward(dhs, cache["lstm"])
    for k in lstm.BODY_KEYS:
        grads[k] += lgrads[k]
    return grads


def prepare(params, tokens, mask, prompt_len, required_heads=("head",), name="params"):
    """Validate a policy model and an episode batch; returns (V, tokens, mask, prompt_len)."""
    V, _, _ = lstm.check_model(params, required_heads, name=name)
    tokens, mask, prompt_len = check_batch(tokens, mask, prompt_len, vocab_size=V)
    return V, tokens, mask, prompt_len
