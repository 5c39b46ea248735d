/* Energy-distance pair sums on the CPU (see ncf_fast/native.py, which compiles and loads this).
 *
 * For a (n x d) and b (m x d), fp32, accumulates in double:
 *   row_sum[i] += sum_j |a_i - b_j|
 *   ga[i, k]   += sum_j (a_ik - b_jk) / |a_i - b_j|      (if ga)
 *   gb[j, k]   += sum_i (b_jk - a_ik) / |a_i - b_j|      (if gb)
 * with explicit differences (no |a|^2 + |b|^2 - 2 a.b cancellation) and a zero unit vector for
 * coinciding points. b comes transposed (bt, d x m) so that the inner loops over 64 columns run
 * on contiguous memory and vectorise; columns are taken in tiles of `tile`, each thread keeping
 * its own tile of gb, so memory stays O((n + m) d) whatever n and m. same != 0: a is b, and the
 * diagonal pairs (i, i) are skipped (their difference is exactly 0 anyway).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CHUNK 64
#define MAX_D 64

int ncf_pair_sums(const float *a, const float *bt, int64_t n, int64_t m, int64_t d, int same,
                  double *row_sum, double *ga, double *gb, int64_t tile, int threads)
{
    if (d < 1 || d > MAX_D || tile < 1)
        return 1;
    int failed = 0;
    for (int64_t c0 = 0; c0 < m; c0 += tile) {
        const int64_t c1 = c0 + tile < m ? c0 + tile : m, width = c1 - c0;
        #pragma omp parallel num_threads(threads) reduction(|:failed)
        {
            double *gb_tile = gb ? calloc((size_t)(width * d), sizeof(double)) : NULL;
            if (gb && !gb_tile)
                failed = 1;
            float r2[CHUNK], inv[CHUNK], ai[MAX_D];
            double gi[MAX_D];
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                if (failed)
                    continue;
                double dist_sum = 0.0;
                for (int64_t k = 0; k < d; k++) {
                    ai[k] = a[i * d + k];
                    gi[k] = 0.0;
                }
                for (int64_t j0 = c0; j0 < c1; j0 += CHUNK) {
                    const int64_t nj = j0 + CHUNK < c1 ? CHUNK : c1 - j0;
                    #pragma omp simd
                    for (int64_t jj = 0; jj < nj; jj++)
                        r2[jj] = 0.0f;
                    for (int64_t k = 0; k < d; k++) {
                        const float *bk = bt + k * m + j0, x = ai[k];
                        #pragma omp simd
                        for (int64_t jj = 0; jj < nj; jj++) {
                            const float diff = x - bk[jj];
                            r2[jj] += diff * diff;
                        }
                    }
                    float chunk_sum = 0.0f;
                    #pragma omp simd reduction(+:chunk_sum)
                    for (int64_t jj = 0; jj < nj; jj++) {
                        const float r = sqrtf(r2[jj]);
                        chunk_sum += r;
                        inv[jj] = r > 0.0f ? 1.0f / r : 0.0f;
                    }
                    if (same && i >= j0 && i < j0 + nj)
                        inv[i - j0] = 0.0f;
                    dist_sum += chunk_sum;
                    if (!ga && !gb_tile)
                        continue;
                    for (int64_t k = 0; k < d; k++) {
                        const float *bk = bt + k * m + j0, x = ai[k];
                        float s = 0.0f;
                        if (gb_tile) {
                            double *gk = gb_tile + k * width + (j0 - c0);
                            #pragma omp simd reduction(+:s)
                            for (int64_t jj = 0; jj < nj; jj++) {
                                const float unit = (x - bk[jj]) * inv[jj];
                                s += unit;
                                gk[jj] -= unit;
                            }
                        } else {
                            #pragma omp simd reduction(+:s)
                            for (int64_t jj = 0; jj < nj; jj++)
                                s += (x - bk[jj]) * inv[jj];
                        }
                        gi[k] += s;
                    }
                }
                row_sum[i] += dist_sum;
                if (ga)
                    for (int64_t k = 0; k < d; k++)
                        ga[i * d + k] += gi[k];
            }
            if (gb_tile) {
                #pragma omp critical
                for (int64_t k = 0; k < d; k++)
                    for (int64_t j = 0; j < width; j++)
                        gb[(c0 + j) * d + k] += gb_tile[k * width + j];
                free(gb_tile);
            }
        }
        if (failed)
            return 2;
    }
    return 0;
}
