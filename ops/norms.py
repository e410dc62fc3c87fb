"""Normalizations with the fused residual add of LLM blocks: rms_norm and layer_norm.

With `residual`, both normalize s = x + residual and return (normalized, s): the sum is the
residual stream that the next block adds to.
"""
import math

import numpy as np

from hal.dtypes import name_of
from hal.opdef import Attr, InvalidArgument, ErrorSample, OpDef, Sample, Tensor, random, strided


def _check(a):
    x = a["x"]
    hidden = x.shape[-1]
    if hidden == 0:
        raise InvalidArgument("x", "a non-empty last dimension", tuple(x.shape))
    for name in ("weight", "bias"):
        if a.get(name) is not None and tuple(a[name].shape) != (hidden,):
            raise InvalidArgument(name, f"shape ({hidden},) to match x's last dimension", tuple(a[name].shape))
    r = a["residual"]
    if r is not None:
        if tuple(r.shape) != tuple(x.shape):
            raise InvalidArgument("residual", f"the shape of x {tuple(x.shape)}", tuple(r.shape))
        if name_of(r.dtype) != name_of(x.dtype):
            raise InvalidArgument("residual", f"the dtype of x ({name_of(x.dtype)})", name_of(r.dtype))
    if not a["eps"] >= 0.0:
        raise InvalidArgument("eps", "a non-negative float", a["eps"])


def _outputs(a):
    out = (tuple(a["x"].shape), name_of(a["x"].dtype))
    return [out, out] if a["residual"] is not None else [out]


def _summed(a):
    return a["x"] if a["residual"] is None else a["x"] + a["residual"]


def _with_sum(a, y):
    return [y] if a["residual"] is None else [y, _summed(a)]


def _rms(s, eps):
    return np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + eps)


def _rms_norm_reference(a):
    s = _summed(a)
    return _with_sum(a, s / _rms(s, a["eps"]) * a["weight"])


def _layer_norm_parts(a):
    s = _summed(a)
    mean = s.mean(axis=-1, keepdims=True)
    std = np.sqrt(((s - mean) ** 2).mean(axis=-1, keepdims=True) + a["eps"])
    return s, mean, std


def _layer_norm_reference(a):
    s, mean, std = _layer_norm_parts(a)
    y = (s - mean) / std * a["weight"]
    return _with_sum(a, y if a["bias"] is None else y + a["bias"])


def _layer_norm_magnitude(a, refs):
    # Cancellation in s - mean is inherent to fp32 compute: errors scale with |s| / std, not |y|.
    s, _, std = _layer_norm_parts(a)
    y = np.abs(s) / std * np.abs(a["weight"]) + (0.0 if a["bias"] is None else np.abs(a["bias"]))
    return [y] + [np.abs(r) for r in refs[1:]]


def _samples(with_bias):
    def samples(rng, dtype):
        def make(shape, residual, scale=1.0, wdtype=dtype, view=None, label=""):
            x = random(rng, shape, dtype, scale)
            a = {
                "x": view(x) if view else x,
                "weight": random(rng, shape[-1:], wdtype),
                "residual": random(rng, shape, dtype, scale) if residual else None,
                "eps": 1e-5,
            }
            if with_bias:
                a["bias"] = random(rng, shape[-1:], wdtype)
            return Sample(a, label or f"{shape}{' +residual' if residual else ''}", "edge" if view or scale != 1.0 else "ordinary")

        for shape in [(1, 1), (7, 97), (4, 1025), (3, 5, 64), (2, 4096)]:
            yield make(shape, residual=False)
            yield make(shape, residual=True)
        yield make((5, 96), residual=False, wdtype="float32", label="fp32 weight")
        yield make((9, 100), residual=True, view=strided, label="strided x")
        yield make((6, 257), residual=True, scale=5e3 if dtype == "float16" else 1e4, label="large magnitude, overflows if squared in the input dtype")
        yield make((0, 32), residual=True, label="empty batch")

    return samples


def _errors(with_bias):
    def errors(rng):
        def base(**over):
            a = {"x": random(rng, (4, 8), "float32"), "weight": random(rng, (8,), "float32"), "residual": None, "eps": 1e-6}
            if with_bias:
                a["bias"] = random(rng, (8,), "float32")
            a.update(over)
            return a

        yield ErrorSample(base(weight=random(rng, (7,), "float32")), "weight length", match="weight")
        yield ErrorSample(base(residual=random(rng, (4, 9), "float32")), "residual shape", match="residual")
        yield ErrorSample(base(residual=random(rng, (4, 8), "float16")), "residual dtype", match="residual")
        yield ErrorSample(base(x=random(rng, (4, 0), "float32")), "empty hidden dim", match="non-empty")
        yield ErrorSample(base(x=np.ones((4, 8), np.int32)), "int input", match="dtype")
        yield ErrorSample(base(eps=-1.0), "negative eps", match="eps")
        if with_bias:
            yield ErrorSample(base(bias=random(rng, (3,), "float32")), "bias length", match="bias")

    return errors


def _bench(with_bias):
    def bench(rng, dtype):
        a = {"x": random(rng, (4096, 4096), dtype), "weight": random(rng, (4096,), dtype), "residual": None, "eps": 1e-6}
        if with_bias:
            a["bias"] = random(rng, (4096,), dtype)
        return a

    return bench


def _cost(a):
    passes = 2 if a["residual"] is None else 4  # read x (+ residual), write y (+ the sum)
    return 4 * a["x"].size, passes * a["x"].nbytes


def _rms_norm_peer(t):
    import torch.nn.functional as F

    return lambda: F.rms_norm(t["x"] if t["residual"] is None else t["x"] + t["residual"], t["weight"].shape, t["weight"], t["eps"])


def _layer_norm_peer(t):
    import torch.nn.functional as F

    return lambda: F.layer_norm(t["x"] if t["residual"] is None else t["x"] + t["residual"], t["weight"].shape, t["weight"], t["bias"], t["eps"])


def _growth(a):
    return math.sqrt(a["x"].shape[-1])


rms_norm = OpDef(
    name="rms_norm",
    doc="rms_norm(x, weight, *, eps=1e-6, residual=None): s / sqrt(mean(s^2) + eps) * weight with s = x (+ residual); "
    "with a residual also returns s.",
    params=[Tensor("x"), Tensor("weight", rank=1), "*", Attr("eps", 1e-6, float), Tensor("residual", optional=True)],
    check=_check,
    outputs=_outputs,
    results=("out", "s?"),
    reference=_rms_norm_reference,
    samples=_samples(with_bias=False),
    error_samples=_errors(with_bias=False),
    growth=_growth,
    bench=_bench(with_bias=False),
    cost=_cost,
    torch_peer=_rms_norm_peer,
)

layer_norm = OpDef(
    name="layer_norm",
    doc="layer_norm(x, weight, bias, *, eps=1e-5, residual=None): (s - mean) / sqrt(var + eps) * weight + bias with "
    "s = x (+ residual); with a residual also returns s. `bias` may be None.",
    params=[Tensor("x"), Tensor("weight", rank=1), Tensor("bias", rank=1, optional=True), "*", Attr("eps", 1e-5, float), Tensor("residual", optional=True)],
    check=_check,
    outputs=_outputs,
    results=("out", "s?"),
    reference=_layer_norm_reference,
    samples=_samples(with_bias=True),
    error_samples=_errors(with_bias=True),
    growth=_growth,
    magnitude=_layer_norm_magnitude,
    bench=_bench(with_bias=True),
    cost=_cost,
    torch_peer=_layer_norm_peer,
)
