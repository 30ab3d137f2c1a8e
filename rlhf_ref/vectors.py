"""Golden vectors: versioned test cases that any implementation, in any language, can check itself on.

``rlhf-ref vectors --out DIR`` writes ``DIR/manifest.json`` and one ``DIR/<case>.npz`` per case;
the format is documented in docs/golden-vectors.md (enough to write a reader without this code).
``rlhf-ref verify`` (rlhf_ref.verify) compares another implementation's outputs with them.

A case is one configuration of the objective (every convention of DESIGN.md §3 by name) and
every array of one pass through it, in data-flow order:

    params   policy/<name>  ref/<name>  rm/<name>         PyTorch state-dict names (DESIGN.md §2)
    rollout  rollout/prompt_tokens, prompt_len, u  ->  rollout/tokens, mask, action_mask, logp
    rl       tokens, mask, prompt_len, reward      ->  action_mask, scores, logq, logp, ref_logp,
             entropy, kl, rewards, returns, values | qvalues, baseline, advantages, weights,
             loss_pg, loss_ent, loss_value, loss, grad/<loss term>/policy/<name> (each term, then the total)
    sft      (the rl batch)                        ->  sft_logp, sft_loss, grad/sft_loss/policy/<name>
    rm       chosen, chosen_mask, rejected, rejected_mask -> reward_chosen, reward_rejected, bt_loss,
             grad/bt_loss/rm/<name>

Expected values are computed by the reference in float64 from the stored inputs and, in a
float32 case, rounded to float32 once at the end (the inputs of a float32 case are float32, so
the float64 computation starts from exactly the numbers an implementation reads). ``compute``
does that from a case's inputs; the test suite reruns it on the stored files.

Files are reproducible byte for byte: fixed seeds (derived from each case's name), the zip
archive written here with fixed timestamps, attributes and member order and without ZIP64 records
(``np.savez`` of NumPy 2.4 is byte-stable too, but that depends on the NumPy version, and it forces
ZIP64), and JSON with a fixed key order. Each file is written
atomically (``rlhf_ref.io.atomic_write_bytes``: temporary file in the same folder, flush, fsync,
``os.replace``).
"""

from __future__ import annotations

import argparse
import hashlib
import io as _io
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import lstm, model, policy, reinforce, reward_model, rollout as _rollout, sft
from . import returns as ret
from .tokenizer import BOS, EOS, PAD

SCHEMA = "rlhf_ref.golden_vectors"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GATE_ORDER = ("i", "f", "g", "o")

V, E, H = 7, 3, 4          #: vocabulary (PAD, BOS, EOS, UNK and 3 characters), embedding, hidden
B, T = 4, 8                #: episodes and positions of the rollout and of most rl batches
P = 3                      #: preference pairs of the rm section
U_MARGIN = 1e-3            #: every used uniform lies at least this far from every CDF boundary

# ------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class CaseSpec:
    """One golden case: a configuration (changes from ReinforceConfig's defaults) and an input recipe."""
    name: str
    description: str
    config: dict = field(default_factory=dict)      #: ReinforceConfig fields that differ from the defaults
    dtype: str = "float64"
    edge: str = ""                                  #: "", single_token, padding_rows, small_variance
    sections: tuple = ("rollout", "rl")


def _c(name, description, dtype="float64", edge="", sections=("rollout", "rl"), **config):
    return CaseSpec(name, description, dict(config), dtype, edge, tuple(sections))


ALL_SECTIONS = ("rollout", "rl", "sft", "rm")
ALL_ON = dict(alpha=1.5, eps=0.05, gamma=0.95, beta=0.1, kl="k3", whiten="bessel", aggregation="seq_sum",
              entropy_coef=0.01, value_coef=0.25)

