"""The catalogue of named mistakes (rlhf_ref.golden.mistakes): every entry is planted in an
independent implementation and the verifier must name exactly it, at the quantity where it first
shows. Parametrised over the catalogue itself: a new entry without a plant here fails.

The independent implementation is a small NumPy one written here from the conventions (an LSTM
with PyTorch's gate rows, token-aligned heads, α/ε log-probs, an inverse-CDF sampler, the
REINFORCE terms), not rlhf_ref's code; a plant takes the golden outputs of a case and replaces
the quantities the mistake changes with what this implementation computes with the mistake in
it. ``kl_penalty_not_detached`` needs autograd: it is planted in examples/torch_reference.py.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from rlhf_ref import vectors as gv, verify as vf
from rlhf_ref.golden import compare, mistakes as mk

HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "golden")
EXAMPLE = os.path.join(HERE, os.pardir, "examples", "torch_reference.py")


@pytest.fixture(scope="module")
def golden():
    m = gv.load_manifest(GOLDEN)
    return {e["name"]: (e, gv.load_case(m, e)) for e in m["cases"]}


# ============================================================================ an independent implementation

def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def params(a, prefix):
    return {k[len(prefix):]: np.asarray(v, np.float64) for k, v in a.items() if k.startswith(prefix)}


def lstm_states(p, tokens, order="ifgo"):
    """h_t after reading tokens[:, t] (B, T, H); the rows of the lstm.* arrays are read as the
    gate blocks in ``order`` (PyTorch's is i, f, g, o)."""
    emb, Wih, Whh = p["embedding.weight"], p["lstm.weight_ih_l0"], p["lstm.weight_hh_l0"]
    b = p["lstm.bias_ih_l0"] + p["lstm.bias_hh_l0"]
    B, T = tokens.shape
    H = Whh.shape[1]
    h, c, hs = np.zeros((B, H)), np.zeros((B, H)), []
    for t in range(T):
        z = emb[tokens[:, t]] @ Wih.T + h @ Whh.T + b
        blk = dict(zip(order, np.split(z, 4, axis=1)))
        c = _sig(blk["f"]) * c + _sig(blk["i"]) * np.tanh(blk["g"])
        h = _sig(blk["o"]) * np.tanh(c)
        hs.append(h)
    return np.stack(hs, axis=1)


def position_mask(mask):
    pm = (np.asarray(mask) > 0).copy()
    pm[:, 0] = False
    return pm


def head(p, name, tokens, mask, order="ifgo"):
    """Token-aligned head outputs: out[:, t] = name(h_{t−1}), 0 at column 0 and padding."""
    hs = lstm_states(p, tokens, order)
    hprev = np.concatenate([np.zeros_like(hs[:, :1]), hs[:, :-1]], axis=1)
    out = hprev @ p[name + ".weight"].T + p[name + ".bias"]
    pm = position_mask(mask)
    return np.where(pm[:, :, None], out, 0.0)


def log_probs(z, alpha, eps):
    s = alpha * z
    s = s - s.max(-1, keepdims=True)
    lsm = s - np.log(np.exp(s).sum(-1, keepdims=True))
    if eps == 0:
        return lsm
    return np.logaddexp(np.log1p(-eps) + lsm, np.log(eps / z.shape[-1]))


def forward(a, cfg, order="ifgo", edit=None, alpha=None, eps=None):
    """scores, logq, logp, ref_logp, entropy, values/qvalues of the rl batch, with the parameters
    passed through ``edit`` and α, ε overridable."""
    alpha = cfg["alpha"] if alpha is None else alpha
    eps = cfg["eps"] if eps is None else eps
    pol, ref = params(a, "policy/"), params(a, "ref/")
    if edit is not None:
        pol, ref = edit(pol), edit(ref)
    tok, mask = a["tokens"], a["mask"]
    pm = position_mask(mask)
    am = a["action_mask"] > 0
    z = head(pol, "head", tok, mask, order)
    lq = np.where(pm[:, :, None], log_probs(z, alpha, eps), 0.0)
    rlq = log_probs(head(ref, "head", tok, mask, order), alpha, eps)
    pick = lambda l: np.where(am, np.take_along_axis(l, tok[:, :, None], -1)[:, :, 0], 0.0)  # noqa: E731
    out = {"scores": z, "logq": lq, "logp": pick(lq), "ref_logp": pick(rlq),
           "entropy": np.where(am, -(np.exp(lq) * lq).sum(-1), 0.0)}
    if "value.weight" in pol:
        out["values"] = head(pol, "value", tok, mask, order)[:, :, 0]
    if "qvalue.weight" in pol:
        out["qvalues"] = head(pol, "qvalue", tok, mask, order)
    return out


def decode_log_probs(z, cfg):
    """The decoding policy's log-probs: Boltzmann (α, ε), or (ε-)greedy (1 − ε)·onehot(argmax z) + ε/V."""
    kind = cfg.get("policy_kind", "boltzmann")
    if kind == "boltzmann":
        return log_probs(z, cfg["alpha"], cfg["eps"])
    eps = cfg["eps"] if kind == "eps_greedy" else 0.0
    q = (1 - eps) * (np.arange(z.shape[-1]) == np.argmax(z, -1)[..., None]) + eps / z.shape[-1]
    with np.errstate(divide="ignore"):
        return np.log(q)


def sample(a, cfg, u):
    """Inverse-CDF sampling: a = #{k : cdf_k ≤ u}; EOS ends a row. (tokens, mask, action_mask, logp)"""
    pol = params(a, "policy/")
    tok = a["rollout/prompt_tokens"].copy()
    pl = a["rollout/prompt_len"]
    B, T = tok.shape
    mask = (np.arange(T)[None, :] < pl[:, None]).astype(np.int64)
    am = np.zeros_like(mask)
    logp = np.zeros((B, T))
    done = np.zeros(B, bool)
    for t in range(1, T):
        go = (t >= pl) & ~done
        if not go.any():
            continue
        m2 = mask.copy()
        m2[go, t] = 1
        lq = decode_log_probs(head(pol, "head", tok, m2), cfg)[:, t]
        cdf = np.cumsum(np.exp(lq), -1)
        for b in np.nonzero(go)[0]:
            k = min(int(np.sum(cdf[b] <= u[b, t])), cdf.shape[1] - 1)
            tok[b, t], mask[b, t], am[b, t], logp[b, t] = k, 1, 1, lq[b, k]
            done[b] |= k == cfg["eos_id"]
    return {"rollout/tokens": tok, "rollout/mask": mask, "rollout/action_mask": am, "rollout/logp": logp}


def returns(r, am, gamma, kind):
    G = np.zeros_like(r)
    for b in range(r.shape[0]):
        acts = np.nonzero(am[b])[0]
        if kind == "rtg":
            g = 0.0
            for t in acts[::-1]:
                g = r[b, t] + gamma * g
                G[b, t] = g
        else:
            G[b, acts] = sum(gamma ** j * r[b, t] for j, t in enumerate(acts))
    return G


def whitened(A, am, kind, place="inside", shift=True, stats=None):
    s = am if stats is None else stats
    x = A[s]
    mu = x.mean()
    var = ((x - mu) ** 2).sum() / (x.size - 1 if kind == "bessel" else x.size)
    den = {"inside": np.sqrt(var + 1e-8), "std": np.sqrt(var) + 1e-8, "none": np.sqrt(var),
           "clamp": np.sqrt(max(var, 1e-8))}[place]
    return np.where(am, (A - mu) / den + (0 if shift else mu), 0.0)


def weights(am, kind):
    am = am.astype(float)
    n_row = am.sum(1, keepdims=True)
    rows = np.count_nonzero(n_row)
    return {"token_mean": am / am.sum(), "seq_sum": am / rows, "seq_sum_B": am / am.shape[0], "sum": am,
            "seq_mean": np.where(n_row > 0, am / np.maximum(n_row, 1) / rows, 0.0),
            "seq_mean_B": np.where(n_row > 0, am / np.maximum(n_row, 1) / am.shape[0], 0.0)}[kind]


# ============================================================================ the plants

class P:
    """The golden arrays of a case as float64, and helpers (the upstream values a plant starts from)."""

    def __init__(self, e, a):
        self.e, self.a, self.cfg = e, a, e["config"]
        self.am = a["action_mask"] > 0 if "action_mask" in a else None

    def __getitem__(self, k):
        v = np.asarray(self.a[k])
        return v.astype(np.float64) if v.dtype.kind == "f" else v

    def x(self):
        return np.where(self.am, self["logp"] - self["ref_logp"], 0.0)

    def last(self):
        return [(b, int(np.nonzero(self.am[b])[0][-1])) for b in range(self.am.shape[0]) if self.am[b].any()]

    def pen(self, scale=-1.0):
        return np.where(self.am, scale * self.cfg["beta"] * self["kl"], 0.0)

    def with_R(self, r, where):
        r = r.copy()
        for b, t in where:
            r[b, t] += self["reward"][b]
        return r

    def term(self, q, w=None):
        w = self["weights"] if w is None else w
        if q == "loss_pg":
            return -np.sum(w * self["advantages"] * self["logp"])
        if q == "loss_ent":
            return -self.cfg["entropy_coef"] * np.sum(w * self["entropy"])
        return self.cfg["value_coef"] * np.sum(w * 0.5 * (self["values"] - self["returns"]) ** 2)

    def grads(self, term):
        return {k: self[k] for k in self.e["outputs"] if k.startswith(f"grad/{term}/")}


def _head_at_h_t(p, name):
    """The off-by-one of a model read at h_t (the state after token t), at every real position."""
    pol = params(p.a, "policy/")
    hs = lstm_states(pol, p["tokens"])
    return np.where(position_mask(p["mask"])[:, :, None], hs @ pol[name + ".weight"].T + pol[name + ".bias"], 0.0)


def _permute(order):
    return lambda p, o=order: forward(p.a, p.cfg, order=o)


def _zero(which):
    def edit(d):
        return {k: (np.zeros_like(v) if k == f"lstm.bias_{which}_l0" else v) for k, v in d.items()}
    return lambda p: forward(p.a, p.cfg, edit=edit)


def _f32(d):
    return {k: v.astype(np.float32).astype(np.float64) for k, v in d.items()}


def _rollout(shift=0, one_minus=False):
    def plant(p):
        u = p["rollout/u"]
        u = np.roll(u, shift, axis=1) if shift else u
        if one_minus:
            u = np.nextafter(1.0 - u, 0)
        return sample(p.a, p.cfg, u)
    return plant


def _after_eos(p):
    tok = p["rollout/tokens"].copy()
    tok[p["rollout/mask"] == 0] = 3
    return {"rollout/tokens": tok}


def _mask_change(longer):
    def plant(p):
        m = p["rollout/mask"].copy()
        n = m.sum(1)
        for b in range(m.shape[0]):
            if longer and n[b] < m.shape[1]:
                m[b, n[b]] = 1
            elif not longer:
                m[b, n[b] - 1] = 0
        return {"rollout/mask": m}
    return plant


def _reward_over_padding(p):
    rm = params(p.a, "rm/")
    hs = lstm_states(rm, p["chosen"])
    return {"reward_chosen": hs[:, -1] @ rm["reward.weight"][0] + rm["reward.bias"][0]}


def _am(f):
    def plant(p):
        m = p["mask"] > 0
        tt = np.arange(m.shape[1])[None, :]
        return {"action_mask": f(p, m, tt, p["prompt_len"][:, None]).astype(np.int64)}
    return plant


def _no_last(p, m, tt, pl):
    a = p.am.copy()
    for b, t in p.last():
        a[b, t] = False
    return a


def _noise(q, rel, seed=0):
    def plant(p):
        v = p[q]
        r = np.random.default_rng(seed).uniform(0.5, 1.0, v.shape) * np.where(np.arange(v.size) % 2, 1, -1).reshape(
            v.shape)
        return {q: v * (1 + rel * r)}
    return plant


def _only_padded_rows(p):
    e = p["entropy"].copy()
    padded = p["mask"].sum(1) < p["mask"].shape[1]
    e[padded] = np.where(p.am[padded], e[padded] + 0.1, 0.0)
    return {"entropy": e}


def _last_action_off(p):
    r = p["rewards"].copy()
    for b, t in p.last():
        r[b, t] += 0.3
    return {"rewards": r}


def _loo_row_means(p):
    G, am = p["returns"], p.am
    means = np.array([G[b, am[b]].mean() for b in range(G.shape[0])])
    return {"baseline": np.where(am, np.array([np.delete(means, b).mean() for b in range(G.shape[0])])[:, None],
                                 0.0)}


def _q_expect(p, alpha, eps):
    lq = log_probs(p["scores"], alpha, eps)
    return {"baseline": np.where(p.am, (np.exp(lq) * p["qvalues"]).sum(-1), 0.0)}


def _baseline_not_detached(p):
    """L_pg with b = V not detached: ∂L_pg/∂V_t = w_t·logp_t, so the value head gets Σ_t w_t logp_t h_{t−1}."""
    pol = params(p.a, "policy/")
    hs = lstm_states(pol, p["tokens"])
    hprev = np.concatenate([np.zeros_like(hs[:, :1]), hs[:, :-1]], axis=1)
    d = p["weights"] * p["logp"]
    return {"grad/loss_pg/policy/value.weight": np.einsum("bt,bth->h", d, hprev)[None, :],
            "grad/loss_pg/policy/value.bias": np.array([d.sum()])}


def _whiten_plant(kind, place, shift):
    def plant(p):
        return {"advantages": whitened(np.where(p.am, p["returns"] - p["baseline"], 0.0), p.am, kind, place, shift)}
    return plant


def _whiten_case(kind, place, shift):
    return "whiten_bessel" if (kind, place, shift) == ("population", "inside", True) else "whiten_small_variance"


def _agg_case(kind):
    return "padding_rows_seq_mean_loo" if kind == "token_mean" else "padding_rows"


def _per_row_whitening(p):
    A = np.where(p.am, p["returns"] - p["baseline"], 0.0)
    out = np.zeros_like(A)
    for b in range(A.shape[0]):
        m = np.zeros_like(p.am)
        m[b] = p.am[b]
        if m.sum() >= 1:
            out += whitened(A, m, p.cfg["whiten"])
    return {"advantages": out}


#: mistake name -> (case, quantity where it must be named, plant(P) -> {name: planted array})
PLANTS = {
    "non_finite": ("base", "logp", lambda p: {"logp": np.where(p.am & (np.cumsum(p.am, 1) == 1), np.nan, p["logp"])}),
    "float32_output": ("base", "scores", lambda p: {"scores": p["scores"].astype(np.float32)}),
    "action_mask_one_early": ("base", "action_mask", _am(lambda p, m, tt, pl: m & (tt >= pl - 1))),
    "action_mask_one_late": ("base", "action_mask", _am(lambda p, m, tt, pl: m & (tt >= pl + 1))),
    "action_mask_covers_prompt": ("base", "action_mask", _am(lambda p, m, tt, pl: m & (tt >= 1))),
    "action_mask_without_last": ("base", "action_mask", _am(_no_last)),
    "sampling_after_eos": ("base", "rollout/tokens", _after_eos),
    "u_one_step_late": ("base", "rollout/tokens", _rollout(shift=1)),
    "u_one_step_early": ("base", "rollout/tokens", _rollout(shift=-1)),
    "one_minus_u": ("base", "rollout/tokens", _rollout(one_minus=True)),
    "rollout_mask_ends_early": ("base", "rollout/mask", _mask_change(False)),
    "rollout_mask_goes_on": ("base", "rollout/mask", _mask_change(True)),
    "read_one_position_late": ("base", "scores", lambda p: {"scores": _head_at_h_t(p, "head")}),
    "logits_labels_off_by_one": ("base", "logp", lambda p: {"logp": np.where(p.am, np.take_along_axis(
        log_probs(_head_at_h_t(p, "head"), p.cfg["alpha"], p.cfg["eps"]), p["tokens"][:, :, None], -1)[..., 0],
        0.0)}),
    "labels_off_by_one": ("base", "logp", lambda p: {"logp": np.where(p.am, np.take_along_axis(
        p["logq"], np.roll(p["tokens"], -1, axis=1)[:, :, None], -1)[..., 0], 0.0)}),
    "logits_labels_shifted_twice": ("base", "logp", lambda p: {"logp": np.where(p.am, np.take_along_axis(
        np.roll(p["logq"], 1, axis=1), p["tokens"][:, :, None], -1)[..., 0], 0.0)}),
    "logp_is_ref_logp": ("base", "logp", lambda p: {"logp": p["ref_logp"]}),
    "ref_logp_is_logp": ("base", "ref_logp", lambda p: {"ref_logp": p["logp"]}),
    "entropy_of_sampled_token": ("base", "entropy", lambda p: {"entropy": -p["logp"]}),
    "entropy_in_bits": ("base", "entropy", lambda p: {"entropy": p["entropy"] / np.log(2)}),
    "alpha_missing": ("alpha_2", "logq", lambda p: forward(p.a, p.cfg, alpha=1.0)),
    "alpha_as_temperature": ("alpha_2", "logq", lambda p: forward(p.a, p.cfg, alpha=1 / p.cfg["alpha"])),
    "eps_mixture_missing": ("eps_0_1", "logq", lambda p: forward(p.a, p.cfg, eps=0.0)),
    **{m.name: ("base", "scores", _permute(m.name.split("_")[-1])) for m in mk.MISTAKES
       if m.name.startswith("lstm_gates_")},
    "params_through_float32": ("base", "scores", lambda p: forward(p.a, p.cfg, edit=_f32)),
    "lstm_without_bias_hh": ("base", "scores", _zero("hh")),
    "lstm_without_bias_ih": ("base", "scores", _zero("ih")),
    "reward_read_after_padding": ("base", "reward_chosen", _reward_over_padding),
    "kl_k1_ratio_reversed": ("base", "kl", lambda p: {"kl": -p.x()}),
    "kl_k3_ratio_reversed": ("kl_k3", "kl", lambda p: {"kl": np.where(p.am, np.expm1(p.x()) - p.x(), 0.0)}),
    "kl_estimator_k1": ("kl_k3", "kl", lambda p: {"kl": p.x()}),
    "kl_estimator_k2": ("base", "kl", lambda p: {"kl": 0.5 * p.x() ** 2}),
    "kl_estimator_k3": ("base", "kl", lambda p: {"kl": np.where(p.am, np.exp(-p.x()) - 1 + p.x(), 0.0)}),
    "kl_abs": ("base", "kl", lambda p: {"kl": np.abs(p.x())}),
    "R_at_every_action": ("base", "rewards", lambda p: {"rewards": p.pen() + np.where(p.am, p["reward"][:, None], 0)}),
    "R_at_first_action": ("base", "rewards", lambda p: {"rewards": p.with_R(
        p.pen(), [(b, int(np.argmax(p.am[b]))) for b, _ in p.last()])}),
    "R_after_last_action": ("padding_rows", "rewards", lambda p: {"rewards": p.with_R(
        p.pen(), [(b, t + 1) for b, t in p.last() if t + 1 < p.am.shape[1]])}),
    "R_missing": ("base", "rewards", lambda p: {"rewards": p.pen()}),
    "kl_penalty_sign": ("base", "rewards", lambda p: {"rewards": p.with_R(p.pen(+1.0), p.last())}),
    "kl_penalty_without_beta": ("base", "rewards", lambda p: {"rewards": p.with_R(
        np.where(p.am, -p["kl"], 0.0), p.last())}),
    "kl_penalty_per_sequence": ("base", "rewards", lambda p: {"rewards": p.with_R(np.zeros_like(p["kl"]), p.last())
                                                              - _at_last(p, p.cfg["beta"] * p["kl"].sum(1))}),
    "R_on_rows_without_action": ("padding_rows", "rewards", lambda p: {"rewards": _R_everywhere(p)}),
    "returns_one_step_late": ("gamma_0_9", "returns", lambda p: {"returns": np.where(
        p.am, np.concatenate([p["returns"][:, 1:], np.zeros((p.am.shape[0], 1))], 1), 0.0)}),
    "returns_one_step_early": ("gamma_0_9", "returns", lambda p: {"returns": np.where(
        p.am, np.concatenate([np.zeros((p.am.shape[0], 1)), p["returns"][:, :-1]], 1), 0.0)}),
    "returns_rtg": ("returns_total", "returns", lambda p: {"returns": returns(p["rewards"], p.am, p.cfg["gamma"],
                                                                              "rtg")}),
    "returns_total": ("gamma_0_9", "returns", lambda p: {"returns": returns(p["rewards"], p.am, 0.9, "total")}),
    "gamma_missing": ("gamma_0_9", "returns", lambda p: {"returns": returns(p["rewards"], p.am, 1.0, "rtg")}),
    "gamma_from_sequence_start": ("total_gamma_0_9", "returns", lambda p: {"returns": np.where(
        p.am, (p["rewards"] * 0.9 ** np.arange(p.am.shape[1])).sum(1)[:, None], 0.0)}),
    "gamma_not_restarted": ("gamma_0_9", "returns", lambda p: {"returns": _not_restarted(p)}),
    "gamma_on_immediate_reward": ("gamma_0_9", "returns", lambda p: {"returns": 0.9 * returns(
        p["rewards"], p.am, 0.9, "rtg")}),
    "returns_not_accumulated": ("gamma_0_9", "returns", lambda p: {"returns": p["rewards"]}),
    "baseline_zero": ("base", "baseline", lambda p: {"baseline": np.zeros_like(p["baseline"])}),
    "baseline_value_one_late": ("base", "baseline", lambda p: {"baseline": np.where(
        p.am, np.concatenate([p["values"][:, 1:], np.zeros((p.am.shape[0], 1))], 1), 0.0)}),
    "baseline_is_value": ("baseline_mean", "baseline", lambda p: {"baseline": np.where(p.am, p["values"], 0.0)}),
    "baseline_mean": ("base", "baseline", lambda p: {"baseline": np.where(p.am, p["returns"][p.am].mean(), 0.0)}),
    "baseline_loo": ("base", "baseline", lambda p: {"baseline": np.where(p.am, np.array([
        p["returns"][np.delete(np.arange(p.am.shape[0]), b)][p.am[np.delete(np.arange(p.am.shape[0]), b)]].mean()
        for b in range(p.am.shape[0])])[:, None], 0.0)}),
    "baseline_mean_all_positions": ("base", "baseline", lambda p: {"baseline": np.where(p.am, p["returns"].mean(),
                                                                                        0.0)}),
    "baseline_loo_of_row_means": ("base", "baseline", _loo_row_means),
    "baseline_q_of_taken_action": ("baseline_qvalue", "baseline", lambda p: {"baseline": np.where(
        p.am, np.take_along_axis(p["qvalues"], p["tokens"][:, :, None], -1)[..., 0], 0.0)}),
    "baseline_q_max": ("baseline_qvalue", "baseline", lambda p: {"baseline": np.where(p.am, p["qvalues"].max(-1), 0)}),
    "baseline_q_uniform": ("baseline_qvalue", "baseline", lambda p: {"baseline": np.where(
        p.am, p["qvalues"].mean(-1), 0)}),
    "baseline_q_without_eps": ("qvalue_eps", "baseline", lambda p: _q_expect(p, p.cfg["alpha"], 0.0)),
    "baseline_q_without_alpha": ("qvalue_eps", "baseline", lambda p: _q_expect(p, 1.0, p.cfg["eps"])),
    "advantages_not_whitened": ("whiten_population", "advantages", lambda p: {"advantages": np.where(
        p.am, p["returns"] - p["baseline"], 0.0)}),
    **{f"whiten_{k}_{pl}" + ("" if s else "_no_shift"): (_whiten_case(k, pl, s), "advantages", _whiten_plant(k, pl, s))
       for k in ("population", "bessel") for pl in ("inside", "std", "none", "clamp") for s in (True, False)},
    "whiten_stats_off_mask": ("whiten_population", "advantages", lambda p: {"advantages": whitened(
        np.where(p.am, p["returns"] - p["baseline"], 0.0), p.am, "population", stats=np.ones_like(p.am))}),
    "whiten_per_row": ("whiten_population", "advantages", _per_row_whitening),
    "whiten_returns_not_advantages": ("whiten_population", "advantages", lambda p: {"advantages": whitened(
        np.where(p.am, p["returns"], 0.0), p.am, "population")}),
    "baseline_not_subtracted": ("base", "advantages", lambda p: {"advantages": p["returns"]}),
    "advantages_sign": ("base", "advantages", lambda p: {"advantages": -p["advantages"]}),
    **{f"aggregation_{k}": (_agg_case(k), "weights", lambda p, k=k: {"weights": weights(p.am, k)})
       for k in ("token_mean", "seq_mean", "seq_sum", "seq_mean_B", "seq_sum_B", "sum")},
    "mean_over_all_positions": ("padding_rows", "loss_pg", lambda p: {
        "loss_pg": -np.sum(p["advantages"] * p["logp"]) / p["logp"].size}),
    "loss_pg_unwhitened_advantages": ("whiten_population", "loss_pg", lambda p: {"loss_pg": -np.sum(
        p["weights"] * (p["returns"] - p["baseline"]) * p["logp"])}),
    "loss_ent_without_coef": ("entropy_coef", "loss_ent", lambda p: {"loss_ent": -np.sum(p["weights"] * p["entropy"])}),
    "loss_ent_sampled_estimate": ("entropy_coef", "loss_ent", lambda p: {"loss_ent": p.cfg["entropy_coef"] * np.sum(
        p["weights"] * p["logp"])}),
    "loss_value_without_half": ("base", "loss_value", lambda p: {"loss_value": p.cfg["value_coef"] * np.sum(
        p["weights"] * (p["values"] - p["returns"]) ** 2)}),
    "loss_value_on_advantages": ("base", "loss_value", lambda p: {"loss_value": p.cfg["value_coef"] * np.sum(
        p["weights"] * 0.5 * (p["values"] - p["advantages"]) ** 2)}),
    "loss_value_on_baseline": ("baseline_qvalue", "loss_value", lambda p: {"loss_value": p.cfg["value_coef"] * np.sum(
        p["weights"] * 0.5 * (p["baseline"] - p["returns"]) ** 2)}),
    "loss_value_without_coef": ("all_on", "loss_value", lambda p: {"loss_value": np.sum(
        p["weights"] * 0.5 * (p["values"] - p["returns"]) ** 2)}),
    "loss_without_loss_pg": ("entropy_coef", "loss", lambda p: {"loss": p["loss_ent"] + p["loss_value"]}),
    "loss_without_loss_ent": ("entropy_coef", "loss", lambda p: {"loss": p["loss_pg"] + p["loss_value"]}),
    "loss_without_loss_value": ("entropy_coef", "loss", lambda p: {"loss": p["loss_pg"] + p["loss_ent"]}),
    "loss_subtracts_loss_ent": ("entropy_coef", "loss", lambda p: {"loss": p["loss_pg"] - p["loss_ent"] +
                                                                   p["loss_value"]}),
    "loss_subtracts_loss_value": ("entropy_coef", "loss", lambda p: {"loss": p["loss_pg"] + p["loss_ent"] -
                                                                     p["loss_value"]}),
    "loss_sign": ("base", "loss_pg", lambda p: {"loss_pg": np.sum(p["weights"] * p["advantages"] * p["logp"])}),
    "sft_mean_over_all_positions": ("base", "sft_loss", lambda p: {"sft_loss": -p["sft_logp"].sum() /
                                                                   p["sft_logp"].size}),
    "sft_mean_with_column_0": ("base", "sft_loss", lambda p: {"sft_loss": -p["sft_logp"].sum() / p["mask"].sum()}),
    "sft_sum": ("base", "sft_loss", lambda p: {"sft_loss": -p["sft_logp"].sum()}),
    "sft_mean_of_row_means": ("base", "sft_loss", lambda p: {"sft_loss": -np.mean(
        [p["sft_logp"][b].sum() / max(p["mask"][b].sum() - 1, 1) for b in range(p["mask"].shape[0])])}),
    "bt_chosen_rejected_swapped": ("base", "bt_loss", lambda p: {"bt_loss": np.mean(
        np.log1p(np.exp(p["reward_chosen"] - p["reward_rejected"])))}),
    "bt_sum": ("base", "bt_loss", lambda p: {"bt_loss": np.sum(np.log1p(np.exp(p["reward_rejected"] -
                                                                                 p["reward_chosen"])))}),
    "entropy_detached": ("entropy_coef", "grad/loss_ent/", lambda p: {
        k: 0 * v for k, v in p.grads("loss_ent").items()}),
    "loss_detached": ("base", "grad/loss_pg/", lambda p: {k: 0 * v for k, v in p.grads("loss_pg").items()}),
    "gradient_sign": ("base", "grad/loss_pg/", lambda p: {k: -v for k, v in p.grads("loss_pg").items()}),
    "gradient_scaled": ("value_coef_1", "grad/loss_value/", lambda p: {k: 2 * v for k, v in
                                                                       p.grads("loss_value").items()}),
    "value_loss_body_detached": ("base", "grad/loss_value/", lambda p: {
        k: (0 * v if "/embedding." in k or "/lstm." in k else v) for k, v in p.grads("loss_value").items()}),
    "baseline_not_detached": ("base", "grad/loss_pg/", _baseline_not_detached),
    "total_gradient_lacks_loss_pg": ("entropy_coef", "grad/loss/", lambda p: _total_without(p, "loss_pg")),
    "total_gradient_lacks_loss_ent": ("entropy_coef", "grad/loss/", lambda p: _total_without(p, "loss_ent")),
    "total_gradient_lacks_loss_value": ("entropy_coef", "grad/loss/", lambda p: _total_without(p, "loss_value")),
    "stop_gradient": ("base", "grad/loss/policy/head.bias", lambda p: {
        "grad/loss/policy/head.bias": p["grad/loss/policy/head.bias"] + 1e-3}),
    "opposite_sign": ("base", "values", lambda p: {"values": -p["values"]}),
    "padding_leak": ("base", "entropy", _only_padded_rows),
    "last_action_only": ("base", "rewards", _last_action_off),
    "float32_somewhere": ("base", "values", _noise("values", 3e-7)),
    "reduced_precision": ("base", "values", _noise("values", 3e-4)),
}

#: planted in examples/torch_reference.py (autograd through the rewards)
TORCH_PLANTS = {"kl_penalty_not_detached"}


def _at_last(p, v):
    out = np.zeros_like(p["kl"])
    for b, t in p.last():
        out[b, t] = v[b]
    return out


def _R_everywhere(p):
    """R given to every row with a real token, at its last real token when it has no action."""
    r = p.with_R(p.pen(), p.last())
    for b in range(r.shape[0]):
        if not p.am[b].any():
            n = int(p["mask"][b].sum())
            r[b, n - 1 if n else r.shape[1] - 1] += p["reward"][b]
    return r


def _not_restarted(p):
    r, am, g = p["rewards"], p.am, p.cfg["gamma"]
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        acts = np.nonzero(am[b])[0]
        for i, t in enumerate(acts):
            out[b, t] = sum(g ** j * r[b, s] for j, s in enumerate(acts) if j >= i)
    return out


def _total_without(p, term):
    others = [t for t in ("loss_pg", "loss_ent", "loss_value") if t != term]
    return {k: sum(p[k.replace("grad/loss/", f"grad/{t}/")] for t in others) for k in p.grads("loss")}


# ============================================================================ the tests

def test_the_independent_forward_and_sampler_reproduce_the_golden_values(golden):
    """The plants start from a correct implementation: without a mistake it matches the golden values."""
    for name in ("base", "alpha_2", "eps_0_1", "baseline_qvalue"):
        e, a = golden[name]
        out = {**forward(a, e["config"]), **sample(a, e["config"], a["rollout/u"].astype(np.float64))}
        rep = vf.verify_case(e, a, out)
        assert rep.ok and len(rep.checked) == len(out), rep.format()


def test_every_mistake_has_a_plant():
    names = [m.name for m in mk.MISTAKES]
    assert set(PLANTS) | TORCH_PLANTS == set(names), set(names) ^ (set(PLANTS) | TORCH_PLANTS)


@pytest.mark.parametrize("name", [m.name for m in mk.MISTAKES if m.name not in TORCH_PLANTS])
def test_planted_mistake_is_named(golden, name):
    case, quantity, plant = PLANTS[name]
    e, a = golden[case]
    out = dict(gv.outputs_of(e, a))
    planted = plant(P(e, a))
    changed = {k: v for k, v in planted.items() if k in out}
    assert any(not np.array_equal(np.asarray(v, np.asarray(out[k]).dtype), out[k]) for k, v in changed.items()), \
        f"the plant of {name} changes nothing in {case}"
    for k, v in changed.items():
        v = np.asarray(v)
        out[k] = v if v.dtype == np.float32 else v.astype(out[k].dtype)
    rep = vf.verify_case(e, a, out)
    f = next((f for f in rep.findings if f.failing and f.section == gv.section_of(quantity)), None)
    assert f is not None, (name, rep.format())
    assert f.quantity.startswith(quantity), (name, f.format())
    # named, or (where another entry gives exactly the same numbers on this case) named as equally close
    assert f.mistake == name or "(as close: " in f.hint and name in f.hint.split("(as close: ")[-1], \
        (name, f.mistake, f.format())
    assert f.hint and not f.hint.startswith("(no hint"), f.hint


@pytest.fixture(scope="module")
def tr():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("torch_reference_example_mistakes", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.torch
def test_planted_kl_penalty_not_detached_is_named(tr, monkeypatch):
    import torch
    monkeypatch.setattr(tr, "kl_estimate", lambda lp, rl, k: {"k1": lp - rl, "k2": 0.5 * (lp - rl) ** 2,
                                                              "k3": torch.expm1(rl - lp) + lp - rl}[k])
    rep = vf.verify(GOLDEN, tr.run_all(GOLDEN, ["base", "all_on"]), names=["base", "all_on"])
    for c in rep.cases:
        f = c.first("rl")
        assert f.quantity.startswith("grad/loss_pg/") and f.mistake == "kl_penalty_not_detached", f.format()


# ============================================================================ issue 9: the hints are honest

def test_the_closest_mistake_wins_not_the_first_within_tolerance(golden, monkeypatch):
    """Two entries both within HINT_SLACK tolerances: the nearer one is named, though it comes later."""
    e, a = golden["base"]
    ctx = compare.Ctx(e, a)
    atol, rtol = ctx.tol("values")
    want = np.asarray(a["values"], np.float64)
    unit = atol + rtol * np.abs(want)
    am = a["action_mask"] > 0
    got = np.where(am, want + 10 * unit, want)
    far = mk.Mistake("far", ("values",), lambda c, q: np.where(am, want + 12.5 * unit, want), "far")
    near = mk.Mistake("near", ("values",), lambda c, q: np.where(am, want + 10.5 * unit, want), "near")
    monkeypatch.setattr(mk, "MISTAKES", mk.MISTAKES[:2] + (far, near) + mk.MISTAKES[2:])
    out = dict(gv.outputs_of(e, a), values=got)
    f = vf.verify_case(e, a, out).first("rl")
    assert f.quantity == "values" and f.mistake == "near", f.format()


def test_a_hint_asserts_only_what_was_checked(golden):
    """Only gradients given: the hint must not say that the values match."""
    e, a = golden["base"]
    out = {k: v for k, v in gv.outputs_of(e, a).items() if k.startswith("grad/loss/")}
    out["grad/loss/policy/head.bias"] = out["grad/loss/policy/head.bias"] + 1e-3
    f = vf.verify_case(e, a, out).first("rl")
    assert f.mistake == "stop_gradient" and "values match" not in f.hint and "no values" in f.hint, f.hint


def test_precision_hints_only_for_rounding_sized_gaps_of_the_quantity_itself(golden):
    """weights (~0.1) off by 10 %: small against the case's scale (log-probs of a few units), but not
    rounding-sized for the weights themselves: no precision hint."""
    e, a = golden["base"]
    out = dict(gv.outputs_of(e, a))
    w = out["weights"]
    out["weights"] = w * (1 + 0.1 * np.where(np.arange(w.size).reshape(w.shape) % 2, 1.0, -1.0))
    f = vf.verify_case(e, a, out).first("rl")
    assert f.quantity == "weights" and f.mistake not in ("float32_somewhere", "reduced_precision"), f.format()
    assert "precision" not in f.hint and "float32" not in f.hint


def test_a_systematic_scale_is_not_called_rounding(golden):
    e, a = golden["base"]
    out = dict(gv.outputs_of(e, a), values=a["values"] * 1.001)
    f = vf.verify_case(e, a, out).first("rl")
    assert f.quantity == "values" and f.mistake not in ("float32_somewhere", "reduced_precision"), f.format()


def test_outputs_compared_and_all_failed_is_not_nothing_checked(golden):
    e, a = golden["base"]
    rep = vf.verify(GOLDEN, {"base": {"scores": a["scores"] + 1.0}}, names=["base"])
    text = rep.format()
    assert not rep.ok and rep.exit_code == 1 and rep.n_checked == 0 and rep.n_compared == 1
    assert "nothing was checked" not in text and "FAIL base" in text


def test_verbose_lists_what_was_not_checked_once(golden):
    outs = {}
    for n in ("base", "kl_k2", "kl_k3"):
        e, a = golden[n]
        outs[n] = {k: v for k, v in gv.outputs_of(e, a).items() if k in ("logp", "kl")}
    text = vf.verify(GOLDEN, outs).format(verbose=True)
    assert text.count("not checked (not produced)") == 2, text        # base (rm, sft) and the two kl cases
    outs.pop("base")
    text = vf.verify(GOLDEN, outs).format(verbose=True)
    assert text.count("not checked (not produced)") == 1 and "in every case" in text, text


# ============================================================================ issue 9: the new conventions' slips

def _w_fixed(p, L):
    return np.where(p.am, 1.0 / (p.am.shape[0] * L), 0.0)


def _S(p):
    first = np.argmax(p.am, axis=1)
    return p["returns"][np.arange(p.am.shape[0]), first], p.am.any(axis=1)


def _group_b(p, loo, per_group=True):
    S, has = _S(p)
    g = np.asarray(p["group"])
    b = np.zeros(len(S))
    for i in np.nonzero(has)[0]:
        o = has & (g == g[i]) if per_group else has.copy()
        if loo:
            o[i] = False
        b[i] = S[o].mean()
    return np.where(p.am, b[:, None], 0.0)


def _group_sd(p, per_group=True, ddof=1):
    S, has = _S(p)
    g = np.asarray(p["group"])
    sd = np.zeros(len(S))
    for i in np.nonzero(has)[0]:
        x = S[has & (g == g[i])] if per_group else S[has]
        sd[i] = x.std(ddof=ddof)
    return sd[:, None]


def _A0(p):
    return np.where(p.am, p["returns"] - p["baseline"], 0.0)


def _gae_plant(variant):
    def plant(p):
        r, am, V = p["rewards"], p.am, p["values"]
        gamma, lam = p.cfg["gamma"], p.cfg["lam"]
        pol = params(p.a, "policy/")
        v_after = lstm_states(pol, p["tokens"]) @ pol["value.weight"][0] + pol["value.bias"][0]   # V(h_t)
        G = np.zeros_like(r)
        for b in range(r.shape[0]):
            acts = list(np.nonzero(am[b])[0])
            a_next = v_next = 0.0
            for i in reversed(range(len(acts))):
                t = acts[i]
                if variant == "bootstrap" and i == len(acts) - 1:
                    v_next = v_after[b, t]
                lam_d, lam_a = (lam, 1.0) if variant == "lambda_in_delta" else (1.0, lam)
                a = r[b, t] + gamma * lam_d * v_next - V[b, t] + gamma * lam_a * a_next
                G[b, t] = a if variant == "no_value" else a + V[b, t]
                a_next, v_next = a, V[b, t]
        return {"returns": G}
    return plant


def _ratio(p, rev=False):
    d = p["old_logp"] - p["logp"] if rev else p["logp"] - p["old_logp"]
    return np.where(p.am, np.exp(d), 0.0)


def _ppo_loss(p, pick=np.minimum, low=None, high=None, clip=True, rev=False):
    rho, A = _ratio(p, rev), p["advantages"]
    low = p.cfg["clip_low"] if low is None else low
    high = p.cfg["clip_high"] if high is None else high
    per = -pick(rho * A, np.clip(rho, 1 - low, 1 + high) * A) if clip else -rho * A
    return {"loss_pg": np.sum(p["weights"] * np.where(p.am, per, 0.0))}


def _vclip_loss(p, around_new=False, pick=np.maximum, off=False):
    c, V, G, old = p.cfg["value_clip"], p["values"], p["returns"], p["old_values"]
    vc = V + np.clip(old - V, -c, c) if around_new else old + np.clip(V - old, -c, c)
    per = (V - G) ** 2 if off else pick((V - G) ** 2, (vc - G) ** 2)
    return {"loss_value": p.cfg["value_coef"] * 0.5 * np.sum(p["weights"] * np.where(p.am, per, 0.0))}


PLANTS.update({
    "R_after_last_action": ("padding_rows", "rewards", lambda p: {"rewards": p.with_R(
        p.pen(), [(b, t + 1) for b, t in p.last() if t + 1 < p.am.shape[1]])}),
    "logits_labels_shifted_twice": ("base", "logp", lambda p: {"logp": np.where(p.am, np.take_along_axis(
        np.roll(p["logq"], 1, axis=1), p["tokens"][:, :, None], -1)[..., 0], 0.0)}),
    "aggregation_fixed_len_longest": ("agg_fixed_len_norm", "weights", lambda p: {
        "weights": _w_fixed(p, p.am.sum(1).max())}),
    "aggregation_fixed_len_width": ("agg_fixed_len_norm", "weights", lambda p: {
        "weights": _w_fixed(p, p.am.shape[1])}),
    "kl_in_reward_not_loss": ("kl_in_loss_k1", "rewards", lambda p: {"rewards": p.with_R(p.pen(), p.last())}),
    "kl_in_loss_not_reward": ("base", "rewards", lambda p: {"rewards": p.with_R(np.zeros_like(p["kl"]), p.last())}),
    "gae_lambda_in_delta": ("gae_lam_0_95", "returns", _gae_plant("lambda_in_delta")),
    "gae_returns_are_advantages": ("gae_lam_0_95", "returns", _gae_plant("no_value")),
    "gae_value_next_not_zeroed": ("gae_lam_0_95", "returns", _gae_plant("bootstrap")),
    "baseline_group_mean": ("group_loo", "baseline", lambda p: {"baseline": _group_b(p, loo=False)}),
    "baseline_group_loo": ("group_mean", "baseline", lambda p: {"baseline": _group_b(p, loo=True)}),
    "group_baseline_over_batch": ("group_mean", "baseline", lambda p: {
        "baseline": _group_b(p, loo=False, per_group=False)}),
    "group_std_over_batch": ("group_std", "advantages", lambda p: {
        "advantages": np.where(p.am, _A0(p) / (_group_sd(p, per_group=False) + p.cfg["group_eps"]), 0.0)}),
    "group_std_population": ("group_std", "advantages", lambda p: {
        "advantages": np.where(p.am, _A0(p) / (_group_sd(p, ddof=0) + p.cfg["group_eps"]), 0.0)}),
    "group_eps_inside_sqrt": ("group_std_eps", "advantages", lambda p: {
        "advantages": np.where(p.am, _A0(p) / np.sqrt(_group_sd(p) ** 2 + p.cfg["group_eps"]), 0.0)}),
    "group_scale_missing": ("group_std", "advantages", lambda p: {"advantages": _A0(p)}),
    "ppo_clip_max_not_min": ("ppo_clip", "loss_pg", lambda p: _ppo_loss(p, pick=np.maximum)),
    "ppo_clip_bounds_swapped": ("dapo_clip_higher", "loss_pg", lambda p: _ppo_loss(
        p, low=p.cfg["clip_high"], high=p.cfg["clip_low"])),
    "ppo_unclipped": ("ppo_clip", "loss_pg", lambda p: _ppo_loss(p, clip=False)),
    "ppo_ratio_reversed": ("ppo_clip", "ratio", lambda p: {"ratio": _ratio(p, rev=True)}),
    "reinforce_instead_of_ppo": ("ppo_clip", "loss_pg", lambda p: {
        "loss_pg": -np.sum(p["weights"] * p["advantages"] * p["logp"])}),
    "value_clip_around_new": ("value_clip", "loss_value", lambda p: _vclip_loss(p, around_new=True)),
    "value_clip_min_not_max": ("value_clip", "loss_value", lambda p: _vclip_loss(p, pick=np.minimum)),
    "value_clip_missing": ("value_clip", "loss_value", lambda p: _vclip_loss(p, off=True)),
    "loss_kl_without_beta": ("kl_in_loss_k1", "loss_kl", lambda p: {"loss_kl": np.sum(p["weights"] * p["kl"])}),
    "loss_kl_sign": ("kl_in_loss_k1", "loss_kl", lambda p: {"loss_kl": -p["loss_kl"]}),
    "loss_without_loss_kl": ("kl_in_loss_k1", "loss", lambda p: {
        "loss": p["loss_pg"] + p["loss_ent"] + p["loss_value"]}),
    "ppo_old_logp_not_detached": ("ppo_clip_ratio_one", "grad/loss_pg/", lambda p: {
        k: 0 * v for k, v in p.grads("loss_pg").items()}),
})


# ============================================================================ issue 9: the measurement

def test_the_independent_implementation_unplanted_is_clean_on_every_case(golden):
    """0 false alarms: its forward pass and sampler, on every case, give a clean report."""
    for name, (e, a) in golden.items():
        out = {}
        if "rl" in e["sections"]:
            out.update(forward(a, e["config"]))
        if "rollout" in e["sections"]:
            out.update(sample(a, e["config"], a["rollout/u"].astype(np.float64)))
        rep = vf.verify_case(e, a, out)
        assert rep.ok and not rep.findings, (name, rep.format())


def _named(golden, name):
    """(caught, named right, named or tied as equally close) for one planted mistake."""
    case, quantity, plant = PLANTS[name]
    e, a = golden[case]
    out = dict(gv.outputs_of(e, a))
    for k, v in plant(P(e, a)).items():
        if k in out:
            v = np.asarray(v)
            out[k] = v if v.dtype == np.float32 else v.astype(out[k].dtype)
    rep = vf.verify_case(e, a, out)
    f = next((f for f in rep.findings if f.failing and f.section == gv.section_of(quantity)), None)
    if f is None:
        return False, False, False
    tied = "(as close: " in f.hint and name in f.hint.split("(as close: ")[-1]
    return True, f.mistake == name, f.mistake == name or tied


def test_share_of_planted_mistakes_named_right(golden, capsys):
    """Issue 9's measurement over the whole catalogue (docs/golden-vectors.md §4): every planted
    mistake caught, ≥ 95 % named right (the exact entry; ties, where two entries give the same
    numbers on the case, count as wrong here)."""
    names = [m.name for m in mk.MISTAKES if m.name not in TORCH_PLANTS]
    res = {n: _named(golden, n) for n in names}
    caught = sum(r[0] for r in res.values())
    right = sum(r[1] for r in res.values())
    tied = sum(r[2] for r in res.values())
    with capsys.disabled():
        print(f"\nplanted mistakes: {len(names)}; caught {caught} ({caught / len(names):.1%}); named right "
              f"{right} ({right / len(names):.1%}); named or tied as equally close {tied} "
              f"({tied / len(names):.1%}); not named right: "
              + ", ".join(n for n, r in res.items() if not r[1]))
    assert len(names) >= 60
    assert caught == len(names), [n for n, r in res.items() if not r[0]]
    assert right >= 0.95 * len(names), [n for n, r in res.items() if not r[1]]


def chain(a, cfg, f):
    """The REINFORCE chain from the forward outputs ``f``, written here from docs/conventions.md:
    kl, rewards, returns, baseline, advantages, ratio, weights and the losses."""
    am = a["action_mask"] > 0
    B, T = am.shape
    on = lambda x: np.where(am, x, 0.0)  # noqa: E731
    x = on(f["logp"] - f["ref_logp"])
    k = {"k1": x, "k2": 0.5 * x ** 2, "k3": np.expm1(-x) + x}[cfg["kl"]]
    kl = on(k)
    last = [(b, int(np.nonzero(am[b])[0][-1])) for b in range(B) if am[b].any()]
    r = on(-cfg["beta"] * kl) if cfg["kl_in"] == "reward" else np.zeros((B, T))
    for b, t in last:
        r[b, t] += a["reward"][b]
    V = f.get("values")
    if cfg["returns"] == "gae":
        G = np.zeros((B, T))
        for b in range(B):
            a_next = v_next = 0.0
            for t in reversed(np.nonzero(am[b])[0]):
                a_next = r[b, t] + cfg["gamma"] * v_next - V[b, t] + cfg["gamma"] * cfg["lam"] * a_next
                v_next = V[b, t]
                G[b, t] = a_next + V[b, t]
    else:
        G = returns(r, am, cfg["gamma"], cfg["returns"])
    has = am.any(1)
    S = np.where(has, G[np.arange(B), np.argmax(am, 1)], 0.0)
    grp = np.asarray(a["group"]) if "group" in a else None
    kind = cfg["baseline"]
    if kind == "value":
        bl = on(V)
    elif kind == "qvalue":
        bl = on((np.exp(f["logq"]) * f["qvalues"]).sum(-1))
    elif kind == "none":
        bl = np.zeros((B, T))
    elif kind == "mean":
        bl = on(np.full((B, T), G[am].mean()))
    elif kind == "loo":
        bl = on(np.array([G[am & (np.arange(B) != b)[:, None]].mean() for b in range(B)])[:, None])
    else:
        bl = np.zeros(B)
        for i in np.nonzero(has)[0]:
            o = has & (grp == grp[i])
            if kind == "group_loo":
                o[i] = False
            bl[i] = S[o].mean()
        bl = on(bl[:, None])
    A = on(G - bl)
    if cfg["group_scale"] == "std":
        sd = np.zeros(B)
        for i in np.nonzero(has)[0]:
            sd[i] = S[has & (grp == grp[i])].std(ddof=1)
        A = on(A / (sd[:, None] + cfg["group_eps"]))
    if cfg["whiten"] != "off":
        A = whitened(A, am, cfg["whiten"], shift=cfg["shift_mean"])
    old = a["old_logp"] if "old_logp" in a else f["logp"]
    rho = on(np.exp(f["logp"] - old))
    if cfg["aggregation"] == "fixed_len":
        w = np.where(am, 1.0 / (B * (cfg["norm_len"] or T)), 0.0)
    else:
        w = weights(am, cfg["aggregation"])
    if cfg["surrogate"] == "ppo_clip":
        per = -np.minimum(rho * A, np.clip(rho, 1 - cfg["clip_low"], 1 + cfg["clip_high"]) * A)
    else:
        per = -A * f["logp"]
    pred = on(V) if cfg["critic"] == "value" else on(np.take_along_axis(
        f["qvalues"], a["tokens"][:, :, None], -1)[..., 0])
    err2 = (pred - G) ** 2
    if cfg["value_clip"] > 0:
        ov, c = a["old_values"], cfg["value_clip"]
        err2 = np.maximum(err2, (ov + np.clip(pred - ov, -c, c) - G) ** 2)
    out = {"kl": kl, "rewards": r, "returns": G, "baseline": bl, "advantages": A, "ratio": rho, "weights": w,
           "loss_pg": np.sum(w * on(per)), "loss_ent": -cfg["entropy_coef"] * np.sum(w * f["entropy"]),
           "loss_value": cfg["value_coef"] * 0.5 * np.sum(w * on(err2)),
           "loss_kl": cfg["beta"] * np.sum(w * kl) if cfg["kl_in"] == "loss" else 0.0}
    out["loss"] = out["loss_pg"] + out["loss_ent"] + out["loss_value"] + out["loss_kl"]
    return out


def test_the_independent_chain_unplanted_is_clean_on_every_case(golden):
    """0 false alarms on the whole objective: the forward pass, the sampler and the chain above
    (every switch of the table), on every case, give a clean report with every value compared."""
    for name, (e, a) in golden.items():
        if "rl" not in e["sections"]:
            continue
        f = forward(a, e["config"])
        out = {**f, **chain(a, e["config"], f)}
        out = {k: v for k, v in out.items() if k in e["outputs"]}
        rep = vf.verify_case(e, a, out)
        assert rep.ok and not rep.findings and len(rep.checked) == len(out), (name, rep.format())
