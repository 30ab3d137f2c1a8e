# Cython twin of rlhf_ref/policy.py for ONE row of action scores z (V,), inline (cimported by
# _train_cy.pyx and _rollout_cy.pyx), so that the training passes and the rollout run the policy
# fused, with no (B, T, V) temporaries. The formulas are the reference's (policy.py docstring):
#
#   Boltzmann    log π(a)   = s_a − lse,  s = α·z (in the row's dtype, as NumPy rounds alpha * z),
#                lse = m + log S,  S = Σ_k exp(s_k − m),  m = max_k s_k, and log S = log1p(S − 1)
#                with S − 1 summed without the maximum's term (exactly 1), so that log S keeps its
#                relative accuracy when one token takes nearly all the mass. In float64 log π(a)
#                is evaluated in the reference's order s_a − (m + log S), so both round alike (that
#                order rounds m + log S first: a log-probability near 0 is accurate only to eps·|m|,
#                in the reference too). In float32, compared with the float64 reference, as
#                (s_a − m) − log S, whose rounding stays relative to log π itself.
#   ε-mixture    log π_ε(a) = logaddexp(log1p(−ε) + log π(a), log(ε/V)), in float64 (the reference
#                promotes to float64 there too), ε = 0: log π
#   classic ε-greedy / greedy   q = (1−ε)·onehot(argmax z) + ε/V (ties to the lowest index)
#   entropy      H = −Σ_k π_ε,k log π_ε,k,  0·log 0 = 0
#   gradient     ∂/∂z_j [d_logp·log π_ε(a) + d_ent·H]
#                  = scale·(δ_ja − π_j) + ce·(π_j log π_ε,j − π_j Σ_k π_k log π_ε,k)
#                scale = d_logp·α·(1−ε)·π_a/π_ε,a (ε = 0: d_logp·α),  ce = −d_ent·(1−ε)·α
#   sampling     a = #{k : cdf_k ≤ u·cdf_{V−1}}, cdf the running sum of q from index 0 (q in the row's
#                dtype, accumulated in float64, u scaled by the total, as policy.sample does; the
#                ε-mixture, computed in float64, has total 1 ± 1e-16 and compares u itself);
#                if u ≥ cdf_{V−1}: the last k with q_k > 0
#
# `e` arguments are (V,) scratch rows of the row's dtype. The exp of a row is one vectorised loop
# into e; sums over a row use four accumulators in a fixed order (deterministic, and not
# serialised on the add latency).

from cython cimport floating
from libc.math cimport log, log1p, exp as libm_exp, INFINITY
from ._common_cy cimport vexp, exp_row, logaddexp, log1m, RR_HAVE_CLONES   # noqa: the C below uses RR_CLONES

