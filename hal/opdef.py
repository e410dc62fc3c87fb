"""Ops described as data, in the spirit of PyTorch's OpInfo.

An `OpDef` holds everything hal knows about one op independently of any backend: its signature
(tensor arguments with allowed dtypes and ranks, attributes with defaults and choices), the
shape relations between arguments, output shape/dtype inference, a float64 NumPy reference, and
sample generators (ordinary, edge and error samples) that the conformance suite runs on every
backend. Calling an OpDef dispatches it (see `hal.dispatch`).
"""
import contextvars
import importlib
import inspect
import math
import numbers
import reprlib
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from .arrays import DLPACK_CPU, device_type, is_tensor, kind_of, to_host
from .dispatch import VALUE_READS, dispatch, prepare
from .dtypes import FLOATS, name_of
from .errors import GradNotSupported, SchemaError, renamed


class InvalidArgument(Exception):
    """Raised by an op's `check` when an argument breaks a shape relation or a value rule; dispatch turns
    it into a SchemaError that names the op: `raise InvalidArgument("b", "12 rows", "shape (5, 12)")`."""

    def __init__(self, arg, expected, got):
        super().__init__(arg, expected, got)
        self.arg, self.expected, self.got = arg, expected, got


__getattr__ = renamed(__name__, Bad="InvalidArgument")  # the old name, kept for one release


@dataclass(frozen=True)
class Tensor:
    """A tensor argument. `rank` is an exact rank, `min_rank` a lower bound."""

    name: str
    dtypes: tuple = FLOATS
    optional: bool = False
    rank: int = None
    min_rank: int = 1


INT32 = (-2**31, 2**31 - 1)  # kernels take int dims, indices and int attributes as int32
POSITIVE = (1, 2**31 - 1)  # the range of counts and sizes (Attr.range)
MAX_DIM = 2**31 - 1


@dataclass(frozen=True)
class Attr:
    """A keyword-only attribute.

    `kind` is bool, int or float, taken strictly: a bool is True/False (or np.bool_), an int is an
    integer (not a float, not a bool) within `range` (inclusive; int32 unless given), a float is any
    real number but finite. `choices` limits the value. None is accepted only when it is the default
    (None then means "not given" and the op's check says what that implies)."""

    name: str
    default: object = None
    kind: type = None
    choices: tuple = None
    range: tuple = None


@dataclass
class Sample:
    """Arguments for one call (NumPy arrays and attributes) and a label for reports."""

    args: dict
    label: str
    kind: str = "ordinary"  # or "edge"


@dataclass
class ErrorSample:
    """Arguments that must raise `error` with `match` in its message."""

    args: dict
    label: str
    error: type = SchemaError
    match: str = ""


def _shape(x):
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


