/* The loss kernels of losses/_native.c for one element type: included twice, with
   T = float, FN(x) = x##_f32 and with T = double, FN(x) = x##_f64 (EXP, the exponent floor
   FLOOR and the largest value BIG defined to match). Every function reads a contiguous score
   matrix s [n, m], boolean masks p, q [n, m] (bytes 0 / 1) and writes dL/dS into g [n, m]
   (when g is not NULL); it returns the loss value through *out. The arithmetic on single
   entries is the torch kernel's, in T, in the same order (the same comparisons, so the same
   active terms); sums are taken in double. See losses/native.py for the formulas' sources. */

/* the check of kernels.check_values: 1 when a score is NaN or +-Inf (its exponent bits all
   set), 2 when the masks hold no term of the kind `terms` asks for (TERMS_*), else 0 */
static int FN(check)(const T *s, const uint8_t *p, const uint8_t *q, Py_ssize_t total,
                     int terms)
{
    int bad = 0;
    uint8_t hp = 0, hq = 0;
    for (Py_ssize_t i = 0; i < total; i++) {
        I b;
        memcpy(&b, s + i, sizeof b);
        bad |= (b & IEXP) == IEXP;
        hp |= p[i];
        hq |= q[i];
    }
    if (bad)
        return 1;
    if ((terms == TERMS_POSITIVES && !hp) || (terms == TERMS_ANY && !hp && !hq)
        || (terms == TERMS_BOTH && !(hp && hq)))
        return 2;
    return 0;
}

FINITE_BEGIN
/* masked extremes of a row, for finite values (the check has run): compiled without NaN
   semantics, so that the comparisons become vector maxima / minima */

/* the largest x_j with keep_j into *out; 0 without a kept entry */
static int FN(masked_max)(const T *x, const uint8_t *keep, Py_ssize_t m, T *out)
{
    T r = -BIG;
    int any = 0;
    for (Py_ssize_t j = 0; j < m; j++) {
        int k = keep[j] & (x[j] <= BIG); /* always true: it makes the load unconditional */
        T c = k ? x[j] : -BIG;
        r = c > r ? c : r;
        any |= k;
    }
    *out = r;
    return any;
}

/* the smallest x_j with keep_j into *out; 0 without a kept entry */
static int FN(masked_min)(const T *x, const uint8_t *keep, Py_ssize_t m, T *out)
{
    T r = BIG;
    int any = 0;
    for (Py_ssize_t j = 0; j < m; j++) {
        int k = keep[j] & (x[j] >= -BIG);
        T c = k ? x[j] : BIG;
        r = c < r ? c : r;
        any |= k;
    }
    *out = r;
    return any;
}

/* the largest x_j < v over kept j into *out; 0 without one */
static int FN(max_below)(const T *x, const uint8_t *keep, T v, Py_ssize_t m, T *out)
{
    T r = -BIG;
    int any = 0;
    for (Py_ssize_t j = 0; j < m; j++) {
        int k = keep[j] & (x[j] < v);
        T c = k ? x[j] : -BIG;
        r = c > r ? c : r;
        any |= k;
    }
    *out = r;
    return any;
}
FINITE_END

/* the first j with keep_j and x_j == v (torch.max's first maximal index) */
static Py_ssize_t FN(first)(const T *x, const uint8_t *keep, T v, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++)
        if (keep[j] && x[j] == v)
            return j;
    return -1;
}

static Py_ssize_t FN(count_row)(const uint8_t *mask, Py_ssize_t m)
{
    int c = 0;
    for (Py_ssize_t j = 0; j < m; j++)
        c += mask[j];
    return c;
}

/* e_j = exp(min(max(x_j - mx, FLOOR), 0)) on kept entries, exactly 0 elsewhere */
static void FN(exp_row)(const T *x, const uint8_t *keep, T mx, T *e, Py_ssize_t m)
{
    for (Py_ssize_t j = 0; j < m; j++) {
        T t = x[j] - mx;
        t = t > (T)FLOOR ? t : (T)FLOOR;
        t = t < 0 ? t : 0;
        e[j] = EXP(t) * (T)keep[j];
    }
}

REASSOCIATE_BEGIN
/* sums, accumulated in double in any order (the compiler may vectorise them) */
static double FN(sum)(const T *x, Py_ssize_t m)
{
    double r = 0;
    for (Py_ssize_t j = 0; j < m; j++)
        r += (double)x[j];
    return r;
}

/* sum_j x_j over kept j */
static double FN(masked_sum)(const T *x, const uint8_t *keep, Py_ssize_t m)
{
    double r = 0;
    for (Py_ssize_t j = 0; j < m; j++)
        r += (double)(x[j] * (T)keep[j]);
    return r;
}

/* sum_j (x_j - shift) c_j */
static double FN(dot_shift)(const T *x, const T *c, T shift, Py_ssize_t m)
{
    double r = 0;
    for (Py_ssize_t j = 0; j < m; j++)
        r += (double)((x[j] - shift) * c[j]);
    return r;
}
REASSOCIATE_END

