"""Transformers models on hal kernels: `hal.torch.apply(model)`, `hal.torch.restore(model)`.

What is replaced, per kind (`ops=` picks kinds), for the families in FAMILIES:
- "norm": every *RMSNorm module (the family's convention: Gemma multiplies by 1 + weight) and every
  nn.LayerNorm runs hal's rms_norm / layer_norm;
- "rope": the family's `apply_rotary_pos_emb` runs hal's rope on the cos/sin the model computed
  (one function per family and process: the last apply's backend serves every model of the family);
- "attention": the model's attention implementation becomes "hal", the function registered with
  transformers' attention registry (also `from_config(..., attn_implementation="hal")`): causal,
  sliding window, soft-capping and padding masks (packed into cu_seqlens) on hal's attention; while applied,
  q_proj's, k_proj's and v_proj's parameters are row views of one fused [q; k; v] tensor (one GEMM, see
  `_fused_projections`);
- "mlp": the gated MLP's activation and product, act(gate) * up, runs hal's gated op (silu_and_mul,
  gelu_tanh_and_mul for Gemma, ...); while applied, gate_proj's and up_proj's parameters are row views of
  one fused [gate; up] tensor (one GEMM, no concatenation of its halves; restore separates them again);
- "moe": the sparse MoE block runs hal's moe_route, moe_align, moe_permute, two grouped GEMMs on the
  experts' own stacked weights and moe_unpermute.
Projections, embeddings and the LM head stay on torch. Modules are patched in place (an instance
`forward`), so weights stay where they are and `restore` puts everything back.
"""
import functools
import sys
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import ops
from ..arrays import from_host, to_host
from ..errors import SchemaError
from ..ops.activations import GATED_OP_NAMES


def _hal(name):
    """hal's op `name` as the patched forwards call it: torch.ops.hal.<name> while torch.compile traces (a node of
    its graph), else hal.ops.<name>: the same dispatch, without the hop through torch's dispatcher into Python
    (15-20 us a call, a third of a small op's cost at decode). Only the norms return differently: a list there."""
    return getattr(torch.ops.hal if torch.compiler.is_compiling() else ops, name)


KINDS = ("norm", "rope", "attention", "mlp", "moe")

# config.model_type -> the family's RMSNorm offset: y = x / rms(x) * (weight + offset)
FAMILIES = {"llama": 0.0, "mistral": 0.0, "qwen2": 0.0, "qwen3": 0.0, "phi3": 0.0, "mixtral": 0.0, "qwen3_moe": 0.0,
            "gemma2": 1.0, "gemma3": 1.0, "gemma3_text": 1.0}

# transformers' activation names -> the activation of hal's gated ops ("<act>_and_mul")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

# Why a kind of module stays on torch, by the end of its class name (the report's "left" part).
LEFT = {"RotaryEmbedding": "builds the cos/sin tables; hal's rope applies them", "Linear": "projection: stays on torch's GEMM",
        "Embedding": "embedding lookup: stays on torch", "Dropout": "training only"}

_rope_patches = {}  # family module -> [original apply_rotary_pos_emb, backend, number of models patched]


@dataclass
class Report:
    """What `apply` replaced (kind -> module names) and what it left on torch (class -> (count, why))."""

    family: str
    backend: str
    replaced: dict = field(default_factory=dict)
    left: dict = field(default_factory=dict)

    def __str__(self):
        lines = [f"hal.torch.apply: {self.family} on backend {self.backend or '(from the tensors)'}"]
        for kind, names in self.replaced.items():
            classes = Counter(cls for _, cls in names)
            lines.append(f"  replaced {kind:9s} {len(names):4d}  " + ", ".join(f"{c} x{n}" for c, n in classes.items()))
        for cls, (count, why) in sorted(self.left.items()):
            lines.append(f"  left     {cls:24s} x{count}: {why}")
        return "\n".join(lines)


