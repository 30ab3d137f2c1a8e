"""The catalogue of named mistakes: what an implementation usually gets wrong, as data.

Each ``Mistake`` names one error, the golden quantities it shows in, how the verifier computes
what an implementation with that error would output (from the golden values just upstream, which
matched, and the reference rerun with the variant's arguments), and the text of the hint. When a
quantity differs, every mistake of that quantity is computed and the CLOSEST one (in tolerances,
``distance``) within ``HINT_SLACK`` tolerances is named; patterns (``kind="pattern"``: a test, not
a value) are tried in table order when no value matches.

    rlhf-ref verify --list-mistakes            the table: name, quantity, one line each

A candidate is an array (the quantity), a dict ``{golden name: array}`` (a gradient term, or the
sampled tokens with their log-probs) compared on the names the implementation gave, ``True`` for
a pattern that holds, or None where the mistake does not apply to the case (e.g. α missing in a
case with α = 1). Texts are ``str.format``-ed with ``Ctx.words()`` (the case's switches).

The switches' allowed values and the reference functions come from ``rlhf_ref.golden.conventions``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import model, policy
from . import conventions as cv
from . import vectors as gv
from .compare import HINT_SLACK, _close

FORWARD = ("scores", "logq", "logp", "ref_logp", "entropy", "values", "qvalues", "sft_logp", "rollout/logp",
           "rollout/tokens", "reward_chosen", "reward_rejected")
SCORED = ("logq", "logp", "ref_logp", "entropy", "rollout/logp", "rollout/tokens")
RL_TERMS = ("loss_pg", "loss_ent", "loss_value")
GRAD = "grad/*"          #: quantity of the gradient mistakes: any grad/<loss>/<model>/<param>
ANY = "*"                #: quantity of the generic patterns: any float quantity


@dataclass(frozen=True)
class Mistake:
    """One named mistake. ``compute(ctx, q)`` → candidate (see the module doc); ``text`` → the hint."""
    name: str
    quantity: tuple
    compute: Callable
    text: str
    kind: str = "value"          #: "value" (a candidate array) or "pattern" (a test)

    def line(self):
        """One line for the table: the hint up to its first ':' or ';', switches by name."""
        t = self.text.format_map(_Generic())
        pre = "masking: " if t.startswith("masking: ") else ""
        t = t[len(pre):]
        for sep in (": ", "; "):
            t = t.split(sep)[0]
        return pre + t

    def applies_to(self, q):
        return q in self.quantity or ANY in self.quantity or (GRAD in self.quantity and q.startswith("grad/"))


class _Generic(dict):
    def __missing__(self, key):
        return {"q": "the quantity", "who": "the policy",
                "loss": "the loss", "eos_id": "2"}.get(key, "…")


# ============================================================================ helpers

def shift_left(a):
    """a[:, t] <- a[:, t + 1] (the value one position later), 0 at the end."""
    out = np.zeros_like(a)
    out[:, :-1] = a[:, 1:]
    return out


def shift_right(a):
    out = np.zeros_like(a)
    out[:, 1:] = a[:, :-1]
    return out


def on(ctx, a, where="am"):
    m = getattr(ctx, where)
    while m.ndim < np.ndim(a):
        m = m[..., None]
    return np.where(m, a, 0.0)


def _models_of(q):
    if q == "ref_logp":
        return ("ref",)
    if q in ("reward_chosen", "reward_rejected") or q.startswith("grad/bt_loss/"):
        return ("rm",)
    return ("policy",)


def _forward_variant(key, config=None, transform=None, only=None):
    """A mistake computed by rerunning the reference with other arguments or loaded inputs."""
    def compute(ctx, q):
        if only is not None and not only(ctx, q):
            return None
        section = gv.section_of(q)
        tf = transform(_models_of(q)) if transform is not None else None
        cfg = config(ctx) if callable(config) else config
        if cfg is None and config is not None:
            return None
        v = ctx.variant((key, _models_of(q)), [section], cfg, tf)
        if not v:
            return None
        if q == "rollout/tokens":
            return {"rollout/tokens": v["rollout/tokens"], "rollout/logp": v["rollout/logp"]}
        return v.get(q)
    return compute


def _dont_care(ctx, cand, where):
    """``cand`` with the entries ``where`` taken from the implementation's value (positions where the
    mistake leaves nothing defined, e.g. past a row's end: any value there is consistent with it)."""
    if cand is None or ctx.got is None or np.shape(ctx.got) != np.shape(cand):
        return cand
    w = where
    while w.ndim < np.ndim(cand):
        w = w[..., None]
    return np.where(w, ctx.got, cand)


def _forward_at_h_t(ctx, q):
    """The heads read at h_t (the state after token t) at every position t: the reference's forward
    on one more column, so that a row's last real token has h_t too. (scores, values, qvalues) (B, T, ...)"""
    key = ("h_t", _models_of(q))
    if key not in ctx._variants:
        pfx = _models_of(q)[0] + "/"
        pol = {k[len(pfx):]: np.asarray(v, np.float64) for k, v in ctx.inputs.items() if k.startswith(pfx)}
        tok = np.asarray(ctx.g["tokens"])
        tok2 = np.concatenate([tok, np.zeros_like(tok[:, :1])], axis=1)
        fwd, _ = model.forward(pol, tok2, np.ones_like(tok2))
        ctx._variants[key] = {k: np.asarray(v)[:, 1:] for k, v in fwd.items()}
    return ctx._variants[key]


def _read_late(ctx, q):
    """{q}[:, t] computed from h_t instead of h_{t−1} (a real implementation: defined at every real t)."""
    if q == "sft_logp":
        last = ctx.g["mask"].sum(axis=1).astype(int) - 1
        dc = np.zeros(ctx.pm.shape, bool)
        for b in range(dc.shape[0]):
            if last[b] >= 0:
                dc[b, last[b]] = True
        return _dont_care(ctx, on(ctx, shift_left(ctx.g64(q)), "pm"), dc)
    v = _forward_at_h_t(ctx, q).get(q)
    return None if v is None else on(ctx, v, "pm")


def _logits_not_shifted(ctx, q):
    """log π(tokens_t | h_t): logits of the state after token t against label t."""
    z = _forward_at_h_t(ctx, q)["scores"]
    lq = policy.logprobs(z, ctx.cfg["alpha"], ctx.cfg["eps"])
    return on(ctx, np.take_along_axis(lq, ctx.g["tokens"][:, :, None], -1)[:, :, 0])


def _last_action_mask(ctx):
    dc = np.zeros(ctx.am.shape, bool)
    for b, t in _last(ctx):
        dc[b, t] = True
    return dc


def _labels_one_late(ctx, q):
    """log π(tokens_{t+1} | s_t); undefined at each row's last action (no next token)."""
    cand = on(ctx, np.take_along_axis(ctx.g64("logq"), shift_left(ctx.g["tokens"])[:, :, None], -1)[:, :, 0])
    return _dont_care(ctx, cand, _last_action_mask(ctx))


def _shifted_twice(ctx, q):
    """log π(tokens_t | s_{t−1}) = logq[:, t−1, tokens_t] (a shift applied on top of token-aligned
    arrays); undefined where t − 1 is column 0 (no scores there)."""
    lq = shift_right(ctx.g64("logq"))
    cand = on(ctx, np.take_along_axis(lq, ctx.g["tokens"][:, :, None], -1)[:, :, 0])
    dc = np.zeros(ctx.am.shape, bool)
    dc[:, 1] = True
    return _dont_care(ctx, cand, dc)


def perm_transform(order, prefixes):
    """Inputs with the 4 gate blocks of every lstm.* array of the given models rearranged so that the
    reference computes what an implementation does that reads PyTorch-ordered rows in ``order``."""
    pos = [gv.GATE_ORDER.index(g) for g in order]     # block j of ours is used as gate pos[j]

    def tf(inp):
        out = dict(inp)
        for k, a in inp.items():
            if k.split("/")[0] in prefixes and "/lstm." in k:
                Hn = a.shape[0] // 4
                blocks = [a[j * Hn:(j + 1) * Hn] for j in range(4)]
                new = [None] * 4
                for j in range(4):
                    new[pos[j]] = blocks[j]
                out[k] = np.concatenate(new, axis=0)
        return out
    return tf


def _zero_bias(which):
    def for_models(models):
        def tf(inp):
            return {k: (np.zeros_like(v) if k.split("/")[0] in models and k.endswith(f"lstm.bias_{which}_l0") else v)
                    for k, v in inp.items()}
        return tf
    return for_models


def _params_to32(models):
    def tf(inp):
        return {k: (v.astype(np.float32).astype(np.float64) if k.split("/")[0] in ("policy", "ref", "rm") else v)
                for k, v in inp.items()}
    return tf


def whiten_variant(A0, m, kind, eps_place="inside", shift_mean=True, stats_over=None):
    """Whitening as the reference does it (eps inside the square root, statistics over ``m``), or
    with the eps elsewhere ("std": σ + eps; "none": no eps), or the statistics over ``stats_over``."""
    if eps_place == "inside" and stats_over is None:
        try:
            return cv.whiten(A0, m, kind, shift_mean)
        except ValueError:
            return None
    s = m if stats_over is None else stats_over
    x = A0[s > 0]
    n = x.size
    if n == 0 or (kind == "bessel" and n < 2):
        return None
    mu = x.sum() / n
    var = np.sum((x - mu) ** 2) / (n - 1 if kind == "bessel" else n)
    den = {"inside": np.sqrt(var + cv.WHITEN_EPS), "std": np.sqrt(var) + cv.WHITEN_EPS, "none": np.sqrt(var),
           "clamp": np.sqrt(max(var, cv.WHITEN_EPS))}[eps_place]
    if den == 0:
        return None
    out = (A0 - mu) / den
    return np.where(m > 0, out if shift_mean else out + mu, 0.0)


