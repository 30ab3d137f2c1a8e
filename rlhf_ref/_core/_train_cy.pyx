"""Cython twin of the training objectives: ``rlhf_ref/reinforce.py``, ``returns.py``, ``sft.py``.

The network's outputs at every position are one logits block (T·B, K) (time-major rows
r = t·B + b; the stacked heads: ``head`` columns [0, V), then ``value`` and/or ``qvalue``), made
by ``_lstm_cy.linear``. Three passes turn it into the losses and ∂L/∂logits, in place:

    policy_stats     per selected position (an action, or a real t ≥ 1 for SFT): log π_ε(a_t),
                     entropy, the qvalue baseline, and what the gradient pass needs (m, S − 1,
                     Σ π log π_ε); rows in parallel, each with its own (V,) scratch row
    reinforce_chain  the per-token scalars of returns.py and reinforce.py in float64, in the
                     reference's order: k_t, shaped rewards, returns, baseline, advantages
                     (whitened), aggregation weights, the three losses and their upstream
                     gradients d_logp = −w·A, d_ent = −c_H·w, d_pred = c_V·w·(pred − G)
    policy_grads     ∂L/∂logits over the logits' own buffer (policy.grad_logprob and
                     policy.grad_entropy at the head's columns, d_pred at the critic's column,
                     0 elsewhere); rows in parallel

(B, T) arrays are batch-major float64, as the reference returns them; the row passes compute in
the logits' dtype (float32 or float64) and the ε-mixture in float64, as the reference does.
Returns and advantages are a few O(B·T) loops here rather than the reference's NumPy (whose
reward-to-go is a Python loop over T: 160 µs at T = 64, B = 1, the reference's whole per-token
chain 200 µs, measured, against a B = 1 training step of about 1 ms). Every
entry point checks the shapes and the actions' ids it relies on (bounds checks are off inside).
"""

from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport sqrt, exp, expm1, INFINITY
from libc.stdint cimport int64_t
from libc.string cimport memset

from ._policy_cy cimport RowStats, stats_row, grad_row

# The conventions arrive as integer codes: a value's index in its row of rlhf_ref/conventions.py
# (_host.chain_codes); this file holds no names.


cdef inline void need(bint ok, str what) except *:
    """The entry points check the shapes their kernel relies on (bounds checks are off inside)."""
    if not ok:
        raise ValueError(f"_train_cy: {what}")


cdef bint _actions_ok(const int64_t* ids, const double* sel, Py_ssize_t T, Py_ssize_t B, Py_ssize_t V) noexcept nogil:
    cdef Py_ssize_t t, b
    for t in range(T):
        for b in range(B):
            if sel[b * T + t] != 0 and (ids[t * B + b] < 0 or ids[t * B + b] >= V):
                return False
    return True


cdef void _check_pass(str fn, Py_ssize_t rows, Py_ssize_t K, Py_ssize_t T, Py_ssize_t B, Py_ssize_t V,
                      const int64_t* ids, const double* sel, Py_ssize_t sel0, Py_ssize_t sel1) except *:
    need(rows == T * B and sel0 == B and sel1 == T, f"{fn}: logits (T·B, K), ids (T, B), sel (B, T)")
    need(0 < V <= K, f"{fn}: 0 < V <= K")
    need(T * B == 0 or _actions_ok(ids, sel, T, B, V), f"{fn}: an action outside [0, V) at a selected position")


cdef bint _bt(const double[:, ::1] a, Py_ssize_t B, Py_ssize_t T):
    return a.shape[0] == B and a.shape[1] == T


# ----------------------------------------------------------------------------- pass 1

