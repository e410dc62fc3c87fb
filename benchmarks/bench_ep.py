"""Expert parallelism on this machine: the demo's MoE block over 1, 2 and 4 local processes (gloo).

    python benchmarks/bench_ep.py [--tokens 512] [--ranks 1 2 4] [--repeat 3] [--mode normal|low_latency]

The tokens are split over the ranks (the same work in total). Per world size and transport
(bfloat16, fp8 per 1x128): the bytes each rank sends per token against the minimum (distinct
remote ranks x hidden x bytes per element), and where the time goes, as medians over --repeat
calls of the slowest rank: routing (router GEMM + moe_route), dispatch less its exchange (payload
packing, fp8 quantization, the expert-grouped layout), the exchange (every collective of dispatch
and combine), the experts' grouped GEMMs, and combine less its exchange (weighted reduction,
sum of the partials).

On a 2-core machine every rank shares the same two cores, and gloo moves data through loopback
TCP: these numbers show the overheads of the exchange, not scaling.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from hal import ops
from hal.arrays import from_host
from hal.bench import positive_int
from hal.demo import FP8, Layer
from hal.distributed import ExpertParallel, launch, run_experts

PHASES = ("route", "dispatch", "exchange", "experts", "combine")


def _rank(rank, world, layer, tokens, transport, mode, repeat, seed):
    w = {name: from_host(v, torch.empty(0)) for name, v in layer.weights(np.random.default_rng(seed), "bfloat16").items()}
    local = slice(rank * layer.experts // world, (rank + 1) * layer.experts // world)
    (w13, s13), (w2, s2) = ((w[name][local], w[f"{name}_scales"][local]) for name in ("w13", "w2"))  # fp8, as the checkpoint ships them
    if transport != "fp8":  # the same experts in bf16
        (w13, s13), (w2, s2) = ((ops.dequantize(q, s, FP8, "block", out_dtype="bfloat16"), None) for q, s in ((w13, s13), (w2, s2)))
    x = torch.from_numpy(np.random.default_rng([seed, rank]).standard_normal((tokens, layer.hidden), np.float32)).bfloat16()
    ep = ExpertParallel(layer.experts, layer.hidden, transport=transport, mode=mode, max_tokens=tokens)
    masked = mode == "low_latency"
    times = {p: [] for p in PHASES}
    for _ in range(repeat + 1):  # the first call compiles
        ep.exchange_seconds = 0.0
        t0 = time.perf_counter()
        logits = ops.gemm(x, w["router"], out_dtype="float32")
        weights, ids = ops.moe_route(logits, layer.top_k, scoring="sigmoid", n_group=layer.expert_groups, topk_group=layer.top_groups,
                                     bias=w["router_bias"], scaling=2.5)
        t1 = time.perf_counter()
        recv = ep.dispatch(x, ids, weights)
        t2 = time.perf_counter()
        dispatch_exchange = ep.exchange_seconds
        y = run_experts(recv.x, recv.x_scales, recv.masked_m if masked else recv.expert_offsets, masked, w13=w13, w13_scales=s13,
                        w2=w2, w2_scales=s2, activation="silu_and_mul", out_dtype="bfloat16", backend=None)
        t3 = time.perf_counter()
        ep.combine(y, recv)
        t4 = time.perf_counter()
        for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1 - dispatch_exchange, ep.exchange_seconds, t3 - t2,
                                           t4 - t3 - (ep.exchange_seconds - dispatch_exchange))):
            times[phase].append(seconds)
    return {"times": {p: v[1:] for p, v in times.items()}, **ep.traffic(recv, ids)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens in total, split over the ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--mode", default="normal", choices=("normal", "low_latency"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layer = Layer()
    print(f"MoE block: hidden {layer.hidden}, {layer.experts} experts top-{layer.top_k}, expert ffn {layer.expert_ffn}; "
          f"{args.tokens} tokens over the ranks; {args.mode} mode; medians of {args.repeat} calls, slowest rank; ms")
    print("On this 2-core machine the ranks share two cores and gloo uses loopback TCP: overheads, not scaling.")
    header = f"{'ranks':>5} {'transport':>9} {'B/token':>8} {'minimum':>8} {'meta B':>7} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'total':>8}"
    print(header)
    for world in args.ranks:
        for transport in ("bfloat16", "fp8"):
            per_rank = launch(_rank, world, layer, args.tokens // world, transport, args.mode, args.repeat, args.seed, timeout=600)
            tokens = sum(r["tokens"] for r in per_rank)
            per_token = {key: sum(r[key] for r in per_rank) / tokens for key in ("payload", "minimum", "metadata")}
            med = {p: 1e3 * max(statistics.median(r["times"][p]) for r in per_rank) for p in PHASES}
            print(f"{world:>5} {transport:>9} {per_token['payload']:>8.0f} {per_token['minimum']:>8.0f} {per_token['metadata']:>7.0f} "
                  + " ".join(f"{med[p]:>9.1f}" for p in PHASES) + f" {sum(med.values()):>8.1f}")


if __name__ == "__main__":
    main()