CASES = (
    # the defaults of DESIGN.md §3, in both dtypes, with every section
    _c("base", "DESIGN.md defaults (alpha 1, eps 0, gamma 1, beta 0.05, k1, reward-to-go, value baseline, "
       "no whitening, token mean, c_H 0, c_V 0.5)", sections=ALL_SECTIONS),
    _c("base_f32", "the defaults in float32", dtype="float32", sections=ALL_SECTIONS),
    # one switch at a time
    _c("alpha_2", "inverse temperature alpha = 2 (temperature 0.5) for sampling AND scoring, policy and reference",
       alpha=2.0),
    _c("alpha_0_5", "inverse temperature alpha = 0.5 (temperature 2)", alpha=0.5),
    _c("eps_0_1", "trainable epsilon-mixture, eps = 0.1 (sampling, scoring, entropy, reference)", eps=0.1),
    _c("gamma_0_9", "discount gamma = 0.9 with reward-to-go", gamma=0.9),
    _c("beta_0", "no KL penalty (beta = 0)", beta=0.0),
    _c("beta_0_5", "a large KL penalty (beta = 0.5)", beta=0.5),
    _c("kl_k2", "KL estimator k2 = x^2/2 in the reward", kl="k2"),
    _c("kl_k3", "KL estimator k3 = expm1(-x) + x in the reward (ratio pi_ref/pi)", kl="k3"),
    _c("returns_total", "returns 'total': sum_j gamma^j r_j written at every action", returns="total"),
    _c("baseline_none", "no baseline (the value head is still trained)", baseline="none"),
    _c("baseline_mean", "batch-mean baseline (the row itself included)", baseline="mean"),
    _c("baseline_loo", "leave-one-out baseline (the other rows' actions)", baseline="loo"),
    _c("baseline_qvalue", "action-value critic: baseline sum_a pi(a|s) Q(s, a), L_value on Q(s, a_t)",
       baseline="qvalue"),
    _c("whiten_population", "advantage whitening, population variance", whiten="population"),
    _c("whiten_bessel", "advantage whitening, Bessel-corrected variance", whiten="bessel"),
    _c("whiten_no_shift", "population whitening with shift_mean = False (the mean is added back)",
       whiten="population", shift_mean=False),
    _c("agg_seq_mean", "aggregation seq_mean (each row's token mean, averaged over rows)", aggregation="seq_mean"),
    _c("agg_seq_sum", "aggregation seq_sum (sum over actions / rows with an action)", aggregation="seq_sum"),
    _c("entropy_coef", "entropy bonus c_H = 0.05", entropy_coef=0.05),
    _c("value_coef_1", "value coefficient c_V = 1", value_coef=1.0),
    # interactions that change numbers
    _c("total_gamma_0_9", "total returns with gamma = 0.9 (gamma^j counted from each row's first action)",
       returns="total", gamma=0.9),
    _c("qvalue_eps", "action-value baseline under the eps-mixture (the expectation uses pi_eps)",
       baseline="qvalue", eps=0.1, alpha=1.5),
    _c("whiten_none_baseline", "population whitening of raw returns (baseline none)", whiten="population",
       baseline="none"),
    _c("whiten_bessel_loo", "Bessel whitening after the leave-one-out baseline", whiten="bessel", baseline="loo"),
    _c("seq_mean_gamma_k3", "seq_mean aggregation, gamma = 0.9, k3", aggregation="seq_mean", gamma=0.9, kl="k3"),
    _c("all_on", "every switch away from its default at once", **ALL_ON),
    _c("all_on_f32", "every switch away from its default at once, float32", dtype="float32", **ALL_ON),
    _c("qvalue_f32", "action-value critic in float32", dtype="float32", baseline="qvalue", entropy_coef=0.05),
    # edge cases
    _c("single_token", "every row has exactly one action (the prompt fills all but the last position)",
       edge="single_token", entropy_coef=0.05),
    _c("padding_rows", "an all-padding row, a prompt-only row (no action), two extra padding columns and "
       "arbitrary ids at padding positions: none of them may change any result", edge="padding_rows",
       sections=ALL_SECTIONS, entropy_coef=0.05),
    _c("padding_rows_seq_mean_loo", "padding rows with seq_mean, leave-one-out and Bessel whitening "
       "(rows without an action are not counted)", edge="padding_rows", aggregation="seq_mean", baseline="loo",
       whiten="bessel"),
    _c("peaked", "very peaked policy: alpha = 20", alpha=20.0, entropy_coef=0.05),
    _c("peaked_f32", "very peaked policy, alpha = 20, float32", dtype="float32", alpha=20.0, entropy_coef=0.05),
    _c("whiten_small_variance", "population whitening of advantages whose variance (~1e-8) is comparable to the "
       "1e-8 inside the square root: where the eps goes shows", edge="small_variance", beta=0.0,
       baseline="none", whiten="population"),
)


