"""``rlhf-ref warmup``: compile every Numba kernel a job can reach into Numba's on-disk cache, once.

    rlhf-ref warmup [--dtype float32|float64|both] [--jobs rollout,logprobs,reinforce,sft,reward]

    add_arguments(parser) / main(args, out=None) -> int; warm(jobs, dtypes, log) -> dict (the API)

Why: the numba backend compiles its kernels at their first call. With an empty cache a new user's
first rollout waits 5–8 s and the first training step 13–22 s (benchmarks/RESULTS.md, this
2-core machine); with the cache filled, import + first call takes about 0.5 s. ``warmup`` pays the
compilation once per machine, Numba version and kernel source (the cache is stamped with a hash
of every kernel file, ``_nb_common.kernel``), so the first real call only loads machine code.

What it runs: each job of the numba backend's interface, through the backend's public functions
(so exactly the kernels and argument types a real call reaches), on tiny shapes, in float32 and
float64, once with one row (the serial kernels, the input projection computed directly) and once
with three rows (the row-block kernels ``*_par``, the input projection through the (V, 4H) table).
The row-block kernels are compiled even when Numba has one thread now (``taskset -c 0``), where
the backend would not reach them: a later process with more threads finds them in the cache. The switches that are runtime values, not types (a
reference policy or not, a value head or not, the policy kind, ε, the baseline, the critic),
reuse the same machine code; both sides are still run, cheaply. Idempotent: on a warm cache every
kernel loads and nothing compiles (it says so, in well under a second per dtype).

Where the cache goes (Numba's choice, printed): ``NUMBA_CACHE_DIR`` when set; else ``__pycache__``
beside the kernel files when that folder is writable (an editable install or a user's venv); else
the user-wide folder (``~/.cache/numba`` on Linux), e.g. for a read-only site-packages. Numba reads
a cache only where it could also write, so run ``warmup`` as the user who runs the jobs (a cache
written by root into a read-only site-packages is not used by other users; set ``NUMBA_CACHE_DIR``
to a shared writable folder for them instead). ``RLHF_REF_NUMBA_CACHE=0`` turns the cache off:
then there is nothing to warm and the command says so.

Not covered (each compiles once more at its first call, then is cached too): arguments of other
array types than the backend's own conversions produce, i.e. read-only float arrays given as
parameters or uniforms (np.load with mmap_mode), and Numba thread counts that switch between the
serial and row-block kernels after the warm-up (``NUMBA_NUM_THREADS`` changed from 1).
"""

from __future__ import annotations

import sys
import time

JOBS = ("rollout", "logprobs", "reinforce", "sft", "reward")
DTYPES = ("float32", "float64")

# (B, T, V): one row with B·T < V (serial kernels, direct input projection); three rows with
# B·T ≥ V (row-block kernels when Numba has ≥ 2 threads, the input table over the rows the batch
# reads: ≤ NUMBA_TABLE_ROWS_FRACTION of them); four rows whose tokens cover the vocabulary (the
# whole table, forward and backward). (B, T, V, every id read): see _backend_numba._Body.
SHAPES = ((1, 4, 16, False), (3, 8, 16, False), (4, 8, 16, True))
H = 8


def add_arguments(parser):
    """The ``rlhf-ref warmup`` options."""
    parser.add_argument("--dtype", choices=("float32", "float64", "both"), default="both",
                        help="the parameter dtype(s) to compile for (default both)")
    parser.add_argument("--jobs", default=",".join(JOBS), metavar="LIST",
                        help=f"comma-separated jobs to compile for, of {', '.join(JOBS)} (default all); "
                             "'reinforce' also compiles what 'logprobs' needs")
    return parser


def parse_jobs(text):
    """The job names of a comma-separated list; ValueError naming the bad one."""
    jobs = tuple(j.strip() for j in str(text).split(",") if j.strip())
    if not jobs:
        raise ValueError(f"--jobs must name at least one of {', '.join(JOBS)}, got {text!r}")
    for j in jobs:
        if j not in JOBS:
            raise ValueError(f"--jobs: unknown job {j!r}, expected a comma-separated list of {', '.join(JOBS)}")
    return jobs