#: aggregations that are mistakes (not in the reference): the mask's row count or no normalisation
_WRONG_AGG = ("seq_mean_B", "seq_sum_B", "sum", "fixed_len_longest", "fixed_len_width")


def agg_weights(ctx, kind):
    """Aggregation weights (B, T): the reference's for its kinds, else the wrong kinds above."""
    am = ctx.am
    if kind == "fixed_len":
        return cv.aggregation_weights(am, kind, ctx.cfg.get("norm_len", 0.0) if ctx.cfg["aggregation"] == kind
                                      else 0.0)
    if kind in cv.AGGREGATIONS:
        return cv.aggregation_weights(am, kind)
    if kind == "fixed_len_longest":            # Dr. GRPO's L taken as the longest response of the batch
        if ctx.cfg["aggregation"] != "fixed_len":
            return None
        return am / (am.shape[0] * am.sum(axis=1).max())
    if kind == "fixed_len_width":              # L = the array width T although norm_len is set
        if ctx.cfg["aggregation"] != "fixed_len" or not ctx.cfg.get("norm_len", 0.0):
            return None
        return am / (am.shape[0] * am.shape[1])
    if kind == "all_positions":
        return np.full(am.shape, 1.0 / am.size)
    m = am.astype(np.float64)
    n_row = m.sum(axis=1, keepdims=True)
    if kind == "seq_mean_B":
        return np.where(n_row > 0, m / np.maximum(n_row, 1) / m.shape[0], 0.0)
    if kind == "seq_sum_B":
        return m / m.shape[0]
    return m


BASELINE_TEXT = {
    "value": "the value head's V(s_t)",
    "qvalue": "Σ_a π(a|s_t)·Q(s_t, a)",
    "mean": "the mean of G over all actions of the batch, the row included",
    "loo": "the mean of G over the other rows' actions",
    "none": "0",
    "group_mean": "the mean of the sequence returns S of the rows of the row's group, the row included",
    "group_loo": "the mean of the sequence returns S of the OTHER rows of the row's group (rows weighted equally)",
}

AGG_TEXT = {
    "token_mean": "token_mean (Σ over actions / N actions)",
    "seq_mean": "seq_mean (each row's token mean, averaged over rows with an action)",
    "seq_sum": "seq_sum (Σ over actions / rows with an action)",
    "all_positions": "a mean over all B·T positions (padding and prompt counted: the mask is missing from "
                     "the denominator)",
    "seq_mean_B": "seq_mean averaged over all B rows (rows without an action counted)",
    "seq_sum_B": "seq_sum divided by all B rows (rows without an action counted)",
    "sum": "a plain sum over actions (no normalisation)",
    "fixed_len": "fixed_len (Σ over actions / (B·L), L = norm_len, or the array width T when norm_len is 0)",
    "fixed_len_longest": "fixed_len with L = the longest response of the batch (it is norm_len, or the array width "
                         "T when norm_len is 0)",
    "fixed_len_width": "fixed_len with L = the array width T (this case sets norm_len: L = norm_len)",
}


def per_token_term(ctx, q):
    """(coefficient, per-token term) with L_q = coef·Σ w·term (golden upstream values)."""
    cfg = ctx.cfg
    if q == "loss_pg":
        if cfg.get("surrogate", "reinforce") == "ppo_clip":
            return 1.0, ppo_term(ctx)
        return -1.0, ctx.g64("advantages") * ctx.g64("logp")
    if q == "loss_ent":
        return -cfg["entropy_coef"], ctx.g64("entropy")
    if q == "loss_value":
        if cfg.get("value_clip", 0.0) > 0:
            return cfg["value_coef"], 0.5 * value_clip_term(ctx)
        return cfg["value_coef"], 0.5 * (value_prediction(ctx) - ctx.g64("returns")) ** 2
    if q == "loss_kl":
        return cfg["beta"], ctx.g64("kl")
    raise KeyError(q)


def ratio(ctx, reverse=False):
    """ρ = exp(logp − old_logp) on the actions (1 without old_logp); ``reverse``: exp(old_logp − logp)."""
    lp = ctx.g64("logp")
    old = np.asarray(ctx.inputs["old_logp"], np.float64) if "old_logp" in ctx.inputs else lp
    return on(ctx, np.exp(old - lp) if reverse else np.exp(lp - old))


def ppo_term(ctx, rho=None, low=None, high=None, pick=np.minimum):
    """ℓ_t = −pick(ρ·A, clip(ρ, 1 − low, 1 + high)·A) (PPO's clipped surrogate; pick = min)."""
    cfg = ctx.cfg
    rho = ratio(ctx) if rho is None else rho
    low = cfg["clip_low"] if low is None else low
    high = cfg["clip_high"] if high is None else high
    A = ctx.g64("advantages")
    return on(ctx, -pick(rho * A, np.clip(rho, 1 - low, 1 + high) * A))


def value_clip_term(ctx, around_new=False, pick=np.maximum):
    """pick((V − G)², (V_clip − G)²), V_clip = old + clip(V − old, −c, c) (``around_new``: the clip
    taken around the new prediction, V + clip(old − V, −c, c))."""
    c = ctx.cfg["value_clip"]
    V, G = value_prediction(ctx), ctx.g64("returns")
    old = on(ctx, np.asarray(ctx.inputs["old_values"], np.float64))
    vclip = V + np.clip(old - V, -c, c) if around_new else old + np.clip(V - old, -c, c)
    return on(ctx, pick((V - G) ** 2, (vclip - G) ** 2))


def value_prediction(ctx):
    if ctx.cfg["critic"] == "value":
        return on(ctx, ctx.g64("values"))
    Q = ctx.g64("qvalues")
    return on(ctx, np.take_along_axis(Q, ctx.g["tokens"][:, :, None], -1)[:, :, 0])


def _aggregation(kind):
    def compute(ctx, q):
        if kind == ctx.cfg["aggregation"]:
            return None
        w = agg_weights(ctx, kind)
        if w is None:
            return None
        if q == "weights":
            return on(ctx, w) if kind != "all_positions" else w * ctx.am
        coef, per = per_token_term(ctx, q)
        return coef * np.sum(w * per)
    return compute


def _whitening(kind, place, shift):
    def compute(ctx, q):
        if (kind, place, shift) == (ctx.cfg["whiten"], "inside", ctx.cfg["shift_mean"]):
            return None
        return whiten_variant(A0(ctx), ctx.am, kind, place, shift)
    return compute


def A0(ctx):
    return on(ctx, ctx.g64("returns") - ctx.g64("baseline"))


def _kl_estimator(k):
    def compute(ctx, q):
        if k == ctx.cfg["kl"]:
            return None
        return cv.kl_per_token(ctx.g64("logp"), ctx.g64("ref_logp"), ctx.am, k)
    return compute


def _x(ctx):
    return on(ctx, ctx.g64("logp") - ctx.g64("ref_logp"))


def _with_R(ctx, base, where):
    r, R = base.copy(), ctx.g64("reward")
    for b, t in where:
        r[b, t] += R[b]
    return r


def _last(ctx):
    last = cv.last_action_index(ctx.am)
    return [(b, last[b]) for b in np.nonzero(last >= 0)[0]]


def _rewards_R_rows_without_action(ctx, q):
    r = _with_R(ctx, on(ctx, -ctx.cfg["beta"] * ctx.g64("kl")), _last(ctx))
    last = cv.last_action_index(ctx.am)
    lengths = ctx.g["mask"].sum(axis=1).astype(int)
    if np.all(last >= 0):
        return None
    R = ctx.g64("reward")
    for b in range(r.shape[0]):
        if last[b] < 0:
            r[b, max(lengths[b] - 1, 0) if lengths[b] else r.shape[1] - 1] += R[b]
    return r


def _rewards_R_after_last(ctx, q):
    """−β·k_t with R one position after each row's last action (dropped where that is past T); only
    when your raw rewards (off-mask entries included) hold R there."""
    raw = getattr(ctx, "raw", {}).get("rewards")
    if raw is None or np.shape(raw) != ctx.am.shape:
        return None
    T = ctx.am.shape[1]
    after = [(b, t + 1) for b, t in _last(ctx) if t + 1 < T]
    if not after:
        return None
    full = _with_R(ctx, on(ctx, -ctx.cfg["beta"] * ctx.g64("kl")), after)
    raw = np.asarray(raw, np.float64)
    atol, rtol = ctx.tol(q)
    if not all(_close(raw[b, t], full[b, t], HINT_SLACK * atol, HINT_SLACK * rtol) and full[b, t] != 0
               for b, t in after):
        return None
    got_off = np.asarray(ctx.got)[~ctx.am]
    return full if np.any(got_off != 0) else on(ctx, full)


def _rewards_seq_kl(ctx, q):
    kl, R, beta = ctx.g64("kl"), ctx.g64("reward"), ctx.cfg["beta"]
    r = np.zeros_like(kl)
    for b, t in _last(ctx):
        r[b, t] = R[b] - beta * kl[b].sum()
    return r


def _gamma_lt1(f):
    return lambda ctx, q: f(ctx, q) if ctx.cfg["gamma"] < 1 else None


def _returns_from_sequence_start(ctx, q):
    r, am, gamma = ctx.g64("rewards"), ctx.am, ctx.cfg["gamma"]
    disc = gamma ** np.arange(r.shape[1])[None, :]
    tot = np.sum(np.where(am, r * disc, 0.0), axis=1)
    return on(ctx, np.broadcast_to(tot[:, None], r.shape))


def _returns_not_restarted(ctx, q):
    r, am, gamma = ctx.g64("rewards"), ctx.am, ctx.cfg["gamma"]
    out = np.zeros_like(r)
    first = np.argmax(am, axis=1)
    for b in range(r.shape[0]):
        for t in range(r.shape[1]):
            if am[b, t]:
                out[b, t] = sum(gamma ** (j - first[b]) * r[b, j] for j in range(t, r.shape[1]) if am[b, j])
    return out


