"""The ``numba`` backend: public wrappers that validate, allocate and launch the ``_*_nb`` kernels.

Interface: ``rlhf_ref.backends.Backend``. Every function validates its arguments with the
reference's own checks (``rollout.check_rollout_args``, ``model.prepare``, ``reinforce.prepare``,
``sft.prepare``, ``reward_model.prepare_pairs``; the same messages) before any kernel runs; the
host code shared with the cython backend is ``_host.py``, ``_blas.py`` and ``_config.py``. It
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
results (tested across processes). ``_config.NUMBA_PARALLEL`` / ``RLHF_REF_NUMBA_PARALLEL`` = auto |
on | off. The BLAS thread control is ``_blas.py`` (shared with the cython backend; reference-counted,
so concurrent calls from Python threads leave OpenBLAS's thread count as they found it).

Compile cost (this 2-core machine, loaded by other jobs, so upper bounds): the first call in a
process with an empty cache compiles for about 6 s (``rollout``, float32) and 17 s
(``reinforce_loss_and_grad``, float32, incl. its parallel kernels); both dtypes and every kernel
about 25–30 s. With the on-disk cache warm (``cache=True``, stamped with a hash of every kernel
file), ``import`` + ``probe()`` takes 0.7 s and each first call 0.02–0.25 s.
``RLHF_REF_NUMBA_CACHE=0`` turns the cache off. ``rlhf-ref warmup`` (``rlhf_ref/warmup.py``) fills the
cache ahead of the first call: every kernel and specialisation the public functions reach, both dtypes.
"""

from __future__ import annotations

import numpy as np

from .. import model, policy, reinforce, reward_model, sft
from . import _blas, _config
from ._host import c as _c, complete, dtype as _dtype, head_stack, head_grads, CODES
from ._host import chain_codes, check_group_sd
from ._host import stack_pairs, reward_head_backward, reward_head_grads
from .._validate import check_finite_result

NAME = "numba"
_K = None            # the loaded kernel modules (a namespace), after _load()


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

def _blocks(B):
    """Row blocks for the recurrences: 1 (the serial kernels) or one per Numba thread (≤ B)."""
    parallel = _config.NUMBA_PARALLEL
    if parallel == "off" or B < 2:
        return 1
    import numba
    n = numba.get_num_threads()
    if n < 2 or (parallel == "auto" and not _blas.controls(lp64=True)):
        return 1
    return min(n, B)


def _one_blas_thread():
    """Hold SciPy's OpenBLAS (what np.dot in Numba calls) to one thread while Numba's threads each
    call it (reference-counted over Python threads, _blas.py)."""
    return _blas.one_thread(lp64=True)


# ----------------------------------------------------------------------------- shared pieces