/* log-sum-exp of x over the kept entries of a row, the exponentials e and their sum z
   (kernels.stacked_lse's): lse = max + log z; a row without a kept entry gives -inf, z = 0 */
static double FN(row_lse)(const T *x, const uint8_t *keep, T *e, Py_ssize_t m, double *z)
{
    T mx;
    if (!FN(masked_max)(x, keep, m, &mx)) {
        memset(e, 0, (size_t)m * sizeof(T));
        *z = 0;
        return -INFINITY;
    }
    FN(exp_row)(x, keep, mx, e, m);
    *z = FN(sum)(e, m);
    return (double)mx + log(*z);
}

/* ----------------------------------------------------------------- contrastive (Hadsell 2006)
   functional._contrastive_kernel: hp = relu(t_pos - S) on P, hn = relu(S - t_neg) on Q;
   dL/dS = w_Q on active negatives - w_P on active positives */
static int FN(contrastive)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                           Py_ssize_t m, int red, double t_pos, double t_neg, double *out)
{
    const T tp = (T)t_pos, tn = (T)t_neg;
    T *buf = (T *)malloc((size_t)(2 * m) * sizeof(T));
    if (!buf)
        return -1;
    T *hp = buf, *hn = buf + m;
    double sp = 0, sn = 0;
    Py_ssize_t np_ = 0, nq = 0, ap = 0, an = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        int cp = 0, cn = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            T a = tp - si[j], b = si[j] - tn;
            hp[j] = (a > 0 ? a : 0) * (T)pi[j];
            hn[j] = (b > 0 ? b : 0) * (T)qi[j];
            cp += hp[j] > 0;
            cn += hn[j] > 0;
        }
        sp += FN(sum)(hp, m);
        sn += FN(sum)(hn, m);
        ap += cp;
        an += cn;
        np_ += FN(count_row)(pi, m);
        nq += FN(count_row)(qi, m);
    }
    free(buf);
    T wp = 1, wn = 1;
    if (red == RED_MEAN) {
        wp = (T)1 / (T)(np_ > 1 ? np_ : 1);
        wn = (T)1 / (T)(nq > 1 ? nq : 1);
    } else if (red == RED_NONZERO) {
        wp = (T)1 / (T)(ap > 1 ? ap : 1);
        wn = (T)1 / (T)(an > 1 ? an : 1);
    }
    *out = red == RED_SUM ? (double)((T)sp + (T)sn) : (double)((T)sp * wp + (T)sn * wn);
    if (g)
        for (Py_ssize_t k = 0; k < n * m; k++) {
            T a = tp - s[k], b = s[k] - tn;
            g[k] = (T)(q[k] & (b > 0)) * wn - (T)(p[k] & (a > 0)) * wp;
        }
    return 0;
}

/* ----------------------------------------------------------------- margin (Wu et al. 2017)
   pair_based._margin_kernel with one fixed boundary b (in score units): a positive pair is
   active where b + m - S > 0 (weight |Q_a|), a negative where S - (b - m) > 0 (weight |P_a|);
   coef = |P_a| on active negatives - |Q_a| on active positives; value
   (sum (S - b) coef + m active) / divisor */
static int FN(margin)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                      Py_ssize_t m, int red, double beta_b, double marg, double *out)
{
    const T b = (T)beta_b, mm = (T)marg, bpm = b + mm, bmm = b - mm;
    T *buf = (T *)malloc((size_t)(3 * m) * sizeof(T));
    if (!buf)
        return -1;
    T *wpos = buf, *wneg = buf + m;
    double total = 0, active = 0, ntrip = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        T *coef = g ? g + i * m : buf + 2 * m;
        T npos = (T)FN(count_row)(pi, m), nneg = (T)FN(count_row)(qi, m);
        for (Py_ssize_t j = 0; j < m; j++) {
            wpos[j] = (T)(pi[j] & (bpm - si[j] > 0)) * nneg;
            wneg[j] = (T)(qi[j] & (si[j] - bmm > 0)) * npos;
            coef[j] = wneg[j] - wpos[j];
        }
        active += FN(sum)(wpos, m) + FN(sum)(wneg, m);
        total += FN(dot_shift)(si, coef, b, m);
        ntrip += (double)npos * (double)nneg;
    }
    free(buf);
    T value = (T)total + mm * (T)active;
    if (red != RED_SUM) {
        T div = (T)(red == RED_MEAN ? ntrip : active);
        div = div > 1 ? div : 1;
        value = value / div;
        if (g)
            for (Py_ssize_t k = 0; k < n * m; k++)
                g[k] = g[k] / div;
    }
    *out = (double)value;
    return 0;
}

/* ----------------------------------------------------------------- triplets (Schroff 2015)
   functional._triplet_all_kernel: per anchor a and positive p, c_ap = #{n in Q_a :
   S_an > S_ap - m}; c_an = how many of a's positives make negative n active;
   G = c_an - c_ap (at the positives' columns); value w (sum G S + m sum c_ap) */
