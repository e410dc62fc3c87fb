"""Dtype names shared by every backend, and their NumPy types (low-precision ones via ml_dtypes)."""
import ml_dtypes
import numpy as np

FLOATS = ("float32", "float16", "bfloat16")
INTS = ("int32", "int64")

_NUMPY = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
}

DTYPES = tuple(_NUMPY)


def to_numpy(name):
    """The NumPy dtype for a hal dtype name."""
    return _NUMPY[name]


_NAMES = {}


def name_of(dtype):
    """The hal dtype name of a NumPy, torch or CuPy dtype (torch.bfloat16 -> 'bfloat16')."""
    name = _NAMES.get(dtype)
    if name is None:
        text = str(dtype)
        name = _NAMES[dtype] = text[6:] if text.startswith("torch.") else np.dtype(dtype).name
    return name


# Tolerances per output dtype, from PyTorch's assert_close defaults (rtol, atol).
TOLERANCE = {
    "float64": (1e-7, 1e-7),
    "float32": (1.3e-6, 1e-5),
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
}
