"""The RL stage on N workers (Ray actors) with the numbers of one process.

Why a sharded run can equal the single-process one: the only randomness of an iteration is the
table of uniforms u (B, T) drawn by the learner from the stage's generator, and a row's rollout
depends only on its prompt, its row of u and the parameters. Every batch statistic is then formed
from the *gathered* per-token arrays, never per shard. One iteration, two phases:

1. (workers) the learner ``ray.put``s the parameters once; worker k receives its rows of the
   prompts and of u (the global width T, so the length limit is the same), samples them with its
   compiled backend's ``rollout`` (which also scores π_ref: ``ref_logp``), scores the finished
   texts with the reward model (``backend.reward_forward``), and runs the policy forward on its
   rows (``model.forward``: logp, entropy, V). It keeps that forward for phase 2 and returns the
   per-token arrays (B_k, T) and per-row rewards.
2. (learner) concatenates the shards in order (B, T) and runs ``reinforce.chain`` — the reference's
   own per-token chain of ``reinforce.loss_and_grad`` — on the whole batch: KL, shaped rewards,
   returns (GAE included), the baseline (batch, group — the group ids are the batch's, so a group
   may span shards — or the critic's), group scaling, whitening, the aggregation weights (token
   counts of the whole batch), the clip ratios against old_logp, the value clip against old_values
   and the four losses, with their per-token upstream gradients d_logp_pg, d_logp_kl, d_ent, d_pred.
   (workers) worker k gets its rows of those upstreams and returns ∂L/∂θ of its rows: with them
   L = Σ_k L_k, so ∇L = Σ_k ∇L_k. (learner) sums the shards' gradients in shard order 0, 1, …,
   clips, takes the Adam step. With ppo_epochs > 1 each later epoch repeats the forward on the
   rows the workers kept (``ShardWorker.forward_again``), then the same step 2, with the same R,
   group, old_logp (the rollout's log-probs) and old_values (epoch 1's critic predictions).

The guarantee (tests/test_distributed.py checks it):

* float64: every per-iteration metric and the final parameters equal the single-process run's
  to rounding (the tests assert relative 1e-9; measured: at most 7e-13 relative after 5
  iterations on 3 workers, and bit-identical on 1 worker with the NumPy backend), for every convention of
  ``ReinforceConfig`` (the qvalue critic and issue 9's included), on any number of workers and any split of the rows
  (a shard with one row, a shard with no action). Not bit-identical: the per-row arithmetic is
  the same, but BLAS may block a (B_k, ·) product differently from a (B, ·) one, the gradient is
  a sum of per-shard sums, and phase 2 runs the NumPy reference where the single process may
  run a compiled backend's fused step — each differs in the last bits only. A sampled token could
  in principle flip where such a difference crosses an inverse-CDF boundary (a uniform within a
  few ulps of a cumulative probability): rare in float64, so the guarantee is stated for float64.
* float32 (and float64): the same run on the same number of workers is bit-identical twice
  (fixed shard split, fixed summation order, no reduction inside Ray).

What runs where: rollout and reward scoring on the worker's compiled backend; the phase-1
forward and the phase-2 backward with the NumPy reference (``model.forward``/``backward``):
the backend interface's ``reinforce_loss_and_grad`` forms its statistics from the rows it is
given, so it cannot give one shard's gradient under the global statistics. ``train_step="learner"``
instead gathers the rollouts and runs the learner's backend ``reinforce_loss_and_grad`` on the
whole batch (phase 2 on one machine; the rollout alone is distributed). On the learner in either
case: the draws (prompts, u), a reward *callable* (on the gathered texts; the reward model runs on
the workers), the reward model's standardisation statistics at the start, clipping and Adam.

Faults: a worker that dies (its process killed, its node lost) is replaced and the whole
iteration is recomputed from the same u (it is a pure function of the parameters and u), up to
``max_restarts`` times per iteration; a worker that raises gives its exception to the caller; a
worker that does not answer within ``timeout`` seconds is a ``TimeoutError``. The learner
checkpoints as the single-process stage does, and resumes the same way.

Ray is imported only here, inside functions: ``import rlhf_ref`` and the rest of the library never
need it (``pip install 'rlhf-ref[ray]'``).
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import model, policy, returns as ret
from ..reinforce import ReinforceConfig, chain, token_logprobs
from ..tokenizer import EOS
from .._validate import as_float_array
from . import common

__all__ = ["shard_sizes", "shard_forward", "global_statistics", "shard_backward", "sum_in_order",
           "two_phase_loss_and_grad", "ShardWorker", "RayExecutor", "RayUnavailable", "require_ray"]


# ---------------------------------------------------------------------------------------------
# the arithmetic of the two phases (pure NumPy; the Ray workers call these)

def shard_sizes(batch_size, workers):
    """Rows per worker: contiguous, as even as possible, earlier shards one row larger (≥ 0 each)."""
    q, r = divmod(int(batch_size), int(workers))
    return [q + (k < r) for k in range(int(workers))]


def shard_forward(params, tokens, mask, prompt_len, cfg):
    """Phase 1 on one shard: the policy forward (reference) → (per-token arrays, state for phase 2).

    Returns {'action_mask', 'logp', 'entropy', 'values', 'pred', 'qbaseline'} (b, T), the same arrays
    ``reinforce.loss_and_grad`` computes for these rows (values: V(s_t), zeros without a value head;
    pred: the critic's prediction at each action, V or Q(s_t, a_t); qbaseline: Σ_a π_ε·Q, zeros for the
    value critic), and the forward's cache."""
    _, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, ("head", cfg.critic))
    am = model.action_mask(mask, prompt_len)
    fwd, cache = model.forward(params, tokens, mask)
    logq = policy.logprobs(fwd["scores"], cfg.alpha, cfg.eps)
    m = am > 0
    values = fwd["values"] if "values" in fwd else np.zeros(am.shape)
    if cfg.critic == "value":
        pred, qb = np.where(m, fwd["values"], 0.0), np.zeros(am.shape)
    else:
        pred = token_logprobs(fwd["qvalues"], tokens, am)                        # Q(s_t, a_t)
        qb = np.sum(np.exp(logq) * fwd["qvalues"], axis=-1)                      # Σ_a π_ε(a|s_t) Q(s_t, a)
    arrays = {"action_mask": am, "logp": token_logprobs(logq, tokens, am),
              "entropy": np.where(m, policy.entropy(logq), 0.0), "values": values, "pred": pred, "qbaseline": qb}
    return arrays, {"cache": cache, "scores": fwd["scores"], "tokens": tokens, "am": am,
                    "qshape": None if "qvalues" not in fwd else fwd["qvalues"].shape}


