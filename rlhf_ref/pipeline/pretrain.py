"""Stage 1 — supervised pretraining of the policy on the corpus; the result is frozen as π_ref.

Minimises the next-token cross-entropy L_sft (``sft.py``, through ``backend.sft_loss_and_grad``)
on batches of corpus lines ``BOS + line + EOS`` drawn with replacement from the stage's seeded
generator, with global-norm clipping and Adam (``optim.py``)::

    g ← clip(∇L_sft, max_norm);  θ ← Adam(θ, g, lr_t),   lr_t = lr · (min_lr_frac + (1 − min_lr_frac)·cos-decay)

The value head exists from the start (the RL stage trains it) and gets zero gradient here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .. import lstm, optim
from ..metrics import MetricsLogger, Progress
from . import common


@dataclass
class PretrainConfig:
    """Supervised pretraining of the policy (π_ref)."""
    embed: int = 32             #: E, the embedding width
    hidden: int = 96            #: H, the LSTM width
    steps: int = 2000           #: optimiser steps
    batch_size: int = 64        #: corpus lines per step
    lr: float = 1e-2            #: Adam learning rate at the start
    min_lr_frac: float = 0.05   #: the cosine schedule ends at lr · min_lr_frac
    max_grad_norm: float = 1.0  #: global-norm clipping threshold
    dtype: str = "float32"      #: parameter dtype: float32 or float64
    eval_every: int = 100       #: held-out cross-entropy every this many steps (0: never)
    ckpt_every: int = 200       #: checkpoint every this many steps (and at the end)
    seed: int = 0               #: seeds initialisation and batch sampling


def cosine_lr(lr, min_lr_frac, step, steps):
    """Cosine decay from lr to lr·min_lr_frac over ``steps`` (step counted from 1)."""
    frac = (step - 1) / max(steps - 1, 1)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def heldout_loss(backend, params, enc, batch=256):
    """Token-mean cross-entropy over every held-out line (nats per token)."""
    tot, n = 0.0, 0.0
    for s in range(0, len(enc), batch):
        tokens, mask = enc.batch(np.arange(s, min(s + batch, len(enc))))
        out, _ = backend.sft_loss_and_grad(params, tokens, mask)
        k = float(out["n_real"]) if "n_real" in out else float(mask[:, 1:].sum())
        tot += float(out["loss"]) * k
        n += k
    return tot / max(n, 1.0)


def pretrain(texts, vocab, cfg=None, *, backend="auto", run_dir=None, heldout_texts=None, resume=True,
             progress="auto", log=print):
    """Pretrain a policy on ``texts``; returns (params, info).

    run_dir   where 'checkpoints/pretrain-<step>.npz/.json' and 'metrics/pretrain.jsonl' go (None: nowhere)
    resume    continue from run_dir's checkpoint when there is one (finished: return it at once)
    """
    cfg = PretrainConfig() if cfg is None else cfg
    be = common.resolve_backend(backend)
    dtype = common.check_dtype(cfg.dtype)
    enc = common.encode_texts(vocab, texts, eos=True)
    enc_ho = common.encode_texts(vocab, heldout_texts, eos=True) if heldout_texts else None

    start, info = 0, {}
    ck = common.find_resume(run_dir, "pretrain", cfg, log) if resume else None
    if ck is not None:
        params, state, rng, start, info = ck["groups"]["policy"], ck["opt_state"], ck["rng"], ck["step"], dict(ck["extra"])
        if ck["done"]:
            log(f"  pretrain: finished checkpoint found ({ck['path']})")
            return params, info
        log(f"  pretrain: resuming from step {start} ({ck['path']})")
    else:
        rng = common.make_rng(cfg.seed, "pretrain")
        params = lstm.init_params(len(vocab), cfg.embed, cfg.hidden, rng, heads=("head", "value"), dtype=dtype)
        state = optim.adam_init(params)
    logger = MetricsLogger(os.path.join(run_dir, "metrics", "pretrain.jsonl"), resume_step=start) if run_dir else None

    bar = Progress(cfg.steps, "pretrain", initial=start, mode=progress)
    t_last = time.perf_counter()
    try:
        for step in range(start + 1, cfg.steps + 1):
            idx = rng.integers(0, len(enc), cfg.batch_size)
            tokens, mask = enc.batch(idx)
            out, grads = be.sft_loss_and_grad(params, tokens, mask)
            grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            lr = cosine_lr(cfg.lr, cfg.min_lr_frac, step, cfg.steps)
            optim.adam_step(params, grads, state, lr=lr)
            now = time.perf_counter()
            row = {"stage": "pretrain", "step": step, "loss": float(out["loss"]), "grad_norm": gnorm, "lr": lr,
                   "tokens_per_s": float(mask.sum()) / max(now - t_last, 1e-9)}
            t_last = now
            if enc_ho is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                row["heldout_loss"] = heldout_loss(be, params, enc_ho)
                info["heldout_loss"] = row["heldout_loss"]
                t_last = time.perf_counter()
            info["final_loss"] = row["loss"]
            if logger:
                logger.log(row)
            bar.update(1, loss=row["loss"], **({"heldout": row["heldout_loss"]} if "heldout_loss" in row else {}))
            if run_dir and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                common.save_and_prune(run_dir, "pretrain", step, done=step == cfg.steps, cfg=cfg, vocab=vocab,
                                      groups={"policy": params}, rng=rng, opt_state=state, extra=info)
    finally:
        bar.close()
        if logger:
            logger.close()
    return params, info
