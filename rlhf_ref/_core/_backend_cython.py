"""The ``cython`` backend: public wrappers that validate, allocate and launch the ``_*_cy`` kernels.

Interface: ``docs/internals.md`` (the backend interface). Every function validates its arguments
with the reference's own checks (``_validate``, ``lstm.check_model``, ``model.prepare``,
``rollout.check_rollout_args``, ``ReinforceConfig``, ``reward_model._prepare``) before any
kernel runs, in the reference's order (so a bad input raises the reference's error), computes in
the dtype of ``params`` (float32 or float64) and returns the reference's keys
(``reinforce_loss_and_grad`` omits the (B, T, V) arrays ``scores`` and ``logq``). Every buffer
is allocated here with NumPy and filled by the kernels, which run with the GIL released.

Kernel modules (twins of the reference; built by setup.py from ``rlhf_ref/_core/*.pyx``):

    _lstm_cy      lstm.py: the body forward / BPTT over a time-major batch, the linear heads
    _lstm_cy.pxd  the LSTM cell of one row, forward and backward
    _policy_cy    policy.py for one row of scores (a .pxd of inline functions)
    _train_cy     reinforce.py, returns.py, sft.py: the per-position passes and the per-token chain
    _rollout_cy   rollout.py: the whole sampling loop in one call
    _common_cy    exp/tanh/sigmoid (vectorisable, a few ulp), the small-M product, the row-major
                  BLAS wrappers (.pxd)

The matrix products go to SciPy's BLAS (``scipy.linalg.cython_blas``), which the extensions
import when they load: SciPy is a runtime need of this backend. The reward model's heads and the
Bradley–Terry loss (a few (B,) vectors) stay in NumPy.

Work memory: the large work buffers (gates, cell and hidden states, logits, ...) are kept per
thread between calls and reused by later calls of the same shapes (``_Workspace``): a training
loop then allocates nothing large per step and never page-faults its work memory.
``workspace_nbytes()`` says how much is kept (tracemalloc sees a buffer only in the call that
allocates it), ``clear_workspace()`` frees it.

Threads: the kernels parallelise with OpenMP, coarsely: the recurrences (forward, BPTT, the
sampling loop) cut the batch into blocks of rows that run through all T steps on their own
threads, with no synchronisation per step; the whole-sequence products are split by blocks of
their output; the per-position policy passes by positions. Every BLAS call inside runs
single-threaded: while a backend function runs, every OpenBLAS in the process is set to one thread
and restored afterwards (``_call``; OpenBLAS's own threading of the many small per-step
products costs a hand-off per call, and under load a time slice per call). Every entry is
computed by one thread in a fixed order, so one seed, one backend and one thread count give
bit-identical results (tests/test_cython_backend.py). OMP_NUM_THREADS sets the thread count.

OpenMP's idle threads: unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set, the extensions load their
OpenMP runtime with OMP_WAIT_POLICY=passive (the variable is set only while they load, when
libgomp reads it, and removed again; it has no effect when libgomp was already loaded). GCC's
default lets a thread that finished a parallel region spin for a while: on a 2-core machine shared
with other work, measured here, the spinning thread competed with the thread doing the serial part
and a B = 16 training step took 109 ms instead of 5 (B = 256: 985 ms instead of 875).

``probe()`` says why the backend cannot run (the extensions were not built, or SciPy is missing);
importing this module never fails: the extensions load on first use.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import model, policy, reinforce, sft
from .._validate import as_float_array, check_finite_result

NAME = "cython"
EXTENSIONS = ("_lstm_cy", "_train_cy", "_rollout_cy")
_K = None                   # the loaded extension modules (a namespace), after _load()


def probe():
    """None when the cython backend can run here, else the reason it cannot."""
    try:
        _load()
    except ModuleNotFoundError as e:
        name = e.name or ""
        if name.startswith("rlhf_ref._core."):
            return (f"compiled extension {name} not built (pip install needs a C compiler and Cython; "
                    f"see setup.py)")
        if name.split(".")[0] == "scipy":
            return "scipy not installed (the Cython kernels call SciPy's BLAS): pip install 'rlhf-ref[cython]'"
        return f"compiled extensions failed to import: {type(e).__name__}: {e}"
    except Exception as e:                       # a stale or broken build, an ABI mismatch, ...
        return f"compiled extensions failed to import: {type(e).__name__}: {e}"
    return None


def _load():
    global _K
    if _K is None:
        import importlib
        import os
        from types import SimpleNamespace
        # OpenMP's idle threads sleep instead of spinning, unless the user chose (see the module
        # docstring): set only while the extensions load, when libgomp reads it.
        passive = not any(v in os.environ for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
        if passive:
            os.environ["OMP_WAIT_POLICY"] = "passive"
        try:
            mods = {m: importlib.import_module(f"{__package__}.{m}") for m in EXTENSIONS}
        finally:
            if passive:
                os.environ.pop("OMP_WAIT_POLICY", None)
        _K = SimpleNamespace(lstm=mods["_lstm_cy"], train=mods["_train_cy"], rollout=mods["_rollout_cy"])
    return _K


def _require():
    if _K is None:
        why = probe()
        if why is not None:
            raise RuntimeError(f"the cython backend is unavailable: {why}")
    return _K


def openmp():
    """(compiled with OpenMP, the OpenMP thread count) of the extensions."""
    return _require().lstm.openmp()


#: the per-step products of blocks of SMM_MIN_ROWS..SMM_MAX_ROWS rows use the kernels' own small
#: matrix product (as _common_cy.pxd's use_smm decides), which reads the weights transposed
SMM_MIN_ROWS, SMM_MAX_ROWS = 4, 64
#: rows per block below which the recurrences are not split over threads
MIN_ROWS_PER_THREAD = 4
#: the per-position policy passes are split from this many score entries (T·B·V) on
PARALLEL_MIN_ENTRIES = 1 << 17


def _nthreads():
    """OpenMP threads to use: 1 without OpenMP, or when OpenBLAS's threads cannot be controlled
    (then BLAS keeps its own threading and the kernels run serially around it)."""
    omp, n = _require().lstm.openmp()
    if not omp or n < 2 or not _blas_controls():
        return 1
    return int(n)


def _chunks(B, nt):
    """Blocks of rows for a recurrence over B rows."""
    return max(1, min(nt, B // MIN_ROWS_PER_THREAD))


def _pass_threads(entries, nt):
    return nt if entries >= PARALLEL_MIN_ENTRIES else 1


_BLAS = None


def _blas_controls():
    """[(get_num_threads, set_num_threads)] of every OpenBLAS loaded in the process (found once)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = _find_openblas()
    return _BLAS


