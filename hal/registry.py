"""Backends, kernels and the plugins that register them.

Every backend, the built-in ones included, is a plugin found through the entry-point group
`hal.plugins`; its module (or object) implements the `hal_register(registry)` hook declared in
`HookSpec`. A plugin that fails to import, or raises in its hook, leaves no half-registered
kernels behind and shows in `hal backends` as unavailable with the reason.

Two dispatch decisions are declared here, as data: `FALLBACK_BACKEND`, the backend a call runs on
when the chosen one cannot run it, and `Priority`, the bands a backend's `priority` is taken from.
"""
import contextlib
import math
import numbers
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np
import pluggy

from .arrays import DLPACK_CPU, from_host, to_host
from .dtypes import to_numpy
from .errors import BackendUnavailable, HalError

hookspec = pluggy.HookspecMarker("hal")
hookimpl = pluggy.HookimplMarker("hal")
NO_CONTEXT = contextlib.nullcontext()  # reusable: a host backend's call_context, entered on every call


class HookSpec:
    @hookspec
    def hal_register(self, registry):
        """Add backends (`registry.add_backend`) and kernels (`registry.add_kernel`)."""

    @hookspec(firstresult=True)
    def hal_candidate_kernel(self, backend, op, path):
        """A kernel for `op` (an OpDef) on the backend named `backend`, built from the source file
        `path` that is not registered (a hand-written or generated candidate), with the same calling
        convention as registered kernels: `fn(outs, **arguments)`. Return None for backends the plugin
        does not own; raise hal.KernelCompileError when the source does not build."""


@dataclass
class Kernel:
    """One kernel for (op, backend). `supports(a)` may refuse a call (then `requires` says why)."""

    op: str
    backend: str
    fn: object
    dtypes: frozenset
    supports: object = None
    requires: str = ""
    contiguous: bool = True
    source: str = ""


PLUGIN_FAILURES = (Exception, SystemExit)
"""What a plugin's code may raise (at import, in hal_register, probe, info, compile_report) that makes the
plugin or backend unusable with the reason, never the caller's failure: sys.exit() included, Ctrl-C not."""


FALLBACK_BACKEND = "cpu"
"""The backend that runs a call the chosen backend cannot run (policy "warn"); it takes arrays of any
device through `to_host`. Every op has a kernel on it."""


REPORT_KEYS = ("kernel", "arch", "file", "registers", "spills", "shared_bytes")
"""The keys every row of a `Backend.compile_report()` has, whatever else the backend reports."""


class Priority:
    """The priority bands of backends. Priority only decides among the available backends that run
    arrays of the same DLPack device type, when a call names no backend (higher wins); a backend
    takes its `priority` from one of these bands rather than a number of its own."""

    DEVICE = 100  # the native backend of a device's own memory (cuda, rocm): wins for that device's arrays
    HOST = 10  # the native backend of host memory (cpu, the fallback target): wins for host arrays
    OFFLOAD = 5  # takes host arrays but copies them to another device per call (opencl): by name only
    EMULATOR = 1  # runs another device's kernels on the host (cuda-sim, rocm-sim): by name only
    PORTING = 0  # the default: a backend being ported, chosen by name until its checklist is green
    TEST = -10  # backends that tests register on the fly


