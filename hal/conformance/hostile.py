"""The hostile suite: bad input as a careless or hostile user passes it, derived from the op definitions.

For every op and dtype a backend has kernels for, it takes the op's smallest ordinary sample (and the
smallest with each optional tensor, so that those are covered too) and derives variants in each of the
CATEGORIES below (from the op's Tensor and Attr entries: dtypes, ranks, attribute kinds), runs them on
the backend in a worker subprocess and classifies each outcome as one of OUTCOMES. A crash
kills the worker, never the runner: the case is recorded and a fresh worker takes the next one.

Variants are generated deterministically from a seed (nothing random at run time, no hypothesis needed by
vendors), so a case is (backend, seed, op, index) and `hal check BACKEND --hostile --op OP --seed S --case I`
reruns one. `hal check BACKEND --hostile` and `pytest --pyargs hal.conformance --hal-hostile` run it;
docs/errors.md says what each op must reject.
"""
import json
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from itertools import zip_longest

import numpy as np

CATEGORIES = {
    "dtype": "a dtype the argument does not allow",
    "byteswap": "an allowed dtype in the non-native byte order",
    "rank": "one dimension more or one fewer",
    "shape": "one dimension one longer or one shorter than the other arguments imply",
    "zero-size": "a dimension of length 0",
    "huge-dim": "a dimension of 2**31 (a stride-0 view: no memory behind it)",
    "index": "index values negative, past the end, huge or past 2**32 (NumPy and torch)",
    "attr": "attributes None, of the wrong type, strings for bools, floats for ints, out of range, non-finite, 2**31",
    "nan-inf": "NaN or +-Inf in one element",
    "meta": "torch meta tensors",
    "mix": "torch and NumPy arrays in one call",
    "view": "non-contiguous, negative-stride, Fortran-order, read-only, unaligned and strided torch views",
}

OUTCOMES = ("ok-HalError", "ok-result", "crash", "silently-wrong", "other-exception", "rejected-valid")
FAILURES = ("crash", "silently-wrong", "other-exception", "rejected-valid")
# ok-HalError      a hal.HalError naming the op (and, for the categories in NAMED, the argument)
# ok-result        a result within the conformance tolerance of the float64 reference
# crash            the worker died (signal, abort, exit) or hung past the case timeout
# silently-wrong   a result off the reference, or any result for input that must be rejected
# other-exception  any other exception, or a HalError that does not name the op and argument
# rejected-valid   a HalError for valid input (views, torch/NumPy mixes)

NAMED = ("dtype", "byteswap", "rank", "index", "attr")  # a variant changes one argument: the error names it

HUGE = 10_000_000
WORKER_MEMORY = 8 << 30  # a worker allocating more gets MemoryError, not the machine's memory


@dataclass
class Variant:
    """One hostile call. `expect`: "reject" (only a HalError is right), "accept" (only the reference's
    result is), "any" (either). `same` holds the same arguments as NumPy arrays, for the reference."""

    op: str
    category: str
    label: str
    expect: str
    arg: str
    args: dict
    same: dict


def _torch(x, device="cpu"):
    import torch

    from ..arrays import from_host

    if device == "meta":
        return torch.empty(x.shape, dtype=getattr(torch, x.dtype.name), device="meta")
    return from_host(np.ascontiguousarray(x), torch.empty(0))


def _is_float(x):
    return x.dtype.kind == "f" or x.dtype.name.startswith(("bfloat", "float8"))


def _views(x):
    """(label, view with the values of x) for the layouts a caller may pass (x has rank >= 1)."""
    from ..opdef import strided

    out = [("non-contiguous", strided(x)), ("torch non-contiguous", _torch_strided(x)),
           ("negative stride", np.flip(np.flip(x, 0).copy(), 0))]
    if x.ndim >= 2:
        out.append(("Fortran order", np.asfortranarray(x)))
    frozen = x.copy()
    frozen.flags.writeable = False
    out.append(("read-only", frozen))
    if x.dtype.itemsize > 1:
        unaligned = np.empty(x.nbytes + 1, np.uint8)[1:].view(x.dtype).reshape(x.shape)
        unaligned[...] = x
        out.append(("unaligned", unaligned))
    return out


def _torch_strided(x):
    from ..opdef import strided

    big = _torch(strided(x).base)  # the twice-longer array, then every other element as a torch view
    index = [slice(None)] * x.ndim
    index[-1] = slice(None, None, 2)
    return big[tuple(index)]


