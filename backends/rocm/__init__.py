"""The ROCm backends: `rocm` (a device through CuPy's ROCm build and hipRTC) and `rocm-sim` (the
same .hip files in the host emulator, waves of 64). Kernel sources sit beside this file; the
launch glue they share with CUDA is in hal.backends.gpu."""
from hal.backends.gpu.backend import candidate_kernel, register_vendor
from hal.backends.gpu.vendor import ROCM
from hal.registry import hookimpl


@hookimpl
def hal_register(registry):
    register_vendor(registry, ROCM)


@hookimpl
def hal_candidate_kernel(backend, op, path):
    from hal.registry import registry

    return candidate_kernel(ROCM, registry(), backend, op, path)
