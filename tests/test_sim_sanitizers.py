"""The emulator's sanitizer modes prove their detectors work: a shared-memory reduction with one
barrier removed is reported by "tsan" at the kernel's source lines, a store one element past a
tensor by "asan"; the correct versions, and the real norm / activation kernels, run clean and
return the right outputs. The same is shown on copies of the real kernel files with the bug
planted (skipped, with the reason, if those files no longer have the line the test edits)."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hal.codes import ACTIVATIONS
from hal.errors import KernelLaunchError

executor = pytest.importorskip("hal.backends.sim.executor")
KERNELS = Path(__file__).parent / "sim_kernels"
BACKENDS = Path(executor.__file__).resolve().parent.parent


def needs(mode):
    ok, why = executor.sanitizer_available(mode)
    return pytest.mark.skipif(not ok, reason=f"{mode} unavailable here: {why}")


def line_of(path, marker):
    for number, text in enumerate(Path(path).read_text().splitlines(), 1):
        if marker in text:
            return number
    raise AssertionError(f"{marker} not in {path}")


def rows(rng, r, n):
    return rng.standard_normal((r, n)).astype(np.float32)


# ---- own kernels ---------------------------------------------------------------------------------

@needs("tsan")
def test_tsan_reports_a_missing_barrier_at_the_source_lines(rng):
    clean = executor.SimModule(KERNELS / "reduce.cu", "cuda", ["row_sum"], mode="tsan")
    planted = executor.SimModule(KERNELS / "reduce.cu", "cuda", ["row_sum"], mode="tsan", defines={"HAL_PLANT_RACE": None})
    x, out = rows(rng, 5, 999), np.zeros(5, np.float32)
    clean.launch("row_sum", 5, 256, 0, (x, out, np.int32(5), np.int32(999)))
    np.testing.assert_allclose(out, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)
    with pytest.raises(KernelLaunchError) as err:
        planted.launch("row_sum", 5, 256, 0, (x, out, np.int32(5), np.int32(999)))
    message = str(err.value)
    assert "ThreadSanitizer reported data race" in message.splitlines()[0]
    for marker in ("HAL_RACE_WRITE", "HAL_RACE_READ"):
        assert f"reduce.cu:{line_of(KERNELS / 'reduce.cu', marker)}" in message
    assert "row_sum block (" in message  # the GPU thread names of the two fibers


@needs("asan")
def test_asan_reports_an_off_by_one_store(rng):
    clean = executor.SimModule(KERNELS / "reduce.cu", "cuda", ["scale_copy"], mode="asan")
    planted = executor.SimModule(KERNELS / "reduce.cu", "cuda", ["scale_copy"], mode="asan", defines={"HAL_PLANT_OOB": None})
    n = 1021
    x, y = rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32)
    clean.launch("scale_copy", 4, 256, 0, (x, y, np.int32(n)))
    np.testing.assert_array_equal(y, 2 * x)
    with pytest.raises(KernelLaunchError) as err:
        planted.launch("scale_copy", 4, 256, 0, (x, y, np.int32(n)))
    first = str(err.value).splitlines()[0]
    assert "AddressSanitizer reported heap-buffer-overflow: write at" in first
    assert f"reduce.cu:{line_of(KERNELS / 'reduce.cu', 'HAL_OOB_LINE')}" in first


@needs("asan")
@pytest.mark.parametrize("threads", [1, 97])
def test_asan_sees_no_stale_poison_on_reused_fiber_stacks(rng, threads):
    """Workers reuse fiber stacks block after block; a fiber leaves through frames that never
    return, and their redzones must not be mistaken for the next block's locals."""
    m = executor.SimModule(KERNELS / "reduce.cu", "cuda", ["local_softmax"], mode="asan")
    x, y = rows(rng, 41, 33), np.zeros((41, 33), np.float32)
    m.launch("local_softmax", 41, threads, 0, (x, y, np.int32(33)))
    want = np.zeros_like(y, dtype=np.float64)
    for t in range(threads):  # each thread normalizes its own elements t, t + threads, ...
        idx = (t + threads * np.arange(16))[t + threads * np.arange(16) < 33]
        if idx.size:
            e = np.exp(x[:, idx].astype(np.float64) - x[:, idx].max(1, keepdims=True))
            want[:, idx] = e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-7)


@needs("asan")
def test_sanitized_launches_report_emulator_errors_too():
    m = executor.SimModule(KERNELS / "warp.cu", "cuda", ["split_deadlock", "reduce_rows"], mode="asan")
    with pytest.raises(KernelLaunchError, match="deadlock"):
        m.launch("split_deadlock", 2, 64, 0, (np.zeros(64, np.float32),))
    with pytest.raises(KernelLaunchError, match="argument 2 of reduce_rows"):
        m.launch("reduce_rows", 2, 64, 0, (np.ones((2, 5), np.float32), np.zeros(2, np.float32), np.int64(5)))


# ---- the real kernels, and copies of them with a bug planted -----------------------------------

