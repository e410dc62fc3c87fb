"""The host emulator of the GPU backends (`cuda-sim`, `rocm-sim`): the CUDA and HIP kernel files
compiled by the host C++20 compiler against the emulation headers in `include/`, launched on NumPy
arrays. `executor.SimModule` builds and launches; see docs/gpu-kernels.md for the contract."""