def _find_openblas():
    import ctypes
    found, seen = [], set()
    paths = []
    try:
        with open("/proc/self/maps") as f:          # Linux: the shared objects mapped in this process
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and "openblas" in parts[-1].lower() and parts[-1] not in seen:
                    seen.add(parts[-1])
                    paths.append(parts[-1])
    except OSError:
        pass
    for path in paths:
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


class _Workspace(threading.local):
    """The large work buffers of this thread, kept between calls (per thread: calls from several
    threads never share one). A buffer is reused when a later call asks for the same name, shape
    and dtype, so repeated steps of one shape allocate nothing big and never page-fault their work
    memory (fresh pages cost the kernel a zeroing: 15 % of a B = 256 training step when every
    call allocated anew). At the end of each outermost call, buffers that neither this call nor
    the previous one used are dropped, so what stays is one or two calls' work memory."""

    def __init__(self):
        self.bufs = {}          # (name, shape, dtype) -> [array, last call it was used in]
        self.calls = 0
        self.depth = 0

    def get(self, name, shape, dt):
        key = (name, shape, dt)
        ent = self.bufs.get(key)
        if ent is None:
            ent = self.bufs[key] = [np.empty(shape, dt), 0]
        ent[1] = self.calls
        return ent[0]

    def prune(self):
        old = [k for k, ent in self.bufs.items() if ent[1] < self.calls - 1]
        for k in old:
            del self.bufs[k]

    def nbytes(self):
        return sum(ent[0].nbytes for ent in self.bufs.values())


