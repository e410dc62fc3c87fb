"""hal's shipped conformance suite on the opencl backend: every op x dtype x sample the plugin
registers, against the float64 reference. Each case must pass or be 'unsupported'.

Inputs are fresh random numbers; the seed is in every failure message and fixed with
`--hal-seed N` (the option of hal's pytest plugin)."""
import time

import pytest

from conftest import opencl_unavailable

SEED = [None]


def pytest_generate_tests(metafunc):
    """`case`: every case of the plugin; `torch_case`: the rms_norm and rope cases, run through torch.ops.hal."""
    names = [n for n in ("case", "torch_case") if n in metafunc.fixturenames]
    if not names:
        return
    why = opencl_unavailable()
    if why:
        metafunc.parametrize(names[0], [pytest.param(None, id="opencl-unavailable", marks=pytest.mark.skip(reason=why))])
        return
    from hal import conformance

    seed = metafunc.config.getoption("hal_seed", None)
    SEED[0] = SEED[0] if SEED[0] is not None else time.time_ns() % 2**31 if seed is None else seed
    ops = ["rms_norm", "rope"] if names[0] == "torch_case" else None  # PoCL is slow: a slice through torch
    metafunc.parametrize(names[0], [pytest.param(c, id=c.id) for c in conformance.cases("opencl", ops, SEED[0])])


def test_conformance(case):
    from hal import conformance

    result = conformance.run(case)
    assert result.status in ("pass", "unsupported"), f"{case.id} (seed {SEED[0]}): {result.message}"


def test_through_torch_ops(torch_case):
    """`hal check opencl --torch` for two ops: torch.library.opcheck and the reference, through torch.ops.hal."""
    from hal import conformance

    result = conformance.run_torch(torch_case)
    assert result.status in ("pass", "unsupported"), f"{torch_case.id} (seed {SEED[0]}): {result.message}"


def test_declared_coverage(opencl):
    """Exactly the ops and dtypes the README of the plugin promises; the rest falls back to cpu."""
    import hal

    reg = hal.registry()
    native = {(op, d) for (op, b), ks in reg.kernels.items() if b == "opencl" for k in ks for d in k.dtypes}
    ops = ("rms_norm", "layer_norm", "softmax", *hal.ops.activations.GATED_OP_NAMES, "rope", "gemm", "attention")
    assert native == {(op, d) for op in ops for d in ("float32", "float16", "bfloat16")}
