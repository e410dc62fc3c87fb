// Vendor file: flash_attention_mfma runs QK^T and PV on wave64 MFMA 32x32x8 fragments (4 waves),
// whose lane layouts decide how scores are reduced (lane ^ 32 shuffles) and how P is re-packed.
// Flash attention (prefill), written for AMD: out = softmax(mask(softcap(scale * q k^T))) v per
// (sequence, query head), semantics in ops/attention.py, ABI in docs/gpu-kernels.md.
//
//   flash_attention_simt<T>  every dtype, every target (wave64 CDNA and wave32 RDNA), head dims
//                            1..256 (d_v may differ).
//   flash_attention_mfma<T>  T = __half / hip_bfloat16 on gfx90a / gfx94x, head dims multiples
//                            of 16 up to 256: S^T = K Q^T and O^T = V^T P^T on
//                            v_mfma_f32_32x32x8{f16,bf16_1k}, fp32 accumulation.
//
// Launch (both): grid (ceil(seqlen_q / 64), heads_q, batch), block 256 = 4 waves of 64 on CDNA
// (8 waves of 32 on RDNA), dynamic LDS from the glue's formula for `block_n` keys per tile.
// One block owns 64 query rows of one head; it walks the K/V tiles its rows can see (causal /
// window bounds computed per block, so causal blocks stop at the diagonal and windowed ones
// start at the window), stages each K/V tile in LDS once for all 64 rows and runs the
// online-softmax recurrence in fp32 registers (running max, running sum, rescaled accumulator);
// the seq_q x seq_k matrix never exists.
//
// Masks are intervals: with bottom-right alignment query i sits at key position
// pos = i + seq_k - seq_q and sees keys lo(pos) <= j <= hi(pos) with
//   lo = window ? pos - window + 1 : 0,   hi = causal ? pos : (window ? pos + window - 1 : seq_k - 1),
// both non-decreasing in i, so the union over a block (or a wave) is [lo(first row), hi(last row)].
// Chunks of keys outside a wave's union are skipped wave-uniformly (no divergence, no barrier
// is skipped by part of the block). A row that sees no key keeps l = 0 and writes zeros.
//
// LDS: 64 KiB per workgroup on gfx90a / gfx94x / RDNA. The glue's budget (<= 48 KiB, the CUDA
// default) leaves room for two blocks of the smaller tiles per CU; on AMD nothing caps dynamic
// LDS below the 64 KiB, so block_n 64 at d = 128 (51 KiB by the formula, 34 KiB in the MFMA
// layout below) would be legal, at one block per CU. On gfx950 (160 KiB) the same 64-row tile
// could keep two K/V stages (double buffering: load tile t+1 while computing on tile t) with
// block_n 64 at d = 256 (2 x 68 KiB in the formula) or three blocks per CU at d = 128.
#include "hal_gpu.h"

#define ATTN_BLOCK_M 64  // query rows per block (ABI)

__device__ __forceinline__ long long attn_lo(long long pos, int window) { return window > 0 ? pos - window + 1 : 0; }
__device__ __forceinline__ long long attn_hi(long long pos, int sk, int causal, int window) {
    return causal ? pos : (window > 0 ? pos + window - 1 : (long long)sk - 1);
}

// Sequence b's token offsets and lengths (dense or varlen-packed).
struct AttnSeq {
    long long q_tok0, k_tok0;
    int sq, sk;
};
__device__ __forceinline__ AttnSeq attn_seq(const int* cu_q, const int* cu_k, int b, int seqlen_q, int seqlen_k) {
    AttnSeq s;
    if (cu_q) {
        s.q_tok0 = cu_q[b];
        s.sq = cu_q[b + 1] - cu_q[b];
        s.k_tok0 = cu_k[b];
        s.sk = cu_k[b + 1] - cu_k[b];
    } else {
        s.q_tok0 = (long long)b * seqlen_q;
        s.sq = seqlen_q;
        s.k_tok0 = (long long)b * seqlen_k;
        s.sk = seqlen_k;
    }
    return s;
}

// Visible key interval [lo, hi] (clamped to [0, sk - 1]; empty when lo > hi) of query rows
// r0..r1 of the sequence (r0 > r1: no rows, empty).
__device__ __forceinline__ void attn_rows_keys(int r0, int r1, const AttnSeq& s, int causal, int window, int& lo, int& hi) {
    if (r0 > r1 || s.sk <= 0) {
        lo = 1;
        hi = 0;
        return;
    }
    const long long shift = (long long)s.sk - s.sq;
    long long l = attn_lo(r0 + shift, window), h = attn_hi(r1 + shift, s.sk, causal, window);
    l = l < 0 ? 0 : l;
    h = h > s.sk - 1 ? s.sk - 1 : h;
    lo = (int)(l > s.sk ? s.sk : l);
    hi = (int)(h < -1 ? -1 : h);
}