def global_statistics(am, logp, ref_logp, values, entropy, reward, cfg, pred=None, qbaseline=None, group=None,
                      old_logp=None, old_values=None):
    """The learner's step between the phases, on the gathered (B, T) arrays of every shard.

    ``reinforce.chain`` on the whole batch (the lines of ``reinforce.loss_and_grad``): KL, shaped
    rewards, returns (GAE included), the baseline (batch, group or critic), group scaling, whitening,
    the weights, the four losses and the per-token upstream gradients d_logp_pg, d_logp_kl, d_ent and
    d_pred that phase 2 sends back to each shard's rows. ``group`` (B,), ``old_logp`` and
    ``old_values`` (B, T) are the whole batch's (a group may span shards: its statistics are global).
    ``pred`` defaults to V at the actions (the value critic)."""
    B, T = am.shape
    m = am > 0
    reward = as_float_array(reward, "reward", ndim=1, shape=(B,))
    ref_logp = np.where(m, as_float_array(ref_logp, "ref_logp", shape=(B, T)), 0.0)
    group = ret.check_group(group, am, cfg.baseline, cfg.group_scale)
    if old_logp is not None:
        old_logp = np.where(m, as_float_array(old_logp, "old_logp", shape=(B, T)), 0.0).astype(np.float64)
    if old_values is not None:
        old_values = np.where(m, as_float_array(old_values, "old_values", shape=(B, T)), 0.0).astype(np.float64)
    elif cfg.value_clip > 0:
        raise ValueError(f"value_clip={cfg.value_clip} needs old_values (B, T)")
    if pred is None:
        pred = np.where(m, values, 0.0)
    c = chain(cfg, am, logp, ref_logp, entropy, reward, np.where(m, values, 0.0), pred,
              None if cfg.critic == "value" else qbaseline, group, old_logp, old_values)
    out = {"action_mask": am, "logp": logp, "ref_logp": ref_logp, "entropy": entropy, "values": values}
    out.update(c)
    out["loss"] = c["loss_pg"] + c["loss_ent"] + c["loss_value"] + c["loss_kl"]
    return out


