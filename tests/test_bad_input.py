"""Regression tests of issue 14: bad input gets a HalError naming the op and the argument before any
kernel runs, whatever the array library and backend. Validation happens in the op definitions, so
the sims are checked too: no emulator is built for a call that is refused."""
import numpy as np
import pytest
import torch

import hal
from hal import dispatch
from hal.ops import ALL

BACKENDS = ["cpu", "cuda-sim"]


def refused(op, arg, backend, **kwargs):
    """Call hal.ops.<op> on `backend`, expect a SchemaError for `arg` naming both."""
    with pytest.raises(hal.SchemaError) as info:
        ALL[op](backend=backend, **kwargs)
    assert (info.value.op, info.value.arg) == (op, arg), str(info.value)
    assert f"{op}: argument '{arg}'" in str(info.value)
    return str(info.value)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- 1. index values, any array library


def _grouped(rng, offsets):
    return dict(x_sorted=f32(rng, 8, 8), w=f32(rng, 2, 6, 8), expert_offsets=offsets)


def _bag(rng, ids, offsets):
    return dict(table=f32(rng, 9, 4), indices=ids, offsets=offsets)


def _rope(rng, positions):
    return dict(q=f32(rng, 3, 2, 8), k=f32(rng, 3, 1, 8), cos=f32(rng, 5, 4), sin=f32(rng, 5, 4), positions=positions)


def _paged(rng, table, lens):
    return dict(q=f32(rng, 2, 4, 16), k_cache=f32(rng, 6, 8, 2, 16), v_cache=f32(rng, 6, 8, 2, 16), block_table=table, seq_lens=lens)


def _varlen(rng, cu_q):
    return dict(q=f32(rng, 5, 2, 16), k=f32(rng, 5, 1, 16), v=f32(rng, 5, 1, 16), cu_seqlens_q=cu_q,
                cu_seqlens_k=np.array([0, 2, 5], np.int32))


