"""The conformance suite: every backend x op x dtype x sample against the float64 reference.

Shipped inside the package so that vendors run it on their own backend, either with
`hal check NAME` or with `pytest --pyargs hal.conformance --hal-backend NAME`. The tolerance
policy is documented in docs/conformance.md; in short, for each output element

    |out - ref| <= atol(out dtype) + rtol(out dtype) * |ref| + rtol(float32) * growth * magnitude

where the middle term covers rounding the result to its dtype, and the last covers fp32
compute whose error grows with the problem (growth, e.g. sqrt(K) for a length-K reduction)
relative to the op's magnitude (|ref| unless the op says better, e.g. |a| @ |b| for gemm).
Every run poisons the output buffers with NaN (ordinary samples pass them as `out=`, edge samples
let the backend allocate them), uses fresh random inputs (the seed is reported),
checks that inputs were left untouched, and runs under fallback policy "error" so that a
fallback can never pass for the backend.
"""
import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..dispatch import poisoned_outputs, scoped
from ..dtypes import FLOATS, TOLERANCE, name_of
from ..errors import BackendUnavailable, KernelNotFound
from ..registry import Backend, registry


@dataclass
class Case:
    backend: str
    op: object
    dtype: str
    sample: object
    kind: str  # "ordinary", "edge" or "error"

    @property
    def id(self):
        return f"{self.backend}-{self.op.name}-{self.dtype}-{self.kind}-{self.sample.label}"


@dataclass
class Result:
    case: Case
    status: str  # "pass", "fail" or "unsupported"
    message: str = ""
    worst: float = 0.0  # largest error / tolerance over all outputs
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.status != "fail"


def new_seed():
    return int(time.time_ns() % (2**31))


def cases(backend, ops=None, seed=None):
    """All cases of one backend: for each op it has kernels for, each declared dtype and sample."""
    from ..ops import ALL

    reg = registry()
    reg.entry(backend)  # unknown names raise BackendUnavailable here
    rng = np.random.default_rng(new_seed() if seed is None else seed)
    out = []
    for op in ALL.values():
        if ops and op.name not in ops:
            continue
        dtypes = sorted({d for k in reg.kernels.get((op.name, backend), []) for d in k.dtypes})
        for dtype in dtypes:
            out += [Case(backend, op, dtype, s, s.kind) for s in op.samples(rng, dtype)]
        if dtypes:
            out += [Case(backend, op, "-", s, "error") for s in op.error_samples(rng)]
    return out


def as_float64(a):
    """The arguments with every float32 / float16 / bfloat16 array widened exactly to float64. fp8 arrays
    stay codes: the references widen them where they read them (exact, through ml_dtypes), so a check
    that reads 6 experts of an fp8 weight does not widen all 64."""
    return {k: v.astype(np.float64) if isinstance(v, np.ndarray) and name_of(v.dtype) in ("float64", *FLOATS) else v
            for k, v in a.items()}


def _snapshot(a):
    return {k: v.copy() for k, v in a.items() if isinstance(v, np.ndarray)}


COMPARE_ROWS = 1 << 16  # elements per block of compare: its dozen temporaries stay in cache, not in fresh pages