def _attr_values(p):
    """(label, value, expect) for an attribute, from its kind and choices."""
    out = [] if p.default is None else [("None", None, "reject")]
    if p.choices is not None:
        return out + [("not a choice", "bogus", "reject"), ("upper case", str(p.choices[-1]).upper(), "reject"),
                      ("an int", 1, "reject"), ("a list", [p.choices[-1]], "reject")]
    if p.kind is bool:
        return out + [("'False'", "False", "reject"), ("'no'", "no", "reject"), ("2", 2, "reject"),
                      ("a list", [True], "reject"), ("np.bool_", np.bool_(not p.default), "accept")]
    if p.kind is int:
        return out + [("2.5", 2.5, "reject"), ("'2'", "2", "reject"), ("inf", float("inf"), "reject"),
                      ("nan", float("nan"), "reject"), ("True", True, "reject"), ("a list", [2], "reject"),
                      ("-1", -1, "any"), ("0", 0, "any"), ("2**31", 2**31, "any"), ("2**63", 2**63, "any"),
                      ("np.int64(3)", np.int64(3), "any"), ("2.0", 2.0, "any")]
    if p.kind is float:
        return out + [("'1.0'", "1.0", "reject"), ("1j", 1j, "reject"), ("a list", [1.0], "reject"),
                      ("nan", float("nan"), "any"), ("inf", float("inf"), "any"), ("-inf", float("-inf"), "any"),
                      ("10**400", 10**400, "any"), ("1e30", 1e30, "any"), ("0.0", 0.0, "any"), ("-1.0", -1.0, "any"),
                      ("np.float32(0.5)", np.float32(0.5), "any")]
    return out


def op_variants(op, backend, seed):
    """([base sample per dtype], [Variant]): the variants of `op` in every dtype `backend` has kernels for,
    in a fixed order for a seed (a case is an index into the list)."""
    from ..registry import registry

    dtypes = sorted({d for k in registry().kernels.get((op.name, backend), []) for d in k.dtypes})
    bases = [(dtype, base) for dtype in dtypes for base in _bases(op, dtype, seed)]
    return [base for _, base in bases], [v for dtype, base in bases for v in variants(op, dtype, base)]


def _bases(op, dtype, seed):
    """The smallest ordinary sample, and the smallest one (ordinary first) with each optional tensor the
    others lack."""
    rng = np.random.default_rng([seed, zlib.crc32(op.name.encode())])
    samples = sorted(op.samples(rng, dtype), key=lambda s: (s.kind != "ordinary", sum(v.nbytes for v in s.args.values() if isinstance(v, np.ndarray))))
    samples = [s.args for s in samples]
    bases = samples[:1]
    for t in op.tensors:
        if t.optional and not any(isinstance(b.get(t.name), np.ndarray) for b in bases):
            bases += [a for a in samples if isinstance(a.get(t.name), np.ndarray)][:1]
    return bases


