"""Shared Numba helpers of the CPU kernels, and how a kernel module declares its kernels.

Numba has no float16 / bfloat16 arithmetic, so the public functions hand the compiled code
integer views of such arrays (`raw_view`): float16 as ``uint16`` and bfloat16 as ``int16``. The
integer type is what tells a compiled specialization which format it holds; `load` widens an
element to float32 and `store` narrows a float32 into one (round to nearest even), chosen at
compile time from the array's dtype, so each op has one kernel body for every mix of dtypes.

Also here: the vectorizable float32 math (`exp`, the activations and `activate(v, code)` with the
codes of hal.codes), the jit options every module uses (KERNEL, HELPER, FASTMATH), `sized` (a
kernel's serial build for calls too small to wake the worker threads; before the parallel one,
`release_openmp` stops other libraries' OpenMP workers spinning on the cores), widening to float32
(`as_f32`), cache prefetch hints (`prefetch`, `prefetch_write`, their `_l2` forms, `prefetch_line`),
the LLVM-IR pieces of the hand-written 16-lane loops (`lanes_below`, `masked`, `load_lanes` /
`store_lanes`, `lanes_row` / `lanes_loop`, `exp_lanes`), non-temporal stores of large outputs
(`streams`, `store_fence`), and `Kernel`, the entry of a module's KERNELS table that
backends/cpu/__init__.py registers.

This module imports only numpy, numba (and its llvmlite), ml_dtypes, threadpoolctl, the standard
library and hal's tables, so it can be tested on its own.
"""
import ctypes
import functools
import math
import sys
from types import FunctionType
from typing import NamedTuple

import llvmlite.binding as llvm
import ml_dtypes
import numba
import numpy as np
import threadpoolctl
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.extending import intrinsic, overload

from hal.codes import ACTIVATIONS
from hal.dtypes import FLOATS

F32 = np.float32
U32 = np.uint32
# Reductions may be reordered (so they vectorize) and mul+add fused; never nnan/ninf: inputs hold inf.
FASTMATH = {"contract", "reassoc"}
KERNEL = dict(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
# Scalar helpers: no reassociation (the exp and float16 rounding tricks rely on exact IEEE adds).
HELPER = dict(cache=True, fastmath={"contract"}, error_model="numpy")

# Below this many bytes a call runs a KERNEL's serial build (`sized`). Numba's TBB workers sleep after
# a few microseconds idle, and waking them cost 25-30 us per call here (a 896-wide rms_norm row: 35 us
# parallel, 1 us serial), more than one core takes for 256 KiB of a row kernel.
SERIAL_BYTES = 1 << 18
_serial_builds = {}


def sized(kernel, nbytes, limit=None):
    """The build of `kernel` (an njit(**KERNEL) dispatcher) for a call that touches `nbytes`: the kernel
    itself, or below `limit` (default SERIAL_BYTES) its serial build: the same source compiled without
    parallel=True (prange runs as range, no worker threads wake), cached on disk under its own name
    (Numba's cache key has no flags, so the two builds must not share a name). Before the parallel build
    the other OpenMP runtimes' workers are released (release_openmp)."""
    if nbytes >= (SERIAL_BYTES if limit is None else limit):
        release_openmp()
        return kernel
    serial = _serial_builds.get(kernel)
    if serial is None:
        fn = kernel.py_func
        twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        serial = _serial_builds[kernel] = njit(**{**KERNEL, "parallel": False})(twin)
    return serial


# After each parallel region an OpenMP runtime's workers spin, waiting for the next one (torch's libgomp:
# 4-8 ms of CPU time after a Linear on the 2-vCPU Zen 4 host), on the cores that a hal kernel started then
# needs; in a hal-patched torch model every parallel hal kernel of a prefill starts right after a torch op.
# So before those kernels run (a `sized` kernel's parallel build: the norms, softmax, rope, the gated activations; and
# prefill attention), every other OpenMP runtime in the process releases its workers with
# OpenMP 5.0's omp_pause_resource_all(omp_pause_soft): libgomp ends them (its next region starts new ones),
# LLVM's libomp lets them sleep. A serial build does not: at decode the spinning worker holds the other
# core, ready for torch's next op, and the calling thread does not need it.
OMP_PAUSE_SOFT = 1


def release_openmp():
    """Pause the workers of the OpenMP runtimes loaded in this process, unless Numba runs on one itself."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is chosen at the first one
        layer = None
    for pause in _openmp_pauses("torch" in sys.modules, layer):
        pause(OMP_PAUSE_SOFT)


@functools.cache
def _openmp_pauses(torch_loaded, layer):
    """omp_pause_resource_all of each OpenMP runtime threadpoolctl finds (none if Numba's layer is OpenMP: that
    would end its own workers at every call); the arguments key the cache (importing torch loads one)."""
    if layer == "omp":
        return ()
    runtimes = (ctypes.CDLL(pool["filepath"]) for pool in threadpoolctl.threadpool_info() if pool["internal_api"] == "openmp")
    return tuple(pause for pause in (getattr(lib, "omp_pause_resource_all", None) for lib in runtimes) if pause is not None)


# ---------------------------------------------------------------- bit casts and dtype conversion

@intrinsic
def f32_bits(typingctx, x):
    """The bits of a float32 as uint32 (an LLVM bitcast: free)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(x), codegen


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of integer x."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = context.get_value_type(types.uint32)
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, i32)
        elif x.bitwidth < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(x), codegen


