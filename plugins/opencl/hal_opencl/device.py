"""The OpenCL context, queue, program cache and device buffers of the plugin.

One context and in-order queue on the first device of the first OpenCL platform that has one
(PoCL's CPU device on CI; Oclgrind's simulator when run under `oclgrind`). Programs are built
from a kernel file with the shared header prepended and cached per context by (source, build
options), so each dtype / variant of a kernel is built once per process (PoCL additionally keeps
compiled kernels in its own disk cache, ~/.cache/pocl).
"""
import hashlib
import threading
from pathlib import Path

import numpy as np

import hal

CL_DIR = Path(__file__).parent / "cl"
HEADER = CL_DIR / "common.h"

# hal's kernel codes (activations, formats, ...) as -D options of every build: hal.codes is their one table.
_CODES = tuple(hal.codes.define_options())

# hal dtype name -> storage kind understood by common.h
KINDS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def kind(x):
    """The common.h storage kind of a native array (F32 when x is None: the slot is unused)."""
    return "F32" if x is None else KINDS[x.dtype.name]


class ClArray:
    """A C-contiguous array in an OpenCL buffer: the plugin's native array type.

    `buffer` is None for an empty array (OpenCL has no zero-size buffers); `host` keeps the host
    array it was uploaded from, if any (launchers read small index arrays such as cu_seqlens from it)."""

    __slots__ = ("runtime", "buffer", "shape", "dtype", "host")

    def __init__(self, runtime, buffer, shape, dtype, host=None):
        self.runtime, self.buffer, self.shape, self.dtype, self.host = runtime, buffer, tuple(shape), np.dtype(dtype), host

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    @property
    def ndim(self):
        return len(self.shape)

    def get(self):
        """A host copy (NumPy); waits for the kernels that write it."""
        out = np.empty(self.shape, self.dtype)
        if self.buffer is not None:
            self.runtime.cl.enqueue_copy(self.runtime.queue, out.reshape(-1).view(np.uint8), self.buffer, is_blocking=True)
        return out

    def __repr__(self):
        return f"ClArray(shape={self.shape}, dtype={self.dtype.name})"


class Runtime:
    def __init__(self, cl, device):
        self.cl, self.device = cl, device
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context)
        self._programs = {}  # (sha1 of source, options) -> cl.Program, for this context
        self._kernels = {}  # (id of the program, kernel name) -> cl.Kernel
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ buffers

    def upload(self, host):
        host = np.ascontiguousarray(host)
        buf = None
        if host.nbytes:
            flags = self.cl.mem_flags.READ_ONLY | self.cl.mem_flags.COPY_HOST_PTR
            buf = self.cl.Buffer(self.context, flags, hostbuf=host.reshape(-1).view(np.uint8))
        return ClArray(self, buf, host.shape, host.dtype, host)

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self.cl.Buffer(self.context, self.cl.mem_flags.READ_WRITE, nbytes) if nbytes else None
        return ClArray(self, buf, shape, dtype)

    def filled(self, shape, dtype, value):
        host = np.full(shape, value, dtype)
        out = self.empty(shape, dtype)
        if out.buffer is not None:
            self.cl.enqueue_copy(self.queue, out.buffer, host.reshape(-1).view(np.uint8), is_blocking=True)
        return out

    # ------------------------------------------------------------------ programs

    def program(self, path, defines):
        """The built program of kernel file `path` with `-D` options from `defines` (cached).

        The header common.h is prepended (with a #line so that compiler messages name the file's
        own lines). Raises hal.KernelCompileError with the build log when the build fails."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise hal.KernelCompileError(f"opencl: cannot read kernel source {path}: {exc}") from None
        source = HEADER.read_text() + f'\n#line 1 "{path.name}"\n' + text
        options = tuple(f"-D{k}={v}" for k, v in sorted(defines.items())) + ("-cl-std=CL1.2",) + _CODES
        key = (hashlib.sha1(source.encode()).hexdigest(), options)
        with self._lock:
            prg = self._programs.get(key)
            if prg is None:
                try:
                    prg = self.cl.Program(self.context, source).build(options=list(options))
                except self.cl.RuntimeError as exc:  # pyopencl's build errors carry the build log
                    prg = hal.KernelCompileError(f"opencl: {path} does not build with {' '.join(options)}", str(exc))
                self._programs[key] = prg  # a failed build is cached too: it fails the same way next time
        if isinstance(prg, Exception):
            raise prg
        return prg

    def kernel(self, path, name, defines):
        """The kernel `name` of the program (cached: a cl.Kernel is created once per program)."""
        prg = self.program(path, defines)
        key = (id(prg), name)
        kern = self._kernels.get(key)
        if kern is None:
            if name not in prg.kernel_names.split(";"):
                raise hal.KernelCompileError(f"opencl: {path} has no kernel named {name!r} (it has {prg.kernel_names or 'none'})")
            kern = self._kernels[key] = self.cl.Kernel(prg, name)
        return kern

    def run(self, kernel, global_size, local_size, *args):
        """Set the arguments and enqueue (under the lock: a cl.Kernel's arguments are shared state)."""
        gs = tuple(int(g) for g in global_size)
        ls = None if local_size is None else tuple(int(x) for x in local_size)
        with self._lock:
            kernel(self.queue, gs, ls, *args)


_runtime = None
_runtime_error = None
_lock = threading.Lock()


def find_device(cl):
    """(device, None) for the first device of the first platform that has one, else (None, why)."""
    try:
        platforms = cl.get_platforms()
    except Exception as exc:  # the ICD loader found no driver: clGetPlatformIDs -> PLATFORM_NOT_FOUND_KHR
        return None, (f"no OpenCL platform: the ICD loader found no driver ({exc}); install one, for example "
                      "`apt-get install pocl-opencl-icd`, or point OCL_ICD_VENDORS at its .icd file")
    if not platforms:
        return None, "no OpenCL platform: the ICD loader found no driver; install one, for example `apt-get install pocl-opencl-icd`"
    seen = []
    for p in platforms:
        try:
            devices = p.get_devices()
        except Exception:  # DEVICE_NOT_FOUND
            devices = []
        if devices:
            return devices[0], None
        seen.append(p.name)
    return None, f"OpenCL platform(s) {', '.join(seen)} found but none has a device"


def runtime():
    """The process-wide Runtime; raises hal.BackendUnavailable saying what is missing."""
    global _runtime, _runtime_error
    if _runtime is None and _runtime_error is None:
        with _lock:
            if _runtime is None and _runtime_error is None:
                try:
                    import pyopencl as cl
                except ImportError as exc:
                    _runtime_error = f"pyopencl is not installed or does not import ({exc}); `pip install pyopencl`"
                else:
                    device, why = find_device(cl)
                    if device is None:
                        _runtime_error = why
                    else:
                        try:
                            _runtime = Runtime(cl, device)
                        except Exception as exc:
                            _runtime_error = f"OpenCL device {device.name!r} found but a context on it failed: {exc!r}"
    if _runtime is None:
        raise hal.BackendUnavailable(f"opencl: {_runtime_error}")
    return _runtime
