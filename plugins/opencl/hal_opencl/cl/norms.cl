/* rms_norm and layer_norm with the fused residual add.

   One work-group per row. The launcher picks the work-group size: the smallest power of two
   >= hidden, capped at 256 (a row of 4096 gives each work-item 16 elements; short rows do not
   leave most work-items idle). Each work-item strides through the row, so neighbouring
   work-items touch neighbouring elements. Row sums are reduced with a tree in local memory
   (WG_MAX floats, a barrier per level). All arithmetic is fp32: the sum x + residual is formed
   in fp32, normalized from fp32, and only rounded to the storage type when stored, so a large
   input never overflows half precision by being squared in it.

   Build options: X_KIND (x, residual, outputs), W_KIND (weight), B_KIND (bias), HAS_RESIDUAL,
   HAS_BIAS (0/1). Missing optional buffers are passed as NULL and never read.
*/
#define WG_MAX 256

/* Sum of v over the work-group; every work-item gets the result. The leading barrier keeps a
   previous call's readers of red[0] ahead of this call's writers. */
inline float group_sum(float v, __local float *red) {
    const int lid = get_local_id(0), n = get_local_size(0);
    barrier(CLK_LOCAL_MEM_FENCE);
    red[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return red[0];
}

/* s = x (+ residual) at element i of the row starting at base, in fp32. */
inline float summed(__global const TYPE(X_KIND) *x, __global const TYPE(X_KIND) *res, size_t i) {
    float s = LOAD(X_KIND, x, i);
#if HAS_RESIDUAL
    s += LOAD(X_KIND, res, i);
#endif
    return s;
}

__kernel void rms_norm(__global const TYPE(X_KIND) *x, __global const TYPE(W_KIND) *weight,
                       __global const TYPE(X_KIND) *res, __global TYPE(X_KIND) *y,
                       __global TYPE(X_KIND) *sum_out, const int hidden, const float eps) {
    __local float red[WG_MAX];
    const int lid = get_local_id(0), n = get_local_size(0);
    const size_t base = (size_t)get_group_id(0) * hidden;
    float sq = 0.0f;
    for (int j = lid; j < hidden; j += n) {
        const float s = summed(x, res, base + j);
#if HAS_RESIDUAL
        STORE(X_KIND, sum_out, base + j, s);
#endif
        sq += s * s;
    }
    const float inv = rsqrt(group_sum(sq, red) / hidden + eps);
    for (int j = lid; j < hidden; j += n)
        STORE(X_KIND, y, base + j, summed(x, res, base + j) * inv * LOAD(W_KIND, weight, j));
}

/* Two-pass mean and variance (sum of (s - mean)^2 rather than E[s^2] - mean^2): no cancellation
   when |mean| >> std, at the price of reading the row once more (it is in cache on a CPU). */
__kernel void layer_norm(__global const TYPE(X_KIND) *x, __global const TYPE(W_KIND) *weight,
                         __global const TYPE(B_KIND) *bias, __global const TYPE(X_KIND) *res,
                         __global TYPE(X_KIND) *y, __global TYPE(X_KIND) *sum_out, const int hidden,
                         const float eps) {
    __local float red[WG_MAX];
    const int lid = get_local_id(0), n = get_local_size(0);
    const size_t base = (size_t)get_group_id(0) * hidden;
    float total = 0.0f;
    for (int j = lid; j < hidden; j += n) {
        const float s = summed(x, res, base + j);
#if HAS_RESIDUAL
        STORE(X_KIND, sum_out, base + j, s);
#endif
        total += s;
    }
    const float mean = group_sum(total, red) / hidden;
    float dev = 0.0f;
    for (int j = lid; j < hidden; j += n) {
        const float d = summed(x, res, base + j) - mean;
        dev += d * d;
    }
    const float inv = rsqrt(group_sum(dev, red) / hidden + eps);
    for (int j = lid; j < hidden; j += n) {
        float v = (summed(x, res, base + j) - mean) * inv * LOAD(W_KIND, weight, j);
#if HAS_BIAS
        v += LOAD(B_KIND, bias, j);
#endif
        STORE(X_KIND, y, base + j, v);
    }
}
