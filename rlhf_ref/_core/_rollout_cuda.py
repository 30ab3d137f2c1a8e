"""Numba CUDA twin of ``rlhf_ref/rollout.py`` (and of ``reinforce.sequence_logprobs``).

The reference (``rollout.rollout``) samples one token at a time for every row: feed token
t−1 through the LSTM (``lstm.step``), score the vocabulary with the head, turn the scores into
the policy q(·|s_t) (``policy.logprobs``) and pick token t by inverse CDF from the pre-drawn
uniform u[:, t] (``policy.sample``; docs/conventions.md §4). This file runs that whole loop, every row and
every time step, in ONE kernel launch; kernels never draw random numbers (u comes in as an
array). ``sequence_logprobs`` is the same kernel run teacher-forced: the tokens are given and
only the log-probs are read, so recomputed log-probs equal the sampling ones bit for bit on
one device.

Kernel design
-------------
Rows are independent, so a block owns a *tile* of ``rows`` rows (``launch_config``) for the
whole sequence and the grid strides over tiles (``tile += gridDim.x``): no grid-wide
synchronisation is ever needed, and any B runs with any grid. Inside a block, each time step
is three phases separated by ``cuda.syncthreads()``:

1. **cell** — one work item per (row, hidden unit j), threads striding over them (unit-major:
   neighbouring threads take the tile's rows of one unit, then the next unit): the item
   computes the four gate pre-activations of unit j (dot products over E and H), the gates,
   c_t[j] and h_t[j] (the fused LSTM step; no gate is exchanged between threads). The same
   phase runs the reference policy's LSTM when ``ref_params`` is given (its own E, H).
   h is double-buffered (read h_{t−1}, write h_t) because every unit reads all of h_{t−1}.
2. **head** — one work item per (row, vocabulary column): z = h_t·W_headᵀ + b; the value head
   is column V of the same (H, V+1) matrix, and the reference policy's head runs here too.
3. **row** — one thread per row: log-sum-exp over V, the inverse-CDF draw, the log-probs of
   the chosen token under the policy (and π_ref), EOS handling and the masks. This phase is
   sequential over V on purpose: the CDF is the running sum from index 0 in the reference's
   order (``np.cumsum``), so ties at CDF boundaries are as rare as they can be.

Why one thread per (row, unit) with a whole dot product per thread, rather than threads
splitting a dot product with shared-memory reductions: it exposes B·H-way parallelism per
step (2 M work items at B = 4096, H = 512: enough to fill any GPU), weight reads are shared and
coalesced (the wrapper passes W_ihᵀ (E, 4H), W_hhᵀ (H, 4H), W_headᵀ (H, V+1); the threads of
a warp read the same or neighbouring columns, so one 32-byte sector of weights serves up to
32 multiply-adds, while the tile's h rows, a few KiB, stay in L1), and every number is
produced by one thread in one fixed order:
**results are bit-identical for every launch configuration** (threads per block, rows per
block, grid size), which the tests check with tiny blocks. A split reduction would buy
parallelism only at tiny B, where this kernel is launch/latency bound anyway.

Not measured on a GPU yet (none was available while this was written): the kernel has been
compiled by NVVM to PTX for sm_90 and assembled by ptxas (about 165 registers, no spills, float32
and float64 alike), and checked under the simulator. What should bound it at large B is L2
traffic for the weights (each step reads W_ih, W_hh and the head once per warp); the next
steps, to be measured, are register-tiling several rows per thread (each weight load feeding
several accumulators) and staging h_{t−1} in shared memory. Both need dtype-specific local or
shared arrays, i.e. one kernel built per dtype by a factory.

Scratch lives in global memory (h (2, B, H), c (B, H), z (B, V+1) per model), so H and V are
limited only by device memory, not by shared memory. The kernel computes in the dtype of the
parameters (float32 or float64); typed constants come in the ``cst`` arrays so that no Python
float literal promotes float32 arithmetic to float64 (Numba types ``float32 * 0.5`` as float64).
Exactly like the reference, the ε-mixture of the Boltzmann policy (ε > 0) is evaluated in
float64 even for float32 parameters (NumPy promotes there: ``np.log1p(−ε)`` is a float64
scalar), and the classic ε-greedy/greedy log-probs are the reference's float64 logs rounded to
the parameter dtype (computed once on the host).

Launch sizes come from one place, ``launch_config`` reading ``_config.CUDA`` (a ``CudaConfig``,
with the other backends' tuning parameters in ``_config.py``; where a field is 0, the environment variables ``RLHF_REF_CUDA_TPB`` threads per
block [128], ``RLHF_REF_CUDA_ROWS`` rows per block [B / (4 · SMs), clamped to 1..8] and
``RLHF_REF_CUDA_MAX_BLOCKS`` grid cap [none: one block per tile]). Tests set tiny values so
several blocks and the grid-stride loop run under the simulator.

Simulator notes (``NUMBA_ENABLE_CUDASIM=1``, set before Python starts): the simulator runs the
kernel as Python, one OS thread per CUDA thread; ``math.exp`` on a float32 returns a Python
float there, so float32 rounding is not faithfully simulated (results come out *closer* to the
float64 reference than on a GPU). Passing under the simulator therefore proves the indexing,
synchronisation and control flow, not float32 rounding on a device.
"""

