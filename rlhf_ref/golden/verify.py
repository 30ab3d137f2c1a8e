"""Check another implementation against the golden vectors: every quantity that differs, where,
by how much, whether it follows from an earlier difference, and what usually causes that pattern.

    rlhf-ref verify CASES OUTPUTS [--layout {shifted,response}] [--case NAME] [--max-file-mb MB] [-v]
    rlhf-ref verify --list-mistakes

CASES is a folder written by ``rlhf-ref vectors``; OUTPUTS a folder with one ``<case>.npz`` per
case holding the implementation's outputs under the golden names (docs/golden-vectors.md). From
Python: ``verify(cases, outputs)`` with a folder or a ``{case: {name: array}}`` dict, or
``verify_outputs(outputs, case, golden=None)`` for one case's dict; both return a ``Report``
(``.ok``, ``.exit_code``, ``.format()``: the text to raise an AssertionError with).

Per case and section (rollout, rl, sft, rm) every quantity given is compared in data-flow order.
The first that differs is the section's root: for it the verifier recomputes the usual mistakes
from the golden values just upstream of it (which matched) — k1/k3 with the ratio reversed,
returns shifted by one step, whitening with the other variance or another eps placement, α
missing from the log-probs, the LSTM gate blocks in another order, a missing stop-gradient, ... —
each a named entry of rlhf_ref.golden.mistakes, and names the closest one. Each later difference
is recomputed with the reference math from the implementation's OWN upstream values: when that
matches, it *follows* from them (a consequence, listed compactly); otherwise it is a second,
independent mistake, diagnosed the same way from those values. Gradients, which values cannot
recompute, are *downstream* after an earlier difference. Separately, values that should be
exactly 0 off a mask but are not are a *masking* finding; the comparison then goes on with the
on-mask values.

The package: rlhf_ref.golden.cases (the case table), .vectors (inputs, compute, files, reading),
.compare (a case's context: tolerances, tie-aware comparison), .mistakes (the catalogue of named
mistakes: ``rlhf-ref verify --list-mistakes``), and this module (Report, verify_case, verify, CLI).

Every file is read through rlhf_ref.safe_read: a file the manifest names must lie inside the
golden folder, sizes are limited (``--max-file-mb``), and a bad file is an error
``rlhf-ref verify: error: <file>[:<line>]: <what is wrong>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .. import model, policy, safe_read
from .. import returns as _ret
from . import conventions as cv
from . import mistakes as mk
from . import vectors as gv
from .compare import (HINT_SLACK, LAYOUTS, LOSS_NAMES, SECTIONS, Ctx, _close, _compare_int, _fmt, _idx,  # noqa: F401
                      _normalise, _position_kinds, _shape_msg, _tie_rows, _zero_mask)

_Ctx = Ctx

# ============================================================================ report objects

@dataclass
class Finding:
    """One thing found in one case."""
    case: str
    section: str
    kind: str            #: "differs", "masking", "shape", "note"
    quantity: str
    message: str
    hint: str = ""
    index: tuple = ()    #: where (the worst entry), token-aligned coordinates; the message gives yours
    mistake: str = ""    #: the name of the mistake the hint describes (rlhf_ref.golden.mistakes), if any
    #: for a difference after the first of its section: "follows" (recomputed with the reference math
    #: from your own upstream values, it matches: a consequence), "independent" (it does not: a second
    #: mistake, diagnosed from your upstream values) or "downstream" (not recomputable from values:
    #: gradients); "" for the first difference of a section (the root)
    relation: str = ""
    upstream: tuple = ()  #: the upstream quantities of yours that differ and that it was recomputed from

    @property
    def failing(self):
        return self.kind != "note"

    @property
    def root(self):
        return self.failing and self.kind != "masking" and not self.relation

    def format(self):
        tag = {"differs": "", "masking": "masking: ", "shape": "", "note": "note: "}[self.kind]
        s = f"[{self.section}] {tag}{self.quantity}: {self.message}"
        if self.relation == "follows":
            s += f"\n       follows from your {', '.join(self.upstream)} (recomputed from them, it matches)"
        elif self.relation == "independent":
            s += ("\n       a second, independent mistake: recomputed from your "
                  + (", ".join(self.upstream) if self.upstream else "upstream values") + ", it still differs")
        elif self.relation == "downstream":
            s += "\n       may follow from the differences above (gradients are not recomputed from your values)"
        if self.hint:
            s += f"\n       hint: {self.hint}"
        return s


@dataclass
class CaseReport:
    case: str
    description: str = ""
    findings: list = field(default_factory=list)
    checked: list = field(default_factory=list)
    not_checked: list = field(default_factory=list)      #: golden outputs the implementation did not give
    not_compared: list = field(default_factory=list)     #: kept for old callers: every given quantity is compared
    ignored: list = field(default_factory=list)          #: given but not golden outputs
    missing: bool = False                                #: no outputs at all for this case

    @property
    def ok(self):
        return not any(f.failing for f in self.findings)

    def first(self, section=None):
        """The first failing finding (of ``section``), or None."""
        for f in self.findings:
            if f.failing and f.kind != "masking" and (section is None or f.section == section):
                return f
        return None

    def differing(self, section=None):
        """Every failing finding (of ``section``) that is not a masking one, in data-flow order."""
        return [f for f in self.findings if f.failing and f.kind != "masking"
                and (section is None or f.section == section)]

    def format(self, verbose=False):
        if self.missing:
            return f"--   {self.case}: no outputs (not checked)"
        head = "ok  " if self.ok else "FAIL"
        lines = []
        if self.ok:
            s = f"{head} {self.case}: {len(self.checked)} quantities match"
            if self.not_checked:
                s += f" ({len(self.not_checked)} not produced: not checked)"
            lines.append(s)
        else:
            lines.append(f"{head} {self.case}" + (f"  ({self.description})" if verbose and self.description else ""))
        prev = None
        grouped = {}              # (section, relation) -> quantities: one line each unless verbose
        for f in self.findings:
            if not verbose and f.relation in ("follows", "downstream"):
                grouped.setdefault((f.section, f.relation), []).append(f.quantity)
                continue
            line = "     " + f.format()
            if f.hint and f.hint == prev:
                line = line.replace(f.hint, "the same (see above)")
            prev = f.hint or prev
            lines.append(line)
        for (section, rel), names in grouped.items():
            what = ("follow from your values above (recomputed from them with the reference math, they match)"
                    if rel == "follows" else
                    "differ downstream (gradients: not recomputed from your values, they may follow from the above)")
            lines.append(f"     [{section}] {len(names)} more {what}: {_group(names)}")
        if not self.ok:
            diff = self.differing()
            n = {r: sum(f.relation == r for f in diff) for r in ("", "independent", "follows", "downstream")}
            parts = [f"{len(self.checked)} match", f"{len(diff)} differ"]
            if len(diff):
                parts.append(", ".join(f"{k} {w}" for k, w in ((n[""], "first in its section"),
                                                                (n["independent"], "independent"),
                                                                (n["follows"], "following"),
                                                                (n["downstream"], "downstream")) if k))
            lines.append("     (" + "; ".join(parts) + ")")
        if verbose:
            if self.ignored:
                lines.append("     ignored (not golden outputs): " + ", ".join(self.ignored))
        return "\n".join(lines)


@dataclass
class Report:
    cases: list
    golden: str = ""
    outputs: str = ""

    @property
    def ok(self):
        return all(c.ok for c in self.cases) and self.n_checked > 0

    @property
    def n_checked(self):
        """Quantities compared and found to match."""
        return sum(len(c.checked) for c in self.cases)

    @property
    def n_compared(self):
        """Quantities compared, matching or not (a finding that is not a note is one compared quantity)."""
        return self.n_checked + len({(c.case, f.quantity) for c in self.cases for f in c.findings if f.kind != "note"})

    @property
    def exit_code(self):
        return 0 if self.ok else 1

    def case(self, name):
        for c in self.cases:
            if c.case == name:
                return c
        raise KeyError(name)

    def format(self, verbose=False):
        run = [c for c in self.cases if not c.missing]
        bad = [c for c in run if not c.ok]
        head = (f"rlhf-ref verify: {len(self.cases)} cases, {len(run) - len(bad)} pass, {len(bad)} fail"
                + (f", {len(self.cases) - len(run)} without outputs" if len(run) < len(self.cases) else ""))
        lines = [head]
        order = bad + [c for c in self.cases if c not in bad]        # failures first
        for c in order:
            if c.ok and not verbose and not c.missing and not c.findings:
                continue
            if c.missing and not verbose:
                continue
            lines.append(c.format(verbose))
        if not verbose and len(run) - len(bad):
            lines.append(f"ok   {len(run) - len(bad)} case(s): " + ", ".join(c.case for c in run if c.ok))
        missing = [c.case for c in self.cases if c.missing]
        if missing and not verbose:
            lines.append(f"--   no outputs for {len(missing)} case(s): " + ", ".join(missing))
        if not verbose:
            nc = [(c.case, n) for c in run for n in c.not_checked]
            if nc:
                cases = sorted({c for c, _ in nc})
                lines.append(f"not checked (not produced): {len(nc)} golden quantities in {len(cases)} case(s) "
                             "(-v lists them)")
        if verbose:
            groups = {}
            for c in self.cases:
                if c.not_checked and not c.missing:
                    groups.setdefault(_group(c.not_checked), []).append(c.case)
            for names, cases in groups.items():
                which = "every case" if len(cases) == len(run) and len(run) > 1 else ", ".join(cases)
                lines.append(f"not checked (not produced) in {which}: {names}")
        if self.n_compared == 0:
            lines.append("nothing was checked: no output has a golden name (see docs/golden-vectors.md)")
        return "\n".join(lines)

    __str__ = format


def _group(names):
    """'grad/loss_pg/policy/*' for runs of gradient names."""
    out, seen = [], set()
    for n in names:
        p = n.split("/")
        key = "/".join(p[:3]) + "/*" if p[0] == "grad" else n
        if key not in seen:
            seen.add(key)
            out.append(key)
    return ", ".join(out)


# ============================================================================ loading outputs

def load_outputs(path):
    """An implementation's outputs: ``{case: {name: array}}`` from a folder of ``<case>.npz``
    (or one .npz, keyed by its file stem). Read through rlhf_ref.safe_read (regular files only,
    sizes limited, no pickle); a bad file raises FileReadError ``<file>: <what is wrong>``."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as e:
            raise safe_read.FileReadError(path, f"cannot list the outputs folder: {e.strerror or e}") from None
        files = [os.path.join(path, f) for f in names if f.endswith(".npz")]
    else:
        files = [path]
    out = {}
    for f in files:
        data = safe_read.read_bytes(f, what="outputs file")
        out[os.path.splitext(os.path.basename(f))[0]] = safe_read.load_npz(data, f, what="outputs file")
    return out


