"""Launchers: the registered kernel functions `fn(outs, **arguments)` of the plugin.

A `Launcher(op, path)` builds the kernel named after the op from the OpenCL C file `path` (one file
per op family in cl/, or a candidate file with the same kernel names and signatures) for the dtypes
of the call, and enqueues it on the plugin's queue. Arguments arrive as ClArray (device.py);
optional tensors as None, passed to the kernel as NULL.
"""
import math
from pathlib import Path

import numpy as np

import hal

from .device import CL_DIR, kind, runtime

# The gated elementwise ops hal has (silu_and_mul, ...): one kernel source, built per op with its code.
GATED_OPS = tuple(name for name in hal.codes.GATED_ACTIVATIONS if name in hal.ops.ALL)

FILES = {
    "rms_norm": "norms.cl",
    "layer_norm": "norms.cl",
    "softmax": "activations.cl",
    **{op: "activations.cl" for op in GATED_OPS},
    "rope": "rotary.cl",
    "gemm": "linear.cl",
    "attention": "attention.cl",
}
OPS = tuple(FILES)

# Build options of each op's float32 variant: what a candidate file is first built with.
DEFAULT_DEFINES = {
    "rms_norm": dict(X_KIND="F32", W_KIND="F32", B_KIND="F32", HAS_RESIDUAL=1, HAS_BIAS=0),
    "layer_norm": dict(X_KIND="F32", W_KIND="F32", B_KIND="F32", HAS_RESIDUAL=1, HAS_BIAS=1),
    "softmax": dict(X_KIND="F32"),
    **{op: dict(X_KIND="F32", GATED_OP=op, ACT=hal.codes.activation_code(op)[0]) for op in GATED_OPS},
    "rope": dict(X_KIND="F32", T_KIND="F32", POS_T="long"),
    "gemm": dict(A_KIND="F32", BIAS_KIND="F32", C_KIND="F32", O_KIND="F32"),
    "attention": dict(X_KIND="F32", D_MAX=64, DV_MAX=64, BK=32),
}


def source(op):
    return CL_DIR / FILES[op]


