"""Backend choice, fallback policy, array kinds, errors and plugins."""
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import hal
from hal.testing import plugin, reference_kernel


@pytest.fixture
def x(rng):
    return rng.standard_normal((5, 12)).astype(np.float32)


def tagging_kernel(tag):
    """A correct softmax that also stamps which backend ran it."""
    exact = reference_kernel(hal.ops.softmax)

    def kernel(outs, x, dim):
        exact(outs, x=x, dim=dim)
        kernel.calls.append(tag)

    kernel.calls = []
    return kernel


def test_numpy_input_runs_on_cpu_by_default(x):
    y = hal.ops.softmax(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)


def test_choice_order(make_backend, x, monkeypatch):
    ka, kb, kc = tagging_kernel("a"), tagging_kernel("b"), tagging_kernel("c")
    make_backend("a", {"softmax": ka})
    make_backend("b", {"softmax": kb})
    make_backend("c", {"softmax": kc})
    monkeypatch.setenv("HAL_BACKEND", "c")
    hal.use(None)  # the environment is read at the first call and by hal.use()
    hal.ops.softmax(x)
    assert kc.calls == ["c"]
    hal.use("b")
    try:
        hal.ops.softmax(x)
        assert kb.calls == ["b"]
        with hal.use("a"):
            hal.ops.softmax(x)
            assert ka.calls == ["a"]
            hal.ops.softmax(x, backend="c")  # the keyword beats everything
            assert kc.calls == ["c", "c"]
    finally:
        hal.use(None)


def test_priority_decides_among_backends_for_the_device(make_backend, x):
    k = tagging_kernel("fast")
    make_backend("fast", {"softmax": k}, priority=100)
    hal.ops.softmax(x)
    assert k.calls == ["fast"]


def test_fallback_warns_once_and_is_recorded(make_backend, x):
    make_backend("partial", {"softmax": tagging_kernel("partial")})
    with pytest.warns(hal.FallbackWarning, match="rms_norm ran on cpu instead of partial"):
        hal.ops.rms_norm(x, np.ones(12, np.float32), backend="partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = hal.ops.rms_norm(x, np.ones(12, np.float32), backend="partial")  # no second warning
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-5)
    [event] = [e for e in hal.fallbacks() if e["requested"] == "partial"]
    assert event["op"] == "rms_norm" and event["ran_on"] == "cpu" and event["count"] == 2
    assert "partial has no rms_norm kernel" in event["reason"]


def test_strict_mode_raises_with_op_backend_dtype_and_reason(make_backend, x, monkeypatch):
    make_backend("f32only", {"softmax": tagging_kernel("f32")}, dtypes=["float32"])
    xb = x.astype(ml_dtypes.bfloat16)
    with pytest.raises(hal.KernelNotFound, match=r"softmax on f32only in bfloat16: f32only has no softmax kernel for bfloat16 \(it has float32\)"):
        with hal.use("f32only", fallback="error"):
            hal.ops.softmax(xb)
    monkeypatch.setenv("HAL_FALLBACK", "error")
    hal.use(None)
    with pytest.raises(hal.KernelNotFound):
        hal.ops.softmax(xb, backend="f32only")
    assert hal.ops.softmax(x, backend="f32only").shape == x.shape


def test_supports_predicate_falls_back_with_the_reason(make_backend, x):
    make_backend("mult8", {"softmax": tagging_kernel("m")}, supports=lambda a: a["x"].shape[-1] % 8 == 0, requires="a last dim that is a multiple of 8")
    with pytest.warns(hal.FallbackWarning, match="multiple of 8"):
        hal.ops.softmax(x, backend="mult8")
    with hal.use("mult8", fallback="error"), pytest.raises(hal.KernelNotFound, match="multiple of 8"):
        hal.ops.softmax(x)


def test_unknown_and_unavailable_backends(make_backend, x):
    with pytest.raises(hal.BackendUnavailable, match="known backends"):
        hal.ops.softmax(x, backend="no-such-backend")

    class Gone(hal.Backend):
        name = "gone"

        def probe(self):
            return False, "vendor runtime libgone.so not found"

    with plugin("test-gone", Gone()):
        with pytest.warns(hal.FallbackWarning, match="libgone.so"):
            hal.ops.softmax(x, backend="gone")
        with hal.use("gone", fallback="error"), pytest.raises(hal.BackendUnavailable, match="libgone.so"):
            hal.ops.softmax(x)
        row = next(b for b in hal.list_backends() if b["name"] == "gone")
        assert not row["available"] and "libgone.so" in row["reason"]