UPSTREAM = ("d_logp_pg", "d_logp_kl", "d_ent", "d_pred")      #: what phase 2 receives per row


def shard_backward(state, up, cfg):
    """Phase 2 on one shard: ∇ of this shard's part of L given its rows of the global upstream
    gradients ``up`` (``UPSTREAM``, each (b, T)), as ``reinforce.loss_and_grad`` backpropagates them."""
    scores, tokens = state["scores"], state["tokens"]
    dz_pg = policy.grad_logprob(scores, tokens, up["d_logp_pg"], cfg.alpha, cfg.eps)
    dz_kl = policy.grad_logprob(scores, tokens, up["d_logp_kl"], cfg.alpha, cfg.eps)
    dz_ent = policy.grad_entropy(scores, up["d_ent"], cfg.alpha, cfg.eps)
    if cfg.critic == "value":
        dcritic = {"dvalues": up["d_pred"]}
    else:
        dq = np.zeros(state["qshape"])
        np.put_along_axis(dq, tokens[:, :, None], up["d_pred"][:, :, None], axis=-1)
        dcritic = {"dqvalues": dq}
    return model.backward(state["cache"], dscores=dz_pg + dz_ent + dz_kl, **dcritic)


def sum_in_order(grads_list):
    """Σ_k grads_k, added in the order given (shard 0 first): a fixed order, so a fixed result."""
    total = {k: np.array(v, copy=True) for k, v in grads_list[0].items()}
    for g in grads_list[1:]:
        for k in total:
            total[k] += g[k]
    return total


def _rows(sizes):
    edges = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def two_phase_loss_and_grad(params, tokens, mask, prompt_len, reward, ref_logp, cfg=None, sizes=(None,), *,
                            group=None, old_logp=None, old_values=None):
    """``reinforce.loss_and_grad`` computed as the workers do, in one process: the rows split into
    contiguous shards of ``sizes`` (default: one shard), phase 1 per shard, the statistics on the
    gathered arrays, phase 2 per shard, the gradients summed in shard order. Returns (out, grads)."""
    cfg = ReinforceConfig() if cfg is None else cfg
    B = np.shape(tokens)[0]
    sizes = [B] if list(sizes) == [None] else [int(s) for s in sizes]
    if sum(sizes) != B or min(sizes) < 0:
        raise ValueError(f"sizes must be ≥ 0 and sum to the batch size {B}, got {sizes}")
    parts, states = [], []
    for sl in _rows(sizes):
        a, s = shard_forward(params, tokens[sl], mask[sl], prompt_len[sl], cfg)
        parts.append(a)
        states.append(s)
    g = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out = global_statistics(g["action_mask"], g["logp"], ref_logp, g["values"], g["entropy"], reward, cfg,
                            pred=g["pred"], qbaseline=g["qbaseline"], group=group, old_logp=old_logp,
                            old_values=old_values)
    grads = [shard_backward(s, {k: out[k][sl] for k in UPSTREAM}, cfg) for s, sl in zip(states, _rows(sizes))]
    return out, sum_in_order(grads)


# ---------------------------------------------------------------------------------------------
# the worker (a Ray actor: RayExecutor wraps this class with ray.remote)

