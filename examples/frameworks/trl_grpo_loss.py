"""TRL's GRPO policy loss (the real ``trl.GRPOTrainer._compute_loss``) against the golden vectors.

    python examples/frameworks/trl_grpo_loss.py [--golden DIR] [--case NAME ...]

Needs ``pip install "rlhf-ref[frameworks]"`` (trl==1.16.0; it imports and runs on CPU). TRL has
no standalone loss function: the loss is the trainer method ``_compute_loss(model, inputs)``. It
is called here, unmodified, on a minimal stub object that holds the configuration attributes the
method reads (``loss_type``, ``beta``, ``epsilon_low``/``epsilon_high``, ...), a no-op
accelerator (one process), and a ``_get_per_token_logps_and_entropies`` that returns the golden
``logp`` as a leaf tensor instead of running a model. Everything the method computes from there
(ratio, clipping, the KL term, the per-``loss_type`` aggregation) is TRL's code.

What is compared, for each golden case whose aggregation a TRL ``loss_type`` implements:

    token_mean -> loss_type "bnpo" and "dapo" (num_items_in_batch = the batch's action count)
    seq_mean   -> loss_type "grpo"
    fixed_len  -> loss_type "dr_grpo" (max_completion_length = norm_len, or the array width T)

TRL receives the case's golden ``advantages`` (B, T) and ``logp`` in the response-only layout
(column 0 = each row's first action, ``completion_mask`` = the action mask moved alike) and
``old_per_token_logps=None`` (ratio 1) or, for the off-policy ppo_clip cases, the case's
``old_logp`` input (TRL's ``epsilon_low``/``epsilon_high`` = the case's clip_low/clip_high). Then

    TRL's loss                 == −Σ w·A        (+ β·Σ w·k3 with kl_in="loss"; the golden loss_pg
                                                 and loss_kl themselves when the case has them)
    d(TRL's loss)/d logp       == −w·A          (+ β·w·k3'(x)); off-policy: −w·A·ρ where ρA is the
                                                 min of the two branches, else 0 (ρ the golden ratio)

with w, A, k the golden ``weights``, ``advantages`` and ``kl`` (mapped to the response layout),
i.e. at ratio 1 the PPO-clip surrogate's value is Σ w·(−A) and its gradient is REINFORCE's
(docs/conventions.md §3). TRL's KL term is used only for cases with kl_in="loss" and kl="k3"
(GRPO's placement and estimator), with ``use_bias_correction_kl=False`` (with True, TRL also
differentiates the ratio that multiplies the KL: docs/frameworks.md §3). Otherwise TRL's beta is 0
(the case's β is already inside its rewards, hence inside A).
"""

from __future__ import annotations

import argparse
import sys
import types
from collections import defaultdict

import numpy as np

from rlhf_ref import testing

#: our aggregation -> the TRL loss_types that implement it (one batch, one process)
LOSS_TYPES = {"token_mean": ("bnpo", "dapo"), "seq_mean": ("grpo",), "fixed_len": ("dr_grpo",)}


def applicable(config, inputs=()):
    """A TRL GRPO loss_type implements the aggregation; the KL, if in the loss, is GRPO's k3; an
    ``old_logp`` input (ratio ≠ 1) only with our ppo_clip surrogate (TRL's is always PPO-clip)."""
    return (config.get("aggregation") in LOSS_TYPES
            and config.get("surrogate", "reinforce") in ("reinforce", "ppo_clip")
            and (config.get("kl_in", "reward") == "reward" or config.get("kl") == "k3")
            and ("old_logp" not in inputs or config.get("surrogate") == "ppo_clip"))


def to_response(a, am):
    """(B, T) token-aligned -> (B, L) response-only: row b's actions moved to columns 0, 1, ..."""
    B, T = am.shape
    L = max(int(am.sum(1).max()), 1)
    out = np.zeros((B, L), a.dtype)
    for b in range(B):
        ts = np.flatnonzero(am[b])
        out[b, :ts.size] = a[b, ts]
    return out


class _Accelerator:
    """One process: gather/reduce are the identity."""
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _stub(loss_type, beta, logp, T, norm_len, clip_low=0.2, clip_high=0.2):
    import torch

    def per_token_logps(model, input_ids, attention_mask, logits_to_keep, **kw):
        assert logits_to_keep == logp.shape[1]
        return logp, torch.zeros_like(logp), None

    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    return types.SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=clip_low, epsilon_high=clip_high, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=int(norm_len) if norm_len > 0 else T,
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), args=args,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=per_token_logps)


