"""Launch glue of the first op families: norms, softmax, activations, rope, gemm, attention, decode.

One function per kernel (every variant of it), called as `glue(ex, entry, outs, **arguments)`
(glue.py says how); `KERNELS` declares what a GPU backend registers for these ops. The MoE,
quantization, quantized-GEMM and sparse families declare theirs in launch_<family>.py;
catalog.py gathers them.
"""
import math

import numpy as np

from hal.codes import ACTIVATIONS, FORMAT_CODES, KV_FORMATS, activation_code
from hal.dtypes import FLOATS
from hal.ops.activations import GATED_OPS

from .glue import FIRST, HALF_FLOATS, INDEX_DTYPES, TENSOR_OP_BLOCK, KernelEntry, Template, cdiv, ctype, f32, i32, widened

ROPE_BLOCK = 128  # one block per token; a token's heads x rotary pairs rarely exceed 128 x 32
GEMM_TILE = 64  # every gemm variant covers a 64 x 64 output tile per block


def rms_norm(ex, entry, outs, x, weight, residual, eps):
    hidden = x.shape[-1]
    rows = x.size // hidden
    if rows:
        entry.launch(ex, (ctype(ex, x),), (rows,),
                     (x, residual, widened(ex, weight), outs[0], outs[1] if residual is not None else None, i32(rows), i32(hidden), f32(eps)))


def layer_norm(ex, entry, outs, x, weight, bias, residual, eps):
    hidden = x.shape[-1]
    rows = x.size // hidden
    if rows:
        entry.launch(ex, (ctype(ex, x),), (rows,),
                     (x, residual, widened(ex, weight), widened(ex, bias), outs[0], outs[1] if residual is not None else None,
                      i32(rows), i32(hidden), f32(eps)))


def softmax(ex, entry, outs, x, dim):
    outer, n, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    if outer * n * inner:
        entry.launch(ex, (ctype(ex, x),), (outer * inner,), (x, outs[0], i32(outer), i32(n), i32(inner)))


def gated_and_mul(ex, entry, outs, x):
    d = x.shape[-1] // 2
    if x.size:
        rows = x.size // (2 * d)
        entry.launch(ex, (ctype(ex, x),), (rows,), (x, outs[0], i32(rows), i32(d), i32(activation_code(entry.op)[0])))


def rope(ex, entry, outs, q, k, cos, sin, positions, interleaved, rotary_dim):
    tokens, heads_q, head_dim = q.shape
    if tokens:
        entry.launch(ex, (ctype(ex, q), ctype(ex, positions)), (tokens,),
                     (q, k, widened(ex, cos), widened(ex, sin), positions, outs[0], outs[1], i32(tokens), i32(heads_q), i32(k.shape[1]),
                      i32(head_dim), i32(rotary_dim), i32(bool(interleaved))))


def gemm(ex, entry, outs, a, b, bias, c, activation, alpha, beta, out_dtype):
    (m, k), n = a.shape, b.shape[1]
    out = outs[0]
    if m and n:
        if c is not None:
            c = ex.as_type(c, ex.dtype_name(out))  # the kernel reads c in the output type
        entry.launch(ex, (ctype(ex, a), ctype(ex, out)), (cdiv(n, GEMM_TILE), cdiv(m, GEMM_TILE)),
                     (a, b, widened(ex, bias), c, out, i32(m), i32(n), i32(k), f32(alpha), f32(beta), i32(ACTIVATIONS[activation])))


ATTENTION_ROWS = 64  # query rows per block: 4 warps x 16 rows (mma m16) / 2 x 32-row MFMA tiles
SHARED_BUDGET = 48 * 1024  # CUDA's default dynamic shared-memory limit, below the 64 KiB LDS
DECODE_PARTITION = 512  # tokens per split-K partition of a decode sequence


