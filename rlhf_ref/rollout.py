"""Batched autoregressive sampling (rollouts): the readable reference; kernels must match it.

Every row starts from its prompt (BOS first, ``prompt_len`` tokens) and the LSTM runs one
token at a time (``lstm.step``). At t ≥ prompt_len a row samples token t from q(·|s_t), the
policy over ``scores = head(h_{t−1})``, by inverse CDF with the pre-drawn uniform u[:, t]
(``policy.sample``; docs/conventions.md §4). A row ends after EOS or at T (truncation); positions after
its end are padding (mask 0). Nothing here draws random numbers.

    rollout(params, prompt_tokens (B, T), prompt_len (B,), u (B, T), alpha, eps, kind, ...)
      -> {'tokens' (B, T) int64, 'mask' (B, T), 'action_mask' (B, T),
          'logp' (B, T): log q(a_t|s_t) of each sampled token, 0 off the action mask,
          'ref_logp' (B, T) when ref_params is given (π_ref scored with the same α, ε, kind),
          'values' (B, T) when values=True: V(s_t) at real positions t ≥ 1}

The log-probs returned are those of the distribution that sampled; recomputing them from the
finished batch (``reinforce.sequence_logprobs``) agrees to a few ulps.
"""

from __future__ import annotations

import numpy as np

from . import lstm, policy
from .tokenizer import EOS, PAD
from ._validate import as_float_array, as_int_array, check_eos_id


def check_rollout_args(params, prompt_tokens, prompt_len, u, alpha, eps, kind, eos_id, ref_params=None,
                       values=False):
    """Validate rollout inputs (shared by every backend); returns (tokens, prompt_len, u, V)."""
    V, _, _ = lstm.check_model(params, ("head", "value") if values else ("head",))
    if ref_params is not None:
        Vr, _, _ = lstm.check_model(ref_params, ("head",), name="ref_params")
        if Vr != V:
            raise ValueError(f"ref_params has vocabulary {Vr}, params has {V}")
    policy.check_policy_args(alpha, eps, kind)
    if kind == "boltzmann":
        policy.check_alpha_dtype(alpha, params["head.weight"].dtype, "params")
    tok = as_int_array(prompt_tokens, "prompt_tokens", ndim=2)
    B, T = tok.shape
    pl = as_int_array(prompt_len, "prompt_len", shape=(B,))
    # (the ndarray methods: np.any's dispatch costs microseconds a call, issue 12)
    if B and (pl.min() < 1 or pl.max() > T):
        b = int(np.argwhere((pl < 1) | (pl > T))[0, 0])
        raise ValueError(f"prompt_len must lie in [1, {T}] (BOS included); prompt_len[{b}] = {pl[b]}")
    prompt = np.arange(T)[None, :] < pl[:, None]
    bad = prompt & ((tok < 0) | (tok >= V))
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"prompt_tokens must lie in [0, {V}) within the prompt; prompt_tokens[{b}, {t}] = {tok[b, t]}")
    u = as_float_array(u, "u", shape=(B, T))                  # finite
    if u.size and (u.min() < 0 or u.max() >= 1):
        raise ValueError("u must hold uniforms in [0, 1)")
    check_eos_id(eos_id, V)
    return tok, np.ascontiguousarray(pl), u, V


def check_status(tokens, alpha, kind, dtype):
    """A compiled rollout ends a row with the token −1 (−2) where the policy (the reference policy)
    has no finite scores: raise the reference's error (``policy.check_scores``) for it."""
    if tokens.size and tokens.min() < 0:
        name = "ref_params" if not np.any(tokens == -1) else "params"
        raise policy.scores_error(name, alpha, kind, dtype)


def rollout(params, prompt_tokens, prompt_len, u, alpha=1.0, eps=0.0, kind="boltzmann", eos_id=EOS,
            ref_params=None, values=False):
    """Sample a batch of responses; see the module docstring."""
    tok, pl, u, V = check_rollout_args(params, prompt_tokens, prompt_len, u, alpha, eps, kind, eos_id,
                                       ref_params, values)
    B, T = tok.shape
    dt = params["head.weight"].dtype
    H = params["lstm.weight_hh_l0"].shape[1]
    tokens = np.where(np.arange(T)[None, :] < pl[:, None], tok, PAD)
    mask = np.zeros((B, T))
    mask[:, :1] = 1.0                                                              # BOS (T = 0: nothing)
    am = np.zeros((B, T))
    logp = np.zeros((B, T))
    ref_logp = np.zeros((B, T)) if ref_params is not None else None
    vals = np.zeros((B, T)) if values else None
    h, c = np.zeros((B, H), dt), np.zeros((B, H), dt)
    if ref_params is not None:
        Hr = ref_params["lstm.weight_hh_l0"].shape[1]
        hr, cr = np.zeros((B, Hr), ref_params["head.weight"].dtype), np.zeros((B, Hr), ref_params["head.weight"].dtype)
    done = np.zeros(B, bool)
    for t in range(1, T):
        # feed token t−1: h now is h_{t−1}, the state token t is chosen in
        h, c = lstm.step(params, tokens[:, t - 1], h, c)
        if ref_params is not None:
            hr, cr = lstm.step(ref_params, tokens[:, t - 1], hr, cr)
        live = ~done
        in_prompt = t < pl
        act = live & ~in_prompt
        z = lstm.linear(params["head.weight"], params["head.bias"], h)               # (B, V)
        z = policy.check_scores(z, act, alpha, kind, "params")    # a policy where it samples, else an error
        logq = policy.logprobs(z, alpha, eps, kind)
        a = policy.sample(logq, u[:, t])
        tokens[:, t] = np.where(act, a, np.where(live & in_prompt, tokens[:, t], PAD))
        mask[:, t] = live
        am[:, t] = act
        idx = tokens[:, t:t + 1]
        logp[:, t] = np.where(act, np.take_along_axis(logq, idx, -1)[:, 0], 0.0)
        if ref_params is not None:
            zr = lstm.linear(ref_params["head.weight"], ref_params["head.bias"], hr)
            zr = policy.check_scores(zr, act, alpha, kind, "ref_params")
            lr = policy.logprobs(zr, alpha, eps, kind)
            ref_logp[:, t] = np.where(act, np.take_along_axis(lr, idx, -1)[:, 0], 0.0)
        if values:
            vals[:, t] = np.where(live, lstm.linear(params["value.weight"], params["value.bias"], h)[:, 0], 0.0)
        done = done | (act & (tokens[:, t] == eos_id))
    out = {"tokens": tokens, "mask": mask, "action_mask": am, "logp": logp}
    if ref_params is not None:
        out["ref_logp"] = ref_logp
    if values:
        out["values"] = vals
    return out