class Backend:
    """A backend's identity, what it reports about itself and how it handles memory. Subclass it; the
    defaults suit host memory.

    name: unique name; priority: a `Priority` band, which backend wins among those for the same device
    (higher wins); device_type: the DLPack device type of the arrays it runs on natively.
    """

    name = None
    priority = Priority.PORTING
    device_type = DLPACK_CPU

    def probe(self):
        """(available, reason): whether this backend can run here, and why not."""
        return True, ""

    def info(self):
        """What the backend reports about itself, as an ordered {label: value} of strings, chosen by
        the backend: `hal backends` shows "device" and "arch" (when present), `hal checklist` every
        field as given. Called only when the backend is available."""
        return {"device": "host memory"}

    def compile_report(self):
        """What the backend's compiler reports about its kernels, or None when there is nothing to show:
        {"title": str, "columns": [(key, header), ...], "rows": [dict, ...], "note": str}. Every row has
        at least "kernel", "arch", "file" (the kernel source's file name, as `Path(Kernel.source).name`),
        "registers", "spills" and "shared_bytes"; `columns` says which keys `hal backends --kernels`
        shows and under which headers, `note` what to say when there are no rows (toolchain missing).
        `hal checklist` matches rows to kernels by file name and summarises the common keys per arch."""
        return None

    def fp8_format(self):
        """The e4m3 flavour this backend's hardware computes in: OCP "float8_e4m3fn", or FNUZ
        "float8_e4m3fnuz" (AMD CDNA3). Producers of fp8 data for it (expert-parallel transport) pick it."""
        return "float8_e4m3fn"

    def call_context(self, like):
        """A context manager around one call whose primary argument is `like`, from before its outputs
        are allocated until they are returned: where the call's kernels run and its memory comes from
        (a device backend enters torch's current stream and caching allocator for torch tensors)."""
        return NO_CONTEXT

    def to_native(self, x, contiguous):
        """`x` as an array this backend's kernels take (C-contiguous if asked)."""
        x = to_host(x)
        return np.ascontiguousarray(x) if contiguous and not x.flags.c_contiguous else x

    def from_native(self, y, like):
        """A result `y` as an array of the same kind and device as `like`."""
        return from_host(y, like)

    def empty(self, shape, dtype):
        return np.empty(shape, to_numpy(dtype))

    def poisoned(self, shape, dtype):
        """An output buffer filled with NaN, so that elements a kernel forgot to write show up; integer
        buffers (ids, packed 4-bit codes) get fresh random bits instead, which no kernel can expect."""
        np_type = to_numpy(dtype)
        if np_type.kind in "iu":
            return np.random.default_rng().integers(0, 256, (*shape, np_type.itemsize), np.uint8).view(np_type).reshape(shape)
        return np.full(shape, np.nan, np_type)


def _check_backend(backend):
    """Refuse a backend whose identity dispatch could not use, with what is wrong."""
    if not isinstance(backend, Backend):
        raise HalError(f"add_backend takes a hal.Backend instance, got {type(backend).__name__}")
    if not isinstance(backend.name, str) or not backend.name:
        raise HalError(f"{type(backend).__name__}: name must be a non-empty string, got {backend.name!r}")
    p = backend.priority
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(p):
        raise HalError(f"backend {backend.name!r}: priority must be a number (a hal.Priority band), got {p!r}")
    if isinstance(backend.device_type, bool) or not isinstance(backend.device_type, numbers.Integral):
        raise HalError(f"backend {backend.name!r}: device_type must be a DLPack device type (int), got {backend.device_type!r}")


@dataclass
class BackendEntry:
    backend: Backend
    plugin: str
    _status: tuple = None

    @property
    def status(self):
        if self._status is None:
            try:
                self._status = tuple(self.backend.probe())
            except PLUGIN_FAILURES as exc:  # a broken probe means unavailable, never a crash
                self._status = (False, f"probe raised {exc!r}")
        return self._status

    def info(self):
        """The backend's info() with every label and value as a string ({} when unavailable); when info()
        raises or returns something else than a mapping, {"error": what happened}, never an exception."""
        if not self.status[0]:
            return {}
        try:
            info = self.backend.info()
            return {str(k): str(v) for k, v in dict(info).items()}
        except PLUGIN_FAILURES as exc:
            return {"error": f"info() raised {exc!r}"}

    def compile_report(self):
        """(report, error): the backend's compile_report() normalised (columns as (key, header) pairs,
        "rows" and "note" present), or (None, None) when it has none, or (None, what went wrong) when it
        raises or returns a malformed report; never an exception."""
        try:
            report = self.backend.compile_report()
        except PLUGIN_FAILURES as exc:
            return None, f"compile_report() raised {exc!r}"
        if report is None:
            return None, None
        try:
            columns = [(str(key), str(header)) for key, header in report["columns"]]
            rows = [dict(r) for r in report.get("rows") or ()]
            missing = sorted({k for r in rows for k in REPORT_KEYS if k not in r})
            if missing:
                raise ValueError(f"rows without {', '.join(missing)}")
            return {"title": str(report.get("title") or f"{self.backend.name} kernels"), "columns": columns, "rows": rows,
                    "note": str(report.get("note") or "")}, None
        except Exception as exc:
            return None, f"compile_report() returned a malformed report: {exc!r}"


