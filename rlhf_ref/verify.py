"""Check another implementation against the golden vectors: the first quantity that differs, where,
by how much, and what usually causes that pattern.

    rlhf-ref verify CASES OUTPUTS [--layout shifted] [--case NAME] [-v]

CASES is a folder written by ``rlhf-ref vectors``; OUTPUTS a folder with one ``<case>.npz`` per
case holding the implementation's outputs under the golden names (docs/golden-vectors.md). From
Python: ``verify(cases, outputs)`` with a folder or a ``{case: {name: array}}`` dict; it returns a
``Report`` (``.ok``, ``.exit_code``, ``str(report)``).

Per case and section (rollout, rl, sft, rm) the outputs are compared in data-flow order, so the
first quantity that differs is where the implementation first goes wrong; the section stops
there (what follows depends on it). For that quantity the verifier recomputes the usual mistakes
from the golden values just upstream of it (which matched) — k1/k3 with the ratio reversed,
returns shifted by one step, whitening with the other variance or another eps placement, α
missing from the log-probs, the LSTM gate blocks in another order, a missing stop-gradient, ... —
and names the one that matches. Separately, values that should be exactly 0 off a mask but are
not are a *masking* finding; the comparison then goes on with the on-mask values.

Tolerances are derived from the case's dtype like tests/_tol.py: ``|got − want| <= tol·scale +
tol·|want|`` with ``tol = 8·eps(dtype)·(n + 4)``, n the length of the chain of roundings behind a
value (T·(E + H + 4) + V for the forward pass; twice that plus B·T for gradients) and ``scale``
the magnitude of the numbers the value is computed from. Integers (tokens, masks) must be equal.
Sampled tokens are compared tie-aware (DESIGN.md §4): a row may diverge only where its uniform lies
within rounding of a CDF boundary, and is then compared up to there (the golden uniforms are kept
1e-3 away from every boundary, so this does not happen with a correct implementation).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from . import model, policy
from . import returns as ret
from . import vectors as gv

LAYOUTS = ("token-aligned", "shifted")
SECTIONS = ("rollout", "rl", "sft", "rm")
LOSS_NAMES = ("loss_pg", "loss_ent", "loss_value", "loss", "sft_loss", "bt_loss")
_C, _K = 8.0, 4.0
HINT_SLACK = 4.0      #: a candidate explanation must match within this many tolerances


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
    index: tuple = ()    #: where (the worst entry), when it applies

    @property
    def failing(self):
        return self.kind != "note"

    def format(self):
        tag = {"differs": "", "masking": "masking: ", "shape": "", "note": "note: "}[self.kind]
        s = f"[{self.section}] {tag}{self.quantity}: {self.message}"
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
    not_compared: list = field(default_factory=list)     #: after a section's first difference
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
        for f in self.findings:
            line = "     " + f.format()
            if f.hint and f.hint == prev:
                line = line.replace(f.hint, "the same (see above)")
            prev = f.hint or prev
            lines.append(line)
        if not self.ok and self.not_compared:
            lines.append(f"     ({len(self.checked)} quantities matched before; {len(self.not_compared)} after the "
                         f"first difference not compared)")
        if verbose:
            if self.not_checked:
                lines.append("     not checked (not produced): " + _group(self.not_checked))
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
        return sum(len(c.checked) for c in self.cases)

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
        if self.n_checked == 0:
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
    (or one .npz, keyed by its file stem). Loaded without pickle."""
    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".npz"))
    out = {}
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                out[os.path.splitext(os.path.basename(f))[0]] = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:     # a pickle (object array), a truncated file, ...
            raise ValueError(f"cannot read outputs {f!r} without pickle: {e}") from None
    return out


# ============================================================================ context

class _Ctx:
    """A golden case and lazily computed variants of it (for the hints)."""

    def __init__(self, entry, arrays):
        self.entry, self.g = entry, arrays
        self.cfg = entry["config"]
        self.dims = entry["dims"]
        self.dtype = np.dtype(self.cfg["dtype"])
        self.inputs = gv.inputs_of(entry, arrays)
        self._variants = {}
        if "tokens" in arrays:
            m = arrays["mask"] > 0
            self.mask = m
            self.pm = np.asarray(model.position_mask(arrays["mask"]) > 0)
        if "action_mask" in arrays:
            self.am = arrays["action_mask"] > 0

    def g64(self, name):
        return np.asarray(self.g[name], np.float64)

    def variant(self, key, sections, config=None, transform=None):
        """vectors.compute with config overrides and/or transformed inputs (cached by key)."""
        key = (key, tuple(sections))
        if key not in self._variants:
            cfg = dict(self.cfg, **(config or {}))
            inp = dict(self.inputs)
            if transform is not None:
                inp = transform(inp)
            try:
                self._variants[key] = gv.compute(inp, cfg, sections)
            except (ValueError, TypeError, FloatingPointError):
                self._variants[key] = {}
        return self._variants[key]

    # --- scales for the tolerances
    def fwd_scale(self):
        s = 1.0
        for k in ("logp", "ref_logp", "reward", "values", "rollout/logp", "sft_logp", "reward_chosen",
                  "reward_rejected"):
            if k in self.g:
                s = max(s, float(np.max(np.abs(self.g[k]), initial=0.0)))
        if "scores" in self.g:
            s = max(s, self.cfg["alpha"] * float(np.max(np.abs(self.g["scores"]), initial=0.0)))
        if "qvalues" in self.g:
            s = max(s, float(np.max(np.abs(self.g["qvalues"]), initial=0.0)))
        return s

    def whiten_gain(self):
        """1/σ of the whitening (errors in G − b are amplified by it)."""
        if self.cfg["whiten"] == "off" or "returns" not in self.g:
            return 1.0
        A0 = (self.g64("returns") - self.g64("baseline"))[self.am]
        n = A0.size
        var = np.sum((A0 - A0.mean()) ** 2) / (n - 1 if self.cfg["whiten"] == "bessel" else n)
        return max(1.0, 1.0 / np.sqrt(var + ret.WHITEN_EPS))

    def tol(self, name):
        """(atol, rtol) for a float quantity of this case."""
        d = self.dims
        n_fwd = d["T"] * (d["E"] + d["H"] + 4) + d["V"]
        if name.startswith("grad/"):
            n = 2 * n_fwd + d["B"] * d["T"]
        elif name in LOSS_NAMES:
            n = n_fwd + d["B"] * d["T"]
        else:
            n = n_fwd + d["T"]
        tol = _C * float(np.finfo(self.dtype).eps) * (n + _K)
        if name.startswith("grad/"):
            term = "/".join(name.split("/")[:3]) + "/"
            scale = max([1.0] + [float(np.max(np.abs(v), initial=0.0)) for k, v in self.g.items()
                                 if k.startswith(term)])
            scale *= self.whiten_gain() * max(1.0, self.cfg["alpha"])
        else:
            scale = max(self.fwd_scale(), float(np.max(np.abs(self.g[name]), initial=0.0)))
            if name in ("advantages", "loss_pg", "loss"):
                scale *= self.whiten_gain()
        return tol * scale, tol


# ============================================================================ comparison