def case_names():
    return [c.name for c in CASES]


def get_spec(name):
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(f"no golden case named {name!r}; cases: {', '.join(case_names())}")


def config_of(spec):
    """The full configuration of a case by convention name (every field, defaults included)."""
    cfg = reinforce.ReinforceConfig(**spec.config)
    d = cfg.to_dict()
    d.update({"whiten_eps": ret.WHITEN_EPS, "critic": cfg.critic, "policy_kind": "boltzmann",
              "eos_id": EOS, "layout": "token-aligned", "dtype": spec.dtype})
    return d


def _seed(name):
    """A seed from the case name, so that adding a case leaves the others unchanged."""
    return int.from_bytes(hashlib.sha256(("rlhf_ref golden " + name).encode()).digest()[:8], "little")


# ------------------------------------------------------------------------------------ the inputs

_BODY_HEAD = lstm.BODY_KEYS + ("head.weight", "head.bias")


def _params(rng, spec, dt):
    """Policy (head + critic), a frozen reference near it, and a reward model; rounded to dt."""
    cfg = reinforce.ReinforceConfig(**spec.config)
    pol = lstm.init_params(V, E, H, rng, heads=("head", cfg.critic))
    pol["head.weight"] *= 2.0                                  # scores of order 1: distributions not flat
    pol["head.bias"][[PAD, BOS]] -= 2.0                        # PAD and BOS rarely sampled (still possible)
    pol["head.bias"][EOS] -= 0.3                               # rows of varied length
    if cfg.critic == "qvalue":
        pol["qvalue.bias"] += 0.5
    ref = {k: pol[k] + 0.25 * rng.standard_normal(pol[k].shape) for k in _BODY_HEAD}
    rm = lstm.init_params(V, E, H, rng, heads=("reward",))
    rm["reward.weight"] *= 3.0
    cast = lambda d: {k: np.asarray(v, dt) for k, v in d.items()}  # noqa: E731
    return cast(pol), cast(ref), cast(rm)


def _prompts(rng, Bn, Tn, lo=1, hi=3):
    pl = rng.integers(lo, hi + 1, size=Bn)
    tok = np.zeros((Bn, Tn), np.int64)
    tok[:, 0] = BOS
    for b in range(Bn):
        tok[b, 1:pl[b]] = rng.integers(3, V, size=pl[b] - 1)
    return tok, pl.astype(np.int64)


def _cdf_distance(params, out, u, alpha, eps):
    """min_k |u − cdf_k| at every action of a rollout (B, T); +inf off the action mask."""
    fwd, _ = model.forward(params, out["tokens"], out["mask"])
    q = np.exp(policy.logprobs(fwd["scores"], alpha, eps))
    cdf = np.cumsum(q, axis=-1)
    d = np.min(np.abs(u[:, :, None] - cdf), axis=-1)
    return np.where(out["action_mask"] > 0, d, np.inf)


def _uniforms(rng, params64, prompt_tokens, prompt_len, alpha, eps, Bn, Tn):
    """Uniforms u (B, T) such that every used one lies U_MARGIN or more from every CDF boundary,
    so that float32 and other backends sample the same tokens (no tie within rounding)."""
    u = rng.random((Bn, Tn))
    for _ in range(10_000):
        out = _rollout.rollout(params64, prompt_tokens, prompt_len, u, alpha, eps)
        d = _cdf_distance(params64, out, u, alpha, eps)
        bad = np.argwhere(d < U_MARGIN)
        if bad.size == 0:
            return u
        b, t = bad[0]
        u[b, t] = rng.random()
    raise RuntimeError("could not draw uniforms away from the CDF boundaries")  # pragma: no cover


def _pairs(rng, Tn, garbage=False):
    """P preference pairs: BOS + characters (+ EOS sometimes), right-padded."""
    def side():
        tok = np.zeros((P, Tn), np.int64)
        mask = np.zeros((P, Tn), np.int64)
        for p in range(P):
            n = int(rng.integers(2, Tn + 1))
            tok[p, 0] = BOS
            tok[p, 1:n] = rng.integers(3, V, size=n - 1)
            if rng.random() < 0.5:
                tok[p, n - 1] = EOS
            mask[p, :n] = 1
            if garbage:
                tok[p, n:] = rng.integers(0, V, size=Tn - n)
        return tok, mask
    c, cm = side()
    r, rmask = side()
    return c, cm, r, rmask


