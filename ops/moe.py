"""Mixture of experts: routing, the token layout grouped GEMMs consume, and the grouped GEMM.

One MoE block is

    w, ids = moe_route(logits, k)                                     # [T, k] weights and experts
    sorted_ids, block_experts, offsets, total = moe_align(ids, E, block_m)
    xs = moe_permute(x, ids, sorted_ids)                              # tokens in expert order
    h = grouped_gemm(xs, w13, offsets, activation="silu_and_mul")     # gate/up projection
    y = grouped_gemm(h, w2, offsets)                                  # down projection
    out = moe_unpermute(y, sorted_ids, w)                             # weighted sum back per token

Rows of the sorted layout are flat (token, slot) indices i = t*k + j, grouped by expert, each
expert's segment padded to a multiple of block_m with the sentinel T*k so that a GPU tile of
block_m rows never straddles two experts. Index outputs are int32 and compared exactly.

With expert parallelism in DeepEP's low-latency mode the tokens arrive in the masked layout
instead, x [E_local, M, H] with masked_m[e] of expert e's M rows used, and grouped_gemm_masked
takes it as it is (no host read of the counts, so a decode step can be a CUDA graph).
"""
import math

import numpy as np

from hal.dtypes import INTS, name_of, to_numpy
from hal.opdef import Attr, POSITIVE, InvalidArgument, check_offsets, check_range, ErrorSample, OpDef, Sample, Tensor, random, strided

from .activations import EPILOGUES, epilogue, epilogue_columns, epilogue_magnitude, is_gated, torch_epilogue

# ---------------------------------------------------------------- moe_route

# Logits of the samples lie on a coarse grid (exact in bfloat16) so that equal logits give exactly
# equal scores on every backend (testing the lower-index rule) while different ones give scores
# far apart relative to fp32 rounding: a float64 reference and an fp32 kernel then agree on every
# choice. Measured over all values of these grids (and biases), the closest distinct selection
# values differ by > 1% relative and the closest distinct sums of two (group scores) by > 8e-4,
# while fp32 rounding moves them by ~1e-6.
_SOFTMAX_GRID = (-2.0, 2.0, 0.25)
# Sigmoid logits stay positive: sigmoid(x) + sigmoid(-x) == 1, so group scores of {x, -x} and
# {y, -y} tie exactly in real arithmetic but not after rounding.
_SIGMOID_GRID = (0.25, 2.0, 0.25)
# Bias values for sigmoid (scores in (0.5, 0.9)): the same gaps hold for s = score + bias. With
# softmax the bias is a whole number, larger than any difference of two scores.
_SIGMOID_BIAS = (0.0, 0.5, 1.0)
_SOFTMAX_BIAS = (0.0, 1.0)


def _grid(rng, shape, lo, hi, step, dtype):
    n = int(round((hi - lo) / step))
    return (lo + step * rng.integers(0, n + 1, size=shape)).astype(to_numpy(dtype))