# ============================================================================ hints

def _hint(ctx, n, got):
    """{hint, mistake name} for the first differing quantity ``n``; ('', '') when no named
    mistake explains it."""
    try:
        m = mk.diagnose(ctx, n, got)
        if m is None:
            return {"hint": "", "mistake": ""}
        hint = mk.hint_text(ctx, m, n)
        if ctx.tied:
            hint += f" (as close: {', '.join(ctx.tied)}; see rlhf-ref verify --list-mistakes)"
        return {"hint": hint, "mistake": m.name}
    except Exception as ex:          # a hint is a courtesy: never let it hide the finding
        return {"hint": f"(no hint: looking for one failed with {type(ex).__name__}: {ex})", "mistake": ""}


def _masking_hint(ctx, n, got):
    """A named mistake whose values, off-mask entries included, are the implementation's (e.g. R
    given to a row without an action); none when the off-mask values are just not zeroed."""
    try:
        m = mk.closest(ctx, n, np.asarray(got, np.float64))
        return {"hint": "", "mistake": ""} if m is None else {"hint": mk.hint_text(ctx, m, n), "mistake": m.name}
    except Exception:                # a hint is a courtesy: never let it hide the finding
        return {"hint": "", "mistake": ""}



# ============================================================================ following differences

def _on(m, a):
    while m.ndim < np.ndim(a):
        m = m[..., None]
    return np.where(m, a, 0.0)