def _baseline_kind(k):
    def compute(ctx, q):
        if k == ctx.cfg["baseline"] or k in ("value", "qvalue", "none"):
            return None
        try:
            return cv.baseline(k, ctx.g64("returns"), ctx.am, **({"group": _group(ctx)} if k.startswith("group_")
                                                                 else {}))
        except ValueError:
            return None
    return compute


def _baseline_loo_rows(ctx, q):
    G, am = ctx.g64("returns"), ctx.am
    n_row = am.sum(axis=1)
    rmean = np.where(n_row > 0, np.where(am, G, 0).sum(axis=1) / np.maximum(n_row, 1), 0.0)
    have = n_row > 0
    out = np.zeros_like(G)
    for b in range(G.shape[0]):
        o = have.copy()
        o[b] = False
        if o.any():
            out[b] = rmean[o].mean()
    return on(ctx, out)


def _q(ctx):
    return ctx.g64("qvalues") if "qvalues" in ctx.g else None


def _baseline_q(f):
    def compute(ctx, q):
        Q = _q(ctx)
        return None if Q is None else on(ctx, f(ctx, Q))
    return compute


def _q_expectation(alpha1, eps0):
    def f(ctx, Q):
        a, e = ctx.cfg["alpha"], ctx.cfg["eps"]
        if (alpha1 and a == 1.0) or (eps0 and e == 0.0):
            return None
        lq = policy.logprobs(ctx.g64("scores"), 1.0 if alpha1 else a, 0.0 if eps0 else e)
        return np.sum(np.exp(lq) * Q, -1)
    def compute(ctx, q):
        Q = _q(ctx)
        if Q is None:
            return None
        v = f(ctx, Q)
        return None if v is None else on(ctx, v)
    return compute


def _whiten_per_row(ctx, q):
    wk, sm = ctx.cfg["whiten"], ctx.cfg["shift_mean"]
    if wk == "off":
        return None
    a0, am = A0(ctx), ctx.am
    out = np.zeros_like(a0)
    for r in range(a0.shape[0]):
        mr = np.zeros_like(am)
        mr[r] = am[r]
        if (wk == "bessel" and mr.sum() < 2) or mr.sum() == 0:
            continue
        out += whiten_variant(a0, mr, wk, "inside", sm)
    return out


def _if_whiten(f):
    return lambda ctx, q: f(ctx, q) if ctx.cfg["whiten"] != "off" else None


def _sft_row_means(ctx, q):
    lp, pm = ctx.g64("sft_logp"), ctx.pm
    rows = [b for b in range(lp.shape[0]) if pm[b].any()]
    return -np.mean([lp[b].sum() / pm[b].sum() for b in rows])


def _loss_terms(ctx):
    return [t for t in RL_TERMS + ("loss_kl",) if t in ctx.g]


def _loss_without(term):
    def compute(ctx, q):
        parts = {t: float(ctx.g64(t)) for t in _loss_terms(ctx)}
        if term not in parts:
            return None
        if parts[term] == 0.0:
            return None
        return sum(v for t, v in parts.items() if t != term)
    return compute


def _loss_minus(term):
    def compute(ctx, q):
        parts = {t: float(ctx.g64(t)) for t in _loss_terms(ctx)}
        return sum(v for t, v in parts.items() if t != term) - parts[term]
    return compute


def _reward_over_padding(ctx, q):
    side = "chosen" if q == "reward_chosen" else "rejected"
    inp = dict(ctx.inputs)
    for s in ("chosen", "rejected"):
        inp[s + "_mask"] = np.ones_like(inp[s + "_mask"])
    return ctx.variant(("rm_over_padding", side), ["rm"], None, lambda _: inp).get(q)


# ------------------------------------------------------------------ gradients (a term at a time)

def _term(ctx, q):
    """(keys of the gradient term of ``q`` the implementation gave, golden float64 arrays)."""
    parts = q.split("/")
    term = f"grad/{parts[1]}/{parts[2]}/"
    keys = [k for k in ctx.entry["outputs"] if k.startswith(term) and k in ctx.impl]
    return parts[1], parts[2], keys, {k: ctx.g64(k) for k in keys}


def _nonzero(gold):
    return any(np.any(v != 0) for v in gold.values())


def _grad_zero(entropy):
    def compute(ctx, q):
        loss, _, keys, gold = _term(ctx, q)
        if (loss == "loss_ent") != entropy or not _nonzero(gold):
            return None
        return {k: np.zeros_like(v) for k, v in gold.items()}
    return compute


def _grad_sign(ctx, q):
    _, _, keys, gold = _term(ctx, q)
    return {k: -v for k, v in gold.items()} if _nonzero(gold) else None


def _grad_scaled(ctx, q):
    """The golden term times the least-squares factor c of the implementation's gradient (c ≠ ±1)."""
    _, _, keys, gold = _term(ctx, q)
    got = {k: np.asarray(ctx.impl[k], np.float64) for k in keys}
    den = sum(float(np.sum(gold[k] * gold[k])) for k in keys)
    if den == 0 or any(got[k].shape != gold[k].shape for k in keys):
        return None
    c = sum(float(np.sum(got[k] * gold[k])) for k in keys) / den
    if abs(c - 1) < 1e-6 or abs(c + 1) < 1e-6 or abs(c) < 1e-6 or not np.isfinite(c):
        return None
    ctx.note["grad_factor"] = f"{c:.6g}"
    ctx.note["grad_factor_why"] = ": the ½ of L_value is missing" if ( q.split("/")[1] == "loss_value"
                                                                      and abs(c - 2) < 1e-3) else ""
    return {k: c * v for k, v in gold.items()}


def _grad_value_body_detached(ctx, q):
    loss, prefix, keys, gold = _term(ctx, q)
    if loss != "loss_value" or prefix != "policy":
        return None
    body = [k for k in keys if "/embedding." in k or "/lstm." in k]
    if not body or not any(np.any(gold[k] != 0) for k in body):
        return None
    cand = {k: (np.zeros_like(v) if k in body else v) for k, v in gold.items()}
    return {k: cand[k] for k in body}


def _grad_baseline_not_detached(ctx, q):
    loss, prefix, keys, gold = _term(ctx, q)
    if loss != "loss_pg" or prefix != "policy":
        return None
    crit = [k for k in keys if "/value." in k or "/qvalue." in k]
    return bool(crit) and any(np.any(np.asarray(ctx.impl[k]) != 0) for k in crit) and \
        all(np.all(gold[k] == 0) for k in crit)


def _grad_kl_not_detached(ctx, q):
    loss, prefix, keys, gold = _term(ctx, q)
    if loss != "loss_pg" or prefix != "policy":
        return None
    extra = kl_not_detached_grad(ctx)
    if extra is None:
        return None
    return {k: gold[k] + extra[k.split("/")[-1]] for k in keys}


def _grad_total_lacks(term):
    def compute(ctx, q):
        loss, prefix, keys, gold = _term(ctx, q)
        if loss != "loss" or prefix != "policy":
            return None
        part = {k: ctx.g64(f"grad/{term}/policy/{k.split('/')[-1]}") for k in keys}
        if not _nonzero(part):
            return None
        return {k: gold[k] - part[k] for k in keys}
    return compute


def kl_not_detached_grad(ctx):
    """The extra gradient of L_pg when the KL penalty in the rewards is not detached (param -> array):
    G then depends on logp through k(x), x = logp − ref_logp, and ∂L_pg/∂logp_j gains
    Σ_t w_t·logp_t·β·γ^{j−t}·k'(x_j)/s over the actions t ≤ j of the row (every action for 'total',
    with γ^{j − first}); s is the whitening denominator (its statistics are constants)."""
    cfg, g = ctx.cfg, ctx.g
    am = ctx.am
    beta, gamma = cfg["beta"], cfg["gamma"]
    if beta == 0:
        return None
    x = _x(ctx)
    kprime = cv.kl_estimate_grad(x, cfg["kl"])
    w, lp = ctx.g64("weights"), ctx.g64("logp")
    if cfg["whiten"] != "off":
        a = A0(ctx)[am]
        n = a.size
        var = np.sum((a - a.mean()) ** 2) / (n - 1 if cfg["whiten"] == "bessel" else n)
        s = np.sqrt(var + cv.WHITEN_EPS)
    else:
        s = 1.0
    dlogp = np.zeros_like(x)
    for b in range(x.shape[0]):
        acts = np.nonzero(am[b])[0]
        for jj, j in enumerate(acts):
            for tt, t in enumerate(acts):
                if cfg["returns"] == "rtg":
                    if tt > jj:
                        continue
                    coef = gamma ** (jj - tt)
                else:
                    coef = gamma ** jj
                dlogp[b, j] += w[b, t] * lp[b, t] * beta * coef * kprime[b, j] / s
    pol = {k.split("/", 1)[1]: np.asarray(v, np.float64) for k, v in ctx.inputs.items() if k.startswith("policy/")}
    fwd, cache = model.forward(pol, g["tokens"], g["mask"])
    dz = policy.grad_logprob(fwd["scores"], g["tokens"], dlogp, cfg["alpha"], cfg["eps"])
    return model.backward(cache, dscores=dz)


# ------------------------------------------------------------------ generic patterns

def _non_finite(ctx, q):
    got = ctx.got
    if np.all(np.isfinite(got)):
        return None
    ix = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
    ctx.note["where"] = f"first [{', '.join(map(str, ix))}] = {got[ix]}"
    return True


def _float32_output(ctx, q):
    raw = np.asarray(ctx.impl[q]).dtype
    if ctx.dtype != np.float64 or raw != np.float32:
        return None
    atol, rtol = ctx.tol(q)
    f = np.finfo(np.float32).eps / np.finfo(np.float64).eps
    return bool(np.all(_close(ctx.got, ctx.g64(q), atol * f, rtol * f)))


