"""The CUDA and HIP kernels through the host emulator (cuda-sim, rocm-sim): the conformance suite,
the architecture-dependent variant choice, and the sanitizer modes on real kernels."""
import numpy as np
import pytest

import hal
from hal import conformance
from hal.backends.gpu.vendor import CUDA, ROCM
from hal.conformance.pytest_plugin import check_case, parametrize_cases
from hal.dispatch import explain

SIMS = ["cuda-sim", "rocm-sim"]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        parametrize_cases(metafunc, default_backends=SIMS)


def test_sim_conformance(case):
    check_case(case)


@pytest.mark.parametrize("vendor, old_arch", [(CUDA, "sm_75"), (ROCM, "gfx1030")], ids=["cuda", "rocm"])
def test_without_tensor_ops_half_gemm_runs_the_simt_kernel(sim_on, vendor, old_arch):
    name = sim_on(vendor, old_arch)[0]
    rng = np.random.default_rng()
    a = rng.standard_normal((33, 70)).astype(np.float16)
    args = hal.ops.gemm.validate(hal.ops.gemm.bind((a, a.T), {}))
    assert explain(hal.ops.gemm, args, name) == (name, name, None)
    results = [conformance.run(c) for c in conformance.cases(name, ["gemm"])]
    assert results and all(r.status == "pass" for r in results), [r.message for r in results if r.status != "pass"][:3]


@pytest.mark.parametrize("vendor, old_arch", [(CUDA, "sm_75"), (ROCM, "gfx1030")], ids=["cuda", "rocm"])
def test_without_tensor_ops_half_grouped_gemms_run_the_simt_kernel(sim_on, vendor, old_arch):
    """Both expert layouts (offsets and masked) through grouped_gemm_simt in f16 / bf16."""
    name, launched = sim_on(vendor, old_arch)
    launched.clear()
    cases = [c for c in conformance.cases(name, ["grouped_gemm", "grouped_gemm_masked"]) if c.dtype in ("float16", "bfloat16")]
    results = [conformance.run(c) for c in cases]
    assert results and all(r.status == "pass" for r in results), [r.message for r in results if r.status != "pass"][:3]
    assert launched == {"grouped_gemm_simt"}


def test_a_kernel_needing_newer_hardware_falls_back_with_the_reason(sim_on):
    from hal.backends.gpu.catalog import KERNELS

    tensor_op_only = tuple(k for k in KERNELS if k.needs_tensor_ops)
    name = sim_on(CUDA, "sm_75", kernels=tensor_op_only)[0]
    a = np.random.default_rng().standard_normal((16, 16)).astype(np.float16)
    with pytest.warns(hal.FallbackWarning, match=r"tensor-op units \(mma.sync.m16n8k16\): sm_80"):
        out = hal.ops.gemm(a, a, backend=name)
    np.testing.assert_allclose(out.astype(np.float32), a.astype(np.float32) @ a.astype(np.float32), rtol=2e-2, atol=2e-2)
    with hal.use(name, fallback="error"), pytest.raises(hal.KernelNotFound, match="sm_80"):
        hal.ops.gemm(a, a)


SANITIZED_OPS = ["rms_norm", "softmax", "gemm"]


@pytest.mark.parametrize("vendor", [CUDA, ROCM], ids=["cuda", "rocm"])
@pytest.mark.parametrize("mode", ["tsan", "asan"])
def test_real_kernels_run_clean_under_sanitizers(sim_on, vendor, mode):
    name = sim_on(vendor, mode=mode)[0]
    cases = [c for c in conformance.cases(name, SANITIZED_OPS) if c.kind != "error" and c.dtype in ("float32", "bfloat16")]
    results = [conformance.run(c) for c in cases[::3]]
    bad = [f"{r.case.id}: {r.message[:2000]}" for r in results if r.status != "pass"]
    assert results and not bad, "\n".join(bad)