def test_a_broken_plugin_is_reported_and_leaves_nothing_behind(x):
    class Broken:
        @hal.hookimpl
        def hal_register(self, registry):
            class B(hal.Backend):
                name = "broken"

            registry.add_backend(B())
            registry.add_kernel("softmax", "broken", lambda outs, **a: None, dtypes=["float32"])
            raise RuntimeError("driver exploded")

    hal.register_plugin(Broken(), "test-broken")
    try:
        row = next(b for b in hal.list_backends() if b["name"] == "test-broken")
        assert not row["available"] and "driver exploded" in row["reason"]
        assert "broken" not in hal.registry().backends
        with pytest.raises(hal.BackendUnavailable, match="driver exploded"):
            hal.ops.softmax(x, backend="test-broken")
    finally:
        hal.unregister_plugin("test-broken")


def test_a_plugin_that_fails_to_import_never_breaks_import_hal(tmp_path):
    import subprocess
    import sys

    dist = tmp_path / "badplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: badplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[hal.plugins]\nbad = badplugin_missing_module\n")
    code = "import hal, json; print(json.dumps([b for b in hal.list_backends() if b['name'] == 'bad']))"
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path), "PATH": ""}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "failed to import" in proc.stdout and "badplugin_missing_module" in proc.stdout


def test_torch_in_torch_out_without_copy_semantics_changing(rng):
    x = torch.from_numpy(rng.standard_normal((6, 10)).astype(np.float32))
    y = hal.ops.softmax(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    torch.testing.assert_close(y, torch.softmax(x, -1))
    xb = x.to(torch.bfloat16)
    w = torch.ones(10, dtype=torch.bfloat16)
    yb = hal.ops.rms_norm(xb, w)
    assert isinstance(yb, torch.Tensor) and yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, torch.nn.functional.rms_norm(xb.float(), (10,), eps=1e-6).to(torch.bfloat16))


def test_torch_views_are_not_copied_on_the_way_in():
    from hal.arrays import to_host

    t = torch.randn(4, 6).to(torch.bfloat16)
    view = to_host(t)
    assert view.dtype == ml_dtypes.bfloat16
    t[0, 0] = 7.0
    assert float(view[0, 0]) == 7.0


def test_non_contiguous_inputs_are_read_correctly(rng):
    big = rng.standard_normal((8, 40)).astype(np.float32)
    view = big[:, ::3]
    np.testing.assert_allclose(hal.ops.softmax(view), hal.ops.softmax(np.ascontiguousarray(view)), rtol=1e-6)
    a = rng.standard_normal((30, 20)).astype(np.float32)
    np.testing.assert_allclose(hal.ops.gemm(a.T, a), a.T.astype(np.float64) @ a, rtol=1e-4, atol=1e-4)


class OnDevice:
    """Looks like an array on a CUDA device to hal's checks."""

    def __init__(self, host):
        self.shape, self.dtype = host.shape, host.dtype

    def __dlpack__(self, stream=None):
        raise AssertionError("a device array must not be read")

    def __dlpack_device__(self):
        return (2, 0)


@pytest.mark.parametrize("call, match", [
    (lambda x: hal.ops.gemm(x, x), r"gemm: argument 'b': expected 12 rows to match a's 12 columns, got shape \(5, 12\)"),
    (lambda x: hal.ops.softmax(x, dim=3), r"softmax: argument 'dim': expected an int in \[-2, 2\), got 3"),
    (lambda x: hal.ops.rms_norm(x, np.ones(3, np.float32)), r"rms_norm: argument 'weight': expected shape \(12,\)"),
    (lambda x: hal.ops.softmax(x.astype(np.int32)), r"softmax: argument 'x': expected dtype in \(float32, float16, bfloat16\), got int32"),
    (lambda x: hal.ops.softmax(x, axis=0), r"softmax: argument 'axis': expected one of x, dim"),
    (lambda x: hal.ops.layer_norm(x, OnDevice(np.ones(12, np.float32)), None), r"layer_norm: argument 'weight': expected the device of 'x' \(DLPack type 1\), got DLPack device type 2"),
    (lambda x: hal.ops.gemm(x, x.T, activation="swish"), r"gemm: argument 'activation': expected one of"),
])
def test_schema_errors_name_op_argument_expected_and_got(x, call, match):
    with pytest.raises(hal.SchemaError, match=match):
        call(x)


