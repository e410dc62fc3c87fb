"""Sparse ops of recommendation models: embedding_bag (pooled lookups in a table) and spmm_csr.

embedding_bag reduces bags of rows of a table [V, D]. The bags come in the CSR layout that
recommendation data loaders produce: `indices` [L] holds the row ids of all bags back to back and
`offsets` [B + 1] (non-decreasing, from 0 to L) delimits them, bag b being
indices[offsets[b]:offsets[b + 1]]. `mode` "sum" adds the rows (each scaled by its entry of
`per_sample_weights` if given), "mean" divides the sum by the number of rows, "max" takes the
elementwise maximum. Entries equal to `padding_idx` are left out (also from the count of "mean");
a bag left with no rows gives zeros in every mode. The rules follow torch.nn.functional.embedding_bag
with include_last_offset=True (per_sample_weights only with "sum"; a negative padding_idx counts
from the end of the table).

spmm_csr multiplies a sparse matrix [M, K] in CSR form (indptr [M + 1], column ids `indices` and
`values` [nnz]) by a dense [K, N]. It is embedding_bag in "sum" mode with the values as
per-sample weights, and the kernels share their code.

Index values and offsets are validated for every array library (device arrays by their library's
reductions: one small synchronization), so kernels may trust them.
"""
import math

import numpy as np

from hal.dtypes import INTS, name_of
from hal.opdef import Attr, InvalidArgument, check_offsets, check_range, ErrorSample, OpDef, Sample, Tensor, random, strided

MODES = ("sum", "mean", "max")


# ---------------------------------------------------------------- checks shared by both ops

def _same_dtype(a, name, like):
    if name_of(a[name].dtype) != name_of(a[like].dtype):
        raise InvalidArgument(name, f"the dtype of {like} ({name_of(a[like].dtype)})", name_of(a[name].dtype))


def _check_pointers(a, ptr, ids, count, what, bound=""):
    """`a[ptr]` must run from 0 to the length of `a[ids]` without decreasing, and the values of
    `a[ids]` (`what`) must lie in [0, count) (`bound` says where count comes from)."""
    p, length = a[ptr], a[ids].shape[0]
    if p.shape[0] == 0:
        raise InvalidArgument(ptr, f"at least one entry ({ptr}[0] == 0)", "shape (0,)")
    check_offsets(ptr, p, 0, length, exact=True)
    check_range(ids, a[ids], 0, count, what + bound)


def _longest(p):
    """The longest bag / row of an offsets / indptr array (host or device)."""
    p = np.asarray(p)
    return int(np.diff(p).max(initial=0)) if p.size > 1 else 0


def _growth(ptr):
    # A sum of n fp32 products: rounding error grows like sqrt(n) relative to the sum of |terms|.
    return lambda a: math.sqrt(max(_longest(a[ptr]), 1))


def _segments(ptr):
    """The segment (bag or row) of every entry."""
    return np.repeat(np.arange(len(ptr) - 1), np.diff(ptr).astype(np.int64))


def _power_law(rng, n, size):
    """`size` ids in [0, n) drawn with probability ~ 1 / rank (Zipf, as item popularity in
    recommendation data): a few hot ids repeat, most appear once. Ranks map to ids through a
    random permutation, so the hot rows are scattered over the table."""
    ranks = np.exp(rng.uniform(0.0, math.log(max(n, 1)), size)).astype(np.int64) - 1
    return rng.permutation(max(n, 1))[np.minimum(ranks, n - 1)] if n else ranks


def _offsets(lengths, dtype):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(dtype)


# ---------------------------------------------------------------- embedding_bag

def _bag_check(a):
    table, indices = a["table"], a["indices"]
    rows = table.shape[0]
    _same_dtype(a, "offsets", "indices")
    w = a["per_sample_weights"]
    if w is not None:
        if a["mode"] != "sum":
            raise InvalidArgument("per_sample_weights", "None unless mode is 'sum'", f"weights with mode {a['mode']!r}")
        if tuple(w.shape) != tuple(indices.shape):
            raise InvalidArgument("per_sample_weights", f"shape {tuple(indices.shape)} (one weight per index)", tuple(w.shape))
        _same_dtype(a, "per_sample_weights", "table")
    p = a["padding_idx"]
    if p is not None:
        if not -rows <= p < rows:
            raise InvalidArgument("padding_idx", f"an int in [-{rows}, {rows})", p)
        a["padding_idx"] = p + rows if p < 0 else p
    _check_pointers(a, "offsets", "indices", rows, "row ids")


