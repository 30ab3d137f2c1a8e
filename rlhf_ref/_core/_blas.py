"""Hold every OpenBLAS of the process to one thread while a compiled backend's call runs.

The compiled backends run their recurrences on their own threads (OpenMP in Cython, Numba's
threads), each thread calling BLAS for its many small per-step products; OpenBLAS's own threading
of those costs a hand-off per call, and under load a time slice per call. So while such a call runs,
every OpenBLAS loaded in the process is set to one thread, and restored afterwards.

``controls()`` finds the OpenBLAS libraries once: on Linux the shared objects mapped in this
process (/proc/self/maps) whose name contains "blas" and that export (or link to)
``[scipy_]openblas_{get,set}_num_threads[64_]`` (SciPy's wheels: the ``scipy_`` prefix; NumPy's
ILP64 build: the ``64_`` suffix; a system OpenBLAS: neither), one entry per library; elsewhere
threadpoolctl's, when it is installed. An empty list means no control: the backends then keep
BLAS's own threading (their kernels run one block). ``controls(lp64=True)`` keeps the LP64 ones
(no ``64_``): SciPy's, the BLAS behind ``cython_blas`` and so behind Numba's ``np.dot``.

``one_thread(lp64=False)`` is the context (the cython backend holds every OpenBLAS; the numba
backend holds only the LP64 one its kernels call, as it always has: NumPy's own pool is left as
it is). It is reference-counted per library over all Python threads: a library's count is saved by the
first call to hold it and restored by the last one to let go, so concurrent calls (the kernels
release the GIL) never leave OpenBLAS at one thread, whatever order they end in.
"""

from __future__ import annotations

import os
import threading

_FOUND = None               # [(get_num_threads, set_num_threads, lp64)] after the first search
_LOCK = threading.Lock()
_USERS = {}                 # id(set_num_threads) -> [calls holding it now, its count before the first]


def _found():
    global _FOUND
    if _FOUND is None:
        try:
            _FOUND = _find()
        except Exception:
            _FOUND = []
    return _FOUND


def controls(lp64=False):
    """[(get_num_threads, set_num_threads)] of every OpenBLAS loaded in the process (found once);
    with ``lp64``, only those with 32-bit integers (SciPy's: what cython_blas and Numba call)."""
    return [(get, put) for get, put, is_lp64 in _found() if is_lp64 or not lp64]


def _find():
    import ctypes
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's OpenBLAS: the kernels' BLAS)
    except Exception:
        pass
    paths = []
    try:
        with open("/proc/self/maps") as f:          # Linux: the shared objects mapped in this process
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "blas" in os.path.basename(parts[-1]).lower():
                    paths.append(parts[-1])
    except OSError:
        pass
    found, seen = [], set()
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre, suf in (("scipy_", ""), ("scipy_", "64_"), ("", ""), ("", "64_")):
            get = getattr(lib, f"{pre}openblas_get_num_threads{suf}", None)
            put = getattr(lib, f"{pre}openblas_set_num_threads{suf}", None)
            if get is not None and put is not None:
                addr = ctypes.cast(put, ctypes.c_void_p).value     # a wrapper linking to a found one
                if addr not in seen:
                    seen.add(addr)
                    get.restype, get.argtypes = ctypes.c_int, []
                    put.restype, put.argtypes = None, [ctypes.c_int]
                    found.append((get, put, suf == ""))
                break
    if not paths:                                     # elsewhere: threadpoolctl, when installed
        try:
            from threadpoolctl import ThreadpoolController
            for c in ThreadpoolController().lib_controllers:
                if c.internal_api == "openblas":
                    found.append((c.get_num_threads, c.set_num_threads,
                                  "64" not in (getattr(c, "symbol_suffix", "") or "")))
        except Exception:
            pass
    return found


class one_thread:
    """Context: every OpenBLAS of the process (``lp64``: the LP64 ones) runs single-threaded inside
    (reference-counted per library over all Python threads; see the module docstring)."""

    __slots__ = ("lp64",)

    def __init__(self, lp64=False):
        self.lp64 = lp64

    def __enter__(self):
        with _LOCK:
            for get, put in controls(self.lp64):
                held = _USERS.get(id(put))
                if held is None:
                    n = get()
                    _USERS[id(put)] = held = [0, n]
                    if n != 1:
                        put(1)
                held[0] += 1
        return self

    def __exit__(self, *exc):
        with _LOCK:
            for _, put in controls(self.lp64):
                held = _USERS[id(put)]
                held[0] -= 1
                if held[0] == 0:
                    del _USERS[id(put)]
                    if held[1] != 1:
                        put(held[1])
        return False
