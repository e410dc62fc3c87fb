// Vendor file: flash_attention_mma runs QK^T and PV on mma.sync.m16n8k16 fragments (4 warps of
// 32), whose lane layouts decide how scores are reduced (quad shuffles) and how P is re-packed.
// Flash attention (prefill): out = softmax(mask(softcap(scale * q k^T))) v, tiled with the online
// softmax recurrence (running max, running sum, rescaled fp32 accumulator), never materializing
// the seq_q x seq_k score matrix. Semantics in ops/attention.py; ABI in docs/gpu-kernels.md.
//
// Launch (both variants): grid (ceil(seqlen_q / 64), heads_q, batch), block 128 = 4 warps, dynamic
// shared memory block_n * (pad(d) + pad(dv)) * sizeof(T) + 64 * block_n * 4 with
// pad(x) = round_up(x, 8) + 8: a K tile [block_n][pad(d)], a V tile [block_n][pad(dv)] of T, then an
// fp32 [64][block_n] tile (the SIMT variant keeps P there; the mma variant keeps P in registers).
//
// Why 64 query rows and 4 warps: with mma.sync m16n8k16 a warp owns 16 query rows, so 4 warps
// make a 64-row tile: every K/V tile staged in shared memory is reused by 64 queries (the
// arithmetic intensity of a tile is ~64 FMA per loaded element), while the per-warp state
// (Q fragments, S accumulators, O accumulators) fits the 255-register budget of a 128-thread
// block without spilling, and a CTA stays small enough for 2-4 CTAs per SM at 48 KiB of shared.
//
// Masks (per sequence, query i sits at key position pos = i + seq_k - seq_q: bottom-right causal):
// causal keeps j <= pos; window W keeps pos - j < W (and j - pos < W without causal); a key
// masked for a row gets logit -inf; a row with no visible key outputs zeros. Blocks whose whole
// key range is masked write zeros and leave; the key loop runs only over [n_lo, n_hi), the
// union of the keys the tile's rows can see (causal and window bounds).
#include "hal_gpu.h"

#define ATTN_THREADS 128
#define ATTN_ROWS 64     // query rows per block
#define ATTN_MAX_BN 64   // keys per K/V tile the register arrays are sized for

__device__ __forceinline__ int attn_pad(int x) { return (x + 7) / 8 * 8 + 8; }

// The per-block view of one (query tile, head, sequence).
struct AttnTile {
    long long q_row0, k_row0;  // first row of the sequence in q / out and in k / v
    int sq, sk;                // sequence lengths
    int q0, rows;              // first query of the tile and how many rows are valid (<= 64)
    long long shift;           // key position of query i is i + shift
    int n_lo, n_hi;            // keys any row of the tile can see: [n_lo, n_hi)
};

// Returns false when the block has nothing to do (past its sequence's end).
__device__ __forceinline__ bool attn_tile(AttnTile& a, const int* cu_q, const int* cu_k, int seqlen_q, int seqlen_k, int causal, int window) {
    const int b = blockIdx.z;
    if (cu_q) {
        a.q_row0 = cu_q[b];
        a.sq = cu_q[b + 1] - cu_q[b];
        a.k_row0 = cu_k[b];
        a.sk = cu_k[b + 1] - cu_k[b];
    } else {
        a.sq = seqlen_q;
        a.sk = seqlen_k;
        a.q_row0 = (long long)b * seqlen_q;
        a.k_row0 = (long long)b * seqlen_k;
    }
    a.q0 = blockIdx.x * ATTN_ROWS;
    if (a.q0 >= a.sq) return false;
    a.rows = min(ATTN_ROWS, a.sq - a.q0);
    a.shift = (long long)a.sk - a.sq;
    const long long pos_lo = a.q0 + a.shift, pos_hi = a.q0 + a.rows - 1 + a.shift;
    long long lo = 0, hi = a.sk;
    if (causal) hi = min(hi, pos_hi + 1);
    if (window > 0) {
        lo = max(lo, pos_lo - window + 1);
        if (!causal) hi = min(hi, pos_hi + window);
    }
    a.n_lo = (int)lo;
    a.n_hi = (int)max(hi, lo);  // empty when every row of the tile is fully masked
    return true;
}

