"""gemm with a fused epilogue: out = act(alpha * (a @ b) + bias) + beta * c.

The epilogue is the part general libraries lack: bias, activation and the residual add of a
transformer block happen in the same kernel as the matrix multiply, on the fp32 accumulator.
"""
import math

import numpy as np

from hal.dtypes import FLOATS, name_of
from hal.opdef import Attr, InvalidArgument, ErrorSample, OpDef, Sample, Tensor, random, strided

from .activations import ACTIVATIONS, torch_activation


def _check(a):
    (m, k), (k2, n) = a["a"].shape, a["b"].shape
    if k2 != k:
        raise InvalidArgument("b", f"{k} rows to match a's {k} columns", f"shape {tuple(a['b'].shape)}")
    if name_of(a["b"].dtype) != name_of(a["a"].dtype):
        raise InvalidArgument("b", f"the dtype of a ({name_of(a['a'].dtype)})", name_of(a["b"].dtype))
    if a["bias"] is not None and tuple(a["bias"].shape) != (n,):
        raise InvalidArgument("bias", f"shape ({n},)", tuple(a["bias"].shape))
    if a["c"] is not None and tuple(a["c"].shape) != (m, n):
        raise InvalidArgument("c", f"shape ({m}, {n})", tuple(a["c"].shape))


def _reference(a):
    y = a["alpha"] * (a["a"] @ a["b"])
    if a["bias"] is not None:
        y = y + a["bias"]
    y = ACTIVATIONS[a["activation"]](y)
    return [y if a["c"] is None else y + a["beta"] * a["c"]]


def abs_matmul(a, b):
    """|a| @ |b|: what the rounding of fp32 dot products is relative to (not the possibly cancelling
    result). It only scales a tolerance, so it is computed in float32 (twice the speed and half the
    memory of float64, relative error below K 2^-24) wherever the largest terms show it cannot overflow."""
    with np.errstate(over="ignore"):
        x, y = np.abs(np.asarray(a, np.float32)), np.abs(np.asarray(b, np.float32))
    if x.size and y.size and float(x.max()) * float(y.max()) * a.shape[-1] < 1e37:  # False for inf / NaN too
        return (x @ y).astype(np.float64)
    return np.abs(a) @ np.abs(b)


def _magnitude(a, refs):
    y = abs(a["alpha"]) * abs_matmul(a["a"], a["b"])
    if a["bias"] is not None:
        y = y + np.abs(a["bias"])
    return [y if a["c"] is None else y + abs(a["beta"]) * np.abs(a["c"])]


def _args(rng, dtype, m, k, n, bias=False, c=False, **attrs):
    a = {"a": random(rng, (m, k), dtype), "b": random(rng, (k, n), dtype), "bias": None, "c": None,
         "activation": None, "alpha": 1.0, "beta": 0.0, "out_dtype": None}
    if bias:
        a["bias"] = random(rng, (n,), dtype)
    if c:
        a["c"] = random(rng, (m, n), dtype)
        a["beta"] = 1.0
    a.update(attrs)
    return a


def _samples(rng, dtype):
    yield Sample(_args(rng, dtype, 1, 1, 1), "1x1x1")
    yield Sample(_args(rng, dtype, 7, 13, 5, bias=True, activation="relu"), "7x13x5 bias relu")
    yield Sample(_args(rng, dtype, 97, 64, 33, bias=True, activation="gelu"), "97x64x33 bias gelu")
    yield Sample(_args(rng, dtype, 33, 1025, 97, activation="gelu_tanh", alpha=0.5), "33x1025x97 gelu_tanh alpha")
    yield Sample(_args(rng, dtype, 64, 96, 130, bias=True, activation="silu", c=True, beta=0.7), "64x96x130 bias silu residual")
    yield Sample(_args(rng, dtype, 129, 257, 65, c=True), "129x257x65 residual epilogue")
    yield Sample(_args(rng, dtype, 16, 32, 24, out_dtype="float32"), "out_dtype float32")
    t = _args(rng, dtype, 40, 24, 31, bias=True, activation="relu")
    t["a"] = np.ascontiguousarray(t["a"].T).T  # column-major a, the y.T of the README
    yield Sample(t, "transposed a", "edge")
    s = _args(rng, dtype, 20, 30, 17)
    s["b"] = strided(s["b"])
    yield Sample(s, "strided b", "edge")
    yield Sample(_args(rng, dtype, 0, 8, 5, bias=True), "M = 0", "edge")
    yield Sample(_args(rng, dtype, 6, 0, 5, bias=True, activation="gelu"), "K = 0: act(bias)", "edge")
    nan = _args(rng, dtype, 5, 12, 7, bias=True, activation="relu")
    nan["a"][2, 4] = np.nan
    yield Sample(nan, "relu on a NaN row: NaN, as torch", "edge")
    big = _args(rng, dtype, 8, 64, 8, bias=True)
    big["a"] = random(rng, (8, 64), dtype, 30.0)
    yield Sample(big, "magnitude ~30 per element", "edge")


