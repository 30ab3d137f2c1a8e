"""The ``numba`` backend: public wrappers that validate, allocate and launch the ``_*_nb`` kernels.

Interface: ``docs/internals.md`` (the backend interface). Every function validates its arguments
with the reference's own checks (``_validate``, ``lstm.check_model``, ``model.prepare``,
``rollout.check_rollout_args``, ``ReinforceConfig``; the same messages) before any kernel runs,
computes in the dtype of ``params`` (float32 or float64) and returns the reference's keys.
Dtypes of the results: ``rollout`` returns the reference's float64 (B, T) arrays and
``sequence_logprobs`` the reference's dtype (params' dtype, float64 for ε > 0); the training
functions return their per-token arrays and every gradient in params' dtype and the losses as
Python floats. ``reinforce_loss_and_grad`` omits the (B, T, V) arrays ``scores`` and ``logq``
(allowed by the interface) and has no ``term_grads``. A ``ref_params`` of another float dtype is
rounded to params' dtype in ``rollout`` (the reference scores it in its own dtype).

Large buffers are allocated here with NumPy (so ``tracemalloc`` sees them) and filled by the
kernels; ``probe()`` says why the backend cannot run (numba or SciPy missing or broken);
importing this module never imports numba: the kernels load on first use.

Kernel files (twins of the reference): ``_lstm_nb`` (body), ``_model_nb`` (heads),
``_policy_nb`` (one row of the policy), ``_returns_nb`` (per-token scalars), ``_train_nb``
(the losses' row passes), ``_rollout_nb`` (sampling); plumbing in ``_nb_common``.

Threads: the recurrences (rollout, LSTM forward, BPTT) run row blocks on Numba's threads when
there are two or more (``numba.get_num_threads()``), holding SciPy's OpenBLAS to one thread
meanwhile; the whole-sequence GEMMs (heads, weight gradients) use OpenBLAS's own threads.
The row split depends on the thread count only, so a fixed thread count gives bit-identical
results (tested across processes). ``PARALLEL`` / ``RLHF_REF_NUMBA_PARALLEL`` = auto | on | off.

Compile cost (this 2-core machine, loaded by other jobs, so upper bounds): the first call in a
process with an empty cache compiles for about 6 s (``rollout``, float32) and 17 s
(``reinforce_loss_and_grad``, float32, incl. its parallel kernels); both dtypes and every kernel
about 25–30 s. With the on-disk cache warm (``cache=True``, stamped with a hash of every kernel
file), ``import`` + ``probe()`` takes 0.7 s and each first call 0.02–0.25 s.
``RLHF_REF_NUMBA_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np

from .. import model, policy, reinforce, sft
from .._validate import as_float_array, check_finite_result

NAME = "numba"
_K = None            # the loaded kernel modules (a namespace), after _load()
TABLE_MIN_POSITIONS = 1.0   # the input projection goes through the (V, 4H) table when B·T ≥ this × V
#: "auto": the recurrences (rollout, LSTM forward and backward) run row blocks on Numba's threads
#: when there are ≥ 2 of them and the BLAS thread count can be held to 1 meanwhile; "on" also
#: without that control; "off": one block (BLAS threads each product). Env RLHF_REF_NUMBA_PARALLEL.
PARALLEL = os.environ.get("RLHF_REF_NUMBA_PARALLEL", "auto")
_BLAS = None        # (get, set) of the thread count of the BLAS behind np.dot in Numba; False: none found


def probe():
    """None when the numba backend can run here, else the reason it cannot."""
    try:
        import numba  # noqa: F401
    except ModuleNotFoundError as e:
        if "halted" in str(e):                   # sys.modules["numba"] = None: present but blocked
            return f"numba import failed: {type(e).__name__}: {e}"
        return "numba not installed"
    except Exception as e:                       # ImportError when NumPy is too new for numba, and others
        return f"numba import failed: {type(e).__name__}: {e}"
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (np.dot inside numba kernels calls it)
    except ModuleNotFoundError as e:
        if "halted" in str(e):
            return f"scipy import failed: {type(e).__name__}: {e} (numba's np.dot needs SciPy's BLAS)"
        return "scipy not installed (numba's np.dot needs SciPy's BLAS)"
    except Exception as e:
        return f"scipy import failed: {type(e).__name__}: {e}"
    try:
        _load()
    except Exception as e:
        return f"numba kernels failed to load: {type(e).__name__}: {e}"
    return None


def _load():
    global _K
    if _K is None:
        from types import SimpleNamespace
        from . import _lstm_nb, _model_nb, _nb_common, _policy_nb, _returns_nb, _rollout_nb, _train_nb
        _K = SimpleNamespace(lstm=_lstm_nb, model=_model_nb, common=_nb_common, policy=_policy_nb,
                             returns=_returns_nb, rollout=_rollout_nb, train=_train_nb)
    return _K


def _require():
    why = probe() if _K is None else None
    if why is not None:
        raise RuntimeError(f"the numba backend is unavailable: {why}")
    return _K


# ----------------------------------------------------------------------------- threads

def _find_blas_threads():
    """The get/set thread-count functions of SciPy's OpenBLAS (what ``np.dot`` in Numba calls).

    Found among the loaded libraries (/proc/self/maps): SciPy's wheels name them
    ``scipy_openblas_{get,set}_num_threads``, a system OpenBLAS ``openblas_{get,set}_num_threads``.
    NumPy's own OpenBLAS (ILP64, symbols suffixed ``64_``) is not the one and is not matched.
    None elsewhere (another OS, MKL, ...): the parallel kernels then stay off under "auto".
    """
    import ctypes
    import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS)
    paths = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and "blas" in os.path.basename(parts[-1]).lower():
                    paths.append(parts[-1])
    except OSError:
        return None
    for path in dict.fromkeys(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            get = getattr(lib, f"{prefix}_get_num_threads", None)
            put = getattr(lib, f"{prefix}_set_num_threads", None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                return get, put
    return None


def _blas_threads():
    global _BLAS
    if _BLAS is None:
        try:
            _BLAS = _find_blas_threads() or False
        except Exception:
            _BLAS = False
    return _BLAS or None


def _blocks(B):
    """Row blocks for the recurrences: 1 (the serial kernels) or one per Numba thread (≤ B)."""
    if PARALLEL == "off" or B < 2:
        return 1
    import numba
    n = numba.get_num_threads()
    if n < 2 or (PARALLEL == "auto" and _blas_threads() is None):
        return 1
    return min(n, B)


@contextmanager
def _one_blas_thread():
    """Hold SciPy's OpenBLAS to one thread while Numba's threads each call it (process-wide)."""
    bt = _blas_threads()
    if bt is None:
        yield
        return
    get, put = bt
    old = get()
    put(1)
    try:
        yield
    finally:
        put(old)


# ----------------------------------------------------------------------------- shared pieces

def _c(a, dt):
    return np.ascontiguousarray(a, dtype=dt)


def _t(K, W):
    """Wᵀ, C-contiguous (a kernel: NumPy's strided copy is 2–9× slower here)."""
    Wt = np.empty((W.shape[1], W.shape[0]), W.dtype)
    K.lstm.transpose(W, Wt)
    return Wt


def _head_stack(params, names, dt):
    """Stack the heads ``names`` (those present) into Wc (K, H), bc (K,); returns Wc, bc, offsets."""
    Ws, bs, off, k = [], [], {}, 0
    for n in names:
        if f"{n}.weight" in params:
            W = params[f"{n}.weight"]
            Ws.append(W)
            bs.append(params[f"{n}.bias"])
            off[n] = (k, W.shape[0])
            k += W.shape[0]
    if len(Ws) == 1:
        return _c(Ws[0], dt), _c(bs[0], dt), off
    return _c(np.concatenate(Ws, 0), dt), _c(np.concatenate(bs, 0), dt), off


class _Body:
    """The body's forward pass and its buffers (time-major); ``backward`` returns the body's grads."""

    def __init__(self, K, params, tokens, mask, dt):
        self.K, self.dt = K, dt
        self.E = _c(params["embedding.weight"], dt)
        self.W_ih = _c(params["lstm.weight_ih_l0"], dt)
        self.W_hh = _c(params["lstm.weight_hh_l0"], dt)
        self.Wt_hh = _t(K, self.W_hh)                              # (H, 4H): see _lstm_nb.forward
        b_ih, b_hh = _c(params["lstm.bias_ih_l0"], dt), _c(params["lstm.bias_hh_l0"], dt)
        V, Ed = self.E.shape
        G, H = self.W_hh.shape
        B, T = tokens.shape
        self.B, self.T, self.H, self.G, self.V = B, T, H, G, V
        self.lengths = mask.sum(axis=1).astype(np.int64)
        self.ids = np.ascontiguousarray(np.where(mask > 0, tokens, 0), dtype=np.int64)   # padded ids never read
        self.use_table = B * T >= TABLE_MIN_POSITIONS * V
        if self.use_table:
            self.P = np.empty((V, G), dt)
            K.lstm.input_table(self.E, self.W_ih, b_ih, b_hh, self.P)
            self.X = self.XP = np.empty((0, 0), dt)
        else:
            self.P = np.empty((0, 0), dt)
            self.X = np.empty((T * B, Ed), dt)
            self.XP = np.empty((T * B, G), dt)
            K.lstm.input_direct(self.E, self.W_ih, b_ih, b_hh, self.ids, self.lengths, self.X, self.XP)
        self.gates = np.empty((T, B, G), dt)                 # post-activation; da after backward
        self.cs = np.empty((T + 1, B, H), dt)
        self.hs = np.empty((T + 1, B, H), dt)
        self.nblk = _blocks(B)
        args = (self.P, self.XP, self.use_table, self.ids, self.lengths, self.Wt_hh, self.gates, self.cs, self.hs)
        if self.nblk > 1:
            with _one_blas_thread():
                K.lstm.forward_par(*args, self.nblk)
        else:
            K.lstm.forward(*args)

    def HS(self):
        """hs[0:T] as (T·B, H): the state each position's token is chosen in."""
        return self.hs[:self.T].reshape(self.T * self.B, self.H)

    def backward(self, dlogits=None, Wc=None, dh_final=None):
        """BPTT from ∂L/∂logits (T·B, K) through the heads Wc (K, H) and/or ∂L/∂h_final (B, H);
        returns the body's grads dict."""
        K, dt, B, T, H, G = self.K, self.dt, self.B, self.T, self.H, self.G
        dh = np.zeros((B, H), dt) if dh_final is None else _c(dh_final, dt).copy()
        dc = np.zeros((B, H), dt)
        has = dlogits is not None
        if not has:
            dlogits, Wc = np.empty((0, 0), dt), np.empty((0, 0), dt)
        args = (self.gates, self.cs, self.hs, self.lengths, self.Wt_hh, dlogits, Wc, has, dh, dc,
                np.empty((B, H), dt), np.empty((B, H), dt))
        if self.nblk > 1:
            with _one_blas_thread():
                K.lstm.backward_par(*args, self.nblk)
        else:
            K.lstm.backward(*args)
        DA = self.gates.reshape(T * B, G)
        dW_hh = np.empty((G, H), dt)
        db = np.empty(G, dt)
        K.lstm.weight_grads(DA, self.HS(), dW_hh, db)
        dW_ih = np.empty_like(self.W_ih)
        dE = np.empty_like(self.E)
        if self.use_table:
            dP = self.P                                      # the table is not needed any more: reuse it
            K.lstm.input_backward_table(DA, self.ids, self.E, self.W_ih, dP, dW_ih, dE)
        else:
            dX = np.empty_like(self.X)
            K.lstm.input_backward_direct(DA, self.ids, self.X, self.W_ih, dX, dW_ih, dE)
        return {"embedding.weight": dE, "lstm.weight_ih_l0": dW_ih, "lstm.weight_hh_l0": dW_hh,
                "lstm.bias_ih_l0": db, "lstm.bias_hh_l0": db.copy()}


class _Net(_Body):
    """Body plus the stacked heads ``names``: logits (T·B, Kc) at every position, 0 off the position mask."""

    def __init__(self, K, params, tokens, mask, dt, names):
        super().__init__(K, params, tokens, mask, dt)
        self.Wc, self.bc, self.off = _head_stack(params, names, dt)
        self.logits = np.empty((self.T * self.B, self.Wc.shape[0]), dt)
        K.model.heads_forward(self.HS(), self.Wc, self.bc, self.lengths, self.logits)

    def backward_all(self, params):
        """∂L/∂logits is in self.logits (pass 2 wrote it there); returns grads with the keys of params."""
        K, dt = self.K, self.dt
        dWc = np.empty_like(self.Wc)
        dbc = np.empty_like(self.bc)
        K.model.heads_backward(self.HS(), self.logits, dWc, dbc)
        grads = self.backward(dlogits=self.logits, Wc=self.Wc)
        for n, (k0, k) in self.off.items():
            grads[f"{n}.weight"] = dWc[k0:k0 + k].copy() if len(self.off) > 1 else dWc
            grads[f"{n}.bias"] = dbc[k0:k0 + k].copy() if len(self.off) > 1 else dbc
        return _complete(grads, params)


def _complete(grads, params):
    """Every key of params, in params' order; heads the loss does not reach get 0."""
    return {k: (grads[k] if k in grads else np.zeros_like(v, dtype=grads["lstm.weight_hh_l0"].dtype))
            for k, v in params.items()}


def _dtype(params):
    return params["lstm.weight_hh_l0"].dtype


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

    def prep(p, heads):
        """(P (V, 4H), Wcat = [W_hhᵀ | Wcᵀ] (H, 4H + K), bc (K,)) for one policy."""
        E, W_ih = _c(p["embedding.weight"], dt), _c(p["lstm.weight_ih_l0"], dt)
        W_hh = _c(p["lstm.weight_hh_l0"], dt)
        G, H = W_hh.shape
        P = np.empty((E.shape[0], G), dt)
        K.lstm.input_table(E, W_ih, _c(p["lstm.bias_ih_l0"], dt), _c(p["lstm.bias_hh_l0"], dt), P)
        Wc, bc, _ = _head_stack(p, heads, dt)
        k = Wc.shape[0]
        Wcat = np.zeros((H, -(-(G + k) // 16) * 16), dt)   # width a multiple of 16: OpenBLAS's B = 1
        K.lstm.transpose(W_hh, Wcat[:, :G])                 # product is then ~30% faster (measured)
        K.lstm.transpose(Wc, Wcat[:, G:G + k])
        return P, Wcat, bc

    P, Wcat, bc = prep(params, ("head", "value") if values else ("head",))
    has_ref = ref_params is not None
    if has_ref:
        Pr, Wcatr, bcr = prep(ref_params, ("head",))
    else:
        Pr = Wcatr = np.empty((0, 0), dt)
        bcr = np.empty(0, dt)
    # outputs in the reference's dtypes (float64 (B, T) arrays); the kernel computes in dt
    mask, am, logp, ref_logp, vals = (np.zeros((B, T)) for _ in range(5))
    args = (P, Wcat, bc, bool(values), Pr, Wcatr, bcr, has_ref,
            tokens, pl, np.ascontiguousarray(u, dtype=np.float64), int(V), float(alpha), float(eps),
            K.policy.KIND_CODES[kind], int(eos_id), mask, am, logp, ref_logp, vals)
    nblk = _blocks(B)
    if nblk > 1:
        with _one_blas_thread():
            K.rollout.rollout_par(*args, nblk)
    else:
        K.rollout.rollout(*args)
    check_status(tokens, alpha, kind, dt)              # issue 10: no policy at some state -> the reference's error
    out = {"tokens": tokens, "mask": mask, "action_mask": am, "logp": logp}
    if has_ref:
        out["ref_logp"] = ref_logp
    if values:
        out["values"] = vals
    return out


# ----------------------------------------------------------------------------- log-probs

def _token_logprobs(K, net, tokens, sel, V, alpha, eps):
    B, T = tokens.shape
    logp, ent, qb, lse, plq = (np.empty((B, T)) for _ in range(5))
    K.train.policy_stats(net.logits, tokens, sel, V, float(alpha), float(eps), 0, False,
                         logp, ent, qb, lse, plq, np.empty(V, net.dt))
    return logp, ent, qb, lse, plq


def sequence_logprobs(params, tokens, mask, prompt_len, alpha=1.0, eps=0.0, *, _name="params"):
    """``rlhf_ref.reinforce.sequence_logprobs``: log π_ε of the produced tokens (B, T), 0 off the action mask."""
    from ..policy import check_policy_args
    check_policy_args(alpha, eps)
    V, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len, name=_name)
    K = _require()
    dt = _dtype(params)
    am = model.action_mask(mask, prompt_len)
    net = _Net(K, params, tokens, mask, dt, ("head",))
    logp, _, _, lse, _ = _token_logprobs(K, net, tokens, am, V, alpha, eps)
    policy.check_rows(np.isfinite(lse), am, alpha, "boltzmann", _name, dt)      # issue 10
    return logp.astype(dt if eps == 0 else np.float64)              # the reference's dtype (float64 for ε > 0)


# ----------------------------------------------------------------------------- REINFORCE

def reinforce_loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None):
    """``rlhf_ref.reinforce.loss_and_grad`` (without term_grads and the (B, T, V) arrays scores/logq)."""
    from .. import reinforce
    cfg = reinforce.ReinforceConfig() if cfg is None else cfg
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
    if ref_logp is not None:
        ref_logp = np.where(am > 0, as_float_array(ref_logp, "ref_logp", shape=(B, T)), 0.0)
    if cfg.baseline == "loo" and np.count_nonzero(n_row) < 2:
        raise ValueError(f"baseline='loo' needs at least two rows with an action, got {np.count_nonzero(n_row)}")
    if cfg.whiten == "bessel" and N < 2:
        raise ValueError(f"whiten='bessel' needs two or more actions, got {N}")
    if ref_params is not None:
        reinforce.check_ref_params(ref_params, V)                # issue 10: as the reference
        ref_logp = sequence_logprobs(ref_params, tokens, mask, prompt_len, cfg.alpha, cfg.eps,
                                     _name="ref_params").astype(np.float64)
    K = _require()
    dt = _dtype(params)
    R = K.returns

    # forward: body and every head present; pass 1 at the actions
    net = _Net(K, params, tokens, mask, dt, ("head", "value", "qvalue"))
    has_q = cfg.critic == "qvalue"
    qoff = net.off["qvalue"][0] if "qvalue" in net.off else 0
    logp, ent, qb, lse, plq = (np.empty((B, T)) for _ in range(5))
    K.train.policy_stats(net.logits, tokens, am, V, float(cfg.alpha), float(cfg.eps), qoff, has_q,
                         logp, ent, qb, lse, plq, np.empty(V, dt))
    policy.check_rows(np.isfinite(lse), am, cfg.alpha, "boltzmann", "params", dt)   # issue 10
    values = np.zeros((B, T))
    if "value" in net.off:
        K.train.read_column(net.logits, B, net.off["value"][0], net.lengths, values)
    qvalues = None
    pred_q = np.zeros((B, T))
    if "qvalue" in net.off:
        L3 = net.logits.reshape(T, B, -1)
        qvalues = L3[:, :, qoff:qoff + V].transpose(1, 0, 2).astype(dt)            # (B, T, V)
        if has_q:
            pred_q = np.where(am > 0, np.take_along_axis(qvalues, tokens[:, :, None], -1)[:, :, 0], 0.0)

    # KL-shaped rewards, returns, baseline, advantages, the losses and their upstream gradients
    kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred = (np.empty((B, T)) for _ in range(10))
    loss_pg, loss_ent, loss_value = K.train.reinforce_chain(
        logp, ref_logp, am, reward, values, qb, pred_q, has_q,
        float(cfg.beta), R.KL_CODES[cfg.kl], float(cfg.gamma), R.RETURN_CODES[cfg.returns],
        R.BASELINE_CODES[cfg.baseline], R.WHITEN_CODES[cfg.whiten], bool(cfg.shift_mean),
        R.AGG_CODES[cfg.aggregation], float(cfg.entropy_coef), float(cfg.value_coef), ent,
        kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred)

    # pass 2: ∂L/∂logits in place, then the backward pass
    pred_col = net.off[cfg.critic][0]
    K.train.policy_grads(net.logits, tokens, am, V, float(cfg.alpha), float(cfg.eps), lse, logp, plq, d_logp, d_ent,
                         d_pred, pred_col, has_q)
    grads = net.backward_all(params)

    out = reinforce.pack_outputs(dt, am, logp, ref_logp, ent, kl, rewards, G, values if "value" in net.off else None, qvalues, bl, adv, w,
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
    net = _Net(K, params, tokens, mask, dt, ("head",))
    logp, ent, qb, lse, plq = _token_logprobs(K, net, tokens, pm, V, 1.0, 0.0)
    policy.check_rows(np.isfinite(lse), pm, 1.0, "boltzmann", "params", dt)        # issue 10
    d_logp = np.empty_like(logp)
    loss = K.train.sft_chain(logp, pm, d_logp)
    K.train.policy_grads(net.logits, tokens, pm, V, 1.0, 0.0, lse, logp, plq, d_logp, np.zeros_like(logp),
                         d_logp, -1, False)
    grads = net.backward_all(params)
    check_finite_result(dt, loss, *grads.values())                  # issue 10: an overflow is the reference's error
    return {"logp": logp.astype(dt), "loss": loss, "n_real": n_real}, grads


# ----------------------------------------------------------------------------- reward model

def _reward_prepare(params, tokens, mask, name):
    from ..reward_model import _prepare
    return _prepare(params, tokens, mask, name)


def _reward_net(K, params, tokens, mask, dt):
    body = _Body(K, params, tokens, mask, dt)
    h_last = body.hs[body.T]                                 # carried over padding: each row's final state
    r = np.empty(body.B, dt)
    K.train.reward_readout(h_last, _c(params["reward.weight"][0], dt), dt.type(params["reward.bias"][0]), r)
    return body, h_last, r


def reward_forward(params, tokens, mask):
    """``rlhf_ref.reward_model.forward``'s rewards (B,), read at each row's last real token."""
    tokens, mask = _reward_prepare(params, tokens, mask, "tokens")
    K = _require()
    return _reward_net(K, params, tokens, mask, _dtype(params))[2]


def bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """``rlhf_ref.reward_model.bt_loss_and_grad``: one forward/backward over chosen and rejected stacked."""
    c_tok, c_mask = _reward_prepare(params, chosen, chosen_mask, "chosen")
    r_tok, r_mask = _reward_prepare(params, rejected, rejected_mask, "rejected")
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
    body, h_last, r = _reward_net(K, params, tokens, mask, dt)
    r_c, r_r = r[:P].astype(np.float64), r[P:].astype(np.float64)
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
    grads = _complete(grads, params)
    check_finite_result(dt, r_c.astype(dt), r_r.astype(dt), loss, *grads.values())   # issue 10
    out = {"reward_chosen": r_c.astype(dt), "reward_rejected": r_r.astype(dt), "delta": delta.astype(dt),
           "loss": loss, "accuracy": float(np.mean(r_c > r_r))}
    return out, grads