def _t(K, W):
    """Wᵀ, C-contiguous (a kernel: NumPy's strided copy is 2–9× slower here)."""
    Wt = np.empty((W.shape[1], W.shape[0]), W.dtype)
    K.lstm.transpose(W, Wt)
    return Wt


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
        self.use_table = B * T >= _config.NUMBA_TABLE_MIN_POSITIONS * V
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
        self.Wc, self.bc, self.off = head_stack(params, names, dt)
        self.logits = np.empty((self.T * self.B, self.Wc.shape[0]), dt)
        K.model.heads_forward(self.HS(), self.Wc, self.bc, self.lengths, self.logits)

    def backward_all(self, params):
        """∂L/∂logits is in self.logits (pass 2 wrote it there); returns grads with the keys of params."""
        K, dt = self.K, self.dt
        dWc = np.empty_like(self.Wc)
        dbc = np.empty_like(self.bc)
        K.model.heads_backward(self.HS(), self.logits, dWc, dbc)
        grads = head_grads(self.backward(dlogits=self.logits, Wc=self.Wc), self.off, dWc, dbc)
        return complete(grads, params, dt)


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
        Wc, bc, _ = head_stack(p, heads, dt)
        k = Wc.shape[0]
        pad = _config.NUMBA_ROLLOUT_WIDTH_PAD                  # OpenBLAS's B = 1 product is then faster
        Wcat = np.zeros((H, -(-(G + k) // pad) * pad), dt)
        K.lstm.transpose(W_hh, Wcat[:, :G])
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
            CODES["policy"][kind], int(eos_id), mask, am, logp, ref_logp, vals)
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

def reinforce_loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None,
                            *, group=None, old_logp=None, old_values=None):
    """``rlhf_ref.reinforce.loss_and_grad`` (without term_grads and the (B, T, V) arrays scores/logq).

    Every convention, issue 9's included, runs in the kernel ``reinforce_chain``."""
    cfg, V, tokens, mask, prompt_len, reward, am, ref_logp, group, old_logp, old_values = reinforce.prepare(
        params, tokens, mask, prompt_len, reward, cfg, ref_params, ref_logp, logprobs=sequence_logprobs,
        group=group, old_logp=old_logp, old_values=old_values)
    B, T = tokens.shape
    reward = reward.astype(np.float64)
    ref_logp = ref_logp.astype(np.float64)
    K = _require()
    dt = _dtype(params)

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
    kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred, ratio = (np.empty((B, T)) for _ in range(11))
    S, sd = np.zeros(B), np.zeros(B)
    codes = chain_codes(cfg)
    v64 = np.ascontiguousarray(np.where(am > 0, values, 0.0))
    loss_pg, loss_ent, loss_value, loss_kl = K.train.reinforce_chain(
        logp, ref_logp, am, reward, v64, qb, pred_q, has_q,
        float(cfg.beta), codes["kl"], float(cfg.gamma), codes["returns"], codes["baseline"], codes["whiten"],
        bool(cfg.shift_mean), codes["aggregation"], float(cfg.entropy_coef), float(cfg.value_coef), ent,
        kl, rewards, G, bl, adv, w, pred, d_logp, d_ent, d_pred,
        cfg.kl_in == "loss", float(cfg.lam), np.zeros(B, np.int64) if group is None else group,
        codes["group_scale"], float(cfg.group_eps), codes["surrogate"], float(cfg.clip_low), float(cfg.clip_high),
        logp if old_logp is None else old_logp, float(cfg.value_clip),
        np.zeros((B, T)) if old_values is None else old_values, float(cfg.norm_len), ratio, S, sd)
    check_group_sd(cfg, am, group, sd)

    # pass 2: ∂L/∂logits in place, then the backward pass
    pred_col = net.off[cfg.critic][0]
    K.train.policy_grads(net.logits, tokens, am, V, float(cfg.alpha), float(cfg.eps), lse, logp, plq, d_logp, d_ent,
                         d_pred, pred_col, has_q)
    grads = net.backward_all(params)

    out = reinforce.pack_outputs(am, logp, ref_logp, ent, kl, rewards, G, values if "value" in net.off else None,
                                 qvalues, bl, adv, w, loss_pg, loss_ent, loss_value, dt=dt, ratio=ratio,
                                 loss_kl=loss_kl)
    check_finite_result(dt, out["loss"], out["rewards"], out["returns"], *grads.values())   # an overflow is an error
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

def _reward_net(K, params, tokens, mask, dt):
    body = _Body(K, params, tokens, mask, dt)
    h_last = body.hs[body.T]                                 # carried over padding: each row's final state
    r = np.empty(body.B, dt)
    K.train.reward_readout(h_last, _c(params["reward.weight"][0], dt), dt.type(params["reward.bias"][0]), r)
    return body, h_last, r


def reward_forward(params, tokens, mask):
    """``rlhf_ref.reward_model.forward``'s rewards (B,), read at each row's last real token."""
    tokens, mask = reward_model._prepare(params, tokens, mask, "tokens")
    K = _require()
    return _reward_net(K, params, tokens, mask, _dtype(params))[2]


def bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """``rlhf_ref.reward_model.bt_loss_and_grad``: one forward/backward over chosen and rejected stacked."""
    c_tok, c_mask, r_tok, r_mask, m = reward_model.prepare_pairs(params, chosen, chosen_mask, rejected,
                                                                 rejected_mask, margin)
    P = c_tok.shape[0]
    K = _require()
    dt = _dtype(params)
    tokens, mask = stack_pairs(c_tok, c_mask, r_tok, r_mask)
    body, h_last, r = _reward_net(K, params, tokens, mask, dt)
    r_c, r_r = r[:P].astype(np.float64), r[P:].astype(np.float64)
    delta, loss, d_delta = reward_model.bt_head(r_c, r_r, m, dt)
    grads = body.backward(dh_final=reward_head_backward(d_delta, params, dt))
    grads = complete(reward_head_grads(grads, d_delta, h_last, dt), params, dt)
    check_finite_result(dt, *grads.values())                   # an overflow is the reference's error
    return reward_model.bt_outputs(r_c.astype(dt), r_r.astype(dt), delta.astype(dt), loss), grads