def lanes_below(builder, n, lanes):
    """LLVM IR of the <lanes x i1> mask of the lanes i < n (n an i64): the tail of a hand-written vector loop."""
    i64 = ir.IntType(64)
    iota = ir.Constant(ir.VectorType(i64, lanes), list(range(lanes)))
    spread = builder.shuffle_vector(builder.insert_element(ir.Constant(iota.type, ir.Undefined), n, ir.Constant(ir.IntType(32), 0)),
                                    ir.Constant(iota.type, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
    return builder.icmp_signed("<", iota, spread)


# The fast-math flags of every float instruction of hand-written IR: HELPER's. Numba's fastmath pass adds a
# KERNEL's flags (reassoc) to the flagless ones of the function an intrinsic is inlined into, and LLVM then
# reassociates them (x / d * u became x * u / d: 1 ulp off common.silu's result).
IR_FLAGS = ("contract",)
# Float32 lanes of the hand-written IR loops (one AVX-512 register, two AVX2 ones). They run where the target
# has AVX-512 or AVX2 with FMA (and F16C for float16 arrays: vcvtph2ps / vcvtps2ph); elsewhere the Numba loops
# they replace.
LANES = 16


def lanes_fit(*dtypes):
    """Whether the IR loops of `lanes_row` take arrays of these Numba dtypes on the target CPU."""
    return VECTOR_ISA is not None and all(d in (types.float32, types.int16) or d == types.uint16 and HAS_F16C for d in dtypes)


def masked(builder, op, ptr, mask, value=None):
    """llvm.masked.load / .store of len(mask) elements at ptr (lanes outside `mask` not touched; loaded as 0)."""
    i32 = ir.IntType(32)
    vec = ir.VectorType(ptr.type.pointee, mask.type.count)
    name = f"llvm.masked.{op}.v{vec.count}{'f32' if isinstance(vec.element, ir.FloatType) else f'i{vec.element.width}'}.p0"
    vptr = builder.bitcast(ptr, vec.as_pointer())
    if op == "load":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec.as_pointer(), i32, mask.type, vec]), name)
        return builder.call(fn, [vptr, i32(1), mask, ir.Constant(vec, None)])
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [vec, vec.as_pointer(), i32, mask.type]), name)
    return builder.call(fn, [value, vptr, i32(1), mask])


def _splat(t, value):
    return ir.Constant(ir.VectorType(t, LANES), [value] * LANES)


# Pair order, the lanes of a full step of an AVX2 loop over bfloat16 rows (`pair_order`): lane i < 8 holds
# element 2i, lane 8 + i element 2i + 1, so a 32-bit load of the 16 bfloat16s widens in an AND (odd elements,
# already the top halves) and a shift (even ones) and narrowing joins the halves in a shift and an OR. Zen 3 runs
# shifts and shuffles on two of its four vector pipes, and element order took one of them per 8 lanes for each
# widening (vpmovzxwd) and narrowing (vpackusdw, vpermq): llvm-mca -mcpu=znver3 put layer_norm's bfloat16 normalize
# step of 16 lanes at 18.2 cycles, bound on those two pipes, 7.5 in pair order. AMD EPYC Zen 3, one thread, ns an
# element on 16 / 4096 rows of 4096 bfloat16, element -> pair order: rms_norm 0.48 / 0.52 -> 0.36 / 0.44, layer_norm
# 0.61-0.69 / 0.63 -> 0.45-0.46 / 0.51, softmax 0.63 / 0.65-0.66 -> 0.55-0.57 / 0.60, silu_and_mul 0.74 / 0.80 ->
# 0.64-0.69 / 0.72-0.74 (float32 rows unchanged).
PAIRS = [2 * i for i in range(LANES // 2)] + [2 * i + 1 for i in range(LANES // 2)]
_UNPAIR = [PAIRS.index(i) for i in range(LANES)]


def pair_order(mask, *dtypes):
    """Whether a step of a `lanes_loop` body that reads or writes arrays of these Numba dtypes holds its lanes in
    pair order: a full step (`mask` a constant) on AVX2 with a bfloat16 (int16) array. Every load_lanes and
    store_lanes of the step takes the answer as `pairs`, but those of a scratch row that only the loop's own
    steps read back, in the order they stored it."""
    return VECTOR_ISA == "avx2" and isinstance(mask, ir.Constant) and types.int16 in dtypes


def _lane_shuffle(builder, v, lanes):
    """The lanes `lanes` of the vector v, in that order."""
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), lanes))