@dataclass
class Registry:
    backends: dict = field(default_factory=dict)  # name -> BackendEntry
    kernels: dict = field(default_factory=dict)  # (op, backend) -> [Kernel]
    failures: dict = field(default_factory=dict)  # plugin name -> reason it is not usable
    version: int = 0  # bumped on every change, so dispatch caches know when to forget
    _plugin: str = "<direct>"

    def add_backend(self, backend):
        _check_backend(backend)
        if backend.name in self.backends:
            raise ValueError(f"backend {backend.name!r} registered twice")
        self.backends[backend.name] = BackendEntry(backend, self._plugin)
        self.version += 1

    def add_kernel(self, op, backend, fn, *, dtypes, supports=None, requires="", contiguous=True, source=""):
        kernel = Kernel(op, backend, fn, frozenset(dtypes), supports, requires, contiguous, source)
        self.kernels.setdefault((op, backend), []).append(kernel)
        self.version += 1
        return kernel

    def entry(self, name):
        try:
            return self.backends[name]
        except KeyError:
            known = ", ".join(sorted(self.backends)) or "none"
            reason = self.failures.get(name)
            raise BackendUnavailable(f"backend {name!r}: " + (reason or f"unknown (known backends: {known})")) from None

    def kernels_of(self, backend):
        return [k for (_, b), ks in self.kernels.items() if b == backend for k in ks]

    def run_hook(self, hook, name):
        """Run one plugin's hal_register hook; on failure undo what it added and record why."""
        before = (dict(self.backends), {k: list(v) for k, v in self.kernels.items()})
        self._plugin = name
        try:
            hook(registry=self)
        except PLUGIN_FAILURES as exc:
            self.backends, self.kernels = before
            self.failures[name] = f"plugin {name!r} raised in hal_register: {exc!r}"
        finally:
            self._plugin = "<direct>"
            self.version += 1


_registry = Registry()
_manager = pluggy.PluginManager("hal")
_manager.add_hookspecs(HookSpec)
_loaded = False
_lock = threading.Lock()


def registry():
    """The process-wide registry, with every installed plugin loaded on first use."""
    global _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                for ep in entry_points(group="hal.plugins"):
                    try:
                        plugin = ep.load()
                    except PLUGIN_FAILURES as exc:
                        _registry.failures[ep.name] = f"plugin {ep.name!r} ({ep.value}) failed to import: {exc!r}"
                        continue
                    register_plugin(plugin, ep.name)
                _loaded = True
    return _registry


def register_plugin(plugin, name=None):
    """Register a plugin object or module by hand (what the entry point does for installed ones)."""
    name = name or getattr(plugin, "__name__", type(plugin).__name__)
    try:
        _manager.register(plugin, name=name)  # validates the hook implementation's signature
    except Exception as exc:
        _registry.failures[name] = f"plugin {name!r} rejected: {exc!r}"
        return
    others = [p for p in _manager.get_plugins() if p is not plugin]
    _registry.run_hook(_manager.subset_hook_caller("hal_register", remove_plugins=others), name)


def candidate_kernel(backend, op, path):
    """The candidate kernel the plugin owning `backend` builds from `path` (see HookSpec), or None."""
    registry()
    return _manager.hook.hal_candidate_kernel(backend=backend, op=op, path=str(path))


def unregister_plugin(name):
    """Remove a plugin's backends and kernels (tests use this to clean up after themselves)."""
    plugin = _manager.unregister(name=name)
    gone = {b for b, e in _registry.backends.items() if e.plugin == name}
    for b in gone:
        del _registry.backends[b]
    _registry.kernels = {k: v for k, v in _registry.kernels.items() if k[1] not in gone}
    _registry.failures.pop(name, None)
    _registry.version += 1
    return plugin