def _close(got, want, atol, rtol):
    """Boolean array: |got − want| <= atol + rtol|want| (NaN never close)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.abs(got - want) <= atol + rtol * np.abs(want)


def _matches(got, cand, atol, rtol, where=None):
    if cand is None:
        return False
    cand = np.asarray(cand, np.float64)
    if cand.shape != got.shape:
        return False
    ok = _close(got, cand, HINT_SLACK * atol, HINT_SLACK * rtol)
    return bool(np.all(ok if where is None else ok[where]))


def _fmt(x):
    x = float(x)
    if x == 0:
        return "0"
    return f"{x:.6g}" if 1e-4 <= abs(x) < 1e6 else f"{x:.4e}"


def _idx(t):
    return "[" + ", ".join(str(int(i)) for i in t) + "]"


def _position_kinds(ctx, idx_list, mask_name):
    """Classify (b, t) positions off a mask: column 0 / prompt / padding / row without actions."""
    kinds = {}
    for ix in idx_list:
        b, t = int(ix[0]), int(ix[1]) if len(ix) > 1 else 0
        if mask_name.startswith("rollout/"):
            m = ctx.g["rollout/mask"]
            kind = "padding" if m[b, t] == 0 else ("column 0" if t == 0 else "prompt")
        else:
            m = ctx.g["mask"]
            if m[b].sum() == 0:
                kind = "all-padding row"
            elif m[b, t] == 0:
                kind = "padding"
            elif t == 0:
                kind = "column 0"
            else:
                kind = "prompt"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items())


def _zero_mask(ctx, name, shape):
    """Boolean array (shape) of where ``name`` must be exactly 0, or None."""
    z = gv.zero_off(name)
    if z is None:
        return None
    if z == "position":
        on = ctx.pm
    else:
        on = np.asarray(ctx.g[z]) > 0
    off = ~on
    while off.ndim < len(shape):
        off = off[..., None]
    return np.broadcast_to(off, shape)


def _shape_msg(name, got, want, ctx, layout):
    msg = f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if gv.time_aligned(name) and got.ndim >= 2 and got.shape[0] == want.shape[0] and \
            got.shape[1] == want.shape[1] - 1 and layout != "shifted":
        msg += ("; this looks like the shifted (B, T−1) layout of Hugging Face: declare it "
                "(layout='shifted', --layout shifted, or a 'layout' array holding 'shifted')")
    return msg


def _normalise(name, a, want, layout):
    """The implementation's array as a NumPy array in the token-aligned layout, or a message."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        return None, f"dtype {a.dtype} is not numeric"
    if layout == "shifted" and gv.time_aligned(name) and a.ndim >= 2:
        if a.shape[1] != want.shape[1] - 1:
            return None, (f"shape {tuple(a.shape)} in the shifted layout, expected "
                          f"{(want.shape[0], want.shape[1] - 1) + tuple(want.shape[2:])}")
        a = np.concatenate([np.zeros_like(a[:, :1]), a], axis=1)
    if want.ndim == 0 and a.size == 1:
        a = a.reshape(())
    if a.shape != want.shape:
        return None, None
    return a, None


def _compare_int(name, got, want):
    bad = np.asarray(got) != want
    if not bad.any():
        return None
    ix = tuple(np.argwhere(bad)[0])
    return ix, (f"{int(bad.sum())} of {bad.size} entries differ; first {_idx(ix)}: got {_fmt(np.asarray(got)[ix])}, "
                f"expected {_fmt(want[ix])}")


# ============================================================================ the hints

def _perm_transform(order, prefixes):
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


_GATE_ORDERS = [o for o in itertools.permutations(gv.GATE_ORDER) if o != gv.GATE_ORDER]
# the orders seen in the wild first
_GATE_ORDERS.sort(key=lambda o: (o not in (("i", "g", "f", "o"), ("f", "i", "g", "o"), ("i", "f", "o", "g"),
                                           ("i", "o", "f", "g")), o))


def _gate_hint(order):
    return (f"matches the reference with the LSTM gate blocks taken as ({', '.join(order)}): the weights are in "
            f"PyTorch's order (i, f, g, o), rows [0:H] input, [H:2H] forget, [2H:3H] cell, [3H:4H] output (TF/Keras "
            f"i, f, c, o is the same); permute the row blocks of the lstm.* weights and biases when loading them")


def _forward_variants(ctx, name, section, models):
    """Candidates that rerun the reference: gate orders, biases, α, ε (for forward quantities)."""
    alpha, eps = ctx.cfg["alpha"], ctx.cfg["eps"]
    c = []
    if section != "sft" and name not in ("values", "qvalues", "scores", "reward_chosen", "reward_rejected") \
            and not name.startswith("grad/"):
        if alpha != 1.0:
            what = ("sampled" if name.startswith("rollout/tokens") else "scored")
            who = "the reference policy" if name == "ref_logp" else "the policy"
            c.append((f"matches {who} {what} without the inverse temperature α = {alpha:g} (log_softmax(z) "
                      f"instead of log_softmax(α·z)); the distribution that samples is the one that is scored, "
                      f"policy and reference alike (TRL #3169, OpenRLHF PR #853)",
                      lambda: ctx.variant("alpha1", [section], {"alpha": 1.0})))
            c.append((f"matches α used as a temperature (z/α, here z/{alpha:g}); α is an INVERSE temperature: "
                      f"π ∝ exp(α·z)", lambda: ctx.variant("alpha_inv", [section], {"alpha": 1.0 / alpha})))
        if eps > 0.0:
            c.append((f"matches the plain Boltzmann policy without the ε = {eps:g} mixture: "
                      f"π_ε = (1−ε)·softmax(α·z) + ε/V, log π_ε = logaddexp(log1p(−ε) + log π, log(ε/V))",
                      lambda: ctx.variant("eps0", [section], {"eps": 0.0})))
    for order in _GATE_ORDERS:
        c.append((_gate_hint(order), lambda o=order: ctx.variant(("gates", o), [section],
                                                                   transform=_perm_transform(o, models))))

    def one_bias(which):
        def tf(inp):
            out = dict(inp)
            for k in inp:
                if k.split("/")[0] in models and k.endswith(f"lstm.bias_{which}_l0"):
                    out[k] = np.zeros_like(inp[k])
            return out
        return tf
    if ctx.dtype == np.float64:
        def to32(inp):
            return {k: (v.astype(np.float32).astype(np.float64) if k.split("/")[0] in ("policy", "ref", "rm")
                        else v) for k, v in inp.items()}
        c.append(("matches the reference with the parameters rounded to float32: somewhere they pass through "
                  "float32 (e.g. loaded into a float32 module by load_state_dict, then cast to float64; cast "
                  "the module first, then load)", lambda: ctx.variant("params32", [section], transform=to32)))
    c.append(("matches an LSTM without lstm.bias_hh_l0: PyTorch's LSTM has two biases and adds both "
              "(b_ih + b_hh); a one-bias LSTM must load their sum",
              lambda: ctx.variant("no_bhh", [section], transform=one_bias("hh"))))
    c.append(("matches an LSTM without lstm.bias_ih_l0: PyTorch's LSTM adds both biases (b_ih + b_hh)",
              lambda: ctx.variant("no_bih", [section], transform=one_bias("ih"))))
    return [(d, (lambda f=f, n=name: f().get(n))) for d, f in c]


