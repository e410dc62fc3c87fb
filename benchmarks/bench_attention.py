"""The attention family on the CPU backend against PyTorch CPU, in one run.

    python benchmarks/bench_attention.py [--quick] [--seq N ...] [--repeat N] [--only OP ...] [--json FILE]

- attention vs torch.nn.functional.scaled_dot_product_attention (torch's flash-attention CPU
  kernel): GQA 32/8 heads, d 128, seq 4096 and 16384 (or --seq), causal and not, fp32 and bf16;
  ms, torch/hal (torch time / hal time, > 1: hal faster), tokens/s, achieved GFLOP/s. hal and
  torch are timed back to back in each of --repeat rounds; times are medians over the rounds, the
  ratio is the median of the per-round ratios with its min-max (this machine's bandwidth drifts
  by 2x between runs).
- extra memory of one attention call at seq 32768, 8 heads, d 128, measured as peak RSS growth in
  a fresh process (Linux VmHWM, reset before the call; inputs and output excluded), for hal and torch.
- paged_decode_attention at batch 32, context 4096 and 16384 (or --seq), GQA 32/8, d 128, bf16
  queries with a bf16 and an fp8 e4m3fn KV cache (block size 16, blocks shuffled): GB/s of KV cache
  read and its % of the measured read bandwidth (a STREAM-style parallel sum), against torch
  gathering the blocks and running SDPA on the dense cache (ops/attention.py: _paged_peer).
- mla_decode (DeepSeek dims, 128 heads, 8 sequences of 4096): GFLOP/s and % of the measured fp32
  GEMM peak (it is compute-bound: 128 heads share one latent KV head).
"""
import argparse
import json
import subprocess
import sys

import numpy as np
from rich.console import Console
from rich.table import Table

import hal
from hal.bench import format_ratio, interleaved_rounds, positive_int, roofline, rounds_caption
from hal.opdef import as_torch
from hal.ops.attention import _attention_bench, _paged_args

MEMORY_PROBE = """
import sys, numpy as np, hal, torch
from hal.opdef import as_torch
from hal.ops.attention import _dense

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key)) / 1024

small = _dense(np.random.default_rng(1), "float32", 1, 64, 64, 8, 8, 128, causal=False)
hal.ops.attention(**small)  # load the kernels (Numba, LLVM) and warm torch before measuring
torch.nn.functional.scaled_dot_product_attention(*(as_torch(small)[n].transpose(1, 2) for n in ("q", "k", "v")))
args = _dense(np.random.default_rng(0), "float32", 1, 32768, 32768, 8, 8, 128, causal=False)
t = as_torch(args)
q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
out_mb = args["q"].nbytes / 2**20
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
if sys.argv[1] == "hal":
    hal.ops.attention(**args)
else:
    torch.nn.functional.scaled_dot_product_attention(q, k, v)
print(status("VmHWM:") - before - out_mb)
"""


