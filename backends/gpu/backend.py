"""The GPU backends: a real device through CuPy (`cuda`, `rocm`) and the host emulator of the
same kernel files (`cuda-sim`, `rocm-sim`). They differ only in where memory lives and in the
executor's final launch; the launch glue (launch*.py, gathered by catalog.py) and the kernel files are shared.
"""
import contextlib
from importlib import import_module
from pathlib import Path

import numpy as np

from hal.arrays import DLPACK_CPU, from_host, kind_of, to_host
from hal.dtypes import name_of, to_numpy
from hal.errors import KernelCompileError, KernelLaunchError
from hal.codes import define_options
from hal.registry import Backend, Priority

from . import compile_report
from .catalog import KERNELS, instantiations

BF16_NAN_BITS = 0x7FC0
# CuPy has no bfloat16 or fp8 dtypes: on the device those live as same-width unsigned integers. A uint8
# array may then be e4m3fn, e4m3fnuz, e5m2 or real bytes (packed int4 / fp4), so DeviceBackend records
# the hal dtype of every array it hands to a kernel (DeviceDtypes); bfloat16 is the only uint16 meaning.
STAND_IN_OF = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e4m3fnuz": "uint8", "float8_e5m2": "uint8"}


class DeviceDtypes:
    """The hal dtype of the device arrays of the current calls, keyed by (pointer, shape, strides, stand-in type).

    Every array a kernel sees was recorded by to_native or empty during its own call, so an entry is
    rewritten before it is read and a stale one (freed memory reused) is never consulted; the table is
    cleared when it grows, and holds no references to the arrays."""

    LIMIT = 4096

    def __init__(self):
        self._names = {}

    @staticmethod
    def _key(x):
        return (x.data.ptr, x.shape, x.strides, x.dtype.str)

    def record(self, x, name):
        if len(self._names) > self.LIMIT:
            self._names.clear()
        self._names[self._key(x)] = name
        return x

    def name(self, x):
        return self._names.get(self._key(x)) or ("bfloat16" if x.dtype.name == "uint16" else name_of(x.dtype))


class Sources:
    """Which file each kernel family is built from, and which of its templates: the vendor's own
    files by default; a candidate file (and only the templates one kernel launches) when evaluating."""

    def __init__(self, vendor, candidate=None, entry=None):
        self.vendor, self.candidate = vendor, candidate
        self.family = entry.family if entry is not None else None
        self.kernels = set(entry.kernels(vendor)) if entry is not None else set()

    def path(self, family):
        return Path(self.candidate) if family == self.family else self.vendor.source(family)

    def names(self, family, arch):
        names = instantiations(self.vendor, family, arch)
        return [n for n in names if n.split("<")[0] in self.kernels] if family == self.family else names


def _runtime_headers(vendor):
    """Extra include directories of the vendor's runtime compiler (Vendor.runtime_headers)."""
    if not vendor.runtime_headers:
        return ()
    module, function = vendor.runtime_headers.split(":")
    return tuple(getattr(import_module(module), function)())


def saturated(xp, x, target):
    """The integer array x (NumPy or CuPy: xp) as the integer type `target`, values past its range clamped
    to it. For index arrays (int64 offsets and counts -> int32): exact within the range, and an unchecked
    count past it (the masked layout's) stays past every row count instead of becoming its low word."""
    lo, hi = np.iinfo(target), np.iinfo(x.dtype)
    return xp.clip(x, max(lo.min, hi.min), min(lo.max, hi.max)).astype(target)


class SimExecutor:
    """Runs kernel files in the host emulator; arrays are NumPy."""

    def __init__(self, vendor, arch, mode="release", sources=None):
        self.vendor, self.arch, self.mode = vendor, arch, mode
        self.sources = sources or Sources(vendor)
        self._modules = {}

    def _module(self, family):
        module = self._modules.get(family)
        if module is None:
            from hal.backends.sim.executor import SimModule

            module = self._modules[family] = SimModule(self.sources.path(family), self.vendor.name,
                                                       self.sources.names(family, self.arch), mode=self.mode,
                                                       include_dirs=self.vendor.include_dirs)
        return module

    def launch(self, family, name, grid, block, shared_bytes, args):
        self._module(family).launch(name, grid, block, shared_bytes, args)

    @staticmethod
    def dtype_name(x):
        return name_of(x.dtype)

    @staticmethod
    def as_type(x, dtype):
        if name_of(x.dtype) == dtype:
            return x
        target = to_numpy(dtype)
        return saturated(np, x, target) if x.dtype.kind in "iu" and target.kind in "iu" else x.astype(target)

    @staticmethod
    def as_bytes(x):
        return x.view(np.uint8)

    @staticmethod
    def to_host(x):
        return x

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, to_numpy(dtype))

    @staticmethod
    def fill_zero(x):
        x[...] = 0