def apply(model, *, backend=None, ops=None):
    """Run the model's norms, rotary embedding, attention, gated MLP and MoE blocks on hal (see the module
    doc), in place; returns a Report. Applying again first restores, so it is harmless."""
    kinds = KINDS if ops is None else tuple(ops)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SchemaError("hal.torch.apply", "ops", f"kinds among {KINDS}", unknown)
    restore(model)
    config = model.config
    family = config.model_type
    report = Report(family, backend)
    patched = {"forwards": [], "attention": None, "rope": None}
    model._hal_patch = patched
    offset = FAMILIES.get(family)
    if offset is None:
        report.left[type(model).__name__] = (1, f"model type {family!r} is not a family hal.torch knows ({', '.join(FAMILIES)})")
        return report
    act = ACTIVATIONS.get(getattr(config, "hidden_activation", None) or config.hidden_act)
    inside = ()  # names of modules replaced or accounted for whole: their children are not listed
    for name, module in model.named_modules():
        if name.startswith(inside):
            continue
        cls = type(module).__name__
        kind, forward, why = _replacement(module, offset, act, backend)
        if kind is None and any(True for _ in module.children()):
            continue
        if forward is not None and kind in kinds:
            module.forward = types.MethodType(forward, module)
            patched["forwards"].append(module)
            if kind == "mlp":
                _fuse(module, FUSED["mlp"])
            report.replaced.setdefault(kind, []).append((name, cls))
        else:
            why = why or (f"kind {kind!r} not asked for" if kind else next((w for end, w in LEFT.items() if cls.endswith(end)), "no hal op for it"))
            count, _ = report.left.get(cls, (0, why))
            report.left[cls] = (count + 1, why)
        inside += (name + ".",)
    if "attention" in kinds:
        patched["attention"] = config._attn_implementation
        model.set_attn_implementation("hal")
        for name, module in model.named_modules():
            if type(module).__name__.endswith("Attention"):
                module.hal_backend = backend
                patched["forwards"].append(module)
                report.replaced.setdefault("attention", []).append((name, type(module).__name__))
                if _fuse(module, FUSED["attention"]):
                    lead, follow = _fused_projections(module)
                    for proj, forward in zip(FUSED["attention"], (lead, follow, follow)):
                        projection = getattr(module, proj)
                        projection.forward = types.MethodType(forward, projection)
                        patched["forwards"].append(projection)
    if "rope" in kinds:
        patched["rope"] = _patch_rope(model, family, backend)
        report.replaced["rope"] = [(patched["rope"].__name__ + ".apply_rotary_pos_emb", "function")]
    return report


def restore(model):
    """Undo `apply`: the original forwards, attention implementation and rotary function."""
    patched = getattr(model, "_hal_patch", None)
    if patched is None:
        return model
    for module in patched["forwards"]:  # instance attributes set by apply: class behaviour comes back
        for attribute in ("forward", "hal_backend", "_hal_output", "_hal_prepared"):
            module.__dict__.pop(attribute, None)
        _unfuse(module)
    if patched["attention"] is not None:
        model.set_attn_implementation(patched["attention"])
    if patched["rope"] is not None:
        entry = _rope_patches[patched["rope"]]
        entry[2] -= 1
        if entry[2] == 0:
            patched["rope"].apply_rotary_pos_emb = entry[0]
            del _rope_patches[patched["rope"]]
    del model._hal_patch
    return model


# ---------------------------------------------------------------- per kind of module


def _replacement(module, offset, act, backend):
    """(kind, forward, why not) for a module of a kind hal replaces; (None, None, None) for others."""
    cls = type(module).__name__
    if cls.endswith("RMSNorm"):
        return "norm", _rms_norm(offset, backend), None
    if isinstance(module, torch.nn.LayerNorm):
        return "norm", _layer_norm(backend) if module.elementwise_affine else None, "no weight (hal's layer_norm takes one)"
    if cls.endswith("SparseMoeBlock"):
        if act is None or not hasattr(module.experts, "gate_up_proj"):
            return "moe", None, "activation or expert layout hal's grouped_gemm does not take"
        return "moe", _moe(f"{act}_and_mul", backend), None
    if cls.endswith("MLP"):
        gated = f"{act}_and_mul"
        if gated not in GATED_OP_NAMES:
            return "mlp", None, f"activation {act!r} has no standalone hal gated op ({', '.join(GATED_OP_NAMES)})"
        return "mlp", _fused_mlp(gated, backend) if hasattr(module, "gate_up_proj") else _mlp(gated, backend), None
    return None, None, None


def _prepared(module, name, tensors, backend, **attrs):
    """hal's op `name` on `tensors` for a patched module: in eager inference through the module's prepared call
    (hal.ops.<name>.prepare: validation and kernel choice once per shape, prepared again when the shapes change,
    from prefill to decode), else as _hal calls it. Returns what hal.ops returns (the norms: one tensor)."""
    if not _eager_inference():
        y = _hal(name)(*tensors, backend=backend, **attrs)
        return y[0] if isinstance(y, list) else y
    prepared = module.__dict__.get("_hal_prepared")
    if prepared is not None:
        try:
            return prepared(*tensors)
        except SchemaError:  # other shapes: prepare again (which raises what hal.ops would)
            pass
    prepared = module.__dict__["_hal_prepared"] = getattr(ops, name).prepare(*tensors, backend=backend, **attrs)
    return prepared(*tensors)


