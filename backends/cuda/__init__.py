"""The CUDA backends: `cuda` (a device through CuPy and NVRTC) and `cuda-sim` (the same .cu files
in the host emulator, warps of 32). Kernel sources sit beside this file; the launch glue they
share with ROCm is in hal.backends.gpu."""
from hal.backends.gpu.backend import candidate_kernel, register_vendor
from hal.backends.gpu.vendor import CUDA
from hal.registry import hookimpl


@hookimpl
def hal_register(registry):
    register_vendor(registry, CUDA)


@hookimpl
def hal_candidate_kernel(backend, op, path):
    from hal.registry import registry

    return candidate_kernel(CUDA, registry(), backend, op, path)
