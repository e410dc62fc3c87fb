"""The built-in CPU backend: Numba kernels, registered through the same plugin hook and entry point as
any vendor's backend. Each kernel module (kernels, attention, moe, quant, qgemm, sparse) declares a
KERNELS table of common.Kernel entries; hal_register adds them all. Shared helpers live in common.py.

Numba compiles each kernel on first use per dtype signature and caches the machine code in the
user cache directory (`$XDG_CACHE_HOME/hal/numba`, else `~/.cache/hal/numba`), so it works after
a plain `pip install` with no system compiler; a one-line notice says when a compile happens, a
cache file that no longer loads (truncated, corrupt) is deleted and rebuilt with one warning, an
edit to any of the backend's source files compiles every kernel again (`_install_cache_stamp`), and
processes compiling at once take turns saving (`_install_cache_lock`). Read-only inputs run the
kernels compiled for writable ones (`CpuBackend.to_native`).

Parallel kernels run on Numba's TBB threading layer (the `tbb` wheel is a dependency where it
exists; Numba prefers TBB when it loads): it survives fork and concurrent calls from many threads.
Without TBB, Numba on Linux falls back to GNU OpenMP, which kills a fork child that runs a parallel
region once the parent has; there a forked child gets a HalError saying to use spawn instead.
"""
import functools
import hashlib
import itertools
import math
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from hal.dispatch import physical_memory
from hal.dtypes import to_numpy
from hal.errors import HalError
from hal.registry import NO_CONTEXT, Backend, Priority, hookimpl

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hal" / "numba"
os.environ.setdefault("NUMBA_CACHE_DIR", str(CACHE_DIR))  # read by Numba when it is first imported
if "numba" in sys.modules:  # imported before hal: tell it before a kernel module makes its cached dispatchers
    sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


class CpuBackend(Backend):
    name = "cpu"
    priority = Priority.HOST

    def info(self):
        """CPU facts: the model, the LLVM target Numba compiles for, the ISA features the kernels use, the
        GEMM microkernel chosen from them, cores, Numba's threads and threading layer."""
        import llvmlite.binding as llvm
        import numba

        from . import gemm_core
        from .common import CPU_FEATURES

        isa = [f for f in _ISA if f in CPU_FEATURES]
        return {"device": _cpu_model(), "arch": llvm.get_host_cpu_name(), "isa": " ".join(isa) or "baseline",
                "gemm": f"bfloat16 microkernel {gemm_core.RUNG} (of {', '.join(gemm_core.RUNGS)}; HAL_CPU_GEMM forces one)",
                "cores": str(os.cpu_count()), "threads": str(numba.get_num_threads()), "threading_layer": _threading_layer(),
                "memory": "host NumPy arrays; torch CPU tensors are viewed, not copied; outputs >= 4 MiB reuse pooled buffers",
                "toolchain": f"Numba {numba.__version__} (LLVM), no system compiler; BLAS from NumPy",
                "thread pools": _thread_pools()}

    def call_context(self, like):
        """None (host memory), or in a fork child that GNU OpenMP would kill with SIGTERM in its first parallel
        region, a HalError before any kernel runs."""
        if _forked_from_gnu_openmp:
            raise HalError("cpu backend: this process was forked after its parent ran cpu kernels on Numba's GNU OpenMP "
                           "threading layer, which cannot run in a fork child; use the 'spawn' (or 'forkserver') start "
                           "method of multiprocessing, or install tbb (`pip install tbb`) so Numba uses its fork-safe TBB layer")
        return NO_CONTEXT

    def to_native(self, x, contiguous):
        """As every host backend, but never read-only (np.load's memory maps, arrays whose flag was cleared): Numba
        compiles each kernel again for read-only arrays, and since kernels never write their inputs, such an
        array is passed as a writable alias of the same memory (NumPy gives no writable view of it)."""
        x = super().to_native(x, contiguous)
        return x if x.flags.writeable else np.asarray(_WritableAlias(x)).view(x.dtype)

    def empty(self, shape, dtype):
        return _POOL.empty(shape, to_numpy(dtype))


class _WritableAlias:
    """The memory of the read-only array `x`, as the array interface of a writable one (keeps `x` alive)."""

    def __init__(self, x):
        self.x = x
        self.__array_interface__ = {**x.__array_interface__, "data": (x.__array_interface__["data"][0], False)}


