"""The CPU paged decode kernel on the paths the conformance samples do not reach: a group of query heads
that is not a multiple of the 4 x 4 register block, head dims off the vector width, an odd block size,
sequences split over partitions, the non-finite rules, and the torch peer the benchmark times."""
import numpy as np
import pytest

import hal
from hal.conformance import judge
from hal.dispatch import poisoned_outputs
from hal.opdef import as_torch
from hal.ops.attention import _paged_args

OP = hal.ops.paged_decode_attention
NAMES = ("q", "k_cache", "v_cache", "block_table", "seq_lens")


def run(a):
    with poisoned_outputs():
        return OP(*(a[n] for n in NAMES), scale=a["scale"], softcap=a["softcap"], k_scale=a["k_scale"], v_scale=a["v_scale"], backend="cpu")


@pytest.mark.parametrize("kv", [None, "float8_e4m3fn", "float8_e4m3fnuz"])
def test_odd_shapes_split_context(rng, kv):
    """12 query heads over 2 KV heads (groups of 6: padded to 8), d 40 and block size 5, lengths past one
    partition (1024 keys) and one chunk, pages shuffled; q a strided view."""
    a = _paged_args(rng, "bfloat16", [1, 37, 2100], 12, 2, 40, 5, kv_dtype=kv)
    a["q"] = np.swapaxes(np.ascontiguousarray(np.swapaxes(a["q"], 0, 1)), 0, 1)
    worst, _, message = judge(OP, a, (np.asarray(run(a)),))
    assert worst <= 1.0, message


def test_non_finite(rng):
    """Sequence 0: V = +inf at one key (its KV head's query heads give +inf); sequence 1: K = NaN at one key
    (its KV head's rows NaN); sequence 2: a single key whose scores are all -inf (zeros, like the reference)."""
    a = _paged_args(rng, "float32", [70, 45, 1], 4, 2, 32, 8)
    k, v, table = a["k_cache"], a["v_cache"], a["block_table"]
    v[table[0, 3], 2, 1, :] = np.inf
    k[table[1, 1], 6, 0, 5] = np.nan
    a["q"][2] = np.abs(a["q"][2])
    k[table[2, 0], 0, :, :] = -np.inf
    out = np.asarray(run(a))
    want = OP.reference(a)[0]
    assert np.isposinf(out[0, 2:]).all() and np.isfinite(out[0, :2]).all()
    assert np.isnan(out[1, :2]).all() and np.isfinite(out[1, 2:]).all()
    assert (out[2] == 0).all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(want))


@pytest.mark.parametrize("kv", [None, "float8_e4m3fn"])
def test_torch_peer_does_the_same_work(rng, kv):
    """The benchmark's torch peer (gather, dequantize, SDPA with the groups folded) computes the op."""
    pytest.importorskip("torch")
    a = _paged_args(rng, "float32", [5, 40, 17], 8, 2, 32, 16, kv_dtype=kv)
    got = OP.torch_peer(as_torch(a))().numpy()
    np.testing.assert_allclose(got, OP.reference(a)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv", ["float8_e4m3fn", "float8_e4m3fnuz"])
def test_fp8_codes_decode_exactly(rng, kv, dtype):
    """All 256 fp8 codes as one V row (a single key: its weight is exactly 1) come out as ml_dtypes
    decodes them times v_scale, bit for bit, NaN codes as NaN; a sliced cache (rows not contiguous).
    bfloat16 queries take P V on vdpbf16ps where the CPU has it (the key paired with zeros)."""
    import ml_dtypes

    fp8 = getattr(ml_dtypes, kv)
    a = _paged_args(rng, dtype, [1, 1], 2, 1, 256, 3, kv_dtype=kv)
    codes = np.arange(256, dtype=np.uint8).view(fp8)
    v = np.zeros(a["v_cache"].shape[:2] + (3, 256), fp8)
    v[a["block_table"][:, 0], 0, 1] = codes
    a["v_cache"] = v[:, :, 1:2]
    a["v_scale"] = 0.5
    out = np.asarray(run(a))
    want = np.broadcast_to(codes.astype(np.float32) * np.float32(0.5), out.shape)
    np.testing.assert_array_equal(out, want)
