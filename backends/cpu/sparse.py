"""CPU kernels: embedding_bag and spmm_csr (ops/sparse.py), one Numba kernel for both.

spmm_csr is embedding_bag in "sum" mode: row i of the sparse matrix is a bag of dense rows
(its column ids) weighted by its values. The kernel runs in parallel over bags (rows); each
bag gathers its table rows into a float32 accumulator row, which stays in L1 (D = 128 is 512
bytes) while the rows stream through, and is narrowed to the output dtype once at the end.
The gather is bound by memory latency (each row of a large table is a random DRAM read), so
the rows of the entries 32 ahead are prefetched, and sums take four rows per pass over the
accumulator. float16 / bfloat16 tables are read through the integer views and the `load` / `store`
helpers of common.py, so every dtype shares one kernel body.

Entries whose id is outside the table (only possible when the checks of ops/sparse.py were
skipped, for arrays that are not NumPy ones) and entries equal to padding_idx are skipped;
offsets are clamped to [0, L], so the kernel never reads out of bounds.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from hal.codes import BAG_MODES

from .common import F32, FASTMATH, KERNEL, Kernel, load, prefetch_line, raw_view, store

_MEAN, _MAX = BAG_MODES["mean"], BAG_MODES["max"]
_NO_PADDING = -1
# Bags per parallel task: one scratch allocation per task, and tasks small enough that a skewed
# mix of bag lengths still balances over the threads.
_BAGS_PER_TASK = 64
# Helpers are inlined into the kernel (inline="always"): a call per gathered row costs more than
# the row's arithmetic at D = 128.
_INLINE = dict(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
# Entries ahead whose rows are prefetched. Rows of a large table are random DRAM reads and a core
# otherwise waits on each. Measured at the benchmark shape (one thread, fp32 / fp16): 16 ahead
# 39 / 34 ms, 32 ahead 34 / 28 ms, 48-96 no better.
_PREFETCH_AHEAD = 32
_CACHE_LINE = 64


@intrinsic
def _prefetch_row(typingctx, table, row):
    """Prefetches every cache line that table[row] touches (llvm.prefetch: a read, kept in every
    cache level; prefetches never fault). All of them: NumPy's large buffers start 16 bytes into a
    page, so a 512-byte row spans 9 lines, and leaving out the 9th cost 40% at the benchmark shape."""
    if not (isinstance(table, types.Array) and table.ndim == 2):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        row = context.cast(builder, args[1], sig.args[1], types.intp)
        start = cgutils.get_item_pointer(context, builder, aryty, array, [row, context.get_constant(types.intp, 0)])
        i64 = ir.IntType(64)
        addr = builder.ptrtoint(start, i64)
        itemsize = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        end = builder.add(addr, builder.mul(cgutils.unpack_tuple(builder, array.shape, 2)[1], i64(itemsize)))
        first = builder.and_(addr, i64(-_CACHE_LINE))
        lines = builder.udiv(builder.add(builder.sub(end, first), i64(_CACHE_LINE - 1)), i64(_CACHE_LINE))
        with cgutils.for_range(builder, lines) as loop:
            line = builder.inttoptr(builder.add(first, builder.mul(loop.index, i64(_CACHE_LINE))), start.type)
            prefetch_line(builder, line, False)
        return context.get_dummy_value()

    return types.void(table, row), codegen


# Loops over D on the 2-D table (the row index hoisted by LLVM), vectorized.
@njit(**_INLINE)
def _add_rows4(acc, table, i0, i1, i2, i3, w0, w1, w2, w3):
    """acc += w0 table[i0] + ... + w3 table[i3]: four gathered rows per pass over the accumulator,
    so the loop is bound by the row loads, not by loads and stores of acc."""
    for j in range(acc.shape[0]):
        acc[j] += w0 * load(table, (i0, j)) + w1 * load(table, (i1, j)) + w2 * load(table, (i2, j)) + w3 * load(table, (i3, j))


@njit(**_INLINE)
def _add_row(acc, table, i, w):
    for j in range(acc.shape[0]):
        acc[j] += w * load(table, (i, j))


@njit(**_INLINE)
def _max_row(acc, table, i):
    for j in range(acc.shape[0]):
        v = load(table, (i, j))
        acc[j] = v if v > acc[j] or v != v else acc[j]  # a NaN wins and stays, like torch.amax


@njit(**_INLINE)
def _reduce_bag(table, indices, weights, start, end, mode, padding_idx, acc):
    """Reduces the entries [start, end) into acc (already initialized); returns how many it used.
    Sums stage three valid entries in scalars and add them with the fourth."""
    n_rows = table.shape[0]
    count = staged = 0
    i0 = i1 = i2 = 0
    w0 = w1 = w2 = F32(1.0)
    for k in range(start, end):
        ahead = k + _PREFETCH_AHEAD
        if ahead < indices.shape[0]:  # past this bag too: the next bags come next
            p = indices[ahead]
            if 0 <= p < n_rows:
                _prefetch_row(table, p)
        i = indices[k]
        if i < 0 or i >= n_rows or i == padding_idx:
            continue
        count += 1
        if mode == _MAX:
            _max_row(acc, table, i)
            continue
        w = F32(1.0) if weights is None else load(weights, k)
        if staged == 0:
            i0, w0 = i, w
        elif staged == 1:
            i1, w1 = i, w
        elif staged == 2:
            i2, w2 = i, w
        else:
            _add_rows4(acc, table, i0, i1, i2, i, w0, w1, w2, w)
            staged = -1
        staged += 1
    if staged > 0:
        _add_row(acc, table, i0, w0)
    if staged > 1:
        _add_row(acc, table, i1, w1)
    if staged > 2:
        _add_row(acc, table, i2, w2)
    return count


@njit(**_INLINE)
def _store_row(out, b, acc, scale):
    for j in range(acc.shape[0]):
        store(out, (b, j), acc[j] * scale)


@njit(**KERNEL)
def _bags_kernel(table, indices, offsets, weights, out, mode, padding_idx):
    """out[b] = reduction over the rows table[indices[k]], k in [offsets[b], offsets[b + 1])."""
    bags, dim = out.shape
    length = indices.shape[0]
    tasks = (bags + _BAGS_PER_TASK - 1) // _BAGS_PER_TASK
    for task in prange(tasks):
        acc = np.empty(dim, np.float32)
        for b in range(task * _BAGS_PER_TASK, min(bags, (task + 1) * _BAGS_PER_TASK)):
            start = min(max(offsets[b], 0), length)
            end = min(max(offsets[b + 1], start), length)
            acc[:] = -np.inf if mode == _MAX else 0.0
            count = _reduce_bag(table, indices, weights, start, end, mode, padding_idx, acc)
            if count == 0:
                acc[:] = 0.0  # an empty bag (or one of only padding) is zeros in every mode
            _store_row(out, b, acc, F32(1.0) / F32(count) if mode == _MEAN and count else F32(1.0))


def embedding_bag(outs, table, indices, offsets, per_sample_weights, *, mode, padding_idx):
    (out,) = outs
    if out.size:
        _bags_kernel(raw_view(table), indices, offsets, raw_view(per_sample_weights), raw_view(out), BAG_MODES[mode],
                     _NO_PADDING if padding_idx is None else padding_idx)


def spmm_csr(outs, indptr, indices, values, dense):
    (out,) = outs
    if out.size:
        _bags_kernel(raw_view(dense), indices, indptr, raw_view(values), raw_view(out), BAG_MODES["sum"], _NO_PADDING)


KERNELS = (Kernel("embedding_bag", embedding_bag), Kernel("spmm_csr", spmm_csr))