__device__ __forceinline__ float attn_logit(float dot, float scale, float softcap) {
    const float s = dot * scale;
    return softcap > 0.0f ? softcap * tanhf(s / softcap) : s;
}

// ---- NaN and +-inf in V (docs/errors.md), as in attention.cu. P V weighs every key of a tile, p = 0
// for a key that a row may not see (causal, window, another sequence), and 0 * inf is NaN; the MFMA
// variant also rounds p to T (hi + lo: lo is 0 where p is exact in T, as p = 1 at the row max; a
// small p underflows in f16). So V tiles are staged with inf / NaN replaced by 0, and a thread that
// meets one widens the pass's key range [lo, hi] (AttnVRange). After its key loop, each lane goes
// through the keys of that range its row sees, reads its columns of V again from global memory and
// adds the inf / NaN it finds, times attn_weight, to the unnormalized output. With finite V the
// range stays empty: the cost is a test per staged element. No static LDS (it would cost a block
// per CU where the glue's dynamic bytes are 32 KiB): the MFMA variant keeps the range in the LDS its
// tiles leave free, the SIMT one, whose tiles fill the glue's bytes, per thread until its key loop
// ends.
template <typename T>
__device__ __forceinline__ bool nonfinite(T x) { return !(fabsf(to_float(x)) < INFINITY); }

// The weight with which an inf / NaN of V at a key a row sees enters the row, whose logits peak at m:
// 1 where the reference's float64 p of the key is positive (p v = v for v = +-inf, NaN), 0 where that
// p is 0 (0 * v = NaN): for a logit of -inf, or one more than ~745 below m (exp underflows in float64;
// fp32's p, and the online softmax's rescale factors, underflow already past ~104). The key's logit
// is computed again.
template <typename T>
__device__ __forceinline__ float attn_weight(const T* q_row, const T* k_row, int d, float scale, float softcap, float m) {
    float dot = 0.0f;
#pragma nounroll  // a cold path: no unrolled copies beside the kernel's
    for (int c = 0; c < d; ++c) dot += to_float(q_row[c]) * to_float(k_row[c]);
    return attn_logit(dot, scale, softcap) - m > -745.0f ? 1.0f : 0.0f;
}

// The keys whose V holds an inf / NaN in the columns of pass 0 and of pass 1 (the MFMA variant's
// head_dim_v > 128), as max(key) and max(-key): atomicMax widens them (after a barrier that follows
// clear). `k_rows` (the block's K rows) is read back after the key loop: held in SGPRs across the
// loop for that cold path, it overflowed the MFMA kernel's SGPR file.
struct AttnVRange {
    int hi[2], neg_lo[2];
    const void* k_rows;
    __device__ __forceinline__ void clear(const void* k) {
        if (threadIdx.x == 0) hi[0] = hi[1] = neg_lo[0] = neg_lo[1] = -0x7fffffff, k_rows = k;
    }
    __device__ __forceinline__ void add(int pass, int key_lo, int key_hi) {
        atomicMax(&hi[pass], key_hi);
        atomicMax(&neg_lo[pass], -key_lo);
    }
};

// ---------------------------------------------------------------- 4 elements of T at once
// LDS / global reads of 4 consecutive elements as one ds_read_b64 / b128 (global_load_dwordx2 /
// x4); callers guarantee 4-element alignment.
template <typename T> struct Quad;
template <> struct Quad<float> {
    typedef float4 raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4]) { o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w; }
};
template <> struct Quad<__half> {
    typedef uint2 raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4]) {
        __half h[4];
        __builtin_memcpy(h, &v, sizeof(v));
        for (int e = 0; e < 4; ++e) o[e] = __half2float(h[e]);
    }
};
template <> struct Quad<hip_bfloat16> {
    typedef uint2 raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4]) {
        // bf16 -> fp32 is a 16-bit shift: do it on the packed words directly.
        o[0] = __builtin_bit_cast(float, v.x << 16), o[1] = __builtin_bit_cast(float, v.x & 0xffff0000u);
        o[2] = __builtin_bit_cast(float, v.y << 16), o[3] = __builtin_bit_cast(float, v.y & 0xffff0000u);
    }
};

template <typename T>
__device__ __forceinline__ void lds_quad(const T* p, float o[4]) {
    Quad<T>::f32(*reinterpret_cast<const typename Quad<T>::raw*>(p), o);
}