def test_schema_error_is_a_hal_error():
    assert issubclass(hal.SchemaError, hal.HalError) and issubclass(hal.KernelNotFound, hal.HalError)


def test_ops_have_real_signatures():
    import inspect

    sig = inspect.signature(hal.ops.gemm)
    assert list(sig.parameters)[:2] == ["a", "b"]
    assert sig.parameters["bias"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["activation"].default is None


def test_use_sets_the_process_wide_choice_or_scopes_it_in_a_with_block(make_backend, x):
    ka, kb = tagging_kernel("a"), tagging_kernel("b")
    make_backend("a", {"softmax": ka})
    make_backend("b", {"softmax": kb})
    hal.use("a")
    with hal.use("b"):
        hal.ops.softmax(x)
    hal.ops.softmax(x)  # the block's choice ended with it; the process-wide one is back
    assert kb.calls == ["b"] and ka.calls == ["a"]
    hal.use(None)
    with hal.use("b", fallback="error"), pytest.raises(hal.KernelNotFound, match="b has no rms_norm kernel"):
        hal.ops.rms_norm(x, np.ones(12, np.float32))
    assert hal.ops.softmax(x).shape == x.shape  # nothing left behind: cpu again
    with pytest.raises(hal.SchemaError, match="fallback"):
        hal.use("a", fallback="sometimes")


def test_old_names_still_work_with_a_deprecation_warning(make_backend, x):
    k = tagging_kernel("old")
    make_backend("old", {"softmax": k})
    with pytest.warns(DeprecationWarning, match=r"hal.use"):
        scope = hal.backend("old", fallback="error")
    with scope:
        hal.ops.softmax(x)
    assert k.calls == ["old"]
    from hal import opdef

    with pytest.warns(DeprecationWarning, match="Bad"):
        assert opdef.Bad is opdef.InvalidArgument


def test_backends_is_the_package_of_built_in_backends_not_a_function():
    import types

    assert isinstance(hal.backends, types.ModuleType) and not callable(hal.backends)
    assert type(hal.backends) is types.ModuleType


def test_an_op_check_raises_invalid_argument_and_the_caller_sees_a_schema_error(x):
    from hal.opdef import Attr, InvalidArgument, OpDef, Tensor

    def check(a):
        if a["x"].shape[-1] % 2:
            raise InvalidArgument("x", "an even last dimension", f"shape {a['x'].shape}")

    op = OpDef("halves", [Tensor("x"), "*", Attr("scale", 1.0, float)], check, lambda a: [(a["x"].shape, "float32")],
               None, None, None)
    with pytest.raises(hal.SchemaError, match=r"halves: argument 'x': expected an even last dimension, got shape \(5, 13\)"):
        op.validate({"x": np.ones((5, 13), np.float32), "scale": 1.0})


@pytest.mark.parametrize("priority", ["high", None, float("nan"), True])
def test_a_backend_with_a_non_numeric_priority_is_refused_at_registration(x, priority):
    class Odd(hal.Backend):
        name = "odd"

    Odd.priority = priority
    with plugin("test-odd", Odd()):
        row = next(b for b in hal.list_backends() if b["name"] == "test-odd")
        assert not row["available"] and "priority must be a number" in row["reason"] and "HalError" in row["reason"]
        assert "odd" not in hal.registry().backends
        assert hal.ops.softmax(x).shape == x.shape  # dispatch is unaffected


def test_priority_bands_and_the_fallback_target_are_declared():
    P = hal.Priority
    assert P.DEVICE > P.HOST > P.OFFLOAD > P.EMULATOR > P.PORTING > P.TEST
    assert hal.FALLBACK_BACKEND == "cpu" and hal.Backend.priority == P.PORTING
    reg = hal.registry()
    assert reg.backends["cpu"].backend.priority == P.HOST
    for name in ("cuda-sim", "rocm-sim"):
        if name in reg.backends:
            assert reg.backends[name].backend.priority == P.EMULATOR



def test_a_prepared_call_matches_the_op_and_refuses_what_it_was_not_prepared_for(rng):
    """hal.ops.X.prepare: the op's results on new tensors like the example (NumPy and torch, optional tensors
    left out or given), outputs written in full (poisoned), SchemaError for other shapes or dtypes, GradNotSupported
    for tensors that require grad, and no prepared call for ops whose checks read values (rope's positions)."""
    x, w, r = (rng.standard_normal(s).astype(np.float32) for s in ((3, 7, 33), (33,), (3, 7, 33)))
    norm = hal.ops.rms_norm.prepare(x, w, eps=1e-5)
    x2 = rng.standard_normal(x.shape).astype(np.float32)
    with hal.dispatch.poisoned_outputs():
        np.testing.assert_array_equal(norm(x2, w), hal.ops.rms_norm(x2, w, eps=1e-5))
    fused = hal.ops.rms_norm.prepare(torch.from_numpy(x), torch.from_numpy(w), residual=torch.from_numpy(r), eps=1e-5)
    y, s = fused(torch.from_numpy(x2), torch.from_numpy(w), torch.from_numpy(r))
    expected = hal.ops.rms_norm(x2, w, residual=r, eps=1e-5)
    assert isinstance(y, torch.Tensor) and np.array_equal(y.numpy(), expected[0]) and np.array_equal(s.numpy(), expected[1])
    for other in (x2[:2], x2.astype(np.float16)):
        with pytest.raises(hal.SchemaError, match="rms_norm: argument 'tensors'"):
            norm(other, w)
    with pytest.raises(hal.SchemaError, match="rms_norm: argument 'tensors'"):
        norm(torch.from_numpy(x2), torch.from_numpy(w))  # another kind of array than prepared
    with pytest.raises(hal.GradNotSupported):
        fused(torch.from_numpy(x2).requires_grad_(), torch.from_numpy(w), torch.from_numpy(r))
    q, cos = rng.standard_normal((4, 2, 8)).astype(np.float32), rng.standard_normal((9, 4)).astype(np.float32)
    with pytest.raises(hal.SchemaError, match="positions"):
        hal.ops.rope.prepare(q, q, cos, cos, np.arange(4, dtype=np.int32))
    with pytest.raises(hal.SchemaError, match="eps"):
        hal.ops.rms_norm.prepare(x, w, eps=float("inf"))  # preparing validates like a call


def test_a_repeated_call_skips_validation_but_not_what_it_depends_on(make_backend, rng):
    """dispatch remembers a validated call under its signature (hal.dispatch._prepared): a later call with the same
    signature still gets its values checked (rope's positions), attributes checked by type (True is not a float
    even where 1.0 is remembered), grad refused, the backend it asks for and a newly registered one."""
    x, w = rng.standard_normal((3, 33)).astype(np.float32), rng.standard_normal(33).astype(np.float32)
    hal.ops.rms_norm(x, w, eps=1.0)
    assert any(key[0] is hal.ops.rms_norm for key in hal.dispatch._prepared)
    x2 = rng.standard_normal(x.shape).astype(np.float32)
    with hal.dispatch.poisoned_outputs():
        y = hal.ops.rms_norm(x2, w, eps=1.0)
    x64 = x2.astype(np.float64)
    np.testing.assert_allclose(y, x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1.0) * w, rtol=1e-5)
    with pytest.raises(hal.SchemaError, match="eps"):
        hal.ops.rms_norm(x2, w, eps=True)
    hal.ops.rms_norm(torch.from_numpy(x), torch.from_numpy(w))
    with pytest.raises(hal.GradNotSupported):
        hal.ops.rms_norm(torch.from_numpy(x2).requires_grad_(), torch.from_numpy(w))
    q, cos = rng.standard_normal((4, 2, 8)).astype(np.float32), rng.standard_normal((9, 4)).astype(np.float32)
    hal.ops.rope(q, q, cos, cos, np.arange(4, dtype=np.int32))
    with pytest.raises(hal.SchemaError, match="positions"):
        hal.ops.rope(q, q, cos, cos, np.array([0, 1, 2, 9], np.int32))
    asked = tagging_kernel("asked")
    make_backend("asked", {"softmax": asked})
    hal.ops.softmax(x)
    with hal.use("asked"):
        hal.ops.softmax(x)
    assert asked.calls == ["asked"]
    fast = tagging_kernel("fast")
    make_backend("fast", {"softmax": fast}, priority=100)
    hal.ops.softmax(x)
    assert fast.calls == ["fast"]