def _dispatchers(K):
    """Every Numba dispatcher of the kernel modules (K: _backend_numba's namespace of modules)."""
    from numba.core.dispatcher import Dispatcher
    seen = {}
    for mod in vars(K).values():
        for name, obj in vars(mod).items():
            if isinstance(obj, Dispatcher) and id(obj) not in seen:
                seen[id(obj)] = (f"{mod.__name__.rsplit('.', 1)[-1]}.{name}", obj)
    return list(seen.values())


def cache_counts(K):
    """(compiled, loaded): specialisations compiled in this process (cache misses, counting the helper
    kernels compiled inside their callers) and loaded from the on-disk cache (hits)."""
    miss = hit = 0
    for _, d in _dispatchers(K):
        miss += sum(d.stats.cache_misses.values())
        hit += sum(d.stats.cache_hits.values())
    return miss, hit


def cache_location(K):
    """(folder, how Numba chose it) of the kernels' cache, or (None, why there is none)."""
    from . _core import _nb_common
    if not _nb_common.CACHE:
        return None, "RLHF_REF_NUMBA_CACHE=0: the on-disk cache is off"
    if _nb_common.CACHE_STATE["uncached"]:
        return None, ("no writable cache location (Numba found none): these kernels compile at every first call: "
                      + ", ".join(_nb_common.CACHE_STATE["uncached"][:5]))
    for _, d in _dispatchers(K):
        path = getattr(d.stats, "cache_path", None)
        if path:
            loc = getattr(getattr(getattr(d, "_cache", None), "_impl", None), "locator", None)
            return path, (type(loc).__name__ if loc is not None else "Numba's choice")
    return None, "unknown (Numba's internals moved)"


def _calls(b, dtype, job, B, T, V, every=False):
    """(label, thunk) pairs: the backend calls of one job on one tiny shape."""
    import numpy as np
    from .lstm import init_params
    from .reinforce import ReinforceConfig
    from .tokenizer import BOS, EOS

    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    pol = init_params(V, H, H, rng, heads=("head", "value", "qvalue"), dtype=dt)
    ref = init_params(V, H, H, rng, heads=("head",), dtype=dt)
    tokens = rng.integers(4, V, size=(B, T)).astype(np.int64)
    if every:                                               # ids 4 … V−1 all read, and BOS
        tokens[:, 1:] = 4 + np.arange(B * (T - 1)).reshape(B, T - 1) % (V - 4)
    tokens[:, 0] = BOS
    mask = np.ones((B, T))
    mask[0, T - 1] = 0.0                                     # a padded position
    pl = np.ones(B, np.int64)
    u = rng.random((B, T))
    reward = rng.standard_normal(B)
    if job == "rollout":
        yield "rollout", lambda: b.rollout(pol, tokens, pl, u, eos_id=EOS)
        yield "rollout ref+values ε", lambda: b.rollout(pol, tokens, pl, u, eps=0.1, eos_id=EOS,
                                                        ref_params=ref, values=True)
        yield "rollout greedy", lambda: b.rollout(pol, tokens, pl, u, kind="greedy", eos_id=EOS)
    elif job == "logprobs":
        yield "sequence_logprobs", lambda: b.sequence_logprobs(pol, tokens, mask, pl)
        yield "sequence_logprobs ε", lambda: b.sequence_logprobs(pol, tokens, mask, pl, eps=0.1)
    elif job == "reinforce":
        yield "reinforce ref_params", lambda: b.reinforce_loss_and_grad(pol, tokens, mask, pl, reward,
                                                                        ref_params=ref)
        ref_logp = np.zeros((B, T))
        yield "reinforce qvalue", lambda: b.reinforce_loss_and_grad(
            pol, tokens, mask, pl, reward, ReinforceConfig(baseline="qvalue"), ref_logp=ref_logp)
    elif job == "sft":
        yield "sft", lambda: b.sft_loss_and_grad(pol, tokens, mask)
    elif job == "reward":
        rm = init_params(V, H, H, rng, heads=("reward",), dtype=dt)
        yield "reward_forward", lambda: b.reward_forward(rm, tokens, mask)
        yield "bt_loss_and_grad", lambda: b.bt_loss_and_grad(rm, tokens, mask, tokens[::-1].copy(), mask[::-1].copy())


