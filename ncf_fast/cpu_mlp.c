/* Fused elementwise passes of the torch backend's MLP sweeps on the CPU (ncf_fast/torch_backend.py says
 * the math; ncf_fast/native.py compiles and loads this). fp32, row-major (rows x w) tensors.
 *
 *   act_forward   a += bias; z = s(a); s'(a)     one pass where torch needs addmm's bias copy,
 *                                                softplus (log1p(exp)) and sigmoid: three
 *   delta_curv    delta = g s'(a); curv = g s''(a)   (g a full matrix or, g_stride 0, one row)
 *   tangent       zdot = s'(a) adot; adot *= g s''(a)
 *   abar          out = [bend +] zbar s'(a); bias_grad += column sums of out
 *
 * s is softplus (0), tanh (1) or silu (2). softplus and tanh overwrite a with s'(a) (nothing
 * later needs a itself); silu keeps a (its s'' needs it) and writes s'(a) to d1. softplus is
 * max(a, 0) + log1p(exp(-|a|)), which never overflows. expf, logf and tanhf vectorise through
 * glibc's vector math library, libmvec (declared below: -ffast-math would declare them too, but
 * it also drops inf/NaN semantics, and GCC 12 links its flush-denormals-to-zero start-up code
 * into shared objects, which would change torch's arithmetic process-wide). Rows are split over
 * OpenMP threads (the process's one libgomp: torch's, already loaded).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* glibc's vector variants (libmvec, x86-64): SSE/AVX2/AVX-512 clones of these three. */
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float tanhf(float);

enum { SOFTPLUS = 0, TANH = 1, SILU = 2 };

int ncf_act_forward(int kind, float *a, const float *bias, float *z, float *d1, int64_t rows,
                    int64_t w, int threads)
{
    if (kind < SOFTPLUS || kind > SILU)
        return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        float *restrict ai = a + i * w, *restrict zi = z + i * w;
        if (kind == SOFTPLUS) {
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                const float x = ai[j] + bias[j], e = expf(-fabsf(x)), u = 1.0f + e, r = 1.0f / u;
                /* log1p(e) = log(u) + log(1 + (e - (u - 1)) / u) with u = fl(1 + e): the
                 * rounding error of u, corrected to first order with the 1/u already needed
                 * for s' (e itself when u rounds to 1); 25 % faster than libmvec's log1pf */
                const float lp = logf(u) + (e - (u - 1.0f)) * r;
                zi[j] = (x > 0.0f ? x : 0.0f) + lp;
                ai[j] = x >= 0.0f ? r : e * r;
            }
        } else if (kind == TANH) {
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                const float y = tanhf(ai[j] + bias[j]);
                zi[j] = y;
                ai[j] = 1.0f - y * y;
            }
        } else {
            float *restrict di = d1 + i * w;
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                const float x = ai[j] + bias[j], s = 1.0f / (1.0f + expf(-x));
                ai[j] = x;
                zi[j] = x * s;
                di[j] = s * (1.0f + x * (1.0f - s));
            }
        }
    }
    return 0;
}

/* aux: nothing for softplus (s'' = s'(1 - s')), y = tanh(a) for tanh (s'' = -2 y s'), a for silu.
 * curv may be NULL (the maps need delta only). */
int ncf_delta_curv(int kind, const float *g, int64_t g_stride, const float *d1, const float *aux,
                   float *delta, float *curv, int64_t rows, int64_t w, int threads)
{
    if (kind < SOFTPLUS || kind > SILU || (curv && kind != SOFTPLUS && !aux))
        return 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const float *restrict gi = g + i * g_stride, *restrict di = d1 + i * w;
        float *restrict dl = delta + i * w;
        if (!curv) {
            #pragma omp simd
            for (int64_t j = 0; j < w; j++)
                dl[j] = gi[j] * di[j];
            continue;
        }
        float *restrict ci = curv + i * w;
        if (kind == SOFTPLUS) {
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                const float v = gi[j] * di[j];
                dl[j] = v;
                ci[j] = v - v * di[j];
            }
        } else if (kind == TANH) {
            const float *restrict yi = aux + i * w;
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                const float v = gi[j] * di[j];
                dl[j] = v;
                ci[j] = -2.0f * yi[j] * v;
            }
        } else {
            const float *restrict xi = aux + i * w;
            #pragma omp simd
            for (int64_t j = 0; j < w; j++) {
                const float x = xi[j], s = 1.0f / (1.0f + expf(-x)), q = 1.0f - s;
                dl[j] = gi[j] * di[j];
                ci[j] = gi[j] * (s * q * (2.0f + x * (q - s)));
            }
        }
    }
    return 0;
}

/* The curvature factor g s''(a) comes stored (silu: curv) or is formed here from delta = g s'(a)
 * (softplus: delta (1 - s'); tanh: -2 y delta), which spares the forward a (rows, w) write and
 * the backward a read per layer. */
int ncf_tangent(int kind, const float *d1, const float *curv, const float *delta, const float *y,
                float *adot, float *zdot, int64_t n, int threads)
{
    if (kind < SOFTPLUS || kind > SILU || (kind == SILU && !curv) || (kind != SILU && !delta)
        || (kind == TANH && !y))
        return 1;
    const float *restrict dp = d1, *restrict cp = curv, *restrict ep = delta, *restrict yp = y;
    float *restrict ap = adot, *restrict zp = zdot;
    if (kind == SILU) {
        #pragma omp parallel for simd num_threads(threads) schedule(static)
        for (int64_t k = 0; k < n; k++) {
            const float v = ap[k];
            zp[k] = dp[k] * v;
            ap[k] = cp[k] * v;
        }
    } else if (kind == SOFTPLUS) {
        #pragma omp parallel for simd num_threads(threads) schedule(static)
        for (int64_t k = 0; k < n; k++) {
            const float v = ap[k], s = dp[k];
            zp[k] = s * v;
            ap[k] = (ep[k] - ep[k] * s) * v;
        }
    } else {
        #pragma omp parallel for simd num_threads(threads) schedule(static)
        for (int64_t k = 0; k < n; k++) {
            const float v = ap[k];
            zp[k] = dp[k] * v;
            ap[k] = (-2.0f * yp[k] * ep[k]) * v;
        }
    }
    return 0;
}

/* out = bend + zbar d1 (bend may be NULL: out = zbar d1); out may be bend or zbar itself.
 * bias_grad[j] += sum_i out[i, j], in double per thread, then added once per thread. */
int ncf_abar(const float *bend, const float *zbar, const float *d1, float *out, float *bias_grad,
             int64_t rows, int64_t w, int threads)
{
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        double *col = calloc((size_t)w, sizeof(double));
        if (!col)
            failed = 1;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            if (!col)
                continue;
            const float *bi = bend ? bend + i * w : NULL, *zi = zbar + i * w, *di = d1 + i * w;
            float *oi = out + i * w;
            if (bi) {
                #pragma omp simd
                for (int64_t j = 0; j < w; j++) {
                    const float v = bi[j] + zi[j] * di[j];
                    oi[j] = v;
                    col[j] += v;
                }
            } else {
                #pragma omp simd
                for (int64_t j = 0; j < w; j++) {
                    const float v = zi[j] * di[j];
                    oi[j] = v;
                    col[j] += v;
                }
            }
        }
        if (col) {
            #pragma omp critical
            for (int64_t j = 0; j < w; j++)
                bias_grad[j] += (float)col[j];
            free(col);
        }
    }
    return failed;
}
