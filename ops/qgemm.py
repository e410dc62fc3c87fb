"""Quantized GEMMs: out = a @ b.T with low-precision operands and their scales.

Weights b are [N, K] (nn.Linear layout, K contiguous). Every reference is the float64 product of
the dequantized operands (hal.formats); the tolerance is the output dtype's rounding plus fp32
noise growing with sqrt(K) relative to |a| @ |b|.T of the dequantized operands, whatever order
a kernel sums in (DeepSeek's promotion to fp32 every 128 K, integer accumulation, ...).

- fp8_gemm_blockscale: fp8 activations scaled per token per 128 K, fp8 weights per 128 x 128 block.
- fp8_grouped_gemm_blockscale: the same per expert over the MoE contiguous layout, with any epilogue activation
  (plain or gated, ops/activations.py).
- fp8_grouped_gemm_masked_blockscale: the same over the masked layout of DeepEP's low-latency mode (ops/moe.py).
- int8_gemm: W8A8, int32-exact products, per-token / per-tensor x per-channel / per-tensor scales, bias.
- w4a16_gemm: int4 weights (two per byte, low nibble first) with a scale (and zero point) per group.
- fp4_gemm: E2M1 weights with MX (E8M0 per 32) or NVFP4 (E4M3 per 16, fp32 tensor scale) scales.
"""
import math

import numpy as np

from hal import formats as F
from hal.dtypes import FLOATS, INTS, name_of, to_numpy
from hal.opdef import Attr, InvalidArgument, check_finite, check_offsets, ErrorSample, OpDef, Sample, Tensor, random, strided

from .activations import EPILOGUES, epilogue, epilogue_columns, epilogue_magnitude, is_gated, torch_epilogue
from .linear import abs_matmul
from .moe import check_masked_rows, masked_segments, offset_segments

FP8 = ("float8_e4m3fn", "float8_e4m3fnuz")
BLOCK = 128  # DeepSeek's block: activations 1 x 128, weights 128 x 128
W4_GROUPS = (32, 64, 128)
FP4_GROUP = {"mxfp4": F.MXFP4_GROUP, "nvfp4": F.NVFP4_GROUP}


# ---------------------------------------------------------------- dequantized operands (float64)


def _promoted(a, a_scales, b, b_scales):
    """a @ b.T of fp8 codes as DeepSeek promotes it: each 128-wide K block's partial sum times
    a_scale * b_scale, summed (an inf scale gives +-inf, or NaN where that block's partial sum is 0).
    a [M, K], a_scales [M, KB]; b [N, K], b_scales [ceil(N / 128), KB]."""
    x, w, xs = F.values(a), F.values(b), F.values(a_scales)
    ws = np.repeat(F.values(b_scales), BLOCK, axis=0)[: w.shape[0]]
    out = np.zeros((x.shape[0], w.shape[0]))
    with np.errstate(invalid="ignore"):  # inf * 0 is the NaN the rule asks for
        for kb, start in enumerate(range(0, x.shape[1], BLOCK)):
            part = x[:, start:start + BLOCK] @ w[:, start:start + BLOCK].T
            out += part * (xs[:, kb, None] * ws[None, :, kb])
    return out


def _fp8_operand(q, scales, granularity):
    x = F.values(q)
    with np.errstate(invalid="ignore"):  # an inf scale on a 0 code
        return F.apply_scales(x, F.values(scales), granularity, BLOCK)


def _int4_weights(packed, scales, zeros, group):
    """w = (q - zero) * scale with uint4 codes and zero points, or q * scale with signed int4 codes."""
    codes = F.unpack_nibbles(packed)
    if zeros is None:
        q = F.decode(codes, "int4")
    else:
        q = codes.astype(np.float64) - F.expand_scales(F.values(zeros), codes.shape, "group", group)
    return F.apply_scales(q, F.values(scales), "group", group)


def _fp4_weights(packed, scales, fmt, tensor_scale):
    w = F.decode(F.unpack_nibbles(packed), "e2m1")
    return F.apply_scales(w, F.scale_values(fmt, scales, tensor_scale), "group", FP4_GROUP[fmt])


def _growth(a):
    return math.sqrt(max(a["a"].shape[-1], 1))


def _cost(a, n, *inputs, n_out=None, rows=None):
    """(flops, bytes) of an [M, K] x [K, n] product (a [..., K] flattened to M rows, of which `rows` are
    computed when given) reading `inputs` and writing [M, n_out or n]."""
    *lead, k = a["a"].shape
    m = math.prod(lead)
    out_dtype = a.get("out_dtype") or name_of(a["a"].dtype)
    return 2 * (m if rows is None else rows) * n * k, sum(x.nbytes for x in inputs if x is not None) + m * (n_out or n) * to_numpy(out_dtype).itemsize


# ---------------------------------------------------------------- random operands for samples


def _scales(rng, shape, unit=1.0):
    """Positive float32 scales from unit / 8 to 4 unit (never all alike, so an ignored or misplaced
    scale shows)."""
    return (unit * np.exp2(rng.uniform(-3.0, 1.0, shape)) * rng.uniform(1.0, 2.0, shape)).astype(np.float32)


def _codes(rng, shape, fmt, spread):
    """Codes of normal draws of std `spread` (encode(x)). Each element's 16 random bits pick one of 65536
    draws encoded once, so the demo's 200M expert weights cost one pass of random bits, not of float64."""
    table = F.encode(rng.standard_normal(1 << 16) * spread, fmt)
    n = math.prod(shape)
    return table[rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]].reshape(shape)  # 4 draws per 64 random bits


def _fp8(rng, shape, fmt):
    """fp8 codes using the format's range (std a quarter of its max)."""
    return _codes(rng, shape, fmt, F.FORMATS[fmt].max / 4).view(to_numpy(fmt))


def _fp8_scales(rng, shape, fmt):
    """Scales that make the dequantized fp8 values of order 1, like amax / fmt max would."""
    return _scales(rng, shape, 4 / F.FORMATS[fmt].max)


# ---------------------------------------------------------------- checks shared by the ops


def _want_shape(name, x, shape):
    if tuple(x.shape) != tuple(shape):
        raise InvalidArgument(name, f"shape {tuple(shape)}", f"shape {tuple(x.shape)}")


def _want_same_dtype(name, x, like_name, like):
    if name_of(x.dtype) != name_of(like.dtype):
        raise InvalidArgument(name, f"the dtype of {like_name} ({name_of(like.dtype)})", name_of(x.dtype))


def _check_k(a, b_name, k_b):
    k = a["a"].shape[-1]
    if k_b != k:
        raise InvalidArgument(b_name, f"K = {k} (a's columns)", f"shape {tuple(a[b_name].shape)}")