def _recompute(ctx, q, val):
    """(value, upstream names) of ``q`` recomputed with the reference math from the values ``val(name)``
    (yours where you gave them, else golden), or (None, ()) where ``q`` is not a function of other
    compared values (the forward pass from the parameters, gradients) or the case's switches are
    ones this recomputation does not cover."""
    cfg = ctx.cfg
    if q in ("rollout/mask", "rollout/action_mask"):
        tok = np.asarray(val("rollout/tokens"))
        pl = np.asarray(ctx.g["rollout/prompt_len"])[:, None]
        tt = np.arange(tok.shape[1])[None, :]
        eos = (tok == cfg["eos_id"]) & (tt >= pl)
        first = np.where(eos.any(axis=1), np.argmax(eos, axis=1), tok.shape[1])[:, None]
        m = (tt <= first).astype(np.int64)
        return (m if q == "rollout/mask" else m * (tt >= pl)), ("rollout/tokens",)
    if gv.section_of(q) == "rollout":
        if q != "rollout/logp":
            return None, ()
        tok = np.asarray(val("rollout/tokens")).astype(np.int64)
        if tok.min(initial=0) < 0 or tok.max(initial=0) >= ctx.dims["V"]:
            return None, ()
        pol = {k.split("/", 1)[1]: np.asarray(v, np.float64) for k, v in ctx.inputs.items()
               if k.startswith("policy/")}
        fwd, _ = model.forward(pol, tok, np.asarray(val("rollout/mask")))
        lq = policy.logprobs(fwd["scores"], cfg["alpha"], cfg["eps"])
        lp = np.take_along_axis(lq, tok[:, :, None], -1)[:, :, 0]
        return _on(np.asarray(val("rollout/action_mask")) > 0, lp), \
            ("rollout/tokens", "rollout/mask", "rollout/action_mask")
    if q == "sft_loss":
        return -float(np.sum(val("sft_logp"))) / max(float(ctx.pm.sum()), 1.0), ("sft_logp",)
    if q == "bt_loss":
        return float(np.mean(np.logaddexp(0.0, val("reward_rejected") - val("reward_chosen")))), \
            ("reward_chosen", "reward_rejected")
    if "action_mask" not in ctx.g:
        return None, ()
    am = np.asarray(val("action_mask")) > 0
    inp = ctx.inputs
    group = np.asarray(inp["group"]).astype(np.int64) if "group" in inp else None
    if q == "logq":
        return _on(ctx.pm, policy.logprobs(val("scores"), cfg["alpha"], cfg["eps"])), ("scores",)
    if q == "logp":
        tok = ctx.g["tokens"]
        return _on(am, np.take_along_axis(val("logq"), tok[:, :, None], -1)[:, :, 0]), ("logq", "action_mask")
    if q == "entropy":
        lq = val("logq")
        return _on(am, -np.sum(np.exp(lq) * lq, -1)), ("logq", "action_mask")
    if q == "kl":
        return cv.kl_per_token(val("logp"), val("ref_logp"), am, cfg["kl"]), ("logp", "ref_logp", "action_mask")
    if q == "rewards":
        beta = cfg["beta"] if cfg.get("kl_in", "reward") == "reward" else 0.0
        return cv.shaped_rewards(val("kl"), ctx.g64("reward"), am, beta), ("kl", "action_mask")
    if q == "returns":
        if cfg["returns"] == "gae":
            return _ret.discounted_returns(val("rewards"), am, cfg["gamma"], "gae", values=val("values"),
                                           lam=cfg["lam"]), ("rewards", "values", "action_mask")
        return cv.discounted_returns(val("rewards"), am, cfg["gamma"], cfg["returns"]), ("rewards", "action_mask")
    if q == "baseline":
        k = cfg["baseline"]
        if k == "none":
            return np.zeros(am.shape), ()
        if k == "value":
            return _on(am, val("values")), ("values", "action_mask")
        if k == "qvalue":
            return _on(am, np.sum(np.exp(val("logq")) * val("qvalues"), -1)), ("logq", "qvalues", "action_mask")
        if k in ("group_mean", "group_loo"):
            return _ret.baseline(k, val("returns"), am, group=group), ("returns", "action_mask")
        return cv.baseline(k, val("returns"), am), ("returns", "action_mask")
    if q == "advantages":
        G = val("returns")
        a0 = _on(am, G - val("baseline"))
        if cfg.get("group_scale", "off") != "off":
            a0 = _ret.group_scale(a0, G, am, group, cfg["group_scale"], cfg["group_eps"])
        if cfg["whiten"] != "off":
            a0 = cv.whiten(a0, am, cfg["whiten"], cfg["shift_mean"])
        return a0, ("returns", "baseline", "action_mask")
    if q == "ratio":
        lp = val("logp")
        old = np.asarray(inp["old_logp"], np.float64) if "old_logp" in inp else lp
        return _on(am, np.exp(lp - old)), ("logp", "action_mask")
    if q == "weights":
        if cfg["aggregation"] == "fixed_len":
            return cv.aggregation_weights(am, "fixed_len", cfg.get("norm_len", 0.0)), ("action_mask",)
        return cv.aggregation_weights(am, cfg["aggregation"]), ("action_mask",)
    if q == "loss_pg":
        w, A = val("weights"), val("advantages")
        if cfg.get("surrogate", "reinforce") == "ppo_clip":
            rho = val("ratio") if "ratio" in ctx.g else np.ones(am.shape)
            per = -np.minimum(rho * A, np.clip(rho, 1 - cfg["clip_low"], 1 + cfg["clip_high"]) * A)
            return float(np.sum(w * _on(am, per))), ("weights", "advantages", "ratio")
        return -float(np.sum(w * A * val("logp"))), ("weights", "advantages", "logp")
    if q == "loss_ent":
        return -cfg["entropy_coef"] * float(np.sum(val("weights") * val("entropy"))), ("weights", "entropy")
    if q == "loss_kl":
        return cfg["beta"] * float(np.sum(val("weights") * val("kl"))), ("weights", "kl")
    if q == "loss_value":
        if cfg["critic"] == "value":
            pred, dep = _on(am, val("values")), "values"
        else:
            pred = _on(am, np.take_along_axis(val("qvalues"), ctx.g["tokens"][:, :, None], -1)[:, :, 0])
            dep = "qvalues"
        G = val("returns")
        per = (pred - G) ** 2
        c = cfg.get("value_clip", 0.0)
        if c > 0:
            old = _on(am, np.asarray(inp["old_values"], np.float64))
            per = np.maximum(per, (old + np.clip(pred - old, -c, c) - G) ** 2)
        return cfg["value_coef"] * float(np.sum(val("weights") * 0.5 * _on(am, per))), ("weights", dep, "returns")
    if q == "loss":
        terms = tuple(t for t in ctx.entry["outputs"] if t.startswith("loss_"))
        return float(sum(float(val(t)) for t in terms)), terms
    return None, ()