cdef inline void _stats_one(const floating* logits, Py_ssize_t K, const int64_t* ids, const double* sel,
                            Py_ssize_t B, Py_ssize_t T, Py_ssize_t r, Py_ssize_t V, double alpha, double eps,
                            Py_ssize_t qoff, bint has_q, double* logp, double* ent, double* qb,
                            double* mx, double* s1, double* plq, floating* e) noexcept nogil:
    cdef Py_ssize_t t = r // B, b = r - t * B, i = b * T + t
    cdef RowStats st
    if sel[i] == 0:
        logp[i] = 0
        ent[i] = 0
        qb[i] = 0
        mx[i] = 0
        s1[i] = 0
        plq[i] = 0
        return
    st = stats_row(logits + r * K, V, ids[r], alpha, eps, logits + r * K + qoff, has_q, e)
    logp[i] = st.lp
    ent[i] = st.ent
    qb[i] = st.qb
    mx[i] = st.mx
    s1[i] = st.s1
    plq[i] = st.plq


def policy_stats(const floating[:, ::1] logits, const int64_t[:, ::1] ids, const double[:, ::1] sel,
                 Py_ssize_t V, double alpha, double eps, Py_ssize_t qoff, bint has_q,
                 double[:, ::1] logp, double[:, ::1] ent, double[:, ::1] qb, double[:, ::1] mx,
                 double[:, ::1] s1, double[:, ::1] plq, floating[:, ::1] work, int nthreads=1):
    """Pass 1. logits (T·B, K), ids (T, B) the tokens (the actions a_t), sel (B, T) where to
    compute (elsewhere the outputs are 0). Outputs (B, T) float64: logp, ent (entropy), qb
    (Σ π_ε Q, when has_q: Q-values at columns [qoff, qoff + V)), mx and s1 (the softmax's
    max and S − 1, for the gradient pass), plq. work (n, V) scratch with n ≥ nthreads."""
    cdef Py_ssize_t T = ids.shape[0], B = ids.shape[1], K = logits.shape[1], r
    _check_pass("policy_stats", logits.shape[0], K, T, B, V, &ids[0, 0], &sel[0, 0], sel.shape[0], sel.shape[1])
    need(not has_q or 0 <= qoff <= K - V, "policy_stats: Q-values at columns [qoff, qoff + V) of the logits")
    need(_bt(logp, B, T) and _bt(ent, B, T) and _bt(qb, B, T) and _bt(mx, B, T) and _bt(s1, B, T)
         and _bt(plq, B, T), "policy_stats: outputs (B, T)")
    need(work.shape[0] >= max(nthreads, 1) and work.shape[1] >= V, "policy_stats: work (nthreads, V)")
    if T * B == 0:
        return
    cdef const floating* L = &logits[0, 0]
    cdef floating* w = &work[0, 0]
    with nogil:
        if nthreads > 1 and T * B > 1:
            for r in prange(T * B, num_threads=nthreads, schedule="static"):
                _stats_one(L, K, &ids[0, 0], &sel[0, 0], B, T, r, V, alpha, eps, qoff, has_q,
                           &logp[0, 0], &ent[0, 0], &qb[0, 0], &mx[0, 0], &s1[0, 0], &plq[0, 0],
                           w + threadid() * V)
        else:
            for r in range(T * B):
                _stats_one(L, K, &ids[0, 0], &sel[0, 0], B, T, r, V, alpha, eps, qoff, has_q,
                           &logp[0, 0], &ent[0, 0], &qb[0, 0], &mx[0, 0], &s1[0, 0], &plq[0, 0], w)


# ----------------------------------------------------------------------------- pass 3

cdef inline void _grads_one(floating* logits, Py_ssize_t K, const int64_t* ids, const double* sel,
                            Py_ssize_t B, Py_ssize_t T, Py_ssize_t r, Py_ssize_t V, double alpha, double eps,
                            const double* mx, const double* s1, const double* logp, const double* plq,
                            const double* d_logp, const double* d_ent, const double* d_pred,
                            Py_ssize_t pred_col, bint pred_q) noexcept nogil:
    cdef Py_ssize_t t = r // B, b = r - t * B, i = b * T + t, k
    cdef floating* z = logits + r * K
    cdef Py_ssize_t a = ids[r]
    if sel[i] == 0:
        memset(z, 0, K * sizeof(floating))
        return
    grad_row(z, V, a, alpha, eps, mx[i], s1[i], logp[i], plq[i], d_logp[i], d_ent[i])
    for k in range(V, K):
        z[k] = 0
    if pred_col >= 0:
        # the critic's prediction: V(s_t) at pred_col, or Q(s_t, a_t) at pred_col + a_t
        z[pred_col + (a if pred_q else 0)] = <floating>d_pred[i]