_WS = _Workspace()
_DEFAULT_CFG = None


def workspace_nbytes():
    """Bytes of work memory this thread keeps between calls (see ``_Workspace``)."""
    return _WS.nbytes()


def clear_workspace():
    """Free this thread's kept work buffers."""
    _WS.bufs.clear()


_BLAS_LOCK = threading.Lock()
_BLAS_SAVED = []            # [(set_num_threads, count before)] while some call runs
_BLAS_USERS = 0             # calls running now, over all threads


class _call:
    """Context of one backend call: every OpenBLAS of the process runs single-threaded inside, and
    the thread's workspace is pruned when its outermost call ends. The thread counts are saved by
    the first call to start (over all Python threads) and restored by the last one to end, so
    concurrent calls cannot leave OpenBLAS at one thread."""

    __slots__ = ()

    def __enter__(self):
        global _BLAS_USERS
        ws = _WS
        if ws.depth == 0:
            ws.calls += 1
        ws.depth += 1
        with _BLAS_LOCK:
            if _BLAS_USERS == 0:
                _BLAS_SAVED[:] = [(put, get()) for get, put in _blas_controls()]
                for put, n in _BLAS_SAVED:
                    if n != 1:
                        put(1)
            _BLAS_USERS += 1
        return self

    def __exit__(self, *exc):
        global _BLAS_USERS
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0:
                for put, n in _BLAS_SAVED:
                    if n != 1:
                        put(n)
                _BLAS_SAVED.clear()
        ws = _WS
        ws.depth -= 1
        if ws.depth == 0:
            ws.prune()
        return False


# ----------------------------------------------------------------------------- shared pieces

def _c(a, dt):
    return np.ascontiguousarray(a, dtype=dt)


def _dtype(params):
    return params["lstm.weight_hh_l0"].dtype


def _empty(dt):
    return np.empty((0, 0), dt)