class _Overlay:
    """The case's golden arrays with yours laid over them (for recomputing a later quantity from your
    own upstream values): ``ctx.g`` is swapped for it while a second mistake is diagnosed."""

    def __init__(self, ctx):
        self.ctx, self.yours = ctx, {}

    def value(self, name):
        if name in self.yours:
            return self.yours[name]
        return self.ctx.g64(name) if self.ctx.g[name].dtype.kind == "f" else np.asarray(self.ctx.g[name])

    def diagnose(self, n, got, rec):
        ctx = self.ctx
        g = ctx.g
        over = dict(g)
        over.update(self.yours)
        if rec is not None:
            over[n] = np.asarray(rec, np.float64)
        ctx.g = over
        try:
            return _hint(ctx, n, got)
        finally:
            ctx.g = g


# ============================================================================ verifying a case

def _where(ctx, n, ix, layout):
    """An index as the implementation sees it, saying which layout's coordinates it is in."""
    if not ix:
        return ""
    if layout == "token-aligned" or len(ix) < 2 or not gv.time_aligned(n):
        return _idx(ix)
    b, t = int(ix[0]), int(ix[1])
    if layout == "shifted":
        u = (b, t - 1) + tuple(ix[2:])
    else:
        u = (b, t - int(_prompt_len(ctx, n)[b])) + tuple(ix[2:])
    return f"{_idx(u)} ({layout} layout; token-aligned {_idx(ix)})"


