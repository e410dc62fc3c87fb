"""Launch glue of the MoE kernels (kernel family "moe": routing, alignment, permutation, the SIMT
grouped GEMM) and of the tensor-op grouped GEMM (vendor family "grouped_gemm").

Nothing here reads a device array on the host: the routing-dependent sizes (segment lengths,
the padded total, which rows a grouped-GEMM block covers, the masked layout's counts) are found by
the kernels, and every grid is sized from shapes alone (moe_align's outputs have the worst-case
capacity; grouped_gemm's grid is an upper bound on its tiles, grouped_gemm_masked's covers every
expert's M rows).
"""
import math

from hal.codes import ROUTE_SCORINGS, activation_code
from hal.dtypes import FLOATS

from .glue import HALF_FLOATS, INDEX_DTYPES, TENSOR_OP_BLOCK, KernelEntry, Template, cdiv, ctype, f32, grouped_row_tiles, i32, widened

ROUTE_TOKENS = 4  # tokens per moe_route block, one warp / wave each
ROUTE_SHARED_BUDGET = 48 * 1024  # scores, selection values and group scores of ROUTE_TOKENS tokens
ALIGN_COUNT_PER_THREAD = 16  # ids per thread of the histogram kernel: fewer blocks, fewer global atomics
ALIGN_BLOCK = 1024  # moe_align_scatter: one block per expert
ALIGN_MAX_EXPERTS = 8192  # the histogram's shared-memory bins: 32 KiB
GROUP_TILE = 64  # grouped GEMM: 64 rows x 64 weight rows per block (32 output columns when gated)


def _route_shared(experts, groups):
    return ROUTE_TOKENS * (2 * experts + groups) * 4


def moe_route(ex, entry, outs, logits, k, scoring, n_group, topk_group, bias, renormalize, scaling):
    experts = logits.shape[-1]
    tokens = logits.size // experts if experts else 0
    if not tokens:
        return
    groups = n_group if n_group and topk_group else 0
    entry.launch(ex, (ctype(ex, logits),), (cdiv(tokens, ROUTE_TOKENS),),
                 (logits, widened(ex, bias), outs[0], outs[1], i32(tokens), i32(experts), i32(k), i32(ROUTE_SCORINGS[scoring]), i32(groups),
                  i32(topk_group if groups else 0), i32(bool(renormalize)), f32(scaling)), _route_shared(experts, groups))


def moe_align(ex, entry, outs, topk_ids, num_experts, block_m):
    sorted_ids, block_experts, expert_offsets, total = outs
    n, index = topk_ids.size, ctype(ex, topk_ids)
    counts = ex.empty((num_experts,), "int32")
    ex.fill_zero(counts)
    if n:
        blocks = min(cdiv(n, entry.threads(ex.vendor, "moe_align_count") * ALIGN_COUNT_PER_THREAD), 1024)
        entry.launch(ex, (index,), (blocks,), (topk_ids, counts, i32(n), i32(num_experts)), num_experts * 4, template="moe_align_count")
    entry.launch(ex, (index,), (num_experts + 1,),
                 (topk_ids, counts, sorted_ids, block_experts, expert_offsets, total, i32(n), i32(num_experts), i32(block_m),
                  i32(sorted_ids.shape[0])), template="moe_align_scatter")


def moe_permute(ex, entry, outs, x, topk_ids, sorted_ids):
    rows, hidden = outs[0].shape
    if rows and hidden:
        k = topk_ids.shape[-1]
        entry.launch(ex, (ctype(ex, x),), (rows,), (x, sorted_ids, outs[0], i32(rows), i32(hidden), i32(k), i32(topk_ids.size)))