def _shift_left(a):
    """a[:, t] <- a[:, t + 1] (the value one position later), 0 at the end."""
    out = np.zeros_like(a)
    out[:, :-1] = a[:, 1:]
    return out


def _shift_right(a):
    out = np.zeros_like(a)
    out[:, 1:] = a[:, :-1]
    return out


def _on(ctx, a, where="am"):
    m = getattr(ctx, where)
    while m.ndim < np.ndim(a):
        m = m[..., None]
    return np.where(m, a, 0.0)


def _whiten(A0, m, kind, eps_place, shift_mean, stats_over=None):
    """Whitening variants: kind population/bessel; eps_place inside/std/none; stats over m or stats_over."""
    s = m if stats_over is None else stats_over
    x = A0[s]
    n = x.size
    if n == 0 or (kind == "bessel" and n < 2):
        return None
    mu = x.sum() / n
    var = np.sum((x - mu) ** 2) / (n - 1 if kind == "bessel" else n)
    if eps_place == "inside":
        den = np.sqrt(var + ret.WHITEN_EPS)
    elif eps_place == "std":
        den = np.sqrt(var) + ret.WHITEN_EPS
    else:
        den = np.sqrt(var)
    if den == 0:
        return None
    out = (A0 - mu) / den
    if not shift_mean:
        out = out + mu
    return np.where(m, out, 0.0)


def _agg_weights(m, kind):
    m = m.astype(np.float64)
    N = m.sum()
    n_row = m.sum(axis=1, keepdims=True)
    n_rows = np.count_nonzero(n_row)
    if kind == "token_mean":
        return m / N
    if kind == "seq_sum":
        return m / n_rows
    if kind == "seq_mean":
        return np.where(n_row > 0, m / np.maximum(n_row, 1) / n_rows, 0.0)
    if kind == "all_positions":
        return np.ones_like(m) / m.size
    if kind == "seq_mean_B":
        return np.where(n_row > 0, m / np.maximum(n_row, 1) / m.shape[0], 0.0)
    if kind == "seq_sum_B":
        return m / m.shape[0]
    if kind == "sum":
        return m
    raise ValueError(kind)


_AGG_TEXT = {
    "token_mean": "token_mean (Σ over actions / N actions)",
    "seq_mean": "seq_mean (each row's token mean, averaged over rows with an action)",
    "seq_sum": "seq_sum (Σ over actions / rows with an action)",
    "all_positions": "a mean over all B·T positions (padding and prompt counted: the mask is missing from "
                     "the denominator)",
    "seq_mean_B": "seq_mean averaged over all B rows (rows without an action counted)",
    "seq_sum_B": "seq_sum divided by all B rows (rows without an action counted)",
    "sum": "a plain sum over actions (no normalisation)",
}


def _agg_candidates(ctx, per_token, coef, what):
    """Loss candidates from other aggregations of the golden per-token term."""
    out = []
    for kind in ("token_mean", "seq_mean", "seq_sum", "all_positions", "seq_mean_B", "seq_sum_B", "sum"):
        if kind == ctx.cfg["aggregation"]:
            continue
        w = _agg_weights(ctx.am, kind) if kind != "all_positions" else _agg_weights(ctx.g["mask"] >= 0, kind)
        msg = f"{what} matches the aggregation {_AGG_TEXT[kind]}; this case uses {_AGG_TEXT[ctx.cfg['aggregation']]}"
        if kind == "all_positions":
            msg = f"masking: {what} matches {_AGG_TEXT[kind]}"
        out.append((msg, lambda w=w: coef * np.sum(w * per_token)))
    return out


