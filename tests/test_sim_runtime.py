"""The host emulator's runtime (backends/sim): launch geometry, barriers, per-block shared memory,
warp collectives of 32 and 64 lanes, atomics, misuse detection, argument checks, the build cache.

Kernels live in tests/sim_kernels/. Inputs are fresh random values on every run, sizes are odd."""
import shutil
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from hal.errors import KernelCompileError, KernelLaunchError

executor = pytest.importorskip("hal.backends.sim.executor")
available, reason = executor.toolchain()
pytestmark = pytest.mark.skipif(not available, reason=f"no host toolchain for the emulator: {reason}")

KERNELS = Path(__file__).parent / "sim_kernels"
WARP_CU = ["geometry", "shuffles", "half_warps", "shared_isolation", "dynamic_shared", "contention", "reduce_rows",
           "early_exit", "exit_before_shuffle", "split_deadlock", "caller_not_in_mask"]


@pytest.fixture(scope="module")
def cuda_warp():
    return executor.SimModule(KERNELS / "warp.cu", "cuda", WARP_CU)


@pytest.fixture(scope="module")
def rocm_warp():
    return executor.SimModule(KERNELS / "warp.hip", "rocm", ["shuffles", "partial_wave", "warp_size_seen", "split_deadlock"])


def distinct(rng, n):
    """n distinct nonzero random float32 values (so that a shuffled value names its source lane)."""
    v = rng.permutation(n).astype(np.float32) + rng.uniform(0.25, 0.75, n).astype(np.float32)
    return np.where(rng.random(n) < 0.5, -v, v).astype(np.float32)


# ---- geometry, barriers, shared memory ---------------------------------------------------------

@pytest.mark.parametrize("grid,block", [((3, 2, 2), (7, 5, 3)), ((5, 1, 1), (33, 1, 1)), ((1, 3, 1), (1, 1, 64))])
def test_geometry_is_exact(cuda_warp, grid, block):
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    out = np.full((blocks, threads, 12), 0xDEAD, np.uint32)
    cuda_warp.launch("geometry", grid, block, 0, (out,))
    bz, by, bx = np.meshgrid(*(np.arange(g) for g in grid[::-1]), indexing="ij")
    tz, ty, tx = np.meshgrid(*(np.arange(b) for b in block[::-1]), indexing="ij")
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(tx.reshape(-1), (blocks, threads)))
    np.testing.assert_array_equal(out[:, :, 1], np.broadcast_to(ty.reshape(-1), (blocks, threads)))
    np.testing.assert_array_equal(out[:, :, 2], np.broadcast_to(tz.reshape(-1), (blocks, threads)))
    np.testing.assert_array_equal(out[:, 0, 3], bx.reshape(-1))
    np.testing.assert_array_equal(out[:, 0, 4], by.reshape(-1))
    np.testing.assert_array_equal(out[:, 0, 5], bz.reshape(-1))
    assert (out[:, :, 6:9] == block).all() and (out[:, :, 9:12] == grid).all()


def test_barrier_reduction_and_speed(cuda_warp, rng):
    """~100 blocks x 256 threads x 9 barriers each: exact tree sums, well under a second."""
    rows, n = 101, 1025
    x = rng.standard_normal((rows, n)).astype(np.float32)
    out = np.zeros(rows, np.float32)
    cuda_warp.launch("reduce_rows", rows, 256, 0, (x, out, np.int32(n)))  # warm
    start = time.perf_counter()
    cuda_warp.launch("reduce_rows", rows, 256, 0, (x, out, np.int32(n)))
    elapsed = time.perf_counter() - start
    np.testing.assert_allclose(out, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)
    assert elapsed < 1.0, f"a 101 x 256-thread launch with 9 barriers per block took {elapsed:.3f} s"