def trl_loss_and_grad(case, loss_type):
    """(loss, dloss/dlogp in the token-aligned layout) from TRL's GRPO ``_compute_loss``."""
    import torch
    from trl import GRPOTrainer

    cfg, g = case.config, case.expected
    am = g["action_mask"] > 0
    B, T = am.shape
    kl_loss = cfg.get("kl_in", "reward") == "loss"
    r = lambda a: torch.tensor(to_response(np.asarray(a, np.float64), am), dtype=torch.float64)  # noqa: E731
    cmask = r(am.astype(np.float64))
    logp = r(g["logp"]).requires_grad_(True)
    inputs = {"prompt_ids": torch.zeros((B, 1), dtype=torch.long), "prompt_mask": torch.ones((B, 1)),
              "completion_ids": torch.zeros(cmask.shape, dtype=torch.long), "completion_mask": cmask,
              "advantages": r(g["advantages"]), "num_items_in_batch": cmask.sum()}
    beta = float(cfg["beta"]) if kl_loss else 0.0
    if beta:
        inputs["ref_per_token_logps"] = r(g["ref_logp"])
    if "old_logp" in case.inputs:                  # off-policy: TRL's ratio exp(logp − old_logp)
        inputs["old_per_token_logps"] = r(case.inputs["old_logp"])
    stub = _stub(loss_type, beta, logp, T, float(cfg.get("norm_len", 0.0)),
                 float(cfg.get("clip_low", 0.2)), float(cfg.get("clip_high", 0.2)))
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    grad = np.zeros((B, T))
    gr = logp.grad.numpy()
    for b in range(B):
        ts = np.flatnonzero(am[b])
        grad[b, ts] = gr[b, :ts.size]
    return float(loss.detach()), grad


def expected(case, loss_type):
    """Σ w·(−A) (+ β·Σ w·k) and its gradient with respect to logp, from the golden arrays.

    The one documented difference: TRL's "grpo" averages the rows' token means over ALL B rows
    (``.mean()``; a row without an action contributes 0), our seq_mean (and veRL's
    seq-mean-token-mean) over the rows WITH an action. They agree when every row has an action
    (TRL's completions always hold at least EOS); for a case with empty rows (padding_rows...)
    TRL's value is ours times (rows with an action)/B, and that is what is asserted."""
    from rlhf_ref import returns as ret

    cfg, g = case.config, case.expected
    w, A = g["weights"].astype(np.float64), g["advantages"].astype(np.float64)
    grad = -w * A
    if "old_logp" in case.inputs:
        # PPO-clip off-policy (the golden ratio ρ): ∂ℓ/∂logp = −A·ρ where the unclipped branch is the
        # min (ties: unclipped), else 0
        rho = g["ratio"].astype(np.float64)
        clipped = np.clip(rho, 1 - cfg["clip_low"], 1 + cfg["clip_high"]) * A
        grad = np.where(rho * A <= clipped, -w * A * rho, 0.0)
    # the value: with surrogate="ppo_clip" the golden loss_pg itself (at ratio 1 it is Σ w·(−A));
    # with "reinforce" the golden loss_pg is −Σ w·A·logp, another function: Σ w·(−A) from the arrays
    loss = float(g["loss_pg"]) if cfg.get("surrogate") == "ppo_clip" else float(np.sum(-w * A))
    if cfg.get("kl_in", "reward") == "loss":
        x = np.where(g["action_mask"] > 0, g["logp"].astype(np.float64) - g["ref_logp"], 0.0)
        loss += float(g["loss_kl"]) if "loss_kl" in g else cfg["beta"] * float(np.sum(w * g["kl"]))
        grad = grad + cfg["beta"] * w * ret.kl_estimate_grad(x, cfg["kl"])
    if loss_type == "grpo":
        am = g["action_mask"] > 0
        scale = am.any(1).sum() / am.shape[0]
        loss, grad = loss * scale, grad * scale
    return loss, grad


# ------------------------------------------------------------------ RLOO: a per-sequence loss

def rloo_applicable(config):
    """TRL RLOO's loss takes ONE advantage per sequence and weighs every row 1/B: our seq_sum with an
    advantage constant over each row's actions (returns="total", no per-state baseline)."""
    return (config.get("aggregation") == "seq_sum" and config.get("returns") == "total"
            and config.get("baseline") not in ("value", "qvalue") and config.get("kl_in", "reward") == "reward")