def _opposite_sign(ctx, q):
    if q.startswith("grad/") or ctx.g[q].dtype.kind != "f":
        return None
    return distance(ctx, q, ctx.got, -ctx.g64(q)) <= HINT_SLACK


def _bad_rows(ctx, q):
    want = ctx.g64(q)
    if gv.section_of(q) != "rl" or want.ndim < 2 or not hasattr(ctx, "am") or want.shape[:2] != ctx.am.shape:
        return None
    atol, rtol = ctx.tol(q)
    bad = ~_close(ctx.got, want, atol, rtol)
    while bad.ndim > 2:
        bad = bad.any(-1)
    return bad


def _padding_leak(ctx, q):
    bad = _bad_rows(ctx, q)
    if bad is None:
        return None
    rows = np.nonzero(bad.any(axis=1))[0]
    padded = ctx.g["mask"].sum(axis=1) < ctx.g["mask"].shape[1]
    if rows.size and padded[rows].all() and not padded.all():
        ctx.note["rows"] = ", ".join(map(str, rows))
        return True
    return None


def _last_action_only(ctx, q):
    bad = _bad_rows(ctx, q)
    if bad is None:
        return None
    last = cv.last_action_index(ctx.am)
    bb, tt = np.nonzero(bad)
    return bool(bb.size and np.all(tt == last[bb]) and np.any(ctx.am[bb].sum(axis=1) > 1))


def _rounding_sized(ctx, q):
    """(relative gap, entries) when the differences are small relative to the QUANTITY itself."""
    if ctx.g[q].dtype.kind != "f":
        return None
    want = ctx.g64(q)
    atol, rtol = ctx.tol(q)
    bad = ~_close(ctx.got, want, atol, rtol)
    scale = float(np.max(np.abs(want), initial=0.0))
    if scale == 0 or bad.sum() < 2:
        return None
    rel = float(np.max(np.abs(ctx.got - want), initial=0.0)) / scale
    nz = bad & (want != 0)
    r = (ctx.got[nz] - want[nz]) / want[nz]
    if r.size >= 2 and abs(r.mean()) > 3 * r.std():
        return None                  # one systematic factor (a scale or an offset), not rounding
    ctx.note["rel"] = f"{rel:.1e}"
    ctx.note["n_bad"] = str(int(bad.sum()))
    return rel


def _float32_somewhere(ctx, q):
    rel = _rounding_sized(ctx, q)
    return None if rel is None else bool(ctx.dtype == np.float64 and rel < 1e-5)


def _reduced_precision(ctx, q):
    rel = _rounding_sized(ctx, q)
    return None if rel is None else bool(rel < 1e-2 and not (ctx.dtype == np.float64 and rel < 1e-5))


def _action_mask(f):
    def compute(ctx, q):
        m = ctx.g["mask"] > 0
        tt = np.arange(m.shape[1])[None, :]
        pl = ctx.g["prompt_len"][:, None]
        return f(ctx, m, tt, pl).astype(np.int64)
    return compute


def _no_last(ctx, m, tt, pl):
    a = ctx.am.copy()
    for b, t in _last(ctx):
        a[b, t] = False
    return a


def _after_eos(ctx, q):
    m = ctx.g["rollout/mask"] > 0
    got = ctx.got
    return bool(np.array_equal(np.where(m, got, 0), np.where(m, ctx.g["rollout/tokens"], 0)))


def _shift_u(k):
    def for_models(models):
        def tf(inp):
            out = dict(inp)
            out["rollout/u"] = np.roll(inp["rollout/u"], k, axis=1)
            return out
        return tf
    return for_models


def _one_minus_u(models):
    def tf(inp):
        out = dict(inp)
        out["rollout/u"] = np.nextafter(1.0 - inp["rollout/u"], 0).astype(inp["rollout/u"].dtype)
        return out
    return tf


def _mask_length(early):
    def compute(ctx, q):
        gl, wl = np.asarray(ctx.got).sum(1), ctx.g[q].sum(1)
        return bool(np.all(gl <= wl)) if early else bool(np.all(gl >= wl))
    return compute


def _alpha_not1(ctx, q):
    return ctx.cfg["alpha"] != 1.0 and gv.section_of(q) != "sft"


def _eps_pos(ctx, q):
    return ctx.cfg["eps"] > 0.0 and gv.section_of(q) != "sft"


def _not_rollout_tokens(ctx, q):
    return q != "rollout/tokens" and ctx.dtype == np.float64


def _gae(r, am, values, gamma, lam, variant="", v_after=None):
    """GAE's value target per row (reference semantics), or one of its slips."""
    B, T = r.shape
    G = np.zeros_like(r)
    v = np.where(am, values, 0.0)
    for b in range(B):
        acts = np.nonzero(am[b])[0]
        a_next, v_next = 0.0, 0.0
        for i in range(len(acts) - 1, -1, -1):
            t = acts[i]
            if variant == "bootstrap_last" and i == len(acts) - 1:
                v_next = v_after[b, t]
            if variant == "lambda_in_delta":
                delta = r[b, t] + gamma * lam * v_next - v[b, t]
                a = delta + gamma * a_next
            else:
                delta = r[b, t] + gamma * v_next - v[b, t]
                a = delta + gamma * lam * a_next
            G[b, t] = a if variant == "no_value" else a + v[b, t]
            a_next, v_next = a, v[b, t]
    return G


def _gae_variant(variant):
    def compute(ctx, q):
        if ctx.cfg["returns"] != "gae" or "values" not in ctx.g:
            return None
        if variant == "lambda_in_delta" and ctx.cfg["lam"] in (0.0, 1.0) and ctx.cfg["gamma"] == 1.0:
            return None
        v_after = _forward_at_h_t(ctx, "values")["values"] if variant == "bootstrap_last" else None
        return _gae(ctx.g64("rewards"), ctx.am, ctx.g64("values"), ctx.cfg["gamma"], ctx.cfg["lam"], variant, v_after)
    return compute


def _group(ctx):
    g = ctx.inputs.get("group")
    return None if g is None else np.asarray(g).astype(np.int64)


def _seq_returns(ctx):
    G, am = ctx.g64("returns"), ctx.am
    first = np.argmax(am, axis=1)
    return np.where(am.any(axis=1), G[np.arange(G.shape[0]), first], 0.0), am.any(axis=1)


def _group_stats(ctx, per_group=True, ddof=1):
    """(mean over the group, std over the group) of S per row (B,), rows with an action."""
    S, has = _seq_returns(ctx)
    grp = _group(ctx)
    if grp is None and per_group:
        return None
    mu, sd = np.zeros(S.shape), np.zeros(S.shape)
    for i in np.nonzero(has)[0]:
        same = has & (grp == grp[i]) if per_group else has
        x = S[same]
        if x.size - ddof <= 0:
            return None
        mu[i] = x.mean()
        sd[i] = np.sqrt(np.sum((x - mu[i]) ** 2) / (x.size - ddof))
    return mu, sd


def _group_over_batch(what):
    def compute(ctx, q):
        k = ctx.cfg["baseline"]
        if k not in ("group_mean", "group_loo") or (what == "std" and ctx.cfg.get("group_scale") != "std"):
            return None
        if what == "baseline":
            S, has = _seq_returns(ctx)
            b = np.zeros(S.shape)
            for i in np.nonzero(has)[0]:
                o = has.copy()
                if k == "group_loo":
                    o[i] = False
                b[i] = S[o].mean()
            return on(ctx, np.broadcast_to(b[:, None], ctx.am.shape))
        st = _group_stats(ctx, per_group=False)
        return None if st is None else on(ctx, A0(ctx) / (st[1][:, None] + ctx.cfg["group_eps"]))
    return compute


def _group_std_variant(variant):
    def compute(ctx, q):
        if ctx.cfg.get("group_scale", "off") != "std" or ctx.cfg["whiten"] != "off":
            return None
        st = _group_stats(ctx, ddof=0 if variant == "population" else 1)
        if st is None:
            return None
        sd, eps = st[1][:, None], ctx.cfg["group_eps"]
        den = sd + eps if variant == "population" else np.sqrt(sd ** 2 + eps)
        return on(ctx, A0(ctx) / den)
    return compute


def _ppo(pick=np.minimum, swap=False, unclipped=False, reverse=False):
    def compute(ctx, q):
        cfg = ctx.cfg
        if cfg.get("surrogate", "reinforce") != "ppo_clip" or "old_logp" not in ctx.inputs:
            return None
        if swap and cfg["clip_low"] == cfg["clip_high"]:
            return None
        rho = ratio(ctx, reverse=reverse)
        if q == "ratio":
            return rho if reverse else None
        if unclipped:
            per = on(ctx, -rho * ctx.g64("advantages"))
        else:
            per = ppo_term(ctx, rho, cfg["clip_high"] if swap else None, cfg["clip_low"] if swap else None, pick)
        return float(np.sum(ctx.g64("weights") * per))
    return compute


def _vclip(around_new=False, pick=np.maximum, off=False):
    def compute(ctx, q):
        cfg = ctx.cfg
        if cfg.get("value_clip", 0.0) <= 0 or "old_values" not in ctx.inputs:
            return None
        if off:
            per = (value_prediction(ctx) - ctx.g64("returns")) ** 2
        else:
            per = value_clip_term(ctx, around_new=around_new, pick=pick)
        return cfg["value_coef"] * 0.5 * float(np.sum(ctx.g64("weights") * per))
    return compute


def _ppo_old_not_detached(ctx, q):
    loss, _, keys, gold = _term(ctx, q)
    if loss != "loss_pg" or ctx.cfg.get("surrogate", "reinforce") != "ppo_clip" or not _nonzero(gold):
        return None
    if "old_logp" in ctx.inputs and np.any(np.asarray(ctx.inputs["old_logp"]) != np.asarray(ctx.g["logp"])):
        return None
    return {k: np.zeros_like(v) for k, v in gold.items()}


