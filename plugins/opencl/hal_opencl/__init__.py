"""hal-opencl: an out-of-tree hal backend with OpenCL C kernels, run through PyOpenCL.

It talks to hal only through the public plugin API (`hal.Backend`, `hal.hookimpl`, the hooks
`hal_register` and `hal_candidate_kernel`, `hal.KernelCompileError`, `hal.BackendUnavailable`).

The backend "opencl" runs on the first device of the first OpenCL platform (PoCL's CPU device on
CI). Its device type is DLPack CPU: it takes host arrays (NumPy, torch CPU tensors, ...), copies
each input into an OpenCL buffer (`to_native`), runs the kernel into OpenCL output buffers, and
copies the results back into host arrays of the caller's kind (`from_native`). On a discrete GPU
that is two PCIe copies per call; the point of the plugin is portability, not zero-copy. Its
priority (hal.Priority.OFFLOAD) is below cpu's (HOST), so host arrays go to cpu unless opencl is asked for by name.

Kernels (cl/*.cl, one file per op family, all arithmetic in fp32): rms_norm and layer_norm
(fused residual), softmax, silu_and_mul, rope, gemm (local-memory tiled, fused epilogue),
attention (tiled over keys, online softmax), each in float32, float16 (stored as half, converted
with vload_half / vstore_half_rte, so cl_khr_fp16 is not needed) and bfloat16 (ushort bits,
round-to-nearest-even conversion). Everything else (paged_decode_attention, mla_decode, head dims
above 256, rope with cos and sin of different dtypes) falls back to cpu.
"""
import ml_dtypes
import numpy as np

import hal

from . import kernels
from .device import runtime

__version__ = "0.1.0"

_NUMPY = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DTYPES = ("float32", "float16", "bfloat16")


def _np(dtype):
    return _NUMPY.get(str(dtype)) or np.dtype(dtype)


class OpenCLBackend(hal.Backend):
    """OpenCL C kernels on the first OpenCL device. Device type DLPack CPU: host arrays in, copied
    to OpenCL buffers for the kernels, results copied back to host arrays of the caller's kind."""

    name = "opencl"
    priority = hal.Priority.OFFLOAD

    def probe(self):
        try:
            runtime()
        except hal.BackendUnavailable as exc:
            return False, str(exc).removeprefix("opencl: ")
        return True, ""

    def info(self):
        """Facts of the OpenCL device the kernels run on, as strings."""
        dev = runtime().device
        mib = 1 << 20
        return {
            "device": dev.name.strip(),
            "arch": dev.opencl_c_version.strip(),
            "platform": dev.platform.name.strip(),
            "driver": dev.driver_version.strip(),
            "compute_units": str(dev.max_compute_units),
            "clock_mhz": str(dev.max_clock_frequency),
            "global_memory": f"{dev.global_mem_size // mib} MiB",
            "local_memory": f"{dev.local_mem_size // 1024} KiB",
            "max_work_group_size": str(dev.max_work_group_size),
            "cl_khr_fp16": "yes" if "cl_khr_fp16" in dev.extensions else "no (float16 through vload_half / vstore_half)",
            "memory": "host arrays copied to OpenCL buffers and back",
        }

    def to_native(self, x, contiguous):
        return runtime().upload(super().to_native(x, True))

    def from_native(self, y, like):
        return super().from_native(y.get(), like)

    def empty(self, shape, dtype):
        return runtime().empty(shape, _np(dtype))

    def poisoned(self, shape, dtype):
        return runtime().filled(shape, _np(dtype), np.nan)


@hal.hookimpl
def hal_register(registry):
    registry.add_backend(OpenCLBackend())
    for op in kernels.OPS:
        options = {}
        if op == "attention":
            options = dict(supports=kernels.supports_attention, requires="head dims <= 256")
        elif op == "rope":
            options = dict(supports=kernels.supports_rope, requires="cos and sin of one dtype")
        registry.add_kernel(op, "opencl", kernels.Launcher(op), dtypes=DTYPES, source=str(kernels.source(op)), **options)


@hal.hookimpl
def hal_candidate_kernel(backend, op, path):
    """A kernel built from the OpenCL C file `path` for `op` on "opencl" (None for other backends).

    The file must define a kernel named after the op with the signature of the registered one
    (see cl/<family>.cl); it is built with the same build options (dtype kinds and variant flags)
    and the shared header cl/common.h prepended. It is built once here for float32, so a source
    that does not compile raises hal.KernelCompileError right away."""
    if backend != "opencl":
        return None
    name = getattr(op, "name", op)
    if name not in kernels.FILES:
        raise hal.KernelNotFound(f"opencl has no {name} kernel, so there is no signature for a candidate to follow "
                                 f"(it has {', '.join(kernels.OPS)})")
    launcher = kernels.Launcher(name, path)
    launcher.build(**kernels.DEFAULT_DEFINES[name])
    return launcher
