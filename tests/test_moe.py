"""The MoE ops together: the full pipeline against a float64 MoE block computed directly, DeepSeek-V3
grouped routing worked by hand, the tie and skip rules, and argument errors. Each test runs on the
CPU backend and on every other backend that has kernels for all five ops."""
import math

import numpy as np
import pytest

import hal
from hal import ops
from hal.errors import SchemaError
from hal.ops.moe import _SIGMOID_BIAS, OPS, _bias, align
from hal.opdef import random
from hal.registry import registry


def _backends():
    reg = registry()
    names = ["cpu"]
    for name in ("cuda-sim", "rocm-sim"):
        if name in reg.backends and reg.entry(name).status[0] and all((op.name, name) in reg.kernels for op in OPS):
            names.append(name)
    return names


BACKENDS = _backends()


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _silu(x):
    return x * _sigmoid(x)


def _moe_block(x, w13, w2, weights, ids):
    """out[t] = sum_j weights[t, j] * ffn_e(x[t]) over the experts e = ids[t, j] in [0, E), in float64,
    token by token (no layout, no sorting: nothing shared with the ops under test)."""
    x, w13, w2, weights = (np.asarray(a, np.float64) for a in (x, w13, w2, weights))
    inter = w2.shape[2]
    out = np.zeros((x.shape[0], w2.shape[1]))
    mag = np.zeros_like(out)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t]):
            if not 0 <= e < w13.shape[0]:
                continue
            g = w13[e] @ x[t]
            act = _silu(g[:inter]) * g[inter:]
            out[t] += weights[t, j] * (w2[e] @ act)
            gm = np.abs(w13[e]) @ np.abs(x[t])
            mag[t] += abs(weights[t, j]) * (np.abs(w2[e]) @ (np.abs(_silu(g[:inter])) * gm[inter:] + 1.1 * np.abs(g[inter:]) * gm[:inter]))
    return out, mag


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_pipeline_equals_float64_moe_block(backend, dtype, block_m, rng):
    tokens, experts, k, hidden, inter = 37, 16, 4, 72, 40
    x = random(rng, (tokens, hidden), dtype)
    logits = (0.25 * rng.integers(1, 9, (tokens, experts))).astype(x.dtype)  # grid values: see ops/moe.py
    bias = _bias(rng, np.array(_SIGMOID_BIAS), experts, 4).astype(np.float32)  # per group: see ops/moe.py
    w13 = random(rng, (experts, 2 * inter, hidden), dtype, 1 / math.sqrt(hidden))
    w2 = random(rng, (experts, hidden, inter), dtype, 1 / math.sqrt(inter))
    route = dict(scoring="sigmoid", n_group=4, topk_group=2, bias=bias, scaling=2.5)
    with hal.use(backend, fallback="error"):
        weights, ids = ops.moe_route(logits, k, **route)
        ids = ids.copy()
        ids[rng.random(ids.shape) < 0.2] = -1  # experts on another rank: skipped by every op
        sorted_ids, block_experts, offsets, total = ops.moe_align(ids, experts, block_m)
        xs = ops.moe_permute(x, ids, sorted_ids)
        h = ops.grouped_gemm(xs, w13, offsets, activation="silu_and_mul")
        y = ops.grouped_gemm(h, w2, offsets)
        out = ops.moe_unpermute(y, sorted_ids, weights)
    kept = ids >= 0
    ref_weights, ref_ids = ops.moe_route.reference({"logits": logits.astype(np.float64), "k": k, **route,
                                                     "bias": bias.astype(np.float64), "renormalize": True})
    np.testing.assert_array_equal(ids[kept], ref_ids[kept])
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5)
    assert int(total[0]) == int(offsets[-1]) and int(offsets[-1]) % block_m == 0
    np.testing.assert_array_equal(block_experts[:int(total[0]) // block_m] >= 0, True)
    expected, mag = _moe_block(x, w13, w2, weights, ids)
    # bfloat16 rounds h and y on the way (2**-9 relative each), float32 only accumulates.
    tol = 2e-2 if dtype == "bfloat16" else 2e-5
    err = np.abs(out.astype(np.float64) - expected)
    assert (err <= tol * mag + 1e-6).all(), f"worst error / magnitude {np.max(err / (mag + 1e-30)):.3g}"


def _route(backend, logits, k, **kw):
    with hal.use(backend, fallback="error"):
        return ops.moe_route(np.asarray(logits, np.float32), k, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepseek_v3_grouped_routing_worked_example(backend):
    # 16 experts in 4 groups of 4; keep the 2 best groups by the sum of their top-2 s = sigmoid + bias.
    logits = np.array([
        [2.0, .25, .25, .25, 1.5, 1.5, .25, .25, .5, .5, .5, .5, 1.0, .25, 1.75, .25],
        [.5] * 16,
    ])
    bias = np.zeros(16, np.float32)
    bias[9] = 1.0
    weights, ids = _route(backend, logits, 3, scoring="sigmoid", n_group=4, topk_group=2, bias=bias, scaling=2.5)
    # Token 0, s per group: g0 .881 .562 .562 .562 (top-2 sum 1.443), g1 .818 .818 .562 .562 (1.635),
    # g2 .622 1.622 .622 .622 (2.245), g3 .731 .562 .852 .562 (1.583): keep g2, g1 (without the bias
    # it would be g1, g3). Experts 0 (.881) and 14 (.852) are excluded with their groups; among
    # 4..11 the best s are 9, then 4 and 5 tied (lower index first). The weights are the sigmoid
    # scores, not s: the bias only steers the choice.
    # Token 1: every score equal, so the groups tie except g2 (bias): keep g2 and g0, the lowest
    # index among the tied; then 9 and the lowest two indices 0, 1.
    np.testing.assert_array_equal(ids, [[9, 4, 5], [9, 0, 1]])
    s0 = _sigmoid([0.5, 1.5, 1.5])
    expected = np.array([s0 / s0.sum() * 2.5, [2.5 / 3] * 3])
    np.testing.assert_allclose(weights, expected, rtol=2e-6)
    # Without the bias the kept groups are g1 and g3.
    _, ids = _route(backend, logits[:1], 3, scoring="sigmoid", n_group=4, topk_group=2, scaling=2.5)
    np.testing.assert_array_equal(ids, [[14, 4, 5]])  # descending s: .852, .818, .818


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_ties_resolve_to_the_lower_index(backend, scoring):
    logits = [[1.0, 3.0, 3.0, 0.5, 3.0, 2.0, 3.0, 1.0], [2.0] * 8]
    weights, ids = _route(backend, logits, 4, scoring=scoring)
    np.testing.assert_array_equal(ids, [[1, 2, 4, 6], [0, 1, 2, 3]])
    np.testing.assert_allclose(weights, 0.25, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_align_layout_by_hand_with_skipped_ids(backend, dtype):
    # T=3, k=2, E=4: flat i = 0..5 go to experts 2, -1 (other rank), 0, 2, 5 (>= E: other rank), 0.
    ids = np.array([[2, -1], [0, 2], [5, 0]], dtype)
    with hal.use(backend, fallback="error"):
        sorted_ids, block_experts, offsets, total = ops.moe_align(ids, 4, 2)
        wide = ops.moe_align(ids, 4, 4)
    np.testing.assert_array_equal(sorted_ids, [2, 5, 0, 3, 6, 6, 6, 6, 6, 6])  # cap = round_up(6 + 4*1, 2)
    np.testing.assert_array_equal(block_experts, [0, 2, -1, -1, -1])
    np.testing.assert_array_equal(offsets, [0, 2, 2, 4, 4])
    np.testing.assert_array_equal(total, [4])
    np.testing.assert_array_equal(wide[0], [2, 5, 6, 6, 0, 3, 6, 6] + [6] * 12)  # cap = round_up(6 + 4*3, 4)
    np.testing.assert_array_equal(wide[1], [0, 2, -1, -1, -1])
    np.testing.assert_array_equal(wide[2], [0, 4, 4, 8, 8])
    for got, expected in zip((sorted_ids, block_experts, offsets, total), align(ids, 4, 2)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_ids_contribute_nothing(backend, rng):
    tokens, k, hidden = 5, 2, 8
    ids = np.array([[0, 1], [-1, 1], [1, -1], [-1, -1], [0, 0]], np.int32)
    x = random(rng, (tokens, hidden), "float32")
    weights = rng.random((tokens, k)).astype(np.float32)
    with hal.use(backend, fallback="error"):
        sorted_ids = ops.moe_align(ids, 2, 4)[0]
        xs = ops.moe_permute(x, ids, sorted_ids)
        out = ops.moe_unpermute(xs, sorted_ids, weights)  # identity experts: out[t] = sum of kept weights * x[t]
    kept = np.where(ids >= 0, weights, 0.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out, kept * x, rtol=1e-6)
    assert not np.isin(np.flatnonzero(ids.reshape(-1) < 0), sorted_ids).any()


@pytest.mark.parametrize("call, arg", [
    (lambda: ops.moe_route(np.zeros((2, 8), np.float32), 9), "k"),
    (lambda: ops.moe_route(np.zeros((2, 12), np.float32), 2, n_group=5, topk_group=1), "n_group"),
    (lambda: ops.moe_route(np.zeros((2, 16), np.float32), 8, n_group=4, topk_group=1), "k"),
    (lambda: ops.moe_route(np.zeros((2, 8), np.float32), 2, scoring="relu"), "scoring"),
    (lambda: ops.moe_align(np.zeros((2, 2), np.int32), 4, 0), "block_m"),
    (lambda: ops.moe_align(np.zeros((2, 2), np.float32), 4, 16), "topk_ids"),
    (lambda: ops.moe_permute(np.ones((3, 4), np.float32), np.zeros((2, 2), np.int32), np.zeros(4, np.int32)), "topk_ids"),
    (lambda: ops.moe_unpermute(np.ones((3, 4), np.float32), np.zeros(4, np.int32), np.ones((2, 2), np.float32)), "sorted_ids"),
    (lambda: ops.grouped_gemm(np.ones((4, 8), np.float32), np.ones((2, 6, 8), np.float32), np.array([0, 3, 2], np.int32)), "expert_offsets"),
    (lambda: ops.grouped_gemm(np.ones((4, 8), np.float32), np.ones((2, 5, 8), np.float32), np.array([0, 2, 4], np.int32),
                              activation="silu_and_mul"), "w"),
    (lambda: ops.grouped_gemm_masked(np.ones((2, 4, 8), np.float32), np.ones((3, 6, 8), np.float32), np.array([1, 2], np.int32)), "w"),
    (lambda: ops.grouped_gemm_masked(np.ones((2, 4, 8), np.float32), np.ones((2, 6, 8), np.float32), np.array([1, 2, 3], np.int32)),
     "masked_m"),
])
def test_bad_arguments_raise_schema_errors_naming_them(call, arg):
    with pytest.raises(SchemaError, match=arg):
        call()


def test_grouped_gemm_takes_every_activation_of_hal_codes():
    """The epilogue choices are hal.codes' table; a gated activation equals its plain form on the gate
    half times the up half (the same rounding of the fp32 products)."""
    from hal.codes import ACTIVATIONS, GATED_ACTIVATIONS

    assert set(ops.grouped_gemm.attrs[0].choices) == set(ACTIVATIONS) | set(GATED_ACTIVATIONS)
    rng = np.random.default_rng(6)
    x, w = random(rng, (20, 24), "float32"), random(rng, (2, 2 * 9, 24), "float32")
    offsets = np.array([0, 8, 20], np.int32)
    products = ops.grouped_gemm(x, w, offsets, backend="cpu")
    for name in GATED_ACTIVATIONS:
        plain = ops.grouped_gemm(x, w[:, :9], offsets, activation=name.removesuffix("_and_mul"), backend="cpu")
        gated = ops.grouped_gemm(x, w, offsets, activation=name, backend="cpu")
        np.testing.assert_allclose(gated, plain * products[:, 9:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_layout_computes_what_the_contiguous_one_does(backend):
    """grouped_gemm_masked over x [E, M, K] equals grouped_gemm over the same rows packed back to back
    (expert e's first clamp(masked_m[e], 0, M)), and its other rows are zeros whatever x holds there
    (NaN here). 40 experts (more than a warp), M = 130 (three 64-row tiles, the last partial), counts
    0, M, negative and past M among random ones."""
    rng = np.random.default_rng(12)
    e, m, k, n = 40, 130, 48, 24
    counts = rng.integers(0, m + 1, e)
    counts[:4] = [0, m, -5, m + 7]
    rows = np.clip(counts, 0, m)
    used = np.arange(m) < rows[:, None]
    x, w = random(rng, (e, m, k), "float32"), random(rng, (e, 2 * n, k), "float32")
    x[~used] = np.nan
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int32)
    with hal.use(backend, fallback="error"):
        masked = ops.grouped_gemm_masked(x, w, counts.astype(np.int64), activation="silu_and_mul")
        contiguous = ops.grouped_gemm(x[used], w, offsets, activation="silu_and_mul")
    np.testing.assert_array_equal(masked[~used], 0.0)
    np.testing.assert_allclose(masked[used], contiguous, rtol=1e-6, atol=1e-6)