def _check_packed_k(a):
    """4-bit weights: K even, b_packed [N, K / 2]."""
    k = a["a"].shape[1]
    if k % 2:
        raise InvalidArgument("a", "an even K (two 4-bit weights per byte)", f"K = {k}")
    if a["b_packed"].shape[1] != k // 2:
        raise InvalidArgument("b_packed", f"{k // 2} bytes per row (K / 2, K = {k})", f"shape {tuple(a['b_packed'].shape)}")


# ---------------------------------------------------------------- fp8_gemm_blockscale


def _fp8_check(a):
    (m, k), (n, k_b) = a["a"].shape, a["b"].shape
    _check_k(a, "b", k_b)
    _want_same_dtype("b", a["b"], "a", a["a"])
    kb = -(-k // BLOCK)
    _want_shape("a_scales", a["a_scales"], (m, kb))
    _want_shape("b_scales", a["b_scales"], (-(-n // BLOCK), kb))


def _fp8_reference(a):
    return [_promoted(a["a"], a["a_scales"], a["b"], a["b_scales"])]


def _fp8_magnitude(a, refs):
    return [abs_matmul(_fp8_operand(a["a"], a["a_scales"], "group"), _fp8_operand(a["b"], a["b_scales"], "block").T)]


def _fp8_args(rng, fmt, m, k, n, out_dtype="bfloat16"):
    kb = -(-k // BLOCK)
    return {"a": _fp8(rng, (m, k), fmt), "a_scales": _fp8_scales(rng, (m, kb), fmt),
            "b": _fp8(rng, (n, k), fmt), "b_scales": _fp8_scales(rng, (-(-n // BLOCK), kb), fmt), "out_dtype": out_dtype}


def _fp8_samples(rng, fmt):
    yield Sample(_fp8_args(rng, fmt, 1, 128, 1), "1x1x128: one block")
    yield Sample(_fp8_args(rng, fmt, 7, 200, 13), "7x200x13: K = 128 + 72")
    yield Sample(_fp8_args(rng, fmt, 33, 300, 130, "float32"), "33x300x130 out float32")
    yield Sample(_fp8_args(rng, fmt, 97, 515, 257, "float16"), "97x515x257 out float16: 3 N blocks, 5 K blocks")
    yield Sample(_fp8_args(rng, fmt, 1, 1000, 259), "M = 1 decode, K = 1000")
    yield Sample(_fp8_args(rng, fmt, 16, 384, 384), "16x384x384: whole blocks")
    yield Sample(_fp8_args(rng, fmt, 5, 1, 3), "K = 1", "edge")
    s = _fp8_args(rng, fmt, 19, 260, 23)
    s["a"] = strided(s["a"])
    yield Sample(s, "strided a", "edge")
    inf = _fp8_args(rng, fmt, 6, 300, 9)
    inf["a_scales"][1, 2] = np.inf  # row 1, K block 2: +-inf
    inf["a_scales"][3, 0] = np.inf
    inf["a"][3, :BLOCK] = 0  # row 3, K block 0: inf * 0 = NaN
    yield Sample(inf, "inf scales: +-inf, NaN where the block's partial sum is 0", "edge")
    yield Sample(_fp8_args(rng, fmt, 0, 256, 33), "M = 0", "edge")
    yield Sample(_fp8_args(rng, fmt, 9, 130, 0), "N = 0", "edge")


def _fp8_errors(rng):
    fmt = FP8[0]
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"b": _fp8(rng, (6, 129), fmt)}, "K mismatch", match="b")
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"b": _fp8(rng, (6, 130), "float8_e4m3fnuz")}, "mixed fp8 flavours", match="dtype")
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"a_scales": _scales(rng, (4, 1))}, "a_scales not per 128 K", match="a_scales")
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"b_scales": _scales(rng, (6, 2))}, "b_scales per row, not per block", match="b_scales")
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"a_scales": _scales(rng, (4, 2)).astype(np.float16)}, "float16 scales", match="dtype")
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"a": random(rng, (4, 130), "bfloat16")}, "bfloat16 a", match="dtype")
    yield ErrorSample(_fp8_args(rng, "float8_e4m3fn", 4, 130, 6, "int8"), "integer out_dtype", match="out_dtype")
    yield ErrorSample(_fp8_args(rng, fmt, 4, 130, 6) | {"a": _fp8(rng, (2, 4, 130), fmt)}, "rank-3 a", match="rank")


def _torch_fp8(q, scales, rows_per_scale):
    """Dequantize in torch the way a user would: widen to fp32, multiply by the expanded scales."""
    s = scales.repeat_interleave(BLOCK, dim=-1)[..., : q.shape[-1]]
    if rows_per_scale > 1:
        s = s.repeat_interleave(rows_per_scale, dim=-2)[..., : q.shape[-2], :]
    return q.float() * s


def _fp8_peer(t):
    import torch

    out_dtype = getattr(torch, t["out_dtype"])

    def run():
        x = _torch_fp8(t["a"], t["a_scales"], 1)
        w = _torch_fp8(t["b"], t["b_scales"], BLOCK)
        return torch.matmul(x, w.T).to(out_dtype)

    return run


def _fp8_bench(rng, fmt, m=4096, k=2048, n=2048):
    return _fp8_args(rng, fmt, m, k, n)


fp8_gemm_blockscale = OpDef(
    name="fp8_gemm_blockscale",
    doc="fp8_gemm_blockscale(a, a_scales, b, b_scales, *, out_dtype='bfloat16'): DeepSeek-style fp8 GEMM "
    "a @ b.T; a [M, K] and b [N, K] in float8_e4m3fn or float8_e4m3fnuz, a_scales [M, ceil(K/128)] per token per "
    "128 K, b_scales [ceil(N/128), ceil(K/128)] per 128 x 128 block (float32); fp32 accumulation, each 128-K "
    "partial sum promoted with a_scale * b_scale.",
    params=[
        Tensor("a", FP8, rank=2),
        Tensor("a_scales", ("float32",), rank=2),
        Tensor("b", FP8, rank=2),
        Tensor("b_scales", ("float32",), rank=2),
        "*",
        Attr("out_dtype", "bfloat16", choices=FLOATS),
    ],
    check=_fp8_check,
    outputs=lambda a: [((a["a"].shape[0], a["b"].shape[0]), a["out_dtype"])],
    reference=_fp8_reference,
    samples=_fp8_samples,
    error_samples=_fp8_errors,
    growth=_growth,
    magnitude=_fp8_magnitude,
    bench=_fp8_bench,
    cost=lambda a: _cost(a, a["b"].shape[0], a["a"], a["b"], a["a_scales"], a["b_scales"]),
    torch_peer=_fp8_peer,
)