def make_inputs(spec):
    """The inputs of a case (a dict in data-flow order), in the case's dtype; deterministic."""
    rng = np.random.default_rng(_seed(spec.name))
    dt = np.dtype(spec.dtype)
    cfg = reinforce.ReinforceConfig(**spec.config)
    pol, ref, rm = _params(rng, spec, dt)
    pol64 = {k: v.astype(np.float64) for k, v in pol.items()}
    arrays = {}
    for prefix, d in (("policy/", pol), ("ref/", ref)):
        arrays.update({prefix + k: v for k, v in d.items()})
    if "rm" in spec.sections:
        arrays.update({"rm/" + k: v for k, v in rm.items()})

    # rollout: prompts, uniforms -> the sampled batch (the rl batch is built from it)
    if spec.edge == "single_token":
        ptok, pl = _prompts(rng, B, T, lo=T - 1, hi=T - 1)
    else:
        ptok, pl = _prompts(rng, B, T)
    u = _uniforms(rng, pol64, ptok, pl, cfg.alpha, cfg.eps, B, T).astype(dt)
    # the stored u (rounded to dt) is the u used: recheck the margin with it
    u64 = u.astype(np.float64)
    ro = _rollout.rollout(pol64, ptok, pl, u64, cfg.alpha, cfg.eps)
    assert np.all(_cdf_distance(pol64, ro, u64, cfg.alpha, cfg.eps) >= U_MARGIN / 2)
    if "rollout" in spec.sections:
        arrays.update({"rollout/prompt_tokens": ptok, "rollout/prompt_len": pl, "rollout/u": u})

    tokens, mask, prompt_len = ro["tokens"].copy(), ro["mask"].astype(np.int64), pl.copy()
    reward = rng.standard_normal(B)
    if spec.edge == "small_variance":
        reward = 1.0 + 1e-4 * reward
    if spec.edge == "padding_rows":
        # row B: all padding; row B+1: a prompt only (no action); two extra padding columns;
        # arbitrary ids at every padding position; the rewards of rows without an action are ignored
        Tp = T + 2
        tok2 = np.zeros((B + 2, Tp), np.int64)
        m2 = np.zeros((B + 2, Tp), np.int64)
        tok2[:B, :T], m2[:B, :T] = tokens, mask
        tok2[B + 1, :3] = [BOS, 4, 5]
        m2[B + 1, :3] = 1
        pad = m2 == 0
        tok2[pad] = rng.integers(0, V, size=int(pad.sum()))
        tokens, mask = tok2, m2
        prompt_len = np.concatenate([prompt_len, [0, 3]]).astype(np.int64)
        reward = np.concatenate([reward, [1.5, -2.0]])
    arrays.update({"tokens": tokens, "mask": mask, "prompt_len": prompt_len, "reward": reward.astype(dt)})

    if "rm" in spec.sections:
        c, cm, r, rmask = _pairs(rng, T, garbage=spec.edge == "padding_rows")
        arrays.update({"chosen": c, "chosen_mask": cm, "rejected": r, "rejected_mask": rmask})
    return arrays


# ------------------------------------------------------------------------------------ the outputs

def _split(arrays, prefix):
    n = len(prefix)
    return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix)}


