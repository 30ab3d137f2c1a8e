"""The measuring part of ``python -m benchmarks``: machine facts, checks, warm-up, timing.

This module owns the cases (``CASES``) and takes every setting as an explicit argument;
``run.py`` parses the command line and calls ``run_all``; ``report.py`` writes the Markdown.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from rlhf_ref import backends, lstm, model, reinforce, rollout as ref_rollout
from rlhf_ref._validate import as_float_array
from rlhf_ref.tokenizer import EOS

CASES = ((1, 128, 64), (16, 128, 64), (64, 256, 128), (256, 512, 256))     # (B, H, V), E = H
SMOKE_CASES = ((1, 8, 7), (3, 8, 7))
T_DEFAULT = 64
PEERS = ("torch", "jax")       # libraries a user could pick instead of rlhf_ref's backends
PAUSE = 0.3                    # seconds between implementations: lets an OpenBLAS pool stop spinning
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- machine facts

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


def library_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                           "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "XLA_FLAGS")}}
    for mod in ("scipy", "numba", "torch", "Cython", "jax", "jaxlib"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:       # optional parts: keep the reason
            info[mod] = f"absent ({type(e).__name__})"
    try:
        import rlhf_ref
        info["rlhf_ref"] = rlhf_ref.__version__
    except Exception:
        pass
    try:
        import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS so threadpoolctl sees it)
    except Exception:
        pass
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
                        for d in threadpool_info()]
    except Exception as e:
        info["blas"] = f"threadpoolctl unavailable ({type(e).__name__})"
    return info


_LIMITS = []       # keeps the threadpoolctl limiter alive for the whole run


def limit_threads(n, use_torch):
    """Every library in this process to n threads (the environment set by run.py does the rest:
    OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS and, for n = 1, XLA_FLAGS before anything loads)."""
    done = {}
    try:
        from threadpoolctl import threadpool_limits
        _LIMITS.append(threadpool_limits(limits=n))
        done["threadpoolctl"] = n
    except Exception as e:
        done["threadpoolctl"] = f"not applied ({type(e).__name__})"
    try:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        done["numba"] = numba.get_num_threads()
    except Exception as e:
        done["numba"] = f"not applied ({type(e).__name__})"
    if use_torch:
        import torch
        torch.set_num_threads(n)
        done["torch"] = torch.get_num_threads()
    return done


def gemm_peak(n, repeats, min_time):
    """Median float32 GFLOP/s of an n×n matmul with numpy's BLAS (the peak the report compares to)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    rates = [2 * n ** 3 / _block(lambda: a @ b, min_time) / 1e9 for _ in range(repeats)]
    return {"n": n, "gflops_median": statistics.median(rates), "gflops_min": min(rates), "gflops_max": max(rates)}


def cache_read_bandwidth(kib_small, kib_large, repeats, min_time):
    """Read bandwidth (GB/s) of data resident in cache: float32 dot products (x·y, each x, y half
    of the footprint) at two footprints; the slope between them removes numpy's fixed cost per call."""
    def per_call(kib):
        n = kib * 1024 // 8
        x = np.ones(n, np.float32)
        y = np.ones(n, np.float32)
        np.dot(x, y)
        return statistics.median(_block(lambda: np.dot(x, y), min_time) for _ in range(repeats))
    ts, tl = per_call(kib_small), per_call(kib_large)
    return {"kib": (kib_small, kib_large), "seconds": (ts, tl),
            "gb_per_s": (kib_large - kib_small) * 1024 / max(tl - ts, 1e-12) / 1e9}


# ----------------------------------------------------------------------------- timing