__device__ __forceinline__ bool attn_visible(long long pos, int key, int causal, int window) {
    if (causal && key > pos) return false;
    if (window > 0) {
        if (pos - key >= window) return false;
        if (!causal && key - pos >= window) return false;
    }
    return true;
}

__device__ __forceinline__ float attn_logit(float dot, float scale, float softcap) {
    const float s = dot * scale;
    return softcap > 0.0f ? softcap * tanhf(s / softcap) : s;
}

// ---- NaN and +-inf in V (docs/errors.md). P V weighs every key of a tile, p = 0 for a key that a row
// may not see (causal, window, another sequence), and 0 * inf is NaN; the mma variant also rounds p
// to T (hi + lo: lo is 0 where p is exact in T, as p = 1 at the row max; a small p underflows in
// f16). So V tiles are staged with inf / NaN replaced by 0, and a thread that meets one widens the
// pass's key range [lo, hi] (AttnVRange, in K row 0's padding, which nothing reads). After its key
// loop, each lane goes through the keys of that range its rows see, reads its columns of V again
// from global memory and adds the inf / NaN it finds, times attn_weight, to the unnormalized
// output. With finite V the range stays empty: the cost is a test per staged word.
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
#pragma unroll 1  // a cold path: no unrolled copies beside the kernel's
    for (int c = 0; c < d; ++c) dot += to_float(q_row[c]) * to_float(k_row[c]);
    return attn_logit(dot, scale, softcap) - m > -745.0f ? 1.0f : 0.0f;
}

// The keys whose V holds an inf / NaN in the columns of pass 0 and of pass 1 (head_dim_v > 128), as
// max(key) and max(-key): atomicMax widens them. Cleared before the first tile's barrier.
struct AttnVRange {
    int hi[2], neg_lo[2];
    __device__ __forceinline__ void clear() {
        if (threadIdx.x == 0) hi[0] = hi[1] = neg_lo[0] = neg_lo[1] = -0x7fffffff;
    }
    __device__ __forceinline__ void add(int pass, int key_lo, int key_hi) {
        atomicMax(&hi[pass], key_hi);
        atomicMax(&neg_lo[pass], -key_lo);
    }
};

// The exponent field of T (all ones: inf or NaN) in each element of a 32-bit word.
__device__ __forceinline__ unsigned exponent_bits(float) { return 0x7f800000u; }
__device__ __forceinline__ unsigned exponent_bits(__half) { return 0x7c007c00u; }
__device__ __forceinline__ unsigned exponent_bits(bf16) { return 0x7f807f80u; }

// A word of T elements with the non-finite ones set to 0.
template <typename T>
__device__ __forceinline__ unsigned finite_word(unsigned w) {
    const unsigned e = exponent_bits(T()), x = w & e;
    if (sizeof(T) == 4) return x == e ? 0u : w;
    return w & ((x & 0xffffu) == (e & 0xffffu) ? 0xffff0000u : ~0u) & ((x >> 16) == (e >> 16) ? 0xffffu : ~0u);
}

// Copy 8 elements of T (raw bits) from global to shared, zero-filling past `valid`. `vec`: the
// source chunk is 16-byte aligned (the shared destination always is: row strides are multiples
// of 8 elements and tiles start on 16-byte boundaries). `finite`: store inf / NaN as 0 and return
// whether there was one.
template <typename T>
__device__ __forceinline__ bool copy8(T* dst, const T* src, int valid, bool vec, bool finite) {
    bool zeroed = false;
    if (vec && valid >= 8) {
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
#pragma unroll
        for (int i = 0; i < (int)sizeof(T) / 2; ++i) {
            uint4 w = s[i];
            if (finite) {
                const uint4 f = make_uint4(finite_word<T>(w.x), finite_word<T>(w.y), finite_word<T>(w.z), finite_word<T>(w.w));
                zeroed |= ((f.x ^ w.x) | (f.y ^ w.y) | (f.z ^ w.z) | (f.w ^ w.w)) != 0u;
                w = f;
            }
            d[i] = w;
        }
    } else {
        for (int e = 0; e < 8; ++e) {
            const T x = e < valid ? src[e] : from_float<T>(0.0f);
            const bool bad = finite && nonfinite(x);
            zeroed |= bad;
            dst[e] = bad ? from_float<T>(0.0f) : x;
        }
    }
    return zeroed;
}

