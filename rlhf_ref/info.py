"""``rlhf-ref info``: what this installation has (versions, BLAS, CPU, optional packages, compiled
kernels) and which backends can run here, and why not.

    add_arguments(parser) / main(args, out=None) -> int
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

# (import name, distribution name, what it is for in rlhf_ref)
OPTIONAL = (
    ("Cython", "Cython", "builds the cython backend (build time only)"),
    ("numba", "numba", "numba and cuda backends"),
    ("llvmlite", "llvmlite", "numba's compiler"),
    ("scipy", "scipy", "BLAS for the cython and numba kernels; tests"),
    ("gymnasium", "gymnasium", "rlhf_ref.envs"),
    ("matplotlib", "matplotlib", "rlhf_ref.plot (demo curves)"),
    ("tqdm", "tqdm", "progress bars"),
    ("threadpoolctl", "threadpoolctl", "benchmarks: BLAS thread control"),
    ("torch", "torch", "tests: PyTorch cross-checks (pip install torch==2.13.0)"),
    ("pytest", "pytest", "tests"),
    ("hypothesis", "hypothesis", "tests"),
)

ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "NUMBA_NUM_THREADS", "NUMBA_ENABLE_CUDASIM", "NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT",
            "RLHF_REF_NUMBA_CACHE")


def add_arguments(parser):
    """The ``rlhf-ref info`` options."""
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="do not probe the backends (no import of numba or the compiled kernels)")
    parser.add_argument("--import-check", action="store_true",
                        help="import each installed optional package, to report broken installs (slower: torch)")
    return parser


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model", "Processor"):
                    return val.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ncpus():
    n = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return f"{n}"
    return f"{n}" if usable == n else f"{n} ({usable} usable by this process)"


def _numpy_blas():
    import numpy as np
    try:
        cfg = np.show_config(mode="dicts")     # numpy >= 1.25
        blas = cfg["Build Dependencies"]["blas"]
        out = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
        conf = blas.get("openblas configuration")
        return out + (f" ({conf})" if conf else "")
    except Exception:
        return "unknown (numpy.show_config(mode='dicts') unavailable)"


def _blas_runtime():
    """What threadpoolctl sees loaded (when installed): library, version, threads, core type."""
    try:
        from threadpoolctl import threadpool_info
    except Exception:
        return None
    rows = []
    for d in threadpool_info():
        rows.append(f"{d.get('internal_api')} {d.get('version')} threads={d.get('num_threads')}"
                    + (f" arch={d['architecture']}" if d.get("architecture") else ""))
    return "; ".join(rows) or "none loaded"


def _dist_version(dist):
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _import_check(mod):
    try:
        importlib.import_module(mod)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def compiled_extensions():
    """(built, sources): module names of the built Cython extensions and of the .pyx next to them."""
    import importlib.machinery
    import importlib.util
    spec = importlib.util.find_spec("rlhf_ref._core")
    folder = os.path.dirname(spec.origin) if spec and spec.origin else None
    if folder is None or not os.path.isdir(folder):
        return [], []
    built, sources = set(), set()
    suffixes = sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True)   # longest first
    for fn in os.listdir(folder):
        suf = next((s for s in suffixes if fn.endswith(s)), None)
        if suf is not None:
            built.add("rlhf_ref._core." + fn[: -len(suf)])
        if fn.endswith(".pyx"):
            sources.add("rlhf_ref._core." + fn[:-4])
    return sorted(built), sorted(sources)


def _rows(title, rows, out):
    print(f"\n{title}", file=out)
    if not rows:
        return
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(w)}  {v}", file=out)


def main(args, out=None):
    """Print what this installation has; returns 0."""
    import numpy as np

    from . import __version__
    out = sys.stdout if out is None else out
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    print(f"rlhf_ref {__version__}  ({pkg_dir})", file=out)
    rows = [("python", f"{platform.python_version()} ({platform.python_implementation()}) {sys.executable}"),
            ("platform", platform.platform()),
            ("cpu", f"{_cpu_model()}; {_ncpus()} logical CPUs"),
            ("numpy", f"{np.__version__}"),
            ("numpy BLAS (build)", _numpy_blas())]
    rt = _blas_runtime()
    if rt is not None:
        rows.append(("BLAS loaded", rt))
    _rows("System", rows, out)

    env = [(k, os.environ[k]) for k in ENV_VARS if k in os.environ]
    env += [(k, v) for k, v in sorted(os.environ.items()) if k.startswith("RLHF_REF_") and k not in ENV_VARS]
    _rows("Environment" + ("" if env else ": none of OPENBLAS_CORETYPE, OMP_NUM_THREADS, NUMBA_*, RLHF_REF_* set"),
          env, out)

    built, sources = compiled_extensions()
    if built:
        ext_rows = [(m, "built") for m in built]
        ext_rows += [(m, "NOT built: its .pyx is here but not its compiled module (rebuild: pip install -e . "
                         "or pip install .; needs a C compiler and Cython)") for m in sources if m not in built]
        _rows("Compiled kernels (Cython)", ext_rows, out)
    else:
        why = (f"{len(sources)} .pyx source(s) here but none compiled: reinstall with a C compiler "
               "and Cython (pip install -v . shows why)" if sources
               else "no compiled extension in this installation")
        _rows(f"Compiled kernels (Cython): compiled kernels not built ({why})", [], out)

    opt = []
    for mod, dist, what in OPTIONAL:
        v = _dist_version(dist)
        if v is None:
            opt.append((mod, f"absent (not installed) - {what}"))
            continue
        why = _import_check(mod) if args.import_check else None
        opt.append((mod, f"{v} - {what}" if why is None else f"{v} installed but BROKEN: {why}"))
    _rows("Optional packages", opt, out)

    if not args.probe:
        print("\nBackends: not probed (--no-probe)", file=out)
        return 0
    from . import backends
    statuses = backends.available()
    _rows("Backends (rlhf_ref.backends)", [(n, "available" if st.available else f"unavailable: {st.reason}")
                                            for n, st in statuses.items()], out)
    order = []
    for job in backends.JOBS:
        try:
            mod = backends.get("auto", job=job)
            order.append((job, getattr(mod, "NAME", mod.__name__)))
        except backends.BackendUnavailable as e:
            order.append((job, f"none: {e.reason}"))
    _rows("backend='auto' picks (small batches)", order, out)
    return 0