def policy_grads(floating[:, ::1] logits, const int64_t[:, ::1] ids, const double[:, ::1] sel,
                 Py_ssize_t V, double alpha, double eps, const double[:, ::1] mx, const double[:, ::1] s1,
                 const double[:, ::1] logp, const double[:, ::1] plq, const double[:, ::1] d_logp,
                 const double[:, ::1] d_ent, const double[:, ::1] d_pred, Py_ssize_t pred_col, bint pred_q,
                 int nthreads=1):
    """Pass 3: overwrite logits (T·B, K) with ∂L/∂logits. The policy's part comes from the
    upstream d_logp (on log π_ε(a_t)) and d_ent (on the entropy), (B, T); d_pred (B, T) goes to
    column pred_col (the value head) or pred_col + a_t (the qvalue head, pred_q); pred_col < 0:
    no critic. Rows off sel are 0."""
    cdef Py_ssize_t T = ids.shape[0], B = ids.shape[1], K = logits.shape[1], r
    _check_pass("policy_grads", logits.shape[0], K, T, B, V, &ids[0, 0], &sel[0, 0], sel.shape[0], sel.shape[1])
    need(pred_col < 0 or pred_col + (V if pred_q else 1) <= K, "policy_grads: the critic's columns lie outside K")
    need(_bt(mx, B, T) and _bt(s1, B, T) and _bt(logp, B, T) and _bt(plq, B, T) and _bt(d_logp, B, T)
         and _bt(d_ent, B, T) and _bt(d_pred, B, T), "policy_grads: (B, T) inputs")
    if T * B == 0:
        return
    cdef floating* L = &logits[0, 0]
    with nogil:
        if nthreads > 1 and T * B > 1:
            for r in prange(T * B, num_threads=nthreads, schedule="static"):
                _grads_one(L, K, &ids[0, 0], &sel[0, 0], B, T, r, V, alpha, eps, &mx[0, 0], &s1[0, 0],
                           &logp[0, 0], &plq[0, 0], &d_logp[0, 0], &d_ent[0, 0], &d_pred[0, 0], pred_col, pred_q)
        else:
            for r in range(T * B):
                _grads_one(L, K, &ids[0, 0], &sel[0, 0], B, T, r, V, alpha, eps, &mx[0, 0], &s1[0, 0],
                           &logp[0, 0], &plq[0, 0], &d_logp[0, 0], &d_ent[0, 0], &d_pred[0, 0], pred_col, pred_q)


# ----------------------------------------------------------------------------- pass 2

