"""Time rollouts and REINFORCE training steps for every backend beside PyTorch CPU and JAX CPU.

    python -m benchmarks                      # all cases, 1 thread, writes benchmarks/RESULTS.md
    python -m benchmarks --threads 1,2 --json out   # one run per thread count (out.1t.asis.json, ...)
    python -m benchmarks --openblas both      # as set here, and with OPENBLAS_CORETYPE unset
    python -m benchmarks --smoke              # tiny shapes, correctness only (CI), JAX included

Method (these machines are shared and noisy): every implementation is checked against the
NumPy reference first, warmed up (Numba compiles, caches load, JAX compiles: its compile time is
reported separately), then timed round-robin in one process with a pause at each switch (an
OpenBLAS pool spins ~0.1–0.2 s after a call and slows the next library). Each sample is a block
of calls lasting at least ``--min-time``; we report the median over ``--repeats`` rounds with min
and max, and ratios as the median of per-round paired ratios. The CPU time of every thread of the
process over each implementation's timed blocks is read from /proc/self/task/*/stat and reported,
so "1 thread" is checked, not assumed. GFLOP/s counts the GEMM FLOPs no implementation can avoid:
forward 2·(4H·H + H·V) per token (the input projection depends on the token alone and is
tabulated), a training step 3× that; the matrix-multiply peak is a square float32 GEMM measured
in the same run with the same thread count. Then every implementation's cold start is measured
in fresh processes (benchmarks/coldstart.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .harness import CASES, PEERS, SMOKE_CASES, T_DEFAULT

# XLA's CPU client: one thread for compute when a 1-thread run is asked (read when jax starts).
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _reexec(args, extra_env, unset=(), cpus=None):
    """Run this benchmark in a child with thread counts (and, with ``cpus``, the CPUs every thread
    of it may run on) fixed before any library loads or starts a thread."""
    import subprocess
    env = dict(os.environ)
    env.update(extra_env)
    for k in unset:
        env.pop(k, None)
    env["RLHF_BENCH_CHILD"] = "1"
    if cpus is not None:
        env["RLHF_BENCH_CPUS"] = ",".join(map(str, cpus))
    cmd = [sys.executable, "-m", "benchmarks"] + args
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None
    return subprocess.run(cmd, env=env, preexec_fn=pre).returncode


def _cpus(n):
    """The n CPUs a run with n threads is pinned to: the last n this process may use. XLA's CPU
    client runs a computation on its own worker threads (tf_XLAEigen) even with the one-thread
    flags; pinning the whole process makes "1 thread" mean one core for every library."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return set(allowed[-n:]) if len(allowed) >= n else None


def _thread_env(n):
    env = {k: str(n) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = (flags + " " + XLA_ONE_THREAD).strip()
    return env


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1",
                   help="threads for every library, or a comma list for one run each, e.g. 1,2 (default 1)")
    p.add_argument("--openblas", choices=("asis", "unset", "both"), default="asis",
                   help="OPENBLAS_CORETYPE as set here, unset for this run, or both runs")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation (median reported)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed block")
    p.add_argument("--T", type=int, default=T_DEFAULT, help="sequence length")
    p.add_argument("--cases", default=None, help="B,H,V triples, e.g. '1,128,64;16,128,64'")
    p.add_argument("--jobs", default="rollout,train", help="rollout, train or both")
    p.add_argument("--backends", default=None, help="comma list (default: every available one)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--no-jax", action="store_true", help="skip JAX")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin an n-thread run to n CPUs (default: pinned, see _cpus)")
    p.add_argument("--no-coldstart", action="store_true", help="skip the fresh-process cold-start measurements")
    p.add_argument("--json", default=None, help="also write raw results as JSON here")
    p.add_argument("--out", default=None, help="Markdown report (default benchmarks/RESULTS.md; not in --smoke)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, one short round, no cold start: a correctness smoke check (CI)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    if os.environ.get("RLHF_BENCH_CHILD") != "1":
        threads = [int(t) for t in str(args.threads).split(",")]
        modes = ("asis", "unset") if args.openblas == "both" else (args.openblas,)
        runs = []
        base = args.json or os.path.join("benchmarks", "results")
        for n in threads:
            for mode in modes:
                js = f"{base}.{n}t.{mode}.json"
                a = _strip(argv, ("--openblas", "--json", "--out", "--threads")) + [
                    "--openblas", mode, "--json", js, "--out", os.devnull, "--threads", str(n)]
                rc = _reexec(a, _thread_env(n), unset=("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if mode == "unset" else (),
                             cpus=None if args.no_pin else _cpus(n))
                if rc:
                    return rc
                with open(js) as f:
                    runs.append(json.load(f))
        if not args.smoke:
            from .report import write_report
            write_report(runs, args.out or os.path.join("benchmarks", "RESULTS.md"), " ".join(["python -m benchmarks"] + argv))
        return 0

    res = run_child(args)
    res["command"] = " ".join(["python -m benchmarks"] + argv)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.json)
    if not args.smoke and args.out != os.devnull:
        from .report import write_report
        write_report([res], args.out or os.path.join("benchmarks", "RESULTS.md"), res["command"])
    return 0 if res["ok"] else 1


def run_child(args):
    """Resolve the command line into explicit settings and run the harness (in the child process,
    whose thread environment run.main has fixed)."""
    import time

    from rlhf_ref import backends
    from .harness import run_all

    if args.backends:
        names = args.backends.split(",")
    else:
        names = [n for n, st in backends.available().items() if st.available]
    names = [n for n in names if n != "cuda"] + (["cuda"] if "cuda" in names else [])
    peers = [p for p in PEERS if not getattr(args, f"no_{p}")]
    for p in peers:
        try:
            __import__(p)
        except Exception as e:
            print(f"{p} not importable ({e}); install the bench extra (pip install 'rlhf-ref[bench]'"
                  f"{', and torch' if p == 'torch' else ''}) or run with --no-{p}", flush=True)
            raise
    if args.smoke:
        cases, T, repeats, min_time, cold = SMOKE_CASES, 8, 1, 0.01, False
    else:
        cases = (tuple(tuple(int(x) for x in c.split(",")) for c in args.cases.split(";")) if args.cases else CASES)
        T, repeats, min_time, cold = args.T, args.repeats, args.min_time, not args.no_coldstart
    t0 = time.time()
    res = run_all(cases, T, args.jobs.split(","), names, peers, repeats, min_time, int(args.threads),
                  coldstart=cold, log=lambda m: print(m, flush=True))
    res["wall_s"] = time.time() - t0
    res["cpus"] = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    res["started_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0))
    return res


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
