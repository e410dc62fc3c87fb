"""Pointwise and row-wise activations: softmax, silu_and_mul, and the gemm epilogue activations."""
import math

import numpy as np

from hal.dtypes import name_of, to_numpy
from hal.opdef import Attr, Bad, ErrorSample, OpDef, Sample, Tensor, random, strided

_erf = np.vectorize(math.erf, otypes=[np.float64])

# float64 references of the activations a kernel may fuse (gemm epilogues, silu_and_mul).
ACTIVATIONS = {
    None: lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def torch_activation(name, t):
    """The same activation in torch (for benchmark peers)."""
    import torch.nn.functional as F

    return {
        None: lambda: t,
        "relu": lambda: F.relu(t),
        "gelu": lambda: F.gelu(t),
        "gelu_tanh": lambda: F.gelu(t, approximate="tanh"),
        "silu": lambda: F.silu(t),
    }[name]()


# ---------------------------------------------------------------- softmax


def _softmax_check(a):
    ndim = len(a["x"].shape)
    dim = a["dim"]
    if not -ndim <= dim < ndim:
        raise Bad("dim", f"an int in [{-ndim}, {ndim})", dim)
    a["dim"] = dim % ndim


def _softmax_reference(a):
    x = a["x"]
    e = np.exp(x - x.max(axis=a["dim"], keepdims=True))
    return [e / e.sum(axis=a["dim"], keepdims=True)]


def _softmax_samples(rng, dtype):
    for shape, dim in [((1,), 0), ((7, 97), -1), ((3, 1025), -1), ((5, 33, 7), 1), ((129, 3), 0), ((2, 3, 4, 11), -1)]:
        yield Sample({"x": random(rng, shape, dtype, 3.0), "dim": dim}, f"{shape} dim={dim}")
    yield Sample({"x": strided(random(rng, (9, 100), dtype)), "dim": -1}, "strided rows", "edge")
    yield Sample({"x": random(rng, (17, 257), dtype, 1e3), "dim": -1}, "logits ~1e3", "edge")
    masked = random(rng, (6, 130), dtype).astype(np.float64)
    masked[:, 40:] = -np.inf  # attention-style masking; no row is fully masked
    yield Sample({"x": masked.astype(to_numpy(dtype)), "dim": -1}, "-inf masked tail", "edge")
    yield Sample({"x": random(rng, (0, 16), dtype), "dim": -1}, "empty batch", "edge")


def _softmax_peer(t):
    return lambda: t["x"].softmax(t["dim"])


def _softmax_errors(rng):
    yield ErrorSample({"x": random(rng, (4, 5), "float32"), "dim": 2}, "dim out of range", match="dim")
    yield ErrorSample({"x": np.arange(6, dtype=np.int32), "dim": 0}, "int input", match="dtype")
    yield ErrorSample({"x": [1.0, 2.0], "dim": 0}, "a list, not a tensor", match="x")


softmax = OpDef(
    name="softmax",
    doc="softmax(x, *, dim=-1): exp(x - max) / sum(exp(x - max)) along `dim`, computed in fp32.",
    params=[Tensor("x"), "*", Attr("dim", -1, int)],
    check=_softmax_check,
    outputs=lambda a: [(tuple(a["x"].shape), name_of(a["x"].dtype))],
    reference=_softmax_reference,
    samples=_softmax_samples,
    error_samples=_softmax_errors,
    growth=lambda a: math.sqrt(max(a["x"].shape[a["dim"]], 1)),
    bench=lambda rng, dtype: {"x": random(rng, (4096, 4096), dtype), "dim": -1},
    cost=lambda a: (5 * a["x"].size, 2 * a["x"].nbytes),
    torch_peer=_softmax_peer,
)

# ---------------------------------------------------------------- silu_and_mul


def _silu_and_mul_check(a):
    last = a["x"].shape[-1]
    if last % 2:
        raise Bad("x", "an even last dimension (gate and up halves)", last)


def _halves(x):
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def _silu_and_mul_samples(rng, dtype):
    for shape in [(1, 2), (7, 2 * 97), (33, 2 * 1025), (2, 5, 2 * 64), (3, 2 * 7)]:
        yield Sample({"x": random(rng, shape, dtype, 2.0)}, f"{shape}")
    yield Sample({"x": strided(random(rng, (11, 2 * 48), dtype), axis=0)}, "strided rows", "edge")
    yield Sample({"x": random(rng, (9, 2 * 33), dtype, 30.0)}, "magnitude ~30", "edge")
    yield Sample({"x": random(rng, (0, 8), dtype)}, "empty batch", "edge")


def _silu_and_mul_errors(rng):
    yield ErrorSample({"x": random(rng, (4, 7), "float32")}, "odd last dim", match="even")
    yield ErrorSample({"x": np.array(1.5, np.float32)}, "0-d array", match="rank")
    yield ErrorSample({"x": np.ones((2, 4), np.int64)}, "int input", match="dtype")


def _silu_and_mul_peer(t):
    import torch.nn.functional as F

    x = t["x"]
    d = x.shape[-1] // 2
    return lambda: F.silu(x[..., :d]) * x[..., d:]


silu_and_mul = OpDef(
    name="silu_and_mul",
    doc="silu_and_mul(x): SwiGLU, silu(x[..., :d]) * x[..., d:] for a last dim of 2d.",
    params=[Tensor("x")],
    check=_silu_and_mul_check,
    outputs=lambda a: [(tuple(a["x"].shape[:-1]) + (a["x"].shape[-1] // 2,), name_of(a["x"].dtype))],
    reference=lambda a: [ACTIVATIONS["silu"](_halves(a["x"])[0]) * _halves(a["x"])[1]],
    samples=_silu_and_mul_samples,
    error_samples=_silu_and_mul_errors,
    magnitude=lambda a, refs: [np.abs(_halves(a["x"])[0]) * np.abs(_halves(a["x"])[1]) + np.abs(refs[0])],
    bench=lambda rng, dtype: {"x": random(rng, (4096, 2 * 5632), dtype)},
    cost=lambda a: (5 * a["x"].size // 2, 3 * a["x"].nbytes // 2),
    torch_peer=_silu_and_mul_peer,
)