def reinforce_chain(const double[:, ::1] logp, const double[:, ::1] ref_logp, const double[:, ::1] am,
                    const double[::1] reward, const double[:, ::1] values, const double[:, ::1] qb,
                    const double[:, ::1] pred_q, bint critic_q, double beta, int kl_code, double gamma,
                    int ret_code, int base_code, int whiten_code, bint shift_mean, int agg_code,
                    double entropy_coef, double value_coef, const double[:, ::1] ent,
                    double[:, ::1] kl, double[:, ::1] rewards, double[:, ::1] G, double[:, ::1] bl,
                    double[:, ::1] adv, double[:, ::1] w, double[:, ::1] pred,
                    double[:, ::1] d_logp, double[:, ::1] d_ent, double[:, ::1] d_pred,
                    bint kl_in_loss=False, double lam=1.0, const int64_t[::1] group=None, int gscale_code=0,
                    double group_eps=1e-4, int surr_code=0, double clip_low=0.2, double clip_high=0.2,
                    const double[:, ::1] old_logp=None, double value_clip=0.0, const double[:, ::1] old_values=None,
                    double norm_len=0.0, double[:, ::1] ratio=None, double[::1] S=None, double[::1] sd=None,
                    unsigned char[::1] has=None):
    """The per-token chain of returns.py and reinforce.py, float64, every (B, T) output 0 off
    the action mask am. values: V(s_t) (value critic), qb: Σ π_ε Q (qvalue baseline), pred_q:
    Q(s_t, a_t) (qvalue critic). Returns (loss_pg, loss_ent, loss_value, loss_kl). The caller has
    checked what the reference raises on (no action; loo with < 2 rows; bessel with < 2 actions;
    the group checks) except σ_g + group_eps = 0, which it reads from ``sd`` (B,) afterwards.

    Issue 9 (docs/conventions.md §3.1): kl_in_loss (β·k in the loss, not the rewards), returns
    code 2 = GAE(lam), baseline codes 5/6 = group_mean/group_loo over ``group`` (B,) with S (B,)
    the rows' sequence returns and has (B,) whether the row has an action, gscale_code 1 = (G − b)/(σ_g + group_eps) with σ_g in sd (B,),
    surr_code 1 = PPO clip with ``old_logp`` (None: logp itself) writing ``ratio``, value_clip > 0
    around ``old_values``, aggregation code 3 = fixed_len (m / (B·L)).
    """
    cdef Py_ssize_t B = logp.shape[0], T = logp.shape[1], b, t, last, j
    cdef double x, k, g, tot, disc, N = 0, nrows = 0, n_b = 0, s_b = 0, S_all = 0, mu, var, den, sd_
    cdef double loss_pg = 0, loss_ent = 0, loss_value = 0, loss_kl = 0, e, a_next, v_next, delta, L
    cdef double rho, un, cl, ec, vc, dv, cv, dd, n_g, s_g
    cdef bint has_old = old_logp is not None, has_ratio = ratio is not None
    need(reward.shape[0] == B and _bt(ref_logp, B, T) and _bt(am, B, T) and _bt(values, B, T) and _bt(qb, B, T)
         and _bt(pred_q, B, T) and _bt(ent, B, T) and _bt(kl, B, T) and _bt(rewards, B, T) and _bt(G, B, T)
         and _bt(bl, B, T) and _bt(adv, B, T) and _bt(w, B, T) and _bt(pred, B, T) and _bt(d_logp, B, T)
         and _bt(d_ent, B, T) and _bt(d_pred, B, T), "reinforce_chain: (B, T) arrays and reward (B,)")
    need(ratio is None or _bt(ratio, B, T), "reinforce_chain: ratio (B, T)")
    need(old_logp is None or _bt(old_logp, B, T), "reinforce_chain: old_logp (B, T)")
    need(value_clip <= 0 or (old_values is not None and _bt(old_values, B, T)), "reinforce_chain: old_values (B, T)")
    need((base_code != 5 and base_code != 6) or (group is not None and group.shape[0] == B and S is not None
         and S.shape[0] == B and sd is not None and sd.shape[0] == B and has is not None and has.shape[0] == B),
         "reinforce_chain: group, S, sd, has (B,)")
    with nogil:
        for b in range(B):
            n_b = 0
            for t in range(T):
                if am[b, t] > 0:
                    n_b = n_b + 1
            N = N + n_b
            if n_b > 0:
                nrows = nrows + 1
        L = norm_len if norm_len > 0 else T
        for b in range(B):
            # KL estimate k_t and shaped rewards r_t = −β·k_t (kl_in reward) (+ R at the row's last action)
            last = -1
            n_b = 0
            for t in range(T):
                if am[b, t] > 0:
                    x = logp[b, t] - ref_logp[b, t]
                    if kl_code == 0:
                        k = x
                    elif kl_code == 1:
                        k = 0.5 * x * x
                    else:
                        k = expm1(-x) + x
                    kl[b, t] = k
                    rewards[b, t] = 0 if kl_in_loss else -beta * k
                    last = t
                    n_b = n_b + 1
                else:
                    kl[b, t] = 0
                    rewards[b, t] = 0
            if last >= 0:
                rewards[b, last] = rewards[b, last] + reward[b]
            # returns over actions only
            if ret_code == 0:                        # G_t = r_t + γ G_{t+1}
                g = 0
                for t in range(T - 1, -1, -1):
                    if am[b, t] > 0:
                        g = rewards[b, t] + gamma * g
                        G[b, t] = g
                    else:
                        G[b, t] = 0
            elif ret_code == 2:                      # GAE: A_t = δ_t + γλ A_next, G = A + V
                a_next = 0
                v_next = 0
                for t in range(T - 1, -1, -1):
                    if am[b, t] > 0:
                        delta = rewards[b, t] + gamma * v_next - values[b, t]
                        a_next = delta + gamma * lam * a_next
                        v_next = values[b, t]
                        G[b, t] = a_next + values[b, t]
                    else:
                        G[b, t] = 0
            else:                                    # G = Σ_j γ^j r_j, written at every action
                tot = 0
                disc = 1
                for t in range(T):
                    if am[b, t] > 0:
                        tot = tot + disc * rewards[b, t]
                        disc = disc * gamma
                for t in range(T):
                    G[b, t] = tot if am[b, t] > 0 else 0
            # aggregation weights
            for t in range(T):
                if am[b, t] > 0:
                    if agg_code == 0:
                        w[b, t] = 1.0 / N
                    elif agg_code == 2:
                        w[b, t] = 1.0 / nrows
                    elif agg_code == 3:
                        w[b, t] = 1.0 / (B * L)
                    else:
                        w[b, t] = 1.0 / n_b / nrows
                else:
                    w[b, t] = 0
        # baselines
        if base_code == 2 or base_code == 3:
            for b in range(B):
                for t in range(T):
                    if am[b, t] > 0:
                        S_all = S_all + G[b, t]
        if base_code == 5 or base_code == 6:        # the rows' sequence returns S_i = G at the first action
            for b in range(B):
                S[b] = 0
                has[b] = 0
                for t in range(T):
                    if am[b, t] > 0:
                        S[b] = G[b, t]
                        has[b] = 1
                        break
        for b in range(B):
            if base_code == 3:
                s_b = 0
                n_b = 0
                for t in range(T):
                    if am[b, t] > 0:
                        s_b = s_b + G[b, t]
                        n_b = n_b + 1
            elif base_code == 5 or base_code == 6:  # the group's rows with an action (the row: group_mean)
                s_b = 0
                n_b = 0
                mu = 0
                n_g = 0
                sd[b] = 0
                if has[b]:
                    for j in range(B):
                        if not has[j] or group[j] != group[b]:
                            continue
                        mu = mu + S[j]
                        n_g = n_g + 1
                        if j != b or base_code == 5:
                            s_b = s_b + S[j]
                            n_b = n_b + 1
                    if gscale_code == 1:             # σ_g: Bessel std of S over the group
                        mu = mu / n_g
                        var = 0
                        for j in range(B):
                            if has[j] and group[j] == group[b]:
                                var = var + (S[j] - mu) * (S[j] - mu)
                        sd[b] = sqrt(var / (n_g - 1))
            for t in range(T):
                if am[b, t] == 0:
                    bl[b, t] = 0
                elif base_code == 0:
                    bl[b, t] = values[b, t]
                elif base_code == 1:
                    bl[b, t] = qb[b, t]
                elif base_code == 2:
                    bl[b, t] = S_all / N
                elif base_code == 3:
                    bl[b, t] = (S_all - s_b) / (N - n_b)
                elif base_code == 5 or base_code == 6:
                    bl[b, t] = s_b / n_b
                else:
                    bl[b, t] = 0
                adv[b, t] = G[b, t] - bl[b, t] if am[b, t] > 0 else 0
                if gscale_code == 1 and am[b, t] > 0:
                    adv[b, t] = adv[b, t] / (sd[b] + group_eps)
        # whitening over all actions (statistics are constants)
        if whiten_code != 0:
            mu = 0
            for b in range(B):
                for t in range(T):
                    if am[b, t] > 0:
                        mu = mu + adv[b, t]
            mu = mu / N
            var = 0
            for b in range(B):
                for t in range(T):
                    if am[b, t] > 0:
                        var = var + (adv[b, t] - mu) * (adv[b, t] - mu)
            den = N - 1 if whiten_code == 2 else N
            sd_ = sqrt(var / den + 1e-8)
            for b in range(B):
                for t in range(T):
                    if am[b, t] > 0:
                        e = (adv[b, t] - mu) / sd_
                        if not shift_mean:
                            e = e + mu
                        adv[b, t] = e
        # the critic's prediction, the losses (minimised) and their upstream gradients
        for b in range(B):
            for t in range(T):
                if am[b, t] > 0:
                    pred[b, t] = pred_q[b, t] if critic_q else values[b, t]
                    rho = exp(logp[b, t] - (old_logp[b, t] if has_old else logp[b, t]))
                    if has_ratio:
                        ratio[b, t] = rho
                    if surr_code == 0:               # −A·logπ
                        loss_pg = loss_pg - w[b, t] * adv[b, t] * logp[b, t]
                        d_logp[b, t] = -w[b, t] * adv[b, t]
                    else:                            # −min(ρA, clip(ρ)A); ∂/∂logπ = −A·ρ on the unclipped branch
                        un = rho * adv[b, t]
                        cl = (1.0 - clip_low if rho < 1.0 - clip_low else (1.0 + clip_high if rho > 1.0 + clip_high
                              else rho)) * adv[b, t]
                        loss_pg = loss_pg + w[b, t] * -(un if un <= cl else cl)
                        d_logp[b, t] = -w[b, t] * adv[b, t] * rho if un <= cl else 0
                    if kl_in_loss:                   # + β·w·k, ∂/∂logπ = β·w·k'(x)
                        x = logp[b, t] - ref_logp[b, t]
                        loss_kl = loss_kl + w[b, t] * kl[b, t]
                        if kl_code == 0:
                            k = 1.0
                        elif kl_code == 1:
                            k = x
                        else:
                            k = -expm1(-x)
                        d_logp[b, t] = d_logp[b, t] + beta * w[b, t] * k
                    loss_ent = loss_ent + w[b, t] * ent[b, t]
                    e = pred[b, t] - G[b, t]
                    if value_clip > 0:               # max((V − G)², (V_clip − G)²) around old_values
                        dv = pred[b, t] - old_values[b, t]
                        cv = -value_clip if dv < -value_clip else (value_clip if dv > value_clip else dv)
                        vc = old_values[b, t] + cv
                        ec = vc - G[b, t]
                        dd = dv - cv                         # e − ec exactly (the reference's test)
                        if dd == 0 or dd * (e + ec) >= 0:
                            loss_value = loss_value + w[b, t] * e * e
                            d_pred[b, t] = value_coef * w[b, t] * e
                        else:
                            loss_value = loss_value + w[b, t] * ec * ec
                            d_pred[b, t] = value_coef * w[b, t] * ec if (dv < value_clip and dv > -value_clip) else 0
                    else:
                        loss_value = loss_value + w[b, t] * e * e
                        d_pred[b, t] = value_coef * w[b, t] * e
                    d_ent[b, t] = -entropy_coef * w[b, t]
                else:
                    pred[b, t] = 0
                    d_logp[b, t] = 0
                    d_ent[b, t] = 0
                    d_pred[b, t] = 0
                    if has_ratio:
                        ratio[b, t] = 0
    return loss_pg, -entropy_coef * loss_ent, value_coef * 0.5 * loss_value, beta * loss_kl


def sft_chain(const double[:, ::1] logp, const double[:, ::1] pm, double[:, ::1] d_logp):
    """L_sft = −Σ logp / N_real over the positions pm; d_logp = −1/N_real there. Returns L_sft."""
    cdef Py_ssize_t B = logp.shape[0], T = logp.shape[1], b, t
    cdef double n = 0, s = 0
    need(_bt(pm, B, T) and _bt(d_logp, B, T), "sft_chain: (B, T) arrays")
    with nogil:
        for b in range(B):
            for t in range(T):
                if pm[b, t] > 0:
                    n = n + 1
                    s = s + logp[b, t]
        for b in range(B):
            for t in range(T):
                d_logp[b, t] = -1.0 / n if pm[b, t] > 0 else 0
    return -s / n
