/* softmax along any dim, and the gated elementwise ops (silu_and_mul: SwiGLU).

   softmax: x is viewed as [outer, n, inner] with the softmax dim in the middle (inner = 1 for
   the last dim). One work-group per (outer, inner) row; the launcher uses the smallest power of
   two >= n, capped at 256. Each work-item keeps an online (max, sum of exp) pair over its strided
   share of the row (one read of x), the pairs are merged with a tree in local memory, and a
   second read writes exp(x - max) / sum. A -inf element contributes nothing; a work-item whose
   whole share is -inf keeps (max, sum) = (-inf, 0) and is skipped when merging, so masked tails
   never make exp(-inf - -inf) = NaN.

   <act>_and_mul (silu_and_mul, ...): y = act(x[..., :d]) * x[..., d:], elementwise, one work-item
   per output element, no local memory; work-groups of 64 with the global size rounded up to a
   multiple of it (the kernel checks the bound), so a prime element count does not force the
   runtime into tiny groups. One kernel source for every gated op: GATED_OP names the kernel (the
   op) and ACT is its activation code (hal.codes).

   Build options: X_KIND; GATED_OP and ACT for the gated ops.
*/
#define WG_MAX 256

/* (m, s) <- (m, s) merged with (m2, s2): the running max and the sum of exp(x - max). */
inline void merge(float *m, float *s, const float m2, const float s2) {
    const float mn = fmax(*m, m2);
    if (mn == -INFINITY) return; /* both empty */
    *s = *s * exp(*m - mn) + s2 * exp(m2 - mn);
    *m = mn;
}

__kernel void softmax(__global const TYPE(X_KIND) *x, __global TYPE(X_KIND) *y, const int n, const int inner) {
    __local float red_m[WG_MAX];
    __local float red_s[WG_MAX];
    const int lid = get_local_id(0), wg = get_local_size(0);
    const size_t row = get_group_id(0);
    const size_t o = row / inner;
    const size_t base = o * n * inner + (row - o * inner); /* no %: see common.h on Oclgrind */
    float m = -INFINITY, s = 0.0f;
    for (int j = lid; j < n; j += wg) {
        const float v = LOAD(X_KIND, x, base + (size_t)j * inner);
        if (v == -INFINITY) continue;
        if (v > m) {
            s = s * exp(m - v) + 1.0f;
            m = v;
        } else {
            s += exp(v - m);
        }
    }
    red_m[lid] = m;
    red_s[lid] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int step = wg / 2; step > 0; step >>= 1) {
        if (lid < step) {
            float a = red_m[lid], b = red_s[lid];
            merge(&a, &b, red_m[lid + step], red_s[lid + step]);
            red_m[lid] = a;
            red_s[lid] = b;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float mx = red_m[0], inv = 1.0f / red_s[0];
    for (int j = lid; j < n; j += wg) {
        const size_t i = base + (size_t)j * inner;
        STORE(X_KIND, y, i, exp(LOAD(X_KIND, x, i) - mx) * inv);
    }
}

/* x [rows, 2d] -> y [rows, d]; total = rows * d. */
#ifdef GATED_OP
__kernel void GATED_OP(__global const TYPE(X_KIND) *x, __global TYPE(X_KIND) *y, const int d, const long total) {
    const long i = get_global_id(0);
    if (i >= total) return;
    const long row = i / d, j = i - row * d;
    const float g = LOAD(X_KIND, x, row * 2 * d + j), u = LOAD(X_KIND, x, row * 2 * d + d + j);
    STORE(X_KIND, y, i, activate(g, ACT) * u);
}
#endif