def _prompt_len(ctx, n):
    return np.asarray(ctx.g["rollout/prompt_len" if n.startswith("rollout/") else "prompt_len"])


def verify_case(entry, golden, outputs, layout=None, strict_mask=True):
    """Compare one case. ``entry``: its manifest entry; ``golden``: its arrays; ``outputs``: the
    implementation's arrays (a dict). Returns a CaseReport.

    Every golden quantity you gave is compared, in data-flow order. The first difference of a
    section is its root, diagnosed from the golden upstream values; each later one is recomputed
    with the reference math from YOUR upstream values: when that matches, it *follows* from them,
    otherwise it is a second, independent mistake, diagnosed from your upstream values."""
    name = entry["name"]
    rep = CaseReport(name, entry.get("description", ""))
    outputs = dict(outputs)
    lay = outputs.pop("layout", None)
    if layout is None and lay is not None:
        layout = str(np.asarray(lay).item()) if np.asarray(lay).dtype.kind in "US" else None
    layout = layout or "token-aligned"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ctx = Ctx(entry, golden)
    ctx.impl = outputs
    ctx.checked = rep.checked
    ctx.layout = layout
    ctx.raw = {}
    over = _Overlay(ctx)
    outs = entry["outputs"]
    rep.ignored = sorted(k for k in outputs if k not in outs and k not in entry["inputs"])
    ties = {}
    for section in SECTIONS:
        names = [n for n in outs if gv.section_of(n) == section]
        root = None                       # the first differing quantity of the section (its Finding)
        differing = set()
        for n in names:
            if n not in outputs:
                rep.not_checked.append(n)
                continue
            want = golden[n]
            got, why = _normalise(n, outputs[n], want, layout, ctx=ctx, outputs=outputs)
            if got is None:
                msg = why or _shape_msg(n, np.asarray(outputs[n]), want, ctx, layout)
                f = Finding(name, section, "shape", n, msg, relation="" if root is None else "independent")
                rep.findings.append(f)
                root = root or f
                differing.add(n)
                continue
            # tie-aware sampled tokens
            if n == "rollout/tokens":
                ties = _tie_rows(ctx, got)
                for b, t in ties.items():
                    rep.findings.append(Finding(name, section, "note", n,
                                                f"row {b} diverges at t = {t} where u lies within rounding of a CDF "
                                                f"boundary (a tie): compared up to there"))
            if ties and n.startswith("rollout/"):
                got = np.array(got, copy=True)
                for b, t in ties.items():
                    got[b, t:] = want[b, t:]
            ctx.raw[n] = np.asarray(got)
            # masking: values that must be exactly 0 off a mask
            off = _zero_mask(ctx, n, want.shape)
            if off is not None and gv.zero_off(n) in differing:      # off YOUR mask (it differs: found above)
                off = np.broadcast_to(~(np.asarray(over.value(gv.zero_off(n))) > 0).reshape(
                    want.shape[:2] + (1,) * (want.ndim - 2)), want.shape)
            if off is not None:
                nz = off & (np.asarray(got) != 0)
                if nz.any():
                    ix = np.argwhere(nz)
                    pos = sorted({tuple(i[:2]) for i in ix})
                    zname = gv.zero_off(n)
                    kinds = _position_kinds(ctx, pos, zname)
                    first = tuple(int(i) for i in ix[0])
                    what = {"position": "the position mask (column 0 and padding)"}.get(zname, zname)
                    rep.findings.append(Finding(
                        name, section, "masking" if strict_mask else "note", n,
                        f"nonzero at {len(pos)} position(s) off {what} ({kinds}); e.g. {_where(ctx, n, first, layout)}"
                        f" = {_fmt(np.asarray(got)[first])}. Entries off the mask must be exactly 0 (docs/conventions.md §2)",
                        index=first, **_masking_hint(ctx, n, got)))
                    got = np.where(off, 0 if gv.zero_off(n) in differing else want, got)
            # compare
            if want.dtype.kind in "iub":
                r = _compare_int(n, got, want)
                over.yours[n] = np.asarray(got)
                if r is None:
                    rep.checked.append(n)
                    continue
                ix, _ = r
                bad = np.asarray(got) != want
                msg = (f"{int(bad.sum())} of {bad.size} entries differ; first {_where(ctx, n, ix, layout)}: got "
                       f"{_fmt(np.asarray(got)[ix])}, expected {_fmt(want[ix])}")
                got_c = got
            else:
                got64 = np.asarray(got, np.float64)
                over.yours[n] = got64
                want64 = want.astype(np.float64)
                atol, rtol = ctx.tol(n)
                ok = _close(got64, want64, atol, rtol)
                if ok.all():
                    rep.checked.append(n)
                    continue
                bad = ~ok
                err = np.where(bad, np.abs(got64 - want64), -1.0)
                err = np.where(np.isnan(err), np.inf, err)
                ix = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape)) if err.ndim else ()
                total = want.size
                unit = "entries"
                if gv.zero_off(n) == "action_mask":
                    total, unit = int(ctx.am.sum()), "actions"
                msg = (f"{int(bad.sum())} of {total} {unit} differ" if want.ndim else "differs") + \
                      (f"; worst {_where(ctx, n, ix, layout)}" if ix else "") + \
                      f": got {_fmt(got64[ix])}, expected {_fmt(want64[ix])} (|Δ| " \
                      f"{_fmt(abs(got64[ix] - want64[ix]))}, tolerance {_fmt(atol + rtol * abs(want64[ix]))})"
                got_c = got64
            f = Finding(name, section, "differs", n, msg, index=ix)
            if root is None:
                f.__dict__.update(_hint(ctx, n, got_c))
                root = f
            else:
                _relate(ctx, over, f, n, got_c, differing, root)
            differing.add(n)
            rep.findings.append(f)
    return rep


