"""Launch glue: quantize / dequantize (ops/quant.py gives the semantics, docs/gpu-kernels.md the kernel ABI).

Kernel file family "quant" (backends/cuda/quant.cu, backends/rocm/quant.hip). Scale groups go to the
kernels as a rectangle group_rows x group_cols of x viewed as [batch, M, K]. row / group / block
(and mxfp4 / nvfp4) use the fused quantize_groups; tensor and channel use two passes,
quantize_stats (maxima with atomics into a scratch) then quantize_apply; nvfp4 runs both passes on
the whole tensor first, for its tensor scale.
"""
import math

from hal.dtypes import FLOATS

from .launch import KernelEntry, _i32, _type

QUANT_BLOCK = 256  # 8 warps / 4 waves; quantize_groups' teams are carved out of it
STATS_ROWS = 64  # rows of a column (channel) or rows x block of elements (tensor) per quantize_stats block
ELEMENTS_PER_LANE = 4  # quantize_groups: a group gets about this many elements per lane of its team
DEQUANT_CHUNK = 8  # dequantize: consecutive elements per thread

# Kernel format codes (HAL_Q_* in quant.cu, Q_* in quant.hip; 1-3 are the fp8 codes of the common headers).
FORMAT_CODES = {"float8_e4m3fn": 1, "float8_e4m3fnuz": 2, "float8_e5m2": 3, "int8": 4, "int4": 5, "mxfp4": 7, "nvfp4": 8}
UINT4 = 6  # int4 with zero points
SCALE_CODES = ("mxfp4", "nvfp4")  # formats whose scales are codes (bytes), not float32
PACKED = ("int4", "mxfp4", "nvfp4")
Q_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "int8", "uint8")


def _group_shape(granularity, group_size, m, k):
    """(group_rows, group_cols) of a scale group of an [M, K] matrix (never 0)."""
    g = group_size
    rows, cols = {"tensor": (m, k), "row": (1, k), "group": (1, g), "block": (g, g), "channel": (m, 1)}[granularity]
    return max(rows, 1), max(cols, 1)


def _code(fmt, zero_point=False):
    return UINT4 if zero_point else FORMAT_CODES[fmt]


def _team(group_rows, group_cols, m, k, packed):
    """Lanes per group in quantize_groups: a power of two giving each lane about ELEMENTS_PER_LANE
    elements, at most the block. Packed codes with an odd group width need two groups per block
    (a byte may end in the next group; its scale must be in the same block)."""
    lanes = math.ceil(min(group_rows, m) * min(group_cols, k) / ELEMENTS_PER_LANE)
    team = min(QUANT_BLOCK, 1 << (lanes - 1).bit_length())
    if packed and group_cols % 2 and group_cols < k:
        team = min(team, QUANT_BLOCK // 2)
    return team


def _two_pass(ex, x, q, scales, zeros, code, per_column, packed=False):
    """quantize_stats + quantize_apply over the whole batch (q None: the scales only)."""
    *lead, m, k = x.shape
    batch = math.prod(lead)
    t = _type(ex, x)
    maxima = ex.empty((batch, k if per_column else 1, 2), "int32")  # fp32 bits of non-negative maxima
    ex.fill_zero(maxima)
    if x.size:
        if per_column:
            blocks = batch * math.ceil(k / QUANT_BLOCK) * math.ceil(m / STATS_ROWS)
        else:
            blocks = batch * math.ceil(m * k / (STATS_ROWS * QUANT_BLOCK))
        ex.launch("quant", f"quantize_stats<{t}>", (blocks, 1, 1), (QUANT_BLOCK, 1, 1), 0,
                  (x, maxima, _i32(batch), _i32(m), _i32(k), _i32(per_column), _i32(STATS_ROWS)))
    groups = batch * (k if per_column else 1)
    units = 0 if q is None else x.size // (2 if packed else 1)  # elements, or bytes of two
    ex.launch("quant", f"quantize_apply<{t}>", (math.ceil(max(groups, units) / QUANT_BLOCK), 1, 1), (QUANT_BLOCK, 1, 1), 0,
              (x, maxima, q, scales, zeros, _i32(batch), _i32(m), _i32(k), _i32(per_column), _i32(code)))


def quantize(ex, outs, x, fmt, granularity, group_size, zero_point):
    *lead, m, k = x.shape
    batch = math.prod(lead)
    code = _code(fmt, zero_point)
    q = ex.as_bytes(outs[0])
    zeros = outs[2] if zero_point else None
    if granularity in ("tensor", "channel"):
        _two_pass(ex, x, q, outs[1], zeros, code, granularity == "channel", fmt in PACKED)
        return
    tensor_scale = None
    if fmt == "nvfp4":
        tensor_scale = outs[2]
        _two_pass(ex, x, None, tensor_scale, None, code, False)
    if not x.size:
        return
    group_rows, group_cols = _group_shape(granularity, group_size, m, k)
    bands, groups_per_band = batch * math.ceil(m / group_rows), math.ceil(k / group_cols)
    team = _team(group_rows, group_cols, m, k, fmt in PACKED)
    slots = QUANT_BLOCK // team
    blocks = math.ceil(bands / slots) if groups_per_band == 1 else bands * math.ceil(groups_per_band / slots)
    scales, scale_codes = (None, ex.as_bytes(outs[1])) if fmt in SCALE_CODES else (outs[1], None)
    ex.launch("quant", f"quantize_groups<{_type(ex, x)}>", (blocks, 1, 1), (QUANT_BLOCK, 1, 1), 0,
              (x, tensor_scale, q, scales, scale_codes, zeros, _i32(batch), _i32(m), _i32(k), _i32(group_rows), _i32(group_cols),
               _i32(team), _i32(code)))


def dequantize(ex, outs, q, scales, fmt, granularity, zeros, tensor_scale, group_size, out_dtype):
    out = outs[0]
    *lead, m, k = out.shape
    batch = math.prod(lead)
    if not out.size:
        return
    group_rows, group_cols = _group_shape(granularity, group_size, m, k)
    float_scales, scale_codes = (None, ex.as_bytes(scales)) if fmt in SCALE_CODES else (scales, None)
    chunks = batch * m * math.ceil(k / DEQUANT_CHUNK)
    ex.launch("quant", f"dequantize<{_type(ex, out)}>", (math.ceil(chunks / QUANT_BLOCK), 1, 1), (QUANT_BLOCK, 1, 1), 0,
              (ex.as_bytes(q), float_scales, scale_codes, zeros, tensor_scale, out, _i32(batch), _i32(m), _i32(k), _i32(group_rows),
               _i32(group_cols), _i32(_code(fmt, zeros is not None))))


KERNELS = (
    KernelEntry("quantize", "quant", quantize, ("quantize_groups", "quantize_stats", "quantize_apply")),
    KernelEntry("dequantize", "quant", dequantize, ("dequantize",), Q_DTYPES),
)

INSTANTIATIONS = {
    "quant": lambda vendor, arch: [f"{kernel}<{vendor.types[d]}>" for kernel in ("quantize_groups", "quantize_stats", "quantize_apply", "dequantize")
                                   for d in FLOATS],
}

BLOCK_THREADS = {"quantize_": QUANT_BLOCK, "dequantize": QUANT_BLOCK}