from __future__ import annotations

import math
import os
import numpy as np
from numba import cuda

from .. import model, policy
from ..rollout import check_rollout_args, check_status
from ..tokenizer import EOS, PAD
from . import _config
from ._config import CudaConfig  # noqa: F401  (the launch sizes' type, here for the tests and users)
from ._host import CODES, head_stack

# the policy kind inside the kernel: its code in conventions.POLICY (_host.CODES; checked by a test);
# every other kind is the one-hot/ε-greedy branch
_BOLTZMANN = 0


# ---------------------------------------------------------------------------------------------
# launch configuration: the one place launch sizes come from

def _setting(name, env):
    v = getattr(_config.CUDA, name)
    if not v:
        s = os.environ.get(env, "")
        v = int(s) if s.strip() else 0
    if v < 0:
        raise ValueError(f"{env} / _config.CUDA.{name} must be a positive integer, got {v}")
    return v


def _sm_count():
    try:
        return int(getattr(cuda.current_context().device, "MULTIPROCESSOR_COUNT", 0) or 0)
    except Exception:            # the simulator has no such attribute
        return 0


def launch_config(B):
    """(blocks, threads per block, rows per block) for a batch of B rows."""
    tpb = _setting("tpb", "RLHF_REF_CUDA_TPB") or 128
    rows = _setting("rows", "RLHF_REF_CUDA_ROWS")
    if not rows:
        n_sm = _sm_count() or 1
        rows = max(1, min(8, B // (4 * n_sm)))
    tiles = max(1, -(-B // rows))
    cap = _setting("max_blocks", "RLHF_REF_CUDA_MAX_BLOCKS")
    blocks = min(tiles, cap) if cap else tiles
    return blocks, tpb, rows


# ---------------------------------------------------------------------------------------------
# device functions: each mirrors a line of the reference

@cuda.jit(device=True)
def _sigmoid(x, cst):
    # σ(x) = ½(1 + tanh(½x)), as lstm._sigmoid
    return cst[2] * (cst[1] + math.tanh(cst[2] * x))


@cuda.jit(device=True)
def _cell_unit(x, b, j, emb, WihT, WhhT, b_ih, b_hh, hin, hout, c, cst):
    """One hidden unit j of one row b: lstm._cell for that unit (gate order i, f, g, o)."""
    E = emb.shape[1]
    H = WhhT.shape[0]
    # a = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh, the four rows of unit j
    ai = cst[0]
    af = cst[0]
    ag = cst[0]
    ao = cst[0]
    for e in range(E):
        xe = emb[x, e]
        ai += xe * WihT[e, j]
        af += xe * WihT[e, H + j]
        ag += xe * WihT[e, 2 * H + j]
        ao += xe * WihT[e, 3 * H + j]
    ai += b_ih[j]
    af += b_ih[H + j]
    ag += b_ih[2 * H + j]
    ao += b_ih[3 * H + j]
    ri = cst[0]
    rf = cst[0]
    rg = cst[0]
    ro = cst[0]
    for k in range(H):
        hk = hin[b, k]
        ri += hk * WhhT[k, j]
        rf += hk * WhhT[k, H + j]
        rg += hk * WhhT[k, 2 * H + j]
        ro += hk * WhhT[k, 3 * H + j]
    ai = ai + ri + b_hh[j]
    af = af + rf + b_hh[H + j]
    ag = ag + rg + b_hh[2 * H + j]
    ao = ao + ro + b_hh[3 * H + j]
    i = _sigmoid(ai, cst)
    f = _sigmoid(af, cst)
    g = math.tanh(ag)
    o = _sigmoid(ao, cst)
    # c' = f ⊙ c + i ⊙ g ;  h' = o ⊙ tanh(c')   (c is owned by this thread: update in place)
    cn = f * c[b, j] + i * g
    c[b, j] = cn
    hout[b, j] = o * math.tanh(cn)


@cuda.jit(device=True)
def _head_col(b, v, h, WT, bias, z, cst, ns):
    """z[b, v] = h[b] · W[v] + bias[v]   (lstm.linear, one output column); the Boltzmann policy's
    columns v < ns are stored as s = α·z, rounded there, so that no later α·z − m can be contracted
    into one FMA (NVVM contracts by default; the rounding of α·z is part of the convention)."""
    H = WT.shape[0]
    acc = cst[0]
    for k in range(H):
        acc += h[b, k] * WT[k, v]
    zv = acc + bias[v]
    if v < ns:
        z[b, v] = cst[3] * zv
    else:
        z[b, v] = zv


@cuda.jit(device=True)
def _lse(z, b, V, cst):
    """logsumexp(s[b, :V]) of the stored s = α·z, max-shifted (policy.logsumexp), in the dtype of z;
    not finite exactly when the row gives no policy (policy.check_scores)."""
    m = z[b, 0]
    for k in range(1, V):
        y = z[b, k]
        if y > m:
            m = y
    if math.isinf(m):
        m = cst[0]
    s = cst[0]
    for k in range(V):
        s += math.exp(z[b, k] - m)
    return m + math.log(s)


@cuda.jit(device=True)
def _greedy_ok(z, b, V):
    """max_k z[b, k] is finite, NaN-propagating (policy.check_scores for the greedy kinds)."""
    m = z[b, 0]
    for k in range(V):
        x = z[b, k]
        if math.isnan(x):
            return False
        if x > m:
            m = x
    return not math.isinf(m)                 # no +inf, not all −inf


@cuda.jit(device=True)
def _argmax(z, b, V):
    """argmax of z[b, :V], ties to the lowest index (np.argmax)."""
    a = 0
    m = z[b, 0]
    for k in range(1, V):
        if z[b, k] > m:
            m = z[b, k]
            a = k
    return a


@cuda.jit(device=True)
def _logq_dt(z, b, k, lse, amax, kind, cst):
    """log q(k|s) in the dtype of z: Boltzmann α·z_k − lse, or the classic ε-greedy table."""
    if kind == _BOLTZMANN:
        return z[b, k] - lse                 # z holds s = α·z (_head_col)
    if k == amax:
        return cst[4]            # log((1−ε) + ε/V), rounded to the dtype on the host
    return cst[5]                # log(ε/V) (−inf for greedy)


@cuda.jit(device=True)
def _logaddexp(x, y):
    # numpy's npy_logaddexp
    if x == y:
        return x + 0.6931471805599453
    d = x - y
    if d > 0:
        return x + math.log1p(math.exp(-d))
    if d <= 0:
        return y + math.log1p(math.exp(d))
    return d


@cuda.jit(device=True)
def _logq_mix(z, b, k, lse, cst, mix):
    """log π_ε(k|s) = logaddexp(log1p(−ε) + log π(k|s), log(ε/V)), in float64 (as the reference)."""
    return _logaddexp(mix[0] + (z[b, k] - lse), mix[1])


@cuda.jit(device=True)
def _sample_dt(z, b, V, u, lse, amax, kind, cst):
    """policy.sample for one row: q in the dtype of z, the cdf accumulated in float64, u scaled by
    its total."""
    tot = 0.0
    for k in range(V):
        tot += math.exp(_logq_dt(z, b, k, lse, amax, kind, cst))
    u = u * tot
    cdf = 0.0
    a = V
    last = V - 1
    found = False
    for k in range(V):
        q = math.exp(_logq_dt(z, b, k, lse, amax, kind, cst))
        if q > 0:
            last = k
            found = True
        cdf += q
        if a == V and cdf > u:   # a = #{k : cdf_k ≤ u} (cdf is non-decreasing)
            a = k
    if a == V:
        # rounding left u ≥ cdf_{V−1}: the last token with q > 0
        a = last if found else V - 1
    return a


@cuda.jit(device=True)
def _sample_mix(z, b, V, u, lse, cst, mix):
    """policy.sample for one row of the Boltzmann ε-mixture, in float64."""
    cdf = 0.0
    a = V
    last = V - 1
    found = False
    for k in range(V):
        q = math.exp(_logq_mix(z, b, k, lse, cst, mix))
        if q > 0:
            last = k
            found = True
        cdf += q
        if a == V and cdf > u:
            a = k
    if a == V:
        a = last if found else V - 1
    return a


@cuda.jit(device=True)
def _logp_at(z, b, V, k, kind, use_mix, cst, mix):
    """log q(k|s_t) of one token (recomputed exactly as the sampler computed it)."""
    if kind == _BOLTZMANN:
        lse = _lse(z, b, V, cst)
        if use_mix:
            return _logq_mix(z, b, k, lse, cst, mix)
        return z[b, k] - lse
    if k == _argmax(z, b, V):
        return cst[4]
    return cst[5]


# ---------------------------------------------------------------------------------------------
# the kernel (cache=True: the compiled kernel is kept in __pycache__ for later processes)

@cuda.jit(cache=True)
def _rollout_kernel(tokens, pl, seqlen, u, sample, eos_id, kind, use_mix, V, rows,
                    emb, WihT, WhhT, b_ih, b_hh, headT, head_b, cst, mix,
                    ref_on, remb, rWihT, rWhhT, rb_ih, rb_hh, rheadT, rhead_b, rcst,
                    h2, c, z, rh2, rc, rz, done,
                    mask, am, logp, ref_logp, vals):
    """The rollout loop of rollout.rollout for the tiles of rows this block owns.

    sample=1: draw tokens[b, t] for t ≥ prompt_len (EOS ends a row); sample=0: teacher-forced,
    tokens are given and row b is real for t < seqlen[b]. Outputs are zero-filled by the host.
    """
    B = tokens.shape[0]
    T = tokens.shape[1]
    H = WhhT.shape[0]
    Hr = rWhhT.shape[0]
    nv = headT.shape[1]                      # V, or V + 1 with the value head as column V
    tid = cuda.threadIdx.x
    nth = cuda.blockDim.x
    n1 = rows * H
    n2 = rows * Hr if ref_on else 0
    n3 = rows * nv
    n4 = rows * V if ref_on else 0
    ntiles = (B + rows - 1) // rows
    tile = cuda.blockIdx.x
    while tile < ntiles:                     # grid-stride loop over tiles of rows
        b0 = tile * rows
        for t in range(1, T):
            p_in = (t + 1) % 2               # h2[p_in] holds h_{t−1}, h2[p_out] gets h_t
            p_out = t % 2
            # phase 1: feed token t−1 through the LSTM(s), one (row, unit) per work item
            k = tid
            while k < n1 + n2:
                kk = k if k < n1 else k - n1
                j = kk // rows                   # unit-major: a warp's rows share weight reads
                r = kk - j * rows
                b = b0 + r
                if b < B and done[b] == 0 and t < seqlen[b]:
                    x = tokens[b, t - 1]
                    if k < n1:
                        _cell_unit(x, b, j, emb, WihT, WhhT, b_ih, b_hh, h2[p_in], h2[p_out], c, cst)
                    else:
                        _cell_unit(x, b, j, remb, rWihT, rWhhT, rb_ih, rb_hh, rh2[p_in], rh2[p_out], rc, rcst)
                k += nth
            cuda.syncthreads()
            # phase 2: heads, one (row, column) per work item
            k = tid
            while k < n3 + n4:
                kk = k if k < n3 else k - n3
                v = kk // rows
                r = kk - v * rows
                b = b0 + r
                if b < B and done[b] == 0 and t < seqlen[b]:
                    if k < n3:
                        _head_col(b, v, h2[p_out], headT, head_b, z, cst, V if kind == _BOLTZMANN else 0)
                    else:
                        _head_col(b, v, rh2[p_out], rheadT, rhead_b, rz, rcst, V if kind == _BOLTZMANN else 0)
                k += nth
            cuda.syncthreads()
            # phase 3: one thread per row: draw, log-probs, masks, EOS
            r = tid
            while r < rows:
                b = b0 + r
                if b < B and done[b] == 0 and t < seqlen[b]:
                    mask[b, t] = 1.0
                    if nv > V:
                        vals[b, t] = z[b, V]
                    if t >= pl[b]:
                        # no policy at this state (non-finite α·z): end the row with the status
                        # token −1 (−2: the reference policy), which the host turns into
                        # policy.scores_error
                        if kind == _BOLTZMANN:
                            x = _lse(z, b, V, cst)
                            ok = not (math.isinf(x) or math.isnan(x))
                            rok = True
                            if ref_on:
                                x = _lse(rz, b, V, rcst)
                                rok = not (math.isinf(x) or math.isnan(x))
                        else:
                            ok = _greedy_ok(z, b, V)
                            rok = (not ref_on) or _greedy_ok(rz, b, V)
                        if not (ok and rok):
                            tokens[b, t] = -1 if not ok else -2
                            done[b] = 1
                            r += nth
                            continue
                        if sample:
                            lse = cst[0]
                            amax = 0
                            if kind == _BOLTZMANN:
                                lse = _lse(z, b, V, cst)
                            else:
                                amax = _argmax(z, b, V)
                            if use_mix:
                                a = _sample_mix(z, b, V, u[b, t], lse, cst, mix)
                            else:
                                a = _sample_dt(z, b, V, u[b, t], lse, amax, kind, cst)
                            tokens[b, t] = a
                        else:
                            a = tokens[b, t]
                        am[b, t] = 1.0
                        logp[b, t] = _logp_at(z, b, V, a, kind, use_mix, cst, mix)
                        if ref_on:
                            ref_logp[b, t] = _logp_at(rz, b, V, a, kind, use_mix, rcst, mix)
                        if sample and a == eos_id:
                            done[b] = 1
                r += nth
            cuda.syncthreads()
        tile += cuda.gridDim.x


# ---------------------------------------------------------------------------------------------
# host side: validated inputs in, device arrays, one launch, results out

def _consts(dt, alpha, eps, kind, V):
    """Typed constants [0, 1, ½, α, log q_hit, log q_miss] in dtype dt (see the module docstring)."""
    hit = miss = 0.0
    if kind != "boltzmann":
        # policy.logprobs: log((1−ε)·onehot + ε/V) in float64, then rounded to the dtype
        with np.errstate(divide="ignore"):
            hit = np.log((1.0 - eps) * 1.0 + eps / V)
            miss = np.log((1.0 - eps) * 0.0 + eps / V)
    return np.array([0.0, 1.0, 0.5, alpha, hit, miss]).astype(dt)


def _mix_consts(eps, V):
    with np.errstate(divide="ignore"):
        return np.array([np.log1p(-eps), np.log(eps / V)], dtype=np.float64)


def _model_arrays(p, with_value):
    """Device copies of one model, weights transposed so neighbouring threads read neighbours."""
    # the heads stacked (V + 1, H) with values: value is column V
    head_w, head_b, _ = head_stack(p, ("head", "value") if with_value else ("head",), p["head.weight"].dtype)
    return tuple(cuda.to_device(np.ascontiguousarray(a)) for a in (
        p["embedding.weight"],                 # (V, E)
        p["lstm.weight_ih_l0"].T,              # (E, 4H)
        p["lstm.weight_hh_l0"].T,              # (H, 4H)
        p["lstm.bias_ih_l0"], p["lstm.bias_hh_l0"],
        head_w.T,                              # (H, V[+1])
        head_b))


def _launch(params, tokens, pl, seqlen, u, alpha, eps, kind, eos_id, ref_params, values, sample):
    """Run the kernel; returns host arrays (tokens, mask, action_mask, logp, ref_logp, values)."""
    B, T = tokens.shape
    V = params["head.weight"].shape[0]
    H = params["lstm.weight_hh_l0"].shape[1]
    dt = params["head.weight"].dtype
    use_mix = kind == "boltzmann" and eps > 0.0
    kind_id = CODES["policy"][kind]
    nv = V + 1 if values else V
    model_d = _model_arrays(params, values)
    cst = cuda.to_device(_consts(dt, alpha, eps, kind, V))
    mix = cuda.to_device(_mix_consts(eps, V))
    if ref_params is not None:
        rdt = ref_params["head.weight"].dtype
        Hr = ref_params["lstm.weight_hh_l0"].shape[1]
        ref_d = _model_arrays(ref_params, False)
        rcst = cuda.to_device(_consts(rdt, alpha, eps, kind, V))
        rh2 = cuda.to_device(np.zeros((2, B, Hr), rdt))
        rc = cuda.to_device(np.zeros((B, Hr), rdt))
        rz = cuda.to_device(np.zeros((B, V), rdt))
    else:                                  # placeholders of the right rank; never read (ref_on = 0)
        ref_d = model_d
        rcst = cst
        rh2 = cuda.to_device(np.zeros((2, 1, 1), dt))
        rc = cuda.to_device(np.zeros((1, 1), dt))
        rz = cuda.to_device(np.zeros((1, 1), dt))
    tok_d = cuda.to_device(np.ascontiguousarray(tokens, dtype=np.int64))
    h2 = cuda.to_device(np.zeros((2, B, H), dt))
    c = cuda.to_device(np.zeros((B, H), dt))
    z = cuda.to_device(np.zeros((B, nv), dt))
    done = cuda.to_device(np.zeros(B, np.int32))
    outs = [cuda.to_device(np.zeros((B, T))) for _ in range(5)]   # mask, am, logp, ref_logp, values
    blocks, tpb, rows = launch_config(B)
    _rollout_kernel[blocks, tpb](
        tok_d, *(cuda.to_device(np.ascontiguousarray(a, dtype=d))
                 for a, d in ((pl, np.int64), (seqlen, np.int64), (u, np.float64))),
        int(sample), int(eos_id), kind_id, bool(use_mix), V, rows,
        *model_d, cst, mix,
        ref_params is not None, *ref_d, rcst,
        h2, c, z, rh2, rc, rz, done, *outs)
    cuda.synchronize()
    return (tok_d.copy_to_host(),) + tuple(o.copy_to_host() for o in outs)


def rollout(params, prompt_tokens, prompt_len, u, alpha=1.0, eps=0.0, kind="boltzmann", eos_id=EOS,
            ref_params=None, values=False):
    """rollout.rollout on the GPU: same arguments, checks, keys and dtypes."""
    tok, pl, u, V = check_rollout_args(params, prompt_tokens, prompt_len, u, alpha, eps, kind, eos_id,
                                       ref_params, values)
    alpha_arg, alpha, eps = alpha, float(alpha), float(eps)
    B, T = tok.shape
    tokens = np.where(np.arange(T)[None, :] < pl[:, None], tok, PAD)            # (B, T) prompt, then PAD
    if B == 0:
        res = (tokens,) + tuple(np.zeros((0, T)) for _ in range(5))
    else:
        res = _launch(params, tokens, pl, np.full(B, T, np.int64), np.asarray(u, np.float64), alpha, eps,
                      kind, eos_id, ref_params, values, sample=True)
    tokens, mask, am, logp, rlogp, vals = res
    check_status(tokens, alpha_arg, kind, params["head.weight"].dtype)    # issue 10: no policy -> the reference's error
    mask[:, 0] = 1.0
    out = {"tokens": tokens, "mask": mask, "action_mask": am, "logp": logp}
    if ref_params is not None:
        out["ref_logp"] = rlogp
    if values:
        out["values"] = vals
    return out


def sequence_logprobs(params, tokens, mask, prompt_len, alpha=1.0, eps=0.0):
    """reinforce.sequence_logprobs on the GPU (teacher-forced run of the rollout kernel).

    Returns (B, T) in the reference's dtype: the parameters' dtype, float64 for ε > 0 (the
    reference's mixture promotes to float64).
    """
    policy.check_policy_args(alpha, eps)
    _, tokens, mask, prompt_len = model.prepare(params, tokens, mask, prompt_len)
    policy.check_alpha_dtype(alpha, params["head.weight"].dtype)             # issue 10: as the reference
    alpha_arg, alpha, eps = alpha, float(alpha), float(eps)
    dt = params["head.weight"].dtype
    out_dt = np.float64 if eps > 0.0 else dt
    B, T = tokens.shape
    if B == 0 or T == 0:
        return np.zeros((B, T), out_dt)
    ids = np.where(mask > 0, tokens, 0)                       # padded ids are never read
    seqlen = mask.sum(axis=1).astype(np.int64)                # right padding: real tokens are a prefix
    u = np.zeros((B, T))
    status, _, _, logp, _, _ = _launch(params, ids, prompt_len, seqlen, u, alpha, eps, "boltzmann", 0, None,
                                  False, sample=False)
    if status.min() < 0:                                    # issue 10: no policy at an action
        raise policy.scores_error("params", alpha_arg, "boltzmann", dt)
    return logp.astype(out_dt)
