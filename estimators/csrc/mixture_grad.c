/* The first-order backward of DiagNormalMixture.rsample (implicit reparameterization), fused per sample.
 *
 * The same algorithm as ``implicit_grad_structured`` in estimators/mixture_dist.py, line for line, for
 * K > 1 (read that function and the module docstring for the derivation and the numerics); here one
 * sample's whole backward is one pass over its K x D numbers in C instead of ~300 tensor operations:
 *
 *   z, log N, log w (exclusive running sum over d, normalised over k), log f = logsumexp_k log q,
 *   c~_kd = w_kd (Phi_kd - F_d) / f_d from the cancellation-free gaps against the reference component,
 *   the transposed solve u_h + sum_k s_kh R_k = g_h with R_k running over d > h (sequential in d: the
 *   O(D K) recurrence, no blocks needed here), grad_logits = -R after the last coordinate, and the loc /
 *   scale gradients with the largest-responsibility component written without cancellation.
 *
 * Everything is computed in double whatever the caller's dtype (read and written per sample), with the float64
 * constants of the interval formula; only the clamp of w e^M / f (``log_ratio_max``) follows the caller's
 * dtype, so that float32 results stay finite exactly where the torch path keeps them finite.
 *
 * Layout (C-contiguous, float32 or float64, read into double per sample): logits [N, K], loc and scale
 * [N, K, D] (k major), each either per sample or one shared by all samples (stride 0); x and g [N, D];
 * outputs grad_logits [N, K] and, when need_components, grad_loc and grad_scale [N, K, D].
 * Samples are independent: ``threads`` > 1 splits N over POSIX threads.
 *
 * Built on first use by estimators/native.py (cc -O2 -shared -fPIC; no torch headers, called by ctypes).
 */
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HALF_LOG_2PI 0.91893853320467274178032973640562
#define SQRT_HALF 0.70710678118654752440084436210485
#define RADIUS 0.05  /* series radius of the float64 interval formula */
#define CUT (-36.0)  /* far-tail cut of the float64 interval formula */
#define EXP_FLOOR (-707.39641853226408) /* log(DBL_MIN) + 1: exp below it is flushed to 0 (as _exp) */

static inline double exp_flush(double t) { return t > EXP_FLOOR ? exp(t) : 0.0; }

static inline double clampd(double v, double lo, double hi) {
    /* torch.clamp semantics: NaN stays NaN */
    return v < lo ? lo : (v > hi ? hi : v);
}

static inline double signd(double v) { return v > 0.0 ? 1.0 : (v < 0.0 ? -1.0 : (v == 0.0 ? 0.0 : v)); }

/* _interval_series: log(Phi(m + delta) - Phi(m - delta)) for delta (|m| + 2) <= radius */
static double interval_series(double m, double delta) {
    double d_s = clampd(delta, DBL_MIN, RADIUS);
    double p = clampd(d_s * m, -RADIUS, RADIUS);
    double p2 = p * p, q = d_s * d_s;
    double he = (p2 - q) / 6.0 + (p2 * p2 - 6.0 * p2 * q + 3.0 * q * q) / 120.0 +
                (p2 * p2 * p2 - 15.0 * p2 * p2 * q + 45.0 * p2 * q * q - 15.0 * q * q * q) / 5040.0;
    double m_s = clampd(m, -1e15, 1e15);
    return log(2.0 * d_s) - 0.5 * m_s * m_s - HALF_LOG_2PI + log1p(he);
}

/* _interval_far: log(Phi(hi) - Phi(lo)) where Phi(hi) underflows (end points reflected to the lower side) */
static double interval_far(double z_a, double z_b, double delta) {
    double lo = z_a < z_b ? z_a : z_b, hi = z_a < z_b ? z_b : z_a;
    if (lo + hi > 0.0) {
        double t = lo;
        lo = -hi;
        hi = -t;
    }
    double hi_f = hi > CUT ? CUT : hi, lo_f = lo > CUT ? CUT : lo;
    double inv_hi = 1.0 / (hi_f * hi_f), inv_lo = 1.0 / (lo_f * lo_f);
    double s_hi = 1.0, s_lo = 1.0;
    for (int n = 8; n > 0; --n) {
        s_hi = 1.0 - (2 * n - 1) * inv_hi * s_hi;
        s_lo = 1.0 - (2 * n - 1) * inv_lo * s_lo;
    }
    double d_log = 2.0 * delta * (-0.5 * (lo_f + hi_f)) + log(lo_f / hi_f) + log(s_hi / s_lo);
    if (d_log < 1e-3) d_log = 1e-3;
    double log_phi_hi = -0.5 * hi_f * hi_f - log(-hi_f) - HALF_LOG_2PI + log(s_hi);
    return log_phi_hi + log(-expm1(-d_log));
}