def _relate(ctx, over, f, n, got, differing, root):
    """A later difference: does it follow from your own upstream values, or is it a second mistake?"""
    try:
        with np.errstate(all="ignore"):
            rec, deps = _recompute(ctx, n, over.value)
    except _RECOMPUTE_ERRORS:
        rec, deps = None, ()
    if rec is None:
        if n.startswith("grad/"):
            f.relation = "downstream"
            return
        h = _hint(ctx, n, got)
        if h["mistake"] and h["mistake"] == root.mistake:
            f.relation, f.hint, f.mistake = "downstream", h["hint"], h["mistake"]
        else:
            f.relation = "independent"
            f.__dict__.update(h)
        return
    up = tuple(d for d in deps if d in differing)
    f.upstream = up
    if up and mk.distance(ctx, n, got, rec) <= HINT_SLACK:
        f.relation = "follows"
        return
    f.relation = "independent"
    f.__dict__.update(over.diagnose(n, got, rec) if up else _hint(ctx, n, got))


_RECOMPUTE_ERRORS = (ValueError, TypeError, IndexError, KeyError, FloatingPointError, ZeroDivisionError)


def verify(cases, outputs, layout=None, names=None, strict_mask=True):
    """Verify an implementation's outputs against golden cases.

    cases    a golden folder (or its manifest.json)
    outputs  a folder of ``<case>.npz``, or ``{case: {name: array}}``
    layout   "token-aligned" (default), "shifted" (the (B, T−1) layout of Hugging Face) or
             "response" ((B, L), column 0 = each row's first generated token: TRL PPO, OpenRLHF,
             SB3); an output array named ``layout`` holding the string sets it per case
    names    verify only these cases
    strict_mask  off-mask values count as failures (default); False turns them into notes
    """
    man = gv.load_manifest(os.fspath(cases))
    outs = load_outputs(outputs) if isinstance(outputs, (str, os.PathLike)) else outputs
    if not isinstance(outs, dict) or any(not isinstance(v, dict) for v in outs.values()):
        if isinstance(outs, dict) and names and len(names) == 1:
            outs = {names[0]: outs}                   # one case's arrays, named by `names`
        else:
            raise TypeError("outputs must be a folder of <case>.npz or a dict {case: {name: array}} "
                            "(for one case's arrays, give names=[case])")
    entries = man["cases"]
    if names:
        known = {e["name"] for e in entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"no golden case named {unknown[0]!r}")
        entries = [e for e in entries if e["name"] in names]
    reports = []
    for e in entries:
        if e["name"] not in outs:
            reports.append(CaseReport(e["name"], e.get("description", ""), missing=True))
            continue
        golden = gv.load_case(man, e)
        reports.append(verify_case(e, golden, outs[e["name"]], layout=layout, strict_mask=strict_mask))
    return Report(reports, golden=os.fspath(cases),
                  outputs=os.fspath(outputs) if isinstance(outputs, (str, os.PathLike)) else "<dict>")


