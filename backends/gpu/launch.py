"""How each op launches its kernel: grid, block, shared bytes, argument packing, variant choice.

One function per kernel, called as `glue(executor, outs, **arguments)` by the dispatcher (the
backend binds the executor). The executor is either a CuPy device executor or the host
emulator; both take the same `launch(family, name_expression, grid, block, shared_bytes, args)`,
so nothing here knows which one runs. `KERNELS` lists what a GPU backend registers, and
`instantiations` the template instantiations each kernel file is built with. The MoE, quantization,
quantized-GEMM and sparse families keep the same tables in launch_<family>.py; catalog.py gathers them.
"""
import math
from dataclasses import dataclass

import numpy as np

from hal.dtypes import FLOATS

ROW_BLOCK = 256  # one block per row: 8 warps / 4 waves, enough to hide latency on a 4096-wide row
ROPE_BLOCK = 128  # one block per token; a token's heads x rotary pairs rarely exceed 128 x 32
GEMM_TILE = 64  # every gemm variant covers a 64 x 64 output tile per block
SIMT_GEMM_BLOCK = 256  # 16 x 16 threads, 4 x 4 outputs each
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
POSITION_TYPES = {"int32": "int", "int64": "long long"}
HALF_FLOATS = ("float16", "bfloat16")


def _i32(v):
    return np.int32(v)


def _f32(v):
    return np.float32(v)


def _widened(ex, t):
    """Small parameter tensors (weights, biases, rope tables) go to kernels as fp32 (exact)."""
    return None if t is None else ex.as_type(t, "float32")


def _type(ex, array):
    return ex.vendor.types[ex.dtype_name(array)]


def rms_norm(ex, outs, x, weight, residual, eps):
    hidden = x.shape[-1]
    rows = x.size // hidden
    if rows:
        ex.launch("norms", f"rms_norm<{_type(ex, x)}>", (rows, 1, 1), (ROW_BLOCK, 1, 1), 0,
                  (x, residual, _widened(ex, weight), outs[0], outs[1] if residual is not None else None, _i32(rows), _i32(hidden), _f32(eps)))


def layer_norm(ex, outs, x, weight, bias, residual, eps):
    hidden = x.shape[-1]
    rows = x.size // hidden
    if rows:
        ex.launch("norms", f"layer_norm<{_type(ex, x)}>", (rows, 1, 1), (ROW_BLOCK, 1, 1), 0,
                  (x, residual, _widened(ex, weight), _widened(ex, bias), outs[0], outs[1] if residual is not None else None,
                   _i32(rows), _i32(hidden), _f32(eps)))


def softmax(ex, outs, x, dim):
    outer, n, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    if outer * n * inner:
        ex.launch("softmax", f"softmax<{_type(ex, x)}>", (outer * inner, 1, 1), (ROW_BLOCK, 1, 1), 0,
                  (x, outs[0], _i32(outer), _i32(n), _i32(inner)))


def silu_and_mul(ex, outs, x):
    d = x.shape[-1] // 2
    if x.size:
        rows = x.size // (2 * d)
        ex.launch("activations", f"silu_and_mul<{_type(ex, x)}>", (rows, 1, 1), (ROW_BLOCK, 1, 1), 0, (x, outs[0], _i32(rows), _i32(d)))


def rope(ex, outs, q, k, cos, sin, positions, interleaved, rotary_dim):
    tokens, heads_q, head_dim = q.shape
    if tokens:
        name = f"rope<{_type(ex, q)}, {POSITION_TYPES[ex.dtype_name(positions)]}>"
        ex.launch("rope", name, (tokens, 1, 1), (ROPE_BLOCK, 1, 1), 0,
                  (q, k, _widened(ex, cos), _widened(ex, sin), positions, outs[0], outs[1], _i32(tokens), _i32(heads_q), _i32(k.shape[1]),
                   _i32(head_dim), _i32(rotary_dim), _i32(bool(interleaved))))


def _gemm(variant, block, ex, outs, a, b, bias, c, activation, alpha, beta, out_dtype):
    (m, k), n = a.shape, b.shape[1]
    out = outs[0]
    if m and n:
        if c is not None:
            c = ex.as_type(c, ex.dtype_name(out))  # the kernel reads c in the output type
        name = f"{variant}<{_type(ex, a)}, {_type(ex, out)}>"
        grid = (math.ceil(n / GEMM_TILE), math.ceil(m / GEMM_TILE), 1)
        ex.launch("gemm", name, grid, (block, 1, 1), 0,
                  (a, b, _widened(ex, bias), c, out, _i32(m), _i32(n), _i32(k), _f32(alpha), _f32(beta), _i32(ACTIVATION_CODES[activation])))


def gemm_simt(ex, outs, **args):
    _gemm("gemm_simt", SIMT_GEMM_BLOCK, ex, outs, **args)


