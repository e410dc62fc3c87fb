"""The `hal` command line, in process (main(argv)) and once through the installed script."""
import json
import shutil
import subprocess

import pytest

import hal
from hal.cli import main
from hal.testing import plugin, reference_kernel


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_backends_json(capsys):
    code, rows = run_json(capsys, "backends")
    cpu = next(r for r in rows if r["name"] == "cpu")
    assert code == 0 and cpu["available"] and cpu["kernels"] >= 6 and cpu["plugin"] == "cpu"


def test_backends_table_shows_reasons(capsys, make_backend):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "yes" in out


def test_ops_table(capsys, make_backend):
    make_backend("half", {"softmax": reference_kernel(hal.ops.softmax)}, dtypes=["float32"])
    code, table = run_json(capsys, "ops")
    assert code == 0 and table["gemm"]["cpu"] == "native"
    assert table["softmax"]["half"] == "native: float32" and table["gemm"]["half"] == "fallback -> cpu"
    code, per_dtype = run_json(capsys, "ops", "--dtypes")
    assert per_dtype["softmax bfloat16"]["half"] == "fallback -> cpu" and per_dtype["softmax float32"]["half"] == "native"


class Reporting(hal.Backend):
    """A backend whose compiler report has a column of its own, and no GPU in sight."""

    name = "reporting"

    def info(self):
        return {"device": "systolic array [test]", "arch": "npu-2", "tiles": "4 x 128x128", "sram": "24 MiB"}

    def compile_report(self):
        row = {"kernel": "softmax_tile", "arch": "npu-2", "file": "softmax.npu", "registers": 12, "spills": 0, "shared_bytes": 4096}
        return {"title": "npu compiler report", "columns": [("kernel", "kernel"), ("arch", "arch"), ("registers", "regs"),
                                                            ("spills", "spills"), ("tile_util", "tile utilisation")],
                "rows": [{**row, "tile_util": "93%"}, {**row, "arch": "npu-3", "registers": 20, "spills": 8, "tile_util": "71%"}],
                "note": ""}


class Silent(hal.Backend):
    name = "silent"

    def compile_report(self):
        return {"title": "silent compiler", "columns": [("kernel", "kernel")], "rows": [], "note": "toolchain npucc not found"}


class Broken(hal.Backend):
    name = "broken-report"

    def info(self):
        raise OSError("no /dev/npu0")

    def compile_report(self):
        raise OSError("report unreadable")


@pytest.fixture
def reporting_backends():
    softmax = ("softmax", "reporting", reference_kernel(hal.ops.softmax), {"dtypes": ["float32"], "source": "/kernels/softmax.npu"})
    with plugin("test-reporting", Reporting(), Silent(), Broken(), kernels=[softmax]):
        yield


