"""MoE, quantized GEMMs, quantization and sparse ops on the CPU backend against PyTorch CPU doing
the same work the way a user would without hal, in one run.

    python benchmarks/bench_moe_lowp.py [--quick] [--repeat N] [--only ROW ...] [--json FILE]

The peers: a Python loop over experts (index_select, matmul, silu * mul, index_add with the
routing weights) for the MoE block; dequantize to float then torch.matmul for the quantized
GEMMs; amax / divide / .to(float8) for quantize; torch.nn.functional.embedding_bag and a sparse
CSR tensor for the sparse ops. Shapes are DeepSeek-like, scaled to a 2-core machine: 256 experts,
top-8, hidden 2048, expert dim 1024, 4096 tokens. Ratios are torch time / hal time (> 1: hal faster).
hal and torch are timed back to back in each of N rounds (each a median of repeated calls); times are
medians over the rounds, a ratio is the median of the per-round ratios with its min-max, because
this machine's bandwidth drifts by 2x between runs. --only picks rows: moe_block or op names.
"""
import argparse
import json

import numpy as np
from rich.console import Console

import hal
from hal.bench import bench_op, bench_pair, comparison_table, positive_int
from hal.cli import _default_bench_dtypes
from hal.dtypes import to_numpy

TOKENS, EXPERTS, TOP_K, HIDDEN, EXPERT_DIM = 4096, 256, 8, 2048, 1024


def moe_block_args(rng, dtype, tokens=TOKENS):
    """Activations, router logits and expert weights (nn.Linear layout) of one MoE block."""
    def w(shape, fan_in):
        return (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(to_numpy(dtype))

    return {"x": w((tokens, HIDDEN), 1), "logits": rng.standard_normal((tokens, EXPERTS), np.float32),
            "w13": w((EXPERTS, 2 * EXPERT_DIM, HIDDEN), HIDDEN), "w2": w((EXPERTS, HIDDEN, EXPERT_DIM), EXPERT_DIM)}


def hal_moe_block(a):
    """route -> align (block_m 1: the CPU kernels need no padded tiles) -> permute -> up + silu_and_mul -> down -> unpermute."""
    ops = hal.ops

    def run():
        weights, ids = ops.moe_route(a["logits"], TOP_K, backend="cpu")
        sorted_ids, _, offsets, _ = ops.moe_align(ids, EXPERTS, 1, backend="cpu")
        xs = ops.moe_permute(a["x"], ids, sorted_ids, backend="cpu")
        h = ops.grouped_gemm(xs, a["w13"], offsets, activation="silu_and_mul", backend="cpu")
        y = ops.grouped_gemm(h, a["w2"], offsets, backend="cpu")
        return ops.moe_unpermute(y, sorted_ids, weights, backend="cpu")

    return run


def torch_moe_block(a):
    """The same block as a PyTorch user writes it without fused MoE kernels."""
    import torch
    import torch.nn.functional as F

    from hal.opdef import as_torch

    t = as_torch(a)
    x, w13, w2 = t["x"], t["w13"], t["w2"]

    def run():
        weights, ids = torch.softmax(t["logits"], dim=-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in range(EXPERTS):
            token, slot = (ids == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = x.index_select(0, token) @ w13[e].T
            y = (F.silu(h[:, :EXPERT_DIM]) * h[:, EXPERT_DIM:]) @ w2[e].T
            out.index_add_(0, token, y.float() * weights[token, slot, None])
        return out.to(x.dtype)

    return run


def moe_cost(a):
    pairs = a["x"].shape[0] * TOP_K
    flops = 2 * pairs * (HIDDEN * 2 * EXPERT_DIM + EXPERT_DIM * HIDDEN)
    return flops, a["w13"].nbytes + a["w2"].nbytes + 2 * a["x"].nbytes


# Ops benchmarked at their own OpDef `bench` shapes (see ops/qgemm.py, ops/quant.py, ops/sparse.py, ops/moe.py).
OP_ROWS = ("grouped_gemm", "fp8_gemm_blockscale", "fp8_grouped_gemm_blockscale", "int8_gemm", "w4a16_gemm", "fp4_gemm",
           "quantize", "dequantize", "embedding_bag", "spmm_csr")
TORCH_DTYPES = {"spmm_csr": ("float32",)}  # torch CPU has no half-precision sparse CSR matmul


def shapes(op, args):
    """'a 4096x2048, b 2048x2048, ...': the tensor arguments' shapes and the attributes that change the work."""
    tensors = [f"{t.name} {'x'.join(map(str, args[t.name].shape))}" for t in op.tensors if args.get(t.name) is not None]
    attrs = [f"{p.name}={args[p.name]}" for p in op.attrs if args.get(p.name) not in (None, p.default)]
    return ", ".join(tensors[:2] + attrs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens in the MoE block, first dtype of each op only")
    parser.add_argument("--repeat", type=positive_int, default=3, help="interleaved hal/torch rounds per row")
    parser.add_argument("--only", nargs="+", choices=("moe_block", *OP_ROWS), default=("moe_block", *OP_ROWS), help="only these rows")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    tokens = 1024 if args.quick else TOKENS
    moe_dtypes = ("float32",) if args.quick else ("float32", "bfloat16")
    for dtype in moe_dtypes if "moe_block" in args.only else ():
        a = moe_block_args(rng, dtype, tokens)
        label = f"MoE block {tokens} tok, {EXPERTS} experts top-{TOP_K}, {HIDDEN}->{EXPERT_DIM}"
        rows.append({"shape": label, "dtype": dtype, **bench_pair(hal_moe_block(a), torch_moe_block(a), *moe_cost(a), rounds=args.repeat)})
        del a
    for name in (name for name in OP_ROWS if name in args.only):
        op = hal.ops.ALL[name]
        for dtype in TORCH_DTYPES.get(name, _default_bench_dtypes(op))[: 1 if args.quick else None]:
            op_args = op.bench(rng, dtype)
            rows.append({"shape": f"{name} {shapes(op, op_args)}", **bench_op(op, dtype, "cpu", vs_torch=True, args=op_args, rounds=args.repeat)})
    Console().print(comparison_table(rows, f"hal cpu vs torch {__import__('torch').__version__}: MoE, low precision, sparse", args.repeat))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
