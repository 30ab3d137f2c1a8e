"""The backend registry: which implementations of the heavy computations exist here, and why not.

Backends (docs/conventions.md §5):

    name     module                           what
    numpy    rlhf_ref._core._backend_numpy    the reference itself (always available)
    cython   rlhf_ref._core._backend_cython   compiled Cython kernels (built by setup.py when a C compiler is present)
    numba    rlhf_ref._core._backend_numba    Numba @njit kernels (pip install 'rlhf-ref[numba]')
    cuda     rlhf_ref._core._backend_cuda     Numba CUDA kernels (an NVIDIA GPU, or NUMBA_ENABLE_CUDASIM=1)

A backend is a module. ``get(name)`` returns the module itself, so what the tests exercise is
what the library runs. The interface it exposes is ``Backend`` below (a ``typing.Protocol``),
described there once; ``NAME`` (its registry name) and ``IMPLEMENTED`` (the interface functions
it really implements, default all of ``INTERFACE``; the others raise NotImplementedError) are
optional module attributes.

Nothing substitutes silently: asking for an unavailable backend by name raises
``BackendUnavailable`` with the reason; only ``"auto"`` chooses, by the documented order of
``auto_order``. Probing is lazy: ``import rlhf_ref.backends`` imports no backend module, and
``available()`` imports each one inside ``try/except Exception`` (numba raises ImportError when
NumPy is too new for it), keeping the reason.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import NamedTuple, Protocol

__all__ = ["NAMES", "MODULES", "INTERFACE", "JOBS", "EXTRAS", "Backend", "BackendUnavailable", "Status",
           "available", "status", "get", "auto_order", "table", "CUDA_MIN_BATCH"]

NAMES = ("numpy", "cython", "numba", "cuda")

MODULES = {
    "numpy": "rlhf_ref._core._backend_numpy",
    "cython": "rlhf_ref._core._backend_cython",
    "numba": "rlhf_ref._core._backend_numba",
    "cuda": "rlhf_ref._core._backend_cuda",
}

# What to install for each backend (said in the reasons).
EXTRAS = {"numpy": None, "cython": "cython", "numba": "numba", "cuda": "cuda"}

INTERFACE = ("rollout", "sequence_logprobs", "reinforce_loss_and_grad", "sft_loss_and_grad",
             "reward_forward", "bt_loss_and_grad")

# The functions a job needs: "auto" skips a backend that lacks one (the cuda backend, for one,
# does only rollout and sequence_logprobs, so it is never picked for training).
JOBS = {
    "rollout": ("rollout", "sequence_logprobs"),
    "train": INTERFACE,
}

# "auto" for a rollout goes to the GPU only for batches at least this large, and never to the
# CUDA simulator (NUMBA_ENABLE_CUDASIM=1 is for tests: it is thousands of times slower).
CUDA_MIN_BATCH = 256


class Backend(Protocol):
    """The backend interface: a module satisfies it. Every function validates its arguments with the
    reference's own checks (so a bad input raises the reference's error) before any kernel runs,
    and computes in the dtype of ``params`` (float32 or float64)."""

    def probe(self) -> str | None:
        """None when the backend can run here, else the reason it cannot (a sentence for a human)."""

    def rollout(self, params, prompt_tokens, prompt_len, u, alpha=1.0, eps=0.0, kind="boltzmann", eos_id=2,
                ref_params=None, values=False) -> dict:
        """The same keys and meaning as ``rlhf_ref.rollout.rollout``."""

    def sequence_logprobs(self, params, tokens, mask, prompt_len, alpha=1.0, eps=0.0):
        """(B, T): ``rlhf_ref.reinforce.sequence_logprobs``."""

    def reinforce_loss_and_grad(self, params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None,
                                ref_logp=None, *, group=None, old_logp=None, old_values=None) -> tuple[dict, dict]:
        """The RL training step (forward and backward), ``rlhf_ref.reinforce.loss_and_grad``: ``out``
        holds at least action_mask, logp, ref_logp, entropy, kl, rewards, returns, baseline,
        advantages, ratio, weights, loss_pg, loss_ent, loss_value, loss_kl, loss (and values or
        qvalues; it may omit the (B, T, V) arrays scores/logq); ``grads`` has exactly the keys of
        params. group (B,) int: the rows' prompt ids (baseline group_mean/group_loo); old_logp (B, T):
        the sampling policy's log-probs (surrogate ppo_clip; None: ratio 1); old_values (B, T): the
        value head at sampling time (value_clip > 0)."""

    def sft_loss_and_grad(self, params, tokens, mask) -> tuple[dict, dict]:
        """(out {"logp", "loss"}, grads): ``rlhf_ref.sft.loss_and_grad``."""

    def reward_forward(self, params, tokens, mask):
        """(B,) rewards: ``rlhf_ref.reward_model.forward`` without its cache."""

    def bt_loss_and_grad(self, params, chosen, chosen_mask, rejected, rejected_mask,
                         margin=None) -> tuple[dict, dict]:
        """(out, grads): ``rlhf_ref.reward_model.bt_loss_and_grad``."""


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"backend {name!r} is unavailable: {reason}")


class Status(NamedTuple):
    """A backend's availability: ``(available, reason)``; reason is None when available."""

    available: bool
    reason: str | None

    def __str__(self):
        return "available" if self.available else f"unavailable: {self.reason}"


