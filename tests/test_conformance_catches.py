"""The conformance suite must fail wrong kernels, not only pass right ones."""
import numpy as np
import pytest

import hal
from hal import conformance
from hal.testing import reference_kernel


def statuses(backend, op):
    return [conformance.run(c) for c in conformance.cases(backend, [op])]


def test_reference_kernels_pass(make_backend):
    """The float64 reference, rounded to the outputs' dtypes, passes every case of every op in the dtypes
    the cpu backend declares (floats; the fp8 and int8 GEMMs dispatch on their input formats)."""
    kernels = hal.registry().kernels
    names = [make_backend(f"exact-{n}", {n: reference_kernel(op)}, dtypes=sorted({d for k in kernels[(n, "cpu")] for d in k.dtypes}))
             for n, op in hal.ops.ALL.items()]
    results = [conformance.run(c) for name in names for c in conformance.cases(name)]
    assert results and all(r.status == "pass" for r in results), [r.message for r in results if r.status != "pass"][:3]


def test_off_by_one_mean_fails(make_backend):
    def rms_norm(outs, x, weight, residual, eps):
        s = x.astype(np.float64) if residual is None else x.astype(np.float64) + residual
        y = s / np.sqrt((s * s).sum(-1, keepdims=True) / (s.shape[-1] - 1 or 1) + eps) * weight.astype(np.float64)
        outs[0][...] = y
        if residual is not None:
            outs[1][...] = s

    name = make_backend("off-by-one", {"rms_norm": rms_norm}, dtypes=["float32"])
    failed = [r for r in statuses(name, "rms_norm") if r.status == "fail"]
    assert len(failed) >= 5
    assert all("tol" in r.message for r in failed)


def test_unwritten_elements_fail(make_backend):
    exact = reference_kernel(hal.ops.softmax)

    def softmax(outs, x, dim):
        keep = outs[0].copy()
        exact(outs, x=x, dim=dim)
        if outs[0].size:
            outs[0].flat[-1] = keep.flat[-1]  # forgets the last element: still the NaN poison

    name = make_backend("lazy", {"softmax": softmax})
    failed = [r for r in statuses(name, "softmax") if r.status == "fail"]
    assert failed and all("NaN" in r.message for r in failed)


def test_ignoring_an_epilogue_fails(make_backend):
    exact = reference_kernel(hal.ops.gemm)

    def gemm(outs, a, b, bias, c, **attrs):
        exact(outs, a=a, b=b, bias=bias, c=None, **attrs)  # drops the residual

    name = make_backend("no-residual", {"gemm": gemm})
    failed = {r.case.sample.label for r in statuses(name, "gemm") if r.status == "fail"}
    assert {"64x96x130 bias silu residual", "129x257x65 residual epilogue"} <= failed


def test_input_mutation_fails(make_backend):
    exact = reference_kernel(hal.ops.silu_and_mul)

    def silu_and_mul(outs, x):
        exact(outs, x=x)
        if x.size:
            x.flat[0] = 0  # scribbles on its input

    name = make_backend("scribbler", {"silu_and_mul": silu_and_mul})
    failed = [r for r in statuses(name, "silu_and_mul") if r.status == "fail"]
    assert failed and all("modified its input" in r.message for r in failed)


def test_a_refusing_kernel_is_unsupported_not_passed(make_backend):
    name = make_backend("picky", {"softmax": reference_kernel(hal.ops.softmax)}, supports=lambda a: a["x"].shape[-1] % 8 == 0, requires="a last dim that is a multiple of 8")
    results = statuses(name, "softmax")
    unsupported = [r for r in results if r.status == "unsupported"]
    assert unsupported and all("multiple of 8" in r.message for r in unsupported)
    assert any(r.status == "pass" for r in results)


def test_pytest_entry_point_runs_a_vendor_backend(tmp_path):
    """`pytest --pyargs hal.conformance --hal-backend NAME` works from anywhere."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "hal.conformance", "--hal-backend", "cpu", "--hal-op", "silu_and_mul", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.parametrize("dropped", ["causal", "window", "softcap"])
def test_attention_kernels_that_ignore_a_mask_or_cap_fail(make_backend, dropped):
    exact = reference_kernel(hal.ops.attention)

    def attention(outs, **args):
        exact(outs, **{**args, dropped: False if dropped == "causal" else None})

    name = make_backend(f"no-{dropped}", {"attention": attention}, dtypes=["float32", "bfloat16"])
    failed = [r.case.sample.label for r in statuses(name, "attention") if r.status == "fail"]
    assert failed, f"ignoring {dropped} went unnoticed"
    if dropped == "causal":
        assert any("masked V = 1000" in label for label in failed)


def test_attention_in_too_low_precision_fails(make_backend):
    """Rounding the scores to fp16 in a float32 kernel exceeds twice the naive fp32 error."""
    op = hal.ops.attention

    def attention(outs, **args):
        from hal.conformance import as_float64

        outs[0][...] = op.naive(as_float64(args), "float16")[0]

    name = make_backend("fp16-inside", {"attention": attention}, dtypes=["float32"])
    assert any(r.status == "fail" for r in statuses(name, "attention"))
