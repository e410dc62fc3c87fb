"""Launch glue: quantize / dequantize (ops/quant.py gives the semantics, docs/gpu-kernels.md the kernel ABI).

Kernel file family "quant" (backends/gpu/kernels/quant.cu, shared by both vendors). Scale groups go to the
kernels as a rectangle group_rows x group_cols of x viewed as [batch, M, K]. row / group / block
(and mxfp4 / nvfp4) use the fused quantize_groups; tensor and channel use two passes,
quantize_stats (maxima with atomics into a scratch) then quantize_apply; nvfp4 runs both passes on
the whole tensor first, for its tensor scale.
"""
import math

from hal.codes import FORMAT_CODES
from hal.dtypes import FLOATS
from hal.formats import group_tile

from .glue import BLOCK, KernelEntry, Template, cdiv, ctype, i32

STATS_ROWS = 64  # rows of a column (channel) or rows x block of elements (tensor) per quantize_stats block
ELEMENTS_PER_LANE = 4  # quantize_groups: a group gets about this many elements per lane of its team
DEQUANT_CHUNK = 8  # dequantize: consecutive elements per thread
SCALE_CODES = ("mxfp4", "nvfp4")  # formats whose scales are codes (bytes), not float32
PACKED = ("int4", "mxfp4", "nvfp4")
Q_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "int8", "uint8")


def _code(fmt, zero_point=False):
    return FORMAT_CODES["uint4" if zero_point else fmt]  # uint4: int4 with zero points


def _team(group_rows, group_cols, m, k, packed):
    """Lanes per group in quantize_groups: a power of two giving each lane about ELEMENTS_PER_LANE
    elements, at most the block. Packed codes with an odd group width need two groups per block
    (a byte may end in the next group; its scale must be in the same block)."""
    lanes = math.ceil(min(group_rows, m) * min(group_cols, k) / ELEMENTS_PER_LANE)
    team = min(BLOCK, 1 << (lanes - 1).bit_length())
    if packed and group_cols % 2 and group_cols < k:
        team = min(team, BLOCK // 2)
    return team


def _two_pass(ex, entry, x, q, scales, zeros, code, per_column, packed=False):
    """quantize_stats + quantize_apply over the whole batch (q None: the scales only)."""
    *lead, m, k = x.shape
    batch = math.prod(lead)
    t = ctype(ex, x)
    maxima = ex.empty((batch, k if per_column else 1, 2), "int32")  # fp32 bits of non-negative maxima
    ex.fill_zero(maxima)
    if x.size:
        if per_column:
            blocks = batch * cdiv(k, BLOCK) * cdiv(m, STATS_ROWS)
        else:
            blocks = batch * cdiv(m * k, STATS_ROWS * BLOCK)
        entry.launch(ex, (t,), (blocks,), (x, maxima, i32(batch), i32(m), i32(k), i32(per_column), i32(STATS_ROWS)), template="quantize_stats")
    groups = batch * (k if per_column else 1)
    units = 0 if q is None else x.size // (2 if packed else 1)  # elements, or bytes of two
    entry.launch(ex, (t,), (cdiv(max(groups, units), BLOCK),),
                 (x, maxima, q, scales, zeros, i32(batch), i32(m), i32(k), i32(per_column), i32(code)), template="quantize_apply")


def quantize(ex, entry, outs, x, fmt, granularity, group_size, zero_point):
    *lead, m, k = x.shape
    batch = math.prod(lead)
    code = _code(fmt, zero_point)
    q = ex.as_bytes(outs[0])
    zeros = outs[2] if zero_point else None
    if granularity in ("tensor", "channel"):
        _two_pass(ex, entry, x, q, outs[1], zeros, code, granularity == "channel", fmt in PACKED)
        return
    tensor_scale = None
    if fmt == "nvfp4":
        tensor_scale = outs[2]
        _two_pass(ex, entry, x, None, tensor_scale, None, code, False)
    if not x.size:
        return
    group_rows, group_cols = group_tile(granularity, m, k, group_size)
    bands, groups_per_band = batch * cdiv(m, group_rows), cdiv(k, group_cols)
    team = _team(group_rows, group_cols, m, k, fmt in PACKED)
    slots = BLOCK // team
    blocks = cdiv(bands, slots) if groups_per_band == 1 else bands * cdiv(groups_per_band, slots)
    scales, scale_codes = (None, ex.as_bytes(outs[1])) if fmt in SCALE_CODES else (outs[1], None)
    entry.launch(ex, (ctype(ex, x),), (blocks,),
                 (x, tensor_scale, q, scales, scale_codes, zeros, i32(batch), i32(m), i32(k), i32(group_rows), i32(group_cols),
                  i32(team), i32(code)), template="quantize_groups")


def dequantize(ex, entry, outs, q, scales, fmt, granularity, zeros, tensor_scale, group_size, out_dtype):
    out = outs[0]
    *lead, m, k = out.shape
    batch = math.prod(lead)
    if not out.size:
        return
    group_rows, group_cols = group_tile(granularity, m, k, group_size)
    float_scales, scale_codes = (None, ex.as_bytes(scales)) if fmt in SCALE_CODES else (scales, None)
    chunks = batch * m * cdiv(k, DEQUANT_CHUNK)
    entry.launch(ex, (ctype(ex, out),), (cdiv(chunks, BLOCK),),
                 (ex.as_bytes(q), float_scales, scale_codes, zeros, tensor_scale, out, i32(batch), i32(m), i32(k), i32(group_rows),
                  i32(group_cols), i32(_code(fmt, zeros is not None))))


# Every block is BLOCK threads; quantize_groups carves teams out of it.
KERNELS = (
    KernelEntry("quantize", "quant", quantize, (Template("quantize_groups", FLOATS), Template("quantize_stats", FLOATS),
                                                Template("quantize_apply", FLOATS))),
    KernelEntry("dequantize", "quant", dequantize, (Template("dequantize", FLOATS),), Q_DTYPES),
)
