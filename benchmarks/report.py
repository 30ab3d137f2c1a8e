"""Write benchmarks/RESULTS.md from one or more harness runs (one per thread count / OpenBLAS mode).

Every number in the file comes from the runs' JSON; the reading of the targets (met or not, and
the measured bound where not) is computed here from the same numbers."""

from __future__ import annotations

import datetime
import os

from .harness import necessary_flops_per_token, weight_bytes_per_token

# (job, B or None for every case, measure, threshold): issue 12, 1 thread, same run, float32, T=64
TARGETS = (
    ("rollout", 1, "ratio_to_best_jax", 2.0),
    ("rollout", 16, "ratio_to_best_jax", 1.5),
    ("rollout", 64, "ratio_to_best_jax", 1.5),
    ("rollout", 256, "ratio_to_best_jax", 1.5),
    ("train", None, "ratio_to_best_jax", 1.5),
    ("rollout", 256, "peak_fraction", 0.80),
    ("rollout", 1, "ratio_to_numpy", 20.0),
    ("train", 1, "ratio_to_numpy", 20.0),
)
TORCH_TARGETS = (  # issue 4, kept for comparison with earlier runs
    ("rollout", 1, "ratio_to_best_torch", 8.0),
    ("rollout", 16, "ratio_to_best_torch", 2.5),
    ("rollout", 256, "ratio_to_best_torch", 1.2),
    ("train", 1, "ratio_to_best_torch", 1.5),
    ("train", 256, "ratio_to_best_torch", 1.0),
)
COLD_START_TARGET_S = 2.0


def _k(x):
    return f"{x / 1e3:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


def _f(x, fmt=".2f"):
    return "–" if x is None else format(x, fmt)


def _backend_rows(case, job):
    return {n: r for n, r in case.get(job, {}).get("impls", {}).items() if not n.startswith(("torch", "jax"))}


def fastest(case, job, exclude_numpy=True):
    rows = {n: r for n, r in _backend_rows(case, job).items() if not (exclude_numpy and n == "numpy")}
    if not rows:
        return None, None
    n = max(rows, key=lambda k: rows[k]["tokens_per_s"])
    return n, rows[n]


def _gflops(case, job, r):
    return r["tokens_per_s"] * necessary_flops_per_token(case["H"], case["V"]) * (3 if job == "train" else 1) / 1e9


def _check_text(job, chk):
    if not chk:
        return "–"
    if not chk.get("ok"):
        return f"**FAILED** {chk}"
    if job == "rollout":
        return f"ok (rows {chk['rows_identical']:.2f}, logp {chk['logp_rel_err']:.0e})"
    return f"ok (loss {chk['loss_rel_err']:.0e}, grad {chk['worst_grad_rel_err']:.0e})"


def _threads_text(t):
    if not t:
        return "–"
    return f"{t['cpu_per_wall']:.2f} ({t['threads_over_5pct']}; others {t['others_per_wall']:.2f})"


def roofline(run, case):
    """B = 1 rollout: an estimate of the fastest a call can be on this machine (the bandwidth is
    NumPy's dot's; a hand-written loop can read L2 somewhat faster). Per call it must tabulate the input
    projection P = E W_ihᵀ + b (V × E × 4H multiply-adds), at best at the GEMM peak (projecting each
    token instead reads W_ih, 4H × E, per token: slower at these sizes), and per token read the
    weights W_hh and the head from cache (they fit in L2), at best at the cache read bandwidth; both
    ceilings measured in the same run. The bound is the sum."""
    bw = run.get("cache_bw", {}).get("gb_per_s")
    peak = run.get("gemm_peak", {}).get("gflops_median")
    if not bw or not peak:
        return None
    H, V, E, T = case["H"], case["V"], case.get("E", case["H"]), case["T"]
    byts = weight_bytes_per_token(H, V)
    table_s = 2.0 * V * E * 4 * H / (peak * 1e9)
    steps_s = (T - 1) * byts / (bw * 1e9)
    return {"bytes": byts, "gb_per_s": bw, "tokens_per_s": bw * 1e9 / byts, "table_s": table_s,
            "call_tokens_per_s": (T - 1) / (table_s + steps_s)}


