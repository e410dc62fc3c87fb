"""Helpers for testing backends and the suite itself: a host-memory backend to hang kernels on and
a kernel that rounds the op's float64 reference into its outputs (always right, so a test can
change one thing about it and expect the conformance suite to notice)."""
from contextlib import contextmanager

import numpy as np

from .conformance import as_float64
from .registry import Backend, Priority, hookimpl, register_plugin, unregister_plugin


class HostBackend(Backend):
    """A backend on host memory whose kernels are whatever a test registers."""

    def __init__(self, name, priority=Priority.TEST):
        self.name, self.priority = name, priority


def reference_kernel(op):
    """A kernel for `op` that computes its float64 reference and rounds it into the outputs."""

    def kernel(outs, **args):
        for out, ref in zip(outs, op.reference(as_float64(args))):
            with np.errstate(over="ignore"):  # a result past the dtype's range is inf, as it would be on a device
                out[...] = ref.astype(out.dtype)

    return kernel


@contextmanager
def plugin(name, *backends, kernels=()):
    """Inside the block, `backends` (hal.Backend instances) and `kernels` ((op, backend name, fn,
    add_kernel options) tuples) are registered as the plugin `name`, through the same hook as an
    installed plugin, so what the hook refuses shows as that plugin's failure."""

    class Plugin:
        @hookimpl
        def hal_register(self, registry):
            for backend in backends:
                registry.add_backend(backend)
            for op, backend, fn, options in kernels:
                registry.add_kernel(op, backend, fn, **options)

    register_plugin(Plugin(), name)
    try:
        yield
    finally:
        unregister_plugin(name)