static int FN(triplet_all)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                           Py_ssize_t m, int red, double marg, double *out)
{
    const T mm = (T)marg;
    T *buf = (T *)malloc((size_t)(2 * m) * sizeof(T));
    if (!buf)
        return -1;
    T *cnt = buf;
    double total = 0, active = 0, ntrip = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        T *gi = g ? g + i * m : buf + m;
        memset(gi, 0, (size_t)m * sizeof(T));
        ntrip += (double)FN(count_row)(pi, m) * (double)FN(count_row)(qi, m);
        for (Py_ssize_t jp = 0; jp < m; jp++) {
            if (!pi[jp])
                continue;
            const T thr = si[jp] - mm;
            int c = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                int hit = qi[j] & (si[j] > thr);
                c += hit;
                gi[j] += (T)hit;
            }
            cnt[jp] = (T)c; /* c_ap, kept apart until the row's c_an is complete */
            active += c;
        }
        for (Py_ssize_t jp = 0; jp < m; jp++)
            if (pi[jp])
                gi[jp] -= cnt[jp];
        total += FN(dot_shift)(si, gi, 0, m);
    }
    free(buf);
    T act = (T)active;
    T value = (T)total + act * mm;
    if (red != RED_SUM) {
        T div = red == RED_NONZERO ? act : (T)ntrip;
        T w = (T)1 / (div > 1 ? div : 1);
        value = value * w;
        if (g)
            for (Py_ssize_t k = 0; k < n * m; k++)
                g[k] *= w;
    }
    *out = (double)value;
    return 0;
}

/* functional._triplet_hard_kernel (Hermans et al. 2017): per anchor its first smallest
   positive and first largest negative; term relu(S_an - S_ap + m) for an anchor with both */
static int FN(triplet_hard)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                            Py_ssize_t m, int red, double marg, double *out)
{
    const T mm = (T)marg;
    Py_ssize_t *cols = (Py_ssize_t *)malloc((size_t)(2 * (n > 0 ? n : 1)) * sizeof(Py_ssize_t));
    if (!cols)
        return -1;
    double total = 0;
    Py_ssize_t nok = 0, nact = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        T sp, sn;
        cols[2 * i] = -1; /* no active term */
        if (!FN(masked_min)(si, pi, m, &sp) || !FN(masked_max)(si, qi, m, &sn))
            continue;
        nok++;
        T d = (sn - sp) + mm;
        if (d > 0) {
            total += (double)d;
            nact++;
            cols[2 * i] = FN(first)(si, pi, sp, m);
            cols[2 * i + 1] = FN(first)(si, qi, sn, m);
        }
    }
    T w = 1;
    if (red != RED_SUM) {
        Py_ssize_t c = red == RED_NONZERO ? nact : nok;
        w = (T)1 / (T)(c > 1 ? c : 1);
    }
    *out = (double)((T)total * w);
    if (g) {
        memset(g, 0, (size_t)(n * m) * sizeof(T));
        for (Py_ssize_t i = 0; i < n; i++)
            if (cols[2 * i] >= 0) {
                g[i * m + cols[2 * i + 1]] += w;
                g[i * m + cols[2 * i]] -= w;
            }
    }
    free(cols);
    return 0;
}

/* functional._triplet_semihard_kernel (FaceNet, Schroff et al. 2015): per (anchor, positive)
   the first largest negative below the positive (S_an < S_ap), else the first smallest
   negative; term relu(S_an - S_ap + m) for an anchor with a negative */
static int FN(triplet_semihard)(const T *s, const uint8_t *p, const uint8_t *q, T *g,
                                Py_ssize_t n, Py_ssize_t m, int red, double marg, double *out)
{
    const T mm = (T)marg;
    Py_ssize_t cap = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        cap += FN(count_row)(p + i * m, m);
    /* the active slots: anchor, positive column, negative column */
    Py_ssize_t *slot = (Py_ssize_t *)malloc((size_t)(3 * (cap > 0 ? cap : 1)) * sizeof(Py_ssize_t));
    uint8_t *below = (uint8_t *)malloc((size_t)(m > 0 ? m : 1));
    if (!slot || !below) {
        free(slot);
        free(below);
        return -1;
    }
    double total = 0;
    Py_ssize_t nok = 0, nact = 0, t = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        T easiest;
        if (!FN(masked_min)(si, qi, m, &easiest))
            continue; /* no negative: the anchor's slots have no term */
        for (Py_ssize_t jp = 0; jp < m; jp++) {
            if (!pi[jp])
                continue;
            const T sap = si[jp];
            T sn;
            if (!FN(max_below)(si, qi, sap, m, &sn))
                sn = easiest;
            nok++;
            T x = (sn - sap) + mm;
            if (x > 0) {
                total += (double)x;
                nact++;
                slot[3 * t] = i;
                slot[3 * t + 1] = jp;
                slot[3 * t + 2] = FN(first)(si, qi, sn, m); /* sn < sap when semi-hard */
                t++;
            }
        }
    }
    free(below);
    T value = (T)total, w = 1;
    if (red != RED_SUM) {
        Py_ssize_t c = red == RED_NONZERO ? nact : nok;
        T div = (T)(c > 1 ? c : 1);
        value = value / div;
        w = (T)1 / div;
    }
    *out = (double)value;
    if (g) {
        memset(g, 0, (size_t)(n * m) * sizeof(T));
        for (Py_ssize_t u = 0; u < t; u++) {
            g[slot[3 * u] * m + slot[3 * u + 2]] += w;
            g[slot[3 * u] * m + slot[3 * u + 1]] -= w;
        }
    }
    free(slot);
    return 0;
}

