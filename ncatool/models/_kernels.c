/* Fused CPU kernels for the NCA's perception on channels-last states (see kernels.py; declared in
   _kernels.h, registered as PyTorch operators by _ops.cpp).

   A state is float32 (B, D, H, W, C) in memory (2D: D = 1); a cell is one (b, z, y, x) position and
   the C values of a cell are contiguous. One call handles `nf` depthwise filters of the same size,
   float32 (nf, K, C) with K = kd*kh*kw taps (taps major, so the loops over channels are contiguous
   and vectorise), and optionally the identity. Rows of the MLP's input are (n, ld) in float32 or
   bfloat16; a call reads or writes the columns [col, col + (identity + nf) * C): first x itself
   (if `identity`), then filter 0, 1, ...

   perceive_rows     rows[r, block f] = bias[f] + sum_taps w[f, tap] * x[neighbour(cell_r, tap)]
   perceive_rows_bwd the adjoint: gx[neighbour] += w[f, tap] * g[r, f]; gw[f, tap] += g[r, f] *
                     x[neighbour]; gb[f] += g[r, f]. Rows must be sorted by cell (as nonzero() returns
                     them) and unique, so that each thread owns whole batch items and never shares a
                     cell of gx. gw and gb are summed per batch item, then over the items in order:
                     the result does not depend on which thread ran which item (exact resume).

   Padding follows torch.nn.functional.pad: 0 zeros, 1 reflect, 2 replicate, 3 circular.

   Also: update_rows / alive_mask / apply_life / update_rows_bwd (the state update of the fired
   cells, Growing-NCA alive masking and their adjoint), relu_backward, mask_indices. */

#include "_kernels.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does; branch-free */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u; /* quiet NaN */
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* index i in [0, n) after padding, or -1 for a zero */
static inline int64_t pad_index(int64_t i, int64_t n, int mode) {
    if (i >= 0 && i < n) return i;
    switch (mode) {
        case 0: return -1;
        case 1: return i < 0 ? -i : 2 * (n - 1) - i;
        case 2: return i < 0 ? 0 : n - 1;
        default: return ((i % n) + n) % n;
    }
}

#define MAX_TAPS NCA_MAX_TAPS

typedef struct {
    int64_t B, D, H, W, C;
    int rd, rh, rw, mode, K;
    double inv_w, inv_h, inv_d;
    int64_t off[MAX_TAPS]; /* interior neighbour offsets */
} geom_t;

static int geom_init(geom_t *g, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C, int rd, int rh,
                     int rw, int mode) {
    g->B = B, g->D = D, g->H = H, g->W = W, g->C = C;
    g->rd = rd, g->rh = rh, g->rw = rw, g->mode = mode;
    g->K = (2 * rd + 1) * (2 * rh + 1) * (2 * rw + 1);
    g->inv_w = 1.0 / (double)W, g->inv_h = 1.0 / (double)H, g->inv_d = 1.0 / (double)D;
    if (g->K > MAX_TAPS) return 1;
    int k = 0;
    for (int dz = -rd; dz <= rd; dz++)
        for (int dy = -rh; dy <= rh; dy++)
            for (int dx = -rw; dx <= rw; dx++) g->off[k++] = (dz * H + dy) * W + dx;
    return 0;
}

/* a / n and a % n for 0 <= a < 2^50 through a double reciprocal (integer division is ~10x slower) */
static inline int64_t divmod(int64_t a, int64_t n, double inv, int64_t *rem) {
    int64_t q = (int64_t)((double)a * inv);
    int64_t r = a - q * n;
    if (r < 0) q--, r += n;
    else if (r >= n) q++, r -= n;
    *rem = r;
    return q;
}

/* the cell index of each tap's neighbour of `cell` (-1 outside under zero padding) */
static inline void neighbours(const geom_t *g, int64_t cell, int64_t *out) {
    int64_t x, y, z;
    int64_t t = divmod(cell, g->W, g->inv_w, &x);
    t = divmod(t, g->H, g->inv_h, &y);
    int64_t b = divmod(t, g->D, g->inv_d, &z);
    if (z >= g->rd && z < g->D - g->rd && y >= g->rh && y < g->H - g->rh && x >= g->rw &&
        x < g->W - g->rw) {
        for (int k = 0; k < g->K; k++) out[k] = cell + g->off[k];
        return;
    }
    int k = 0;
    for (int dz = -g->rd; dz <= g->rd; dz++) {
        int64_t zz = pad_index(z + dz, g->D, g->mode);
        for (int dy = -g->rh; dy <= g->rh; dy++) {
            int64_t yy = pad_index(y + dy, g->H, g->mode);
            for (int dx = -g->rw; dx <= g->rw; dx++) {
                int64_t xx = pad_index(x + dx, g->W, g->mode);
                out[k++] = (zz < 0 || yy < 0 || xx < 0) ? -1 : ((b * g->D + zz) * g->H + yy) * g->W + xx;
            }
        }
    }
}

