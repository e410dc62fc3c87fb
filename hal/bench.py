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
    peer = None
    if vs_torch:
        from .opdef import as_torch

        peer = op.torch_peer(as_torch(op.validate(op.bind((), args))))  # rotary_dim filled in, dim made non-negative, ...
    return {"op": op.name, **bench_pair(lambda: op(**args, backend=backend), peer, *op.cost(args)), "dtype": dtype, "backend": backend or "auto"}


def bench_pair(hal_fn, torch_fn, flops, nbytes):
    """Median times of a hal callable (and its torch peer), with throughput and % of the roofline:
    TFLOP/s of the fp32 GEMM peak when the work is above the machine balance, else GB/s of the copy bandwidth."""
    seconds = median_time(hal_fn)
    peak = roofline()
    row = {"ms": seconds * 1e3}
    if flops / max(nbytes, 1) > peak["gemm_tflops"] * 1e3 / peak["bandwidth_gbs"]:
        row["throughput"] = f"{flops / seconds / 1e12:.3f} TFLOP/s"
        row["roofline_pct"] = 100 * flops / seconds / 1e12 / peak["gemm_tflops"]
    else:
        row["throughput"] = f"{nbytes / seconds / 1e9:.1f} GB/s"
        row["roofline_pct"] = 100 * nbytes / seconds / 1e9 / peak["bandwidth_gbs"]
    if torch_fn is not None:
        torch_seconds = median_time(torch_fn)
        row["torch_ms"] = torch_seconds * 1e3
        row["speedup_vs_torch"] = torch_seconds / seconds
    return row


def comparison_table(rows, title):
    """A rich table of bench rows (with a "shape" label each) against torch, titled with the roofline."""
    from rich.table import Table

    peak = roofline()
    table = Table(title=f"{title} (this machine: {peak['bandwidth_gbs']:.1f} GB/s copy, {peak['gemm_tflops']:.3f} TFLOP/s fp32 BLAS)")
    for col in ("op / shape", "dtype", "hal ms", "torch ms", "torch/hal", "hal throughput", "% roofline"):
        table.add_column(col, justify="left" if col == "op / shape" else "right")
    for r in rows:
        ratio = r["speedup_vs_torch"]
        table.add_row(r["shape"], r["dtype"], f"{r['ms']:.3f}", f"{r['torch_ms']:.3f}",
                      f"[{'green' if ratio >= 1 else 'red'}]{ratio:.2f}x[/]", r["throughput"], f"{r['roofline_pct']:.0f}%")
    return table
