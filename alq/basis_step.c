/* ALQ basis step on the CPU, the work between the matmuls in compiled code (built and loaded by alq/native.py).
 *
 * alq_nearest_code: the code search of fastpath._nearest_code_fast in one pass.
 * For every group g (G of them) with C = 2^M representable values v[g, 0..C-1] and n targets t[g, 0..n-1],
 * write the code c minimising |t - v[c]| (lowest c among equal distances, the first NaN distance if any: exactly
 * torch.argmin(|t - v|) over c). Same selection, same float operations, as the eager path:
 *   sort the values (ascending, equal values in ascending code order); low[q] = lowest code of the run of equal
 *   values at sorted position q; p = max{q : sorted[q] < t} (or 0); take sorted[p + 1] when it is nearer, or as
 *   near with a lower code. Groups where float rounding could make a farther value tie (smallest gap between
 *   distinct values <= max(scale * 2^-22, 2^-126), scale = max|t| + max|v|), or with a non-finite value or target,
 *   are searched densely instead.
 *
 * alq_basis_search: the same from w, pg, ph, forming the targets w - pg / ph itself.
 * alq_fill_bases: the bases of those codes, B (int8), B as float and B * ph, and -ph * w + pg, which the least
 * squares read (binarynet.BinaryLayer._least_squares computes the same with torch ops).
 * alq_reconstruct: the weights of the codes (FastPath._reconstruct_from_code in alq/fastpath.py);
 * alq_shadow_step: w += -pg / ph.
 *
 * Built with -ffp-contract=off and without fast-math: every float operation is the single IEEE operation written,
 * so the results are those of the torch ops they replace, bit for bit.
 */
#include <math.h>
#include <stdint.h>

#define MAX_C 256

/* AVX-512 and AVX2 versions of the vectorised loops, chosen at load time (x86-64 Linux, GCC or clang) */
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

/* torch.argmin(|t - v|): the lowest code with the smallest distance; a NaN distance counts as the smallest */
static uint8_t dense_code(float t, const float *v, int C)
{
    int best = 0;
    float best_d = fabsf(t - v[0]);
    if (isnan(best_d))
        return 0;
    for (int c = 1; c < C; c++) {
        float d = fabsf(t - v[c]);
        if (isnan(d))
            return (uint8_t)c;
        if (d < best_d) {
            best_d = d;
            best = c;
        }
    }
    return (uint8_t)best;
}

/* U[0..C-1] = v sorted ascending, equal values in ascending code order, sc[q] = the code at position q (a stable sort
 * of finite values): the position of v[c] is the number of values below it plus the number of equal values with a
 * lower code; C^2 compares, vectorised over c. */
VECTOR_CLONES
static void sort_values(const float *v, int C, float *U, uint8_t *sc)
{
    int32_t rank[MAX_C];
    for (int c = 0; c < C; c++)
        rank[c] = 0;
    for (int d = 0; d < C; d++) {
        float u = v[d];
        for (int c = 0; c < C; c++)
            rank[c] += (u < v[c]) | ((u == v[c]) & (d < c));
    }
    for (int c = 0; c < C; c++) {
        U[rank[c]] = v[c];
        sc[rank[c]] = (uint8_t)c;
    }
}

#define BLOCK 32

/* cnt[k] = #{q < C : U[q] < x[k]} for k < m: C compares per target, but vectorised across the targets of a block
 * (a binary search is a chain of unpredictable dependent loads) */
VECTOR_CLONES
static void count_below(const float *U, int C, const float *x, int m, int32_t *cnt)
{
    float xb[BLOCK];
    for (int k = 0; k < BLOCK; k++) {
        xb[k] = k < m ? x[k] : 0.0f;
        cnt[k] = 0;
    }
    for (int q = 0; q < C; q++) {
        float u = U[q];
        for (int k = 0; k < BLOCK; k++)
            cnt[k] += u < xb[k];
    }
}

