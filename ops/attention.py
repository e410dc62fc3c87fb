"""Attention for long sequences and LLM serving: attention (prefill, dense or varlen-packed),
paged_decode_attention (one query token per sequence against a paged KV cache), and mla_decode
(DeepSeek's multi-head latent attention in its absorbed decode form).

Conventions shared by the three ops and every backend:
- grouped-query attention: query head h reads KV head h // (heads_q / heads_kv);
- causal masking is aligned to the bottom right: with seq_q queries and seq_k keys, query i sits at
  key position i + seq_k - seq_q and sees keys j <= that position (the decode and prefix-cache
  convention; for seq_q == seq_k it is ordinary causal masking);
- `window` W keeps keys with position - j < W (and, without causal, j - position < W too);
- `softcap` c replaces each scaled logit s by c * tanh(s / c);
- a query that sees no key at all (causal with seq_q > seq_k, say) outputs zeros.

Conformance follows the strongest attention test suites: besides the float64 reference, the op
is computed naively in the kernel's own dtype (scores, probabilities and output rounded to it),
and the kernel's error per query row must be at most twice that naive error plus the noise floor.
"""
import math

import numpy as np

from hal.dtypes import FLOATS, name_of, to_numpy
from hal.opdef import Attr, POSITIVE, InvalidArgument, check_offsets, check_range, host_values, ErrorSample, OpDef, Sample, Tensor, random

FP8_KV = ("float8_e4m3fn", "float8_e4m3fnuz")
INDEX = ("int32",)


