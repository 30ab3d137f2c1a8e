"""Stage 3 — RL fine-tuning with REINFORCE and a KL penalty to the frozen π_ref.

Each iteration (docs/conventions.md §3, ``reinforce.py``):

1. draw a batch of prompts and the uniforms u (B, T) from the stage's one seeded generator, and
   sample responses with ``backend.rollout`` (it also scores them under π_ref: ``ref_logp``);
   with ``group_size`` k > 1 each prompt fills k consecutive rows (B = batch_size·k) and the rows
   of one prompt share a ``group`` id (the group baselines: GRPO, RLOO);
2. score each finished text with the reward — the reward model (``backend.reward_forward`` on
   ``BOS + prompt + response + EOS``, standardised by its mean and spread on π_ref's own samples,
   measured once at the start), or any callable ``reward(prompts, responses) -> (B,)``;
3. ``backend.reinforce_loss_and_grad``: r_t = −β·k_t at every action plus R at the last one,
   returns with discount γ, value-head baseline, optional whitening and entropy bonus;
   L = L_pg + L_ent + L_value, minimised (descent on L is ascent on J − β·KL);
4. clip the global gradient norm and take an Adam step.

Steps 3–4 run ``ppo_epochs`` times on the same sampled batch (PPO's reuse): every epoch passes
``old_logp`` = the sampling log-probs (the rollout's ``logp``) and, when ``value_clip`` > 0,
``old_values`` = the critic's predictions at sampling (V(s_t), or Q(s_t, a_t) for the qvalue
critic), both computed once per batch. Epoch 1's ratio is 1 (old_logp is the same policy). With
surrogate="reinforce" and ppo_epochs > 1 the ratio is not used: plain REINFORCE re-steps on the
stale batch (each epoch's gradient is REINFORCE's at the current parameters — biased off-policy;
allowed, it is what "ppo_epochs" means for that surrogate).

The critic: baseline="qvalue" trains the Q head ('qvalue.weight', 'qvalue.bias'); a policy without
one gets it here, drawn like ``lstm.init_params`` draws heads (U(±1/√H), from its own generator
seeded by ``seed``, so the stage's generator is untouched), and the checkpoints carry it.

The metrics of every iteration: the losses, the mean reward-model reward (raw), the mean *true*
reward when a hidden scorer is given (the simulated annotator's — never used for training),
KL(π‖π_ref) per sequence (k1 summed over each row's actions, averaged over rows), the mean
entropy per action, the response length, the share ending with EOS and tokens/s; with
ppo_epochs > 1 the losses, ratio and gradient norm are the last epoch's; ``loss_kl`` always (0 with
kl_in="reward"); with surrogate="ppo_clip" the mean ratio ``ratio_mean`` and ``clip_frac``, the
share of actions whose ratio lies outside [1 − clip_low, 1 + clip_high].
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, fields

import numpy as np

from .. import lstm, model, optim
from ..reinforce import ReinforceConfig
from ..metrics import MetricsLogger, Progress
from . import common


@dataclass(frozen=True)
class RLConfig(ReinforceConfig):
    """REINFORCE fine-tuning (the RL stage): the objective's conventions are ``ReinforceConfig``'s
    fields (inherited, so every switch of the table in conventions.py reaches ``--set``), plus
    the stage's own settings below."""
    beta: float = 0.2            #: KL coefficient β (per-token penalty −β·k_t; rewards are standardised)
    steps: int = 300             #: iterations (one rollout batch and one update each)
    batch_size: int = 64         #: prompts (episodes) per iteration
    lr: float = 1e-3             #: Adam learning rate
    max_grad_norm: float = 1.0   #: global-norm clipping threshold
    max_new: int = 40            #: response length limit (tokens after the prompt); truncated rows get no bootstrap
    reward_norm: bool = True     #: standardise the reward model's output by its mean/std on π_ref samples
    norm_samples: int = 256      #: π_ref samples used for those statistics
    dtype: str = "float32"       #: parameter dtype
    ckpt_every: int = 20         #: checkpoint every this many iterations (and at the end)
    seed: int = 0                #: seeds prompts and sampling
    group_size: int = 1          #: k ≥ 1 samples of each prompt (consecutive rows, one group id; B = batch_size·k)
    ppo_epochs: int = 1          #: updates on each sampled batch (old_logp/old_values from the sampling)

    def __post_init__(self):
        super().__post_init__()
        for name in ("group_size", "ppo_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.baseline in ("group_mean", "group_loo") and self.group_size < 2:
            raise ValueError(f"baseline={self.baseline!r} needs group_size >= 2 (several samples of each prompt), "
                             f"got group_size={self.group_size}")

    @property
    def rows(self):
        """Rows of one iteration's batch: batch_size prompts, each sampled group_size times."""
        return self.batch_size * self.group_size

    def reinforce_config(self):
        """The objective's conventions as a ``ReinforceConfig`` (the stage's own fields dropped)."""
        return ReinforceConfig(**{f.name: getattr(self, f.name) for f in fields(ReinforceConfig)})


def init_qvalue_head(params, seed):
    """A Q head ('qvalue.weight' (V, H), 'qvalue.bias' (V,)) for ``params``, drawn as ``lstm.init_params``
    draws a head (U(−1/√H, 1/√H)) from a generator of its own, seeded by ``seed``."""
    V, _, H = lstm.check_model(params, ("head",))
    rng = common.make_rng(seed, "rl-qvalue")
    k = 1.0 / np.sqrt(H)
    dt = params["head.weight"].dtype
    return {"qvalue.weight": rng.uniform(-k, k, size=(V, H)).astype(dt),
            "qvalue.bias": rng.uniform(-k, k, size=V).astype(dt)}


def sampling_values(params, ro, rcfg):
    """The critic's predictions (B, T) on the sampled batch at the sampling parameters (old_values):
    V(s_t), or Q(s_t, a_t) for the qvalue critic; 0 off the action mask."""
    fwd, _ = model.forward(params, ro["tokens"], ro["mask"])
    am = model.action_mask(ro["mask"], ro["prompt_len"]) > 0
    if rcfg.critic == "value":
        return np.where(am, fwd["values"], 0.0)
    q = np.take_along_axis(fwd["qvalues"], ro["tokens"][:, :, None], axis=-1)[:, :, 0]
    return np.where(am, q, 0.0)


def fingerprint(params):
    """A short hash of a parameter dict (to refuse resuming against different inputs)."""
    h = hashlib.sha256()
    for k in sorted(params):
        a = np.ascontiguousarray(params[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class RewardModelReward:
    """The reward model as a reward function: r(BOS + prompt + response + EOS), standardised."""

    def __init__(self, backend, rm_params, vocab, mean=0.0, std=1.0):
        self.backend, self.rm, self.vocab = backend, rm_params, vocab
        self.mean, self.std = float(mean), float(std)

    def raw(self, prompts, responses):
        tokens, mask = common.pair_batch(self.vocab, prompts, responses)
        return np.asarray(self.backend.reward_forward(self.rm, tokens, mask), dtype=np.float64)

    def __call__(self, prompts, responses):
        return (self.raw(prompts, responses) - self.mean) / self.std


def reinforce_finetune(ref_params, vocab, prompts, reward, cfg=None, *, true_reward=None, backend="auto",
                       run_dir=None, resume=True, progress="auto", log=print, init_params=None,
                       workers=0, address=None, train_step="workers", executor=None):
    """Fine-tune a copy of π_ref (``ref_params``, with its value head) on ``prompts``.

    reward       reward-model parameters (a dict with 'reward.weight') or a callable
                 reward(prompts, responses) -> (B,) — a human's scores, a rule, anything
    true_reward  optional callable(prompts, responses) -> (B,), logged only (never trained on)
    workers      0: this process; N ≥ 1: N Ray workers (``pipeline.distributed``: the same
                 numbers to rounding), on a local cluster or, with ``address``, an existing one;
                 train_step "workers" (two phases) or "learner" (only the rollouts distributed)
    executor     a ``distributed.RayExecutor`` to use instead (kept open afterwards)
    Returns (params, info).
    """
    cfg = RLConfig() if cfg is None else cfg
    rcfg = cfg.reinforce_config()
    be = common.resolve_backend(backend)
    dtype = common.check_dtype(cfg.dtype)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to fine-tune on")
    ref = common.cast_params(common.policy_part(ref_params), dtype)

    if isinstance(reward, dict):
        rm = common.cast_params(reward, dtype)
        reward_fn = RewardModelReward(be, rm, vocab)
        inputs = {"ref": fingerprint(ref), "rm": fingerprint(rm)}
    elif callable(reward):
        reward_fn, rm = reward, None
        inputs = {"ref": fingerprint(ref)}
    else:
        raise TypeError(f"reward must be reward-model params (a dict) or a callable, got {type(reward).__name__}")

    start, info = 0, {}
    ck = common.find_resume(run_dir, "rl", cfg, log) if resume else None
    if ck is not None:
        if ck["extra"].get("inputs") != inputs:
            raise ValueError(f"{ck['path']} was trained against a different π_ref or reward model "
                             f"({ck['extra'].get('inputs')} vs {inputs}); start a fresh run folder")
        params, state, rng, start, info = ck["groups"]["policy"], ck["opt_state"], ck["rng"], ck["step"], dict(ck["extra"])
        if rm is not None:
            reward_fn.mean, reward_fn.std = info["reward_mean"], info["reward_std"]
        if ck["done"]:
            log(f"  RL: finished checkpoint found ({ck['path']})")
            return params, info
        log(f"  RL: resuming from iteration {start} ({ck['path']})")
    else:
        rng = common.make_rng(cfg.seed, "rl")
        params = common.cast_params(ref_params if init_params is None else init_params, dtype)
        if rcfg.critic == "value" and "value.weight" not in params:
            raise ValueError("the policy needs a value head ('value.weight', 'value.bias') for the value baseline")
        if rcfg.critic == "qvalue" and "qvalue.weight" not in params:
            params.update(init_qvalue_head(params, cfg.seed))
        state = optim.adam_init(params)
        info = {"inputs": inputs}
        if rm is not None:
            # reward statistics on π_ref's own samples: R = (r − mean)/std has mean 0, spread 1 at the start
            mean, std = 0.0, 1.0
            if cfg.reward_norm:
                idx = rng.integers(0, len(prompts), cfg.norm_samples)
                ro = common.generate(be, ref, vocab, [prompts[i] for i in idx], rng, cfg.max_new, cfg.alpha, cfg.eps)
                r = reward_fn.raw(ro["prompts"], ro["responses"])
                mean, std = float(r.mean()), float(r.std() + 1e-6)
            reward_fn.mean, reward_fn.std = mean, std
            info.update(reward_mean=mean, reward_std=std)
    own_executor = executor is None and int(workers) > 0
    if own_executor:
        from .distributed import RayExecutor
        executor = RayExecutor(int(workers), address, backend=common.backend_name(be), train_step=train_step, log=log)
    if executor is not None:
        try:
            executor.setup(ref, rm, vocab, rcfg)
        except BaseException:
            if own_executor:
                executor.close()
            raise
    info.update(executor="ray" if executor is not None else "local",
                workers=executor.workers if executor is not None else 0)
    logger = MetricsLogger(os.path.join(run_dir, "metrics", "rl.jsonl"), resume_step=start) if run_dir else None

    def score(ro):
        """(R, raw) of a rollout: the standardised reward-model score, or the reward callable's."""
        if rm is not None:
            raw = ro["rm_raw"] if "rm_raw" in ro else reward_fn.raw(ro["prompts"], ro["responses"])
            R = (raw - reward_fn.mean) / reward_fn.std
        else:
            R = raw = np.asarray(reward_fn(ro["prompts"], ro["responses"]), dtype=np.float64)
        if R.shape != (cfg.rows,) or not np.all(np.isfinite(R)):
            raise ValueError(f"the reward must return {cfg.rows} finite numbers, got shape {R.shape}")
        return R, raw

    bar = Progress(cfg.steps, "RL (REINFORCE)", initial=start, mode=progress)
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            idx = np.repeat(rng.integers(0, len(prompts), cfg.batch_size), cfg.group_size)   # k rows per prompt
            group = np.repeat(np.arange(cfg.batch_size, dtype=np.int64), cfg.group_size)
            rows = [prompts[i] for i in idx]
            for epoch in range(cfg.ppo_epochs):
                if executor is None:
                    if epoch == 0:
                        ro = common.generate(be, params, vocab, rows, rng, cfg.max_new, cfg.alpha, cfg.eps,
                                             ref_params=ref)
                        R, raw = score(ro)
                        old = {"group": group, "old_logp": ro["logp"],
                               "old_values": sampling_values(params, ro, rcfg) if rcfg.value_clip > 0 else None}
                    out, grads = be.reinforce_loss_and_grad(params, ro["tokens"], ro["mask"], ro["prompt_len"], R,
                                                            cfg=rcfg, ref_logp=ro["ref_logp"], **old)
                elif epoch == 0:    # the same draws from rng, the rollout and the gradient on the workers
                    ro, R, raw, out, grads = executor.iteration(params, rows, vocab, rng, cfg.max_new, rcfg, score,
                                                                learner_backend=be, group=group)
                else:               # the workers' stored rollout, the current parameters
                    out, grads = executor.epoch(params, rcfg, learner_backend=be)
                grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                optim.adam_step(params, grads, state, lr=cfg.lr)
            am = out["action_mask"] > 0
            n_act = int(am.sum())
            dt = time.perf_counter() - t0
            row = {"stage": "rl", "step": step, "loss": float(out["loss"]), "loss_pg": float(out["loss_pg"]),
                   "loss_value": float(out["loss_value"]), "loss_ent": float(out["loss_ent"]),
                   "loss_kl": float(out["loss_kl"]),
                   "reward": float(R.mean()),
                   "rm_reward": float(raw.mean()),
                   "kl_per_sequence": float(np.sum(np.where(am, ro["logp"] - ro["ref_logp"], 0.0))) / cfg.rows,
                   "entropy": float(np.sum(np.where(am, out["entropy"], 0.0)) / max(n_act, 1)),
                   "response_len": n_act / cfg.rows, "eos_rate": float(np.mean(ro["eos"])),
                   "grad_norm": gnorm, "tokens_per_s": n_act / max(dt, 1e-9),
                   "executor": info["executor"], "workers": info["workers"]}
            if rcfg.surrogate == "ppo_clip":
                ratio = np.asarray(out["ratio"], dtype=np.float64)[am]
                row["ratio_mean"] = float(ratio.mean())
                row["clip_frac"] = float(np.mean((ratio < 1.0 - rcfg.clip_low) | (ratio > 1.0 + rcfg.clip_high)))
            if true_reward is not None:
                row["true_reward"] = float(np.mean(true_reward(ro["prompts"], ro["responses"])))
            if logger:
                logger.log(row)
            bar.update(1, rm=row["rm_reward"], **({"true": row["true_reward"]} if "true_reward" in row else {}),
                       kl=row["kl_per_sequence"])
            last = step == cfg.steps
            if run_dir and (step % cfg.ckpt_every == 0 or last):
                common.save_and_prune(run_dir, "rl", step, done=last, cfg=cfg, vocab=vocab,
                                      groups={"policy": params}, rng=rng, opt_state=state, extra=info)
    finally:
        bar.close()
        if logger:
            logger.close()
        if own_executor:
            executor.close()
    return params, info
