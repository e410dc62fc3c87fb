"""Launch glue: embedding_bag and spmm_csr (backends/cuda/sparse.cu, backends/rocm/sparse.hip).

Both kernels are one gather-reduce over segments (bags, or rows of the CSR matrix): a group of
lanes per segment, G = the smallest power of two with 8 * G >= D (at most a warp / wave), and the
groups stride over the segments. The grid below gives every segment its own group on the vendor's
warp width; the kernels read warpSize at run time (RDNA runs HIP in wave32), and the grid stride
keeps any grid correct.
"""
import math

import numpy as np

from hal.dtypes import FLOATS

from .launch import POSITION_TYPES, KernelEntry, _i32, _type

SPARSE_BLOCK = 256  # 8 warps / 4 waves: 16 bags of D = 128 per block on either vendor
CHUNK = 8  # elements per lane and row load (16 bytes of a 16-bit type)
MAX_BLOCKS = 1 << 16  # past this the groups stride: enough blocks to fill any current GPU many times
MODES = {"sum": 0, "mean": 1, "max": 2}
NO_PADDING = -1
INDEX_TYPES = POSITION_TYPES  # int32 -> int, int64 -> long long


def group_lanes(warp, dim):
    """Lanes per segment, as the kernels compute it."""
    lanes, chunks = 1, -(-dim // CHUNK)
    while lanes < chunks and lanes < warp:
        lanes *= 2
    return lanes


def _grid(ex, segments, dim):
    blocks = math.ceil(segments * group_lanes(ex.vendor.warp, dim) / SPARSE_BLOCK)
    return (min(blocks, MAX_BLOCKS), 1, 1)


def _name(ex, kernel, values, ids):
    return f"{kernel}<{_type(ex, values)}, {INDEX_TYPES[ex.dtype_name(ids)]}>"


def embedding_bag(ex, outs, table, indices, offsets, per_sample_weights, mode, padding_idx):
    out = outs[0]
    bags, dim = out.shape
    if bags and dim:
        ex.launch("sparse", _name(ex, "embedding_bag", table, indices), _grid(ex, bags, dim), (SPARSE_BLOCK, 1, 1), 0,
                  (table, indices, offsets, per_sample_weights, out, _i32(bags), _i32(table.shape[0]), _i32(dim), np.int64(indices.shape[0]),
                   _i32(MODES[mode]), _i32(NO_PADDING if padding_idx is None else padding_idx)))


def spmm_csr(ex, outs, indptr, indices, values, dense):
    out = outs[0]
    m, n = out.shape
    if m and n:
        ex.launch("sparse", _name(ex, "spmm_csr", values, indices), _grid(ex, m, n), (SPARSE_BLOCK, 1, 1), 0,
                  (indptr, indices, values, dense, out, _i32(m), _i32(dense.shape[0]), _i32(n), np.int64(values.shape[0])))


KERNELS = (
    KernelEntry("embedding_bag", "sparse", embedding_bag, ("embedding_bag",)),
    KernelEntry("spmm_csr", "sparse", spmm_csr, ("spmm_csr",)),
)
INSTANTIATIONS = {
    "sparse": lambda vendor, arch: [f"{kernel}<{vendor.types[d]}, {i}>" for kernel in ("embedding_bag", "spmm_csr")
                                    for d in FLOATS for i in INDEX_TYPES.values()],
}
BLOCK_THREADS = {"embedding_bag": SPARSE_BLOCK, "spmm_csr": SPARSE_BLOCK}
