"""Check another implementation against the golden vectors: the first quantity that differs, where,
by how much, and what usually causes that pattern.

    rlhf-ref verify CASES OUTPUTS [--layout shifted] [--case NAME] [--max-file-mb MB] [-v]
    rlhf-ref verify --list-mistakes

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
each a named entry of rlhf_ref.golden.mistakes, and names the closest one. Separately, values that
should be exactly 0 off a mask but are not are a *masking* finding; the comparison then goes on
with the on-mask values.

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

from .. import safe_read
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
    index: tuple = ()    #: where (the worst entry), when it applies
    mistake: str = ""    #: the name of the mistake the hint describes (rlhf_ref.golden.mistakes), if any

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


# ============================================================================ verifying a case

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
    ctx = Ctx(entry, golden)
    ctx.impl = outputs
    ctx.checked = rep.checked
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
                        index=first, **_masking_hint(ctx, n, got)))
                    got = np.where(off, want, got)
            # compare
            if want.dtype.kind in "iub":
                r = _compare_int(n, got, want)
                if r is None:
                    rep.checked.append(n)
                    continue
                ix, msg = r
                rep.findings.append(Finding(name, section, "differs", n, msg, **_hint(ctx, n, got), index=ix))
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
            rep.findings.append(Finding(name, section, "differs", n, msg, **_hint(ctx, n, got64), index=ix))
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
