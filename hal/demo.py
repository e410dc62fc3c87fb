"""`hal demo`: a transformer MLP block on one backend, every step checked against float64.

    h, s = rms_norm(x, w_norm, residual=r)           # fused residual add + norm
    g    = gemm(h, w_gate_up)                        # gate and up projections in one GEMM
    a    = silu_and_mul(g)                           # SwiGLU
    y    = gemm(a, w_down, c=s, beta=1.0)            # down projection with the residual epilogue

Each step runs on the selected backend (default: the best available for the inputs), is timed,
and its outputs are compared with the op's float64 reference on the same inputs, using the
conformance suite's tolerance. The exit code is non-zero if any step mismatches.
"""
import time
import warnings

import numpy as np

from . import ops
from .conformance import judge
from .dispatch import explain
from .dtypes import to_numpy
from .errors import FallbackWarning


def _weights(rng, shape, dtype, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(to_numpy(dtype))


def mlp_steps(tokens, hidden, ffn, dtype, rng):
    """The block as a list of (label, op, arguments-builder); each builder takes the previous outputs."""
    x = rng.standard_normal((tokens, hidden)).astype(to_numpy(dtype))
    r = rng.standard_normal((tokens, hidden)).astype(to_numpy(dtype))
    w_norm = (1.0 + 0.1 * rng.standard_normal(hidden)).astype(to_numpy(dtype))
    w_gate_up = _weights(rng, (hidden, 2 * ffn), dtype, hidden)
    w_down = _weights(rng, (ffn, hidden), dtype, ffn)
    return [
        ("rms_norm + residual", ops.rms_norm, lambda o: dict(x=x, weight=w_norm, residual=r, eps=1e-6)),
        ("gate/up gemm", ops.gemm, lambda o: dict(a=o[0][0], b=w_gate_up)),
        ("silu_and_mul", ops.silu_and_mul, lambda o: dict(x=o[1][0])),
        ("down gemm + residual", ops.gemm, lambda o: dict(a=o[2][0], b=w_down, c=o[0][1], beta=1.0)),
    ]


def run(backend=None, dtype="bfloat16", tokens=512, hidden=2048, ffn=5632, repeats=3, seed=None):
    """Run the block; returns rows of (step, op, backend, ms, max |err|, err/tol, fallback)."""
    rng = np.random.default_rng(seed)
    outputs, rows = [], []
    for label, op, build in mlp_steps(tokens, hidden, ffn, dtype, rng):
        args = op.validate(op.bind((), build(outputs)))
        asked, ran_on, reason = explain(op, args, backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # shown in the table instead
            out = op(**args, backend=backend)  # first call: compiles or loads the kernel
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = op(**args, backend=backend)
                times.append(time.perf_counter() - start)
        outs = out if isinstance(out, tuple) else (out,)
        ratio, max_err, message = judge(op, args, outs)
        rows.append({
            "step": label, "op": op.name, "backend": ran_on or asked, "ms": 1e3 * min(times),
            "max_abs_err": max_err, "err_over_tol": ratio, "ok": ratio <= 1.0, "message": message,
            "fallback": "" if reason is None else f"{asked} -> {ran_on}: {reason}",
        })
        outputs.append(outs)
    return rows