// ====================================================================== SIMT
// Thread layout: 4 consecutive lanes per query row (row = tid / 4, quarter = tid % 4), so the
// 64 rows of the block are the 256 threads, and a row's 4 lanes always sit in one wave on
// wave64 and on wave32. The quarter owns head-dim columns 16 i + 4 quarter + e (i < 16, e < 4):
// its q slice (<= 64 fp32) and its output slice (<= 64 fp32 accumulators) stay in VGPRs.
// A dot product q . k_j is 4 partial sums over the quarters, combined by two xor shuffles
// (1, 2: DPP quad permutes, no LDS traffic); every lane of the quad ends with the full score.
// Per K/V tile: pass 1 (a loop over keys, not unrolled) computes the row's scores and each lane
// writes them to the fp32 score tile of the ABI budget ([block_n][64], key-major), which it alone
// reads back (the 4 lanes of a quad write the same value): no barrier; pass 2 (also a key loop)
// takes p = exp(s - m) from there and accumulates p V. The online softmax thus updates once per
// tile, and only q (<= 64 fp32) and the accumulators (<= 64 fp32) stay in registers, the unrolled
// code being one key's NB groups: no spills on gfx90a / gfx94x / gfx1030.
// LDS reads: per 4 FMAs one 8-byte (16-byte for fp32) ds_read of K or V; the 4 lanes of a quad
// read 4 consecutive chunks of one row and the other quads of the wave read the same row, which
// the LDS broadcasts: no bank conflicts. K and V tiles use the ABI layout [block_n][pad(d)].
//
// NB: 16-column groups held per lane, a bucket >= ceil(max(d, d_v) / 16). The loops over them are
// unrolled with no per-group branch or index clamp. Groups past d (d_v) simply read on: into the
// K row's zero padding, the next row, the V tile (K: finite, times q = 0, so the scores are exact)
// or the score tile (V: only accumulators of columns >= d_v, never stored, see those values).
// Buckets keep the wasted work under 1.5x (2x at d <= 32).
template <typename T, int NB>
__device__ __forceinline__ void flash_attention_simt_body(T* smem_t, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ cu_seqlens_k, int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim, int head_dim_v,
    float scale, int causal, int window, float softcap, int block_n) {
    (void)batch;
    const int b = blockIdx.z, h = blockIdx.y;
    const AttnSeq s = attn_seq(cu_seqlens_q, cu_seqlens_k, b, seqlen_q, seqlen_k);
    const int q0 = blockIdx.x * ATTN_BLOCK_M;
    if (q0 >= s.sq) return;  // block-uniform: past this sequence's end (varlen)
    const int hkv = h / (heads_q / heads_kv);
    const int d = head_dim, dv = head_dim_v;
    const int tid = threadIdx.x, row = tid >> 2, quarter = tid & 3;

    // Key intervals: the row's, the wave's (for skipping) and the block's (the tile range).
    const int qi = q0 + row;
    const bool row_ok = row < ATTN_BLOCK_M && qi < s.sq;
    int lo, hi, wlo, whi, blo, bhi;
    attn_rows_keys(qi, row_ok ? qi : qi - 1, s, causal, window, lo, hi);
    const int wave_rows = warpSize / 4, wr0 = q0 + (tid / warpSize) * wave_rows;
    attn_rows_keys(wr0, min(wr0 + wave_rows, s.sq) - 1, s, causal, window, wlo, whi);
    attn_rows_keys(q0, min(q0 + ATTN_BLOCK_M, s.sq) - 1, s, causal, window, blo, bhi);

    // The quarter's q columns, fp32.
    const T* qrow = q + ((s.q_tok0 + (row_ok ? qi : 0)) * heads_q + h) * (long long)d;
    float qr[NB][4];
#pragma unroll
    for (int i = 0; i < NB; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = 16 * i + 4 * quarter + e;
            qr[i][e] = row_ok && c < d ? to_float(qrow[c]) : 0.0f;
        }
    float acc[NB][4];
#pragma unroll
    for (int i = 0; i < NB; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    // LDS tiles: K [block_n][ldk], V [block_n][ldv] of T (the ABI layout), then the fp32 score
    // tile, here [block_n][64] (key-major: the 16 rows of a wave64 hit 16 consecutive banks).
    const int ldk = ((d + 7) / 8) * 8 + 8, ldv = ((dv + 7) / 8) * 8 + 8;
    T* Ks = smem_t;
    T* Vs = Ks + (long long)block_n * ldk;
    float* Ss = reinterpret_cast<float*>(Vs + (long long)block_n * ldv) + row;
    const T zero = from_float<T>(0.0f);
    const long long kv_stride = (long long)heads_kv * d, v_stride = (long long)heads_kv * dv;
    const T* kbase = k + s.k_tok0 * kv_stride + (long long)hkv * d;
    const T* vbase = v + s.k_tok0 * v_stride + (long long)hkv * dv;
    int nf_lo = 0x7fffffff, nf_hi = -1;  // the keys this thread staged an inf / NaN of V for

    for (int kt = blo; kt <= bhi; kt += block_n) {
        // Stage: rows past the block's last visible key are zero (never NaN garbage times p = 0).
        const int kw = ldk, vw = ldv;  // whole rows: the padding is read (times q = 0) by the NB loops
        for (int idx = tid; idx < block_n * kw; idx += blockDim.x) {
            const int j = idx / kw, c = idx % kw, key = kt + j;
            Ks[j * ldk + c] = key <= bhi && c < d ? kbase[key * kv_stride + c] : zero;
        }
        for (int idx = tid; idx < block_n * vw; idx += blockDim.x) {
            const int j = idx / vw, c = idx % vw, key = kt + j;
            const T x = key <= bhi && c < dv ? vbase[key * v_stride + c] : zero;
            if (nonfinite(x)) nf_lo = min(nf_lo, key), nf_hi = max(nf_hi, key);
            Vs[j * ldv + c] = nonfinite(x) ? zero : x;
        }
        __syncthreads();

        // This wave's visible keys of the tile: j in [j0, j1) (wave-uniform).
        const int j0 = max(wlo - kt, 0), j1 = min(min(whi, bhi) - kt + 1, block_n);
        // Scores of the row, over the quarter's columns + two quad shuffles; every lane of the
        // quad gets the full score and stores it (same value, same address) to the score tile,
        // which it alone reads back below: no barrier needed.
        float tm = -INFINITY;
#pragma nounroll
        for (int j = j0; j < j1; ++j) {
            const T* kr = Ks + j * ldk + 4 * quarter;
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < NB; ++i) {
                float kv[4];
                lds_quad(kr + 16 * i, kv);
#pragma unroll
                for (int e = 0; e < 4; ++e) dot += qr[i][e] * kv[e];
            }
            dot += __shfl_xor(dot, 1);
            dot += __shfl_xor(dot, 2);
            const int key = kt + j;
            const float sc = key >= lo && key <= hi ? attn_logit(dot, scale, softcap) : -INFINITY;
            tm = fmaxf(tm, sc);
            Ss[j * ATTN_BLOCK_M] = sc;
        }
        // Online softmax over the tile. A row that has seen nothing yet keeps m = -inf; the
        // exponent base is then 0 so that every p and the rescale factor are exp(-inf) = 0.
        const float m_new = fmaxf(m, tm), base = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = __expf(m - base);
        m = m_new;
        l *= alpha;
#pragma unroll
        for (int i = 0; i < NB; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][e] *= alpha;
#pragma nounroll
        for (int j = j0; j < j1; ++j) {
            const float p = __expf(Ss[j * ATTN_BLOCK_M] - base);
            l += p;
            const T* vr = Vs + j * ldv + 4 * quarter;
#pragma unroll
            for (int i = 0; i < NB; ++i) {
                float vv[4];
                lds_quad(vr + 16 * i, vv);
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][e] += p * vv[e];
            }
        }
        __syncthreads();  // the next tile overwrites K and V
    }

    // The block's range, gathered in the score tile (free now), then the inf / NaN of V (zeros in the
    // tiles) for the keys the row sees.
    AttnVRange& vrange = *reinterpret_cast<AttnVRange*>(Vs + (long long)block_n * ldv);
    vrange.clear(kbase);
    __syncthreads();
    if (nf_hi >= 0) vrange.add(0, nf_lo, nf_hi);
    __syncthreads();
    if (!row_ok) return;
    for (int key = max(lo, -vrange.neg_lo[0]); key <= min(hi, vrange.hi[0]); ++key) {
        const T* v_row = vbase + key * v_stride + 4 * quarter;
        float w = -1.0f;  // the key's weight, once this lane meets an inf / NaN of it
#pragma nounroll
        for (int i = 0; i < 4 * NB; ++i) {  // acc[i / 4][i % 4]: column 16 (i / 4) + 4 quarter + i % 4
            const int c = 16 * (i >> 2) + (i & 3);
            const float x = 4 * quarter + c < dv ? to_float(v_row[c]) : 0.0f;
            if (!nonfinite(x)) continue;
            if (w < 0.0f) w = attn_weight(qrow, static_cast<const T*>(vrange.k_rows) + key * kv_stride, d, scale, softcap, m);
#pragma unroll
            for (int a = 0; a < 4 * NB; ++a)
                if (a == i) acc[a >> 2][a & 3] += w * x;
        }
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no visible key: zeros
    T* orow = out + ((s.q_tok0 + qi) * heads_q + h) * (long long)dv;
#pragma unroll
    for (int i = 0; i < NB; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = 16 * i + 4 * quarter + e;
            if (c < dv) orow[c] = from_float<T>(acc[i][e] * inv);
        }
}

