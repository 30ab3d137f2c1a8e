"""The LSTM language-model body: the readable reference; the kernels in ``_core`` must match it.

One layer, PyTorch's parameterisation and gate order (i, f, g, o), docs/conventions.md §2::

    x_t = E[tokens_t]                                          (embedding.weight (V, E))
    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh                 (4H,)  rows [i | f | g | o]
    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)

with h_{-1} = h0, c_{-1} = c0 (zeros by default). ``hs[:, t] = h_t`` is the output
after reading token t. Where ``mask`` is 0 (right padding) the state is carried
unchanged (``h_t = h_{t-1}``, ``c_t = c_{t-1}``), the output ``hs[:, t]`` is 0 and the
padded token id is never read, so ``h_final`` is the state after each row's last real
token and adding padding changes nothing.

Shapes: B batch, T time, V vocabulary, E embedding, H hidden, G = 4H.

    forward(params, tokens (B, T), mask (B, T)) -> hs (B, T, H), cache
    backward(dhs (B, T, H), cache, dh_final=None, dc_final=None) -> grads
        grads holds 'embedding.weight', 'lstm.*' and 'h0', 'c0' (B, H)
    step(params, ids (B,), h (B, H), c (B, H)) -> h', c'       (one token, for sampling)

References: Hochreiter & Schmidhuber (1997); PyTorch ``nn.LSTM`` docs (gate order and
the two biases); Karpathy's batched LSTM gist for the layout of the backward pass.
"""

from __future__ import annotations

import numpy as np

from ._validate import FLOAT_DTYPES, check_batch, check_params, as_float_array

BODY_KEYS = ("embedding.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0")
HEAD_SHAPES = {"head": "V", "value": 1, "qvalue": "V", "reward": 1}


def param_shapes(V, E, H, heads=("head", "value")):
    """Keys and shapes of a model's parameter dict (PyTorch state-dict names)."""
    shapes = {
        "embedding.weight": (V, E),
        "lstm.weight_ih_l0": (4 * H, E),
        "lstm.weight_hh_l0": (4 * H, H),
        "lstm.bias_ih_l0": (4 * H,),
        "lstm.bias_hh_l0": (4 * H,),
    }
    for name in heads:
        if name not in HEAD_SHAPES:
            raise ValueError(f"heads must be among {sorted(HEAD_SHAPES)}, got {name!r}")
        out = V if HEAD_SHAPES[name] == "V" else 1
        shapes[f"{name}.weight"] = (out, H)
        shapes[f"{name}.bias"] = (out,)
    return shapes


def dims(params):
    """(V, E, H) read off a parameter dict."""
    try:
        if np.ndim(params["embedding.weight"]) != 2 or np.ndim(params["lstm.weight_hh_l0"]) != 2:
            raise ValueError("both must be 2-D arrays, got shapes "
                             f"{np.shape(params['embedding.weight'])} and {np.shape(params['lstm.weight_hh_l0'])}")
        V, E = params["embedding.weight"].shape
        H = params["lstm.weight_hh_l0"].shape[1]
    except (KeyError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"params must hold 'embedding.weight' (V, E) and 'lstm.weight_hh_l0' (4H, H): {e}") from None
    return V, E, H


def heads_of(params):
    """The heads present in ``params`` (those with '<name>.weight')."""
    return tuple(h for h in HEAD_SHAPES if f"{h}.weight" in params)


def check_model(params, required_heads=(), name="params"):
    """Validate a parameter dict: body keys, the required heads, optional known heads, shapes, finiteness."""
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}")
    V, E, H = dims(params)
    for n, v in (("V", V), ("E", E), ("H", H)):
        if v < 1:
            raise ValueError(f"{name} must have V, E, H >= 1 (vocabulary, embedding, hidden units), got "
                             f"{n} = {v} from 'embedding.weight' {params['embedding.weight'].shape} and "
                             f"'lstm.weight_hh_l0' {params['lstm.weight_hh_l0'].shape}")
    heads = tuple(dict.fromkeys(tuple(required_heads) + heads_of(params)))
    expected = param_shapes(V, E, H, heads)
    extra = sorted(set(params) - set(expected))
    if extra:
        raise ValueError(f"{name} has unexpected keys {extra}; expected {sorted(expected)}")
    check_params(params, expected, name)
    dtypes = {params[k].dtype for k in expected}
    if len(dtypes) > 1:
        raise TypeError(f"{name} mixes dtypes {sorted(str(d) for d in dtypes)}; use one float dtype")
    return V, E, H


