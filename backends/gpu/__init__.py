"""Launch glue shared by the GPU backends: one Python description of every kernel launch
(grid, block, shared bytes, argument packing, variant choice) that drives the CUDA and HIP
kernel files on a real device (CuPy) and in the host emulator alike. See docs/gpu-kernels.md.

glue.py: KernelEntry (what each kernel variant declares once) and the argument helpers;
launch*.py: the glue functions and their entries per op family; catalog.py: all entries, and the
instantiations and block sizes derived from them; backend.py: the backends; vendor.py: what differs
between vendors, as data; compile_report.py: the offline compile report per architecture.
"""
