"""Rotary position embedding (RoPE) on q and k, NeoX and GPT-J layouts, full or partial rotary.

For token t at position p and pair i < rotary_dim / 2, the pair (x1, x2) becomes
(x1 cos[p, i] - x2 sin[p, i], x2 cos[p, i] + x1 sin[p, i]); NeoX style (interleaved=False) pairs
x[i] with x[i + rotary_dim / 2], GPT-J style (interleaved=True) pairs x[2i] with x[2i + 1].
Dimensions from rotary_dim on pass through unchanged.
"""
import numpy as np

from hal.dtypes import INTS, name_of
from hal.opdef import Attr, InvalidArgument, check_range, ErrorSample, OpDef, Sample, Tensor, random, strided


def _check(a):
    q, k, cos, sin, pos = a["q"], a["k"], a["cos"], a["sin"], a["positions"]
    tokens, _, head = q.shape
    if k.shape[0] != tokens or k.shape[2] != head:
        raise InvalidArgument("k", f"shape ({tokens}, heads_kv, {head}) to match q", tuple(k.shape))
    if name_of(k.dtype) != name_of(q.dtype):
        raise InvalidArgument("k", f"the dtype of q ({name_of(q.dtype)})", name_of(k.dtype))
    rotary = head if a["rotary_dim"] is None else a["rotary_dim"]
    if rotary % 2 or not 0 < rotary <= head:
        raise InvalidArgument("rotary_dim", f"an even int in (0, {head}]", rotary)
    a["rotary_dim"] = rotary
    if cos.shape[1] != rotary // 2:
        raise InvalidArgument("cos", f"shape (max_position, {rotary // 2})", tuple(cos.shape))
    if tuple(sin.shape) != tuple(cos.shape):
        raise InvalidArgument("sin", f"the shape of cos {tuple(cos.shape)}", tuple(sin.shape))
    if tuple(pos.shape) != (tokens,):
        raise InvalidArgument("positions", f"shape ({tokens},)", tuple(pos.shape))
    check_range("positions", pos, 0, cos.shape[0])