def verify_outputs(outputs, case, golden=None, layout=None, strict_mask=True):
    """The Report of one case: your ``outputs`` (``{golden name: array}``) against golden ``case``.

    case     a case name (rlhf_ref.golden.cases.CASES) or its manifest entry (a dict with "name")
    golden   a golden folder written by ``rlhf-ref vectors`` (or its manifest.json); None: the case
             is computed in memory by the reference from the shipped case table (the same numbers
             ``rlhf-ref vectors`` writes)
    layout   "token-aligned" (default), "shifted" or "response" (docs/golden-vectors.md §4)

    ``report.ok``; ``report.format()`` is the text to raise an AssertionError with, e.g.
    ``assert rep.ok, rep.format()``.
    """
    if not isinstance(outputs, dict):
        raise TypeError(f"outputs must be a dict {{golden name: array}}, got {type(outputs).__name__}")
    name = case.get("name") if isinstance(case, dict) else case
    if not isinstance(name, str):
        raise TypeError(f"case must be a case name or a manifest entry, got {type(case).__name__}")
    if golden is not None:
        return verify(golden, {name: dict(outputs)}, layout=layout, names=[name], strict_mask=strict_mask)
    from . import cases as gc
    try:
        spec = gc.get_spec(name)
    except KeyError as e:
        raise KeyError(f"case: {e.args[0]}") from None
    arrays, entry = _built(spec)
    rep = verify_case(entry, arrays, outputs, layout=layout, strict_mask=strict_mask)
    return Report([rep], golden="<computed by the reference>", outputs="<dict>")


