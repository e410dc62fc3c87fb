"""The ROCm backends: `rocm` (a device through CuPy's ROCm build and hipRTC) and `rocm-sim` (the
same kernel files in the host emulator, waves of 64). The HIP-only kernel files sit beside this
file, those written once for both vendors in hal/backends/gpu/kernels (Vendor.source picks); the
launch glue they share with CUDA is in hal.backends.gpu."""
from hal.backends.gpu.backend import vendor_hooks
from hal.backends.gpu.vendor import ROCM

hal_register, hal_candidate_kernel = vendor_hooks(ROCM)