// Stage rows [0, fill) x chunks [c_lo, c_hi) (8 elements each) of a K or V tile; rows at or past
// `valid_rows` become zeros (so that a zero probability never meets an uninitialized NaN). A V tile
// passes the block's AttnVRange, the pass and its first key (see above).
template <typename T>
__device__ __forceinline__ void stage_tile(T* tile, int stride, const T* src, long long row0, int row_step, int width, int valid_rows, int fill,
                                           int c_lo, int c_hi, bool vec, AttnVRange* vrange = nullptr, int pass = 0, int key0 = 0) {
    const int nch = c_hi - c_lo;
    for (int i = threadIdx.x; i < fill * nch; i += ATTN_THREADS) {
        const int r = i / nch, c = c_lo + i % nch;
        const int valid = r < valid_rows ? min(8, width - 8 * c) : 0;
        if (copy8(tile + r * stride + 8 * c, src + (row0 + r) * row_step + 8 * c, valid, vec, vrange != nullptr)) vrange->add(pass, key0 + r, key0 + r);
    }
}

template <typename T>
__device__ __forceinline__ void write_zero_rows(T* out, const AttnTile& a, int heads_q, int h, int dv) {
    for (int i = threadIdx.x; i < a.rows * dv; i += ATTN_THREADS) {
        const int r = i / dv, c = i % dv;
        out[((a.q_row0 + a.q0 + r) * heads_q + h) * dv + c] = from_float<T>(0.0f);
    }
}

