"""Every op on a real GPU backend against torch on the same device (cuBLAS for gemm, torch's own
norms and pointwise kernels), for anyone with a GPU; elsewhere it says why it cannot run.

    python benchmarks/bench_gpu.py [--backend cuda|rocm]

Prints per op and dtype: median ms of hal and torch, torch/hal, and TFLOP/s or GB/s with the
fraction of this device's peak measured in the same run (a device-to-device copy for bandwidth,
a bf16 torch.matmul at 8192^3 for compute).
"""
import argparse
import sys

import numpy as np

import hal
from hal.bench import median_time
from hal.opdef import as_torch


def device_peaks(torch):
    sync = torch.cuda.synchronize
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / median_time(lambda: dst.copy_(src), sync=sync) / 1e9
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * n**3 / median_time(lambda: a @ a, sync=sync) / 1e12
    return bandwidth, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda", choices=["cuda", "rocm"])
    args = parser.parse_args()
    available, reason = hal.registry().entry(args.backend).status
    if not available:
        print(f"backend {args.backend} is unavailable here: {reason}")
        return 0
    import torch

    sync = torch.cuda.synchronize
    bandwidth, peak = device_peaks(torch)
    print(f"{args.backend} ({hal.registry().entry(args.backend).backend.info()}): {bandwidth:.0f} GB/s copy, {peak:.1f} TFLOP/s bf16 matmul")
    print(f"{'op':14} {'dtype':9} {'hal ms':>9} {'torch ms':>9} {'torch/hal':>9} {'throughput':>16} {'% peak':>7}")
    rng = np.random.default_rng(0)
    for name, op in hal.ops.ALL.items():
        for dtype in ("float32", "bfloat16", "float16"):
            host = op.bench(rng, dtype)
            on_device = as_torch(op.validate(op.bind((), host)), "cuda")
            ours = median_time(lambda: op(**on_device, backend=args.backend), sync=sync)
            theirs = median_time(op.torch_peer(on_device), sync=sync)
            flops, nbytes = op.cost(host)
            if flops / nbytes > peak * 1e3 / bandwidth:
                rate, share = f"{flops / ours / 1e12:.1f} TFLOP/s", flops / ours / 1e12 / peak
            else:
                rate, share = f"{nbytes / ours / 1e9:.0f} GB/s", nbytes / ours / 1e9 / bandwidth
            print(f"{name:14} {dtype:9} {ours * 1e3:9.3f} {theirs * 1e3:9.3f} {theirs / ours:8.2f}x {rate:>16} {100 * share:6.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
