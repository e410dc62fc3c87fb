"""embedding_bag and spmm_csr beyond the conformance suite: agreement with PyTorch for every mode
(padding_idx, per_sample_weights, int32 / int64 ids), the argument checks, empty bags, and the
kernels' own bounds safety when the checks cannot run (ids the op could not see), on cpu and on
both emulated GPU backends (including AddressSanitizer builds of the kernel files)."""
import numpy as np
import pytest

import hal
from hal.errors import SchemaError
from hal.ops import sparse

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKENDS = ["cpu", "cuda-sim", "rocm-sim"]


def available(name):
    ok, reason = hal.registry().entry(name).status
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request):
    return available(request.param)


def bags(rng, rows=50, dim=37, lengths=(3, 0, 7, 1, 4, 0, 12), index="int64", padding=None):
    """A table and bags with empty ones, repeated ids and (if `padding`) a bag of only padding."""
    lengths = list(lengths)
    ids = rng.integers(0, rows, sum(lengths))
    ids[:3] = ids[0]  # a repeated id in the first bag
    if padding is not None:
        lengths.append(2)
        ids = np.concatenate([ids, [padding % rows] * 2])
        ids[5] = padding % rows
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return rng.standard_normal((rows, dim)).astype(np.float32), ids.astype(index), offsets.astype(index)


def torch_bag(table, ids, offsets, **kw):
    w = kw.pop("per_sample_weights", None)
    return F.embedding_bag(torch.from_numpy(ids), torch.from_numpy(table), torch.from_numpy(offsets), include_last_offset=True,
                           per_sample_weights=None if w is None else torch.from_numpy(w), **kw).numpy()


@pytest.mark.parametrize("index", ["int32", "int64"])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False), ("max", False)])
@pytest.mark.parametrize("padding_idx", [None, 4, -1])
def test_embedding_bag_matches_torch(backend, rng, mode, weighted, padding_idx, index):
    table, ids, offsets = bags(rng, index=index, padding=padding_idx)
    w = rng.standard_normal(ids.shape).astype(np.float32) if weighted else None
    out = hal.ops.embedding_bag(table, ids, offsets, mode=mode, per_sample_weights=w, padding_idx=padding_idx, backend=backend)
    expected = torch_bag(table, ids, offsets, mode=mode, per_sample_weights=w, padding_idx=padding_idx)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", sparse.MODES)
def test_empty_bags_and_bags_of_padding_are_zeros(backend, rng, mode):
    table = -np.abs(rng.standard_normal((10, 24))).astype(np.float32) - 1.0  # max must not start from 0 either
    ids = np.array([7, 7, 2, 7], np.int64)
    offsets = np.array([0, 0, 2, 2, 4], np.int64)  # bags: empty, only padding, empty, [2, 7]
    out = hal.ops.embedding_bag(table, ids, offsets, mode=mode, padding_idx=7, backend=backend)
    assert not out[:3].any()
    np.testing.assert_allclose(out[3], table[2], rtol=1e-6)
    assert hal.ops.embedding_bag(table, ids[:0], offsets[:1], mode=mode, backend=backend).shape == (0, 24)