cdef extern from *:
    """
    /* The scans of a row that the policy runs once per sampled token, in C with the instruction-
       set clones (RR_CLONES): in the Cython loops they were scalar, with a branch per entry
       (row_ok, the maximum and its index, q = e / S with its float64 total, the CDF search),
       and took most of the policy's share of a rollout step. Each returns what its scalar
       loop returned, bit for bit (the sign of a zero maximum aside: see rr_max_first). */

    /* max_k s_k over s (V), NaN/+inf-free or not: 16 running maxima (vectorised selects), then
       combined; *kmax = the first k with s_k == max (NumPy's argmax; ties to the lowest index).
       As the scalar loop (m = s_0; m = s_k where s_k > m): s_0 NaN gives m = NaN, kmax = 0;
       other NaN entries are skipped. Only the sign of a zero maximum may differ (+0 where the
       scalar loop kept an earlier -0): equal values, the same kmax. */
    #define RR_MAX_FIRST(NAME, T)                                                               \\
    RR_CLONES static T NAME(const T* restrict s, ptrdiff_t V, ptrdiff_t* restrict kmax) {       \\
        T mx[16], m;                                                                            \\
        ptrdiff_t k, l, V16 = V - V % 16;                                                       \\
        if (V <= 0) { *kmax = 0; return (T)(-INFINITY); }                                       \\
        if (s[0] != s[0]) { *kmax = 0; return s[0]; }                                           \\
        for (l = 0; l < 16; l++) mx[l] = s[0];                                                  \\
        for (k = 0; k < V16; k += 16)                                                           \\
            for (l = 0; l < 16; l++) mx[l] = s[k + l] > mx[l] ? s[k + l] : mx[l];               \\
        for (k = V16; k < V; k++) mx[0] = s[k] > mx[0] ? s[k] : mx[0];                          \\
        m = mx[0];                                                                              \\
        for (l = 1; l < 16; l++) m = mx[l] > m ? mx[l] : m;                                     \\
        for (k = 0; k < V && !(s[k] == m); k++) {}                                              \\
        *kmax = k < V ? k : 0;                                                                  \\
        return m;                                                                               \\
    }
    RR_MAX_FIRST(rr_max_first_f32, float)
    RR_MAX_FIRST(rr_max_first_f64, double)

    /* policy.check_scores for one row: max_k al*z_k (rounded to T) is finite, i.e. no NaN, no
       +inf, and not every entry -inf. */
    #define RR_ROW_OK(NAME, T)                                                                  \\
    RR_CLONES static int NAME(const T* restrict z, ptrdiff_t V, T al) {                         \\
        T mx[16], m = (T)(-INFINITY), x;                                                        \\
        int bad = 0;                                                                            \\
        ptrdiff_t k, l, V16 = V - V % 16;                                                       \\
        for (l = 0; l < 16; l++) mx[l] = (T)(-INFINITY);                                        \\
        for (k = 0; k < V16; k += 16)                                                           \\
            for (l = 0; l < 16; l++) {                                                          \\
                x = al * z[k + l];                                                              \\
                bad |= (x != x) | (x == (T)INFINITY);                                           \\
                mx[l] = x > mx[l] ? x : mx[l];                                                  \\
            }                                                                                   \\
        for (k = V16; k < V; k++) {                                                             \\
            x = al * z[k];                                                                      \\
            bad |= (x != x) | (x == (T)INFINITY);                                               \\
            mx[0] = x > mx[0] ? x : mx[0];                                                      \\
        }                                                                                       \\
        for (l = 0; l < 16; l++) m = mx[l] > m ? mx[l] : m;                                     \\
        return !bad && m > (T)(-INFINITY);                                                      \\
    }
    RR_ROW_OK(rr_row_ok_f32, float)
    RR_ROW_OK(rr_row_ok_f64, double)

    /* Inverse-CDF draw over e (V): e_k <- e_k / S in place (q in the row's dtype), the CDF of q
       accumulated in float64 from index 0, u scaled by its total; returns #{k : cdf_k <= u tot},
       the first k with cdf_k > u tot, or -1 when there is none. The running sum is one serial
       pass (the reference's cumsum order), kept for the search when V <= 512. */
    #define RR_CDF_DRAW(NAME, T)                                                                \\
    RR_CLONES static ptrdiff_t NAME(T* restrict e, ptrdiff_t V, T S, double u) {                \\
        double cdf[512], acc = 0, thr;                                                          \\
        ptrdiff_t k;                                                                            \\
        for (k = 0; k < V; k++) e[k] = e[k] / S;                                                \\
        if (V <= 512) {                                                                         \\
            for (k = 0; k < V; k++) { acc = acc + (double)e[k]; cdf[k] = acc; }                 \\
            thr = u * acc;                                                                      \\
            for (k = 0; k < V; k++) if (cdf[k] > thr) return k;                                 \\
            return -1;                                                                          \\
        }                                                                                       \\
        for (k = 0; k < V; k++) acc = acc + (double)e[k];                                       \\
        thr = u * acc;                                                                          \\
        acc = 0;                                                                                \\
        for (k = 0; k < V; k++) { acc = acc + (double)e[k]; if (acc > thr) return k; }          \\
        return -1;                                                                              \\
    }
    RR_CDF_DRAW(rr_cdf_draw_f32, float)
    RR_CDF_DRAW(rr_cdf_draw_f64, double)
    """
    float rr_max_first_f32(const float* s, Py_ssize_t V, Py_ssize_t* kmax) noexcept nogil
    double rr_max_first_f64(const double* s, Py_ssize_t V, Py_ssize_t* kmax) noexcept nogil
    int rr_row_ok_f32(const float* z, Py_ssize_t V, float al) noexcept nogil
    int rr_row_ok_f64(const double* z, Py_ssize_t V, double al) noexcept nogil
    Py_ssize_t rr_cdf_draw_f32(float* e, Py_ssize_t V, float S, double u) noexcept nogil
    Py_ssize_t rr_cdf_draw_f64(double* e, Py_ssize_t V, double S, double u) noexcept nogil

