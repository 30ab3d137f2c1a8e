"""Exact ground truth by enumeration: J(θ), ∇J, KL(π‖π_ref), ∇KL and the exact expectation
of any REINFORCE estimator, for a vocabulary and horizon small enough to list every response.

A response y to a fixed prompt is a sequence of at most L tokens that ends at its first EOS, or
is cut at L (truncated). There are Σ_{k=1}^{L} (V−1)^{k−1} + (V−1)^L of them. With
p(y) = Π_t π_ε(y_t|s_t) (docs/conventions.md §3)::

    J        = Σ_y p(y) R(y)
    ∇J       = Σ_y p(y) R(y) ∇log p(y)
    KL       = Σ_y p(y) (log p(y) − log p_ref(y))
    ∇KL      = Σ_y p(y) (log p(y) − log p_ref(y)) ∇log p(y)      (Σ_y p ∇log p = 0)
    E[ĝ]     = Σ_{y_1..y_B} Π_b p(y_b) · ĝ(y_1, …, y_B)            for an estimator ĝ on batches of B

With seq_sum aggregation, whitening off and k1 (or β = 0), E[−∇L_pg] = ∇E[Σ_j γ^j r_j]; at γ = 1
that is ∇(J − β·KL), with the value, qvalue, loo or none baseline. No anchor library has this.

Issue 9's conventions (tests/test_exact.py holds each statement by enumeration):

* surrogate="ppo_clip" with old_logp = log π_θ (ratio ρ = 1): −min(ρA, clip(ρ)A) has the gradient
  −A·∇log π for any A (both branches tie; the unclipped one is taken), so it IS REINFORCE's estimator,
  batch by batch, and every statement here carries over to it.
* group_loo (RLOO), groups of k rows: b_i is a function of the other rows only, independent of row
  i's response, so E[b_i ∇log p(y_i)] = 0: unbiased. group_mean includes the row's own S_i with
  weight 1/k: E[ĝ_group_mean] = E[ĝ_none] − (1/k)·∇E[Σ_j γ^j r_j]; at γ = 1 (or returns="total")
  that is (1 − 1/k)·∇(J − β·KL), a shrinking by the row's own share (Dr. GRPO).
* returns="gae" with λ = 1 is returns="rtg" (the δ's telescope; V_next = 0 after the last action).
* kl_in="loss" (GRPO's placement): L_kl = β·Σ_t w_t·k(x_t) differentiated only through log π_θ(a_t|s_t)
  (the sampling is not differentiated), so with seq_sum and one row
      E_y[∇L_kl] = β·E_y[Σ_t k'(x_t)·∇log π_θ(a_t|s_t)] = β·E_y[Σ_t ∇_θ D(s_t)]   (states s_t held fixed)
  with, per state, since E_{a~π}[∇log π(a)] = 0 and E_{a~π}[(π_ref/π)(a)·∇log π(a)] = Σ_a π_ref ∇log π:
      k1: k' = 1          → D = 0: the expected gradient is ZERO (k1 in the loss does nothing on average)
      k2: k' = x          → D = KL(π_θ(·|s_t) ‖ π_ref(·|s_t))  (the forward KL, per state)
      k3: k' = 1 − e^{−x} → D = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))  (the REVERSE KL, per state)
  None of them is ∇KL(π‖π_ref) of the sequence, which also has the future terms E[Σ_t Σ_{s>t} x_s ∇log π_t];
  for one-token responses k2 in the loss gives ∇KL exactly and k3 gives ∇KL(π_ref‖π) instead.
"""

from __future__ import annotations

import itertools

import numpy as np

from . import model, policy, reinforce, returns
from .tokenizer import EOS

MAX_RESPONSES = 100_000


def count_responses(V, max_len):
    """Σ_{k=1}^{L} (V−1)^{k−1} + (V−1)^L."""
    return sum((V - 1) ** (k - 1) for k in range(1, max_len + 1)) + (V - 1) ** max_len


def enumerate_responses(V, max_len, eos_id=EOS):
    """Every response as a tuple of token ids, in a fixed order (shorter first, then lexicographic)."""
    if V < 2 or max_len < 1:
        raise ValueError(f"need V >= 2 and max_len >= 1, got V={V}, max_len={max_len}")
    n = count_responses(V, max_len)
    if n > MAX_RESPONSES:
        raise ValueError(f"V={V}, max_len={max_len} gives {n} responses; enumeration is limited to {MAX_RESPONSES}")
    others = [a for a in range(V) if a != eos_id]
    out = []
    for k in range(1, max_len + 1):
        for head in itertools.product(others, repeat=k - 1):
            out.append(head + (eos_id,))
    out.extend(itertools.product(others, repeat=max_len))
    return out


