"""Stage 2 — preferences and the reward model.

``collect_preferences`` samples two responses of π_ref to each prompt (``backend.rollout``) and
asks a judge which it prefers (the simulated annotator: Bradley–Terry noise around its hidden
true reward; or a person through ``rlhf-ref label``, whose JSON Lines file loads the same way).

``train_reward_model`` fits the reward model r(x) — embedding, LSTM, a scalar head read at the
last real token — to preference pairs with the Bradley–Terry loss (``reward_model.py``, through
``backend.bt_loss_and_grad``)::

    L_RM = mean over pairs of logaddexp(0, −(r(prompt+chosen) − r(prompt+rejected) − margin))

minimised with global-norm clipping and Adam. Its body starts from the pretrained policy's
(``init_from_policy``: it already reads the corpus), its head from zero. It reports the pairwise
accuracy on held-out pairs (never trained on): the share of held-out pairs whose recorded
judgement it reproduces, r(chosen) > r(rejected).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .. import lstm, optim
from ..metrics import MetricsLogger, Progress
from . import common
from .pretrain import cosine_lr


@dataclass
class RewardConfig:
    """Preference collection and reward-model training."""
    n_pairs: int = 16000         #: preference pairs to collect (simulated annotator)
    heldout_frac: float = 0.2    #: share of pairs held out to measure accuracy
    max_new: int = 40            #: response length limit when sampling pairs from π_ref
    steps: int = 600             #: optimiser steps
    batch_size: int = 128        #: pairs per step
    lr: float = 2e-3             #: Adam learning rate at the start
    min_lr_frac: float = 0.1     #: the cosine schedule ends at lr · min_lr_frac
    max_grad_norm: float = 1.0   #: global-norm clipping threshold
    init_from_policy: bool = True  #: start embedding and LSTM from π_ref (else a fresh network)
    embed: int = 32              #: E when not initialised from the policy
    hidden: int = 64             #: H when not initialised from the policy
    dtype: str = "float32"       #: parameter dtype
    eval_every: int = 100        #: held-out accuracy every this many steps (0: only at the end)
    ckpt_every: int = 100        #: checkpoint every this many steps (and at the end)
    seed: int = 0                #: seeds the split, initialisation and batches


# ---------------------------------------------------------------------------------------------
# preferences

def collect_preferences(backend, ref_params, vocab, prompts, judge, n_pairs, rng, max_new=40, alpha=1.0,
                        eps=0.0, batch=256):
    """Sample two π_ref responses per prompt and record the judge's preference.

    prompts  a list of prompt strings, cycled through in an order drawn from ``rng``
    judge    judge(prompt, response_a, response_b) -> 1 (a preferred), -1 (b preferred) or 0 (tie: skipped)
    Returns a list of records {'prompt', 'chosen', 'rejected'} (the JSON Lines preference format).
    """
    records = []
    order = rng.permutation(len(prompts))
    k = 0
    while len(records) < n_pairs:
        take = [prompts[order[(k + i) % len(prompts)]] for i in range(batch)]
        k += batch
        a = common.generate(backend, ref_params, vocab, take, rng, max_new, alpha, eps)["responses"]
        b = common.generate(backend, ref_params, vocab, take, rng, max_new, alpha, eps)["responses"]
        for p, ra, rb in zip(take, a, b):
            if ra == rb:
                continue
            v = judge(p, ra, rb)
            if v > 0:
                records.append({"prompt": p, "chosen": ra, "rejected": rb})
            elif v < 0:
                records.append({"prompt": p, "chosen": rb, "rejected": ra})
            if len(records) == n_pairs:
                break
        if k > 50 * max(n_pairs, 1) + len(prompts):
            raise RuntimeError(f"collected only {len(records)} of {n_pairs} pairs: the judge calls (nearly) everything a tie")
    return records


def split_pairs(records, heldout_frac, rng):
    """(train, heldout) lists, split at random by the stage's generator."""
    idx = rng.permutation(len(records))
    n_ho = int(round(heldout_frac * len(records)))
    if len(records) - n_ho < 1:
        raise ValueError(f"need at least one training pair, got {len(records)} pairs with heldout_frac={heldout_frac}")
    return [records[i] for i in idx[n_ho:]], [records[i] for i in idx[:n_ho]]


def as_preferences(records):
    """Records as ``rlhf_ref.preferences.Preference`` objects (dicts are validated), ties refused."""
    from ..preferences import Preference, preference_from_dict
    out = []
    for i, r in enumerate(records):
        p = r if isinstance(r, Preference) else preference_from_dict(r)
        if p.tie:
            raise ValueError(f"preference record {i} is a tie: ties carry no Bradley–Terry information; drop them")
        out.append(p)
    return out


class EncodedPairs:
    """Chosen and rejected texts (BOS + prompt + response + EOS), padded once, with the margins."""

    def __init__(self, vocab, records):
        recs = as_preferences(records)
        self.chosen = common.encode_texts(vocab, [r.prompt + r.chosen for r in recs], errors="replace")
        self.rejected = common.encode_texts(vocab, [r.prompt + r.rejected for r in recs], errors="replace")
        self.margin = np.array([r.margin or 0.0 for r in recs])

    def __len__(self):
        return len(self.margin)