cdef enum:
    BOLTZMANN = 0
    EPS_GREEDY = 1
    GREEDY = 2


ctypedef struct RowStats:
    double lp       # log π_ε(a)
    double ent      # H(π_ε)
    double qb       # Σ_k π_ε,k Q_k (the qvalue baseline), when asked
    double plq      # Σ_k π_k log π_ε,k (for the entropy gradient)
    double mx       # m = max_k α z_k (in the row's dtype, exactly)
    double s1       # S − 1 = Σ_{k ≠ k*} exp(α z_k − m), k* the first maximum (in the row's dtype, exactly)


cdef inline floating row_sum(const floating* e, Py_ssize_t V) noexcept nogil:
    cdef floating s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t k = 0
    while k + 4 <= V:
        s0 = s0 + e[k]
        s1 = s1 + e[k + 1]
        s2 = s2 + e[k + 2]
        s3 = s3 + e[k + 3]
        k += 4
    while k < V:
        s0 = s0 + e[k]
        k += 1
    return (s0 + s1) + (s2 + s3)


cdef inline bint row_ok(const floating* z, Py_ssize_t V, double alpha, int kind) noexcept nogil:
    """The row gives a policy (policy.check_scores): max_k α·z_k (max_k z_k for the greedy kinds),
    NaN-propagating, is finite. α·z is rounded to the row's dtype, as the reference rounds it."""
    cdef floating al = <floating>alpha if kind == BOLTZMANN else <floating>1
    if floating is float:
        return rr_row_ok_f32(z, V, al) != 0
    else:
        return rr_row_ok_f64(z, V, al) != 0


cdef inline Py_ssize_t argmax_row(const floating* z, Py_ssize_t V) noexcept nogil:
    """The first maximum (NumPy's argmax: ties to the lowest index)."""
    cdef Py_ssize_t k, best = 0
    for k in range(1, V):
        if z[k] > z[best]:
            best = k
    return best


cdef inline floating softmax_row(const floating* z, Py_ssize_t V, floating al, floating* e,
                                 floating* s1) noexcept nogil:
    """e[k] = exp(s_k − m) with s_k = α z_k rounded as NumPy rounds alpha * z and m = max s_k;
    returns m and sets s1 = S − 1, the sum of every term but the (first) maximum's, which is
    exactly 1. S = 1 + s1 and log S = log1p(s1): computed so, log S keeps its relative accuracy
    when one token takes nearly all the mass (S → 1), where log of a rounded S loses it."""
    cdef Py_ssize_t k, kmax = 0
    cdef floating m
    for k in range(V):
        e[k] = al * z[k]
    if floating is float:                       # m = max_k e_k, kmax its first index
        m = rr_max_first_f32(e, V, &kmax)
    else:
        m = rr_max_first_f64(e, V, &kmax)
    exp_row(e, V, <floating>1, -m, e)          # exp(s_k − m): s_k − m is exact or one rounding
    e[kmax] = 0
    s1[0] = row_sum(e, V)
    e[kmax] = 1                                 # exp(0)
    return m