// ================================================================ SIMT (every type, any head dim <= 256)
//
// Thread mapping: warp w owns query rows 16w..16w+15; lane l serves row 16w + (l & 15) together
// with its partner lane l ^ 16 (so the two halves of a row exchange max and sum by one shuffle,
// no shared memory round trip).
//   S = q k^T: half (l >> 4) computes the scores of keys [half * bn/2, (half + 1) * bn/2) of the tile
//     (<= 32 in registers) over d in chunks of 8: its q chunk comes from global (L1-resident, the
//     64 x d block of q is re-read per K tile), the K chunk is a 16-byte shared load that all 16
//     lanes of a half-warp read at one address (a broadcast: no bank conflict whatever the stride).
//   P goes to the fp32 tile as [key][64 rows]; the half that wrote key n stores row r at column
//     (r + 16 * half) % 64 so that the two halves of a warp hit different banks.
//   O += P v: half (l >> 4) owns cw <= 64 output columns of its row (64 fp32 accumulators at most);
//     per key: one P load (a broadcast), cw / 8 16-byte V loads (broadcasts), cw FMAs.
//   head_dim_v > 128 runs the key loop twice (columns [0, 128), then the rest), recomputing S:
//     cheaper than 128 accumulators per thread, which would spill.
template <typename T>
__global__ void __launch_bounds__(ATTN_THREADS)
flash_attention_simt(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                     const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k, int batch, int seqlen_q, int seqlen_k,
                     int heads_q, int heads_kv, int head_dim, int head_dim_v, float scale, int causal, int window, float softcap, int block_n) {
    HAL_DYNAMIC_SHARED(uint4, attn_smem);
    AttnTile a;
    if ((int)blockIdx.z >= batch || !attn_tile(a, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, causal, window)) return;
    const int h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int d = head_dim, dv = head_dim_v;
    if (a.n_hi <= a.n_lo) {  // every row of the tile sees no key
        write_zero_rows(out, a, heads_q, h, dv);
        return;
    }
    const int bn = min(block_n, ATTN_MAX_BN) & ~1;
    const int nh = bn / 2;  // keys per half-warp per tile
    const int kst = attn_pad(d), vst = attn_pad(dv);
    T* k_tile = reinterpret_cast<T*>(attn_smem);
    T* v_tile = k_tile + block_n * kst;
    float* p_tile = reinterpret_cast<float*>(v_tile + block_n * vst);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, half = lane >> 4;
    const int r = warp * 16 + (lane & 15);
    const bool row_ok = r < a.rows;
    const long long pos = a.q0 + r + a.shift;
    const T* q_row = q + ((a.q_row0 + a.q0 + min(r, a.rows - 1)) * heads_q + h) * d;
    const bool q_vec = chunks_aligned(q, d);
    const bool kv_vec = sizeof(T) == 4 ? (d % 4 == 0 && dv % 4 == 0) : (d % 8 == 0 && dv % 8 == 0);
    const bool k_vec = kv_vec && chunks_aligned(k, heads_kv * d), v_vec = kv_vec && chunks_aligned(v, heads_kv * dv);
    const T* k_head = k + (long long)hk * d;
    const T* v_head = v + (long long)hk * dv;
    const int p_col = (r + 16 * half) & (ATTN_ROWS - 1);
    AttnVRange* const vrange = reinterpret_cast<AttnVRange*>(k_tile + kst - 8);  // K row 0's padding
    vrange->clear();

    // Output columns per thread per pass: a multiple of 8, at most 64.
    const int cw = min(64, ((dv + 1) / 2 + 7) / 8 * 8);
    for (int pass_col = 0; pass_col < dv; pass_col += 2 * cw) {
        const int col0 = pass_col + half * cw;
        float acc[64];
#pragma unroll
        for (int c = 0; c < 64; ++c) acc[c] = 0.0f;
        float m = -INFINITY, l = 0.0f;
        const int vc_lo = pass_col / 8, vc_hi = min((dv + 7) / 8, (pass_col + 2 * cw) / 8);

        for (int n0 = a.n_lo; n0 < a.n_hi; n0 += bn) {
            const int tn = min(bn, a.n_hi - n0);
            __syncthreads();  // the previous tile's readers are done
            stage_tile(k_tile, kst, k_head, a.k_row0 + n0, heads_kv * d, d, tn, tn, 0, (d + 7) / 8, k_vec);
            stage_tile(v_tile, vst, v_head, a.k_row0 + n0, heads_kv * dv, dv, tn, tn, vc_lo, vc_hi, v_vec, vrange, pass_col > 0, n0);
            __syncthreads();

            // ---- scores of this thread's keys
            float s[ATTN_MAX_BN / 2];
#pragma unroll
            for (int j = 0; j < ATTN_MAX_BN / 2; ++j) s[j] = 0.0f;
            const int key0 = half * nh;
            for (int kc = 0; kc < d; kc += 8) {
                float qv[8];
                load8_float(q_row + kc, min(8, d - kc), q_vec, 0, qv);
#pragma unroll
                for (int j = 0; j < ATTN_MAX_BN / 2; ++j) {
                    if (j < nh && key0 + j < tn) {
                        float kv[8];
                        load8_float(k_tile + (key0 + j) * kst + kc, 8, true, 0, kv);
#pragma unroll
                        for (int e = 0; e < 8; ++e) s[j] += qv[e] * kv[e];
                    }
                }
            }
            float tile_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < ATTN_MAX_BN / 2; ++j) {
                const int key = key0 + j;
                const bool ok = j < nh && key < tn && row_ok && attn_visible(pos, n0 + key, causal, window);
                s[j] = ok ? attn_logit(s[j], scale, softcap) : -INFINITY;
                tile_max = fmaxf(tile_max, s[j]);
            }
            tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
            const float m_new = fmaxf(m, tile_max);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with nothing visible yet: p = 0, no NaN
            const float alpha = expf(m - m_use);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < ATTN_MAX_BN / 2; ++j) {
                const float p = expf(s[j] - m_use);
                sum += p;
                if (j < nh) p_tile[(key0 + j) * ATTN_ROWS + p_col] = p;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 16);
            l = l * alpha + sum;
            m = m_new;
#pragma unroll
            for (int c = 0; c < 64; ++c) acc[c] *= alpha;
            __syncthreads();

            // ---- O += P V over this thread's columns
            for (int n = 0; n < tn; ++n) {
                const float p = p_tile[n * ATTN_ROWS + ((r + 16 * (n >= nh)) & (ATTN_ROWS - 1))];
#pragma unroll
                for (int c8 = 0; c8 < 8; ++c8) {
                    if (8 * c8 < cw && col0 + 8 * c8 < dv) {
                        float vv[8];
                        load8_float(v_tile + n * vst + col0 + 8 * c8, 8, true, 0, vv);
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[8 * c8 + e] += p * vv[e];
                    }
                }
            }
        }

        // The inf / NaN of V in this pass's columns (zeros in the tiles), for the keys the row sees.
        for (int n = -vrange->neg_lo[pass_col > 0]; row_ok && n <= vrange->hi[pass_col > 0]; ++n) {
            if (!attn_visible(pos, n, causal, window)) continue;
            const T* v_row = v_head + (a.k_row0 + n) * (heads_kv * dv) + col0;
            float w = -1.0f;  // the key's weight, once this lane meets an inf / NaN of it
#pragma unroll 1
            for (int i = 0; i < min(cw, dv - col0); ++i) {
                const float x = to_float(v_row[i]);
                if (!nonfinite(x)) continue;
                if (w < 0.0f) w = attn_weight(q_row, k_head + (a.k_row0 + n) * (heads_kv * d), d, scale, softcap, m);
#pragma unroll
                for (int c = 0; c < 64; ++c)
                    if (c == i) acc[c] += w * x;
            }
        }
        if (row_ok) {
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            T* o = out + ((a.q_row0 + a.q0 + r) * heads_q + h) * dv;
#pragma unroll
            for (int c = 0; c < 64; ++c)
                if (c < cw && col0 + c < dv) o[col0 + c] = from_float<T>(acc[c] * inv);
        }
    }
}