def init_params(V, E, H, rng, heads=("head", "value"), dtype=np.float64):
    """Seeded initialisation like PyTorch's defaults.

    Embedding ~ N(0, 1); LSTM weights and biases ~ U(-1/√H, 1/√H);
    Linear(H, out) weight and bias ~ U(-1/√H, 1/√H).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    for n, v in (("V", V), ("E", E), ("H", H)):
        if int(v) != v or v < 1:
            raise ValueError(f"{n} must be a positive integer, got {v!r}")
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    shapes = param_shapes(V, E, H, heads)
    k = 1.0 / np.sqrt(H)
    params = {}
    for name, shape in shapes.items():
        if name == "embedding.weight":
            params[name] = rng.standard_normal(shape)
        else:
            params[name] = rng.uniform(-k, k, size=shape)
    return {n: a.astype(dtype) for n, a in params.items()}


def _sigmoid(x):
    # σ(x) = 1 / (1 + e^{-x}) without overflow warnings for large |x|
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _cell(params, ids, h, c):
    """One step; returns h', c' and the post-activation gates (B, 4H) in order i, f, g, o."""
    W_ih, W_hh = params["lstm.weight_ih_l0"], params["lstm.weight_hh_l0"]
    H = W_hh.shape[1]
    x = params["embedding.weight"][ids]                      # (B, E)
    a = x @ W_ih.T + params["lstm.bias_ih_l0"] + h @ W_hh.T + params["lstm.bias_hh_l0"]   # (B, 4H)
    gates = np.concatenate([_sigmoid(a[:, :2 * H]), np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])], axis=1)
    i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    c_new = f * c + i * g
    h_new = o * np.tanh(c_new)
    return h_new, c_new, gates


def step(params, ids, h, c):
    """One LSTM step for every row: (ids (B,), h (B, H), c (B, H)) -> (h', c')."""
    h_new, c_new, _ = _cell(params, ids, h, c)
    return h_new, c_new


def forward(params, tokens, mask=None, h0=None, c0=None):
    """Run the LSTM over a batch of right-padded sequences. Returns (hs (B, T, H), cache)."""
    V, E, H = dims(params)
    if mask is None:
        mask = np.ones(np.shape(tokens))
    tokens, mask, _ = check_batch(tokens, mask, vocab_size=V)
    B, T = tokens.shape
    dt = params["lstm.weight_hh_l0"].dtype
    h = np.zeros((B, H), dt) if h0 is None else as_float_array(h0, "h0", shape=(B, H), dtype=dt).copy()
    c = np.zeros((B, H), dt) if c0 is None else as_float_array(c0, "c0", shape=(B, H), dtype=dt).copy()
    ids = np.where(mask > 0, tokens, 0)                      # padded ids are never read
    m = mask.astype(dt)[:, :, None]                          # (B, T, 1)
    hs_full = np.zeros((B, T + 1, H), dt)                    # h_{t-1} for t = 0..T, index 0 is h0
    cs_full = np.zeros((B, T + 1, H), dt)
    gates = np.zeros((B, T, 4 * H), dt)                      # post-activation i, f, g, o
    hs_full[:, 0], cs_full[:, 0] = h, c
    for t in range(T):
        h_new, c_new, gates[:, t] = _cell(params, ids[:, t], h, c)
        # padding carries the state unchanged
        h = m[:, t] * h_new + (1 - m[:, t]) * h
        c = m[:, t] * c_new + (1 - m[:, t]) * c
        hs_full[:, t + 1], cs_full[:, t + 1] = h, c
    hs = hs_full[:, 1:] * m                                  # (B, T, H), 0 on padding
    cache = {"params": params, "ids": ids, "mask": m, "gates": gates, "hs_full": hs_full, "cs_full": cs_full}
    return hs, cache


def final_state(cache):
    """(h, c) after each row's last real token, (B, H) each."""
    return cache["hs_full"][:, -1], cache["cs_full"][:, -1]


def backward(dhs, cache, dh_final=None, dc_final=None):
    """Backpropagation through time. dhs (B, T, H) is ∂L/∂hs; returns a grads dict."""
    p = cache["params"]
    ids, m, gates = cache["ids"], cache["mask"], cache["gates"]
    hs_full, cs_full = cache["hs_full"], cache["cs_full"]
    B, T, G = gates.shape
    H = G // 4
    dt = gates.dtype
    dhs = as_float_array(dhs, "dhs", shape=(B, T, H), dtype=dt)
    W_ih, W_hh = p["lstm.weight_ih_l0"], p["lstm.weight_hh_l0"]
    dW_ih, dW_hh = np.zeros_like(W_ih), np.zeros_like(W_hh)
    db = np.zeros(G, dt)
    dE = np.zeros_like(p["embedding.weight"])
    dh = np.zeros((B, H), dt) if dh_final is None else as_float_array(dh_final, "dh_final", shape=(B, H), dtype=dt).copy()
    dc = np.zeros((B, H), dt) if dc_final is None else as_float_array(dc_final, "dc_final", shape=(B, H), dtype=dt).copy()
    for t in reversed(range(T)):
        mt = m[:, t]                                         # (B, 1)
        dh = dh + dhs[:, t] * mt                             # the output is 0 on padding
        i, f, g, o = (gates[:, t, k * H:(k + 1) * H] for k in range(4))
        c_prev, h_prev, c = cs_full[:, t], hs_full[:, t], cs_full[:, t + 1]
        tc = np.tanh(c)
        # backprop through h_t = o ⊙ tanh(c_t)
        do = dh * tc
        dc_t = dc + dh * o * (1 - tc * tc)
        # backprop through c_t = f ⊙ c_{t-1} + i ⊙ g
        di, dg, df = dc_t * g, dc_t * i, dc_t * c_prev
        # backprop through the gate nonlinearities: σ' = σ(1-σ), tanh' = 1 - tanh²
        da = np.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], axis=1) * mt
        dW_ih += da.T @ p["embedding.weight"][ids[:, t]]
        dW_hh += da.T @ h_prev
        db += da.sum(axis=0)
        np.add.at(dE, ids[:, t], da @ W_ih)                  # scatter into the embedding rows read
        # dh_{t-1} = W_hhᵀ da;  dc_{t-1} = f ⊙ dc_t; padding passes both through unchanged
        dh = da @ W_hh + (1 - mt) * dh
        dc = mt * dc_t * f + (1 - mt) * dc
    return {"embedding.weight": dE, "lstm.weight_ih_l0": dW_ih, "lstm.weight_hh_l0": dW_hh,
            "lstm.bias_ih_l0": db, "lstm.bias_hh_l0": db.copy(), "h0": dh, "c0": dc}


def linear(W, b, x):
    """A linear head: x (..., H) -> x Wᵀ + b (..., out)."""
    return x @ W.T + b