cdef inline floating log_s(floating s1) noexcept nogil:
    """log S = log1p(S − 1)."""
    return <floating>log1p(s1)


cdef inline floating logpi(floating s, floating m, floating ls) noexcept nogil:
    """log π_k from s_k = α z_k, m and ls = log S (the order: see the top of this file)."""
    if floating is double:
        return s - (m + ls)
    else:
        return (s - m) - ls


cdef inline RowStats stats_row(const floating* z, Py_ssize_t V, Py_ssize_t a, double alpha, double eps,
                               const floating* qz, bint has_q, floating* e) noexcept nogil:
    """For an action position: log π_ε(a), the entropy, the qvalue baseline and what the gradient
    pass needs (Boltzmann ε-mixture over z[:V]; qz[:V] are Q-values, read when has_q)."""
    cdef RowStats st
    cdef floating al = <floating>alpha, S, s1, m, ls, pk, lq, zero = 0
    cdef double l1, le, lqd, qk, ent = 0, plq = 0, qb = 0
    cdef Py_ssize_t k
    m = softmax_row(z, V, al, e, &s1)
    S = 1 + s1
    ls = log_s(s1)
    st.mx = m
    st.s1 = s1
    st.lp = logpi(al * z[a], m, ls)
    if eps > 0.0:
        l1 = log1m(eps)
        le = log(eps / V)
        st.lp = logaddexp(l1 + st.lp, le)
        for k in range(V):
            pk = e[k] / S
            lqd = logaddexp(l1 + <double>logpi(al * z[k], m, ls), le)
            qk = libm_exp(lqd)
            if qk > 0:
                ent = ent - qk * lqd
            if pk > zero:
                plq = plq + pk * lqd
            if has_q:
                qb = qb + qk * qz[k]
    else:
        for k in range(V):
            pk = e[k] / S
            if pk > zero:                       # 0·log 0 = 0
                plq = plq + pk * logpi(al * z[k], m, ls)
            if has_q:
                qb = qb + pk * qz[k]
        ent = -plq
    st.ent = ent
    st.plq = plq
    st.qb = qb
    return st


cdef inline void grad_row(floating* z, Py_ssize_t V, Py_ssize_t a, double alpha, double eps,
                          double mx, double s1, double lq_a, double plq, double d_logp,
                          double d_ent) noexcept nogil:
    """Overwrite z[:V] with ∂/∂z of d_logp·log π_ε(a) + d_ent·H(π_ε) (formula above); mx, s1
    as stats_row returned them (so that π is the same here as there)."""
    cdef floating al = <floating>alpha, m = <floating>mx, fs1 = <floating>s1, S, ls, s, p, lq, zero = 0
    cdef floating fscale, fce, fplq = <floating>plq
    cdef double scale, ce, l1, le, lqd, pa
    cdef Py_ssize_t k
    S = 1 + fs1
    ls = log_s(fs1)
    scale = d_logp * alpha
    if eps > 0.0:
        pa = vexp((al * z[a]) - m) / S
        scale = scale * (1.0 - eps) * pa / libm_exp(lq_a)
    ce = -d_ent * (1.0 - eps) * alpha
    fscale = <floating>scale
    fce = <floating>ce
    if eps > 0.0:
        l1 = log1m(eps)
        le = log(eps / V)
        for k in range(V):
            s = al * z[k]
            p = vexp(s - m) / S
            lqd = logaddexp(l1 + <double>logpi(s, m, ls), le)
            lq = <floating>lqd
            z[k] = -fscale * p + fce * ((p * lq if p > zero else zero) - p * fplq)
    elif d_ent != 0.0:
        for k in range(V):
            s = al * z[k]
            p = vexp(s - m) / S
            lq = logpi(s, m, ls)
            z[k] = -fscale * p + fce * ((p * lq if p > zero else zero) - p * fplq)
    else:
        for k in range(V):                      # in place: z_k ← s_k, exp(s_k − m), then −scale·π_k
            z[k] = al * z[k]
        exp_row(z, V, <floating>1, -m, z)
        for k in range(V):
            z[k] = -fscale * (z[k] / S)
    z[a] = z[a] + fscale