def compare(op, a, outs, refs, mags, naive=None):
    """(worst error/tolerance ratio, largest |error|, message on the worst element) over the outputs.

    With `naive` (the outputs computed naively in the kernel's dtype), an output row may be off by
    twice the naive computation's largest error in that row, plus the dtype's atol and the fp32
    noise floor relative to the op's magnitude. Outputs are judged in blocks of whole rows (the
    last axis), so an output of 100M elements costs no float64 copies of its size."""
    growth = op.growth(a) if op.growth else 1.0
    formats = op.formats(a) if op.formats else [None] * len(refs)
    worst, largest, message = 0.0, 0.0, ""
    for i, (out, ref, mag, fmt) in enumerate(zip(outs, refs, mags, formats)):
        if tuple(out.shape) != tuple(ref.shape):
            return math.inf, math.inf, f"output {i}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        if fmt is not None:
            ulps, where, text = compare_codes(np.asarray(out), np.asarray(ref), fmt)
            if ulps > worst:
                worst, message = ulps, f"output {i} ({fmt}) at {where}: {text}" if ulps > 1 else ""
            continue
        out = np.asarray(out)
        if out.size == 0:
            continue
        width = out.shape[-1] if out.ndim else 1
        rows = [x if x is None else np.broadcast_to(x, out.shape).reshape(-1, width) for x in (out, ref, mag, None if naive is None else naive[i])]
        step = max(1, COMPARE_ROWS // max(width, 1))
        for r0 in range(0, rows[0].shape[0], step):
            r, big, text, where = _compare_rows(*(x if x is None else x[r0:r0 + step] for x in rows), growth)
            if where is not None:
                where = tuple(int(j) for j in np.unravel_index(r0 * width + where, out.shape))
            if math.isinf(big):  # a NaN where none is due, or none where one is: counted over the whole output
                count = int(np.count_nonzero(np.isnan(out) != np.isnan(np.broadcast_to(ref, out.shape))))
                return r, big, f"output {i}: {count} of {out.size} elements {text}, first at {where}"
            largest = max(largest, big)
            if r > worst:
                worst = r
                message = f"output {i} ({name_of(out.dtype)}) at {where}: {text}" if r > 1 else ""
    return worst, largest, message


def _compare_rows(got, ref, mag, naive, growth):
    """(worst ratio, largest |error|, text, flat index of the worst) of one block of rows; a NaN mismatch
    gives (inf, inf, what, where)."""
    dtype = got.dtype
    got = got.astype(np.float64)
    expected_nan = np.isnan(ref)
    for bad, what in ((np.isnan(got) & ~expected_nan, "NaN (unwritten or wrong)"), (expected_nan & ~np.isnan(got), "not NaN where NaN is expected")):
        if bad.any():
            return math.inf, math.inf, what, int(np.flatnonzero(bad)[0])
    with np.errstate(over="ignore"):
        rounded = ref.astype(dtype).astype(np.float64)  # a result that overflows its dtype is inf
    same_inf = np.isinf(rounded) & (got == rounded)
    rtol, atol = TOLERANCE[name_of(dtype)]
    ref, mag = np.where(expected_nan, 0.0, ref), np.where(np.isnan(mag), 0.0, mag)  # NaN where NaN is due: no tolerance needed
    noise = TOLERANCE["float32"][0] * growth * np.abs(mag)
    if naive is not None:
        with np.errstate(invalid="ignore"):
            naive_err = np.abs(naive.astype(np.float64) - ref)
        naive_err = np.where(np.isfinite(naive_err), naive_err, 0.0).max(axis=-1, keepdims=True, initial=0.0)  # NaN/Inf where the reference is
        tol = 2.0 * naive_err + atol + noise
    else:
        tol = atol + rtol * np.abs(ref) + noise
    with np.errstate(invalid="ignore"):
        err = np.where(expected_nan | same_inf, 0.0, np.abs(got - ref))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(err == 0, 0.0, err / tol)
    j = int(np.nanargmax(np.where(np.isnan(ratio), np.inf, ratio)))
    g, e, t, r = got.flat[j], ref.flat[j], tol.flat[j], ratio.flat[j]
    text = f"got {g!r}, expected {e!r}, |err| {err.flat[j]:.3g} > tol {t:.3g}"
    return (float(r) if not np.isnan(r) else math.inf), float(err.max()), text, j


def compare_codes(out, ref, fmt):
    """(worst distance in units in the last place, where, what) between low-precision or integer outputs.

    `fmt` "exact" wants equal integers (distance inf otherwise); a hal.formats name compares codes by
    how many representable values lie between them (packed 4-bit outputs are unpacked first; "e8m0"
    scale codes count powers of two); NaN must meet NaN."""
    from .. import formats as F

    if out.size == 0:
        return 0.0, (), ""
    if fmt == "exact":
        bad = out.astype(np.int64) != ref.astype(np.int64)
        if not bad.any():
            return 0.0, (), ""
        j = tuple(int(x) for x in np.argwhere(bad)[0])
        return math.inf, j, f"{int(bad.sum())} of {out.size} differ; got {out[j]!r}, expected {ref[j]!r}"
    if fmt == "e8m0":
        o, r = out.astype(np.int64), ref.astype(np.int64)
        o_nan, r_nan = o == 0xFF, r == 0xFF
    else:
        if F.FORMATS[fmt].packed:
            out, ref = F.unpack_nibbles(out), F.unpack_nibbles(ref)
        o, r = F.ordinal(out, fmt), F.ordinal(ref, fmt)
        if F.FORMATS[fmt].is_float:  # NaN-ness per code from a table: no float64 copy of the outputs
            nan = np.isnan(F.decode(np.arange(1 << F.FORMATS[fmt].bits, dtype=np.uint8), fmt))
            o_nan, r_nan = (nan[c.view(np.uint8) if c.dtype.itemsize == 1 else c.astype(np.uint8)] for c in (out, ref))
        else:
            o_nan, r_nan = np.isnan(F.decode(out, fmt)), np.isnan(F.decode(ref, fmt))
    if (o_nan != r_nan).any():
        j = tuple(int(x) for x in np.argwhere(o_nan != r_nan)[0])
        return math.inf, j, f"NaN mismatch ({int((o_nan != r_nan).sum())} elements): got code {int(o[j])}, expected {int(r[j])}"
    dist = np.where(o_nan, 0, np.abs(o - r))
    j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(dist[j]), tuple(int(x) for x in j), f"{int(dist[j])} ulp of {fmt} apart (ordinal {int(o[j])} vs {int(r[j])}); at most 1 allowed"


def run(case):
    """Run one case on its backend and judge it."""
    op, args = case.op, case.sample.args
    if case.kind == "error":
        return _run_error(case, lambda: op(**args))
    before = _snapshot(args)
    out = _poisoned_out(op, args) if case.kind == "ordinary" else None
    outs, seconds = _run_call(case, lambda: op(**args, out=out))
    if isinstance(outs, Result):
        return outs
    outs = outs if isinstance(outs, tuple) else (outs,)
    expected = out if isinstance(out, tuple) else (out,)
    if out is not None and (len(outs) != len(expected) or any(y is not o for y, o in zip(outs, expected))):
        return Result(case, "fail", "a call with out= did not return the out arrays themselves")
    for k, v in before.items():
        if not np.array_equal(v, args[k], equal_nan=True):
            return Result(case, "fail", f"the kernel modified its input '{k}'")
    worst, _, message = judge(op, args, outs)
    return Result(case, "pass" if worst <= 1.0 else "fail", message, worst, seconds)


def _poisoned_out(op, args):
    """NaN-filled (random bits for integers) out= arrays for the call on `args`: ordinary samples run
    with them, so the kernels must overwrite the caller's memory in full (or the backend copy into it)."""
    shapes = op.outputs(op.validate(op.bind((), args)))
    out = tuple(_HOST.poisoned(shape, dtype) for shape, dtype in shapes)
    return out if len(out) > 1 else out[0]


_HOST = Backend()  # the default memory handling: NumPy arrays


def _run_call(case, call):
    """(outputs, seconds) of `call()` on the case's backend with poisoned output buffers, or (a Result, 0)
    when it cannot run there or raises."""
    start = time.perf_counter()
    try:
        with scoped(case.backend, fallback="error"), poisoned_outputs():
            outs = call()
    except (KernelNotFound, BackendUnavailable) as exc:
        return Result(case, "unsupported", str(exc)), 0.0
    except Exception as exc:
        return Result(case, "fail", f"raised {type(exc).__name__}: {exc}"), 0.0
    return outs, time.perf_counter() - start


def _run_error(case, call, also=None):
    """An error sample: `call()` must raise the sample's error with its text (or an error `also` accepts)."""
    expected = case.sample.error
    try:
        with scoped(case.backend, fallback="error"):
            call()
    except expected as exc:
        ok = case.sample.match.lower() in str(exc).lower()
        return Result(case, "pass" if ok else "fail", "" if ok else f"{type(exc).__name__} without {case.sample.match!r}: {exc}")
    except Exception as exc:  # the wrong error is a failure, not a crash of the suite
        if also is not None and also(exc):
            return Result(case, "pass")
        return Result(case, "fail", f"raised {type(exc).__name__} instead of {expected.__name__}: {exc}")
    return Result(case, "fail", f"no error raised; expected {expected.__name__}")


def run_torch(case):
    """Run one case through its torch operator, torch.ops.hal.<op> (hal.torch), on torch CPU tensors.

    An error sample must raise its error there too (or torch's own argument-type error, which names the
    op and argument, for a value the schema cannot hold). Any other sample goes through
    torch.library.opcheck (schema and aliasing, fake implementation, tracing with dynamic shapes),
    and the operator's results are judged against the reference like `run`'s. Two opcheck tests are
    left out where torch cannot judge: the mutation check on fp8 inputs (its CPU build has no fp8
    allclose) and eager against traced on outputs with NaN (it compares without equal_nan)."""
    import torch

    from ..arrays import from_host, to_host
    from ..torch import library

    op = case.op
    torch_op = getattr(torch.ops.hal, op.name)
    like = torch.empty(0)
    args = {k: from_host(v, like) if isinstance(v, np.ndarray) else v for k, v in case.sample.args.items()}
    if case.kind == "error":
        return _run_error(case, lambda: torch_op(**args),
                          also=lambda exc: type(exc) is RuntimeError and str(exc).startswith(f"hal::{op.name}() Expected a value of type"))
    outs, seconds = _run_call(case, lambda: torch_op(**args))
    if isinstance(outs, Result):
        return outs
    outs = [to_host(y) for y in (outs if isinstance(outs, (tuple, list)) else [outs])]
    tests = set(library.OPCHECK_TESTS)
    if any(name_of(v.dtype).startswith("float8") for v in case.sample.args.values() if isinstance(v, np.ndarray)):
        tests.discard("test_schema")
    if any(np.isnan(y.astype(np.float32)).any() for y in outs if y.dtype.kind == "f" or name_of(y.dtype).startswith(("bfloat", "float8"))):
        tests.discard("test_aot_dispatch_dynamic")
    try:
        with scoped(case.backend, fallback="error"):
            torch.library.opcheck(torch_op.default, (), args, test_utils=sorted(tests))
    except Exception as exc:
        return Result(case, "fail", f"torch.library.opcheck: {exc.__cause__ or exc}")
    worst, _, message = judge(op, case.sample.args, tuple(outs))
    return Result(case, "pass" if worst <= 1.0 else "fail", message, worst, seconds)


def judge(op, args, outs):
    """(worst error/tolerance, largest |error|, message) of an op's outputs against its float64 reference on `args`."""
    normalized = op.validate(op.bind((), args))  # dim >= 0, rotary_dim filled in, ...
    a64 = as_float64(normalized)
    refs = op.reference(a64)
    mags = op.magnitude(a64, refs) if op.magnitude else [np.abs(r) for r in refs]
    naive = op.naive(normalized, name_of(outs[0].dtype)) if op.naive else None
    return compare(op, a64, outs, refs, mags, naive)


def evaluate_candidate(backend, op, path, seed=None):
    """Run a kernel source that is not registered through the conformance suite and time it.

    The plugin that owns `backend` builds the candidate (hook `hal_candidate_kernel`); it is
    registered under a temporary backend `BACKEND+candidate` sharing the backend's memory handling.
    Returns (results, timings) with timings in seconds on the op's largest ordinary sample for the
    candidate, the registered kernel and the float64 NumPy reference."""
    import copy

    from ..bench import median_time
    from ..registry import candidate_kernel, hookimpl, register_plugin, unregister_plugin

    reg = registry()
    original = reg.entry(backend).backend
    fn = candidate_kernel(backend, op, path)
    if fn is None:
        raise BackendUnavailable(f"no installed plugin builds candidate kernels for backend {backend!r}")
    dtypes = sorted({d for k in reg.kernels.get((op.name, backend), []) for d in k.dtypes}) or ["float32"]
    stand_in = copy.copy(original)
    stand_in.name = f"{backend}+candidate"

    class Candidate:
        @hookimpl
        def hal_register(self, registry):
            registry.add_backend(stand_in)
            registry.add_kernel(op.name, stand_in.name, fn, dtypes=dtypes, source=str(path))

    plugin = f"candidate:{stand_in.name}:{op.name}"
    register_plugin(Candidate(), plugin)
    try:
        suite = cases(stand_in.name, [op.name], seed)
        results = [run(c) for c in suite]
        samples = [c.sample.args for c in suite if c.kind == "ordinary" and c.dtype == dtypes[0]]
        largest = max(samples, key=lambda a: sum(v.nbytes for v in a.values() if isinstance(v, np.ndarray)))
        timings = {}
        with poisoned_outputs():
            for label, name in (("candidate", stand_in.name), ("registered", backend)):
                try:
                    timings[label] = median_time(lambda: op(**largest, backend=name), min_runs=3, min_seconds=0.1)
                except Exception as exc:  # a wrong candidate may crash: its results say why
                    timings[label] = f"{type(exc).__name__}: {exc}"
        wide = as_float64(op.validate(op.bind((), largest)))
        timings["float64 reference"] = median_time(lambda: op.reference(wide), min_runs=3, min_seconds=0.1)
        return results, timings
    finally:
        unregister_plugin(plugin)