# ---------------------------------------------------------------- fp8_grouped_gemm_blockscale, fp8_grouped_gemm_masked_blockscale
# The two expert layouts of ops/moe.py (contiguous rows with offsets, DeepEP's masked [E, M, K] with
# counts), each expert's rows being fp8_gemm_blockscale with that expert's weights.


def _check_expert_weights(a):
    """b [E, Nw, K] and its block scales against a [..., K]; an even Nw for a gated activation."""
    k, (e, nw, k_b) = a["a"].shape[-1], a["b"].shape
    _check_k(a, "b", k_b)
    _want_same_dtype("b", a["b"], "a", a["a"])
    _want_shape("b_scales", a["b_scales"], (e, -(-nw // BLOCK), -(-k // BLOCK)))
    if is_gated(a["activation"]) and nw % 2:
        raise InvalidArgument("b", f"an even number of rows per expert (gate and up halves) for {a['activation']}", f"shape {tuple(a['b'].shape)}")


def _grouped_check(a):
    _check_expert_weights(a)
    (r, k), e = a["a"].shape, a["b"].shape[0]
    _want_shape("a_scales", a["a_scales"], (r, -(-k // BLOCK)))
    _want_shape("expert_offsets", a["expert_offsets"], (e + 1,))
    check_offsets("expert_offsets", a["expert_offsets"], 0, r)


def _masked_check(a):
    _check_expert_weights(a)
    e, m, k = a["a"].shape
    if a["b"].shape[0] != e:
        raise InvalidArgument("b", f"[{e}, Nw, K], one matrix per expert of a", f"shape {tuple(a['b'].shape)}")
    _want_shape("a_scales", a["a_scales"], (e, m, -(-k // BLOCK)))
    _want_shape("masked_m", a["masked_m"], (e,))
    check_masked_rows("a", a["a"])  # the counts are not read: masked_counts says what any value means


def _contiguous_rows(a):
    """fp8_grouped_gemm_blockscale's rows: (a, a_scales, the experts' segments)."""
    return a["a"], a["a_scales"], offset_segments(a["expert_offsets"])


def _masked_rows(a):
    """fp8_grouped_gemm_masked_blockscale's rows: (a, a_scales as E * M rows, the experts' segments)."""
    e, m, k = a["a"].shape
    return a["a"].reshape(e * m, k), a["a_scales"].reshape(e * m, a["a_scales"].shape[2]), masked_segments(a["masked_m"], m)


def _grouped_out_columns(a):
    return epilogue_columns(a["activation"], a["b"].shape[1])


def _grouped_out_shape(a):
    return (*a["a"].shape[:-1], _grouped_out_columns(a))


# The conformance suite asks for the reference, then for the magnitude on the same arguments: the
# magnitude of the last reference waits here for that call (one float64 pass over the experts, not two).
_PENDING_MAGNITUDE = {}


def _grouped_reference(rows, a):
    ref, mag = _grouped_reference_and_magnitude(rows, a)
    _PENDING_MAGNITUDE.clear()
    _PENDING_MAGNITUDE[id(a)] = (a, mag)
    return ref


def _grouped_magnitude(rows, a):
    pending = _PENDING_MAGNITUDE.pop(id(a), None)
    return pending[1] if pending is not None and pending[0] is a else _grouped_reference_and_magnitude(rows, a)[1]


def _grouped_reference_and_magnitude(rows, a):
    """The reference and what its fp32 error is relative to, both shaped like the output; rows(a) gives the layout."""
    x, x_scales, segments = rows(a)
    n, act = _grouped_out_columns(a), a["activation"]
    ref, mag = np.zeros((x.shape[0], n)), np.zeros((x.shape[0], n))
    for e, lo, hi in segments:
        if hi <= lo:  # an expert without rows (most of them in a decode step): its weights are not read
            continue
        xd, wd = _fp8_operand(x[lo:hi], x_scales[lo:hi], "group"), _fp8_operand(a["b"][e], a["b_scales"][e], "block")
        if np.isinf(x_scales[lo:hi]).any() or np.isinf(a["b_scales"][e]).any():
            h = _promoted(x[lo:hi], x_scales[lo:hi], a["b"][e], a["b_scales"][e])
        else:  # finite scales: the promoted sum is the product of the dequantized operands, one matmul
            h = xd @ wd.T
        bound = abs_matmul(xd, wd.T)
        ref[lo:hi] = epilogue(act, h)
        # errors of the products reach the output through the activation (and the gate * up product)
        mag[lo:hi] = bound if act is None else epilogue_magnitude(act, h, bound) + np.abs(ref[lo:hi])
    return ref.reshape(_grouped_out_shape(a)), mag.reshape(_grouped_out_shape(a))


def _grouped_cost(rows, a):
    used = sum(hi - lo for _, lo, hi in rows(a)[2])
    return _cost(a, a["b"].shape[1], a["a"], a["b"], a["a_scales"], a["b_scales"], n_out=_grouped_out_columns(a), rows=used)


def fp8_expert_weights(rng, fmt, e, nw, k, scale=1.0):
    """b [E, Nw, K] fp8 and its 128 x 128 block scales (as DeepSeek-V3's checkpoint ships its experts),
    the values of order `scale`."""
    scales = _fp8_scales(rng, (e, -(-nw // BLOCK), -(-k // BLOCK)), fmt) * np.float32(scale)
    return {"b": _fp8(rng, (e, nw, k), fmt), "b_scales": scales}


def _grouped_args(rng, fmt, counts, k, nw, activation=None, lead=0, tail=0, index="int32", out_dtype="bfloat16"):
    """Experts with `counts` rows each, after `lead` rows no expert owns and before `tail` such rows."""
    offsets = (lead + np.concatenate([[0], np.cumsum(counts)])).astype(index)
    r, kb = int(offsets[-1]) + tail, -(-k // BLOCK)
    return {"a": _fp8(rng, (r, k), fmt), "a_scales": _fp8_scales(rng, (r, kb), fmt), **fp8_expert_weights(rng, fmt, len(counts), nw, k),
            "expert_offsets": offsets, "activation": activation, "out_dtype": out_dtype}


def _grouped_samples(rng, fmt):
    yield Sample(_grouped_args(rng, fmt, [1], 128, 1), "1 expert, 1x1x128")
    yield Sample(_grouped_args(rng, fmt, [5, 0, 17, 3], 200, 33), "4 experts, one empty, K = 200")
    yield Sample(_grouped_args(rng, fmt, [9, 30, 0, 2, 11], 300, 2 * 70, "silu_and_mul"), "silu_and_mul N = 70, empty expert")
    yield Sample(_grouped_args(rng, fmt, [40, 1, 77], 130, 2 * 129, "silu_and_mul", out_dtype="float32"),
                 "silu_and_mul N = 129 (gate/up blocks straddle), out float32")
    yield Sample(_grouped_args(rng, fmt, [3, 8, 2], 384, 257, lead=4, tail=6, index="int64", out_dtype="float16"),
                 "rows outside the experts are 0, int64 offsets, out float16")
    yield Sample(_grouped_args(rng, fmt, [0, 0, 0], 256, 64), "every expert empty", "edge")
    yield Sample(_grouped_args(rng, fmt, [], 128, 16, tail=5), "no experts: all rows 0", "edge")
    s = _grouped_args(rng, fmt, [6, 7], 140, 2 * 24, "silu_and_mul")
    s["a"] = strided(s["a"])
    yield Sample(s, "strided a", "edge")
    yield Sample(_grouped_args(rng, fmt, [0, 0], 130, 20), "R = 0", "edge")
    # Every other epilogue once, small.
    for act in EPILOGUES:
        if act is not None and act != "silu_and_mul":
            yield Sample(_grouped_args(rng, fmt, [7, 0, 5], 136, 2 * 20 if is_gated(act) else 20, act), f"{act}, 3 experts")


def _grouped_errors(rng):
    fmt = FP8[0]

    def args(**kw):
        return _grouped_args(rng, fmt, [3, 2], 130, 6) | kw

    yield ErrorSample(args(b=_fp8(rng, (2, 6, 129), fmt)), "K mismatch", match="b")
    yield ErrorSample(args(b=_fp8(rng, (6, 130), fmt)), "b not [E, N, K]", match="rank")
    yield ErrorSample(args(b_scales=_scales(rng, (1, 2))), "b_scales not per expert", match="b_scales")
    yield ErrorSample(args(a_scales=_scales(rng, (5, 1))), "a_scales not per 128 K", match="a_scales")
    yield ErrorSample(args(expert_offsets=np.array([0, 3], np.int32)), "offsets for 1 of 2 experts", match="expert_offsets")
    yield ErrorSample(args(expert_offsets=np.array([0, 4, 3], np.int32)), "decreasing offsets", match="expert_offsets")
    yield ErrorSample(args(expert_offsets=np.array([0, 3, 9], np.int64)), "offsets past the rows", match="expert_offsets")
    yield ErrorSample(args(expert_offsets=np.array([0, 3, 5], np.float32)), "float offsets", match="dtype")
    yield ErrorSample(_grouped_args(rng, fmt, [3, 2], 130, 7, "silu_and_mul"), "odd rows with silu_and_mul", match="even")
    yield ErrorSample(_grouped_args(rng, fmt, [3, 2], 130, 7, "relu_and_mul"), "odd rows with relu_and_mul", match="even")
    yield ErrorSample(args(activation="tanh"), "unknown activation", match="activation")
    yield ErrorSample(args(b=_fp8(rng, (2, 6, 130), "float8_e4m3fnuz")), "mixed fp8 flavours", match="dtype")


def _torch_grouped(t, a, a_scales, segments):
    """A Python loop over experts: dequantize a [R, K] once, then per expert its weights, matmul, activation."""
    import torch

    out_dtype = getattr(torch, t["out_dtype"])
    x = _torch_fp8(a, a_scales, 1)
    out = x.new_zeros(x.shape[0], epilogue_columns(t["activation"], t["b"].shape[1]), dtype=out_dtype)
    for e, lo, hi in segments:
        if hi > lo:
            h = torch.matmul(x[lo:hi], _torch_fp8(t["b"][e], t["b_scales"][e], BLOCK).T)
            out[lo:hi] = torch_epilogue(t["activation"], h).to(out_dtype)
    return out


def _grouped_peer(t):
    segments = offset_segments(t["expert_offsets"].tolist())
    return lambda: _torch_grouped(t, t["a"], t["a_scales"], segments)


def _grouped_bench(rng, fmt, tokens=1024, top_k=8, experts=32, k=2048, n=1024):
    """DeepSeek-like gate/up projection scaled to a small machine: hidden 2048, expert dim 1024,
    1024 tokens x top-8 over 32 experts (256 rows each, uneven)."""
    counts = rng.multinomial(tokens * top_k, np.full(experts, 1.0 / experts))
    return _grouped_args(rng, fmt, counts, k, 2 * n, "silu_and_mul")


_GROUPED_EPILOGUE_DOC = ("activation None, relu, gelu, gelu_tanh or silu of h, or a gated '<act>_and_mul' (silu_and_mul, ...) "
                         "giving act(h[:, :N]) * h[:, N:] for Nw = 2N.")


def _fp8_grouped_op(name, doc, a_rank, expert_rows, rows, **data):
    """The OpDef of an fp8 grouped GEMM over one layout of the experts' rows: a and a_scales of rank `a_rank`,
    `expert_rows` the Tensor that places them, rows(a) -> (a, a_scales as rows, the experts' segments); `data`:
    check, samples, error_samples, bench, torch_peer."""
    return OpDef(
        name=name,
        doc=doc + _GROUPED_EPILOGUE_DOC,
        params=[
            Tensor("a", FP8, rank=a_rank),
            Tensor("a_scales", ("float32",), rank=a_rank),
            Tensor("b", FP8, rank=3),
            Tensor("b_scales", ("float32",), rank=3),
            expert_rows,
            "*",
            Attr("activation", None, choices=EPILOGUES),
            Attr("out_dtype", "bfloat16", choices=FLOATS),
        ],
        outputs=lambda a: [(_grouped_out_shape(a), a["out_dtype"])],
        reference=lambda a: [_grouped_reference(rows, a)],
        growth=_growth,
        magnitude=lambda a, refs: [_grouped_magnitude(rows, a)],
        cost=lambda a: _grouped_cost(rows, a),
        **data,
    )


fp8_grouped_gemm_blockscale = _fp8_grouped_op(
    "fp8_grouped_gemm_blockscale",
    "fp8_grouped_gemm_blockscale(a, a_scales, b, b_scales, expert_offsets, *, activation=None, out_dtype='bfloat16'): "
    "fp8_gemm_blockscale per expert over the MoE contiguous layout: a [R, K], a_scales [R, ceil(K/128)], b [E, Nw, K], "
    "b_scales [E, ceil(Nw/128), ceil(K/128)]; rows offsets[e]..offsets[e+1] use expert e, rows outside "
    "[offsets[0], offsets[E]) are 0; ",
    2, Tensor("expert_offsets", INTS, rank=1), _contiguous_rows,
    check=_grouped_check, samples=_grouped_samples, error_samples=_grouped_errors, bench=_grouped_bench, torch_peer=_grouped_peer,
)


def _masked_args(rng, fmt, counts, m, k, nw, activation=None, index="int32", out_dtype="bfloat16"):
    counts = np.asarray(counts, np.int64)
    e, kb = counts.size, -(-k // BLOCK)
    return {"a": _fp8(rng, (e, m, k), fmt), "a_scales": _fp8_scales(rng, (e, m, kb), fmt), **fp8_expert_weights(rng, fmt, e, nw, k),
            "masked_m": counts.astype(index), "activation": activation, "out_dtype": out_dtype}


def _masked_samples(rng, fmt):
    yield Sample(_masked_args(rng, fmt, [1], 1, 128, 1), "1 expert, M = 1, 1x1x128")
    yield Sample(_masked_args(rng, fmt, [5, 0, 9, 3], 9, 200, 33), "4 experts M = 9, an empty and a full one, K = 200")
    yield Sample(_masked_args(rng, fmt, [70, 66, 0], 70, 130, 2 * 24, "silu_and_mul"), "M = 70: counts past one 64-row tile, silu_and_mul")
    yield Sample(_masked_args(rng, fmt, [40, 1], 40, 130, 2 * 129, "silu_and_mul", out_dtype="float32"),
                 "silu_and_mul N = 129 (gate/up blocks straddle), out float32")
    yield Sample(_masked_args(rng, fmt, rng.integers(0, 9, 3), 8, 384, 257, index="int64", out_dtype="float16"),
                 "random counts (int64), K = 384, N = 257, out float16")
    yield Sample(_masked_args(rng, fmt, rng.integers(0, 2, 8), 1, 256, 2 * 64, "silu_and_mul"), "decode-like: 8 experts, M = 1, counts 0 or 1")
    yield Sample(_masked_args(rng, fmt, [-2, 12, 2**31 - 1, 3], 6, 136, 20), "counts < 0 and > M: 0 and M rows", "edge")
    yield Sample(_masked_args(rng, fmt, [-2**40, 2**32 + 3, 2**33, 5], 6, 136, 2 * 20, "silu_and_mul", index="int64"),
                 "int64 counts < 0 and past 2**32 (M rows, not their low word 3): 0 and M rows", "edge")
    junk = _masked_args(rng, fmt, [2, 0, 4], 5, 140, 24)
    junk["a"][0, 2:] = np.nan
    junk["a_scales"][0, 2:] = np.inf
    junk["a_scales"][1] = np.nan
    yield Sample(junk, "NaN codes and inf / NaN scales in the rows past the counts: zeros there", "edge")
    s = _masked_args(rng, fmt, [6, 3], 7, 140, 2 * 24, "silu_and_mul")
    s["a"] = strided(s["a"])
    yield Sample(s, "strided a", "edge")
    yield Sample(_masked_args(rng, fmt, [0, 0, 0], 4, 256, 64), "every count 0: zeros", "edge")
    yield Sample(_masked_args(rng, fmt, [0, 0], 0, 130, 20), "M = 0", "edge")
    yield Sample(_masked_args(rng, fmt, [], 3, 128, 16), "no experts", "edge")
    for act in EPILOGUES:
        if act is not None and act != "silu_and_mul":
            yield Sample(_masked_args(rng, fmt, [7, 0, 5], 7, 136, 2 * 20 if is_gated(act) else 20, act), f"{act}, 3 experts")


def _masked_errors(rng):
    fmt = FP8[0]

    def args(**kw):
        return _masked_args(rng, fmt, [3, 2], 4, 130, 6) | kw

    yield ErrorSample(args(b=_fp8(rng, (2, 6, 129), fmt)), "K mismatch", match="b")
    yield ErrorSample(args(b=_fp8(rng, (3, 6, 130), fmt), b_scales=_scales(rng, (3, 1, 2))), "b for 3 of a's 2 experts", match="'b'")
    yield ErrorSample(args(b_scales=_scales(rng, (2, 1, 1))), "b_scales not per 128 K", match="b_scales")
    yield ErrorSample(args(a_scales=_scales(rng, (2, 4, 1))), "a_scales not per 128 K", match="a_scales")
    yield ErrorSample(args(a_scales=_scales(rng, (8, 2))), "a_scales [E * M, KB]", match="rank")
    yield ErrorSample(args(masked_m=np.array([3, 2, 0], np.int32)), "masked_m for 3 experts", match="masked_m")
    yield ErrorSample(args(masked_m=np.array([3, 2], np.float32)), "float masked_m", match="dtype")
    yield ErrorSample(_masked_args(rng, fmt, [3, 2], 4, 130, 7, "silu_and_mul"), "odd rows with silu_and_mul", match="even")
    yield ErrorSample(args(b=_fp8(rng, (2, 6, 130), "float8_e4m3fnuz")), "mixed fp8 flavours", match="dtype")
    yield ErrorSample(args(a=_fp8(rng, (8, 130), fmt)), "rank-2 a", match="rank")
    yield ErrorSample(args(activation="tanh"), "unknown activation", match="activation")


def _masked_peer(t):
    e, m, k = t["a"].shape
    segments = masked_segments(t["masked_m"].tolist(), m)
    return lambda: _torch_grouped(t, t["a"].reshape(e * m, k), t["a_scales"].reshape(e * m, t["a_scales"].shape[2]), segments).unflatten(0, (e, m))


def _masked_bench(rng, fmt, experts=8, m=256, k=2048, n=1024):
    """DeepEP's low-latency dispatch into DeepGEMM's masked layout, DeepSeek-like gate/up projection: 8 local
    experts with room for 256 tokens each, 128..256 of them received."""
    return _masked_args(rng, fmt, rng.integers(128, m + 1, experts), m, k, 2 * n, "silu_and_mul")


fp8_grouped_gemm_masked_blockscale = _fp8_grouped_op(
    "fp8_grouped_gemm_masked_blockscale",
    "fp8_grouped_gemm_masked_blockscale(a, a_scales, b, b_scales, masked_m, *, activation=None, out_dtype='bfloat16'): "
    "fp8_gemm_blockscale per expert over the masked layout of DeepEP's low-latency mode (DeepGEMM's masked GEMM): a [E, M, K], "
    "a_scales [E, M, ceil(K/128)], b [E, Nw, K], b_scales [E, ceil(Nw/128), ceil(K/128)], masked_m [E] int32 / int64; "
    "row m of expert e is computed for m < clamp(masked_m[e], 0, M), every other row is 0. The counts are never read on "
    "the host (the call can be captured in a CUDA graph), so they are not checked: a count < 0 acts as 0 and one > M as "
    "M. ",
    3, Tensor("masked_m", INTS, rank=1), _masked_rows,
    check=_masked_check, samples=_masked_samples, error_samples=_masked_errors, bench=_masked_bench, torch_peer=_masked_peer,
)


# ---------------------------------------------------------------- int8_gemm


def _int8_check(a):
    m, (n, k_b) = a["a"].shape[0], a["b"].shape
    _check_k(a, "b", k_b)
    if tuple(a["a_scales"].shape) not in ((m, 1), (1, 1)):
        raise InvalidArgument("a_scales", f"shape ({m}, 1) per token or (1, 1) per tensor", f"shape {tuple(a['a_scales'].shape)}")
    if tuple(a["b_scales"].shape) not in ((n, 1), (1, 1)):
        raise InvalidArgument("b_scales", f"shape ({n}, 1) per channel or (1, 1) per tensor", f"shape {tuple(a['b_scales'].shape)}")
    if a["bias"] is not None:
        _want_shape("bias", a["bias"], (n,))


def _int8_scaled(a):
    """(a @ b.T) * a_scales * b_scales.T, the int8 values as float64 (exact)."""
    s = F.values(a["a_scales"]) * F.values(a["b_scales"]).T
    return (F.values(a["a"]) @ F.values(a["b"]).T) * s


def _int8_reference(a):
    y = _int8_scaled(a)
    return [y if a["bias"] is None else y + F.values(a["bias"])]


def _int8_magnitude(a, refs):
    # The integer sum is exact (int32), so only the fp32 epilogue rounds: the bound is relative to the
    # scaled sum and the bias, not to |a| @ |b|. A kernel that accumulates in fp32 fails the sample
    # whose partial sums pass 2^24 and cancel back.
    y = np.abs(_int8_scaled(a))
    return [y if a["bias"] is None else y + np.abs(F.values(a["bias"]))]


def _int8_args(rng, m, k, n, per_token=True, per_channel=True, bias=None, out_dtype="bfloat16"):
    return {"a": _codes(rng, (m, k), "int8", 50.0), "b": _codes(rng, (n, k), "int8", 50.0),
            "a_scales": _scales(rng, (m if per_token else 1, 1), 0.02), "b_scales": _scales(rng, (n if per_channel else 1, 1), 0.02),
            "bias": None if bias is None else random(rng, (n,), bias, 10.0), "out_dtype": out_dtype}


def _int8_samples(rng, dtype):
    yield Sample(_int8_args(rng, 1, 1, 1), "1x1x1")
    yield Sample(_int8_args(rng, 7, 13, 5, bias="float32"), "7x13x5 per token x per channel, bias")
    yield Sample(_int8_args(rng, 33, 300, 97, per_token=False, bias="bfloat16", out_dtype="float32"),
                 "per tensor x per channel, bfloat16 bias, out float32")
    yield Sample(_int8_args(rng, 65, 1029, 130, per_channel=False, out_dtype="float16"), "per token x per tensor, K = 1029, out float16")
    yield Sample(_int8_args(rng, 1, 2500, 257, per_token=False, per_channel=False, bias="float16"), "M = 1 decode, per tensor both, K = 2500")
    cancelling = _int8_args(rng, 3, 2600, 5, out_dtype="float32")
    cancelling["a"][:, 5:] = 127  # halves of 1295 x 127^2 (past 2^24, where fp32 stops holding every integer)
    cancelling["b"][:, 5:] = np.where(np.arange(5, 2600) < 1300, 127, -127)  # cancel to what the first 5 k leave
    yield Sample(cancelling, "partial sums past 2^24 that cancel: exact int32 accumulation", "edge")
    s = _int8_args(rng, 21, 200, 19, bias="float32")
    s["a"] = strided(s["a"])
    yield Sample(s, "strided a", "edge")
    yield Sample(_int8_args(rng, 0, 64, 9, bias="float32"), "M = 0", "edge")
    yield Sample(_int8_args(rng, 4, 0, 9, bias="float32"), "K = 0: bias only", "edge")


def _int8_errors(rng):
    def args(**kw):
        return _int8_args(rng, 4, 6, 5) | kw

    yield ErrorSample(args(b=_codes(rng, (5, 7), "int8", 9.0)), "K mismatch", match="b")
    yield ErrorSample(args(b=_codes(rng, (5, 6), "uint4", 9.0)), "uint8 b", match="dtype")
    yield ErrorSample(args(a_scales=_scales(rng, (1, 6))), "a_scales per column", match="a_scales")
    yield ErrorSample(args(b_scales=_scales(rng, (5,))), "rank-1 b_scales", match="rank")
    yield ErrorSample(args(b_scales=_scales(rng, (4, 1))), "b_scales for 4 of 5 channels", match="b_scales")
    yield ErrorSample(args(bias=random(rng, (4,), "float32")), "bias length", match="bias")
    yield ErrorSample(args(a_scales=np.ones((4, 1), np.float16)), "float16 scales", match="dtype")
    yield ErrorSample(args(a=random(rng, (4, 6), "float32")), "float a", match="dtype")
    yield ErrorSample(args(out_dtype="int32"), "int32 out_dtype", match="out_dtype")


def _int8_peer(t):
    import torch

    out_dtype = getattr(torch, t["out_dtype"])

    def run():
        y = torch.matmul(t["a"].float() * t["a_scales"], (t["b"].float() * t["b_scales"]).T)
        if t["bias"] is not None:
            y = y + t["bias"]
        return y.to(out_dtype)

    return run


int8_gemm = OpDef(
    name="int8_gemm",
    doc="int8_gemm(a, b, a_scales, b_scales, *, bias=None, out_dtype='bfloat16'): W8A8 GEMM a @ b.T with a [M, K] "
    "and b [N, K] int8, exact int32 accumulation, then * a_scales ([M, 1] per token or [1, 1]) * b_scales ([N, 1] "
    "per channel or [1, 1]) + bias in fp32.",
    params=[
        Tensor("a", ("int8",), rank=2),
        Tensor("b", ("int8",), rank=2),
        Tensor("a_scales", ("float32",), rank=2),
        Tensor("b_scales", ("float32",), rank=2),
        "*",
        Tensor("bias", FLOATS, rank=1, optional=True),
        Attr("out_dtype", "bfloat16", choices=FLOATS),
    ],
    check=_int8_check,
    outputs=lambda a: [((a["a"].shape[0], a["b"].shape[0]), a["out_dtype"])],
    reference=_int8_reference,
    samples=_int8_samples,
    error_samples=_int8_errors,
    magnitude=_int8_magnitude,  # no growth with K: the accumulation is exact
    bench=lambda rng, dtype, m=4096, k=2048, n=2048: _int8_args(rng, m, k, n, bias="float32"),
    cost=lambda a: _cost(a, a["b"].shape[0], a["a"], a["b"], a["bias"]),
    torch_peer=_int8_peer,
)


# ---------------------------------------------------------------- w4a16_gemm

# _WEIGHT_SCALES: the float scales of the weight-only GEMMs (w4a16 scales, nvfp4's tensor scale) must be
# finite. A quantizer never makes an infinite one, and with one the answer would depend on where a
# kernel applies it: per element (inf x a zero code = NaN, the dequantize-then-matmul reference and
# the cpu kernel) or to each group's partial sum (inf, the GPU tensor-op kernels).


def _w4_check(a):
    k = a["a"].shape[1]
    n = a["b_packed"].shape[0]
    _check_packed_k(a)
    g = a["group_size"]
    if k % g:
        raise InvalidArgument("a", f"K a multiple of group_size {g}", f"K = {k}")
    _want_shape("scales", a["scales"], (n, k // g))
    check_finite("scales", a["scales"])  # see _WEIGHT_SCALES
    if a["zeros"] is not None:
        _want_shape("zeros", a["zeros"], (n, k // g))


def _w4_weights(a):
    return _int4_weights(a["b_packed"], a["scales"], a["zeros"], a["group_size"])


def _w4_args(rng, dtype, m, k, n, group=128, zeros=False, scale_dtype=None):
    g = k // group
    s = _scales(rng, (n, g), 0.3).astype(to_numpy(scale_dtype or dtype))
    if zeros:
        z = rng.integers(0, 16, (n, g)).astype(np.uint8)
        # uint4 codes around each group's zero point
        codes = F.encode(rng.standard_normal((n, k)) * 3.0 + F.expand_scales(z, (n, k), "group", group), "uint4")
    else:
        z, codes = None, _codes(rng, (n, k), "int4", 3.0)
    return {"a": random(rng, (m, k), dtype), "b_packed": F.pack_nibbles(codes), "scales": s, "zeros": z, "group_size": group}


def _w4_samples(rng, dtype):
    yield Sample(_w4_args(rng, dtype, 1, 32, 1, 32), "1x32x1 group 32")
    yield Sample(_w4_args(rng, dtype, 7, 96, 13, 32, zeros=True), "7x96x13 group 32 zeros")
    yield Sample(_w4_args(rng, dtype, 33, 320, 97, 64), "33x320x97 group 64")
    yield Sample(_w4_args(rng, dtype, 17, 192, 130, 64, zeros=True, scale_dtype="float32"), "group 64 zeros, float32 scales")
    yield Sample(_w4_args(rng, dtype, 65, 384, 129, 128, scale_dtype="bfloat16"), "65x384x129 group 128, bfloat16 scales")
    yield Sample(_w4_args(rng, dtype, 1, 1024, 259, 128, zeros=True), "M = 1 decode, group 128 zeros")
    s = _w4_args(rng, dtype, 11, 128, 21, 32, zeros=True)
    s["a"] = strided(s["a"])
    yield Sample(s, "strided a", "edge")
    yield Sample(_w4_args(rng, dtype, 0, 64, 7, 32), "M = 0", "edge")


def _w4_errors(rng):
    f32 = "float32"

    def args(**kw):
        return _w4_args(rng, f32, 3, 128, 5, 64, zeros=True) | kw

    yield ErrorSample(args(b_packed=np.zeros((5, 128), np.uint8)), "b unpacked (K bytes per row)", match="b_packed")
    yield ErrorSample(args(group_size=48), "group_size 48", match="group_size")
    yield ErrorSample(_w4_args(rng, f32, 3, 96, 5, 32) | {"group_size": 64}, "K not a multiple of the group", match="group_size")
    yield ErrorSample(args(scales=np.ones((5, 1), np.float32)), "scales per row", match="scales")
    yield ErrorSample(args(zeros=np.ones((5, 2), np.int8)), "int8 zeros", match="dtype")
    yield ErrorSample(args(zeros=np.ones((2, 5), np.uint8)), "zeros transposed", match="zeros")
    yield ErrorSample(args(a=np.ones((3, 128), np.int8)), "int8 a", match="dtype")
    inf = args()
    inf["scales"][2, 1] = np.inf
    yield ErrorSample(inf, "an infinite group scale", match="scales")
    yield ErrorSample(args(a=random(rng, (3, 127), f32)), "odd K", match="even")


def _torch_nibbles(b):
    """[N, K/2] bytes -> [N, K] codes 0..15, low nibble first (torch)."""
    import torch

    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(b.shape[0], 2 * b.shape[1])


def _w4_peer(t):
    import torch

    g = t["group_size"]

    def run():
        q = _torch_nibbles(t["b_packed"]).float()
        if t["zeros"] is None:
            q = torch.where(q >= 8, q - 16, q)
        else:
            q = q - t["zeros"].float().repeat_interleave(g, dim=1)
        w = q * t["scales"].float().repeat_interleave(g, dim=1)
        return torch.matmul(t["a"].float(), w.T).to(t["a"].dtype)

    return run


w4a16_gemm = OpDef(
    name="w4a16_gemm",
    doc="w4a16_gemm(a, b_packed, scales, zeros=None, *, group_size=128): a [M, K] float @ dequantized int4 "
    "weights.T; b_packed [N, K/2] (two codes per byte, low nibble first: signed int4, or uint4 with zeros), "
    "scales / zeros [N, K/group_size], w = (q - zero) * scale; fp32 accumulation, out in a's dtype.",
    params=[
        Tensor("a", FLOATS, rank=2),
        Tensor("b_packed", ("uint8",), rank=2),
        Tensor("scales", FLOATS, rank=2),
        Tensor("zeros", ("uint8",), rank=2, optional=True),
        "*",
        Attr("group_size", 128, int, choices=W4_GROUPS),
    ],
    check=_w4_check,
    outputs=lambda a: [((a["a"].shape[0], a["b_packed"].shape[0]), name_of(a["a"].dtype))],
    reference=lambda a: [a["a"] @ _w4_weights(a).T],
    samples=_w4_samples,
    error_samples=_w4_errors,
    growth=_growth,
    magnitude=lambda a, refs: [abs_matmul(a["a"], _w4_weights(a).T)],
    bench=lambda rng, dtype, m=4096, k=2048, n=2048: _w4_args(rng, dtype, m, k, n, 128),
    cost=lambda a: _cost(a, a["b_packed"].shape[0], a["a"], a["b_packed"], a["scales"], a["zeros"]),
    torch_peer=_w4_peer,
)


# ---------------------------------------------------------------- fp4_gemm


def _fp4_check(a):
    k = a["a"].shape[1]
    n = a["b_packed"].shape[0]
    _check_packed_k(a)
    fmt, groups = a["fmt"], -(-k // FP4_GROUP[a["fmt"]])
    want = "uint8" if fmt == "mxfp4" else "float8_e4m3fn"
    if name_of(a["b_scales"].dtype) != want:
        raise InvalidArgument("b_scales", f"dtype {want} for {fmt}", name_of(a["b_scales"].dtype))
    _want_shape("b_scales", a["b_scales"], (n, groups))
    ts = a["tensor_scale"]
    if fmt == "nvfp4":
        if ts is None:
            raise InvalidArgument("tensor_scale", "a float32 [1, 1] tensor scale for nvfp4", "None")
        _want_shape("tensor_scale", ts, (1, 1))
        check_finite("tensor_scale", ts)  # see _WEIGHT_SCALES
    elif ts is not None:
        raise InvalidArgument("tensor_scale", "None for mxfp4 (its E8M0 scales are the whole scale)", f"shape {tuple(ts.shape)}")


def _fp4_w(a):
    return _fp4_weights(a["b_packed"], a["b_scales"], a["fmt"], a["tensor_scale"])


def _fp4_args(rng, dtype, m, k, n, fmt="mxfp4"):
    groups = -(-k // FP4_GROUP[fmt])
    codes = _codes(rng, (n, k), "e2m1", 2.0)
    if fmt == "mxfp4":
        scales, ts = rng.integers(127 - 9, 127 + 2, (n, groups)).astype(np.uint8), None
    else:  # block scales spread over the e4m3 range, one fp32 tensor scale
        scales = F.encode(np.exp2(rng.uniform(-6, 8, (n, groups))), "float8_e4m3fn").view(to_numpy("float8_e4m3fn"))
        ts = _scales(rng, (1, 1), 0.01)
    return {"a": random(rng, (m, k), dtype), "b_packed": F.pack_nibbles(codes), "b_scales": scales, "fmt": fmt, "tensor_scale": ts}


def _fp4_samples(rng, dtype):
    for fmt in ("mxfp4", "nvfp4"):
        g = FP4_GROUP[fmt]
        yield Sample(_fp4_args(rng, dtype, 1, 2, 1, fmt), f"{fmt} 1x2x1")
        yield Sample(_fp4_args(rng, dtype, 7, 3 * g + 6, 13, fmt), f"{fmt} 7x{3 * g + 6}x13: partial last group")
        yield Sample(_fp4_args(rng, dtype, 33, 512, 130, fmt), f"{fmt} 33x512x130")
        yield Sample(_fp4_args(rng, dtype, 1, 1000, 259, fmt), f"{fmt} M = 1 decode, K = 1000")
        s = _fp4_args(rng, dtype, 11, 96, 17, fmt)
        s["a"] = strided(s["a"])
        yield Sample(s, f"{fmt} strided a", "edge")
        yield Sample(_fp4_args(rng, dtype, 0, 64, 5, fmt), f"{fmt} M = 0", "edge")


def _fp4_errors(rng):
    f32 = "float32"
    mx = _fp4_args(rng, f32, 3, 64, 5, "mxfp4")
    nv = _fp4_args(rng, f32, 3, 64, 5, "nvfp4")
    yield ErrorSample(nv | {"tensor_scale": None}, "nvfp4 without tensor_scale", match="tensor_scale")
    yield ErrorSample(mx | {"tensor_scale": np.ones((1, 1), np.float32)}, "mxfp4 with tensor_scale", match="tensor_scale")
    yield ErrorSample(mx | {"fmt": "nvfp4", "tensor_scale": np.ones((1, 1), np.float32)}, "E8M0 scales for nvfp4", match="b_scales")
    yield ErrorSample(nv | {"fmt": "mxfp4", "tensor_scale": None}, "e4m3 scales for mxfp4", match="b_scales")
    yield ErrorSample(mx | {"b_scales": mx["b_scales"][:, :1]}, "scales per 64, not 32", match="b_scales")
    yield ErrorSample(mx | {"b_packed": mx["b_packed"][:, :31]}, "b_packed for K = 62", match="b_packed")
    yield ErrorSample(mx | {"fmt": "fp4"}, "unknown fmt", match="fmt")
    yield ErrorSample(nv | {"tensor_scale": np.ones((1,), np.float32)}, "rank-1 tensor_scale", match="rank")
    yield ErrorSample(mx | {"a": random(rng, (3, 64), "float32").astype(np.float64)}, "float64 a", match="dtype")
    yield ErrorSample(nv | {"tensor_scale": np.full((1, 1), np.inf, np.float32)}, "an infinite tensor scale", match="tensor_scale")


_E2M1 = F.decode(np.arange(16, dtype=np.uint8), "e2m1")


def _fp4_peer(t):
    import torch

    g = FP4_GROUP[t["fmt"]]
    lut = torch.tensor(_E2M1, dtype=torch.float32)

    def run():
        w = lut[_torch_nibbles(t["b_packed"]).long()]
        if t["fmt"] == "mxfp4":
            s = torch.exp2(t["b_scales"].float() - 127)
        else:
            s = t["b_scales"].float() * t["tensor_scale"]
        w = w * s.repeat_interleave(g, dim=1)[:, : w.shape[1]]
        return torch.matmul(t["a"].float(), w.T).to(t["a"].dtype)

    return run


fp4_gemm = OpDef(
    name="fp4_gemm",
    doc="fp4_gemm(a, b_packed, b_scales, *, fmt='mxfp4', tensor_scale=None): a [M, K] float @ fp4 weights.T; b_packed "
    "[N, K/2] E2M1 codes (low nibble first); mxfp4: b_scales [N, ceil(K/32)] uint8 E8M0; nvfp4: b_scales "
    "[N, ceil(K/16)] float8_e4m3fn times tensor_scale [1, 1] float32. fp32 accumulation, out in a's dtype.",
    params=[
        Tensor("a", FLOATS, rank=2),
        Tensor("b_packed", ("uint8",), rank=2),
        Tensor("b_scales", ("uint8", "float8_e4m3fn"), rank=2),
        "*",
        Attr("fmt", "mxfp4", choices=tuple(FP4_GROUP)),
        Tensor("tensor_scale", ("float32",), rank=2, optional=True),
    ],
    check=_fp4_check,
    outputs=lambda a: [((a["a"].shape[0], a["b_packed"].shape[0]), name_of(a["a"].dtype))],
    reference=lambda a: [a["a"] @ _fp4_w(a).T],
    samples=_fp4_samples,
    error_samples=_fp4_errors,
    growth=_growth,
    magnitude=lambda a, refs: [abs_matmul(a["a"], _fp4_w(a).T)],
    bench=lambda rng, dtype, m=4096, k=2048, n=2048, fmt="mxfp4": _fp4_args(rng, dtype, m, k, n, fmt),
    cost=lambda a: _cost(a, a["b_packed"].shape[0], a["a"], a["b_packed"], a["b_scales"]),
    torch_peer=_fp4_peer,
)


OPS = (fp8_gemm_blockscale, fp8_grouped_gemm_blockscale, fp8_grouped_gemm_masked_blockscale, int8_gemm, w4a16_gemm, fp4_gemm)