template <typename T>
__global__ __launch_bounds__(256) void flash_attention_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ cu_seqlens_k, int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim, int head_dim_v,
    float scale, int causal, int window, float softcap, int block_n) {
    HAL_DYNAMIC_SHARED(float4, smem);  // 16-byte aligned
    if (blockIdx.z >= (unsigned)batch || heads_kv <= 0 || heads_q % heads_kv || head_dim < 1 || head_dim > 256 || head_dim_v < 1 ||
        head_dim_v > 256 || block_n < 1)
        return;
    T* smem_t = reinterpret_cast<T*>(smem);
    const int nb = max((head_dim + 15) / 16, (head_dim_v + 15) / 16);
    if (nb <= 2) flash_attention_simt_body<T, 2>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
    else if (nb <= 4) flash_attention_simt_body<T, 4>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
    else if (nb <= 6) flash_attention_simt_body<T, 6>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
    else if (nb <= 8) flash_attention_simt_body<T, 8>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
    else if (nb <= 12) flash_attention_simt_body<T, 12>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
    else flash_attention_simt_body<T, 16>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
}

// ====================================================================== MFMA
// 4 waves of 64 (MFMA is wave64-only, so 64 is a constant here). Wave w owns query rows
// 32 (w / 2) .. +31 of the block; the two waves of a pair compute the same 32 x 32 score tile
// (the duplicated QK^T costs d/8 extra MFMAs per 32 keys; in exchange there is no cross-wave
// softmax exchange and no final merge) and split the output columns: wave w % 2 owns the
// 32-column tiles t = w % 2, w % 2 + 2, ..., two per pass of 128 columns (32 accumulators).
//
// Transposed products keep the query on the MFMA's N (column) axis, i.e. on lane % 32:
//   S^T[key][query] = K Q^T:  A = K tile (row = key, k = dim) from LDS, B = Q^T (col = query,
//                             k = dim) held in VGPRs for the whole block (d / 2 halves per lane);
//   O^T[col][query] = V^T P^T: A = V^T (row = output column, k = key) from LDS, B = P^T.
// The C/D layout of S^T (col = lane % 32, row = 8 (r / 4) + 4 (lane / 32) + r % 4) is exactly
// the B layout of P^T for k-step kk (k = 4 (lane / 32) + r' + 8 kk) with r = 4 kk + r': the
// probabilities go from the S accumulator to the PV operand in the same lane, no shuffle, no
// LDS round trip. And since a lane's scores and accumulators all belong to one query, the
// softmax row max / sum need one xor-32 shuffle, and the rescale is a per-lane multiply.
//
// LDS layout (fits the glue's bytes: K is smaller than [block_n][pad(d)], V^T exceeds
// [block_n][pad(dv)] by at most 8 d_v bytes, and the 64 x block_n fp32 score tile is not used):
//   AttnVRange, 32 bytes      the keys with an inf / NaN of V (see above)
//   K   [block_n][d + 4]      A reads are 8 bytes (4 dims) per lane; a row stride of d + 4
//                             halves = 2 banks mod 32 puts the 16 lanes of a quarter-wave on 16
//                             distinct bank pairs (d + 8 would give 2-way conflicts);
//   V^T [d_v][block_n + 4]    transposed while staging, so each A read is 8 bytes (4 keys)
//                             instead of 4 strided 2-byte reads.
#define MFMA_KEYS 32  // keys per score tile (the MFMA M dimension)