@dataclass(eq=False)
class OpDef:
    """One op: signature, checks, output inference, reference, samples.

    params: Tensor/Attr entries in call order; the string "*" marks where keyword-only starts.
    check(a): shape relations beyond rank and dtype; raises InvalidArgument(arg, expected, got).
    outputs(a): [(shape, dtype_name)] of the results, `a` being the bound arguments.
    reference(a): float64 NumPy results from float64 NumPy arguments.
    samples(rng, dtype), error_samples(rng): generators of Sample / ErrorSample.
    growth(a): how the rounding error of fp32 compute grows with the problem (for example sqrt(K)).
    magnitude(a, refs): per-output scale the compute error is relative to (default |ref|).
    naive(a, dtype): the outputs computed naively in `dtype` (intermediates rounded to it); when an op
        has it, the conformance bound is twice that naive error per output row (see docs/conformance.md).
    bench(rng, dtype), cost(a) -> (flops, bytes), torch_peer(t) -> zero-arg callable doing the same work
    in torch on the arguments `t` (torch tensors, see `as_torch`): for benchmarks.
    """

    name: str
    params: list
    check: object
    outputs: object
    reference: object
    samples: object
    error_samples: object
    doc: str = ""
    growth: object = None
    magnitude: object = None
    naive: object = None
    bench: object = None
    cost: object = None
    torch_peer: object = None
    dispatch_on: str = None
    formats: object = None
    results: tuple = ("out",)
    tensors: list = field(init=False)
    attrs: list = field(init=False)

    def __post_init__(self):
        star = self.params.index("*") if "*" in self.params else len(self.params)
        entries = [p for p in self.params if p != "*"]
        self.tensors = [p for p in entries if isinstance(p, Tensor)]
        self.attrs = [p for p in entries if isinstance(p, Attr)]
        self.primary = self.dispatch_on or self.tensors[0].name
        self._positional = tuple(p.name for p in self.params[:star])
        self._defaults = {p.name: (None if isinstance(p, Tensor) else p.default) for p in entries}
        self.__name__ = self.__qualname__ = self.name
        self.__doc__ = self.doc
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    p.name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD if i < star else inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if isinstance(p, Tensor) and not p.optional else self._defaults[p.name],
                )
                for i, p in enumerate(q for q in self.params if q != "*")
            ]
            + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("backend", "out")]
        )

    def __repr__(self):
        return f"<hal op {self.name}{self.__signature__}>"

    def __call__(self, *args, backend=None, out=None, **kwargs):
        """Run the op; `out=` takes the result tensor(s) to write into (torch's convention, see
        hal.dispatch.check_out) and returns them."""
        return dispatch(self, self.bind(args, kwargs), backend, out)

    def prepare(self, *args, backend=None, **kwargs):
        """This call validated and its kernel chosen once, to run again on new tensors like these:
        `norm = hal.ops.rms_norm.prepare(x, w, eps=1e-6)`, then `norm(x2, w)` (see hal.dispatch.Prepared)."""
        return prepare(self, self.bind(args, kwargs), backend)

    def bind(self, args, kwargs):
        """Arguments by name, with defaults filled in."""
        if len(args) > len(self._positional):
            raise SchemaError(self.name, "*args", f"at most {len(self._positional)} positional arguments", len(args))
        bound = self._defaults.copy()
        bound.update(zip(self._positional, args))
        for key, value in kwargs.items():
            if key not in bound:
                raise SchemaError(self.name, key, f"one of {', '.join(bound)}", "an unknown keyword")
            bound[key] = value
        return bound

    def validate(self, a):
        """Check and normalize bound arguments in place; raise SchemaError before any kernel runs."""
        first_device = None
        tracing = _shapes_only.get()  # torch fake or meta tensors while torch traces: shapes only, no DLPack device
        for t in self.tensors:
            x = a[t.name]
            if x is None:
                if not t.optional:
                    raise SchemaError(self.name, t.name, "a tensor", "None")
                continue
            numpy = type(x) is np.ndarray  # the common case first: this runs on every call
            if not numpy:
                if not is_tensor(x):
                    raise SchemaError(self.name, t.name, "a NumPy array, torch tensor, CuPy array or DLPack producer", type(x).__name__)
                if kind_of(x) == "torch":
                    if x.requires_grad and sys.modules["torch"].is_grad_enabled():
                        raise GradNotSupported(self.name)
                    if not tracing and x.is_cpu:  # viewed as NumPy once, here: the checks, the kernel and its
                        a[t.name] = x = _host_view(self.name, t.name, x)  # backend then read the view (5-13 us a call)
                        numpy = True
            x_dtype, shape = x.dtype, x.shape
            dtype = name_of(x_dtype)
            if dtype not in t.dtypes:
                raise SchemaError(self.name, t.name, f"dtype in ({', '.join(t.dtypes)})", dtype)
            if isinstance(x_dtype, np.dtype) and not x_dtype.isnative:  # NumPy '>f4' on a little-endian host: kernels read raw bytes
                raise SchemaError(self.name, t.name, f"{dtype} in native byte order", f"byte-swapped dtype {x_dtype.str!r}")
            ndim = len(shape)
            if t.rank is not None and ndim != t.rank:
                raise SchemaError(self.name, t.name, f"rank {t.rank}", f"rank {ndim} with shape {_shape(x)}")
            if ndim < t.min_rank:
                raise SchemaError(self.name, t.name, f"rank >= {t.min_rank}", f"rank {ndim}")
            # not max(shape) while tracing: on torch's symbolic sizes that guards on their order
            if (any(d > MAX_DIM for d in shape) if tracing else ndim and max(shape) > MAX_DIM):
                raise SchemaError(self.name, t.name, "dimensions < 2**31", f"shape {_shape(x)}")
            if tracing:
                continue
            try:
                dev = DLPACK_CPU if numpy else device_type(x)
            except Exception as e:  # torch 'meta' tensors and producers DLPack cannot place
                raise SchemaError(self.name, t.name, "an array on a device DLPack describes (CPU, CUDA, ROCm)",
                                  f"{type(x).__name__} whose device query failed: {e}") from None
            if first_device is None:
                first_device = dev
            elif dev != first_device:
                raise SchemaError(self.name, t.name, f"the device of '{self.primary}' (DLPack type {first_device})", f"DLPack device type {dev}")
        for p in self.attrs:
            value = a[p.name]
            if value is None:
                if p.default is not None:
                    raise SchemaError(self.name, p.name, _expected(p), "None")
                continue
            if p.kind is not None:
                value = a[p.name] = _convert(self.name, p, value)
            if p.choices is not None and not _among(value, p.choices):
                raise SchemaError(self.name, p.name, f"one of {p.choices}", reprlib.repr(value))
        try:
            self.check(a)
        except InvalidArgument as bad:
            raise SchemaError(self.name, bad.arg, bad.expected, bad.got) from None
        return a