def _head_stack(params, names, dt, pad=16):
    """The heads ``names`` that params has, stacked and padded with zero rows to a multiple of
    ``pad`` (aligned rows of logits; BLAS runs faster on them): Wc (K, H), bc (K,), and
    {name: (offset, rows)}."""
    Ws, bs, off, k = [], [], {}, 0
    for n in names:
        if f"{n}.weight" in params:
            W = params[f"{n}.weight"]
            Ws.append(W)
            bs.append(params[f"{n}.bias"])
            off[n] = (k, W.shape[0])
            k += W.shape[0]
    K = -(-k // pad) * pad
    H = Ws[0].shape[1]
    Wc, bc = np.zeros((K, H), dt), np.zeros(K, dt)
    k = 0
    for W, b in zip(Ws, bs):
        Wc[k:k + W.shape[0]] = W
        bc[k:k + W.shape[0]] = b
        k += W.shape[0]
    return Wc, bc, off


class _Body:
    """The LSTM body's forward pass over a batch and its buffers (time-major); ``backward``.

    ``steps`` tokens of each row are fed (default all T): the policy's heads read hs[0:T], the
    states *before* each token, so the state after the last token, and its step, is needed only
    by the reward model (the step is skipped for the policy; it would add nothing to a gradient).
    """

    def __init__(self, K, params, tokens, mask, dt, nt, steps=None):
        self.K, self.dt, self.nt = K, dt, nt
        self.E = _c(params["embedding.weight"], dt)
        self.W_ih = _c(params["lstm.weight_ih_l0"], dt)
        self.W_hh = _c(params["lstm.weight_hh_l0"], dt)
        b_ih, b_hh = _c(params["lstm.bias_ih_l0"], dt), _c(params["lstm.bias_hh_l0"], dt)
        V, Ed = self.E.shape
        G, H = self.W_hh.shape
        B, T = tokens.shape
        T = T if steps is None else steps
        self.B, self.T, self.H, self.G, self.V = B, T, H, G, V
        self.lengths = np.ascontiguousarray(np.minimum(mask.sum(axis=1), T), dtype=np.int64)
        self.ids = np.ascontiguousarray(tokens[:, :T].T, dtype=np.int64)    # (T, B); read at real positions only
        n = max(1, min(V, B * T))                                            # ≥ the number of distinct ids
        ws = _WS
        self.slot, self.uids = ws.get("slot", (V,), np.int64), ws.get("uids", (n,), np.int64)
        self.Xu, self.P = ws.get("Xu", (n, Ed), dt), ws.get("P", (n, G), dt)
        self.gates = ws.get("gates", (T, B, G), dt)
        self.cs = ws.get("cs", (T + 1, B, H), dt)
        self.hs = ws.get("hs", (T + 1, B, H), dt)
        self.nchunks = _chunks(B, nt)
        WT = ws.get("WT", (H, G), dt)
        self.U = K.lstm.forward(self.E, self.W_ih, self.W_hh, WT, b_ih, b_hh, self.ids, self.lengths, self.slot,
                                self.uids, self.Xu, self.P, self.gates, self.cs, self.hs, nt, self.nchunks)

    def backward(self, dHS=None, dh_final=None):
        """BPTT from ∂L/∂hs[0:n] (n·B, H) and/or ∂L/∂hs[T] (B, H); the body's grads dict."""
        dt, B, H, G = self.dt, self.B, self.H, self.G
        dh = _WS.get("dh", (B, H), dt)
        dh[...] = 0 if dh_final is None else dh_final
        dc = _WS.get("dc", (B, H), dt)
        dc[...] = 0
        dE, dW_ih = np.empty_like(self.E), np.empty_like(self.W_ih)
        dW_hh, db = np.empty_like(self.W_hh), np.empty(G, dt)
        self.K.lstm.backward(self.E, self.W_ih, self.W_hh, self.ids, self.lengths, self.slot, self.uids, self.U,
                             self.Xu, self.P, self.gates, self.cs, self.hs, _empty(dt) if dHS is None else dHS,
                             dh, dc, _WS.get("tmp", (B, H), dt), dE, dW_ih, dW_hh, db, self.nt, self.nchunks)
        return {"embedding.weight": dE, "lstm.weight_ih_l0": dW_ih, "lstm.weight_hh_l0": dW_hh,
                "lstm.bias_ih_l0": db, "lstm.bias_hh_l0": db.copy()}


class _Net(_Body):
    """The body plus the stacked heads ``names``: logits (T·B, K) at every position (rows t·B + b),
    from hs[0:T] (T − 1 steps: the state after the last token is read by no head)."""

    def __init__(self, K, params, tokens, mask, dt, nt, names):
        Tpos = tokens.shape[1]
        super().__init__(K, params, tokens, mask, dt, nt, steps=max(Tpos - 1, 0))
        self.Tpos = Tpos
        self.ids_pos = np.ascontiguousarray(tokens.T, dtype=np.int64)       # (T, B): the action at each position
        self.Wc, self.bc, self.off = _head_stack(params, names, dt)
        self.logits = _WS.get("logits", (Tpos * self.B, self.Wc.shape[0]), dt)
        K.lstm.linear(self.HS(), self.Wc, self.bc, self.logits, nt)

    def HS(self):
        """hs[0:T] as (T·B, H): row t·B + b is the state position t's token is chosen in."""
        return self.hs[:self.Tpos].reshape(self.Tpos * self.B, self.H)

    def column(self, name, pm):
        """A one-column head's output (B, T), 0 off the position mask pm."""
        k0 = self.off[name][0]
        return self.logits[:, k0].reshape(self.Tpos, self.B).T * pm

    def block(self, name, pm):
        """A V-column head's output (B, T, V), 0 off the position mask pm."""
        k0, k = self.off[name]
        L3 = self.logits[:, k0:k0 + k].reshape(self.Tpos, self.B, k).transpose(1, 0, 2)
        return L3 * pm[:, :, None].astype(self.dt)

    def backward_all(self, params):
        """∂L/∂logits is in self.logits (the gradient pass wrote it there); grads with params' keys."""
        dt = self.dt
        dWc, dbc = _WS.get("dWc", self.Wc.shape, dt), _WS.get("dbc", self.bc.shape, dt)
        dHS = _WS.get("dHS", (self.Tpos * self.B, self.H), dt)
        self.K.lstm.linear_backward(self.HS(), self.Wc, self.logits, self.B, dWc, dbc, dHS, self.nt)
        grads = self.backward(dHS=dHS)
        for n, (k0, k) in self.off.items():
            grads[f"{n}.weight"] = dWc[k0:k0 + k].copy()
            grads[f"{n}.bias"] = dbc[k0:k0 + k].copy()
        return _complete(grads, params, dt)


def _complete(grads, params, dt):
    """Every key of params, in params' order; a head the loss does not reach gets 0."""
    return {k: (grads[k] if k in grads else np.zeros(v.shape, dt)) for k, v in params.items()}


def _stats(K, net, sel, V, alpha, eps, has_q=False, qoff=0):
    """Pass 1 at the positions sel (B, T): logp, ent, qb, mx, s1, plq, each (B, T) float64."""
    B, T = sel.shape
    outs = [np.empty((B, T)) for _ in range(6)]
    nt = _pass_threads(T * B * V, net.nt)
    K.train.policy_stats(net.logits, net.ids_pos, sel, V, float(alpha), float(eps), qoff, has_q, *outs,
                         np.empty((nt, V), net.dt), nt)
    return outs


# ----------------------------------------------------------------------------- rollout

def rollout(params, prompt_tokens, prompt_len, u, alpha=1.0, eps=0.0, kind="boltzmann", eos_id=2,
            ref_params=None, values=False):
    """``rlhf_ref.rollout.rollout`` in one kernel call; same arguments, same keys."""
    from ..rollout import check_rollout_args, check_status
    tok, pl, u, V = check_rollout_args(params, prompt_tokens, prompt_len, u, alpha, eps, kind, eos_id,
                                       ref_params, values)
    K = _require()
    dt = _dtype(params)
    B, T = tok.shape
    tokens = np.ascontiguousarray(np.where(np.arange(T)[None, :] < pl[:, None], tok, 0), dtype=np.int64)
    mask, am, logp = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
    ref_logp = np.zeros((B, T)) if ref_params is not None else None
    vals = np.zeros((B, T)) if values else None
    out = {"tokens": tokens, "mask": mask, "action_mask": am, "logp": logp}
    if ref_params is not None:
        out["ref_logp"] = ref_logp
    if values:
        out["values"] = vals
    if B == 0 or T == 0:
        return out
    with _call():
        nt = _nthreads()
        nch = _chunks(B, nt)
        ws = _WS

        def prep(p, tag):
            E, W_ih = _c(p["embedding.weight"], dt), _c(p["lstm.weight_ih_l0"], dt)
            W_hh = _c(p["lstm.weight_hh_l0"], dt)
            P = ws.get("P" + tag, (E.shape[0], W_hh.shape[0]), dt)
            K.lstm.input_table(E, W_ih, _c(p["lstm.bias_ih_l0"], dt), _c(p["lstm.bias_hh_l0"], dt), P, nt)
            return P, W_hh, transposed(W_hh, "WT" + tag)

        def transposed(W, name):
            if not smm_rows:
                return _empty(dt)
            out = ws.get(name, W.shape[::-1], dt)
            K.lstm.transpose(W, out)
            return out

        smm_rows = any(SMM_MIN_ROWS <= n <= SMM_MAX_ROWS for n in (B // nch, -(-B // nch)))
        P, W_hh, WT = prep(params, "")
        Wc, bc, _ = _head_stack(params, ("head", "value") if values else ("head",), dt)
        WcT = transposed(Wc, "WcT")
        H, G, Kc = W_hh.shape[1], W_hh.shape[0], Wc.shape[0]
        has_ref = ref_params is not None
        if has_ref:
            Pr, W_hhr, WTr = prep(ref_params, "r")
            Wcr, bcr, _ = _head_stack(ref_params, ("head",), dt)
            WcTr = transposed(Wcr, "WcTr")
            Hr, Kr = W_hhr.shape[1], Wcr.shape[0]
        else:
            Pr, W_hhr, WTr, Wcr, WcTr, bcr = (_empty(dt),) * 5 + (np.empty(0, dt),)
            Hr = Kr = 0
        K.rollout.rollout(P, W_hh, WT, Wc, WcT, bc, bool(values), Pr, W_hhr, WTr, Wcr, WcTr, bcr, has_ref,
                          tokens, pl, np.ascontiguousarray(u, dtype=np.float64), int(V), float(alpha), float(eps),
                          K.rollout.KIND_CODES[kind], int(eos_id), mask, am, logp,
                          ref_logp if has_ref else _empty(np.float64), vals if values else _empty(np.float64),
                          ws.get("h", (B, H), dt), ws.get("c", (B, H), dt), ws.get("cn", (B, H), dt),
                          ws.get("a", (B, G), dt), ws.get("z", (B, Kc), dt), ws.get("hr", (B, Hr), dt),
                          ws.get("cr", (B, Hr), dt), ws.get("cnr", (B, Hr), dt), ws.get("ar", (B, 4 * Hr), dt),
                          ws.get("zr", (B, Kr), dt), ws.get("e", (nch, V), dt), ws.get("done", (B,), np.uint8), nch)
    check_status(tokens, alpha, kind, dt)              # issue 10: no policy at some state -> the reference's error
    return out


# ----------------------------------------------------------------------------- log-probs

def sequence_logprobs(params, tokens, mask, prompt_len, alpha=1.0, eps=0.0, *, _name="params"):
    """``rlhf_ref.reinforce.sequence_logprobs``: log π_ε of the produced tokens (B, T), 0 off the action mask."""
    from ..policy import check_policy_args
    check_policy_args(alpha, eps)
    V, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, name=_name)
    K = _require()
    dt = _dtype(params)
    policy.check_alpha_dtype(alpha, dt, _name)           # issue 10: also when B or T is 0, as the reference
    am = model.action_mask(mask, prompt_len)
    B, T = tokens.shape
    if B == 0 or T == 0:
        return np.zeros((B, T), dt)
    with _call():
        net = _Net(K, params, tokens, mask, dt, _nthreads(), ("head",))
        logp, _, _, mx, s1, _ = _stats(K, net, am, V, alpha, eps)
        policy.check_rows(np.isfinite(mx) & np.isfinite(s1), am, alpha, "boltzmann", _name, dt)   # issue 10
    # the reference's dtype: params' for ε = 0; float64 for ε > 0 (its ε-mixture promotes)
    return logp.astype(dt if eps == 0 else np.float64)


# ----------------------------------------------------------------------------- REINFORCE

def reinforce_loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None):
    """``rlhf_ref.reinforce.loss_and_grad`` (without term_grads and the (B, T, V) arrays scores/logq)."""
    from .. import reinforce
    global _DEFAULT_CFG
    if cfg is None:
        if _DEFAULT_CFG is None:
            _DEFAULT_CFG = reinforce.ReinforceConfig()          # frozen: one instance serves every call
        cfg = _DEFAULT_CFG
    if not isinstance(cfg, reinforce.ReinforceConfig):
        raise TypeError(f"cfg must be a ReinforceConfig, got {type(cfg).__name__}")
    V, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, ("head", cfg.critic))
    policy.check_alpha_dtype(cfg.alpha, _dtype(params))                   # issue 10: the reference's order
    B, T = tokens.shape
    reward = as_float_array(reward, "reward", ndim=1, shape=(B,)).astype(np.float64)
    am = model.action_mask(mask, prompt_len)
    n_row = np.count_nonzero(am > 0, axis=1)
    N = int(n_row.sum())
    if N == 0:
        raise ValueError("the batch has no action (action_mask is all 0): the loss is undefined")
    if (ref_params is None) == (ref_logp is None):
        raise ValueError("give exactly one of ref_params (a policy dict) or ref_logp (B, T)")
    if ref_params is not None:
        reinforce.check_ref_params(ref_params, V)                # issue 10: as the reference
        ref_logp = sequence_logprobs(ref_params, tokens, mask, prompt_len, cfg.alpha, cfg.eps, _name="ref_params")
    else:
        ref_logp = as_float_array(ref_logp, "ref_logp", shape=(B, T))
    ref_logp = np.ascontiguousarray(np.where(am > 0, ref_logp, 0.0), dtype=np.float64)
    if cfg.baseline == "loo" and np.count_nonzero(n_row) < 2:
        raise ValueError(f"baseline='loo' needs at least two rows with an action, got {np.count_nonzero(n_row)}")
    if cfg.whiten == "bessel" and N < 2:
        raise ValueError(f"whiten='bessel' needs two or more actions, got {N}")
    K = _require()
    with _call():
        return _reinforce(K, params, tokens, mask, am, reward, ref_logp, cfg, V)