/* ----------------------------------------------------------------- lifted structure
   pair_based._lifted_kernel (Oh Song et al. 2016; Hermans et al. 2017, eq. 5):
   l_i = relu(lse_P (t_pos - S) + lse_Q (S - t_neg)), an empty part's lse 0 */
static int FN(lifted)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                      Py_ssize_t m, int red, double t_pos, double t_neg, double *out)
{
    const T tp = (T)t_pos, tn = (T)t_neg;
    T *buf = (T *)malloc((size_t)(4 * m) * sizeof(T));
    if (!buf)
        return -1;
    T *xp = buf, *xq = buf + m, *ep = buf + 2 * m, *eq = buf + 3 * m;
    const double w = red == RED_SUM ? 1.0 : 1.0 / (double)(n > 1 ? n : 1);
    double total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            xp[j] = -si[j] + tp;
            xq[j] = si[j] + -tn;
        }
        double zp, zq;
        double lp = FN(row_lse)(xp, p + i * m, ep, m, &zp);
        double lq = FN(row_lse)(xq, q + i * m, eq, m, &zq);
        T hinge = (T)((zp > 0 ? lp : 0.0) + (zq > 0 ? lq : 0.0));
        total += hinge > 0 ? (double)hinge : 0.0;
        if (!g)
            continue;
        T *gi = g + i * m;
        if (hinge > 0) {
            T cp = zp > 0 ? (T)(-w / zp) : 0, cq = zq > 0 ? (T)(w / zq) : 0;
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = eq[j] * cq + ep[j] * cp;
        } else {
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = 0;
        }
    }
    free(buf);
    *out = (double)((T)total * (T)w);
    return 0;
}

/* ----------------------------------------------------------------- multi-similarity
   pair_based._multi_similarity_kernel (Wang et al. 2019, eq. 11), with the mining of eq. 7-8
   when eps >= 0 (pair_based._mined_keep): x = (S - base) (-alpha on P, beta on Q);
   l_i = softplus(lse_P x) / alpha + softplus(lse_Q x) / beta */
static int FN(multi_similarity)(const T *s, const uint8_t *p, const uint8_t *q, T *g,
                                Py_ssize_t n, Py_ssize_t m, int red, double alpha, double beta,
                                double base, double eps, int mine, double *out)
{
    const T tb = (T)base, sa = (T)(-alpha), sb = (T)beta, te = (T)eps;
    T *buf = (T *)malloc((size_t)(4 * m) * sizeof(T));
    uint8_t *keep = (uint8_t *)malloc((size_t)(2 * m > 0 ? 2 * m : 1));
    if (!buf || !keep) {
        free(buf);
        free(keep);
        return -1;
    }
    T *xp = buf, *xq = buf + m, *ep = buf + 2 * m, *eq = buf + 3 * m;
    uint8_t *kp = keep, *kq = keep + m;
    const double w = red == RED_SUM ? 1.0 : 1.0 / (double)(n > 1 ? n : 1);
    const T wa = (T)(w / alpha), wb = (T)(w / beta);
    double total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            T d = si[j] - tb;
            xp[j] = d * sa;
            xq[j] = d * sb;
        }
        double zp, zq, lp, lq;
        if (mine) {
            T minp = (T)INFINITY, maxq = -(T)INFINITY;
            int hasp = FN(masked_min)(si, pi, m, &minp), hasq = FN(masked_max)(si, qi, m, &maxq);
            int anyp = 0, anyq = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                kp[j] = pi[j] & hasq & (si[j] - te < maxq);
                kq[j] = qi[j] & hasp & (si[j] + te > minp);
                anyp |= kp[j];
                anyq |= kq[j];
            }
            /* the mined pairs' maximum of x: a row with a mined pair keeps its extreme one */
            if (anyp) {
                T mx = (minp - tb) * sa;
                FN(exp_row)(xp, kp, mx, ep, m);
                zp = FN(sum)(ep, m);
                lp = (double)mx + log(zp);
            } else {
                zp = 0, lp = -INFINITY;
            }
            if (anyq) {
                T mx = (maxq - tb) * sb;
                FN(exp_row)(xq, kq, mx, eq, m);
                zq = FN(sum)(eq, m);
                lq = (double)mx + log(zq);
            } else {
                zq = 0, lq = -INFINITY;
            }
        } else {
            lp = FN(row_lse)(xp, pi, ep, m, &zp);
            lq = FN(row_lse)(xq, qi, eq, m, &zq);
        }
        /* softplus with torch's threshold 40: x itself above it */
        double sp = zp > 0 ? (lp > 40 ? lp : log1p(exp(lp))) : 0.0;
        double sq = zq > 0 ? (lq > 40 ? lq : log1p(exp(lq))) : 0.0;
        total += (double)((T)sp * wa) + (double)((T)sq * wb);
        if (!g)
            continue;
        T cp = zp > 0 ? (T)(-w / (1.0 + exp(-lp)) / zp) : 0;
        T cq = zq > 0 ? (T)(w / (1.0 + exp(-lq)) / zq) : 0;
        T *gi = g + i * m;
        for (Py_ssize_t j = 0; j < m; j++)
            gi[j] = (zp > 0 ? ep[j] * cp : 0) + (zq > 0 ? eq[j] * cq : 0);
    }
    free(buf);
    free(keep);
    *out = total;
    return 0;
}