def test_shared_memory_is_per_block(cuda_warp, rng):
    blocks, threads, rounds = 37, 128, 5
    x = rng.standard_normal(blocks * threads).astype(np.float32)
    out = np.zeros(2 * blocks * threads, np.float32)
    cuda_warp.launch("shared_isolation", blocks, threads, 0, (x, out, np.int32(rounds)))
    acc, bad = out[0::2].reshape(blocks, threads), out[1::2]
    assert (bad == 0).all(), "a block saw another block's __shared__ values"
    xb = x.reshape(blocks, threads).astype(np.float64)
    t = np.arange(threads)
    expected = sum(xb[:, (t * 7 + r) % threads] + r for r in range(rounds))
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_shared_memory(cuda_warp, rng):
    blocks, n = 9, 97
    x = rng.standard_normal(blocks * n).astype(np.float32)
    out = np.zeros_like(x)
    cuda_warp.launch("dynamic_shared", blocks, n, 2 * n * 4, (x, out))
    xb = x.reshape(blocks, n)
    np.testing.assert_array_equal(out.reshape(blocks, n), xb[:, ::-1] + np.arange(blocks, dtype=np.float32)[:, None])


def test_atomics_under_contention(cuda_warp, rng):
    blocks, threads = 23, 192
    values = rng.integers(-2**30, 2**30, blocks * threads, dtype=np.int32)
    counter, total, maximum = np.zeros(1, np.int32), np.zeros(1, np.float32), np.full(1, -2**31, np.int32)
    cuda_warp.launch("contention", blocks, threads, 0, (counter, total, maximum, values))
    assert counter[0] == blocks * threads * 8
    assert total[0] == blocks * threads * 8 * 0.25  # exact: every partial sum is a multiple of 0.25 below 2^22
    assert maximum[0] == values.max()


# ---- warp collectives ----------------------------------------------------------------------------

def shuffle_reference(x, warp, lane_mask, src, delta, width, cuda):
    """Source lanes per the hardware (PTX shfl.sync / HIP ds_bpermute arithmetic), within each warp."""
    n = x.size
    gid = np.arange(n)
    lane, base_warp = gid % warp, gid - gid % warp
    seg = lane & ~(width - 1)
    lm, dl = (lane_mask & 31, delta & 31) if cuda else (lane_mask, delta)
    j = lane ^ lm
    xor_src = np.where(j >= seg + width, lane, j)
    idx_src = seg + ((src & 31 if cuda else src) & (width - 1))
    down_src = np.where((lane & (width - 1)) + dl >= width, lane, lane + dl)
    return x[base_warp + xor_src], x[base_warp + idx_src], x[base_warp + down_src]


def ballot_reference(x, warp, threshold):
    bits = (x > threshold).reshape(-1, warp).astype(np.uint64) << np.arange(warp, dtype=np.uint64)
    return np.repeat(np.bitwise_or.reduce(bits, axis=1), warp)


