"""hal: one op API over NumPy, torch and CuPy arrays, hand-written kernels per backend, plugins."""
from . import ops
from .dispatch import backend, fallbacks, use
from .errors import (
    BackendUnavailable,
    FallbackWarning,
    HalError,
    KernelCompileError,
    KernelLaunchError,
    KernelNotFound,
    SchemaError,
)
from .registry import Backend, hookimpl, register_plugin, registry, unregister_plugin

__version__ = "0.1.0"


def list_backends():
    """Every known backend: name, available, reason, device, arch, priority, kernel count; and broken plugins."""
    reg = registry()
    rows = []
    for name, entry in sorted(reg.backends.items(), key=lambda kv: -kv[1].backend.priority):
        available, reason = entry.status
        info = entry.backend.info() if available else {}
        rows.append({
            "name": name,
            "available": available,
            "reason": reason,
            "device": info.get("device", ""),
            "arch": info.get("arch", ""),
            "priority": entry.backend.priority,
            "kernels": len(reg.kernels_of(name)),
            "plugin": entry.plugin,
        })
    for plugin, reason in sorted(reg.failures.items()):
        rows.append({"name": plugin, "available": False, "reason": reason, "device": "", "arch": "",
                     "priority": None, "kernels": 0, "plugin": plugin})
    return rows


from . import backends  # noqa: E402  (callable: hal.backends() is list_backends())

__all__ = [
    "ops", "backend", "backends", "list_backends", "fallbacks", "use", "hookimpl", "register_plugin", "unregister_plugin", "registry",
    "Backend", "HalError", "BackendUnavailable", "KernelNotFound", "SchemaError", "KernelCompileError",
    "KernelLaunchError", "FallbackWarning",
]
