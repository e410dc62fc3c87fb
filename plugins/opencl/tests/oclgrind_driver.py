"""Runs the opencl backend's real kernels on small problems and checks their results; meant to be
executed under Oclgrind (`oclgrind --data-races --uninitialized python oclgrind_driver.py`), which
intercepts the OpenCL API and simulates every work-item, reporting data races, uninitialized
reads and out-of-bounds accesses.

With `--candidate OP=PATH` it runs only a candidate kernel built from PATH through the plugin's
`hal_candidate_kernel` hook (the planted-race test uses that). Exit status 0 when every result
matched the float64 reference, 1 otherwise; 3 when the OpenCL platform is not Oclgrind's (the
run would prove nothing).
"""
import sys

import numpy as np

import hal
import hal_opencl
from hal import conformance
from hal_opencl.device import runtime
from hal_opencl.kernels import Launcher

RNG = np.random.default_rng(7)


def rand(shape, dtype="float32", scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(hal_opencl._np(dtype))


def cases():
    """(op, arguments, label): every kernel and its variants, shapes with partial tiles and groups."""
    f32, f16, bf16 = "float32", "float16", "bfloat16"
    for dt in (f32, f16, bf16):
        yield hal.ops.rms_norm, dict(x=rand((3, 50), dt), weight=rand(50, dt), eps=1e-5, residual=rand((3, 50), dt)), f"rms_norm {dt} +residual"
    yield hal.ops.rms_norm, dict(x=rand((2, 7)), weight=rand(7), eps=1e-5, residual=None), "rms_norm"
    yield hal.ops.layer_norm, dict(x=rand((3, 37)), weight=rand(37), bias=rand(37), eps=1e-5, residual=rand((3, 37))), "layer_norm +residual"
    yield hal.ops.layer_norm, dict(x=rand((2, 20), f16), weight=rand(20), bias=None, eps=1e-5, residual=None), "layer_norm f16, fp32 weight"
    yield hal.ops.softmax, dict(x=rand((3, 45), scale=3.0), dim=-1), "softmax rows"
    masked = rand((2, 40))
    masked[:, 12:] = -np.inf
    yield hal.ops.softmax, dict(x=masked, dim=-1), "softmax -inf tail"
    yield hal.ops.softmax, dict(x=rand((2, 9, 3), bf16), dim=1), "softmax bf16 middle dim"
    yield hal.ops.silu_and_mul, dict(x=rand((5, 2 * 13))), "silu_and_mul"
    yield hal.ops.silu_and_mul, dict(x=rand((3, 2 * 8), f16)), "silu_and_mul f16"
    cos, sin = hal.ops.rotary.rope_cache(16, 12)
    for inter in (False, True):
        yield hal.ops.rope, dict(q=rand((3, 2, 16)), k=rand((3, 1, 16)), cos=cos, sin=sin, positions=np.array([0, 5, 15]),
                                 interleaved=inter, rotary_dim=12), f"rope partial interleaved={inter}"
    yield hal.ops.gemm, dict(a=rand((37, 40)), b=rand((40, 35)), bias=rand(35), activation="gelu", alpha=0.5, beta=0.7,
                             c=rand((37, 35)), out_dtype=None), "gemm 37x40x35, two tiles each way, bias gelu residual"
    yield hal.ops.gemm, dict(a=rand((5, 20), bf16), b=rand((20, 6), bf16), bias=None, activation="silu", alpha=1.0, beta=0.0,
                             c=None, out_dtype="float32"), "gemm bf16 -> f32"
    yield hal.ops.gemm, dict(a=rand((4, 0)), b=rand((0, 3)), bias=rand(3), activation="relu", alpha=1.0, beta=0.0, c=None,
                             out_dtype=None), "gemm K = 0"
    att = dict(causal=False, scale=None, window=None, softcap=None, cu_seqlens_q=None, cu_seqlens_k=None)
    yield hal.ops.attention, dict(att, q=rand((1, 40, 2, 16)), k=rand((1, 45, 1, 16)), v=rand((1, 45, 1, 8))), "attention gqa, 2 key tiles, dv != d"
    yield hal.ops.attention, dict(att, q=rand((1, 40, 1, 16)), k=rand((1, 40, 1, 16)), v=rand((1, 40, 1, 16)), causal=True,
                                  window=9, softcap=5.0), "attention causal window softcap, 2 query blocks"
    yield hal.ops.attention, dict(att, q=rand((6, 1, 16)), k=rand((40, 1, 16)), v=rand((40, 1, 16)), causal=True,
                                  cu_seqlens_q=np.array([0, 1, 6], np.int32), cu_seqlens_k=np.array([0, 35, 40], np.int32)), "attention varlen causal"
    yield hal.ops.attention, dict(att, q=rand((1, 5, 1, 16), f16), k=rand((1, 3, 1, 16), f16), v=rand((1, 3, 1, 16), f16),
                                  causal=True), "attention f16, rows that see no key"


def run_kernel(fn, op, args):
    """What hal's dispatch does for a registered kernel, for a candidate kernel `fn` on opencl."""
    backend = hal_opencl.OpenCLBackend()
    a = op.validate(op.bind((), dict(args)))
    native = {t.name: None if a[t.name] is None else backend.to_native(a[t.name], True) for t in op.tensors}
    native.update({p.name: a[p.name] for p in op.attrs})
    outs = tuple(backend.poisoned(shape, dtype) for shape, dtype in op.outputs(a))
    fn(outs, **native)
    return tuple(backend.from_native(y, args[op.primary]) for y in outs)


def check(op, args, label, fn=None):
    outs = run_kernel(fn or Launcher(op.name), op, args)
    worst, _, message = conformance.judge(op, args, outs)
    print(f"{'ok  ' if worst <= 1 else 'FAIL'} {label} (worst error / tolerance {worst:.3g}) {message}", flush=True)
    return worst <= 1


def main(argv):
    platform = runtime().device.platform.name
    print(f"platform: {platform}", flush=True)
    if "oclgrind" not in platform.lower() and "--any-platform" not in argv:
        print("not running under Oclgrind (run as: oclgrind --data-races --uninitialized python oclgrind_driver.py)")
        return 3
    ok = True
    if "--candidate" in argv:
        name, path = argv[argv.index("--candidate") + 1].split("=", 1)
        op = getattr(hal.ops, name)
        fn = hal_opencl.hal_candidate_kernel(backend="opencl", op=op, path=path)
        for op_, args, label in cases():
            if op_ is op:
                ok &= check(op, args, f"candidate {label}", fn)
    else:
        for op, args, label in cases():
            ok &= check(op, args, label)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