def warm(jobs=JOBS, dtypes=DTYPES, log=print):
    """Run every job's tiny calls on the numba backend; returns {"seconds", "compiled", "loaded",
    "cache_dir", "locator", "steps": [(job, dtype, seconds, compiled)]}. RuntimeError when the numba
    backend cannot run here or has no on-disk cache (with the reason), or a call fails. It swaps the
    backend's row-block choice while it runs: not while other threads use the numba backend."""
    t0 = time.perf_counter()
    from .backends import BackendUnavailable, get
    try:
        b = get("numba")
    except BackendUnavailable as e:
        raise RuntimeError(str(e)) from None
    K = b._require()
    where, how = cache_location(K)
    if where is None:                       # compiling would keep nothing
        raise RuntimeError(f"nothing to warm: {how}")
    steps = []
    blocks = b._blocks
    try:
        # the row-block kernels too, whatever Numba's thread count is now (a later process may have more)
        b._blocks = lambda B: max(blocks(B), min(2, B))
        for dtype in dtypes:
            for job in jobs:
                m0, h0 = cache_counts(K)
                t = time.perf_counter()
                for B, T, V, every in SHAPES:
                    for label, call in _calls(b, dtype, job, B, T, V, every):
                        try:
                            call()
                        except Exception as e:      # a bug: say which call, keep the traceback chained
                            raise RuntimeError(f"{label} ({dtype}, B, T, V = {B}, {T}, {V}) failed: "
                                               f"{type(e).__name__}: {e}") from e
                m1, h1 = cache_counts(K)
                steps.append((job, dtype, time.perf_counter() - t, m1 - m0))
                what = (f"compiled {m1 - m0} specialisations" if m1 > m0 else
                        f"loaded {h1 - h0} from the cache" if h1 > h0 else "nothing new")
                log(f"  {job:<10} {dtype}  {time.perf_counter() - t:6.2f} s  {what}")
    finally:
        b._blocks = blocks
    compiled, loaded = cache_counts(K)
    return {"seconds": time.perf_counter() - t0, "compiled": compiled, "loaded": loaded,
            "cache_dir": where, "locator": how, "steps": steps}


def main(args, out=None) -> int:
    out = sys.stdout if out is None else out
    try:
        jobs = parse_jobs(args.jobs)
    except ValueError as e:
        sys.stderr.write(f"rlhf-ref warmup: error: {e}\n")
        return 2
    dtypes = DTYPES if args.dtype == "both" else (args.dtype,)
    print(f"rlhf-ref warmup: filling Numba's on-disk cache with the numba kernels of {', '.join(jobs)} "
          f"for {', '.join(dtypes)} (compiling what is missing)", file=out, flush=True)
    t0 = time.perf_counter()
    try:
        r = warm(jobs, dtypes, log=lambda m: print(m, file=out, flush=True))
    except RuntimeError as e:
        sys.stderr.write(f"rlhf-ref warmup: {e}\n")
        return 1
    total = time.perf_counter() - t0
    what = (f"compiled {r['compiled']} kernel specialisations" if r["compiled"]
            else "the cache was already warm, nothing compiled")
    print(f"done in {total:.1f} s (import included): {what}, {r['loaded']} loaded from the cache\n"
          f"cache: {r['cache_dir']} ({r['locator']})", file=out)
    return 0