def extra_memory_mb(which):
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, which], capture_output=True, text=True, timeout=3600)
    return float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seq 4096 only, no memory probe")
    parser.add_argument("--seq", type=int, nargs="+", help="attention sequence lengths and decode contexts (default 4096 16384; --quick: 4096)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="interleaved hal/torch rounds per row")
    op_names = ("attention", "paged_decode_attention", "mla_decode")
    parser.add_argument("--only", nargs="+", choices=op_names, default=op_names, help="only these ops' rows (the memory probe goes with attention)")
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    peak = roofline()
    rows = []
    seqs = args.seq or ((4096,) if args.quick else (4096, 16384))
    for seq in seqs if "attention" in args.only else ():
        for causal in (False, True):
            for dtype in ("float32", "bfloat16"):
                a = _attention_bench(rng, dtype, seq, causal)
                runs = dict(min_runs=3, min_seconds=0) if seq <= 4096 else dict(min_runs=1, min_seconds=0, warmup=False)  # compiled at 4096
                timed = interleaved_rounds(lambda: hal.ops.attention(**a, backend="cpu"), hal.ops.attention.torch_peer(as_torch(a)),
                                           args.repeat, **runs)
                ours = timed["hal_s"]
                flops, _ = hal.ops.attention.cost(a)
                rows.append({"case": f"attention seq {seq}{' causal' if causal else ''}", "dtype": dtype, "hal_ms": ours * 1e3,
                             "torch_ms": timed["torch_s"] * 1e3, "ratio": timed["ratio"], "ratio_spread": timed["ratio_spread"],
                             "tokens_per_s": seq / ours, "gflops": flops / ours / 1e9, "peak_pct": 100 * flops / ours / 1e12 / peak["gemm_tflops"]})
    decode = hal.ops.paged_decode_attention
    for ctx in seqs if decode.name in args.only else ():
        for kv in ("bfloat16", "float8_e4m3fn"):
            a = _paged_args(rng, "bfloat16", [ctx] * 32, 32, 8, 128, 16, kv_dtype=kv)
            timed = interleaved_rounds(lambda: decode(**a, backend="cpu"), decode.torch_peer(as_torch(a)), args.repeat, min_runs=3, min_seconds=0)
            ours = timed["hal_s"]
            _, nbytes = decode.cost(a)
            rows.append({"case": f"{decode.name} ctx {ctx} x32", "dtype": f"bfloat16, kv {kv}", "hal_ms": ours * 1e3,
                         "torch_ms": timed["torch_s"] * 1e3, "ratio": timed["ratio"], "ratio_spread": timed["ratio_spread"],
                         "gb_s": nbytes / ours / 1e9, "peak_pct": 100 * nbytes / ours / 1e9 / peak["read_gbs"]})
            del a
    mla = hal.ops.mla_decode
    for dtype in ("float32", "bfloat16") if mla.name in args.only else ():
        a = mla.bench(rng, dtype)
        ours = interleaved_rounds(lambda: mla(**a, backend="cpu"), rounds=args.repeat, min_runs=3, min_seconds=0)["hal_s"]
        flops, nbytes = mla.cost(a)
        rows.append({"case": mla.name, "dtype": dtype, "hal_ms": ours * 1e3, "gflops": flops / ours / 1e9, "gb_s": nbytes / ours / 1e9,
                     "peak_pct": 100 * flops / ours / 1e12 / peak["gemm_tflops"]})
    memory = {} if args.quick or "attention" not in args.only else {"hal_mb": extra_memory_mb("hal"), "torch_mb": extra_memory_mb("torch")}
    table = Table(title=f"attention on cpu vs torch (this machine: {peak['bandwidth_gbs']:.1f} GB/s copy, {peak['read_gbs']:.1f} GB/s read, "
                        f"{peak['gemm_tflops'] * 1e3:.0f} GFLOP/s fp32 GEMM)",
                  caption=rounds_caption(args.repeat) + "; % peak: of the read bandwidth for paged_decode_attention, of the GEMM peak otherwise")
    for col in ("case", "dtype", "hal ms", "torch ms", "torch/hal (min-max)", "tokens/s", "GFLOP/s", "KV GB/s", "% peak"):
        table.add_column(col, justify="left" if col == "case" else "right", no_wrap=col.startswith("torch/hal"))
    for r in rows:
        table.add_row(r["case"], r["dtype"], f"{r['hal_ms']:.1f}", f"{r['torch_ms']:.1f}" if "torch_ms" in r else "",
                      format_ratio(r["ratio"], r["ratio_spread"]) if "ratio" in r else "", f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "",
                      f"{r['gflops']:.1f}" if "gflops" in r else "", f"{r['gb_s']:.1f}" if "gb_s" in r else "", f"{r['peak_pct']:.0f}%")
    Console().print(table)
    if memory:
        print(f"extra memory of one call at seq 32768, 8 heads, d 128 (fp32): hal {memory['hal_mb']:.0f} MB, torch {memory['torch_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "memory": memory, "roofline": peak, "rounds": args.repeat}, f, indent=2)


if __name__ == "__main__":
    main()
