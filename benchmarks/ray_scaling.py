"""The RL stage on Ray workers against one process: iteration time, tokens/s, transport share.

    python -m benchmarks.ray_scaling                      # → benchmarks/RESULTS-ray.md
    python -m benchmarks.ray_scaling --batch 16,64 --steps 4 --out /tmp/r.md
    python -m benchmarks.ray_scaling --smoke              # tiny, checks it runs (a few seconds + Ray's start)

The demo's RL stage (float32, E = 32, H = 96, the corpus vocabulary, max_new = 40, the reward model
scoring every response) at several batch sizes B, run three ways on one local Ray cluster:
one process (``workers=0``, the default backend's fused training step), and N = 1, 2 Ray
workers (``pipeline.distributed``: rollout and reward on the worker's default backend, forward and
backward with the NumPy reference, statistics on the learner). Per iteration it records the
wall time, and on the workers the parts: ``ray.put`` of the parameters (the broadcast), phase 1
and 2 wall time against the slowest worker's compute time inside them (the difference is Ray:
scheduling, (de)serialisation, object transfer), and the learner's own work. The first iteration
of each run is a warm-up and is not counted; figures are medians over the remaining ones. The
machine is shared: the report records the load average before and after.

The cost model at the end of the report is fitted to these medians and extrapolated on paper
to 8, 64 and 512 workers; its assumptions are stated there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# one BLAS thread in every process (the learner here, the workers through Ray's runtime_env below):
# N workers against one process is then N cores against one; set before NumPy loads
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median(xs):
    return float(np.median(xs)) if len(xs) else float("nan")


def _models(E, H, seed=0):
    from rlhf_ref import lstm
    from rlhf_ref.data import corpus
    vocab = corpus.default_vocab()
    rng = np.random.default_rng(seed)
    ref = lstm.init_params(len(vocab), E, H, rng, heads=("head", "value"), dtype=np.float32)
    rm = lstm.init_params(len(vocab), E, H, rng, heads=(), dtype=np.float32)
    rm["reward.weight"] = (rng.normal(size=(1, H)) / np.sqrt(H)).astype(np.float32)
    rm["reward.bias"] = np.zeros(1, np.float32)
    prompts = list(corpus.default_split().train)
    return vocab, ref, rm, prompts


def _run(ref, rm, vocab, prompts, cfg, executor=None, backend="auto"):
    from rlhf_ref.metrics import read_metrics
    from rlhf_ref.pipeline.rl import reinforce_finetune
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        reinforce_finetune(ref, vocab, prompts, rm, cfg, backend=backend, run_dir=d, progress="off",
                           log=lambda *a: None, executor=executor)
        wall = time.perf_counter() - t0
        rows = read_metrics(os.path.join(d, "metrics", "rl.jsonl"))
    # per-iteration time from the stage's own clock: tokens / (tokens/s)
    n_act = [r["response_len"] * cfg.batch_size for r in rows]
    dt = [n / r["tokens_per_s"] for n, r in zip(n_act, rows)]
    return {"dt": dt[1:], "tokens": n_act[1:], "wall": wall}


def _ray_microbench(ray, actor, nbytes_list=(250_000, 4_000_000), repeats=20):
    """Round-trip latency of an empty actor call; ray.put and a worker's get of an array."""
    lat = []
    for _ in range(repeats):
        t = time.perf_counter()
        ray.get(actor.pid.remote())
        lat.append(time.perf_counter() - t)
    puts = {}
    for nb in nbytes_list:
        a = np.ones(nb // 4, np.float32)
        ts = []
        for _ in range(max(3, repeats // 4)):
            t = time.perf_counter()
            ref = ray.put(a)
            ts.append(time.perf_counter() - t)
            del ref
        puts[nb] = _median(ts)
    return _median(lat[2:]), puts


def param_bytes(params):
    return int(sum(np.asarray(v).nbytes for v in params.values()))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ray_scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="16,64,256,512", help="batch sizes B (comma-separated; default 16,64,256,512)")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--steps", type=int, default=8, help="iterations per run, the first one not counted (default 8)")
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS-ray.md"))
    ap.add_argument("--json", default=None, help="also write the raw medians here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 and 2 workers, no report unless --out is given")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.steps, args.max_new, args.hidden, args.embed = "4", 3, 5, 8, 4
    batches = [int(x) for x in args.batch.split(",")]
    wlist = [int(x) for x in args.workers.split(",")]

    import ray
    from rlhf_ref.pipeline.distributed import RayExecutor
    from rlhf_ref.pipeline.rl import RLConfig
    from rlhf_ref.pipeline import common
    from rlhf_ref import backends

    load0 = os.getloadavg()
    vocab, ref, rm, prompts = _models(args.embed, args.hidden)
    be_name = common.backend_name(backends.get("auto"))
    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                       **{v: os.environ[v] for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                                     "MKL_NUM_THREADS")}}})
    t_init = time.perf_counter() - t
    results = {"batches": batches, "workers": wlist, "single": {}, "ray": {}, "learner_step": {}}
    try:
        probe = RayExecutor(1, backend="auto")
        lat, puts = _ray_microbench(ray, probe.actors[0])
        probe.close()
        pbytes = param_bytes(ref)
        for B in batches:
            cfg = RLConfig(steps=args.steps, batch_size=B, max_new=args.max_new, norm_samples=min(B, 64),
                           ckpt_every=10 ** 6, dtype="float32", seed=1)
            r = _run(ref, rm, vocab, prompts, cfg)
            results["single"][B] = {"t": _median(r["dt"]), "tok_s": _median(np.array(r["tokens"]) / np.array(r["dt"]))}
            print(f"B={B}: one process {results['single'][B]['t'] * 1e3:.1f} ms/iteration", flush=True)
            for N in wlist:
                for mode in (("workers", "learner") if N == max(wlist) else ("workers",)):
                    ex = RayExecutor(N, backend="auto", train_step=mode)
                    try:
                        r = _run(ref, rm, vocab, prompts, cfg, executor=ex)
                        h = ex.history[1:]
                    finally:
                        ex.close()
                    med = {k: _median([x[k] for x in h]) for k in h[0]}
                    med["t"] = _median(r["dt"])
                    med["tok_s"] = _median(np.array(r["tokens"]) / np.array(r["dt"]))
                    transport = [x["put"] + x["phase1"] - x["compute1"]
                                 + (x["phase2"] - x["compute2"] if "phase2" in x else 0.0) for x in h]
                    med["transport"] = _median(transport)
                    med["transport_share"] = _median([a / x["total"] for a, x in zip(transport, h)])
                    med["put_share"] = _median([x["put"] / x["total"] for x in h])
                    (results["ray"] if mode == "workers" else results["learner_step"]).setdefault(B, {})[N] = med
                    print(f"B={B}: {N} worker(s), train step on the {mode}: {med['t'] * 1e3:.1f} ms/iteration, "
                          f"transport {med['transport_share']:.0%}", flush=True)
    finally:
        ray.shutdown()
    load1 = os.getloadavg()
    T = max(len(vocab.encode(p)) for p in prompts) + args.max_new
    results.update(T=T, latency=lat, put=puts, param_bytes=pbytes, ray_init=t_init, load_before=load0, load_after=load1,
                   backend=be_name, steps=args.steps, max_new=args.max_new, H=args.hidden, E=args.embed,
                   V=len(vocab), num_cpus=args.num_cpus)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if args.smoke and args.out == ap.get_default("out"):
        print("smoke run: ok")
        return 0
    report = render(results)
    from rlhf_ref import io
    io.atomic_write_text(args.out, report)
    print(f"wrote {args.out}")
    return 0


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