def _bag_terms(a, absolute=False):
    """(bag of each kept entry, its row of the table times its weight) in float64."""
    bags, ids = _segments(a["offsets"]), a["indices"].astype(np.int64)
    keep = ids != a["padding_idx"] if a["padding_idx"] is not None else np.ones(ids.shape, bool)
    rows = a["table"][ids[keep]]
    if a["per_sample_weights"] is not None:
        rows = rows * a["per_sample_weights"][keep, None]
    return bags[keep], np.abs(rows) if absolute else rows


def _bag_reduce(a, absolute=False):
    bags, rows = _bag_terms(a, absolute)
    out = np.zeros((len(a["offsets"]) - 1, a["table"].shape[1]))
    count = np.bincount(bags, minlength=out.shape[0])
    if a["mode"] == "max":
        out[:] = -np.inf
        np.maximum.at(out, bags, rows)
        out[count == 0] = 0.0
        return out
    np.add.at(out, bags, rows)
    if a["mode"] == "mean":
        out /= np.maximum(count, 1)[:, None]
    return out


def _bag_reference(a):
    return [_bag_reduce(a)]


def _bag_magnitude(a, refs):
    # sum / mean round relative to the sum of |terms|; max is exact in fp32 (only the final rounding).
    return [np.abs(refs[0]) if a["mode"] == "max" else _bag_reduce(a, absolute=True)]


def _bag_args(rng, dtype, rows, dim, lengths, mode="sum", weights=False, padding_idx=None, index="int64", ids=None):
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    ids = rng.integers(0, rows, total) if ids is None else ids
    return {"table": random(rng, (rows, dim), dtype), "indices": np.asarray(ids).astype(index), "offsets": _offsets(lengths, index),
            "mode": mode, "per_sample_weights": random(rng, (total,), dtype) if weights else None, "padding_idx": padding_idx}


def _bag_samples(rng, dtype):
    yield Sample(_bag_args(rng, dtype, 5, 1, [2, 1, 3]), "D = 1")
    yield Sample(_bag_args(rng, dtype, 40, 7, [3, 0, 5, 1, 0, 8], index="int32"), "D = 7, empty bags, int32")
    for mode in MODES:
        lengths = rng.integers(0, 30, 37)
        yield Sample(_bag_args(rng, dtype, 1000, 97, lengths, mode, ids=_power_law(rng, 1000, lengths.sum())), f"{mode}, D = 97, power-law ids")
        yield Sample(_bag_args(rng, dtype, 300, 130, rng.integers(0, 12, 21), mode, index="int32", padding_idx=7), f"{mode}, D = 130, padding_idx, int32")
    yield Sample(_bag_args(rng, dtype, 500, 257, rng.integers(1, 20, 13), weights=True), "sum, D = 257, per_sample_weights")
    lengths = rng.integers(0, 50, 64)
    yield Sample(_bag_args(rng, dtype, 5000, 128, lengths, weights=True, index="int32", ids=_power_law(rng, 5000, lengths.sum())),
                 "sum, D = 128, per_sample_weights, power-law ids, int32")
    repeated = _bag_args(rng, dtype, 50, 64, [6, 4, 9], "mean", ids=[3, 3, 3, 8, 3, 3, 1, 1, 1, 1, 49, 49, 0, 0, 49, 3, 3, 3, 3])
    yield Sample(repeated, "mean, repeated ids")
    padded = _bag_args(rng, dtype, 30, 33, [4, 3, 2, 5], "mean", padding_idx=-1, ids=[29, 1, 29, 2, 29, 29, 29, 0, 29, 3, 4, 29, 5, 6])
    yield Sample(padded, "mean, padding_idx = -1, a bag of only padding", "edge")
    negative = _bag_args(rng, dtype, 20, 65, [3, 4, 0, 2], "max", padding_idx=0)
    negative["table"] = -np.abs(negative["table"]) - 1  # max over negative rows: must not start from 0
    negative["indices"][1] = 0
    yield Sample(negative, "max over negative rows, padding", "edge")
    nan = _bag_args(rng, dtype, 12, 16, [3, 2, 4], "max", ids=[1, 5, 2, 7, 8, 5, 0, 3, 9])
    nan["table"][5, 3] = np.nan  # row 5 is in bags 0 and 2
    yield Sample(nan, "max with a NaN in two bags: NaN there, as torch.amax", "edge")
    yield Sample(_bag_args(rng, dtype, 100, 48, [1000, 3, 500]), "sum, bags of 1000 and 500", "edge")
    view = _bag_args(rng, dtype, 70, 96, rng.integers(0, 9, 11), "mean")
    view["table"] = strided(view["table"])
    yield Sample(view, "strided table", "edge")
    view = _bag_args(rng, dtype, 70, 40, rng.integers(0, 9, 11), weights=True)
    view["indices"], view["per_sample_weights"] = strided(view["indices"]), strided(view["per_sample_weights"])
    yield Sample(view, "strided indices and weights", "edge")
    yield Sample(_bag_args(rng, dtype, 10, 16, [0, 0, 0], "max"), "only empty bags (L = 0)", "edge")
    yield Sample(_bag_args(rng, dtype, 10, 16, []), "no bags (B = 0)", "edge")
    yield Sample(_bag_args(rng, dtype, 0, 8, [0, 0], "mean"), "empty table, empty bags", "edge")
    yield Sample(_bag_args(rng, dtype, 10, 0, [2, 3]), "D = 0", "edge")