# ============================================================================ the catalogue

_GATE_ORDERS = [o for o in itertools.permutations(gv.GATE_ORDER) if o != gv.GATE_ORDER]
_GATE_ORDERS.sort(key=lambda o: (o not in (("i", "g", "f", "o"), ("f", "i", "g", "o"), ("i", "f", "o", "g"),
                                           ("i", "o", "f", "g")), o))

_WHITEN_NAME = {"population": "the population variance (÷N)", "bessel": "Bessel's correction (÷(N−1))"}
_PLACE = {"inside": "(A − μ)/sqrt(σ² + 1e-8)", "std": "(A − μ)/(σ + 1e-8) (eps added to the standard deviation)",
          "none": "(A − μ)/σ with no eps",
          "clamp": "(A − μ)/sqrt(max(σ², 1e-8)) (a clamp, as OpenRLHF's)"}
_LOSSES = ("loss_pg", "loss_ent", "loss_value", "loss", "sft_loss", "bt_loss")
_M = Mistake
_SCORED_NOT_TOKENS = tuple(q for q in SCORED if q != "rollout/tokens")

MISTAKES = (
    # --- checked before any value
    _M("non_finite", (ANY,), _non_finite, "{q} has non-finite values ({where}): mask with where(), not by multiplying "
       "(0·(−inf) = NaN where log 0 is masked), keep logsumexp max-shifted, and compute k3 as expm1(−x) + x from the "
       "log-ratio", "pattern"),
    _M("float32_output", (ANY,), _float32_output, "{q} is float32 in a float64 case and matches to float32 precision: "
       "compute this case in float64 (the case's dtype is in its config)", "pattern"),
    # --- the action mask
    _M("action_mask_one_early", ("action_mask",), _action_mask(lambda c, m, tt, pl: m & (tt >= pl - 1)),
       "action mask starts one position early (t ≥ prompt_len − 1): prompt_len counts BOS"),
    _M("action_mask_one_late", ("action_mask",), _action_mask(lambda c, m, tt, pl: m & (tt >= pl + 1)),
       "action mask starts one position late (t ≥ prompt_len + 1)"),
    _M("action_mask_covers_prompt", ("action_mask",), _action_mask(lambda c, m, tt, pl: m & (tt >= 1)),
       "the action mask covers the prompt too (it is mask ∧ t ≥ prompt_len)"),
    _M("action_mask_without_last", ("action_mask",), _action_mask(_no_last),
       "the action mask leaves out each row's last token (EOS and the truncation token are actions)"),
    # --- sampling
    _M("sampling_after_eos", ("rollout/tokens",), _after_eos, "the tokens match up to each row's end, but the row "
       "goes on after it: EOS (id {eos_id}) ends a row and later positions are padding (0)", "pattern"),
    _M("u_one_step_late", ("rollout/tokens",), _forward_variant(("u", 1), None, _shift_u(1)),
       "token t was drawn with u[:, t−1]: u is token-aligned, u[:, t] draws tokens[:, t]"),
    _M("u_one_step_early", ("rollout/tokens",), _forward_variant(("u", -1), None, _shift_u(-1)),
       "token t was drawn with u[:, t+1]: u is token-aligned, u[:, t] draws tokens[:, t]"),
    _M("one_minus_u", ("rollout/tokens",), _forward_variant("1-u", None, _one_minus_u),
       "sampled with 1 − u: the inverse CDF runs from token 0 upwards, a = #{{k : cdf_k ≤ u}}"),
    _M("rollout_mask_ends_early", ("rollout/mask", "rollout/action_mask"), _mask_length(True),
       "the mask ends early: the EOS token is a real token (mask 1) and an action", "pattern"),
    _M("rollout_mask_goes_on", ("rollout/mask", "rollout/action_mask"), _mask_length(False),
       "the mask goes on after the row's end (EOS ends a row)", "pattern"),
    # --- the forward pass
    _M("read_one_position_late", ("scores", "values", "qvalues", "sft_logp"), _read_late,
       "{q}[:, t] matches the reference at t + 1: computed from h_t (the state after reading token t) instead of "
       "h_{{t−1}}; if your arrays use the Hugging Face shifted layout, declare it (layout='shifted')"),
    _M("logits_labels_off_by_one", ("logp",), _logits_not_shifted,
       "log-probs off by one between logits and labels: log π(tokens_t | h_t) (the logits were not shifted "
       "against the labels; token-aligned logp[:, t] uses the scores of position t, computed from h_{{t−1}})"),
    _M("labels_off_by_one", ("logp",), _labels_one_late,
       "log-probs off by one between logits and labels: log π(tokens_{{t+1}} | s_t)"),
    _M("logits_labels_shifted_twice", ("logp",), _shifted_twice,
       "log-probs shifted twice: log π(tokens_t | s_{{t−1}}) = logq[:, t−1, tokens_t] (a logits[:, :-1] / "
       "labels[:, 1:] shift applied to arrays that were already token-aligned)"),
    _M("logp_is_ref_logp", ("logp",), lambda ctx, q: ctx.g64("ref_logp"),
       "logp holds the reference policy's log-probs (policy and reference swapped?)"),
    _M("ref_logp_is_logp", ("ref_logp",), lambda ctx, q: ctx.g64("logp"),
       "ref_logp equals the policy's logp: the frozen reference parameters were not used (or the policy was "
       "scored twice)"),
    _M("entropy_of_sampled_token", ("entropy",), lambda ctx, q: -ctx.g64("logp"),
       "entropy matches −log π(a_t|s_t), the sampled-token estimate; the golden entropy is that of the full "
       "distribution, −Σ_a π(a|s_t) log π(a|s_t)"),
    _M("entropy_in_bits", ("entropy",), lambda ctx, q: ctx.g64("entropy") / np.log(2),
       "entropy is in bits (log2); use natural logarithms"),
    _M("alpha_missing", SCORED, _forward_variant("alpha1", {"alpha": 1.0}, only=_alpha_not1),
       "{q} matches {who} without the inverse temperature α = {alpha} (log_softmax(z) instead of log_softmax(α·z)); "
       "the distribution that samples is the one that is scored, policy and reference alike (TRL #3169, OpenRLHF "
       "PR #853)"),
    _M("alpha_as_temperature", SCORED, _forward_variant("alpha_inv", lambda ctx: {"alpha": 1.0 / ctx.cfg["alpha"]},
                                                        only=_alpha_not1),
       "{q} matches α used as a temperature (z/α, here z/{alpha}); α is an INVERSE temperature: π ∝ exp(α·z)"),
    _M("eps_mixture_missing", SCORED, _forward_variant("eps0", {"eps": 0.0}, only=_eps_pos),
       "{q} matches the plain Boltzmann policy without the ε = {eps} mixture: π_ε = (1−ε)·softmax(α·z) + ε/V, "
       "log π_ε = logaddexp(log1p(−ε) + log π, log(ε/V))"),
) + tuple(
    _M("lstm_gates_" + "".join(o), FORWARD, _forward_variant(("gates", o), None,
                                                            lambda models, o=o: perm_transform(o, models)),
       f"matches the reference with the LSTM gate blocks taken as ({', '.join(o)}): the weights are in PyTorch's "
       f"order (i, f, g, o), rows [0:H] input, [H:2H] forget, [2H:3H] cell, [3H:4H] output (TF/Keras i, f, c, o is "
       f"the same); permute the row blocks of the lstm.* weights and biases when loading them")
    for o in _GATE_ORDERS
) + (
    _M("params_through_float32", tuple(q for q in FORWARD if q != "rollout/tokens"),
       _forward_variant("params32", None, _params_to32, only=_not_rollout_tokens),
       "matches the reference with the parameters rounded to float32: somewhere they pass through float32 (e.g. "
       "loaded into a float32 module by load_state_dict, then cast to float64; cast the module first, then load)"),
    _M("lstm_without_bias_hh", FORWARD, _forward_variant("no_bhh", None, _zero_bias("hh")),
       "matches an LSTM without lstm.bias_hh_l0: PyTorch's LSTM has two biases and adds both (b_ih + b_hh); a "
       "one-bias LSTM must load their sum"),
    _M("lstm_without_bias_ih", FORWARD, _forward_variant("no_bih", None, _zero_bias("ih")),
       "matches an LSTM without lstm.bias_ih_l0: PyTorch's LSTM adds both biases (b_ih + b_hh)"),
    _M("reward_read_after_padding", ("reward_chosen", "reward_rejected"), _reward_over_padding,
       "masking: the reward is read after the padding (the LSTM ran over the padding ids to position T−1); read it "
       "at each row's last real token"),
    # --- the KL estimate
    _M("kl_k1_ratio_reversed", ("kl",), lambda ctx, q: cv.kl_per_token(ctx.g64("ref_logp"), ctx.g64("logp"), ctx.am,
                                                                       "k1"),
       "KL matches k1 with the ratio reversed: logπ_ref − logπ (a sign flip); k1 = x with x = logπ(a_t|s_t) − "
       "logπ_ref(a_t|s_t)"),
    _M("kl_k3_ratio_reversed", ("kl",), lambda ctx, q: cv.kl_per_token(ctx.g64("ref_logp"), ctx.g64("logp"), ctx.am,
                                                                       "k3"),
       "KL matches k3 with the ratio reversed: expm1(x) − x with x = logπ − logπ_ref (trlX's logged KL, rlhf-book "
       "approx_kl3; its expectation under π is χ² − KL, not KL); k3 = expm1(−x) + x, i.e. r − 1 − log r with "
       "r = π_ref/π"),
) + tuple(
    _M(f"kl_estimator_{k}", ("kl",), _kl_estimator(k),
       f"KL matches the estimator {k}; this case uses {{kl}} (k1 = x, k2 = x²/2, k3 = expm1(−x) + x)")
    for k in cv.KL_ESTIMATORS
) + (
    _M("kl_abs", ("kl",), lambda ctx, q: np.abs(_x(ctx)), "KL matches |x| (TRL's 'abs'); this case uses {kl}"),
    # --- the rewards
    _M("R_at_every_action", ("rewards",), lambda ctx, q: on(ctx, -ctx.cfg["beta"] * ctx.g64("kl")) + on(
        ctx, np.broadcast_to(ctx.g64("reward")[:, None], ctx.am.shape)),
       "the sequence reward R is added at every action; it belongs to each row's last action only"),
    _M("R_at_first_action", ("rewards",), lambda ctx, q: _with_R(
        ctx, on(ctx, -ctx.cfg["beta"] * ctx.g64("kl")), [(b, int(np.argmax(ctx.am[b]))) for b, _ in _last(ctx)]),
       "R is added at each row's first action; it belongs to the last action"),
    _M("R_after_last_action", ("rewards",), _rewards_R_after_last,
       "masking: R is placed one position after each row's last action (after EOS, off the action mask: the "
       "index is one too far, e.g. the sequence length instead of length − 1); it belongs to the last action"),
    _M("kl_in_reward_not_loss", ("rewards",), lambda ctx, q: cv.shaped_rewards(
        ctx.g64("kl"), ctx.g64("reward"), ctx.am, ctx.cfg["beta"])
       if ctx.cfg.get("kl_in", "reward") == "loss" and ctx.cfg["beta"] > 0 else None,
       "the rewards hold −β·k_t: the KL penalty is in the reward, but this case puts it in the loss (kl_in='loss', "
       "GRPO: loss_kl = β·Σ w·k and r_t = R at the last action only)"),
    _M("kl_in_loss_not_reward", ("rewards",), lambda ctx, q: cv.shaped_rewards(
        ctx.g64("kl"), ctx.g64("reward"), ctx.am, 0.0)
       if ctx.cfg.get("kl_in", "reward") == "reward" and ctx.cfg["beta"] > 0 else None,
       "the rewards lack −β·k_t (R only): the KL penalty was put in the loss (GRPO's placement); this case has "
       "kl_in='reward': r_t = −β·k_t, + R at the last action"),
    _M("R_missing", ("rewards",), lambda ctx, q: cv.shaped_rewards(ctx.g64("kl"), 0 * ctx.g64("reward"), ctx.am,
                                                                    ctx.cfg["beta"]),
       "R is missing from the rewards (only −β·k_t)"),
    _M("kl_penalty_sign", ("rewards",), lambda ctx, q: cv.shaped_rewards(-ctx.g64("kl"), ctx.g64("reward"), ctx.am,
                                                                          ctx.cfg["beta"]),
       "the KL penalty has the wrong sign: +β·k_t (it is r_t = −β·k_t)"),
    _M("kl_penalty_without_beta", ("rewards",), lambda ctx, q: cv.shaped_rewards(ctx.g64("kl"), ctx.g64("reward"),
                                                                                  ctx.am, 1.0),
       "the KL penalty is not multiplied by β"),
    _M("kl_penalty_per_sequence", ("rewards",), _rewards_seq_kl,
       "the KL penalty is applied once per sequence (−β·Σ_t k_t at the last action, RLOO-style); here it is −β·k_t "
       "at every action"),
    _M("R_on_rows_without_action", ("rewards",), _rewards_R_rows_without_action,
       "masking: R is given to a row with no action (all padding, or a prompt only); such a row gets nothing"),
    # --- the returns
    _M("returns_one_step_late", ("returns",), lambda ctx, q: on(ctx, shift_left(ctx.g64("returns"))),
       "returns match reward-to-go shifted by one step (G_{{t+1}} written at t): the returns must include r_t"),
    _M("returns_one_step_early", ("returns",), lambda ctx, q: on(ctx, shift_right(ctx.g64("returns"))),
       "returns match reward-to-go shifted by one step the other way (G_{{t−1}} written at t)"),
) + tuple(
    _M(f"returns_{k}", ("returns",), lambda ctx, q, k=k: None if k == ctx.cfg["returns"] else cv.discounted_returns(
        ctx.g64("rewards"), ctx.am, ctx.cfg["gamma"], k),
       f"returns match '{k}'; this case uses '{{returns}}' (rtg: G_t = r_t + γ·G_{{{{t+1}}}}; total: Σ_j γ^j r_j at "
       f"every action)")
    for k in cv.RETURNS if k != "gae"
) + (
    _M("gae_lambda_in_delta", ("returns",), _gae_variant("lambda_in_delta"),
       "returns match GAE with λ applied to the wrong term: δ_t = r_t + γλ·V_next − V_t and A_t = δ_t + γ·A_next; "
       "GAE is δ_t = r_t + γ·V_next − V_t, A_t = δ_t + γλ·A_next (λ = {lam}), and G = A + V"),
    _M("gae_returns_are_advantages", ("returns",), _gae_variant("no_value"),
       "returns match the GAE advantages A (V not added back); the returns output is the value target G = A + V "
       "(TRL, CleanRL), and the advantage is G − V"),
    _M("gae_value_next_not_zeroed", ("returns",), _gae_variant("bootstrap_last"),
       "returns match GAE that bootstraps past the row's last action (V_next = V of the state after the last "
       "token, EOS not treated as terminal); V_next = 0 after the row's last action"),
) + (
    _M("gamma_missing", ("returns",), _gamma_lt1(lambda ctx, q: cv.discounted_returns(
        ctx.g64("rewards"), ctx.am, 1.0, ctx.cfg["returns"])),
       "returns match γ = 1: the discount γ = {gamma} is not applied"),
    _M("gamma_from_sequence_start", ("returns",), _gamma_lt1(_returns_from_sequence_start),
       "returns match Σ γ^t r_t with t counted from the start of the sequence (prompt positions counted as time "
       "steps); j = 0 at the row's first action"),
    _M("gamma_not_restarted", ("returns",), _gamma_lt1(_returns_not_restarted),
       "returns match Σ_{{j≥t}} γ^j r_j with j counted from the row's first action (the discount is not restarted "
       "at t): reward-to-go is Σ_{{j≥t}} γ^{{j−t}} r_j"),
    _M("gamma_on_immediate_reward", ("returns",), _gamma_lt1(lambda ctx, q: ctx.cfg["gamma"] * cv.discounted_returns(
        ctx.g64("rewards"), ctx.am, ctx.cfg["gamma"], ctx.cfg["returns"])),
       "returns match Σ_{{j≥t}} γ^{{j−t+1}} r_j (the immediate reward discounted too)"),
    _M("returns_not_accumulated", ("returns",), lambda ctx, q: ctx.g64("rewards"),
       "returns equal the per-token rewards (no accumulation)"),
    # --- the baseline
    _M("baseline_zero", ("baseline",), lambda ctx, q: np.zeros_like(ctx.g64("returns")),
       "the baseline is 0 (not computed); this case uses '{baseline}'"),
    _M("baseline_value_one_late", ("baseline",), lambda ctx, q: on(ctx, shift_left(ctx.g64("values")))
       if "values" in ctx.g else None,
       "the baseline matches V(s_{{t+1}}) (the value head read one position late, e.g. the shifted layout)"),
    _M("baseline_is_value", ("baseline",), lambda ctx, q: on(ctx, ctx.g64("values"))
       if "values" in ctx.g and ctx.cfg["baseline"] != "value" else None,
       "the baseline matches the value head's V(s_t); this case uses '{baseline}'"),
) + tuple(
    _M(f"baseline_{k}", ("baseline",), _baseline_kind(k),
       f"the baseline matches '{k}' ({what}); this case uses '{{baseline}}'")
    for k, what in (("mean", "the mean of G over all actions, the row included"),
                    ("loo", "the mean of G over the other rows"),
                    ("group_mean", "the mean sequence return S of the row's group, the row itself included"),
                    ("group_loo", "the mean sequence return S of the other rows of the row's group"))
    if k in cv.BASELINES
) + (
    _M("group_baseline_over_batch", ("baseline",), _group_over_batch("baseline"),
       "the baseline matches the group statistic over the whole batch (every row with an action as one group); it "
       "is per group (the input 'group')"),
) + (
    _M("baseline_mean_all_positions", ("baseline",), lambda ctx, q: on(
        ctx, np.full_like(ctx.g64("returns"), ctx.g64("returns").sum() / ctx.g64("returns").size)),
       "masking: the baseline matches the mean of G over all B·T positions (padding and prompt counted)"),
    _M("baseline_loo_of_row_means", ("baseline",), _baseline_loo_rows,
       "the baseline matches the mean over the other rows of each row's mean return (rows weighted equally); this "
       "case's baseline is {baseline_text}"),
    _M("baseline_q_of_taken_action", ("baseline",), _baseline_q(
        lambda ctx, Q: np.take_along_axis(Q, ctx.g["tokens"][:, :, None], -1)[:, :, 0]),
       "the baseline matches Q(s_t, a_t) of the taken action; the qvalue baseline is Σ_a π(a|s_t)·Q(s_t, a)"),
    _M("baseline_q_max", ("baseline",), _baseline_q(lambda ctx, Q: Q.max(-1)),
       "the baseline matches max_a Q(s_t, a); it is Σ_a π(a|s_t)·Q(s_t, a)"),
    _M("baseline_q_uniform", ("baseline",), _baseline_q(lambda ctx, Q: Q.mean(-1)),
       "the baseline matches the uniform mean of Q(s_t, ·); it is Σ_a π(a|s_t)·Q(s_t, a)"),
    _M("baseline_q_without_eps", ("baseline",), _q_expectation(False, True),
       "the baseline's expectation uses softmax(α·z) without the ε-mixture; it is Σ_a π_ε(a)·Q(s, a)"),
    _M("baseline_q_without_alpha", ("baseline",), _q_expectation(True, False),
       "the baseline's expectation uses π without α; it is Σ_a π_ε(a|s)·Q(s, a) with the case's α"),
    # --- the advantages
    _M("group_std_over_batch", ("advantages",), _group_over_batch("std"),
       "advantages are scaled by the std of S over the whole batch; GRPO's σ_g is the std over the row's group"),
    _M("group_std_population", ("advantages",), _group_std_variant("population"),
       "advantages are scaled by the population std (÷N) of the group; σ_g is Bessel's (÷(N−1), torch's default)"),
    _M("group_eps_inside_sqrt", ("advantages",), _group_std_variant("eps_inside"),
       "advantages match (G − b)/sqrt(σ_g² + eps); GRPO's is (G − b)/(σ_g + eps)"),
    _M("group_scale_missing", ("advantages",), lambda ctx, q: A0(ctx)
       if ctx.cfg.get("group_scale", "off") == "std" and ctx.cfg["whiten"] == "off" else None,
       "advantages match G − b without the group std scaling; this case divides by σ_g + eps (group_scale='std')"),
    _M("advantages_not_whitened", ("advantages",), _if_whiten(lambda ctx, q: A0(ctx)),
       "advantages match A = G − b without whitening; this case whitens ({whitening})"),
) + tuple(
    _M(f"whiten_{k}_{p}" + ("" if s else "_no_shift"), ("advantages",), _whitening(k, p, s),
       f"advantages match whitening with {_WHITEN_NAME[k]} as {_PLACE[p]}" +
       ("" if s else ", the mean added back (shift_mean=False)") + "; this case: {whitening}")
    for k in cv.WHITEN if k != "off" for p in _PLACE for s in (True, False)
) + (
    _M("whiten_stats_off_mask", ("advantages",), _if_whiten(lambda ctx, q: whiten_variant(
        A0(ctx), ctx.am, ctx.cfg["whiten"], "inside", ctx.cfg["shift_mean"], stats_over=np.ones_like(ctx.am))),
       "masking: the whitening statistics include positions off the action mask (prompt, padding); μ and σ are "
       "over the actions of the batch only"),
    _M("whiten_per_row", ("advantages",), _whiten_per_row,
       "advantages are whitened per row; the statistics are over all actions of the batch"),
    _M("whiten_returns_not_advantages", ("advantages",), _if_whiten(lambda ctx, q: whiten_variant(
        on(ctx, ctx.g64("returns")), ctx.am, ctx.cfg["whiten"], "inside", ctx.cfg["shift_mean"])),
       "advantages match whitened returns G (the baseline not subtracted)"),
    _M("baseline_not_subtracted", ("advantages",), lambda ctx, q: on(ctx, ctx.g64("returns"))
       if ctx.cfg["whiten"] == "off" else None,
       "advantages match the returns G: the baseline is not subtracted"),
    _M("advantages_sign", ("advantages",), lambda ctx, q: -ctx.g64("advantages"),
       "advantages have the wrong sign (b − G)"),
    # --- the aggregation (the weights, and the losses without weights)
) + tuple(
    _M(f"aggregation_{k}", ("weights",) + RL_TERMS, _aggregation(k),
       f"{{q}} matches the aggregation {AGG_TEXT[k]}; this case uses {{aggregation_text}}")
    for k in cv.AGGREGATIONS + _WRONG_AGG if k != "fixed_len"      # fixed_len with L = T: mean_over_all_positions
) + (
    _M("mean_over_all_positions", ("weights",) + RL_TERMS, _aggregation("all_positions"),
       "masking: {q} matches " + AGG_TEXT["all_positions"] + " (the same as aggregation fixed_len with L = T)"),
    # --- the losses
    _M("loss_pg_unwhitened_advantages", ("loss_pg",), lambda ctx, q: -np.sum(
        ctx.g64("weights") * A0(ctx) * ctx.g64("logp")) if ctx.cfg["whiten"] != "off" else None,
       "loss_pg uses the advantages before whitening"),
    _M("loss_ent_without_coef", ("loss_ent",), lambda ctx, q: -np.sum(ctx.g64("weights") * ctx.g64("entropy"))
       if ctx.cfg["entropy_coef"] not in (0.0, 1.0) else None, "loss_ent is missing the coefficient c_H"),
    _M("loss_ent_sampled_estimate", ("loss_ent",), lambda ctx, q: -ctx.cfg["entropy_coef"] * np.sum(
        ctx.g64("weights") * -ctx.g64("logp")),
       "loss_ent matches −c_H·Σ w·(−log π(a_t)) (the sampled-token entropy estimate)"),
    _M("ppo_clip_max_not_min", ("loss_pg",), _ppo(pick=np.maximum),
       "loss_pg matches −max(ρA, clip(ρ)A): the clip is applied on the wrong side (PPO's objective takes the min, "
       "the pessimistic bound: ℓ = −min(ρA, clip(ρ, 1 − clip_low, 1 + clip_high)·A))"),
    _M("ppo_clip_bounds_swapped", ("loss_pg",), _ppo(swap=True),
       "loss_pg matches the clip range with clip_low and clip_high swapped: ρ ∈ [1 − clip_high, 1 + clip_low]; it "
       "is [1 − clip_low, 1 + clip_high]"),
    _M("ppo_unclipped", ("loss_pg",), _ppo(unclipped=True),
       "loss_pg matches −Σ w·ρ·A without the clip"),
    _M("ppo_ratio_reversed", ("loss_pg", "ratio"), _ppo(reverse=True),
       "{q} matches the ratio reversed, exp(old_logp − logp); ρ = π/π_old = exp(logp − old_logp)"),
    _M("reinforce_instead_of_ppo", ("loss_pg",), lambda ctx, q: -float(np.sum(
        ctx.g64("weights") * ctx.g64("advantages") * ctx.g64("logp")))
       if ctx.cfg.get("surrogate", "reinforce") == "ppo_clip" else None,
       "loss_pg matches REINFORCE's −Σ w·A·log π; this case uses the PPO-clip surrogate −Σ w·min(ρA, clip(ρ)A)"),
    _M("value_clip_around_new", ("loss_value",), _vclip(around_new=True),
       "loss_value matches the value clip taken around the new prediction (V + clip(old − V, −c, c)); it is "
       "around the old one: V_clip = old_values + clip(V − old_values, −c, c)"),
    _M("value_clip_min_not_max", ("loss_value",), _vclip(pick=np.minimum),
       "loss_value matches min((V − G)², (V_clip − G)²); the clipped value loss takes the max"),
    _M("value_clip_missing", ("loss_value",), _vclip(off=True),
       "loss_value matches ½(V − G)² without the value clip; this case clips around old_values"),
    _M("loss_kl_without_beta", ("loss_kl",), lambda ctx, q: float(np.sum(ctx.g64("weights") * ctx.g64("kl")))
       if ctx.cfg["beta"] not in (0.0, 1.0) else None, "loss_kl lacks the coefficient β"),
    _M("loss_kl_sign", ("loss_kl",), lambda ctx, q: -ctx.g64("loss_kl") if float(ctx.g64("loss_kl")) else None,
       "loss_kl has the wrong sign: the KL term is added to the loss (+β·Σ w·k)"),
    _M("loss_value_without_half", ("loss_value",), lambda ctx, q: 2 * ctx.g64("loss_value"),
       "loss_value lacks the ½: L_value = c_V·½·Σ w·(V − G)²{half_note}"),
    _M("loss_value_on_advantages", ("loss_value",), lambda ctx, q: ctx.cfg["value_coef"] * np.sum(
        ctx.g64("weights") * 0.5 * (value_prediction(ctx) - ctx.g64("advantages")) ** 2),
       "loss_value regresses on the advantages instead of the returns"),
    _M("loss_value_on_baseline", ("loss_value",), lambda ctx, q: ctx.cfg["value_coef"] * np.sum(
        ctx.g64("weights") * 0.5 * (ctx.g64("baseline") - ctx.g64("returns")) ** 2)
       if ctx.cfg["critic"] == "qvalue" else None,
       "loss_value regresses Σ_a π(a|s)·Q(s, a) (the baseline); the qvalue critic regresses Q(s_t, a_t)"),
    _M("loss_value_without_coef", ("loss_value",), lambda ctx, q: ctx.g64("loss_value") / ctx.cfg["value_coef"]
       if ctx.cfg["value_coef"] not in (0.0, 0.5, 1.0) else None, "loss_value lacks the coefficient c_V"),
) + tuple(
    _M(f"loss_without_{t}", ("loss",), _loss_without(t), f"loss lacks {t}") for t in RL_TERMS + ("loss_kl",)
) + (
    _M("loss_subtracts_loss_ent", ("loss",), _loss_minus("loss_ent"),
       "loss subtracts loss_ent (the entropy bonus counted twice with opposite signs)"),
    _M("loss_subtracts_loss_value", ("loss",), _loss_minus("loss_value"), "loss subtracts loss_value"),
    _M("loss_sign", _LOSSES, lambda ctx, q: -ctx.g64(q),
       "{q} has the wrong sign: the losses are minimised (L_pg = −Σ w·A·log π, L_sft = −mean log-likelihood, "
       "L_RM = mean −log σ(r_chosen − r_rejected); descent on L is ascent on J; the founding article's update has "
       "this sign slip)"),
    _M("sft_mean_over_all_positions", ("sft_loss",), lambda ctx, q: -ctx.g64("sft_logp").sum() / ctx.g["mask"].size,
       "sft_loss is a mean over all B·T positions (padding counted); it is a token mean over real t ≥ 1"),
    _M("sft_mean_with_column_0", ("sft_loss",), lambda ctx, q: -ctx.g64("sft_logp").sum() / ctx.mask.sum(),
       "sft_loss is a mean over real tokens including column 0 (BOS is never predicted)"),
    _M("sft_sum", ("sft_loss",), lambda ctx, q: -ctx.g64("sft_logp").sum(), "sft_loss is a sum (not a token mean)"),
    _M("sft_mean_of_row_means", ("sft_loss",), _sft_row_means,
       "sft_loss is the mean of per-row means; it is a token mean over the batch"),
    _M("bt_chosen_rejected_swapped", ("bt_loss",), lambda ctx, q: np.mean(np.logaddexp(
        0.0, ctx.g64("reward_chosen") - ctx.g64("reward_rejected"))),
       "bt_loss matches chosen and rejected swapped: −log σ(r_rejected − r_chosen)"),
    _M("bt_sum", ("bt_loss",), lambda ctx, q: np.sum(np.logaddexp(
        0.0, ctx.g64("reward_rejected") - ctx.g64("reward_chosen"))), "bt_loss is a sum over pairs; it is the mean"),
    # --- the gradients (a whole term: every parameter the implementation gave)
    _M("entropy_detached", (GRAD,), _grad_zero(True),
       "the entropy term has no gradient: the entropy must not be detached (only A, G, the baselines, the whitening "
       "statistics, R and β·k are constants)"),
    _M("ppo_old_logp_not_detached", (GRAD,), _ppo_old_not_detached,
       "the gradient of loss_pg is 0: with old_logp = logp (ratio 1) the old log-probs were not detached, so ρ = "
       "exp(logp − logp) has no gradient; ρ = exp(logp − stop_gradient(old_logp))"),
    _M("loss_detached", (GRAD,), _grad_zero(False),
       "the gradient of {loss} is 0 for every parameter: the loss was detached from the parameters"),
    _M("gradient_sign", (GRAD,), _grad_sign,
       "the gradient of {loss} has the wrong sign for every parameter: the losses are minimised (θ ← θ − η·∇L)"),
    _M("gradient_scaled", (GRAD,), _grad_scaled,
       "the gradient of {loss} is {grad_factor}× the expected for every parameter{grad_factor_why} (a "
       "normalisation, aggregation or coefficient differs while {values_state})"),
    _M("value_loss_body_detached", (GRAD,), _grad_value_body_detached,
       "the value loss does not reach the LSTM body (its features were detached): the value head shares the "
       "policy's body, and the gradient of L_value flows into it (docs/conventions.md §2)"),
    _M("baseline_not_detached", (GRAD,), _grad_baseline_not_detached,
       "the critic head gets a gradient from L_pg: the baseline is not detached (A = G − b must be a constant in "
       "L_pg; detach b or A)", "pattern"),
    _M("kl_penalty_not_detached", (GRAD,), _grad_kl_not_detached,
       "the KL penalty is not detached: the gradient of L_pg flows through β·k in the rewards (R and β·k are "
       "constants; k is computed from the detached log-probs)"),
) + tuple(
    _M(f"total_gradient_lacks_{t}", (GRAD,), _grad_total_lacks(t), f"the total gradient lacks the gradient of {t}")
    for t in RL_TERMS
) + (
    _M("stop_gradient", (GRAD,), lambda ctx, q: True,
       "{values_state} but this gradient differs: a missing stop-gradient (A, G, the baselines, the whitening "
       "statistics, R and β·k are constants; the entropy is not), or a wrong backward pass through this parameter",
       "pattern"),
    # --- generic patterns (no value candidate matched)
    _M("opposite_sign", (ANY,), _opposite_sign, "{q} has the opposite sign", "pattern"),
    _M("padding_leak", (ANY,), _padding_leak, "only rows with padding differ (rows {rows}): padding leaks into {q} "
       "(a mask is missing somewhere upstream)", "pattern"),
    _M("last_action_only", (ANY,), _last_action_only,
       "only each row's last action differs in {q} (where R is added, EOS, truncation)", "pattern"),
    _M("float32_somewhere", (ANY,), _float32_somewhere,
       "the differences are small (≤ {rel} of the largest |{q}|) and spread over {n_bad} entries, like float32 "
       "rounding: part of the computation runs in float32 in this float64 case (a float32 default dtype, module, "
       "constant or input)", "pattern"),
    _M("reduced_precision", (ANY,), _reduced_precision,
       "the differences are small (≤ {rel} of the largest |{q}|) and spread over {n_bad} entries: reduced "
       "precision somewhere (TF32 matmuls — torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 "
       "—, fp16/bf16 autocast, or inputs rounded)", "pattern"),
)

