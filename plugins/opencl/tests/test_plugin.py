"""The plugin as a distribution: found through its entry point, only the public hal API, a probe
that says what is missing, and host arrays of any kind in and out."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hal

PACKAGE = Path(__file__).parents[1] / "hal_opencl"


def test_only_the_public_hal_api():
    """No hal.backends.*, no hal submodule imports: `import hal` and its attributes only."""
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hal":
                pytest.fail(f"{path.name}: from {node.module} import ...")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name == "hal" or not alias.name.startswith("hal."), f"{path.name}: import {alias.name}"


def test_listed_by_hal_backends(opencl):
    proc = subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["opencl"]["available"] and rows["opencl"]["plugin"] == "opencl"
    assert rows["opencl"]["priority"] < rows["cpu"]["priority"]


def _probe_in_subprocess(code, env=None):
    import os

    proc = subprocess.run([sys.executable, "-c", code + "\nimport hal\nr = {b['name']: b for b in hal.list_backends()}['opencl']\n"
                           "print(r['available'], r['reason'])"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_probe_without_pyopencl():
    out = _probe_in_subprocess("import sys; sys.modules['pyopencl'] = None")
    assert out.startswith("False") and "pip install pyopencl" in out


def test_probe_without_a_driver(tmp_path):
    pytest.importorskip("pyopencl")
    out = _probe_in_subprocess("", env={"OCL_ICD_VENDORS": str(tmp_path)})  # an empty vendors directory
    assert out.startswith("False") and "no OpenCL platform" in out and "pocl-opencl-icd" in out


def test_probe_without_a_device():
    from hal_opencl.device import find_device

    class Platform:
        name = "Empty Platform"

        def get_devices(self):
            raise RuntimeError("DEVICE_NOT_FOUND")

    class FakeCL:
        @staticmethod
        def get_platforms():
            return [Platform()]

    device, why = find_device(FakeCL)
    assert device is None and "Empty Platform" in why and "no" in why and "device" in why


def test_host_arrays_in_and_out(opencl):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((4, 33)).astype(np.float32)
    y = hal.ops.softmax(x, backend="opencl")
    assert isinstance(y, np.ndarray) and np.allclose(y, np.exp(x) / np.exp(x).sum(-1, keepdims=True), atol=1e-6)
    t = hal.ops.softmax(torch.from_numpy(x).to(torch.bfloat16), backend="opencl")
    assert t.dtype == torch.bfloat16 and torch.allclose(t.float(), torch.from_numpy(y), atol=1e-2)


def test_uncovered_ops_fall_back_to_cpu(opencl):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 1, 320)).astype(np.float32)  # head dim above 256: the kernel refuses it
    with pytest.warns(hal.FallbackWarning, match="head dims <= 256"):
        hal.ops.attention(q, q, q, backend="opencl")
