"""Write benchmarks/RESULTS.md from one or more harness runs (as-is and OPENBLAS_CORETYPE unset)."""

from __future__ import annotations

import datetime
import os

TARGETS = (  # (job, B, what, threshold) — issue 4, ratios to best PyTorch CPU in the same run
    ("rollout", 1, "ratio_to_best_torch", 8.0),
    ("rollout", 16, "ratio_to_best_torch", 2.5),
    ("rollout", 256, "ratio_to_best_torch", 1.2),
    ("rollout", 256, "peak_fraction", 0.70),
    ("train", 1, "ratio_to_best_torch", 1.5),
    ("train", 256, "ratio_to_best_torch", 1.0),
    ("rollout", 1, "ratio_to_numpy", 20.0),
    ("train", 1, "ratio_to_numpy", 20.0),
)


def _k(x):
    return f"{x / 1e3:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


def _backend_rows(case, job):
    return {n: r for n, r in case.get(job, {}).get("impls", {}).items() if not n.startswith("torch")}


def fastest(case, job, exclude_numpy=False):
    rows = {n: r for n, r in _backend_rows(case, job).items() if not (exclude_numpy and n == "numpy")}
    if not rows:
        return None, None
    n = max(rows, key=lambda k: rows[k]["tokens_per_s"])
    return n, rows[n]


def _gflops(case, job, r):
    from .harness import necessary_flops_per_token
    return r["tokens_per_s"] * necessary_flops_per_token(case["H"], case["V"]) * (3 if job == "train" else 1) / 1e9


def run_section(run):
    lib = run["libraries"]
    peak = run["gemm_peak"]["gflops_median"]
    lines = [f"### Run: threads={run['threads']}, OPENBLAS_CORETYPE={lib['OPENBLAS_CORETYPE']}",
             "", f"Command: `{run.get('command', '?')}`", "",
             f"- CPU: {run['machine']['cpu']} ({run['machine']['nproc']} cores visible), {run['machine']['platform']}",
             f"- Python {lib['python']}, NumPy {lib['numpy']}, SciPy {lib.get('scipy')}, Numba {lib.get('numba')}, "
             f"Cython {lib.get('Cython')}, PyTorch {lib.get('torch')}, rlhf_ref {lib.get('rlhf_ref')}",
             f"- BLAS (threadpoolctl): " + (", ".join(f"{b['internal_api']} {b['version']} kernel **{b['architecture']}** "
                                                      f"({b['num_threads']} threads, {os.path.basename(str(b['filepath']))})"
                                                      for b in lib["blas"]) if isinstance(lib["blas"], list) else str(lib["blas"])),
             f"- Backends: " + ", ".join(f"{n}: {r}" for n, r in run["backends"].items()),
             f"- float32 GEMM peak (numpy, {run['gemm_peak']['n']}²): **{peak:.0f} GFLOP/s** "
             f"(min {run['gemm_peak']['gflops_min']:.0f}, max {run['gemm_peak']['gflops_max']:.0f})",
             f"- Medians of {run['repeats']} round-robin rounds, each a block of ≥ {run['min_time']} s; dtype {run['dtype']}, T = {run['cases'][0]['T'] if run['cases'] else '?'}",
             ""]
    for job, title in (("rollout", "Rollout (sampling T−1 tokens per row)"), ("train", "REINFORCE training step (forward + backward)")):
        lines += [f"#### {title}", "",
                  "| B, H, V | impl | tokens/s median (min–max) | × best torch | × numpy | GFLOP/s | % of peak | check |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in run["cases"]:
            if job not in c:
                continue
            for n, r in sorted(c[job]["impls"].items(), key=lambda kv: -kv[1]["tokens_per_s"]):
                chk = r.get("check") or {}
                ok = "ok" if chk.get("ok") else f"**FAILED** {chk}"
                lines.append(f"| {c['B']}, {c['H']}, {c['V']} | {n}{' (best torch)' if n == c[job]['best_torch'] else ''} | "
                             f"{_k(r['tokens_per_s'])} ({_k(r['tokens_per_s_min'])}–{_k(r['tokens_per_s_max'])}) | "
                             f"{r.get('ratio_to_best_torch', float('nan')):.2f} | {r.get('ratio_to_numpy', float('nan')):.2f} | "
                             f"{_gflops(c, job, r):.1f} | {100 * _gflops(c, job, r) / peak:.0f}% | {ok} |")
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
    lines += ["#### Targets (issue 4), fastest rlhf_ref backend in this run", "",
              "| job | B | measure | target | fastest backend | measured | met |", "|---|---|---|---|---|---|---|"]
    for job, B, what, thr in TARGETS:
        case = next((c for c in run["cases"] if c["B"] == B and job in c), None)
        if case is None:
            continue
        n, r = fastest(case, job, exclude_numpy=True)
        if r is None:
            continue
        val = _gflops(case, job, r) / peak if what == "peak_fraction" else r.get(what, float("nan"))
        lines.append(f"| {job} | {B} | {what.replace('_', ' ')} | ≥ {thr:g} | {n} | {val:.2f} | {'yes' if val >= thr else '**no**'} |")
    lines.append("")
    return lines


def write_report(runs, path, command):
    head = ["# rlhf_ref benchmark results", "",
            f"Written by `{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
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
             "tabulated by the compiled kernels), a training step 3× that. PyTorch does more arithmetic than "
             "this count (it does not tabulate), so its GFLOP/s here understate its arithmetic rate.", ""]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(head + body) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
