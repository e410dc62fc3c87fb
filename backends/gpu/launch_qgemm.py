"""Launch glue: quantized GEMMs (fp8 block-scaled, grouped fp8, int8, w4a16, fp4), for both vendors.

Every kernel of the vendor family "qgemm" (backends/cuda/qgemm.cu, backends/rocm/qgemm.hip) covers one
output tile per block; grid.x walks row tiles and grid.y column tiles, so consecutive blocks share
a weight tile (it stays in L2). docs/gpu-kernels.md, "Quantized GEMM kernels", has the ABI.

Variants per op, in preference order: the native fp8 tensor-op instruction (fp8 GEMMs only, and only
for the fp8 flavour the vendor's hardware reads: OCP e4m3fn on NVIDIA Ada (sm_89), FNUZ e4m3fnuz on
CDNA3), the f16/bf16 (or int8) tensor-op instruction, then SIMT for everything else.
"""
import math

from hal.codes import FORMAT_CODES, activation_code
from hal.dtypes import FLOATS

from .glue import HALF_FLOATS, TENSOR_OP_BLOCK, KernelEntry, Template, cdiv, ctype, grouped_row_tiles, i32, widened
from .vendor import VENDORS

TILE_ROWS = 64  # a rows per block, every qgemm kernel
TILE_COLS = 64  # weight rows (output columns) per block; a gated fp8 block covers 32 outputs (gate + up)
# The weight-only tensor-op kernels take 32 output columns per block: decode-shaped calls (M <= 16)
# are bound by reading the weights, so twice the blocks of a 64-wide tile keep more SMs loading.
WEIGHT_ONLY_TENSOR_OP_COLS = 32
FP8_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz")


def fp8_gemm(ex, entry, outs, a, a_scales, b, b_scales, expert_offsets=None, masked_m=None, activation=None, out_dtype=None):
    """Plain (a [M, K]), grouped over offsets (a [R, K]) or masked (a [E, M, K], its rows flattened)."""
    out = outs[0]
    *lead, k = a.shape
    rows, n_out = math.prod(lead), out.shape[-1]
    if not (rows and n_out):
        return
    code, gated = activation_code(activation)  # gated: b has 2 n_out rows, gate and up
    expert_rows = masked_m if masked_m is not None else expert_offsets
    rows_per_expert = a.shape[1] if masked_m is not None else 0
    if expert_rows is None:
        experts, row_tiles = 1, cdiv(rows, TILE_ROWS)
    else:  # int32 holds the offsets (at most R) and the counts' meaning (as_type saturates, the kernels clamp to M)
        experts, expert_rows = b.shape[0], ex.as_type(expert_rows, "int32")
        row_tiles = grouped_row_tiles(rows, experts, rows_per_expert, TILE_ROWS)
    entry.launch(ex, (ctype(ex, out),), (row_tiles, cdiv(n_out, TILE_COLS // (2 if gated else 1))),
                 (ex.as_bytes(a), widened(ex, a_scales), ex.as_bytes(b), widened(ex, b_scales), expert_rows, out, i32(rows), i32(n_out), i32(k),
                  i32(experts), i32(rows_per_expert), i32(FORMAT_CODES[ex.dtype_name(a)]), i32(code), i32(gated)))


def int8_gemm(ex, entry, outs, a, b, a_scales, b_scales, bias, out_dtype):
    (m, k), n = a.shape, b.shape[0]
    out = outs[0]
    if m and n:
        entry.launch(ex, (ctype(ex, out),), (cdiv(m, TILE_ROWS), cdiv(n, TILE_COLS)),
                     (a, b, widened(ex, a_scales), widened(ex, b_scales), widened(ex, bias), out, i32(m), i32(n), i32(k),
                      i32(a_scales.size > 1), i32(b_scales.size > 1)))


def _weight_only(ex, entry, outs, a, b_packed, scale_args, last):
    """w4a16 / fp4: (a, b_packed, *scale_args, out, M, N, K, last), `last` being group_size / fmt."""
    (m, k), n = a.shape, b_packed.shape[0]
    if m and n:
        cols = WEIGHT_ONLY_TENSOR_OP_COLS if entry.tensor_op else TILE_COLS
        entry.launch(ex, (ctype(ex, a),), (cdiv(m, TILE_ROWS), cdiv(n, cols)), (a, b_packed, *scale_args, outs[0], i32(m), i32(n), i32(k), i32(last)))


def w4a16_gemm(ex, entry, outs, a, b_packed, scales, zeros, group_size):
    _weight_only(ex, entry, outs, a, b_packed, (widened(ex, scales), zeros), group_size)


def fp4_gemm(ex, entry, outs, a, b_packed, b_scales, fmt, tensor_scale):
    _weight_only(ex, entry, outs, a, b_packed, (ex.as_bytes(b_scales), widened(ex, tensor_scale)), FORMAT_CODES[fmt])


def _fp8_variants(op):
    return (
        KernelEntry(op, "qgemm", fp8_gemm, (Template("fp8_gemm_{tensor_op}_fp8", FLOATS),), {v.name: (v.fp8_tensor_op_format,) for v in VENDORS.values()},
                    TENSOR_OP_BLOCK, needs_fp8_tensor_ops=True),
        KernelEntry(op, "qgemm", fp8_gemm, (Template("fp8_gemm_{tensor_op}", FLOATS),), FP8_DTYPES, TENSOR_OP_BLOCK, needs_tensor_ops=True),
        KernelEntry(op, "qgemm", fp8_gemm, (Template("fp8_gemm_simt", FLOATS),), FP8_DTYPES),
    )


# Templates are instantiated over the output type (fp8 / int8) or the activation type (w4a16 / fp4).
KERNELS = (
    *_fp8_variants("fp8_gemm_blockscale"),
    *_fp8_variants("fp8_grouped_gemm_blockscale"),
    *_fp8_variants("fp8_grouped_gemm_masked_blockscale"),
    KernelEntry("int8_gemm", "qgemm", int8_gemm, (Template("int8_gemm_{tensor_op}", FLOATS),), ("int8",), TENSOR_OP_BLOCK, needs_tensor_ops=True),
    KernelEntry("int8_gemm", "qgemm", int8_gemm, (Template("int8_gemm_simt", FLOATS),), ("int8",)),
    KernelEntry("w4a16_gemm", "qgemm", w4a16_gemm, (Template("w4a16_gemm_{tensor_op}", HALF_FLOATS),), HALF_FLOATS, TENSOR_OP_BLOCK,
                needs_tensor_ops=True),
    KernelEntry("w4a16_gemm", "qgemm", w4a16_gemm, (Template("w4a16_gemm_simt", FLOATS),)),
    KernelEntry("fp4_gemm", "qgemm", fp4_gemm, (Template("fp4_gemm_{tensor_op}", HALF_FLOATS),), HALF_FLOATS, TENSOR_OP_BLOCK, needs_tensor_ops=True),
    KernelEntry("fp4_gemm", "qgemm", fp4_gemm, (Template("fp4_gemm_simt", FLOATS),)),
)