def _host_view(op, name, x):
    """A torch CPU tensor as a NumPy view of its memory, or SchemaError (sparse, quantized, conjugated tensors)."""
    try:
        return to_host(x)
    except Exception as e:
        raise SchemaError(op, name, "a dense torch tensor NumPy can view", f"{x.layout} {x.dtype} tensor ({e})") from None


def _expected(p):
    if p.choices is not None:
        return f"one of {p.choices}"
    if p.kind is int:
        lo, hi = p.range or INT32
        return f"an int in [{lo}, {hi}]"
    return {bool: "True or False", float: "a finite real number"}.get(p.kind, "a value")


def _convert(op, p, value):
    """The value of attribute `p` as its kind, or SchemaError: no coercion of strings, floats to ints
    or bools to numbers."""
    kind = type(value)
    if kind is p.kind and (kind is bool or kind is float and math.isfinite(value)):
        return value  # the common case first, a Python bool or finite float: this runs on every call
    if p.kind is bool:
        ok = isinstance(value, (bool, np.bool_))
    elif p.kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
        if ok:
            lo, hi = p.range or INT32
            ok = lo <= value <= hi
    elif p.kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
        if ok:
            try:
                ok = math.isfinite(value)
            except OverflowError:  # an int past the float range, 10**400
                ok = False
    else:
        return value
    if not ok:
        raise SchemaError(op, p.name, _expected(p), reprlib.repr(value))
    return p.kind(value)


def _among(value, choices):
    # by type first: an array compared with a string would compare elementwise
    return any(isinstance(value, type(c)) and value == c for c in choices if c is not None)


# ---------------------------------------------------------------- values of index tensors, for checks


_shapes_only = contextvars.ContextVar("hal_shapes_only", default=False)


@contextmanager
def shapes_only():
    """Inside, checks see tensors without values (torch's fake and meta tensors while it traces):
    host_values and index_values give None and the value checks pass; the real call runs them."""
    token = _shapes_only.set(True)
    try:
        yield
    finally:
        _shapes_only.reset(token)