/* ----------------------------------------------------------------- Circle (Sun et al. 2020)
   pair_based._circle_kernel: x_P = -gamma relu(1 + m - S) (S - (1 - m)),
   x_Q = gamma relu(S + m) (S - m) (weights W constant); l_i = softplus(lse_P + lse_Q);
   dL/dS = sigmoid(z_i) / divisor (e_P W_P / z_P + e_Q W_Q / z_Q) */
static int FN(circle)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                      Py_ssize_t m, int red, double cm, double gamma, double *out)
{
    const T onepm = (T)(1.0 + cm), onemm = (T)(1.0 - cm), tm = (T)cm, ng = (T)(-gamma),
            pg = (T)gamma;
    T *buf = (T *)malloc((size_t)(6 * m + (g ? n * m : 0)) * sizeof(T));
    double *row = (double *)malloc((size_t)(3 * (n > 0 ? n : 1)) * sizeof(double));
    if (!buf || !row) {
        free(buf);
        free(row);
        return -1;
    }
    T *xp = buf, *xq = buf + m, *ep = buf + 2 * m, *eq = buf + 3 * m, *wp = buf + 4 * m,
      *wq = buf + 5 * m, *store = buf + 6 * m;
    double total = 0;
    Py_ssize_t nboth = 0, nnz = 0;
    /* first pass: the terms (the divisor counts them); e W of both parts kept in g and store */
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            T a = -si[j] + onepm, b = si[j] + tm;
            wp[j] = (a > 0 ? a : 0) * ng;
            wq[j] = (b > 0 ? b : 0) * pg;
            xp[j] = (si[j] - onemm) * wp[j];
            xq[j] = (si[j] - tm) * wq[j];
        }
        double zp, zq;
        double lp = FN(row_lse)(xp, p + i * m, ep, m, &zp);
        double lq = FN(row_lse)(xq, q + i * m, eq, m, &zq);
        int both = zp > 0 && zq > 0;
        double zi = both ? lp + lq : -INFINITY;
        T term = (T)(zi > 40 ? zi : log1p(exp(zi)));
        row[3 * i] = zi;
        row[3 * i + 1] = zp;
        row[3 * i + 2] = zq;
        total += (double)term;
        nboth += both;
        nnz += term != 0;
        if (g)
            for (Py_ssize_t j = 0; j < m; j++) {
                g[i * m + j] = ep[j] * wp[j];
                store[i * m + j] = eq[j] * wq[j];
            }
    }
    T div = 1;
    if (red != RED_SUM) {
        Py_ssize_t c = red == RED_NONZERO ? nnz : nboth;
        div = (T)(c > 1 ? c : 1);
    }
    *out = (double)((T)total / div);
    if (g)
        for (Py_ssize_t i = 0; i < n; i++) {
            T *gi = g + i * m, *st = store + i * m;
            double zi = row[3 * i], zp = row[3 * i + 1], zq = row[3 * i + 2];
            double sig = zp > 0 && zq > 0 ? 1.0 / (1.0 + exp(-zi)) / (double)div : 0.0;
            T cp = sig > 0 ? (T)(sig / zp) : 0, cq = sig > 0 ? (T)(sig / zq) : 0;
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = gi[j] * cp + st[j] * cq;
        }
    free(buf);
    free(row);
    return 0;
}

/* ----------------------------------------------------------------- NCA (Goldberger 2005)
   pair_based._nca_kernel: l_i = lse_{P u Q} (s S) - lse_P (s S) for an anchor with a
   positive; dL/dS = s w (e_all / z_all - e_P / z_P) */