def test_backends_shows_the_backends_own_report_columns(capsys, reporting_backends):
    assert main(["backends", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "npu compiler report (reporting)" in out and "tile utilisation" in out and "93%" in out and "71%" in out
    assert "silent compiler (silent): toolchain npucc not found" in out
    assert "broken-report: compile_report() raised OSError('report unreadable')" in out
    code, data = run_json(capsys, "backends", "--kernels")
    by_backend = {b: r for r in data["compile_reports"] for b in r["backends"]}
    assert by_backend["reporting"]["report"]["columns"][-1] == ["tile_util", "tile utilisation"]
    assert by_backend["broken-report"]["error"] and by_backend["silent"]["report"]["rows"] == []
    code, rows = run_json(capsys, "backends")
    by_name = {r["name"]: r for r in rows}
    assert by_name["reporting"]["device"] == "systolic array [test]" and by_name["reporting"]["arch"] == "npu-2"
    assert "no /dev/npu0" in by_name["broken-report"]["device"]
    assert main(["backends"]) == 0  # the table prints the error text (no crash, no markup trouble)


def test_checklist_prints_what_the_backend_reports(capsys, reporting_backends):
    assert main(["checklist", "reporting", "--no-run", "--format", "json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert list(c["items"])[:6] == ["DLPack device type", "priority", "device", "arch", "tiles", "sram"]
    assert c["items"]["tiles"] == "4 x 128x128" and "warp" not in " ".join(c["items"])
    softmax = next(p for p in c["pairs"] if p["op"] == "softmax" and p["dtype"] == "float32")
    assert softmax["resources"] == {"npu-2": {"kernels": 1, "max_registers": 12, "spilling": 0, "max_shared_bytes": 4096},
                                    "npu-3": {"kernels": 1, "max_registers": 20, "spilling": 1, "max_shared_bytes": 4096}}
    assert main(["checklist", "broken-report", "--no-run"]) == 0
    out = capsys.readouterr().out
    assert "no /dev/npu0" in out and "report unreadable" in out


def test_check_passes_on_cpu(capsys):
    code, report = run_json(capsys, "check", "cpu", "--op", "softmax", "--op", "rope")
    assert code == 0 and not report["failures"]
    assert {(s["op"], s["dtype"]) for s in report["summary"]} >= {("softmax", "bfloat16"), ("rope", "float16"), ("rope", "-")}


def test_check_fails_a_wrong_backend(capsys, make_backend):
    def silu_and_mul(outs, x):
        reference_kernel(hal.ops.silu_and_mul)(outs, x=x)
        outs[0][...] *= 1.01

    make_backend("wrong", {"silu_and_mul": silu_and_mul})
    code, report = run_json(capsys, "check", "wrong")
    assert code == 1 and report["failures"]


def test_check_unknown_backend(capsys):
    assert main(["check", "nonexistent"]) == 2


SMALL_LAYER = ["--tokens", "33", "--decode", "2", "--hidden", "96", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--ffn", "160",
               "--experts", "16", "--top-k", "4"]
MOE = ["rms_norm", "gemm", "moe_route", "moe_align", "moe_permute", "quantize", "fp8_grouped_gemm_blockscale", "quantize",
       "fp8_grouped_gemm_blockscale", "moe_unpermute", "gemm", "silu_and_mul", "gemm"]


def test_demo_small_passes(capsys):
    code, rows = run_json(capsys, "demo", *SMALL_LAYER, "--dtype", "float32")
    assert code == 0 and all(r["ok"] and r["backend"] == "cpu" and not r["fallback"] for r in rows)
    ops = {r["step"].split(": ")[0]: [] for r in rows}
    for r in rows:
        ops[r["step"].split(": ")[0]].append(r["op"])
    assert ops["prefill"] == ["rms_norm", "gemm", "rope", "attention", "gemm", *MOE]
    assert ops["decode x2"] == ["rms_norm", "gemm", "rope", "paged_decode_attention", "gemm", *MOE]
    assert all(r["calls"] == 2 for r in rows if r["step"].startswith("decode"))


def test_demo_ep_two_processes(capsys):
    """`hal demo --ep 2`: the MoE block over 2 processes in both modes, checked against one process."""
    code, rows = run_json(capsys, "demo", "--ep", "2", *SMALL_LAYER)
    assert code == 0 and all(r["ok"] for r in rows)
    assert sorted((r["mode"], r["rank"]) for r in rows) == [("low_latency", 0), ("low_latency", 1), ("normal", 0), ("normal", 1)]
    normal = [r for r in rows if r["mode"] == "normal"]
    assert all(r["payload"] == r["minimum"] > 0 for r in normal)  # each token once per remote rank, 1 byte per element


def test_demo_reports_mismatch_and_fallback(capsys, make_backend):
    def gemm(outs, a, b, bias, c, **attrs):
        reference_kernel(hal.ops.gemm)(outs, a=a, b=b, bias=bias, c=None, **attrs)  # drops the residual

    make_backend("bad-gemm", {"gemm": gemm})
    code, rows = run_json(capsys, "demo", "--backend", "bad-gemm", *SMALL_LAYER)
    by_step = {r["step"]: r for r in rows}
    assert code == 1
    assert by_step["prefill: rms_norm + residual"]["backend"] == "cpu"
    assert "bad-gemm has no rms_norm kernel" in by_step["prefill: rms_norm + residual"]["fallback"]
    assert by_step["prefill: qkv gemm"]["ok"] and not by_step["prefill: o-proj gemm + residual"]["ok"]
    assert by_step["prefill: o-proj gemm + residual"]["backend"] == "bad-gemm"


def test_bench_vs_torch(capsys):
    code, report = run_json(capsys, "bench", "silu_and_mul", "--vs", "torch", "--dtype", "float32")
    [row] = report["results"]
    assert code == 0 and row["ms"] > 0 and row["speedup_vs_torch"] > 0 and "GB/s" in row["throughput"]
    assert report["roofline"]["bandwidth_gbs"] > 0


def test_installed_script():
    exe = shutil.which("hal")
    if exe is None:
        pytest.skip("the hal console script is not on PATH (package not installed with pip)")
    proc = subprocess.run([exe, "backends", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and any(r["name"] == "cpu" for r in json.loads(proc.stdout))