def _rms_norm(offset, backend):
    def forward(self, x):
        eps = getattr(self, "variance_epsilon", None) or self.eps
        weight = self.weight if self.weight.dtype == x.dtype and not offset else (self.weight.float() + offset).to(x.dtype)
        return _prepared(self, "rms_norm", (x, weight), backend, eps=eps)
    return forward


def _layer_norm(backend):
    def forward(self, x):
        return _prepared(self, "layer_norm", (x, self.weight, self.bias), backend, eps=self.eps)
    return forward


def _mlp(gated, backend):
    def forward(self, x):  # down(act(gate(x)) * up(x)) with the gate and up halves side by side
        fused = self.__dict__.get("_hal_fused")
        if fused is not None and _still_fused(self, fused):
            halves = F.linear(x, fused.weight, fused.bias)
        else:  # not fused, or a projection's parameters were replaced since
            halves = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(_prepared(self, gated, (halves,), backend))
    return forward


FUSED = {"mlp": ("gate_proj", "up_proj"), "attention": ("q_proj", "k_proj", "v_proj")}  # projections run as one GEMM


class Fused(NamedTuple):
    """A module's projections `names` fused (`_fuse`): their weights (biases) are row views of `weight` (`bias`)."""

    weight: torch.Tensor
    bias: torch.Tensor
    parameters: tuple  # the Parameters made views, to see whether they were replaced since
    names: tuple
    rows: list  # output features of each projection


def _parameters(module, names):
    return tuple(getattr(getattr(module, n), p) for p in ("weight", "bias") for n in names)


def _still_fused(module, fused):
    """Whether the projections still hold the Parameters made views of `fused` (by identity: torch.compile
    traces that, not data pointers). Parameters replaced by new ones (load_state_dict(assign=True), a new
    nn.Linear) are seen; model.to(dtype or device) after apply swaps their data instead, and the fused
    GEMM then refuses the mixed dtypes or devices: apply again after such a conversion."""
    return all(p is q for p, q in zip(_parameters(module, fused.names), fused.parameters))


