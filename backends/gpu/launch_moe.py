"""Launch glue of the MoE kernels (backends/cuda/moe.cu, backends/rocm/moe.hip).

Nothing here reads a device array on the host: the routing-dependent sizes (segment lengths,
the padded total, which rows a grouped-GEMM block covers) are found by the kernels, and every
grid is sized from shapes alone (moe_align's outputs have the worst-case capacity; grouped_gemm's
grid is an upper bound on its tiles).
"""
import math

from .launch import HALF_FLOATS, KernelEntry, _f32, _i32, _type, _widened

INDEX_TYPES = {"int32": "int", "int64": "long long"}

ROUTE_TOKENS = 4  # tokens per moe_route block, one warp / wave each
ROUTE_SCORING = {"softmax": 0, "sigmoid": 1}
ROUTE_SHARED_BUDGET = 48 * 1024  # scores, selection values and group scores of ROUTE_TOKENS tokens
ALIGN_COUNT_BLOCK = 256
ALIGN_COUNT_PER_THREAD = 16  # ids per thread of the histogram kernel: fewer blocks, fewer global atomics
ALIGN_BLOCK = 1024
ALIGN_MAX_EXPERTS = 8192  # the histogram's shared-memory bins: 32 KiB
PERMUTE_BLOCK = 256
GROUP_TILE = 64  # grouped GEMM: 64 rows x 64 weight rows per block (32 output columns when gated)
GROUP_SIMT_BLOCK = 256


def _route_shared(experts, groups):
    return ROUTE_TOKENS * (2 * experts + groups) * 4


def moe_route(ex, outs, logits, k, scoring, n_group, topk_group, bias, renormalize, scaling):
    experts = logits.shape[-1]
    tokens = logits.size // experts if experts else 0
    if not tokens:
        return
    groups = n_group if n_group and topk_group else 0
    ex.launch("moe", f"moe_route<{_type(ex, logits)}>", (math.ceil(tokens / ROUTE_TOKENS), 1, 1), (ROUTE_TOKENS * ex.vendor.warp, 1, 1),
              _route_shared(experts, groups),
              (logits, _widened(ex, bias), outs[0], outs[1], _i32(tokens), _i32(experts), _i32(k), _i32(ROUTE_SCORING[scoring]), _i32(groups),
               _i32(topk_group if groups else 0), _i32(bool(renormalize)), _f32(scaling)))


def moe_align(ex, outs, topk_ids, num_experts, block_m):
    sorted_ids, block_experts, expert_offsets, total = outs
    n, index = topk_ids.size, INDEX_TYPES[ex.dtype_name(topk_ids)]
    counts = ex.empty((num_experts,), "int32")
    ex.fill_zero(counts)
    if n:
        blocks = min(math.ceil(n / (ALIGN_COUNT_BLOCK * ALIGN_COUNT_PER_THREAD)), 1024)
        ex.launch("moe", f"moe_align_count<{index}>", (blocks, 1, 1), (ALIGN_COUNT_BLOCK, 1, 1), num_experts * 4,
                  (topk_ids, counts, _i32(n), _i32(num_experts)))
    ex.launch("moe", f"moe_align_scatter<{index}>", (num_experts + 1, 1, 1), (ALIGN_BLOCK, 1, 1), 0,
              (topk_ids, counts, sorted_ids, block_experts, expert_offsets, total, _i32(n), _i32(num_experts), _i32(block_m),
               _i32(sorted_ids.shape[0])))


def moe_permute(ex, outs, x, topk_ids, sorted_ids):
    rows, hidden = outs[0].shape
    if rows and hidden:
        k = topk_ids.shape[-1]
        ex.launch("moe", f"moe_permute<{_type(ex, x)}>", (rows, 1, 1), (PERMUTE_BLOCK, 1, 1), 0,
                  (x, sorted_ids, outs[0], _i32(rows), _i32(hidden), _i32(k), _i32(topk_ids.size)))


def moe_unpermute(ex, outs, y, sorted_ids, topk_weights):
    tokens, hidden = outs[0].shape
    if not (tokens and hidden):
        return
    rows, slots = y.shape[0], topk_weights.size
    row_of = ex.empty((slots,), "int32")  # 1 + the row of each flat index; 0: in no row
    ex.fill_zero(row_of)
    if rows:
        ex.launch("moe", f"moe_unpermute_index<{INDEX_TYPES[ex.dtype_name(sorted_ids)]}>", (math.ceil(rows / PERMUTE_BLOCK), 1, 1),
                  (PERMUTE_BLOCK, 1, 1), 0, (sorted_ids, row_of, _i32(rows), _i32(slots)))
    ex.launch("moe", f"moe_unpermute<{_type(ex, y)}>", (tokens, 1, 1), (PERMUTE_BLOCK, 1, 1), 0,
              (y, row_of, _widened(ex, topk_weights), outs[0], _i32(tokens), _i32(hidden), _i32(topk_weights.shape[-1]), _i32(rows)))