def cost_model(res):
    """Fit t(N, B) = a + c·B/N + g·B + r·N·P to the medians (see the report for the meaning)."""
    batches = res["batches"]
    one = {B: res["ray"][B][1] for B in batches if 1 in res["ray"].get(B, {})}
    # compute per row on one worker (phase 1 + phase 2, inside the worker)
    c = _median([(m["compute1"] + m.get("compute2", 0.0)) / B for B, m in one.items()])
    # learner's work per row (gathering, statistics, decoding, the reward's standardisation, summing)
    g = _median([m["learner"] / B for B, m in one.items()])
    # fixed Ray cost per iteration: two phase round trips + the put, at the smallest batch
    Bmin = min(one)
    a = one[Bmin]["transport"]
    return {"c_row": c, "g_row": g, "a_fixed": a, "latency": res["latency"]}


def render(res):
    lines = []
    say = lines.append
    B0 = res["batches"]
    say("# The RL stage on Ray workers (benchmarks/ray_scaling.py)\n")
    say(f"Commit {_commit()}, {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, ray {__import__('ray').__version__}. "
        f"Local Ray cluster with num_cpus={res['num_cpus']} (started in {res['ray_init']:.1f} s). "
        f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in res['load_before'])}; "
        f"after: {', '.join(f'{x:.2f}' for x in res['load_after'])} — the machine was shared with other "
        f"developers' jobs, so absolute times are noisy; each figure is a median over {res['steps'] - 1} "
        f"iterations after a warm-up.\n")
    if res["load_before"][0] > (os.cpu_count() or 1) - 1:
        say(f"**Caveat:** the 1-minute load average ({res['load_before'][0]:.1f}) was above what this machine's "
            f"{os.cpu_count()} cores leave free for a second worker, so 2 workers did not get 2 idle cores: "
            f"the 2-worker figures understate what 2 free cores give.\n")
    say(f"Model: the demo's RL stage, float32, V = {res['V']}, E = {res['E']}, H = {res['H']}, "
        f"max_new = {res['max_new']}, the reward model scoring every response; parameters "
        f"{res['param_bytes'] / 1e3:.0f} kB (what one broadcast moves). One process: the `{res['backend']}` backend "
        f"(rollout, reward, fused training step). Workers: rollout and reward on their `{res['backend']}` backend, "
        f"forward and backward with the NumPy reference (the two-phase design of `rlhf_ref.pipeline.distributed`). "
        f"Random initial weights (responses mostly run to max_new). One BLAS thread in every process "
        f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}), so N workers use N cores against "
        f"one process's one. Reproduce: `python -m benchmarks.ray_scaling`.\n")
    say("## Iteration time and throughput\n")
    hdr = "| B | one process ms | " + " | ".join(f"{n} worker{'s' if n > 1 else ''} ms" for n in res["workers"])
    hdr += " | " + " | ".join(f"tokens/s ({n}w)" for n in res["workers"]) + " | tokens/s (1 process) |"
    say(hdr)
    say("|" + "---|" * (2 + 2 * len(res["workers"]) + 1))
    for B in B0:
        s = res["single"][B]
        row = f"| {B} | {s['t'] * 1e3:.1f} | " + " | ".join(f"{res['ray'][B][n]['t'] * 1e3:.1f}" for n in res["workers"])
        row += " | " + " | ".join(f"{res['ray'][B][n]['tok_s']:.0f}" for n in res["workers"]) + f" | {s['tok_s']:.0f} |"
        say(row)
    nmax = max(res["workers"])
    say(f"\nWith the training step on the learner instead (`train_step=\"learner\"`: rollout and reward on "
        f"{nmax} workers, the learner's fused `{res['backend']}` step on the gathered batch):\n")
    say("| B | ms/iteration | transport share |")
    say("|---|---|---|")
    for B in B0:
        m = res["learner_step"][B][nmax]
        say(f"| {B} | {m['t'] * 1e3:.1f} | {m['transport_share']:.0%} |")
    say("\n## Where the time goes (two-phase design)\n")
    say("| B | workers | total ms | put (broadcast) ms | phase 1 ms (worker compute) | phase 2 ms (worker compute) "
        "| learner ms | Ray transport share | broadcast share |")
    say("|---|---|---|---|---|---|---|---|---|")
    for B in B0:
        for n in res["workers"]:
            m = res["ray"][B][n]
            say(f"| {B} | {n} | {m['total'] * 1e3:.1f} | {m['put'] * 1e3:.2f} | {m['phase1'] * 1e3:.1f} "
                f"({m['compute1'] * 1e3:.1f}) | {m['phase2'] * 1e3:.1f} ({m['compute2'] * 1e3:.1f}) | "
                f"{m['learner'] * 1e3:.1f} | {m['transport_share']:.0%} | {m['put_share']:.1%} |")
    say(f"\n\"Ray transport\" = put + (phase wall time − slowest worker's compute) for both phases: scheduling, "
        f"serialisation and object transfer. An empty actor call round-trips in {res['latency'] * 1e3:.2f} ms; "
        + ", ".join(f"ray.put of {nb / 1e6:g} MB takes {t * 1e3:.2f} ms" for nb, t in res["put"].items()) + ".\n")
    # crossover
    say("## When do N workers beat one process?\n")
    for n in res["workers"]:
        wins = [B for B in B0 if res["ray"][B][n]["t"] < res["single"][B]["t"]]
        if wins:
            say(f"- {n} worker(s): faster than one process from B = {min(wins)} on (of the batch sizes measured: "
                f"{', '.join(map(str, B0))}).")
        else:
            ratio = ", ".join(f"B={B}: {res['ray'][B][n]['t'] / res['single'][B]['t']:.2f}×" for B in B0)
            say(f"- {n} worker(s): not faster than one process at any measured B (time ratio {ratio}).")
    nmax = max(res["workers"])
    wins = [B for B in B0 if res["learner_step"][B][nmax]["t"] < res["single"][B]["t"]]
    say(f"- {nmax} workers with the training step on the learner: "
        + (f"faster than one process from B = {min(wins)} on " if wins else "not faster at any measured B ")
        + "(time ratio " + ", ".join(f"B={B}: {res['learner_step'][B][nmax]['t'] / res['single'][B]['t']:.2f}×"
                                      for B in B0) + ").")
    cm = cost_model(res)
    say("\n## Cost model (on paper)\n")
    say("An iteration of the two-phase design on N workers with B rows and P parameter bytes:\n")
    say("    t(N, B) ≈ a + c·⌈B/N⌉ + g·B + t_bcast(N, P) + t_reduce(N, P)\n")
    say(f"fitted on this machine: a = {cm['a_fixed'] * 1e3:.1f} ms fixed Ray cost per iteration (two phase round "
        f"trips and the put, at the smallest B, 1 worker); c = {cm['c_row'] * 1e3:.3f} ms per row of worker compute "
        f"(rollout + reward + reference forward/backward, 1 worker); g = {cm['g_row'] * 1e3:.4f} ms per row on the "
        f"learner (gathering, global statistics, decoding, the gradient sum). Bytes per iteration: the broadcast "
        f"sends P = {res['param_bytes'] / 1e3:.0f} kB to each worker (one `ray.put`; on one node the workers read "
        f"it from shared memory, across nodes each node pulls one copy); phase 1 returns ~8 per-token arrays, "
        f"8·8·B·T bytes in all (T = longest prompt + max_new = {res['T']}); phase 2 sends 3·8·B·T bytes out "
        f"and N·P gradient bytes back, summed on the learner in shard order (N·P/4 additions).\n")
    P = res["param_bytes"]
    T = res["T"]
    bw = 1.25e9            # 10 Gbit/s per link, learner's NIC
    add = 1.0e9            # float32 additions per second on the learner (a memory-bound add)
    say("Prediction, assuming one worker per core on 8-core nodes, a 10 Gbit/s link into the learner "
        "(broadcast: one copy per node, no tree; reduction: all N gradients into the learner, no tree), the "
        "per-iteration latency a growing by 0.5 ms per extra node (one more round trip fan-out), and c, g as "
        "measured (the real per-row compute of a dedicated core is likely smaller than on this shared machine):\n")
    say("| workers N | rows B (64 per worker) | compute c·B/N ms | learner g·B ms | broadcast ms | gradient reduction ms "
        "| per-token arrays ms | total ms | tokens/s (× one worker) | largest term |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    pred = {}
    for N in (1, 8, 64, 512):
        B = 64 * N
        nodes = max(1, -(-N // 8))
        terms = {"fixed Ray cost": cm["a_fixed"] + 0.5e-3 * (nodes - 1), "worker compute": cm["c_row"] * 64,
                 "learner per-row work": cm["g_row"] * B, "broadcast": nodes * P / bw,
                 "gradient reduction": N * P / bw + N * (P / 4) / add, "per-token arrays": 11 * 8 * B * T / bw}
        tot = sum(terms.values())
        pred[N] = (tot, terms)
        big = max(terms, key=terms.get)
        say(f"| {N} | {B} | {terms['worker compute'] * 1e3:.1f} | {terms['learner per-row work'] * 1e3:.1f} | "
            f"{terms['broadcast'] * 1e3:.2f} | {terms['gradient reduction'] * 1e3:.2f} | "
            f"{terms['per-token arrays'] * 1e3:.1f} | {tot * 1e3:.1f} | {N * pred[1][0] / tot:.1f}× | {big} |")
    t512, terms512 = pred[512]
    say(f"\nReading: the parameters are small ({P / 1e3:.0f} kB), so the broadcast and the gradient reduction stay "
        f"{(terms512['broadcast'] + terms512['gradient reduction']) / t512:.0%} of the predicted iteration even at "
        f"512 workers. Each worker's share (64 rows) stays constant, but the learner's serial work grows with B: "
        f"g·B is {terms512['learner per-row work'] / t512:.0%} of the predicted 512-worker iteration and the "
        f"per-token arrays moved through its link {terms512['per-token arrays'] / t512:.0%}, so the speed-up "
        f"saturates near {512 * pred[1][0] / t512:.0f}× at 512 workers. The next steps it points to: the learner's "
        f"statistics as reductions of per-shard partial sums (exact sums need a fixed order, e.g. a fixed tree), "
        f"decoding and reward standardisation on the workers, and a compiled phase-2 step (a backend function "
        f"taking given advantages and weights; today the workers' forward/backward is the NumPy reference, "
        f"c above). These are extrapolations from one shared 2-core machine, not measurements.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