def _pairs(rotary, interleaved):
    """Index arrays of the first and second member of each rotated pair."""
    half = np.arange(rotary // 2)
    return (2 * half, 2 * half + 1) if interleaved else (half, half + rotary // 2)


def _rotate(a, combine):
    cos, sin = a["cos"][a["positions"]][:, None, :], a["sin"][a["positions"]][:, None, :]
    first, second = _pairs(a["rotary_dim"], a["interleaved"])
    outs = []
    for x in (a["q"], a["k"]):
        y = x.copy()
        y[..., first], y[..., second] = combine(x[..., first], x[..., second], cos, sin)
        outs.append(y)
    return outs


def _reference(a):
    return _rotate(a, lambda x1, x2, c, s: (x1 * c - x2 * s, x2 * c + x1 * s))


def _magnitude(a, refs):
    return _rotate(a, lambda x1, x2, c, s: (abs(x1 * c) + abs(x2 * s), abs(x2 * c) + abs(x1 * s)))


def rope_cache(max_position, rotary_dim, base=10000.0, dtype="float32"):
    """cos and sin tables [max_position, rotary_dim / 2] with the usual inverse-frequency schedule."""
    from hal.dtypes import to_numpy

    inv_freq = base ** (-np.arange(0, rotary_dim, 2) / rotary_dim)
    angles = np.arange(max_position)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(to_numpy(dtype)), np.sin(angles).astype(to_numpy(dtype))


def _args(rng, dtype, tokens, hq, hk, head, rotary=None, interleaved=False, table="float32", pos="int64", positions=4096):
    cos, sin = rope_cache(positions, rotary or head, dtype=table)
    return {
        "q": random(rng, (tokens, hq, head), dtype),
        "k": random(rng, (tokens, hk, head), dtype),
        "cos": cos,
        "sin": sin,
        "positions": rng.integers(0, positions, tokens).astype(pos),
        "interleaved": interleaved,
        "rotary_dim": rotary,
    }


def _samples(rng, dtype):
    for tokens, hq, hk, head, rotary, inter in [(1, 1, 1, 2, None, False), (7, 4, 2, 64, None, False), (7, 4, 2, 64, None, True),
                                                (97, 8, 1, 128, None, False), (33, 3, 3, 80, 32, True), (65, 4, 2, 128, 64, False)]:
        yield Sample(_args(rng, dtype, tokens, hq, hk, head, rotary, inter), f"T={tokens} heads {hq}/{hk} d={head} rotary={rotary or head}{' gptj' if inter else ''}")
    yield Sample(_args(rng, dtype, 9, 2, 2, 64, table=dtype, pos="int32"), f"{dtype} tables, int32 positions")
    s = _args(rng, dtype, 11, 4, 2, 64, interleaved=True)
    s["q"] = strided(s["q"], axis=1)
    yield Sample(s, "strided heads of q", "edge")
    big = _args(rng, dtype, 5, 2, 2, 64)
    big["q"] = random(rng, (5, 2, 64), dtype, 1e3)
    yield Sample(big, "magnitude ~1e3", "edge")
    yield Sample(_args(rng, dtype, 0, 2, 1, 64), "no tokens", "edge")


def _errors(rng):
    f32 = "float32"
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"rotary_dim": 3}, "odd rotary_dim", match="rotary_dim")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"rotary_dim": 16}, "rotary_dim > head", match="rotary_dim")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8, rotary=4) | {"rotary_dim": None}, "cos for a partial rotary but rotary_dim unset", match="cos")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"positions": np.array([0, 1, 2, 4096])}, "position past the cache", match="positions")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"positions": np.array([0, -1, 2, 3])}, "negative position", match="positions")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"k": random(rng, (4, 2, 6), f32)}, "k head size", match="k")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"q": random(rng, (4, 8), f32)}, "rank-2 q", match="rank")
    yield ErrorSample(_args(rng, f32, 4, 2, 2, 8) | {"positions": np.zeros(4, np.float32)}, "float positions", match="dtype")


def _peer(t):
    import torch

    rotary, half = t["rotary_dim"], t["rotary_dim"] // 2

    def rotate(x, cos, sin):
        r = x[..., :rotary]
        if t["interleaved"]:
            x1, x2 = r[..., 0::2], r[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = r[..., :half], r[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out if rotary == x.shape[-1] else torch.cat((out, x[..., rotary:]), dim=-1)

    def run():
        cos = t["cos"][t["positions"]].unsqueeze(1).to(t["q"].dtype)
        sin = t["sin"][t["positions"]].unsqueeze(1).to(t["q"].dtype)
        return rotate(t["q"], cos, sin), rotate(t["k"], cos, sin)

    return run


rope = OpDef(
    name="rope",
    doc="rope(q, k, cos, sin, positions, *, interleaved=False, rotary_dim=None): rotary embedding of q [T, Hq, D] "
    "and k [T, Hk, D] with cos/sin caches [max_position, rotary_dim / 2]; returns (q_out, k_out).",
    params=[
        Tensor("q", rank=3),
        Tensor("k", rank=3),
        Tensor("cos", rank=2),
        Tensor("sin", rank=2),
        Tensor("positions", dtypes=INTS, rank=1),
        "*",
        Attr("interleaved", False, bool),
        Attr("rotary_dim", None, int),
    ],
    check=_check,
    outputs=lambda a: [(tuple(a["q"].shape), name_of(a["q"].dtype)), (tuple(a["k"].shape), name_of(a["k"].dtype))],
    results=("q_out", "k_out"),
    reference=_reference,
    samples=_samples,
    error_samples=_errors,
    magnitude=_magnitude,
    bench=lambda rng, dtype: _args(rng, dtype, 4096, 32, 8, 128),
    cost=lambda a: (6 * (a["q"].size + a["k"].size), 2 * (a["q"].nbytes + a["k"].nbytes)),
    torch_peer=_peer,
)