def moe_unpermute(ex, entry, outs, y, sorted_ids, topk_weights):
    tokens, hidden = outs[0].shape
    if not (tokens and hidden):
        return
    rows, slots = y.shape[0], topk_weights.size
    row_of = ex.empty((slots,), "int32")  # 1 + the row of each flat index; 0: in no row
    ex.fill_zero(row_of)
    if rows:
        entry.launch(ex, (ctype(ex, sorted_ids),), (cdiv(rows, entry.threads(ex.vendor, "moe_unpermute_index")),),
                     (sorted_ids, row_of, i32(rows), i32(slots)), template="moe_unpermute_index")
    entry.launch(ex, (ctype(ex, y),), (tokens,),
                 (y, row_of, widened(ex, topk_weights), outs[0], i32(tokens), i32(hidden), i32(topk_weights.shape[-1]), i32(rows)),
                 template="moe_unpermute")


def _grouped_gemm(ex, entry, out, x, w, expert_rows, rows_per_expert, activation):
    """out = the grouped product over x's rows (leading dimensions flattened: [R, K], or [E, M, K] with
    rows_per_expert = M); expert_rows: the offsets, or in the masked layout the counts."""
    *lead, n = out.shape
    rows = math.prod(lead)
    if not (rows and n):
        return
    experts, k = w.shape[0], w.shape[-1]
    code, gated = activation_code(activation)  # gated: w has 2N rows, gate and up
    # int32 holds the offsets (at most R) and the counts' meaning (as_type saturates, the kernels clamp to M):
    # E + 1 or E values are narrowed, not the kernels templated.
    entry.launch(ex, (ctype(ex, x),), (grouped_row_tiles(rows, experts, rows_per_expert, GROUP_TILE), cdiv(n, GROUP_TILE // 2 if gated else GROUP_TILE)),
                 (x, w, ex.as_type(expert_rows, "int32"), out, i32(rows), i32(n), i32(k), i32(experts), i32(rows_per_expert), i32(code), i32(gated)))


def grouped_gemm(ex, entry, outs, x_sorted, w, expert_offsets, activation):
    _grouped_gemm(ex, entry, outs[0], x_sorted, w, expert_offsets, 0, activation)


def grouped_gemm_masked(ex, entry, outs, x, w, masked_m, activation):
    _grouped_gemm(ex, entry, outs[0], x, w, masked_m, x.shape[1], activation)


def _route_fits(a):
    experts = a["logits"].shape[-1]
    groups = a["n_group"] if a["n_group"] and a["topk_group"] else 0
    return _route_shared(experts, groups) <= ROUTE_SHARED_BUDGET


def _align_fits(a):
    return a["num_experts"] <= ALIGN_MAX_EXPERTS


def _route_block(vendor):
    return ROUTE_TOKENS * vendor.warp


def _grouped_variants(op, glue):
    """The tensor-op grouped GEMM (vendor family grouped_gemm), then the SIMT one (moe.cu), for one layout's op."""
    return (KernelEntry(op, "grouped_gemm", glue, (Template("grouped_gemm_{tensor_op}", HALF_FLOATS),), HALF_FLOATS, TENSOR_OP_BLOCK,
                        needs_tensor_ops=True),
            KernelEntry(op, "moe", glue, (Template("grouped_gemm_simt", FLOATS),)))


KERNELS = (
    KernelEntry("moe_route", "moe", moe_route, (Template("moe_route", FLOATS),), block=_route_block, supports=_route_fits,
                requires=f"2 * experts + n_group <= {ROUTE_SHARED_BUDGET // (4 * ROUTE_TOKENS)} (at most 1536 experts)"),
    KernelEntry("moe_align", "moe", moe_align,
                (Template("moe_align_count", INDEX_DTYPES), Template("moe_align_scatter", INDEX_DTYPES, block=ALIGN_BLOCK)), INDEX_DTYPES,
                supports=_align_fits, requires=f"at most {ALIGN_MAX_EXPERTS} experts"),
    KernelEntry("moe_permute", "moe", moe_permute, (Template("moe_permute", FLOATS),)),
    # sorted_ids is int32 (ops/moe.py); a template so that name expressions and hipcc can name it.
    KernelEntry("moe_unpermute", "moe", moe_unpermute, (Template("moe_unpermute_index", ("int32",)), Template("moe_unpermute", FLOATS))),
    *_grouped_variants("grouped_gemm", grouped_gemm),
    *_grouped_variants("grouped_gemm_masked", grouped_gemm_masked),
)