__device__ __forceinline__ void attn_mfma(float d[16], const uint2& a, const uint2& b, const float c[16], __half) {
    mfma_f32_32x32x8_f16(d, reinterpret_cast<const __half*>(&a), reinterpret_cast<const __half*>(&b), c);
}
__device__ __forceinline__ void attn_mfma(float d[16], const uint2& a, const uint2& b, const float c[16], hip_bfloat16) {
    mfma_f32_32x32x8_bf16(d, reinterpret_cast<const hip_bfloat16*>(&a), reinterpret_cast<const hip_bfloat16*>(&b), c);
}

template <typename T>
__device__ __forceinline__ uint2 pack4(float a, float b, float c, float d) {
    const T t[4] = {from_float<T>(a), from_float<T>(b), from_float<T>(c), from_float<T>(d)};
    uint2 r;
    __builtin_memcpy(&r, t, sizeof(r));
    return r;
}

// One body for every d (NB = 16: Q^T fragments for d = 256 in 64 VGPRs): separate template
// buckets inlined into one kernel pushed it past the SGPR file. QK^T runs in groups of 4 k-steps
// (32 dims) behind block-uniform branches on d; d is re-read per chunk through an empty asm so
// that the 8 guards are not hoisted out of the key loops as live SGPR masks (which spilled).
// Output columns go in passes of 128 (2 tiles of 32 per wave): d_v > 128 recomputes S once.
template <typename T> struct SplitP { static constexpr bool value = false; };
template <> struct SplitP<hip_bfloat16> { static constexpr bool value = true; };
template <> struct SplitP<__half> { static constexpr bool value = true; };