def compute(inputs, config, sections, dtype=None):
    """Every output of a case from its inputs, by the reference, in data-flow order.

    ``config``: the case's configuration (``config_of`` or the manifest's ``config``).
    ``dtype=None`` (how golden values are made): compute in float64 from the inputs and round the
    float outputs to the case's dtype at the end. ``dtype=np.float32`` etc.: run the reference
    natively in that dtype (the test suite uses it to check the verifier's tolerances).
    """
    case_dt = np.dtype(config["dtype"])
    run_dt = np.float64 if dtype is None else np.dtype(dtype)
    fl = lambda a: np.asarray(a, run_dt)  # noqa: E731
    cfg = reinforce.ReinforceConfig(**{k: config[k] for k in reinforce.ReinforceConfig.__dataclass_fields__})
    pol = {k: fl(v) for k, v in _split(inputs, "policy/").items()}
    ref = {k: fl(v) for k, v in _split(inputs, "ref/").items()}
    out = {}
    if "rollout" in sections:
        ro = _rollout.rollout(pol, inputs["rollout/prompt_tokens"], inputs["rollout/prompt_len"],
                              fl(inputs["rollout/u"]), cfg.alpha, cfg.eps, eos_id=config["eos_id"])
        out["rollout/tokens"] = ro["tokens"]
        out["rollout/mask"] = ro["mask"].astype(np.int64)
        out["rollout/action_mask"] = ro["action_mask"].astype(np.int64)
        out["rollout/logp"] = ro["logp"]
    if "rl" in sections:
        tokens, mask, pl = inputs["tokens"], inputs["mask"], inputs["prompt_len"]
        o, g = reinforce.loss_and_grad(pol, tokens, mask, pl, fl(inputs["reward"]), cfg, ref_params=ref,
                                       term_grads=True)
        pm = model.position_mask(mask)
        out["action_mask"] = o["action_mask"].astype(np.int64)
        out["scores"] = o["scores"]
        out["logq"] = np.where(pm[:, :, None] > 0, o["logq"], 0.0)   # 0 off the position mask, like scores
        for k in ("logp", "ref_logp", "entropy", "kl", "rewards", "returns"):
            out[k] = o[k]
        out[cfg.critic + "s"] = o[cfg.critic + "s"]
        for k in ("baseline", "advantages", "weights", "loss_pg", "loss_ent", "loss_value", "loss"):
            out[k] = o[k]
        for term, key in (("pg", "loss_pg"), ("ent", "loss_ent"), ("value", "loss_value")):
            out.update({f"grad/{key}/policy/{k}": v for k, v in g["terms"][term].items()})
        out.update({f"grad/loss/policy/{k}": g[k] for k in pol})
    if "sft" in sections:
        o, g = sft.loss_and_grad(pol, inputs["tokens"], inputs["mask"])
        out["sft_logp"] = o["logp"]
        out["sft_loss"] = o["loss"]
        out.update({f"grad/sft_loss/policy/{k}": g[k] for k in pol})
    if "rm" in sections:
        rm = {k: fl(v) for k, v in _split(inputs, "rm/").items()}
        o, g = reward_model.bt_loss_and_grad(rm, inputs["chosen"], inputs["chosen_mask"],
                                             inputs["rejected"], inputs["rejected_mask"])
        out["reward_chosen"] = o["reward_chosen"]
        out["reward_rejected"] = o["reward_rejected"]
        out["bt_loss"] = o["loss"]
        out.update({f"grad/bt_loss/rm/{k}": g[k] for k in rm})
    res = {}
    for k, v in out.items():
        a = np.asarray(v)
        res[k] = a.astype(case_dt if dtype is None else run_dt) if a.dtype.kind == "f" else a.astype(np.int64)
    return res


# ------------------------------------------------------------------------------------ descriptions

