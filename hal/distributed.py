"""Expert parallelism on torch.distributed: the token exchange of a MoE layer across ranks.

Rank r of a group of W ranks owns experts [r L, (r + 1) L), L = num_experts / W. A MoE layer is

    recv = ep.dispatch(x, topk_ids, topk_weights)    # this rank's tokens out, other ranks' tokens in
    y = <this rank's experts on recv.x>               # grouped GEMMs, nothing permuted again
    out = ep.combine(y, recv)                         # results home, weighted, in the caller's order

The exchange is torch.distributed's `all_to_all_single` (gloo, NCCL, RCCL: the same code); the
compute is hal ops on the tensors' device. Two modes (docs/distributed.md):

- "normal": exact per-rank counts are exchanged first (one all_gather, which also carries each
  rank's verdict on its input: a bad input is a SchemaError on its rank and a PeerError on the
  others, never a hang), then one all_to_all_single per payload with uneven splits. A token goes
  once to each rank that owns one of its experts, with its expert ids and weights (and, for fp8,
  its 1x128 scales). The receiver lays the rows out grouped by local expert (recv.x,
  recv.expert_offsets) for grouped_gemm / fp8_grouped_gemm_blockscale. combine sends each
  token's weighted partial sum (moe_unpermute on the expert side) back and adds the partials.
- "low_latency": a fixed capacity of `max_tokens` rows per rank pair, so every size is known from
  shapes and nothing reads device data on the host (what CUDA-graph capture needs). The receiver writes
  the masked layout [L, expert_capacity, hidden] with per-expert counts (recv.masked_m) for
  grouped_gemm_masked / fp8_grouped_gemm_masked_blockscale; rows past an expert's capacity are
  dropped and counted in recv.dropped, never silently.

`transport` is the dtype tokens travel in: None (x's own), a float dtype name, or "fp8", which
quantizes per 1x128 group before sending (e4m3fn, or e4m3fnuz where the backend's hardware computes
in it) so that the receiver feeds the fp8 grouped GEMMs directly: half the bytes of bfloat16.
"""
import contextlib
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

from . import ops
from .dispatch import select
from .dtypes import DTYPES, FLOATS, name_of
from .errors import HalError, SchemaError

MODES = ("normal", "low_latency")
FP8_FORMATS = ("float8_e4m3fn", "float8_e4m3fnuz")
TRANSPORTS = FLOATS + FP8_FORMATS + ("fp8",)
FP8_GROUP = 128  # tokens travel with one scale per 1 x 128 group, DeepSeek's activation blocks
# The configuration every rank must agree on, compared once at construction.
_AGREED = ("num_experts", "hidden", "transport", "mode", "max_tokens", "expert_capacity")


class PeerError(HalError):
    """Another rank of the group failed: it rejected its input, died, or did not answer in time."""


@dataclass
class Received:
    """What `dispatch` hands this rank's experts, and what `combine` needs to send results home.

    normal: x [R, hidden] (fp8 codes with x_scales [R, ceil(hidden / 128)] under an fp8 transport),
    rows grouped by local expert: expert e owns rows expert_offsets[e]..expert_offsets[e + 1].
    low_latency: x [L, expert_capacity, hidden] and masked_m [L] (rows of each expert), dropped [L]
    (rows past expert_capacity, not computed and not combined). Counts stay on the device."""

    x: object
    x_scales: object
    expert_offsets: object = None
    masked_m: object = None
    dropped: object = None
    # How combine sends results home: each row's flat (received token, slot) index and the slots'
    # weights; this rank's token count and where its tokens went (normal: the token of each sent
    # row, rank-major; low_latency: [T, W] rows of the send blocks, W * max_tokens where none).
    sorted_ids: object = None
    weights: object = None
    tokens: int = 0
    sent: object = None
    send_splits: list = None
    recv_splits: list = None


def _torch():
    import torch
    import torch.distributed as dist

    return torch, dist


@contextlib.contextmanager
def _collective(what, rank):
    """Turns a failed collective (a peer died, closed its connection, or timed out) into a PeerError."""
    try:
        yield
    except HalError:
        raise
    except RuntimeError as exc:  # torch.distributed.DistBackendError and gloo's errors are RuntimeErrors
        raise PeerError(f"ExpertParallel.{what} on rank {rank}: a peer failed or timed out in the exchange: {exc}") from exc