def _bag_errors(rng):
    def base(**over):
        a = _bag_args(rng, "float32", 10, 4, [2, 0, 3])
        a.update(over)
        return a

    ids = np.array([1, 2, 3, 4, 5])
    yield ErrorSample(base(mode="mean", per_sample_weights=random(rng, (5,), "float32")), "weights with mean", match="per_sample_weights")
    yield ErrorSample(base(mode="max", per_sample_weights=random(rng, (5,), "float32")), "weights with max", match="per_sample_weights")
    yield ErrorSample(base(per_sample_weights=random(rng, (4,), "float32")), "weights length", match="per_sample_weights")
    yield ErrorSample(base(per_sample_weights=random(rng, (5,), "float16")), "weights dtype", match="per_sample_weights")
    yield ErrorSample(base(indices=np.array([1, 2, 10, 4, 5])), "index == V", match="indices")
    yield ErrorSample(base(indices=np.array([1, 2, -1, 4, 5])), "negative index", match="indices")
    yield ErrorSample(base(indices=ids, offsets=np.array([1, 2, 2, 5])), "offsets[0] != 0", match="offsets")
    yield ErrorSample(base(indices=ids, offsets=np.array([0, 3, 2, 5])), "decreasing offsets", match="offsets")
    yield ErrorSample(base(indices=ids, offsets=np.array([0, 2, 2, 4])), "offsets[-1] != L", match="offsets")
    yield ErrorSample(base(indices=ids, offsets=np.array([0, 2, 2, 7])), "offsets past L", match="offsets")
    yield ErrorSample(base(offsets=np.zeros(0, np.int64)), "empty offsets", match="offsets")
    yield ErrorSample(base(offsets=np.array([0, 2, 2, 5], np.int32)), "offsets dtype != indices dtype", match="offsets")
    yield ErrorSample(base(indices=ids.astype(np.float32)), "float indices", match="dtype")
    yield ErrorSample(base(indices=ids.reshape(5, 1)), "rank-2 indices", match="rank")
    yield ErrorSample(base(table=random(rng, (10,), "float32")), "rank-1 table", match="rank")
    yield ErrorSample(base(table=np.ones((10, 4), np.int32)), "int table", match="dtype")
    yield ErrorSample(base(mode="min"), "unknown mode", match="mode")
    yield ErrorSample(base(padding_idx=10), "padding_idx == V", match="padding_idx")
    yield ErrorSample(base(padding_idx=-11), "padding_idx < -V", match="padding_idx")


def _bag_bench(rng, dtype, rows=1_000_000, dim=128, bags=65536, per_bag=40, mode="sum"):
    """A recommendation lookup: a 1M-row table, 65536 bags of 40 ids with popular items repeating."""
    return _bag_args(rng, dtype, rows, dim, np.full(bags, per_bag), mode, ids=_power_law(rng, rows, bags * per_bag))


def _bag_cost(a):
    (length,), dim = a["indices"].shape, a["table"].shape[1]
    itemsize = a["table"].itemsize
    moved = length * (dim * itemsize + a["indices"].itemsize) + (len(a["offsets"]) - 1) * dim * itemsize
    return 2 * length * dim, moved


def _bag_peer(t):
    import torch.nn.functional as F

    return lambda: F.embedding_bag(t["indices"], t["table"], t["offsets"], mode=t["mode"], per_sample_weights=t["per_sample_weights"],
                                   include_last_offset=True, padding_idx=t["padding_idx"])