BY_NAME = {m.name: m for m in MISTAKES}
assert len(BY_NAME) == len(MISTAKES), "mistake names must be unique"


# ============================================================================ naming the closest

def distance(ctx, q, got, cand):
    """How far the implementation's value is from a candidate, in tolerances (max over entries;
    inf for a shape or integer mismatch). A dict candidate: the max over the names given."""
    if cand is None:
        return np.inf
    if isinstance(cand, (bool, np.bool_)):
        return 0.0 if cand else np.inf
    if isinstance(cand, dict):
        d = 0.0
        for k, v in cand.items():
            if k not in ctx.impl:
                continue
            gk = got if k == q else ctx.impl_value(k)
            d = max(d, distance(ctx, k, gk, v))
            if d == np.inf:
                break
        return d
    cand = np.asarray(cand)
    got = np.asarray(got)
    if cand.shape != got.shape:
        return np.inf
    if np.asarray(ctx.g[q]).dtype.kind in "iub":
        return 0.0 if np.array_equal(got, cand) else np.inf
    cand = cand.astype(np.float64)
    atol, rtol = ctx.tol(q)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        r = np.abs(got - cand) / (atol + rtol * np.abs(cand))
    if r.size == 0:
        return 0.0
    r = np.where(np.isnan(r), np.inf, r)
    return float(np.max(r))