#: name (or pattern with <...>) -> (zero_off, time_aligned, what); zero_off names the mask off which
#: the entry is exactly 0 ("position" = mask with column 0 cleared); time_aligned: axis 1 is time
#: and moves in the shifted (B, T-1) layout.
QUANTITIES = {
    "policy/<name>": (None, False, "trainable policy parameters (embedding, lstm, head, value or qvalue)"),
    "ref/<name>": (None, False, "frozen reference policy (embedding, lstm, head)"),
    "rm/<name>": (None, False, "reward model (embedding, lstm, reward)"),
    "rollout/prompt_tokens": (None, False, "(B, T) int64: BOS and the prompt, 0 after prompt_len"),
    "rollout/prompt_len": (None, False, "(B,) int64: prompt length, BOS included (>= 1)"),
    "rollout/u": (None, False, "(B, T) uniforms in [0, 1): u[:, t] draws token t; unused at prompt/padding"),
    "rollout/tokens": (None, False, "(B, T) int64: prompt + sampled response (EOS ends a row), 0 after"),
    "rollout/mask": (None, False, "(B, T) int64: 1 on real tokens of the sampled batch"),
    "rollout/action_mask": ("rollout/mask", True, "(B, T) int64: 1 on the sampled tokens"),
    "rollout/logp": ("rollout/action_mask", True, "(B, T): log q(a_t|s_t) of each sampled token (the sampler's)"),
    "tokens": (None, False, "(B, T) int64: the rl batch (ids at padding positions are arbitrary, never read)"),
    "mask": (None, False, "(B, T) int64: 1 on real tokens, right padding"),
    "prompt_len": (None, False, "(B,) int64: tokens before the response, BOS included (0 on an all-padding row)"),
    "reward": (None, False, "(B,): sequence reward R, added at each row's last action (ignored without one)"),
    "action_mask": ("mask", True, "(B, T) int64: mask and t >= prompt_len"),
    "scores": ("position", True, "(B, T, V): z[:, t] = head(h_{t-1}), 0 at column 0 and padding"),
    "logq": ("position", True, "(B, T, V): log pi(.|s_t), the full log-distribution (alpha, eps applied)"),
    "logp": ("action_mask", True, "(B, T): log pi(a_t|s_t) of the taken token"),
    "ref_logp": ("action_mask", True, "(B, T): log pi_ref(a_t|s_t), same alpha and eps"),
    "entropy": ("action_mask", True, "(B, T): H(pi(.|s_t)) of the full distribution"),
    "kl": ("action_mask", True, "(B, T): per-token KL estimate k_t (k1, k2 or k3 of x = logp - ref_logp)"),
    "rewards": ("action_mask", True, "(B, T): -beta k_t, + R at the row's last action"),
    "returns": ("action_mask", True, "(B, T): G_t (reward-to-go or total)"),
    "values": ("position", True, "(B, T): V(s_t) = value(h_{t-1}) (value critic)"),
    "qvalues": ("position", True, "(B, T, V): Q(s_t, .) = qvalue(h_{t-1}) (qvalue critic)"),
    "baseline": ("action_mask", True, "(B, T): b_t"),
    "advantages": ("action_mask", True, "(B, T): A_t = G_t - b_t, whitened if configured"),
    "weights": ("action_mask", True, "(B, T): aggregation weights w, L = sum w * per-token term"),
    "loss_pg": (None, False, "(): -sum w A logp"),
    "loss_ent": (None, False, "(): -c_H sum w H"),
    "loss_value": (None, False, "(): c_V 1/2 sum w (V - G)^2 (Q(s_t, a_t) for the qvalue critic)"),
    "loss": (None, False, "(): loss_pg + loss_ent + loss_value"),
    "grad/<loss>/policy/<name>": (None, False, "dL/dparam for loss_pg, loss_ent, loss_value and loss (total)"),
    "sft_logp": ("position", True, "(B, T): log softmax(z_t)[tokens_t] at real t >= 1 (alpha = 1, eps = 0)"),
    "sft_loss": (None, False, "(): next-token cross-entropy, token mean over real t >= 1"),
    "grad/sft_loss/policy/<name>": (None, False, "dL_sft/dparam"),
    "chosen": (None, False, "(P, Tp) int64: preferred sequences"),
    "chosen_mask": (None, False, "(P, Tp) int64"),
    "rejected": (None, False, "(P, Tp) int64"),
    "rejected_mask": (None, False, "(P, Tp) int64"),
    "reward_chosen": (None, False, "(P,): r(chosen), read at the last real token"),
    "reward_rejected": (None, False, "(P,): r(rejected)"),
    "bt_loss": (None, False, "(): mean logaddexp(0, -(r_chosen - r_rejected))"),
    "grad/bt_loss/rm/<name>": (None, False, "dL_RM/dparam"),
}


def quantity_of(name):
    """The QUANTITIES key that describes array ``name``."""
    if name in QUANTITIES:
        return name
    parts = name.split("/")
    if parts[0] in ("policy", "ref", "rm") and len(parts) == 2:
        return parts[0] + "/<name>"
    if parts[0] == "grad" and len(parts) == 4:
        if parts[1] == "sft_loss":
            return "grad/sft_loss/policy/<name>"
        if parts[1] == "bt_loss":
            return "grad/bt_loss/rm/<name>"
        return "grad/<loss>/policy/<name>"
    raise KeyError(f"unknown golden array name {name!r}")


