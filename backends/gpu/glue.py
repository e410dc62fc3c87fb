"""What every launch glue module shares: the kernel entry that declares a kernel once, and the
argument helpers.

A `KernelEntry` states once what hal registers for one variant of one op on a GPU backend: the
op, the kernel file family, the templates the glue launches (each with the types every template
parameter is instantiated with), the threads per block, what the hardware must have (tensor-op
units, fp8 tensor-op units) and what a call must satisfy (`supports`, explained by `requires`),
and the dtypes of the op's primary tensor. From the entries alone come the template
instantiations each kernel file is built with per vendor and architecture, the threads per block
of every kernel (catalog.py), the registration and the candidate-kernel builder (backend.py).

A glue function is called as `glue(ex, entry, outs, **arguments)`: `ex` is the executor (CuPy on
a device, or the host emulator; both take `launch(family, name_expression, grid, block,
shared_bytes, args)`), `entry` the KernelEntry it was registered for, which names the template
variant and the block (`entry.launch`). So one function serves every variant of a kernel.
"""
import itertools
from dataclasses import dataclass
from functools import partial

import numpy as np

from hal.codes import INDEX_TYPES
from hal.dtypes import FLOATS

BLOCK = 256  # the default block: 8 warps / 4 waves (row kernels, SIMT tiles 16 x 16, element-wise kernels)
TENSOR_OP_BLOCK = "tensor_op_block"  # the block of the tensor-op variants (and of the attention kernels): Vendor.tensor_op_block
HALF_FLOATS = ("float16", "bfloat16")
INDEX_DTYPES = tuple(INDEX_TYPES)  # ids, offsets, positions: int32 / int64
# C types of the non-float dtypes a kernel is templated on (floats: Vendor.types).
C_TYPES = {**INDEX_TYPES, "uint8": "unsigned char", "int8": "signed char"}
FIRST = "T"  # in a template parameter's types: the type of the template's first parameter


i32, i64, f32 = np.int32, np.int64, np.float32  # scalar kernel arguments: int, long long, float


def cdiv(a, b):
    return -(-a // b)


def grouped_row_tiles(rows, experts, rows_per_expert, tile):
    """grid.x of a grouped GEMM over `rows` rows of `tile`-row blocks (expert_row_tile in hal_gpu.h): in the
    masked layout (rows_per_expert > 0) a compute and a zero tile per `tile` rows of each expert; over offsets
    (rows_per_expert 0) an upper bound on the expert tiles and the zero tiles outside them."""
    if rows_per_expert:
        return 2 * experts * cdiv(rows_per_expert, tile)
    return cdiv(rows, tile) + experts + 1


def c_type(vendor, dtype):
    """The C++ type name of a hal dtype in `vendor`'s kernels."""
    return vendor.types.get(dtype) or C_TYPES[dtype]


def ctype(ex, array):
    """The C++ type name of an array's elements."""
    return c_type(ex.vendor, ex.dtype_name(array))


def widened(ex, t):
    """Small parameter tensors (weights, biases, rope tables, scales) go to kernels as fp32 (exact)."""
    return None if t is None else ex.as_type(t, "float32")


def threads_of(block, vendor):
    """A block size as stated in an entry: threads, a Vendor attribute name, or fn(vendor)."""
    if isinstance(block, str):
        return getattr(vendor, block)
    return block(vendor) if callable(block) else block


class Template:
    """A kernel template: its name ("{tensor_op}" stands for the vendor's mma / mfma) and, per
    template parameter, the dtypes it is instantiated with (their product; FIRST repeats the first
    parameter's type). `block` overrides the entry's block size for this template."""

    __slots__ = ("name", "params", "block")

    def __init__(self, name, *params, block=None):
        self.name, self.params, self.block = name, params, block

    def __repr__(self):
        return f"Template({self.name!r}, {', '.join(map(repr, self.params))})"

    def kernel(self, vendor):
        return self.name.format(tensor_op=vendor.tensor_op)

    def instantiations(self, vendor):
        names = []
        for combo in itertools.product(*self.params):
            types = [c_type(vendor, combo[0]) if d == FIRST else c_type(vendor, d) for d in combo]
            names.append(f"{self.kernel(vendor)}<{', '.join(types)}>")
        return names


@dataclass(frozen=True)
class KernelEntry:
    op: str
    family: str  # the kernel file: Vendor.source(family)
    glue: object  # glue(ex, entry, outs, **arguments)
    templates: tuple  # the Templates the glue launches, in launch order
    dtypes: object = FLOATS  # of the op's primary tensor: a tuple, or {vendor name: tuple} when the vendors' hardware differs
    block: object = BLOCK  # threads per block of the templates: an int, a Vendor attribute name or fn(vendor)
    needs_tensor_ops: bool = False  # the vendor's tensor-op instruction (Vendor.has_tensor_ops)
    needs_fp8_tensor_ops: bool = False  # its fp8 form on fp8 units (Vendor.has_fp8_tensor_ops)
    supports: object = None  # a condition on the arguments besides the architecture
    requires: str = ""  # what `supports` asks for, in words

    @property
    def tensor_op(self):
        """Whether this is a tensor-op variant (launched with the vendor's tensor-op tiles)."""
        return self.needs_tensor_ops or self.needs_fp8_tensor_ops

    def runs_on(self, vendor, arch):
        """Whether the architecture has what the entry's kernels need."""
        return (not self.needs_tensor_ops or vendor.has_tensor_ops(arch)) and \
               (not self.needs_fp8_tensor_ops or vendor.has_fp8_tensor_ops(arch))

    def dtypes_on(self, vendor):
        return self.dtypes[vendor.name] if isinstance(self.dtypes, dict) else self.dtypes

    def template(self, name=None):
        """The template named `name` (as written, "{tensor_op}" included), or the first."""
        if name is None:
            return self.templates[0]
        for t in self.templates:
            if t.name == name:
                return t
        raise KeyError(f"{self.op} ({self.family}) launches no template {name!r}")

    def kernels(self, vendor):
        """The kernel names (templates without arguments) this entry launches on `vendor`."""
        return [t.kernel(vendor) for t in self.templates]

    def threads(self, vendor, template=None):
        t = self.template(template)
        return threads_of(self.block if t.block is None else t.block, vendor)

    def instantiations(self, vendor, arch):
        if not self.runs_on(vendor, arch):
            return []
        return [name for t in self.templates for name in t.instantiations(vendor)]

    def launch(self, ex, types, grid, args, shared=0, template=None):
        """Launch one of the entry's templates with the C types `types`; grid padded to 3 dimensions.
        An empty grid (a zero-size dimension: 0 rows, heads, tokens) launches nothing, on the device
        (where a grid of 0 is an invalid-configuration error) and in the emulator alike."""
        t = self.template(template)
        name = f"{t.kernel(ex.vendor)}<{', '.join(types)}>"
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        if 0 in grid:
            return
        ex.launch(self.family, name, grid, (self.threads(ex.vendor, template), 1, 1), shared, args)

    def bind(self, ex):
        """The kernel function the registry calls: fn(outs, **arguments)."""
        return partial(self.glue, ex, self)
