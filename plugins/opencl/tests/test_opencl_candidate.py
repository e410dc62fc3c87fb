"""The hal_candidate_kernel hook: an OpenCL C file with the registered kernel's name and signature
becomes a kernel with hal's calling convention; the conformance suite accepts a correct one and
rejects a deliberately wrong one (also through `hal check opencl --op OP --kernel FILE`)."""
import json
import subprocess
import sys

import pytest

import hal


def _source(op):
    import hal_opencl.kernels

    return hal_opencl.kernels.source(op).read_text()


def _candidate(op, path):
    import hal_opencl

    return hal_opencl.hal_candidate_kernel(backend="opencl", op=getattr(hal.ops, op), path=str(path))


def _conformance(fn, op, seed=11):
    """Every float32 conformance result of `fn` registered as the only kernel of a stand-in backend."""
    import hal_opencl
    from hal import conformance

    class Plugin:
        @hal.hookimpl
        def hal_register(self, registry):
            be = hal_opencl.OpenCLBackend()
            be.name = "opencl-candidate-test"
            registry.add_backend(be)
            registry.add_kernel(op, be.name, fn, dtypes=["float32"])  # one dtype: fewer builds, same verdict

    hal.register_plugin(Plugin(), "opencl-candidate-test")
    try:
        return [conformance.run(c) for c in conformance.cases("opencl-candidate-test", [op], seed)]
    finally:
        hal.unregister_plugin("opencl-candidate-test")


def test_other_backends_get_none(opencl, tmp_path):
    import hal_opencl

    assert hal_opencl.hal_candidate_kernel(backend="cpu", op=hal.ops.softmax, path=str(tmp_path / "x.cl")) is None


WRONG = {  # op -> (text in the real kernel, a plausible slip)
    "softmax": ("exp(LOAD(X_KIND, x, i) - mx) * inv", "exp(LOAD(X_KIND, x, i)) * inv"),  # forgot to subtract the max
    "gemm": ("v += beta * LOAD(C_KIND, c,", "v += LOAD(C_KIND, c,"),  # dropped beta
    "silu_and_mul": ("STORE(X_KIND, y, i, activate(g, ACT) * u)", "STORE(X_KIND, y, i, activate(u, ACT) * g)"),  # halves swapped
}


@pytest.mark.parametrize("op", sorted(WRONG))
def test_correct_and_wrong_candidates(opencl, tmp_path, op):
    good, bad = tmp_path / "good.cl", tmp_path / "bad.cl"
    source = _source(op)
    old, new = WRONG[op]
    assert source.count(old) == 1, "the planted bug no longer applies to the kernel source"
    good.write_text(source)
    bad.write_text(source.replace(old, new))

    fn = _candidate(op, good)
    results = _conformance(fn, op)
    assert results and all(r.status == "pass" for r in results), [r.message for r in results if r.status != "pass"][:3]

    results = _conformance(_candidate(op, bad), op)
    assert any(r.status == "fail" for r in results)


def test_candidate_that_does_not_build(opencl, tmp_path):
    broken = tmp_path / "broken.cl"
    broken.write_text(_source("softmax").replace("__kernel void softmax", "__kernel void softmax oops"))
    with pytest.raises(hal.KernelCompileError, match="does not build"):
        _candidate("softmax", broken)
    renamed = tmp_path / "renamed.cl"
    renamed.write_text(_source("softmax").replace("__kernel void softmax", "__kernel void softmax2"))
    with pytest.raises(hal.KernelCompileError, match="no kernel named 'softmax'"):
        _candidate("softmax", renamed)


def test_hal_check_cli(opencl, tmp_path):
    """`hal check opencl --op softmax --kernel FILE`, when this hal has the command."""
    help_text = subprocess.run([sys.executable, "-m", "hal.cli", "check", "--help"], capture_output=True, text=True).stdout
    if "--kernel" not in help_text:
        pytest.skip("this hal has no `hal check --kernel`")
    good, bad = tmp_path / "good.cl", tmp_path / "bad.cl"
    good.write_text(_source("softmax"))
    bad.write_text(_source("softmax").replace(*WRONG["softmax"]))
    for path, code, correct in ((good, 0, True), (bad, 1, False)):
        proc = subprocess.run([sys.executable, "-m", "hal.cli", "check", "opencl", "--op", "softmax", "--kernel", str(path), "--json"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == code, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["correct"] is correct
