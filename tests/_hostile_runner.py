"""Runs hostile specs (tests/_hostile.py) in subprocesses and judges the outcomes (issue 10).

``run(specs, backends)`` feeds the specs to ``python tests/_hostile.py`` in one subprocess per batch;
a process that dies (a signal, an abort) is restarted after the spec it died in, and that spec is
reported as a crash of every backend it was running. ``judge(spec, result)`` turns one result into
the list of problems (empty: fine). ``python tests/_hostile_runner.py specs.json cython,numba`` prints
a summary per backend (the probe counts reported in issue 10).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_hostile.py")

# exception types a public function may raise for bad input (the reference's contract); the env
# also raises RuntimeError for a step after the episode ended
ALLOWED = {"ValueError", "TypeError"}
# the reference's internal names: an error naming one of them names no argument of the user's
# the overflow error of a training step (rlhf_ref._validate.check_finite_result)
OVERFLOW = "params, alpha or the rewards give a non-finite loss or gradient"
# at the overflow edge the order of a sum decides between a huge finite value and inf, so one
# backend may raise OVERFLOW where another returns: accepted when the one that returned holds a
# value within this factor of the dtype's largest finite number ("boundary", counted, not a problem)
EDGE = 1 / 64
INTERNAL = re.compile(r"^(dhs|upstream|z|logq|x|dscores|dvalues|dqvalues|dh_final|dc_final|actions|h0|c0|_rollout_cy|"
                      r"_lstm_cy|_train_cy)\b")


def run(specs, backends, env=None, timeout=600, python=sys.executable):
    """{index: result} for every spec; a spec whose process died gets {"crash": returncode}."""
    results = {}
    start = 0
    environ = dict(os.environ if env is None else env)
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    while start < len(specs):
        batch = specs[start:]
        p = subprocess.run([python, WORKER, ",".join(backends)], input=json.dumps(batch), capture_output=True,
                           text=True, cwd=ROOT, env=environ, timeout=timeout)
        done = 0
        for line in p.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[start + r["i"]] = r
                done = r["i"] + 1
        if done < len(batch):               # died in batch[done]: report it, go on after it
            if p.returncode == 0:
                raise RuntimeError(f"the hostile worker stopped early with no error:\n{p.stderr[-2000:]}")
            results[start + done] = {"crash": p.returncode, "stderr": p.stderr[-1500:]}
            done += 1
        start += done
    return results


def arg_name(msg):
    """The argument an error message names: its first word (``params['head.weight']``, ``alpha``, ...)."""
    m = re.match(r"[A-Za-z_][\w.]*(\[[^\]]*\])?", msg)
    return m.group(0) if m else msg[:20]


def judge(spec, res):
    """Problems of one result as (backend or 'numpy', category, detail); categories: crash,
    traceback (a wrong exception type, or an internal name), mismatch (a different answer or error)."""
    if "crash" in res:
        return [("all", "crash", f"process died ({res['crash']}) in {spec}: {res['stderr'][-500:]}")]
    probs = []
    ref = res["ref"]
    ok_types = ALLOWED | ({"RuntimeError"} if spec["fn"] == "env" else set())
    if ref["s"] == "raise":
        if spec["fn"] == "env" and ref["t"] == "Error" and ref["m"].startswith("Seed must be"):
            pass                            # Gymnasium's own check of reset(seed=...): its error, its words
        elif ref["t"] not in ok_types:
            probs.append(("numpy", "traceback", f"{ref['t']}: {ref['m']} | {ref.get('tb', '')}"))
        elif INTERNAL.match(ref["m"]):
            probs.append(("numpy", "traceback", f"names an internal argument: {ref['m']}"))
    for name, o in res["backends"].items():
        if o["s"] == "mismatch":
            probs.append((name, "mismatch", o["d"]))
        elif ref["s"] == "ok" and o["s"] == "raise" and o["m"].startswith(OVERFLOW) and ref["peak"] >= EDGE:
            probs.append((name, "boundary", o["m"]))
        elif ref["s"] == "raise" and o["s"] == "ok" and ref["m"].startswith(OVERFLOW) and o["peak"] >= EDGE:
            probs.append((name, "boundary", ref["m"]))
        elif ref["s"] == "ok" and o["s"] == "raise":
            probs.append((name, "mismatch" if o["t"] in ALLOWED else "traceback",
                          f"raised {o['t']}: {o['m']} where the reference returned"))
        elif ref["s"] == "raise" and o["s"] == "ok":
            probs.append((name, "mismatch", f"returned where the reference raised {ref['t']}: {ref['m']}"))
        elif ref["s"] == "raise" and o["s"] == "raise":
            if o["t"] != ref["t"] or arg_name(o["m"]) != arg_name(ref["m"]):
                probs.append((name, "traceback" if o["t"] not in ALLOWED else "mismatch",
                              f"raised {o['t']}: {o['m']} | reference {ref['t']}: {ref['m']}"))
    return probs


def summary(specs, results, backends):
    """{backend: {calls, crash, mismatch, traceback}} and the list of problems."""
    counts = {b: {"calls": 0, "crash": 0, "mismatch": 0, "traceback": 0, "boundary": 0}
              for b in ("numpy",) + tuple(backends)}
    problems = []
    for i, spec in enumerate(specs):
        res = results[i]
        ran = ["numpy"] + (list(res.get("backends", {})) if "crash" not in res else list(backends))
        for b in ran:
            counts[b]["calls"] += 1
        for b, cat, d in judge(spec, res):
            for bb in (ran if b == "all" else [b]):
                counts[bb][cat] += 1
            if cat != "boundary":
                problems.append((i, spec, b, cat, d))
    return counts, problems


if __name__ == "__main__":
    specs = json.load(open(sys.argv[1]))
    bes = tuple(b for b in sys.argv[2].split(",") if b)
    res = run(specs, bes)
    counts, problems = summary(specs, res, bes)
    for i, spec, b, cat, d in problems:
        print(f"[{i}] {b} {cat}: {spec['fn']} {spec['dt']} {spec['mut']} {spec['arg']} {spec['val']}: {d[:400]}")
    print(json.dumps(counts, indent=1))