T32, T64 = torch.int32, torch.int64
BAD_INDICES = [
    ("grouped_gemm", "expert_offsets", lambda rng: _grouped(rng, torch.tensor([0, 3, 10_000_000], dtype=T32))),
    ("grouped_gemm", "expert_offsets", lambda rng: _grouped(rng, torch.tensor([-5, 3, 7], dtype=T32))),
    ("grouped_gemm", "expert_offsets", lambda rng: _grouped(rng, torch.tensor([0, 3, 2**32 + 5], dtype=T64))),  # wraps to 5 as int32
    ("grouped_gemm", "expert_offsets", lambda rng: _grouped(rng, torch.tensor([0, 6, 3], dtype=T32))),
    ("embedding_bag", "indices", lambda rng: _bag(rng, torch.tensor([1, 9, 2], dtype=T64), torch.tensor([0, 1, 3], dtype=T64))),
    ("embedding_bag", "indices", lambda rng: _bag(rng, torch.tensor([1, -1, 2], dtype=T32), torch.tensor([0, 1, 3], dtype=T32))),
    ("embedding_bag", "offsets", lambda rng: _bag(rng, torch.tensor([1, 2, 2], dtype=T64), torch.tensor([-5, 3, 99], dtype=T64))),
    ("spmm_csr", "indices", lambda rng: dict(indptr=torch.tensor([0, 2], dtype=T32), indices=torch.tensor([0, 7], dtype=T32),
                                             values=f32(rng, 2), dense=f32(rng, 4, 3))),
    ("rope", "positions", lambda rng: _rope(rng, torch.tensor([0, 5, 1], dtype=T64))),
    ("moe_align", "topk_ids", lambda rng: dict(topk_ids=torch.tensor([[0, 2**32 + 1]], dtype=T64), num_experts=4, block_m=2)),
    ("attention", "cu_seqlens_q", lambda rng: _varlen(rng, torch.tensor([0, 4, 2], dtype=T32))),
    ("paged_decode_attention", "block_table", lambda rng: _paged(rng, torch.tensor([[0, 1], [2, 6]], dtype=T32), torch.tensor([9, 12], dtype=T32))),
    ("paged_decode_attention", "seq_lens", lambda rng: _paged(rng, torch.tensor([[0, 1], [2, 3]], dtype=T32), torch.tensor([9, 17], dtype=T32))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, arg, make", BAD_INDICES, ids=[f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(BAD_INDICES)])
def test_index_values_of_torch_tensors_are_checked(rng, backend, op, arg, make):
    refused(op, arg, backend, **make(rng))


def test_checked_torch_indices_still_run(rng):
    a = _grouped(rng, torch.tensor([0, 3, 7], dtype=T32))
    out = hal.ops.grouped_gemm(torch.from_numpy(a["x_sorted"]), torch.from_numpy(a["w"]), a["expert_offsets"], backend="cpu")
    want = np.concatenate([a["x_sorted"][:3] @ a["w"][0].T, a["x_sorted"][3:7] @ a["w"][1].T, np.zeros((1, 6))])
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_counts_are_clamped_not_checked(rng, backend):
    """The exception by design: the masked layout's counts are never read on the host (no SchemaError,
    no synchronization); a count < 0 is 0 rows, one > M is M rows (2**32 + 1 too, not its low word 1)."""
    x, w = f32(rng, 3, 4, 8), f32(rng, 3, 6, 8)
    out = hal.ops.grouped_gemm_masked(torch.from_numpy(x), torch.from_numpy(w), torch.tensor([-7, 2**32 + 1, 2], dtype=T64), backend=backend)
    want = np.zeros((3, 4, 6))
    want[1], want[2, :2] = x[1] @ w[1].T, x[2, :2] @ w[2].T
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 2. byte order


BYTE_SWAPPED = [
    ("softmax", "x", lambda rng: dict(x=f32(rng, 1, 3).astype(">f4"))),
    ("attention", "cu_seqlens_q", lambda rng: _varlen(rng, np.array([0, 2, 5], ">i4"))),
    ("paged_decode_attention", "block_table", lambda rng: _paged(rng, np.array([[0, 1], [2, 3]], ">i4"), np.array([9, 12], np.int32))),
    ("paged_decode_attention", "seq_lens", lambda rng: _paged(rng, np.array([[0, 1], [2, 3]], np.int32), np.array([9, 12], ">i4"))),
    ("rope", "positions", lambda rng: _rope(rng, np.array([0, 4, 1], ">i8"))),
    ("gemm", "b", lambda rng: dict(a=f32(rng, 2, 3), b=f32(rng, 3, 2).astype(">f4"))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, arg, make", BYTE_SWAPPED, ids=[f"{op}-{arg}" for op, arg, _ in BYTE_SWAPPED])
def test_byte_swapped_arrays_are_refused(rng, backend, op, arg, make):
    assert "native byte order" in refused(op, arg, backend, **make(rng))


# ---------------------------------------------------------------- 4, 5. attributes: None, kinds, ranges


def _attention(rng, **attrs):
    return dict(q=f32(rng, 1, 4, 2, 8), k=f32(rng, 1, 4, 2, 8), v=f32(rng, 1, 4, 2, 8), **attrs)


BAD_ATTRS = [
    ("gemm", "alpha", lambda rng: dict(a=f32(rng, 2, 3), b=f32(rng, 3, 2), alpha=None)),
    ("gemm", "alpha", lambda rng: dict(a=f32(rng, 2, 3), b=f32(rng, 3, 2), alpha=10**400)),
    ("gemm", "beta", lambda rng: dict(a=f32(rng, 2, 3), b=f32(rng, 3, 2), beta=float("nan"))),
    ("moe_route", "scoring", lambda rng: dict(logits=f32(rng, 3, 8), k=2, scoring=None)),
    ("moe_route", "k", lambda rng: dict(logits=f32(rng, 3, 8), k=2.5)),
    ("moe_route", "renormalize", lambda rng: dict(logits=f32(rng, 3, 8), k=2, renormalize="no")),
    ("softmax", "dim", lambda rng: dict(x=f32(rng, 2, 3), dim=None)),
    ("softmax", "dim", lambda rng: dict(x=f32(rng, 2, 3), dim=True)),
    ("quantize", "group_size", lambda rng: dict(x=f32(rng, 4, 64), fmt="int8", granularity="group", group_size=None)),
    ("quantize", "group_size", lambda rng: dict(x=f32(rng, 4, 64), fmt="int8", granularity="group", group_size=2**31)),
    ("embedding_bag", "mode", lambda rng: _bag(rng, np.array([1, 2]), np.array([0, 2])) | {"mode": None}),
    ("mla_decode", "scale", lambda rng: dict(q_nope=f32(rng, 1, 2, 8), q_pe=f32(rng, 1, 2, 4), kv_latent=f32(rng, 2, 4, 8),
                                             k_pe=f32(rng, 2, 4, 4), block_table=np.array([[0]], np.int32),
                                             seq_lens=np.array([3], np.int32), scale=None)),
    ("attention", "causal", lambda rng: _attention(rng, causal="False")),
    ("attention", "window", lambda rng: _attention(rng, window=2.7)),
    ("attention", "window", lambda rng: _attention(rng, window=float("inf"))),
    ("attention", "window", lambda rng: _attention(rng, window=2**31)),
    ("rope", "interleaved", lambda rng: _rope(rng, np.array([0, 4, 1])) | {"interleaved": "no"}),
    ("rms_norm", "eps", lambda rng: dict(x=f32(rng, 2, 4), weight=f32(rng, 4), eps=10**400)),
    ("gemm", "activation", lambda rng: dict(a=f32(rng, 2, 3), b=f32(rng, 3, 2), activation=np.array(["relu"]))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, arg, make", BAD_ATTRS, ids=[f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(BAD_ATTRS)])
def test_attributes_are_taken_strictly(rng, backend, op, arg, make):
    refused(op, arg, backend, **make(rng))


def test_numpy_scalars_are_attributes_too(rng):
    x = f32(rng, 2, 3)
    got = hal.ops.softmax(x, dim=np.int64(0), backend="cpu")
    np.testing.assert_allclose(got, np.exp(x) / np.exp(x).sum(0), rtol=1e-5)
    a, b = f32(rng, 2, 3), f32(rng, 3, 2)
    np.testing.assert_allclose(hal.ops.gemm(a, b, alpha=np.float32(0.5), backend="cpu"), 0.5 * (a @ b), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dimensions_past_int32_are_refused(backend):
    huge = np.broadcast_to(np.float32(1.0), (2**31, 1))  # no memory behind it
    assert "2**31" in refused("gemm", "a", backend, a=huge, b=np.ones((1, 1), np.float32))


# ---------------------------------------------------------------- 6. meta tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_are_refused(backend):
    assert "device" in refused("softmax", "x", backend, x=torch.ones(2, 3, device="meta"))
    refused("gemm", "b", backend, a=torch.ones(2, 3), b=torch.ones(3, 2, device="meta"))


# ---------------------------------------------------------------- 7. zero-size


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_head_dim_zero_is_refused(rng, backend):
    a = _paged(rng, np.array([[0, 1], [2, 3]], np.int32), np.array([9, 12], np.int32))
    a["q"], a["k_cache"], a["v_cache"] = (np.zeros(a[n].shape[:-1] + (0,), np.float32) for n in ("q", "k_cache", "v_cache"))
    assert "head dims" in refused("paged_decode_attention", "q", backend, **a)


def test_empty_outputs_launch_no_kernel(make_backend, rng):
    ran = []
    name = make_backend("recording", {"softmax": lambda outs, **a: ran.append(outs), "attention": lambda outs, **a: ran.append(outs)})
    assert hal.ops.softmax(f32(rng, 0, 16), backend=name).shape == (0, 16)
    zero_heads = _attention(rng)
    zero_heads["q"] = f32(rng, 1, 4, 0, 8)
    assert hal.ops.attention(**zero_heads, backend=name).shape == (1, 4, 0, 8)
    assert ran == []
    hal.ops.softmax(f32(rng, 2, 16), backend=name)
    assert len(ran) == 1


# ---------------------------------------------------------------- 9. allocation bounds, out of memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_absurd_sizes_are_refused_before_allocating(rng, backend):
    ids = rng.integers(0, 4, (3, 2)).astype(np.int32)
    refused("moe_align", "num_experts", backend, topk_ids=ids, num_experts=2**40, block_m=1)
    a, b = np.ones((2**20, 1), np.float32), np.ones((1, 2**20), np.float32)  # a 4 TiB product
    assert "bytes" in refused("gemm", "outputs", backend, a=a, b=b)


def test_out_of_memory_is_a_hal_error(make_backend, rng):
    def starved(outs, **a):
        raise MemoryError("no room")

    name = make_backend("starved", {"softmax": starved})
    with pytest.raises(hal.OutOfMemory, match="softmax on starved: out of memory") as info:
        hal.ops.softmax(f32(rng, 2, 3), backend=name)
    assert isinstance(info.value, hal.HalError) and isinstance(info.value, MemoryError)


# ---------------------------------------------------------------- 11. HAL_FALLBACK


def test_hal_fallback_names_the_variable_and_ignores_case(monkeypatch):
    monkeypatch.setenv("HAL_FALLBACK", "sometimes")
    with pytest.raises(hal.SchemaError, match="HAL_FALLBACK") as info:
        hal.use(None)
    assert "hal.use" not in str(info.value)
    for value, policy in [("ERROR", "error"), ("Warn", "warn")]:
        monkeypatch.setenv("HAL_FALLBACK", value)
        hal.use(None)
        assert dispatch._settings()[1] == policy
    monkeypatch.delenv("HAL_FALLBACK")
    with hal.use(None, fallback="Error"):
        assert dispatch._settings()[1] == "error"
    hal.use(None, fallback="ERROR")
    assert dispatch._settings()[1] == "error"


# ---------------------------------------------------------------- 8. NaN / Inf in the float64 references


def test_reference_relu_propagates_nan(rng):
    a = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal((4, 5)), "bias": None, "c": None,
         "activation": "relu", "alpha": 1.0, "beta": 0.0}
    a["a"][1, 2] = np.nan
    out = hal.ops.gemm.reference(a)[0]
    assert np.isnan(out[1]).all() and not np.isnan(out[[0, 2]]).any()


def test_reference_route_ranks_nan_first_ties_to_lower_index(rng):
    base = {"k": 3, "n_group": None, "topk_group": None, "bias": None, "renormalize": True, "scaling": 1.0}
    logits = rng.uniform(-1, 1, (2, 6))
    logits[0, 4] = logits[1, 2] = np.nan
    w, ids = hal.ops.moe_route.reference(base | {"logits": logits, "scoring": "softmax"})
    assert ids[0].tolist() == [0, 1, 2] and np.isnan(w[0]).all()  # every score of that token is NaN
    w, ids = hal.ops.moe_route.reference(base | {"logits": logits, "scoring": "sigmoid"})
    assert ids[0, 0] == 4 and ids[1, 0] == 2 and np.isnan(w[0]).all()
    finite = np.delete(np.arange(6), 4)
    assert ids[0, 1:].tolist() == finite[np.argsort(-logits[0, finite], kind="stable")][:2].tolist()
    logits = np.full((1, 8), np.nan)
    logits[0, [1, 6]] = 3.0
    _, ids = hal.ops.moe_route.reference(base | {"logits": logits, "scoring": "sigmoid", "n_group": 4, "topk_group": 2})
    assert ids[0].tolist() == [0, 2, 3]  # groups 0 and 1 kept (NaN top-2 sums tie), their NaN scores before expert 1's


def test_reference_embedding_bag_max_propagates_nan(rng):
    table = rng.standard_normal((5, 3))
    table[2, 1] = np.nan
    a = {"table": table, "indices": np.array([0, 2, 1, 3]), "offsets": np.array([0, 2, 4]), "mode": "max",
         "per_sample_weights": None, "padding_idx": None}
    out = hal.ops.embedding_bag.reference(a)[0]
    assert np.isnan(out[0, 1]) and not np.isnan(np.delete(out.ravel(), 1)).any()


def test_reference_fp8_scales_promote_each_block(rng):
    import ml_dtypes

    a = rng.integers(-4, 5, (2, 256)).astype(ml_dtypes.float8_e4m3fn)
    a[0, :128] = np.tile([3.0, -1.0], 64)  # block 0 of row 0 sums to 128 through values of both signs
    a[1, :128] = 0
    b = np.ones((3, 256), ml_dtypes.float8_e4m3fn)
    a_scales, b_scales = rng.uniform(0.5, 2, (2, 2)).astype(np.float32), rng.uniform(0.5, 2, (1, 2)).astype(np.float32)
    a_scales[:, 0] = np.inf
    out = hal.ops.fp8_gemm_blockscale.reference({"a": a, "a_scales": a_scales, "b": b, "b_scales": b_scales})[0]
    assert (out[0] == np.inf).all()  # inf times the partial sum 128 (not inf - inf of scaled elements)
    assert np.isnan(out[1]).all()  # inf times the partial sum 0


def test_device_arrays_are_reduced_by_their_library(monkeypatch):
    # No GPU here: a torch CPU tensor presented as a CUDA one takes the device path (torch's own min,
    # max and comparisons instead of a NumPy view).
    from hal import opdef

    monkeypatch.setattr(opdef, "device_type", lambda x: 2)
    assert opdef.index_values("ids", torch.tensor([1, 2])).__class__ is torch.Tensor
    with pytest.raises(opdef.InvalidArgument, match="non-decreasing"):
        opdef.check_offsets("offsets", torch.tensor([0, 5, 3]), 0, 8)
    with pytest.raises(opdef.InvalidArgument, match=r"\[0, 8\]"):
        opdef.check_offsets("offsets", torch.tensor([0, 3, 9]), 0, 8)
    with pytest.raises(opdef.InvalidArgument, match=r"\[-1, 1\]"):
        opdef.check_range("ids", torch.tensor([1, -1]), 0, 8)
    opdef.check_offsets("offsets", torch.tensor([0, 3, 8]), 0, 8, exact=True)