static inline __attribute__((always_inline)) void store_row(const float *acc, void *out, int64_t m,
                                                            int bf16) {
    if (bf16) {
        uint16_t *o = (uint16_t *)out;
        for (int64_t i = 0; i < m; i++) o[i] = f32_to_bf16(acc[i]);
    } else {
        memcpy(out, acc, sizeof(float) * (size_t)m);
    }
}

static inline __attribute__((always_inline)) void load_row(float *dst, const void *src, int64_t m,
                                                           int bf16) {
    if (bf16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < m; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)m);
    }
}

/* 16 floats as one value (GCC vector extension: one AVX-512 register, two AVX2 ones, ...) */
typedef float v16 __attribute__((vector_size(64)));

static inline v16 vload(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline void vstore(float *p, v16 v) { memcpy(p, &v, sizeof(v)); }

/* out[c0:c0+16] += sum over taps of w[f, tap, c0:c0+16] * x[neighbour, c0:c0+16], in a register */
static inline void tap_sum16(const geom_t *g, const float *x, const float *wf, const int64_t *nb, int64_t c0,
                             float *out) {
    const int64_t C = g->C;
    v16 s = vload(out);
    for (int k = 0; k < g->K; k++)
        if (nb[k] >= 0) s += vload(wf + (int64_t)k * C + c0) * vload(x + nb[k] * C + c0);
    vstore(out, s);
}

/* the same for the last C % 16 channels */
static inline void tap_sum_tail(const geom_t *g, const float *x, const float *wf, const int64_t *nb,
                                int64_t c0, float *out) {
    const int64_t C = g->C;
    for (int k = 0; k < g->K; k++)
        if (nb[k] >= 0)
            for (int64_t c = c0; c < C; c++) out[c - c0] += wf[(int64_t)k * C + c] * x[nb[k] * C + c];
}

/* one row forward: acc = [x | filter 0 | ...] of `cell` */
static void fwd_row(const geom_t *g, const float *restrict x, const float *restrict w,
                    const float *restrict bias, int nf, int identity, int64_t cell, int64_t *nb,
                    float *restrict acc) {
    const int64_t C = g->C;
    float *a = acc;
    if (identity) {
        memcpy(a, x + cell * C, sizeof(float) * (size_t)C);
        a += C;
    }
    if (!nf) return;
    for (int64_t i = 0; i < nf * C; i++) a[i] = bias ? bias[i] : 0.0f;
    neighbours(g, cell, nb);
    for (int f = 0; f < nf; f++) {
        const float *wf = w + (int64_t)f * g->K * C;
        int64_t c0 = 0;
        for (; c0 + 16 <= C; c0 += 16) tap_sum16(g, x, wf, nb, c0, a + f * C + c0);
        if (c0 < C) tap_sum_tail(g, x, wf, nb, c0, a + f * C + c0);
    }
}

int perceive_rows(const float *x, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C,
                  const float *w, const float *bias, int nf, int identity, int rd, int rh, int rw,
                  int mode, const int64_t *idx, int64_t n, void *out, int64_t ld, int64_t col, int bf16,
                  int nthreads) {
    geom_t *g = malloc(sizeof(geom_t));
    if (!g) return 2;
    if (geom_init(g, B, D, H, W, C, rd, rh, rw, mode)) {
        free(g);
        return 1;
    }
    const int64_t m = (identity + nf) * C;
    const size_t esz = bf16 ? 2 : 4;
    int err = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t *nb = malloc(sizeof(int64_t) * MAX_TAPS);
        float *acc = malloc(sizeof(float) * (size_t)m);
        if (!nb || !acc) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (!nb || !acc) continue;
            int64_t cell = idx ? idx[r] : r;
            fwd_row(g, x, w, bias, nf, identity, cell, nb, acc);
            store_row(acc, (char *)out + (size_t)(r * ld + col) * esz, m, bf16);
        }
        free(nb);
        free(acc);
    }
    free(g);
    return err;
}

/* gx[neighbour, c0:c0+16] += sum_f w[f, tap] * gf[f]; gw[f, tap] += gf[f] * x[neighbour] */
static inline void tap_adjoint16(const geom_t *g, const float *x, const float *w, int nf, const int64_t *nb,
                                 const float *gf, float *gx, float *gw, int64_t c0) {
    const int64_t C = g->C, K = g->K;
    for (int k = 0; k < K; k++) {
        if (nb[k] < 0) continue;
        if (gx) {
            v16 s = vload(gx + nb[k] * C + c0);
            for (int f = 0; f < nf; f++) s += vload(w + ((int64_t)f * K + k) * C + c0) * vload(gf + f * C + c0);
            vstore(gx + nb[k] * C + c0, s);
        }
        if (gw) {
            v16 xs = vload(x + nb[k] * C + c0);
            for (int f = 0; f < nf; f++) {
                float *d = gw + ((int64_t)f * K + k) * C + c0;
                vstore(d, vload(d) + vload(gf + f * C + c0) * xs);
            }
        }
    }
}