static int FN(nca)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                   Py_ssize_t m, int red, double scale, double *out)
{
    const T sc = (T)scale;
    T *buf = (T *)malloc((size_t)(3 * m + (g ? n * m : 0)) * sizeof(T));
    uint8_t *all = (uint8_t *)malloc((size_t)(m > 0 ? m : 1));
    double *row = (double *)malloc((size_t)(2 * (n > 0 ? n : 1)) * sizeof(double));
    if (!buf || !all || !row) {
        free(buf);
        free(all);
        free(row);
        return -1;
    }
    T *x = buf, *ea = buf + m, *ep = buf + 2 * m, *store = buf + 3 * m;
    double total = 0;
    Py_ssize_t nhas = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            x[j] = scale != 1.0 ? si[j] * sc : si[j];
            all[j] = pi[j] | qi[j];
        }
        double za, zp;
        double la = FN(row_lse)(x, all, g ? g + i * m : ea, m, &za);
        double lp = FN(row_lse)(x, pi, g ? store + i * m : ep, m, &zp);
        row[2 * i] = za;
        row[2 * i + 1] = zp;
        if (zp > 0) {
            total += (double)((T)la - (T)lp);
            nhas++;
        }
    }
    T w = sc;
    T value = (T)total;
    if (red != RED_SUM) {
        T c = (T)(nhas > 1 ? nhas : 1);
        value = value / c;
        w = (T)(scale / (double)c);
    }
    *out = (double)value;
    if (g)
        for (Py_ssize_t i = 0; i < n; i++) {
            T *gi = g + i * m, *st = store + i * m;
            double za = row[2 * i], zp = row[2 * i + 1];
            T ca = zp > 0 ? (T)((double)w / za) : 0, cp = zp > 0 ? (T)((double)w / zp) : 0;
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = gi[j] * ca - st[j] * cp;
        }
    free(buf);
    free(all);
    free(row);
    return 0;
}

/* ----------------------------------------------------------------- InfoNCE, SupCon form
   functional._supcon_kernel (Khosla et al. 2020, L_out): with V = P u Q,
   l_i = lse_V S_i. - mean_P S_i. for an anchor with a positive;
   dL/dS = w (softmax_V - P / |P_i|), w the reduction's weight */
static int FN(supcon)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                      Py_ssize_t m, int red, double *out)
{
    T *buf = (T *)malloc((size_t)(2 * m) * sizeof(T));
    uint8_t *v = (uint8_t *)malloc((size_t)(m > 0 ? m : 1));
    double *row = (double *)malloc((size_t)(3 * (n > 0 ? n : 1)) * sizeof(double));
    if (!buf || !v || !row) {
        free(buf);
        free(v);
        free(row);
        return -1;
    }
    T *pf = buf + m;
    double total = 0;
    Py_ssize_t used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        T *e = g ? g + i * m : buf;
        Py_ssize_t nv = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            v[j] = pi[j] | qi[j];
            pf[j] = (T)pi[j];
            nv += v[j];
        }
        Py_ssize_t np_ = FN(count_row)(pi, m);
        double z;
        double lse = FN(row_lse)(si, v, e, m, &z);
        row[3 * i] = (double)np_;
        row[3 * i + 1] = z;
        if (!np_)
            continue;
        T inv = (T)1 / (T)np_;
        T pulled = (T)FN(dot_shift)(si, pf, 0, m) * inv;
        total += (double)((T)lse - pulled);
        used += nv > 1;
    }
    T w = 1;
    T value = (T)total;
    if (red != RED_SUM) {
        T c = (T)(used > 1 ? used : 1);
        value = value / c;
        w = (T)1 / c;
    }
    *out = (double)value;
    if (g)
        for (Py_ssize_t i = 0; i < n; i++) {
            T *gi = g + i * m;
            const uint8_t *pi = p + i * m;
            Py_ssize_t np_ = (Py_ssize_t)row[3 * i];
            if (!np_) {
                memset(gi, 0, (size_t)m * sizeof(T));
                continue;
            }
            T rz = (T)(1.0 / row[3 * i + 1]), inv = (T)1 / (T)np_;
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = (gi[j] * rz - (T)pi[j] * inv) * w;
        }
    free(buf);
    free(v);
    free(row);
    return 0;
}

/* ----------------------------------------------------------------- InfoNCE, NT-Xent form
   functional._ntxent_kernel (Chen et al. 2020): per positive pair (i, j),
   l_ij = log(e_ij + z_i) - (S_ij - m_i), e = exp(S - m_i) (m_i the row maximum over P u Q),
   z_i = sum_{Q_i} e; pairs of an anchor without a negative give 0 (and count in the mean);
   dL/dS = e_ik sum_j inv_ij at a negative k - inv_ij z_i at a positive j,
   inv_ij = w / (e_ij + z_i) */