@pytest.mark.parametrize("lane_mask,src,delta,width", [(1, 3, 1, 32), (16, 31, 5, 32), (5, 7, 3, 8), (6, 40, 2, 4), (31, 2, 1, 16), (12, 0, 9, 16)])
def test_cuda_shuffles_stay_in_the_warp(cuda_warp, rng, lane_mask, src, delta, width):
    blocks, threads = 3, 96
    x = distinct(rng, blocks * threads)
    out = np.zeros(3 * x.size, np.float32)
    ballots = np.zeros(x.size, np.uint32)
    threshold = np.float32(np.median(x))
    cuda_warp.launch("shuffles", blocks, threads, 0, (x, out, ballots, np.int32(lane_mask), np.int32(src), np.int32(delta), np.int32(width), threshold))
    for got, want in zip(out.reshape(-1, 3).T, shuffle_reference(x, 32, lane_mask, src, delta, width, cuda=True)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(ballots, ballot_reference(x, 32, threshold).astype(np.uint32))


@pytest.mark.parametrize("lane_mask,src,delta,width", [(1, 3, 1, 64), (32, 63, 33, 64), (37, 5, 7, 64), (5, 7, 3, 8), (17, 40, 2, 32), (6, 0, 9, 16)])
def test_hip_shuffles_stay_in_the_wave(rocm_warp, rng, lane_mask, src, delta, width):
    blocks, threads = 3, 192
    x = distinct(rng, blocks * threads)
    out = np.zeros(4 * x.size, np.float32)
    ballots = np.zeros(x.size, np.uint64)
    threshold = np.float32(np.median(x))
    rocm_warp.launch("shuffles", blocks, threads, 0, (x, out, ballots, np.int32(lane_mask), np.int32(src), np.int32(delta), np.int32(width), threshold))
    got = out.reshape(-1, 4).T
    xor_ref, idx_ref, down_ref = shuffle_reference(x, 64, lane_mask, src, delta, width, cuda=False)
    np.testing.assert_array_equal(got[0], xor_ref)
    np.testing.assert_array_equal(got[1], idx_ref)
    np.testing.assert_array_equal(got[2], down_ref)
    np.testing.assert_array_equal(got[3], xor_ref)  # the 64-bit-mask *_sync form
    np.testing.assert_array_equal(ballots, ballot_reference(x, 64, threshold))


def test_disjoint_masks_in_one_warp(cuda_warp, rng):
    x = distinct(rng, 64)
    out = np.zeros_like(x)
    cuda_warp.launch("half_warps", 1, 64, 0, (x, out))
    np.testing.assert_array_equal(out, x[np.arange(64) ^ 1])


def test_hip_partial_wave_and_warp_size(rocm_warp, rng):
    x = distinct(rng, 100)
    out, ballots = np.zeros_like(x), np.zeros(100, np.uint64)
    rocm_warp.launch("partial_wave", 1, 100, 0, (x, out, ballots))
    np.testing.assert_array_equal(out, x[np.arange(100) ^ 1])
    assert (ballots[:64] == np.uint64(2**64 - 1)).all() and (ballots[64:] == np.uint64(2**36 - 1)).all()
    seen = np.zeros(70, np.int32)
    rocm_warp.launch("warp_size_seen", 1, 70, 0, (seen,))
    assert (seen == 64).all()


def test_hip_sync_forms_need_a_64_bit_mask(tmp_path):
    ok = executor.SimModule(KERNELS / "warp.hip", "rocm", ["narrow_mask"], defines={"HAL_TEST_MASK": "0xffffffffffffffffull"})
    x = np.arange(1, 65, dtype=np.float32)
    out = np.zeros_like(x)
    ok.launch("narrow_mask", 1, 64, 0, (x, out))
    np.testing.assert_array_equal(out, x[np.arange(64) ^ 1])
    with pytest.raises(KernelCompileError) as err:
        executor.SimModule(KERNELS / "warp.hip", "rocm", ["narrow_mask"], defines={"HAL_TEST_MASK": "0xffffffffu"})
    assert "64-bit integer" in err.value.log


def test_every_intrinsic_of_the_contract(rng):
    """Each item of "What kernel code may use" compiles and runs, on both vendors."""
    n = 1000
    x = rng.standard_normal(n).astype(np.float32)
    for source, vendor, ballot_type in (("intrinsics.cu", "cuda", np.uint32), ("intrinsics.hip", "rocm", np.uint64)):
        m = executor.SimModule(KERNELS / source, vendor, ["collectives<__half>"])
        out, ballots, counters = np.zeros(6 * n, np.float32), np.zeros(n, ballot_type), np.zeros(3, np.int32)
        m.launch("collectives<__half>", 4, 256, 256 * 4, (x, out, ballots, counters, np.int32(n)))
        o = out.reshape(n, 6)
        np.testing.assert_array_equal(o[:, 4], x.astype(np.float16).astype(np.float32))
        padded = np.concatenate([x, np.zeros(4 * 256 - n, np.float32)]).reshape(4, 256)
        np.testing.assert_array_equal(o[:, 3], np.roll(padded, -1, axis=1).reshape(-1)[:n])
        warp = m.warp
        assert counters[0] == 4 * 256 // warp and counters[1] == 4 * 256 - 1
        if vendor == "cuda":
            ref = np.maximum(np.minimum(np.exp(np.log(np.abs(x.astype(np.float64)) + 1)) ** 2, np.inf), 1 / np.sqrt(2.0))
            from math import erf
            ref = ref + np.tanh([erf(v / 2) for v in x.astype(np.float64)]) + 1
            np.testing.assert_allclose(o[:, 5], ref, rtol=1e-5)
            assert counters[2:].view(np.float32)[0] == 4 * 256 * 0.5


# ---- misuse: reported, never a hang --------------------------------------------------------------

@pytest.mark.parametrize("kernel,needle", [
    ("early_exit", "every thread of a block must reach every __syncthreads()"),
    ("exit_before_shuffle", "lane 3 of warp 0 returned while lanes"),
    ("split_deadlock", "deadlock"),
    ("caller_not_in_mask", "is not in the mask 0xffff"),
])
def test_cuda_misuse_is_reported(cuda_warp, kernel, needle):
    out = np.zeros(64, np.float32)
    start = time.perf_counter()
    with pytest.raises(KernelLaunchError) as err:
        cuda_warp.launch(kernel, 3, 64, 0, (out,))
    assert needle in str(err.value) and kernel in str(err.value)
    assert time.perf_counter() - start < 5
    if kernel == "split_deadlock":
        assert "wait at __syncthreads() (" in str(err.value) and "warp.cu:" in str(err.value)


def test_hip_deadlock_is_reported(rocm_warp):
    with pytest.raises(KernelLaunchError, match="deadlock.*__shfl_xor_sync"):
        rocm_warp.launch("split_deadlock", 2, 128, 0, (np.zeros(128, np.float32),))


def test_full_mask_in_a_partial_warp_is_reported(cuda_warp, rng):
    x = distinct(rng, 40)
    with pytest.raises(KernelLaunchError, match="do not exist"):
        cuda_warp.launch("shuffles", 1, 40, 0, (x, np.zeros(120, np.float32), np.zeros(40, np.uint32), np.int32(1), np.int32(0),
                                                np.int32(1), np.int32(32), np.float32(0)))


def test_the_module_still_works_after_errors(cuda_warp, rng):
    with pytest.raises(KernelLaunchError):
        cuda_warp.launch("split_deadlock", 5, 64, 0, (np.zeros(64, np.float32),))
    test_barrier_reduction_and_speed(cuda_warp, rng)


# ---- launch configuration and arguments ----------------------------------------------------------

@pytest.mark.parametrize("grid,block,shared,needle", [
    (1, 1025, 0, "at most 1024 per block"),
    (1, (32, 33, 1), 0, "at most 1024 per block"),
    (1, (1, 1, 65), 0, "z <= 64"),
    (0, 32, 0, "at least 1"),
    ((1, 65536, 1), 32, 0, "too large"),
    (1, 32, 200_000, "dynamic shared memory"),
])
def test_bad_launch_configuration(cuda_warp, grid, block, shared, needle):
    with pytest.raises(KernelLaunchError, match=needle):
        cuda_warp.launch("geometry", grid, block, shared, (np.zeros(12 * 2048, np.uint32),))


def test_argument_checks(cuda_warp, rng):
    x = rng.standard_normal((7, 33)).astype(np.float32)
    out = np.zeros(7, np.float32)
    with pytest.raises(KernelLaunchError, match=r"argument 2 of reduce_rows: the kernel takes 'int' \(4 bytes\), Python passed numpy.int64 \(8 bytes\)"):
        cuda_warp.launch("reduce_rows", 7, 256, 0, (x, out, np.int64(33)))
    with pytest.raises(KernelLaunchError, match=r"argument 2 .* Python passed numpy.float32"):
        cuda_warp.launch("reduce_rows", 7, 256, 0, (x, out, np.float32(33)))
    with pytest.raises(KernelLaunchError, match="takes 3 arguments, Python passed 2"):
        cuda_warp.launch("reduce_rows", 7, 256, 0, (x, out))
    with pytest.raises(KernelLaunchError, match=r"argument 0 .*'const float\*' \(elements of 4 bytes\), Python passed a float16 array \(2 bytes"):
        cuda_warp.launch("reduce_rows", 7, 256, 0, (x.astype(np.float16), out, np.int32(33)))
    with pytest.raises(KernelLaunchError, match=r"argument 0 .*Python passed a int32 array \(integer elements\)"):
        cuda_warp.launch("reduce_rows", 7, 256, 0, (x.view(np.int32), out, np.int32(33)))
    with pytest.raises(KernelLaunchError, match="C-contiguous"):
        cuda_warp.launch("reduce_rows", 7, 256, 0, (np.asfortranarray(x), out, np.int32(33)))
    with pytest.raises(KernelLaunchError, match="not one of the name expressions"):
        cuda_warp.launch("reduce_rows<float>", 7, 256, 0, (x, out, np.int32(33)))
    cuda_warp.launch("reduce_rows", 7, 256, 0, (x, out, np.int32(33)))  # None -> nullptr and scalars by value
    np.testing.assert_allclose(out, x.sum(1), rtol=1e-5, atol=1e-5)


def test_bfloat16_arrays_pass_as_two_byte_elements(rng):
    m = executor.SimModule(KERNELS / "numerics.cu", "cuda", ["decode"])
    h = rng.standard_normal(77).astype(np.float16)
    b = rng.standard_normal(77).astype(ml_dtypes.bfloat16)
    fh, fb = np.zeros(77, np.float32), np.zeros(77, np.float32)
    m.launch("decode", 2, 64, 0, (h, b, fh, fb, np.int32(77)))
    np.testing.assert_array_equal(fb, b.astype(np.float32))


def test_concurrent_launches_from_python_threads(cuda_warp, rng):
    rows, n = 31, 515
    xs = [rng.standard_normal((rows, n)).astype(np.float32) for _ in range(4)]
    outs = [np.zeros(rows, np.float32) for _ in xs]
    errors = []

    def run(i):
        try:
            for _ in range(3):
                cuda_warp.launch("reduce_rows", rows, 256, 0, (xs[i], outs[i], np.int32(n)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


# ---- build: compile errors and the cache ------------------------------------------------------------

def test_compile_error_carries_the_log(tmp_path):
    src = tmp_path / "broken.cu"
    src.write_text("#include <cuda_runtime.h>\n__global__ void k(float* y) {\n  y[threadIdx.x] = undefined_name;\n}\n")
    with pytest.raises(KernelCompileError) as err:
        executor.SimModule(src, "cuda", ["k"])
    assert "undefined_name" in err.value.log and "broken.cu:3" in err.value.log


def test_cache_hit_and_header_dependency(tmp_path, rng):
    token = f"{rng.integers(2**62)}"  # a source no cache has seen
    (tmp_path / "scale.h").write_text("#define SCALE 2.0f\n")
    src = tmp_path / "cached.cu"
    src.write_text(f'// {token}\n#include <cuda_runtime.h>\n#include "scale.h"\n'
                   "__global__ void k(const float* x, float* y, int n) { int i = threadIdx.x; if (i < n) y[i] = SCALE * x[i]; }\n")
    first = executor.SimModule(src, "cuda", ["k"])
    assert not first.cache_hit
    start = time.perf_counter()
    second = executor.SimModule(src, "cuda", ["k"])
    assert second.cache_hit and second.artifact == first.artifact and time.perf_counter() - start < 1.0
    x, y = rng.standard_normal(45).astype(np.float32), np.zeros(45, np.float32)
    second.launch("k", 1, 64, 0, (x, y, np.int32(45)))
    np.testing.assert_array_equal(y, 2 * x)
    (tmp_path / "scale.h").write_text("#define SCALE 3.0f\n")  # an included header changed: rebuilt
    third = executor.SimModule(src, "cuda", ["k"])
    assert not third.cache_hit and third.artifact != first.artifact
    third.launch("k", 1, 64, 0, (x, y, np.int32(45)))
    np.testing.assert_array_equal(y, 3 * x)


def test_toolchain_reports_a_missing_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    ok, why = executor.toolchain()
    assert not ok and "/nonexistent/c++" in why
    monkeypatch.delenv("CXX")
    has_compiler = (shutil.which("g++") or shutil.which("clang++")) is not None
    assert executor.toolchain()[0] == has_compiler
