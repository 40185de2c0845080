/* The C kernels of _kernels.c, declared once: _kernels.c and the operator wrappers in _ops.cpp both
   include this header, so a wrapper that passes the wrong argument types does not compile.

   A state is float32 (B, D, H, W, C) in memory (2D: D = 1). `mode` is the padding: 0 zeros, 1 reflect,
   2 replicate, 3 circular. `bf16` says whether a row buffer holds bfloat16 (else float32). */

#ifndef NCATOOL_KERNELS_H
#define NCATOOL_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NCA_MAX_TAPS 1331 /* taps of one filter: kernels up to 11^3 */

/* rows[r, col:col+(identity+nf)*C] = [x | filter 0 | ...] at cell idx[r] (r when idx is NULL);
   returns 0, 1 (too many taps) or 2 (out of memory) */
int perceive_rows(const float *x, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C, const float *w,
                  const float *bias, int nf, int identity, int rd, int rh, int rw, int mode,
                  const int64_t *idx, int64_t n, void *out, int64_t ld, int64_t col, int bf16, int nthreads);

/* the adjoint: gx += d x (may be NULL), gw = d taps (nf, K, C), gb = d bias (nf, C) (each may be
   NULL); idx sorted ascending and unique; the sums do not depend on nthreads */
int perceive_rows_bwd(const float *x, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C, const float *w,
                      int nf, int identity, int rd, int rh, int rw, int mode, const int64_t *idx, int64_t n,
                      const void *grad, int64_t ld, int64_t col, int bf16, float *gx, float *gw, float *gb,
                      int nthreads);

/* grad[i] = 0 where h[i] <= 0 */
void relu_backward(void *grad, const void *h, int64_t n, int bf16, int nthreads);

/* positions of the nonzero bytes of mask[0:n], ascending; returns their count */
int64_t mask_indices(const uint8_t *mask, int64_t n, int64_t *out);

/* out = x; out[cell_r, k:] += dx[r] (row stride ld) for r < n */
void update_rows(const float *x, int64_t cells, int64_t C, const void *dx, int64_t ld, int bf16,
                 const int64_t *idx, int64_t n, int64_t k, float *out, int nthreads);

/* alive[cell] = the 3^dim neighbourhood holds a cell with x[., channel] > thr */
void alive_mask(const float *x, int64_t B, int64_t D, int64_t H, int64_t W, int64_t C, int64_t channel,
                float thr, uint8_t *alive, int nthreads);

/* life &= pre; out[cell] = 0 where !life */
void apply_life(float *out, const uint8_t *pre, uint8_t *life, int64_t cells, int64_t C, int nthreads);

/* gx = g * life; gdx[r] = gx[cell_r, k:] for r < n, 0 for n <= r < rows */
void update_rows_bwd(const float *g, const uint8_t *life, int64_t cells, int64_t C, const int64_t *idx,
                     int64_t n, int64_t rows, int64_t k, float *gx, void *gdx, int bf16, int nthreads);

#ifdef __cplusplus
}
#endif

#endif
