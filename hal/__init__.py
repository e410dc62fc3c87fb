"""hal: one op API over NumPy, torch and CuPy arrays, hand-written kernels per backend, plugins.

One public name per concept: `hal.use` chooses the backend (process-wide, or scoped with `with`),
`hal.list_backends()` lists them, `hal.Backend` is the class a backend subclasses with a
`hal.Priority` band, and `hal.backends` is only the package of the built-in backends.
"""
from . import ops
from .dispatch import backend, fallbacks, use  # backend: deprecated alias of `with hal.use(...)`
from .errors import (
    BackendUnavailable,
    FallbackWarning,
    GradNotSupported,
    HalError,
    KernelCompileError,
    KernelLaunchError,
    KernelNotFound,
    OutOfMemory,
    SchemaError,
)
from .registry import FALLBACK_BACKEND, Backend, Priority, hookimpl, register_plugin, registry, unregister_plugin

__version__ = "0.1.0"


def list_backends():
    """Every known backend, highest priority first: name, available, reason, device, arch, priority,
    kernel count, plugin, details (the rest of its info(): ISA, GEMM microkernel, threads, ...); then the
    plugins that failed to load (available False, the reason why)."""
    reg = registry()
    rows = []
    for name, entry in sorted(reg.backends.items(), key=lambda kv: -kv[1].backend.priority):
        available, reason = entry.status
        info = entry.info()
        rows.append({
            "name": name,
            "available": available,
            "reason": reason,
            "device": info.get("device") or info.get("error", ""),
            "arch": info.get("arch", ""),
            "priority": entry.backend.priority,
            "kernels": len(reg.kernels_of(name)),
            "plugin": entry.plugin,
            "details": {k: v for k, v in info.items() if k not in ("device", "arch", "error")},
        })
    for plugin, reason in sorted(reg.failures.items()):
        rows.append({"name": plugin, "available": False, "reason": reason, "device": "", "arch": "",
                     "priority": None, "kernels": 0, "plugin": plugin, "details": {}})
    return rows


from . import backends  # noqa: E402  (the package of the built-in backends; not callable: use list_backends())

__all__ = [
    "ops", "use", "list_backends", "fallbacks", "hookimpl", "register_plugin", "unregister_plugin", "registry",
    "Backend", "Priority", "FALLBACK_BACKEND", "HalError", "BackendUnavailable", "KernelNotFound", "SchemaError",
    "KernelCompileError", "KernelLaunchError", "OutOfMemory", "GradNotSupported", "FallbackWarning", "backends",
]