def _reinforce(K, params, tokens, mask, am, reward, ref_logp, cfg, V):
    dt = _dtype(params)
    B, T = tokens.shape
    Tr = K.train

    # forward: body and every head present; pass 1 at the actions
    net = _Net(K, params, tokens, mask, dt, _nthreads(), ("head", "value", "qvalue"))
    critic_q = cfg.critic == "qvalue"
    qoff = net.off["qvalue"][0] if "qvalue" in net.off else 0
    logp, ent, qb, mx, s1, plq = _stats(K, net, am, V, cfg.alpha, cfg.eps, critic_q, qoff)
    policy.check_rows(np.isfinite(mx) & np.isfinite(s1), am, cfg.alpha, "boltzmann", "params", dt)   # issue 10
    pm = model.position_mask(mask)
    values = net.column("value", pm) if "value" in net.off else None
    qvalues = net.block("qvalue", pm) if "qvalue" in net.off else None
    pred_q = np.zeros((B, T))
    if critic_q:
        pred_q = np.where(am > 0, np.take_along_axis(qvalues, tokens[:, :, None], -1)[:, :, 0], 0.0)

    # KL-shaped rewards, returns, baseline, advantages, the losses and their upstream gradients
    kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred = (np.empty((B, T)) for _ in range(10))
    loss_pg, loss_ent, loss_value = Tr.reinforce_chain(
        logp, ref_logp, am, reward, np.zeros((B, T)) if values is None else _c(values, np.float64), qb,
        _c(pred_q, np.float64), critic_q, float(cfg.beta), Tr.KL_CODES[cfg.kl], float(cfg.gamma),
        Tr.RETURN_CODES[cfg.returns], Tr.BASELINE_CODES[cfg.baseline], Tr.WHITEN_CODES[cfg.whiten],
        bool(cfg.shift_mean), Tr.AGG_CODES[cfg.aggregation], float(cfg.entropy_coef), float(cfg.value_coef), ent,
        kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred)

    # pass 3: ∂L/∂logits in place, then the backward pass
    Tr.policy_grads(net.logits, net.ids_pos, am, V, float(cfg.alpha), float(cfg.eps), mx, s1, logp, plq,
                    d_logp, d_ent, d_pred, net.off[cfg.critic][0], critic_q,
                    _pass_threads(T * B * net.logits.shape[1], net.nt))
    grads = net.backward_all(params)

    out = reinforce.pack_outputs(dt, am, logp, ref_logp, ent, kl, rewards, G, values, qvalues, bl, adv, w,
                                 loss_pg, loss_ent, loss_value)
    check_finite_result(dt, out["loss"], out["rewards"], out["returns"], *grads.values())   # issue 10: overflow
    return out, grads