cdef inline double greedy_logprob(const floating* z, Py_ssize_t V, Py_ssize_t a, double eps) noexcept nogil:
    """log q(a) of classic ε-greedy: log((1−ε) + ε/V) at the argmax, log(ε/V) elsewhere, in the
    row's dtype (the reference rounds log(q) to it); −inf where q = 0."""
    cdef double qa = ((1.0 - eps) + eps / V) if a == argmax_row(z, V) else eps / V
    if qa > 0:
        return <floating>log(qa)
    return -INFINITY


cdef inline double logprob_row(const floating* z, Py_ssize_t V, Py_ssize_t a, double alpha, double eps,
                               int kind, floating* e) noexcept nogil:
    """log q(a) under the policy `kind` over z[:V] (the frozen reference policy at a sampled token)."""
    cdef floating al = <floating>alpha, s1, m, lp
    if kind == BOLTZMANN:
        m = softmax_row(z, V, al, e, &s1)
        lp = logpi(al * z[a], m, log_s(s1))
        if eps > 0.0:
            return logaddexp(log1m(eps) + <double>lp, log(eps / V))
        return lp
    return greedy_logprob(z, V, a, eps)


cdef inline Py_ssize_t sample_row(const floating* z, Py_ssize_t V, double alpha, double eps, int kind,
                                  double u, floating* e, double* lp_out) noexcept nogil:
    """Sample one token from the policy `kind` over z[:V] with the uniform u; lp_out = log q(a)."""
    cdef floating al = <floating>alpha, S, s1, m, ls, hi, lo
    cdef double l1, le, lqd, qd, accd = 0, tot = 0
    cdef Py_ssize_t k, a = -1, last = -1, g
    if kind == BOLTZMANN:
        m = softmax_row(z, V, al, e, &s1)
        S = 1 + s1
        ls = log_s(s1)
        if eps > 0.0:
            # the ε-mixture in float64, as the reference computes it
            l1 = log1m(eps)
            le = log(eps / V)
            for k in range(V):
                qd = libm_exp(logaddexp(l1 + <double>logpi(al * z[k], m, ls), le))
                accd = accd + qd
                if qd > 0:
                    last = k
                if a < 0 and accd > u:
                    a = k
            if a < 0:
                a = last
            lp_out[0] = logaddexp(l1 + <double>logpi(al * z[a], m, ls), le)
            return a
        # q_k = π_k = e_k / S (the reference samples from exp(log π_k): equal up to rounding,
        # which only moves a tie at a CDF boundary)
        # e_k <- π_k = e_k / S; the CDF in float64, u scaled by its total (policy.sample)
        if floating is float:
            a = rr_cdf_draw_f32(e, V, S, u)
        else:
            a = rr_cdf_draw_f64(e, V, S, u)
        if a < 0:
            for k in range(V - 1, -1, -1):
                if e[k] > 0:
                    a = k
                    break
        lp_out[0] = logpi(al * z[a], m, ls)
        return a
    # classic ε-greedy / greedy
    g = argmax_row(z, V)
    hi = <floating>((1.0 - eps) + eps / V)
    lo = <floating>(eps / V)
    for k in range(V):
        tot = tot + <double>(hi if k == g else lo)
    u = u * tot                                 # the CDF in float64, u scaled by its total (policy.sample)
    for k in range(V):
        accd = accd + <double>(hi if k == g else lo)
        if accd > u:
            a = k
            break
    if a < 0:
        a = V - 1 if lo > 0 else g
    lp_out[0] = greedy_logprob(z, V, a, eps)
    return a
