/* gemm with the fused epilogue: out = act(alpha * (a @ b) + bias) + beta * c, fp32 accumulation.

   Tiling: a work-group of 8 x 8 work-items computes a 32 x 32 tile of out, each work-item a
   4 x 4 block held in registers (rows ly + 8 r, columns lx + 8 c: neighbouring work-items take
   neighbouring columns, so both the local-memory reads and the final stores are unit-stride
   across the group). The K dimension is walked in steps of TK = 16: the group stages a
   32 x 16 tile of a and a 16 x 32 tile of b in local memory (4 KiB; each work-item loads 8
   elements of each, out-of-range elements are zero so the inner loop has no bounds checks),
   a barrier, 16 rank-1 updates of the 4 x 4 block, and a barrier before the next tile may
   overwrite the staged one. Every operand element is read from global memory once per
   tile row/column of out instead of once per output element: K / 32 times fewer reads.

   a [M, K], b [K, N], c and out [M, N], bias [N], all C-contiguous.
   Build options: A_KIND (a and b), BIAS_KIND, C_KIND, O_KIND (out). The epilogue's choices are
   arguments, not build options: act (a code of hal.codes.ACTIVATIONS), has_bias, has_c (0/1; a missing bias or
   c is NULL and never read). They are uniform over the launch, so the branches cost nothing next
   to the K loop, and one build per dtype combination serves every epilogue.
*/
#define TM 32
#define TN 32
#define TK 16
#define WX 8 /* work-items per group along N */
#define WY 8 /* work-items per group along M */
#define RM (TM / WY)
#define RN (TN / WX)

__kernel __attribute__((reqd_work_group_size(WX, WY, 1)))
void gemm(__global const TYPE(A_KIND) *a, __global const TYPE(A_KIND) *b, __global const TYPE(BIAS_KIND) *bias,
          __global const TYPE(C_KIND) *c, __global TYPE(O_KIND) *out, const int M, const int N, const int K,
          const float alpha, const float beta, const int act, const int has_bias, const int has_c) {
    __local float as[TM][TK + 1]; /* +1: a padded row, so a column walk does not hit one bank on GPUs */
    __local float bs[TK][TN];
    const int lx = get_local_id(0), ly = get_local_id(1), lid = ly * WX + lx;
    const int m0 = get_group_id(1) * TM, n0 = get_group_id(0) * TN;
    float acc[RM][RN];
    for (int r = 0; r < RM; r++)
        for (int q = 0; q < RN; q++) acc[r][q] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int e = lid; e < TM * TK; e += WX * WY) {
            const int r = e / TK, kk = e - r * TK, gm = m0 + r, gk = k0 + kk;
            as[r][kk] = (gm < M && gk < K) ? LOAD(A_KIND, a, (size_t)gm * K + gk) : 0.0f;
        }
        for (int e = lid; e < TK * TN; e += WX * WY) {
            const int kk = e / TN, q = e - kk * TN, gk = k0 + kk, gn = n0 + q;
            bs[kk][q] = (gk < K && gn < N) ? LOAD(A_KIND, b, (size_t)gk * N + gn) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TK; kk++) {
            float bv[RN];
            for (int q = 0; q < RN; q++) bv[q] = bs[kk][lx + WX * q];
            for (int r = 0; r < RM; r++) {
                const float av = as[ly + WY * r][kk];
                for (int q = 0; q < RN; q++) acc[r][q] = fma(av, bv[q], acc[r][q]);
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (int r = 0; r < RM; r++) {
        const int gm = m0 + ly + WY * r;
        if (gm >= M) continue;
        for (int q = 0; q < RN; q++) {
            const int gn = n0 + lx + WX * q;
            if (gn >= N) continue;
            float v = alpha * acc[r][q];
            if (has_bias) v += LOAD(BIAS_KIND, bias, gn);
            v = activate(v, act);
            if (has_c) v += beta * LOAD(C_KIND, c, (size_t)gm * N + gn);
            STORE(O_KIND, out, (size_t)gm * N + gn, v);
        }
    }
}