template <typename T, int NB>
__device__ __forceinline__ void flash_attention_mfma_body(T* smem_t, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ cu_seqlens_k, int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim, int head_dim_v,
    float scale, int causal, int window, float softcap, int block_n) {
    (void)batch;
    const int b = blockIdx.z, h = blockIdx.y;
    const int d = head_dim, dv = head_dim_v, kn = block_n & ~7;
    constexpr bool kSplitP = SplitP<T>::value;
    const AttnSeq s = attn_seq(cu_seqlens_q, cu_seqlens_k, b, seqlen_q, seqlen_k);
    const int q0 = blockIdx.x * ATTN_BLOCK_M;
    if (q0 >= s.sq) return;
    const int hkv = h / (heads_q / heads_kv);
    const int tid = threadIdx.x, lane = tid & 63, wave = tid >> 6, half = wave & 1;
    const int col = lane & 31, khalf = lane >> 5;  // MFMA: N index, and which 4 of the 8 k

    // This lane's query row and key intervals: of the row, of the wave's 32 rows, of the block.
    const int g0 = q0 + 32 * (wave >> 1), qi = g0 + col;
    const bool row_ok = qi < s.sq;
    int lo, hi, wlo, whi, blo, bhi;
    attn_rows_keys(qi, row_ok ? qi : qi - 1, s, causal, window, lo, hi);
    attn_rows_keys(g0, min(g0 + 32, s.sq) - 1, s, causal, window, wlo, whi);
    attn_rows_keys(q0, min(q0 + ATTN_BLOCK_M, s.sq) - 1, s, causal, window, blo, bhi);

    // Q^T fragments for all of d: k-step st covers dims 8 st .. 8 st + 7, this lane 4 of them.
    const int nst = d / 8;
    uint2 qf[2 * NB];
    const T* qrow = q + ((s.q_tok0 + (row_ok ? qi : 0)) * heads_q + h) * (long long)d + 4 * khalf;
#pragma unroll
    for (int st = 0; st < 2 * NB; ++st) {
        qf[st] = make_uint2(0u, 0u);
        if (st < nst && row_ok) {
            T t[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) t[e] = qrow[8 * st + e];
            __builtin_memcpy(&qf[st], t, sizeof(uint2));
        }
    }

    const int ntiles = (dv + 31) / 32;  // 32-column output tiles, split between the pair
    const int ldk = d + 4, ldt = kn + 4;
    AttnVRange& vrange = *reinterpret_cast<AttnVRange*>(smem_t);
    T* Ks = smem_t + 32 / sizeof(T);  // past vrange
    T* Vt = Ks + kn * ldk;
    const T zero = from_float<T>(0.0f);
    const long long kv_stride = (long long)heads_kv * d, v_stride = (long long)heads_kv * dv;
    const T* kbase = k + s.k_tok0 * kv_stride + (long long)hkv * d;
    const T* vbase = v + s.k_tok0 * v_stride + (long long)hkv * dv;
    // 16-byte global loads when the rows are 16-byte aligned (d, dv multiples of 16 halves: only
    // the base pointers can break it).
    const bool vec = ((reinterpret_cast<unsigned long long>(k) | reinterpret_cast<unsigned long long>(v)) & 15) == 0;

    // The 4 padding columns of K and V^T are never staged but are read by the k-steps past d
    // (times q = 0): make them finite once.
    for (int i = tid; i < 4 * dv; i += blockDim.x) Vt[(i >> 2) * ldt + kn + (i & 3)] = zero;
    for (int i = tid; i < 4 * kn; i += blockDim.x) Ks[(i >> 2) * ldk + d + (i & 3)] = zero;  // K's padding columns too
    vrange.clear(kbase);
    __syncthreads();
    // Output columns in passes of 4 tiles (128 columns, 2 per wave): d_v > 128 walks the keys
    // twice (recomputing S) instead of holding 64 accumulators per lane next to Q^T.
#pragma nounroll
    for (int pt = 0; pt < ntiles; pt += 4) {
        float o[2][16];
#pragma unroll
        for (int ti = 0; ti < 2; ++ti)
#pragma unroll
            for (int r = 0; r < 16; ++r) o[ti][r] = 0.0f;
        float m = -INFINITY, l = 0.0f;  // l: this lane's part of the row sum (keys 4 khalf + ...)
        const int vc0 = 4 * pt, vc1 = min(dv / 8, 4 * (pt + 4));  // this pass's V columns, in 8s
        for (int kt = blo; kt <= bhi; kt += kn) {
            // Stage K as is and V transposed; 8 halves (16 bytes) per thread and step, the 256
            // threads covering whole rows: coalesced global reads.
            const int kc = d / 8, vc = vc1 - vc0;
            for (int idx = tid; idx < kn * kc; idx += blockDim.x) {
                const int j = idx / kc, c = 8 * (idx % kc), key = kt + j;
                uint4 w = make_uint4(0u, 0u, 0u, 0u);
                if (key <= bhi) {
                    const T* src = kbase + key * kv_stride + c;
                    if (vec) {
                        w = *reinterpret_cast<const uint4*>(src);
                    } else {
                        T t[8];
                        for (int e = 0; e < 8; ++e) t[e] = src[e];
                        __builtin_memcpy(&w, t, sizeof(w));
                    }
                }
                uint2* dst = reinterpret_cast<uint2*>(Ks + j * ldk + c);  // rows are 8-byte aligned
                dst[0] = make_uint2(w.x, w.y);
                dst[1] = make_uint2(w.z, w.w);
            }
            for (int idx = tid; idx < kn * vc; idx += blockDim.x) {
                const int j = idx / vc, c = 8 * (vc0 + idx % vc), key = kt + j;
                T t[8];
                if (key <= bhi) {
                    const T* src = vbase + key * v_stride + c;
                    if (vec) {
                        const uint4 w = *reinterpret_cast<const uint4*>(src);
                        __builtin_memcpy(t, &w, sizeof(w));
                    } else {
                        for (int e = 0; e < 8; ++e) t[e] = src[e];
                    }
                } else {
                    for (int e = 0; e < 8; ++e) t[e] = zero;
                }
                bool bad = false;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    bad |= nonfinite(t[e]);
                    Vt[(c + e) * ldt + j] = nonfinite(t[e]) ? zero : t[e];
                }
                if (bad) vrange.add(pt > 0, key, key);
            }
            __syncthreads();

            for (int c0 = 0; c0 < kn; c0 += MFMA_KEYS) {
                const int key0 = kt + c0;
                if (key0 > bhi) break;                                  // block-uniform
                if (key0 > whi || key0 + MFMA_KEYS - 1 < wlo) continue;  // wave-uniform (both waves of the pair alike)
                const int valid = min(MFMA_KEYS, kn - c0);              // keys of this tile in the chunk (16 when block_n = 16)

                // S^T = K Q^T over d in k-steps of 8.
                float sacc[16];
#pragma unroll
                for (int r = 0; r < 16; ++r) sacc[r] = 0.0f;
                const bool krow_ok = col < valid;
                const T* kr = Ks + (c0 + col) * ldk + 4 * khalf;
                int dg = d;  // re-read per chunk: keeps the group guards from being hoisted out of the loops
#ifndef HAL_SIM
                asm volatile("" : "+s"(dg));
#endif
#pragma unroll
                for (int g = 0; g < NB / 2; ++g) {
                    // Groups of 4 k-steps (32 dims) past d are skipped (block-uniform branch: one
                    // kernel body serves every d); steps past d inside the last group read on
                    // into the next row / V^T (finite) against a zero q fragment.
                    if (32 * g < dg) {
#pragma unroll
                        for (int st = 4 * g; st < 4 * g + 4; ++st) {
                            const uint2 a = krow_ok ? *reinterpret_cast<const uint2*>(kr + 8 * st) : make_uint2(0u, 0u);
                            attn_mfma(sacc, a, qf[st], sacc, T());
                        }
                    }
                }

                // Scores of this lane's query, keys key0 + 8 (r / 4) + 4 khalf + r % 4.
                float cm = -INFINITY;
#pragma unroll
                for (int r = 0; r < 16; ++r) {
                    const int off = 8 * (r >> 2) + 4 * khalf + (r & 3), key = key0 + off;
                    sacc[r] = off < valid && key >= lo && key <= hi ? attn_logit(sacc[r], scale, softcap) : -INFINITY;
                    cm = fmaxf(cm, sacc[r]);
                }
                cm = fmaxf(cm, __shfl_xor(cm, 32));  // the other 16 keys of this query are in lane ^ 32
                const float m_new = fmaxf(m, cm), base = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha = __expf(m - base);
                m = m_new;
                l *= alpha;
                // The MFMA consumes P in T. Rounding p once leaves an error of the size of the naive
                // in-dtype reference's (judge ratios up to 0.9 for f16, 1.18 for bf16 with the row
                // sum of the rounded values): p = hi + lo, both in T, through two PV MFMAs keeps P to
                // ~16 (bf16) / ~22 (f16) bits for ~1.5x the MFMA work of QK^T + PV. (SplitP false
                // gives the one-MFMA path: round p and sum the rounded values.)
                uint2 pb[4], pl[4];
#pragma unroll
                for (int r = 0; r < 16; ++r) {
                    const float p = __expf(sacc[r] - base);
                    sacc[r] = kSplitP ? p : to_float(from_float<T>(p));
                    l += sacc[r];
                }
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    float hi[4], lo[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        hi[e] = to_float(from_float<T>(sacc[4 * kk + e]));
                        lo[e] = sacc[4 * kk + e] - hi[e];
                    }
                    pb[kk] = pack4<T>(hi[0], hi[1], hi[2], hi[3]);
                    pl[kk] = kSplitP ? pack4<T>(lo[0], lo[1], lo[2], lo[3]) : make_uint2(0u, 0u);
                }

                // O^T += V^T P^T for this wave's column tiles.
#pragma unroll
                for (int ti = 0; ti < 2; ++ti) {
                    const int t = pt + 2 * ti + half;
                    if (t < ntiles) {  // wave-uniform
#pragma unroll
                        for (int r = 0; r < 16; ++r) o[ti][r] *= alpha;
                        const int vcol = 32 * t + col;
                        const T* vr = Vt + vcol * ldt + c0 + 4 * khalf;
#pragma unroll
                        for (int kk = 0; kk < 4; ++kk) {
                            if (8 * kk < valid) {  // uniform
                                const uint2 a = vcol < dv ? *reinterpret_cast<const uint2*>(vr + 8 * kk) : make_uint2(0u, 0u);
                                attn_mfma(o[ti], a, pb[kk], o[ti], T());
                                if (kSplitP) attn_mfma(o[ti], a, pl[kk], o[ti], T());
                            }
                        }
                    }
                }
            }
            __syncthreads();
        }

        // The inf / NaN of V in this pass's columns (zeros in the tiles), for the keys this lane's row sees.
        for (int key = max(lo, -vrange.neg_lo[pt > 0]); row_ok && key <= min(hi, vrange.hi[pt > 0]); ++key) {
            const T* v_row = vbase + key * v_stride + 4 * khalf;
            float w = -1.0f;  // the key's weight, once this lane meets an inf / NaN of it
#pragma nounroll
            for (int i = 0; i < 32; ++i) {  // o[i / 16][i % 16]: column 32 (pt + 2 (i / 16) + half) + 8 (i % 16 / 4) + 4 khalf + i % 4
                const int c = 32 * (pt + 2 * (i >> 4) + half) + 8 * ((i >> 2) & 3) + (i & 3);
                const float x = c + 4 * khalf < dv ? to_float(v_row[c]) : 0.0f;
                if (!nonfinite(x)) continue;
                if (w < 0.0f) w = attn_weight(qrow - 4 * khalf, static_cast<const T*>(vrange.k_rows) + key * kv_stride, d, scale, softcap, m);
#pragma unroll
                for (int a = 0; a < 32; ++a)
                    if (a == i) o[a >> 4][a & 15] += w * x;
            }
        }

        l += __shfl_xor(l, 32);
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        // O^T D layout: lane holds columns 32 t + 8 (r / 4) + 4 khalf + r % 4 of its query: 4
        // consecutive columns per r / 4, stored as one 8-byte write.
        T* orow = out + ((s.q_tok0 + qi) * heads_q + h) * (long long)dv;