def aligned(shape, dtype, zeroed=False):
    """An array (uninitialized, or zeroed) whose data starts on a 64-byte cache line. NumPy's buffers start
    16 bytes into one when mmap'd and anywhere when recycled from the heap, and what reads them with 64-byte
    vectors or tiles pays for a row that spans two lines: the AMX gemm's packed operands took 1.8x as long
    (per core, 1024 x 4096 x 4096: 64 against 35 ms; the same MLP-up call measured 67-123 ms depending on
    what the process had allocated before), and torch's bfloat16 Linear reading a hal output 1.2-1.8x."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = (np.zeros if zeroed else np.empty)(nbytes + 64, np.uint8)
    start = -raw.__array_interface__["data"][0] % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _Lease:
    """The base of the arrays over one pooled buffer (NumPy keeps it alive through __array_interface__):
    when the last of them dies, the buffer goes back to the pool."""

    def __init__(self, pool, raw, size, nbytes):
        offset = -raw.ctypes.data % 64  # cache-line aligned rows for the vector loads and stores
        self.pool, self.raw, self.size = pool, raw, size
        self.__array_interface__ = {"data": (raw.ctypes.data + offset, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}

    def __del__(self):
        self.pool.give_back(self.raw, self.size)


class OutputPool:
    """Output buffers of >= MIN_BYTES, reused once their arrays are gone.

    NumPy takes a big array from mmap and glibc unmaps it on free, so a fresh output was faulted in again
    on every call: each 2 MiB page (NumPy asks for transparent huge pages) zeroed by the kernel and, with
    THP defrag, memory compacted first. A 64 MiB rms_norm output cost 5-12 ms of system time per call
    (the kernel itself 10-15 ms), more when memory is fragmented: the call-to-call variance. Buffers come
    in size classes of 2 MiB; at most `limit` bytes wait idle, beyond that a released buffer is freed."""

    MIN_BYTES = 4 << 20
    CLASS = 2 << 20
    ALIGN_BYTES = 16 << 10  # from here on a fresh output starts on a cache line too (`aligned`): torch's bfloat16
    # Linear reads an input that does not 1.2x (16 rows) to 1.8x (512 rows) slower (docs/hardware.md)

    def __init__(self, limit):
        self.limit = limit
        self.idle = {}  # size class -> idle raw buffers
        self.idle_bytes = 0
        self.lock = threading.RLock()  # reentrant: a release can run inside empty() when it triggers the GC

    def empty(self, shape, dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.ALIGN_BYTES:
            return np.empty(shape, dtype)
        if nbytes < self.MIN_BYTES:
            return aligned(shape, dtype)
        size = -(-nbytes // self.CLASS) * self.CLASS
        with self.lock:
            free = self.idle.get(size)
            raw = free.pop() if free else None
            if raw is not None:
                self.idle_bytes -= size
        if raw is None:
            raw = np.empty(size + 64, np.uint8)
        return np.asarray(_Lease(self, raw, size, nbytes)).view(dtype).reshape(shape)

    def give_back(self, raw, size):
        with self.lock:
            if self.idle_bytes + size <= self.limit:
                self.idle.setdefault(size, []).append(raw)
                self.idle_bytes += size


_POOL = OutputPool(limit=min(512 << 20, physical_memory() // 32))


def _thread_pools():
    """The native thread pools loaded in this process (threadpoolctl): library, API and threads."""
    import threadpoolctl

    pools = threadpoolctl.threadpool_info()
    return ", ".join(f"{Path(p['filepath']).name} ({p['internal_api']}, {p['num_threads']} threads)" for p in pools) or "none"


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
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return f"{numba.config.THREADING_LAYER} (not started yet)"
    return f"{layer} (" + ("GNU OpenMP: fork children must use spawn" if _gnu_openmp(layer) else "fork-safe") + ")"


def _gnu_openmp(layer):
    """Numba's omp layer is GNU OpenMP on Linux: a fork child of a process that ran a parallel region
    on it is killed in its own first one."""
    return layer == "omp" and sys.platform.startswith("linux")


_forked_from_gnu_openmp = False  # set in a fork child of a process whose kernels ran on GNU OpenMP


def _after_fork_in_child():
    global _forked_from_gnu_openmp
    numba = sys.modules.get("numba")
    try:
        _forked_from_gnu_openmp = numba is not None and _gnu_openmp(numba.threading_layer())
    except ValueError:  # no parallel kernel ran in the parent: the child picks its own layer
        pass


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache  # once per process, however often the registry is rebuilt
def _install_compile_notice():
    """Print one line when a hal kernel is compiled (not when it is loaded from the cache)."""
    from numba.core import event

    class Notice(event.Listener):
        depth = 0  # kernels call other jitted helpers; announce only the outermost compile

        def on_start(self, ev):
            self.depth += 1
            func = ev.data["dispatcher"].py_func
            if self.depth == 1 and func.__module__.startswith(__name__):
                print(f"hal: compiling cpu kernel {func.__name__} (first use only; cached in {CACHE_DIR})", file=sys.stderr)

        def on_end(self, ev):
            self.depth -= 1

    event.register("numba:compile", Notice())  # (install_listener is a context manager: it would uninstall at once)


def _install_cache_healing():
    """Numba unpickles its cache files unchecked: a truncated or corrupt index (.nbi) or data (.nbc) file
    (a full disk, a killed copy) would raise UnpicklingError / EOFError on every later call. Under Numba's
    cache directory (hal's, unless NUMBA_CACHE_DIR says otherwise) a file that fails to load is deleted
    instead, with one warning per process; the kernel then compiles again and rewrites it."""
    from numba.core import caching

    cls = caching.IndexDataCacheFile
    root = Path(os.environ["NUMBA_CACHE_DIR"]).resolve()
    warned = []

    def healing(load, path_of, missing):
        @functools.wraps(load)
        def wrapped(self, *args):
            try:
                return load(self, *args)
            except OSError:
                raise
            except Exception as exc:
                path = Path(path_of(self, *args))
                if not path.resolve().is_relative_to(root):
                    raise
                path.unlink(missing_ok=True)
                if not warned:
                    warned.append(path)
                    warnings.warn(f"hal: deleted the unreadable Numba cache file {path} ({type(exc).__name__}: {exc}); "
                                  "its kernel compiles again (further bad files are deleted silently)", RuntimeWarning, stacklevel=2)
                return missing()
        return wrapped

    def no_data():
        raise FileNotFoundError  # IndexDataCacheFile.load takes a missing data file as a cache miss

    if not hasattr(cls._load_index, "__wrapped__"):  # once per process
        cls._load_index = healing(cls._load_index, lambda self: self._index_path, dict)
        cls._load_data = healing(cls._load_data, cls._data_path, no_data)


def _install_cache_lock():
    """Numba's cache is not safe for processes that compile the same kernel at once (the ranks of a distributed
    job, pytest-xdist workers): each names its new signature's data file the first number free in the index it
    read, so two of them write the same file and an index can end up naming the other's code. Under hal's
    cache directory a save holds an exclusive lock on the directory's `.lock` file, and writes the data file
    before the index entry that names it (a reader never finds an entry whose file is not written yet)."""
    from numba.core import caching

    cls = caching.IndexDataCacheFile
    if hasattr(cls.save, "__wrapped__") or fcntl is None:  # once per process; Windows keeps Numba's own
        return
    root = Path(os.environ["NUMBA_CACHE_DIR"]).resolve()
    save = cls.save

    @functools.wraps(save)
    def locked(self, key, data):
        if not Path(self._cache_path).resolve().is_relative_to(root):
            return save(self, key, data)
        with open(os.path.join(self._cache_path, ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            overloads = self._load_index()
            taken = set(overloads.values())
            name = overloads.get(key) or next(n for n in map(self._data_name, itertools.count(1)) if n not in taken)
            self._save_data(name, data)
            overloads[key] = name
            self._save_index(overloads)

    cls.save = locked


def _sources_digest():
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()


def _install_cache_stamp():
    """Numba takes a cached kernel as fresh while its own source file keeps its timestamp and size, but the
    IR helpers of common.py (and the other modules' helpers a kernel calls) are compiled into it: after an
    edit there (a `git pull` into an editable install) kernels of unchanged files kept the old code. Under
    hal's cache directory every index is stamped with a digest of all of this backend's sources too, so
    any change compiles every kernel again (in place: the files are overwritten, nothing piles up)."""
    from numba.core import caching

    cls = caching.IndexDataCacheFile
    if hasattr(cls.__init__, "__wrapped__"):  # once per process
        return
    root = Path(os.environ["NUMBA_CACHE_DIR"]).resolve()
    digest = _sources_digest()
    init = cls.__init__

    @functools.wraps(init)
    def stamped(self, cache_path, filename_base, source_stamp):
        if Path(cache_path).resolve().is_relative_to(root):
            source_stamp = (source_stamp, digest)
        init(self, cache_path, filename_base, source_stamp)

    cls.__init__ = stamped


@hookimpl
def hal_register(registry):
    _install_compile_notice()
    _install_cache_healing()
    _install_cache_stamp()
    _install_cache_lock()
    from . import attention, kernels, moe, qgemm, quant, sparse

    registry.add_backend(CpuBackend())
    for module in (kernels, attention, moe, quant, qgemm, sparse):
        for k in module.KERNELS:
            registry.add_kernel(k.op, "cpu", k.fn, dtypes=k.dtypes, source=module.__file__, **k.options)