_EXPECTED = (ValueError, TypeError, IndexError, KeyError, FloatingPointError, ZeroDivisionError)


def candidates(ctx, q, got):
    """[(distance, mistake)] of every value mistake of ``q`` that applies, closest first."""
    out = []
    for i, m in enumerate(MISTAKES):
        if m.kind != "value" or not m.applies_to(q):
            continue
        try:
            with np.errstate(all="ignore"):
                c = m.compute(ctx, q)
        except _EXPECTED:
            continue
        d = distance(ctx, q, got, c)
        if np.isfinite(d):
            out.append((d, i, m))
    out.sort(key=lambda t: (t[0], t[1]))
    return [(d, m) for d, _, m in out]


def closest(ctx, q, got):
    """The value mistake closest to ``got`` within HINT_SLACK tolerances, or None. Others within one
    tolerance of ``got`` as well (indistinguishable on this case) are listed in ``ctx.tied``."""
    ctx.got, ctx.note, ctx.tied = got, {}, []
    found = [(d, m) for d, m in candidates(ctx, q, got) if d <= HINT_SLACK]
    if not found:
        return None
    d0, m = found[0]
    ctx.tied = [o.name for d, o in found[1:] if d <= max(1.0, d0)]
    ctx.got, ctx.note = got, {}
    m.compute(ctx, q)                       # recompute: its notes (e.g. the gradient factor) for the text
    return m


