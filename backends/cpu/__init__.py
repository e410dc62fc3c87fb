"""The built-in CPU backend: Numba kernels (kernels.py), registered through the same plugin hook
and entry point as any vendor's backend.

Numba compiles each kernel on first use per dtype signature and caches the machine code in the
user cache directory (`$XDG_CACHE_HOME/hal/numba`, else `~/.cache/hal/numba`), so it works after
a plain `pip install` with no system compiler; a one-line notice says when a compile happens.
"""
import os
import platform
import sys
from pathlib import Path

from hal.dtypes import FLOATS
from hal.registry import Backend, hookimpl

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hal" / "numba"
os.environ.setdefault("NUMBA_CACHE_DIR", str(CACHE_DIR))  # read by Numba when it is first imported


class CpuBackend(Backend):
    name = "cpu"
    priority = 10  # above the host emulators of GPU backends, which also take host arrays

    def info(self):
        import numba

        flags = _cpu_flags()
        isa = next((f for f in ("avx512f", "avx2", "neon", "asimd") if f in flags), platform.machine())
        return {"device": f"{platform.machine()} x {os.cpu_count()} cores", "arch": isa, "threads": numba.get_num_threads(),
                "warp": f"none: SIMD {isa}", "memory": "host NumPy arrays; torch CPU tensors are viewed, not copied",
                "streams": "synchronous; Numba worker threads", "shared_memory": "none (CPU caches)",
                "fp8": "software conversion of the ml_dtypes formats (e4m3fn, e4m3fnuz, e5m2)",
                "toolchain": f"Numba {numba.__version__} (LLVM), no system compiler; BLAS from NumPy"}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []


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
    for op in ("softmax", "rms_norm", "layer_norm", "silu_and_mul", "rope"):
        registry.add_kernel(op, "cpu", getattr(kernels, op), dtypes=FLOATS, source=kernels.__file__)
    # BLAS takes any strides, so gemm's operands are not copied to contiguous first.
    registry.add_kernel("gemm", "cpu", kernels.gemm, dtypes=FLOATS, contiguous=False, source=kernels.__file__)
    for op in ("attention", "paged_decode_attention", "mla_decode"):
        registry.add_kernel(op, "cpu", getattr(attention, op), dtypes=FLOATS, source=attention.__file__)
    for family in (moe, quant, qgemm, sparse):
        family.register(registry)
