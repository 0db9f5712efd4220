/* The CPU benchmark's second ceiling: plain C loops over the same bytes as an f32 Lion step
 * (read p, g, m; write p, m), OpenMP over the same number of threads. benches/cpu_step.rs
 * compiles this at run time (cc -O3 -march=native -fopenmp -ffp-contract=off -shared) and
 * loads it with dlopen, so that neither the library nor its build depends on OpenMP.
 *
 * One parallel region per step; each tensor is split statically over the threads with no
 * barrier between tensors (`nowait`): the cheapest schedule OpenMP offers for many tensors. */
#include <math.h>
#include <stddef.h>

/* Lion's per-tensor coefficients (src/numerics/update.rs Coeffs, the plain case). */
struct lion_coeffs {
    float beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, decay_keep, grad_scale;
};

/* Trivial arithmetic: the traffic alone. */
void same_bytes_f32(int threads, size_t tensors, float *const *p, const float *const *g,
                    float *const *m, const size_t *n) {
#pragma omp parallel num_threads(threads)
    for (size_t t = 0; t < tensors; t++) {
        float *restrict pt = p[t];
        const float *restrict gt = g[t];
        float *restrict mt = m[t];
#pragma omp for schedule(static) nowait
        for (size_t i = 0; i < n[t]; i++) {
            pt[i] = pt[i] - 1e-4f * gt[i];
            mt[i] = mt[i] * 0.99f + gt[i];
        }
    }
}

/* Lion's arithmetic, each operation rounded separately (-ffp-contract=off): the same bits
 * as lion_step (the benchmark checks it). */
void lion_f32(int threads, size_t tensors, float *const *p, const float *const *g,
              float *const *m, const size_t *n, const struct lion_coeffs *k) {
    const float b1 = k->beta1, omb1 = k->one_minus_beta1, b2 = k->beta2,
                omb2 = k->one_minus_beta2, step = k->step_size, keep = k->decay_keep,
                scale = k->grad_scale;
#pragma omp parallel num_threads(threads)
    for (size_t t = 0; t < tensors; t++) {
        float *restrict pt = p[t];
        const float *restrict gt = g[t];
        float *restrict mt = m[t];
#pragma omp for schedule(static) nowait
        for (size_t i = 0; i < n[t]; i++) {
            float gi = gt[i] * scale;
            float mi = mt[i];
            float c = b1 * mi + omb1 * gi;
            float u = fabsf(c) > 0.0f ? copysignf(1.0f, c) : 0.0f;
            pt[i] = pt[i] * keep - step * u;
            mt[i] = b2 * mi + omb2 * gi;
        }
    }
}