def response_batch(prompt, responses, max_len):
    """(tokens (N, P+L), mask, prompt_len) for the prompt followed by each response."""
    prompt = list(np.asarray(prompt, dtype=np.int64))
    P = len(prompt)
    T = P + max_len
    N = len(responses)
    tokens = np.zeros((N, T), np.int64)
    mask = np.zeros((N, T))
    for i, y in enumerate(responses):
        seq = prompt + list(y)
        tokens[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1.0
    return tokens, mask, np.full(N, P, np.int64)


def grad_weighted_logp(params, tokens, mask, prompt_len, upstream, alpha=1.0, eps=0.0):
    """∇_θ Σ_{b,t} upstream_{b,t}·log π_ε(a_t|s_t) for a fixed batch."""
    fwd, cache = model.forward(params, tokens, mask)
    am = model.action_mask(mask, prompt_len)
    dz = policy.grad_logprob(fwd["scores"], tokens, upstream * am, alpha, eps)
    return model.backward(cache, dscores=dz)


def exact_objective(params, ref_params, prompt, max_len, reward_fn, alpha=1.0, eps=0.0, eos_id=EOS):
    """J, ∇J, KL(π‖π_ref), ∇KL and the enumeration itself.

    reward_fn maps a response (tuple of ids) to a float R(y).
    """
    V = params["head.weight"].shape[0]
    ys = enumerate_responses(V, max_len, eos_id)
    tokens, mask, pl = response_batch(prompt, ys, max_len)
    logp_tok = reinforce.sequence_logprobs(params, tokens, mask, pl, alpha, eps)
    ref_tok = reinforce.sequence_logprobs(ref_params, tokens, mask, pl, alpha, eps)
    logp, ref = logp_tok.sum(1), ref_tok.sum(1)
    p = np.exp(logp)
    R = np.array([float(reward_fn(y)) for y in ys])
    am = model.action_mask(mask, pl)
    ones = am
    gJ = grad_weighted_logp(params, tokens, mask, pl, (p * R)[:, None] * ones, alpha, eps)
    gKL = grad_weighted_logp(params, tokens, mask, pl, (p * (logp - ref))[:, None] * ones, alpha, eps)
    return {"responses": ys, "tokens": tokens, "mask": mask, "prompt_len": pl, "probs": p,
            "logp": logp, "ref_logp": ref, "rewards": R,
            "J": float(p @ R), "grad_J": gJ, "KL": float(p @ (logp - ref)), "grad_KL": gKL,
            "token_logp": logp_tok, "token_ref_logp": ref_tok}


def expected_estimator(params, ref_params, prompt, max_len, reward_fn, cfg, batch_size=1, eos_id=EOS,
                       group=None):
    """The exact expectation of the REINFORCE estimator over batches of ``batch_size`` responses.

    ``group`` (batch_size,) ids for the group baselines (default: one group, every row answers the one
    prompt). old_logp is the policy's own (ratio 1), old_values none.

    Returns {'grad': E[∇L], 'terms': {'pg', 'ent', 'value', 'kl'}: E[∇ of each term],
             'loss_pg': E[L_pg], 'kl_seq': {each of returns.KL_ESTIMATORS: E[Σ_t k_t]}}.
    """
    if group is None:
        group = np.zeros(batch_size, np.int64)
    ex = exact_objective(params, ref_params, prompt, max_len, reward_fn, cfg.alpha, cfg.eps, eos_id)
    n = len(ex["responses"])
    if n ** batch_size > MAX_RESPONSES:
        raise ValueError(f"{n} responses in batches of {batch_size} give {n ** batch_size} batches; "
                         f"the limit is {MAX_RESPONSES}")
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    acc = {"grad": dict(zero), "terms": {t: dict(zero) for t in ("pg", "ent", "value", "kl")}, "loss_pg": 0.0}
    for idx in itertools.product(range(n), repeat=batch_size):
        idx = list(idx)
        weight = float(np.prod(ex["probs"][idx]))
        if weight == 0.0:
            continue
        out, g = reinforce.loss_and_grad(params, ex["tokens"][idx], ex["mask"][idx], ex["prompt_len"][idx],
                                         ex["rewards"][idx], cfg, ref_logp=ex["token_ref_logp"][idx],
                                         term_grads=True, group=group)
        for k in params:
            acc["grad"][k] = acc["grad"][k] + weight * g[k]
            for t in acc["terms"]:
                acc["terms"][t][k] = acc["terms"][t][k] + weight * g["terms"][t][k]
        acc["loss_pg"] += weight * out["loss_pg"]
    x = ex["token_logp"] - ex["token_ref_logp"]
    am = model.action_mask(ex["mask"], ex["prompt_len"]) > 0
    acc["kl_seq"] = {k: float(ex["probs"] @ np.where(am, returns.kl_estimate(x, k), 0.0).sum(1))
                     for k in returns.KL_ESTIMATORS}
    acc["exact"] = ex
    return acc