/* Work space of one sample: 5 arrays of K * D and 6 of K. */
static size_t work_size(int k, int d) { return (size_t)5 * k * d + 6 * (size_t)k; }

/* IS = 1 / sigma and LSG = log sigma + log sqrt(2 pi), computed by the caller (once for shared parameters) */
static void one_sample(int K, int D, const double *a, const double *mu, const double *sg, const double *IS,
                       const double *LSG, const double *x, const double *g, double log_ratio_max, int need_components, double *ga, double *gmu,
                       double *gsg, double *work) {
    double *Z = work, *LW = Z + K * D, *CT = LW + K * D, *RUN = CT + K * D, *RESP = RUN + K * D;
    double *cum = RESP + K * D, *R = cum + K, *W = R + K, *LQ = W + K, *V = LQ + K, *SG = V + K;
    for (int k = 0; k < K; ++k) cum[k] = a[k];
    /* One coordinate at a time: everything at d depends on the coordinates before it only through the
     * running sums cum_k = a_k + sum_{h<d} log N_kh. */
    for (int d = 0; d < D; ++d) {
        /* z, log N, log w = cum - logsumexp_k cum (_log_weights); log q = log w + log N */
        double top = -INFINITY;
        for (int k = 0; k < K; ++k) {
            int i = k * D + d;
            double z = (x[d] - mu[i]) * IS[i];
            double ln = -0.5 * z * z - LSG[i];
            Z[i] = z;
            LW[i] = cum[k];
            LQ[k] = ln; /* log N for now */
            cum[k] += ln;
            top = LW[i] > top ? LW[i] : top;
        }
        double s = 0.0;
        for (int k = 0; k < K; ++k) {
            W[k] = exp_flush(LW[k * D + d] - top);
            s += W[k];
        }
        double lse = top + log(s), inv_s = 1.0 / s, top2 = -INFINITY;
        int r = 0, flushed = 0; /* r: the reference component, the largest weight */
        for (int k = 0; k < K; ++k) {
            int i = k * D + d;
            LW[i] -= lse;
            W[k] *= inv_s; /* w_kd */
            flushed |= !(LW[i] > EXP_FLOOR);
            LQ[k] += LW[i];
            top2 = LQ[k] > top2 ? LQ[k] : top2;
            if (LW[i] > LW[r * D + d]) r = k;
        }
        double s2 = 0.0;
        for (int k = 0; k < K; ++k) {
            RESP[k * D + d] = exp_flush(LQ[k] - top2);
            s2 += RESP[k * D + d];
        }
        double log_f = top2 + log(s2), inv_s2 = 1.0 / s2;
        for (int k = 0; k < K; ++k) RESP[k * D + d] *= inv_s2; /* responsibility r_kd = q_kd / f_d */
        /* gaps G_k = Phi_k - Phi_r against r, without cancellation (_cdf_gaps): the erfc branch as a
         * value (V, SG = sign), the series / far-tail / k = r branches as a log (V, SG = 2 * sign) */
        double z_r = Z[r * D + d], loc_r = mu[r * D + d], scale_r = sg[r * D + d];
        double erfc_lo = NAN, erfc_hi = NAN; /* erfc(-+z_r / sqrt 2), computed when first needed */
        double v_max = 0.0, lg_max = -INFINITY;
        for (int k = 0; k < K; ++k) {
            int i = k * D + d;
            double loc_gap = loc_r - mu[i], scale_gap = z_r * (scale_r - sg[i]);
            int via_params = (fabs(loc_gap) + 2.0 * fabs(scale_gap)) * IS[i] < fabs(Z[i]) + fabs(z_r);
            double dz = via_params ? (loc_gap + scale_gap) * IS[i] : Z[i] - z_r;
            double delta = 0.5 * fabs(dz), m = z_r + 0.5 * dz, sign = signd(dz);
            double a_r = fabs(z_r), a_k = fabs(Z[i]);
            if (delta == 0.0) { /* k = r: G = 0 (sign 0); a stand-in log far below any true gap */
                double m_s = clampd(m, -1e15, 1e15);
                V[k] = log(2.0 * DBL_MIN) - 0.5 * m_s * m_s;
                SG[k] = 0.0;
            } else if (delta * (fabs(m) + 2.0) <= RADIUS) {
                V[k] = interval_series(m, delta);
                SG[k] = 2.0 * sign;
            } else if ((a_r < a_k ? a_r : a_k) >= -CUT && ((z_r > 0.0) == (Z[i] > 0.0))) {
                V[k] = interval_far(z_r, Z[i], delta);
                SG[k] = 2.0 * sign;
            } else { /* interval_near, kept as a value: 1/2 |erfc(c z_r) - erfc(c z_k)| */
                double c = m > 0.0 ? SQRT_HALF : -SQRT_HALF, e_r;
                if (m > 0.0) {
                    if (isnan(erfc_hi)) erfc_hi = erfc(SQRT_HALF * z_r);
                    e_r = erfc_hi;
                } else {
                    if (isnan(erfc_lo)) erfc_lo = erfc(-SQRT_HALF * z_r);
                    e_r = erfc_lo;
                }
                double v = 0.5 * fabs(e_r - erfc(c * Z[i]));
                V[k] = v < DBL_MIN ? DBL_MIN : v;
                SG[k] = sign;
                v_max = V[k] > v_max ? V[k] : v_max;
                continue;
            }
            lg_max = V[k] > lg_max ? V[k] : lg_max;
        }
        /* M = max_k log |G_k|: the scale of the gaps (cancels in c~) */
        double big_m = v_max > 0.0 ? log(v_max) : -INFINITY;
        big_m = lg_max > big_m ? lg_max : big_m;
        double inv_scale = exp(-big_m); /* finite where some erfc-branch gap exists (M >= log DBL_MIN) */
        double mix = 0.0;
        for (int k = 0; k < K; ++k) {
            double gap = SG[k] == 0.0         ? 0.0 /* k = r */
                         : fabs(SG[k]) == 1.0 ? SG[k] * (V[k] * inv_scale)
                                              : 0.5 * SG[k] * exp_flush(V[k] - big_m);
            V[k] = gap; /* (Phi_k - Phi_r) e^{-M} */
            mix += W[k] * gap;
        }
        /* c~_kd = (G_k - sum_j w_j G_j) e^{-M} * w_k e^M / f_d, the factor clamped at log_ratio_max */
        double em = big_m - log_f;
        if (!flushed && em <= log_ratio_max) { /* log w <= 0: no factor reaches the clamp */
            double factor = exp(em);
            for (int k = 0; k < K; ++k) CT[k * D + d] = (V[k] - mix) * (W[k] * factor);
        } else {
            for (int k = 0; k < K; ++k) {
                double t = LW[k * D + d] + em;
                CT[k * D + d] = (V[k] - mix) * exp_flush(t > log_ratio_max ? log_ratio_max : t);
            }
        }
    }
    /* the transposed solve, last coordinate first; R_k = sum_{d > h} u_d c~_kd */
    for (int k = 0; k < K; ++k) R[k] = 0.0;
    for (int h = D - 1; h >= 0; --h) {
        double u = g[h];
        for (int k = 0; k < K; ++k) u += Z[k * D + h] * IS[k * D + h] * R[k]; /* s = -z / sigma */
        for (int k = 0; k < K; ++k) {
            int i = k * D + h;
            RUN[i] = R[k];
            R[k] += u * CT[i];
        }
    }
    for (int k = 0; k < K; ++k) ga[k] = -R[k];
    if (!need_components) return;
    double *A = W; /* A_kd = R_kd z_kd / sigma_kd, one coordinate at a time */
    for (int d = 0; d < D; ++d) {
        int top = 0;
        for (int k = 0; k < K; ++k) {
            int i = k * D + d;
            A[k] = RUN[i] * (Z[i] * IS[i]);
            if (RESP[i] > RESP[top * D + d]) top = k;
        }
        double others_big = 0.0, others_resp = 0.0;
        for (int k = 0; k < K; ++k)
            if (k != top) {
                others_big += A[k];
                others_resp += RESP[k * D + d];
            }
        for (int k = 0; k < K; ++k) {
            int i = k * D + d;
            double bracket = k == top ? RESP[i] * others_big - others_resp * A[k]
                                      : RESP[i] * (others_big + A[top]) - A[k];
            double gl = g[d] * RESP[i] + bracket;
            gmu[i] = gl;
            gsg[i] = Z[i] * gl + RUN[i] * IS[i];
        }
    }
}