static int FN(ntxent)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                      Py_ssize_t m, int red, double *out)
{
    T *buf = (T *)malloc((size_t)(2 * m) * sizeof(T));
    uint8_t *v = (uint8_t *)malloc((size_t)(m > 0 ? m : 1));
    if (!buf || !v) {
        free(buf);
        free(v);
        return -1;
    }
    T *e = buf, *eq = buf + m;
    Py_ssize_t npairs = 0;
    for (Py_ssize_t k = 0; k < n * m; k++)
        npairs += p[k];
    if (!npairs) { /* no positive pair (the callers have checked: not reached) */
        free(buf);
        free(v);
        return 2;
    }
    const T w = red == RED_SUM ? (T)1 : (T)1 / (T)npairs;
    double total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        T *gi = g ? g + i * m : NULL;
        for (Py_ssize_t j = 0; j < m; j++)
            v[j] = pi[j] | qi[j];
        T mx;
        if (!FN(masked_max)(si, v, m, &mx)) {
            if (gi)
                memset(gi, 0, (size_t)m * sizeof(T));
            continue;
        }
        FN(exp_row)(si, v, mx, e, m);
        for (Py_ssize_t j = 0; j < m; j++)
            eq[j] = e[j] * (T)qi[j];
        T z = (T)FN(sum)(eq, m);
        if (!(z > 0)) { /* no negative: the anchor's pairs give 0 */
            if (gi)
                memset(gi, 0, (size_t)m * sizeof(T));
            continue;
        }
        double rt = 0;
        T suminv = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            if (!pi[j])
                continue;
            T ez = e[j] + z;
            rt += (double)(((T)log((double)ez) - si[j]) + mx);
            suminv += w / ez;
        }
        total += rt;
        if (gi)
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = eq[j] * suminv - (pi[j] ? w / (e[j] + z) * z : 0);
    }
    free(buf);
    free(v);
    *out = (double)((T)total * (red == RED_SUM ? (T)1 : w));
    return 0;
}

/* ----------------------------------------------------------------- Proxy-Anchor
   proxies._proxy_anchor_kernel (Kim et al. 2020): per proxy (column) c,
   pos_c = softplus(lse_{i in P_.c} alpha (margin - S_ic)),
   neg_c = softplus(lse_{i in Q_.c} alpha (S_ic + margin)) (torch's softplus, threshold 20);
   "mean": sum_c pos_c / #{c : P_.c nonempty} + sum_c neg_c / C;
   dL/dS_ic = scale e_ic / (exp(-m_c) + z_c) (e_ic / z_c where lse_c > 20) */
static int FN(proxy_anchor)(const T *s, const uint8_t *p, const uint8_t *q, T *g,
                            Py_ssize_t n, Py_ssize_t m, int red, double alpha, double margin,
                            double *out)
{
    const T na = (T)(-alpha), pa = (T)alpha, am = (T)(alpha * margin);
    T *buf = (T *)malloc((size_t)(6 * m + (g ? n * m : 0)) * sizeof(T));
    if (!buf)
        return -1;
    T *mp = buf, *mq = buf + m, *zp = buf + 2 * m, *zq = buf + 3 * m, *cp = buf + 4 * m,
      *cq = buf + 5 * m, *store = buf + 6 * m;
    for (Py_ssize_t j = 0; j < m; j++) {
        mp[j] = -BIG;
        mq[j] = -BIG;
        zp[j] = 0;
        zq[j] = 0;
        cp[j] = 0;
        cq[j] = 0;
    }
    /* the column maxima of both parts (and which columns have a kept entry: cp, cq) */
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            T xp = si[j] * na + am, xq = si[j] * pa + am;
            mp[j] = (pi[j] && xp > mp[j]) ? xp : mp[j];
            mq[j] = (qi[j] && xq > mq[j]) ? xq : mq[j];
            cp[j] += (T)pi[j];
            cq[j] += (T)qi[j];
        }
    }
    /* the exponentials (kept in g and store for the gradient) and the column sums */
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            T tp = si[j] * na + am - mp[j], tq = si[j] * pa + am - mq[j];
            tp = tp > (T)FLOOR ? tp : (T)FLOOR;
            tp = tp < 0 ? tp : 0;
            tq = tq > (T)FLOOR ? tq : (T)FLOOR;
            tq = tq < 0 ? tq : 0;
            T ep = EXP(tp) * (T)pi[j], eq = EXP(tq) * (T)qi[j];
            zp[j] += ep;
            zq[j] += eq;
            if (g) {
                g[i * m + j] = ep;
                store[i * m + j] = eq;
            }
        }
    }
    double sp = 0, sq = 0;
    Py_ssize_t with_pos = 0;
    for (Py_ssize_t j = 0; j < m; j++) {
        /* per column: the softplus of its log-sum-exp, and the gradient's factor in cp / cq */
        double fp = 0, fq = 0;
        if (cp[j] > 0) {
            double lse = (double)mp[j] + log((double)zp[j]);
            sp += lse > 20 ? lse : log1p(exp(lse));
            fp = lse > 20 ? 1.0 / (double)zp[j] : 1.0 / (exp(-(double)mp[j]) + (double)zp[j]);
            with_pos++;
        }
        if (cq[j] > 0) {
            double lse = (double)mq[j] + log((double)zq[j]);
            sq += lse > 20 ? lse : log1p(exp(lse));
            fq = lse > 20 ? 1.0 / (double)zq[j] : 1.0 / (exp(-(double)mq[j]) + (double)zq[j]);
        }
        cp[j] = (T)fp;
        cq[j] = (T)fq;
    }
    double dp = 1, dq = 1;
    if (red != RED_SUM) {
        dp = (double)(with_pos > 1 ? with_pos : 1);
        dq = (double)(m > 1 ? m : 1);
    }
    *out = (double)((T)(sp / dp) + (T)(sq / dq));
    if (g) {
        const T wp = (T)(-alpha / dp), wq = (T)(alpha / dq);
        for (Py_ssize_t j = 0; j < m; j++) {
            cp[j] *= wp;
            cq[j] *= wq;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            T *gi = g + i * m, *st = store + i * m;
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = gi[j] * cp[j] + st[j] * cq[j];
        }
    }
    free(buf);
    return 0;
}