// ================================================================ tensor cores (mma.sync, sm_80+)
//
// FlashAttention-2 structure: warp w owns query rows 16w..16w+15 of the tile (one m16 slab), so the
// softmax of a row never leaves the 4 lanes (t = 0..3) that hold it: row max and sum need two
// xor-shuffles, no shared memory and no block barrier.
//   Q: the warp's 16 x d slab is loaded once, straight from global into A fragments (d / 16 x 4
//     registers, <= 64) and reused against every K tile.
//   S = Q K^T: K is stored row-major [key][pad(d)], which is exactly the "col" B operand: the
//     register (k = 2t, 2t + 1 at n = g) is one 32-bit word of key row g. pad(d) = d + 8 halves
//     makes the row stride 4 (mod 8) words, so the 8 rows x 4 words of a fragment load fall into
//     32 distinct banks. Each A fragment (Q, per 16-wide k step) is reused for all bn / 8 n-tiles.
//   P: the fp32 S accumulator of n-tiles 2kk, 2kk + 1 is, element for element, the A fragment of
//     the k step kk of P V (rows g / g + 8, k = 2t, 2t + 1, 2t + 8, 2t + 9): exp, round to T and
//     pack into registers; P never touches shared memory (see ATTN_SPLIT_P for the precision).
//   O += P V: B wants pairs along the key axis of one column of V; there is no ldmatrix.trans in
//     the contract, so each register is two 16-bit loads (rows 2t, 2t + 1 at column g). With the
//     4 (mod 8) word row stride rows 2t land in banks 8t (+ odd multiple), so the warp is
//     conflict-free (lanes g = 2i, 2i + 1 share a word: a broadcast).
//   O accumulators cover 128 columns (16 n-tiles x 4 = 64 fp32 per lane); head_dim_v > 128 runs a
//     second pass over the keys (recomputing S) instead of holding 128 accumulators, which with the
//     Q fragments would exceed the register file and spill.
template <typename T>
__device__ __forceinline__ unsigned short attn_bits(T x) {
    return *reinterpret_cast<const unsigned short*>(&x);
}

template <typename T>
__device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}

// Two floats rounded to T as one register, the first in the low half.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)attn_bits(from_float<T>(lo)) | ((unsigned)attn_bits(from_float<T>(hi)) << 16);
}

