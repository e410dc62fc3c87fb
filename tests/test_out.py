"""out= on every op (torch's convention): the caller's tensors are written in place and returned, bad
out tensors are a SchemaError naming 'out' before any kernel runs, a backend that cannot reach the
caller's memory copies into it, and the cpu backend's pooled outputs are never handed out twice.
(The conformance suite runs every ordinary sample with poisoned out= arrays: docs/conformance.md.)"""
import ml_dtypes
import numpy as np
import pytest
import torch

import hal
from hal.backends.cpu import OutputPool
from hal.opdef import random
from hal.testing import HostBackend, plugin, reference_kernel

X = random(np.random.default_rng(0), (5, 24), "float32")
W = random(np.random.default_rng(1), (24,), "float32")


def test_numpy_and_torch_outs_are_written_in_place_and_returned():
    expected = hal.ops.rms_norm(X, W)
    y = np.full_like(X, np.nan)
    assert hal.ops.rms_norm(X, W, out=y) is y and np.array_equal(y, expected)
    t = torch.full((5, 24), float("nan"), dtype=torch.bfloat16)
    storage = t.data_ptr()
    assert hal.ops.rms_norm(torch.from_numpy(X).bfloat16(), torch.from_numpy(W).bfloat16(), out=t) is t
    assert t.data_ptr() == storage and not t.float().isnan().any()
    res = X[::-1].copy()
    outs = [np.full_like(X, np.nan), np.full_like(X, np.nan)]  # two results: a list or tuple of two
    got = hal.ops.rms_norm(X, W, residual=res, out=outs)
    assert got[0] is outs[0] and got[1] is outs[1] and np.array_equal(outs[1], X + res)


def _refused(match, out, **kwargs):
    calls = []

    def kernel(outs, **args):
        calls.append(1)

    with plugin("test-out", HostBackend("out-probe"), kernels=[("rms_norm", "out-probe", kernel, {"dtypes": ("float32",)})]):
        with pytest.raises(hal.SchemaError, match=match) as info:
            hal.ops.rms_norm(kwargs.pop("x", X), W, out=out, backend="out-probe", **kwargs)
    assert info.value.op == "rms_norm" and info.value.arg == "out" and not calls  # before any kernel runs


def test_bad_outs_are_refused_before_any_kernel_runs():
    read_only = np.empty_like(X)
    read_only.flags.writeable = False
    _refused("shape \\(5, 24\\) and dtype float32, got shape \\(5, 23\\)", np.empty((5, 23), np.float32))
    _refused("dtype float32, got shape \\(5, 24\\) and dtype float16", np.empty((5, 24), np.float16))
    _refused("C-contiguous, writable tensor, got strides", np.empty((24, 5), np.float32).T)
    _refused("C-contiguous, writable tensor, got a read-only array", read_only)
    _refused("requires grad", torch.empty(5, 24, requires_grad=True))
    _refused("one tensor .* got tuple", (np.empty_like(X),))
    _refused("a tuple of 2 tensors", np.empty_like(X), residual=X + 1)
    _refused("2 tensors, got 3", [np.empty_like(X) for _ in range(3)], residual=X + 1)
    _refused("NumPy array, torch tensor or CuPy array, got str", "y")
    _refused("on the device of 'x'", torch.empty(5, 24, device="meta"))


def test_outs_overlapping_an_input_or_each_other_are_refused():
    big = np.empty((10, 24), np.float32)
    big[:5] = X
    _refused("shared with 'x'", big[2:7], x=big[:5])
    _refused("shared with 'x'", X)  # in place: refused for every op
    same = np.empty_like(X)
    _refused("out\\[1\\] memory .* shared with 'out\\[0\\]'", (same, same), residual=X + 1)
    apart = np.empty((10, 24), np.float32)
    assert hal.ops.rms_norm(X, W, out=apart[5:]) is not None  # neighbours in one buffer are fine


class CopyingBackend(HostBackend):
    """Like OpenCL or a fallback from a device: the kernels see copies, never the caller's memory."""

    def to_native(self, x, contiguous):
        return np.array(super().to_native(x, contiguous))


def test_a_backend_that_cannot_reach_the_out_memory_copies_into_it():
    with plugin("test-copying", CopyingBackend("copying"), kernels=[("softmax", "copying", reference_kernel(hal.ops.softmax), {"dtypes": ("float32",)})]):
        y = torch.full((5, 24), float("nan"))
        assert hal.ops.softmax(torch.from_numpy(X), backend="copying", out=y) is y
    np.testing.assert_allclose(y.numpy(), hal.ops.softmax(X), rtol=1e-6)


def test_pooled_outputs_are_reused_only_once_released():
    pool = OutputPool(limit=16 << 20)
    a = pool.empty((1024, 1024), np.dtype(np.float32))
    address = a.ctypes.data
    b = pool.empty((1024, 1024), np.dtype(np.float32))
    assert b.ctypes.data != address and address % 64 == 0
    view = a[3:]
    del a
    assert pool.empty((1024, 1024), np.dtype(np.float32)).ctypes.data != address  # a view keeps it alive
    del view
    c = pool.empty((2048, 1024), np.dtype(np.float16))  # same size class, any dtype
    assert c.ctypes.data == address and c.shape == (2048, 1024)
    del b, c
    assert pool.idle_bytes <= 16 << 20
    assert pool.empty((3, 5), np.dtype(np.float32)).base is None  # small outputs: plain NumPy


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("rows", [8, 13, 512])
def test_outputs_from_16_kib_start_on_a_cache_line(rows, dtype):
    """What torch's bfloat16 Linear reads at full speed (docs/hardware.md): every fresh cpu output of
    16 KiB or more, pooled or not, starts on 64 bytes, whatever NumPy's allocator gives."""
    rng = np.random.default_rng()
    x, w = rng.standard_normal((rows, 1024)).astype(dtype), rng.standard_normal(1024).astype(dtype)
    keep = [hal.ops.rms_norm(x, w, backend="cpu") for _ in range(5)]  # live at once: five fresh buffers
    assert all(y.__array_interface__["data"][0] % 64 == 0 and y.flags.c_contiguous and y.flags.writeable for y in keep)
    expected = hal.ops.rms_norm(x.astype(np.float32), w.astype(np.float32), backend="cpu")
    np.testing.assert_allclose(keep[0].astype(np.float32), expected, rtol=1e-2, atol=1e-2)