embedding_bag = OpDef(
    name="embedding_bag",
    doc="embedding_bag(table, indices, offsets, *, mode='sum', per_sample_weights=None, padding_idx=None): for each bag "
    "b = indices[offsets[b]:offsets[b + 1]], the sum, mean or max of its rows of table [V, D] (rows scaled by "
    "per_sample_weights in 'sum' mode; entries equal to padding_idx left out; an empty bag gives zeros); out [B, D].",
    params=[
        Tensor("table", rank=2),
        Tensor("indices", INTS, rank=1),
        Tensor("offsets", INTS, rank=1),
        "*",
        Attr("mode", "sum", choices=MODES),
        Tensor("per_sample_weights", rank=1, optional=True),
        Attr("padding_idx", None, int),
    ],
    check=_bag_check,
    outputs=lambda a: [((a["offsets"].shape[0] - 1, a["table"].shape[1]), name_of(a["table"].dtype))],
    reference=_bag_reference,
    samples=_bag_samples,
    error_samples=_bag_errors,
    growth=_growth("offsets"),
    magnitude=_bag_magnitude,
    bench=_bag_bench,
    cost=_bag_cost,
    torch_peer=_bag_peer,
)


# ---------------------------------------------------------------- spmm_csr

def _spmm_check(a):
    _same_dtype(a, "indices", "indptr")
    if a["values"].shape != a["indices"].shape:
        raise InvalidArgument("values", f"shape {tuple(a['indices'].shape)} (one value per column id)", tuple(a["values"].shape))
    _same_dtype(a, "dense", "values")
    _check_pointers(a, "indptr", "indices", a["dense"].shape[0], "column ids", " (the rows of dense)")


def _spmm_product(a, absolute=False):
    rows, values, dense = _segments(a["indptr"]), a["values"], a["dense"]
    if absolute:
        values, dense = np.abs(values), np.abs(dense)
    out = np.zeros((len(a["indptr"]) - 1, dense.shape[1]))
    np.add.at(out, rows, values[:, None] * dense[a["indices"].astype(np.int64)])
    return out


def _csr(rng, m, k, lengths, index="int64", cols=None):
    """indptr and column ids of an m x k CSR matrix with the given row lengths (ids sorted per row)."""
    lengths = np.asarray(lengths, np.int64)
    indptr = _offsets(lengths, index)
    cols = rng.integers(0, k, int(lengths.sum())) if cols is None else np.asarray(cols)
    rows = _segments(indptr)
    return indptr, cols[np.lexsort((cols, rows))].astype(index)


def _spmm_args(rng, dtype, m, k, n, lengths, index="int64", cols=None):
    indptr, indices = _csr(rng, m, k, lengths, index, cols)
    return {"indptr": indptr, "indices": indices, "values": random(rng, indices.shape, dtype), "dense": random(rng, (k, n), dtype)}


def _spmm_samples(rng, dtype):
    yield Sample(_spmm_args(rng, dtype, 1, 1, 1, [1]), "1x1 @ 1x1")
    yield Sample(_spmm_args(rng, dtype, 6, 9, 7, [2, 0, 4, 1, 0, 9], index="int32"), "6x9 @ 9x7, empty rows, int32")
    yield Sample(_spmm_args(rng, dtype, 37, 200, 97, rng.integers(0, 40, 37)), "37x200 @ 200x97")
    lengths = rng.integers(0, 60, 29)
    yield Sample(_spmm_args(rng, dtype, 29, 500, 130, lengths, "int32", cols=_power_law(rng, 500, lengths.sum())), "power-law columns, N = 130, int32")
    yield Sample(_spmm_args(rng, dtype, 13, 64, 257, rng.integers(0, 64, 13)), "N = 257")
    yield Sample(_spmm_args(rng, dtype, 4, 5, 16, [6, 3, 0, 8], cols=[1, 1, 1, 4, 4, 0, 2, 2, 2, 0, 0, 0, 0, 3, 3, 3, 3]), "repeated column ids", "edge")
    yield Sample(_spmm_args(rng, dtype, 3, 2048, 8, [2048, 1, 1500]), "rows of 2048 and 1500 nonzeros", "edge")
    view = _spmm_args(rng, dtype, 17, 40, 33, rng.integers(0, 12, 17))
    view["dense"] = strided(view["dense"])
    yield Sample(view, "strided dense", "edge")
    view = _spmm_args(rng, dtype, 9, 30, 24, rng.integers(0, 8, 9), "int32")
    view["indices"], view["values"] = strided(view["indices"]), strided(view["values"])
    yield Sample(view, "strided indices and values", "edge")
    yield Sample(_spmm_args(rng, dtype, 0, 10, 8, []), "M = 0", "edge")
    yield Sample(_spmm_args(rng, dtype, 5, 10, 8, [0] * 5), "nnz = 0", "edge")
    yield Sample(_spmm_args(rng, dtype, 3, 0, 4, [0] * 3), "K = 0", "edge")
    yield Sample(_spmm_args(rng, dtype, 4, 6, 0, [1, 2, 0, 3]), "N = 0", "edge")