/* the codes o[0..n-1] of the targets tg[0..n-1] of one group with values v[0..C-1] */
static void search_group(const float *tg, int64_t n, const float *v, int C, uint8_t *o)
{
    float U[MAX_C + 1];
    uint8_t sc[MAX_C], low[MAX_C + 1], hi_wins_tie[MAX_C + 1];
    int finite = 1;
    float t_abs = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(tg[i]);
        if (!isfinite(a)) finite = 0;
        else if (a > t_abs) t_abs = a;
    }
    for (int c = 0; c < C; c++)
        if (!isfinite(v[c])) finite = 0;
    int dense = !finite;
    if (!dense) {
        sort_values(v, C, U, sc);
        U[C] = INFINITY;
        float gap = INFINITY;
        low[0] = sc[0];
        for (int q = 1; q < C; q++) {
            if (U[q] != U[q - 1]) {
                float d = U[q] - U[q - 1];
                if (d < gap) gap = d;
                low[q] = sc[q];
            } else {
                low[q] = low[q - 1];
            }
        }
        low[C] = 0;
        for (int q = 0; q < C; q++)
            hi_wins_tie[q] = q + 1 < C && low[q + 1] < low[q];
        float v_abs = fabsf(U[0]) > fabsf(U[C - 1]) ? fabsf(U[0]) : fabsf(U[C - 1]);
        float scale = t_abs + v_abs, thr = scale * 0x1p-22f;
        if (thr < 0x1p-126f) thr = 0x1p-126f;
        dense = !isfinite(scale) || gap <= thr;
    }
    if (dense) {
        for (int64_t i = 0; i < n; i++)
            o[i] = dense_code(tg[i], v, C);
        return;
    }
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        int m = n - i0 < BLOCK ? (int)(n - i0) : BLOCK;
        int32_t cnt[BLOCK];
        count_below(U, C, tg + i0, m, cnt);
        for (int k = 0; k < m; k++) {
            float x = tg[i0 + k];
            int p = cnt[k] > 0 ? cnt[k] - 1 : 0;  /* p = max{q : U[q] < x}, or 0 */
            float d_lo = x - U[p], d_hi = U[p + 1] - x;
            int pick = (d_hi < d_lo) | ((d_hi == d_lo) & hi_wins_tie[p]);
            o[i0 + k] = low[p + pick];
        }
    }
}

/* t: (G, n) targets, values: (G, C), out: (G, n) codes; C a power of two <= 256; all contiguous */
void alq_nearest_code(const float *t, const float *values, int64_t G, int64_t n, int32_t C, uint8_t *out)
{
    for (int64_t g = 0; g < G; g++)
        search_group(t + g * n, n, values + g * C, C, out + g * n);
}

/* the basis step's search from w, pg, ph (G, n): target = w - pg / ph (written to t), then its codes */
void alq_basis_search(const float *w, const float *pg, const float *ph, const float *values, int64_t G, int64_t n,
                      int32_t C, float *t, uint8_t *out)
{
    for (int64_t g = 0; g < G; g++) {
        float *tg = t + g * n;
        for (int64_t i = 0; i < n; i++) {
            float q = pg[g * n + i] / ph[g * n + i];
            tg[i] = w[g * n + i] - q;
        }
        search_group(tg, n, values + g * C, C, out + g * n);
    }
}

/* w[g, i] = table[g][code[g, i]], table[g][c] = (((0 + t_0) + t_1) + ... + t_{M-1}) + 0 with t_j = plus[g, j] where
 * bit j of c is set, minus[g, j] where not: BinaryLayer._reconstruct_from_code, the same additions in the same order */
void alq_reconstruct(const uint8_t *code, const float *minus, const float *plus, int64_t G, int64_t n, int32_t M,
                     float *w)
{
    float table[MAX_C];
    int C = 1 << M;
    for (int64_t g = 0; g < G; g++) {
        for (int c = 0; c < C; c++) {
            float acc = 0.0f;
            for (int j = 0; j < M; j++)
                acc = acc + ((c >> j) & 1 ? plus[g * M + j] : minus[g * M + j]);
            table[c] = acc + 0.0f;
        }
        for (int64_t i = 0; i < n; i++)
            w[g * n + i] = table[code[g * n + i]];
    }
}

/* the STE shadow step, w += (-pg) / ph, over N weights */
void alq_shadow_step(float *w, const float *pg, const float *ph, int64_t N)
{
    for (int64_t i = 0; i < N; i++) {
        float d = -pg[i] / ph[i];
        w[i] = w[i] + d;
    }
}

/* code: (G, n); mask: (G, M) 0/1; ph, w, pg: (G, n); B, Bf, Bph: (G, M, n); rgw: (G, n) or NULL. Slot j of a
 * weight is +1 where bit j of its code is set, -1 where not, 0 where the slot is masked. */
void alq_fill_bases(const uint8_t *code, const uint8_t *mask, const float *ph, const float *w, const float *pg,
                    int64_t G, int64_t n, int32_t M, int8_t *B, float *Bf, float *Bph, float *rgw)
{
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *cg = code + g * n;
        const float *hg = ph + g * n;
        for (int j = 0; j < M; j++) {
            int8_t on = mask[g * M + j] ? 1 : 0;
            int64_t off = (g * M + j) * n;
            for (int64_t i = 0; i < n; i++) {
                int8_t b = (int8_t)((((cg[i] >> j) & 1) * 2 - 1) * on);
                float bf = (float)b;
                B[off + i] = b;
                Bf[off + i] = bf;
                Bph[off + i] = bf * hg[i];
            }
        }
        if (rgw)
            for (int64_t i = 0; i < n; i++) {
                float r = -hg[i] * w[g * n + i];
                rgw[g * n + i] = r + pg[g * n + i];
            }
    }
}
