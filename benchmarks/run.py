"""Time rollouts and REINFORCE training steps for every backend and PyTorch CPU, side by side.

    python -m benchmarks                      # all cases, writes benchmarks/RESULTS.md
    python -m benchmarks --threads 1 --json out.json
    python -m benchmarks --openblas both      # as set here, and with OPENBLAS_CORETYPE unset
    python -m benchmarks --smoke              # tiny shapes, correctness only (CI)

Method (these machines are shared and noisy): every implementation is checked against the
NumPy reference first, warmed up (Numba compiles, caches load), then timed round-robin in
one process with a pause at each switch (an OpenBLAS pool spins ~0.1–0.2 s after a call and
slows the next library). Each sample is a block of calls lasting at least ``--min-time``;
we report the median over ``--repeats`` rounds with min and max, and ratios as the median of
per-round paired ratios. GFLOP/s counts the GEMM FLOPs no implementation can avoid: forward
2·(4H·H + H·V) per token (the input projection depends on the token alone and is tabulated by
the compiled kernels), a training step 3× that; the matrix-multiply peak is a square float32 GEMM measured
in the same run with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc

CASES = ((1, 128, 64), (16, 128, 64), (64, 256, 128), (256, 512, 256))
SMOKE_CASES = ((1, 8, 7), (3, 8, 7))
T_DEFAULT = 64


def _reexec(args, extra_env, unset=()):
    """Run this benchmark in a child with thread counts fixed before any library loads."""
    env = dict(os.environ)
    env.update(extra_env)
    for k in unset:
        env.pop(k, None)
    env["RLHF_BENCH_CHILD"] = "1"
    cmd = [sys.executable, "-m", "benchmarks"] + args
    return subprocess.run(cmd, env=env).returncode


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=None,
                   help="threads for every library, or a comma list for one run each, e.g. 1,2 (default: all cores)")
    p.add_argument("--openblas", choices=("asis", "unset", "both"), default="asis",
                   help="OPENBLAS_CORETYPE as set here, unset for this run, or both runs")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation (median reported)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed block")
    p.add_argument("--T", type=int, default=T_DEFAULT, help="sequence length")
    p.add_argument("--cases", default=None, help="B,H,V triples, e.g. '1,128,64;16,128,64'")
    p.add_argument("--jobs", default="rollout,train", help="rollout, train or both")
    p.add_argument("--backends", default=None, help="comma list (default: every available one)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--json", default=None, help="also write raw results as JSON here")
    p.add_argument("--out", default=None, help="Markdown report (default benchmarks/RESULTS.md; not in --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one short round: a correctness smoke check")
    args = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    if os.environ.get("RLHF_BENCH_CHILD") != "1":
        threads = [int(t) for t in str(args.threads or os.cpu_count()).split(",")]
        modes = ("asis", "unset") if args.openblas == "both" else (args.openblas,)
        runs = []
        base = args.json or os.path.join("benchmarks", "results")
        for n in threads:
            tenv = {k: str(n) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                        "NUMBA_NUM_THREADS")}
            for mode in modes:
                js = f"{base}.{n}t.{mode}.json"
                a = _strip(argv, ("--openblas", "--json", "--out", "--threads")) + [
                    "--openblas", mode, "--json", js, "--out", os.devnull, "--threads", str(n)]
                rc = _reexec(a, tenv, unset=("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if mode == "unset" else ())
                if rc:
                    return rc
                with open(js) as f:
                    runs.append(json.load(f))
        if not args.smoke:
            from .report import write_report
            write_report(runs, args.out or os.path.join("benchmarks", "RESULTS.md"), " ".join(["python -m benchmarks"] + argv))
        return 0

    from .harness import run_all
    res = run_all(args)
    res["command"] = " ".join(["python -m benchmarks"] + argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if not args.smoke and args.out != os.devnull:
        from .report import write_report
        write_report([res], args.out or os.path.join("benchmarks", "RESULTS.md"), res["command"])
    return 0 if res["ok"] else 1


def _strip(argv, names):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out
