"""Choosing the backend and kernel for a call, and the fallback policy.

Backend choice, first match wins: the `backend=` keyword, `with hal.use(...)`, `hal.use(...)`,
the `HAL_BACKEND` environment variable, the device of the input arrays (their DLPack device
type) and then the backends' priority (`hal.registry.Priority`). When the chosen backend cannot
run the call (no kernel for the op and dtype, a kernel's `supports` refuses the arguments, the
backend is unavailable), the policy decides: "warn" (default) runs it on
`hal.registry.FALLBACK_BACKEND` (cpu), warns once per (op, backend) and records the event for
`hal.fallbacks()`; "error" (`hal.use(..., fallback="error")`, `HAL_FALLBACK=error`; any case) raises.
Resolved plans are cached per (op, backend asked for, device, dtype, policy), and validated calls per
signature (`_signature`: tensor kinds, dtypes, shapes and devices, attribute values, settings), so a
repeated call skips validation and kernel choice unless its checks read tensor values (index ranges).
`HAL_BACKEND` and `HAL_FALLBACK` are read at the first call and again by every `hal.use()`.
"""
import contextvars
import functools
import math
import os
import sys
import threading
import warnings
from collections import Counter
from contextlib import contextmanager

import numpy as np

from .arrays import DLPACK_CPU, device_type, is_tensor, kind_of
from .dtypes import name_of, to_numpy
from .errors import BackendUnavailable, FallbackWarning, GradNotSupported, KernelNotFound, OutOfMemory, SchemaError
from .registry import FALLBACK_BACKEND, registry

POLICIES = ("warn", "error")

_context = contextvars.ContextVar("hal_backend", default=(None, None))
_global = [None, None]  # hal.use(name, fallback=...)
_env = []  # [HAL_BACKEND, HAL_FALLBACK], read lazily: os.environ lookups cost a microsecond per call
_plans = {}
_prepared = {}  # call signature -> Prepared, see dispatch
PREPARED_CALLS = 4096  # signatures remembered at most
_plans_version = [-1]
_fallback_counts = Counter()
_warned = set()
_lock = threading.Lock()
_poison = [False]


class use:
    """Choose the backend (None: decide per call from the arrays) and the fallback policy.

    `hal.use("cuda", fallback="error")` sets them for the whole process; `with hal.use("cuda"):` sets
    them only inside the block, for the current thread or task (a context variable), and leaves the
    process-wide choice as it was. Both re-read HAL_BACKEND and HAL_FALLBACK.
    """

    def __init__(self, name=None, *, fallback=None):
        _check_policy(fallback)
        self.choice = (name, fallback and fallback.lower())
        self._previous = tuple(_global)
        _global[:] = self.choice
        _read_env()

    def __enter__(self):
        _global[:] = self._previous  # used as a context manager: scoped to the block, not process-wide
        self._token = _context.set(self.choice)
        return self

    def __exit__(self, *exc):
        _context.reset(self._token)

    def __repr__(self):
        return f"hal.use({self.choice[0]!r}, fallback={self.choice[1]!r})"


class scoped(use):
    """`with scoped(name, fallback):` is `with hal.use(name, fallback=...):` without ever setting the
    process-wide choice, not even between the call and the `with` (what other threads could see)."""

    def __init__(self, name, fallback=None):
        _check_policy(fallback)
        self.choice = (name, fallback and fallback.lower())

    def __enter__(self):
        self._token = _context.set(self.choice)
        return self


def backend(name, fallback=None):
    """Deprecated alias (removed in hal 0.3): `with hal.use(name, fallback=...):` does the same."""
    warnings.warn("hal.backend(...) is deprecated and will be removed in hal 0.3: use `with hal.use(...):`",
                  DeprecationWarning, stacklevel=2)
    return scoped(name, fallback)


def _read_env():
    policy = os.environ.get("HAL_FALLBACK") or None
    _check_policy(policy, "environment", "HAL_FALLBACK")
    _env[:] = [os.environ.get("HAL_BACKEND") or None, policy and policy.lower()]


def _check_policy(policy, where="hal.use", name="fallback"):
    if policy is not None and (not isinstance(policy, str) or policy.lower() not in POLICIES):
        raise SchemaError(where, name, f"one of {POLICIES} (any case)", repr(policy))


def fallbacks(clear=False):
    """Ops that ran on another backend than the one asked for: how often and why."""
    with _lock:
        events = [
            {"op": op, "requested": asked, "ran_on": ran, "reason": why, "count": n}
            for (op, asked, ran, why), n in sorted(_fallback_counts.items())
        ]
        if clear:
            _fallback_counts.clear()
            _warned.clear()
    return events


