"""REINFORCE with a KL penalty to a frozen reference policy: the readable reference objective.

Written to be MINIMISED; descent on L is ascent on the expected return J (DESIGN.md §3).
The founding article writes θ ← θ − η·∇logP·Σγᵗ R_t, which *descends* the return: a sign
slip. Here θ ← θ − η·∇L with L = L_pg + L_ent + L_value, and

    L_pg    = −Σ_{b,t} w_{b,t} · A_{b,t} · log π_θ(a_t|s_t)
    L_ent   = −c_H · Σ w · H(π_ε(·|s_t))
    L_value = c_V · ½ · Σ w · (V(s_t) − G_t)²           (Q(s_t, a_t) for the qvalue critic)

with aggregation weights w (B, T) on the action mask m, N = Σ m, rows with an action n_rows:

    token_mean   w = m / N
    seq_mean     w = m / (n_b · n_rows)      each row's token mean, averaged over rows
    seq_sum      w = m / n_rows              the only one unbiased when lengths vary

Held constant (no gradient): A, G, the baselines, whitening statistics, R and β·k. Entropy is
not held constant. The value of L_pg is not a measure of performance.

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
    and checks are the rows of ``conventions.SWITCHES`` (defaults of DESIGN.md §3)."""
    alpha: float = _D("alpha")          #: inverse temperature α > 0 of the Boltzmann policy
    eps: float = _D("eps")              #: ε ∈ [0, 1] of the trainable ε-mixture
    gamma: float = _D("gamma")          #: discount γ ∈ [0, 1]
    beta: float = _D("beta")            #: KL coefficient β ≥ 0
    kl: str = _D("kl")                  #: KL estimator in the reward: k1, k2, k3
    returns: str = _D("returns")        #: "rtg" (reward-to-go) or "total" (the article's Σγᵗ r_t)
    baseline: str = _D("baseline")      #: value, qvalue, mean, loo, none
    whiten: str = _D("whiten")          #: advantage whitening: off, population, bessel
    shift_mean: bool = _D("shift_mean")  #: whitening subtracts the mean (False adds it back)
    aggregation: str = _D("aggregation")  #: token_mean, seq_mean, seq_sum
    entropy_coef: float = _D("entropy_coef")  #: c_H ≥ 0
    value_coef: float = _D("value_coef")  #: c_V ≥ 0

    def __post_init__(self):
        for sw in conventions.SWITCHES:
            check_switch(sw, getattr(self, sw.name))

    @property
    def critic(self):
        """The critic head: 'qvalue' with the qvalue baseline, else 'value'."""
        return "qvalue" if self.baseline == "qvalue" else "value"

    def to_dict(self):
        return asdict(self)


def aggregation_weights(action_mask, kind="token_mean"):
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
                 loss_value, scores=None, logq=None, dt=None):
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
    out.update({"baseline": cast(bl), "advantages": cast(adv), "weights": cast(w),
                "loss_pg": loss_pg, "loss_ent": loss_ent, "loss_value": loss_value,
                "loss": loss_pg + loss_ent + loss_value})
    return out


_DEFAULT_CFG = ReinforceConfig()        # frozen: one instance serves every call


