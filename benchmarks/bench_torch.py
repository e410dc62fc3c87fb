"""A transformers model on hal kernels against stock transformers, on the CPU, in one run.

    python benchmarks/bench_torch.py [--quick] [--repeats N] [--dtypes bfloat16 float32] [--json FILE]

A Llama-shaped model of about 0.5B parameters with random weights (hidden 1024, 28 layers, MLP 4096,
16 query / 4 KV heads, vocabulary 32000; --quick: 4 layers), in bfloat16 and float32: prefill of 512
tokens and 32 greedy decode steps, for stock eager, stock torch.compile, hal-patched eager
(hal.torch.apply) and hal-patched compiled, taking turns in each round. Reports tokens/s (median over the
rounds) and the ratio to stock eager with its spread (min-max of the per-round ratios); the title says the OpenMP
wait policy torch ran with and the machine's load average before and after (hal's kernels share the cores with
torch's spinning OpenMP threads, and a busy machine moves the ratios: see docs/torch.md). Then the extra cost per
call of torch.ops.hal.<op> over hal.ops.<op> on tiny inputs (median and spread of 7 rounds, each side timed as the
best of 50 batches of 20 calls), beside the dispatcher's own cost (the same schema with an empty kernel).
"""
import argparse
import json
import os
import statistics
import time

import torch
import transformers
from rich.console import Console
from rich.table import Table

import hal
import hal.torch

PROMPT, NEW_TOKENS = 512, 32


def build(layers, dtype):
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def timed(fn, clock=time.perf_counter):
    start = clock()
    fn()
    return clock() - start


def measure(model, ids):
    """(prefill seconds, decode seconds for NEW_TOKENS steps) of one greedy generation."""
    prefill = timed(lambda: model(ids))
    total = timed(lambda: model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False))
    return prefill, max(total - prefill, 1e-9)


def variants(layers, dtype):
    """(label, model, forward) of the four ways to run the model: a stock copy and a hal-patched copy of the same weights
    (hal.torch.apply), each eager and under torch.compile (its forward replaced, compiled once)."""
    stock, patched = build(layers, dtype), build(layers, dtype)
    hal.torch.apply(patched, backend="cpu")
    torch._dynamo.reset()
    out = []
    for label, model in (("stock", stock), ("hal", patched)):
        eager, compiled = model.forward, torch.compile(model.forward, dynamic=True)
        out += [(f"{label} eager", model, eager), (f"{label} compiled", model, compiled)]
    return out


def bench_model(layers, dtype, repeats):
    """Rows of tokens/s and ratios; the variants take turns in every round (a warm-up round first: compiles,
    Numba's and the allocator's first calls), so a slow spell of this shared machine falls on all of them."""
    runs = variants(layers, dtype)
    ids = torch.randint(0, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    params = sum(p.numel() for p in runs[0][1].parameters())
    times = {label: [] for label, _, _ in runs}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for label, model, forward in runs:
                model.forward = forward
                result = measure(model, ids)
                if round_:
                    times[label].append(result)
    rows = []
    for label, measured in times.items():
        row = {"model": f"{params / 1e9:.2f}B {str(dtype)[6:]}", "variant": label}
        for phase, i, tokens in (("prefill", 0, PROMPT), ("decode", 1, NEW_TOKENS)):
            ratios = [base[i] / t[i] for base, t in zip(times["stock eager"], measured)]
            row[phase] = {"tokens_per_s": statistics.median(tokens / t[i] for t in measured),
                          "ratio": statistics.median(ratios), "spread": (min(ratios), max(ratios))}
        rows.append(row)
    return rows


def call_overhead():
    """Extra microseconds per call of torch.ops.hal.<op> over hal.ops.<op> on tiny inputs, in the calling thread's
    CPU time (time.thread_time): what the call costs that thread, which other processes' load on this shared
    machine stretches far less than the wall clock (tiny inputs run on the calling thread alone). Beside it, what
    torch's dispatcher itself costs: an operator of the same schema whose kernel returns its first input at once
    (the extra also holds hal's own work running slower right after torch's C++ code: see docs/torch.md)."""
    x, w, x2 = torch.randn(1, 64), torch.ones(64), torch.randn(1, 128)
    args = {"rms_norm": (x, w), "silu_and_mul": (x2,), "softmax": (x,)}
    bare = torch.library.Library("hal_bench", "FRAGMENT")
    for name in args:
        op = getattr(hal.ops, name)
        bare.define(hal.torch.library.schema(op))
        bare.impl(name, (lambda *a, **k: [a[0]]) if hal.torch.library.varies(op) else (lambda *a, **k: a[0]), "Autograd")
    out = {}
    for name, a in args.items():
        calls = (lambda: getattr(hal.ops, name)(*a), lambda: getattr(torch.ops.hal, name)(*a), lambda: getattr(torch.ops.hal_bench, name)(*a))
        extra, per_call = [], []
        for _ in range(7):  # each side: the best of 50 batches of 20 calls
            per_call = [min(timed(lambda: [fn() for _ in range(20)], time.thread_time) for _ in range(50)) / 20 * 1e6 for fn in calls]
            extra.append(per_call[1] - per_call[0])
        out[name] = {"direct_us": per_call[0], "extra_us": statistics.median(extra), "spread": (min(extra), max(extra)),
                     "dispatcher_us": per_call[2]}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 28")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=("bfloat16", "float32"),
                        help="model dtypes (torch's bfloat16 Linear without AVX512-BF16 runs single-threaded: hours)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    console = Console()
    rows = []
    load = [os.getloadavg()[0]]
    for dtype in args.dtypes:
        rows += bench_model(4 if args.quick else 28, getattr(torch, dtype), args.repeats)
    load.append(os.getloadavg()[0])
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    table = Table(title=f"prefill {PROMPT} tokens, {NEW_TOKENS} decode steps, torch {torch.__version__}, "
                        f"transformers {transformers.__version__}, OMP_WAIT_POLICY {policy}, load average {load[0]:.1f} -> "
                        f"{load[1]:.1f} (ratio: stock eager time / this time, > 1 is faster)")
    for col in ("model", "variant", "prefill tok/s", "ratio", "decode tok/s", "ratio "):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for r in rows:
        cells = [f"{r[p]['tokens_per_s']:.1f}" if k == 0 else f"{r[p]['ratio']:.2f} ({r[p]['spread'][0]:.2f}-{r[p]['spread'][1]:.2f})"
                 for p in ("prefill", "decode") for k in (0, 1)]
        table.add_row(r["model"], r["variant"], *cells)
    console.print(table)
    overhead = call_overhead()
    table = Table(title="torch.ops.hal.<op> over hal.ops.<op>, tiny inputs, calling thread CPU time (target: at most 10 us extra)")
    for col in ("op", "hal.ops us", "extra us", "spread", "dispatcher us (empty kernel)"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for name, o in overhead.items():
        table.add_row(name, f"{o['direct_us']:.1f}", f"{o['extra_us']:.1f}", f"{o['spread'][0]:.1f}-{o['spread'][1]:.1f}",
                      f"{o['dispatcher_us']:.1f}")
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": rows, "call_overhead": overhead, "omp_wait_policy": policy, "load_average": load}, f, indent=2)


if __name__ == "__main__":
    main()