def test_torch_peer_does_the_same_work(rng):
    for mode in sparse.MODES:
        a = sparse.embedding_bag.bench(rng, "float32", rows=1000, dim=16, bags=50, per_bag=7, mode=mode)
        peer = sparse.embedding_bag.torch_peer(hal.opdef.as_torch(a))
        np.testing.assert_allclose(hal.ops.embedding_bag(**a, backend="cpu"), peer().numpy(), rtol=1e-5, atol=1e-5)
    a = sparse.spmm_csr.bench(rng, "float32", m=40, k=30, n=8, density=0.2)
    peer = sparse.spmm_csr.torch_peer(hal.opdef.as_torch(a))
    np.testing.assert_allclose(hal.ops.spmm_csr(**a, backend="cpu"), peer().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index", ["int32", "int64"])
def test_spmm_csr_matches_torch(backend, rng, index):
    m, k, n = 9, 40, 19
    lengths = np.array([3, 0, 10, 1, 0, 7, 2, 40, 5])
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(index)
    cols = np.concatenate([np.sort(rng.choice(k, c, replace=False)) for c in lengths]).astype(index)
    values = rng.standard_normal(cols.shape).astype(np.float32)
    dense = rng.standard_normal((k, n)).astype(np.float32)
    out = hal.ops.spmm_csr(indptr, cols, values, dense, backend=backend)
    matrix = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(values), size=(m, k), check_invariants=True)
    np.testing.assert_allclose(out, (matrix @ torch.from_numpy(dense)).numpy(), rtol=1e-5, atol=1e-5)
    # The same product as embedding_bag in sum mode with the values as weights.
    same = hal.ops.embedding_bag(dense, cols, indptr, per_sample_weights=values, backend=backend)
    np.testing.assert_allclose(out, same, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- checks

def test_ids_outside_the_table_are_refused(rng):
    table, ids, offsets = bags(rng, rows=50)
    for bad in (50, -1, 10**12):
        wrong = ids.copy()
        wrong[4] = bad
        with pytest.raises(SchemaError, match=r"embedding_bag: argument 'indices': expected row ids in \[0, 50\)"):
            hal.ops.embedding_bag(table, wrong, offsets)
    dense = rng.standard_normal((6, 3)).astype(np.float32)
    with pytest.raises(SchemaError, match=r"spmm_csr: argument 'indices'.*\[0, 6\)"):
        hal.ops.spmm_csr(np.array([0, 2]), np.array([1, 6]), np.ones(2, np.float32), dense)


@pytest.mark.parametrize("offsets, what", [([1, 3, 5], "offsets\\[0\\] == 0"), ([0, 4, 3, 5], "non-decreasing"), ([0, 2, 4], "offsets\\[-1\\] == 5"),
                                            ([0, 2, 6], "offsets\\[-1\\] == 5"), ([], "at least one entry")])
def test_bad_offsets_are_refused(rng, offsets, what):
    table = rng.standard_normal((9, 4)).astype(np.float32)
    with pytest.raises(SchemaError, match=what):
        hal.ops.embedding_bag(table, np.arange(5), np.array(offsets, np.int64))


def test_torch_rules_for_weights_and_padding(rng):
    table, ids, offsets = bags(rng, rows=20)
    w = np.ones(ids.shape, np.float32)
    for mode in ("mean", "max"):
        with pytest.raises(SchemaError, match="per_sample_weights.*None unless mode is 'sum'"):
            hal.ops.embedding_bag(table, ids, offsets, mode=mode, per_sample_weights=w)
    with pytest.raises(SchemaError, match="padding_idx"):
        hal.ops.embedding_bag(table, ids, offsets, padding_idx=20)
    with pytest.raises(SchemaError, match="offsets.*the dtype of indices"):
        hal.ops.embedding_bag(table, ids, offsets.astype(np.int32))


# ---------------------------------------------------------------- kernels on ids the op cannot check

def unchecked_bag(rng):
    """Ids outside the table and offsets past both ends: what a kernel may get from device arrays."""
    table = rng.standard_normal((8, 40)).astype(np.float32)
    ids = np.array([1, 8, 2, -3, 7, 1 << 30, 0], np.int64)
    offsets = np.array([-5, 3, 3, 7, 99], np.int64)  # bags [0, 3), [3, 3), [3, 7), [7, 7) after clamping
    expected = np.stack([table[[1, 2]].sum(0), np.zeros(40), table[[7, 0]].sum(0), np.zeros(40)]).astype(np.float32)
    return table, ids, offsets, expected


def test_ids_out_of_range_are_refused_whatever_the_array_library(backend, rng):
    table, ids, offsets, _ = unchecked_bag(rng)
    with pytest.raises(hal.SchemaError, match="embedding_bag"):
        hal.ops.embedding_bag(torch.from_numpy(table), torch.from_numpy(ids), torch.from_numpy(offsets), backend=backend)


def test_kernels_skip_ids_the_checks_would_refuse(backend, rng):
    # Defence in depth: the kernel itself, called past the op's checks, stays in bounds.
    table, ids, offsets, expected = unchecked_bag(rng)
    kernel = next(k for k in hal.registry().kernels[("embedding_bag", backend)] if "float32" in k.dtypes)
    out = np.full(expected.shape, np.nan, np.float32)
    kernel.fn((out,), **hal.ops.embedding_bag.bind((table, ids, offsets), {}))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("vendor", ["cuda", "rocm"])
def test_kernels_stay_in_bounds_under_asan(rng, vendor):
    from hal.backends.gpu import launch_sparse
    from hal.backends.gpu.backend import SimExecutor
    from hal.backends.gpu.vendor import VENDORS
    from hal.backends.sim import executor

    ok, why = executor.sanitizer_available("asan")
    if not ok:
        pytest.skip(f"asan unavailable here: {why}")
    ex = SimExecutor(VENDORS[vendor], VENDORS[vendor].sim_arch, mode="asan")
    table, ids, offsets, expected = unchecked_bag(rng)
    out = np.full(expected.shape, np.nan, np.float32)
    entry = next(k for k in launch_sparse.KERNELS if k.op == "embedding_bag")
    entry.glue(ex, entry, (out,), table, ids, offsets, None, "sum", None)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


# ---------------------------------------------------------------- GPU kernel paths

@pytest.mark.parametrize("sim", ["cuda-sim", "rocm-sim"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_unaligned_rows_take_the_element_path(sim, rng, dtype):
    available(sim)
    rows, dim = 30, 64
    flat = rng.standard_normal(rows * dim + 1).astype(dtype)
    table = flat[1:].reshape(rows, dim)  # contiguous, but the base is off the 16-byte grid
    ids = rng.integers(0, rows, 50)
    offsets = np.array([0, 10, 10, 33, 50])
    out = hal.ops.embedding_bag(table, ids, offsets, mode="mean", backend=sim)
    np.testing.assert_allclose(out.astype(np.float32), hal.ops.embedding_bag(table, ids, offsets, mode="mean", backend="cpu").astype(np.float32),
                               rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("sim", ["cuda-sim", "rocm-sim"])
def test_groups_stride_over_more_segments_than_the_grid(sim, rng, monkeypatch):
    from hal.backends.gpu import launch_sparse

    available(sim)
    monkeypatch.setattr(launch_sparse, "MAX_BLOCKS", 1)  # one block of 256 lanes: 16 groups for D = 128
    table, ids, offsets = bags(rng, rows=100, dim=128, lengths=rng.integers(0, 6, 70))
    expected = torch_bag(table, ids, offsets, mode="sum")
    np.testing.assert_allclose(hal.ops.embedding_bag(table, ids, offsets, backend=sim), expected, rtol=1e-5, atol=1e-5)