def _hints_for(ctx, name, section):
    """[(description, thunk -> candidate array)] for the first differing quantity ``name``."""
    cfg, g = ctx.cfg, ctx.g
    c = []
    alpha, eps = cfg["alpha"], cfg["eps"]

    if name == "action_mask":
        T = g["mask"].shape[1]
        tt = np.arange(T)[None, :]
        pl = g["prompt_len"][:, None]
        m = g["mask"] > 0
        c.append(("action mask starts one position early (t ≥ prompt_len − 1): prompt_len counts BOS",
                  lambda: (m & (tt >= pl - 1)).astype(float)))
        c.append(("action mask starts one position late (t ≥ prompt_len + 1)",
                  lambda: (m & (tt >= pl + 1)).astype(float)))
        c.append(("the action mask covers the prompt too (it is mask ∧ t ≥ prompt_len)",
                  lambda: (m & (tt >= 1)).astype(float)))
        last = ret.last_action_index(ctx.am)
        def no_last():
            a = ctx.am.copy()
            rows = np.nonzero(last >= 0)[0]
            a[rows, last[rows]] = False
            return a.astype(float)
        c.append(("the action mask leaves out each row's last token (EOS and the truncation token are actions)",
                  no_last))
        return c

    if name in ("scores", "logq", "logp", "ref_logp", "entropy", "values", "qvalues", "sft_logp",
                "rollout/logp"):
        if name in ("scores", "values", "qvalues", "sft_logp"):
            c.append((f"{name}[:, t] matches the reference at t + 1: computed from h_t (the state after reading "
                      f"token t) instead of h_{{t−1}}; if your arrays use the Hugging Face shifted layout, declare it "
                      f"(layout='shifted')", lambda: _on(ctx, _shift_left(ctx.g64(name)), "pm")))
        if name == "logp":
            logq = ctx.g64("logq")
            tok = g["tokens"]
            def lab_next():     # logits at t+1 (h_t) scored against token t
                nxt = np.take_along_axis(_shift_left(logq), tok[:, :, None], -1)[:, :, 0]
                return _on(ctx, nxt)
            c.append(("log-probs off by one between logits and labels: log π(tokens_t | s_{t+1}) (the logits were "
                      "not shifted against the labels; token-aligned logp[:, t] uses the scores of position t, "
                      "computed from h_{t−1})", lab_next))
            def lab_prev():
                tnext = _shift_left(tok)
                return _on(ctx, np.take_along_axis(logq, tnext[:, :, None], -1)[:, :, 0])
            c.append(("log-probs off by one between logits and labels: log π(tokens_{t+1} | s_t)", lab_prev))
            c.append(("logp holds the reference policy's log-probs (policy and reference swapped?)",
                      lambda: ctx.g64("ref_logp")))
        if name == "ref_logp":
            c.append(("ref_logp equals the policy's logp: the frozen reference parameters were not used "
                      "(or the policy was scored twice)", lambda: ctx.g64("logp")))
        if name == "entropy":
            c.append(("entropy matches −log π(a_t|s_t), the sampled-token estimate; the golden entropy is that of "
                      "the full distribution, −Σ_a π(a|s_t) log π(a|s_t)", lambda: -ctx.g64("logp")))
            c.append(("entropy is in bits (log2); use natural logarithms", lambda: ctx.g64("entropy") / np.log(2)))
        models = {"ref_logp": ("ref",)}.get(name, ("policy",))
        c += _forward_variants(ctx, name, section, models)
        return c

    if name == "kl":
        lp, rl = ctx.g64("logp"), ctx.g64("ref_logp")
        x = _on(ctx, lp - rl)
        est = {"k1": lambda: x, "k2": lambda: 0.5 * x * x, "k3": lambda: _on(ctx, np.expm1(-x) + x)}
        c.append(("KL matches k1 with the ratio reversed: logπ_ref − logπ (a sign flip); k1 = x with "
                  "x = logπ(a_t|s_t) − logπ_ref(a_t|s_t)", lambda: -x))
        c.append(("KL matches k3 with the ratio reversed: expm1(x) − x with x = logπ − logπ_ref (trlX's logged KL, "
                  "rlhf-book approx_kl3; its expectation under π is χ² − KL, not KL); k3 = expm1(−x) + x, i.e. "
                  "r − 1 − log r with r = π_ref/π", lambda: _on(ctx, np.expm1(x) - x)))
        for k, f in est.items():
            if k != cfg["kl"]:
                c.append((f"KL matches the estimator {k}; this case uses {cfg['kl']} (k1 = x, k2 = x²/2, "
                          f"k3 = expm1(−x) + x)", f))
        c.append(("KL matches |x| (TRL's 'abs'); this case uses " + cfg["kl"], lambda: np.abs(x)))
        return c

    if name == "rewards":
        kl, R, beta = ctx.g64("kl"), ctx.g64("reward"), cfg["beta"]
        am = ctx.am
        last = ret.last_action_index(am)
        rows = np.nonzero(last >= 0)[0]
        def with_R(base, where):
            r = base.copy()
            for b, t in where:
                r[b, t] += R[b]
            return r
        pen = _on(ctx, -beta * kl)
        first = np.argmax(am, axis=1)
        c.append(("the sequence reward R is added at every action; it belongs to each row's last action only",
                  lambda: pen + _on(ctx, np.broadcast_to(R[:, None], am.shape))))
        c.append(("R is added at each row's first action; it belongs to the last action",
                  lambda: with_R(pen, [(b, first[b]) for b in rows])))
        c.append(("R is missing from the rewards (only −β·k_t)", lambda: pen))
        c.append(("the KL penalty has the wrong sign: +β·k_t (it is r_t = −β·k_t)",
                  lambda: with_R(_on(ctx, beta * kl), [(b, last[b]) for b in rows])))
        c.append(("the KL penalty is not multiplied by β", lambda: with_R(_on(ctx, -kl), [(b, last[b]) for b in rows])))
        def seq_kl():
            r = np.zeros_like(kl)
            for b in rows:
                r[b, last[b]] = R[b] - beta * kl[b].sum()
            return r
        c.append(("the KL penalty is applied once per sequence (−β·Σ_t k_t at the last action, RLOO-style); "
                  "here it is −β·k_t at every action", seq_kl))
        lengths = g["mask"].sum(axis=1).astype(int)
        def R_rows_without_action():
            r = with_R(pen, [(b, last[b]) for b in rows])
            for b in range(r.shape[0]):
                if last[b] < 0:
                    r[b, max(lengths[b] - 1, 0) if lengths[b] else r.shape[1] - 1] += R[b]
            return r
        c.append(("masking: R is given to a row with no action (all padding, or a prompt only); such a row gets "
                  "nothing", R_rows_without_action))
        return c

    if name == "returns":
        r = ctx.g64("rewards")
        am = ctx.am
        gamma, kind = cfg["gamma"], cfg["returns"]
        G = ctx.g64("returns")
        other = "total" if kind == "rtg" else "rtg"
        c.append((f"returns match reward-to-go shifted by one step (G_{{t+1}} written at t): the returns "
                  f"must include r_t" if kind == "rtg" else "returns match the golden ones shifted by one step",
                  lambda: _on(ctx, _shift_left(G))))
        c.append(("returns match reward-to-go shifted by one step the other way (G_{t−1} written at t)",
                  lambda: _on(ctx, _shift_right(G))))
        c.append((f"returns match '{other}'; this case uses '{kind}' (rtg: G_t = r_t + γ·G_{{t+1}}; total: "
                  f"Σ_j γ^j r_j at every action)", lambda: ret.discounted_returns(r, am, gamma, other)))
        if gamma < 1:
            c.append((f"returns match γ = 1: the discount γ = {gamma:g} is not applied",
                      lambda: ret.discounted_returns(r, am, 1.0, kind)))
            def total_from_0():
                T = r.shape[1]
                disc = gamma ** np.arange(T)[None, :]
                tot = np.sum(np.where(am, r * disc, 0.0), axis=1)
                return _on(ctx, np.broadcast_to(tot[:, None], r.shape))
            c.append(("returns match Σ γ^t r_t with t counted from the start of the sequence (prompt positions "
                      "counted as time steps); j = 0 at the row's first action", total_from_0))
            def rtg_abs():
                T = r.shape[1]
                out = np.zeros_like(r)
                first = np.argmax(am, axis=1)
                for b in range(r.shape[0]):
                    for t in range(T):
                        if am[b, t]:
                            js = [j for j in range(t, T) if am[b, j]]
                            out[b, t] = sum(gamma ** (j - first[b]) * r[b, j] for j in js)
                return out
            c.append(("returns match Σ_{j≥t} γ^j r_j with j counted from the row's first action (the discount is "
                      "not restarted at t): reward-to-go is Σ_{j≥t} γ^{j−t} r_j", rtg_abs))
            c.append(("returns match Σ_{j≥t} γ^{j−t+1} r_j (the immediate reward discounted too)",
                      lambda: gamma * ret.discounted_returns(r, am, gamma, kind)))
        c.append(("returns equal the per-token rewards (no accumulation)", lambda: r))
        return c

    if name == "baseline":
        G = ctx.g64("returns")
        am = ctx.am
        kind = cfg["baseline"]
        c.append(("the baseline is 0 (not computed); this case uses '" + kind + "'", lambda: np.zeros_like(G)))
        if "values" in g:
            v = ctx.g64("values")
            c.append(("the baseline matches V(s_{t+1}) (the value head read one position late, e.g. the shifted "
                      "layout)", lambda: _on(ctx, _shift_left(v))))
            if kind != "value":
                c.append((f"the baseline matches the value head's V(s_t); this case uses '{kind}'",
                          lambda: _on(ctx, v)))
        for k in ("mean", "loo"):
            if k != kind:
                what = ("the mean of G over all actions, the row included" if k == "mean"
                        else "the mean of G over the other rows")
                c.append((f"the baseline matches '{k}' ({what}); this case uses '{kind}'",
                          lambda k=k: ret.baseline(k, G, am)))
        def mean_all():
            return _on(ctx, np.full_like(G, G.sum() / G.size))
        c.append(("masking: the baseline matches the mean of G over all B·T positions (padding and prompt counted)",
                  mean_all))
        def loo_rows():
            n_row = am.sum(axis=1)
            rm = np.where(n_row > 0, np.where(am, G, 0).sum(axis=1) / np.maximum(n_row, 1), 0.0)
            have = n_row > 0
            out = np.zeros_like(G)
            for b in range(G.shape[0]):
                o = have.copy()
                o[b] = False
                if o.any():
                    out[b] = rm[o].mean()
            return _on(ctx, out)
        c.append(("the baseline matches the mean over the other rows of each row's mean return (rows weighted "
                  "equally); 'loo' here is the mean of G over the other rows' actions", loo_rows))
        if "qvalues" in g:
            Q = ctx.g64("qvalues")
            tok = g["tokens"]
            Qa = np.take_along_axis(Q, tok[:, :, None], -1)[:, :, 0]
            c.append(("the baseline matches Q(s_t, a_t) of the taken action; the qvalue baseline is "
                      "Σ_a π(a|s_t)·Q(s_t, a)",
                      lambda: _on(ctx, Qa)))
            c.append(("the baseline matches max_a Q(s_t, a); it is Σ_a π(a|s_t)·Q(s_t, a)",
                      lambda: _on(ctx, Q.max(-1))))
            c.append(("the baseline matches the uniform mean of Q(s_t, ·); it is Σ_a π(a|s_t)·Q(s_t, a)",
                      lambda: _on(ctx, Q.mean(-1))))
            if eps > 0 or alpha != 1:
                lq = policy.logprobs(ctx.g64("scores"), alpha, 0.0)
                c.append(("the baseline's expectation uses softmax(α·z) without the ε-mixture; it is "
                          "Σ_a π_ε(a)·Q(s, a)",
                          lambda: _on(ctx, np.sum(np.exp(lq) * Q, -1))))
                lq1 = policy.logprobs(ctx.g64("scores"), 1.0, eps)
                c.append(("the baseline's expectation uses π without α; it is Σ_a π_ε(a|s)·Q(s, a) with the case's α",
                          lambda: _on(ctx, np.sum(np.exp(lq1) * Q, -1))))
        return c

    if name == "advantages":
        G, b = ctx.g64("returns"), ctx.g64("baseline")
        am = ctx.am
        A0 = _on(ctx, G - b)
        wk, sm = cfg["whiten"], cfg["shift_mean"]
        names = {"population": "the population variance (÷N)", "bessel": "Bessel's correction (÷(N−1))"}
        place = {"inside": "(A − μ)/sqrt(σ² + 1e-8)", "std": "(A − μ)/(σ + 1e-8) (eps added to the standard deviation)",
                 "none": "(A − μ)/σ with no eps (or a clamp such as OpenRLHF's max(σ², 1e-8))"}
        want = "not whitened" if wk == "off" else f"whitened with {names[wk]} as {place['inside']}" + \
            ("" if sm else ", the mean added back (shift_mean=False)")
        if wk != "off":
            c.append((f"advantages match A = G − b without whitening; this case whitens ({want})", lambda: A0))
        for k in ("population", "bessel"):
            for p in ("inside", "std", "none"):
                for s in (True, False):
                    if (k, p, s) == (wk, "inside", sm):
                        continue
                    desc = f"advantages match whitening with {names[k]} as {place[p]}" + \
                        ("" if s else ", the mean added back (shift_mean=False)")
                    c.append((f"{desc}; this case: {want}", lambda k=k, p=p, s=s: _whiten(A0, am, k, p, s)))
        if wk != "off":
            allpos = np.ones_like(am)
            c.append(("masking: the whitening statistics include positions off the action mask (prompt, padding); "
                      "μ and σ are over the actions of the batch only",
                      lambda: _whiten(A0, am, wk, "inside", sm, stats_over=allpos)))
            def per_row():
                out = np.zeros_like(A0)
                for r in range(A0.shape[0]):
                    mr = np.zeros_like(am)
                    mr[r] = am[r]
                    if (wk == "bessel" and mr.sum() < 2) or mr.sum() == 0:
                        continue
                    out += _whiten(A0, mr, wk, "inside", sm)
                return out
            c.append(("advantages are whitened per row; the statistics are over all actions of the batch", per_row))
            c.append(("advantages match whitened returns G (the baseline not subtracted)",
                      lambda: _whiten(_on(ctx, G), am, wk, "inside", sm)))
        else:
            c.append(("advantages match the returns G: the baseline is not subtracted", lambda: _on(ctx, G)))
        c.append(("advantages have the wrong sign (b − G)", lambda: -ctx.g64("advantages")))
        return c

    if name == "weights":
        out = []
        for kind in ("token_mean", "seq_mean", "seq_sum", "seq_mean_B", "seq_sum_B"):
            if kind != cfg["aggregation"]:
                out.append((f"the aggregation weights match {_AGG_TEXT[kind]}; this case uses "
                            f"{_AGG_TEXT[cfg['aggregation']]}", lambda k=kind: _on(ctx, _agg_weights(am_, k))))
        am_ = ctx.am
        out.append(("masking: the weights are " + _AGG_TEXT["all_positions"],
                    lambda: _on(ctx, np.full(am_.shape, 1.0 / am_.size))))
        return out

    if name in ("loss_pg", "loss_ent", "loss_value", "loss"):
        w = ctx.g64("weights") if "weights" in g else None
        if name == "loss_pg":
            per = ctx.g64("advantages") * ctx.g64("logp")
            c += _agg_candidates(ctx, per, -1.0, "loss_pg")
            A0 = _on(ctx, ctx.g64("returns") - ctx.g64("baseline"))
            c.append(("loss_pg uses the advantages before whitening",
                      lambda: -np.sum(ctx.g64("weights") * A0 * ctx.g64("logp"))))
        elif name == "loss_ent":
            per = ctx.g64("entropy")
            c += _agg_candidates(ctx, per, -cfg["entropy_coef"], "loss_ent")
            c.append(("loss_ent is missing the coefficient c_H", lambda: -np.sum(w * per) if w is not None else None))
            c.append(("loss_ent matches −c_H·Σ w·(−log π(a_t)) (the sampled-token entropy estimate)",
                      lambda: -cfg["entropy_coef"] * np.sum(w * -ctx.g64("logp"))))
        elif name == "loss_value":
            crit = "values" if cfg["critic"] == "value" else "qvalues"
            if crit == "values":
                pred = _on(ctx, ctx.g64("values"))
            else:
                pred = _on(ctx, np.take_along_axis(ctx.g64("qvalues"), g["tokens"][:, :, None], -1)[:, :, 0])
            G = ctx.g64("returns")
            per = 0.5 * (pred - G) ** 2
            c.append(("loss_value lacks the ½: L_value = c_V·½·Σ w·(V − G)²" +
                      (" (or lacks c_V = 0.5: both double it)" if cfg["value_coef"] == 0.5 else ""),
                      lambda: 2 * ctx.g64("loss_value")))
            c += _agg_candidates(ctx, per, cfg["value_coef"], "loss_value")
            c.append(("loss_value regresses on the advantages instead of the returns",
                      lambda: cfg["value_coef"] * np.sum(w * 0.5 * (pred - ctx.g64("advantages")) ** 2)))
            if crit == "qvalues":
                c.append(("loss_value regresses Σ_a π(a|s)·Q(s, a) (the baseline); the qvalue critic regresses "
                          "Q(s_t, a_t)", lambda: cfg["value_coef"] * np.sum(w * 0.5 * (ctx.g64("baseline") - G) ** 2)))
            if cfg["value_coef"] not in (0.0, 0.5):
                c.append(("loss_value lacks the coefficient c_V", lambda: ctx.g64("loss_value") / cfg["value_coef"]))
        else:
            pg, en, va = (float(ctx.g64(k)) for k in ("loss_pg", "loss_ent", "loss_value"))
            c.append(("loss lacks loss_value", lambda: pg + en))
            c.append(("loss lacks loss_ent", lambda: pg + va))
            c.append(("loss lacks loss_pg", lambda: en + va))
            c.append(("loss subtracts loss_ent (the entropy bonus counted twice with opposite signs)",
                      lambda: pg - en + va))
            c.append(("loss subtracts loss_value", lambda: pg + en - va))
        c.append((f"{name} has the wrong sign: the losses are minimised (L_pg = −Σ w·A·log π; descent on L is "
                  f"ascent on J; the founding article's update has this sign slip)", lambda: -ctx.g64(name)))
        return c

    if name == "sft_loss":
        lp = ctx.g64("sft_logp")
        n = ctx.pm.sum()
        c.append(("sft_loss is a mean over all B·T positions (padding counted); it is a token mean over real t ≥ 1",
                  lambda: -lp.sum() / lp.size))
        c.append(("sft_loss is a mean over real tokens including column 0 (BOS is never predicted)",
                  lambda: -lp.sum() / ctx.mask.sum()))
        c.append(("sft_loss is a sum (not a token mean)", lambda: -lp.sum()))
        rows = [b for b in range(lp.shape[0]) if ctx.pm[b].any()]
        c.append(("sft_loss is the mean of per-row means; it is a token mean over the batch",
                  lambda: -np.mean([lp[b].sum() / ctx.pm[b].sum() for b in rows])))
        c.append(("sft_loss has the wrong sign (minimised: −mean log-likelihood)", lambda: lp.sum() / n))
        return c

    if name in ("reward_chosen", "reward_rejected"):
        side = "chosen" if name == "reward_chosen" else "rejected"
        def over_padding():
            inp = dict(ctx.inputs)
            inp[side + "_mask"] = np.ones_like(inp[side + "_mask"])
            inp["chosen_mask" if side == "rejected" else "rejected_mask"] = np.ones_like(inp[side + "_mask"])
            return gv.compute(inp, ctx.cfg, ["rm"]).get(name)
        c.append((f"masking: the reward is read after the padding (the LSTM ran over the padding ids to position "
                  f"T−1); read it at each row's last real token", over_padding))
        c += _forward_variants(ctx, name, "rm", ("rm",))
        return c

    if name == "bt_loss":
        rc, rr = ctx.g64("reward_chosen"), ctx.g64("reward_rejected")
        c.append(("bt_loss matches chosen and rejected swapped: −log σ(r_rejected − r_chosen)",
                  lambda: np.mean(np.logaddexp(0.0, rc - rr))))
        c.append(("bt_loss is a sum over pairs; it is the mean", lambda: np.sum(np.logaddexp(0.0, rr - rc))))
        c.append(("bt_loss has the wrong sign", lambda: -ctx.g64("bt_loss")))
        return c

    return c


