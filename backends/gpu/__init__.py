"""Launch glue shared by the GPU backends: one Python description of every kernel launch
(grid, block, shared bytes, argument packing, variant choice) that drives the CUDA and HIP
kernel files on a real device (CuPy) and in the host emulator alike. See docs/gpu-kernels.md.
"""