def zero_off(name):
    return QUANTITIES[quantity_of(name)][0]


def time_aligned(name):
    return QUANTITIES[quantity_of(name)][1]


def section_of(name):
    if name.startswith("rollout/"):
        return "rollout"
    if name.startswith(("policy/", "ref/", "rm/")):
        return "params"
    if name.startswith("grad/sft_loss/") or name.startswith("sft_"):
        return "sft"
    if name.startswith("grad/bt_loss/") or name in ("chosen", "chosen_mask", "rejected", "rejected_mask",
                                                    "reward_chosen", "reward_rejected", "bt_loss"):
        return "rm"
    return "rl"


# ------------------------------------------------------------------------------------ files

def npz_bytes(arrays):
    """A NumPy ``.npz`` (zip, stored, one ``<name>.npy`` member per array in the given order) with
    fixed timestamps and attributes: equal arrays give equal bytes. ``np.load`` reads it."""
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.hasobject:
                raise TypeError(f"{name}: object arrays cannot be stored without pickle")
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.create_system = 3                                     # unix, whatever the host
            member = _io.BytesIO()
            np.lib.format.write_array(member, a if a.flags.c_contiguous else a.copy(order="C"), allow_pickle=False)
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def dumps(obj, indent=""):
    """JSON with one key per line, lists of scalars on one line (short, diff-friendly, deterministic)."""
    nxt = indent + " "
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{nxt}{json.dumps(k, ensure_ascii=False)}: {dumps(v, nxt)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(nxt + dumps(v, nxt) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def _write_bytes(path, data):
    from .io import atomic_write_bytes
    atomic_write_bytes(path, data)


def build_case(spec):
    """(arrays in data-flow order, manifest entry) of one case."""
    inputs = make_inputs(spec)
    config = config_of(spec)
    outputs = compute(inputs, config, spec.sections)
    arrays = {**inputs, **outputs}
    for k, a in arrays.items():
        if a.dtype.kind == "f" and a.dtype != np.dtype(spec.dtype):          # pragma: no cover
            raise AssertionError(f"{spec.name}: {k} is {a.dtype}, case dtype {spec.dtype}")
    dims = {"B": int(arrays["tokens"].shape[0]), "T": int(arrays["tokens"].shape[1]), "V": V, "E": E, "H": H}
    if "rollout" in spec.sections:
        dims.update({"B_rollout": B, "T_rollout": T})
    if "rm" in spec.sections:
        dims.update({"P": P, "T_pairs": int(arrays["chosen"].shape[1])})
    entry = {
        "name": spec.name,
        "file": spec.name + ".npz",
        "description": spec.description,
        "switches": dict(spec.config),
        "edge": spec.edge or None,
        "config": config,
        "dims": dims,
        "sections": list(spec.sections),
        "seed": _seed(spec.name),
        "inputs": list(inputs),
        "outputs": list(outputs),
    }
    return arrays, entry


def manifest_header():
    from . import __version__
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "rlhf_ref_version": __version__,
        "doc": "docs/golden-vectors.md",
        "conventions": {
            "layout": "token-aligned: entry t of a per-action array belongs to token t, chosen in state "
                      "tokens[:, :t] whose LSTM output is h_{t-1}; column 0 is never an action",
            "gate_order": list(GATE_ORDER),
            "special_ids": {"PAD": PAD, "BOS": BOS, "EOS": EOS},
            "losses": "minimised; descent on L is ascent on the expected return",
            "zero_off": "per-action arrays are exactly 0 off action_mask; per-position arrays (scores, logq, "
                        "values, qvalues, sft_logp) are exactly 0 off the position mask (mask with column 0 "
                        "cleared)",
            "float_outputs": "the float64 reference from the stored inputs, rounded once to the case dtype",
            "u_margin": U_MARGIN,
        },
        "quantities": {k: {"zero_off": z, "time_aligned": ta, "what": w} for k, (z, ta, w) in QUANTITIES.items()},
    }


def write_vectors(out_dir, names=None, log=None):
    """Write the manifest and one ``.npz`` per case into ``out_dir``; returns the manifest dict."""
    specs = CASES if names is None else [get_spec(n) for n in names]
    os.makedirs(out_dir, exist_ok=True)
    manifest = manifest_header()
    manifest["cases"] = []
    for spec in specs:
        arrays, entry = build_case(spec)
        data = npz_bytes(arrays)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
        _write_bytes(os.path.join(out_dir, entry["file"]), data)
        manifest["cases"].append(entry)
        if log is not None:
            log(f"{entry['file']:32s} {len(data):7d} bytes  {spec.description}")
    text = dumps(manifest) + "\n"
    _write_bytes(os.path.join(out_dir, MANIFEST), text.encode("utf-8"))
    return manifest


# ------------------------------------------------------------------------------------ reading

class GoldenError(ValueError):
    """A golden-vector folder that cannot be read: the message names the file and the cause."""


def load_manifest(path):
    """The manifest dict of a golden folder (``path`` is the folder or its manifest.json)."""
    mpath = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except FileNotFoundError:
        raise GoldenError(f"no golden-vector manifest at {mpath!r} (write one with 'rlhf-ref vectors --out DIR')") \
            from None
    except ValueError as e:
        raise GoldenError(f"{mpath!r} is not valid JSON: {e}") from None
    if not isinstance(man, dict) or man.get("schema") != SCHEMA:
        raise GoldenError(f"{mpath!r} is not a golden-vector manifest (schema {SCHEMA!r} expected)")
    if man.get("schema_version") != SCHEMA_VERSION:
        raise GoldenError(f"{mpath!r} has schema_version {man.get('schema_version')!r}; this rlhf_ref reads "
                          f"version {SCHEMA_VERSION}")
    man["_folder"] = os.path.dirname(os.path.abspath(mpath))
    return man


def load_case(manifest, entry, check_hash=True):
    """The arrays of one case (a dict in data-flow order: inputs, then outputs); checks the sha256 and
    that the file holds exactly the arrays the manifest lists."""
    path = os.path.join(manifest["_folder"], entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GoldenError(f"cannot read golden case {path!r}: {e}") from None
    if check_hash and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise GoldenError(f"{path!r} does not match the sha256 in the manifest (changed or truncated)")
    try:
        with np.load(_io.BytesIO(data), allow_pickle=False) as z:
            got = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise GoldenError(f"{path!r} is not a readable pickle-free npz: {e}") from None
    names = list(entry["inputs"]) + list(entry["outputs"])
    if set(names) != set(got):
        raise GoldenError(f"{path!r} holds {sorted(set(got) - set(names))} not in the manifest and lacks "
                          f"{sorted(set(names) - set(got))}")
    return {n: got[n] for n in names}


def inputs_of(entry, arrays):
    return {n: arrays[n] for n in entry["inputs"]}


def outputs_of(entry, arrays):
    return {n: arrays[n] for n in entry["outputs"]}


# ------------------------------------------------------------------------------------ command line

def add_arguments(parser):
    """The ``rlhf-ref vectors`` options."""
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write manifest.json and <case>.npz into")
    parser.add_argument("--case", action="append", metavar="NAME", dest="cases",
                        help="write only this case (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def add_subparser(subparsers):
    """Register ``vectors`` on an argparse subparsers object (for a command table without one)."""
    p = subparsers.add_parser("vectors", help="write the golden vectors (cases + manifest)")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    """``rlhf-ref vectors``: returns the exit status."""
    if args.list:
        for c in CASES:
            print(f"{c.name:28s} {c.dtype:8s} {c.description}")
        return 0
    try:
        man = write_vectors(args.out, args.cases, log=None if args.quiet else print)
    except KeyError as e:
        print(f"rlhf-ref vectors: error: {e.args[0]}", file=sys.stderr)
        return 2
    if not args.quiet:
        total = sum(os.path.getsize(os.path.join(args.out, c["file"])) for c in man["cases"])
        n = len(man['cases'])
        print(f"wrote {n} case{'' if n == 1 else 's'} ({total} bytes) and {MANIFEST} to {args.out} "
              f"(schema {SCHEMA} v{SCHEMA_VERSION})")
    return 0


if __name__ == "__main__":       # pragma: no cover
    ap = add_arguments(argparse.ArgumentParser(prog="python -m rlhf_ref.vectors"))
    sys.exit(main(ap.parse_args()))