def _grad_hints(ctx, name, impl):
    """Hints for the first differing gradient ``grad/<loss>/<model>/<param>``."""
    parts = name.split("/")
    loss, model_prefix = parts[1], parts[2]
    term = f"grad/{loss}/{model_prefix}/"
    keys = [k for k in ctx.entry["outputs"] if k.startswith(term)]
    have = [k for k in keys if k in impl]
    gold = {k: ctx.g64(k) for k in have}
    got = {k: np.asarray(impl[k], np.float64) for k in have}
    atol, rtol = ctx.tol(name)
    allm = lambda cand: all(_matches(got[k], cand[k], atol, rtol) for k in have)  # noqa: E731
    zero = {k: np.zeros_like(v) for k, v in gold.items()}
    if loss == "loss_ent" and allm(zero) and any(np.any(v != 0) for v in gold.values()):
        return ("the entropy term has no gradient: the entropy must not be detached (only A, G, the baselines, the "
                "whitening statistics, R and β·k are constants)")
    if allm(zero) and any(np.any(v != 0) for v in gold.values()):
        return f"the gradient of {loss} is 0 for every parameter: the loss was detached from the parameters"
    if allm({k: -v for k, v in gold.items()}):
        return f"the gradient of {loss} has the wrong sign for every parameter: the losses are minimised (θ ← θ − η·∇L)"
    num = sum(float(np.sum(got[k] * gold[k])) for k in have)
    den = sum(float(np.sum(gold[k] * gold[k])) for k in have)
    if den > 0:
        cfac = num / den
        if abs(cfac - 1) > 1e-6 and allm({k: cfac * v for k, v in gold.items()}):
            extra = ""
            if loss == "loss_value" and abs(cfac - 2) < 1e-3:
                extra = ": the ½ of L_value is missing"
            elif abs(cfac + 1) < 1e-6:
                extra = ": the wrong sign"
            return (f"the gradient of {loss} is {cfac:.6g}× the expected for every parameter{extra} (a normalisation, "
                    f"aggregation or coefficient differs while the values match)")
    if loss == "loss_value" and model_prefix == "policy":
        body = [k for k in have if "/embedding." in k or "/lstm." in k]
        if body and all(_matches(got[k], np.zeros_like(gold[k]), atol, rtol) for k in body) and \
                any(np.any(gold[k] != 0) for k in body):
            return ("the value loss does not reach the LSTM body (its features were detached): the value head "
                    "shares the policy's body, and the gradient of L_value flows into it (DESIGN.md §2)")
    if loss == "loss_pg" and model_prefix == "policy":
        crit = [k for k in have if "/value." in k or "/qvalue." in k]
        if crit and any(np.any(got[k] != 0) for k in crit) and all(np.all(gold[k] == 0) for k in crit):
            return ("the critic head gets a gradient from L_pg: the baseline is not detached (A = G − b must be "
                    "a constant in L_pg; detach b or A)")
        cand = _kl_not_detached_grad(ctx)
        if cand is not None and allm({k: gold[k] + cand[k.split("/")[-1]] for k in have}):
            return ("the KL penalty is not detached: the gradient of L_pg flows through β·k in the rewards (R and "
                    "β·k are constants; k is computed from the detached log-probs)")
    if loss == "loss" and model_prefix == "policy":
        for t in ("loss_pg", "loss_ent", "loss_value"):
            cand = {k: gold[k] - ctx.g64(f"grad/{t}/policy/{k.split('/')[-1]}") for k in have}
            if any(np.any(ctx.g[f"grad/{t}/policy/{k.split('/')[-1]}"] != 0) for k in have) and allm(cand):
                return f"the total gradient lacks the gradient of {t}"
    return ("the values match but this gradient differs: a missing stop-gradient (A, G, the baselines, the "
            "whitening statistics, R and β·k are constants; the entropy is not), or a wrong backward pass "
            "through this parameter")


