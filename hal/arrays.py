"""Array interchange: NumPy, torch, CuPy or any DLPack producer in, the same kind out.

Backends whose native arrays live in host memory (cpu, the sims, OpenCL on a CPU device) work on
NumPy views of the caller's memory; torch CPU tensors and other host DLPack producers are viewed,
not copied. Arrays on another device are copied to the host only when an op falls back.
"""
import functools

import ml_dtypes
import numpy as np

DLPACK_CPU = 1  # the DLPack device type of host memory; device backends declare their own (2 CUDA, 10 ROCm)

# torch cannot hand a bfloat16 or float8 tensor to NumPy directly: go through a same-width int view.
_TORCH_VIA_INT = {
    "bfloat16": ("int16", ml_dtypes.bfloat16),
    "float8_e4m3fn": ("int8", ml_dtypes.float8_e4m3fn),
    "float8_e5m2": ("int8", ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": ("int8", ml_dtypes.float8_e4m3fnuz),
}


def is_tensor(x):
    return isinstance(x, np.ndarray) or hasattr(x, "__dlpack__")


_KINDS = {np.ndarray: "numpy"}  # type -> kind, filled as types are seen


def kind_of(x):
    """'numpy', 'torch', 'cupy' or 'dlpack' (any other producer)."""
    kind = _KINDS.get(type(x))
    if kind is None:
        if isinstance(x, np.ndarray):
            kind = "numpy"
        else:
            module = type(x).__module__.split(".", 1)[0]
            kind = module if module in ("torch", "cupy") else "dlpack"
        _KINDS[type(x)] = kind
    return kind


def device_type(x):
    """DLPack device type of an array (1 = CPU, 2 = CUDA, 10 = ROCm)."""
    if isinstance(x, np.ndarray) or getattr(x, "is_cpu", False) is True:  # torch's CPU tensors: its __dlpack_device__
        return DLPACK_CPU  # is a Python method costing microseconds per call (and calls pinned host memory type 3)
    return int(x.__dlpack_device__()[0])


def to_host(x):
    """A NumPy array with the values of `x`: a view when `x` is in host memory, else a copy."""
    if isinstance(x, np.ndarray):
        return x
    kind = kind_of(x)
    if kind == "torch":
        if x.requires_grad:
            x = x.detach()
        if not x.is_cpu:
            x = x.cpu()
        via = _torch_via_int().get(x.dtype)
        return x.numpy() if via is None else x.view(via[0]).numpy().view(via[1])
    if kind == "cupy":
        return x.get()
    return np.from_dlpack(x)


def from_host(y, like):
    """`y` (NumPy) as an array of the same kind and device as `like`."""
    kind = kind_of(like)
    if kind == "torch":
        import torch

        via = _torch_via_int().get(y.dtype)
        t = torch.from_numpy(y) if via is None else torch.from_numpy(y.view(via[2])).view(via[3])
        return t if like.is_cpu else t.to(like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(y)
    return y


@functools.cache
def _torch_via_int():
    """_TORCH_VIA_INT keyed both ways, for the per-call conversions: torch dtype -> (torch int dtype, NumPy
    dtype) and NumPy dtype -> (NumPy int dtype, torch dtype) (both kinds of dtype hash apart)."""
    import torch

    table = {}
    for name, (int_name, np_type) in _TORCH_VIA_INT.items():
        if not hasattr(torch, name):  # an older torch without this float8 flavour
            continue
        ints = (getattr(torch, int_name), np.dtype(np_type), np.dtype(int_name), getattr(torch, name))
        table[ints[3]] = table[ints[1]] = ints
    return table