@contextmanager
def poisoned_outputs():
    """Inside, every output buffer starts as NaN (the conformance suite checks all were written)."""
    _poison[0] = True
    try:
        yield
    finally:
        _poison[0] = False


class Plan:
    """Where a call runs: the backend asked for, the candidate kernels, and the fallback target."""

    __slots__ = ("requested", "backend", "kernels", "reason", "fallback", "policy")

    def __init__(self, requested, backend, kernels, reason, fallback, policy):
        self.requested, self.backend, self.kernels = requested, backend, kernels
        self.reason, self.fallback, self.policy = reason, fallback, policy


def _settings():
    if not _env:
        _read_env()
    name, policy = _context.get()
    return name or _global[0] or _env[0], policy or _global[1] or _env[1] or "warn"


def _resolve(op, requested, device, dtype, policy):
    reg = registry()
    reason = None
    kernels = []
    if requested is None:
        candidates = [e for e in reg.backends.values() if e.backend.device_type == device and e.status[0]]
        if candidates:
            requested = max(candidates, key=lambda e: e.backend.priority).backend.name
        else:
            requested = f"<device {device}>"
            reason = f"no available backend runs arrays of DLPack device type {device}"
    if reason is None:
        entry = reg.entry(requested)
        available, why = entry.status
        if not available:
            reason = f"backend {requested!r} is unavailable: {why}"
        else:
            registered = reg.kernels.get((op.name, requested), [])
            kernels = [k for k in registered if dtype in k.dtypes]
            if not kernels:
                have = sorted({d for k in registered for d in k.dtypes})
                reason = f"{requested} has no {op.name} kernel for {dtype}" + (f" (it has {', '.join(have)})" if have else "")
    backend = reg.backends[requested].backend if kernels else None
    fallback = None
    if requested != FALLBACK_BACKEND:
        fallback = next((k for k in reg.kernels.get((op.name, FALLBACK_BACKEND), []) if dtype in k.dtypes), None)
    return Plan(requested, backend, kernels, reason, fallback, policy)


def _plan(op, a, requested):
    """The cached plan for a call: what was asked for (or implied by the arrays) and its kernels."""
    name, policy = _settings()
    requested = requested or name
    first = a[op.primary]
    _forget_if_changed(registry())
    device = device_type(first)
    key = (op.name, requested, device, name_of(first.dtype), policy)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _resolve(op, requested, device, key[3], policy)
    return plan


def _forget_if_changed(reg):
    """Drop the plans and prepared calls made before the registry last changed (a plugin loaded, a kernel added)."""
    if _plans_version[0] != reg.version:
        _plans.clear()
        _prepared.clear()
        _plans_version[0] = reg.version


def _fall_back(op, plan, dtype, reason):
    if plan.policy == "error":
        if reason.startswith("backend") and "unavailable" in reason:
            raise BackendUnavailable(f"{op.name}: {reason} (fallback policy 'error')")
        raise KernelNotFound(f"{op.name} on {plan.requested} in {dtype}: {reason} (fallback policy 'error')")
    if plan.fallback is None:
        raise KernelNotFound(f"{op.name} on {plan.requested} in {dtype}: {reason}; {FALLBACK_BACKEND} has no kernel for it either")
    with _lock:
        _fallback_counts[(op.name, plan.requested, FALLBACK_BACKEND, reason)] += 1
        first = (op.name, plan.requested) not in _warned
        _warned.add((op.name, plan.requested))
    if first:
        warnings.warn(f"hal: {op.name} ran on {FALLBACK_BACKEND} instead of {plan.requested}: {reason}", FallbackWarning, stacklevel=4)
    return plan.fallback


def _choose(op, a, requested):
    """(plan, kernel) for validated arguments; kernel is None when the plan's backend cannot run them."""
    plan = _plan(op, a, requested)
    for kernel in plan.kernels:
        if kernel.supports is None or kernel.supports(a):
            return plan, kernel
    return plan, None


def _reason(plan):
    return plan.reason or "; ".join(f"its kernel needs {k.requires or 'other arguments'}" for k in plan.kernels)


def explain(op, a, requested=None):
    """Where validated arguments would run: (backend asked for, backend that runs it, fallback reason or None)."""
    plan, kernel = _choose(op, a, requested)
    if kernel is not None:
        return plan.requested, plan.requested, None
    return plan.requested, FALLBACK_BACKEND if plan.fallback and plan.policy != "error" else None, _reason(plan)


