"""`hal check BACKEND --op OP --kernel FILE`: a kernel source that is not registered is judged by
the conformance suite and timed against the registered kernel and the reference."""
import json

import pytest

import hal
from hal.backends.gpu.vendor import CUDA, ROCM
from hal.cli import main


def _sim(name):
    ok, reason = hal.registry().entry(name).status
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")


@pytest.mark.parametrize("vendor", [CUDA, ROCM], ids=["cuda", "rocm"])
def test_a_correct_and_a_wrong_candidate(tmp_path, capsys, vendor):
    backend = f"{vendor.name}-sim"
    _sim(backend)
    source = vendor.source("activations").read_text()
    good, bad = tmp_path / f"good{vendor.suffix}", tmp_path / f"bad{vendor.suffix}"
    good.write_text(source)
    # A plausible slip: the gate and up halves swapped.
    swapped = source.replace("gate[", "SLIP[").replace("up[", "gate[").replace("SLIP[", "up[")
    assert swapped != source, "the planted bug no longer applies to the kernel source"
    bad.write_text(swapped)

    assert main(["check", backend, "--op", "silu_and_mul", "--kernel", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["correct"] and report["passed"] > 10 and set(report["seconds"]) == {"candidate", "registered", "float64 reference"}

    assert main(["check", backend, "--op", "silu_and_mul", "--kernel", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["correct"] and report["failed"]


def test_a_candidate_that_does_not_compile(tmp_path, capsys):
    _sim("cuda-sim")
    broken = tmp_path / "broken.cu"
    broken.write_text("this is not CUDA\n")
    assert main(["check", "cuda-sim", "--op", "softmax", "--kernel", str(broken), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["correct"] and "KernelCompileError" in report["failed"][0]["message"]


def test_backends_without_a_candidate_builder(capsys):
    assert main(["check", "cpu", "--op", "softmax", "--kernel", "whatever.py"]) == 2
    assert "no installed plugin builds candidate kernels" in capsys.readouterr().out