#pragma unroll
        for (int ti = 0; ti < 2; ++ti) {
            const int t = pt + 2 * ti + half;
            if (!row_ok || t >= ntiles) continue;
#pragma unroll
            for (int rb = 0; rb < 4; ++rb) {
                const int c = 32 * t + 8 * rb + 4 * khalf;
                if (c < dv) {
                    const uint2 w = pack4<T>(o[ti][4 * rb] * inv, o[ti][4 * rb + 1] * inv, o[ti][4 * rb + 2] * inv, o[ti][4 * rb + 3] * inv);
                    if ((reinterpret_cast<unsigned long long>(out) & 7) == 0) {
                        *reinterpret_cast<uint2*>(orow + c) = w;
                    } else {
                        T t4[4];
                        __builtin_memcpy(t4, &w, sizeof(w));
                        for (int e = 0; e < 4; ++e) orow[c + e] = t4[e];
                    }
                }
            }
        }
    }
}

template <typename T>
__global__ __launch_bounds__(256) void flash_attention_mfma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out, const int* __restrict__ cu_seqlens_q,
    const int* __restrict__ cu_seqlens_k, int batch, int seqlen_q, int seqlen_k, int heads_q, int heads_kv, int head_dim, int head_dim_v,
    float scale, int causal, int window, float softcap, int block_n) {
    HAL_DYNAMIC_SHARED(float4, smem);
    const int d = head_dim, dv = head_dim_v;
    if (blockIdx.z >= (unsigned)batch || heads_kv <= 0 || heads_q % heads_kv || d < 16 || d > 256 || d % 16 || dv < 16 || dv > 256 ||
        dv % 16 || (block_n & ~7) < 8)
        return;
    T* smem_t = reinterpret_cast<T*>(smem);
    flash_attention_mfma_body<T, 16>(smem_t, q, k, v, out, cu_seqlens_q, cu_seqlens_k, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
}