def diagnose(ctx, q, got):
    """The named mistake that explains the implementation's ``got`` for quantity ``q`` (None when
    none does): pre-checks, then the closest value within HINT_SLACK tolerances, then patterns."""
    ctx.got, ctx.note, ctx.tied = got, {}, []
    pre, post = MISTAKES[:2], [m for m in MISTAKES[2:] if m.kind == "pattern"]
    for m in pre:
        if m.applies_to(q) and m.compute(ctx, q):
            return m
    m = closest(ctx, q, got)
    if m is not None:
        return m
    ctx.got, ctx.note, ctx.tied = got, {}, []
    for m in post:
        if not m.applies_to(q):
            continue
        try:
            with np.errstate(all="ignore"):
                if m.compute(ctx, q) is True:
                    return m
        except _EXPECTED:
            continue
    return None


def words(ctx, q):
    """The case's switches and facts, by the names the texts use."""
    cfg = ctx.cfg
    wk = cfg["whiten"]
    whitening = "not whitened" if wk == "off" else (f"whitened with {_WHITEN_NAME[wk]} as {_PLACE['inside']}" + (
        "" if cfg["shift_mean"] else ", the mean added back (shift_mean=False)"))
    values = [n for n in ctx.checked if not n.startswith("grad/") and ctx.g[n].dtype.kind == "f"]
    parts = q.split("/")
    return {
        "q": q, "lam": f"{cfg.get('lam', 1.0):g}", "alpha": f"{cfg['alpha']:g}", "eps": f"{cfg['eps']:g}",
        "gamma": f"{cfg['gamma']:g}", "beta": f"{cfg['beta']:g}", "kl": cfg["kl"], "returns": cfg["returns"],
        "baseline": cfg["baseline"], "eos_id": cfg["eos_id"], "whitening": whitening,
        "baseline_text": f"'{cfg['baseline']}': " + BASELINE_TEXT.get(cfg["baseline"], "see docs/conventions.md §3"),
        "aggregation_text": AGG_TEXT.get(cfg["aggregation"], cfg["aggregation"]),
        "who": "the reference policy" if q == "ref_logp" else "the policy",
        "half_note": " (or lacks c_V = 0.5: both double it)" if cfg["value_coef"] == 0.5 else "",
        "loss": parts[1] if parts[0] == "grad" and len(parts) > 1 else q,
        "values_state": ("the values match" if values else
                         "no values (log-probs, losses) were given, so only the gradients were compared,"),
    }


def hint_text(ctx, m, q):
    return m.text.format_map(dict(words(ctx, q), **ctx.note))


def table_text():
    """The catalogue as text: one line per mistake (name, quantity, what)."""
    lines = []
    for m in MISTAKES:
        qty = ", ".join(m.quantity) if len(m.quantity) <= 3 else ", ".join(m.quantity[:3]) + ", ..."
        lines.append(f"{m.name:34s} {qty:40s} {m.line()}")
    return "\n".join(lines)