typedef struct {
    int64_t begin, end;
    int K, D, need_components, is_float;
    const void *logits, *loc, *scale, *x, *g;
    int64_t stride_logits, stride_loc, stride_scale; /* per sample: K or K * D, or 0 (shared by all) */
    double log_ratio_max;
    void *grad_logits, *grad_loc, *grad_scale;
    int status;
} job_t;

/* dst[i] = src[offset + i] as double, from float or double storage */
static void load(double *dst, const void *src, int64_t offset, int64_t count, int is_float) {
    if (is_float)
        for (int64_t i = 0; i < count; ++i) dst[i] = ((const float *)src)[offset + i];
    else
        memcpy(dst, (const double *)src + offset, (size_t)count * sizeof(double));
}

/* dst[offset + i] = src[i] in the caller's dtype */
static void store(void *dst, const double *src, int64_t offset, int64_t count, int is_float) {
    if (is_float)
        for (int64_t i = 0; i < count; ++i) ((float *)dst)[offset + i] = (float)src[i];
    else
        memcpy((double *)dst + offset, src, (size_t)count * sizeof(double));
}

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    int K = j->K, D = j->D, f = j->is_float;
    int64_t kd = (int64_t)K * D;
    /* the sample's inputs and outputs in double, then the work space */
    size_t io = (size_t)(3 * K + 6 * kd + 2 * D);
    double *buf = (double *)malloc((io + work_size(K, D)) * sizeof(double));
    if (!buf) {
        j->status = 1;
        return NULL;
    }
    double *a = buf, *mu = a + K, *sg = mu + kd, *x = sg + kd, *g = x + D, *ga = g + D, *gmu = ga + K;
    double *gsg = gmu + kd, *is = gsg + kd, *lsg = is + kd, *work = lsg + kd + K;
    for (int64_t n = j->begin; n < j->end; ++n) {
        if (n == j->begin || j->stride_logits) load(a, j->logits, n * j->stride_logits, K, f);
        if (n == j->begin || j->stride_loc) load(mu, j->loc, n * j->stride_loc, kd, f);
        if (n == j->begin || j->stride_scale) {
            load(sg, j->scale, n * j->stride_scale, kd, f);
            for (int64_t i = 0; i < kd; ++i) {
                is[i] = 1.0 / sg[i];
                lsg[i] = log(sg[i]) + HALF_LOG_2PI;
            }
        }
        load(x, j->x, n * D, D, f);
        load(g, j->g, n * D, D, f);
        one_sample(K, D, a, mu, sg, is, lsg, x, g, j->log_ratio_max, j->need_components, ga, gmu, gsg, work);
        store(j->grad_logits, ga, n * K, K, f);
        if (j->need_components) {
            store(j->grad_loc, gmu, n * kd, kd, f);
            store(j->grad_scale, gsg, n * kd, kd, f);
        }
    }
    free(buf);
    j->status = 0;
    return NULL;
}

