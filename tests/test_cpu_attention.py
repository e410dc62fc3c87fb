"""The CPU attention kernel on the paths the conformance samples do not reach: decode (one query per
sequence, routed through the paged decode kernel) with a sliding window, soft-capping, strided views and
varlen packing with empty sequences, and prefill with odd group sizes over several row tiles."""
import numpy as np
import pytest

import hal
from hal.conformance import judge
from hal.dispatch import poisoned_outputs
from hal.ops.attention import _dense, _varlen

OP = hal.ops.attention
ATTRS = ("causal", "scale", "window", "softcap", "cu_seqlens_q", "cu_seqlens_k")


def check(a):
    with poisoned_outputs():
        out = np.asarray(OP(a["q"], a["k"], a["v"], **{n: a[n] for n in ATTRS}, backend="cpu"))
    worst, _, message = judge(OP, a, (out,))
    assert worst <= 1.0, message
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 1, 37, 5000])
def test_dense_decode_window(rng, dtype, causal, window):
    """[B, 1, H, D] against 301 keys: the query sits at the last key position, so causal or not it sees
    the last `window` keys; q, k, v strided views of [B, H, S, D] memory as transformers passes them."""
    a = _dense(rng, dtype, 3, 1, 301, 12, 4, 64, causal=causal, window=window, softcap=7.0 if causal else None)
    for n in ("q", "k", "v"):
        a[n] = np.swapaxes(np.ascontiguousarray(np.swapaxes(a[n], 1, 2)), 1, 2)
    check(a)


def test_dense_decode_hidden_keys_never_read(rng):
    """Keys outside the window hold NaN and inf: the output stays finite."""
    a = _dense(rng, "float32", 2, 1, 200, 4, 2, 32, window=50)
    a["k"][:, :150] = np.nan
    a["v"][:, :150] = np.inf
    assert np.isfinite(check(a)).all()


@pytest.mark.parametrize("window", [None, 3])
def test_varlen_decode(rng, window):
    """Every sequence has one query; key counts 0, 1, 40, 1100 (past one decode partition) and 7."""
    a = _varlen(rng, "bfloat16", [1, 1, 1, 1, 1], [0, 1, 40, 1100, 7], 8, 2, 80, causal=True, window=window)
    out = check(a)
    assert (out[0] == 0).all()


def test_varlen_decode_without_keys(rng):
    a = _varlen(rng, "float32", [1, 1], [0, 0], 4, 4, 16)
    assert (check(a) == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_groups_and_tiles(rng, dtype):
    """A group of 6 query heads per KV head, 300 queries (several row tiles) against 333 keys, window 100."""
    check(_dense(rng, dtype, 2, 300, 333, 12, 2, 64, causal=True, window=100))
    check(_varlen(rng, dtype, [1, 200, 0, 77], [1, 250, 3, 77], 6, 1, 48, causal=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_non_finite_value_at_a_masked_key(rng, dtype):
    """Causal: V = inf at the last key, which only the last query sees; K = NaN at key 40 (queries from
    position 40 on get NaN rows). Rows that do not see a key stay finite, as in the reference."""
    a = _dense(rng, dtype, 1, 150, 150, 4, 2, 64, causal=True)
    a["v"][0, -1, 1, :] = np.inf
    a["k"][0, 40, 0, 3] = np.nan
    with poisoned_outputs():
        out = np.asarray(OP(a["q"], a["k"], a["v"], **{n: a[n] for n in ATTRS}, backend="cpu")).astype(np.float32)
    want = OP.reference(a)[0]
    np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(out), np.isinf(want))
    assert np.isfinite(out[0, :40]).all() and np.isinf(out[0, -1, 2:]).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_last_tile_past_the_sequence(rng, dtype):
    """A sequence's last key tile covers rows past its end (bfloat16 on AMX reads K's rows in place):
    the next sequence's K = NaN and V = inf there stay out of this sequence's output."""
    a = _varlen(rng, dtype, [70, 50], [70, 50], 4, 2, 64, causal=True)
    a["k"][70:] = np.nan
    a["v"][70:] = np.inf
    with poisoned_outputs():
        out = np.asarray(OP(a["q"], a["k"], a["v"], **{n: a[n] for n in ATTRS}, backend="cpu")).astype(np.float32)
    want = OP.reference(a)[0]
    assert np.isfinite(out[:70]).all()
    np.testing.assert_allclose(out[:70], want[:70], atol=0.05, rtol=0.05)