def real(vendor, name):
    """A kernel file or header as the build finds it: the vendor's own, else the shared one."""
    path = BACKENDS / vendor / name
    if not path.exists():
        path = BACKENDS / "gpu" / "kernels" / name
    if not path.exists():
        pytest.skip(f"{path} does not exist yet")
    return path


def shim_dir(vendor):
    """The vendor's kernel directory, for the shim hal_vendor.h that the shared header includes."""
    return (BACKENDS / vendor,)


def norm_args(rng, r, hidden):
    x, w = rows(rng, r, hidden), rng.standard_normal(hidden).astype(np.float32)
    return x, w, np.zeros_like(x)


@needs("tsan")
@pytest.mark.parametrize("vendor,suffix", [("cuda", ".cu"), ("rocm", ".hip")])
def test_real_norm_kernel_is_clean_under_tsan(rng, vendor, suffix):
    m = executor.SimModule(real(vendor, "norms.cu"), vendor, ["rms_norm<float>"], mode="tsan", include_dirs=shim_dir(vendor))
    x, w, y = norm_args(rng, 3, 1025)
    m.launch("rms_norm<float>", 3, 256, 0, (x, None, w, y, None, np.int32(3), np.int32(1025), np.float32(1e-6)))
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@needs("asan")
@pytest.mark.parametrize("vendor,suffix", [("cuda", ".cu"), ("rocm", ".hip")])
def test_real_softmax_is_clean_under_asan(rng, vendor, suffix):
    m = executor.SimModule(real(vendor, "softmax.cu"), vendor, ["softmax<float>"], mode="asan", include_dirs=shim_dir(vendor))
    x = rng.standard_normal((5, 33, 7)).astype(np.float32)
    y = np.zeros_like(x)
    m.launch("softmax<float>", 35, 256, 0, (x, y, np.int32(5), np.int32(33), np.int32(7)))
    e = np.exp(x.astype(np.float64) - x.max(1, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)


@needs("tsan")
def test_tsan_catches_a_barrier_removed_from_a_copy_of_the_real_reduction(rng, tmp_path):
    common = real("cuda", "hal_gpu.h")
    source = common.read_text()
    # block_sum: lane 0 of each warp stores its partial, a barrier, then every warp reads them all.
    planted, count = re.subn(r"(if \(lane == 0\) scratch\[warp\] = v;\s*\n)\s*__syncthreads\(\);\n", r"\1", source, count=1)
    if not count:
        pytest.skip("hal_gpu.h no longer has the `scratch[warp] = v; __syncthreads();` step this test removes")
    shutil.copy(real("cuda", "norms.cu"), tmp_path / "norms.cu")
    (tmp_path / "hal_gpu.h").write_text(planted)
    m = executor.SimModule(tmp_path / "norms.cu", "cuda", ["rms_norm<float>"], mode="tsan", include_dirs=shim_dir("cuda"))
    x, w, y = norm_args(rng, 2, 777)
    with pytest.raises(KernelLaunchError) as err:
        m.launch("rms_norm<float>", 2, 256, 0, (x, None, w, y, None, np.int32(2), np.int32(777), np.float32(1e-6)))
    first = str(err.value).splitlines()[0]
    assert "data race" in first and f"{tmp_path}/hal_gpu.h:" in first


@needs("asan")
def test_asan_catches_an_off_by_one_store_in_a_copy_of_a_real_kernel(rng, tmp_path):
    source = real("cuda", "activations.cu").read_text()
    planted, count = re.subn(r"out\[j\] = ", "out[j + 1] = ", source, count=1)
    if not count:
        pytest.skip("activations.cu no longer stores `out[j] = ...`")
    shutil.copy(real("cuda", "hal_gpu.h"), tmp_path / "hal_gpu.h")
    (tmp_path / "activations.cu").write_text(source)
    (tmp_path / "planted.cu").write_text(planted)
    r, d = 3, 129
    x = rows(rng, r, 2 * d)
    silu = np.int32(ACTIVATIONS["silu"])
    clean = executor.SimModule(tmp_path / "activations.cu", "cuda", ["gated_and_mul<float>"], mode="asan", include_dirs=shim_dir("cuda"))
    out = np.zeros((r, d), np.float32)
    clean.launch("gated_and_mul<float>", r, 256, 0, (x, out, np.int32(r), np.int32(d), silu))
    gate, up = x[:, :d].astype(np.float64), x[:, d:]
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-5, atol=1e-6)
    m = executor.SimModule(tmp_path / "planted.cu", "cuda", ["gated_and_mul<float>"], mode="asan", include_dirs=shim_dir("cuda"))
    with pytest.raises(KernelLaunchError) as err:
        m.launch("gated_and_mul<float>", r, 256, 0, (x, out, np.int32(r), np.int32(d), silu))
    first = str(err.value).splitlines()[0]
    assert "heap-buffer-overflow: write at" in first and "planted.cu:" in first
