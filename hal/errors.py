"""One error hierarchy for everything hal raises on purpose, and the warning old names give."""
import sys
import warnings


class HalError(Exception):
    """Base of every error hal raises on purpose."""


class BackendUnavailable(HalError):
    """A backend cannot run here: missing package, no device, architecture too old, unknown name."""


class KernelNotFound(HalError):
    """The chosen backend has no kernel for this call and the fallback policy forbids falling back."""


class SchemaError(HalError, ValueError):
    """An argument does not fit the op's schema (rank, shape, dtype, device, value)."""

    def __init__(self, op, arg, expected, got):
        self.op, self.arg, self.expected, self.got = op, arg, expected, got
        super().__init__(f"{op}: argument '{arg}': expected {expected}, got {got}")


class KernelCompileError(HalError):
    """A kernel source failed to compile; `log` holds the compiler output."""

    def __init__(self, message, log=""):
        self.log = log
        super().__init__(f"{message}\n{log}" if log else message)


class KernelLaunchError(HalError):
    """A compiled kernel failed at launch or while running."""


class GradNotSupported(HalError):
    """A hal op was called on torch tensors that require grad with grad mode on: hal kernels are forward
    (inference) only, and detaching the inputs silently would hand back results without a graph."""

    def __init__(self, op):
        self.op = op
        super().__init__(f"{op}: hal kernels are inference only and have no backward, but an input requires grad with "
                         "grad mode on; call it under torch.no_grad() or torch.inference_mode(), or detach the inputs")


class OutOfMemory(HalError, MemoryError):
    """Memory ran out while a call allocated or ran (the size check before allocating passed)."""


class FallbackWarning(UserWarning):
    """An op ran on another backend than the one asked for (shown once per op and backend)."""


def renamed(module, **old_to_new):
    """A module `__getattr__` that keeps old names of `module`'s objects working for one more release
    with a DeprecationWarning: `__getattr__ = renamed(__name__, Bad="InvalidArgument")`."""

    def __getattr__(name):
        if name not in old_to_new:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new = old_to_new[name]
        warnings.warn(f"{module}.{name} is deprecated and will be removed in hal 0.3: use {module}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], new)

    return __getattr__
