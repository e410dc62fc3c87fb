"""The architecture matrix: every .cu file for sm_80..sm_100a with NVRTC, every .hip file for
gfx90a/gfx940/gfx1030 with hipcc; the resource report is written where `hal backends --kernels`
finds it, and no kernel that was spill-free in the committed baseline may start spilling."""
import json

import pytest

from hal.backends.gpu import matrix
from hal.backends.gpu.catalog import FAMILIES, instantiations
from hal.backends.gpu.vendor import VENDORS


@pytest.fixture(scope="module")
def report():
    built = matrix.build()
    path = matrix.report_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(built, indent=1) + "\n")
    return built


@pytest.mark.parametrize("vendor", list(VENDORS))
def test_every_kernel_compiles_for_every_arch(report, vendor):
    entry = report["toolchains"][vendor]
    if not entry["available"]:
        pytest.skip(f"{vendor} toolchain missing: {entry['reason']}")
    v = VENDORS[vendor]
    built = {(r["kernel"], r["arch"]) for r in report["kernels"] if r["vendor"] == vendor}
    expected = {(name, arch) for arch in v.compile_archs for family in FAMILIES for name in instantiations(v, family, arch)}
    assert built == expected
    assert not [r for r in report["kernels"] if r["vendor"] == vendor and r.get("warnings")]


def test_no_kernel_starts_spilling(report):
    baseline = json.loads(matrix.BASELINE.read_text())
    clean = {(r["vendor"], r["kernel"], r["arch"]) for r in baseline["kernels"] if r["spills"] == 0}
    compiled = [r for r in report["kernels"] if (r["vendor"], r["kernel"], r["arch"]) in clean]
    if not compiled:
        pytest.skip("no GPU toolchain here: " + "; ".join(e["reason"] for e in report["toolchains"].values()))
    spilling = [f"{r['vendor']} {r['kernel']} {r['arch']}: {r['spills']}" for r in compiled if r["spills"]]
    assert not spilling, spilling


def test_spill_counting_sees_both_vendors_fields():
    assert matrix.spills({"spill_stores": 4, "spill_loads": 8}) == 12
    assert matrix.spills({"spill_vgprs": 3, "spill_sgprs": 0, "scratch_bytes": 16}) == 19
    assert matrix.spills({"registers": 40}) == 0
