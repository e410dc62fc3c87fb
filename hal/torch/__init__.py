"""hal inside PyTorch programs (docs/torch.md).

`import hal.torch` registers every hal op as `torch.ops.hal.<name>` (see `library`), usable in eager
code and under `torch.compile(fullgraph=True)`, and, where transformers is installed, the attention
implementation "hal" (`from_config(..., attn_implementation="hal")`). `hal.torch.apply(model)` runs a
transformers model's norms, rotary embedding, attention, gated MLP and MoE blocks on hal kernels and
`hal.torch.restore(model)` undoes it (see `models`).
"""
from .. import ops
from ..errors import GradNotSupported
from .library import register, schema
from .models import Report, apply, register_attention, restore

for _op in ops.ALL.values():
    register(_op)
register_attention()

__all__ = ["apply", "restore", "Report", "register", "schema", "GradNotSupported"]