class ShardWorker:
    """One worker: a compiled backend, π_ref and the reward model, and its shard's phase-1 state."""

    def __init__(self, backend_name):
        from .. import backends
        self.be = backends.get(backend_name)
        self.ref = self.rm = self.vocab = self.cfg = None
        self.state = self.batch = None

    def pid(self):
        return os.getpid()

    def setup(self, ref, rm, vocab_json, rcfg_dict):
        """The run's constants (sent once per run; ``ref`` and ``rm`` come from the object store)."""
        from ..tokenizer import Vocab
        self.ref, self.rm = ref, rm
        self.vocab = Vocab.from_json(vocab_json)
        self.cfg = ReinforceConfig(**rcfg_dict)
        return True

    def phase1(self, params, prompts, tokens, prompt_len, u, score, train):
        """Roll out the shard, score it (reward model), run the policy forward. Arrays (b, T)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        if tokens.shape[0] == 0:
            self.state = self.batch = None
            return {"empty": True, "t_compute": 0.0}
        ro = self.be.rollout(params, tokens, prompt_len, u, alpha=cfg.alpha, eps=cfg.eps, kind="boltzmann",
                             eos_id=EOS, ref_params=self.ref)
        res = {k: np.asarray(ro[k]) for k in ("tokens", "mask", "logp", "ref_logp")}
        if score:
            responses = common.decode_responses(self.vocab, ro["tokens"], ro["mask"], prompt_len)
            tk, mk = common.pair_batch(self.vocab, prompts, responses)
            res["rm_raw"] = np.asarray(self.be.reward_forward(self.rm, tk, mk), dtype=np.float64)
        self.batch = (res["tokens"], res["mask"], np.asarray(prompt_len))     # for the next ppo epochs
        if train:
            res.update(self._forward(params))
        res["t_compute"] = time.perf_counter() - t0
        return res

    def _forward(self, params):
        arrays, self.state = shard_forward(params, *self.batch, self.cfg)
        return {"tl_logp": arrays["logp"], "entropy": arrays["entropy"], "values": arrays["values"],
                "pred": arrays["pred"], "qbaseline": arrays["qbaseline"], "action_mask": arrays["action_mask"]}

    def load_batch(self, tokens, mask, prompt_len):
        """A replacement worker's copy of its rows of the current batch (for the next ppo epochs)."""
        self.batch = None if tokens.shape[0] == 0 else (tokens, mask, prompt_len)
        return True

    def forward_again(self, params):
        """Phase 1 of a later ppo epoch: the policy forward of this iteration's rows at ``params``."""
        t0 = time.perf_counter()
        if self.batch is None:
            return {"empty": True, "t_compute": 0.0}
        res = self._forward(params)
        res["t_compute"] = time.perf_counter() - t0
        return res

    def phase2(self, up):
        """This shard's gradient under the global statistics: ``up`` its rows of the upstream
        gradients (``UPSTREAM``; needs this iteration's phase 1)."""
        t0 = time.perf_counter()
        if self.state is None:
            return None, 0.0
        grads = shard_backward(self.state, up, self.cfg)
        self.state = None
        return grads, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the executor the RL stage calls once per iteration

class RayUnavailable(ImportError):
    """Ray is not installed, or the cluster cannot be joined (a user error, not a bug)."""


