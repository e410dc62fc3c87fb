"""Expert parallelism across processes: 2 and 4 ranks on gloo over loopback (hal.distributed.launch).

Each launch starts fresh processes (a few seconds each on 2 cores), so one launch runs many
routings and checks and returns what it found; the assertions run here. Every rank rebuilds every
rank's inputs from the same seed, so each can check what it received against what was sent.
"""
import os
import time

import numpy as np
import pytest
import torch

import hal
from hal.distributed import ExpertParallel, LaunchError, PeerError, launch, moe_layer
from hal.dtypes import TOLERANCE

E, H, INTER, TOKENS = 16, 160, 64, 9  # H is not a multiple of 128: a partial fp8 scale group


def routing(seed, rank, world, kind, k=3, tokens=TOKENS):
    """(x bf16 [T, H], topk_ids int32 [T, k], topk_weights) of `rank` for one of the routing kinds.

    x holds odd multiples of 1/8 below 2 and a token's weights are 1/2, 1/4, ..., the last doubled
    (summing to 1 over its experts): every partial sum is exact in bfloat16, so dispatch and
    combine around identity experts must return x bit for bit."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    local = E // world
    x = ((2 * torch.randint(-8, 8, (tokens, H), generator=g) + 1) / 8).bfloat16()
    pick = lambda pool: torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(tokens)])  # noqa: E731
    if kind == "random":
        ids = pick(torch.arange(E))
    elif kind == "empty experts":  # every other expert gets nothing
        ids = pick(torch.arange(0, E, 2))
    elif kind == "last rank receives nothing":
        ids = pick(torch.arange(E - local))
    elif kind == "all to one expert":
        ids = torch.full((tokens, k), -1)
        ids[:, 0] = E - 1
    elif kind == "top-k on one rank":  # each token's experts all live on one rank: sent once
        owner = torch.randint(0, world, (tokens,), generator=g)
        ids = torch.stack([o * local + torch.randperm(local, generator=g)[:k] for o in owner.tolist()])
    elif kind == "no tokens":
        return x[:0], torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k)
    valid = ids >= 0
    place = valid.cumsum(1) - 1
    weights = torch.where(place == valid.sum(1, keepdim=True) - 1, 0.5 ** place, 0.5 ** (place + 1))
    return x, ids.int(), torch.where(valid, weights, 0.0)


KINDS = ("random", "empty experts", "last rank receives nothing", "all to one expert", "top-k on one rank", "no tokens")


def layer_weights(dtype, fp8):
    g = torch.Generator().manual_seed(7)
    w13 = (torch.randn(E, 2 * INTER, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, INTER, generator=g) / INTER ** 0.5).to(dtype)
    router = (torch.randn(H, E, generator=g) / H ** 0.5).to(dtype)
    shared = ((torch.randn(H, 2 * INTER, generator=g) / H ** 0.5).to(dtype), (torch.randn(INTER, H, generator=g) / INTER ** 0.5).to(dtype))
    if not fp8:
        return router, (w13, None), (w2, None), shared
    return router, hal.ops.quantize(w13, "float8_e4m3fn", "block"), hal.ops.quantize(w2, "float8_e4m3fn", "block"), shared


def error_ratio(out, ref):
    """Worst |out - ref| over the conformance tolerance of out's dtype relative to each row's largest |ref|."""
    rtol, atol = TOLERANCE[str(out.dtype)[6:]]
    scale = ref.float().abs().amax(1, keepdim=True) if ref.numel() else ref.float()
    return float(((out.float() - ref.float()).abs() / (atol + rtol * scale)).max()) if ref.numel() else 0.0


def exchange_checks(rank, world, seed):
    """Identity experts (dispatch then combine) and the whole layer, both modes, every routing kind."""
    found = []
    for mode in ("normal", "low_latency"):
        for transport in (None, "fp8"):
            ep = ExpertParallel(E, H, transport=transport, mode=mode, max_tokens=TOKENS)
            for kind in KINDS:
                x, ids, w = routing(seed, rank, world, kind)
                recv = ep.dispatch(x, ids, w)
                if transport is None:
                    y = recv.x
                    expected = x
                else:  # identity experts on fp8 codes: each row decoded; the combine must give the decoded x
                    y = hal.ops.dequantize(recv.x, recv.x_scales, "float8_e4m3fn", "group")
                    expected = hal.ops.dequantize(*hal.ops.quantize(x, "float8_e4m3fn", "group"), "float8_e4m3fn", "group")
                out = ep.combine(y, recv)
                sent = sum(recv.send_splits) if mode == "normal" else None
                found.append({"mode": mode, "transport": transport, "kind": kind, "shape": tuple(out.shape), "dtype": str(out.dtype),
                              "exact": bool(torch.equal(out, expected.to(out.dtype))), "sent_rows": sent,
                              "distinct_ranks": int(sum(len({int(i) // (E // world) for i in row if i >= 0}) for row in ids))})
            # The layer, against the single-process hal layer over every rank's tokens.
            for dtype, fp8 in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
                if (transport == "fp8") != fp8:
                    continue
                dt = getattr(torch, dtype)
                router, (w13, s13), (w2, s2), shared = layer_weights(dt, fp8)
                local = slice(rank * (E // world), (rank + 1) * (E // world))
                xs = [routing(seed, r, world, "random")[0].to(dt) for r in range(world)]
                kw = dict(k=4, n_group=4, topk_group=2, router_bias=torch.linspace(-0.1, 0.1, E), scaling=2.5, shared=shared)
                out = moe_layer(ep, xs[rank], router, w13[local], w2[local], w13_scales=None if s13 is None else s13[local],
                                w2_scales=None if s2 is None else s2[local], **kw)
                ref = moe_layer(None, torch.cat(xs), router, w13, w2, w13_scales=s13, w2_scales=s2, **kw)[rank * TOKENS:(rank + 1) * TOKENS]
                found.append({"mode": mode, "transport": transport, "kind": f"layer {dtype}{' fp8' if fp8 else ''}", "ratio": error_ratio(out, ref)})
    return found


def capacity_checks(rank, world, seed):
    """low_latency with a small expert capacity: every row past it is counted as dropped."""
    cap = 3
    ep = ExpertParallel(E, H, mode="low_latency", max_tokens=TOKENS, expert_capacity=cap)
    x, ids, w = routing(seed, rank, world, "all to one expert")
    recv = ep.dispatch(x, ids, w)
    everyone = torch.cat([routing(seed, r, world, "all to one expert")[1] for r in range(world)]).long()
    local = E // world
    counts = torch.bincount(everyone[everyone >= 0], minlength=E)[rank * local:(rank + 1) * local]
    out = ep.combine(recv.x, recv)
    return {"masked_m": recv.masked_m.tolist(), "dropped": recv.dropped.tolist(), "want_kept": counts.clamp(max=cap).tolist(),
            "want_dropped": (counts - cap).clamp(min=0).tolist(), "rows_out": int((out.float().abs().sum(1) > 0).sum())}


def bad_input_checks(rank, world):
    """Each bad input: what every rank raised (type name and message). The group must stay usable."""
    seen = []

    def attempt(label, fn):
        try:
            fn()
            seen.append((label, None, ""))
        except hal.HalError as e:
            seen.append((label, type(e).__name__, str(e)))

    attempt("experts not divisible", lambda: ExpertParallel(7, H))
    attempt("hidden differs", lambda: ExpertParallel(E, H if rank == 0 else H + 1))
    ep = ExpertParallel(E, H)
    x, ids, w = routing(1, rank, world, "random")
    attempt("dtype differs", lambda: ep.dispatch(x.float() if rank == 1 else x, ids, w))
    bad_ids = ids.clone()
    if rank == 0:
        bad_ids[2, 1] = E
    attempt("id out of range", lambda: ep.dispatch(x, bad_ids, w))
    attempt("x of another hidden size", lambda: ep.dispatch(x[:, :-1] if rank == 1 else x, ids, w))
    attempt("a good call afterwards", lambda: ep.combine(ep.dispatch(x, ids, w).x, ep.dispatch(x, ids, w)))
    return seen


def dies(rank, world):
    """Rank 1 exits after construction; rank 0's dispatch must raise PeerError within the group's timeout."""
    ep = ExpertParallel(E, H)
    if rank == 1:
        os._exit(3)
    x, ids, w = routing(2, rank, world, "random")
    start = time.monotonic()
    try:
        ep.dispatch(x, ids, w)
    except PeerError as e:
        return "PeerError", time.monotonic() - start, str(e)
    return None, time.monotonic() - start, ""


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_and_layer(world):
    seed = int(np.random.default_rng().integers(1 << 20))
    results = launch(exchange_checks, world, seed)
    for rank, found in enumerate(results):
        for f in found:
            where = f"seed {seed} rank {rank}: {f}"
            if "ratio" in f:
                assert f["ratio"] <= 1.0, where
                continue
            assert f["exact"], where
            if f["kind"] == "no tokens":
                assert f["shape"] == (0, H), where
            if f["sent_rows"] is not None:  # a token goes once to each rank that owns any of its experts
                assert f["sent_rows"] == f["distinct_ranks"], where
    assert {f["kind"] for f in results[0]} >= set(KINDS) | {"layer float32", "layer bfloat16", "layer bfloat16 fp8"}


def test_low_latency_capacity_overflow_is_counted():
    seed = int(np.random.default_rng().integers(1 << 20))
    for rank, r in enumerate(launch(capacity_checks, 2, seed)):
        assert r["masked_m"] == r["want_kept"] and r["dropped"] == r["want_dropped"], (seed, rank, r)
    assert sum(sum(r["want_dropped"]) for r in launch(capacity_checks, 2, seed)) > 0  # the case overflows


def test_bad_input_raises_on_its_rank_and_not_a_hang_elsewhere():
    start = time.monotonic()
    r0, r1 = launch(bad_input_checks, 2, timeout=30)
    assert time.monotonic() - start < 120
    want = {  # label: (rank 0, rank 1)
        "experts not divisible": ("SchemaError", "SchemaError"),
        "hidden differs": ("PeerError", "SchemaError"),
        "dtype differs": ("PeerError", "SchemaError"),
        "id out of range": ("SchemaError", "PeerError"),
        "x of another hidden size": ("PeerError", "SchemaError"),
        "a good call afterwards": (None, None),
    }
    for (label, t0, m0), (label1, t1, m1) in zip(r0, r1):
        assert label == label1 and (t0, t1) == want[label], (label, m0, m1)
    messages = {label: (m0, m1) for (label, _, m0), (_, _, m1) in zip(r0, r1)}
    assert "num_experts" in messages["experts not divisible"][0]
    assert "hidden" in messages["hidden differs"][1] and "rank 1" in messages["hidden differs"][0]
    assert "topk_ids" in messages["id out of range"][0] and "[-1, 16)" in messages["id out of range"][0]
    assert "bfloat16" in messages["dtype differs"][1] and "float32" in messages["dtype differs"][1]


def test_a_dead_rank_raises_peer_error_within_the_timeout():
    with pytest.raises(LaunchError) as info:
        launch(dies, 2, timeout=20)
    err = info.value
    assert set(err.failures) == {1} and "exit code 3" in err.failures[1]
    kind, seconds, message = err.results[0]
    assert kind == "PeerError" and seconds < 25, (seconds, message)