class DeviceExecutor:
    """Compiles kernel files with CuPy (NVRTC or hipRTC; CuPy caches the binaries on disk, keyed by
    source, options and architecture) and launches them on the current device."""

    def __init__(self, vendor, backend, sources=None):
        self.vendor, self.backend = vendor, backend
        self.sources = sources or Sources(vendor)
        self._modules = {}

    @property
    def arch(self):
        return self.backend.arch()

    def _module(self, family):
        import cupy

        key = (family, cupy.cuda.Device().id)
        module = self._modules.get(key)
        if module is None:
            source = self.sources.path(family)
            options = ("-std=c++17", *(f"-I{d}" for d in self.vendor.include_dirs + _runtime_headers(self.vendor)), *define_options())
            module = cupy.RawModule(code=source.read_text(), options=options, name_expressions=self.sources.names(family, self.arch))
            try:
                module.compile()
            except Exception as exc:  # cupy.cuda.compiler.CompileException carries the log
                raise KernelCompileError(f"{source.name} for {self.arch} failed to compile", str(exc)) from None
            self._modules[key] = module
        return module

    def dtype_name(self, x):
        return self.backend.dtypes.name(x)  # see DeviceDtypes

    @staticmethod
    def as_bytes(x):
        return x.view(np.uint8)

    @staticmethod
    def to_host(x):
        return x.get()

    def empty(self, shape, dtype):
        return self.backend.empty(shape, dtype)  # scratch buffers get their dtype recorded too

    @staticmethod
    def fill_zero(x):
        x.fill(0)

    def as_type(self, x, dtype):
        import cupy

        source = self.dtype_name(x)
        if source == dtype:
            return x
        if x.dtype.kind in "iu" and to_numpy(dtype).kind in "iu":
            return self.backend.dtypes.record(saturated(cupy, x, to_numpy(dtype)), dtype)
        wide = (x.astype(cupy.uint32) << 16).view(cupy.float32) if source == "bfloat16" else x.astype(cupy.float32)
        if dtype != "bfloat16":
            return wide.astype(to_numpy(dtype))
        bits = wide.view(cupy.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even, as __float2bfloat16_rn
        return cupy.where(cupy.isnan(wide), BF16_NAN_BITS, rounded).astype(cupy.uint16)

    def launch(self, family, name, grid, block, shared_bytes, args):
        function = self._module(family).get_function(name)
        try:
            function(grid, block, args, shared_mem=shared_bytes)
        except Exception as exc:
            raise KernelLaunchError(f"{name} (grid {grid}, block {block}) failed to launch on {self.arch}: {exc}") from None


class SimBackend(Backend):
    """`cuda-sim` / `rocm-sim`: the vendor's kernel files on the host emulator, on NumPy arrays."""

    priority = Priority.EMULATOR  # selectable by name; never preferred over cpu for host arrays
    device_type = DLPACK_CPU

    def __init__(self, vendor, arch=None, name=None, mode="release"):
        """`arch` is the architecture the emulator presents (variant choice follows it); `mode`
        "tsan" or "asan" builds the kernels with ThreadSanitizer or AddressSanitizer."""
        self.vendor = vendor
        self.name = name or f"{vendor.name}-sim"
        self.arch = arch or vendor.sim_arch
        self.executor = SimExecutor(vendor, self.arch, mode)

    def probe(self):
        from hal.backends.sim.executor import toolchain

        available, compiler = toolchain()  # when available, the reason slot names the compiler
        return available, "" if available else compiler

    def info(self):
        from hal.backends.sim.executor import sanitizer_available, toolchain

        sanitizers = [m for m in ("tsan", "asan") if sanitizer_available(m)[0]]
        return {"device": f"host emulator of {self.vendor.name.upper()} {self.arch}", "arch": self.arch, "warp": str(self.vendor.warp),
                "memory": "host NumPy arrays (the sanitizer modes copy into buffers the emulator allocates)",
                "streams": "synchronous: blocks spread over host worker threads, a block's threads are fibers",
                "shared memory": f"emulated per block; kernels keep to the device's: {self.vendor.shared_memory}",
                "fp8": self.vendor.fp8, "toolchain": f"{toolchain()[1]}; sanitizers: {', '.join(sanitizers) or 'none'}"}

    def compile_report(self):
        """The device compilers' report of the vendor's kernel files: the same sources the emulator runs."""
        return compile_report.vendor_report(self.vendor)

    def fp8_format(self):
        return self.vendor.fp8_format(self.arch)


class DeviceBackend(Backend):
    """`cuda` / `rocm`: CuPy arrays on the device; torch.cuda tensors come in through DLPack without copies.

    CuPy has no bfloat16 or fp8 dtypes, so those live on the device as bit patterns in the unsigned
    integer type STAND_IN_OF names; the hal dtype of each array goes with it in `dtypes`."""

    priority = Priority.DEVICE

    def __init__(self, vendor):
        self.vendor = vendor
        self.name = vendor.name
        self.device_type = vendor.dlpack_device
        self.executor = DeviceExecutor(vendor, self)
        self.dtypes = DeviceDtypes()
        self._arch = None

    def probe(self):
        try:
            import cupy
        except ImportError:
            return False, f"CuPy is not installed (pip install {self.vendor.cupy_package})"
        except Exception as exc:
            return False, f"CuPy failed to import: {exc}"
        if bool(cupy.cuda.runtime.is_hip) != self.vendor.cupy_is_hip:
            return False, f"the installed CuPy is built for {'ROCm' if cupy.cuda.runtime.is_hip else 'CUDA'}"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            return False, f"no {self.vendor.name.upper()} driver or device: {exc}"
        return (True, "") if count else (False, "no device found")

    def _properties(self):
        import cupy

        return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)

    def arch(self):
        if self._arch is None:
            self._arch = self.vendor.arch_of(self._properties())
        return self._arch

    def info(self):
        return {"device": self._properties()["name"].decode(), "arch": self.arch(), "warp": str(self._properties()["warpSize"]),
                "memory": "CuPy device arrays; torch.cuda tensors through DLPack without copies",
                "streams": "torch's current stream and caching allocator for torch tensors, else CuPy's current stream and pool",
                "shared memory": self.vendor.shared_memory, "fp8": self.vendor.fp8, "toolchain": self.vendor.runtime_compiler}

    def compile_report(self):
        """The offline compilers' report of this vendor's kernel files (registers, spills, shared memory per architecture)."""
        return compile_report.vendor_report(self.vendor)

    def fp8_format(self):
        return self.vendor.fp8_format(self.arch())

    def call_context(self, like):
        """For torch tensors on this vendor's devices: the call runs on that device, on torch's current
        stream of it, and allocates (outputs and scratch) through torch's caching allocator, so torch's
        stream semantics hold and no memory is held back in CuPy's pool. Arrays of other producers
        arrive through DLPack with the stream handshake (cupy.from_dlpack passes the current stream)."""
        if kind_of(like) != "torch" or like.device.type != "cuda":  # torch's ROCm builds say "cuda" too
            return contextlib.nullcontext()
        import cupy
        import torch

        device = like.device
        stream = torch.cuda.current_stream(device)

        def allocate(size):
            block = torch.empty(size, dtype=torch.uint8, device=device)
            return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), size, block), 0)

        scope = contextlib.ExitStack()
        scope.enter_context(cupy.cuda.Device(device.index))
        scope.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, device.index))
        scope.enter_context(cupy.cuda.using_allocator(allocate))
        return scope

    def to_native(self, x, contiguous):
        import cupy

        name = name_of(x.dtype)
        if kind_of(x) == "torch" and name in STAND_IN_OF:
            import torch

            x = x.view(getattr(torch, STAND_IN_OF[name]))
        elif isinstance(x, np.ndarray) or x.__dlpack_device__()[0] == DLPACK_CPU:
            x = to_host(x)
            x = x.view(STAND_IN_OF[name]) if name in STAND_IN_OF else x
        x = cupy.asarray(x) if isinstance(x, np.ndarray) else cupy.from_dlpack(x)
        return self.dtypes.record(cupy.ascontiguousarray(x) if contiguous else x, name)

    def from_native(self, y, like):
        kind = kind_of(like)
        name = self.dtypes.name(y)  # outputs come from empty(), which recorded their dtype
        stand_in = name in STAND_IN_OF
        if kind == "torch":
            import torch

            t = torch.from_dlpack(y)
            return t.view(getattr(torch, name)) if stand_in else t
        if kind == "cupy":
            return y
        host = y.get()
        return from_host(host.view(to_numpy(name)) if stand_in else host, like)

    def empty(self, shape, dtype):
        import cupy

        return self.dtypes.record(cupy.empty(shape, STAND_IN_OF.get(dtype) or to_numpy(dtype)), dtype)

    def poisoned(self, shape, dtype):
        import cupy

        if dtype in STAND_IN_OF:  # the format's NaN bit pattern in the stand-in integer type
            nan_bits = np.full((), np.nan, to_numpy(dtype)).view(STAND_IN_OF[dtype])
            return self.dtypes.record(cupy.full(shape, nan_bits, STAND_IN_OF[dtype]), dtype)
        np_type = to_numpy(dtype)
        if np_type.kind in "iu":
            bits = cupy.random.randint(0, 256, (*shape, np_type.itemsize), dtype=np.uint8)
            return self.dtypes.record(bits.view(np_type).reshape(shape), dtype)
        return cupy.full(shape, np.nan, np_type)


