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
2. (learner) concatenates the shards in order (B, T) and forms, with the reference's own
   functions on the whole batch, KL, shaped rewards, returns, the baseline (``mean``/``loo`` over
   all rows), the whitening mean and variance (population or Bessel, over all actions), the
   aggregation weights (token counts N and n_rows of the whole batch) and the three losses —
   exactly the code of ``reinforce.loss_and_grad``. (workers) worker k gets its rows of the
   advantages A, returns G and weights w, and returns ∂L/∂θ of its rows: with those constants
   L = Σ_k L_k, so ∇L = Σ_k ∇L_k. (learner) sums the shards' gradients in shard order 0, 1, …,
   clips, takes the Adam step.

The guarantee (tests/test_distributed.py checks it):

* float64: every per-iteration metric and the final parameters equal the single-process run's
  to rounding (the tests assert relative 1e-9; measured: at most 7e-13 relative after 5
  iterations on 3 workers, and bit-identical on 1 worker with the NumPy backend), for every convention of
  ``ReinforceConfig`` the RL stage supports, on any number of workers and any split of the rows
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
from ..reinforce import ReinforceConfig, aggregation_weights, token_logprobs
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

    Returns {'action_mask', 'logp', 'entropy', 'values'} (b, T), the same arrays
    ``reinforce.loss_and_grad`` computes for these rows, and the forward's cache."""
    _, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, ("head", cfg.critic))
    am = model.action_mask(mask, prompt_len)
    fwd, cache = model.forward(params, tokens, mask)
    logq = policy.logprobs(fwd["scores"], cfg.alpha, cfg.eps)
    arrays = {"action_mask": am, "logp": token_logprobs(logq, tokens, am),
              "entropy": np.where(am > 0, policy.entropy(logq), 0.0), "values": fwd["values"]}
    return arrays, {"cache": cache, "scores": fwd["scores"], "tokens": tokens, "am": am, "values": fwd["values"]}


def global_statistics(am, logp, ref_logp, values, entropy, reward, cfg):
    """The learner's step between the phases, on the gathered (B, T) arrays of every shard.

    The same lines as ``reinforce.loss_and_grad``: KL, shaped rewards, returns, baseline,
    (whitened) advantages and weights over the whole batch, and the three losses."""
    B, T = am.shape
    if (cfg.kl_in != "reward" or cfg.returns == "gae" or cfg.baseline in ret.GROUP_BASELINES or cfg.surrogate != "reinforce"
            or cfg.value_clip > 0 or cfg.aggregation == "fixed_len"):       # issue 9's conventions: not here
        raise ValueError("the distributed RL stage (--workers) computes kl_in='reward', returns rtg/total, the "
                         "batch baselines, surrogate='reinforce', value_clip=0 and token_mean/seq_mean/seq_sum "
                         "only: run without --workers for the other conventions")
    reward = as_float_array(reward, "reward", ndim=1, shape=(B,))
    ref_logp = np.where(am > 0, as_float_array(ref_logp, "ref_logp", shape=(B, T)), 0.0)
    w = aggregation_weights(am, cfg.aggregation)
    kl = ret.kl_per_token(logp, ref_logp, am, cfg.kl)
    rewards = ret.shaped_rewards(kl, reward, am, cfg.beta)
    G = ret.discounted_returns(rewards, am, cfg.gamma, cfg.returns)
    b = ret.baseline(cfg.baseline, G, am, values=values)
    adv = ret.whiten(np.where(am > 0, G - b, 0.0), am, cfg.whiten, cfg.shift_mean)
    pred = np.where(am > 0, values, 0.0)
    loss_pg = -np.sum(w * adv * logp)
    loss_ent = -cfg.entropy_coef * np.sum(w * entropy)
    loss_value = cfg.value_coef * 0.5 * np.sum(w * (pred - G) ** 2)
    return {"action_mask": am, "logp": logp, "ref_logp": ref_logp, "entropy": entropy, "kl": kl,
            "rewards": rewards, "returns": G, "values": values, "baseline": b, "advantages": adv, "weights": w,
            "loss_pg": loss_pg, "loss_ent": loss_ent, "loss_value": loss_value,
            "loss": loss_pg + loss_ent + loss_value}


def shard_backward(state, advantages, returns, weights, cfg):
    """Phase 2 on one shard: ∇ of this shard's part of L given the global A, G and w (b, T)."""
    am, scores, tokens = state["am"], state["scores"], state["tokens"]
    w, adv, G = weights, advantages, returns
    d_logp = -w * adv                                                            # ∂L_pg/∂logp
    dz_pg = policy.grad_logprob(scores, tokens, d_logp, cfg.alpha, cfg.eps)
    dz_ent = policy.grad_entropy(scores, -cfg.entropy_coef * w, cfg.alpha, cfg.eps)
    pred = np.where(am > 0, state["values"], 0.0)
    d_pred = cfg.value_coef * w * (pred - G)                                     # ∂L_value/∂V
    return model.backward(state["cache"], dscores=dz_pg + dz_ent, dvalues=d_pred)


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