def _spmm_errors(rng):
    def base(**over):
        a = _spmm_args(rng, "float32", 3, 6, 4, [2, 0, 3])
        a.update(over)
        return a

    yield ErrorSample(base(indices=np.array([1, 2, 6, 4, 5])), "column id == K", match="indices")
    yield ErrorSample(base(indices=np.array([1, -2, 3, 4, 5])), "negative column id", match="indices")
    yield ErrorSample(base(indptr=np.array([1, 2, 2, 5])), "indptr[0] != 0", match="indptr")
    yield ErrorSample(base(indptr=np.array([0, 3, 2, 5])), "decreasing indptr", match="indptr")
    yield ErrorSample(base(indptr=np.array([0, 2, 2, 4])), "indptr[-1] != nnz", match="indptr")
    yield ErrorSample(base(indptr=np.zeros(0, np.int64)), "empty indptr", match="indptr")
    yield ErrorSample(base(indptr=np.array([0, 2, 2, 5], np.int32)), "indptr dtype != indices dtype", match="indices")
    yield ErrorSample(base(values=random(rng, (4,), "float32")), "values length", match="values")
    yield ErrorSample(base(dense=random(rng, (6, 4), "float16")), "dense dtype", match="dense")
    yield ErrorSample(base(dense=random(rng, (6,), "float32")), "rank-1 dense", match="rank")
    yield ErrorSample(base(values=np.ones(5, np.int32)), "int values", match="dtype")
    yield ErrorSample(base(indices=np.ones(5, np.float32)), "float column ids", match="dtype")


def _spmm_bench(rng, dtype, m=16384, k=16384, n=128, density=0.01):
    """A 16384 x 16384 matrix with 1% nonzeros (sorted column ids per row) times 16384 x 128."""
    nnz = int(m * k * density)
    flat = np.sort(rng.choice(m * k, nnz, replace=False))
    indptr = np.searchsorted(flat // k, np.arange(m + 1)).astype(np.int64)
    return {"indptr": indptr, "indices": (flat % k).astype(np.int64), "values": random(rng, (nnz,), dtype), "dense": random(rng, (k, n), dtype)}


def _spmm_cost(a):
    nnz, (k, n) = a["values"].shape[0], a["dense"].shape
    itemsize = a["dense"].itemsize
    return 2 * nnz * n, nnz * (itemsize + a["indices"].itemsize) + k * n * itemsize + (len(a["indptr"]) - 1) * n * itemsize


def _spmm_peer(t):
    import warnings

    import torch

    shape = (t["indptr"].shape[0] - 1, t["dense"].shape[0])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(t["indptr"], t["indices"], t["values"], size=shape, check_invariants=False)  # built once, as a user keeps it
    return lambda: matrix @ t["dense"]


spmm_csr = OpDef(
    name="spmm_csr",
    doc="spmm_csr(indptr, indices, values, dense): the CSR matrix [M, K] (row i holds values[indptr[i]:indptr[i + 1]] in "
    "columns indices[indptr[i]:indptr[i + 1]]) times dense [K, N], accumulated in fp32; out [M, N] of the values' dtype.",
    params=[Tensor("indptr", INTS, rank=1), Tensor("indices", INTS, rank=1), Tensor("values", rank=1), Tensor("dense", rank=2)],
    check=_spmm_check,
    outputs=lambda a: [((a["indptr"].shape[0] - 1, a["dense"].shape[1]), name_of(a["values"].dtype))],
    reference=lambda a: [_spmm_product(a)],
    samples=_spmm_samples,
    error_samples=_spmm_errors,
    growth=_growth("indptr"),
    magnitude=lambda a, refs: [_spmm_product(a, absolute=True)],
    bench=_spmm_bench,
    cost=_spmm_cost,
    torch_peer=_spmm_peer,
    dispatch_on="values",
)

OPS = (embedding_bag, spmm_csr)