def _kl_not_detached_grad(ctx):
    """The extra gradient of L_pg when the KL penalty in the rewards is not detached (param -> array):
    G then depends on logp through k(x), x = logp − ref_logp, and ∂L_pg/∂logp_j gains
    Σ_t w_t·logp_t·β·γ^{j−t}·k'(x_j)/s over the actions t ≤ j of the row (every action for 'total',
    with γ^{j − first}); s is the whitening denominator (its statistics are constants)."""
    cfg, g = ctx.cfg, ctx.g
    am = ctx.am
    beta, gamma = cfg["beta"], cfg["gamma"]
    if beta == 0:
        return None
    x = _on(ctx, ctx.g64("logp") - ctx.g64("ref_logp"))
    kprime = {"k1": np.ones_like(x), "k2": x, "k3": -np.expm1(-x)}[cfg["kl"]]
    w, lp = ctx.g64("weights"), ctx.g64("logp")
    if cfg["whiten"] != "off":
        A0 = _on(ctx, ctx.g64("returns") - ctx.g64("baseline"))[am]
        n = A0.size
        var = np.sum((A0 - A0.mean()) ** 2) / (n - 1 if cfg["whiten"] == "bessel" else n)
        s = np.sqrt(var + ret.WHITEN_EPS)
    else:
        s = 1.0
    Bn, Tn = x.shape
    dlogp = np.zeros_like(x)          # extra ∂L_pg/∂logp_j = Σ_t w_t·logp_t·β·γ^{..}·k'_j / s
    for b in range(Bn):
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