def register(registry, backend, kernels=None):
    """Add a GPU backend and its kernels (default: all of catalog.KERNELS, in their preference order)."""
    registry.add_backend(backend)
    ex, vendor = backend.executor, backend.vendor
    tensor_op_archs = ", ".join(a for a in vendor.compile_archs if vendor.has_tensor_ops(a))
    fp8_archs = ", ".join(a for a in vendor.compile_archs if vendor.has_fp8_tensor_ops(a))
    for entry in KERNELS if kernels is None else kernels:
        conditions, reasons = [], []
        if entry.needs_tensor_ops:
            conditions.append(lambda a: vendor.has_tensor_ops(ex.arch))
            reasons.append(f"tensor-op units ({vendor.tensor_op_instruction}): {tensor_op_archs}")
        if entry.needs_fp8_tensor_ops:
            conditions.append(lambda a: vendor.has_fp8_tensor_ops(ex.arch))
            reasons.append(f"fp8 tensor-op units: {fp8_archs}")
        if entry.supports is not None:
            conditions.append(entry.supports)
            reasons.append(entry.requires)
        supports = (lambda a, conditions=tuple(conditions): all(c(a) for c in conditions)) if conditions else None
        registry.add_kernel(entry.op, backend.name, entry.bind(ex), dtypes=entry.dtypes_on(vendor), supports=supports,
                            requires="; ".join(reasons), source=str(vendor.source(entry.family)))


