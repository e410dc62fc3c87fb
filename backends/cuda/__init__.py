"""The CUDA backends: `cuda` (a device through CuPy and NVRTC) and `cuda-sim` (the same kernel files
in the host emulator, warps of 32). The CUDA-only kernel files sit beside this file, those written
once for both vendors in hal/backends/gpu/kernels (Vendor.source picks); the launch glue they share
with ROCm is in hal.backends.gpu."""
from hal.backends.gpu.backend import vendor_hooks
from hal.backends.gpu.vendor import CUDA

hal_register, hal_candidate_kernel = vendor_hooks(CUDA)
