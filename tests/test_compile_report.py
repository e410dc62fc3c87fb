"""The compile report: every .cu file for sm_80..sm_100a with NVRTC, every .hip file for
gfx90a/gfx940/gfx1030 with hipcc; the resource report is written where `hal backends --kernels`
finds it, and no kernel that was spill-free in the committed baseline may start spilling. Also the
catalog's instantiations and block sizes, derived from the kernel entries alone."""
import json

import pytest

from hal.backends.gpu import compile_report
from hal.backends.gpu.catalog import FAMILIES, KERNELS, block_threads, instantiations
from hal.backends.gpu.vendor import CUDA, ROCM, VENDORS
from hal.registry import REPORT_KEYS


@pytest.fixture(scope="module")
def report():
    built = compile_report.build()
    compile_report.save(built, compile_report.report_path())
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
    baseline = json.loads(compile_report.BASELINE.read_text())
    clean = {(r["vendor"], r["kernel"], r["arch"]) for r in baseline["kernels"] if r["spills"] == 0}
    compiled = [r for r in report["kernels"] if (r["vendor"], r["kernel"], r["arch"]) in clean]
    if not compiled:
        pytest.skip("no GPU toolchain here: " + "; ".join(e["reason"] for e in report["toolchains"].values()))
    spilling = [f"{r['vendor']} {r['kernel']} {r['arch']}: {r['spills']}" for r in compiled if r["spills"]]
    assert not spilling, spilling


def test_spill_counting_sees_both_vendors_fields():
    assert compile_report.spills({"spill_stores": 4, "spill_loads": 8}) == 12
    assert compile_report.spills({"spill_vgprs": 3, "spill_sgprs": 0, "scratch_bytes": 16}) == 19
    assert compile_report.spills({"registers": 40}) == 0


@pytest.mark.parametrize("vendor", [CUDA, ROCM], ids=["cuda", "rocm"])
def test_vendor_report_rows_have_the_common_keys(vendor):
    got = compile_report.vendor_report(vendor, compile_report.BASELINE)
    keys = [key for key, _ in got["columns"]]
    assert {"kernel", "arch", "registers", "spills", "shared_bytes"} <= set(keys) and got["title"] and got["note"]
    assert got["rows"] and all(set(REPORT_KEYS) <= set(r) and r["vendor"] == vendor.name for r in got["rows"])


def test_no_report_yet_says_how_to_build_one(tmp_path):
    got = compile_report.vendor_report(ROCM, tmp_path / "missing.json")
    assert got["rows"] == [] and "python -m hal.backends.gpu.compile_report" in got["note"]


def test_a_build_without_a_vendors_toolchain_leaves_its_rows_to_the_baseline(tmp_path, monkeypatch):
    """A user's report built where hipcc was missing has no rocm rows: the committed baseline's show instead."""
    baseline = json.loads(compile_report.BASELINE.read_text())
    built = tmp_path / "kernel-resources.json"
    built.write_text(json.dumps({"generated": "now", "toolchains": {"rocm": {"available": False, "reason": "hipcc not found"}},
                                 "kernels": [r for r in baseline["kernels"] if r["vendor"] == "cuda"][:3]}))
    monkeypatch.setenv("HAL_KERNEL_REPORT", str(built))
    cuda, rocm = compile_report.vendor_report(CUDA), compile_report.vendor_report(ROCM)
    assert len(cuda["rows"]) == 3 and str(built) in cuda["note"]
    assert len(rocm["rows"]) == sum(r["vendor"] == "rocm" for r in baseline["kernels"]) > 0 and str(compile_report.BASELINE) in rocm["note"]
    assert compile_report.vendor_report(ROCM, built)["rows"] == []  # an explicit path is that report alone


def test_tensor_op_architectures():
    assert [a for a in ("sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120") if CUDA.has_tensor_ops(a)] == \
           ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"]
    assert [a for a in CUDA.compile_archs if CUDA.has_fp8_tensor_ops(a)] == ["sm_89"]
    assert [a for a in ("gfx906", "gfx90a", "gfx940", "gfx942", "gfx1030", "gfx1100") if ROCM.has_tensor_ops(a)] == ["gfx90a", "gfx940", "gfx942"]
    assert [a for a in ("gfx90a", "gfx940", "gfx941", "gfx942") if ROCM.has_fp8_tensor_ops(a)] == ["gfx940", "gfx941", "gfx942"]
    assert CUDA.arch_of({"major": 9, "minor": 0}) == "sm_90" and ROCM.arch_of({"gcnArchName": b"gfx90a:sramecc+:xnack-"}) == "gfx90a"


def test_instantiations_follow_the_entries():
    assert instantiations(CUDA, "gemm", "sm_75") == [f"gemm_simt<{t}, {o}>" for t in ("float", "__half", "__nv_bfloat16")
                                                     for o in ("float", "__half", "__nv_bfloat16")]
    assert set(instantiations(CUDA, "gemm", "sm_80")) > set(instantiations(CUDA, "gemm", "sm_75"))
    assert instantiations(ROCM, "grouped_gemm", "gfx90a") == ["grouped_gemm_mfma<__half>", "grouped_gemm_mfma<hip_bfloat16>"]
    assert instantiations(ROCM, "grouped_gemm", "gfx1030") == []
    assert "grouped_gemm_simt<float>" in instantiations(CUDA, "moe", "sm_80")
    assert not [n for n in instantiations(CUDA, "moe", "sm_80") if "_mma" in n]
    decode = instantiations(ROCM, "decode", "gfx90a")
    assert "paged_decode_partition<__half, __half>" in decode and "paged_decode_partition<__half, unsigned char>" in decode
    assert len(decode) == len(set(decode))  # decode_merge is launched by two entries, built once
    fp8 = [n for n in instantiations(CUDA, "qgemm", "sm_89") if n.startswith("fp8_gemm_mma_fp8")]
    assert fp8 and not [n for n in instantiations(CUDA, "qgemm", "sm_90a") if n.startswith("fp8_gemm_mma_fp8")]
    assert set(FAMILIES) == {e.family for e in KERNELS}


def test_block_threads_follow_the_entries():
    assert [block_threads(CUDA, k) for k in ("gemm_simt", "gemm_mma", "rope", "moe_route", "moe_align_scatter", "flash_attention_simt")] == \
           [256, 128, 128, 128, 1024, 128]
    assert [block_threads(ROCM, k) for k in ("gemm_mfma", "moe_route", "grouped_gemm_mfma", "fp8_gemm_mfma_fp8")] == [256, 256, 256, 256]
    with pytest.raises(KeyError):
        block_threads(CUDA, "gemm_mfma")
