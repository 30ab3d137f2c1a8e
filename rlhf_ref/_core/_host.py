"""Host code shared by the compiled facades (_backend_cython.py, _backend_numba.py, _backend_cuda.py).

What the facades do alike, written once: the kernels' integer codes (from the table of
conventions, ``rlhf_ref/conventions.py``: the kernels receive codes and hold no names), parameter
access in one dtype, the stacked heads, the completion of a gradient dict to params' keys, and the
reward head of the Bradley–Terry loss on top of the body. The checks themselves are the
reference's (``reinforce.prepare``, ``sft.prepare``, ``reward_model.prepare_pairs``, ...); the
thread control of BLAS is ``_blas.py``, the tuning parameters ``_config.py``.
"""

from __future__ import annotations

import numpy as np

from .. import conventions

#: {switch: {value: code}} for every choice of the table: a value's index in its row
CODES = {name: {v: i for i, v in enumerate(sw.values)}
         for name, sw in conventions.TABLE.items() if sw.is_choice}


def chain_codes(cfg):
    """{switch: code} of every choice of a ReinforceConfig (what the kernels' chains receive)."""
    return {name: CODES[name][getattr(cfg, name)] for name in ("kl", "returns", "baseline", "whiten", "aggregation",
                                                                "kl_in", "group_scale", "surrogate")}


def check_group_sd(cfg, am, group, sd):
    """After a kernel chain: σ_g + group_eps = 0 in a group is the reference's error."""
    if cfg.group_scale == "std":
        from .. import returns
        returns.check_group_std(sd, am, group, cfg.group_eps)


def c(a, dt):
    """``a`` as a C-contiguous array of dtype dt (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=dt)


def dtype(params):
    """The compute dtype of a backend call: that of params."""
    return params["lstm.weight_hh_l0"].dtype


def head_stack(params, names, dt, pad=1):
    """The heads ``names`` that params has, stacked: Wc (K, H), bc (K,) and {name: (offset, rows)}.

    With ``pad`` > 1, zero rows pad K to a multiple of pad (aligned rows of logits). A single head
    with pad 1 is params' own array (no copy when it is contiguous in dt).
    """
    Ws, bs, off, k = [], [], {}, 0
    for n in names:
        if f"{n}.weight" in params:
            W = params[f"{n}.weight"]
            Ws.append(W)
            bs.append(params[f"{n}.bias"])
            off[n] = (k, W.shape[0])
            k += W.shape[0]
    if pad == 1 and len(Ws) == 1:
        return c(Ws[0], dt), c(bs[0], dt), off
    K = -(-k // pad) * pad
    Wc, bc = np.zeros((K, Ws[0].shape[1]), dt), np.zeros(K, dt)
    k = 0
    for W, b in zip(Ws, bs):
        Wc[k:k + W.shape[0]] = W
        bc[k:k + W.shape[0]] = b
        k += W.shape[0]
    return Wc, bc, off


def head_grads(grads, off, dWc, dbc):
    """Split the stacked heads' gradients (dWc, dbc) into grads by head name (copies)."""
    for n, (k0, k) in off.items():
        grads[f"{n}.weight"] = dWc[k0:k0 + k].copy()
        grads[f"{n}.bias"] = dbc[k0:k0 + k].copy()
    return grads


def complete(grads, params, dt):
    """Every key of params, in params' order; a head the loss does not reach gets 0."""
    return {k: (grads[k] if k in grads else np.zeros(v.shape, dt)) for k, v in params.items()}


# ----------------------------------------------------------------------------- reward model

def stack_pairs(c_tok, c_mask, r_tok, r_mask):
    """Chosen rows on top of rejected ones, right-padded to one length: tokens, mask (2P, T)."""
    T = max(c_tok.shape[1], r_tok.shape[1])

    def pad(a):
        return np.pad(a, ((0, 0), (0, T - a.shape[1])))

    return np.concatenate([pad(c_tok), pad(r_tok)], 0), np.concatenate([pad(c_mask), pad(r_mask)], 0)


def reward_head_backward(d_delta, params, dt):
    """∂L/∂h_final (2P, H) in dt from ∂L/∂Δ (P,) through r = w·h + b (chosen rows +, rejected −)."""
    dr = np.concatenate([d_delta, -d_delta])
    w_r = params["reward.weight"][0].astype(np.float64)
    return (dr[:, None] * w_r[None, :]).astype(dt)


def reward_head_grads(grads, d_delta, h_last, dt):
    """The reward head's gradients from ∂L/∂Δ (P,) and the final states h_last (2P, H), into grads."""
    P = d_delta.shape[0]
    hl = h_last.astype(np.float64)
    grads["reward.weight"] = ((d_delta @ hl[:P]) + ((-d_delta) @ hl[P:]))[None, :].astype(dt)
    grads["reward.bias"] = np.array([d_delta.sum() + (-d_delta).sum()], dt)
    return grads
