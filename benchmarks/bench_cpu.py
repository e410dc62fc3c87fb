"""Every op on the CPU backend against the same computation in PyTorch CPU, in one run.

    python benchmarks/bench_cpu.py [--quick] [--repeat N] [--only OP ...] [--json FILE]

Prints per op, dtype and shape: ms for hal and torch, the ratio (torch time / hal time, so > 1
means hal is faster), achieved GB/s or TFLOP/s and the fraction of this machine's roofline,
measured in the same run (a STREAM-style parallel copy, an fp32 BLAS GEMM). hal and torch are
timed back to back in each of N rounds (each a median of repeated calls); times are medians over
the rounds, the ratio is the median of the per-round ratios with its min-max, because this
machine's bandwidth drifts by 2x between runs.
"""
import argparse
import json

import numpy as np
from rich.console import Console

import hal
from hal.bench import bench_op, comparison_table, positive_int, roofline
from hal.ops.linear import _bench as gemm_args

SHAPES = {
    # name: (op, builder(rng, dtype) or None for the op's own benchmark shape, dtypes)
    "rms_norm 4096x4096": (hal.ops.rms_norm, None, ("float32", "bfloat16")),
    "layer_norm 4096x4096": (hal.ops.layer_norm, None, ("float32", "bfloat16")),
    "softmax 4096x4096": (hal.ops.softmax, None, ("float32", "bfloat16")),
    "silu_and_mul 4096x(2x5632)": (hal.ops.silu_and_mul, None, ("float32", "bfloat16")),
    "rope 4096 tok, 32/8 heads, d128": (hal.ops.rope, None, ("float32", "bfloat16")),
    "gemm 2048^3": (hal.ops.gemm, None, ("float32", "bfloat16")),
    "gemm 4096^3": (hal.ops.gemm, lambda rng, dt: gemm_args(rng, dt, 4096, 4096, 4096), ("float32", "bfloat16")),
    "gemm 1024^3 +silu": (hal.ops.gemm, lambda rng, dt: gemm_args(rng, dt, 1024, 1024, 1024, activation="silu"), ("float32",)),
    "gemm 2048^3 +gelu_tanh": (hal.ops.gemm, lambda rng, dt: gemm_args(rng, dt, activation="gelu_tanh"), ("float32",)),
    "gemm MLP up 1024x4096x14336 +silu": (hal.ops.gemm, lambda rng, dt: gemm_args(rng, dt, 1024, 4096, 14336, activation="silu"), ("float32", "bfloat16")),
    "gemm MLP down 1024x14336x4096": (hal.ops.gemm, lambda rng, dt: gemm_args(rng, dt, 1024, 14336, 4096), ("float32", "bfloat16")),
    "gemm decode 16x4096x4096": (hal.ops.gemm, lambda rng, dt: gemm_args(rng, dt, 16, 4096, 4096), ("bfloat16",)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the first dtype of each row")
    parser.add_argument("--repeat", type=positive_int, default=3, help="interleaved hal/torch rounds per row")
    op_names = sorted({op.name for op, _, _ in SHAPES.values()})
    parser.add_argument("--only", nargs="+", choices=op_names, default=op_names, help="only these ops' rows")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    peak = roofline()
    rows = []
    for label, (op, build, dtypes) in SHAPES.items():
        if op.name not in args.only:
            continue
        for dtype in dtypes[:1] if args.quick else dtypes:
            op_args = build(rng, dtype) if build else op.bench(rng, dtype)
            rows.append({"shape": label, **bench_op(op, dtype, "cpu", vs_torch=True, args=op_args, rounds=args.repeat)})
    Console().print(comparison_table(rows, f"hal cpu vs torch {__import__('torch').__version__}", args.repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"roofline": peak, "rounds": args.repeat, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