def select(op, a, requested=None):
    """The kernel that runs validated arguments `a` and its backend, applying the fallback policy."""
    plan, kernel = _choose(op, a, requested)
    if kernel is not None:
        return kernel, plan.backend
    kernel = _fall_back(op, plan, name_of(a[op.primary].dtype), _reason(plan))
    return kernel, registry().backends[FALLBACK_BACKEND].backend


@functools.cache
def physical_memory():
    """The host's physical memory in bytes (math.inf where the OS does not say): the most output bytes
    one call may ask for, on every backend (a device's own limit shows as OutOfMemory when it allocates)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no os.sysconf (Windows) or no such name
        return math.inf


def dispatch(op, a, requested=None, out=None):
    """Validate, pick a kernel, move arguments to its backend, run it, return results like the input.

    The outputs' total size is checked against `physical_memory()` before anything is allocated, and a
    call whose outputs are all empty returns them without running a kernel. With `out` (see
    `check_out`) the kernel writes into the caller's tensors where the backend's kernels can reach
    their memory (host memory for cpu, the device's for cuda and rocm), else into buffers of its own
    that are then copied into them; the out tensors themselves are returned.

    A call without `out` whose checks read no tensor values and that ran on the backend asked for is
    remembered as a `Prepared` call under its signature (`_signature`): the next call with the same
    signature skips validation, output inference and kernel choice, which depend on nothing else."""
    like = a[op.primary]  # results come back as its kind: validation views torch CPU tensors as NumPy
    key = None if out is not None else _signature(op, a, requested)
    if key is not None:
        try:
            prepared = _prepared.get(key)
        except TypeError:  # an unhashable attribute value
            prepared = key = None
        if prepared is not None:
            return prepared.run(a)
    reads = _validate(op, a)
    shapes = op.outputs(a)
    if out is None:
        total = sum(math.prod(shape) * to_numpy(dtype).itemsize for shape, dtype in shapes)
        if total > physical_memory():
            raise SchemaError(op.name, "outputs", f"at most {physical_memory()} bytes (physical memory)",
                              f"{total} bytes for shapes {[tuple(s) for s, _ in shapes]}")
    else:
        out = check_out(op, a, shapes, out)
    kernel, be = select(op, a, requested)
    if key is not None and not reads and be is _plan(op, a, requested).backend:  # not a fallback (counted per call)
        if len(_prepared) >= PREPARED_CALLS:  # a decode loop's growing shapes, say: start again
            _prepared.clear()
        _prepared[key] = Prepared(op, key[3], a, shapes, kernel, be)  # key[3]: the tensors' keys
    return _run(op, a, kernel, be, shapes, like, out)


def _run(op, a, kernel, be, shapes, like, out=None):
    """The outputs allocated (or `out` wrapped), `kernel` run on backend `be` with the validated arguments `a` (the
    call's own dict: its tensors are replaced by the backend's arrays), the results returned as arrays of the kind
    and device of `like` (see dispatch)."""
    make = be.poisoned if _poison[0] else be.empty
    with be.call_context(like):
        try:
            if out is None:
                outs = tuple([make(shape, dtype) for shape, dtype in shapes])
            else:
                outs = tuple([_native_out(be, y, shape, dtype) for y, (shape, dtype) in zip(out, shapes)])
            if any(math.prod(shape) for shape, _ in shapes):
                for t in op.tensors:  # attributes pass as they are; tensors go through the backend
                    x = a[t.name]
                    if x is not None:
                        a[t.name] = be.to_native(x, kernel.contiguous)
                kernel.fn(outs, **a)
        except MemoryError as e:
            if isinstance(e, OutOfMemory):
                raise
            raise OutOfMemory(f"{op.name} on {be.name}: out of memory ({e})") from e
        if out is not None:
            for y, target in zip(outs, out):
                _copy_into(target, be.from_native(y, target))
            return out[0] if len(out) == 1 else out
        if len(outs) == 1:
            return be.from_native(outs[0], like)
        return tuple([be.from_native(y, like) for y in outs])


VALUE_READS = contextvars.ContextVar("hal_value_reads", default=None)  # while a call validates: a list of the tensors
# whose values the op's checks read (opdef.host_values and index_values, the way checks read values, append)


def _validate(op, a):
    """op.validate(a); the names of the tensors whose values its checks read."""
    reads = []
    token = VALUE_READS.set(reads)
    try:
        op.validate(a)
    finally:
        VALUE_READS.reset(token)
    return reads


def _tensor_key(x):
    """What a prepared call must find unchanged in a tensor argument: its kind, dtype, shape, device and layout."""
    if x is None or type(x) is np.ndarray:
        return x if x is None else (x.dtype, x.shape)
    kind = kind_of(x)
    if kind == "torch":
        return type(x), x.dtype, x.shape, x.device, x.layout  # a torch.Size is a tuple
    if kind == "cupy":
        return type(x), x.dtype, x.shape, x.device.id
    try:  # another DLPack producer
        return type(x), str(x.dtype), tuple(x.shape), tuple(x.__dlpack_device__())
    except Exception:  # not an array: validation says what is wrong
        return _NOT_AN_ARRAY


_NOT_AN_ARRAY = "not an array"


def _signature(op, a, requested):
    """What validation, output inference and kernel choice of a call depend on: the op, the backend asked for and
    the settings, each tensor's `_tensor_key` (a tuple, in op.tensors order), each attribute's value and type
    (1, 1.0 and True are equal keys); None where a tensor argument is not an array."""
    _forget_if_changed(registry())
    keys = tuple([_tensor_key(a[t.name]) for t in op.tensors])
    if _NOT_AN_ARRAY in keys:
        return None
    return op, requested, _settings(), keys, tuple([(v, type(v)) for v in [a[p.name] for p in op.attrs]])


def prepare(op, a, requested):
    """A Prepared call of `op` with bound arguments `a`, or SchemaError where its checks read tensor values."""
    keys = tuple([_tensor_key(a[t.name]) for t in op.tensors])
    reads = _validate(op, a)
    if reads:
        raise SchemaError(op.name, reads[0], "a call whose checks read no tensor values (prepare)",
                          f"values checked on every call: call hal.ops.{op.name} itself")
    return Prepared(op, keys, a, op.outputs(a), *select(op, a, requested))


class Prepared:
    """One op's call validated, its outputs inferred and its kernel chosen once (`hal.ops.<name>.prepare(...)`, and
    dispatch for every signature it sees), to run again on new tensors of the same kinds, dtypes, shapes and
    devices with the same attributes, as a decode loop does: a call checks that (SchemaError otherwise: prepare
    again), refuses tensors that require grad in grad mode, and runs as dispatch runs (outputs, kernel,
    conversions) on the backend chosen when preparing. Only for calls whose checks read no tensor values (index
    ranges are checked on every call of hal.ops.<name>).

    Per core, a 1 x 1024 rms_norm on torch tensors took 18 us through hal.ops, 15 prepared (bfloat16: 29, 21). In a
    28-layer bfloat16 Llama's decode step, whose projections have just streamed their weights through the caches,
    the same call took ~150 us, ~140 prepared and ~95 calling the kernel with no dispatch at all: there each Python
    step costs microseconds, and a prepared call still checks its tensors, allocates and converts."""

    __slots__ = ("op", "names", "attrs", "keys", "shapes", "kernel", "backend")

    def __init__(self, op, keys, a, shapes, kernel, backend):
        """From the `_tensor_key`s of the tensors as given, the validated arguments `a`, their output `shapes` and
        the `kernel` of `backend` chosen for them."""
        self.op, self.names, self.keys = op, [t.name for t in op.tensors], keys
        self.attrs = {p.name: a[p.name] for p in op.attrs}
        self.shapes, self.kernel, self.backend = shapes, kernel, backend

    def __call__(self, *tensors):
        """The op on `tensors`, its tensor arguments in order (None, or nothing at the end, for optional ones left out)."""
        tensors += (None,) * (len(self.names) - len(tensors))
        keys = tuple([_tensor_key(x) for x in tensors])
        if keys != self.keys:
            raise SchemaError(self.op.name, "tensors", f"tensors as prepared {self.keys}", keys)
        return self.run(dict(zip(self.names, tensors)))

    def run(self, a):
        """The op on the tensors of `a` (by name), whose keys the caller has matched."""
        args = dict(self.attrs)
        for name in self.names:
            args[name] = a[name]
        if any(getattr(args[name], "requires_grad", False) for name in self.names) and sys.modules["torch"].is_grad_enabled():
            raise GradNotSupported(self.op.name)
        return _run(self.op, args, self.kernel, self.backend, self.shapes, a[self.op.primary])


# ---------------------------------------------------------------- out=

def check_out(op, a, shapes, out):
    """The caller's `out=` as a tuple, or SchemaError before any kernel runs: one tensor for a single
    result, a tuple or list of one per result (as op.outputs says) otherwise, each a NumPy array, torch
    tensor or CuPy array of exactly the result's shape and dtype, C-contiguous, writable, on the device
    of the op's primary tensor, overlapping neither an input nor another out tensor (kernels read and
    write rows in any order, so no op is safe in place)."""
    many = len(shapes) > 1
    if many != isinstance(out, (tuple, list)):
        expected = f"a tuple of {len(shapes)} tensors" if many else "one tensor"
        raise SchemaError(op.name, "out", f"{expected} ({op.name} has {len(shapes)} result{'s' * many} here)", type(out).__name__)
    out = tuple(out) if many else (out,)
    if len(out) != len(shapes):
        raise SchemaError(op.name, "out", f"{len(shapes)} tensors", f"{len(out)}")
    device = _device(a[op.primary])
    spans = [(t.name, _extent(a[t.name])) for t in op.tensors if a[t.name] is not None]
    for i, (y, (shape, dtype)) in enumerate(zip(out, shapes)):
        what = f"out[{i}] " if many else ""
        kind = kind_of(y) if is_tensor(y) else None
        if kind not in ("numpy", "torch", "cupy"):
            raise SchemaError(op.name, "out", f"{what}a NumPy array, torch tensor or CuPy array", type(y).__name__)
        if tuple(y.shape) != tuple(shape) or name_of(y.dtype) != dtype:
            raise SchemaError(op.name, "out", f"{what}shape {tuple(shape)} and dtype {dtype}",
                              f"shape {tuple(y.shape)} and dtype {name_of(y.dtype)}")
        try:
            where = _device(y)
        except Exception as e:  # torch 'meta' tensors: no memory to write
            where = f"{type(y).__name__} whose device query failed: {e}"
        if where != device:
            raise SchemaError(op.name, "out", f"{what}on the device of '{op.primary}' (DLPack {device})", f"DLPack {where}")
        problem = _unwritable(y, kind)
        if problem:
            raise SchemaError(op.name, "out", f"{what}a C-contiguous, writable tensor", problem)
        span = _extent(y)
        for name, other in spans:
            if _overlap(span, other):
                raise SchemaError(op.name, "out", f"{what}memory that no input or other out tensor uses", f"memory shared with '{name}'")
        spans.append((f"out[{i}]", span))
    return out


def _device(x):
    """(DLPack device type, device id)."""
    return (DLPACK_CPU, 0) if isinstance(x, np.ndarray) else tuple(int(v) for v in x.__dlpack_device__())


def _unwritable(y, kind):
    """Why the kernels cannot write the out tensor `y` in place, or "" when they can."""
    if kind == "torch":
        if y.requires_grad:
            return "a tensor that requires grad"
        return "" if y.is_contiguous() else f"strides {tuple(y.stride())}"
    if not y.flags.c_contiguous:
        return f"strides {tuple(y.strides)} (bytes)"
    return "" if y.flags.writeable else "a read-only array"


def _extent(x):
    """(device, first byte, end byte) of the memory a NumPy, torch or CuPy array spans; None when empty."""
    if math.prod(x.shape) == 0:
        return None
    kind = kind_of(x)
    if kind == "torch":
        item = x.element_size()
        start, strides = x.data_ptr(), [s * item for s in x.stride()]
    elif kind == "cupy":
        item, start, strides = x.itemsize, x.data.ptr, x.strides
    elif kind == "numpy":
        item, start, strides = x.itemsize, x.__array_interface__["data"][0], x.strides
    else:
        return None
    low = sum((n - 1) * s for n, s in zip(x.shape, strides) if s < 0)
    high = sum((n - 1) * s for n, s in zip(x.shape, strides) if s > 0)
    return _device(x), start + low, start + high + item


def _overlap(a, b):
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _address(x):
    kind = kind_of(x)
    if kind == "numpy":
        return x.__array_interface__["data"][0]
    return x.data_ptr() if kind == "torch" else x.data.ptr if kind == "cupy" else None


def _native_out(be, y, shape, dtype):
    """The backend's array over the caller's out tensor `y` when its kernels can write that memory
    (cpu: a NumPy view of host memory; cuda/rocm: a CuPy view of device memory), else a buffer of its own."""
    native = be.to_native(y, True)
    if math.prod(shape) and _address(native) != _address(y):  # a copy (OpenCL uploads, a fallback to cpu from a device)
        return be.empty(shape, dtype)
    return native


def _copy_into(target, y):
    """The result `y` (of target's kind and device) into the caller's out tensor, unless it is that memory."""
    if math.prod(target.shape) == 0 or _address(y) == _address(target):
        return
    if kind_of(target) == "torch":
        target.copy_(y)
    else:
        target[...] = y