def _route_check(a):
    t, e = a["logits"].shape
    k, groups, topk_group = a["k"], a["n_group"], a["topk_group"]
    if (groups is None) != (topk_group is None):
        missing = "topk_group" if topk_group is None else "n_group"
        raise InvalidArgument(missing, "given together with " + ("n_group" if missing == "topk_group" else "topk_group"), None)
    limit = e
    if groups is not None:
        if groups < 1 or e % groups or e // groups < 2:
            raise InvalidArgument("n_group", f"a divisor of the {e} experts leaving >= 2 experts per group", groups)
        if not 1 <= topk_group <= groups:
            raise InvalidArgument("topk_group", f"an int in [1, n_group = {groups}]", topk_group)
        limit = topk_group * (e // groups)
    if k is None or not 1 <= k <= limit:
        bound = f"topk_group * experts per group = {limit}" if groups is not None else f"the {e} experts"
        raise InvalidArgument("k", f"an int in [1, {bound}]", k)
    if a["bias"] is not None and tuple(a["bias"].shape) != (e,):
        raise InvalidArgument("bias", f"shape ({e},), one per expert", tuple(a["bias"].shape))


def _ranked(s):
    """Indices sorting the last axis of `s` in torch.topk's order: descending, NaN above every number,
    equal values (several NaN included) in ascending index order (the tie rule)."""
    nan = np.isnan(s)
    return np.lexsort((np.where(nan, 0.0, -s), ~nan), axis=-1)


def _route_reference(a):
    x, k = a["logits"], a["k"]
    t, e = x.shape
    if a["scoring"] == "softmax":
        z = np.exp(x - x.max(axis=1, keepdims=True, initial=-np.inf))
        scores = z / z.sum(axis=1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-x))
    s = scores if a["bias"] is None else scores + a["bias"]
    if a["n_group"] is not None:
        g = a["n_group"]
        grouped = s.reshape(t, g, e // g)
        top2 = np.take_along_axis(grouped, _ranked(grouped)[:, :, :2], axis=2)
        best = _ranked(top2.sum(axis=2))[:, :a["topk_group"]]
        kept = np.zeros((t, g), bool)
        np.put_along_axis(kept, best, True, axis=1)
        s = np.where(np.repeat(kept, e // g, axis=1), s, -np.inf)
    ids = _ranked(s)[:, :k]
    w = np.take_along_axis(scores, ids, axis=1)
    if a["renormalize"]:
        w = w / w.sum(axis=1, keepdims=True)
    return [w * a["scaling"], ids.astype(np.int32)]


def _route_args(rng, dtype, t, e, k, scoring="softmax", bias=False, bias_dtype=None, **attrs):
    lo, hi, step = _SOFTMAX_GRID if scoring == "softmax" else _SIGMOID_GRID
    a = {"logits": _grid(rng, (t, e), lo, hi, step, dtype), "k": k, "scoring": scoring, "n_group": None,
         "topk_group": None, "bias": None, "renormalize": True, "scaling": 1.0}
    a.update(attrs)
    if bias:
        values = np.array(_SOFTMAX_BIAS if scoring == "softmax" else _SIGMOID_BIAS)
        a["bias"] = _bias(rng, values, e, a["n_group"]).astype(to_numpy(bias_dtype or dtype))
    return a


def _bias(rng, values, e, n_group):
    """One bias per expert; with grouped routing one per group, repeated over its experts. Group scores
    sum two (score + bias) terms, and (x + b1) + (y + b2) equals (x + b2) + (y + b1) in real arithmetic
    but not always after fp32 rounding: per-group biases keep real ties bit-equal ties."""
    if not n_group:
        return rng.choice(values, e)
    return np.repeat(rng.choice(values, n_group), e // n_group)


def _route_samples(rng, dtype):
    yield Sample(_route_args(rng, dtype, 7, 8, 2), "Mixtral E=8 k=2 softmax renormalized T=7")
    yield Sample(_route_args(rng, dtype, 33, 64, 6, renormalize=False), "E=64 k=6 softmax not renormalized")
    yield Sample(_route_args(rng, dtype, 5, 1, 1), "E=1 k=1")
    yield Sample(_route_args(rng, dtype, 33, 256, 8, "sigmoid", bias=True, n_group=8, topk_group=4, scaling=2.5),
                 "DeepSeek-V3 E=256 8 groups keep 4 k=8 sigmoid bias scaling 2.5")
    yield Sample(_route_args(rng, dtype, 9, 64, 6, n_group=8, topk_group=3), "grouped softmax E=64 8 groups keep 3 k=6")
    yield Sample(_route_args(rng, dtype, 13, 16, 4, "sigmoid", bias=True, renormalize=False),
                 "sigmoid E=16 k=4 bias not renormalized")
    yield Sample(_route_args(rng, dtype, 11, 32, 4, bias=True, scaling=2.5), "softmax E=32 k=4 bias scaling 2.5")
    yield Sample(_route_args(rng, dtype, 0, 8, 2), "T=0", "edge")
    yield Sample(_route_args(rng, dtype, 6, 8, 8), "k = E", "edge")
    yield Sample(_route_args(rng, dtype, 5, 16, 8, "sigmoid", n_group=4, topk_group=2),
                 "grouped k = topk_group * group size", "edge")
    tied = _route_args(rng, dtype, 3, 12, 5)
    tied["logits"][:] = 0.5
    yield Sample(tied, "all logits equal: ids 0..k-1", "edge")
    # The same 4 logits in every group: every group score ties, so the lowest groups are kept.
    tiled = _route_args(rng, dtype, 7, 16, 3, "sigmoid", n_group=4, topk_group=2)
    tiled["logits"] = np.tile(tiled["logits"][:, :4], (1, 4))
    yield Sample(tiled, "equal groups: lowest group indices kept", "edge")
    nan = _route_args(rng, dtype, 6, 8, 2)
    nan["logits"][2, 5] = np.nan
    yield Sample(nan, "softmax, a NaN logit: every score of its token NaN, ids 0..k-1", "edge")
    nan = _route_args(rng, dtype, 6, 16, 3, "sigmoid", n_group=4, topk_group=2)
    nan["logits"][1, 9] = np.nan
    nan["logits"][4, [3, 12]] = np.nan
    yield Sample(nan, "grouped sigmoid, NaN logits: NaN ranks above every score", "edge")
    low = "float16" if dtype != "float16" else "bfloat16"
    yield Sample(_route_args(rng, dtype, 17, 64, 8, "sigmoid", bias=True, bias_dtype=low, n_group=8, topk_group=4),
                 f"bias in {low}", "edge")
    s = _route_args(rng, dtype, 9, 32, 4, "sigmoid", bias=True, n_group=4, topk_group=2)
    s["logits"] = strided(s["logits"])
    yield Sample(s, "strided logits", "edge")


def _route_errors(rng):
    f32 = "float32"
    base = _route_args(rng, f32, 4, 16, 2)
    yield ErrorSample(base | {"k": 17}, "k > E", match="k")
    yield ErrorSample(base | {"k": 0}, "k = 0", match="k")
    yield ErrorSample(base | {"k": None}, "k missing", match="k")
    yield ErrorSample(base | {"scoring": "tanh"}, "unknown scoring", match="scoring")
    yield ErrorSample(base | {"n_group": 4}, "n_group without topk_group", match="topk_group")
    yield ErrorSample(base | {"topk_group": 2}, "topk_group without n_group", match="n_group")
    yield ErrorSample(base | {"n_group": 3, "topk_group": 1}, "E not a multiple of n_group", match="n_group")
    yield ErrorSample(base | {"n_group": 16, "topk_group": 1}, "one expert per group", match="n_group")
    yield ErrorSample(base | {"n_group": 4, "topk_group": 5}, "topk_group > n_group", match="topk_group")
    yield ErrorSample(base | {"n_group": 4, "topk_group": 1, "k": 5}, "k beyond the kept groups", match="k")
    yield ErrorSample(base | {"bias": random(rng, (15,), f32)}, "bias length", match="bias")
    yield ErrorSample(base | {"logits": np.ones((4, 16), np.int32)}, "int logits", match="dtype")
    yield ErrorSample(base | {"logits": random(rng, (16,), f32)}, "rank-1 logits", match="rank")


def _route_peer(t):
    """Routing as written in model code (HF DeepSeek-V3 / Mixtral gates)."""
    import torch

    x, k, bias = t["logits"], t["k"], t["bias"]

    def run():
        scores = x.float().softmax(-1) if t["scoring"] == "softmax" else x.float().sigmoid()
        s = scores if bias is None else scores + bias.float()
        if t["n_group"] is not None:
            tokens, g = x.shape[0], t["n_group"]
            group_scores = s.view(tokens, g, -1).topk(2, dim=-1)[0].sum(-1)
            group_idx = group_scores.topk(t["topk_group"], dim=-1)[1]
            mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            mask = mask.unsqueeze(-1).expand(tokens, g, s.shape[1] // g).reshape(tokens, -1)
            s = s.masked_fill(mask == 0, float("-inf"))
        ids = s.topk(k, dim=-1)[1]
        w = scores.gather(1, ids)
        if t["renormalize"]:
            w = w / w.sum(-1, keepdim=True)
        return w * t["scaling"], ids.int()

    return run


moe_route = OpDef(
    name="moe_route",
    doc="moe_route(logits, k, *, scoring='softmax', n_group=None, topk_group=None, bias=None, renormalize=True, "
    "scaling=1.0) -> (topk_weights float32 [T, k], topk_ids int32 [T, k]): top-k gating on softmax or sigmoid "
    "scores, optionally DeepSeek-V3 grouped (keep the topk_group groups of best top-2 sum); bias steers the "
    "choice only; ids in descending score order, ties to the lower index.",
    params=[
        Tensor("logits", rank=2),
        Attr("k", None, int),
        "*",
        Attr("scoring", "softmax", choices=("softmax", "sigmoid")),
        Attr("n_group", None, int),
        Attr("topk_group", None, int),
        Tensor("bias", rank=1, optional=True),
        Attr("renormalize", True, bool),
        Attr("scaling", 1.0, float),
    ],
    check=_route_check,
    outputs=lambda a: [((a["logits"].shape[0], a["k"]), "float32"), ((a["logits"].shape[0], a["k"]), "int32")],
    results=("topk_weights", "topk_ids"),
    reference=_route_reference,
    samples=_route_samples,
    error_samples=_route_errors,
    formats=lambda a: [None, "exact"],
    # fp32 softmax: the row sum of E terms, then the k selected weights renormalized.
    growth=lambda a: math.sqrt(a["logits"].shape[1]) + a["k"],
    bench=lambda rng, dtype: _route_args(rng, dtype, 4096, 256, 8, "sigmoid", bias=True, n_group=8, topk_group=4,
                                         scaling=2.5),
    cost=lambda a: (12 * a["logits"].size, a["logits"].nbytes + a["logits"].shape[0] * a["k"] * 8),
    torch_peer=_route_peer,
)

# ---------------------------------------------------------------- moe_align


def align_capacity(tokens, k, experts, block_m):
    """Rows of moe_align's padded layout: enough for any routing, known without reading the ids. At most
    min(E, T*k) experts get rows, each padding its segment by fewer than block_m (a decode step of T*k = 6
    of 64 experts needs 384 rows, not 4096)."""
    return -(-(tokens * k + min(experts, tokens * k) * (block_m - 1)) // block_m) * block_m


def align(topk_ids, experts, block_m):
    """moe_align in NumPy (the reference, and the layout samples of the other ops are built on)."""
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1).astype(np.int64)
    cap = align_capacity(t, k, experts, block_m)
    valid = (flat >= 0) & (flat < experts)
    counts = np.bincount(flat[valid], minlength=experts)
    padded = -(-counts // block_m) * block_m
    offsets = np.concatenate([[0], np.cumsum(padded)])
    sorted_ids = np.full(cap, t * k, np.int64)
    order = np.argsort(np.where(valid, flat, experts), kind="stable")[:int(valid.sum())]  # by expert, then i
    rank = np.arange(order.size) - np.concatenate([[0], np.cumsum(counts)])[flat[order]]
    sorted_ids[offsets[flat[order]] + rank] = order
    block_experts = np.full(cap // block_m, -1, np.int64)
    block_experts[:offsets[-1] // block_m] = np.repeat(np.arange(experts), padded // block_m)
    return sorted_ids, block_experts, offsets, np.array([offsets[-1]])


def _align_check(a):
    for name in ("num_experts", "block_m"):
        if a[name] is None:
            raise InvalidArgument(name, "an int >= 1", a[name])
    if name_of(a["topk_ids"].dtype) == "int64":  # kernels read ids as int32: 2**32 + 3 must not become 3
        check_range("topk_ids", a["topk_ids"], -2**31, 2**31, "expert ids (int32 values)")
    t, k = a["topk_ids"].shape
    if align_capacity(t, k, a["num_experts"], a["block_m"]) >= 2**31:
        raise InvalidArgument("topk_ids", "T*k + min(num_experts, T*k)*(block_m - 1) < 2**31 (int32 row indices)", f"shape {tuple(a['topk_ids'].shape)}")


def _align_outputs(a):
    t, k = a["topk_ids"].shape
    cap = align_capacity(t, k, a["num_experts"], a["block_m"])
    return [((cap,), "int32"), ((cap // a["block_m"],), "int32"), ((a["num_experts"] + 1,), "int32"), ((1,), "int32")]


def _routed(rng, t, e, k, dtype="int32"):
    """topk_ids as routing makes them: k distinct experts per token."""
    ids = np.argsort(rng.random((t, e)), axis=1)[:, :k] if e else np.zeros((t, k))
    return ids.astype(to_numpy(dtype))


def _align_args(rng, dtype, t, e, k, block_m, ids=None):
    return {"topk_ids": _routed(rng, t, e, k, dtype) if ids is None else ids.astype(to_numpy(dtype)),
            "num_experts": e, "block_m": block_m}


def _off_rank(rng, ids, e, fraction=0.3):
    """Some ids replaced by -1 or by experts of other ranks (>= e): expert parallelism."""
    ids = ids.copy()
    drop = rng.random(ids.shape) < fraction
    ids[drop] = rng.choice([-1, e, e + 5], int(drop.sum()))
    return ids


def _align_samples(rng, dtype):
    yield Sample(_align_args(rng, dtype, 7, 8, 2, 16), "T=7 E=8 k=2 block_m=16")
    yield Sample(_align_args(rng, dtype, 33, 256, 8, 64), "T=33 E=256 k=8 block_m=64 (most experts empty)")
    yield Sample(_align_args(rng, dtype, 97, 64, 6, 1), "T=97 E=64 k=6 block_m=1")
    yield Sample(_align_args(rng, dtype, 200, 8, 8, 64), "T=200 E=8 k=8 block_m=64 (several blocks per expert)")
    yield Sample(_align_args(rng, dtype, 31, 16, 4, 16, _off_rank(rng, _routed(rng, 31, 16, 4), 16)),
                 "ids -1 and >= E skipped")
    yield Sample(_align_args(rng, dtype, 0, 4, 2, 16), "T=0", "edge")
    yield Sample(_align_args(rng, dtype, 13, 1, 1, 4), "E=1 k=1", "edge")
    yield Sample(_align_args(rng, dtype, 21, 16, 3, 16, rng.integers(0, 16, (21, 3))), "repeated experts in a token", "edge")
    yield Sample(_align_args(rng, dtype, 40, 16, 1, 16, np.full((40, 1), 3)), "every token to expert 3", "edge")
    yield Sample(_align_args(rng, dtype, 9, 8, 2, 4, np.full((9, 2), -1)), "every id -1", "edge")


def _align_errors(rng):
    ids = _routed(rng, 5, 8, 2)
    yield ErrorSample({"topk_ids": ids, "num_experts": 0, "block_m": 16}, "no experts", match="num_experts")
    yield ErrorSample({"topk_ids": ids, "num_experts": 8, "block_m": 0}, "block_m = 0", match="block_m")
    yield ErrorSample({"topk_ids": ids, "num_experts": None, "block_m": 16}, "num_experts missing", match="num_experts")
    yield ErrorSample({"topk_ids": ids.astype(np.float32), "num_experts": 8, "block_m": 16}, "float ids", match="dtype")
    yield ErrorSample({"topk_ids": ids.reshape(-1), "num_experts": 8, "block_m": 16}, "rank-1 ids", match="rank")


def _align_peer(t):
    """The padded layout with torch tensor ops (argsort, bincount, cumsum, scatter)."""
    import torch

    ids, e, bm = t["topk_ids"], t["num_experts"], t["block_m"]

    def run():
        flat = ids.reshape(-1).long()
        n = flat.numel()
        valid = (flat >= 0) & (flat < e)
        keyed = torch.where(valid, flat, e)
        order = torch.argsort(keyed, stable=True)
        counts = torch.bincount(keyed, minlength=e + 1)[:e]
        padded = (counts + bm - 1) // bm * bm
        offsets = torch.cat([padded.new_zeros(1), padded.cumsum(0)])
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        order = order[:int(starts[-1])]
        rank = torch.arange(order.numel()) - starts[flat[order]]
        cap = -(-(n + e * (bm - 1)) // bm) * bm
        sorted_ids = torch.full((cap,), n, dtype=torch.int32)
        sorted_ids[offsets[flat[order]] + rank] = order.int()
        block_experts = torch.full((cap // bm,), -1, dtype=torch.int32)
        owners = torch.repeat_interleave(torch.arange(e, dtype=torch.int32), padded // bm)
        block_experts[:owners.numel()] = owners
        return sorted_ids, block_experts, offsets.int(), offsets[-1:].int()

    return run


moe_align = OpDef(
    name="moe_align",
    doc="moe_align(topk_ids, num_experts, block_m) -> (sorted_ids [cap], block_experts [cap // block_m], "
    "expert_offsets [E + 1], total [1]), int32, cap = round_up(T*k + min(E, T*k)*(block_m - 1), block_m): the flat indices "
    "t*k + j grouped by expert (ascending within one), each segment padded with the sentinel T*k to a multiple "
    "of block_m; ids outside [0, E) are skipped.",
    params=[Tensor("topk_ids", dtypes=INTS, rank=2), Attr("num_experts", None, int, range=POSITIVE),
            Attr("block_m", None, int, range=POSITIVE)],
    check=_align_check,
    outputs=_align_outputs,
    results=("sorted_ids", "block_experts", "expert_offsets", "total"),
    reference=lambda a: list(align(a["topk_ids"], a["num_experts"], a["block_m"])),
    samples=_align_samples,
    error_samples=_align_errors,
    formats=lambda a: ["exact"] * 4,
    bench=lambda rng, dtype: _align_args(rng, dtype, 4096, 256, 8, 16),
    cost=lambda a: (0, a["topk_ids"].nbytes + 4 * sum(math.prod(s) for s, _ in _align_outputs(a))),
    torch_peer=_align_peer,
)

# ---------------------------------------------------------------- moe_permute / moe_unpermute


def _layout(rng, t, e, k, block_m, skipped=0.0):
    """(topk_ids, sorted_ids int32) of a random routing, with a fraction of ids on other ranks."""
    ids = _routed(rng, t, e, k)
    if skipped:
        ids = _off_rank(rng, ids, e, skipped)
    return ids, align(ids, e, block_m)[0].astype(np.int32)


def _scrambled(rng, t, k, extra):
    """sorted_ids not made by moe_align: every flat index once, in random order, plus `extra` rows
    holding values that are not flat indices (sentinel, negative, too large)."""
    junk = rng.choice([-7, -1, t * k, t * k + 9], extra)
    return rng.permutation(np.concatenate([np.arange(t * k), junk])).astype(np.int32)


def _permute_check(a):
    t = a["x"].shape[0]
    if a["topk_ids"].shape[0] != t:
        raise InvalidArgument("topk_ids", f"{t} rows, one per token of x", f"shape {tuple(a['topk_ids'].shape)}")


def _permute_reference(a):
    x, sid = a["x"], a["sorted_ids"].astype(np.int64)
    t, k = a["topk_ids"].shape
    valid = (sid >= 0) & (sid < t * k)
    out = np.zeros((sid.size, x.shape[1]))
    out[valid] = x[sid[valid] // k]
    return [out]


def _permute_args(rng, dtype, t, h, e, k, block_m, skipped=0.0):
    ids, sid = _layout(rng, t, e, k, block_m, skipped)
    return {"x": random(rng, (t, h), dtype), "topk_ids": ids, "sorted_ids": sid}


def _permute_samples(rng, dtype):
    yield Sample(_permute_args(rng, dtype, 7, 33, 8, 2, 16), "T=7 H=33 E=8 k=2 block_m=16")
    yield Sample(_permute_args(rng, dtype, 33, 256, 64, 8, 64), "T=33 H=256 E=64 k=8 block_m=64")
    yield Sample(_permute_args(rng, dtype, 19, 100, 16, 4, 1, skipped=0.3), "ids -1 / other ranks, block_m=1")
    wide = _permute_args(rng, dtype, 5, 1, 4, 2, 16)
    wide["topk_ids"] = wide["topk_ids"].astype(np.int64)
    yield Sample(wide, "H=1, int64 topk_ids")
    s = _permute_args(rng, dtype, 11, 40, 8, 2, 16)
    s["x"] = strided(s["x"])
    yield Sample(s, "strided x", "edge")
    loose = _permute_args(rng, dtype, 9, 24, 8, 3, 1)
    loose["sorted_ids"] = _scrambled(rng, 9, 3, 6)
    yield Sample(loose, "sorted_ids not from moe_align, with junk values", "edge")
    yield Sample(_permute_args(rng, dtype, 0, 16, 4, 2, 16), "T=0", "edge")


def _permute_errors(rng):
    a = _permute_args(rng, "float32", 5, 8, 4, 2, 4)
    yield ErrorSample(a | {"topk_ids": a["topk_ids"][:4]}, "T mismatch", match="topk_ids")
    yield ErrorSample(a | {"sorted_ids": a["sorted_ids"].astype(np.float32)}, "float sorted_ids", match="dtype")
    yield ErrorSample(a | {"sorted_ids": a["sorted_ids"].reshape(-1, 1)}, "2-D sorted_ids", match="rank")
    yield ErrorSample(a | {"x": np.ones((5, 8), np.int32)}, "int x", match="dtype")


def _permute_peer(t):
    import torch

    x, sid, k = t["x"], t["sorted_ids"], t["topk_ids"].shape[1]

    def run():
        n = t["topk_ids"].numel()
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])
        rows = torch.where((sid >= 0) & (sid < n), sid.long() // k, x.shape[0])
        return padded.index_select(0, rows)

    return run


moe_permute = OpDef(
    name="moe_permute",
    doc="moe_permute(x, topk_ids, sorted_ids) -> x_sorted [R, H]: row r is x[sorted_ids[r] // k] where "
    "0 <= sorted_ids[r] < T*k, else zeros (k from topk_ids' shape).",
    params=[Tensor("x", rank=2), Tensor("topk_ids", dtypes=INTS, rank=2), Tensor("sorted_ids", dtypes=("int32",), rank=1)],
    check=_permute_check,
    outputs=lambda a: [((a["sorted_ids"].shape[0], a["x"].shape[1]), name_of(a["x"].dtype))],
    reference=_permute_reference,
    samples=_permute_samples,
    error_samples=_permute_errors,
    bench=lambda rng, dtype: _permute_args(rng, dtype, 4096, 2048, 256, 8, 16),
    cost=lambda a: (0, (a["sorted_ids"].shape[0] + a["x"].shape[0]) * a["x"].shape[1] * a["x"].itemsize),
    torch_peer=_permute_peer,
)


def _unpermute_check(a):
    r = a["y"].shape[0]
    if a["sorted_ids"].shape[0] != r:
        raise InvalidArgument("sorted_ids", f"{r} entries, one per row of y", f"shape {tuple(a['sorted_ids'].shape)}")


def _gathered(a):
    """y's rows per (token, slot) as [T, k, H] (zeros where no row holds t*k + j), from the sorted layout."""
    y, sid = a["y"], a["sorted_ids"].astype(np.int64)
    t, k = a["topk_weights"].shape
    valid = (sid >= 0) & (sid < t * k)
    g = np.zeros((t * k, y.shape[1]))
    g[sid[valid]] = y[valid]
    return g.reshape(t, k, y.shape[1])


def _unpermute_reference(a):
    return [np.einsum("tk,tkh->th", a["topk_weights"], _gathered(a))]


def _unpermute_args(rng, dtype, t, h, e, k, block_m, skipped=0.0, weight_dtype="float32"):
    ids, sid = _layout(rng, t, e, k, block_m, skipped)
    return {"y": random(rng, (sid.size, h), dtype), "sorted_ids": sid,
            "topk_weights": rng.random((t, k)).astype(to_numpy(weight_dtype))}


def _unpermute_samples(rng, dtype):
    yield Sample(_unpermute_args(rng, dtype, 7, 33, 8, 2, 16), "T=7 H=33 E=8 k=2 block_m=16")
    yield Sample(_unpermute_args(rng, dtype, 33, 256, 64, 8, 64), "T=33 H=256 E=64 k=8 block_m=64")
    yield Sample(_unpermute_args(rng, dtype, 19, 100, 16, 4, 1, skipped=0.3), "ids -1 / other ranks: no contribution")
    yield Sample(_unpermute_args(rng, dtype, 6, 1, 4, 1, 4), "H=1 k=1")
    low = "bfloat16" if dtype != "bfloat16" else "float16"
    yield Sample(_unpermute_args(rng, dtype, 9, 48, 8, 2, 16, weight_dtype=low), f"weights in {low}", "edge")
    s = _unpermute_args(rng, dtype, 11, 40, 8, 2, 16)
    s["y"] = strided(s["y"])
    yield Sample(s, "strided y", "edge")
    loose = _unpermute_args(rng, dtype, 9, 24, 8, 3, 1)
    loose["sorted_ids"] = _scrambled(rng, 9, 3, 6)
    loose["y"] = random(rng, (loose["sorted_ids"].size, 24), dtype)
    yield Sample(loose, "sorted_ids not from moe_align, with junk values", "edge")
    yield Sample(_unpermute_args(rng, dtype, 0, 16, 4, 2, 16), "T=0", "edge")


def _unpermute_errors(rng):
    a = _unpermute_args(rng, "float32", 5, 8, 4, 2, 4)
    yield ErrorSample(a | {"sorted_ids": a["sorted_ids"][:-1]}, "R mismatch", match="sorted_ids")
    yield ErrorSample(a | {"topk_weights": a["topk_weights"].reshape(-1)}, "rank-1 weights", match="rank")
    yield ErrorSample(a | {"topk_weights": np.ones((5, 2), np.int32)}, "int weights", match="dtype")
    yield ErrorSample(a | {"y": np.ones(a["y"].shape, np.int32)}, "int y", match="dtype")


def _unpermute_peer(t):
    y, sid, w = t["y"], t["sorted_ids"].long(), t["topk_weights"]

    def run():
        n = w.numel()
        valid = (sid >= 0) & (sid < n)
        flat = sid[valid]
        out = y.new_zeros(w.shape[0], y.shape[1])
        scaled = y[valid] * w.reshape(-1)[flat].to(y.dtype).unsqueeze(1)
        return out.index_add_(0, flat // w.shape[1], scaled)

    return run


moe_unpermute = OpDef(
    name="moe_unpermute",
    doc="moe_unpermute(y, sorted_ids, topk_weights) -> out [T, H]: out[t] = sum over j of topk_weights[t, j] * "
    "(the row r of y with sorted_ids[r] == t*k + j, or 0 if none), fp32 accumulation in slot order.",
    params=[Tensor("y", rank=2), Tensor("sorted_ids", dtypes=("int32",), rank=1), Tensor("topk_weights", rank=2)],
    check=_unpermute_check,
    outputs=lambda a: [((a["topk_weights"].shape[0], a["y"].shape[1]), name_of(a["y"].dtype))],
    reference=_unpermute_reference,
    samples=_unpermute_samples,
    error_samples=_unpermute_errors,
    growth=lambda a: a["topk_weights"].shape[1],
    magnitude=lambda a, refs: [np.einsum("tk,tkh->th", np.abs(a["topk_weights"]), np.abs(_gathered(a)))],
    bench=lambda rng, dtype: _unpermute_args(rng, dtype, 4096, 2048, 256, 8, 16),
    cost=lambda a: (2 * a["topk_weights"].size * a["y"].shape[1],
                    (a["y"].shape[0] + a["topk_weights"].shape[0]) * a["y"].shape[1] * a["y"].itemsize),
    torch_peer=_unpermute_peer,
)

# ---------------------------------------------------------------- grouped_gemm, grouped_gemm_masked
#
# Two layouts of the experts' rows, one product. Contiguous (grouped_gemm, moe_align's layout):
# x_sorted [R, K], expert e owns rows expert_offsets[e] .. expert_offsets[e + 1]. Masked
# (grouped_gemm_masked: DeepEP's low-latency dispatch, DeepGEMM's masked GEMMs): x [E, M, K], expert
# e owns its first masked_m[e] rows, clamped to [0, M]; the rest of its M rows is room it did not
# fill (their values are anything, their outputs zeros), and the counts stay on the device (no host
# read: the call can be captured in a CUDA graph). Both are segments (expert, first row, end row)
# of a 2-D array of rows, which is what the references and the kernels work on.


def offset_segments(offsets):
    """(expert, first row, end row) of each expert of the contiguous layout."""
    off = np.asarray(offsets).astype(np.int64)
    return [(e, int(off[e]), int(off[e + 1])) for e in range(off.size - 1)]


def masked_counts(masked_m, m):
    """Rows of each expert of the masked layout: masked_m clamped to [0, M] (a count < 0 acts as 0, > M as M)."""
    return np.clip(np.asarray(masked_m).astype(np.int64), 0, m)


def masked_segments(masked_m, m):
    """(expert, first row, end row) of each expert of the masked layout, its [E, M] rows taken as E * M rows."""
    return [(e, e * m, e * m + int(c)) for e, c in enumerate(masked_counts(masked_m, m))]


def check_masked_rows(x_name, x):
    """The E * M rows of a masked layout within int32 (kernels index them so)."""
    e, m = x.shape[:2]
    if e * m >= 2**31:
        raise InvalidArgument(x_name, "E * M < 2**31 rows (int32 row indices)", f"shape {tuple(x.shape)}")


def _contiguous_rows(a):
    """grouped_gemm's rows: (x_sorted, the experts' segments)."""
    return a["x_sorted"], offset_segments(a["expert_offsets"])


def _masked_rows(a):
    """grouped_gemm_masked's rows: (x as [E * M, K], the experts' segments)."""
    e, m, k = a["x"].shape
    return a["x"].reshape(e * m, k), masked_segments(a["masked_m"], m)


def _out_features(a):
    return epilogue_columns(a["activation"], a["w"].shape[1])


def _out_shape(a, x):
    """The output's shape for the primary input x ([R, K] or [E, M, K]): its rows, then N."""
    return (*x.shape[:-1], _out_features(a))


def _check_weights(a, x_name):
    """w [E, Nw, K] against the activations: dtype, K, an even Nw for gated epilogues."""
    x, w = a[x_name], a["w"]
    k = x.shape[-1]
    if name_of(w.dtype) != name_of(x.dtype):
        raise InvalidArgument("w", f"the dtype of {x_name} ({name_of(x.dtype)})", name_of(w.dtype))
    if w.shape[2] != k:
        raise InvalidArgument("w", f"[E, N, {k}] to match {x_name}'s {k} columns", f"shape {tuple(w.shape)}")
    if is_gated(a["activation"]) and w.shape[1] % 2:
        raise InvalidArgument("w", f"an even N (gate and up halves) for {a['activation']}", f"shape {tuple(w.shape)}")


def _gg_check(a):
    _check_weights(a, "x_sorted")
    off, e = a["expert_offsets"], a["w"].shape[0]
    if tuple(off.shape) != (e + 1,):
        raise InvalidArgument("expert_offsets", f"shape ({e + 1},), E + 1 for w's {e} experts", tuple(off.shape))
    check_offsets("expert_offsets", off, 0, a["x_sorted"].shape[0])


def _masked_check(a):
    _check_weights(a, "x")
    e = a["x"].shape[0]
    if a["w"].shape[0] != e:
        raise InvalidArgument("w", f"[{e}, N, K], one matrix per expert of x", f"shape {tuple(a['w'].shape)}")
    if tuple(a["masked_m"].shape) != (e,):
        raise InvalidArgument("masked_m", f"shape ({e},), a row count per expert of x", tuple(a["masked_m"].shape))
    check_masked_rows("x", a["x"])  # the counts are not read: masked_counts says what any value means


def _products(segments, x, w):
    """Per row of x [R, K], x_row @ w[e].T of the expert e whose segment holds it (zeros outside every segment)."""
    h = np.zeros((x.shape[0], w.shape[1]))
    for e, lo, hi in segments:
        h[lo:hi] = x[lo:hi] @ w[e].T
    return h


def _grouped_reference(rows, a):
    x, segments = rows(a)
    return epilogue(a["activation"], _products(segments, x, a["w"]))


def _grouped_magnitude(rows, a):
    # The fp32 dot products err relative to |x| @ |w|.T; the activation carries that error on
    # (ops/activations.py: epilogue_magnitude).
    x, segments = rows(a)
    bound = _products(segments, np.abs(x), np.abs(a["w"]))
    if a["activation"] is None:
        return bound
    return epilogue_magnitude(a["activation"], _products(segments, x, a["w"]), bound)


def _grouped_cost(rows, a):
    x, segments = rows(a)
    w, used = a["w"], sum(hi - lo for _, lo, hi in segments)
    return 2 * used * w.shape[1] * w.shape[2], x.nbytes + w.nbytes + x.shape[0] * _out_features(a) * x.itemsize


def _weights(rng, dtype, e, n, k, activation):
    """w [E, N, K], [E, 2N, K] for a gated activation."""
    return random(rng, (e, 2 * n if is_gated(activation) else n, k), dtype)


def _gg_args(rng, dtype, offsets, k, n, rows=None, activation=None, offset_dtype="int32"):
    offsets = np.asarray(offsets)
    rows = int(offsets[-1]) if rows is None else rows
    return {"x_sorted": random(rng, (rows, k), dtype), "w": _weights(rng, dtype, offsets.size - 1, n, k, activation),
            "expert_offsets": offsets.astype(to_numpy(offset_dtype)), "activation": activation}


def _gg_samples(rng, dtype):
    yield Sample(_gg_args(rng, dtype, [3, 10, 10, 25, 40], 33, 17, rows=45),
                 "E=4 unaligned offsets, offsets[0] = 3, an empty expert, rows past the last")
    aligned = align(_routed(rng, 20, 8, 2), 8, 16)[2]
    yield Sample(_gg_args(rng, dtype, aligned, 64, 48, activation="silu_and_mul"), "E=8 moe_align layout silu_and_mul")
    yield Sample(_gg_args(rng, dtype, [0, 37], 129, 65), "E=1 K=129 N=65")
    yield Sample(_gg_args(rng, dtype, [5, 6, 6, 6, 70, 71], 65, 31, rows=80, activation="silu_and_mul"),
                 "K, N odd, 1-row experts, silu_and_mul")
    yield Sample(_gg_args(rng, dtype, np.sort(rng.integers(0, 300, 6)), 256, 96, rows=300, offset_dtype="int64"),
                 "E=5 random offsets (int64), K=256")
    sparse = np.concatenate([[0], np.cumsum(rng.choice([0, 0, 0, 1, 7, 19], 16))])
    yield Sample(_gg_args(rng, dtype, sparse, 96, 65, activation="silu_and_mul"), "E=16 mostly empty experts silu_and_mul")
    s = _gg_args(rng, dtype, [0, 9, 30], 40, 24)
    s["x_sorted"] = strided(s["x_sorted"])
    yield Sample(s, "strided x_sorted", "edge")
    yield Sample(_gg_args(rng, dtype, [0, 0, 0], 16, 8, rows=0), "R=0", "edge")
    yield Sample(_gg_args(rng, dtype, [2, 2, 2, 2], 16, 8, rows=5), "every expert empty: zeros", "edge")
    yield Sample(_gg_args(rng, dtype, [1, 4, 9], 0, 8, rows=10, activation="silu_and_mul"), "K=0: zeros", "edge")
    # Every other epilogue once, small: gated ones over two experts (one empty), plain ones over one.
    for act in EPILOGUES:
        if act is not None and act != "silu_and_mul":
            yield Sample(_gg_args(rng, dtype, [0, 11, 11, 20], 40, 19, activation=act), f"E=3 N=19 {act}")


def _gg_errors(rng):
    f32 = "float32"
    a = _gg_args(rng, f32, [0, 3, 7], 8, 6, rows=8)
    yield ErrorSample(a | {"w": random(rng, (2, 6, 9), f32)}, "K mismatch", match="w")
    yield ErrorSample(a | {"w": random(rng, (2, 6, 8), "bfloat16")}, "dtype mismatch", match="dtype")
    yield ErrorSample(a | {"expert_offsets": np.array([0, 3], np.int32)}, "offsets length", match="expert_offsets")
    yield ErrorSample(a | {"expert_offsets": np.array([0, 5, 3], np.int32)}, "decreasing offsets", match="expert_offsets")
    yield ErrorSample(a | {"expert_offsets": np.array([0, 3, 9], np.int32)}, "offsets past R", match="expert_offsets")
    yield ErrorSample(a | {"expert_offsets": np.array([-1, 3, 7], np.int32)}, "negative offset", match="expert_offsets")
    yield ErrorSample(a | {"expert_offsets": np.array([0, 3, 7], np.float32)}, "float offsets", match="dtype")
    yield ErrorSample(a | {"w": random(rng, (2, 7, 8), f32), "activation": "silu_and_mul"}, "odd 2N for silu_and_mul", match="even")
    yield ErrorSample(a | {"w": random(rng, (2, 7, 8), f32), "activation": "gelu_and_mul"}, "odd 2N for gelu_and_mul", match="even")
    yield ErrorSample(a | {"activation": "tanh"}, "unknown activation", match="activation")
    yield ErrorSample(a | {"w": random(rng, (6, 8), f32)}, "rank-2 w", match="rank")


def _torch_grouped(x, w, segments, act):
    """The loop over experts a user writes: one F.linear per expert on its rows of x [R, K], zeros elsewhere."""
    import torch.nn.functional as F

    out = x.new_zeros(x.shape[0], epilogue_columns(act, w.shape[1]))
    for e, lo, hi in segments:
        if hi > lo:
            out[lo:hi] = torch_epilogue(act, F.linear(x[lo:hi], w[e]))
    return out


def _gg_peer(t):
    return lambda: _torch_grouped(t["x_sorted"], t["w"], offset_segments(t["expert_offsets"].tolist()), t["activation"])


def _masked_peer(t):
    x = t["x"]
    e, m, k = x.shape
    return lambda: _torch_grouped(x.reshape(e * m, k), t["w"], masked_segments(t["masked_m"].tolist(), m), t["activation"]).unflatten(0, (e, m))


def moe_bench_shapes(rng, dtype, tokens=4096, experts=256, k=8, hidden=2048, inter=1024, block_m=1):
    """A DeepSeek-like MoE block scaled to a small machine: routing, the layout, weights (w13 [E, 2I, H], w2 [E, H, I])."""
    logits = _grid(rng, (tokens, experts), *_SIGMOID_GRID, "float32")
    bias = _bias(rng, np.array(_SIGMOID_BIAS), experts, 8).astype(np.float32)
    w, ids = _route_reference({"logits": logits.astype(np.float64), "k": k, "scoring": "sigmoid", "n_group": 8,
                               "topk_group": 4, "bias": bias.astype(np.float64), "renormalize": True, "scaling": 2.5})
    sid, _, offsets, _ = align(ids, experts, block_m)
    npd = to_numpy(dtype)

    def weights(shape, fan_in):  # float32 draws: a float64 temporary of w13 would be 8 GiB
        return (rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(fan_in))).astype(npd)

    return {"x": random(rng, (tokens, hidden), dtype), "logits": logits.astype(npd), "bias": bias,
            "topk_weights": w.astype(np.float32), "topk_ids": ids, "sorted_ids": sid.astype(np.int32),
            "expert_offsets": offsets.astype(np.int32), "w13": weights((experts, 2 * inter, hidden), hidden),
            "w2": weights((experts, hidden, inter), inter)}


def _gg_bench(rng, dtype):
    s = moe_bench_shapes(rng, dtype)
    rows = int(s["expert_offsets"][-1])
    return {"x_sorted": random(rng, (rows, s["w13"].shape[2]), dtype), "w": s["w13"],
            "expert_offsets": s["expert_offsets"], "activation": "silu_and_mul"}


_EPILOGUE_DOC = ("activation: None, relu, gelu, gelu_tanh or silu applied to h, or a gated '<act>_and_mul' (silu_and_mul, "
                 "gelu_and_mul, ...) that takes w [E, 2N, K] and returns act(h[:, :N]) * h[:, N:].")


def _grouped_op(name, doc, x, expert_rows, rows, **data):
    """The OpDef of a grouped GEMM over one layout of the experts' rows: `x` and `expert_rows` its Tensors,
    rows(a) -> (x as [R, K] rows, the experts' segments); `data`: check, samples, error_samples, bench, torch_peer."""

    def shape(a):
        return _out_shape(a, a[x.name])

    return OpDef(
        name=name,
        doc=doc + _EPILOGUE_DOC,
        params=[x, Tensor("w", rank=3), expert_rows, "*", Attr("activation", None, choices=EPILOGUES)],
        outputs=lambda a: [(shape(a), name_of(a[x.name].dtype))],
        reference=lambda a: [_grouped_reference(rows, a).reshape(shape(a))],
        growth=lambda a: math.sqrt(max(a[x.name].shape[-1], 1)),
        magnitude=lambda a, refs: [_grouped_magnitude(rows, a).reshape(shape(a))],
        cost=lambda a: _grouped_cost(rows, a),
        **data,
    )


grouped_gemm = _grouped_op(
    "grouped_gemm",
    "grouped_gemm(x_sorted, w, expert_offsets, *, activation=None) -> out [R, N]: out[r] = x_sorted[r] @ w[e].T "
    "for expert_offsets[e] <= r < expert_offsets[e + 1], zeros outside every segment, fp32 accumulation; ",
    Tensor("x_sorted", rank=2), Tensor("expert_offsets", dtypes=INTS, rank=1), _contiguous_rows,
    check=_gg_check, samples=_gg_samples, error_samples=_gg_errors, bench=_gg_bench, torch_peer=_gg_peer,
)

# ---------------------------------------------------------------- grouped_gemm_masked


def _masked_args(rng, dtype, counts, m, k, n, activation=None, index="int32"):
    counts = np.asarray(counts, np.int64)
    return {"x": random(rng, (counts.size, m, k), dtype), "w": _weights(rng, dtype, counts.size, n, k, activation),
            "masked_m": counts.astype(to_numpy(index)), "activation": activation}


def _masked_samples(rng, dtype):
    yield Sample(_masked_args(rng, dtype, [3, 0, 20, 11], 20, 33, 17), "E=4 M=20 K=33 N=17: an empty and a full expert")
    yield Sample(_masked_args(rng, dtype, [70, 65, 1], 70, 64, 48, "silu_and_mul"), "M=70: counts past one 64-row tile, silu_and_mul")
    yield Sample(_masked_args(rng, dtype, [1], 1, 129, 65), "E=1 M=1 K=129 N=65")
    yield Sample(_masked_args(rng, dtype, rng.integers(0, 2, 8), 1, 96, 40, "silu_and_mul"),
                 "decode-like: E=8 M=1, counts 0 or 1, silu_and_mul")
    yield Sample(_masked_args(rng, dtype, rng.integers(0, 10, 5), 9, 256, 96, index="int64"), "E=5 M=9 random counts (int64), K=256")
    yield Sample(_masked_args(rng, dtype, [-3, 15, 2**31 - 1, 4], 10, 24, 16), "counts < 0 and > M: 0 and M rows", "edge")
    yield Sample(_masked_args(rng, dtype, [-2**40, 2**32 + 3, 2**33, 7], 10, 24, 16, "silu_and_mul", index="int64"),
                 "int64 counts < 0 and past 2**32 (M rows, not their low word 3): 0 and M rows", "edge")
    junk = _masked_args(rng, dtype, [2, 5, 0], 6, 40, 12)
    junk["x"][0, 2:] = np.nan
    junk["x"][2] = np.inf
    yield Sample(junk, "NaN and inf in the rows past the counts: zeros there", "edge")
    s = _masked_args(rng, dtype, [4, 9], 9, 40, 24)
    s["x"] = strided(s["x"])
    yield Sample(s, "strided x", "edge")
    yield Sample(_masked_args(rng, dtype, [0, 0, 0], 5, 16, 8), "every count 0: zeros", "edge")
    yield Sample(_masked_args(rng, dtype, [0, 0], 0, 16, 8), "M=0", "edge")
    yield Sample(_masked_args(rng, dtype, [], 4, 16, 8), "E=0", "edge")
    yield Sample(_masked_args(rng, dtype, [2, 5], 6, 0, 8, "silu_and_mul"), "K=0: zeros", "edge")
    for act in EPILOGUES:
        if act is not None and act != "silu_and_mul":
            yield Sample(_masked_args(rng, dtype, [7, 0, 11], 11, 40, 19, act), f"E=3 M=11 N=19 {act}")


def _masked_errors(rng):
    f32 = "float32"
    a = _masked_args(rng, f32, [3, 1], 4, 8, 6)
    yield ErrorSample(a | {"w": random(rng, (2, 6, 9), f32)}, "K mismatch", match="w")
    yield ErrorSample(a | {"w": random(rng, (3, 6, 8), f32)}, "w for 3 of x's 2 experts", match="w")
    yield ErrorSample(a | {"w": random(rng, (2, 6, 8), "bfloat16")}, "dtype mismatch", match="dtype")
    yield ErrorSample(a | {"masked_m": np.array([3, 1], np.float32)}, "float masked_m", match="dtype")
    yield ErrorSample(a | {"masked_m": np.array([3, 1, 0], np.int32)}, "masked_m for 3 experts", match="masked_m")
    yield ErrorSample(a | {"masked_m": np.array([[3, 1]], np.int32)}, "rank-2 masked_m", match="rank")
    yield ErrorSample(a | {"w": random(rng, (2, 7, 8), f32), "activation": "silu_and_mul"}, "odd 2N for silu_and_mul", match="even")
    yield ErrorSample(a | {"x": random(rng, (8, 8), f32)}, "rank-2 x", match="rank")
    yield ErrorSample(a | {"activation": "tanh"}, "unknown activation", match="activation")


def _masked_bench(rng, dtype, experts=8, m=256, k=2048, n=1024):
    """DeepEP's low-latency dispatch into DeepGEMM's masked layout, DeepSeek-like gate/up projection: 8 local
    experts with room for 256 tokens each, 128..256 of them received."""
    return _masked_args(rng, dtype, rng.integers(128, m + 1, experts), m, k, n, "silu_and_mul")


grouped_gemm_masked = _grouped_op(
    "grouped_gemm_masked",
    "grouped_gemm_masked(x, w, masked_m, *, activation=None) -> out [E, M, N]: the masked layout of DeepEP's "
    "low-latency mode: out[e, m] = x[e, m] @ w[e].T for m < clamp(masked_m[e], 0, M), exact zeros in every other row, "
    "fp32 accumulation; x [E, M, K], w [E, N, K], masked_m [E] int32 / int64. The counts are never read on the host "
    "(the call can be captured in a CUDA graph), so they are not checked: a count < 0 acts as 0 and one > M as M. ",
    Tensor("x", rank=3), Tensor("masked_m", dtypes=INTS, rank=1), _masked_rows,
    check=_masked_check, samples=_masked_samples, error_samples=_masked_errors, bench=_masked_bench, torch_peer=_masked_peer,
)

OPS = (moe_route, moe_align, moe_permute, moe_unpermute, grouped_gemm, grouped_gemm_masked)
