"""Launch glue: quantized GEMMs (fp8 block-scaled, grouped fp8, int8, w4a16, fp4), for both vendors.

Every kernel of the family "qgemm" (backends/cuda/qgemm.cu, backends/rocm/qgemm.hip) covers one
output tile per block; grid.x walks row tiles and grid.y column tiles, so consecutive blocks share
a weight tile (it stays in L2). docs/gpu-kernels.md, "Quantized GEMM kernels", has the ABI.

Variants per op, in preference order: the native fp8 matrix instruction (fp8 GEMMs only, and only
for the fp8 flavour the vendor's hardware reads: OCP e4m3fn on NVIDIA Ada (sm_89), FNUZ e4m3fnuz on
CDNA3), the f16/bf16 (or int8) matrix instruction, then SIMT for everything else.
"""

from hal.dtypes import FLOATS

from .launch import HALF_FLOATS, KV_FORMATS, KernelEntry, _i32, _type, _widened

TILE_ROWS = 64  # a rows per block, every qgemm kernel
TILE_COLS = 64  # weight rows (output columns) per block; a gated fp8 block covers 32 outputs (gate + up)
# The weight-only matrix kernels take 32 output columns per block: decode-shaped calls (M <= 16)
# are bound by reading the weights, so twice the blocks of a 64-wide tile keep more SMs loading.
WEIGHT_ONLY_MATRIX_COLS = 32
SIMT_BLOCK = 256  # 16 x 16 threads, 4 x 4 outputs each
FP8_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz")
# The fp8 flavour each vendor's fp8 matrix instruction reads (the other one is decoded in software).
NATIVE_FP8 = {"cuda": "float8_e4m3fn", "rocm": "float8_e4m3fnuz"}
FP4_FORMATS = {"mxfp4": 1, "nvfp4": 2}


