"""REINFORCE with a KL penalty to a frozen reference policy: the readable reference objective.

Written to be MINIMISED; descent on L is ascent on the expected return J (docs/conventions.md §3).
The founding article writes θ ← θ − η·∇logP·Σγᵗ R_t, which *descends* the return: a sign
slip. Here θ ← θ − η·∇L with L = L_pg + L_ent + L_value + L_kl, and

    L_pg    = −Σ_{b,t} w_{b,t} · A_{b,t} · log π_θ(a_t|s_t)          surrogate="reinforce"
            =  Σ w · −min(ρ_t·A_t, clip(ρ_t, 1 − clip_low, 1 + clip_high)·A_t)   "ppo_clip"
              with ρ_t = exp(log π_θ − old_logp) (old_logp defaults to log π_θ itself, detached: ρ = 1);
              ∂/∂log π = −w·A·ρ where the unclipped branch is the min (ties: unclipped), else 0
    L_ent   = −c_H · Σ w · H(π_ε(·|s_t))
    L_value = c_V · ½ · Σ w · (V(s_t) − G_t)²           (Q(s_t, a_t) for the qvalue critic)
            = c_V · ½ · Σ w · max((V − G)², (V_clip − G)²),  V_clip = V_old + clip(V − V_old, −c, c)
              when value_clip = c > 0 (old_values = V_old)
    L_kl    = β · Σ w · k(log π_θ − log π_ref)   kl_in="loss" (GRPO's placement; the rewards then get
              no −β·k); differentiated through log π_θ: ∂/∂log π = β·w·k'(x). 0 with kl_in="reward".

with aggregation weights w (B, T) on the action mask m, N = Σ m, rows with an action n_rows:

    token_mean   w = m / N
    seq_mean     w = m / (n_b · n_rows)      each row's token mean, averaged over rows
    seq_sum      w = m / n_rows              the only one unbiased when lengths vary
    fixed_len    w = m / (B · L)             L = norm_len if > 0, else T (Dr. GRPO)

Held constant (no gradient): A, G, the baselines, group statistics, whitening statistics, R,
β·k in the reward, old_logp, old_values. Entropy is not held constant. The value of L_pg is not
a measure of performance.

Exactness (tests/test_exact.py): with surrogate="ppo_clip" and old_logp = log π_θ (ρ = 1) the
gradient is REINFORCE's for any A (both branches tie, the unclipped one is taken), so every
unbiasedness statement of exact.py carries over to it.

    loss_and_grad(params, tokens, mask, prompt_len, reward, cfg, ref_params=...) -> out, grads

``out`` holds every intermediate in data-flow order (the golden vectors store the same names).
"""

from __future__ import annotations

from dataclasses import dataclass, asdict

import numpy as np

from . import conventions, lstm, model, policy, returns as ret
from ._validate import as_float_array, check_choice, check_finite_result, check_range

AGGREGATIONS = conventions.values("aggregation")
_D = conventions.default


def check_switch(sw, value):
    """``value`` checked against the conventions table's row ``sw`` (the reference's messages)."""
    if sw.is_bool:
        if not isinstance(value, bool):
            raise TypeError(f"{sw.name} must be a bool, got {value!r}")
    elif sw.is_choice:
        check_choice(value, sw.name, sw.values)
    else:
        check_range(value, sw.name, lo=sw.lo, hi=sw.hi, lo_open=sw.lo_open)