def _grouped_gemm(variant, block, ex, outs, x_sorted, w, expert_offsets, activation):
    out = outs[0]
    rows, n = out.shape
    if not (rows and n):
        return
    experts, k = w.shape[0], w.shape[-1]
    gated = activation == "silu_and_mul"
    # Offsets are at most R, so int32 holds them; E + 1 values are narrowed, not the kernels templated.
    offsets = ex.as_type(expert_offsets, "int32")
    tiles = math.ceil(rows / GROUP_TILE) + experts + 1  # upper bound on expert tiles + zero tiles (expert_row_tile in the common headers)
    columns = math.ceil(n / (GROUP_TILE // 2 if gated else GROUP_TILE))
    ex.launch("moe", f"{variant}<{_type(ex, x_sorted)}>", (tiles, columns, 1), (block, 1, 1), 0,
              (x_sorted, w, offsets, out, _i32(rows), _i32(n), _i32(k), _i32(experts), _i32(gated)))


def grouped_gemm_simt(ex, outs, **args):
    _grouped_gemm("grouped_gemm_simt", GROUP_SIMT_BLOCK, ex, outs, **args)


def grouped_gemm_matrix(ex, outs, **args):
    _grouped_gemm(f"grouped_gemm_{ex.vendor.matrix}", ex.vendor.matrix_block, ex, outs, **args)


def _route_fits(a):
    experts = a["logits"].shape[-1]
    groups = a["n_group"] if a["n_group"] and a["topk_group"] else 0
    return _route_shared(experts, groups) <= ROUTE_SHARED_BUDGET


def _align_fits(a):
    return a["num_experts"] <= ALIGN_MAX_EXPERTS


INDEX_DTYPES = tuple(INDEX_TYPES)

KERNELS = (
    KernelEntry("moe_route", "moe", moe_route, ("moe_route",), supports=_route_fits,
                requires=f"2 * experts + n_group <= {ROUTE_SHARED_BUDGET // (4 * ROUTE_TOKENS)} (at most 1536 experts)"),
    KernelEntry("moe_align", "moe", moe_align, ("moe_align_count", "moe_align_scatter"), INDEX_DTYPES, supports=_align_fits,
                requires=f"at most {ALIGN_MAX_EXPERTS} experts"),
    KernelEntry("moe_permute", "moe", moe_permute, ("moe_permute",)),
    KernelEntry("moe_unpermute", "moe", moe_unpermute, ("moe_unpermute_index", "moe_unpermute")),
    KernelEntry("grouped_gemm", "moe", grouped_gemm_matrix, ("grouped_gemm_{matrix}",), HALF_FLOATS, needs_matrix_units=True),
    KernelEntry("grouped_gemm", "moe", grouped_gemm_simt, ("grouped_gemm_simt",)),
)


def _instantiations(vendor, arch):
    types = [vendor.types[d] for d in ("float32", *HALF_FLOATS)]
    names = [f"moe_route<{t}>" for t in types]
    names += [f"{kernel}<{i}>" for kernel in ("moe_align_count", "moe_align_scatter") for i in INDEX_TYPES.values()]
    names += [f"{kernel}<{t}>" for kernel in ("moe_permute", "moe_unpermute", "grouped_gemm_simt") for t in types]
    names += ["moe_unpermute_index<int>"]
    if vendor.has_matrix_units(arch):
        names += [f"grouped_gemm_{vendor.matrix}<{vendor.types[d]}>" for d in HALF_FLOATS]
    return names


INSTANTIATIONS = {"moe": _instantiations}
BLOCK_THREADS = {
    "moe_route": lambda vendor: ROUTE_TOKENS * vendor.warp,
    "moe_align_count": ALIGN_COUNT_BLOCK,
    "moe_align_scatter": ALIGN_BLOCK,
    "moe_permute": PERMUTE_BLOCK,
    "moe_unpermute": PERMUTE_BLOCK,
    "grouped_gemm_simt": GROUP_SIMT_BLOCK,
    "grouped_gemm_{matrix}": lambda vendor: vendor.matrix_block,
}