/* ----------------------------------------------------------------- NWJ and DV
   functional._nwj_kernel / _dv_kernel over the whole matrix (Nguyen et al. 2010; Donsker &
   Varadhan, MINE: Belghazi et al. 2018), with m = max_Q S, e = exp(S - m) on Q, z = sum e:
   NWJ: e^{-1} mean_Q exp(S) - mean_P S = c z - mean_P S, c = exp(m - 1 - log n_Q);
        dL/dS = c e - P / n_P;
   DV:  logmeanexp_Q S - mean_P S = m + log(z / n_Q) - mean_P S; dL/dS = e / z - P / n_P;
   both times `scale` (N for "sum", 1 for "mean"); the caller has checked P and Q nonempty */
static int FN(nwj_dv)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                      Py_ssize_t m, int dv, double scale, double *out)
{
    const Py_ssize_t total = n * m;
    T *e = g ? g : (T *)malloc((size_t)total * sizeof(T));
    if (!e)
        return -1;
    T mx;
    Py_ssize_t np_ = FN(count_row)(p, total), nq = FN(count_row)(q, total);
    if (!FN(masked_max)(s, q, total, &mx) || !np_) {
        if (!g)
            free(e);
        return 2; /* no negative or no positive (the callers have checked: not reached) */
    }
    FN(exp_row)(s, q, mx, e, total);
    double z = FN(sum)(e, total);
    T pos = (T)(FN(masked_sum)(s, p, total) / (double)np_);
    T value;
    T ce;
    if (dv) {
        value = (T)(log(z / (double)nq) + (double)mx) - pos;
        ce = (T)(1.0 / z);
    } else {
        ce = (T)exp((double)mx - log((double)nq) - 1.0);
        value = ce * (T)z - pos;
    }
    const T sc = (T)scale, ip = (T)(1.0 / (double)np_);
    *out = (double)(value * sc);
    if (g)
        for (Py_ssize_t k = 0; k < total; k++)
            g[k] = (e[k] * ce - (T)p[k] * ip) * sc;
    else
        free(e);
    return 0;
}

/* ----------------------------------------------------------------- JS
   functional._js_kernel (Nowozin et al. 2016; Hjelm et al. 2019):
   mean_P softplus(-S) + mean_Q softplus(S), softplus(S) = max(S, 0) + log(1 + exp(-|S|)),
   softplus(-S) = softplus(S) - S; dL/dS = sigmoid(S) (Q / n_Q + P / n_P) - P / n_P, times
   `scale` */
static int FN(js)(const T *s, const uint8_t *p, const uint8_t *q, T *g, Py_ssize_t n,
                  Py_ssize_t m, double scale, double *out)
{
    T *buf = (T *)malloc((size_t)(2 * m) * sizeof(T));
    if (!buf)
        return -1;
    T *sp = buf, *sig = buf + m;
    const Py_ssize_t total = n * m;
    Py_ssize_t np_ = FN(count_row)(p, total), nq = FN(count_row)(q, total);
    const T ip = (T)(scale / (double)(np_ > 0 ? np_ : 1)),
            iq = (T)(scale / (double)(nq > 0 ? nq : 1));
    double vq = 0, vp = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const T *si = s + i * m;
        const uint8_t *pi = p + i * m, *qi = q + i * m;
        for (Py_ssize_t j = 0; j < m; j++) {
            T a = si[j] < 0 ? -si[j] : si[j];
            T t = -a > (T)FLOOR ? -a : (T)FLOOR;
            T u = EXP(t); /* exp(-|S|) */
            sp[j] = LOG1(u + (T)1) + (si[j] > 0 ? si[j] : 0);
            sig[j] = (si[j] >= 0 ? (T)1 : u) / ((T)1 + u);
        }
        vq += FN(masked_sum)(sp, qi, m);
        for (Py_ssize_t j = 0; j < m; j++)
            sp[j] -= si[j];
        vp += FN(masked_sum)(sp, pi, m);
        if (g) {
            T *gi = g + i * m;
            for (Py_ssize_t j = 0; j < m; j++)
                gi[j] = sig[j] * ((T)qi[j] * iq + (T)pi[j] * ip) - (T)pi[j] * ip;
        }
    }
    free(buf);
    *out = (double)((T)vq * iq + (T)vp * ip);
    return 0;
}

/* the parameters of this instantiation (losses/_native_sets.h) */
#undef T
#undef I
#undef IEXP
#undef FN
#undef BIG
#undef EXP
#undef LOG1
#undef FLOOR