def pair_accuracy(backend, rm_params, pairs, batch=512):
    """Share of pairs with r(chosen) > r(rejected) (ties count half), and the mean reward gap."""
    hit, gap = 0.0, 0.0
    for s in range(0, len(pairs), batch):
        idx = np.arange(s, min(s + batch, len(pairs)))
        rc = backend.reward_forward(rm_params, *pairs.chosen.batch(idx))
        rr = backend.reward_forward(rm_params, *pairs.rejected.batch(idx))
        hit += float(np.sum(rc > rr) + 0.5 * np.sum(rc == rr))
        gap += float(np.sum(rc - rr))
    return hit / len(pairs), gap / len(pairs)


def rm_init(ref_params, vocab, cfg, rng, dtype):
    """Reward-model parameters: the policy's body (or fresh) and a zero scalar head."""
    if cfg.init_from_policy:
        V, E, H = lstm.dims(ref_params)
        rm = {k: np.array(ref_params[k], dtype=dtype) for k in lstm.BODY_KEYS}
    else:
        rm = lstm.init_params(len(vocab), cfg.embed, cfg.hidden, rng, heads=(), dtype=dtype)
        H = cfg.hidden
    rm["reward.weight"] = np.zeros((1, H), dtype)
    rm["reward.bias"] = np.zeros((1,), dtype)
    return rm


# ---------------------------------------------------------------------------------------------
# training

def train_reward_model(train_records, heldout_records, vocab, cfg=None, *, ref_params=None, backend="auto",
                       run_dir=None, resume=True, progress="auto", log=print):
    """Fit the reward model to preference records; returns (rm_params, info with 'heldout_accuracy')."""
    cfg = RewardConfig() if cfg is None else cfg
    be = common.resolve_backend(backend)
    dtype = common.check_dtype(cfg.dtype)
    if not train_records:
        raise ValueError("no training preference pairs")
    if cfg.init_from_policy and ref_params is None:
        raise ValueError("init_from_policy=True needs ref_params (the pretrained policy)")
    train = EncodedPairs(vocab, train_records)
    held = EncodedPairs(vocab, heldout_records) if heldout_records else None

    start, info = 0, {}
    ck = common.find_resume(run_dir, "reward", cfg, log) if resume else None
    if ck is not None:
        rm, state, rng, start, info = ck["groups"]["rm"], ck["opt_state"], ck["rng"], ck["step"], dict(ck["extra"])
        if ck["done"]:
            log(f"  reward model: finished checkpoint found ({ck['path']})")
            return rm, info
        log(f"  reward model: resuming from step {start} ({ck['path']})")
    else:
        rng = common.make_rng(cfg.seed, "reward")
        rm = rm_init(ref_params, vocab, cfg, rng, dtype)
        state = optim.adam_init(rm)
    logger = MetricsLogger(os.path.join(run_dir, "metrics", "reward.jsonl"), resume_step=start) if run_dir else None

    bar = Progress(cfg.steps, "reward model", initial=start, mode=progress)
    t_last = time.perf_counter()
    try:
        for step in range(start + 1, cfg.steps + 1):
            idx = rng.integers(0, len(train), cfg.batch_size)
            c_tok, c_mask = train.chosen.batch(idx)
            r_tok, r_mask = train.rejected.batch(idx)
            margin = train.margin[idx] if np.any(train.margin[idx]) else None
            out, grads = be.bt_loss_and_grad(rm, c_tok, c_mask, r_tok, r_mask, margin=margin)
            grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            optim.adam_step(rm, grads, state, lr=cosine_lr(cfg.lr, cfg.min_lr_frac, step, cfg.steps))
            now = time.perf_counter()
            row = {"stage": "reward", "step": step, "loss": float(out["loss"]), "accuracy": float(out["accuracy"]),
                   "grad_norm": gnorm,
                   "tokens_per_s": float(c_mask.sum() + r_mask.sum()) / max(now - t_last, 1e-9)}
            last = step == cfg.steps
            if held is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                acc, gap = pair_accuracy(be, rm, held)
                row["heldout_accuracy"], row["heldout_gap"] = acc, gap
                info["heldout_accuracy"] = acc
            t_last = time.perf_counter()
            if logger:
                logger.log(row)
            bar.update(1, loss=row["loss"], **({"heldout_acc": row["heldout_accuracy"]}
                                               if "heldout_accuracy" in row else {}))
            if run_dir and (step % cfg.ckpt_every == 0 or last):
                info.update(n_train=len(train), n_heldout=0 if held is None else len(held), final_loss=row["loss"])
                common.save_and_prune(run_dir, "reward", step, done=last, cfg=cfg, vocab=vocab,
                                      groups={"rm": rm}, rng=rng, opt_state=state, extra=info)
    finally:
        bar.close()
        if logger:
            logger.close()
    info.setdefault("n_train", len(train))
    info.setdefault("n_heldout", 0 if held is None else len(held))
    return rm, info
