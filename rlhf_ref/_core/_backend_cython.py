"""The ``cython`` backend: public wrappers that validate, allocate and launch the ``_*_cy`` kernels.

Interface: ``rlhf_ref.backends.Backend``. Every function validates its arguments with the
reference's own checks (``rollout.check_rollout_args``, ``model.prepare``, ``reinforce.prepare``,
``sft.prepare``, ``reward_model.prepare_pairs``) before any kernel runs (so a bad input raises
the reference's error); the host code shared with the numba backend is ``_host.py`` (codes,
heads, the BT reward head), ``_blas.py`` (BLAS threads) and ``_config.py`` (tuning). It computes in
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
and restored afterwards (``_call``, through ``_blas.one_thread``; OpenBLAS's own threading of the
many small per-step products costs a hand-off per call, and under load a time slice per call). Every entry is
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

from .. import model, policy, reinforce, reward_model, sft
from . import _blas, _config
from ._host import c as _c, complete, dtype as _dtype, head_stack, head_grads, CODES
from ._host import chain_codes, check_group_sd
from ._host import stack_pairs, reward_head_backward, reward_head_grads
from .._validate import check_finite_result

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


def _nthreads():
    """OpenMP threads to use: 1 without OpenMP, or when OpenBLAS's threads cannot be controlled
    (then BLAS keeps its own threading and the kernels run serially around it)."""
    omp, n = _require().lstm.openmp()
    if not omp or n < 2 or not _blas.controls():
        return 1
    return int(n)


def _chunks(B, nt):
    """Blocks of rows for a recurrence over B rows."""
    return max(1, min(nt, B // _config.CYTHON_MIN_ROWS_PER_THREAD))


def smm_rows(rows):
    """Whether the kernels run a per-step product over ``rows`` rows in their own small product
    (which reads the weights transposed): ``_common_cy.pxd``'s use_smm, in Python."""
    return (_config.CYTHON_SMM_MIN_ROWS <= rows <= _config.CYTHON_SMM_MAX_ROWS
            or (rows == 1 and _require().lstm.isa_clones()))


def _pass_threads(entries, nt):
    return nt if entries >= _config.CYTHON_PARALLEL_MIN_ENTRIES else 1


def _aligned_empty(shape, dt, align=64):
    """np.empty(shape, dt) starting on a cache line. NumPy aligns to 16 bytes; the kernels stream
    the rows of these buffers (the transposed weights, the input table) with 64-byte vector
    loads, and a load that straddles two lines costs two: the B = 1 rollout ran 10 % slower in
    processes where a buffer came out misaligned (measured)."""
    dt = np.dtype(dt)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(n + align, np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + n].view(dt).reshape(shape)


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
            ent = self.bufs[key] = [_aligned_empty(shape, dt), 0]
        ent[1] = self.calls
        return ent[0]

    def prune(self):
        old = [k for k, ent in self.bufs.items() if ent[1] < self.calls - 1]
        for k in old:
            del self.bufs[k]

    def nbytes(self):
        return sum(ent[0].nbytes for ent in self.bufs.values())


_WS = _Workspace()


def workspace_nbytes():
    """Bytes of work memory this thread keeps between calls (see ``_Workspace``)."""
    return _WS.nbytes()


def clear_workspace():
    """Free this thread's kept work buffers."""
    _WS.bufs.clear()


_ONE_BLAS_THREAD = _blas.one_thread()


class _call:
    """Context of one backend call: every OpenBLAS of the process runs single-threaded inside
    (``_blas.one_thread``, reference-counted over all Python threads), and the thread's workspace
    is pruned when its outermost call ends."""

    __slots__ = ()

    def __enter__(self):
        ws = _WS
        if ws.depth == 0:
            ws.calls += 1
        ws.depth += 1
        _ONE_BLAS_THREAD.__enter__()
        return self

    def __exit__(self, *exc):
        _ONE_BLAS_THREAD.__exit__(*exc)
        ws = _WS
        ws.depth -= 1
        if ws.depth == 0:
            ws.prune()
        return False


# ----------------------------------------------------------------------------- shared pieces

