"""The `hal` command line, in process (main(argv)) and once through the installed script."""
import json
import shutil
import subprocess

import pytest

import hal
from hal.cli import main
from hal.testing import reference_kernel


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


def test_ops_matrix(capsys, make_backend):
    make_backend("half", {"softmax": reference_kernel(hal.ops.softmax)}, dtypes=["float32"])
    code, matrix = run_json(capsys, "ops")
    assert code == 0 and matrix["gemm"]["cpu"] == "native"
    assert matrix["softmax"]["half"] == "native: float32" and matrix["gemm"]["half"] == "fallback -> cpu"
    code, per_dtype = run_json(capsys, "ops", "--dtypes")
    assert per_dtype["softmax bfloat16"]["half"] == "fallback -> cpu" and per_dtype["softmax float32"]["half"] == "native"


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
    assert ops["setup"] == ["quantize", "quantize"]
    assert ops["prefill"] == ["rms_norm", "gemm", "rope", "attention", "gemm", *MOE]
    assert ops["decode x2"] == ["rms_norm", "gemm", "rope", "paged_decode_attention", "gemm", *MOE]
    assert all(r["calls"] == 2 for r in rows if r["step"].startswith("decode"))


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