def variants(op, dtype, base):
    """The hostile variants of one valid sample `base` (NumPy arrays in `dtype`), in a fixed order."""
    from ..dtypes import INTS

    out = []
    tensors = [t for t in op.tensors if isinstance(base.get(t.name), np.ndarray)]
    given = "".join(f" +{t.name}" for t in tensors if t.optional)  # which sample: the optional tensors it has

    def add(category, label, expect, arg, value, same=None):
        args = {**base, arg: value} if arg else value
        same = args if same is None else {**base, arg: same} if arg else same
        out.append(Variant(op.name, category, f"{dtype}{given}: {label}", expect, arg, args, same))

    for t in tensors:
        x = base[t.name]
        for d in [d for d in ("float64", "int16", "float32", "int32", "uint8", "bool") if d not in t.dtypes][:2]:
            with np.errstate(invalid="ignore"):  # NaN in a sample has no int value: any will do
                add("dtype", f"{t.name} as {d}", "reject", t.name, x.astype(d))
        if x.dtype.kind in "iuf" and x.dtype.itemsize > 1:
            add("byteswap", f"{t.name} as {x.dtype.newbyteorder().str}", "any", t.name, x.astype(x.dtype.newbyteorder()))
        add("rank", f"{t.name} with a leading 1", "reject" if t.rank is not None else "any", t.name, x[None])
        if x.ndim and x.shape[0]:
            fewer = "reject" if t.rank is not None or x.ndim - 1 < t.min_rank else "any"
            add("rank", f"{t.name}[0] (rank {x.ndim - 1})", fewer, t.name, x[0])
        for axis in range(x.ndim):
            n = x.shape[axis]
            if n:
                add("shape", f"{t.name} axis {axis} {n}->{n + 1}", "any", t.name, np.concatenate([x, x.take([n - 1], axis)], axis))
                add("zero-size", f"{t.name} axis {axis} {n}->0", "any", t.name, x.take([], axis))
            if n > 1:
                add("shape", f"{t.name} axis {axis} {n}->{n - 1}", "any", t.name, x.take(range(n - 1), axis))
        if x.size:
            huge = np.broadcast_to(x[:1], (2**31,) + x.shape[1:])  # stride 0 along axis 0, read-only
            add("huge-dim", f"{t.name} axis 0 -> 2**31", "reject", t.name, huge)
        if set(t.dtypes) <= set(INTS) and x.size:
            for where in sorted({0, x.size - 1 if x.ndim == 1 else 0}):  # both ends of offsets, the first entry of a table
                bad = [("-1", -1), ("-5", -5), (str(HUGE), HUGE), ("2**31-1", 2**31 - 1)]
                if x.dtype == np.int64:
                    bad.append(("2**32 + the value", 2**32 + int(x.flat[where])))
                for label, value in bad:
                    y = x.copy()
                    y.flat[where] = value
                    add("index", f"{t.name}.flat[{where}] = {label}", "any", t.name, y)
                    if label in ("-1", str(HUGE)):
                        add("index", f"{t.name}.flat[{where}] = {label} (torch)", "any", t.name, _torch(y), y)
        if _is_float(x) and x.size:
            for label, value in (("NaN", np.nan), ("+Inf", np.inf), ("-Inf", -np.inf)):
                y = x.copy()
                y.flat[x.size // 2] = value
                add("nan-inf", f"{t.name}.flat[{x.size // 2}] = {label}", "any", t.name, y)  # some scales must be finite
        add("mix", f"{t.name} as a torch tensor", "accept", t.name, _torch(x), x)
        for label, y in _views(x):
            add("view", f"{t.name} {label}", "accept", t.name, y, x)
    add("meta", "every tensor on torch's meta device", "reject", None,
        {**base, **{t.name: _torch(base[t.name], "meta") for t in tensors}}, base)
    add("meta", f"{tensors[0].name} on torch's meta device", "reject", tensors[0].name, _torch(base[tensors[0].name], "meta"))
    add("mix", "every tensor a torch tensor", "accept", None, {**base, **{t.name: _torch(base[t.name]) for t in tensors}}, base)
    for p in op.attrs:
        for label, value, expect in _attr_values(p):
            add("attr", f"{p.name}={label}", expect, p.name, value)
    return out


def outcome(op, v, backend):
    """(outcome, message) of running variant `v` on `backend` in this process."""
    from ..arrays import to_host
    from ..dispatch import poisoned_outputs, scoped
    from ..errors import HalError
    from . import judge

    try:
        with scoped(backend, fallback="error"), poisoned_outputs():
            outs = op(**v.args)
    except HalError as exc:
        text = f"{type(exc).__name__}: {exc}"
        unnamed = [n for n in (op.name, v.arg if v.category in NAMED else None) if n and n not in str(exc)]
        if unnamed:
            return "other-exception", f"does not name {' or '.join(unnamed)}: {text}"
        return ("rejected-valid" if v.expect == "accept" else "ok-HalError"), text
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit from a kernel is as wrong as any other
        return "other-exception", f"{type(exc).__name__}: {exc}"
    if v.expect == "reject":
        return "silently-wrong", "returned a result for input that must be rejected"
    outs = tuple(to_host(o) for o in (outs if isinstance(outs, tuple) else (outs,)))
    try:
        worst, _, message = judge(op, v.same, outs)
    except Exception as exc:
        return "silently-wrong", f"returned a result where the reference fails ({type(exc).__name__}: {exc})"
    return ("ok-result", "") if worst <= 1.0 else ("silently-wrong", message)


def worker(backend, seed, fd):
    """The worker loop: read "op index" lines on stdin, write "started" then the outcome as JSON lines to fd."""
    from ..ops import ALL

    resource.setrlimit(resource.RLIMIT_DATA, (WORKER_MEMORY, WORKER_MEMORY))
    warnings.simplefilter("ignore")  # stderr keeps what a dying worker says (abort messages), not overflow warnings
    out = os.fdopen(fd, "w", buffering=1)
    cache = {}
    for line in iter(sys.stdin.readline, ""):
        name, index = line.split()
        op = ALL[name]
        if name not in cache:
            bases, cache[name] = op_variants(op, backend, seed)
            for base in bases:  # compile or load its kernels
                outcome(op, Variant(name, "-", "warm-up", "any", None, base, base), backend)
        out.write("started\n")
        print(f"hostile case {name} {index}", file=sys.stderr, flush=True)  # what was running when a worker dies
        kind, message = outcome(op, cache[name][int(index)], backend)
        out.write(json.dumps([kind, message[:500]]) + "\n")


class _Worker:
    """A worker subprocess and the pipe it answers on."""

    def __init__(self, backend, seed):
        read, write = os.pipe()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from hal.conformance.hostile import worker; worker({backend!r}, {seed}, {write})"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log, pass_fds=(write,), text=True)
        os.close(write)
        self.fd, self.buffer = read, b""

    def ask(self, name, index):
        """Send a case; False when the worker is gone."""
        try:
            self.proc.stdin.write(f"{name} {index}\n")
            self.proc.stdin.flush()
            return True
        except BrokenPipeError:
            return False

    def line(self, timeout):
        """The next line, or None when the worker died or said nothing for `timeout` seconds."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def death(self, timeout):
        """Why the worker stopped answering, killing it if it hangs."""
        try:
            code = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"hung for more than {timeout:.0f} s"
        self.log.seek(0)
        tail = [t for t in self.log.read().decode(errors="replace").splitlines() if t.strip() and not t.startswith("hostile case")]
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return why + (f": {tail[-1][:300]}" if tail else "")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait()
        os.close(self.fd)
        self.log.close()


def plan(backend, ops=None, seed=0, categories=None):
    """[(op name, index, variant)] of a backend, interleaved across ops so that a budget covers all of them."""
    from ..ops import ALL

    per_op = []
    for op in ALL.values():
        if ops and op.name not in ops:
            continue
        per_op.append([(op.name, i, v) for i, v in enumerate(op_variants(op, backend, seed)[1]) if not categories or v.category in categories])
    return [c for round_ in zip_longest(*per_op) for c in round_ if c]


def run(backend, ops=None, seed=0, budget=None, categories=None, only=None, timeout=60.0, progress=None):
    """Run the hostile suite on `backend` (in worker subprocesses) and return a report dict: counts per
    category and outcome, the failures with a reproducer each, and how many cases the budget left out.
    `only` runs one case index (with one op); `progress(done, total)` is called after every case."""
    from ..registry import registry

    reg = registry()
    available, reason = reg.entry(backend).status
    if not available:
        from ..errors import BackendUnavailable

        raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")
    cases = plan(backend, ops, seed, categories)
    if only is not None:
        cases = [c for c in cases if c[1] == only]
    start = time.monotonic()
    counts = {c: Counter() for c in CATEGORIES}
    failures, worker, done = [], None, 0
    try:
        for name, index, v in cases:
            if budget is not None and time.monotonic() - start > budget:
                break
            worker = worker or _Worker(backend, seed)
            line = worker.ask(name, index) and worker.line(600)  # building, loading or compiling the op's kernels
            line = line and worker.line(timeout)
            if line:
                kind, message = json.loads(line)
            else:
                kind, message = "crash", worker.death(timeout)
                worker.close()
                worker = None
            counts[v.category][kind] += 1
            if kind in FAILURES:
                failures.append({"op": name, "case": index, "category": v.category, "variant": v.label, "outcome": kind,
                                 "message": message, "reproduce": f"hal check {backend} --hostile --op {name} --seed {seed} --case {index}"})
            done += 1
            if progress:
                progress(done, len(cases))
    finally:
        if worker:
            worker.close()
    return {"backend": backend, "seed": seed, "cases": done, "left_out": len(cases) - done,
            "seconds": round(time.monotonic() - start, 1),
            "counts": {c: {k: n[k] for k in OUTCOMES} for c, n in counts.items() if sum(n.values())},
            "failures": failures}


def totals(report):
    """{outcome: count} over every category of a report."""
    return {k: sum(n[k] for n in report["counts"].values()) for k in OUTCOMES}
