"""Timing ops against this machine's roofline and against PyTorch, in the same run.

The roofline is measured, not looked up: memory bandwidth with a STREAM-style parallel copy
(bytes read + written) and a parallel read (a sum), compute with an fp32 BLAS GEMM. An op whose
arithmetic intensity is above the machine balance is reported in TFLOP/s against the GEMM peak,
otherwise in GB/s against the copy bandwidth.

Against torch, hal and its peer are timed in interleaved rounds (hal, torch, hal, torch, ...): this
machine's bandwidth varies by 2x between runs, and a drift then hits both sides of a round alike.
A ratio is reported as the median of the per-round ratios with their min-max.
"""
import argparse
import statistics
import time
from functools import lru_cache

import numpy as np


def median_time(fn, min_seconds=0.3, min_runs=5, max_runs=200, sync=None, warmup=True, max_seconds=10.0):
    """Median wall time of fn() over repeated runs, after one warm-up call; `sync` waits for a device. Runs stop
    at `max_seconds` even short of `min_runs` (a peer without a fast path for a dtype: torch's bfloat16 matmul
    on a CPU without AVX512-BF16 ran single-threaded, 55 s for 2048^3)."""
    sync = sync or (lambda: None)
    if warmup:
        fn()
        sync()
    times = []
    total = 0.0
    while not times or (len(times) < min_runs or (total < min_seconds and len(times) < max_runs)) and total < max_seconds:
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return statistics.median(times)


@lru_cache(maxsize=None)
def roofline():
    """{'bandwidth_gbs': STREAM copy GB/s, 'read_gbs': STREAM-style read GB/s, 'gemm_tflops': fp32 BLAS GEMM
    TFLOP/s}, measured once per process. The read figure is the ceiling of ops that stream a large input and
    write little (decode attention reads the KV cache): a parallel sum over 1 GiB, past the largest L3 we run on."""
    import numba

    @numba.njit(parallel=True)  # compiled once per process: cheap, and keeps no cache of its own
    def copy(src, dst):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    @numba.njit(parallel=True, fastmath={"reassoc"})  # reassociation: the sum vectorizes into several accumulators
    def read(src):
        total = np.float32(0.0)
        for i in numba.prange(src.size):
            total += src[i]
        return total

    src = np.random.default_rng(0).standard_normal(64 * 2**20 // 4).astype(np.float32)  # 64 MiB, far beyond caches
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / median_time(lambda: copy(src, dst)) / 1e9
    big = np.ones(2**30 // 4, np.float32)
    read_gbs = big.nbytes / median_time(lambda: read(big)) / 1e9
    del big
    n = 2048
    a = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    flops = 2 * n**3 / median_time(lambda: np.matmul(a, a, out=out)) / 1e12
    return {"bandwidth_gbs": bandwidth, "read_gbs": read_gbs, "gemm_tflops": flops}


def positive_int(text):
    """argparse type of counts such as --repeat: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value


def interleaved_rounds(hal_fn, torch_fn=None, rounds=1, warmup=True, **timing):
    """hal_fn and torch_fn timed back to back in each of `rounds` rounds, each time a median_time(**timing) with the
    warm-up in the first round only: {"hal_s", "torch_s": medians over the rounds, "ratio": median torch/hal of the
    rounds, "ratio_spread": (min, max) of them}; only "hal_s" without a torch_fn."""
    fns = (hal_fn,) if torch_fn is None else (hal_fn, torch_fn)
    times = [[] for _ in fns]
    for round_index in range(rounds):
        for fn, fn_times in zip(fns, times):
            fn_times.append(median_time(fn, warmup=warmup and round_index == 0, **timing))
    result = {"hal_s": statistics.median(times[0])}
    if torch_fn is not None:
        ratios = [theirs / ours for ours, theirs in zip(*times)]
        result.update(torch_s=statistics.median(times[1]), ratio=statistics.median(ratios), ratio_spread=(min(ratios), max(ratios)))
    return result


def format_ratio(ratio, spread):
    """'1.23x (1.10-1.41)': the median ratio and its min-max over the rounds."""
    return f"{ratio:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


def rounds_caption(rounds):
    """What the times and ratios of a table over interleaved rounds are."""
    return (f"times: medians of {rounds} interleaved rounds (hal, torch, hal, torch, ...); "
            "torch/hal: torch time / hal time (> 1: hal faster), median of the rounds (min-max)")


def bench_op(op, dtype="float32", backend=None, vs_torch=False, args=None, seed=0, rounds=1):
    """Time one op at its benchmark shape (or `args`): median, throughput, % roofline, ratio vs torch over `rounds`."""
    args = args if args is not None else op.bench(np.random.default_rng(seed), dtype)
    peer = None
    if vs_torch:
        from .opdef import as_torch

        peer = op.torch_peer(as_torch(op.validate(op.bind((), args))))  # rotary_dim filled in, dim made non-negative, ...
    row = bench_pair(lambda: op(**args, backend=backend), peer, *op.cost(args), rounds=rounds)
    return {"op": op.name, **row, "dtype": dtype, "backend": backend or "auto"}


def bench_pair(hal_fn, torch_fn, flops, nbytes, rounds=1):
    """Median times of a hal callable (and its torch peer, interleaved over `rounds`), with throughput and % of the
    roofline: TFLOP/s of the fp32 GEMM peak when the work is above the machine balance, else GB/s of the copy bandwidth."""
    timed = interleaved_rounds(hal_fn, torch_fn, rounds)
    seconds = timed["hal_s"]
    peak = roofline()
    row = {"ms": seconds * 1e3}
    if flops / max(nbytes, 1) > peak["gemm_tflops"] * 1e3 / peak["bandwidth_gbs"]:
        row["throughput"] = f"{flops / seconds / 1e12:.3f} TFLOP/s"
        row["roofline_pct"] = 100 * flops / seconds / 1e12 / peak["gemm_tflops"]
    else:
        row["throughput"] = f"{nbytes / seconds / 1e9:.1f} GB/s"
        row["roofline_pct"] = 100 * nbytes / seconds / 1e9 / peak["bandwidth_gbs"]
    if torch_fn is not None:
        row.update(torch_ms=timed["torch_s"] * 1e3, speedup_vs_torch=timed["ratio"], speedup_spread=timed["ratio_spread"])
    return row


def comparison_table(rows, title, rounds):
    """A rich table of bench rows (with a "shape" label each) against torch over `rounds`, titled with the roofline."""
    from rich.table import Table

    peak = roofline()
    table = Table(title=f"{title} (this machine: {peak['bandwidth_gbs']:.1f} GB/s copy, {peak['read_gbs']:.1f} GB/s read, "
                        f"{peak['gemm_tflops']:.3f} TFLOP/s fp32 BLAS)",
                  caption=rounds_caption(rounds))
    for col in ("op / shape", "dtype", "hal ms", "torch ms", "torch/hal (min-max)", "hal throughput", "% roofline"):
        table.add_column(col, justify="left" if col == "op / shape" else "right", no_wrap=col.startswith("torch/hal"))
    for r in rows:
        ratio = r["speedup_vs_torch"]
        table.add_row(r["shape"], r["dtype"], f"{r['ms']:.3f}", f"{r['torch_ms']:.3f}",
                      f"[{'green' if ratio >= 1 else 'red'}]{format_ratio(ratio, r['speedup_spread'])}[/]", r["throughput"],
                      f"{r['roofline_pct']:.0f}%")
    return table