def gemm_matrix(ex, outs, **args):
    _gemm(f"gemm_{ex.vendor.matrix}", ex.vendor.matrix_block, ex, outs, **args)


ATTENTION_ROWS = 64  # query rows per block: 4 warps x 16 rows (mma m16) / 2 x 32-row MFMA tiles
SHARED_BUDGET = 48 * 1024  # CUDA's default dynamic shared-memory limit, below the 64 KiB LDS
DECODE_PARTITION = 512  # tokens per split-K partition of a decode sequence
KV_FORMATS = {"float8_e4m3fn": 1, "float8_e4m3fnuz": 2}


def _padded(d):
    return -(-d // 8) * 8 + 8  # 16-byte rows plus one more, so rows start in different banks


def flash_tile(d, dv, itemsize):
    """(block_n, shared bytes): the most keys per K/V tile whose tiles and fp32 scores fit the budget."""
    for block_n in (64, 32, 16):
        shared = block_n * (_padded(d) + _padded(dv)) * itemsize + ATTENTION_ROWS * block_n * 4
        if shared <= SHARED_BUDGET:
            return block_n, shared
    raise AssertionError(f"head dims {d}/{dv} exceed the attention kernels' limit of 256")


def _attention(variant, ex, outs, q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k):
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
    ex.launch("attention", f"{variant}<{_type(ex, q)}>", (math.ceil(seq_q / ATTENTION_ROWS), heads_q, batch), (ex.vendor.matrix_block, 1, 1),
              shared, (q, k, v, outs[0], cu_seqlens_q, cu_seqlens_k, _i32(batch), _i32(seq_q), _i32(seq_k), _i32(heads_q), _i32(heads_kv),
                       _i32(d), _i32(dv), _f32(scale), _i32(bool(causal)), _i32(window or 0), _f32(softcap or 0.0), _i32(block_n)))


def attention_simt(ex, outs, **args):
    _attention("flash_attention_simt", ex, outs, **args)


def attention_matrix(ex, outs, **args):
    _attention(f"flash_attention_{ex.vendor.matrix}", ex, outs, **args)


def _split_k(ex, seq_lens, batch, heads, dv):
    """fp32 partial buffers for split-K decode and the number of partitions of the longest sequence."""
    partitions = max(1, math.ceil(int(ex.to_host(seq_lens).max(initial=1)) / DECODE_PARTITION))
    return partitions, (ex.empty((batch, heads, partitions, dv), "float32"), ex.empty((batch, heads, partitions), "float32"),
                        ex.empty((batch, heads, partitions), "float32"))


def _merge(ex, out, partials, partitions, seq_lens):
    batch, heads, dv = out.shape
    ex.launch("decode", f"decode_merge<{_type(ex, out)}>", (heads, batch, 1), (ex.vendor.matrix_block, 1, 1), 0,
              (*partials, out, _i32(batch), _i32(heads), _i32(dv), _i32(partitions), seq_lens, _i32(DECODE_PARTITION)))


def paged_decode_attention(ex, outs, q, k_cache, v_cache, block_table, seq_lens, scale, softcap, k_scale, v_scale):
    batch, heads_q, d = q.shape
    if not batch:
        return
    num_blocks, block_size, heads_kv, dv = v_cache.shape
    kv = ex.dtype_name(k_cache)
    cache_type = "unsigned char" if kv in KV_FORMATS else _type(ex, q)
    partitions, partials = _split_k(ex, seq_lens, batch, heads_q, dv)
    ex.launch("decode", f"paged_decode_partition<{_type(ex, q)}, {cache_type}>", (partitions, heads_q, batch), (ex.vendor.matrix_block, 1, 1), 0,
              (q, ex.as_bytes(k_cache) if kv in KV_FORMATS else k_cache, ex.as_bytes(v_cache) if kv in KV_FORMATS else v_cache, block_table, seq_lens,
               *partials, _i32(batch), _i32(heads_q), _i32(heads_kv), _i32(d), _i32(dv), _i32(block_size), _i32(block_table.shape[1]),
               _i32(DECODE_PARTITION), _i32(partitions), _f32(1.0 / math.sqrt(d) if scale is None else scale), _f32(softcap or 0.0),
               _f32(1.0 if k_scale is None else k_scale), _f32(1.0 if v_scale is None else v_scale), _i32(KV_FORMATS.get(kv, 0))))
    _merge(ex, outs[0], partials, partitions, seq_lens)


def mla_decode(ex, outs, q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, scale):
    batch, heads, latent = q_nope.shape
    if not batch:
        return
    partitions, partials = _split_k(ex, seq_lens, batch, heads, latent)
    ex.launch("decode", f"mla_decode_partition<{_type(ex, q_nope)}>", (partitions, heads, batch), (ex.vendor.matrix_block, 1, 1), 0,
              (q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, *partials, _i32(batch), _i32(heads), _i32(latent), _i32(q_pe.shape[-1]),
               _i32(kv_latent.shape[1]), _i32(block_table.shape[1]), _i32(DECODE_PARTITION), _i32(partitions), _f32(scale)))
    _merge(ex, outs[0], partials, partitions, seq_lens)


def _matrix_head_dims(a):
    d, dv = a["q"].shape[-1], a["v"].shape[-1]
    return d % 16 == 0 and dv % 16 == 0 and d <= 256 and dv <= 256


def _simt_head_dims(a):
    return a["q"].shape[-1] <= 256 and a["v"].shape[-1] <= 256


def _decode_head_dims(a):
    return a["q"].shape[-1] <= 512 and a["v_cache"].shape[-1] <= 512


def _mla_dims(a):
    return a["kv_latent"].shape[-1] + a["k_pe"].shape[-1] <= 768


@dataclass(frozen=True)
class KernelEntry:
    op: str
    family: str
    glue: object
    kernels: tuple  # the templates the glue launches ("{matrix}" stands for the vendor's mma / mfma)
    dtypes: object = FLOATS  # a tuple, or {vendor name: tuple} when the vendors' hardware differs
    needs_matrix_units: bool = False
    needs_fp8_units: bool = False  # matrix instructions with fp8 inputs (Vendor.has_fp8_matrix_units)
    supports: object = None  # a condition on the arguments besides the architecture
    requires: str = ""


# What every GPU backend registers, in preference order per op (first that supports a call wins).
KERNELS = (
    KernelEntry("gemm", "gemm", gemm_matrix, ("gemm_{matrix}",), HALF_FLOATS, needs_matrix_units=True),
    KernelEntry("gemm", "gemm", gemm_simt, ("gemm_simt",)),
    KernelEntry("softmax", "softmax", softmax, ("softmax",)),
    KernelEntry("rms_norm", "norms", rms_norm, ("rms_norm",)),
    KernelEntry("layer_norm", "norms", layer_norm, ("layer_norm",)),
    KernelEntry("silu_and_mul", "activations", silu_and_mul, ("silu_and_mul",)),
    KernelEntry("rope", "rope", rope, ("rope",)),
    KernelEntry("attention", "attention", attention_matrix, ("flash_attention_{matrix}",), HALF_FLOATS, needs_matrix_units=True,
                supports=_matrix_head_dims, requires="head dims that are multiples of 16, at most 256"),
    KernelEntry("attention", "attention", attention_simt, ("flash_attention_simt",), supports=_simt_head_dims, requires="head dims of at most 256"),
    KernelEntry("paged_decode_attention", "decode", paged_decode_attention, ("paged_decode_partition", "decode_merge"), supports=_decode_head_dims, requires="head dims of at most 512"),
    KernelEntry("mla_decode", "decode", mla_decode, ("mla_decode_partition", "decode_merge"), supports=_mla_dims, requires="latent + rope dims of at most 768"),
)


def block_threads(vendor, kernel):
    """Threads per block a kernel is launched with (for occupancy estimates)."""
    if kernel.startswith(("gemm_" + vendor.matrix, "flash_attention", "paged_decode", "mla_decode", "decode_merge")):
        return vendor.matrix_block
    return {"gemm_simt": SIMT_GEMM_BLOCK, "rope": ROPE_BLOCK}.get(kernel, ROW_BLOCK)


def instantiations(vendor, family, arch):
    """Template instantiations a kernel file is built with for one architecture."""
    types = [vendor.types[d] for d in FLOATS]
    halves = [vendor.types[d] for d in HALF_FLOATS]
    if family == "gemm":
        names = [f"gemm_simt<{t}, {o}>" for t in types for o in types]
        if vendor.has_matrix_units(arch):
            names += [f"gemm_{vendor.matrix}<{t}, {o}>" for t in halves for o in types]
        return names
    if family == "rope":
        return [f"rope<{t}, {p}>" for t in types for p in POSITION_TYPES.values()]
    if family == "attention":
        names = [f"flash_attention_simt<{t}>" for t in types]
        return names + ([f"flash_attention_{vendor.matrix}<{t}>" for t in halves] if vendor.has_matrix_units(arch) else [])
    if family == "decode":
        return [name for t in types for name in (f"paged_decode_partition<{t}, {t}>", f"paged_decode_partition<{t}, unsigned char>",
                                                 f"mla_decode_partition<{t}>", f"decode_merge<{t}>")]
    return [f"{kernel}<{t}>" for kernel in ROW_KERNELS[family] for t in types]


ROW_KERNELS = {"softmax": ("softmax",), "norms": ("rms_norm", "layer_norm"), "activations": ("silu_and_mul",)}
FAMILIES = ("gemm", "rope", *ROW_KERNELS, "attention", "decode")