// Precision of P in the P V product. FlashAttention-2 rounds P to T (8 mantissa bits for bf16):
// each weight of a row's weighted mean is then off by up to 2^-9 relative, which on short rows
// (few visible keys) is several times the error of the naive in-dtype computation that hal's
// conformance rule compares against (measured in the emulator: ratios up to 1.2 (bf16) and 1.5
// (f16, V ~ 1000)). With ATTN_SPLIT_P the residue p - T(p) goes through a second mma with the same
// V fragment: P carries ~16 (bf16) / ~22 (f16) bits, the error matches the fp32-P SIMT kernel, for
// 2x the P V mma work (1.5x the total mma work; the V fragment loads are shared).
#ifndef ATTN_SPLIT_P
#define ATTN_SPLIT_P 1
#endif

template <typename T>
__device__ __forceinline__ void split_p(float a, float b, unsigned& hi, unsigned& lo) {
    hi = pack2<T>(a, b);
    lo = ATTN_SPLIT_P ? pack2<T>(a - round_to<T>(a), b - round_to<T>(b)) : 0u;
}

// The body for head dims up to 16 * KS and keys per tile up to BN (register array sizes).
template <typename T, int KS, int BN>
__device__ __forceinline__ void flash_mma_body(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                                               const AttnTile& a, int heads_q, int heads_kv, int d, int dv, float scale, int causal, int window,
                                               float softcap, int block_n) {
    HAL_DYNAMIC_SHARED(uint4, attn_smem);
    const int h = blockIdx.y, hk = h / (heads_q / heads_kv);
    const int bn = min(block_n, BN) & ~15;  // whole m16n8k16 k steps for P V
    const int kst = attn_pad(d), vst = attn_pad(dv);
    T* k_tile = reinterpret_cast<T*>(attn_smem);
    T* v_tile = k_tile + block_n * kst;
    const unsigned* k_words = reinterpret_cast<const unsigned*>(k_tile);
    const unsigned short* v_halves = reinterpret_cast<const unsigned short*>(v_tile);
    const int kst_w = kst / 2;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wr = warp * 16;  // the warp's first row in the tile
    // The two rows of this lane: wr + g and wr + g + 8.
    const int r0 = wr + g, r1 = wr + g + 8;
    const long long pos0 = a.q0 + r0 + a.shift, pos1 = a.q0 + r1 + a.shift;
    const bool ok0 = r0 < a.rows, ok1 = r1 < a.rows;
    // The warp's visible keys: skip tiles that are fully masked for all its 16 rows.
    const long long wpos_lo = a.q0 + wr + a.shift, wpos_hi = a.q0 + min(wr + 15, a.rows - 1) + a.shift;
    const bool warp_rows = wr < a.rows;

    // Q fragments, straight from global (rows past the sequence read as zeros).
    const int ksteps = d / 16;
    unsigned qf[KS][4];
    {
        // 16-bit reads paired into words: q needs only element alignment (once per block, cheap).
        const unsigned short* q0h = reinterpret_cast<const unsigned short*>(q + ((a.q_row0 + a.q0 + min(r0, a.rows - 1)) * heads_q + h) * d);
        const unsigned short* q1h = reinterpret_cast<const unsigned short*>(q + ((a.q_row0 + a.q0 + min(r1, a.rows - 1)) * heads_q + h) * d);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const int c = ks * 16 + 2 * t;
            const bool in = ks < ksteps;
            qf[ks][0] = in && ok0 ? (unsigned)q0h[c] | ((unsigned)q0h[c + 1] << 16) : 0u;
            qf[ks][1] = in && ok1 ? (unsigned)q1h[c] | ((unsigned)q1h[c + 1] << 16) : 0u;
            qf[ks][2] = in && ok0 ? (unsigned)q0h[c + 8] | ((unsigned)q0h[c + 9] << 16) : 0u;
            qf[ks][3] = in && ok1 ? (unsigned)q1h[c + 8] | ((unsigned)q1h[c + 9] << 16) : 0u;
        }
    }
    const bool k_vec = chunks_aligned(k, heads_kv * d), v_vec = chunks_aligned(v, heads_kv * dv);
    const T* k_head = k + (long long)hk * d;
    const T* v_head = v + (long long)hk * dv;
    AttnVRange* const vrange = reinterpret_cast<AttnVRange*>(k_tile + kst - 8);  // K row 0's padding
    vrange->clear();

    for (int pass_col = 0; pass_col < dv; pass_col += 128) {
        float o[16][4];
#pragma unroll
        for (int nt = 0; nt < 16; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.0f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // l: this lane's partial row sums
        const int vc_lo = pass_col / 8, vc_hi = min(dv / 8, (pass_col + 128) / 8);

        for (int n0 = a.n_lo; n0 < a.n_hi; n0 += bn) {
            const int tn = min(bn, a.n_hi - n0);
            const int fill = (tn + 15) / 16 * 16;  // zero rows up to the last k step
            __syncthreads();
            stage_tile(k_tile, kst, k_head, a.k_row0 + n0, heads_kv * d, d, tn, fill, 0, d / 8, k_vec);
            stage_tile(v_tile, vst, v_head, a.k_row0 + n0, heads_kv * dv, dv, tn, fill, vc_lo, vc_hi, v_vec, vrange, pass_col > 0, n0);
            __syncthreads();
            // Causal / window: tiles no row of this warp can see contribute nothing.
            if (!warp_rows || (causal && n0 > wpos_hi) || (window > 0 && n0 + tn - 1 <= wpos_lo - window)) continue;

            const int ntiles = (tn + 7) / 8;
            float s[BN / 8][4];
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                if (ks < ksteps) {
#pragma unroll
                    for (int j = 0; j < BN / 8; ++j) {
                        if (j < ntiles) {
                            const unsigned* kr = k_words + (j * 8 + g) * kst_w + ks * 8 + t;
                            const unsigned bf[2] = {kr[0], kr[4]};
                            Mma<T>::run(s[j], qf[ks], bf, s[j]);
                        }
                    }
                }
            }
            // Masks, scale, softcap; row max over the tile (4 lanes per row).
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = j * 8 + 2 * t + (e & 1);
                    const bool upper = e < 2;
                    const bool ok = col < tn && (upper ? ok0 : ok1) && attn_visible(upper ? pos0 : pos1, n0 + col, causal, window);
                    s[j][e] = ok ? attn_logit(s[j][e], scale, softcap) : -INFINITY;
                }
                mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
            }
            for (int off = 1; off < 4; off <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
            const float al0 = expf(m0 - mu0), al1 = expf(m1 - mu1);
            m0 = mn0;
            m1 = mn1;
            float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                s[j][0] = expf(s[j][0] - mu0);
                s[j][1] = expf(s[j][1] - mu0);
                s[j][2] = expf(s[j][2] - mu1);
                s[j][3] = expf(s[j][3] - mu1);
                sum0 += s[j][0] + s[j][1];
                sum1 += s[j][2] + s[j][3];
            }
            l0 = l0 * al0 + sum0;
            l1 = l1 * al1 + sum1;
