"""Launch glue: embedding_bag and spmm_csr (kernel family "sparse": backends/gpu/kernels/sparse.cu).

Both kernels are one gather-reduce over segments (bags, or rows of the CSR matrix): a group of
lanes per segment, G = the smallest power of two with 8 * G >= D (at most a warp / wave), and the
groups stride over the segments. The grid below gives every segment its own group on the vendor's
warp width; the kernels read warpSize at run time (RDNA runs HIP in wave32), and the grid stride
keeps any grid correct.
"""
import math

from hal.codes import BAG_MODES
from hal.dtypes import FLOATS

from .glue import INDEX_DTYPES, KernelEntry, Template, ctype, i32, i64

CHUNK = 8  # elements per lane and row load (16 bytes of a 16-bit type)
MAX_BLOCKS = 1 << 16  # past this the groups stride: enough blocks to fill any current GPU many times
NO_PADDING = -1


def group_lanes(warp, dim):
    """Lanes per segment, as the kernels compute it."""
    lanes, chunks = 1, -(-dim // CHUNK)
    while lanes < chunks and lanes < warp:
        lanes *= 2
    return lanes


def _grid(ex, entry, segments, dim):
    blocks = math.ceil(segments * group_lanes(ex.vendor.warp, dim) / entry.threads(ex.vendor))
    return (min(blocks, MAX_BLOCKS),)


def embedding_bag(ex, entry, outs, table, indices, offsets, per_sample_weights, mode, padding_idx):
    out = outs[0]
    bags, dim = out.shape
    if bags and dim:
        entry.launch(ex, (ctype(ex, table), ctype(ex, indices)), _grid(ex, entry, bags, dim),
                     (table, indices, offsets, per_sample_weights, out, i32(bags), i32(table.shape[0]), i32(dim), i64(indices.shape[0]),
                      i32(BAG_MODES[mode]), i32(NO_PADDING if padding_idx is None else padding_idx)))


def spmm_csr(ex, entry, outs, indptr, indices, values, dense):
    out = outs[0]
    m, n = out.shape
    if m and n:
        entry.launch(ex, (ctype(ex, values), ctype(ex, indices)), _grid(ex, entry, m, n),
                     (indptr, indices, values, dense, out, i32(m), i32(dense.shape[0]), i32(n), i64(values.shape[0])))


# glue.BLOCK threads: 8 warps / 4 waves, 16 bags of D = 128 per block on either vendor.
KERNELS = (
    KernelEntry("embedding_bag", "sparse", embedding_bag, (Template("embedding_bag", FLOATS, INDEX_DTYPES),)),
    KernelEntry("spmm_csr", "sparse", spmm_csr, (Template("spmm_csr", FLOATS, INDEX_DTYPES),)),
)