def _rows_softmax(scores, allowed):
    """Softmax over the last axis where `allowed`; rows with nothing allowed give zeros."""
    s = np.where(allowed, scores, -np.inf)
    peak = s.max(axis=-1, keepdims=True)
    e = np.where(allowed, np.exp(s - np.where(np.isfinite(peak), peak, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def _softcap(s, softcap):
    return s if softcap is None else softcap * np.tanh(s / softcap)


def _allowed(sq, sk, causal, window):
    pos = np.arange(sq)[:, None] + (sk - sq)
    key = np.arange(sk)[None, :]
    ok = np.ones((sq, sk), bool)
    if causal:
        ok &= key <= pos
    if window is not None:
        ok &= pos - key < window
        if not causal:
            ok &= key - pos < window
    return ok


def _attend(q, k, v, scale, causal, window, softcap, rounding=None):
    """One sequence: q [sq, hq, d], k [sk, hkv, d], v [sk, hkv, dv] -> [sq, hq, dv].

    `rounding` (a dtype) rounds scores, probabilities and the output to it: the naive low-precision
    computation the conformance rule compares against."""
    sq, hq, _ = q.shape
    sk, hkv, dv = v.shape
    if sk == 0:
        return np.zeros((sq, hq, dv), q.dtype)
    group = hq // hkv
    rnd = (lambda x: x.astype(rounding).astype(np.float32)) if rounding is not None else (lambda x: x)
    allowed = _allowed(sq, sk, causal, window)
    out = np.zeros((sq, hq, dv), q.dtype)
    chunk = max(1, 2**22 // max(sk, 1))  # bound the materialized scores to ~4M per head
    for h in range(hq):
        kh, vh = k[:, h // group, :], v[:, h // group, :]
        for start in range(0, sq, chunk):
            rows = slice(start, start + chunk)
            s = rnd(_softcap(rnd(q[rows, h, :] @ kh.T) * scale, softcap))
            p = rnd(_rows_softmax(s, allowed[rows]))
            if np.isfinite(vh).all():
                out[rows, h, :] = rnd(p @ vh)
            else:  # a key a row may not see is left out, not weighted by 0 (0 * inf is NaN)
                out[rows, h, :] = rnd(np.stack([p[i, m] @ vh[m] for i, m in enumerate(allowed[rows])]))
    return out


def _sequences(a):
    """(q, k, v) per sequence: the batch of a dense call or the packed sequences of a varlen one."""
    q, k, v = a["q"], a["k"], a["v"]
    if a["cu_seqlens_q"] is None:
        return [(q[b], k[b], v[b]) for b in range(q.shape[0])]
    cq, ck = np.asarray(a["cu_seqlens_q"]), np.asarray(a["cu_seqlens_k"])
    return [(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]]) for i in range(len(cq) - 1)]


def _scale(a):
    return a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(a["q"].shape[-1])


def _score_growth(a, d):
    """A score's fp32 rounding grows with |scale| * sum |q_i k_i| ~ |scale| * d (d the dot length), and the
    output moves with it; the naive fp32 run sums in another order, so it does not bound that part."""
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    return max(1.0, abs(scale) * d)


def _attention_run(a, rounding=None, dtype=np.float64):
    outs = [_attend(q.astype(dtype), k.astype(dtype), v.astype(dtype), _scale(a), a["causal"], a["window"], a["softcap"], rounding)
            for q, k, v in _sequences(a)]
    if a["cu_seqlens_q"] is None:
        return [np.stack(outs) if outs else np.zeros(_out_shape(a))]
    return [np.concatenate(outs) if outs else np.zeros(_out_shape(a))]


def _out_shape(a):
    return tuple(a["q"].shape[:-1]) + (a["v"].shape[-1],)


def _check_cu(name, cu, total):
    if cu is None:
        return
    if name_of(cu.dtype) != "int32" or len(cu.shape) != 1 or cu.shape[0] < 1:
        raise InvalidArgument(name, "an int32 vector [num_sequences + 1]", f"{name_of(cu.dtype)} {tuple(cu.shape)}")
    check_offsets(name, cu, 0, total, exact=True)


def _attention_check(a):
    q, k, v = a["q"], a["k"], a["v"]
    varlen = a["cu_seqlens_q"] is not None
    if varlen != (a["cu_seqlens_k"] is not None):
        raise InvalidArgument("cu_seqlens_k", "given together with cu_seqlens_q", "only one of them")
    rank = 3 if varlen else 4
    for name in ("q", "k", "v"):
        if len(a[name].shape) != rank:
            raise InvalidArgument(name, f"rank {rank} ({'[tokens, heads, d]' if varlen else '[batch, seq, heads, d]'})", f"shape {tuple(a[name].shape)}")
    for name in ("k", "v"):
        if name_of(a[name].dtype) != name_of(q.dtype):
            raise InvalidArgument(name, f"the dtype of q ({name_of(q.dtype)})", name_of(a[name].dtype))
    if tuple(k.shape[:-1]) != tuple(v.shape[:-1]):
        raise InvalidArgument("v", f"shape {tuple(k.shape[:-1])} + (d_v,) to match k", tuple(v.shape))
    if not varlen and k.shape[0] != q.shape[0]:
        raise InvalidArgument("k", f"batch {q.shape[0]} like q", k.shape[0])
    if k.shape[-1] != q.shape[-1]:
        raise InvalidArgument("k", f"head dim {q.shape[-1]} like q", k.shape[-1])
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise InvalidArgument("k", f"a number of heads dividing q's {hq}", hkv)
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise InvalidArgument("q", "non-empty head dims", f"{q.shape[-1]} and {v.shape[-1]}")
    if varlen:
        _check_cu("cu_seqlens_q", a["cu_seqlens_q"], q.shape[0])
        _check_cu("cu_seqlens_k", a["cu_seqlens_k"], k.shape[0])
        if a["cu_seqlens_q"].shape != a["cu_seqlens_k"].shape:
            raise InvalidArgument("cu_seqlens_k", f"as many sequences as cu_seqlens_q ({a['cu_seqlens_q'].shape[0] - 1})", a["cu_seqlens_k"].shape[0] - 1)
    if a["softcap"] is not None and not a["softcap"] > 0:
        raise InvalidArgument("softcap", "a float > 0", a["softcap"])


def _dense(rng, dtype, batch, sq, sk, hq, hkv, d, dv=None, **attrs):
    a = {"q": random(rng, (batch, sq, hq, d), dtype), "k": random(rng, (batch, sk, hkv, d), dtype),
         "v": random(rng, (batch, sk, hkv, dv or d), dtype), "causal": False, "scale": None, "window": None,
         "softcap": None, "cu_seqlens_q": None, "cu_seqlens_k": None}
    a.update(attrs)
    return a


def _varlen(rng, dtype, lens_q, lens_k, hq, hkv, d, **attrs):
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    a = {"q": random(rng, (int(cq[-1]), hq, d), dtype), "k": random(rng, (int(ck[-1]), hkv, d), dtype),
         "v": random(rng, (int(ck[-1]), hkv, d), dtype), "causal": False, "scale": None, "window": None,
         "softcap": None, "cu_seqlens_q": cq, "cu_seqlens_k": ck}
    a.update(attrs)
    return a


def _huge_masked_value(a):
    """Key seq_k - 1 is visible only to the last query under causal masking: make its V row 1000."""
    a["v"][..., -1, :, :] = (np.abs(a["v"][..., -1, :, :].astype(np.float32)) + 1000.0).astype(a["v"].dtype)
    return a


def _attention_samples(rng, dtype):
    for sq, sk in [(1, 1), (1, 1000), (113, 203), (239, 1), (1023, 1024)]:
        yield Sample(_dense(rng, dtype, 2, sq, sk, 4, 2, 64), f"seq {sq}x{sk} gqa 4/2 d64")
        yield Sample(_dense(rng, dtype, 1, sq, sk, 4, 1, 64, causal=True), f"seq {sq}x{sk} causal mqa 4/1 d64")
    yield Sample(_huge_masked_value(_dense(rng, dtype, 1, 4224, 4224, 1, 1, 64, causal=True)), "seq 4224x4224 causal, masked V = 1000")
    yield Sample(_huge_masked_value(_dense(rng, dtype, 1, 300, 300, 2, 2, 128, causal=True)), "causal, masked V = 1000, d128")
    for d in (32, 80, 96, 128, 192, 256, 59, 111):
        yield Sample(_dense(rng, dtype, 1, 37, 70, 2, 1, d, causal=d % 2 == 0), f"head dim {d}")
    yield Sample(_dense(rng, dtype, 1, 50, 90, 2, 2, 64, 32), "d_v 32 != d 64")
    yield Sample(_dense(rng, dtype, 1, 130, 130, 2, 1, 64, causal=True, window=17), "causal sliding window 17")
    yield Sample(_dense(rng, dtype, 1, 70, 99, 2, 1, 64, window=9), "two-sided window 9")
    yield Sample(_dense(rng, dtype, 1, 64, 150, 4, 2, 64, softcap=5.0, scale=0.5), "softcap 5, scale 0.5")
    varlen = _varlen(rng, dtype, [1, 300, 17, 64, 3], [5, 300, 40, 1, 0], 4, 2, 64, causal=True)
    first, last = varlen["cu_seqlens_k"][2:4]
    varlen["v"][first:last] = (varlen["v"][first:last].astype(np.float32) * 1000).astype(varlen["v"].dtype)  # sequence 2 only
    yield Sample(varlen, "varlen: 5 sequences of very different lengths, one with V ~ 1000, one without keys", "edge")
    yield Sample(_dense(rng, dtype, 1, 9, 5, 2, 2, 64, causal=True), "causal seq_q > seq_k: first rows see nothing", "edge")
    s = _dense(rng, dtype, 2, 33, 47, 2, 1, 64)
    s["k"] = np.ascontiguousarray(np.swapaxes(np.ascontiguousarray(np.swapaxes(s["k"], 1, 2)), 1, 2))
    s["q"] = np.swapaxes(np.ascontiguousarray(np.swapaxes(s["q"], 1, 2)), 1, 2)  # [B, H, S, D] memory, a strided view
    yield Sample(s, "q as a view of [batch, heads, seq, d] memory", "edge")
    yield Sample(_dense(rng, dtype, 0, 4, 4, 2, 1, 64), "empty batch", "edge")


def _attention_errors(rng):
    f32 = "float32"
    base = lambda **o: _dense(rng, f32, 1, 4, 6, 4, 2, 16) | o  # noqa: E731
    yield ErrorSample(base(k=random(rng, (1, 6, 3, 16), f32), v=random(rng, (1, 6, 3, 16), f32)), "heads_kv not dividing heads_q", match="heads")
    yield ErrorSample(base(k=random(rng, (1, 6, 2, 8), f32)), "head dim mismatch", match="head dim")
    yield ErrorSample(base(v=random(rng, (1, 5, 2, 16), f32)), "v length", match="v")
    yield ErrorSample(base(q=random(rng, (4, 4, 16), f32)), "rank-3 q without cu_seqlens", match="rank 4")
    yield ErrorSample(base(v=random(rng, (1, 6, 2, 16), "float16")), "dtype mismatch", match="dtype")
    yield ErrorSample(base(window=0), "window 0", match="window")
    yield ErrorSample(base(softcap=-1.0), "negative softcap", match="softcap")
    v = _varlen(rng, f32, [2, 3], [2, 3], 2, 1, 16)
    yield ErrorSample(v | {"cu_seqlens_q": np.array([0, 2, 4], np.int32)}, "cu_seqlens_q not ending at tokens", match="cu_seqlens_q")
    yield ErrorSample(v | {"cu_seqlens_k": None}, "only cu_seqlens_q", match="cu_seqlens_k")


def _attention_peer(t):
    import torch.nn.functional as F

    q, k, v = (t[n].transpose(1, 2) for n in ("q", "k", "v"))
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=t["causal"], scale=t["scale"], enable_gqa=True)


def _attention_bench(rng, dtype, seq=4096, causal=False):
    return _dense(rng, dtype, 1, seq, seq, 32, 8, 128, causal=causal)


def _attention_cost(a):
    b, sq, hq, d = a["q"].shape
    flops = 4 * b * sq * a["k"].shape[1] * hq * d * (0.5 if a["causal"] else 1.0)
    return flops, a["q"].nbytes + a["k"].nbytes + a["v"].nbytes + a["q"].nbytes


def _abs_values(a, value_names):
    """The arguments with the value tensors replaced by their absolute values."""
    return {k: np.abs(v) if k in value_names else v for k, v in a.items()}


attention = OpDef(
    name="attention",
    doc="attention(q, k, v, *, causal=False, scale=None, window=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None): "
    "softmax(q k^T * scale) v without materializing the scores; q [batch, seq_q, heads_q, d] (or [tokens, heads_q, d] "
    "with cu_seqlens), GQA/MQA, causal aligned bottom-right, sliding window, tanh soft-capping.",
    params=[Tensor("q", min_rank=3), Tensor("k", min_rank=3), Tensor("v", min_rank=3), "*",
            Attr("causal", False, bool), Attr("scale", None, float), Attr("window", None, int, range=POSITIVE), Attr("softcap", None, float),
            Tensor("cu_seqlens_q", INDEX, optional=True, rank=1), Tensor("cu_seqlens_k", INDEX, optional=True, rank=1)],
    check=_attention_check,
    outputs=lambda a: [(_out_shape(a), name_of(a["q"].dtype))],
    reference=_attention_run,
    naive=lambda a, dtype: _attention_run(a, to_numpy(dtype), np.float32),
    growth=lambda a: _score_growth(a, a["q"].shape[-1]),
    # fp32 accumulation of P V is accurate relative to P |V|, not to a result that cancels
    magnitude=lambda a, refs: _attention_run(_abs_values(a, ("v",))),
    samples=_attention_samples,
    error_samples=_attention_errors,
    bench=_attention_bench,
    cost=_attention_cost,
    torch_peer=_attention_peer,
)


# ---------------------------------------------------------------- paged KV cache


def _gather(cache, table, length):
    """Rows 0..length-1 of one sequence from a paged cache [num_blocks, block_size, ...]."""
    block = cache.shape[1]
    t = np.arange(length)
    return cache[np.asarray(table)[t // block], t % block]


def _check_paging(a, cache):
    """block_table and seq_lens against the paged cache argument `cache`."""
    table, lens = a["block_table"], a["seq_lens"]
    num_blocks, block_size = a[cache].shape[:2]
    if len(table.shape) != 2 or table.shape[0] != len(lens):
        raise InvalidArgument("block_table", f"shape [{lens.shape[0]}, max_blocks]", tuple(table.shape))
    check_range("seq_lens", lens, 1, table.shape[1] * block_size + 1, "lengths (block_table width x block size at most)")
    # Block tables are small: read on the host, where the blocks in use are picked by each row's length.
    host_lens, host_table = host_values("seq_lens", lens), host_values("block_table", table)
    if host_lens is None:  # shapes only (torch tracing)
        return
    host_lens = host_lens.astype(np.int64)
    used = np.arange(table.shape[1])[None, :] < -(-host_lens // block_size)[:, None]
    bad = used & ((host_table < 0) | (host_table >= num_blocks))
    if bad.any():
        b = int(np.argmax(bad.any(axis=1)))
        row = host_table[b][used[b]]
        raise InvalidArgument("block_table", f"block ids in [0, {num_blocks}) for the blocks in use", f"row {b}: [{row.min()}, {row.max()}]")


def _paged_check(a):
    q, kc, vc = a["q"], a["k_cache"], a["v_cache"]
    b, hq, d = q.shape
    if d == 0 or vc.shape[-1] == 0:
        raise InvalidArgument("q", "non-empty head dims", f"{d} and {vc.shape[-1]}")
    if len(kc.shape) != 4 or kc.shape[-1] != d:
        raise InvalidArgument("k_cache", f"[num_blocks, block_size, heads_kv, {d}]", tuple(kc.shape))
    if tuple(vc.shape[:3]) != tuple(kc.shape[:3]) or len(vc.shape) != 4:
        raise InvalidArgument("v_cache", f"[{kc.shape[0]}, {kc.shape[1]}, {kc.shape[2]}, d_v]", tuple(vc.shape))
    if name_of(vc.dtype) != name_of(kc.dtype):
        raise InvalidArgument("v_cache", f"the dtype of k_cache ({name_of(kc.dtype)})", name_of(vc.dtype))
    fp8 = name_of(kc.dtype) in FP8_KV
    if not fp8 and name_of(kc.dtype) != name_of(q.dtype):
        raise InvalidArgument("k_cache", f"the dtype of q ({name_of(q.dtype)}) or fp8 ({', '.join(FP8_KV)})", name_of(kc.dtype))
    if kc.shape[2] == 0 or hq % kc.shape[2]:
        raise InvalidArgument("k_cache", f"a number of heads dividing q's {hq}", kc.shape[2])
    if len(a["seq_lens"].shape) != 1 or a["seq_lens"].shape[0] != b:
        raise InvalidArgument("seq_lens", f"shape ({b},)", tuple(a["seq_lens"].shape))
    _check_paging(a, "k_cache")
    if a["softcap"] is not None and not a["softcap"] > 0:
        raise InvalidArgument("softcap", "a float > 0", a["softcap"])


def _kv_scale(a, name):
    return 1.0 if a[name] is None else a[name]


def _paged_run(a, rounding=None, dtype=np.float64):
    q = a["q"]
    b, hq, d = q.shape
    out = np.zeros((b, hq, a["v_cache"].shape[-1]), dtype)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    for i in range(b):
        n = int(a["seq_lens"][i])
        k = _gather(a["k_cache"], a["block_table"][i], n).astype(dtype) * _kv_scale(a, "k_scale")
        v = _gather(a["v_cache"], a["block_table"][i], n).astype(dtype) * _kv_scale(a, "v_scale")
        out[i] = _attend(q[i][None].astype(dtype), k, v, scale, False, None, a["softcap"], rounding)[0]
    return [out]


def paged_cache(rng, dtype, lens, heads_kv, d, block_size, scale=1.0):
    """A shuffled paged cache holding sequences of the given lengths: (cache, block_table)."""
    blocks = [-(-n // block_size) for n in lens]
    total = sum(blocks) + 3  # a few blocks nobody uses
    order = rng.permutation(total)
    table = np.full((len(lens), max(blocks)), -1, np.int32)
    at = 0
    for i, n in enumerate(blocks):
        table[i, :n] = order[at:at + n]
        at += n
    values = rng.standard_normal((total, block_size, heads_kv, d)) * scale
    return values.astype(to_numpy(dtype)), table


def _paged_args(rng, dtype, lens, hq, hkv, d, block_size, kv_dtype=None, **attrs):
    kv_dtype = kv_dtype or dtype
    fp8 = kv_dtype in FP8_KV
    k_cache, table = paged_cache(rng, kv_dtype, lens, hkv, d, block_size, 8.0 if fp8 else 1.0)
    v_cache = rng.standard_normal(k_cache.shape).astype(to_numpy(kv_dtype) if not fp8 else np.float32)
    v_cache = (v_cache * 8.0).astype(to_numpy(kv_dtype)) if fp8 else v_cache
    a = {"q": random(rng, (len(lens), hq, d), dtype), "k_cache": k_cache, "v_cache": v_cache, "block_table": table,
         "seq_lens": np.asarray(lens, np.int32), "scale": None, "softcap": None,
         "k_scale": 0.125 if fp8 else None, "v_scale": 0.125 if fp8 else None}
    a.update(attrs)
    return a


def _paged_samples(rng, dtype):
    for bs in (1, 8, 16, 32):
        yield Sample(_paged_args(rng, dtype, [1, 7, 100], 4, 2, 64, bs), f"block size {bs}, lengths 1/7/100")
    yield Sample(_paged_args(rng, dtype, [1, 33, 1000, 16384], 8, 2, 128, 16), "lengths 1 to 16384 in one batch, gqa 8/2 d128")
    yield Sample(_paged_args(rng, dtype, [300, 5], 4, 4, 64, 16, softcap=30.0, scale=0.3), "softcap 30, scale 0.3")
    for fp8 in FP8_KV:
        yield Sample(_paged_args(rng, dtype, [9, 513], 4, 1, 64, 16, kv_dtype=fp8), f"{fp8} cache with scales")
    yield Sample(_paged_args(rng, dtype, [40], 2, 1, 80, 8), "head dim 80")


def _paged_errors(rng):
    f32 = "float32"
    base = lambda **o: _paged_args(rng, f32, [5, 9], 4, 2, 16, 8) | o  # noqa: E731
    yield ErrorSample(base(seq_lens=np.array([5, 999], np.int32)), "sequence longer than its block table", match="seq_lens")
    yield ErrorSample(base(seq_lens=np.array([0, 3], np.int32)), "empty sequence", match="seq_lens")
    bad = base()
    bad["block_table"] = bad["block_table"].copy()
    bad["block_table"][1, 0] = 10_000
    yield ErrorSample(bad, "block id out of range", match="block_table")
    yield ErrorSample(base(k_cache=random(rng, (10, 8, 3, 16), f32), v_cache=random(rng, (10, 8, 3, 16), f32)), "heads_kv not dividing", match="heads")
    yield ErrorSample(base(k_cache=np.ones((10, 8, 2, 16), np.float16), v_cache=np.ones((10, 8, 2, 16), np.float16)), "cache dtype", match="k_cache")


def _paged_cost(a):
    lens = np.asarray(a["seq_lens"]).astype(np.int64)
    kc, vc = a["k_cache"], a["v_cache"]
    row_bytes = (kc.shape[2] * kc.shape[3] + vc.shape[2] * vc.shape[3]) * kc.itemsize
    flops = 2 * int(lens.sum()) * a["q"].shape[1] * (kc.shape[3] + vc.shape[3])
    return flops, int(lens.sum()) * row_bytes


def _paged_peer(t):
    """What an engine without a paged kernel does: gather each sequence's blocks into a dense cache
    (padded to the longest, the padding masked), dequantize fp8, then SDPA with the query heads of
    each KV head folded into the query length (GQA without repeating K and V). No softcap."""
    import torch
    import torch.nn.functional as F

    q, kc, vc = t["q"], t["k_cache"], t["v_cache"]
    b, hq, d = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    lens = t["seq_lens"].long()
    n = int(lens.max())
    blocks = t["block_table"][:, :-(-n // bs)].long().clamp(min=0).flatten()  # unused entries (-1): any block, masked
    mask = (torch.arange(n) < lens[:, None])[:, None, None, :] if bool((lens < n).any()) else None
    scales = [1.0 if t[name] is None else t[name] for name in ("k_scale", "v_scale")]

    def run():
        k, v = (c.index_select(0, blocks).view(b, -1, hkv, c.shape[-1])[:, :n].transpose(1, 2) for c in (kc, vc))
        if k.dtype != q.dtype:
            k, v = (x.to(q.dtype) * s for x, s in zip((k, v), scales))
        out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=t["scale"])
        return out.reshape(b, hq, -1)

    return run


paged_decode_attention = OpDef(
    name="paged_decode_attention",
    doc="paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, softcap=None, k_scale=None, "
    "v_scale=None): one query token per sequence (q [batch, heads_q, d]) against a paged KV cache "
    "[num_blocks, block_size, heads_kv, d] in q's dtype or fp8 (e4m3fn / e4m3fnuz with per-tensor scales).",
    params=[Tensor("q", rank=3), Tensor("k_cache", FLOATS + FP8_KV, rank=4), Tensor("v_cache", FLOATS + FP8_KV, rank=4),
            Tensor("block_table", INDEX, rank=2), Tensor("seq_lens", INDEX, rank=1), "*",
            Attr("scale", None, float), Attr("softcap", None, float), Attr("k_scale", None, float), Attr("v_scale", None, float)],
    check=_paged_check,
    outputs=lambda a: [((a["q"].shape[0], a["q"].shape[1], a["v_cache"].shape[-1]), name_of(a["q"].dtype))],
    reference=_paged_run,
    naive=lambda a, dtype: _paged_run(a, to_numpy(dtype), np.float32),
    growth=lambda a: _score_growth(a, a["q"].shape[-1]),
    magnitude=lambda a, refs: _paged_run(_abs_values(a, ("v_cache",))),
    samples=_paged_samples,
    error_samples=_paged_errors,
    bench=lambda rng, dtype: _paged_args(rng, dtype, [4096] * 16 + [16384] * 4, 32, 8, 128, 16),
    cost=_paged_cost,
    torch_peer=_paged_peer,
)


# ---------------------------------------------------------------- MLA decode


def _mla_check(a):
    qn, qp, lat, kpe = a["q_nope"], a["q_pe"], a["kv_latent"], a["k_pe"]
    b, h, latent = qn.shape
    if tuple(qp.shape[:2]) != (b, h):
        raise InvalidArgument("q_pe", f"[{b}, {h}, rope_dim]", tuple(qp.shape))
    if len(lat.shape) != 3 or lat.shape[-1] != latent:
        raise InvalidArgument("kv_latent", f"[num_blocks, block_size, {latent}]", tuple(lat.shape))
    if len(kpe.shape) != 3 or tuple(kpe.shape[:2]) != tuple(lat.shape[:2]) or kpe.shape[-1] != qp.shape[-1]:
        raise InvalidArgument("k_pe", f"[{lat.shape[0]}, {lat.shape[1]}, {qp.shape[-1]}]", tuple(kpe.shape))
    for name in ("q_pe", "kv_latent", "k_pe"):
        if name_of(a[name].dtype) != name_of(qn.dtype):
            raise InvalidArgument(name, f"the dtype of q_nope ({name_of(qn.dtype)})", name_of(a[name].dtype))
    if len(a["seq_lens"].shape) != 1 or a["seq_lens"].shape[0] != b:
        raise InvalidArgument("seq_lens", f"shape ({b},)", tuple(a["seq_lens"].shape))
    _check_paging(a, "kv_latent")


def _mla_run(a, rounding=None, dtype=np.float64, value=lambda c: c):
    """The outputs; `value` maps the latent c to the attended values (np.abs: the magnitude)."""
    qn, qp = a["q_nope"], a["q_pe"]
    b, h, latent = qn.shape
    out = np.zeros((b, h, latent), dtype)
    for i in range(b):
        n = int(a["seq_lens"][i])
        c = _gather(a["kv_latent"], a["block_table"][i], n).astype(dtype)
        kpe = _gather(a["k_pe"], a["block_table"][i], n).astype(dtype)
        # Absorbed form as one MQA head: key = [c, k_pe], query = [q_nope, q_pe], value = c.
        q = np.concatenate([qn[i], qp[i]], axis=-1).astype(dtype)[None]
        k = np.concatenate([c, kpe], axis=-1)[:, None, :]
        out[i] = _attend(q, k, value(c)[:, None, :], a["scale"], False, None, None, rounding)[0]
    return [out]


def _mla_args(rng, dtype, lens, heads, block_size, latent=512, rope=64):
    lat, table = paged_cache(rng, dtype, lens, 1, latent, block_size)
    kpe = random(rng, (lat.shape[0], block_size, rope), dtype)
    return {"q_nope": random(rng, (len(lens), heads, latent), dtype), "q_pe": random(rng, (len(lens), heads, rope), dtype),
            "kv_latent": lat[:, :, 0, :], "k_pe": kpe, "block_table": table, "seq_lens": np.asarray(lens, np.int32),
            "scale": 1.0 / math.sqrt(latent + rope)}


def _mla_samples(rng, dtype):
    yield Sample(_mla_args(rng, dtype, [1, 17, 300], 16, 16), "DeepSeek dims (512 + 64), 16 heads")
    yield Sample(_mla_args(rng, dtype, [2000, 3], 8, 64), "block size 64, long and short")
    yield Sample(_mla_args(rng, dtype, [33], 128, 1), "128 heads, block size 1")
    yield Sample(_mla_args(rng, dtype, [50, 7], 4, 8, latent=96, rope=32), "small latent 96 + rope 32", "edge")


def _mla_errors(rng):
    base = _mla_args(rng, "float32", [5], 4, 8, latent=32, rope=16)
    yield ErrorSample(base | {"k_pe": random(rng, (base["k_pe"].shape[0], 8, 8), "float32")}, "rope dim mismatch", match="k_pe")
    yield ErrorSample(base | {"kv_latent": random(rng, (base["kv_latent"].shape[0], 8, 31), "float32")}, "latent dim mismatch", match="kv_latent")
    yield ErrorSample(base | {"seq_lens": np.array([100], np.int32)}, "sequence past its blocks", match="seq_lens")


def _mla_cost(a):
    lens = int(np.asarray(a["seq_lens"]).astype(np.int64).sum())
    latent, rope = a["kv_latent"].shape[-1], a["k_pe"].shape[-1]
    flops = 2 * lens * a["q_nope"].shape[1] * (2 * latent + rope)
    return flops, lens * (latent + rope) * a["kv_latent"].itemsize


mla_decode = OpDef(
    name="mla_decode",
    doc="mla_decode(q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, *, scale): DeepSeek multi-head latent "
    "attention, absorbed decode form: scores = q_nope . c + q_pe . k_pe over a paged latent cache c [num_blocks, "
    "block_size, latent] and rope keys k_pe [num_blocks, block_size, rope]; the value is c itself.",
    params=[Tensor("q_nope", rank=3), Tensor("q_pe", rank=3), Tensor("kv_latent", rank=3), Tensor("k_pe", rank=3),
            Tensor("block_table", INDEX, rank=2), Tensor("seq_lens", INDEX, rank=1), "*", Attr("scale", 1.0, float)],
    check=_mla_check,
    outputs=lambda a: [(tuple(a["q_nope"].shape), name_of(a["q_nope"].dtype))],
    reference=_mla_run,
    naive=lambda a, dtype: _mla_run(a, to_numpy(dtype), np.float32),
    growth=lambda a: _score_growth(a, a["kv_latent"].shape[-1] + a["k_pe"].shape[-1]),
    magnitude=lambda a, refs: _mla_run(a, value=np.abs),
    samples=_mla_samples,
    error_samples=_mla_errors,
    bench=lambda rng, dtype: _mla_args(rng, dtype, [4096] * 8, 128, 64),
    cost=_mla_cost,
)