/* Inputs and outputs float32 (is_float) or float64; logits [N, K] / loc, scale [N, K, D] with per-sample
 * strides K / K * D, or 0 for parameters shared by every sample; x, g [N, D]; outputs [N, K], [N, K, D].
 * Returns 0 on success, nonzero when memory could not be had (the caller raises). */
int mixture_implicit_grad(int64_t n, int k, int d, int is_float, const void *logits, int64_t stride_logits,
                          const void *loc, int64_t stride_loc, const void *scale, int64_t stride_scale,
                          const void *x, const void *g, double log_ratio_max, int need_components,
                          void *grad_logits, void *grad_loc, void *grad_scale, int threads) {
    if (threads < 1) threads = 1;
    if (threads > n) threads = (int)(n > 0 ? n : 1);
    job_t jobs[64];
    pthread_t tid[64];
    if (threads > 64) threads = 64;
    for (int t = 0; t < threads; ++t) {
        job_t *j = &jobs[t];
        j->begin = n * t / threads;
        j->end = n * (t + 1) / threads;
        j->K = k;
        j->D = d;
        j->need_components = need_components;
        j->is_float = is_float;
        j->logits = logits;
        j->loc = loc;
        j->scale = scale;
        j->stride_logits = stride_logits;
        j->stride_loc = stride_loc;
        j->stride_scale = stride_scale;
        j->x = x;
        j->g = g;
        j->log_ratio_max = log_ratio_max;
        j->grad_logits = grad_logits;
        j->grad_loc = grad_loc;
        j->grad_scale = grad_scale;
        j->status = 1;
    }
    int started = 1; /* job 0 runs on the calling thread */
    for (int t = 1; t < threads; ++t) {
        if (pthread_create(&tid[t], NULL, run_job, &jobs[t]) != 0) break;
        started = t + 1;
    }
    for (int t = started; t < threads; ++t) run_job(&jobs[t]); /* threads that could not start: here */
    run_job(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; ++t) {
        if (t < started) pthread_join(tid[t], NULL);
        status |= jobs[t].status;
    }
    return status;
}