def _diagnose(ctx, name, got, section):
    """The hint for the first differing quantity: the first candidate that matches."""
    atol, rtol = ctx.tol(name)
    want = ctx.g64(name)
    if not np.all(np.isfinite(got)):
        ix = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        return (f"{name} has non-finite values (first {_idx(ix)} = {got[ix]}): mask with where(), not by multiplying "
                f"(0·(−inf) = NaN where log 0 is masked), keep logsumexp max-shifted, and compute k3 as "
                f"expm1(−x) + x from the log-ratio")
    for desc, thunk in _hints_for(ctx, name, section):
        try:
            cand = thunk()
        except (ValueError, TypeError, IndexError, KeyError, FloatingPointError, ZeroDivisionError):
            continue
        if cand is None:
            continue
        if _matches(got, np.asarray(cand, np.float64), atol, rtol):
            return desc
    # generic patterns
    if _matches(got, -want, atol, rtol):
        return f"{name} has the opposite sign"
    if section == "rl" and want.ndim >= 2 and want.shape[:2] == ctx.am.shape:
        bad = ~_close(got, want, atol, rtol)
        while bad.ndim > 2:
            bad = bad.any(-1)
        rows = np.nonzero(bad.any(axis=1))[0]
        if "mask" in ctx.g and ctx.g["mask"].shape == bad.shape:
            padded = ctx.g["mask"].sum(axis=1) < ctx.g["mask"].shape[1]
            if rows.size and padded[rows].all() and not padded.all():
                return (f"only rows with padding differ (rows {', '.join(map(str, rows))}): padding leaks into "
                        f"{name} (a mask is missing somewhere upstream)")
            if hasattr(ctx, "am"):
                last = ret.last_action_index(ctx.am)
                bb, tt = np.nonzero(bad)
                if bb.size and np.all(tt == last[bb]) and np.any(ctx.am[bb].sum(axis=1) > 1):
                    return f"only each row's last action differs in {name} (where R is added, EOS, truncation)"
    return _small_differences(ctx, name, got, want, atol, rtol)


def _small_differences(ctx, name, got, want, atol, rtol):
    """Last resort: differences that are small and spread out usually mean reduced precision."""
    bad = ~_close(got, want, atol, rtol)
    scale = max(ctx.fwd_scale(), float(np.max(np.abs(want), initial=0.0)))
    rel = float(np.max(np.abs(got - want), initial=0.0)) / scale
    if bad.sum() < 2 or rel >= 1e-2:
        return ""
    if ctx.dtype == np.float64 and rel < 1e-5:
        return (f"the differences are small (≤ {rel:.1e} of the values' scale) and spread over {int(bad.sum())} "
                f"entries, like float32 rounding: part of the computation runs in float32 in this float64 case (a "
                f"float32 default dtype, module, constant or input)")
    return (f"the differences are small (≤ {rel:.1e} of the values' scale) and spread over {int(bad.sum())} entries: "
            f"reduced precision somewhere (TF32 matmuls — torch.backends.cuda.matmul.allow_tf32, "
            f"torch.backends.cudnn.allow_tf32 —, fp16/bf16 autocast, or inputs rounded)")


def _tie_rows(ctx, got_tokens):
    """Rows whose first divergence from the golden sampled tokens is a tie (u within rounding of a
    CDF boundary): {row: first divergent t}."""
    want = ctx.g["rollout/tokens"]
    ties = {}
    alpha, eps = ctx.cfg["alpha"], ctx.cfg["eps"]
    pol = {k.split("/", 1)[1]: ctx.g64(k) for k in ctx.inputs if k.startswith("policy/")}
    fwd, _ = model.forward(pol, want, ctx.g["rollout/mask"])
    cdf = np.cumsum(np.exp(policy.logprobs(fwd["scores"], alpha, eps)), -1)
    u = ctx.g64("rollout/u")
    tol = 64 * float(np.finfo(ctx.dtype).eps) * (ctx.dims["V"] + ctx.fwd_scale())
    for b in range(want.shape[0]):
        diff = np.nonzero(np.asarray(got_tokens[b]) != want[b])[0]
        if diff.size == 0:
            continue
        t = int(diff[0])
        if ctx.g["rollout/action_mask"][b, t] and np.min(np.abs(cdf[b, t] - u[b, t])) <= tol:
            ties[b] = t
    return ties


def _rollout_token_hint(ctx, got, outputs=None):
    want = ctx.g["rollout/tokens"]
    m = ctx.g["rollout/mask"] > 0
    # kept sampling after EOS
    if np.array_equal(np.where(m, got, 0), np.where(m, want, 0)):
        return ("the tokens match up to each row's end, but the row goes on after it: EOS (id "
                f"{ctx.cfg['eos_id']}) ends a row and later positions are padding (0)")
    cands = []
    alpha, eps = ctx.cfg["alpha"], ctx.cfg["eps"]
    if alpha != 1:
        cands.append(("sampled without the inverse temperature α (softmax(z) instead of softmax(α·z))",
                      ("alpha1", {"alpha": 1.0}, None)))
        cands.append(("sampled with α used as a temperature (z/α); α is an inverse temperature",
                      ("alpha_inv", {"alpha": 1.0 / alpha}, None)))
    if eps > 0:
        cands.append(("sampled without the ε-mixture", ("eps0", {"eps": 0.0}, None)))
    def shift_u(k):
        def tf(inp):
            out = dict(inp)
            u = inp["rollout/u"]
            out["rollout/u"] = np.roll(u, k, axis=1)
            return out
        return tf
    cands.append(("token t was drawn with u[:, t−1]: u is token-aligned, u[:, t] draws tokens[:, t]",
                  (("u", 1), None, shift_u(1))))
    cands.append(("token t was drawn with u[:, t+1]: u is token-aligned, u[:, t] draws tokens[:, t]",
                  (("u", -1), None, shift_u(-1))))
    def one_minus(inp):
        out = dict(inp)
        out["rollout/u"] = np.nextafter(1.0 - inp["rollout/u"], 0).astype(inp["rollout/u"].dtype)
        return out
    cands.append(("sampled with 1 − u: the inverse CDF runs from token 0 upwards, a = #{k : cdf_k ≤ u}",
                  ("1-u", None, one_minus)))
    for order in _GATE_ORDERS:
        cands.append((_gate_hint(order), (("gates", order), None, _perm_transform(order, ("policy",)))))
    # tokens are coarse (several variants may sample the same ones): when the implementation gives
    # its sampling log-probs too, the variant must match those as well
    lp = None if outputs is None else outputs.get("rollout/logp")
    lp = None if lp is None or np.shape(lp) != ctx.g["rollout/logp"].shape else np.asarray(lp, np.float64)
    atol, rtol = ctx.tol("rollout/logp")
    first = ""
    for desc, (key, cfg, tf) in cands:
        v = ctx.variant(key, ["rollout"], cfg, tf)
        if v and np.array_equal(v["rollout/tokens"], got):
            if lp is None or _matches(lp, v["rollout/logp"], atol, rtol):
                return desc
            first = first or desc
    return first


