"""Backends, kernels and the plugins that register them.

Every backend, the built-in ones included, is a plugin found through the entry-point group
`hal.plugins`; its module (or object) implements the `hal_register(registry)` hook declared in
`HookSpec`. A plugin that fails to import, or raises in its hook, leaves no half-registered
kernels behind and shows in `hal backends` as unavailable with the reason.
"""
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np
import pluggy

from .arrays import DLPACK_CPU, from_host, to_host
from .dtypes import to_numpy
from .errors import BackendUnavailable

hookspec = pluggy.HookspecMarker("hal")
hookimpl = pluggy.HookimplMarker("hal")


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


class Backend:
    """A backend's identity and how it handles memory. Subclass it; the defaults suit host memory.

    name: unique name; priority: which backend wins among those for the same device (higher wins);
    device_type: the DLPack device type of the arrays it runs on natively.
    """

    name = None
    priority = 0
    device_type = DLPACK_CPU

    def probe(self):
        """(available, reason): whether this backend can run here, and why not."""
        return True, ""

    def info(self):
        """Descriptive facts for `hal backends`: device, arch and anything else worth showing."""
        return {"device": "host", "arch": ""}

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
            except Exception as exc:  # a broken probe means unavailable, never a crash
                self._status = (False, f"probe raised {exc!r}")
        return self._status


@dataclass
class Registry:
    backends: dict = field(default_factory=dict)  # name -> BackendEntry
    kernels: dict = field(default_factory=dict)  # (op, backend) -> [Kernel]
    failures: dict = field(default_factory=dict)  # plugin name -> reason it is not usable
    tracebacks: dict = field(default_factory=dict)  # plugin name -> traceback of its failure
    version: int = 0  # bumped on every change, so dispatch caches know when to forget
    _plugin: str = "<direct>"

    def add_backend(self, backend):
        if backend.name in self.backends:
            raise ValueError(f"backend {backend.name!r} registered twice")
        self.backends[backend.name] = BackendEntry(backend, self._plugin)
        self.version += 1

    def add_kernel(self, op, backend, fn, *, dtypes, supports=None, requires="", contiguous=True, source=""):
        kernel = Kernel(op, backend, fn, frozenset(dtypes), supports, requires, contiguous, source)
        self.kernels.setdefault((op, backend), []).append(kernel)
        self.version += 1
        return kernel

    def kernel(self, op, backend, **options):
        """Decorator form of add_kernel."""

        def register(fn):
            self.add_kernel(op, backend, fn, **options)
            return fn

        return register

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
        except Exception as exc:
            self.backends, self.kernels = before
            self.failures[name] = f"plugin {name!r} raised in hal_register: {exc!r}"
            self.tracebacks[name] = traceback.format_exc()
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
                    except Exception as exc:
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