def prepare(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None, logprobs=None):
    """Every check of ``loss_and_grad``, in its order, before anything is computed; the reference and
    every backend call it, so a bad input raises the same error everywhere.

    Returns (cfg, V, tokens, mask, prompt_len, reward, action_mask, ref_logp): ref_logp (B, T) is the
    given one, 0 off the action mask, or ref_params' log-probs from ``logprobs`` (a backend's
    ``sequence_logprobs``; the reference's by default).
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
    return cfg, V, tokens, mask, prompt_len, reward, am, ref_logp


def loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None,
                  term_grads=False):
    """The RL loss, every intermediate and ∇L for every parameter.

    params       policy: embedding, lstm, head and the critic head (value, or qvalue)
    tokens, mask, prompt_len   the episode batch (DESIGN.md §2)
    reward       (B,) sequence rewards R, added at each row's last action
    ref_params   the frozen reference policy (scored with the same α, ε), or
    ref_logp     its token log-probs (B, T) precomputed
    term_grads   also return the gradient of each loss term: grads['terms'] = {'pg', 'ent', 'value'}
    """
    cfg, V, tokens, mask, prompt_len, reward, am, ref_logp = prepare(
        params, tokens, mask, prompt_len, reward, cfg, ref_params, ref_logp)           # the frozen π_ref: same α, ε
    w = aggregation_weights(am, cfg.aggregation)                                 # (B, T)

    # policy forward: scores, full log-distribution, log-probs of the taken tokens, entropy
    fwd, cache = model.forward(params, tokens, mask)
    fwd["scores"] = policy.check_scores(fwd["scores"], am > 0, cfg.alpha)        # a policy at every action
    logq = policy.logprobs(fwd["scores"], cfg.alpha, cfg.eps)                    # (B, T, V)
    logp = token_logprobs(logq, tokens, am)                                      # (B, T)
    ent = np.where(am > 0, policy.entropy(logq), 0.0)                            # (B, T)

    # KL-shaped rewards, returns, baseline, advantages (all constants for the gradient)
    kl = ret.kl_per_token(logp, ref_logp, am, cfg.kl)
    rewards = ret.shaped_rewards(kl, reward, am, cfg.beta)
    G = ret.discounted_returns(rewards, am, cfg.gamma, cfg.returns)
    values = fwd.get("values")
    qvalues = fwd.get("qvalues")
    b = ret.baseline(cfg.baseline, G, am, values=values, qvalues=qvalues, logq=logq)
    adv = ret.whiten(np.where(am > 0, G - b, 0.0), am, cfg.whiten, cfg.shift_mean)

    # the critic's prediction at each action
    if cfg.critic == "value":
        pred = np.where(am > 0, values, 0.0)
    else:
        pred = token_logprobs(qvalues, tokens, am)                              # Q(s_t, a_t)

    # the losses, minimised
    loss_pg = -np.sum(w * adv * logp)
    loss_ent = -cfg.entropy_coef * np.sum(w * ent)
    loss_value = cfg.value_coef * 0.5 * np.sum(w * (pred - G) ** 2)
    # logq is a per-position array: 0 where the scores are 0 (padding, column 0), DESIGN.md §2
    out = pack_outputs(am, logp, ref_logp, ent, kl, rewards, G, values, qvalues, b, adv, w, loss_pg, loss_ent,
                       loss_value, scores=fwd["scores"], logq=np.where(cache["pm"][:, :, None] > 0, logq, 0.0))

    # upstream gradients at the heads
    d_logp = -w * adv                                                            # ∂L_pg/∂logp
    d_pred = cfg.value_coef * w * (pred - G)                                     # ∂L_value/∂pred
    check_finite_result(fwd["scores"].dtype, out["loss"], rewards, G, d_logp, d_pred)   # an overflow is an error
    dz_pg = policy.grad_logprob(fwd["scores"], tokens, d_logp, cfg.alpha, cfg.eps)
    dz_ent = policy.grad_entropy(fwd["scores"], -cfg.entropy_coef * w, cfg.alpha, cfg.eps)
    check_finite_result(fwd["scores"].dtype, dz_pg, dz_ent, dz_pg + dz_ent)
    if cfg.critic == "value":
        dcritic = {"dvalues": d_pred}
    else:
        dq = np.zeros_like(qvalues)
        np.put_along_axis(dq, tokens[:, :, None], d_pred[:, :, None], axis=-1)
        dcritic = {"dqvalues": dq}
    grads = model.backward(cache, dscores=dz_pg + dz_ent, **dcritic)
    check_finite_result(fwd["scores"].dtype, *grads.values())
    if term_grads:
        grads["terms"] = {
            "pg": model.backward(cache, dscores=dz_pg),
            "ent": model.backward(cache, dscores=dz_ent),
            "value": model.backward(cache, **dcritic),
        }
    return out, grads
