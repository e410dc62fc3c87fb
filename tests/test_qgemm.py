"""Quantized GEMMs on the cpu backend, beyond the conformance samples: DeepSeek's per-128-K promotion,
round trips from unquantized float32 operands, exact int8 accumulation, panel boundaries, and that
the samples catch a kernel using the wrong scale."""
import math

import numpy as np
import pytest

import hal
from hal import formats as F
from hal.conformance import judge
from hal.dtypes import to_numpy
from hal.errors import SchemaError
from hal.backends.cpu import gemm_core
from hal.ops import qgemm

FP8 = ("float8_e4m3fn", "float8_e4m3fnuz")


def _run(op, args):
    with hal.use("cpu", fallback="error"):
        return op(**args)


@pytest.fixture(params=["amx", "fma"])
def fp8_path(request, monkeypatch):
    """The fp8 GEMMs' two cpu paths: AMX tiles (where the CPU and OS offer them), and the dequantizing one."""
    if request.param not in gemm_core.RUNGS:
        pytest.skip(f"this CPU (or the OS) offers only the rungs {', '.join(gemm_core.RUNGS)}")
    monkeypatch.setattr(gemm_core, "RUNG", request.param)


# ---------------------------------------------------------------- quantizing per the spec (hal.formats only)


def _quantize(x, fmt, granularity, group=128):
    """Symmetric amax quantization of float64 x: (codes, float32 scales) with scale = amax / fmt max."""
    f = F.FORMATS[fmt]
    m, k = x.shape
    rows = {"group": 1, "block": group, "row": 1}[granularity]
    cols = {"group": group, "block": group, "row": k}[granularity]
    pad = np.full((-(-m // rows) * rows, -(-k // cols) * cols), 0.0)
    pad[:m, :k] = np.abs(x)
    amax = pad.reshape(pad.shape[0] // rows, rows, pad.shape[1] // cols, cols).max(axis=(1, 3))
    scales = np.where(amax == 0, 1.0, amax / f.max).astype(np.float32)
    codes = F.encode(x / F.expand_scales(scales, x.shape, granularity, group), fmt)
    return codes, scales


def _dequantized(codes, scales, fmt, granularity, group=128):
    return F.decode(codes, fmt) * F.expand_scales(scales.astype(np.float64), codes.shape, granularity, group)


def _fp8_codes(codes, fmt):
    return codes.view(to_numpy(fmt))


# ---------------------------------------------------------------- fp8: DeepSeek's computation


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("m", [5, 70])  # the small-M loop and the BLAS panels
def test_fp8_blockscale_matches_deepseek_promotion(fmt, m):
    """The result agrees to fp32 noise with DeepSeek's order of work: fp8 products summed in fp32 per
    128-wide K block, then times a_scale * b_scale and added to an fp32 accumulator."""
    rng = np.random.default_rng(1)
    k, n = 300, 260
    args = qgemm._fp8_args(rng, fmt, m, k, n, "float32")
    got = _run(qgemm.fp8_gemm_blockscale, args).astype(np.float64)
    a = F.decode(args["a"].view(np.uint8), fmt).astype(np.float32)
    b = F.decode(args["b"].view(np.uint8), fmt).astype(np.float32)
    acc = np.zeros((m, n), np.float32)
    for kb in range(-(-k // 128)):
        blk = slice(kb * 128, (kb + 1) * 128)
        partial = a[:, blk] @ b[:, blk].T  # fp32 sums of exact fp8 products
        acc += partial * (args["a_scales"][:, kb, None] * np.repeat(args["b_scales"][:, kb], 128)[None, :n])
    magnitude = qgemm._fp8_magnitude(args, None)[0]
    assert np.all(np.abs(got - acc) <= 4 * 2.0**-24 * math.sqrt(k) * magnitude + 1e-30)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_round_trip(fmt):
    """quantize per token per 128 K / per 128 x 128 block, fp8_gemm_blockscale: the unquantized fp32
    product to within the quantization error (each operand off by at most half an fp8 step)."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((40, 384)), rng.standard_normal((200, 384)) * 0.05
    xq, xs = _quantize(x, fmt, "group")
    wq, ws = _quantize(w, fmt, "block")
    got = _run(qgemm.fp8_gemm_blockscale, {"a": _fp8_codes(xq, fmt), "a_scales": xs, "b": _fp8_codes(wq, fmt), "b_scales": ws,
                                           "out_dtype": "float32"}).astype(np.float64)
    exact = x @ w.T
    step = 2.0**-4  # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 (normals)
    bound = (2 * step + step**2) * (np.abs(x) @ np.abs(w).T) + 1e-3 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)
    assert np.linalg.norm(got - exact) < 0.05 * np.linalg.norm(exact)


def test_fp8_grouped_matches_plain_per_expert(fp8_path):
    """Each expert's rows of the grouped op equal fp8_gemm_blockscale on those rows (bitwise: same path)."""
    rng = np.random.default_rng(3)
    args = qgemm._grouped_args(rng, FP8[0], [3, 50, 0, 9], 260, 300, lead=2, tail=3, out_dtype="float32")
    got = _run(qgemm.fp8_grouped_gemm_blockscale, args)
    offsets = args["expert_offsets"]
    for e in range(len(offsets) - 1):
        lo, hi = offsets[e], offsets[e + 1]
        plain = _run(qgemm.fp8_gemm_blockscale, {"a": args["a"][lo:hi], "a_scales": args["a_scales"][lo:hi], "b": args["b"][e],
                                                 "b_scales": args["b_scales"][e], "out_dtype": "float32"})
        np.testing.assert_array_equal(got[lo:hi], plain)
    assert not got[:2].any() and not got[-3:].any()


def test_fp8_grouped_silu_and_mul_across_panels(fp8_path):
    """N = 300 gate and up columns: the gate/up pairing holds across several weight panels (BLAS path)."""
    rng = np.random.default_rng(4)
    args = qgemm._grouped_args(rng, FP8[1], [40, 0, 70], 200, 2 * 300, "silu_and_mul", tail=2)
    outs = (_run(qgemm.fp8_grouped_gemm_blockscale, args),)
    worst, _, message = judge(qgemm.fp8_grouped_gemm_blockscale, args, outs)
    assert worst <= 1.0, message


@pytest.mark.parametrize("activation", [a for a in hal.ops.activations.EPILOGUES if a])
def test_fp8_grouped_every_activation(activation, fp8_path):
    """Every activation of hal.codes, plain and gated, fused into the grouped epilogue: a small-M expert
    and a BLAS-path expert (M > 32), float32 out (the plain ones activate the output in place)."""
    rng = np.random.default_rng(5)
    nw = 2 * 40 if activation.endswith("_and_mul") else 40
    args = qgemm._grouped_args(rng, FP8[0], [5, 45], 130, nw, activation, tail=1, out_dtype="float32")
    outs = (_run(qgemm.fp8_grouped_gemm_blockscale, args),)
    worst, _, message = judge(qgemm.fp8_grouped_gemm_blockscale, args, outs)
    assert worst <= 1.0, message


def test_fp8_masked_computes_what_the_contiguous_layout_does(fp8_path):
    """fp8_grouped_gemm_masked_blockscale over a [E, M, K] equals fp8_grouped_gemm_blockscale over the
    same rows packed back to back, on both paths (a 5-row expert: small-M loop; 60 rows: BLAS), and its
    other rows are zeros: NaN codes and inf scales in those rows reach nothing."""
    rng = np.random.default_rng(7)
    counts, m = np.array([5, 0, 60, 99]), 64
    args = qgemm._masked_args(rng, FP8[0], counts, m, 260, 2 * 72, "silu_and_mul", out_dtype="float32")
    used = np.arange(m) < np.clip(counts, 0, m)[:, None]
    args["a"][~used] = np.nan
    args["a_scales"][~used] = np.inf
    got = _run(qgemm.fp8_grouped_gemm_masked_blockscale, args)
    packed = {"a": args["a"][used], "a_scales": args["a_scales"][used], "b": args["b"], "b_scales": args["b_scales"],
              "expert_offsets": np.concatenate([[0], np.cumsum(used.sum(axis=1))]).astype(np.int32), "activation": "silu_and_mul",
              "out_dtype": "float32"}
    np.testing.assert_array_equal(got[~used], 0.0)
    np.testing.assert_allclose(got[used], _run(qgemm.fp8_grouped_gemm_blockscale, packed), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- int8: exact integer accumulation


@pytest.mark.parametrize("m", [3, 40])
def test_int8_accumulation_is_exact(m):
    """Partial sums pass 2^24 (where float32 stops holding every integer) and come back: the result,
    scales 1, float32 out, is the int64 product rounded once."""
    rng = np.random.default_rng(5)
    k, n = 2600, 7
    a = np.full((m, k), 127, np.int8)
    b = np.where(np.arange(k) < k // 2, 127, -127).astype(np.int8)[None, :].repeat(n, 0)
    b[:, -9:] = rng.integers(-128, 128, (n, 9))  # a small exact answer after cancelling 2^25-sized halves
    a[:, :5] = rng.integers(-128, 128, (m, 5))
    one = np.ones((1, 1), np.float32)
    got = _run(qgemm.int8_gemm, {"a": a, "b": b, "a_scales": one, "b_scales": one, "out_dtype": "float32"})
    exact = a.astype(np.int64) @ b.astype(np.int64).T
    np.testing.assert_array_equal(got, exact.astype(np.float32))


@pytest.mark.parametrize("m", [6, 50])
def test_int8_round_trip(m):
    """Per-token and per-channel int8 quantization: within half a step of each operand of x @ w.T."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((m, 1500)), rng.standard_normal((90, 1500))
    xq, xs = _quantize(x, "int8", "row")
    wq, ws = _quantize(w, "int8", "row")
    bias = rng.standard_normal(90).astype(np.float32)
    got = _run(qgemm.int8_gemm, {"a": xq, "b": wq, "a_scales": xs, "b_scales": ws, "bias": bias, "out_dtype": "float32"})
    xd, wd = _dequantized(xq, xs, "int8", "row"), _dequantized(wq, ws, "int8", "row")
    exact = x @ w.T + bias
    bound = np.abs(xd - x) @ np.abs(wd).T + np.abs(x) @ np.abs(wd - w).T + 1e-4 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)


# ---------------------------------------------------------------- 4-bit weights


def _int4_group_quantize(w, group, zero_point):
    """int4 per group along K: symmetric (signed codes) or with zero points (uint4 codes), as in the spec."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    if zero_point:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        scales = np.where(hi == lo, 1.0, (hi - lo) / 15).astype(np.float32)
        zeros = np.clip(np.rint(-lo / scales), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(w / np.repeat(scales, group, 1)) + np.repeat(zeros, group, 1), 0, 15)
        return F.pack_nibbles(q.astype(np.uint8)), scales, zeros
    scales = (np.abs(g).max(-1) / 7).astype(np.float32)
    return F.pack_nibbles(F.encode(w / np.repeat(scales, group, 1), "int4")), scales, None


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("m", [3, 45])
def test_w4a16_round_trip(group, zero_point, m):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((m, 256)).astype(np.float32), rng.standard_normal((70, 256))
    packed, scales, zeros = _int4_group_quantize(w, group, zero_point)
    got = _run(qgemm.w4a16_gemm, {"a": x, "b_packed": packed, "scales": scales, "zeros": zeros, "group_size": group})
    wd = qgemm._int4_weights(packed, scales, zeros, group)
    exact = x.astype(np.float64) @ w.T
    bound = np.abs(x) @ np.abs(wd - w).T + 1e-4 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)
    assert np.abs(wd - w).max() <= 0.5 * scales.max() * (1 + 1e-6)  # and that error is half a step


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("m", [2, 40])
def test_fp4_round_trip(fmt, m):
    """E2M1 with MX / NV scales chosen from each group's amax: x @ w.T to within the fp4 rounding."""
    rng = np.random.default_rng(8)
    k = 200  # not a multiple of 32: a partial last group
    x, w = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((50, k))
    g = qgemm.FP4_GROUP[fmt]
    amax = np.abs(np.pad(w, ((0, 0), (0, -k % g)))).reshape(50, -1, g).max(-1)
    if fmt == "mxfp4":
        scales = (np.floor(np.log2(amax)) - 2 + 127).astype(np.uint8)
        ts, s = None, F.e8m0_decode(scales)
    else:
        ts = np.array([[amax.max() / (448 * 6)]], np.float32)
        scales = F.encode(amax / 6 / ts[0, 0], "float8_e4m3fn").view(to_numpy("float8_e4m3fn"))
        s = scales.astype(np.float64) * np.float64(ts[0, 0])
    codes = F.encode(w / F.expand_scales(s, w.shape, "group", g), "e2m1")
    args = {"a": x, "b_packed": F.pack_nibbles(codes), "b_scales": scales, "fmt": fmt, "tensor_scale": ts}
    got = _run(qgemm.fp4_gemm, args)
    wd = qgemm._fp4_weights(args["b_packed"], scales, fmt, ts)
    exact = x.astype(np.float64) @ w.T
    bound = np.abs(x) @ np.abs(wd - w).T + 1e-4 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)
    assert np.linalg.norm(got - exact) < 0.2 * np.linalg.norm(exact)


# ---------------------------------------------------------------- the samples catch a wrong scale


def _first_scale_everywhere(s):
    """Every group's scale replaced by the first one: a kernel that indexes scales wrongly."""
    return np.broadcast_to(s.reshape(-1)[:1].reshape((1,) * s.ndim), s.shape).copy()


WRONG_SCALE = [
    (qgemm.fp8_gemm_blockscale, "a_scales"), (qgemm.fp8_gemm_blockscale, "b_scales"),
    (qgemm.fp8_grouped_gemm_blockscale, "a_scales"), (qgemm.fp8_grouped_gemm_blockscale, "b_scales"),
    (qgemm.int8_gemm, "a_scales"), (qgemm.int8_gemm, "b_scales"),
    (qgemm.w4a16_gemm, "scales"), (qgemm.fp4_gemm, "b_scales"),
]


@pytest.mark.parametrize("op, name", WRONG_SCALE, ids=[f"{op.name}-{name}" for op, name in WRONG_SCALE])
def test_samples_catch_a_misplaced_scale(op, name):
    """Outputs computed with one scale for every group fail the comparison on every ordinary sample
    that has more than one group."""
    rng = np.random.default_rng(9)
    dtype = {"int8_gemm": "int8"}.get(op.name, FP8[0] if op.name.startswith("fp8") else "bfloat16")
    checked = 0
    for sample in op.samples(rng, dtype):
        s = sample.args[name]
        if sample.kind != "ordinary" or s is None or len(np.unique(s.view(np.uint8) if s.dtype.itemsize == 1 else s)) < 2:
            continue
        wrong = _run(op, sample.args | {name: _first_scale_everywhere(s)})
        worst, _, _ = judge(op, sample.args, (wrong,))
        assert worst > 1.0, f"{sample.label}: a misplaced {name} passed"
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("op", qgemm.OPS, ids=lambda op: op.name)
def test_bad_arguments_raise_naming_the_argument(op):
    for sample in op.error_samples(np.random.default_rng(10)):
        with pytest.raises(SchemaError, match=sample.match) as info:
            _run(op, sample.args)
        assert op.name in str(info.value), sample.label


def test_nvfp4_needs_its_tensor_scale():
    args = qgemm._fp4_args(np.random.default_rng(11), "float32", 2, 32, 3, "nvfp4") | {"tensor_scale": None}
    with pytest.raises(SchemaError, match="tensor_scale"):
        _run(qgemm.fp4_gemm, args)
