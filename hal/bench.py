"""Timing ops against this machine's roofline and against PyTorch, in the same run.

The roofline is measured, not looked up: memory bandwidth with a STREAM-style parallel copy
(bytes read + written), compute with an fp32 BLAS GEMM. An op whose arithmetic intensity is
above the machine balance is reported in TFLOP/s against the GEMM peak, otherwise in GB/s
against the bandwidth.
"""
import statistics
import time
from functools import lru_cache

import numpy as np


def median_time(fn, min_seconds=0.3, min_runs=5, max_runs=200, sync=None, warmup=True):
    """Median wall time of fn() over repeated runs, after one warm-up call; `sync` waits for a device."""
    sync = sync or (lambda: None)
    if warmup:
        fn()
        sync()
    times = []
    total = 0.0
    while len(times) < min_runs or (total < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return statistics.median(times)


@lru_cache(maxsize=None)
def roofline():
    """{'bandwidth_gbs': STREAM copy GB/s, 'gemm_tflops': fp32 BLAS GEMM TFLOP/s}, measured once per process."""
    import numba

    @numba.njit(parallel=True)  # compiled once per process: cheap, and keeps no cache of its own
    def copy(src, dst):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    src = np.random.default_rng(0).standard_normal(64 * 2**20 // 4).astype(np.float32)  # 64 MiB, far beyond caches
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / median_time(lambda: copy(src, dst)) / 1e9
    n = 2048
    a = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    flops = 2 * n**3 / median_time(lambda: np.matmul(a, a, out=out)) / 1e12
    return {"bandwidth_gbs": bandwidth, "gemm_tflops": flops}


def bench_op(op, dtype="float32", backend=None, vs_torch=False, args=None, seed=0):
    """Time one op at its benchmark shape (or `args`): median, throughput, % roofline, ratio vs torch."""
    args = args if args is not None else op.bench(np.random.default_rng(seed), dtype)
    seconds = median_time(lambda: op(**args, backend=backend))
    flops, nbytes = op.cost(args)
    peak = roofline()
    compute_bound = flops / max(nbytes, 1) > peak["gemm_tflops"] * 1e3 / peak["bandwidth_gbs"]
    row = {"op": op.name, "dtype": dtype, "backend": backend or "auto", "ms": seconds * 1e3}
    if compute_bound:
        row["throughput"] = f"{flops / seconds / 1e12:.3f} TFLOP/s"
        row["roofline_pct"] = 100 * flops / seconds / 1e12 / peak["gemm_tflops"]
    else:
        row["throughput"] = f"{nbytes / seconds / 1e9:.1f} GB/s"
        row["roofline_pct"] = 100 * nbytes / seconds / 1e9 / peak["bandwidth_gbs"]
    if vs_torch:
        from .opdef import as_torch

        normalized = op.validate(op.bind((), args))  # rotary_dim filled in, dim made non-negative, ...
        torch_seconds = median_time(op.torch_peer(as_torch(normalized)))
        row["torch_ms"] = torch_seconds * 1e3
        row["speedup_vs_torch"] = torch_seconds / seconds
    return row
