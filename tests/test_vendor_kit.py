"""The vendor kit: generated porting checklists (four formats and a diff) and the plugin scaffold."""
import json
import subprocess
import sys

import pytest

import hal
from hal import checklist
from hal.cli import main


@pytest.mark.parametrize("backend", ["cpu", "cuda-sim", "rocm-sim", "opencl"])
def test_checklist_in_every_format(tmp_path, capsys, backend):
    if backend not in hal.registry().backends:
        pytest.skip(f"{backend} not installed (pip install -e plugins/opencl)")
    if not hal.registry().entry(backend).status[0]:
        pytest.skip(f"{backend} unavailable: {hal.registry().entry(backend).status[1]}")
    for fmt, name in (("json", "c.json"), ("markdown", "c.md"), ("html", "c.html")):
        assert main(["checklist", backend, "--op", "softmax", "--format", fmt, "--out", str(tmp_path / name)]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    softmax = [p for p in c["pairs"] if p["op"] == "softmax"]
    assert {p["status"] for p in softmax} == {"native"} and all(p["worst_error_over_tolerance"] < 1 for p in softmax)
    assert {p["status"] for p in c["pairs"] if p["op"] == "gemm"} == {"untested"}  # not run with --op softmax
    assert c["summary"].endswith(f"{len(softmax)} passing") and c["summary"] in (tmp_path / "c.md").read_text()
    page = (tmp_path / "c.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page  # self-contained
    assert main(["checklist", backend, "--no-run"]) == 0
    assert c["summary"].split(",")[0] in capsys.readouterr().out


def test_checklist_shows_fallbacks_and_the_backends_own_items(make_backend):
    from hal.testing import reference_kernel

    name = make_backend("half-ported", {"softmax": reference_kernel(hal.ops.softmax)}, dtypes=["float32"])
    c = checklist.build(name, ops=["softmax"])
    status = {(p["op"], p["dtype"]): p for p in c["pairs"]}
    assert status[("softmax", "float32")]["status"] == "native"
    assert status[("softmax", "bfloat16")]["status"] == "falls back" and "no bfloat16 kernel" in status[("softmax", "bfloat16")]["fallback"]
    assert status[("gemm", "float32")]["status"] == "falls back"
    assert c["items"]["device"] == "host memory" and c["items"]["priority"] == str(hal.Priority.TEST)  # Backend.info()'s default
    assert c["summary"] == f"1 of {len(c['pairs'])} op-dtype pairs native, 1 passing"


@pytest.mark.parametrize("backend, archs", [("cuda-sim", {"sm_80", "sm_89", "sm_90a", "sm_100a"}), ("rocm-sim", {"gfx90a", "gfx940", "gfx1030"})])
def test_checklist_shows_gpu_resources_from_the_backends_compile_report(backend, archs):
    entry = hal.registry().backends.get(backend)
    if entry is None or entry.compile_report()[0] is None:
        pytest.skip(f"{backend} gives no compile report here")
    gpu = checklist.build(backend, run_suite=False)
    gemm = next(p for p in gpu["pairs"] if p["op"] == "gemm" and p["dtype"] == "float16")
    assert set(gemm["resources"]) == archs


def test_checklist_diff(tmp_path, make_backend, capsys):
    from hal.testing import reference_kernel

    name = make_backend("growing", {"softmax": reference_kernel(hal.ops.softmax)}, dtypes=["float32"])
    old = tmp_path / "old.json"
    checklist.write(checklist.build(name, ops=["softmax"]), "json", old)
    hal.registry().add_kernel("rms_norm", name, reference_kernel(hal.ops.rms_norm), dtypes=["float32"])
    new = tmp_path / "new.json"
    checklist.write(checklist.build(name, ops=["softmax", "rms_norm"]), "json", new)
    assert main(["checklist", "--diff", str(old), str(new), "--format", "json"]) == 0
    changes = json.loads(capsys.readouterr().out)
    assert "rms_norm float32: falls back -> native" in changes and any(c.startswith("summary:") for c in changes)


def test_scaffolded_backend_installs_and_passes_its_own_conformance(tmp_path):
    assert main(["new-backend", "acme_npu", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "hal-acme_npu"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", str(root)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    try:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(root / "tests")],
                               capture_output=True, text=True, timeout=600, cwd=root)
        assert tests.returncode == 0 and " passed" in tests.stdout, tests.stdout[-2000:]
        listed = subprocess.run([sys.executable, "-m", "hal.cli", "backends", "--json"], capture_output=True, text=True, timeout=300)
        names = {b["name"]: b for b in json.loads(listed.stdout)}
        assert names["acme_npu"]["available"] and names["acme_npu"]["plugin"] == "acme_npu"
        assert "cpu" in names  # the built-in plugins and the new one coexist in one process
        if "opencl" in hal.registry().backends:
            assert names["opencl"]["plugin"] == "opencl"  # and so does the out-of-tree OpenCL plugin
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "hal-acme_npu"], capture_output=True, timeout=300)


def test_new_backend_rejects_bad_names(tmp_path):
    assert main(["new-backend", "Bad-Name", "--dir", str(tmp_path)]) == 2
