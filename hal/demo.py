"""`hal demo`: a transformer decoder layer on one backend, every step checked against float64.

Prefill over `tokens` positions, then `decode` generated positions against a paged KV cache:

    h, s  = rms_norm(x, w_attn_norm, residual=r)       # fused residual add + norm
    qkv   = gemm(h, w_qkv)                             # q, k, v projections in one GEMM (GQA)
    q, k  = rope(q, k, cos, sin, positions)            # NeoX rotary embedding
    o     = attention(q, k, v, causal=True)            # prefill: flash attention
    o     = paged_decode_attention(q, k_cache, ...)    # decode: one token against the paged cache
    y     = gemm(o, w_o, c=s, beta=1)                  # output projection + residual epilogue
    h2    = rms_norm(y, w_mlp_norm)
    a     = silu_and_mul(gemm(h2, w_gate_up))          # SwiGLU
    out   = gemm(a, w_down, c=y, beta=1)               # down projection + residual epilogue

Each step runs on the selected backend (default: the best available for the inputs), is timed,
and its outputs are compared with the op's float64 reference on the same inputs with the
conformance suite's tolerance. The exit code is non-zero if any step mismatches.
"""
import time
import warnings
from dataclasses import dataclass

import numpy as np

from . import ops
from .conformance import judge
from .dispatch import explain
from .dtypes import to_numpy
from .errors import FallbackWarning
from .ops.attention import paged_cache
from .ops.rotary import rope_cache

BLOCK_SIZE = 16  # tokens per KV-cache block


@dataclass
class Layer:
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    ffn: int = 5632

    def weights(self, rng, dtype):
        def w(shape, fan_in):
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(to_numpy(dtype))

        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        norm = lambda: (1.0 + 0.1 * rng.standard_normal(self.hidden)).astype(to_numpy(dtype))  # noqa: E731
        return {"attn_norm": norm(), "mlp_norm": norm(), "qkv": w((self.hidden, qkv), self.hidden),
                "o": w((self.heads * self.head_dim, self.hidden), self.heads * self.head_dim),
                "gate_up": w((self.hidden, 2 * self.ffn), self.hidden), "down": w((self.ffn, self.hidden), self.ffn)}


class Run:
    """Runs steps on a backend, timing them and checking each against its reference."""

    def __init__(self, backend, repeats):
        self.backend, self.repeats, self.rows = backend, repeats, []
        self.phase = "prefill"

    def step(self, label, op, **args):
        label = f"{self.phase}: {label}"
        args = op.validate(op.bind((), args))
        asked, ran_on, reason = explain(op, args, self.backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)  # shown in the table instead
            out = op(**args, backend=self.backend)  # first call: compiles or loads the kernel
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                out = op(**args, backend=self.backend)
                times.append(time.perf_counter() - start)
        outs = out if isinstance(out, tuple) else (out,)
        ratio, max_err, message = judge(op, args, outs)
        row = next((r for r in self.rows if r["step"] == label), None)
        if row is None:
            row = {"step": label, "op": op.name, "backend": ran_on or asked, "ms": 0.0, "calls": 0, "max_abs_err": 0.0,
                   "err_over_tol": 0.0, "ok": True, "message": "", "fallback": "" if reason is None else f"{asked} -> {ran_on}: {reason}"}
            self.rows.append(row)
        row["ms"] = (row["ms"] * row["calls"] + 1e3 * min(times)) / (row["calls"] + 1)
        row["calls"] += 1
        row["max_abs_err"] = max(row["max_abs_err"], max_err)
        if ratio >= row["err_over_tol"]:
            row["err_over_tol"], row["message"] = ratio, message
        row["ok"] = row["err_over_tol"] <= 1.0
        return out


def run(backend=None, dtype="bfloat16", tokens=512, decode=4, layer=None, repeats=3, seed=None):
    """Prefill `tokens` positions and decode `decode` more; returns one row per step (decode steps
    aggregated over positions): step, op, backend, ms, max |err|, err/tol, ok, fallback."""
    layer = layer or Layer()
    rng = np.random.default_rng(seed)
    w = layer.weights(rng, dtype)
    run = Run(backend, repeats)
    hq, hkv, d = layer.heads, layer.kv_heads, layer.head_dim
    cos, sin = rope_cache(tokens + decode, d)
    # The paged cache has room for every position; prefill fills it, each decode step appends one.
    k_cache, table = paged_cache(rng, dtype, [tokens + decode], hkv, d, BLOCK_SIZE)
    v_cache = np.zeros_like(k_cache)

    def attention_block(x, r, positions, prefill):
        n = x.shape[0]
        h, s = run.step("rms_norm + residual", ops.rms_norm, x=x, weight=w["attn_norm"], residual=r)
        qkv = run.step("qkv gemm", ops.gemm, a=h, b=w["qkv"])
        q = qkv[:, : hq * d].reshape(n, hq, d)
        k = qkv[:, hq * d: (hq + hkv) * d].reshape(n, hkv, d)
        v = qkv[:, (hq + hkv) * d:].reshape(n, hkv, d)
        q, k = run.step("rope", ops.rope, q=q, k=k, cos=cos, sin=sin, positions=positions)
        blocks, rows = table[0, positions // BLOCK_SIZE], positions % BLOCK_SIZE
        k_cache[blocks, rows], v_cache[blocks, rows] = k, v
        if prefill:
            o = run.step("attention (causal)", ops.attention, q=q[None], k=k[None], v=v[None], causal=True)[0]
        else:
            lens = np.array([positions[-1] + 1], np.int32)
            o = run.step("paged_decode_attention", ops.paged_decode_attention, q=q, k_cache=k_cache, v_cache=v_cache,
                         block_table=table, seq_lens=lens)
        return run.step("o-proj gemm + residual", ops.gemm, a=o.reshape(n, hq * d), b=w["o"], c=s, beta=1.0)

    def mlp_block(y):
        h2 = run.step("rms_norm", ops.rms_norm, x=y, weight=w["mlp_norm"])
        gu = run.step("gate/up gemm", ops.gemm, a=h2, b=w["gate_up"])
        act = run.step("silu_and_mul", ops.silu_and_mul, x=gu)
        return run.step("down gemm + residual", ops.gemm, a=act, b=w["down"], c=y, beta=1.0)

    def hidden(n):
        return rng.standard_normal((n, layer.hidden)).astype(to_numpy(dtype))

    mlp_block(attention_block(hidden(tokens), hidden(tokens), np.arange(tokens), prefill=True))
    run.phase = f"decode x{decode}"
    for position in range(tokens, tokens + decode):
        mlp_block(attention_block(hidden(1), hidden(1), np.array([position]), prefill=False))
    return run.rows
