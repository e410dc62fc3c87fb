"""The built-in CPU backend: Numba kernels, registered through the same plugin hook and entry point as
any vendor's backend. Each kernel module (kernels, attention, moe, quant, qgemm, sparse) declares a
KERNELS table of common.Kernel entries; hal_register adds them all. Shared helpers live in common.py.

Numba compiles each kernel on first use per dtype signature and caches the machine code in the
user cache directory (`$XDG_CACHE_HOME/hal/numba`, else `~/.cache/hal/numba`), so it works after
a plain `pip install` with no system compiler; a one-line notice says when a compile happens.
"""
import os
import platform
import sys
from pathlib import Path

from hal.registry import Backend, Priority, hookimpl

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hal" / "numba"
os.environ.setdefault("NUMBA_CACHE_DIR", str(CACHE_DIR))  # read by Numba when it is first imported


class CpuBackend(Backend):
    name = "cpu"
    priority = Priority.HOST

    def info(self):
        """CPU facts: the model, the LLVM target Numba compiles for, the ISA features the kernels use,
        cores, Numba's threads and threading layer."""
        import llvmlite.binding as llvm
        import numba

        from .common import CPU_FEATURES

        isa = [f for f in _ISA if f in CPU_FEATURES]
        return {"device": _cpu_model(), "arch": llvm.get_host_cpu_name(), "isa": " ".join(isa) or "baseline",
                "cores": str(os.cpu_count()), "threads": str(numba.get_num_threads()), "threading_layer": _threading_layer(),
                "memory": "host NumPy arrays; torch CPU tensors are viewed, not copied",
                "toolchain": f"Numba {numba.__version__} (LLVM), no system compiler; BLAS from NumPy"}


# ISA features the kernels take a faster path with (a 16-lane tile, vdpbf16ps, vcvtph2ps), or that
# say what the vector width is.
_ISA = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512fp16",
        "amx-tile", "amx-bf16", "neon", "sve", "sve2")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threading_layer():
    """The layer Numba's parallel kernels run on: the one chosen once a parallel kernel has run, else
    the configured choice."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return f"{numba.config.THREADING_LAYER} (not started yet)"


def _install_compile_notice():
    """Print one line when a hal kernel is compiled (not when it is loaded from the cache)."""
    import numba
    from numba.core import event

    numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

    class Notice(event.Listener):
        depth = 0  # kernels call other jitted helpers; announce only the outermost compile

        def on_start(self, ev):
            self.depth += 1
            func = ev.data["dispatcher"].py_func
            if self.depth == 1 and func.__module__.startswith(__name__):
                print(f"hal: compiling cpu kernel {func.__name__} (first use only; cached in {CACHE_DIR})", file=sys.stderr)

        def on_end(self, ev):
            self.depth -= 1

    event.install_listener("numba:compile", Notice())


@hookimpl
def hal_register(registry):
    _install_compile_notice()
    from . import attention, kernels, moe, qgemm, quant, sparse

    registry.add_backend(CpuBackend())
    for module in (kernels, attention, moe, quant, qgemm, sparse):
        for k in module.KERNELS:
            registry.add_kernel(k.op, "cpu", k.fn, dtypes=k.dtypes, source=module.__file__, **k.options)