def _fuse(module, names):
    """Make the weights (and biases) of the projections `names` of `module` row views of one tensor each,
    [gate; up] or [q; k; v]: one GEMM then writes their outputs side by side (the [gate | up] layout a gated
    op reads; q, k and v as column slices) with no extra weight memory. Only plain nn.Linear of one dtype and
    device, with biases on all or none; `_unfuse` gives them their own memory again. Returns whether it fused."""
    linears = [getattr(module, n, None) for n in names]
    if any(type(m) is not torch.nn.Linear for m in linears) or len({(m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) > 1:
        return False
    fused = []
    for kind in ("weight", "bias"):
        params = [getattr(m, kind) for m in linears]
        joined = None if params[0] is None else torch.cat([p.detach() for p in params])
        if joined is not None:
            for p, view in zip(params, joined.split([p.shape[0] for p in params])):
                p.data = view
        fused.append(joined)
    module._hal_fused = Fused(*fused, _parameters(module, names), names, [m.weight.shape[0] for m in linears])
    return True


def _unfuse(module):
    fused = module.__dict__.pop("_hal_fused", None)
    if fused is not None and _still_fused(module, fused):
        for p in _parameters(module, fused.names):
            if p is not None:
                p.data = p.data.clone()


def _fused_projections(attention):
    """Forwards for the attention's q, k and v projections while their weights are fused: q_proj's runs the one
    GEMM and hands k_proj and v_proj their column slices for the same input (transformers calls the three on one
    hidden_states, in that order); each computes its own in any other case (a different input, torch.compile
    tracing, grad recorded, parameters replaced). At decode a projection call costs more than its weights' bytes:
    two calls fewer a layer."""
    def lead(self, x):
        fused = attention.__dict__.get("_hal_fused")
        if fused is None or not _eager_inference() or not _still_fused(attention, fused):
            return F.linear(x, self.weight, self.bias)
        q, *rest = F.linear(x, fused.weight, fused.bias).split(fused.rows, dim=-1)
        for name, y in zip(fused.names[1:], rest):
            getattr(attention, name).__dict__["_hal_output"] = (x, y)
        return q

    def follow(self, x):
        handed = self.__dict__.pop("_hal_output", None)
        return handed[1] if handed is not None and handed[0] is x else F.linear(x, self.weight, self.bias)
    return lead, follow


def _fused_mlp(gated, backend):
    def forward(self, x):  # Phi-3: one gate_up projection
        return self.down_proj(_prepared(self, gated, (self.gate_up_proj(x),), backend))
    return forward


def _moe(activation, backend):
    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        gate, experts = self.gate, self.experts
        weights, ids = _hal("moe_route")(F.linear(x, gate.weight), gate.top_k, renormalize=getattr(gate, "norm_topk_prob", True),
                                     backend=backend)
        sorted_ids, _, offsets, _ = _hal("moe_align")(ids, gate.num_experts, 1, backend=backend)
        y = _hal("grouped_gemm")(_hal("moe_permute")(x, ids, sorted_ids, backend=backend), experts.gate_up_proj, offsets,
                             activation=activation, backend=backend)
        y = _hal("grouped_gemm")(y, experts.down_proj, offsets, backend=backend)
        return _hal("moe_unpermute")(y, sorted_ids, weights, backend=backend).reshape(shape)
    return forward


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **_):
    """transformers' attention interface on hal's attention: q, k, v [batch, heads, seq, d] in, [batch,
    seq, heads, d] out. A padding mask [batch, kv_len] (what flash_attention_mask gives) packs the valid
    tokens into cu_seqlens; the queries are the last seq_q positions of each row."""
    options = {"causal": bool(getattr(module, "is_causal", True)), "scale": scaling, "window": sliding_window,
               "softcap": softcap or None, "backend": getattr(module, "hal_backend", None)}
    if attention_mask is None:
        if _on_host(query):  # decode's per-call cost: NumPy's transposes and one conversion each way (see _on_host)
            return from_host(ops.attention(*(to_host(t).swapaxes(1, 2) for t in (query, key, value)), **options), query), None
        return _hal("attention")(*(t.transpose(1, 2) for t in (query, key, value)), **options), None
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    keys = attention_mask.bool()
    queries = keys[:, -q.shape[1]:]
    cu_q = F.pad(queries.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(keys.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    packed = _hal("attention")(q[queries], k[keys], v[keys], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **options)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    out[queries] = packed
    return out, None


def _patch_rope(model, family, backend):
    """Point the family's apply_rotary_pos_emb at hal's rope; returns the family's modeling module."""
    module = sys.modules[type(model).__module__]
    entry = _rope_patches.get(module)
    if entry is None:
        entry = _rope_patches[module] = [module.apply_rotary_pos_emb, backend, 0]
    elif entry[1] != backend:
        raise SchemaError("hal.torch.apply", "backend", f"{entry[1]!r}, the backend {family}'s rotary embedding is patched for "
                          "(one function per family and process)", repr(backend))
    entry[2] += 1
    original = entry[0]

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1:  # q, k not in [batch, heads, seq, d]
            return original(q, k, cos, sin, unsqueeze_dim)
        b, hq, s, d = q.shape
        rot, like = cos.shape[-1], q
        host = _on_host(q)
        if host:
            q, k, cos, sin = (to_host(x) for x in (q, k, cos, sin))
            positions = _positions(b * s)
        else:
            positions = torch.arange(0, 2 * b * s, 2, dtype=torch.int32, device=q.device)
        qt, kt = (x.swapaxes(1, 2).reshape(b * s, x.shape[1], d) for x in (q, k))
        # transformers' cos and sin repeat their halves: viewed as two rows per token, row 2t is the half hal's rope
        # reads for token t, and no column slice needs a contiguous copy
        cos, sin = (x.reshape(2 * b * s, rot // 2) for x in (cos, sin))
        outs = [y.reshape(b, s, -1, d).swapaxes(1, 2) for y in _hal("rope")(qt, kt, cos, sin, positions, rotary_dim=rot, backend=backend)]
        return tuple(from_host(y, like) for y in outs) if host else tuple(outs)

    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return module


def _on_host(x):
    """Whether a patched forward may do its glue (views, transposes) on NumPy views of its torch CPU tensors and
    call hal.ops on them: not while torch.compile traces, nor with grad mode on (hal refuses tensors that require
    grad, and validation must see the torch tensor to say so). A NumPy view costs 0.3 us, a torch one 1-2, and
    after a decode step's projections have streamed the weights through the caches, several times that."""
    return x.is_cpu and _eager_inference()


def _eager_inference():
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


@functools.lru_cache(maxsize=64)
def _positions(tokens):
    """0, 2, ..., 2 (tokens - 1) (int32): rope's positions into the cos and sin transformers has gathered per token,
    viewed as two rows per token (see apply_rotary_pos_emb above)."""
    return np.arange(0, 2 * tokens, 2, dtype=np.int32)


def register_attention():
    """Register "hal" with transformers' attention and mask registries (a no-op without transformers)."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return
    AttentionInterface.register("hal", attention)
    AttentionMaskInterface.register("hal", flash_attention_mask)
