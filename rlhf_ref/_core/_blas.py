"""Hold every OpenBLAS of the process to one thread while a compiled backend's call runs.

The compiled backends run their recurrences on their own threads (OpenMP in Cython, Numba's
threads), each thread calling BLAS for its many small per-step products; OpenBLAS's own threading
of those costs a hand-off per call, and under load a time slice per call. So while such a call runs,
every OpenBLAS loaded in the process is set to one thread, and restored afterwards.

``controls()`` finds the OpenBLAS libraries once: on Linux the shared objects mapped in this
process (/proc/self/maps) whose name contains "blas" and that export
``[scipy_]openblas_{get,set}_num_threads[64_]`` (SciPy's wheels: the ``scipy_`` prefix; NumPy's
ILP64 build: the ``64_`` suffix; a system OpenBLAS: neither); elsewhere threadpoolctl's, when it is
installed. An empty list means no control: the backends then keep BLAS's own threading (their
kernels run one block).

``one_thread()`` is the context. It is reference-counted over all Python threads: the thread
counts are saved by the first call to enter and restored by the last one to leave, so concurrent
calls (the kernels release the GIL) never leave OpenBLAS at one thread, whatever order they end in.
"""

from __future__ import annotations

import os
import threading

_CONTROLS = None            # [(get_num_threads, set_num_threads)] after the first controls()
_LOCK = threading.Lock()
_SAVED = []                 # [(set_num_threads, count before)] while some call runs
_USERS = 0                  # calls inside one_thread() now, over all threads


def controls():
    """[(get_num_threads, set_num_threads)] of every OpenBLAS loaded in the process (found once)."""
    global _CONTROLS
    if _CONTROLS is None:
        try:
            _CONTROLS = _find()
        except Exception:
            _CONTROLS = []
    return _CONTROLS


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
    found = []
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pre, suf in (("scipy_", ""), ("scipy_", "64_"), ("", ""), ("", "64_")):
            get = getattr(lib, f"{pre}openblas_get_num_threads{suf}", None)
            put = getattr(lib, f"{pre}openblas_set_num_threads{suf}", None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                found.append((get, put))
                break
    if not paths:                                     # elsewhere: threadpoolctl, when installed
        try:
            from threadpoolctl import ThreadpoolController
            for c in ThreadpoolController().lib_controllers:
                if c.internal_api == "openblas":
                    found.append((c.get_num_threads, c.set_num_threads))
        except Exception:
            pass
    return found


class one_thread:
    """Context: every OpenBLAS of the process runs single-threaded inside (reference-counted over
    all Python threads; see the module docstring)."""

    __slots__ = ()

    def __enter__(self):
        global _USERS
        with _LOCK:
            if _USERS == 0:
                _SAVED[:] = [(put, get()) for get, put in controls()]
                for put, n in _SAVED:
                    if n != 1:
                        put(1)
            _USERS += 1
        return self

    def __exit__(self, *exc):
        global _USERS
        with _LOCK:
            _USERS -= 1
            if _USERS == 0:
                for put, n in _SAVED:
                    if n != 1:
                        put(n)
                _SAVED.clear()
        return False
