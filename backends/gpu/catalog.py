"""Every GPU kernel hal registers: the launch glue modules' tables gathered in one place.

launch.py holds the glue of the first op families (and the helpers every glue module uses);
launch_moe.py, launch_quant.py, launch_qgemm.py and launch_sparse.py each add `KERNELS` (entries in
preference order per op), `INSTANTIATIONS` ({kernel file family: fn(vendor, arch) -> template names})
and `BLOCK_THREADS` ({kernel name prefix: threads, or fn(vendor) -> threads}).
"""
from . import launch, launch_moe, launch_qgemm, launch_quant, launch_sparse

FAMILY_GLUE = (launch_moe, launch_quant, launch_qgemm, launch_sparse)
KERNELS = launch.KERNELS + tuple(entry for glue in FAMILY_GLUE for entry in glue.KERNELS)
FAMILIES = launch.FAMILIES + tuple(family for glue in FAMILY_GLUE for family in glue.INSTANTIATIONS)


def instantiations(vendor, family, arch):
    """Template instantiations the kernel file `family` is built with for one architecture."""
    for glue in FAMILY_GLUE:
        if family in glue.INSTANTIATIONS:
            return glue.INSTANTIATIONS[family](vendor, arch)
    return launch.instantiations(vendor, family, arch)


def block_threads(vendor, kernel):
    """Threads per block a kernel is launched with (for occupancy estimates)."""
    for glue in FAMILY_GLUE:
        for prefix, threads in glue.BLOCK_THREADS.items():
            if kernel.startswith(prefix.format(matrix=vendor.matrix)):
                return threads(vendor) if callable(threads) else threads
    return launch.block_threads(vendor, kernel)
