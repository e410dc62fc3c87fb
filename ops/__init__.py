"""hal.ops: every op, callable. `hal.ops.gemm(a, b, ...)` dispatches to a backend; the op's data
(schema, reference, samples) is on the same object: `hal.ops.gemm.reference`, `.samples`, ...
"""
from .activations import GATED_OPS, silu_and_mul, softmax
from .attention import attention, mla_decode, paged_decode_attention
from .linear import gemm
from .norms import layer_norm, rms_norm
from .rotary import rope
from . import moe, qgemm, quant, sparse

ALL = {op.name: op for op in (gemm, softmax, rms_norm, layer_norm, *GATED_OPS, rope, attention, paged_decode_attention, mla_decode,
                                   *moe.OPS, *quant.OPS, *qgemm.OPS, *sparse.OPS)}
globals().update(ALL)  # hal.ops.moe_route, ... for the families that list their ops in OPS
__all__ = list(ALL)
