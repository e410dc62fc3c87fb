"""The ROCm backends: `rocm` (a device through CuPy's ROCm build and hipRTC) and `rocm-sim` (the
same .hip files in the host emulator, waves of 64). Kernel sources sit beside this file; the
launch glue they share with CUDA is in hal.backends.gpu."""
from hal.backends.gpu.backend import vendor_hooks
from hal.backends.gpu.vendor import ROCM

hal_register, hal_candidate_kernel = vendor_hooks(ROCM)