def trl_rloo_loss_and_grad(case):
    """(loss, dloss/dlogp token-aligned) from TRL's ``RLOOTrainer._compute_loss`` on a stub."""
    import torch
    from trl import RLOOTrainer

    g = case.expected
    am = g["action_mask"] > 0
    B, T = am.shape
    A = np.array([g["advantages"][b, np.flatnonzero(am[b])[0]] if am[b].any() else 0.0 for b in range(B)],
                 np.float64)
    cmask = torch.tensor(to_response(am.astype(np.float64), am))
    logp = torch.tensor(to_response(np.asarray(g["logp"], np.float64), am)).requires_grad_(True)
    inputs = {"prompt_ids": torch.zeros((B, 1), dtype=torch.long), "prompt_mask": torch.ones((B, 1)),
              "completion_ids": torch.zeros(cmask.shape, dtype=torch.long), "completion_mask": cmask,
              "advantages": torch.tensor(A), "old_logps": (logp * cmask).sum(1).detach()}
    stub = _stub("rloo", 0.0, logp, T, 0.0)
    loss = RLOOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    grad = np.zeros((B, T))
    for b in range(B):
        ts = np.flatnonzero(am[b])
        grad[b, ts] = logp.grad.numpy()[b, :ts.size]
    return float(loss.detach()), grad


def check_rloo(name, golden=None):
    """TRL RLOO's gradient is −A_i/B on each action of row i: our seq_sum gradient −w·A times
    (rows with an action)/B (TRL's ``.mean()`` counts every row, as its GRPO "grpo" does). Its
    value is mean_i(−A_i ρ_i), which is NOT our loss_pg (that sums over a row's actions): only
    the value TRL computes from the golden A is asserted, the comparison is on the gradient."""
    case = testing.load_case(name, golden)
    if not rloo_applicable(case.config):
        raise ValueError(f"case {name!r}: not a configuration TRL RLOO's per-sequence loss implements")
    g = case.expected
    am = g["action_mask"] > 0
    tol = dict(rtol=1e-10, atol=1e-12) if case.config["dtype"] == "float64" else dict(rtol=2e-5, atol=1e-6)
    loss, grad = trl_rloo_loss_and_grad(case)
    scale = am.any(1).sum() / am.shape[0]
    np.testing.assert_allclose(grad, -g["weights"] * g["advantages"] * scale,
                               err_msg=f"case {name}: TRL RLOO dloss/dlogp", **tol)
    first = [g["advantages"][b, np.flatnonzero(am[b])[0]] for b in range(am.shape[0]) if am[b].any()]
    np.testing.assert_allclose(loss, -np.sum(first) / am.shape[0], err_msg=f"case {name}: TRL RLOO loss", **tol)
    return ("rloo",)


def check(name, golden=None):
    """Assert TRL's GRPO loss (every matching loss_type) reproduces case ``name``; returns the loss types."""
    case = testing.load_case(name, golden)
    if not applicable(case.config, case.inputs):
        raise ValueError(f"case {name!r}: no TRL GRPO loss_type implements its configuration")
    tol = dict(rtol=1e-10, atol=1e-12) if case.config["dtype"] == "float64" else dict(rtol=2e-5, atol=1e-6)
    types_ = LOSS_TYPES[case.config["aggregation"]]
    for lt in types_:
        want_loss, want_grad = expected(case, lt)
        loss, grad = trl_loss_and_grad(case, lt)
        np.testing.assert_allclose(loss, want_loss, err_msg=f"case {name}: TRL loss_type={lt}: loss", **tol)
        np.testing.assert_allclose(grad, want_grad, err_msg=f"case {name}: TRL loss_type={lt}: dloss/dlogp", **tol)
    return types_


def applicable_cases(golden=None):
    return testing.case_names(golden, lambda config, inputs: applicable(config, inputs)
                              or (rloo_applicable(config) and "old_logp" not in inputs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--golden", help="golden folder (rlhf-ref vectors --out DIR); default: generated")
    p.add_argument("--case", action="append", help="only these cases (default: every applicable one)")
    a = p.parse_args(argv)
    names = a.case or applicable_cases(a.golden)
    for n in names:
        case = testing.load_case(n, a.golden)
        cfg = case.config
        if applicable(cfg, case.inputs):
            print(f"ok   {n}: TRL GRPO loss_type {', '.join(check(n, a.golden))}: loss and dloss/dlogp match")
        if rloo_applicable(cfg) and "old_logp" not in case.inputs:
            check_rloo(n, a.golden)
            print(f"ok   {n}: TRL RLOO loss: dloss/dlogp matches")
    print(f"trl GRPOTrainer._compute_loss / RLOOTrainer._compute_loss match {len(names)} golden cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
