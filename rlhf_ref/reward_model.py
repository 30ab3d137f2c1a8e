"""The reward model and its Bradley–Terry loss: the readable reference.

A separate network (docs/conventions.md §2): ``embedding.*``, ``lstm.*`` and a scalar head
``reward.weight (1, H)``, ``reward.bias (1,)``, read at the last real token of each sequence::

    r(x) = reward(h_{last real token})                                   (B,)

Bradley–Terry, minimised, mean over P pairs, with an optional margin m (TRL's convention)::

    Δ = r(chosen) − r(rejected) − m
    L_RM = mean logaddexp(0, −Δ) = −mean log σ(Δ)        (ln 2 at a tie; stable at |Δ| = 1000)
    ∂L/∂Δ = −σ(−Δ)/P

``reward.bias`` gets zero gradient (it cancels in Δ), so a reward's offset is arbitrary.

    forward(params, tokens, mask) -> rewards (B,), cache
    bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None) -> out, grads
"""

from __future__ import annotations

import numpy as np

from . import lstm
from ._validate import as_float_array, check_batch, check_finite_result


def _prepare(params, tokens, mask, name):
    V, _, _ = lstm.check_model(params, ("reward",))
    tokens, mask, _ = check_batch(tokens, mask, vocab_size=V)
    if np.any(mask.sum(axis=1) == 0):
        b = int(np.argwhere(mask.sum(axis=1) == 0)[0, 0])
        raise ValueError(f"{name} row {b} is empty: every sequence needs at least one real token")
    return tokens, mask


def forward(params, tokens, mask, name="tokens"):
    """Scalar rewards (B,) read at each row's last real token.

    Every row needs at least one real token: an all-padding row has no last token, and is rejected
    with a ValueError naming the row (unlike the policy's functions, which accept such rows).
    """
    tokens, mask = _prepare(params, tokens, mask, name)
    hs, lcache = lstm.forward(params, tokens, mask)
    h_last, _ = lstm.final_state(lcache)                                # (B, H)
    r = lstm.linear(params["reward.weight"], params["reward.bias"], h_last)[:, 0]
    return r, {"lstm": lcache, "h_last": h_last, "params": params}


def backward(dr, cache):
    """Gradients of every parameter from ∂L/∂r (B,)."""
    p = cache["params"]
    grads = {k: np.zeros_like(v) for k, v in p.items()}
    grads["reward.weight"] += dr[None, :] @ cache["h_last"]             # (1, H)
    grads["reward.bias"] += dr.sum(keepdims=True)
    dh_final = dr[:, None] * p["reward.weight"]                         # (B, H)
    check_finite_result(dh_final.dtype, dh_final)                       # an overflow is an error
    B, T = cache["lstm"]["ids"].shape
    lg = lstm.backward(np.zeros((B, T, dh_final.shape[1]), dh_final.dtype), cache["lstm"], dh_final=dh_final)
    for k in lstm.BODY_KEYS:
        grads[k] += lg[k]
    return grads


def bt_loss(delta):
    """Bradley–Terry loss per pair: logaddexp(0, −Δ) = −log σ(Δ)."""
    return np.logaddexp(0.0, -delta)


def prepare_pairs(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """Every check of ``bt_loss_and_grad`` (the reference and every backend call it):
    (chosen, chosen_mask, rejected, rejected_mask, margin (P,) float64)."""
    c_tok, c_mask = _prepare(params, chosen, chosen_mask, "chosen")
    r_tok, r_mask = _prepare(params, rejected, rejected_mask, "rejected")
    P = c_tok.shape[0]
    if r_tok.shape[0] != P:
        raise ValueError(f"chosen and rejected must have the same number of rows, got {P} and {r_tok.shape[0]}")
    if P == 0:
        raise ValueError("no preference pairs: the loss is undefined")
    m = np.zeros(P) if margin is None else as_float_array(margin, "margin", shape=(P,))
    return c_tok, c_mask, r_tok, r_mask, m


def bt_head(r_c, r_r, m, dtype=None):
    """The Bradley–Terry loss on top of the rewards (P,) of chosen and rejected: Δ, L_RM, ∂L/∂Δ (P,).
    A non-finite reward or loss in ``dtype`` (the params', default r_c's) is an overflow: an error."""
    delta = r_c - r_r - m
    loss = bt_loss(delta).mean()
    # ∂L/∂Δ = −σ(−Δ)/P, with σ(−Δ) = exp(−logaddexp(0, Δ)) for stability
    d_delta = -np.exp(-np.logaddexp(0.0, delta)) / delta.shape[0]
    check_finite_result(dtype or r_c.dtype, r_c, r_r, loss)             # an overflow is an error
    return delta, loss, d_delta


def bt_outputs(r_c, r_r, delta, loss):
    """The ``out`` dict of ``bt_loss_and_grad`` (every backend's too): one key order."""
    return {"reward_chosen": r_c, "reward_rejected": r_r, "delta": delta, "loss": loss,
            "accuracy": float(np.mean(r_c > r_r))}


def bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """Mean BT loss over pairs, rewards, pairwise accuracy and ∇L_RM."""
    c_tok, c_mask, r_tok, r_mask, m = prepare_pairs(params, chosen, chosen_mask, rejected, rejected_mask, margin)
    r_c, cache_c = forward(params, c_tok, c_mask)
    r_r, cache_r = forward(params, r_tok, r_mask)
    delta, loss, d_delta = bt_head(r_c, r_r, m, params["reward.weight"].dtype)
    g_c, g_r = backward(d_delta, cache_c), backward(-d_delta, cache_r)
    grads = {k: g_c[k] + g_r[k] for k in g_c}
    check_finite_result(params["reward.weight"].dtype, *grads.values())
    return bt_outputs(r_c, r_r, delta, loss), grads