def _padded(d):
    return -(-d // 8) * 8 + 8  # 16-byte rows plus one more, so rows start in different banks


def flash_tile(d, dv, itemsize):
    """(block_n, shared bytes): the most keys per K/V tile whose tiles and fp32 scores fit the budget."""
    for block_n in (64, 32, 16):
        shared = block_n * (_padded(d) + _padded(dv)) * itemsize + ATTENTION_ROWS * block_n * 4
        if shared <= SHARED_BUDGET:
            return block_n, shared
    raise AssertionError(f"head dims {d}/{dv} exceed the attention kernels' limit of 256")


def attention(ex, entry, outs, q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k):
    d, dv = q.shape[-1], v.shape[-1]
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if cu_seqlens_q is None:
        batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    else:
        lens_q, lens_k = (np.diff(ex.to_host(cu)) for cu in (cu_seqlens_q, cu_seqlens_k))
        batch, seq_q, seq_k = len(lens_q), int(lens_q.max(initial=0)), int(lens_k.max(initial=0))
    if not (batch and seq_q and heads_q):
        return
    if seq_k == 0 or outs[0].size == 0:
        ex.fill_zero(outs[0])
        return
    block_n, shared = flash_tile(d, dv, 4 if ex.dtype_name(q) == "float32" else 2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    entry.launch(ex, (ctype(ex, q),), (cdiv(seq_q, ATTENTION_ROWS), heads_q, batch),
                 (q, k, v, outs[0], cu_seqlens_q, cu_seqlens_k, i32(batch), i32(seq_q), i32(seq_k), i32(heads_q), i32(heads_kv),
                  i32(d), i32(dv), f32(scale), i32(bool(causal)), i32(window or 0), f32(softcap or 0.0), i32(block_n)), shared)


def _split_k(ex, seq_lens, batch, heads, dv):
    """fp32 partial buffers for split-K decode and the number of partitions of the longest sequence."""
    partitions = max(1, math.ceil(int(ex.to_host(seq_lens).max(initial=1)) / DECODE_PARTITION))
    return partitions, (ex.empty((batch, heads, partitions, dv), "float32"), ex.empty((batch, heads, partitions), "float32"),
                        ex.empty((batch, heads, partitions), "float32"))


def _merge(ex, entry, out, partials, partitions, seq_lens):
    batch, heads, dv = out.shape
    entry.launch(ex, (ctype(ex, out),), (heads, batch),
                 (*partials, out, i32(batch), i32(heads), i32(dv), i32(partitions), seq_lens, i32(DECODE_PARTITION)), template="decode_merge")


def paged_decode_attention(ex, entry, outs, q, k_cache, v_cache, block_table, seq_lens, scale, softcap, k_scale, v_scale):
    batch, heads_q, d = q.shape
    if not batch:
        return
    num_blocks, block_size, heads_kv, dv = v_cache.shape
    kv = ex.dtype_name(k_cache)
    fp8 = kv in KV_FORMATS
    partitions, partials = _split_k(ex, seq_lens, batch, heads_q, dv)
    entry.launch(ex, (ctype(ex, q), "unsigned char" if fp8 else ctype(ex, q)), (partitions, heads_q, batch),
                 (q, ex.as_bytes(k_cache) if fp8 else k_cache, ex.as_bytes(v_cache) if fp8 else v_cache, block_table, seq_lens,
                  *partials, i32(batch), i32(heads_q), i32(heads_kv), i32(d), i32(dv), i32(block_size), i32(block_table.shape[1]),
                  i32(DECODE_PARTITION), i32(partitions), f32(1.0 / math.sqrt(d) if scale is None else scale), f32(softcap or 0.0),
                  f32(1.0 if k_scale is None else k_scale), f32(1.0 if v_scale is None else v_scale), i32(FORMAT_CODES[kv] if fp8 else 0)))
    _merge(ex, entry, outs[0], partials, partitions, seq_lens)


def mla_decode(ex, entry, outs, q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, scale):
    batch, heads, latent = q_nope.shape
    if not batch:
        return
    partitions, partials = _split_k(ex, seq_lens, batch, heads, latent)
    entry.launch(ex, (ctype(ex, q_nope),), (partitions, heads, batch),
                 (q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, *partials, i32(batch), i32(heads), i32(latent), i32(q_pe.shape[-1]),
                  i32(kv_latent.shape[1]), i32(block_table.shape[1]), i32(DECODE_PARTITION), i32(partitions), f32(scale)))
    _merge(ex, entry, outs[0], partials, partitions, seq_lens)


def _tensor_op_head_dims(a):
    d, dv = a["q"].shape[-1], a["v"].shape[-1]
    return d % 16 == 0 and dv % 16 == 0 and d <= 256 and dv <= 256


def _simt_head_dims(a):
    return a["q"].shape[-1] <= 256 and a["v"].shape[-1] <= 256


def _decode_head_dims(a):
    return a["q"].shape[-1] <= 512 and a["v_cache"].shape[-1] <= 512


def _mla_dims(a):
    return a["kv_latent"].shape[-1] + a["k_pe"].shape[-1] <= 768


DECODE_MERGE = Template("decode_merge", FLOATS)

# What every GPU backend registers, in preference order per op (first that supports a call wins).
KERNELS = (
    KernelEntry("gemm", "gemm", gemm, (Template("gemm_{tensor_op}", HALF_FLOATS, FLOATS),), HALF_FLOATS, TENSOR_OP_BLOCK, needs_tensor_ops=True),
    KernelEntry("gemm", "gemm", gemm, (Template("gemm_simt", FLOATS, FLOATS),)),
    KernelEntry("softmax", "softmax", softmax, (Template("softmax", FLOATS),)),
    KernelEntry("rms_norm", "norms", rms_norm, (Template("rms_norm", FLOATS),)),
    KernelEntry("layer_norm", "norms", layer_norm, (Template("layer_norm", FLOATS),)),
    *(KernelEntry(op.name, "activations", gated_and_mul, (Template("gated_and_mul", FLOATS),)) for op in GATED_OPS),
    KernelEntry("rope", "rope", rope, (Template("rope", FLOATS, INDEX_DTYPES),), block=ROPE_BLOCK),
    KernelEntry("attention", "attention", attention, (Template("flash_attention_{tensor_op}", HALF_FLOATS),), HALF_FLOATS, TENSOR_OP_BLOCK,
                needs_tensor_ops=True, supports=_tensor_op_head_dims, requires="head dims that are multiples of 16, at most 256"),
    KernelEntry("attention", "attention", attention, (Template("flash_attention_simt", FLOATS),), block=TENSOR_OP_BLOCK,
                supports=_simt_head_dims, requires="head dims of at most 256"),
    # The cache type C of paged_decode_partition<T, C> is T itself or fp8 bytes.
    KernelEntry("paged_decode_attention", "decode", paged_decode_attention,
                (Template("paged_decode_partition", FLOATS, (FIRST, "uint8")), DECODE_MERGE), block=TENSOR_OP_BLOCK,
                supports=_decode_head_dims, requires="head dims of at most 512"),
    KernelEntry("mla_decode", "decode", mla_decode, (Template("mla_decode_partition", FLOATS), DECODE_MERGE), block=TENSOR_OP_BLOCK,
                supports=_mla_dims, requires="latent + rope dims of at most 768"),
)