def _bound(run, case, job, what, name, r, thr=None):
    """The measured bound that explains a ratio (for the targets table)."""
    peak = run["gemm_peak"]["gflops_median"]
    sec = r["seconds_median"]
    val = case.get("validation", {}).get(job)
    parts = []
    if job == "rollout" and case["B"] == 1:
        rl = roofline(run, case)
        if rl:
            parts.append(f"roofline {_k(rl['call_tokens_per_s'])} tok/s ({rl['bytes'] / 1024:.0f} KiB of weights per token "
                         f"at {rl['gb_per_s']:.0f} GB/s, {_k(rl['tokens_per_s'])} tok/s alone, plus the input table at the "
                         f"GEMM peak, {rl['table_s'] * 1e6:.0f} µs a call): {name} at "
                         f"{100 * r['tokens_per_s'] / rl['call_tokens_per_s']:.0f} %")
            bj = case[job].get("best_jax")
            if bj and what == "ratio_to_best_jax" and thr:
                jax = case[job]["impls"][bj]["tokens_per_s"]
                parts.append(f"best JAX at {100 * jax / rl['call_tokens_per_s']:.0f} %, so {thr:g}× best JAX would be "
                             f"{100 * thr * jax / rl['call_tokens_per_s']:.0f} % of it")
    if val is not None and case["B"] <= 16:
        parts.append(f"argument checks {val * 1e6:.0f} µs = {100 * val / sec:.0f} % of the call")
    if case["B"] >= 64 or what == "peak_fraction":
        parts.append(f"{100 * _gflops(case, job, r) / peak:.0f} % of GEMM peak")
    bj = case[job].get("best_jax")
    if bj and what == "ratio_to_best_jax" and thr and case["B"] >= 16:
        jf = _gflops(case, job, case[job]["impls"][bj]) / peak
        parts.append(f"best JAX at {100 * jf:.0f} % of GEMM peak, so {thr:g}× best JAX is {100 * thr * jf:.0f} % of it")
    return "; ".join(parts)


def _target_rows(run, targets):
    rows = []
    for job, B, what, thr in targets:
        for case in run["cases"]:
            if job not in case or (B is not None and case["B"] != B):
                continue
            n, r = fastest(case, job)
            if r is None:
                continue
            peak = run["gemm_peak"]["gflops_median"]
            val = _gflops(case, job, r) / peak if what == "peak_fraction" else r.get(what)
            if val is None:
                continue
            rows.append((job, case, what, thr, n, r, val))
    return rows


