"""Golden vectors: versioned test cases that any implementation, in any language, can check itself on.

``rlhf-ref vectors --out DIR`` writes ``DIR/manifest.json`` and one ``DIR/<case>.npz`` per case;
the format is documented in docs/golden-vectors.md (enough to write a reader without this code).
``rlhf-ref verify`` (rlhf_ref.verify) compares another implementation's outputs with them.

A case is one configuration of the objective (every convention of docs/conventions.md §3 by name) and
every array of one pass through it, in data-flow order:

    params   policy/<name>  ref/<name>  rm/<name>         PyTorch state-dict names (docs/conventions.md §2)
    rollout  rollout/prompt_tokens, prompt_len, u  ->  rollout/tokens, mask, action_mask, logp
    rl       tokens, mask, prompt_len, reward [, group, old_logp, old_values where the case uses them]
             ->  action_mask, scores, logq, logp, ref_logp, entropy, kl, rewards, returns,
             values | qvalues, baseline, advantages, [ratio,] weights, loss_pg, loss_ent, loss_value,
             [loss_kl,] loss, grad/<loss term>/policy/<name> (each term, then the total)
             (ratio with surrogate="ppo_clip", loss_kl and its gradient with kl_in="loss")
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

import numpy as np

from .. import lstm, model, policy, reinforce, reward_model, rollout as _rollout, safe_read, sft
from .. import conventions as _table
from .. import returns as ret
from ..tokenizer import BOS, EOS, PAD
from . import conventions as cv
from .cases import (  # noqa: F401 (re-exported: rlhf_ref.vectors is this module)
    ALL_ON, ALL_SECTIONS, B, CASES, E, GATE_ORDER, H, MANIFEST, P, SCHEMA, SCHEMA_VERSION, T, U_MARGIN, V, CaseSpec, _c,
    _seed, case_names, case_table_markdown, config_of, get_spec)

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


def _cdf_distance(params, out, u, alpha, eps, kind="boltzmann"):
    """min_k |u − cdf_k| at every action of a rollout (B, T); +inf off the action mask."""
    fwd, _ = model.forward(params, out["tokens"], out["mask"])
    q = np.exp(policy.logprobs(fwd["scores"], alpha, eps, kind))
    cdf = np.cumsum(q, axis=-1)
    d = np.min(np.abs(u[:, :, None] - cdf), axis=-1)
    return np.where(out["action_mask"] > 0, d, np.inf)


def _uniforms(rng, params64, prompt_tokens, prompt_len, alpha, eps, Bn, Tn, kind="boltzmann"):
    """Uniforms u (B, T) such that every used one lies U_MARGIN or more from every CDF boundary,
    so that float32 and other backends sample the same tokens (no tie within rounding)."""
    u = rng.random((Bn, Tn))
    for _ in range(10_000):
        out = _rollout.rollout(params64, prompt_tokens, prompt_len, u, alpha, eps, kind)
        d = _cdf_distance(params64, out, u, alpha, eps, kind)
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
    grouped = cfg.baseline in ret.GROUP_BASELINES
    if grouped:                     # groups of 2 rows that answer the same prompt
        ptok[1::2], pl[1::2] = ptok[0::2], pl[0::2]
    kind = spec.policy_kind
    u = _uniforms(rng, pol64, ptok, pl, cfg.alpha, cfg.eps, B, T, kind).astype(dt)
    # the stored u (rounded to dt) is the u used: recheck the margin with it
    u64 = u.astype(np.float64)
    ro = _rollout.rollout(pol64, ptok, pl, u64, cfg.alpha, cfg.eps, kind)
    assert np.all(_cdf_distance(pol64, ro, u64, cfg.alpha, cfg.eps, kind) >= U_MARGIN / 2)
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
    arrays.update(_issue9_inputs(spec, cfg, pol64, tokens, mask, prompt_len, grouped, dt))

    if "rm" in spec.sections:
        c, cm, r, rmask = _pairs(rng, T, garbage=spec.edge == "padding_rows")
        arrays.update({"chosen": c, "chosen_mask": cm, "rejected": r, "rejected_mask": rmask})
    return arrays


def _issue9_inputs(spec, cfg, pol64, tokens, mask, prompt_len, grouped, dt):
    """group (rows 2i, 2i+1 answer one prompt; the padding rows' ids: one alone, one in group 1),
    old_logp (surrogate ppo_clip: θ's log-probs, perturbed by N(0, 0.3²) with edge off_policy, exact
    with edge ratio_one, absent (ratio 1) otherwise) and old_values (value_clip > 0: the critic's
    prediction, perturbed by N(0, 0.3²) with edge off_policy); from their own generator, so that the
    other inputs of a case do not depend on them."""
    rng = np.random.default_rng([_seed(spec.name), 9])
    Bn = tokens.shape[0]
    am = model.action_mask(mask, prompt_len) > 0
    out = {}
    if grouped:
        g = np.arange(B, dtype=np.int64) // 2
        out["group"] = np.concatenate([g, [2, 1]]).astype(np.int64) if Bn == B + 2 else g
    if cfg.surrogate == "ppo_clip" and spec.edge in ("off_policy", "ratio_one"):
        lp = reinforce.sequence_logprobs(pol64, tokens, mask, prompt_len, cfg.alpha, cfg.eps)
        if spec.edge == "off_policy":
            lp = lp + rng.normal(0.0, 0.3, lp.shape)
        out["old_logp"] = np.where(am, lp, 0.0).astype(dt)
    if cfg.value_clip > 0:
        fwd, _ = model.forward(pol64, tokens, mask)
        pred = fwd["values"] if cfg.critic == "value" else np.take_along_axis(
            fwd["qvalues"], tokens[:, :, None], -1)[:, :, 0]
        if spec.edge == "off_policy":
            pred = pred + rng.normal(0.0, 0.3, pred.shape)
        out["old_values"] = np.where(am, pred, 0.0).astype(dt)
    return out


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
                              fl(inputs["rollout/u"]), cfg.alpha, cfg.eps, config.get("policy_kind", "boltzmann"),
                              eos_id=config["eos_id"])
        out["rollout/tokens"] = ro["tokens"]
        out["rollout/mask"] = ro["mask"].astype(np.int64)
        out["rollout/action_mask"] = ro["action_mask"].astype(np.int64)
        out["rollout/logp"] = ro["logp"]
    if "rl" in sections:
        tokens, mask, pl = inputs["tokens"], inputs["mask"], inputs["prompt_len"]
        opt = {k: (inputs[k] if k == "group" else fl(inputs[k])) for k in ("group", "old_logp", "old_values")
               if k in inputs}
        o, g = reinforce.loss_and_grad(pol, tokens, mask, pl, fl(inputs["reward"]), cfg, ref_params=ref,
                                       term_grads=True, **opt)
        pm = model.position_mask(mask)
        out["action_mask"] = o["action_mask"].astype(np.int64)
        out["scores"] = o["scores"]
        out["logq"] = np.where(pm[:, :, None] > 0, o["logq"], 0.0)   # 0 off the position mask, like scores
        for k in ("logp", "ref_logp", "entropy", "kl", "rewards", "returns"):
            out[k] = o[k]
        out[cfg.critic + "s"] = o[cfg.critic + "s"]
        # ratio only with ppo_clip and loss_kl only with kl_in="loss": the other cases keep their bytes
        keys = ("baseline", "advantages") + (("ratio",) if cfg.surrogate == "ppo_clip" else ()) + (
            "weights", "loss_pg", "loss_ent", "loss_value") + (("loss_kl",) if cfg.kl_in == "loss" else ()) + ("loss",)
        for k in keys:
            out[k] = o[k]
        terms = (("pg", "loss_pg"), ("ent", "loss_ent"), ("value", "loss_value")) + (
            (("kl", "loss_kl"),) if cfg.kl_in == "loss" else ())
        for term, key in terms:
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
    "group": (None, False, "(B,) int64: group ids, rows answering the same prompt (group baselines only)"),
    "old_logp": ("action_mask", True, "(B, T): log-probs of the sampling policy (ppo_clip; absent: logp, ratio 1)"),
    "old_values": ("action_mask", True, "(B, T): the critic's predictions at sampling time (value_clip > 0)"),
    "action_mask": ("mask", True, "(B, T) int64: mask and t >= prompt_len"),
    "scores": ("position", True, "(B, T, V): z[:, t] = head(h_{t-1}), 0 at column 0 and padding"),
    "logq": ("position", True, "(B, T, V): log pi(.|s_t), the full log-distribution (alpha, eps applied)"),
    "logp": ("action_mask", True, "(B, T): log pi(a_t|s_t) of the taken token"),
    "ref_logp": ("action_mask", True, "(B, T): log pi_ref(a_t|s_t), same alpha and eps"),
    "entropy": ("action_mask", True, "(B, T): H(pi(.|s_t)) of the full distribution"),
    "kl": ("action_mask", True, "(B, T): per-token KL estimate k_t (k1, k2 or k3 of x = logp - ref_logp)"),
    "rewards": ("action_mask", True, "(B, T): -beta k_t (kl_in reward; 0 with kl_in loss), + R at the row's last "
                                     "action"),
    "returns": ("action_mask", True, "(B, T): G_t (reward-to-go, total, or gae: A^GAE + V)"),
    "values": ("position", True, "(B, T): V(s_t) = value(h_{t-1}) (value critic)"),
    "qvalues": ("position", True, "(B, T, V): Q(s_t, .) = qvalue(h_{t-1}) (qvalue critic)"),
    "baseline": ("action_mask", True, "(B, T): b_t"),
    "advantages": ("action_mask", True, "(B, T): A_t = G_t - b_t, group-scaled and whitened if configured"),
    "ratio": ("action_mask", True, "(B, T): exp(logp - old_logp) (ppo_clip)"),
    "weights": ("action_mask", True, "(B, T): aggregation weights w, L = sum w * per-token term"),
    "loss_pg": (None, False, "(): -sum w A logp (ppo_clip: sum w -min(ratio A, clip(ratio) A))"),
    "loss_ent": (None, False, "(): -c_H sum w H"),
    "loss_value": (None, False, "(): c_V 1/2 sum w (V - G)^2 (Q(s_t, a_t) for the qvalue critic; value_clip: "
                                "max with (V_clip - G)^2)"),
    "loss_kl": (None, False, "(): beta sum w k (kl_in loss)"),
    "loss": (None, False, "(): loss_pg + loss_ent + loss_value (+ loss_kl)"),
    "grad/<loss>/policy/<name>": (None, False, "dL/dparam for loss_pg, loss_ent, loss_value, loss_kl and loss "
                                               "(total)"),
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
    from ..io import atomic_write_bytes
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
    from .. import __version__
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


EDGES = ("", "single_token", "padding_rows", "small_variance", "off_policy", "ratio_one")


def custom_spec(sets, name="custom", dtype="float64", edge=""):
    """A CaseSpec from ``--set name=value`` assignments: the switches of the table of conventions
    (typed and checked as ``rlhf-ref rl --set`` does: pipeline.commands.apply_sets), plus
    ``policy=<decoding policy>`` for the rollout. Raises ValueError naming what is wrong."""
    from ..conventions import POLICY
    from ..pipeline.commands import CommandError, apply_sets
    if not (isinstance(name, str) and name and name.replace("_", "").isalnum() and name.isascii()):
        raise ValueError(f"--name must be letters, digits and '_', got {name!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {dtype!r}")
    if edge not in EDGES:
        raise ValueError(f"--edge must be one of {', '.join(e or repr('') for e in EDGES)}, got {edge!r}")
    kind, rest = POLICY.default, []
    for s_ in sets or ():
        key, eq, value = s_.partition("=")
        if key.strip() == POLICY.name and eq:
            if value not in POLICY.values:
                raise ValueError(f"--set {s_!r}: policy must be one of {', '.join(POLICY.values)}")
            kind = value
        else:
            rest.append(s_)
    try:
        cfg = apply_sets(reinforce.ReinforceConfig(), rest)
    except CommandError as e:
        raise ValueError(str(e)) from None
    default = reinforce.ReinforceConfig()
    config = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if getattr(cfg, k) != getattr(default, k)}
    if kind == "greedy" and cfg.eps != 0:
        raise ValueError(f"--set policy=greedy needs eps=0, got eps={cfg.eps}")
    sw = ", ".join(f"{k}={v}" for k, v in config.items()) or "the defaults"
    desc = f"custom case ({sw}{'' if kind == 'boltzmann' else ', policy=' + kind}{', edge ' + edge if edge else ''})"
    return CaseSpec(name, desc, config, dtype, edge, ("rollout", "rl"), kind)


def write_vectors(out_dir, names=None, log=None, specs=None):
    """Write the manifest and one ``.npz`` per case into ``out_dir``; returns the manifest dict.
    ``specs``: CaseSpecs to write instead of the shipped cases (``custom_spec``)."""
    if specs is None:
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
    """A golden-vector folder that cannot be read: ``<file>[:<line>]: <what is wrong>``."""


_SCALAR = {"int": (int,), "num": (int, float), "str": (str,)}
_DIM_MAX = 1 << 20


def _need(cond, mpath, what):
    if not cond:
        raise GoldenError(f"{mpath}: {what}")


def _check_entry(mpath, i, e):
    """The structure of one manifest case entry (types, names, dims, config) or a GoldenError."""
    where = f"cases[{i}]"
    _need(isinstance(e, dict), mpath, f"{where} must be an object, got {type(e).__name__}")
    for k, kind in (("name", str), ("file", str), ("sha256", str), ("inputs", list), ("outputs", list),
                    ("config", dict), ("dims", dict), ("sections", list)):
        _need(isinstance(e.get(k), kind), mpath, f"{where}.{k} must be a {kind.__name__}, got {e.get(k)!r:.60}")
    where = f"case {e['name']!r:.60}"
    _need(e["name"] and e["name"].replace("_", "").isalnum(), mpath, f"{where}: the name must be letters, digits, '_'")
    _need(all(x in SECTIONS for x in e["sections"]), mpath, f"{where}: sections must be among {SECTIONS}")
    for k in ("inputs", "outputs"):
        for n in e[k]:
            _need(isinstance(n, str), mpath, f"{where}: {k} must be names (strings), got {n!r:.60}")
            try:
                quantity_of(n)
            except KeyError:
                raise GoldenError(f"{mpath}: {where}: unknown array name {n!r:.60} in {k}") from None
    _need(len(set(e["inputs"]) | set(e["outputs"])) == len(e["inputs"]) + len(e["outputs"]), mpath,
          f"{where}: an array is listed twice")
    for k in ("B", "T", "V", "E", "H"):
        v = e["dims"].get(k)
        _need(type(v) is int and 1 <= v <= _DIM_MAX, mpath, f"{where}: dims.{k} must be an integer in [1, {_DIM_MAX}], "
                                                             f"got {v!r:.40}")
    for k, v in e["dims"].items():
        _need(type(v) is int and 1 <= v <= _DIM_MAX, mpath, f"{where}: dims.{k} must be an integer in [1, {_DIM_MAX}]")
    cfg = e["config"]
    _need(cfg.get("dtype") in ("float32", "float64"), mpath, f"{where}: config.dtype must be 'float32' or 'float64'")
    checks = {"alpha": "num", "eps": "num", "gamma": "num", "beta": "num", "entropy_coef": "num", "value_coef": "num",
              "kl": cv.KL_ESTIMATORS, "returns": cv.RETURNS, "baseline": cv.BASELINES, "whiten": cv.WHITEN,
              "aggregation": cv.AGGREGATIONS, "critic": ("value", "qvalue"), "shift_mean": "bool",
              "eos_id": "int", "kl_in": _table.values("kl_in"), "group_scale": _table.values("group_scale"),
              "surrogate": _table.values("surrogate"), "policy_kind": _table.values("policy")}
    checks.update({k: "num" for k in ("lam", "group_eps", "clip_low", "clip_high", "value_clip", "norm_len")})
    for k, want in checks.items():
        v = cfg.get(k)
        if want == "bool":
            ok = isinstance(v, bool)
        elif isinstance(want, str):
            ok = isinstance(v, _SCALAR[want]) and not isinstance(v, bool) and np.isfinite(v)
        else:
            ok = v in want
        _need(ok, mpath, f"{where}: config.{k} must be {want if isinstance(want, str) else ' or '.join(want)}, "
                         f"got {v!r:.40}")


def expected_shapes(entry):
    """{name: (shape, dtype string)} of every array of a case, from its manifest dims and config."""
    d, cfg = entry["dims"], entry["config"]
    V_, E_, H_ = d["V"], d["E"], d["H"]
    fdt = np.dtype(cfg["dtype"]).newbyteorder("<").str
    idt = np.dtype(np.int64).newbyteorder("<").str
    pshape = {"embedding.weight": (V_, E_), "lstm.weight_ih_l0": (4 * H_, E_), "lstm.weight_hh_l0": (4 * H_, H_),
              "lstm.bias_ih_l0": (4 * H_,), "lstm.bias_hh_l0": (4 * H_,), "head.weight": (V_, H_), "head.bias": (V_,),
              "value.weight": (1, H_), "value.bias": (1,), "qvalue.weight": (V_, H_), "qvalue.bias": (V_,),
              "reward.weight": (1, H_), "reward.bias": (1,)}
    Bn, Tn = d["B"], d["T"]
    Br, Tr = d.get("B_rollout", Bn), d.get("T_rollout", Tn)
    Pn, Tp = d.get("P", 1), d.get("T_pairs", 1)
    ints = {"rollout/prompt_tokens", "rollout/prompt_len", "rollout/tokens", "rollout/mask", "rollout/action_mask",
            "tokens", "mask", "prompt_len", "action_mask", "chosen", "chosen_mask", "rejected", "rejected_mask",
            "group"}
    out = {}
    for n in list(entry["inputs"]) + list(entry["outputs"]):
        parts = n.split("/")
        if parts[0] in ("policy", "ref", "rm") and len(parts) == 2 or parts[0] == "grad":
            shape = pshape.get(parts[-1])
            if shape is None:
                raise GoldenError(f"{entry.get('_manifest', MANIFEST)}: case {entry['name']!r}: unknown parameter "
                                  f"{n!r:.60}")
        elif n in ("rollout/prompt_len",):
            shape = (Br,)
        elif n.startswith("rollout/"):
            shape = (Br, Tr)
        elif n in ("prompt_len", "reward", "group"):
            shape = (Bn,)
        elif n in ("scores", "logq", "qvalues"):
            shape = (Bn, Tn, V_)
        elif n in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
            shape = (Pn, Tp)
        elif n in ("reward_chosen", "reward_rejected"):
            shape = (Pn,)
        elif n in LOSS_NAMES:
            shape = ()
        else:
            shape = (Bn, Tn)
        out[n] = (shape, idt if n in ints else fdt)
    return out


LOSS_NAMES = ("loss_pg", "loss_ent", "loss_value", "loss_kl", "loss", "sft_loss", "bt_loss")
SECTIONS = ("rollout", "rl", "sft", "rm")


def load_manifest(path):
    """The manifest dict of a golden folder (``path`` is the folder or its manifest.json), its
    structure checked: every failure is a GoldenError ``<file>: <what is wrong>``."""
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST) if os.path.isdir(path) else path
    if not os.path.lexists(mpath):
        raise GoldenError(f"{mpath}: no golden-vector manifest here (write one with 'rlhf-ref vectors --out DIR')")
    try:
        man = safe_read.loads_json(safe_read.read_bytes(mpath, what="manifest"), mpath, what="manifest")
    except safe_read.FileReadError as e:
        raise GoldenError(str(e)) from None
    _need(isinstance(man, dict) and man.get("schema") == SCHEMA, mpath,
          f"not a golden-vector manifest (schema {SCHEMA!r} expected)")
    _need(man.get("schema_version") == SCHEMA_VERSION, mpath,
          f"schema_version {man.get('schema_version')!r:.40}; this rlhf_ref reads version {SCHEMA_VERSION}")
    _need(isinstance(man.get("cases"), list), mpath, "'cases' must be a list")
    for i, e in enumerate(man["cases"]):
        _check_entry(mpath, i, e)
    names = [e["name"] for e in man["cases"]]
    _need(len(set(names)) == len(names), mpath, "a case name is listed twice")
    man["_folder"] = os.path.dirname(os.path.abspath(mpath))
    man["_manifest"] = mpath
    return man


def load_case(manifest, entry, check_hash=True):
    """The arrays of one case (a dict in data-flow order: inputs, then outputs). The file the entry
    names must lie inside the manifest's folder (resolved before anything is read or hashed); its
    sha256 must match, and it must hold exactly the arrays the manifest lists, with the shapes and
    dtypes its dims and config imply (checked on the headers, before any array is read)."""
    folder = manifest["_folder"]
    try:
        path = safe_read.resolve_inside(folder, entry["file"], what="golden case file")
        data = safe_read.read_bytes(path, what="golden case file")
    except safe_read.FileReadError as e:
        raise GoldenError(str(e)) from None
    if check_hash and hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise GoldenError(f"{path}: does not match the sha256 in the manifest (changed or truncated)")
    try:
        got = safe_read.load_npz(data, path, what="golden case", expected=expected_shapes(entry))
    except safe_read.FileReadError as e:
        raise GoldenError(str(e)) from None
    _check_ranges(path, entry, got)
    names = list(entry["inputs"]) + list(entry["outputs"])
    return {n: got[n] for n in names}


_IDS = ("tokens", "rollout/prompt_tokens", "rollout/tokens", "chosen", "rejected")
_MASKS = ("mask", "action_mask", "rollout/mask", "rollout/action_mask", "chosen_mask", "rejected_mask")


def _check_ranges(path, entry, arrays):
    """Token ids in [0, V), masks 0/1, prompt lengths in [0, T]: the verifier indexes with them."""
    V_ = entry["dims"]["V"]
    for n, a in arrays.items():
        if n in _IDS:
            bad = (a < 0) | (a >= V_)
            what = f"token ids in [0, {V_})"
        elif n in _MASKS:
            bad = (a != 0) & (a != 1)
            what = "0 or 1"
        elif n in ("prompt_len", "rollout/prompt_len"):
            d = entry["dims"]
            Tn = d.get("T_rollout", d["T"]) if n.startswith("rollout/") else d["T"]
            bad = (a < 0) | (a > Tn)
            what = f"lengths in [0, {Tn}]"
        else:
            continue
        if np.any(bad):
            ix = tuple(int(i) for i in np.argwhere(bad)[0])
            raise GoldenError(f"{path}: golden case array {n!r} holds {a[ix]} at {list(ix)}; expected {what}")


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
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", dest="sets", default=None,
                        help="build one case with this configuration instead of the shipped ones (repeatable): any "
                             "switch of the table of conventions (e.g. baseline=group_loo), or policy=eps_greedy "
                             "for the rollout; unset switches keep their defaults")
    parser.add_argument("--name", default=None, help="the name of the --set case (letters, digits, '_'; default custom)")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"), help="dtype of the --set case")
    parser.add_argument("--edge", default="", choices=EDGES, help="input recipe of the --set case (off_policy: a "
                        "perturbed old_logp/old_values; ratio_one: old_logp = logp)")
    parser.add_argument("--max-file-mb", type=float, default=None, metavar="MB",
                        help="largest file (and declared array data of one .npz) rlhf_ref reads, in MiB")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return parser


def main(args) -> int:
    """``rlhf-ref vectors``: returns the exit status."""
    if args.list:
        for c in CASES:
            print(f"{c.name:28s} {c.dtype:8s} {c.description}")
        return 0
    mb = getattr(args, "max_file_mb", None)
    old = safe_read.limits()
    try:
        safe_read.set_max_file_mb(mb)
        specs = None
        if getattr(args, "sets", None) or getattr(args, "name", None):
            if args.cases:
                raise ValueError("--case and --set/--name exclude each other: --set builds one case of its own")
            specs = [custom_spec(args.sets, args.name or "custom", args.dtype, args.edge)]
        man = write_vectors(args.out, args.cases, log=None if args.quiet else print, specs=specs)
    except (KeyError, ValueError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"rlhf-ref vectors: error: {msg}", file=sys.stderr)
        return 2
    finally:
        safe_read.set_limits(**{k: getattr(old, k) for k in old.__dataclass_fields__})
    if not args.quiet:
        total = sum(os.path.getsize(os.path.join(args.out, c["file"])) for c in man["cases"])
        n = len(man['cases'])
        print(f"wrote {n} case{'' if n == 1 else 's'} ({total} bytes) and {MANIFEST} to {args.out} "
              f"(schema {SCHEMA} v{SCHEMA_VERSION})")
    return 0


if __name__ == "__main__":       # pragma: no cover
    ap = add_arguments(argparse.ArgumentParser(prog="python -m rlhf_ref.vectors"))
    sys.exit(main(ap.parse_args()))