def candidate_kernel(vendor, registry, backend, op, path):
    """`op`'s kernel built from the candidate source `path`, for a backend of `vendor`: the file
    stands in for the op's kernel file and must define the templates of the op's general variant
    (the last in catalog.KERNELS: gemm_simt, softmax, flash_attention_simt, ...) with the ABI of
    docs/gpu-kernels.md. None when `backend` is not one of this vendor's."""
    entry = registry.backends.get(backend)
    if entry is None or not isinstance(entry.backend, (SimBackend, DeviceBackend)) or entry.backend.vendor is not vendor:
        return None
    kernel = [k for k in KERNELS if k.op == op.name][-1]
    sources = Sources(vendor, path, kernel)
    original = entry.backend.executor
    if isinstance(entry.backend, SimBackend):
        ex = SimExecutor(vendor, original.arch, original.mode, sources)
    else:
        ex = DeviceExecutor(vendor, entry.backend, sources)
    return kernel.bind(ex)


def vendor_hooks(vendor):
    """The plugin hooks of one vendor's package: its device backend and its emulated twin."""
    from hal.registry import hookimpl, registry

    @hookimpl
    def hal_register(registry):
        register(registry, DeviceBackend(vendor))
        register(registry, SimBackend(vendor))

    @hookimpl
    def hal_candidate_kernel(backend, op, path):
        return candidate_kernel(vendor, registry(), backend, op, path)

    return hal_register, hal_candidate_kernel
