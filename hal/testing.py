"""Helpers for testing backends and the suite itself: a host-memory backend to hang kernels on and
a kernel that rounds the op's float64 reference into its outputs (always right, so a test can
change one thing about it and expect the conformance suite to notice)."""
import numpy as np

from .conformance import as_float64
from .registry import Backend


class HostBackend(Backend):
    """A backend on host memory whose kernels are whatever a test registers."""

    def __init__(self, name, priority=-10):
        self.name, self.priority = name, priority


def reference_kernel(op):
    """A kernel for `op` that computes its float64 reference and rounds it into the outputs."""

    def kernel(outs, **args):
        for out, ref in zip(outs, op.reference(as_float64(args))):
            with np.errstate(over="ignore"):  # a result past the dtype's range is inf, as it would be on a device
                out[...] = ref.astype(out.dtype)

    return kernel