def _int_hint(ctx, n, got, want, section, outputs):
    """The hint for a differing integer quantity (sampled tokens, masks)."""
    if n == "rollout/tokens":
        return _rollout_token_hint(ctx, got, outputs)
    if n == "action_mask":
        return next((d for d, f in _hints_for(ctx, n, section) if np.array_equal(np.asarray(f()) > 0, got > 0)), "")
    if n in ("rollout/mask", "rollout/action_mask"):
        gl, wl = np.asarray(got).sum(1), want.sum(1)
        if np.all(gl <= wl):
            return "the mask ends early: the EOS token is a real token (mask 1) and an action"
        if np.all(gl >= wl):
            return "the mask goes on after the row's end (EOS ends a row)"
    return ""


# ============================================================================ verifying a case

def verify_case(entry, golden, outputs, layout=None, strict_mask=True):
    """Compare one case. ``entry``: its manifest entry; ``golden``: its arrays; ``outputs``: the
    implementation's arrays (a dict). Returns a CaseReport."""
    name = entry["name"]
    rep = CaseReport(name, entry.get("description", ""))
    outputs = dict(outputs)
    lay = outputs.pop("layout", None)
    if layout is None and lay is not None:
        layout = str(np.asarray(lay).item()) if np.asarray(lay).dtype.kind in "US" else None
    layout = layout or "token-aligned"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    ctx = _Ctx(entry, golden)
    outs = entry["outputs"]
    rep.ignored = sorted(k for k in outputs if k not in outs and k not in entry["inputs"])
    ties = {}
    for section in SECTIONS:
        names = [n for n in outs if gv.section_of(n) == section]
        stopped = False
        for n in names:
            if stopped:
                if n in outputs:
                    rep.not_compared.append(n)
                continue
            if n not in outputs:
                rep.not_checked.append(n)
                continue
            want = golden[n]
            got, why = _normalise(n, outputs[n], want, layout)
            if got is None:
                msg = why or _shape_msg(n, np.asarray(outputs[n]), want, ctx, layout)
                rep.findings.append(Finding(name, section, "shape", n, msg))
                stopped = True
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
            # masking: values that must be exactly 0 off a mask
            off = _zero_mask(ctx, n, want.shape)
            if off is not None:
                nz = off & (np.asarray(got) != 0)
                if nz.any():
                    ix = np.argwhere(nz)
                    pos = sorted({tuple(i[:2]) for i in ix})
                    zname = gv.zero_off(n)
                    kinds = _position_kinds(ctx, pos, zname)
                    first = tuple(ix[0])
                    what = {"position": "the position mask (column 0 and padding)"}.get(zname, zname)
                    rep.findings.append(Finding(
                        name, section, "masking" if strict_mask else "note", n,
                        f"nonzero at {len(pos)} position(s) off {what} ({kinds}); e.g. {_idx(first)} = "
                        f"{_fmt(np.asarray(got)[first])}. Entries off the mask must be exactly 0 (DESIGN.md §2)",
                        index=first))
                    got = np.where(off, want, got)
            # compare
            if want.dtype.kind in "iub":
                r = _compare_int(n, got, want)
                if r is None:
                    rep.checked.append(n)
                    continue
                ix, msg = r
                try:
                    hint = _int_hint(ctx, n, got, want, section, outputs)
                except Exception as ex:          # a hint is a courtesy: never let it hide the finding
                    hint = f"(no hint: looking for one failed with {type(ex).__name__}: {ex})"
                rep.findings.append(Finding(name, section, "differs", n, msg, hint, ix))
                stopped = True
                continue
            got64 = np.asarray(got, np.float64)
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
                  (f"; worst {_idx(ix)}" if ix else "") + \
                  f": got {_fmt(got64[ix])}, expected {_fmt(want64[ix])} (|Δ| {_fmt(abs(got64[ix] - want64[ix]))}, " \
                  f"tolerance {_fmt(atol + rtol * abs(want64[ix]))})"
            raw_dt = np.asarray(outputs[n]).dtype
            if ctx.dtype == np.float64 and raw_dt == np.float32 and np.all(_close(
                    got64, want64, *(x * np.finfo(np.float32).eps / np.finfo(np.float64).eps for x in (atol, rtol)))):
                hint = (f"{n} is float32 in a float64 case and matches to float32 precision: compute this case in "
                        f"float64 (the case's dtype is in its config)")
            else:
                try:
                    hint = _grad_hints(ctx, n, outputs) if n.startswith("grad/") else _diagnose(ctx, n, got64, section)
                except Exception as ex:          # a hint is a courtesy: never let it hide the finding
                    hint = f"(no hint: looking for one failed with {type(ex).__name__}: {ex})"
            rep.findings.append(Finding(name, section, "differs", n, msg, hint, ix))
            stopped = True
    return rep


def verify(cases, outputs, layout=None, names=None, strict_mask=True):
    """Verify an implementation's outputs against golden cases.

    cases    a golden folder (or its manifest.json)
    outputs  a folder of ``<case>.npz``, or ``{case: {name: array}}``
    layout   "token-aligned" (default) or "shifted" (the (B, T−1) layout of Hugging Face); an
             output array named ``layout`` holding the string sets it per case
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


# ============================================================================ command line

def add_arguments(parser):
    """The ``rlhf-ref verify`` options."""
    parser.add_argument("cases", metavar="CASES", help="golden folder written by 'rlhf-ref vectors'")
    parser.add_argument("outputs", metavar="OUTPUTS", help="folder with one <case>.npz of your outputs per case")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="array layout of your outputs (default: token-aligned, or each file's 'layout' array)")
    parser.add_argument("--case", action="append", dest="names", metavar="NAME",
                        help="verify only this case (repeatable)")
    parser.add_argument("--lenient-mask", action="store_true",
                        help="report nonzero values off the mask as notes, not failures")
    parser.add_argument("-v", "--verbose", action="store_true", help="every case, and what was not checked")
    return parser


def add_subparser(subparsers):
    """Register ``verify`` on an argparse subparsers object (for a command table without one)."""
    p = subparsers.add_parser("verify", help="compare an implementation's outputs with the golden vectors")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    """``rlhf-ref verify``: prints the report; 0 when everything matches, 1 when anything differs, 2 on errors."""
    try:
        rep = verify(args.cases, args.outputs, layout=args.layout, names=args.names,
                     strict_mask=not args.lenient_mask)
    except (gv.GoldenError, KeyError, OSError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"rlhf-ref verify: error: {msg}", file=sys.stderr)
        return 2
    print(rep.format(verbose=args.verbose))
    return rep.exit_code


if __name__ == "__main__":       # pragma: no cover
    ap = add_arguments(argparse.ArgumentParser(prog="python -m rlhf_ref.verify"))
    sys.exit(main(ap.parse_args()))
