"""Check your implementation against the golden vectors from your own test suite.

    from rlhf_ref import testing

    case = testing.load_case("base")                    # inputs + config of one golden case
    outs = my_loss(case.inputs, **case.config)          # your code: {"returns": ..., "advantages": ...}
    testing.assert_matches_golden(outs, "base")         # AssertionError: the verifier's report

``golden`` (every function) is a folder written by ``rlhf-ref vectors --out DIR`` (or by
``golden_dir(DIR)``); left out, the shipped cases are generated once per process into a temporary
folder (a second or two). Outputs use the golden names and shapes (docs/golden-vectors.md): give
only the quantities you compute; every one you give is compared, in data-flow order, and the
message on failure is the verifier's report (the first quantity that differs, where, by how much,
and the closest named mistake). ``layout`` is "token-aligned" (default), "shifted" (Hugging Face's
(B, T−1)), or any other layout the verifier accepts (``rlhf-ref verify --help``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from .golden import vectors as _gv
from .golden import verify as _verify

__all__ = ["GoldenCase", "golden_dir", "case_names", "load_case", "assert_matches_golden", "check"]

_DEFAULT = {}


def golden_dir(path=None, names=None):
    """A folder holding the golden vectors; returns its path.

    ``path`` given: the shipped cases (``names``: only these) are written there unless a manifest
    already lies there. ``path=None``: one temporary folder per process, written on first use and
    removed at exit."""
    if path is None:
        if "dir" not in _DEFAULT:
            d = tempfile.mkdtemp(prefix="rlhf_ref_golden_")
            atexit.register(shutil.rmtree, d, True)
            _gv.write_vectors(d)
            _DEFAULT["dir"] = d
        return _DEFAULT["dir"]
    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, _gv.MANIFEST)):
        _gv.write_vectors(path, names=names)
    return path


@dataclass
class GoldenCase:
    """One golden case: what you need to produce its outputs, and its expected outputs."""
    name: str
    description: str
    config: dict                         #: every convention switch by name (defaults included), dtype, layout, ...
    dims: dict                           #: B, T, V, ...
    inputs: dict = field(repr=False)     #: golden input arrays by name (tokens, mask, prompt_len, reward, policy/...)
    expected: dict = field(repr=False)   #: golden output arrays by name (what your outputs are compared with)

    @property
    def output_names(self):
        return list(self.expected)


def _entry(name, golden):
    man = _gv.load_manifest(golden_dir() if golden is None else os.fspath(golden))
    for e in man["cases"]:
        if e["name"] == name:
            return man, e
    raise KeyError(f"case: no golden case named {name!r} in {man['_folder']}; "
                   f"cases: {', '.join(e['name'] for e in man['cases'])}")


def case_names(golden=None, where=None, section="rl"):
    """Names of the golden cases your implementation can be checked on: those with the section
    ``section`` ("rl", "rm", "sft", "rollout"; None: any) for which ``where(config, inputs)`` is true
    (``config`` the case's switches by name, ``inputs`` the names of its input arrays; None: every
    case), in the manifest's order."""
    man = _gv.load_manifest(golden_dir() if golden is None else os.fspath(golden))
    return [e["name"] for e in man["cases"]
            if (section is None or section in e["sections"]) and (where is None or where(e["config"], e["inputs"]))]


def load_case(name, golden=None):
    """The golden case ``name`` (a GoldenCase: ``.inputs``, ``.config``, ``.dims``, ``.expected``)."""
    man, e = _entry(name, golden)
    arrays = _gv.load_case(man, e)
    return GoldenCase(name, e.get("description", ""), dict(e["config"]), dict(e["dims"]),
                      _gv.inputs_of(e, arrays), _gv.outputs_of(e, arrays))


def check(outputs, case, golden=None, layout=None):
    """The verifier's CaseReport of ``outputs`` (a dict of arrays) against the golden ``case``."""
    if not isinstance(outputs, dict) or not outputs:
        raise TypeError("outputs must be a non-empty dict {golden name: array}, "
                        f"got {type(outputs).__name__}{' (empty)' if isinstance(outputs, dict) else ''}")
    man, _ = _entry(case, golden)
    return _verify.verify_outputs(dict(outputs), case, man["_manifest"], layout=layout).case(case)


def assert_matches_golden(outputs, case, golden=None, layout=None, require=()):
    """Raise AssertionError (its message: the verifier's report) unless ``outputs`` match case ``case``.

    outputs  {golden name: array} of the quantities you compute (``case`` is the case's name)
    require  golden names that must be among ``outputs`` (a quantity you forgot is then a failure,
             not silently "not checked")
    A name that is not a golden output of the case (a typo) is a failure too."""
    rep = check(outputs, case, golden=golden, layout=layout)
    problems = []
    missing = [n for n in require if n not in outputs]
    if missing:
        problems.append(f"missing outputs (required): {', '.join(missing)}")
    if rep.ignored:
        names = [n for n in _entry(case, golden)[1]["outputs"] if not n.startswith("grad/")]
        problems.append(f"not golden outputs of case {case!r} (a typo?): {', '.join(rep.ignored)}; "
                        f"its outputs: {', '.join(names)} and the grad/<loss>/<params>/<name> arrays")
    if not rep.checked and rep.ok:
        problems.append("no golden quantity was compared")
    if rep.ok and not problems:
        return rep
    text = rep.format(verbose=True)
    raise AssertionError("\n".join([f"outputs do not match golden case {case!r}"
                                    + (f" (layout {layout})" if layout else ""), text] + problems))
