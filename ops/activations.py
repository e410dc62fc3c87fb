"""Pointwise and row-wise activations: softmax, the gated elementwise ops (silu_and_mul), and the
epilogue activations every fused kernel takes (gemm, grouped_gemm, the quantized grouped GEMMs).

The activation names and their integer codes are hal.codes.ACTIVATIONS (plain) and
hal.codes.GATED_ACTIVATIONS ("<name>_and_mul": act(h[..., :N]) * h[..., N:]); this module holds their
float64 formulas and what every op with an epilogue derives from them: the attribute choices, the
reference (`epilogue`), the error bound (`epilogue_magnitude`) and the torch peer (`torch_epilogue`).
Adding an activation is one entry in hal.codes plus one formula here and one `activate` case per
backend; a gated elementwise op "<name>_and_mul" is one more name in GATED_OP_NAMES.
"""
import functools
import math

import numpy as np

from hal import codes
from hal.dtypes import name_of, to_numpy
from hal.opdef import Attr, InvalidArgument, ErrorSample, OpDef, Sample, Tensor, random, strided

_erf = np.vectorize(math.erf, otypes=[np.float64])

# float64 references of the activations, one per name of hal.codes.ACTIVATIONS.
ACTIVATIONS = {
    None: lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}
assert ACTIVATIONS.keys() == codes.ACTIVATIONS.keys(), "one float64 formula per activation of hal.codes"

# Every epilogue an op with a fused activation accepts: None, the plain ones, the gated ones.
EPILOGUES = tuple(codes.ACTIVATIONS) + tuple(codes.GATED_ACTIVATIONS)


def is_gated(name):
    return name in codes.GATED_ACTIVATIONS


def _plain(name):
    """The activation of an epilogue name: "silu_and_mul" -> "silu", "relu" -> "relu"."""
    return name[: -len(codes.GATED_SUFFIX)] if is_gated(name) else name


def epilogue_columns(name, n):
    """Output columns of an epilogue over n products (gated: the gate and up halves make N = n / 2)."""
    return n // 2 if is_gated(name) else n


def epilogue(name, h):
    """float64 epilogue `name` of products h [..., n]: act(h), or act(h[..., :N]) * h[..., N:] when gated."""
    act = ACTIVATIONS[_plain(name)]
    if not is_gated(name):
        return act(h)
    n = h.shape[-1] // 2
    return act(h[..., :n]) * h[..., n:]


@functools.cache
def slope(name):
    """An upper bound of |act'| (rounded up to 0.01), measured on the float64 formula: how much of an
    error in the products an activation passes on (silu 1.1, gelu 1.13, relu 1)."""
    x = np.linspace(-12.0, 12.0, 240001)
    f, step = ACTIVATIONS[_plain(name)], 1e-6
    steepest = float(np.max(np.abs(f(x + step) - f(x - step)))) / (2 * step)
    return math.ceil(round(steepest, 6) * 100) / 100


def epilogue_magnitude(name, h, bound):
    """What the rounding error of the epilogue's output is relative to, given the products h [..., n]
    and the scale `bound` their fp32 errors are relative to (|x| @ |w|.T): slope * bound, and for a
    gated epilogue d(act(g) u) = act'(g) u dg + act(g) du."""
    if name is None:
        return bound
    if not is_gated(name):
        return slope(name) * bound
    n = h.shape[-1] // 2
    act = ACTIVATIONS[_plain(name)]
    return slope(name) * np.abs(h[..., n:]) * bound[..., :n] + np.abs(act(h[..., :n])) * bound[..., n:]


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


def torch_epilogue(name, h):
    """epilogue() in torch."""
    if not is_gated(name):
        return torch_activation(name, h)
    n = h.shape[-1] // 2
    return torch_activation(_plain(name), h[..., :n]) * h[..., n:]


# ---------------------------------------------------------------- softmax


def _softmax_check(a):
    ndim = len(a["x"].shape)
    dim = a["dim"]
    if not -ndim <= dim < ndim:
        raise InvalidArgument("dim", f"an int in [{-ndim}, {ndim})", dim)
    a["dim"] = dim % ndim


def _softmax_reference(a):
    x = a["x"]
    e = np.exp(x - x.max(axis=a["dim"], keepdims=True, initial=-np.inf))  # initial: an empty dim
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

# ---------------------------------------------------------------- gated elementwise ops: silu_and_mul
#
# "<act>_and_mul"(x) = act(x[..., :d]) * x[..., d:] for a last dim of 2d, one OpDef per name of
# GATED_OP_NAMES (hal.codes.GATED_ACTIVATIONS gives the kernels their activation code).

GATED_OP_NAMES = ("silu_and_mul", "gelu_and_mul", "gelu_tanh_and_mul")


def _gated_check(a):
    last = a["x"].shape[-1]
    if last % 2:
        raise InvalidArgument("x", "an even last dimension (gate and up halves)", last)


def _halves(x):
    d = x.shape[-1] // 2
    return x[..., :d], x[..., d:]


def _gated_samples(rng, dtype):
    for shape in [(1, 2), (7, 2 * 97), (33, 2 * 1025), (2, 5, 2 * 64), (3, 2 * 7)]:
        yield Sample({"x": random(rng, shape, dtype, 2.0)}, f"{shape}")
    yield Sample({"x": strided(random(rng, (11, 2 * 48), dtype), axis=0)}, "strided rows", "edge")
    yield Sample({"x": random(rng, (9, 2 * 33), dtype, 30.0)}, "magnitude ~30", "edge")
    yield Sample({"x": random(rng, (0, 8), dtype)}, "empty batch", "edge")


def _gated_errors(rng):
    yield ErrorSample({"x": random(rng, (4, 7), "float32")}, "odd last dim", match="even")
    yield ErrorSample({"x": np.array(1.5, np.float32)}, "0-d array", match="rank")
    yield ErrorSample({"x": np.ones((2, 4), np.int64)}, "int input", match="dtype")


def gated_op(name):
    """The OpDef of the gated elementwise op `name` ("silu_and_mul", ...)."""
    act = _plain(name)
    return OpDef(
        name=name,
        doc=f"{name}(x): {'SwiGLU, ' if act == 'silu' else ''}{act}(x[..., :d]) * x[..., d:] for a last dim of 2d.",
        params=[Tensor("x")],
        check=_gated_check,
        outputs=lambda a: [(tuple(a["x"].shape[:-1]) + (a["x"].shape[-1] // 2,), name_of(a["x"].dtype))],
        reference=lambda a: [epilogue(name, a["x"])],
        samples=_gated_samples,
        error_samples=_gated_errors,
        magnitude=lambda a, refs: [np.abs(_halves(a["x"])[0]) * np.abs(_halves(a["x"])[1]) + np.abs(refs[0])],
        bench=lambda rng, dtype: {"x": random(rng, (4096, 2 * 5632), dtype)},
        cost=lambda a: (5 * a["x"].size // 2, 3 * a["x"].nbytes // 2),
        torch_peer=lambda t: lambda: torch_epilogue(name, t["x"]),
    )


GATED_OPS = tuple(gated_op(name) for name in GATED_OP_NAMES)
silu_and_mul = GATED_OPS[0]
