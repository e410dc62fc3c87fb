"""Every integer code a kernel receives, declared once.

The CPU kernels (Numba), the GPU kernels (CUDA / HIP, cuda-sim / rocm-sim) and the OpenCL plugin
all take their constants from these tables: Python code indexes them by name, and C-family
kernels get them as preprocessor definitions (`defines()`, passed as `-D` options by every
compiler driver: NVRTC, hipcc, hipRTC, the emulator's host compiler, the OpenCL build), so no
kernel file repeats a number. Adding an activation means one entry in ACTIVATIONS plus its
formula in each backend's `activate`.
"""

# Epilogue activations a kernel may fuse (gemm, grouped_gemm, the quantized grouped GEMMs).
# 0 is "none". A gated form "<name>_and_mul" applies the activation to the gate half and
# multiplies by the up half; it exists for every activation except none.
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
GATED_SUFFIX = "_and_mul"
GATED_ACTIVATIONS = {f"{name}{GATED_SUFFIX}": code for name, code in ACTIVATIONS.items() if name}

# Element formats of quantized tensors (hal/formats.py describes their bits). The fp8 codes double
# as the KV-cache formats of paged decode (0 there means "the cache holds T itself").
FORMAT_CODES = {"float8_e4m3fn": 1, "float8_e4m3fnuz": 2, "float8_e5m2": 3, "int8": 4, "int4": 5, "uint4": 6, "mxfp4": 7, "nvfp4": 8}
KV_FORMATS = ("float8_e4m3fn", "float8_e4m3fnuz")

# Index dtypes the kernels are templated on, with their C type names.
INDEX_TYPES = {"int32": "int", "int64": "long long"}

# Reduction modes of embedding_bag and router scorings of moe_route.
BAG_MODES = {"sum": 0, "mean": 1, "max": 2}
ROUTE_SCORINGS = {"softmax": 0, "sigmoid": 1}


def activation_code(name):
    """(activation code, gated) of an epilogue activation name: None, "silu", "silu_and_mul", ..."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name], False
    return GATED_ACTIVATIONS[name], True


def _macro(name):
    return name.upper().replace("FLOAT8_", "FP8_")


def defines():
    """{macro: value} for C-family kernels: HAL_ACT_*, HAL_FMT_*, HAL_BAG_*, HAL_ROUTE_*."""
    out = {f"HAL_ACT_{_macro(name or 'none')}": code for name, code in ACTIVATIONS.items()}
    out |= {f"HAL_FMT_{_macro(name)}": code for name, code in FORMAT_CODES.items()}
    out |= {f"HAL_BAG_{name.upper()}": code for name, code in BAG_MODES.items()}
    out |= {f"HAL_ROUTE_{name.upper()}": code for name, code in ROUTE_SCORINGS.items()}
    return out


def define_options(prefix="-D"):
    """defines() as compiler options: ["-DHAL_ACT_NONE=0", ...]."""
    return [f"{prefix}{name}={value}" for name, value in defines().items()]