def run_section(run):
    lib = run["libraries"]
    peak = run["gemm_peak"]["gflops_median"]
    m = run["machine"]
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    c0 = run["cases"][0] if run["cases"] else {"B": "?", "H": "?", "V": "?", "T": "?"}
    lines = [f"### Run: threads={run['threads']}, OPENBLAS_CORETYPE={lib['OPENBLAS_CORETYPE']}",
             "", f"Command: `{run.get('command', '?')}` — started {run.get('started_utc', '?')} UTC, "
             f"{run.get('wall_s', 0) / 60:.1f} min", "",
             f"- CPU: {m['cpu']} ({m['nproc']} cores visible), {m['platform']}; this run pinned to CPUs "
             f"{run.get('cpus')}",
             f"- Load average (1, 5, 15 min) at start {_la(la0)}, at end {_la(la1)} "
             f"(the machine is shared: a load above the core count means other work competed for the cores)",
             f"- Python {lib['python']}, NumPy {lib['numpy']}, SciPy {lib.get('scipy')}, Numba {lib.get('numba')}, "
             f"Cython {lib.get('Cython')}, PyTorch {lib.get('torch')}, JAX {lib.get('jax')} (jaxlib {lib.get('jaxlib')}), "
             f"rlhf_ref {lib.get('rlhf_ref')}",
             f"- Thread settings: environment {lib['threads_env']}; set in the process: {run.get('thread_limits')}",
             "- BLAS (threadpoolctl): " + (", ".join(f"{b['internal_api']} {b['version']} kernel **{b['architecture']}** "
                                                      f"({b['num_threads']} threads, {os.path.basename(str(b['filepath']))})"
                                                      for b in lib["blas"]) if isinstance(lib["blas"], list) else str(lib["blas"])),
             "- Backends: " + ", ".join(f"{n}: {r}" for n, r in run["backends"].items()),
             f"- float32 GEMM peak (numpy, {run['gemm_peak']['n']}²): **{peak:.0f} GFLOP/s** "
             f"(min {run['gemm_peak']['gflops_min']:.0f}, max {run['gemm_peak']['gflops_max']:.0f}; the higher of the "
             f"medians measured before and after the cases: " + ", ".join(f"{k} {v['gflops_median']:.0f}" for k, v in run.get("gemm_peaks", {}).items()) + ")"]
    if run.get("cache_bw"):
        cb = run["cache_bw"]
        lines.append(f"- Cache read bandwidth: **{cb['gb_per_s']:.0f} GB/s** (float32 dot products at {cb['kib'][0]} and "
                     f"{cb['kib'][1]} KiB, both in L2; the slope between them, so numpy's per-call cost drops out; the higher of "
                     f"before and after the cases: " + ", ".join(f"{k} {v['gb_per_s']:.0f}" for k, v in run.get("cache_bws", {}).items()) + ")")
    lines += [f"- Medians of {run['repeats']} round-robin rounds, each a block of ≥ {run['min_time']} s; dtype {run['dtype']}, "
              f"T = {run['cases'][0]['T'] if run['cases'] else '?'}",
              "- CPU/wall: CPU seconds of all the process's threads (/proc/self/task/*/stat) over the implementation's "
              "timed blocks ÷ their wall time; in brackets the number of threads that used more than 5 % of the wall time, "
              "and the share of all threads but the busiest. Above 1.0 means more than one core was used. Below 1.0 on "
              "a loaded machine means the process waited for a core.",
              ""]
    for job, title in (("rollout", "Rollout (sampling T−1 tokens per row)"), ("train", "REINFORCE training step (forward + backward)")):
        lines += [f"#### {title}", "",
                  "| B, H, V | impl | tokens/s median (min–max) | × best JAX | × best torch | × numpy | GFLOP/s | % of peak | CPU/wall | check (rel. err. vs float64 reference) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in run["cases"]:
            if job not in c:
                continue
            for n, r in sorted(c[job]["impls"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
                tag = (" (best torch)" if n == c[job].get("best_torch") else
                       " (best JAX)" if n == c[job].get("best_jax") and sum(k.startswith("jax") for k in c[job]["impls"]) > 1 else "")
                lines.append(f"| {c['B']}, {c['H']}, {c['V']} | {n}{tag} | "
                             f"{_k(r['tokens_per_s'])} ({_k(r['tokens_per_s_min'])}–{_k(r['tokens_per_s_max'])}) | "
                             f"{_f(r.get('ratio_to_best_jax'))} | {_f(r.get('ratio_to_best_torch'))} | {_f(r.get('ratio_to_numpy'))} | "
                             f"{_gflops(c, job, r):.1f} | {100 * _gflops(c, job, r) / peak:.0f}% | "
                             f"{_threads_text(r.get('threads'))} | {_check_text(job, r.get('check'))} |")
        lines.append("")
    comp = [(c, n, j, v) for c in run["cases"] for n, d in c.get("compile", {}).items() for j, v in d.items()]
    if comp:
        lines += ["#### JAX compile time (in this process: the first call traces and compiles one shape and runs it once; "
                  "not in the timings above)", "",
                  "| B, H, V | variant | job | first call | second call |", "|---|---|---|---|---|"]
        for c, n, j, v in comp:
            lines.append(f"| {c['B']}, {c['H']}, {c['V']} | {n} | {j} | {v['first_call_s']:.2f} s | {1e3 * v['second_call_s']:.2f} ms |")
        lines.append("")
    if run.get("cold_start"):
        lines += [f"#### Cold start: what a new user waits (fresh process per row, B, H, V = {c0['B']}, {c0['H']}, {c0['V']}, T = {c0['T']})", "",
                  "Numba rows: `cold` is an empty NUMBA_CACHE_DIR (a fresh machine: every kernel compiles), `warm` the "
                  "same directory again (the cache loads), `after warmup` another empty NUMBA_CACHE_DIR that "
                  "`rlhf-ref warmup` (every job, float32 and float64) filled first: what a user who followed the README "
                  "waits. setup = Python's imports of numpy and rlhf_ref; import = the "
                  "implementation's own import; the wait is import + first call.", ""]
        for r in run["cold_start"]:
            if r["state"] == "warmup run":
                lines += ["`rlhf-ref warmup` itself (paid once per machine, Numba version and kernel source; a fresh "
                          "process, empty cache): "
                          + (f"**error** {r['error']}" if "error" in r else f"{r['warmup_s']:.1f} s"), ""]
        lines += ["| impl | job | state | import | first call | wait (import + first) | second call | process wall | ≤ 2 s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in run["cold_start"]:
            if r["state"] == "warmup run":
                continue
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['job']} | {r['state']} | **error** {r['error']} | | | | | |")
                continue
            wait = r["import_s"] + r["first_call_s"]
            lines.append(f"| {r['impl']} | {r['job']} | {r['state']} | {r['import_s']:.2f} s | {r['first_call_s']:.2f} s | "
                         f"{wait:.2f} s | {1e3 * r['second_call_s']:.1f} ms | {r['process_wall_s']:.1f} s | "
                         f"{'yes' if wait <= COLD_START_TARGET_S else '**no**'} |")
        lines.append("")
    mem_rows = [(c, n, m) for c in run["cases"] if "train" in c for n, m in c["train"].get("memory", {}).items()]
    if mem_rows:
        lines += ["#### Peak memory of one training step (tracemalloc: allocations through Python/NumPy)", "",
                  "| B, H, V | backend | peak | gates + cells kept (B·T·5H·4 B) | logits (B·T·V·4 B) | peak / (kept + logits) |",
                  "|---|---|---|---|---|---|"]
        for c, n, m in mem_rows:
            lines.append(f"| {c['B']}, {c['H']}, {c['V']} | {n} | {m['peak_bytes'] / 2**20:.1f} MiB | "
                         f"{m['must_keep_bytes'] / 2**20:.1f} MiB | {m['logits_bytes'] / 2**20:.1f} MiB | "
                         f"{m['ratio_to_must_keep_plus_logits']:.2f} |")
        lines.append("")
    lines += ["#### Targets (issue 12), fastest rlhf_ref backend in this run, and the measured bound", "",
              "| job | B, H, V | measure | target | fastest backend | measured | met | bound (measured in this run) |",
              "|---|---|---|---|---|---|---|---|"]
    for job, c, what, thr, n, r, val in _target_rows(run, TARGETS):
        lines.append(f"| {job} | {c['B']}, {c['H']}, {c['V']} | {what.replace('_', ' ')} | ≥ {thr:g} | {n} | {val:.2f} | "
                     f"{'yes' if val >= thr else '**no**'} | {_bound(run, c, job, what, n, r, thr)} |")
    for c in run["cases"]:                       # Numba ≥ 1× JAX everywhere
        for job in ("rollout", "train"):
            r = c.get(job, {}).get("impls", {}).get("numba")
            if r and r.get("ratio_to_best_jax") is not None:
                v = r["ratio_to_best_jax"]
                lines.append(f"| {job} | {c['B']}, {c['H']}, {c['V']} | numba ratio to best jax | ≥ 1 | numba | {v:.2f} | "
                             f"{'yes' if v >= 1 else '**no**'} | {_bound(run, c, job, 'ratio_to_best_jax', 'numba', r, 1.0)} |")
    for r in run.get("cold_start", []):
        if "error" in r or r["impl"] in ("torch", "jax") or r["state"] in ("warm", "warmup run"):
            continue
        wait = r["import_s"] + r["first_call_s"]
        lines.append(f"| {r['job']} | {c0['B']}, {c0['H']}, {c0['V']} | cold start ({r['state']}), import + first call | "
                     f"≤ {COLD_START_TARGET_S:g} s | {r['impl']} | {wait:.2f} s | {'yes' if wait <= COLD_START_TARGET_S else '**no**'} | |")
    lines += ["", "Issue 4 targets (PyTorch CPU), same run:", "",
              "| job | B | measure | target | fastest backend | measured | met |", "|---|---|---|---|---|---|---|"]
    for job, c, what, thr, n, r, val in _target_rows(run, TORCH_TARGETS):
        lines.append(f"| {job} | {c['B']} | {what.replace('_', ' ')} | ≥ {thr:g} | {n} | {val:.2f} | {'yes' if val >= thr else '**no**'} |")
    lines.append("")
    return lines


def _la(la):
    return "?" if not la else ", ".join(f"{x:.2f}" for x in la)


def write_report(runs, path, command):
    head = ["# rlhf_ref benchmark results", "",
            f"Written by `{command}` (run started {runs[0].get('started_utc', '?') if runs else '?'} UTC; report "
            f"written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC). "
            "Every figure below was measured in that run; the machine is shared and noisy, so read the "
            "medians and the ratios (all implementations timed round-robin in one process), not single times.", ""]
    analysis = os.path.join(os.path.dirname(os.path.abspath(__file__)), "analysis.md")
    if os.path.exists(analysis):
        head += [open(analysis).read().strip(), ""]
    body = []
    for run in runs:
        body += run_section(run)
    body += ["GFLOP/s counts the GEMM FLOPs no implementation can avoid: forward 2·(4H·H + H·V) per token "
             "(the recurrent product and the head; the input projection depends on the token alone and is "
             "tabulated by the compiled kernels and the JAX peer), a training step 3× that. PyTorch does more "
             "arithmetic than this count (it does not tabulate), so its GFLOP/s here understate its arithmetic rate.", ""]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(head + body) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