# ----------------------------------------------------------------------------- SFT

def sft_loss_and_grad(params, tokens, mask):
    """``rlhf_ref.sft.loss_and_grad``: next-token cross-entropy, token mean over real t ≥ 1."""
    tokens, mask, pm, n_real = sft.prepare(params, tokens, mask)
    K = _require()
    dt = _dtype(params)
    V = params["head.weight"].shape[0]
    with _call():
        net = _Net(K, params, tokens, mask, dt, _nthreads(), ("head",))
        logp, ent, qb, mx, s1, plq = _stats(K, net, pm, V, 1.0, 0.0)
        policy.check_rows(np.isfinite(mx) & np.isfinite(s1), pm, 1.0, "boltzmann", "params", dt)   # issue 10
        d_logp = np.empty_like(logp)
        loss = K.train.sft_chain(logp, pm, d_logp)
        zero = np.zeros_like(logp)
        K.train.policy_grads(net.logits, net.ids_pos, pm, V, 1.0, 0.0, mx, s1, logp, plq, d_logp, zero, zero, -1,
                             False, _pass_threads(net.Tpos * net.B * V, net.nt))
        grads = net.backward_all(params)
    check_finite_result(dt, loss, *grads.values())                  # issue 10: an overflow is the reference's error
    return {"logp": logp.astype(dt), "loss": loss, "n_real": n_real}, grads


