"""Array interchange: NumPy, torch, CuPy or any DLPack producer in, the same kind out.

Backends whose native arrays live in host memory (cpu, the sims, OpenCL on a CPU device) work on
NumPy views of the caller's memory; torch CPU tensors and other host DLPack producers are viewed,
not copied. Arrays on another device are copied to the host only when an op falls back.
"""
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


def kind_of(x):
    """'numpy', 'torch', 'cupy' or 'dlpack' (any other producer)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    module = type(x).__module__.split(".", 1)[0]
    return module if module in ("torch", "cupy") else "dlpack"


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
        import torch

        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        name = str(x.dtype)[6:]
        if name in _TORCH_VIA_INT:
            int_name, np_type = _TORCH_VIA_INT[name]
            return x.view(getattr(torch, int_name)).numpy().view(np_type)
        return x.numpy()
    if kind == "cupy":
        return x.get()
    return np.from_dlpack(x)


def from_host(y, like):
    """`y` (NumPy) as an array of the same kind and device as `like`."""
    kind = kind_of(like)
    if kind == "torch":
        import torch

        name = y.dtype.name
        if name in _TORCH_VIA_INT:
            int_name, _ = _TORCH_VIA_INT[name]
            t = torch.from_numpy(y.view(int_name)).view(getattr(torch, name))
        else:
            t = torch.from_numpy(y)
        return t if like.device.type == "cpu" else t.to(like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(y)
    return y