def _block(fn, min_time):
    """Seconds per call, over a block of calls lasting at least min_time."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= min_time:
            return el / n


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu_seconds():
    """{thread id: user + system CPU seconds} of every thread of this process (/proc/self/task)."""
    out = {}
    for path in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:            # the thread ended meanwhile
            continue
        out[int(path.split("/")[-2])] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _thread_use(before, after, wall):
    d = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    d = [x for x in d if x > 0]
    total = sum(d)
    return {"cpu_per_wall": total / wall, "busiest_per_wall": (d[0] / wall) if d else 0.0,
            "others_per_wall": (total - (d[0] if d else 0.0)) / wall,
            "threads_over_5pct": sum(1 for x in d if x > 0.05 * wall), "wall_s": wall}


def time_round_robin(impls, repeats, min_time):
    """impls: name -> fn. Returns (name -> list of seconds per call, one per round;
    name -> CPU time per thread over its timed blocks, from /proc/self/task/*/stat)."""
    out = {k: [] for k in impls}
    cpu0 = {k: {} for k in impls}
    cpu1 = {k: {} for k in impls}
    wall = {k: 0.0 for k in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            time.sleep(PAUSE)
            b = thread_cpu_seconds()
            t0 = time.perf_counter()
            out[name].append(_block(fn, min_time))
            wall[name] += time.perf_counter() - t0
            a = thread_cpu_seconds()
            for t, v in a.items():           # accumulate per-thread deltas over the rounds
                cpu1[name][t] = cpu1[name].get(t, 0.0) + v - b.get(t, 0.0)
    use = {k: _thread_use(cpu0[k], cpu1[k], wall[k]) for k in impls}
    return out, use


def peak_memory(fn, clear=None):
    """Peak bytes allocated through Python/NumPy allocators during one call (tracemalloc).

    ``clear`` frees work buffers a backend keeps between calls (the Cython backend's workspace),
    so that they are allocated, and counted, inside the measured call."""
    if clear is not None:
        clear()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    res = fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del res
    return peak


# ----------------------------------------------------------------------------- checks

def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_rollout(out, ref, dtype):
    """Rows identical to the float64 reference up to a CDF-boundary tie; log-probs close where equal."""
    same_rows = np.all(out["tokens"] == ref["tokens"], axis=1)
    frac = float(same_rows.mean())
    err = _rel(out["logp"][same_rows], ref["logp"][same_rows]) if same_rows.any() else float("inf")
    tol = 1e-4 if dtype == np.float32 else 1e-10
    return {"rows_identical": frac, "logp_rel_err": err, "ok": bool(frac >= 0.9 and err <= tol)}


def check_train(loss, grads, ref_out, ref_grads, dtype):
    missing = sorted(set(ref_grads) - set(grads))
    if missing:
        return {"ok": False, "missing_grads": missing}
    errs = {k: _rel(grads[k], ref_grads[k]) for k in ref_grads}
    worst = max(errs, key=errs.get)
    tol = 2e-3 if dtype == np.float32 else 1e-9
    lerr = abs(float(loss) - ref_out["loss"]) / max(abs(ref_out["loss"]), 1e-30)
    return {"loss_rel_err": lerr, "worst_grad": worst, "worst_grad_rel_err": errs[worst],
            "ok": bool(errs[worst] <= tol and lerr <= tol)}


# ----------------------------------------------------------------------------- one case

def necessary_flops_per_token(H, V):
    """Forward GEMM FLOPs per token that no implementation can avoid: the recurrent product
    h W_hhᵀ (2·4H·H) and the head (2·H·V). The input projection x W_ihᵀ depends on the token alone,
    so it can be tabulated once per call (V rows; the compiled kernels and the JAX peer do) and is
    not counted."""
    return 2 * (4 * H * H + H * V)


def weight_bytes_per_token(H, V, itemsize=4):
    """Bytes of weights a B = 1 rollout step must read: W_hh (4H × H) and the head (V × H)
    (the input-table row, 4H floats, and the biases are negligible)."""
    return itemsize * (4 * H * H + V * H)


def make_case(B, H, V, T, seed=0):
    rng = np.random.default_rng(seed)
    p64 = lstm.init_params(V, H, H, rng, heads=("head", "value"))
    p64["head.bias"][EOS] = -30.0          # fixed work: no row ends early
    prompt = np.zeros((B, T), np.int64)
    prompt[:, 0] = 1
    pl = np.ones(B, np.int64)
    u = rng.random((B, T))
    reward = rng.standard_normal(B)
    return p64, prompt, pl, u, reward


def _validate_train(p, tokens, mask, pl, reward, ref_logp):
    """The argument checks a compiled backend's training step runs before its kernel."""
    V, tokens, mask, pl = model.prepare(p, tokens, mask, pl, ("head", "value"))
    as_float_array(reward, "reward", ndim=1, shape=(tokens.shape[0],))
    as_float_array(ref_logp, "ref_logp", shape=tokens.shape)
    return model.action_mask(mask, pl)


def run_case(B, H, V, T, jobs, names, peers, repeats, min_time, log):
    p64, prompt, pl, u, reward = make_case(B, H, V, T)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    res = {"B": B, "H": H, "V": V, "T": T, "E": H, "compile": {}, "validation": {}}
    flops_tok = necessary_flops_per_token(H, V)
    ref = ref_rollout.rollout(p64, prompt, pl, u, eos_id=EOS)
    tokens, mask = ref["tokens"], ref["mask"]
    ref_logp = np.where(ref["action_mask"] > 0, ref["logp"] + 0.01 * np.sin(np.arange(T))[None, :], 0.0)
    be = {n: backends.get(n) for n in names}
    tm = J = None
    if "torch" in peers:
        import torch
        from . import torch_impl
        tm = torch_impl.Policy(p32)
        tu = torch.from_numpy(u.astype(np.float32))
        ttok = torch.from_numpy(tokens)
        tref = torch.from_numpy(ref_logp.astype(np.float32))
        trew = torch.from_numpy(reward.astype(np.float32))
    if "jax" in peers:
        import jax
        from . import jax_impl as J
        jp = J.to_device(p32)
        ju = jax.device_put(u.astype(np.float32))
        jtok = jax.device_put(tokens.astype(np.int32))
        jref = jax.device_put(ref_logp.astype(np.float32))
        jrew = jax.device_put(reward.astype(np.float32))

    if "rollout" in jobs:
        log(f"  rollout B={B} H={H} V={V}: checking")
        impls, checks = {}, {}
        for n, b in be.items():
            if "rollout" not in getattr(b, "IMPLEMENTED", backends.INTERFACE):
                continue
            f = (lambda b=b: b.rollout(p32, prompt, pl, u, eos_id=EOS))
            checks[n] = check_rollout(f(), ref, np.float32)
            impls[n] = f
        if tm is not None:
            for n, fn in (("torch_cell", torch_impl.rollout_cell), ("torch_lstm", torch_impl.rollout_lstm)):
                f = (lambda fn=fn: fn(tm, tu))
                tk, lp = f()
                out = {"tokens": tk.numpy(), "logp": np.concatenate([np.zeros((B, 1)), lp.numpy()], 1)}
                checks[n] = check_rollout(out, ref, np.float32)
                impls[n] = f
        if J is not None:
            for n, un in J.VARIANTS.items():
                first, second = J.compile_seconds(J.rollout, jp, ju, unroll=un)
                res["compile"].setdefault(n, {})["rollout"] = {"first_call_s": first, "second_call_s": second}
                tk, lp = J.rollout(jp, ju, unroll=un)
                out = {"tokens": np.asarray(tk), "logp": np.concatenate([np.zeros((B, 1)), np.asarray(lp)], 1)}
                checks[n] = check_rollout(out, ref, np.float32)
                impls[n] = (lambda un=un: jax.block_until_ready(J.rollout(jp, ju, unroll=un)))
        res["validation"]["rollout"] = statistics.median(
            _block(lambda: ref_rollout.check_rollout_args(p32, prompt, pl, u, 1.0, 0.0, "boltzmann", EOS), min_time)
            for _ in range(3))
        log(f"  rollout B={B}: timing {list(impls)}")
        times, use = time_round_robin(impls, repeats, min_time)
        res["rollout"] = summarise(times, use, checks, B * (T - 1), flops_tok)

    if "train" in jobs:
        log(f"  train B={B} H={H} V={V}: checking")
        ref_out, ref_grads = reinforce.loss_and_grad(p64, tokens, mask, pl, reward, ref_logp=ref_logp)
        impls, checks, mem = {}, {}, {}
        for n, b in be.items():
            if "reinforce_loss_and_grad" not in getattr(b, "IMPLEMENTED", backends.INTERFACE):
                continue        # e.g. cuda: rollouts only (said in backends.py)
            f = (lambda b=b: b.reinforce_loss_and_grad(p32, tokens, mask, pl, reward, ref_logp=ref_logp))
            o, g = f()
            checks[n] = check_train(o["loss"], g, ref_out, ref_grads, np.float32)
            impls[n] = f
            mem[n] = peak_memory(f, getattr(b, "clear_workspace", None))
        if tm is not None:
            for n, cell in (("torch_cell", True), ("torch_lstm", False)):
                f = (lambda cell=cell: torch_impl.reinforce_step(tm, ttok, tref, trew, use_cell=cell))
                loss = f()
                g = {k: v.grad.numpy() for k, v in tm.named_parameters() if not k.startswith("cell.") and v.grad is not None}
                if cell:   # the LSTMCell path puts the body's gradient on the cell's parameters
                    cg = dict(tm.cell.named_parameters())
                    g.update({f"lstm.{k}_l0": cg[k].grad.numpy() for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
                checks[n] = check_train(loss.item(), g, ref_out, ref_grads, np.float32)
                impls[n] = f
        if J is not None:
            for n, un in J.VARIANTS.items():
                first, second = J.compile_seconds(J.train_step, jp, jtok, jref, jrew, unroll=un)
                res["compile"].setdefault(n, {})["train"] = {"first_call_s": first, "second_call_s": second}
                loss, g = J.train_step(jp, jtok, jref, jrew, unroll=un)
                checks[n] = check_train(float(loss), {k: np.asarray(v) for k, v in g.items()}, ref_out, ref_grads,
                                        np.float32)
                impls[n] = (lambda un=un: jax.block_until_ready(J.train_step(jp, jtok, jref, jrew, unroll=un)))
        res["validation"]["train"] = statistics.median(
            _block(lambda: _validate_train(p32, tokens, mask, pl, reward, ref_logp), min_time) for _ in range(3))
        log(f"  train B={B}: timing {list(impls)}")
        times, use = time_round_robin(impls, repeats, min_time)
        res["train"] = summarise(times, use, checks, B * T, 3 * flops_tok)
        itemsize = 4
        keep = B * T * (4 * H + H) * itemsize        # gates and cell states for every step
        logits = B * T * V * itemsize
        res["train"]["memory"] = {n: {"peak_bytes": int(m), "must_keep_bytes": keep, "logits_bytes": logits,
                                      "ratio_to_must_keep_plus_logits": m / (keep + logits)} for n, m in mem.items()}
    return res


def _best(times, prefix):
    names = [n for n in times if n.startswith(prefix)]
    return min(names, key=lambda n: statistics.median(times[n])) if names else None


def summarise(times, use, checks, tokens_per_call, flops_per_token):
    rows = {}
    best = {"torch": _best(times, "torch"), "jax": _best(times, "jax")}
    for n, ts in times.items():
        med = statistics.median(ts)
        r = {"seconds_median": med, "seconds_min": min(ts), "seconds_max": max(ts),
             "tokens_per_s": tokens_per_call / med, "tokens_per_s_min": tokens_per_call / max(ts),
             "tokens_per_s_max": tokens_per_call / min(ts), "gflops": tokens_per_call / med * flops_per_token / 1e9,
             "check": checks.get(n), "threads": use.get(n)}
        for peer, bn in best.items():
            if bn:
                r[f"ratio_to_best_{peer}"] = statistics.median([a / b for a, b in zip(times[bn], ts)])
        if "numpy" in times:
            r["ratio_to_numpy"] = statistics.median([a / b for a, b in zip(times["numpy"], ts)])
        rows[n] = r
    return {"impls": rows, "best_torch": best["torch"], "best_jax": best["jax"]}


# ----------------------------------------------------------------------------- cold start

def cold_start(impls, jobs, case, T, log, timeout=300):
    """What a new user waits: a fresh Python process per (implementation, job) that imports it and
    makes the first call and a second call (benchmarks/coldstart.py). Numba runs three times: with
    one fresh NUMBA_CACHE_DIR 'cold' (empty cache: compiles) and then 'warm' (loads the cache), and
    'after warmup' with another fresh NUMBA_CACHE_DIR that ``python -m rlhf_ref warmup`` (every job,
    float32 and float64) filled first: the row a user who ran the warm-up sees. The warm-up's own
    duration (paid once per machine and Numba version) is the row with state 'warmup run' (its
    ``warmup_s``: the whole process, Python's start included)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-warmup-") as warmed:
        if "numba" in impls:
            env = dict(os.environ, NUMBA_CACHE_DIR=warmed, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "rlhf_ref", "warmup"], env=env, cwd=ROOT, capture_output=True,
                               text=True, timeout=max(timeout, 900))
            row = {"impl": "numba", "job": "all", "state": "warmup run", "warmup_s": time.perf_counter() - t0}
            if p.returncode:
                row["error"] = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:]
            log(f"  cold start numba: rlhf-ref warmup: {row}")
            out.append(row)
        for impl in impls:
            for job in jobs:
                with tempfile.TemporaryDirectory(prefix="rlhf-bench-numba-") as cache:
                    for state in (("cold", "warm", "after warmup") if impl == "numba" else ("fresh",)):
                        env = dict(os.environ, NUMBA_CACHE_DIR=warmed if state == "after warmup" else cache,
                                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
                        cmd = [sys.executable, "-m", "benchmarks.coldstart", impl, job, ",".join(map(str, case)), str(T)]
                        t0 = time.perf_counter()
                        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
                        wall = time.perf_counter() - t0
                        if p.returncode:
                            row = {"impl": impl, "job": job, "state": state, "error": p.stderr.strip().splitlines()[-1:]}
                        else:
                            row = dict(json.loads(p.stdout.strip().splitlines()[-1]), impl=impl, job=job, state=state,
                                       process_wall_s=wall)
                        log(f"  cold start {impl} {job} ({state}): {row}")
                        out.append(row)
    return out


# ----------------------------------------------------------------------------- the run

def run_all(cases, T, jobs, names, peers, repeats, min_time, threads, coldstart=True, log=print):
    """Every case and job for the backends ``names`` and the ``peers`` (subset of PEERS).
    Returns the results as a JSON-ready dict; ``res['ok']`` is False when any check failed."""
    avail = backends.available()
    for n in names:
        backends.get(n)            # raises with the reason when unavailable
    thread_limits = limit_threads(threads, "torch" in peers)
    res = {"machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_start": load_average()},
           "libraries": library_info(), "backends": {n: str(st) for n, st in avail.items()},
           "timed": list(names) + [p for p in peers], "threads": threads, "thread_limits": thread_limits,
           "repeats": repeats, "min_time": min_time, "dtype": "float32", "cases": []}
    log(f"benchmarks: backends {names}, peers {list(peers)}, threads {threads} ({thread_limits}), "
        f"OPENBLAS_CORETYPE={res['libraries']['OPENBLAS_CORETYPE']}")
    small = any(H < 64 for _, H, _ in cases)

    def ceilings(when):
        res.setdefault("gemm_peaks", {})[when] = g = gemm_peak(256 if small else 2048, repeats, min_time)
        res.setdefault("cache_bws", {})[when] = c = cache_read_bandwidth(128, 512, repeats, min_time)
        log(f"  {when}: float32 GEMM peak {g['gflops_median']:.0f} GFLOP/s, "
            f"cache read bandwidth (128–512 KiB) {c['gb_per_s']:.0f} GB/s")

    ceilings("start")
    for (B, H, V) in cases:
        res["cases"].append(run_case(B, H, V, T, jobs, names, peers, repeats, min_time, log))
    ceilings("end")
    # a shared machine: the ceilings are measured before and after the cases, and the higher is
    # the one the percentages use (what this machine can do; a loaded minute only lowers it)
    res["gemm_peak"] = max(res["gemm_peaks"].values(), key=lambda g: g["gflops_median"])
    res["cache_bw"] = max(res["cache_bws"].values(), key=lambda c: c["gb_per_s"])
    if coldstart:
        res["cold_start"] = cold_start([n for n in names if n != "cuda"] + list(peers), jobs, cases[0], T, log)
    res["machine"]["loadavg_end"] = load_average()
    ok = True
    for c in res["cases"]:
        for job in ("rollout", "train"):
            for n, r in c.get(job, {}).get("impls", {}).items():
                if r["check"] and not r["check"]["ok"]:
                    log(f"CHECK FAILED: {job} {n} B={c['B']} H={c['H']} V={c['V']}: {r['check']}")
                    ok = False
    res["ok"] = ok
    return res