def _as_bytes(t):
    """A tensor's rows as uint8 (gloo moves any dtype as bytes; fp8 and bfloat16 included)."""
    torch, _ = _torch()
    if not t.numel():  # an empty tensor may keep odd strides, which view() refuses
        return torch.empty((*t.shape[:-1], t.shape[-1] * t.element_size()), dtype=torch.uint8, device=t.device)
    return t.contiguous().view(torch.uint8)


def _dtype_code(name):
    return DTYPES.index(name)


def _torch_dtype(name):
    torch, _ = _torch()
    return getattr(torch, name)


class ExpertParallel:
    """The dispatch / combine pair of one MoE layer over a torch.distributed group (see the module doc).

    Every rank constructs it with the same arguments (checked: a rank whose configuration differs
    from rank 0's raises SchemaError, the others PeerError). `max_tokens` is the most tokens a rank
    passes per call in low_latency mode; `expert_capacity` the rows per local expert of the masked
    layout (default world * max_tokens, which never drops). `backend` runs the hal ops (default:
    the tensors' device decides, as for any hal call)."""

    def __init__(self, num_experts, hidden, group=None, transport=None, *, mode="normal", max_tokens=None,
                 expert_capacity=None, backend=None):
        _, dist = _torch()
        self.group, self.backend = group, backend
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts, self.hidden, self.transport, self.mode = num_experts, hidden, transport, mode
        self.max_tokens = max_tokens
        self.exchange_seconds = 0.0  # host time spent in this object's collectives (benchmarks; on GPUs NCCL returns early)
        self.expert_capacity = expert_capacity if expert_capacity is not None or max_tokens is None else self.world * max_tokens
        problem = self._check_config()
        config = [num_experts, hidden, TRANSPORTS.index(transport) if transport in TRANSPORTS else -1,
                  MODES.index(mode) if mode in MODES else -1, max_tokens or 0, self.expert_capacity or 0]
        everyone = self._gather(config, "__init__")
        differs = [(name, int(everyone[0][i]), v) for i, (name, v) in enumerate(zip(_AGREED, config)) if int(everyone[0][i]) != v]
        if problem:
            raise problem
        if differs and self.rank:
            name, want, got = differs[0]
            raise SchemaError("ExpertParallel", name, f"{want} as on rank 0 (every rank must agree)", got)
        others = [r for r in range(1, self.world) if list(map(int, everyone[r])) != list(map(int, everyone[0]))]
        if others:
            raise PeerError(f"ExpertParallel on rank {self.rank}: rank {others[0]} was constructed with another configuration")
        bad = [r for r in range(self.world) if int(everyone[r][0]) < 0]
        if bad:
            raise PeerError(f"ExpertParallel on rank {self.rank}: rank {bad[0]} rejected its configuration")
        self.local_experts = num_experts // self.world

    def _check_config(self):
        """The local configuration's first problem as a SchemaError, or None."""
        def bad(arg, expected, got):
            return SchemaError("ExpertParallel", arg, expected, got)

        if not isinstance(self.num_experts, int) or self.num_experts < 1 or self.num_experts % self.world:
            return bad("num_experts", f"a positive multiple of the group's {self.world} ranks", self.num_experts)
        if not isinstance(self.hidden, int) or self.hidden < 1:
            return bad("hidden", "a positive int", self.hidden)
        if self.transport is not None and self.transport not in TRANSPORTS:
            return bad("transport", f"None or one of {', '.join(TRANSPORTS)}", repr(self.transport))
        if self.mode not in MODES:
            return bad("mode", f"one of {', '.join(MODES)}", repr(self.mode))
        if self.mode == "low_latency":
            if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
                return bad("max_tokens", "a positive int (the most tokens per rank per call) in low_latency mode", self.max_tokens)
            if not isinstance(self.expert_capacity, int) or self.expert_capacity < 1:
                return bad("expert_capacity", "a positive int", self.expert_capacity)
        return None

    def _gather(self, values, what):
        """Every rank's int64 vector `values` (one all_gather, host-synchronizing): [world, len]."""
        torch, dist = _torch()
        mine = torch.tensor([values], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            mine = mine.cuda()
        out = [torch.empty_like(mine) for _ in range(self.world)]
        start = time.perf_counter()
        with _collective(what, self.rank):
            dist.all_gather(out, mine, group=self.group)
        self.exchange_seconds += time.perf_counter() - start
        return torch.cat(out).cpu()

    def _all_to_all(self, what, t, recv_rows, send_splits=None, recv_splits=None):
        _, dist = _torch()
        out = t.new_empty((recv_rows, *t.shape[1:]))
        start = time.perf_counter()
        with _collective(what, self.rank):
            dist.all_to_all_single(out, t.contiguous(), recv_splits, send_splits, group=self.group)
        self.exchange_seconds += time.perf_counter() - start
        return out

    # ---------------------------------------------------------------- input checks

    def _check_input(self, x, topk_ids, topk_weights):
        """The first problem of this rank's input as a SchemaError, or None. ids are read on the host
        except for device tensors in low_latency mode, where an id outside [0, num_experts) is simply
        not sent (reading them would synchronize)."""
        from .opdef import InvalidArgument, check_range

        def bad(arg, expected, got):
            return SchemaError("ExpertParallel.dispatch", arg, expected, got)

        if len(x.shape) != 2 or x.shape[1] != self.hidden:
            return bad("x", f"[tokens, {self.hidden}] (hidden as constructed)", f"shape {tuple(x.shape)}")
        if name_of(x.dtype) not in FLOATS:
            return bad("x", f"dtype in ({', '.join(FLOATS)})", name_of(x.dtype))
        if len(topk_ids.shape) != 2 or topk_ids.shape[0] != x.shape[0] or not topk_ids.shape[1] or name_of(topk_ids.dtype) not in ("int32", "int64"):
            return bad("topk_ids", f"int32/int64 [{x.shape[0]}, k >= 1]", f"{name_of(topk_ids.dtype)} shape {tuple(topk_ids.shape)}")
        if tuple(topk_weights.shape) != tuple(topk_ids.shape) or name_of(topk_weights.dtype) not in FLOATS:
            return bad("topk_weights", f"float [{x.shape[0]}, {topk_ids.shape[1] if len(topk_ids.shape) == 2 else 'k'}] like topk_ids",
                       f"{name_of(topk_weights.dtype)} shape {tuple(topk_weights.shape)}")
        if self.mode == "low_latency" and x.shape[0] > self.max_tokens:
            return bad("x", f"at most max_tokens = {self.max_tokens} tokens (low_latency capacity)", f"{x.shape[0]} tokens")
        if self.mode == "normal" or topk_ids.device.type == "cpu":
            try:
                check_range("topk_ids", topk_ids, -1, self.num_experts, "expert ids (-1: none)")
            except InvalidArgument as e:
                return bad(e.arg, e.expected, e.got)
        return None

    def _wire_dtype(self, x):
        """The dtype name tokens travel in."""
        if self.transport is None:
            return name_of(x.dtype)
        if self.transport != "fp8":
            return self.transport
        quantize = ops.quantize
        args = quantize.validate(quantize.bind((x[:0], FP8_FORMATS[0], "group"), {}))
        return select(quantize, args, self.backend)[1].fp8_format()

    def _encode(self, x, wire):
        """x in the wire dtype: (payload, scales or None)."""
        if wire in FP8_FORMATS:
            return ops.quantize(x, wire, "group", group_size=FP8_GROUP, backend=self.backend)
        return x.to(_torch_dtype(wire)), None

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, x, topk_ids, topk_weights):
        """Send each token of x [T, hidden] to the ranks of its experts topk_ids [T, k] (-1: none) with
        its weights topk_weights [T, k]; returns this rank's `Received` tokens."""
        if self.mode == "normal":
            return self._dispatch_normal(x, topk_ids, topk_weights)
        return self._dispatch_low_latency(x, topk_ids, topk_weights)

    def _routes(self, topk_ids):
        """owner [T, k] (the rank of each slot's expert, -1: none) and goes [T, W] (token t goes to rank r)."""
        torch, _ = _torch()
        ids = topk_ids.long()
        valid = (ids >= 0) & (ids < self.num_experts)
        owner = torch.where(valid, ids // self.local_experts, -1)
        goes = torch.zeros(ids.shape[0], self.world + 1, dtype=torch.bool, device=ids.device)
        goes.scatter_(1, torch.where(valid, owner, self.world), True)
        return owner, goes[:, : self.world]

    def _payloads(self, x, wire, topk_ids, topk_weights, owner, token, rank):
        """The rows sent, one per (token, rank) pair: x[token] in the wire dtype as bytes, its fp8
        scales, the local ids of its slots on that rank (-1 elsewhere) and their weights (0 elsewhere)."""
        torch, _ = _torch()
        rows, scales = self._encode(x, wire)
        mine = owner[token] == rank[:, None]
        ids = torch.where(mine, topk_ids[token].long() - rank[:, None] * self.local_experts, -1).to(torch.int32)
        weights = torch.where(mine, topk_weights[token].float(), 0.0)
        return _as_bytes(rows)[token], None if scales is None else scales[token], ids, weights

    def _dispatch_normal(self, x, topk_ids, topk_weights):
        problem = self._check_input(x, topk_ids, topk_weights)
        k = topk_ids.shape[1] if len(topk_ids.shape) == 2 else 0
        wire = self._wire_dtype(x) if problem is None else None
        status = [0, k, _dtype_code(wire) if wire else -1]
        if problem is None:
            owner, goes = self._routes(topk_ids)
            sent = goes.T.nonzero()  # (rank, token), rank-major: the send order
            send_splits = goes.sum(0).tolist()
        else:
            status[0], send_splits = 1, [0] * self.world
        table = self._gather(status + send_splits, "dispatch")
        self._verdict(table, problem, "dispatch")
        recv_splits = table[:, 3 + self.rank].tolist()
        rank, token = sent[:, 0], sent[:, 1]
        rows, scales, ids, weights = self._payloads(x, wire, topk_ids, topk_weights, owner, token, rank)
        n = sum(recv_splits)
        exchange = lambda t: self._all_to_all("dispatch", t, n, send_splits, recv_splits)  # noqa: E731
        got = exchange(rows).view(_torch_dtype(wire))
        got_scales = None if scales is None else exchange(scales)
        got_ids, got_weights = exchange(ids), exchange(weights)
        # Rows grouped by local expert: moe_align's layout of the received ids, then one gather.
        sorted_ids, _, offsets, _ = ops.moe_align(got_ids, num_experts=self.local_experts, block_m=1, backend=self.backend)
        source = _sources(sorted_ids, k, n)
        return Received(x=_gather_rows(got, source), x_scales=None if got_scales is None else _gather_rows(got_scales, source),
                        expert_offsets=offsets, sorted_ids=sorted_ids, weights=got_weights, tokens=x.shape[0], sent=token,
                        send_splits=send_splits, recv_splits=recv_splits)

    def _verdict(self, table, problem, what):
        """Raise on every rank if any rank rejected its input or differs from rank 0 in k or the
        transport dtype: SchemaError on the ranks at fault, PeerError on the others."""
        if problem is not None:
            raise problem
        rejected = [r for r in range(self.world) if int(table[r, 0])]
        if rejected:
            raise PeerError(f"ExpertParallel.{what} on rank {self.rank}: rank {rejected[0]} rejected its input (a SchemaError there)")
        for col, name, want in ((1, "topk_ids", "k"), (2, "x", "a transport dtype (x's, when transport is None)")):
            values = table[:, col].tolist()
            if col == 2:
                values = [DTYPES[v] for v in values]
            if values[self.rank] != values[0]:
                raise SchemaError(f"ExpertParallel.{what}", name, f"{want} as on rank 0 (every rank must agree)",
                                  f"{values[self.rank]} against {values[0]} (rank values {values})")
            if len(set(values)) > 1:
                raise PeerError(f"ExpertParallel.{what} on rank {self.rank}: rank {values.index(next(v for v in values if v != values[0]))} "
                                f"differs from rank 0 in {want} (a SchemaError there)")

    def _dispatch_low_latency(self, x, topk_ids, topk_weights):
        torch, _ = _torch()
        problem = self._check_input(x, topk_ids, topk_weights)
        if problem is not None:
            raise problem
        t, k = topk_ids.shape
        w, cap, local = self.world, self.max_tokens, self.local_experts
        owner, goes = self._routes(topk_ids)
        # Token t's slot in the block of rank r: its place among the tokens going there.
        slot = torch.where(goes, (goes.long().cumsum(0) - 1) + torch.arange(w, device=x.device) * cap, w * cap)  # [T, W]
        rank = torch.arange(w, device=x.device).expand(t, w).reshape(-1)
        token = torch.arange(t, device=x.device).repeat_interleave(w)
        wire = self._wire_dtype(x)
        rows, scales, ids, weights = self._payloads(x, wire, topk_ids, topk_weights, owner, token, rank)
        where = slot.reshape(-1)

        def block(values, fill):  # [W * cap + 1 (a row for the tokens not going anywhere), ...] -> [W * cap, ...]
            out = torch.full((w * cap + 1, *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
            return out.index_copy_(0, where, values)[:-1]

        exchange = lambda v: self._all_to_all("dispatch", v, w * cap)  # noqa: E731
        got = exchange(block(rows, 0)).view(_torch_dtype(wire))
        got_scales = None if scales is None else exchange(block(scales, 0.0))
        got_ids, got_weights = exchange(block(ids, -1)), exchange(block(weights, 0.0))
        # Masked layout: expert e's rows are its rows of moe_align's layout, up to expert_capacity.
        sorted_ids, _, offsets, _ = ops.moe_align(got_ids, num_experts=local, block_m=1, backend=self.backend)
        counts = (offsets[1:] - offsets[:-1]).long()
        capacity = self.expert_capacity
        place = torch.arange(capacity, device=x.device)
        kept = place[None, :] < counts[:, None]  # [L, capacity]
        at = (offsets[:-1, None].long() + place[None, :]).clamp(max=max(sorted_ids.shape[0] - 1, 0))
        masked_ids = torch.where(kept, sorted_ids.long()[at] if sorted_ids.shape[0] else at, w * cap * k).to(torch.int32).reshape(-1)
        source = _sources(masked_ids, k, w * cap)

        def masked(v):
            return _gather_rows(v, source).reshape(local, capacity, *v.shape[1:])

        return Received(x=masked(got), x_scales=None if got_scales is None else masked(got_scales),
                        masked_m=counts.clamp(max=capacity).to(torch.int32), dropped=(counts - capacity).clamp(min=0).to(torch.int32),
                        sorted_ids=masked_ids, weights=got_weights, tokens=t, sent=slot)

    def traffic(self, received, topk_ids):
        """Bytes this rank's dispatch of topk_ids sent to other ranks: {"tokens", "rows" (token rows to
        other ranks), "payload" (their token bytes), "metadata" (ids, weights, fp8 scales), "minimum"
        (distinct remote ranks per token x hidden x bytes per element of the transport)}."""
        own = self.rank
        _, goes = self._routes(topk_ids)
        remote = int(goes.sum()) - int(goes[:, own].sum())
        if self.mode == "normal":
            rows = sum(received.send_splits) - received.send_splits[own]
        else:  # fixed blocks of max_tokens rows to every other rank
            rows = (self.world - 1) * self.max_tokens
        element = received.x.element_size()
        groups = -(-self.hidden // FP8_GROUP) if received.x_scales is not None else 0
        k = topk_ids.shape[1]
        return {"tokens": int(topk_ids.shape[0]), "rows": rows, "payload": rows * self.hidden * element,
                "metadata": rows * (8 * k + 4 * groups), "minimum": remote * self.hidden * element}

    # ---------------------------------------------------------------- combine

    def combine(self, y, received):
        """The experts' outputs `y` (rows as in received.x: [R, N] normal, [L, expert_capacity, N]
        low_latency) back to the ranks their tokens came from, each token's rows weighted by its
        topk_weights and summed in fp32: [T, N] in y's dtype, in dispatch's token order."""
        torch, _ = _torch()
        rows = received.sorted_ids.shape[0]
        flat = y.reshape(rows, y.shape[-1]) if self.mode == "low_latency" and len(y.shape) == 3 else y
        if len(flat.shape) != 2 or flat.shape[0] != rows:
            want = f"[{rows}, N]" if self.mode == "normal" else f"[{self.local_experts}, {self.expert_capacity}, N]"
            raise SchemaError("ExpertParallel.combine", "y", f"{want}, a row per row of received.x", f"shape {tuple(y.shape)}")
        partial = ops.moe_unpermute(flat, received.sorted_ids, received.weights, backend=self.backend)  # [received tokens, N]
        n = flat.shape[1]
        if self.mode == "normal":
            back = self._all_to_all("combine", _as_bytes(partial), sum(received.send_splits), received.recv_splits,
                                    received.send_splits).view(partial.dtype)
            out = torch.zeros(received.tokens, n, dtype=torch.float32, device=y.device)
            out.index_add_(0, received.sent, back.float())
            return out.to(y.dtype)
        back = self._all_to_all("combine", _as_bytes(partial), partial.shape[0]).view(partial.dtype)
        padded = torch.cat([back.float(), back.new_zeros(1, n, dtype=torch.float32)])
        return padded[received.sent].sum(1).to(y.dtype)  # [T, W, N]: a zero row where a token did not go


def _sources(sorted_ids, k, n):
    """The received token of each row of a (padded) sorted layout; `n` (a zero row) for padding."""
    torch, _ = _torch()
    sid = sorted_ids.long()
    return torch.where((sid >= 0) & (sid < n * k), sid // max(k, 1), n)


def _gather_rows(t, rows):
    """t[rows] of a 2-D t, row len(t) reading zeros (rows move as bytes, so fp8 too)."""
    torch, _ = _torch()
    raw = _as_bytes(t)
    padded = torch.cat([raw, raw.new_zeros(1, raw.shape[1])])
    return padded[rows].view(t.dtype)


# ---------------------------------------------------------------- the MoE layer


def moe_layer(ep, x, router, w13, w2, *, k, w13_scales=None, w2_scales=None, shared=None, scoring="sigmoid", n_group=None,
              topk_group=None, router_bias=None, renormalize=True, scaling=1.0, activation="silu_and_mul", backend=None):
    """A DeepSeek-style MoE block: route, dispatch, this rank's experts, combine, shared expert.

    x [T, hidden]; router [hidden, E] (gemm's b: logits = x @ router in fp32), routed by moe_route
    (k, scoring, n_group, topk_group, router_bias, renormalize, scaling as there). w13 [L, 2I, hidden]
    and w2 [L, hidden, I] are this rank's L experts (nn.Linear layout) in x's dtype, or fp8 with
    128 x 128 block scales w13_scales / w2_scales (quantize(w, fmt, "block")), in which case tokens
    enter the experts as fp8 per 1 x 128 (straight from an fp8 transport, else quantized here).
    shared = (w_gate_up [hidden, 2F], w_down [F, hidden]): the shared expert, added to the routed sum.
    ep=None runs the single-process layer (all E experts here: moe_permute / moe_unpermute, no
    exchange), which the expert-parallel one is checked against. Returns [T, hidden] in x's dtype."""
    backend = ep.backend if ep is not None else backend
    logits = ops.gemm(x, router, out_dtype="float32", backend=backend)
    weights, ids = ops.moe_route(logits, k, scoring=scoring, n_group=n_group, topk_group=topk_group, bias=router_bias,
                                 renormalize=renormalize, scaling=scaling, backend=backend)
    experts = dict(w13=w13, w13_scales=w13_scales, w2=w2, w2_scales=w2_scales, activation=activation, out_dtype=name_of(x.dtype),
                   backend=backend)
    if ep is None:
        sorted_ids, _, offsets, _ = ops.moe_align(ids, num_experts=w13.shape[0], block_m=1, backend=backend)
        y = run_experts(ops.moe_permute(x, ids, sorted_ids, backend=backend), None, offsets, False, **experts)
        out = ops.moe_unpermute(y, sorted_ids, weights, backend=backend)
    else:
        recv = ep.dispatch(x, ids, weights)
        masked = ep.mode == "low_latency"
        out = ep.combine(run_experts(recv.x, recv.x_scales, recv.masked_m if masked else recv.expert_offsets, masked, **experts), recv)
    if shared is None:
        return out
    gate_up, down = shared
    return ops.gemm(ops.silu_and_mul(ops.gemm(x, gate_up, backend=backend), backend=backend), down, c=out, beta=1.0, backend=backend)


def run_experts(x, x_scales, rows, masked, *, w13, w13_scales, w2, w2_scales, activation, out_dtype, backend):
    """This rank's experts (gate/up with `activation`, then down) on the rows of a `Received`: rows is
    recv.expert_offsets (normal: x [R, hidden]) or recv.masked_m (masked: x [L, C, hidden]); weights
    as in moe_layer. fp8 weights take the fp8 grouped GEMMs, the hidden state requantized per 1 x 128."""
    fmt = name_of(w13.dtype)
    if fmt in FP8_FORMATS:
        gemm = ops.fp8_grouped_gemm_masked_blockscale if masked else ops.fp8_grouped_gemm_blockscale
        if x_scales is None:
            x, x_scales = ops.quantize(x, fmt, "group", group_size=FP8_GROUP, backend=backend)
        h = gemm(x, x_scales, w13, w13_scales, rows, activation=activation, out_dtype=out_dtype, backend=backend)
        hq, h_scales = ops.quantize(h, fmt, "group", group_size=FP8_GROUP, backend=backend)
        return gemm(hq, h_scales, w2, w2_scales, rows, out_dtype=out_dtype, backend=backend)
    if x_scales is not None:
        raise SchemaError("moe_layer", "w13", f"fp8 expert weights for tokens that arrive in {name_of(x.dtype)}", fmt)
    gemm = ops.grouped_gemm_masked if masked else ops.grouped_gemm
    return gemm(gemm(x, w13, rows, activation=activation, backend=backend), w2, rows, backend=backend)


# ---------------------------------------------------------------- local process groups


class LaunchError(HalError):
    """A rank of `launch` raised or died. `results[r]` is rank r's return value (None where it failed),
    `failures[r]` what went wrong there (the traceback, or how the process ended)."""

    def __init__(self, results, failures):
        self.results, self.failures = results, failures
        lines = [f"rank {r}: {text.strip().splitlines()[-1] if text.strip() else text}" for r, text in sorted(failures.items())]
        details = "\n".join(f"--- rank {r} ---\n{text}" for r, text in sorted(failures.items()))
        super().__init__(f"{len(failures)} of {len(results)} ranks failed:\n" + "\n".join(lines) + "\n" + details)


def _run_rank(fn, rank, world, init_method, timeout, threads, queue, args):
    torch, dist = _torch()
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        queue.put((rank, True, fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world, *args, timeout=60.0, threads=1, startup=180.0):
    """fn(rank, world, *args) in `world` fresh local processes that form a gloo group over loopback,
    as torchrun would on one machine (how `hal demo --ep`, benchmarks/bench_ep.py and the tests run
    expert parallelism here). `fn` must be importable (a module-level function); `timeout` is the
    group's collective timeout in seconds, `threads` each rank's torch and Numba threads. Returns
    the ranks' return values; raises LaunchError if any rank raised, died, or had not answered
    `startup + timeout` seconds after the start."""
    import multiprocessing
    import queue as queues
    import time

    ctx = multiprocessing.get_context("spawn")
    results, failures = [None] * world, {}
    with tempfile.TemporaryDirectory(prefix="hal-ep-") as store:
        answers = ctx.Queue()
        saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
        os.environ.update({key: str(threads) for key in saved})  # read by the children as they start
        try:
            procs = [ctx.Process(target=_run_rank, args=(fn, r, world, f"file://{store}/rendezvous", timeout, threads, answers, args),
                                 daemon=True) for r in range(world)]
            for p in procs:
                p.start()
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        deadline, pending, ended = time.monotonic() + startup + timeout, set(range(world)), {}
        while pending and time.monotonic() < deadline:
            try:
                rank, ok, value = answers.get(timeout=0.5)
            except queues.Empty:
                now = time.monotonic()
                for r in [r for r in pending if procs[r].exitcode is not None]:
                    if now - ended.setdefault(r, now) > 2.0:  # an answer it sent before ending has arrived by now
                        failures[r] = f"the process ended with exit code {procs[r].exitcode} without an answer"
                        pending.discard(r)
                continue
            pending.discard(rank)
            if ok:
                results[rank] = value
            else:
                failures[rank] = value
        for r in pending:
            failures[r] = f"no answer within {startup + timeout:g} s"
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise LaunchError(results, failures)
    return results