@dataclass(frozen=True)
class ReinforceConfig:
    """Every convention and coefficient of the REINFORCE objective: the fields, their defaults, values
    and checks are the rows of ``conventions.SWITCHES`` (defaults of docs/conventions.md §3)."""
    alpha: float = _D("alpha")          #: inverse temperature α > 0 of the Boltzmann policy
    eps: float = _D("eps")              #: ε ∈ [0, 1] of the trainable ε-mixture
    gamma: float = _D("gamma")          #: discount γ ∈ [0, 1]
    beta: float = _D("beta")            #: KL coefficient β ≥ 0
    kl: str = _D("kl")                  #: KL estimator in the reward: k1, k2, k3
    returns: str = _D("returns")        #: "rtg" (reward-to-go) or "total" (the article's Σγᵗ r_t)
    baseline: str = _D("baseline")      #: value, qvalue, mean, loo, none
    whiten: str = _D("whiten")          #: advantage whitening: off, population, bessel
    shift_mean: bool = _D("shift_mean")  #: whitening subtracts the mean (False adds it back)
    aggregation: str = _D("aggregation")  #: token_mean, seq_mean, seq_sum, fixed_len
    entropy_coef: float = _D("entropy_coef")  #: c_H ≥ 0
    value_coef: float = _D("value_coef")  #: c_V ≥ 0
    kl_in: str = _D("kl_in")            #: where β·k goes: "reward" or "loss" (GRPO)
    lam: float = _D("lam")              #: GAE λ ∈ [0, 1] (returns="gae")
    group_scale: str = _D("group_scale")  #: "off" or "std" (GRPO's (G − b)/(σ_g + group_eps))
    group_eps: float = _D("group_eps")  #: ε ≥ 0 of group_scale="std"
    surrogate: str = _D("surrogate")    #: "reinforce" or "ppo_clip"
    clip_low: float = _D("clip_low")    #: ρ ≥ 1 − clip_low
    clip_high: float = _D("clip_high")  #: ρ ≤ 1 + clip_high
    value_clip: float = _D("value_clip")  #: value-loss clip around old_values (0: off)
    norm_len: float = _D("norm_len")    #: L of aggregation="fixed_len" (0: T)

    def __post_init__(self):
        for sw in conventions.SWITCHES:
            check_switch(sw, getattr(self, sw.name))
        if self.returns == "gae" and self.baseline != "value":
            raise ValueError(f"returns='gae' needs baseline='value' (its advantage is A^GAE = G − V), got "
                             f"baseline={self.baseline!r}")
        if self.group_scale != "off" and self.baseline not in ret.GROUP_BASELINES:
            raise ValueError(f"group_scale={self.group_scale!r} needs baseline='group_mean' or 'group_loo', got "
                             f"baseline={self.baseline!r}")

    @property
    def critic(self):
        """The critic head: 'qvalue' with the qvalue baseline, else 'value'."""
        return "qvalue" if self.baseline == "qvalue" else "value"

    def to_dict(self):
        return asdict(self)


def aggregation_weights(action_mask, kind="token_mean", norm_len=0.0):
    """The weights w (B, T) that turn per-token terms into the loss: L = Σ w·ℓ."""
    check_choice(kind, "aggregation", AGGREGATIONS)
    m = (action_mask > 0).astype(np.float64)
    N = m.sum()
    if N == 0:
        raise ValueError("the batch has no action (action_mask is all 0): the loss is undefined")
    n_row = m.sum(axis=1, keepdims=True)
    n_rows = np.count_nonzero(n_row)
    if kind == "token_mean":
        return m / N
    if kind == "seq_sum":
        return m / n_rows
    if kind == "fixed_len":
        norm_len = check_range(norm_len, "norm_len", lo=0.0)
        return m / (m.shape[0] * (norm_len if norm_len > 0 else m.shape[1]))
    return np.where(n_row > 0, m / np.maximum(n_row, 1) / n_rows, 0.0)


def token_logprobs(logq, tokens, action_mask):
    """log q(a_t|s_t) (B, T) picked from the full log-distribution, 0 off the action mask."""
    lp = np.take_along_axis(logq, tokens[:, :, None], axis=-1)[:, :, 0]
    return np.where(action_mask > 0, lp, 0.0)


def sequence_logprobs(params, tokens, mask, prompt_len, alpha=1.0, eps=0.0):
    """The policy's log-probs of the tokens it produced, (B, T), 0 off the action mask."""
    return _sequence_logprobs(params, tokens, mask, prompt_len, alpha, eps, "params")


def _sequence_logprobs(params, tokens, mask, prompt_len, alpha, eps, name):
    """``sequence_logprobs``; ``name`` is the argument params came in as (for the errors)."""
    policy.check_policy_args(alpha, eps)
    _, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, name=name)
    out, _ = model.forward(params, tokens, mask)
    am = model.action_mask(mask, prompt_len)
    z = policy.check_scores(out["scores"], am > 0, alpha, "boltzmann", name)
    return token_logprobs(policy.logprobs(z, alpha, eps), tokens, am)


def check_ref_params(ref_params, V):
    """The frozen reference policy: a valid model with a head over the same vocabulary V (every
    backend runs this check before scoring it)."""
    Vr, _, _ = lstm.check_model(ref_params, ("head",), name="ref_params")
    if Vr != V:
        raise ValueError(f"ref_params has vocabulary {Vr}, params has {V}")