def load_lanes(builder, dtype, ptr, mask, pairs=False):
    """The LANES raw elements (Numba dtype float32, uint16 float16 or int16 bfloat16) at ptr as a
    <LANES x float>, lanes outside `mask` 0 and not read: `load` in IR; with `pairs`, in pair order."""
    i32 = ir.IntType(32)
    f32 = ir.VectorType(ir.FloatType(), LANES)
    if pairs and dtype == types.int16:
        words = builder.load(builder.bitcast(ptr, ir.VectorType(i32, LANES // 2).as_pointer()), align=2)
        even = builder.shl(words, ir.Constant(words.type, [16] * (LANES // 2)))
        odd = builder.and_(words, ir.Constant(words.type, [0xFFFF0000] * (LANES // 2)))
        return builder.bitcast(builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(i32, LANES), list(range(LANES)))), f32)
    x = masked(builder, "load", ptr, mask)
    if dtype == types.uint16:  # vcvtph2ps
        x = builder.fpext(builder.bitcast(x, ir.VectorType(ir.HalfType(), LANES)), f32)
    elif dtype == types.int16:
        x = builder.bitcast(builder.shl(builder.zext(x, ir.VectorType(i32, LANES)), _splat(i32, 16)), f32)
    return _lane_shuffle(builder, x, PAIRS) if pairs else x


class BFloat(ir.types.Type):
    """LLVM's bfloat type, which llvmlite's ir lacks: the result type of the vcvtneps2bf16 intrinsic."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, BFloat)

    def __hash__(self):
        return hash("bfloat")


def _bf16_rounded(builder, v):
    """The bits of the <LANES x float> v rounded to nearest even at bit 16 (their top halves then f32_to_bf16's
    result but for NaN): <LANES x i32>. Carries into the exponent give the right answer, overflow to inf included."""
    i32 = ir.IntType(32)
    bits = builder.bitcast(v, ir.VectorType(i32, LANES))
    odd = builder.and_(builder.lshr(bits, _splat(i32, 16)), _splat(i32, 1))
    return builder.add(builder.add(bits, _splat(i32, 0x7FFF)), odd)


def _bf16_bits(builder, v):
    """f32_to_bf16 on the <LANES x float> v in integer steps: <LANES x i16>."""
    i32 = ir.IntType(32)
    bits = builder.bitcast(v, ir.VectorType(i32, LANES))
    high = builder.lshr(bits, _splat(i32, 16))
    nan = builder.icmp_unsigned(">", builder.and_(bits, _splat(i32, 0x7FFFFFFF)), _splat(i32, 0x7F800000))
    even = builder.lshr(_bf16_rounded(builder, v), _splat(i32, 16))
    return builder.trunc(builder.select(nan, builder.or_(high, _splat(i32, 0x40)), even), ir.VectorType(ir.IntType(16), LANES))


def _bf16_pairs(builder, v):
    """f32_to_bf16 on the <LANES x float> v in pair order (`pair_order`), bit for bit: the <LANES x i16> of the
    elements in memory order. A NaN takes f32_to_bf16's quiet form in a branch LLVM keeps out of the way, tested
    once for both 8-lane halves (vcmpunordps of the two: 3 instructions where the compare and blend in every step
    took 7 per 16 lanes)."""
    i32, half = ir.IntType(32), LANES // 2
    halves = [_lane_shuffle(builder, v, list(range(h * half, (h + 1) * half))) for h in (0, 1)]
    any_of = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(1), [ir.VectorType(ir.IntType(1), half)]),
                                            f"llvm.vector.reduce.or.v{half}i1")
    fast = _bf16_rounded(builder, v)
    entry = builder.block
    with builder.if_then(builder.call(any_of, [builder.fcmp_unordered("uno", *halves)]), likely=False):
        quiet = builder.or_(builder.bitcast(v, fast.type), _splat(i32, 0x400000))
        fixed = builder.select(builder.fcmp_unordered("uno", v, v), quiet, fast)
        fixed_block = builder.block
    rounded = builder.phi(fast.type)
    rounded.add_incoming(fast, entry)
    rounded.add_incoming(fixed, fixed_block)
    even, odd = (_lane_shuffle(builder, rounded, list(range(h * half, (h + 1) * half))) for h in (0, 1))
    words = builder.or_(builder.lshr(even, ir.Constant(even.type, [16] * half)), builder.and_(odd, ir.Constant(odd.type, [0xFFFF0000] * half)))
    return builder.bitcast(words, ir.VectorType(ir.IntType(16), LANES))


def _bf16_cvt(builder, v):
    """f32_to_bf16 on the <LANES x float> v by vcvtneps2bf16 (AVX512-BF16): the same rounding and quiet
    NaN, but it reads subnormal inputs as 0, so a vector holding one takes _bf16_bits for those lanes (a
    branch LLVM keeps out of the way). One instruction for ~10: a float32 -> bfloat16 row in L1 took
    1.0 ns per 16 lanes against 1.3 (one core); checked against _bf16_bits on every float32."""
    mask_t, i32 = ir.VectorType(ir.IntType(1), LANES), ir.IntType(32)
    module = builder.module
    cvt = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VectorType(BFloat(), LANES), [v.type]),
                                         "llvm.x86.avx512bf16.cvtneps2bf16.512")
    # vfpclassps, one instruction; LLVM lowers llvm.is.fpclass to three integer ones (and, add, compare)
    is_class = cgutils.get_or_insert_function(module, ir.FunctionType(mask_t, [v.type, i32]), "llvm.x86.avx512.fpclass.ps.512")
    any_of = cgutils.get_or_insert_function(module, ir.FunctionType(ir.IntType(1), [mask_t]), f"llvm.vector.reduce.or.v{LANES}i1")
    fast = builder.bitcast(builder.call(cvt, [v]), ir.VectorType(ir.IntType(16), LANES))
    tiny = builder.call(is_class, [v, i32(0x20)])  # subnormals of either sign
    entry = builder.block
    with builder.if_then(builder.call(any_of, [tiny]), likely=False):
        fixed = builder.select(tiny, _bf16_bits(builder, v), fast)
        fixed_block = builder.block
    bits = builder.phi(fast.type)
    bits.add_incoming(fast, entry)
    bits.add_incoming(fixed, fixed_block)
    return bits


def store_lanes(builder, dtype, ptr, mask, v, stream=None, pairs=False):
    """Narrow the <LANES x float> v to the raw format and store the lanes in `mask` at ptr: `store` in
    IR, bit for bit (float16: vcvtps2ph rounds to nearest even and keeps NaN quiet, as f32_to_f16 does).
    stream (an i1, for a full step: `mask` a constant) where true stores non-temporally (`streams`).
    pairs: v in pair order (`pair_order`)."""
    if pairs and dtype == types.int16:
        v = _bf16_pairs(builder, v)
    else:
        if pairs:
            v = _lane_shuffle(builder, v, _UNPAIR)
        if dtype == types.uint16:
            v = builder.bitcast(builder.fptrunc(v, ir.VectorType(ir.HalfType(), LANES)), ir.VectorType(ir.IntType(16), LANES))
        elif dtype == types.int16:
            v = (_bf16_cvt if "avx512bf16" in CPU_FEATURES else _bf16_bits)(builder, v)
    if stream is None or not isinstance(mask, ir.Constant):
        masked(builder, "store", ptr, mask, v)
        return
    with builder.if_else(stream) as (streaming, caching):
        with streaming:  # aligned to the vector's size, which `streams` checked
            at = builder.bitcast(ptr, v.type.as_pointer())
            builder.store(v, at, align=LANES * (4 if isinstance(v.type.element, ir.FloatType) else 2)).set_metadata(
                "nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        with caching:
            masked(builder, "store", ptr, mask, v)


# From this many bytes on, a row kernel stores its output non-temporally (`streams`): past the caches it goes to
# memory anyway, and a plain store first reads the line it overwrites (read for ownership), 12 bytes of
# traffic for each 8 bytes a copy moves. One core, 4096 x 4096 float32: a copy 14 GB/s, streamed 20. rms_norm,
# float32, one core: 8 MiB out 1.27 ms streamed against 1.04, 16 MiB 2.11 against 2.47; a read of the output
# right after took as long either way (3.5 ms at 16 MiB: it was no longer cached).
STREAM_BYTES = 1 << 24


def streams(out):
    """Whether a row kernel's 16-lane loops store its output `out` (C-contiguous) non-temporally: a large one
    whose rows start on 64-byte lines (vmovntps / vmovntdq need aligned addresses)."""
    return VECTOR_ISA is not None and out.nbytes >= STREAM_BYTES and out.ctypes.data % 64 == 0 and out.strides[0] % 64 == 0


@intrinsic
def store_fence(typingctx):
    """sfence: the non-temporal stores before it are visible to other threads (they are weakly ordered)."""
    def codegen(context, builder, sig, args):
        if VECTOR_ISA is not None:  # where nothing streams (`streams`), nothing to fence
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


_I1, _I32, _V16F = ir.IntType(1), ir.IntType(32), ir.VectorType(ir.FloatType(), 16)  # Chunks and lane_sums


class Chunks:
    """How one kind of row is read 64 bytes (or 32 for widened 16-bit) at a time and accumulated."""

    def __init__(self, builder, kind):
        self.builder, self.kind = builder, kind
        module = builder.module
        bits = 32 if kind == "f32" else 16
        self.lanes = 32 if kind == "bf16dot" else 16  # elements per chunk
        self.raw = ir.VectorType(ir.IntType(bits), self.lanes)
        self.bytes = self.lanes * bits // 8
        self.masked_load = module.declare_intrinsic(
            f"llvm.masked.load.v{self.lanes}i{bits}.p0",
            fnty=ir.FunctionType(self.raw, [ir.PointerType(), _I32, ir.VectorType(_I1, self.lanes), self.raw]))
        if kind == "bf16dot":
            self.dot = module.declare_intrinsic(
                "llvm.x86.avx512bf16.dpbf16ps.512",
                fnty=ir.FunctionType(_V16F, [_V16F, ir.VectorType(BFloat(), 32), ir.VectorType(BFloat(), 32)]))
        else:
            self.fma = module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]))

    def load(self, address, mask=None):
        """The chunk at an integer address, as the operand accumulate() takes (masked lanes read 0)."""
        b = self.builder
        if mask is None:
            v = b.load(b.inttoptr(address, self.raw.as_pointer()), align=2)
        else:
            v = b.call(self.masked_load, [b.inttoptr(address, ir.PointerType()), ir.Constant(_I32, 2), mask,
                                          ir.Constant(self.raw, None)])
        if self.kind == "bf16dot":
            return b.bitcast(v, ir.VectorType(BFloat(), 32))
        if self.kind == "bf16":  # bfloat16 is the top half of a float32
            return b.bitcast(b.shl(b.zext(v, ir.VectorType(_I32, 16)), ir.Constant(ir.VectorType(_I32, 16), [16] * 16)), _V16F)
        if self.kind == "f16":
            return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), 16)), _V16F)
        return b.bitcast(v, _V16F)

    def accumulate(self, acc, x, w):
        if self.kind == "bf16dot":
            return self.builder.call(self.dot, [acc, x, w])
        return self.builder.call(self.fma, [x, w, acc])


def lane_sums(builder, vectors):
    """The horizontal sums of 16-lane vectors, packed 16 to a vector: lane i of result v holds the
    sum of vectors[16 * v + i].

    A shuffle tree: each round pairs two vectors whose lanes hold runs of partial sums, and one add
    of two two-source shuffles halves every run; 24 sums take ~70 instructions instead of ~200 for
    one reduction each."""
    items = list(vectors)
    run = 16  # lanes per partial sum
    while run > 1:
        if len(items) % 2:
            items.append(ir.Constant(_V16F, None))
        half, groups = run // 2, 16 // run
        lo = [base + g * run + t for base in (0, 16) for g in range(groups) for t in range(half)]
        hi = [i + half for i in lo]
        pick = lambda a, b, lanes: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16), lanes))
        items = [builder.fadd(pick(a, b, lo), pick(a, b, hi)) for a, b in zip(items[0::2], items[1::2])]
        run = half
    return items


def lanes_row(context, builder, sig, args, arrays, body, unroll=1):
    """A vector loop over the elements of 1-D contiguous arrays (`lanes_loop`): body(j, mask, ptrs, scalars)
    with ptrs the data pointers of the array arguments at positions `arrays` advanced to element j,
    scalars the other arguments; the trip count is the length of the first array."""
    if any(sig.args[i].layout != "C" for i in arrays):
        raise TypeError(f"lanes_row takes contiguous 1-D arrays, not {sig.args}")
    structs = {i: context.make_array(sig.args[i])(context, builder, args[i]) for i in arrays}
    scalars = [args[i] for i in range(len(args)) if i not in structs]
    lanes_loop(builder, cgutils.unpack_tuple(builder, structs[arrays[0]].shape)[0], [structs[i].data for i in arrays],
               lambda j, mask, ptrs: body(j, mask, ptrs, scalars), unroll)


def lanes_loop(builder, n, bases, body, unroll=1):
    """A vector loop over n elements (an i64) from each pointer of `bases`: for each LANES-wide step j
    body(j, mask, ptrs) with ptrs the bases advanced to element j. The body is emitted for the full
    steps with `mask` a constant of all lanes (LLVM makes its masked loads and stores plain ones),
    `unroll` times in a row per iteration (a body that rotates between that many accumulators breaks a
    reduction's chain of dependent adds), then once more for the masked steps of the tail. A mask built
    in every step cost more than the exp it guarded: 16 lanes of exp in L1 took 6.2 ns a step masked,
    2.9 ns unmasked (one core, shared host)."""
    i64 = ir.IntType(64)
    full = builder.mul(builder.sdiv(n, i64(LANES * unroll)), i64(LANES * unroll))
    every = ir.Constant(ir.VectorType(ir.IntType(1), LANES), [1] * LANES)
    with cgutils.for_range_slice(builder, i64(0), full, i64(LANES * unroll)) as (j0, _):
        for u in range(unroll):
            j = builder.add(j0, i64(LANES * u))
            body(j, every, [builder.gep(base, [j]) for base in bases])
    with cgutils.for_range_slice(builder, full, n, i64(LANES)) as (j, _):
        body(j, lanes_below(builder, builder.sub(n, j), LANES), [builder.gep(base, [j]) for base in bases])


def exp_lanes(builder, x, plus=None, positive=True, stored=types.float32):
    """common.exp on a <16 x float> in IR, bit for bit (every float32 input checked): the same
    clamps, Cody-Waite reduction and polynomial, the scaling by 2**n one vscalefps (a single
    rounding of p * 2**n, as common.exp's two-factor product gives) where common.exp takes 9 integer
    and float steps (16 lanes in L1, one core: 2.9 ns a step against 4.6). Numba vectorizes
    common.exp in 8 lanes here (LLVM prefers 256-bit vectors on this CPU). With `plus` (a float) it
    is plus + exp(x) rounded once, as Numba's contract fuses it in plus + exp(x) (silu's 1 + exp(-x)):
    fma(p * 2**(n-1), 2, plus), so that p * 2**128 stays finite inside the fma as it does there.
    Without AVX-512 (exp_lanes runs there too, as two AVX2 vectors) common.exp's integer scaling.
    positive=False: x is known to be <= 0 or NaN (softmax's x - max), so the clamp at 89 goes.
    stored, the Numba dtype the results end up in: for 16 bits (uint16 float16, int16 bfloat16; no longer common.exp's
    bits, relative error < 6e-6) EXP_POLY_16 in Horner form to the end, the reduction by one float32 ln 2 (error <
    3e-7) and plus added after the scaling, 4 vector ops fewer (with AVX-512). Without AVX-512, 16-bit results scale
    by 2**n as one factor whose biased exponent is floored at 0, so results below 2**-126 flush to 0 (absolute error
    < 1.2e-38; n = 128, x > 88.38, gives inf where float32 overflows from 88.72 on: silu's x / (1 + exp(-x)) is 0
    there, off by < 4e-37): 4 integer and float steps where the two factors take 9, and bfloat16 ones take EXP_POLY_8,
    one FMA fewer. AMD EPYC Zen 3, AVX2, one core, bfloat16 softmax 16 / 4096 rows of 4096: 0.85-0.90 -> 0.77 /
    0.74 -> 0.64-0.67 ns an element (3 runs each, alternated) for the one factor."""
    vec = x.type
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{vec.count}f32")
    narrow = stored != types.float32

    def c(value):
        return ir.Constant(vec, [value] * vec.count)

    x = builder.select(builder.fcmp_ordered("<", x, c(-104.0), flags=IR_FLAGS), c(-104.0), x)  # NaN passes both
    if positive:
        x = builder.select(builder.fcmp_ordered(">", x, c(89.0), flags=IR_FLAGS), c(89.0), x)
    t = builder.call(fma, [x, c(float(LOG2E)), c(float(ROUND))])
    n = builder.fsub(t, c(float(ROUND)), flags=IR_FLAGS)
    if narrow:
        r = builder.call(fma, [n, c(-math.log(2)), x])
        poly = EXP_POLY_8 if stored == types.int16 and VECTOR_ISA == "avx2" else EXP_POLY_16
        p = c(poly[0])
        for coef in (*poly[1:], 1.0, 1.0):
            p = builder.call(fma, [p, r, c(coef)])
    else:
        r = builder.call(fma, [n, c(-float(LN2_LO)), builder.call(fma, [n, c(-float(LN2_HI)), x])])  # fused as Numba's contract does
        p = c(EXP_POLY[0])
        for coef in EXP_POLY[1:]:
            p = builder.call(fma, [p, r, c(coef)])
        p = builder.fadd(builder.call(fma, [builder.fmul(p, r, flags=IR_FLAGS), r, r]), c(1.0), flags=IR_FLAGS)
    if "avx512f" not in CPU_FEATURES:  # no vscalefps (LLVM cannot split it for AVX2): common.exp's integer steps
        ivec = ir.VectorType(ir.IntType(32), vec.count)
        if narrow:  # 2**n as one factor, flushing results below 2**-126 to 0
            biased = builder.add(builder.bitcast(t, ivec), ir.Constant(ivec, [127 - ROUND_BITS] * vec.count))
            biased = builder.select(builder.icmp_signed(">", biased, ir.Constant(ivec, [0] * vec.count)), biased,
                                    ir.Constant(ivec, [0] * vec.count))
            scale = builder.bitcast(builder.shl(biased, ir.Constant(ivec, [23] * vec.count)), vec)
            return builder.fmul(p, scale, flags=IR_FLAGS) if plus is None else builder.call(fma, [p, scale, c(plus)])
        ni = builder.sub(builder.bitcast(t, ivec), ir.Constant(ivec, [ROUND_BITS] * vec.count))
        h = builder.ashr(ni, ir.Constant(ivec, [1] * vec.count))
        low, high = (builder.bitcast(builder.shl(builder.add(e, ir.Constant(ivec, [127] * vec.count)), ir.Constant(ivec, [23] * vec.count)), vec)
                     for e in (h, builder.sub(ni, h)))
        low = builder.fmul(p, low, flags=IR_FLAGS)
        return builder.fmul(low, high, flags=IR_FLAGS) if plus is None else builder.call(fma, [low, high, c(plus)])
    if plus is not None and not narrow:
        n = builder.fsub(t, c(float(ROUND) + 1.0), flags=IR_FLAGS)  # n - 1, exactly
    scalef = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec, ir.IntType(16), ir.IntType(32)]),
                                            "llvm.x86.avx512.mask.scalef.ps.512")
    e = builder.call(scalef, [p, n, ir.Constant(vec, ir.Undefined), ir.IntType(16)(-1), ir.IntType(32)(4)])  # 4: MXCSR rounding
    if plus is None:
        return e
    return builder.fadd(e, c(plus), flags=IR_FLAGS) if narrow else builder.call(fma, [e, c(2.0), c(plus)])


def rcp_lanes(builder, v):
    """The approximate reciprocal of the <LANES x float> v: vrcp14ps (relative error < 2**-14), without AVX-512
    vrcpps on each 8-lane half (< 1.5 * 2**-12, enough for bfloat16's 8 bits, not float16's 11). 1 / inf is 0, so
    x times it is what x / inf is (0, NaN for an infinite x)."""
    if VECTOR_ISA == "avx512":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v.type, [v.type, v.type, ir.IntType(16)]),
                                            "llvm.x86.avx512.rcp14.ps.512")
        return builder.call(fn, [v, ir.Constant(v.type, ir.Undefined), ir.IntType(16)(-1)])
    half = LANES // 2
    vec = ir.VectorType(v.type.element, half)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec]), "llvm.x86.avx.rcp.ps.256")
    low, high = (builder.call(fn, [_lane_shuffle(builder, v, list(range(h * half, (h + 1) * half)))]) for h in (0, 1))
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(ir.IntType(32), LANES), list(range(LANES))))


def prefetch_line(builder, ptr, for_write, locality=3):
    """IR of a prefetch of the cache line holding *ptr, for reading or (for_write) writing, into L1
    (locality 3: prefetcht0) or only into L2 (2: prefetcht1)."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch")
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(int(for_write)), i32(locality), i32(1)])  # (address, write, locality, data)


def _prefetch_intrinsic(for_write, locality=3):
    """An intrinsic prefetch(a, i): an LLVM prefetch of the cache line holding a[i] (i a tuple of ints,
    one per axis of a, or an int: on a 1-D array its index, on more axes the offset in elements from
    a's first element), for reading or (for_write) writing, into L1 or L2 (`prefetch_line`). A hint: it
    never faults, and it only pays where the hardware prefetcher idles, e.g. during a compute pass over
    a cached row."""

    @intrinsic
    def prefetch(typingctx, a, i):
        index_types = i.types if isinstance(i, types.BaseTuple) else (i,)
        if not isinstance(a, types.Array) or not all(isinstance(t, types.Integer) for t in index_types) \
                or len(index_types) not in (1, a.ndim):
            return None

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            index = cgutils.unpack_tuple(builder, args[1]) if isinstance(sig.args[1], types.BaseTuple) else [args[1]]
            index = [context.cast(builder, v, t, types.intp) for v, t in zip(index, index_types)]
            if len(index) == sig.args[0].ndim:
                ptr = cgutils.get_item_pointer(context, builder, sig.args[0], array, index, wraparound=False)
            else:  # a flat offset in elements
                ptr = builder.gep(array.data, index)
            prefetch_line(builder, ptr, for_write, locality)
            return context.get_dummy_value()

        return types.void(a, i), codegen

    return prefetch


prefetch = _prefetch_intrinsic(False)
prefetch_write = _prefetch_intrinsic(True)
# Into L2 only: a row kernel's next row, which in L1 crowds out the row it works on (softmax's float32 row, its
# float32 buffer and the next row: 48 KiB, all of L1). One core, 4096 rows, ns an element fp32 / bf16, into L1
# -> into L2: rms_norm 0.47 -> 0.42 / 0.24 -> 0.22, layer_norm 0.45 -> 0.41 / 0.30 -> 0.28, softmax 0.63 ->
# 0.61 / 0.30 -> 0.31, rope 0.48 -> 0.45 / 0.30 -> 0.31.
prefetch_l2 = _prefetch_intrinsic(False, 2)
prefetch_write_l2 = _prefetch_intrinsic(True, 2)


# Exact float16 -> float32 table, built once at import (Numba embeds it as a constant).
F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


def _target_features():
    """The ISA features of the CPU Numba compiles for, as LLVM names them: the host's enabled ones,
    or the "+name" entries of NUMBA_CPU_FEATURES, or none for a NUMBA_CPU_NAME given without
    features (e.g. "generic" for a portable cache). Hand-built IR that uses an intrinsic of a missing
    feature aborts the process in LLVM's instruction selection, so this must not overstate."""
    if numba_config.CPU_FEATURES is not None:
        return frozenset(f[1:] for f in numba_config.CPU_FEATURES.split(",") if f.startswith("+"))
    if numba_config.CPU_NAME not in (None, "host"):
        return frozenset()
    return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)


CPU_FEATURES = _target_features()
HAS_F16C = "f16c" in CPU_FEATURES
# The vector ISA of the hand-written IR loops (`lanes_fit`): "avx512" (16 lanes a register), "avx2" (AVX2 and FMA:
# LLVM splits each 16-lane operation into two 8-lane ones) or None.
VECTOR_ISA = "avx512" if "avx512f" in CPU_FEATURES else "avx2" if {"avx2", "fma"} <= CPU_FEATURES else None


@intrinsic
def f16_f32(typingctx, x):
    """float16 bits (uint16) -> float32 as an LLVM fpext from half: exact (a signalling NaN comes
    back quiet); only used when the host has F16C, else LLVM would call a runtime helper."""
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(x), codegen


@njit(**HELPER)
def f32_to_f16(f):
    """float32 -> float16 bits, round to nearest even; overflow -> inf, NaN stays a (quiet) NaN."""
    x = f32_bits(f)
    sign = (x >> U32(16)) & U32(0x8000)
    x &= U32(0x7FFFFFFF)
    if x >= U32(0x47800000):  # |f| >= 2**16 (rounds to inf), inf or NaN
        h = U32(0x7C00)
        if x > U32(0x7F800000):  # NaN: set the quiet bit, keep the top payload bits
            h |= U32(0x200) | ((x >> U32(13)) & U32(0x3FF))
    elif x < U32(0x38800000):  # |f| < 2**-14: float16 subnormal or zero
        # Adding 0.5 lines the 2**-24 units up with the float32 mantissa's low bits; the FPU rounds
        # to nearest even and a carry into bit 10 correctly yields the smallest normal.
        h = f32_bits(bits_f32(x) + F32(0.5)) - U32(0x3F000000)
    else:  # normal: rebias the exponent, add 0xFFF + odd bit = round half to even, drop 13 bits
        h = (x + U32(0xC8000FFF) + ((x >> U32(13)) & U32(1))) >> U32(13)
    return np.uint16(h | sign)


@njit(**HELPER)
def f32_to_bf16(f):
    """float32 -> bfloat16 bits (as int16), round to nearest even; NaN stays a (quiet) NaN."""
    x = f32_bits(f)
    if (x & U32(0x7FFFFFFF)) > U32(0x7F800000):
        return np.int16(np.uint16((x >> U32(16)) | U32(0x40)))
    # Carries into the exponent give the right answer, including overflow to inf.
    return np.int16(np.uint16((x + U32(0x7FFF) + ((x >> U32(16)) & U32(1))) >> U32(16)))


def load(a, i):
    """a[i] as float32, for a float32, float16 (uint16 view) or bfloat16 (int16 view) array."""


def store(a, i, v):
    """a[i] = float32 v, narrowed to the array's format."""


@overload(load, jit_options=HELPER)
def _ld_impl(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.uint16:
        if HAS_F16C:  # one vcvtph2ps per vector instead of a gather from the table
            return lambda a, i: f16_f32(a[i])
        return lambda a, i: F16_TO_F32[a[i]]
    if a.dtype == types.int16:  # bfloat16 is the top half of a float32: a shift is exact
        return lambda a, i: bits_f32(U32(np.uint16(a[i])) << U32(16))
    return None


@overload(store, jit_options=HELPER)
def _st_impl(a, i, v):
    if a.dtype == types.float32:
        def st(a, i, v):
            a[i] = v
    elif a.dtype == types.uint16:
        def st(a, i, v):
            a[i] = f32_to_f16(v)
    elif a.dtype == types.int16:
        def st(a, i, v):
            a[i] = f32_to_bf16(v)
    else:
        return None
    return st


BF16 = np.dtype(ml_dtypes.bfloat16)


def raw_view(a):
    """The array Numba sees: float32 as is, float16 as uint16, bfloat16 as int16 (None passes)."""
    if a is None or a.dtype == np.float32:
        return a
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype == BF16:
        return a.view(np.int16)
    raise TypeError(f"cpu kernels take float32, float16 or bfloat16 tensors, not {a.dtype}")


def as_rows(a, n):
    """A C-contiguous tensor [..., n] as a 2-D [rows, n] raw view (works for empty tensors)."""
    if a is None:
        return None
    a = raw_view(a)
    return a if a.ndim == 2 else a.reshape(math.prod(a.shape[:-1]), n)


def outside_segments(rows, starts, ends):
    """Which of `rows` rows no segment [starts[e], ends[e]) holds (a bool mask; segments within [0, rows])."""
    owned = np.zeros(rows + 1, np.int64)  # +1 at each segment's start, -1 at its end
    np.add.at(owned, starts, 1)
    np.add.at(owned, ends, -1)
    return np.cumsum(owned[:-1]) == 0


# ---------------------------------------------------------------- vectorizable float32 math

LOG2E = F32(1.4426950408889634)
LN2_HI = F32(0.693359375)  # Cody-Waite split of ln 2: n * LN2_HI is exact for |n| <= 2**9
LN2_LO = F32(-2.12194440e-4)
ROUND = F32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the low bits
ROUND_BITS = 0x4B400000
# exp's polynomial on the reduced argument r, highest power first (Cephes expf); 1 + r + r^2 * p(r)
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# The same for results stored as bfloat16 / float16 (exp_lanes' poly): a minimax fit of degree 4, relative
# error < 5.4e-6 in float32 (half an ulp is 2e-3 / 2.4e-4 there), two FMAs where EXP_POLY takes five.
# bfloat16 softmax, one core, 16 x 4096: 0.36 -> 0.31 ns an element.
EXP_POLY_16 = (0.04127436876296997, 0.16753625869750977, 0.5000516772270203)
# Degree 3 for bfloat16 results on AVX2 (exp_lanes): relative error < 1.3e-4, a 30th of bfloat16's half ulp.
EXP_POLY_8 = (0.16662807762622833, 0.5039417743682861)


@njit(**HELPER)
def exp(x):
    """exp for float32 in straight-line code (Cephes polynomial, ~1 ulp) so loops vectorize.

    Subnormal results and overflow to inf are right; NaN propagates.
    """
    x = F32(-104.0) if x < F32(-104.0) else x  # exp(-104) rounds to 0; comparisons pass NaN
    x = F32(89.0) if x > F32(89.0) else x  # exp(89) overflows
    t = x * LOG2E + ROUND
    n = t - ROUND
    r = x - n * LN2_HI - n * LN2_LO
    p = F32(EXP_POLY[0])
    p = p * r + F32(EXP_POLY[1])
    p = p * r + F32(EXP_POLY[2])
    p = p * r + F32(EXP_POLY[3])
    p = p * r + F32(EXP_POLY[4])
    p = p * r + F32(EXP_POLY[5])
    p = p * r * r + r + F32(1.0)
    # Scale by 2**n as 2**h * 2**(n-h): both factors stay normal for n in [-151, 128].
    ni = np.int32(f32_bits(t)) - np.int32(ROUND_BITS)
    h = ni >> 1
    return p * bits_f32((h + 127) << 23) * bits_f32((ni - h + 127) << 23)


@njit(**HELPER)
def silu(x):
    return x / (F32(1.0) + exp(-x))


@njit(**HELPER)
def gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no cancellation for negative x.
    u = F32(0.7978845608028654) * (x + F32(0.044715) * x * x * x)
    return x / (F32(1.0) + exp(F32(-2.0) * u))


@njit(**HELPER)
def gelu(x):
    # x * Phi(x) with Phi from erfc(|x|/sqrt2) (Numerical Recipes erfcc: relative error < 1.2e-7
    # everywhere, so the negative tail stays accurate rather than 1 + erf cancelling).
    z = abs(x) * F32(0.7071067811865476)
    t = F32(1.0) / (F32(1.0) + F32(0.5) * z)
    p = F32(0.17087277)
    p = p * t + F32(-0.82215223)
    p = p * t + F32(1.48851587)
    p = p * t + F32(-1.13520398)
    p = p * t + F32(0.27886807)
    p = p * t + F32(-0.18628806)
    p = p * t + F32(0.09678418)
    p = p * t + F32(0.37409196)
    p = p * t + F32(1.00002368)
    p = p * t + F32(-1.26551223)
    half_erfc = F32(0.5) * t * exp(p - z * z)
    return x * (F32(1.0) - half_erfc if x >= F32(0.0) else half_erfc)


# Activation codes (hal.codes): module globals, so Numba folds them into the kernels as constants.
RELU, GELU, GELU_TANH, SILU = (ACTIVATIONS[name] for name in ("relu", "gelu", "gelu_tanh", "silu"))
_CODES = tuple(code for code in ACTIVATIONS.values() if code)


@njit(**HELPER)
def activate(v, code):
    """The epilogue activation with code `code` (hal.codes.ACTIVATIONS; 0: none) of a float32 v."""
    if code == RELU:
        return F32(0.0) if v < F32(0.0) else v  # relu keeps NaN, like torch
    if code == GELU:
        return gelu(v)
    if code == GELU_TANH:
        return gelu_tanh(v)
    if code == SILU:
        return silu(v)
    return v


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def activate_row(v, n, code):
    """v[:n] = activate(v[:n], code) in place, v a float32 row. The loop over the codes is unrolled,
    so each copy of the row loop has its code a constant and vectorizes (a row loop calling
    activate() with the code an argument keeps the branches inside: 5-10x slower)."""
    for c in _CODES:
        if c == code:
            for j in range(n):
                v[j] = activate(v[j], c)


# ---------------------------------------------------------------- widening and dot products

@njit(**KERNEL)
def widen_kernel(src, dst):
    """dst[r, j] = float32(src[r, j]); src may be strided."""
    rows, cols = dst.shape
    for r in prange(rows):
        for j in range(cols):
            dst[r, j] = load(src, (r, j))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def dot4(x, c):
    """x . c[0], ..., x . c[3]: four columns of b per pass over the row x of a."""
    s0 = s1 = s2 = s3 = F32(0.0)
    c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
    for p in range(x.shape[0]):
        s0 += x[p] * c0[p]
        s1 += x[p] * c1[p]
        s2 += x[p] * c2[p]
        s3 += x[p] * c3[p]
    return s0, s1, s2, s3


def as_f32(a):
    """A float32 version of a 2-D tensor for BLAS, keeping a transposed layout contiguous."""
    if a.dtype == np.float32:
        return a
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        return as_f32(a.T).T
    dst = np.empty(a.shape, np.float32)
    widen_kernel(raw_view(a), dst)
    return dst


# ---------------------------------------------------------------- kernel tables


class Kernel(NamedTuple):
    """One entry of a kernel module's KERNELS table: registry.add_kernel(op, "cpu", fn, dtypes=..., **options)."""

    op: str
    fn: object
    dtypes: tuple = FLOATS
    options: dict = {}  # supports=, requires=, contiguous=