/* the same for the last C % 16 channels */
static inline void tap_adjoint_tail(const geom_t *g, const float *x, const float *w, int nf, const int64_t *nb,
                                    const float *gf, float *gx, float *gw, int64_t c0) {
    const int64_t C = g->C, K = g->K;
    for (int k = 0; k < K; k++) {
        if (nb[k] < 0) continue;
        for (int f = 0; f < nf; f++)
            for (int64_t c = c0; c < C; c++) {
                float gv = gf[f * C + c];
                if (gx) gx[nb[k] * C + c] += w[((int64_t)f * K + k) * C + c] * gv;
                if (gw) gw[((int64_t)f * K + k) * C + c] += gv * x[nb[k] * C + c];
            }
    }
}

/* one row backward */
static void bwd_row(const geom_t *g, const float *restrict x, const float *restrict w, int nf,
                    int identity, int64_t cell, const float *restrict gr, float *gx, float *gw, float *gb,
                    int64_t *nb) {
    const int64_t C = g->C;
    if (identity && gx) {
        float *restrict d = gx + cell * C;
        for (int64_t c = 0; c < C; c++) d[c] += gr[c];
    }
    const float *gf = gr + (identity ? C : 0);
    if (!nf) return;
    if (gb)
        for (int64_t i = 0; i < nf * C; i++) gb[i] += gf[i];
    neighbours(g, cell, nb);
    int64_t c0 = 0;
    for (; c0 + 16 <= C; c0 += 16) tap_adjoint16(g, x, w, nf, nb, gf, gx, gw, c0);
    if (c0 < C) tap_adjoint_tail(g, x, w, nf, nb, gf, gx, gw, c0);
}

int perceive_rows_bwd(const float *x, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C,
                      const float *w, int nf, int identity, int rd, int rh, int rw, int mode,
                      const int64_t *idx, int64_t n, const void *grad, int64_t ld, int64_t col, int bf16,
                      float *gx, float *gw, float *gb, int nthreads) {
    geom_t *g = malloc(sizeof(geom_t));
    if (!g) return 2;
    if (geom_init(g, B, D, H, W, C, rd, rh, rw, mode)) {
        free(g);
        return 1;
    }
    const int64_t per_item = D * H * W, m = (identity + nf) * C;
    const int64_t pw = (gw || gb) ? ((int64_t)g->K + 1) * nf * C : 0;
    const size_t esz = bf16 ? 2 : 4;
    /* rows of batch item b: [start[b], start[b + 1]); parameter gradients per batch item, summed in
       item order afterwards. Per-thread sums (as before) depended on which thread took which item
       under the dynamic schedule: a late second thread changed the rounding of d weight (resume
       after SIGKILL was 1e-7 off the uninterrupted run). */
    int64_t *start = malloc(sizeof(int64_t) * (size_t)(B + 1));
    float *gw_all = calloc((size_t)(pw * B + 1), sizeof(float));
    if (!start || !gw_all) {
        free(start);
        free(gw_all);
        free(g);
        return 2;
    }
    int64_t r = 0;
    for (int64_t b = 0; b <= B; b++) {
        while (r < n && (idx ? idx[r] : r) < b * per_item) r++;
        start[b] = r;
    }
    int err = 0;
#pragma omp parallel num_threads(nthreads)
    {
        int64_t *nb = malloc(sizeof(int64_t) * MAX_TAPS);
        float *gr = malloc(sizeof(float) * (size_t)m);
        if (!nb || !gr) {
#pragma omp atomic write
            err = 2;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            if (!nb || !gr) continue;
            float *my_gw = gw_all + pw * b, *my_gb = my_gw + (int64_t)g->K * nf * C;
            for (int64_t q = start[b]; q < start[b + 1]; q++) {
                int64_t cell = idx ? idx[q] : q;
                load_row(gr, (const char *)grad + (size_t)(q * ld + col) * esz, m, bf16);
                bwd_row(g, x, w, nf, identity, cell, gr, gx, gw ? my_gw : NULL, gb ? my_gb : NULL, nb);
            }
        }
        free(nb);
        free(gr);
    }
    for (int64_t b = 0; b < B && pw; b++) {
        const float *src = gw_all + pw * b;
        if (gw)
            for (int64_t i = 0; i < (int64_t)g->K * nf * C; i++) gw[i] += src[i];
        if (gb)
            for (int64_t i = 0; i < nf * C; i++) gb[i] += src[(int64_t)g->K * nf * C + i];
    }
    free(start);
    free(gw_all);
    free(g);
    return err;
}