# ----------------------------------------------------------------------------- reward model

def _reward_net(K, params, tokens, mask, dt):
    body = _Body(K, params, tokens, mask, dt, _nthreads())
    h_last = body.hs[body.T]                    # carried over padding: each row's state after its last token
    r = h_last @ _c(params["reward.weight"], dt)[0] + _c(params["reward.bias"], dt)[0]
    return body, h_last, r


def reward_forward(params, tokens, mask):
    """``rlhf_ref.reward_model.forward``'s rewards (B,), read at each row's last real token."""
    from ..reward_model import _prepare
    tokens, mask = _prepare(params, tokens, mask, "tokens")
    K = _require()
    dt = _dtype(params)
    if tokens.shape[0] == 0:
        return np.zeros(0, dt)
    with _call():
        return _reward_net(K, params, tokens, mask, dt)[2]


def bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """``rlhf_ref.reward_model.bt_loss_and_grad``: one forward/backward over chosen and rejected stacked."""
    from ..reward_model import _prepare
    c_tok, c_mask = _prepare(params, chosen, chosen_mask, "chosen")
    r_tok, r_mask = _prepare(params, rejected, rejected_mask, "rejected")
    P = c_tok.shape[0]
    if r_tok.shape[0] != P:
        raise ValueError(f"chosen and rejected must have the same number of rows, got {P} and {r_tok.shape[0]}")
    if P == 0:
        raise ValueError("no preference pairs: the loss is undefined")
    m = np.zeros(P) if margin is None else as_float_array(margin, "margin", shape=(P,))
    K = _require()
    dt = _dtype(params)
    T = max(c_tok.shape[1], r_tok.shape[1])

    def pad(a):
        return np.pad(a, ((0, 0), (0, T - a.shape[1])))

    tokens = np.concatenate([pad(c_tok), pad(r_tok)], 0)
    mask = np.concatenate([pad(c_mask), pad(r_mask)], 0)
    with _call():
        body, h_last, r = _reward_net(K, params, tokens, mask, dt)
        r_c, r_r = r[:P], r[P:]
        delta = r_c - r_r - m
        loss = np.logaddexp(0.0, -delta).mean()
        # ∂L/∂Δ = −σ(−Δ)/P, with σ(−Δ) = exp(−logaddexp(0, Δ)) for stability
        d_delta = -np.exp(-np.logaddexp(0.0, delta)) / P
        dr = np.concatenate([d_delta, -d_delta])
        w_r = params["reward.weight"][0].astype(np.float64)
        grads = body.backward(dh_final=(dr[:, None] * w_r[None, :]).astype(dt))
    hl = h_last.astype(np.float64)
    grads["reward.weight"] = ((d_delta @ hl[:P]) + ((-d_delta) @ hl[P:]))[None, :].astype(dt)
    grads["reward.bias"] = np.array([d_delta.sum() + (-d_delta).sum()], dt)
    grads = _complete(grads, params, dt)
    check_finite_result(dt, r_c, r_r, loss, *grads.values())       # issue 10: an overflow is the reference's error
    out = {"reward_chosen": r_c, "reward_rejected": r_r, "delta": delta,
           "loss": loss, "accuracy": float(np.mean(r_c > r_r))}
    return out, grads