#pragma unroll
            for (int nt = 0; nt < 16; ++nt) {
                o[nt][0] *= al0;
                o[nt][1] *= al0;
                o[nt][2] *= al1;
                o[nt][3] *= al1;
            }
            // O += P V, P from the S registers (FA2), V fragments from shared memory.
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                if (16 * kk < tn) {
                    // P as T for the mma; with ATTN_SPLIT_P also the rounding residue p - T(p)
                    // as a second T operand: the pair carries ~2x the mantissa bits of T.
                    unsigned ph[4], pl[4];
                    split_p<T>(s[2 * kk][0], s[2 * kk][1], ph[0], pl[0]);
                    split_p<T>(s[2 * kk][2], s[2 * kk][3], ph[1], pl[1]);
                    split_p<T>(s[2 * kk + 1][0], s[2 * kk + 1][1], ph[2], pl[2]);
                    split_p<T>(s[2 * kk + 1][2], s[2 * kk + 1][3], ph[3], pl[3]);
                    const unsigned short* vr = v_halves + (16 * kk + 2 * t) * vst + pass_col + g;
#pragma unroll
                    for (int nt = 0; nt < 16; ++nt) {
                        if (pass_col + 8 * nt < dv) {
                            const unsigned short* vc = vr + 8 * nt;
                            const unsigned bf[2] = {(unsigned)vc[0] | ((unsigned)vc[vst] << 16),
                                                    (unsigned)vc[8 * vst] | ((unsigned)vc[9 * vst] << 16)};
                            Mma<T>::run(o[nt], ph, bf, o[nt]);  // the V fragment serves both halves of P
                            if (ATTN_SPLIT_P) Mma<T>::run(o[nt], pl, bf, o[nt]);
                        }
                    }
                }
            }
        }

        // The inf / NaN of V in this pass's columns (zeros in the tiles), for the keys rows r0, r1 see.
        for (int n = -vrange->neg_lo[pass_col > 0]; n <= vrange->hi[pass_col > 0]; ++n) {
            const bool vis0 = ok0 && attn_visible(pos0, n, causal, window), vis1 = ok1 && attn_visible(pos1, n, causal, window);
            if (!vis0 && !vis1) continue;
            const T* v_row = v_head + (a.k_row0 + n) * (heads_kv * dv) + pass_col + 2 * t;
            float w0 = -1.0f, w1 = 0.0f;  // the key's weights, once this lane meets an inf / NaN of it
#pragma unroll 1
            for (int i = 0; i < min(32, (dv - pass_col) / 4); ++i) {  // column pass_col + 8 (i / 2) + 2 t + i % 2
                const float x = to_float(v_row[i / 2 * 8 + i % 2]);
                if (!nonfinite(x)) continue;
                if (w0 < 0.0f) {
                    const T *k_row = k_head + (a.k_row0 + n) * (heads_kv * d), *q_row = q + ((a.q_row0 + a.q0 + r0) * heads_q + h) * d;
                    w0 = vis0 ? attn_weight(q_row, k_row, d, scale, softcap, m0) : 0.0f;
                    w1 = vis1 ? attn_weight(q_row + 8 * heads_q * d, k_row, d, scale, softcap, m1) : 0.0f;
                }
#pragma unroll
                for (int c = 0; c < 32; ++c) {
                    if (c == i && vis0) o[c / 2][c % 2] += w0 * x;
                    if (c == i && vis1) o[c / 2][2 + c % 2] += w1 * x;
                }
            }
        }

        // Full row sums (the 4 lanes of a row), normalize, store; rows that saw nothing get zeros.
        for (int off = 1; off < 4; off <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, off);
            l1 += __shfl_xor_sync(0xffffffffu, l1, off);
        }
        const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
        T* o0 = out + ((a.q_row0 + a.q0 + r0) * heads_q + h) * dv;
        T* o1 = out + ((a.q_row0 + a.q0 + r1) * heads_q + h) * dv;
#pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
            const int col = pass_col + 8 * nt + 2 * t;
            if (col < dv) {  // dv % 16 == 0: col + 1 < dv too
                if (ok0) {
                    o0[col] = from_float<T>(o[nt][0] * inv0);
                    o0[col + 1] = from_float<T>(o[nt][1] * inv0);
                }
                if (ok1) {
                    o1[col] = from_float<T>(o[nt][2] * inv1);
                    o1[col + 1] = from_float<T>(o[nt][3] * inv1);
                }
            }
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(ATTN_THREADS)
flash_attention_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                    const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k, int batch, int seqlen_q, int seqlen_k,
                    int heads_q, int heads_kv, int head_dim, int head_dim_v, float scale, int causal, int window, float softcap, int block_n) {
    AttnTile a;
    if ((int)blockIdx.z >= batch || !attn_tile(a, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, causal, window)) return;
    if (a.n_hi <= a.n_lo) {
        write_zero_rows(out, a, heads_q, blockIdx.y, head_dim_v);
        return;
    }
    // Register budget: Q fragments (4 per 16 of d) + S (4 per 8 keys) + O (64) + the split P
    // fragments (8) must stay under 255 (ptxas, sm_80: 254, no spill). d <= 128: 32 + 32 + 64 with
    // tiles of up to 64 keys; d <= 256: 64 + 8 + 64 with tiles of 16 keys (a larger block_n from
    // the glue is simply used as 16: more barriers per key, the same shared-memory traffic).
    if (head_dim <= 128)
        flash_mma_body<T, 8, 64>(q, k, v, out, a, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
    else
        flash_mma_body<T, 16, 16>(q, k, v, out, a, heads_q, heads_kv, head_dim, head_dim_v, scale, causal, window, softcap, block_n);
}