/* grad[i] = h[i] <= 0 ? 0 : grad[i] (ReLU's backward, in place; h and grad float32 or bfloat16) */
void relu_backward(void *grad, const void *h, int64_t n, int bf16, int nthreads) {
    if (bf16) {
        uint16_t *gv = grad;
        const uint16_t *hv = h;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++)
            if (bf16_to_f32(hv[i]) <= 0.0f) gv[i] = 0;
    } else {
        float *gv = grad;
        const float *hv = h;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; i++)
            if (hv[i] <= 0.0f) gv[i] = 0.0f;
    }
}

/* the positions of the nonzero bytes of mask[0:n], ascending, into out; returns their count */
int64_t mask_indices(const uint8_t *mask, int64_t n, int64_t *out) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        out[k] = i;
        k += mask[i] != 0;
    }
    return k;
}

/* ---- the update: new = x + dx at the fired cells (channels k..C-1), then alive masking ---------- */

/* out = x; out[cell_r, k:] += dx[r] for r < n (cells idx[r], or r when idx is NULL) */
void update_rows(const float *x, int64_t cells, int64_t C, const void *dx, int64_t ld, int bf16,
                 const int64_t *idx, int64_t n, int64_t k, float *out, int nthreads) {
    const int64_t m = C - k;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < cells; i++) memcpy(out + i * C, x + i * C, sizeof(float) * (size_t)C);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            float *o = out + (idx ? idx[r] : r) * C + k;
            if (bf16) {
                const uint16_t *s = (const uint16_t *)dx + r * ld;
                for (int64_t c = 0; c < m; c++) o[c] += bf16_to_f32(s[c]);
            } else {
                const float *s = (const float *)dx + r * ld;
                for (int64_t c = 0; c < m; c++) o[c] += s[c];
            }
        }
    }
}

/* alive[cell] = some cell of the 3^dim neighbourhood (inside the grid) has x[., channel] > thr */
void alive_mask(const float *x, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C, int64_t channel,
                float thr, uint8_t *alive, int nthreads) {
    const int64_t cells = B * D * H * W, lines = B * D * H;
    const int rd = D > 1 ? 1 : 0;
    uint8_t *above = malloc((size_t)cells);
    if (!above) { /* cannot happen at NCA sizes; mark everything alive rather than crash */
        memset(alive, 1, (size_t)cells);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < cells; i++) above[i] = x[i * C + channel] > thr;
#pragma omp for schedule(static)
        for (int64_t line = 0; line < lines; line++) { /* one row of W cells at (b, z, y) */
            const int64_t y = line % H, z = (line / H) % D, b = line / H / D;
            uint8_t *out = alive + line * W;
            memset(out, 0, (size_t)W);
            for (int64_t zz = z - rd; zz <= z + rd; zz++) {
                if (zz < 0 || zz >= D) continue;
                for (int64_t yy = y - 1; yy <= y + 1; yy++) {
                    if (yy < 0 || yy >= H) continue;
                    const uint8_t *a = above + ((b * D + zz) * H + yy) * W;
                    for (int64_t v = 0; v < W; v++)
                        out[v] |= a[v] | (v > 0 ? a[v - 1] : 0) | (v + 1 < W ? a[v + 1] : 0);
                }
            }
        }
    }
    free(above);
}

/* life = pre & post; out[cell] *= life (every channel) */
void apply_life(float *out, const uint8_t *pre, uint8_t *life, int64_t cells, int64_t C, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < cells; i++) {
        life[i] = (uint8_t)(life[i] & pre[i]);
        if (!life[i])
            for (int64_t c = 0; c < C; c++) out[i * C + c] = 0.0f;
    }
}

/* the update's adjoint: gx = g * life; gdx[r] = gx[cell_r, k:] for r < n, 0 for n <= r < rows */
void update_rows_bwd(const float *g, const uint8_t *life, int64_t cells, int64_t C, const int64_t *idx,
                     int64_t n, int64_t rows, int64_t k, float *gx, void *gdx, int bf16, int nthreads) {
    const int64_t m = C - k;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < cells; i++) {
            if (life && !life[i])
                memset(gx + i * C, 0, sizeof(float) * (size_t)C);
            else
                memcpy(gx + i * C, g + i * C, sizeof(float) * (size_t)C);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *s = gx + (r < n ? (idx ? idx[r] : r) : 0) * C + k;
            if (bf16) {
                uint16_t *o = (uint16_t *)gdx + r * m;
                for (int64_t c = 0; c < m; c++) o[c] = r < n ? f32_to_bf16(s[c]) : 0;
            } else {
                float *o = (float *)gdx + r * m;
                for (int64_t c = 0; c < m; c++) o[c] = r < n ? s[c] : 0.0f;
            }
        }
    }
}