def _cdiv(a, b):
    return -(-a // b)


def _fp8(ex, variant, outs, a, a_scales, b, b_scales, expert_offsets=None, activation=None, out_dtype=None):
    out = outs[0]
    rows, k = a.shape
    n_out = out.shape[1]
    if not (rows and n_out):
        return
    gated = activation == "silu_and_mul"
    if expert_offsets is None:
        experts, row_tiles, offsets = 1, _cdiv(rows, TILE_ROWS), None
    else:  # the bound on (expert, row tile) pairs plus the zero tiles outside the experts' rows
        experts, offsets = b.shape[0], ex.as_type(expert_offsets, "int32")
        row_tiles = _cdiv(rows, TILE_ROWS) + experts + 1
    block = SIMT_BLOCK if variant == "simt" else ex.vendor.matrix_block
    name = {"simt": "fp8_gemm_simt", "matrix": f"fp8_gemm_{ex.vendor.matrix}", "native": f"fp8_gemm_{ex.vendor.matrix}_fp8"}[variant]
    ex.launch("qgemm", f"{name}<{_type(ex, out)}>", (row_tiles, _cdiv(n_out, TILE_COLS // (2 if gated else 1)), 1), (block, 1, 1), 0,
              (ex.as_bytes(a), _widened(ex, a_scales), ex.as_bytes(b), _widened(ex, b_scales), offsets, out, _i32(rows), _i32(n_out), _i32(k),
               _i32(experts), _i32(KV_FORMATS[ex.dtype_name(a)]), _i32(gated)))


def fp8_gemm_native(ex, outs, **args):
    _fp8(ex, "native", outs, **args)


def fp8_gemm_matrix(ex, outs, **args):
    _fp8(ex, "matrix", outs, **args)


def fp8_gemm_simt(ex, outs, **args):
    _fp8(ex, "simt", outs, **args)


def _int8(ex, name, block, outs, a, b, a_scales, b_scales, bias, out_dtype):
    (m, k), n = a.shape, b.shape[0]
    out = outs[0]
    if m and n:
        ex.launch("qgemm", f"{name}<{_type(ex, out)}>", (_cdiv(m, TILE_ROWS), _cdiv(n, TILE_COLS), 1), (block, 1, 1), 0,
                  (a, b, _widened(ex, a_scales), _widened(ex, b_scales), _widened(ex, bias), out, _i32(m), _i32(n), _i32(k),
                   _i32(a_scales.size > 1), _i32(b_scales.size > 1)))


def int8_gemm_matrix(ex, outs, **args):
    _int8(ex, f"int8_gemm_{ex.vendor.matrix}", ex.vendor.matrix_block, outs, **args)


def int8_gemm_simt(ex, outs, **args):
    _int8(ex, "int8_gemm_simt", SIMT_BLOCK, outs, **args)


def _weight_only(ex, kernel, matrix, outs, a, b_packed, scale_args, last):
    """w4a16 / fp4: (a, b_packed, *scale_args, out, M, N, K, last), `last` being group_size / fmt."""
    (m, k), n = a.shape, b_packed.shape[0]
    if m and n:
        cols, block = (WEIGHT_ONLY_MATRIX_COLS, ex.vendor.matrix_block) if matrix else (TILE_COLS, SIMT_BLOCK)
        name = f"{kernel}_{ex.vendor.matrix if matrix else 'simt'}<{_type(ex, a)}>"
        ex.launch("qgemm", name, (_cdiv(m, TILE_ROWS), _cdiv(n, cols), 1), (block, 1, 1), 0,
                  (a, b_packed, *scale_args, outs[0], _i32(m), _i32(n), _i32(k), _i32(last)))


def _w4a16(ex, matrix, outs, a, b_packed, scales, zeros, group_size):
    _weight_only(ex, "w4a16_gemm", matrix, outs, a, b_packed, (_widened(ex, scales), zeros), group_size)


def _fp4(ex, matrix, outs, a, b_packed, b_scales, fmt, tensor_scale):
    _weight_only(ex, "fp4_gemm", matrix, outs, a, b_packed, (ex.as_bytes(b_scales), _widened(ex, tensor_scale)), FP4_FORMATS[fmt])


def w4a16_gemm_matrix(ex, outs, **args):
    _w4a16(ex, True, outs, **args)


def w4a16_gemm_simt(ex, outs, **args):
    _w4a16(ex, False, outs, **args)


def fp4_gemm_matrix(ex, outs, **args):
    _fp4(ex, True, outs, **args)


def fp4_gemm_simt(ex, outs, **args):
    _fp4(ex, False, outs, **args)


def _fp8_variants(op):
    return (
        KernelEntry(op, "qgemm", fp8_gemm_native, ("fp8_gemm_{matrix}_fp8",), {v: (d,) for v, d in NATIVE_FP8.items()}, needs_fp8_units=True),
        KernelEntry(op, "qgemm", fp8_gemm_matrix, ("fp8_gemm_{matrix}",), FP8_DTYPES, needs_matrix_units=True),
        KernelEntry(op, "qgemm", fp8_gemm_simt, ("fp8_gemm_simt",), FP8_DTYPES),
    )


KERNELS = (
    *_fp8_variants("fp8_gemm_blockscale"),
    *_fp8_variants("fp8_grouped_gemm_blockscale"),
    KernelEntry("int8_gemm", "qgemm", int8_gemm_matrix, ("int8_gemm_{matrix}",), ("int8",), needs_matrix_units=True),
    KernelEntry("int8_gemm", "qgemm", int8_gemm_simt, ("int8_gemm_simt",), ("int8",)),
    KernelEntry("w4a16_gemm", "qgemm", w4a16_gemm_matrix, ("w4a16_gemm_{matrix}",), HALF_FLOATS, needs_matrix_units=True),
    KernelEntry("w4a16_gemm", "qgemm", w4a16_gemm_simt, ("w4a16_gemm_simt",)),
    KernelEntry("fp4_gemm", "qgemm", fp4_gemm_matrix, ("fp4_gemm_{matrix}",), HALF_FLOATS, needs_matrix_units=True),
    KernelEntry("fp4_gemm", "qgemm", fp4_gemm_simt, ("fp4_gemm_simt",)),
)


def _qgemm_instantiations(vendor, arch):
    types = [vendor.types[d] for d in FLOATS]
    halves = [vendor.types[d] for d in HALF_FLOATS]
    names = [f"{k}<{t}>" for k in ("fp8_gemm_simt", "int8_gemm_simt", "w4a16_gemm_simt", "fp4_gemm_simt") for t in types]
    if vendor.has_matrix_units(arch):
        names += [f"{k}_{vendor.matrix}<{t}>" for k in ("fp8_gemm", "int8_gemm") for t in types]
        names += [f"{k}_{vendor.matrix}<{t}>" for k in ("w4a16_gemm", "fp4_gemm") for t in halves]
    if vendor.has_fp8_matrix_units(arch):
        names += [f"fp8_gemm_{vendor.matrix}_fp8<{t}>" for t in types]
    return names


INSTANTIATIONS = {"qgemm": _qgemm_instantiations}
BLOCK_THREADS = {"fp8_gemm_{matrix}": lambda vendor: vendor.matrix_block, "int8_gemm_{matrix}": lambda vendor: vendor.matrix_block,
                 "w4a16_gemm_{matrix}": lambda vendor: vendor.matrix_block, "fp4_gemm_{matrix}": lambda vendor: vendor.matrix_block,
                 "fp8_gemm_simt": SIMT_BLOCK, "int8_gemm_simt": SIMT_BLOCK, "w4a16_gemm_simt": SIMT_BLOCK, "fp4_gemm_simt": SIMT_BLOCK}