def pack_outputs(am, logp, ref_logp, ent, kl, rewards, G, values, qvalues, bl, adv, w, loss_pg, loss_ent,
                 loss_value, scores=None, logq=None, dt=None, ratio=None, loss_kl=0.0):
    """The ``out`` dict of ``loss_and_grad`` and of every backend's ``reinforce_loss_and_grad``: one
    key order (data-flow order). The compiled backends give no (B, T, V) ``scores``/``logq`` and
    pass ``dt``, the params dtype, for every per-token array (their chain runs in float64)."""
    cast = (lambda a: a) if dt is None else (lambda a: a.astype(dt))
    out = {"action_mask": am}
    if scores is not None:
        out.update({"scores": scores, "logq": logq})
    out.update({"logp": cast(logp), "ref_logp": cast(ref_logp), "entropy": cast(ent), "kl": cast(kl),
                "rewards": cast(rewards), "returns": cast(G)})
    if values is not None:
        out["values"] = cast(values)
    if qvalues is not None:
        out["qvalues"] = qvalues
    if ratio is None:
        ratio = (am > 0).astype(np.float64)
    out.update({"baseline": cast(bl), "advantages": cast(adv), "ratio": cast(ratio), "weights": cast(w),
                "loss_pg": loss_pg, "loss_ent": loss_ent, "loss_value": loss_value, "loss_kl": loss_kl,
                "loss": loss_pg + loss_ent + loss_value + loss_kl})
    return out


_DEFAULT_CFG = ReinforceConfig()        # frozen: one instance serves every call


def prepare(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None, logprobs=None,
            group=None, old_logp=None, old_values=None):
    """Every check of ``loss_and_grad``, in its order, before anything is computed; the reference and
    every backend call it, so a bad input raises the same error everywhere.

    Returns (cfg, V, tokens, mask, prompt_len, reward, action_mask, ref_logp, group, old_logp,
    old_values): ref_logp (B, T) is the given one, 0 off the action mask, or ref_params' log-probs
    from ``logprobs`` (a backend's ``sequence_logprobs``; the reference's by default); group (B,)
    int64 or None; old_logp, old_values (B, T) float64, 0 off the action mask, or None.
    """
    cfg = _DEFAULT_CFG if cfg is None else cfg
    if not isinstance(cfg, ReinforceConfig):
        raise TypeError(f"cfg must be a ReinforceConfig, got {type(cfg).__name__}")
    V, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, ("head", cfg.critic))
    policy.check_alpha_dtype(cfg.alpha, params["head.weight"].dtype)
    B, T = tokens.shape
    reward = as_float_array(reward, "reward", ndim=1, shape=(B,))
    am = model.action_mask(mask, prompt_len)                                     # (B, T)
    n_row = np.count_nonzero(am > 0, axis=1)
    N = int(n_row.sum())
    if N == 0:
        raise ValueError("the batch has no action (action_mask is all 0): the loss is undefined")
    if (ref_params is None) == (ref_logp is None):
        raise ValueError("give exactly one of ref_params (a policy dict) or ref_logp (B, T)")
    if ref_params is not None:
        check_ref_params(ref_params, V)
        if logprobs is None:
            ref_logp = _sequence_logprobs(ref_params, tokens, mask, prompt_len, cfg.alpha, cfg.eps, "ref_params")
        else:
            ref_logp = logprobs(ref_params, tokens, mask, prompt_len, cfg.alpha, cfg.eps, _name="ref_params")
    else:
        ref_logp = np.where(am > 0, as_float_array(ref_logp, "ref_logp", shape=(B, T)), 0.0)
    if cfg.baseline == "loo" and np.count_nonzero(n_row) < 2:
        raise ValueError(f"baseline='loo' needs at least two rows with an action, got {np.count_nonzero(n_row)}")
    if cfg.whiten == "bessel" and N < 2:
        raise ValueError(f"whiten='bessel' needs two or more actions, got {N}")
    group = ret.check_group(group, am, cfg.baseline, cfg.group_scale)
    if old_logp is not None:
        old_logp = np.where(am > 0, as_float_array(old_logp, "old_logp", shape=(B, T)), 0.0).astype(np.float64)
    if old_values is not None:
        old_values = np.where(am > 0, as_float_array(old_values, "old_values", shape=(B, T)), 0.0).astype(np.float64)
    elif cfg.value_clip > 0:
        raise ValueError(f"value_clip={cfg.value_clip} needs old_values (B, T): the value head's predictions "
                         f"when the batch was sampled")
    return cfg, V, tokens, mask, prompt_len, reward, am, ref_logp, group, old_logp, old_values