def two_phase_loss_and_grad(params, tokens, mask, prompt_len, reward, ref_logp, cfg=None, sizes=(None,)):
    """``reinforce.loss_and_grad`` computed as the workers do, in one process: the rows split into
    contiguous shards of ``sizes`` (default: one shard), phase 1 per shard, the statistics on the
    gathered arrays, phase 2 per shard, the gradients summed in shard order. Returns (out, grads)."""
    cfg = ReinforceConfig() if cfg is None else cfg
    if cfg.critic != "value":
        raise ValueError("the distributed step supports the value critic only (baseline='qvalue' is not supported)")
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
    out = global_statistics(g["action_mask"], g["logp"], ref_logp, g["values"], g["entropy"], reward, cfg)
    grads = [shard_backward(s, out["advantages"][sl], out["returns"][sl], out["weights"][sl], cfg)
             for s, sl in zip(states, _rows(sizes))]
    return out, sum_in_order(grads)


# ---------------------------------------------------------------------------------------------
# the worker (a Ray actor: RayExecutor wraps this class with ray.remote)

class ShardWorker:
    """One worker: a compiled backend, π_ref and the reward model, and its shard's phase-1 state."""

    def __init__(self, backend_name):
        from .. import backends
        self.be = backends.get(backend_name)
        self.ref = self.rm = self.vocab = self.cfg = None
        self.state = None

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
            self.state = None
            return {"empty": True, "t_compute": 0.0}
        ro = self.be.rollout(params, tokens, prompt_len, u, alpha=cfg.alpha, eps=cfg.eps, kind="boltzmann",
                             eos_id=EOS, ref_params=self.ref)
        res = {k: np.asarray(ro[k]) for k in ("tokens", "mask", "logp", "ref_logp")}
        if score:
            responses = common.decode_responses(self.vocab, ro["tokens"], ro["mask"], prompt_len)
            tk, mk = common.pair_batch(self.vocab, prompts, responses)
            res["rm_raw"] = np.asarray(self.be.reward_forward(self.rm, tk, mk), dtype=np.float64)
        if train:
            arrays, self.state = shard_forward(params, ro["tokens"], ro["mask"], prompt_len, cfg)
            res.update(tl_logp=arrays["logp"], entropy=arrays["entropy"], values=arrays["values"],
                       action_mask=arrays["action_mask"])
        res["t_compute"] = time.perf_counter() - t0
        return res

    def phase2(self, advantages, returns, weights):
        """This shard's gradient under the global statistics (needs this iteration's phase 1)."""
        t0 = time.perf_counter()
        if self.state is None:
            return None, 0.0
        grads = shard_backward(self.state, advantages, returns, weights, self.cfg)
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

    def iteration(self, params, prompts, vocab, rng, max_new, rcfg, score, learner_backend=None):
        """One iteration's rollout and gradient. Draws u from ``rng`` exactly as
        ``common.generate`` does, then runs the phases (recomputed if a worker dies).

        score(ro) -> (R, raw): the learner's reward (it standardises the workers' ``rm_raw``).
        Returns (ro, R, raw, out, grads)."""
        prompts = list(prompts)
        tokens, pl = common.encode_prompts(vocab, prompts, max_new)
        u = rng.random(tokens.shape)                                       # (B, T), as common.generate
        for attempt in range(self.max_restarts + 1):
            try:
                return self._iteration(params, prompts, vocab, tokens, pl, u, rcfg, score, learner_backend)
            except self.ray.exceptions.RayActorError as e:
                if attempt == self.max_restarts:
                    raise RuntimeError(f"Ray workers died {attempt + 1} times in one iteration; giving up ({e})") from e
                replaced = self._replace_dead()
                self.log(f"  ray: worker(s) {replaced} died; replaced, recomputing the iteration")

    def _iteration(self, params, prompts, vocab, tokens, pl, u, rcfg, score, learner_backend):
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
        if not train:
            out, grads = learner_backend.reinforce_loss_and_grad(params, ro["tokens"], ro["mask"], pl, R,
                                                                 cfg=rcfg, ref_logp=ro["ref_logp"])
            t["learner"] = time.perf_counter() - t1
            t["total"] = time.perf_counter() - t0
            self.timing = t
            self.history.append(t)
            return ro, R, raw, out, grads
        out = global_statistics(cat["action_mask"], cat["tl_logp"], cat["ref_logp"], cat["values"],
                                cat["entropy"], R, rcfg)
        t["learner"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        refs = [a.phase2.remote(out["advantages"][sl], out["returns"][sl], out["weights"][sl])
                for a, sl in zip(self.actors, rows)]
        if self.on_submit:
            self.on_submit(self, 2)
        res = self._get(refs)
        t["phase2"] = time.perf_counter() - t2
        t["compute2"] = max(r[1] for r in res)
        t3 = time.perf_counter()
        grads = sum_in_order([g for g, _ in res if g is not None])
        t["learner"] += time.perf_counter() - t3
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
