"""What dispatch costs per call over calling the registered kernel directly (target: <= 5 us).

    python benchmarks/dispatch_overhead.py

Both sides allocate the output; the difference is argument binding, validation, backend and
kernel selection (cached plans) and result wrapping. Tiny inputs make the kernel time negligible.
"""
import timeit

import numpy as np

import hal
from hal.dispatch import select
from hal.dtypes import to_numpy


def per_call(fn, number=20000):
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    w = np.ones(16, np.float32)
    a = rng.standard_normal((4, 4)).astype(np.float32)
    cases = {
        "silu_and_mul": (hal.ops.silu_and_mul, {"x": x}),
        "rms_norm": (hal.ops.rms_norm, {"x": x, "weight": w, "eps": 1e-6}),
        "gemm +bias +relu": (hal.ops.gemm, {"a": a, "b": a, "bias": w[:4], "activation": "relu"}),
    }
    print(f"{'op':18} {'direct us':>10} {'hal.ops us':>11} {'overhead us':>12}")
    for name, (op, args) in cases.items():
        bound = op.validate(op.bind((), args))
        kernel, backend = select(op, bound)
        shapes = op.outputs(bound)

        def direct():
            outs = tuple(np.empty(shape, to_numpy(dt)) for shape, dt in shapes)
            kernel.fn(outs, **bound)

        def dispatched():
            op(**args)

        d, h = per_call(direct), per_call(dispatched)
        print(f"{name:18} {d:10.2f} {h:11.2f} {h - d:12.2f}")


if __name__ == "__main__":
    main()