def _pow2(n, cap=256):
    """Smallest power of two >= n, at most cap: the work-group size of the row-reduction kernels."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def _up(n, multiple):
    return -(-int(n) // multiple) * multiple


def _buf(x):
    return None if x is None else x.buffer


def _bucket(d):
    """Head dims are rounded up to 32, 64, 128 or 256 for the private arrays of attention."""
    return next(b for b in (32, 64, 128, 256) if d <= b)


class Launcher:
    """The kernel function for `op` built from the OpenCL C file `path`."""

    def __init__(self, op, path=None):
        if op not in FILES:
            raise KeyError(op)
        self.op, self.path = op, Path(path) if path is not None else source(op)
        self.__name__ = f"opencl_{op}"
        self.__doc__ = f"{op} on the opencl backend, kernel {op!r} of {self.path}"

    def __repr__(self):
        return f"<hal-opencl kernel {self.op} from {self.path}>"

    def build(self, **defines):
        return runtime().kernel(self.path, self.op, defines)

    def __call__(self, outs, **a):
        if self.op in GATED_OPS:
            return self._gated(outs, **a)
        return getattr(self, "_" + self.op)(outs, **a)

    # ------------------------------------------------------------------ norms

    def _norm(self, outs, x, weight, bias, residual, eps):
        y = outs[0]
        hidden = x.shape[-1]
        rows = x.size // hidden
        if rows == 0:
            return
        layer = self.op == "layer_norm"
        k = self.build(X_KIND=kind(x), W_KIND=kind(weight), B_KIND=kind(bias), HAS_RESIDUAL=int(residual is not None),
                       HAS_BIAS=int(bias is not None))
        wg = _pow2(hidden)
        extra = (_buf(bias),) if layer else ()
        rt = runtime()
        rt.run(k, (rows * wg,), (wg,), x.buffer, weight.buffer, *extra, _buf(residual), y.buffer,
               outs[1].buffer if residual is not None else None, np.int32(hidden), np.float32(eps))

    def _rms_norm(self, outs, x, weight, eps, residual):
        self._norm(outs, x, weight, None, residual, eps)

    def _layer_norm(self, outs, x, weight, bias, eps, residual):
        self._norm(outs, x, weight, bias, residual, eps)

    # ------------------------------------------------------------------ activations

    def _softmax(self, outs, x, dim):
        if x.size == 0:
            return
        n = x.shape[dim]
        inner = int(np.prod(x.shape[dim + 1:], dtype=np.int64))
        rows = x.size // n
        wg = _pow2(n)
        runtime().run(self.build(X_KIND=kind(x)), (rows * wg,), (wg,), x.buffer, outs[0].buffer, np.int32(n), np.int32(inner))

    def _gated(self, outs, x):
        y = outs[0]
        if y.size == 0:
            return
        # 64 work-items per group, the global size rounded up to it (the kernel checks the bound).
        kern = self.build(X_KIND=kind(x), GATED_OP=self.op, ACT=hal.codes.activation_code(self.op)[0])
        runtime().run(kern, (_up(y.size, 64),), (64,), x.buffer, y.buffer,
                      np.int32(y.shape[-1]), np.int64(y.size))

    # ------------------------------------------------------------------ rotary

    def _rope(self, outs, q, k, cos, sin, positions, interleaved, rotary_dim):
        rt = runtime()
        kern = self.build(X_KIND=kind(q), T_KIND=kind(cos), POS_T="int" if positions.dtype.itemsize == 4 else "long")
        for x, y in zip((q, k), outs):
            if y.size == 0:
                continue
            tokens, heads, head = x.shape
            # One work-item per element; the runtime picks the work-group size (no local memory).
            rt.run(kern, (head, heads, tokens), None, x.buffer, y.buffer, cos.buffer, sin.buffer, positions.buffer,
                   np.int32(heads), np.int32(head), np.int32(rotary_dim), np.int32(bool(interleaved)))

    # ------------------------------------------------------------------ linear

    def _gemm(self, outs, a, b, bias, activation, alpha, beta, c, out_dtype):
        out = outs[0]
        m, kdim = a.shape
        n = b.shape[1]
        if m * n == 0:
            return
        kern = self.build(A_KIND=kind(a), BIAS_KIND=kind(bias), C_KIND=kind(c), O_KIND=kind(out))
        act = hal.codes.activation_code(activation)[0]
        runtime().run(kern, (_up(n, 32) // 4, _up(m, 32) // 4), (8, 8), _buf(a), _buf(b), _buf(bias), _buf(c), out.buffer,
                      np.int32(m), np.int32(n), np.int32(kdim), np.float32(alpha), np.float32(beta), np.int32(act),
                      np.int32(bias is not None), np.int32(c is not None))

    # ------------------------------------------------------------------ attention

    def _attention(self, outs, q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k):
        out = outs[0]
        if out.size == 0:
            return
        rt = runtime()
        if cu_seqlens_q is None:
            batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
            cu_q = rt.upload(np.arange(batch + 1, dtype=np.int32) * sq)
            cu_k = rt.upload(np.arange(batch + 1, dtype=np.int32) * sk)
        else:
            cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
        lens_q = np.diff(cu_q.host.astype(np.int64))
        if lens_q.size == 0 or lens_q.max() == 0:
            return
        hq, hkv, d, dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
        d_max, dv_max = _bucket(d), _bucket(dv)
        bk = 32 if max(d_max, dv_max) <= 128 else 16  # K and V tiles together <= 32 KiB of local memory
        kern = self.build(X_KIND=kind(q), D_MAX=d_max, DV_MAX=dv_max, BK=bk)
        cl = rt.cl
        rt.run(kern, (_up(lens_q.max(), 32), hq, lens_q.size), (32, 1, 1), q.buffer, _buf(k), _buf(v), cu_q.buffer,
               cu_k.buffer, out.buffer, np.int32(hq), np.int32(hkv), np.int32(d), np.int32(dv),
               np.float32(scale if scale is not None else 1.0 / math.sqrt(d)), np.int32(bool(causal)),
               np.int32(window or 0), np.float32(softcap or 0.0), cl.LocalMemory(bk * d * 4), cl.LocalMemory(bk * dv * 4))


def supports_attention(a):
    return max(a["q"].shape[-1], a["v"].shape[-1]) <= 256


def supports_rope(a):
    # by name: one may be a torch tensor (dtype torch.float32), the other a NumPy array (float32)
    return str(a["cos"].dtype).removeprefix("torch.") == str(a["sin"].dtype).removeprefix("torch.")