def require_ray():
    """``import ray``, or a ``RayUnavailable`` (an ImportError) that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(f"--workers needs Ray: pip install 'rlhf-ref[ray]' ({e})") from None
    return ray


class RayExecutor:
    """N ``ShardWorker`` actors on a Ray cluster; ``reinforce_finetune(..., executor=...)`` uses it.

    workers       number of actors (≥ 1)
    address       None: use the Ray connection already open in this process, else start a local
                  cluster on this machine (shut down by ``close``); an address ("ray://host:10001",
                  "host:6379", "auto"): join that cluster (``close`` disconnects).
    backend       backend name each worker resolves ("auto": the worker's own best)
    train_step    "workers" (two phases, above) or "learner" (rollouts on the workers, the training
                  step on the learner's backend with the gathered batch)
    timeout       seconds any ray.get may wait before a TimeoutError
    max_restarts  dead-worker replacements allowed per iteration
    sizes         optional fixed rows per worker (tests: uneven shards); default ``shard_sizes``
    """

    name = "ray"

    def __init__(self, workers, address=None, *, backend="auto", train_step="workers", timeout=600.0,
                 max_restarts=3, sizes=None, num_cpus=None, log=print):
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if train_step not in ("workers", "learner"):
            raise ValueError(f"train_step must be 'workers' or 'learner', got {train_step!r}")
        self.ray = ray = require_ray()
        self.workers, self.backend, self.train_step = int(workers), backend, train_step
        self.timeout, self.max_restarts, self.sizes, self.log = float(timeout), int(max_restarts), sizes, log
        self._owns_cluster = False
        if address:
            try:
                ray.init(address=address, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise RayUnavailable(f"cannot join the Ray cluster at address {address!r}: {e}") from None
            self._owns_cluster = "joined"
        elif not ray.is_initialized():
            ray.init(num_cpus=num_cpus or max(self.workers, os.cpu_count() or 1), include_dashboard=False,
                     logging_level="WARNING", log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": _package_root()}})
            self._owns_cluster = "local"
        self._actor_cls = ray.remote(num_cpus=0, max_restarts=0)(ShardWorker)
        self.actors = [self._new_actor() for _ in range(self.workers)]
        self._setup_args = None
        self.timing, self.history = {}, []     # seconds of the last iteration's parts; every iteration's
        self.on_submit = None          # tests: called as on_submit(executor, phase) after each submission

    # -- actors
    def _new_actor(self):
        return self._actor_cls.remote(self.backend)

    def _get(self, refs):
        try:
            return self.ray.get(refs, timeout=self.timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"a Ray worker gave no answer within {self.timeout:g} s "
                               f"(RayExecutor(timeout=...)); is the cluster overloaded or a worker stuck?") from None

    def pids(self):
        return self._get([a.pid.remote() for a in self.actors])

    def _replace_dead(self):
        """Ping every actor; replace the dead ones (and give them the run's constants)."""
        replaced = []
        for k, a in enumerate(self.actors):
            try:
                self.ray.get(a.pid.remote(), timeout=self.timeout)
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
                self.actors[k] = self._new_actor()
                replaced.append(k)
        if replaced and self._setup_args is not None:
            self._get([self.actors[k].setup.remote(*self._setup_args) for k in replaced])
        return replaced

    # -- the run
    def setup(self, ref, rm, vocab, rcfg):
        """Broadcast the run's constants (π_ref, reward model: one ray.put each)."""
        self._setup_args = (self.ray.put(ref), None if rm is None else self.ray.put(rm), vocab.to_json(),
                            rcfg.to_dict())
        self._get([a.setup.remote(*self._setup_args) for a in self.actors])

    def close(self):
        """Stop the actors; shut down the cluster this executor started (or disconnect from a joined one)."""
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:       # already dead
                pass
        self.actors = []
        self._setup_args = None
        if self._owns_cluster:
            self.ray.shutdown()
            self._owns_cluster = False

    def iteration(self, params, prompts, vocab, rng, max_new, rcfg, score, learner_backend=None, group=None):
        """One iteration's rollout and gradient. Draws u from ``rng`` exactly as
        ``common.generate`` does, then runs the phases (recomputed if a worker dies).

        score(ro) -> (R, raw): the learner's reward (it standardises the workers' ``rm_raw``).
        group (B,) the rows' group ids (sharded with the rows; the statistics are global). The
        sampling log-probs (and, with value_clip > 0, the critic's predictions) become this batch's
        old_logp / old_values, kept with the batch for ``epoch``. Returns (ro, R, raw, out, grads)."""
        self._batch = None
        prompts = list(prompts)
        tokens, pl = common.encode_prompts(vocab, prompts, max_new)
        u = rng.random(tokens.shape)                                       # (B, T), as common.generate
        for attempt in range(self.max_restarts + 1):
            try:
                return self._iteration(params, prompts, vocab, tokens, pl, u, rcfg, score, learner_backend, group)
            except self.ray.exceptions.RayActorError as e:
                if attempt == self.max_restarts:
                    raise RuntimeError(f"Ray workers died {attempt + 1} times in one iteration; giving up ({e})") from e
                replaced = self._replace_dead()
                self.log(f"  ray: worker(s) {replaced} died; replaced, recomputing the iteration")

    def epoch(self, params, rcfg, learner_backend=None):
        """A later ppo epoch on the last ``iteration``'s batch (kept on the workers) at ``params``:
        the forward again, the global statistics with the same R, group, old_logp, old_values, the
        backward. Returns (out, grads)."""
        b = self._batch
        if b is None:
            raise RuntimeError("epoch() needs a batch: call iteration() first")
        if self.train_step != "workers":
            return learner_backend.reinforce_loss_and_grad(params, b["tokens"], b["mask"], b["pl"], b["R"], cfg=rcfg,
                                                           ref_logp=b["ref_logp"], **b["old"])
        for attempt in range(self.max_restarts + 1):
            try:
                p_ref = self.ray.put(params)
                refs = [a.forward_again.remote(p_ref) for a in self.actors]
                if self.on_submit:
                    self.on_submit(self, 3)
                parts = self._get(refs)
                return self._phase2(parts, b["rows"], b["ref_logp"], b["R"], rcfg, b["old"], {})
            except self.ray.exceptions.RayActorError as e:
                if attempt == self.max_restarts:
                    raise RuntimeError(f"Ray workers died {attempt + 1} times in one epoch; giving up ({e})") from e
                replaced = self._replace_dead()
                self._get([self.actors[k].load_batch.remote(b["tokens"][b["rows"][k]], b["mask"][b["rows"][k]],
                                                            b["pl"][b["rows"][k]]) for k in replaced])
                self.log(f"  ray: worker(s) {replaced} died; replaced, recomputing the epoch")

    def _phase2(self, parts, rows, ref_logp, R, rcfg, old, t):
        """Gather phase 1's arrays, the global statistics (``reinforce.chain``), phase 2 on the shards."""
        t1 = time.perf_counter()
        full = [p for p in parts if not p.get("empty")]
        cat = {k: np.concatenate([p[k] for p in full]) for k in ("action_mask", "tl_logp", "values", "entropy",
                                                                 "pred", "qbaseline")}
        if rcfg.value_clip > 0 and old["old_values"] is None:
            old["old_values"] = cat["pred"]                   # phase 1 at the sampling parameters
        out = global_statistics(cat["action_mask"], cat["tl_logp"], ref_logp, cat["values"], cat["entropy"], R, rcfg,
                                pred=cat["pred"], qbaseline=cat["qbaseline"], **old)
        t["learner"] = t.get("learner", 0.0) + time.perf_counter() - t1
        t2 = time.perf_counter()
        refs = [a.phase2.remote({k: out[k][sl] for k in UPSTREAM}) for a, sl in zip(self.actors, rows)]
        if self.on_submit:
            self.on_submit(self, 2)
        res = self._get(refs)
        t["phase2"] = time.perf_counter() - t2
        t["compute2"] = max(r[1] for r in res)
        t3 = time.perf_counter()
        grads = sum_in_order([g for g, _ in res if g is not None])
        t["learner"] += time.perf_counter() - t3
        return out, grads

    def _iteration(self, params, prompts, vocab, tokens, pl, u, rcfg, score, learner_backend, group):
        ray, t = self.ray, {}
        t0 = time.perf_counter()
        B = tokens.shape[0]
        sizes = list(self.sizes) if self.sizes is not None else shard_sizes(B, self.workers)
        if len(sizes) != self.workers or sum(sizes) != B:
            raise ValueError(f"sizes {sizes} must give {self.workers} shards summing to the batch size {B}")
        rows = _rows(sizes)
        p_ref = ray.put(params)                                            # the broadcast: once per iteration
        t["put"] = time.perf_counter() - t0
        rm_on_workers = self._setup_args[1] is not None
        train = self.train_step == "workers"
        refs = [a.phase1.remote(p_ref, prompts[sl], tokens[sl], pl[sl], u[sl], rm_on_workers, train)
                for a, sl in zip(self.actors, rows)]
        if self.on_submit:
            self.on_submit(self, 1)
        parts = self._get(refs)
        t["phase1"] = time.perf_counter() - t0 - t["put"]
        t["compute1"] = max(p["t_compute"] for p in parts)
        t1 = time.perf_counter()
        full = [p for p in parts if not p.get("empty")]
        cat = {k: np.concatenate([p[k] for p in full]) for k in full[0] if k != "t_compute"}
        ro = {"tokens": cat["tokens"], "mask": cat["mask"], "action_mask": model.action_mask(cat["mask"], pl),
              "logp": cat["logp"], "ref_logp": cat["ref_logp"], "prompt_len": pl, "prompts": prompts}
        ro["responses"] = common.decode_responses(vocab, ro["tokens"], ro["mask"], pl)
        ro["eos"] = common.ended_with_eos(ro["tokens"], ro["mask"])
        if rm_on_workers:
            ro["rm_raw"] = cat["rm_raw"]
        R, raw = score(ro)
        old = {"group": group, "old_logp": ro["logp"], "old_values": None}
        if not train:
            if rcfg.value_clip > 0:
                from .rl import sampling_values
                old["old_values"] = sampling_values(params, ro, rcfg)
            out, grads = learner_backend.reinforce_loss_and_grad(params, ro["tokens"], ro["mask"], pl, R,
                                                                 cfg=rcfg, ref_logp=ro["ref_logp"], **old)
            t["learner"] = time.perf_counter() - t1
        else:
            t["learner"] = time.perf_counter() - t1
            out, grads = self._phase2(parts, rows, ro["ref_logp"], R, rcfg, old, t)
        self._batch = {"tokens": ro["tokens"], "mask": ro["mask"], "pl": pl, "R": R, "ref_logp": ro["ref_logp"],
                       "rows": rows, "old": old}
        t["total"] = time.perf_counter() - t0
        self.timing = t
        self.history.append(t)
        return ro, R, raw, out, grads


def _package_root():
    """The folder holding this rlhf_ref package, first on the workers' PYTHONPATH (a local cluster
    imports the same rlhf_ref as the learner, also from a source checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")
