"""Every hal op as a PyTorch operator, `torch.ops.hal.<name>`, generated from its OpDef.

One generic registration (no per-op wrapper): the schema comes from the op's params and `results`,
the fake (meta) implementation from its own validation and output inference run on fake tensors
(shapes only: the value checks of index arguments wait for the real call), and one kernel for
torch's CPU and CUDA dispatch keys (ROCm builds of torch use the CUDA key too) that calls the op
through hal's ordinary dispatch, so backend choice (`backend="cuda-sim"` as in hal.ops, or
`hal.use`), fallback records and strict mode behave as for NumPy callers. Autograd: every op has a
kernel on the Autograd key that refuses grad (hal kernels are inference only). No hal op has an output whose size
depends on data (moe_align returns a buffer sized by its bound and the count), so none needs
torch's dynamic-size mechanism.
"""
import torch

from ..dispatch import dispatch
from ..opdef import Tensor, shapes_only

LIBRARY = torch.library.Library("hal", "FRAGMENT")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
REGISTERED = {}  # name -> OpDef registered as torch.ops.hal.<name>
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor types the Autograd kernel hands to the op directly


def _arg(p):
    """One schema argument from a Tensor or Attr entry: `Tensor? bias=None`, `str? activation=None`, `float eps=1e-06`."""
    if isinstance(p, Tensor):
        return f"Tensor? {p.name}=None" if p.optional else f"Tensor {p.name}"
    values = [v for v in (*(p.choices or ()), p.default) if v is not None]
    kind = p.kind or (type(values[0]) if values else str)
    optional = "?" if p.default is None or (p.choices is not None and None in p.choices) else ""
    default = f'"{p.default}"' if isinstance(p.default, str) else repr(p.default)
    return f"{kind.__name__}{optional} {p.name}={default}"


def _positional_and_keyword(op):
    """The op's parameters in schema order: its positional ones, then its keyword-only tensors (which may
    also be passed by position here: torch's autograd registration wants no keyword-only tensors), and
    the keyword-only attributes."""
    star = op.params.index("*") if "*" in op.params else len(op.params)
    keyword = op.params[star + 1:]
    return [*op.params[:star], *(p for p in keyword if isinstance(p, Tensor))], [p for p in keyword if not isinstance(p, Tensor)]


def schema(op):
    """The torch schema of an op, `rms_norm(Tensor x, Tensor weight, Tensor? residual=None, *, float eps=1e-06,
    str? backend=None) -> Tensor[]` (see `_positional_and_keyword` for the order)."""
    positional, keyword = _positional_and_keyword(op)
    args = ", ".join([*map(_arg, positional), "*", *map(_arg, keyword), "str? backend=None"])
    if varies(op):
        returns = "Tensor[]"  # how many depends on the arguments (a residual given, a format's extra scale)
    elif len(op.results) == 1:
        returns = "Tensor"
    else:
        returns = "(" + ", ".join(f"Tensor {r}" for r in op.results) + ")"
    return f"{op.name}({args}) -> {returns}"


def varies(op):
    """Whether how many results the op returns depends on its arguments (its schema returns Tensor[])."""
    return any(r.endswith("?") for r in op.results)


def register(op):
    """Define torch.ops.hal.<op.name> from an OpDef (idempotent): `import hal.torch` does it for every op
    of hal.ops.ALL, and a plugin with an op of its own calls it for that OpDef."""
    if op.name in REGISTERED:
        return getattr(torch.ops.hal, op.name)
    qualname = f"hal::{op.name}"
    LIBRARY.define(schema(op))

    names = [p.name for p in _positional_and_keyword(op)[0]]
    defaults = op.bind((), {})
    as_list = varies(op)

    def bind(args, kwargs):  # torch leaves out trailing positional arguments left at their defaults
        values = defaults.copy()
        values.update(zip(names, args))
        values.update(kwargs)
        return values

    def kernel(*args, backend=None, **kwargs):
        out = dispatch(op, bind(args, kwargs), backend)
        return (list(out) if isinstance(out, tuple) else [out]) if as_list else out

    def fake(*args, backend=None, **kwargs):
        values = bind(args, kwargs)
        with shapes_only():
            op.validate(values)
        like = values[op.primary]
        outs = [torch.empty(shape, dtype=getattr(torch, dtype), device=like.device) for shape, dtype in op.outputs(values)]
        return outs if as_list else tuple(outs) if len(outs) > 1 else outs[0]

    torch.library.impl(qualname, ("cpu", "cuda"), lib=LIBRARY)(kernel)
    torch.library.register_fake(qualname, fake, lib=LIBRARY)

    packet = getattr(torch.ops.hal, op.name)

    def below_autograd(*args, **kwargs):
        """The Autograd key's kernel, as torch advises for an op without a derivative: run the op below autograd
        (a third of register_autograd's cost per call, which builds an autograd.Function every time), where
        validation refuses tensors that require grad in grad mode (GradNotSupported), fake ones too. Plain
        tensors with no dispatch mode active (an eager call) go straight to `kernel`, which is what the keys
        below would run; anything else (fake and functional tensors, subclasses, modes) dispatches again."""
        if not torch._C._len_torch_dispatch_stack() and all(type(x) in _PLAIN for x in args if isinstance(x, torch.Tensor)):
            return kernel(*args, **kwargs)
        with torch._C._AutoDispatchBelowAutograd():
            return packet(*args, **kwargs)

    LIBRARY.impl(op.name, below_autograd, "Autograd")
    REGISTERED[op.name] = op
    return packet
