"""The measuring part of ``python -m benchmarks``: machine facts, checks, warm-up, timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
import tracemalloc

import numpy as np

from rlhf_ref import backends, lstm, reinforce, rollout as ref_rollout
from rlhf_ref.tokenizer import EOS

PAUSE = 0.3          # seconds between implementations: lets an OpenBLAS pool stop spinning


# ----------------------------------------------------------------------------- machine facts

def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
            "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")}}
    for mod in ("scipy", "numba", "torch", "Cython"):
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


def gemm_peak(n, repeats, min_time):
    """Median float32 GFLOP/s of an n×n matmul with numpy's BLAS (the peak the report compares to)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.T.copy()
    a @ b
    rates = [2 * n ** 3 / _block(lambda: a @ b, min_time) / 1e9 for _ in range(repeats)]
    return {"n": n, "gflops_median": statistics.median(rates), "gflops_min": min(rates), "gflops_max": max(rates)}


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


def time_round_robin(impls, repeats, min_time):
    """impls: name -> fn. Returns name -> list of seconds per call, one per round."""
    out = {k: [] for k in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            time.sleep(PAUSE)
            out[name].append(_block(fn, min_time))
    return out


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
    so it can be tabulated once per call (V rows; the compiled kernels do) and is not counted."""
    return 2 * (4 * H * H + H * V)



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


def run_case(B, H, V, T, jobs, names, use_torch, args, log):
    p64, prompt, pl, u, reward = make_case(B, H, V, T)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    res = {"B": B, "H": H, "V": V, "T": T, "E": H}
    flops_tok = necessary_flops_per_token(H, V)
    ref = ref_rollout.rollout(p64, prompt, pl, u, eos_id=EOS)
    tokens, mask = ref["tokens"], ref["mask"]
    ref_logp = np.where(ref["action_mask"] > 0, ref["logp"] + 0.01 * np.sin(np.arange(T))[None, :], 0.0)
    be = {n: backends.get(n) for n in names}
    tm = None
    if use_torch:
        import torch
        from . import torch_impl
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
        tm = torch_impl.Policy(p32)
        tu = torch.from_numpy(u.astype(np.float32))
        ttok = torch.from_numpy(tokens)
        tref = torch.from_numpy(ref_logp.astype(np.float32))
        trew = torch.from_numpy(reward.astype(np.float32))

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
        log(f"  rollout B={B}: timing {list(impls)}")
        times = time_round_robin(impls, args.repeats, args.min_time)
        res["rollout"] = summarise(times, checks, B * (T - 1), flops_tok)

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
        log(f"  train B={B}: timing {list(impls)}")
        times = time_round_robin(impls, args.repeats, args.min_time)
        res["train"] = summarise(times, checks, B * T, 3 * flops_tok)
        itemsize = 4
        keep = B * T * (4 * H + H) * itemsize        # gates and cell states for every step
        logits = B * T * V * itemsize
        res["train"]["memory"] = {n: {"peak_bytes": int(m), "must_keep_bytes": keep, "logits_bytes": logits,
                                      "ratio_to_must_keep_plus_logits": m / (keep + logits)} for n, m in mem.items()}
    return res


def summarise(times, checks, tokens_per_call, flops_per_token):
    rows = {}
    torch_names = [n for n in times if n.startswith("torch")]
    best_torch = min(torch_names, key=lambda n: statistics.median(times[n])) if torch_names else None
    for n, ts in times.items():
        med = statistics.median(ts)
        r = {"seconds_median": med, "seconds_min": min(ts), "seconds_max": max(ts),
             "tokens_per_s": tokens_per_call / med, "tokens_per_s_min": tokens_per_call / max(ts),
             "tokens_per_s_max": tokens_per_call / min(ts), "gflops": tokens_per_call / med * flops_per_token / 1e9,
             "check": checks.get(n)}
        if best_torch:
            r["ratio_to_best_torch"] = statistics.median([a / b for a, b in zip(times[best_torch], ts)])
        if "numpy" in times:
            r["ratio_to_numpy"] = statistics.median([a / b for a, b in zip(times["numpy"], ts)])
        rows[n] = r
    return {"impls": rows, "best_torch": best_torch}


def run_all(args):
    def log(msg):
        print(msg, flush=True)

    avail = backends.available()
    names = [n for n, st in avail.items() if _is_avail(st)]
    if args.backends:
        want = args.backends.split(",")
        for n in want:
            backends.get(n)            # raises with the reason when unavailable
        names = want
    names = [n for n in names if n != "cuda"] + (["cuda"] if "cuda" in names else [])
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch  # noqa: F401
        except Exception as e:
            log(f"PyTorch not importable ({e}); run with --no-torch to benchmark without it")
            raise
    from .run import CASES, SMOKE_CASES
    cases = SMOKE_CASES if args.smoke else (tuple(tuple(int(x) for x in c.split(",")) for c in args.cases.split(";"))
                                            if args.cases else None)
    cases = cases or CASES
    if args.smoke:
        args.repeats, args.min_time = 1, 0.01
    T = 8 if args.smoke else args.T
    jobs = args.jobs.split(",")
    res = {"machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "platform": platform.platform()},
           "libraries": library_info(), "backends": {n: _reason(st) for n, st in avail.items()},
           "timed": names + (["torch_cell", "torch_lstm"] if use_torch else []),
           "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
           "repeats": args.repeats, "min_time": args.min_time, "dtype": "float32", "cases": []}
    log(f"benchmarks: backends {names}, torch {use_torch}, threads {res['threads']}, "
        f"OPENBLAS_CORETYPE={res['libraries']['OPENBLAS_CORETYPE']}")
    res["gemm_peak"] = gemm_peak(256 if args.smoke else 2048, args.repeats, args.min_time)
    log(f"  float32 GEMM peak: {res['gemm_peak']['gflops_median']:.0f} GFLOP/s")
    for (B, H, V) in cases:
        res["cases"].append(run_case(B, H, V, T, jobs, names, use_torch, args, log))
    ok = True
    for c in res["cases"]:
        for job in ("rollout", "train"):
            for n, r in c.get(job, {}).get("impls", {}).items():
                if r["check"] and not r["check"]["ok"]:
                    log(f"CHECK FAILED: {job} {n} B={c['B']} H={c['H']} V={c['V']}: {r['check']}")
                    ok = False
    res["ok"] = ok
    return res


def _is_avail(st):
    return st[0] if isinstance(st, tuple) else bool(getattr(st, "available", st))


def _reason(st):
    if isinstance(st, tuple):
        return "available" if st[0] else st[1]
    return "available" if _is_avail(st) else getattr(st, "reason", str(st))