def host_values(name, x):
    """The values of tensor argument `name` as NumPy: a view of host memory (torch CPU tensors and
    other host DLPack producers included), a copy of device memory (one synchronization: for small
    index tensors such as block tables); None inside `shapes_only()`."""
    if _shapes_only.get():
        return None
    _record_read(name)
    try:
        return to_host(x)
    except Exception as e:
        raise InvalidArgument(name, "an array whose values hal can read", f"{type(x).__name__} ({e})") from None


def index_values(name, x):
    """The values of an integer tensor, for a check to reduce: a NumPy view when `x` is in host memory
    (no copy), `x` itself when it is a torch or CuPy device array (its library reduces it on the
    device; converting a reduction to a Python int synchronizes once)."""
    if device_type(x) != DLPACK_CPU and kind_of(x) in ("torch", "cupy"):
        _record_read(name)
        return x
    return host_values(name, x)


def _record_read(name):
    """Tell a Prepared call being made that a check read the values of tensor `name` (it then refuses)."""
    reads = VALUE_READS.get()
    if reads is not None:
        reads.append(name)


def check_range(name, x, lo, hi, what="values"):
    """Every value of the integer tensor `x` in [lo, hi), else InvalidArgument (see index_values)."""
    v = index_values(name, x)
    if v is None or math.prod(v.shape) == 0:
        return
    low, high = int(v.min()), int(v.max())
    if low < lo or high >= hi:
        raise InvalidArgument(name, f"{what} in [{lo}, {hi})", f"values in [{low}, {high}]")


def check_offsets(name, x, lo, hi, exact=False):
    """The integer vector `x` non-decreasing within [lo, hi] (from lo to hi when `exact`), else
    InvalidArgument (see index_values)."""
    v = index_values(name, x)
    if v is None or v.shape[0] == 0:
        return
    start, end = int(v[0]), int(v[-1])
    if v.shape[0] > 1 and bool((v[1:] < v[:-1]).any()):
        raise InvalidArgument(name, "non-decreasing values", f"a decrease in [{start}, ..., {end}]")
    if exact and (start != lo or end != hi):
        raise InvalidArgument(name, f"{name}[0] == {lo} and {name}[-1] == {hi}", f"[{start}, ..., {end}]")
    if start < lo or end > hi:
        raise InvalidArgument(name, f"non-decreasing values in [{lo}, {hi}]", f"[{start}, ..., {end}]")


def check_finite(name, x):
    """Every value of the float tensor `x` finite, else InvalidArgument (read as index_values reads)."""
    v = index_values(name, x)
    if v is None or math.prod(v.shape) == 0:
        return
    xp = np if isinstance(v, np.ndarray) else importlib.import_module(kind_of(v))
    if not bool(xp.isfinite(v).all()):
        raise InvalidArgument(name, "finite values", "a NaN or an infinity")


def random(rng, shape, dtype, scale=1.0):
    """Fresh random values of a hal dtype as a NumPy array, never zeros."""
    from .dtypes import to_numpy

    return (rng.standard_normal(shape) * scale).astype(to_numpy(dtype))


def strided(x, axis=-1):
    """A non-contiguous view with the values of `x`: every other element of a twice larger array.

    The elements in between hold NaN (-1 for signed integers, all ones for unsigned), so a kernel
    that reads them shows it."""
    shape = list(x.shape)
    shape[axis] *= 2
    fill = np.iinfo(x.dtype).max if x.dtype.kind == "u" else -1 if x.dtype.kind == "i" else np.nan
    big = np.full(shape, fill, x.dtype)
    index = [slice(None)] * x.ndim
    index[axis] = slice(None, None, 2)
    view = big[tuple(index)]
    view[...] = x
    return view


def as_torch(a, device="cpu"):
    """Bound arguments with every NumPy array turned into a torch tensor on `device` (for torch peers)."""
    from .arrays import from_host
    import torch

    like = torch.empty(0, device=device)
    return {k: from_host(np.ascontiguousarray(v), like) if isinstance(v, np.ndarray) else v for k, v in a.items()}