_BUILT = {}


def _built(spec):
    """A case's (arrays, entry) computed by the reference (cached per process)."""
    if spec.name not in _BUILT:
        _BUILT[spec.name] = gv.build_case(spec)
    return _BUILT[spec.name]


# ============================================================================ command line

def add_arguments(parser):
    """The ``rlhf-ref verify`` options."""
    parser.add_argument("cases", metavar="CASES", nargs="?", help="golden folder written by 'rlhf-ref vectors'")
    parser.add_argument("outputs", metavar="OUTPUTS", nargs="?",
                        help="folder with one <case>.npz of your outputs per case")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="array layout of your outputs (default: token-aligned, or each file's 'layout' array)")
    parser.add_argument("--case", action="append", dest="names", metavar="NAME",
                        help="verify only this case (repeatable)")
    parser.add_argument("--lenient-mask", action="store_true",
                        help="report nonzero values off the mask as notes, not failures")
    parser.add_argument("--max-file-mb", type=float, default=None, metavar="MB",
                        help="largest file (and declared array data of one .npz) to read, in MiB "
                             f"(default {safe_read.limits().max_file_bytes >> 20})")
    parser.add_argument("--list-mistakes", action="store_true",
                        help="print the catalogue of named mistakes (name, quantity, what) and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="every case, and what was not checked")
    return parser


apply_max_file_mb = safe_read.set_max_file_mb


def _error(msg):
    print(f"rlhf-ref verify: error: {msg}", file=sys.stderr)
    return 2


def main(args) -> int:
    """``rlhf-ref verify``: prints the report; 0 when everything matches, 1 when anything differs, 2 on errors."""
    if getattr(args, "list_mistakes", False):
        print(mk.table_text())
        return 0
    if args.cases is None or args.outputs is None:
        return _error("CASES and OUTPUTS are required (or --list-mistakes)")
    old = safe_read.limits()
    try:
        apply_max_file_mb(getattr(args, "max_file_mb", None))
        rep = verify(args.cases, args.outputs, layout=args.layout, names=args.names,
                     strict_mask=not args.lenient_mask)
    except (gv.GoldenError, safe_read.FileReadError, KeyError, OSError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        if isinstance(e, OSError) and getattr(e, "filename", None):
            msg = f"{e.filename}: {e.strerror or e}"
        return _error(msg)
    finally:
        safe_read.set_limits(**{k: getattr(old, k) for k in old.__dataclass_fields__})
    print(rep.format(verbose=args.verbose))
    return rep.exit_code


if __name__ == "__main__":       # pragma: no cover
    ap = add_arguments(argparse.ArgumentParser(prog="python -m rlhf_ref.verify"))
    sys.exit(main(ap.parse_args()))
