"""A golden case's context for comparison: tolerances, masks, tie-aware sampled tokens, the
comparison of one array, and the reference rerun with variants (for the named mistakes).

Tolerances are derived from the case's dtype like tests/_tol.py: ``|got − want| <= tol·scale +
tol·|want|`` with ``tol = 8·eps(dtype)·(n + 4)``, n the length of the chain of roundings behind a
value (T·(E + H + 4) + V for the forward pass; twice that plus B·T for gradients) and ``scale``
the magnitude of the numbers the value is computed from. Integers (tokens, masks) must be equal.
"""

from __future__ import annotations

import numpy as np

from .. import model, policy
from .. import returns as ret
from . import vectors as gv

LAYOUTS = ("token-aligned", "shifted", "response")
SECTIONS = gv.SECTIONS
LOSS_NAMES = gv.LOSS_NAMES
_C, _K = 8.0, 4.0
HINT_SLACK = 4.0      #: a candidate explanation must match within this many tolerances

# ============================================================================ context

class Ctx:
    """A golden case and lazily computed variants of it (for the hints)."""

    def __init__(self, entry, arrays):
        self.entry, self.g = entry, arrays
        self.cfg = entry["config"]
        self.dims = entry["dims"]
        self.dtype = np.dtype(self.cfg["dtype"])
        self.inputs = gv.inputs_of(entry, arrays)
        self._variants = {}
        self.impl = {}            #: the implementation's arrays (normalised as they are compared)
        self.checked = []         #: quantities compared and matched so far
        self.got, self.note, self.tied = None, {}, []
        if "tokens" in arrays:
            m = arrays["mask"] > 0
            self.mask = m
            self.pm = np.asarray(model.position_mask(arrays["mask"]) > 0)
        if "action_mask" in arrays:
            self.am = arrays["action_mask"] > 0

    def impl_value(self, name):
        return np.asarray(self.impl[name], np.float64) if np.asarray(self.impl[name]).dtype.kind == "f" \
            else np.asarray(self.impl[name])

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
    elif gv.time_aligned(name) and got.ndim >= 2 and got.shape[0] == want.shape[0] and \
            got.shape[1] < want.shape[1] - 1 and layout != "response":
        msg += ("; if column 0 is each row's first generated token (TRL PPO, OpenRLHF, SB3), declare the "
                "response-only layout (layout='response', --layout response, or a 'layout' array holding 'response')")
    return msg


def _normalise(name, a, want, layout, ctx=None, outputs=None):
    """The implementation's array as a NumPy array in the token-aligned layout, or (None, message).

    shifted   (B, T−1): column t holds token-aligned column t + 1 (Hugging Face's logits[:, :-1]
              against labels[:, 1:]); column 0 of the token-aligned array is 0.
    response  (B, L): column j holds token-aligned column prompt_len[b] + j (TRL PPO, OpenRLHF,
              SB3); L ≥ the longest response, the rest 0 (or anything under your own 0
              action_mask, given in the same layout). Prompt positions of the per-position
              arrays (scores, logq, values, qvalues, sft_logp) are not in it: they are not compared.
    """
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        return None, f"dtype {a.dtype} is not numeric"
    if layout == "shifted" and gv.time_aligned(name) and a.ndim >= 2:
        if a.shape[1] != want.shape[1] - 1:
            return None, (f"shape {tuple(a.shape)} in the shifted layout, expected "
                          f"{(want.shape[0], want.shape[1] - 1) + tuple(want.shape[2:])}")
        a = np.concatenate([np.zeros_like(a[:, :1]), a], axis=1)
    elif layout == "response" and gv.time_aligned(name) and a.ndim >= 2 and ctx is not None:
        r = _from_response(name, a, want, ctx, outputs or {})
        if isinstance(r, str):
            return None, r
        a = r
    if want.ndim == 0 and a.size == 1:
        a = a.reshape(())
    if a.shape != want.shape:
        return None, None
    return a, None


def _from_response(name, a, want, ctx, outputs):
    """A response-layout array mapped onto the token-aligned (B, T, ...) layout, or a message."""
    rollout = name.startswith("rollout/")
    pl = np.asarray(ctx.g["rollout/prompt_len" if rollout else "prompt_len"]).astype(np.int64)
    am = np.asarray(ctx.g["rollout/action_mask" if rollout else "action_mask"]) > 0
    B, T = want.shape[:2]
    longest = int(am.sum(axis=1).max(initial=0))
    if a.shape[0] != B or a.shape[2:] != want.shape[2:] or a.shape[1] < longest:
        return (f"shape {tuple(a.shape)} in the response layout, expected (B, L{', ' if want.ndim > 2 else ''}"
                f"{', '.join(map(str, want.shape[2:]))}) with B = {B} and L ≥ {longest} (the longest response)")
    yours = outputs.get("rollout/action_mask" if rollout else "action_mask")
    if yours is not None and a.dtype.kind == "f" and np.shape(yours) == a.shape[:2]:
        a = np.where(np.asarray(yours).reshape(a.shape[:2] + (1,) * (a.ndim - 2)) > 0, a, 0)
    out = np.zeros(want.shape, a.dtype)
    for b in range(B):
        room = max(T - int(pl[b]), 0)
        k = min(room, a.shape[1])
        out[b, pl[b]:pl[b] + k] = a[b, :k]
        if np.any(a[b, k:] != 0):
            j = k + int(np.argmax(np.any((a[b, k:] != 0).reshape(a.shape[1] - k, -1), axis=1)))
            return (f"row {b} is nonzero at response position {j} (response layout), beyond the golden width: "
                    f"row {b} has room for {room} response positions (T = {T}, prompt_len = {int(pl[b])}); "
                    "entries past a row's response must be 0")
    if gv.zero_off(name) == "position" or name == "sft_logp":
        prompt = ~(np.arange(T)[None, :] >= pl[:, None])
        prompt = prompt.reshape(prompt.shape + (1,) * (want.ndim - 2))
        out = np.where(prompt, want.astype(out.dtype), out)       # not in the response layout: not compared
    return out


def _compare_int(name, got, want):
    bad = np.asarray(got) != want
    if not bad.any():
        return None
    ix = tuple(np.argwhere(bad)[0])
    return ix, (f"{int(bad.sum())} of {bad.size} entries differ; first {_idx(ix)}: got {_fmt(np.asarray(got)[ix])}, "
                f"expected {_fmt(want[ix])}")


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