def _hint(name: str) -> str:
    extra = EXTRAS.get(name)
    return f" (pip install 'rlhf-ref[{extra}]')" if extra else ""


def _import_reason(name: str, modname: str, e: BaseException) -> str:
    """A human reason from the exception that importing a backend's module raised."""
    missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
    if missing is None and isinstance(e, ImportError):   # `from pkg import sub`: "cannot import name 'sub' from 'pkg'"
        m = re.match(r"cannot import name '(\w+)' from '([\w.]+)'", str(e))
        if m and m.group(2).startswith("rlhf_ref"):
            missing = f"{m.group(2)}.{m.group(1)}"
    msg = f"{type(e).__name__}: {e}"
    halted = "halted" in str(e)          # sys.modules[x] = None: present but blocked, not "not installed"
    if missing == modname:
        return f"not implemented in this build ({modname} does not exist)"
    if missing and missing.startswith("rlhf_ref._core.") and missing.endswith("_cy"):
        return f"compiled extension {missing} not built (install with a C compiler and Cython; see setup.py)"
    if missing and not halted:
        top = missing.split(".")[0]
        if top == "rlhf_ref":
            return f"module {missing} is missing: {msg}"
        return f"{top} not installed{_hint(name)}"
    top = (missing or "").split(".")[0]
    return f"{top or modname} import failed: {msg}"


def _load(name: str):
    """(module, None) or (None, reason)."""
    if name not in MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)} or 'auto'")
    modname = MODULES[name]
    try:
        return importlib.import_module(modname), None
    except Exception as e:
        return None, _import_reason(name, modname, e)


def status(name: str) -> Status:
    """Whether backend ``name`` can run here, and if not, why (probes it now)."""
    mod, why = _load(name)
    if mod is None:
        return Status(False, why)
    probe = getattr(mod, "probe", None)
    if probe is None:
        return Status(False, f"{mod.__name__} has no probe() (an incomplete backend module)")
    try:
        why = probe()
    except Exception as e:
        return Status(False, f"probe() failed: {type(e).__name__}: {e}")
    if why is None:
        return Status(True, None)
    return Status(False, str(why))


def available() -> dict[str, Status]:
    """``{name: Status(available, reason)}`` for every backend, in NAMES order (probes each one)."""
    return {name: status(name) for name in NAMES}


def auto_order(job: str = "train", batch_size: int | None = None, gpu: bool = False) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``job``, fastest first; the first available one is used.

    This one function is the whole policy:

    * ``train``   (the training steps: RL, SFT, reward model): cython, numba, numpy.
    * ``rollout`` (sampling and scoring): cython, numba, numpy; with a real GPU (``gpu=True``,
      never the simulator) and ``batch_size >= CUDA_MIN_BATCH``, cuda first. One row at a time
      is latency-bound, and a kernel launch plus the host-device copies only pay at large B.

    Compiled before NumPy because the reference spends its time in small per-step matrix
    products where Python's overhead dominates; Cython before Numba because it has no JIT warm-up.
    benchmarks/ (``python -m benchmarks``) measures the backends side by side.
    """
    if job not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {job!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 0):
        raise ValueError(f"batch_size must be a non-negative int or None, got {batch_size!r}")
    order = ("cython", "numba", "numpy")
    if job == "rollout" and gpu and batch_size is not None and batch_size >= CUDA_MIN_BATCH:
        order = ("cuda",) + order
    return order


def _implements(mod, fn: str) -> bool:
    return fn in getattr(mod, "IMPLEMENTED", INTERFACE) and callable(getattr(mod, fn, None))


def _cuda_sim() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "").strip() not in ("", "0")


def get(name: str = "auto", job: str = "train", batch_size: int | None = None):
    """The backend module for ``name`` ("numpy", "cython", "numba", "cuda" or "auto").

    An explicit name that cannot run here raises ``BackendUnavailable`` with the reason.
    ``"auto"`` returns the first available backend of ``auto_order(job, batch_size, gpu)`` that
    implements every function ``job`` needs (``JOBS``); numpy always qualifies.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    if job not in JOBS:
        raise ValueError(f"job must be one of {sorted(JOBS)}, got {job!r}")
    if name != "auto":
        if name not in MODULES:
            raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(NAMES)} or 'auto'")
        st = status(name)
        if not st.available:
            raise BackendUnavailable(name, st.reason)
        return _load(name)[0]
    gpu = False
    if job == "rollout" and batch_size is not None and batch_size >= CUDA_MIN_BATCH and not _cuda_sim():
        gpu = status("cuda").available
    why_not = []
    for cand in auto_order(job, batch_size, gpu):
        st = status(cand)
        if not st.available:
            why_not.append(f"{cand}: {st.reason}")
            continue
        mod = _load(cand)[0]
        lacking = [f for f in JOBS[job] if not _implements(mod, f)]
        if lacking:
            why_not.append(f"{cand}: does not implement {', '.join(lacking)}")
            continue
        return mod
    raise BackendUnavailable("auto", f"no backend can run job {job!r}: " + "; ".join(why_not))


def table(statuses: dict[str, Status] | None = None) -> list[tuple[str, str, str]]:
    """Rows ``(name, "yes"/"no", reason or module)`` for printing (``rlhf-ref info``)."""
    statuses = available() if statuses is None else statuses
    return [(n, "yes" if st.available else "no", MODULES[n] if st.available else st.reason)
            for n, st in statuses.items()]