def _errors(rng):
    f32 = "float32"
    yield ErrorSample(_args(rng, f32, 4, 5, 6) | {"b": random(rng, (4, 6), f32)}, "K mismatch", match="rows")
    yield ErrorSample(_args(rng, f32, 4, 5, 6) | {"a": random(rng, (5,), f32)}, "rank-1 a", match="rank")
    yield ErrorSample(_args(rng, f32, 4, 5, 6) | {"b": random(rng, (5, 6), "float16")}, "dtype mismatch", match="dtype")
    yield ErrorSample(_args(rng, f32, 4, 5, 6) | {"bias": random(rng, (5,), f32)}, "bias length", match="bias")
    yield ErrorSample(_args(rng, f32, 4, 5, 6) | {"c": random(rng, (6, 4), f32)}, "c shape", match="c")
    yield ErrorSample(_args(rng, f32, 4, 5, 6, activation="tanh"), "unknown activation", match="activation")
    yield ErrorSample(_args(rng, f32, 4, 5, 6, out_dtype="int8"), "integer out_dtype", match="out_dtype")
    yield ErrorSample(_args(rng, f32, 4, 5, 6, alpha="two"), "alpha not a number", match="alpha")
    yield ErrorSample(_args(rng, f32, 4, 5, 6) | {"a": np.ones((4, 5), np.int8)}, "int8 a", match="dtype")


def _peer(t):
    import torch


    def run():
        y = torch.matmul(t["a"], t["b"])
        if t["alpha"] != 1.0:
            y = y * t["alpha"]
        if t["bias"] is not None:
            y = y + t["bias"]
        y = torch_activation(t["activation"], y)
        return y if t["c"] is None else y + t["beta"] * t["c"]

    return run


def _bench(rng, dtype, m=2048, k=2048, n=2048, activation=None):
    return _args(rng, dtype, m, k, n, activation=activation)


gemm = OpDef(
    name="gemm",
    doc="gemm(a, b, *, bias=None, activation=None, alpha=1.0, beta=0.0, c=None, out_dtype=None): "
    "act(alpha * (a @ b) + bias) + beta * c, accumulated in fp32; activation in None, relu, gelu, gelu_tanh, silu.",
    params=[
        Tensor("a", rank=2),
        Tensor("b", rank=2),
        "*",
        Tensor("bias", rank=1, optional=True),
        Attr("activation", None, choices=tuple(ACTIVATIONS)),
        Attr("alpha", 1.0, float),
        Attr("beta", 0.0, float),
        Tensor("c", rank=2, optional=True),
        Attr("out_dtype", None, choices=FLOATS),
    ],
    check=_check,
    outputs=lambda a: [((a["a"].shape[0], a["b"].shape[1]), a["out_dtype"] or name_of(a["a"].dtype))],
    reference=_reference,
    samples=_samples,
    error_samples=_errors,
    growth=lambda a: math.sqrt(max(a["a"].shape[1], 1)),
    magnitude=_magnitude,
    bench=_bench,
    cost=lambda a: (2 * a["a"].shape[0] * a["a"].shape[1] * a["b"].shape[1], a["a"].nbytes + a["b"].nbytes + a["a"].shape[0] * a["b"].shape[1] * a["a"].itemsize),
    torch_peer=_peer,
)
