"""Every GPU kernel hal registers, gathered from the glue modules' `KERNELS` (glue.KernelEntry), and
what follows from the entries alone: the kernel file families, the template instantiations each file
is built with per vendor and architecture, and the threads per block of every kernel."""
from . import launch, launch_moe, launch_qgemm, launch_quant, launch_sparse

GLUE_MODULES = (launch, launch_moe, launch_quant, launch_qgemm, launch_sparse)
KERNELS = tuple(entry for glue in GLUE_MODULES for entry in glue.KERNELS)
FAMILIES = tuple(dict.fromkeys(entry.family for entry in KERNELS))


def instantiations(vendor, family, arch):
    """Template instantiations the kernel file `family` is built with for one architecture: those of
    every entry of the family that runs on `arch`, in entry order, each once."""
    if family not in FAMILIES:
        raise KeyError(f"no GPU kernel family {family!r} (families: {', '.join(FAMILIES)})")
    names = (name for entry in KERNELS if entry.family == family for name in entry.instantiations(vendor, arch))
    return list(dict.fromkeys(names))


def block_threads(vendor, kernel):
    """Threads per block the kernel (a template name without arguments, e.g. gemm_mma) is launched with."""
    for entry in KERNELS:
        for template in entry.templates:
            if template.kernel(vendor) == kernel:
                return entry.threads(vendor, template.name)
    raise KeyError(f"no GPU kernel {kernel!r}")
