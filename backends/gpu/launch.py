"""How each op launches its kernel: grid, block, shared bytes, argument packing, variant choice.

One function per kernel, called as `glue(executor, outs, **arguments)` by the dispatcher (the
backend binds the executor). The executor is either a CuPy device executor or the host
emulator; both take the same `launch(family, name_expression, grid, block, shared_bytes, args)`,
so nothing here knows which one runs. `KERNELS` lists what a GPU backend registers, and
`instantiations` the template instantiations each kernel file is built with.
"""
import math
from dataclasses import dataclass

import numpy as np

from hal.dtypes import FLOATS

ROW_BLOCK = 256  # one block per row: 8 warps / 4 waves, enough to hide latency on a 4096-wide row
ROPE_BLOCK = 128  # one block per token; a token's heads x rotary pairs rarely exceed 128 x 32
GEMM_TILE = 64  # every gemm variant covers a 64 x 64 output tile per block
SIMT_GEMM_BLOCK = 256  # 16 x 16 threads, 4 x 4 outputs each
ACTIVATION_CODES = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
POSITION_TYPES = {"int32": "int", "int64": "long long"}
HALF_FLOATS = ("float16", "bfloat16")


def _i32(v):
    return np.int32(v)


def _f32(v):
    return np.float32(v)


def _widened(ex, t):
    """Small parameter tensors (weights, biases, rope tables) go to kernels as fp32 (exact)."""
    return None if t is None else ex.as_type(t, "float32")


def _type(ex, array):
    return ex.vendor.types[ex.dtype_name(array)]


def rms_norm(ex, outs, x, weight, residual, eps):
    hidden = x.shape[-1]
    rows = x.size // hidden
    if rows:
        ex.launch("norms", f"rms_norm<{_type(ex, x)}>", (rows, 1, 1), (ROW_BLOCK, 1, 1), 0,
                  (x, residual, _widened(ex, weight), outs[0], outs[1] if residual is not None else None, _i32(rows), _i32(hidden), _f32(eps)))


def layer_norm(ex, outs, x, weight, bias, residual, eps):
    hidden = x.shape[-1]
    rows = x.size // hidden
    if rows:
        ex.launch("norms", f"layer_norm<{_type(ex, x)}>", (rows, 1, 1), (ROW_BLOCK, 1, 1), 0,
                  (x, residual, _widened(ex, weight), _widened(ex, bias), outs[0], outs[1] if residual is not None else None,
                   _i32(rows), _i32(hidden), _f32(eps)))


def softmax(ex, outs, x, dim):
    outer, n, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    if outer * n * inner:
        ex.launch("softmax", f"softmax<{_type(ex, x)}>", (outer * inner, 1, 1), (ROW_BLOCK, 1, 1), 0,
                  (x, outs[0], _i32(outer), _i32(n), _i32(inner)))


def silu_and_mul(ex, outs, x):
    d = x.shape[-1] // 2
    if x.size:
        rows = x.size // (2 * d)
        ex.launch("activations", f"silu_and_mul<{_type(ex, x)}>", (rows, 1, 1), (ROW_BLOCK, 1, 1), 0, (x, outs[0], _i32(rows), _i32(d)))


def rope(ex, outs, q, k, cos, sin, positions, interleaved, rotary_dim):
    tokens, heads_q, head_dim = q.shape
    if tokens:
        name = f"rope<{_type(ex, q)}, {POSITION_TYPES[ex.dtype_name(positions)]}>"
        ex.launch("rope", name, (tokens, 1, 1), (ROPE_BLOCK, 1, 1), 0,
                  (q, k, _widened(ex, cos), _widened(ex, sin), positions, outs[0], outs[1], _i32(tokens), _i32(heads_q), _i32(k.shape[1]),
                   _i32(head_dim), _i32(rotary_dim), _i32(bool(interleaved))))


def _gemm(variant, block, ex, outs, a, b, bias, c, activation, alpha, beta, out_dtype):
    (m, k), n = a.shape, b.shape[1]
    out = outs[0]
    if m and n:
        if c is not None:
            c = ex.as_type(c, ex.dtype_name(out))  # the kernel reads c in the output type
        name = f"{variant}<{_type(ex, a)}, {_type(ex, out)}>"
        grid = (math.ceil(n / GEMM_TILE), math.ceil(m / GEMM_TILE), 1)
        ex.launch("gemm", name, grid, (block, 1, 1), 0,
                  (a, b, _widened(ex, bias), c, out, _i32(m), _i32(n), _i32(k), _f32(alpha), _f32(beta), _i32(ACTIVATION_CODES[activation])))


def gemm_simt(ex, outs, **args):
    _gemm("gemm_simt", SIMT_GEMM_BLOCK, ex, outs, **args)


def gemm_matrix(ex, outs, **args):
    _gemm(ex.vendor.matrix_kernel, ex.vendor.matrix_block, ex, outs, **args)


@dataclass(frozen=True)
class KernelEntry:
    op: str
    family: str
    glue: object
    dtypes: tuple = FLOATS
    needs_matrix_units: bool = False


# What every GPU backend registers, in preference order per op (first that supports a call wins).
KERNELS = (
    KernelEntry("gemm", "gemm", gemm_matrix, HALF_FLOATS, needs_matrix_units=True),
    KernelEntry("gemm", "gemm", gemm_simt),
    KernelEntry("softmax", "softmax", softmax),
    KernelEntry("rms_norm", "norms", rms_norm),
    KernelEntry("layer_norm", "norms", layer_norm),
    KernelEntry("silu_and_mul", "activations", silu_and_mul),
    KernelEntry("rope", "rope", rope),
)


def block_threads(vendor, kernel):
    """Threads per block a kernel is launched with (for occupancy estimates)."""
    return {"gemm_simt": SIMT_GEMM_BLOCK, vendor.matrix_kernel: vendor.matrix_block, "rope": ROPE_BLOCK}.get(kernel, ROW_BLOCK)


def instantiations(vendor, family, arch):
    """Template instantiations a kernel file is built with for one architecture."""
    types = [vendor.types[d] for d in FLOATS]
    halves = [vendor.types[d] for d in HALF_FLOATS]
    if family == "gemm":
        names = [f"gemm_simt<{t}, {o}>" for t in types for o in types]
        if vendor.has_matrix_units(arch):
            names += [f"{vendor.matrix_kernel}<{t}, {o}>" for t in halves for o in types]
        return names
    if family == "rope":
        return [f"rope<{t}, {p}>" for t in types for p in POSITION_TYPES.values()]
    return [f"{kernel}<{t}>" for kernel in ROW_KERNELS[family] for t in types]


ROW_KERNELS = {"softmax": ("softmax",), "norms": ("rms_norm", "layer_norm"), "activations": ("silu_and_mul",)}
FAMILIES = ("gemm", "rope", *ROW_KERNELS)