def _empty(dt):
    return np.empty((0, 0), dt)


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
        self.Wc, self.bc, self.off = head_stack(params, names, dt, pad=_config.CYTHON_HEAD_PAD)
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
        grads = head_grads(self.backward(dHS=dHS), self.off, dWc, dbc)
        return complete(grads, params, dt)


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
    tokens = np.array(tok, dtype=np.int64, order="C")     # a copy; the kernel writes PAD after the prompts
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
            if not use_smm:
                return _empty(dt)
            out = ws.get(name, W.shape[::-1], dt)
            K.lstm.transpose(W, out)
            return out

        use_smm = smm_rows(B // nch) or (B % nch != 0 and smm_rows(B // nch + 1))
        P, W_hh, WT = prep(params, "")
        pad = _config.CYTHON_HEAD_PAD
        if not values and params["head.weight"].shape[0] % pad == 0:
            # already aligned rows: params' own head as it is, no stacked copy
            Wc, bc = _c(params["head.weight"], dt), _c(params["head.bias"], dt)
        else:
            Wc, bc, _ = head_stack(params, ("head", "value") if values else ("head",), dt, pad)
        WcT = transposed(Wc, "WcT")
        H, G, Kc = W_hh.shape[1], W_hh.shape[0], Wc.shape[0]
        has_ref = ref_params is not None
        if has_ref:
            Pr, W_hhr, WTr = prep(ref_params, "r")
            Wcr, bcr, _ = head_stack(ref_params, ("head",), dt,
                                     1 if ref_params["head.weight"].shape[0] % _config.CYTHON_HEAD_PAD == 0
                                     else _config.CYTHON_HEAD_PAD)
            WcTr = transposed(Wcr, "WcTr")
            Hr, Kr = W_hhr.shape[1], Wcr.shape[0]
        else:
            Pr, W_hhr, WTr, Wcr, WcTr, bcr = (_empty(dt),) * 5 + (np.empty(0, dt),)
            Hr = Kr = 0
        K.rollout.rollout(P, W_hh, WT, Wc, WcT, bc, bool(values), Pr, W_hhr, WTr, Wcr, WcTr, bcr, has_ref,
                          tokens, pl, np.ascontiguousarray(u, dtype=np.float64), int(V), float(alpha), float(eps),
                          CODES["policy"][kind], int(eos_id), mask, am, logp,
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

def reinforce_loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None,
                            *, group=None, old_logp=None, old_values=None):
    """``rlhf_ref.reinforce.loss_and_grad`` (without term_grads and the (B, T, V) arrays scores/logq).

    Every convention, issue 9's included, runs in the kernel ``reinforce_chain``."""
    cfg, V, tokens, mask, prompt_len, reward, am, ref_logp, group, old_logp, old_values = reinforce.prepare(
        params, tokens, mask, prompt_len, reward, cfg, ref_params, ref_logp, logprobs=sequence_logprobs,
        group=group, old_logp=old_logp, old_values=old_values)
    reward = reward.astype(np.float64)
    ref_logp = np.ascontiguousarray(np.where(am > 0, ref_logp, 0.0), dtype=np.float64)
    K = _require()
    with _call():
        return _reinforce(K, params, tokens, mask, am, reward, ref_logp, cfg, V, group, old_logp, old_values)


def _reinforce(K, params, tokens, mask, am, reward, ref_logp, cfg, V, group=None, old_logp=None, old_values=None):
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
    kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred, ratio = (np.empty((B, T)) for _ in range(11))
    S, sd, has = np.empty(B), np.empty(B), np.empty(B, np.uint8)
    codes = chain_codes(cfg)
    v64 = np.zeros((B, T)) if values is None else np.ascontiguousarray(np.where(am > 0, values, 0.0), np.float64)
    loss_pg, loss_ent, loss_value, loss_kl = Tr.reinforce_chain(
        logp, ref_logp, am, reward, v64, qb, _c(pred_q, np.float64), critic_q, float(cfg.beta), codes["kl"],
        float(cfg.gamma), codes["returns"], codes["baseline"], codes["whiten"], bool(cfg.shift_mean),
        codes["aggregation"], float(cfg.entropy_coef), float(cfg.value_coef), ent,
        kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred,
        kl_in_loss=cfg.kl_in == "loss", lam=float(cfg.lam), group=group, gscale_code=codes["group_scale"],
        group_eps=float(cfg.group_eps), surr_code=codes["surrogate"], clip_low=float(cfg.clip_low),
        clip_high=float(cfg.clip_high), old_logp=old_logp, value_clip=float(cfg.value_clip), old_values=old_values,
        norm_len=float(cfg.norm_len), ratio=ratio, S=S, sd=sd, has=has)
    check_group_sd(cfg, am, group, sd)

    # pass 3: ∂L/∂logits in place, then the backward pass
    Tr.policy_grads(net.logits, net.ids_pos, am, V, float(cfg.alpha), float(cfg.eps), mx, s1, logp, plq,
                    d_logp, d_ent, d_pred, net.off[cfg.critic][0], critic_q,
                    _pass_threads(T * B * net.logits.shape[1], net.nt))
    grads = net.backward_all(params)

    out = reinforce.pack_outputs(am, logp, ref_logp, ent, kl, rewards, G, values, qvalues, bl, adv, w,
                                 loss_pg, loss_ent, loss_value, dt=dt, ratio=ratio, loss_kl=loss_kl)
    check_finite_result(dt, out["loss"], out["rewards"], out["returns"], *grads.values())   # an overflow is an error
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
    tokens, mask = reward_model._prepare(params, tokens, mask, "tokens")
    K = _require()
    dt = _dtype(params)
    if tokens.shape[0] == 0:
        return np.zeros(0, dt)
    with _call():
        return _reward_net(K, params, tokens, mask, dt)[2]


def bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """``rlhf_ref.reward_model.bt_loss_and_grad``: one forward/backward over chosen and rejected stacked."""
    c_tok, c_mask, r_tok, r_mask, m = reward_model.prepare_pairs(params, chosen, chosen_mask, rejected,
                                                                 rejected_mask, margin)
    P = c_tok.shape[0]
    K = _require()
    dt = _dtype(params)
    tokens, mask = stack_pairs(c_tok, c_mask, r_tok, r_mask)
    with _call():
        body, h_last, r = _reward_net(K, params, tokens, mask, dt)
        r_c, r_r = r[:P], r[P:]
        delta, loss, d_delta = reward_model.bt_head(r_c, r_r, m, dt)
        grads = body.backward(dh_final=reward_head_backward(d_delta, params, dt))
    grads = complete(reward_head_grads(grads, d_delta, h_last, dt), params, dt)
    check_finite_result(dt, *grads.values())                   # an overflow is the reference's error
    return reward_model.bt_outputs(r_c, r_r, delta, loss), grads