def chain(cfg, am, logp, ref_logp, ent, reward, values, pred, qbaseline=None, group=None, old_logp=None,
          old_values=None):
    """The per-token chain of the objective, from the heads' per-token outputs to the losses and
    their upstream gradients, all (B, T) float64, 0 off the action mask:

    logp, ent     log π_ε(a_t|s_t) and the entropy; ref_logp the reference's log-probs
    values        V(s_t) (the value head; None without it); pred the critic's prediction at each
                  action (V, or Q(s_t, a_t)); qbaseline Σ_a π_ε·Q (the qvalue baseline; None without it)

    Returns a dict: kl, rewards, returns, baseline, advantages, ratio, weights, the four losses and
    d_logp_pg, d_logp_kl, d_ent (the upstream of H), d_pred. Everything here is O(B·T); the
    compiled backends run their own copy of it (``reinforce_chain`` of _train_cy.pyx, _train_nb.py).
    """
    m = am > 0
    w = aggregation_weights(am, cfg.aggregation, cfg.norm_len)
    kl = ret.kl_per_token(logp, ref_logp, am, cfg.kl)
    rewards = ret.shaped_rewards(kl, reward, am, cfg.beta if cfg.kl_in == "reward" else 0.0)
    G = ret.discounted_returns(rewards, am, cfg.gamma, cfg.returns, values=values, lam=cfg.lam)
    if cfg.baseline == "qvalue":
        if qbaseline is None:
            raise ValueError("baseline='qvalue' needs qvalues (B, T, V) and logq (B, T, V)")
        b = np.where(m, qbaseline, 0.0)
    else:
        b = ret.baseline(cfg.baseline, G, am, values=values, group=group)
    adv = np.where(m, G - b, 0.0)
    adv = ret.group_scale(adv, G, am, group, cfg.group_scale, cfg.group_eps)
    adv = ret.whiten(adv, am, cfg.whiten, cfg.shift_mean)

    # the policy-gradient surrogate
    ratio = np.where(m, np.exp(logp - (logp if old_logp is None else old_logp)), 0.0)
    if cfg.surrogate == "reinforce":
        loss_pg = -np.sum(w * adv * logp)
        d_logp_pg = -w * adv
    else:
        unclipped = ratio * adv
        clipped = np.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv
        loss_pg = np.sum(w * -np.minimum(unclipped, clipped))
        d_logp_pg = np.where(unclipped <= clipped, -w * adv * ratio, 0.0)

    # the KL term in the loss (GRPO)
    loss_kl, d_logp_kl = 0.0, np.zeros_like(logp)
    if cfg.kl_in == "loss":
        x = np.where(m, logp - ref_logp, 0.0)
        loss_kl = cfg.beta * np.sum(w * kl)
        d_logp_kl = np.where(m, cfg.beta * w * ret.kl_estimate_grad(x, cfg.kl), 0.0)

    # the critic
    err = np.where(m, pred - G, 0.0)
    if cfg.value_clip > 0:
        dv = np.where(m, pred - old_values, 0.0)
        err_clip = np.where(m, old_values + np.clip(dv, -cfg.value_clip, cfg.value_clip) - G, 0.0)
        loss_value = cfg.value_coef * 0.5 * np.sum(w * np.maximum(err ** 2, err_clip ** 2))
        inside = np.abs(dv) < cfg.value_clip              # ∂V_clip/∂V = 1 inside the clip range, else 0
        # err² ≥ err_clip² decided as (err − err_clip)·(err + err_clip) ≥ 0 with err − err_clip = dv − clip(dv)
        # exactly: comparing the two squares directly lets G's rounding pick the branch when |G| is huge
        d = dv - np.clip(dv, -cfg.value_clip, cfg.value_clip)
        use_err = (d == 0) | (d * (err + err_clip) >= 0)
        d_pred = cfg.value_coef * w * np.where(use_err, err, np.where(inside, err_clip, 0.0))
    else:
        loss_value = cfg.value_coef * 0.5 * np.sum(w * err ** 2)
        d_pred = cfg.value_coef * w * err
    return {"kl": kl, "rewards": rewards, "returns": G, "baseline": b, "advantages": adv, "ratio": ratio,
            "weights": w, "loss_pg": loss_pg, "loss_ent": -cfg.entropy_coef * np.sum(w * ent),
            "loss_value": loss_value, "loss_kl": loss_kl, "d_logp_pg": d_logp_pg, "d_logp_kl": d_logp_kl,
            "d_ent": -cfg.entropy_coef * w, "d_pred": d_pred}


def loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None,
                  term_grads=False, *, group=None, old_logp=None, old_values=None):
    """The RL loss, every intermediate and ∇L for every parameter.

    params       policy: embedding, lstm, head and the critic head (value, or qvalue)
    tokens, mask, prompt_len   the episode batch (docs/conventions.md §2)
    reward       (B,) sequence rewards R, added at each row's last action
    ref_params   the frozen reference policy (scored with the same α, ε), or
    ref_logp     its token log-probs (B, T) precomputed
    term_grads   also return the gradient of each loss term: grads['terms'] = {'pg', 'ent', 'value', 'kl'}
    group        (B,) integer ids of the rows that answer the same prompt (the group baselines)
    old_logp     (B, T) the sampling policy's log-probs (surrogate="ppo_clip"; default: logp, ratio 1)
    old_values   (B, T) the value head's predictions at sampling time (value_clip > 0)
    """
    cfg, V, tokens, mask, prompt_len, reward, am, ref_logp, group, old_logp, old_values = prepare(
        params, tokens, mask, prompt_len, reward, cfg, ref_params, ref_logp,
        group=group, old_logp=old_logp, old_values=old_values)                    # the frozen π_ref: same α, ε

    # policy forward: scores, full log-distribution, log-probs of the taken tokens, entropy
    fwd, cache = model.forward(params, tokens, mask)
    fwd["scores"] = policy.check_scores(fwd["scores"], am > 0, cfg.alpha)        # a policy at every action
    logq = policy.logprobs(fwd["scores"], cfg.alpha, cfg.eps)                    # (B, T, V)
    logp = token_logprobs(logq, tokens, am)                                      # (B, T)
    ent = np.where(am > 0, policy.entropy(logq), 0.0)                            # (B, T)
    values = fwd.get("values")
    qvalues = fwd.get("qvalues")
    qb = None if qvalues is None else np.sum(np.exp(logq) * qvalues, axis=-1)    # Σ_a π_ε(a|s_t) Q(s_t, a)

    # the critic's prediction at each action
    if cfg.critic == "value":
        pred = np.where(am > 0, values, 0.0)
    else:
        pred = token_logprobs(qvalues, tokens, am)                              # Q(s_t, a_t)

    # KL, rewards, returns, baseline, advantages (constants for the gradient), the losses
    c = chain(cfg, am, logp, ref_logp, ent, reward, None if values is None else np.where(am > 0, values, 0.0),
              pred, qb, group, old_logp, old_values)
    # logq is a per-position array: 0 where the scores are 0 (padding, column 0), docs/conventions.md §2
    out = pack_outputs(am, logp, ref_logp, ent, c["kl"], c["rewards"], c["returns"], values, qvalues,
                       c["baseline"], c["advantages"], c["weights"], c["loss_pg"], c["loss_ent"], c["loss_value"],
                       scores=fwd["scores"], logq=np.where(cache["pm"][:, :, None] > 0, logq, 0.0),
                       ratio=c["ratio"], loss_kl=c["loss_kl"])

    # upstream gradients at the heads
    d_pred = c["d_pred"]                                                         # ∂L_value/∂pred
    dt = fwd["scores"].dtype                                                     # an overflow is an error
    check_finite_result(dt, out["loss"], c["rewards"], c["returns"], c["d_logp_pg"], c["d_logp_kl"], c["d_ent"],
                        d_pred)
    dz_pg = policy.grad_logprob(fwd["scores"], tokens, c["d_logp_pg"], cfg.alpha, cfg.eps)
    dz_kl = policy.grad_logprob(fwd["scores"], tokens, c["d_logp_kl"], cfg.alpha, cfg.eps)
    dz_ent = policy.grad_entropy(fwd["scores"], c["d_ent"], cfg.alpha, cfg.eps)
    check_finite_result(dt, dz_pg, dz_kl, dz_ent, dz_pg + dz_ent + dz_kl)
    if cfg.critic == "value":
        dcritic = {"dvalues": d_pred}
    else:
        dq = np.zeros_like(qvalues)
        np.put_along_axis(dq, tokens[:, :, None], d_pred[:, :, None], axis=-1)
        dcritic = {"dqvalues": dq}
    grads = model.backward(cache, dscores=dz_pg + dz_ent + dz_kl, **dcritic)
    check_finite_result(dt, *grads.values())
    if term_grads:
        grads["terms"] = {
            "pg": model.backward(cache, dscores=dz_pg),
            "ent": model.backward(cache, dscores=dz_ent),
            "value": model.backward(cache, **dcritic),
            "kl": model.backward(cache, dscores=dz_kl),
        }
    return out, grads
