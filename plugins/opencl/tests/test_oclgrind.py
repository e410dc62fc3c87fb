"""The real kernels under Oclgrind with --data-races --uninitialized: no report allowed. A copy of
a real kernel with one barrier removed (a planted race) must be reported.

`oclgrind CMD` runs CMD with Oclgrind's OpenCL runtime preloaded (LD_PRELOAD of
liboclgrind-rt.so), so PyOpenCL sees the single platform "Oclgrind" and the driver script's
kernels run in its simulator; `--log FILE` keeps its reports apart from the driver's output.
"""
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
DRIVER = HERE / "oclgrind_driver.py"


def grind(oclgrind, tmp_path, *args):
    log = tmp_path / "oclgrind.log"
    proc = subprocess.run([oclgrind, "--data-races", "--uninitialized", "--log", str(log), sys.executable, str(DRIVER), *args],
                          capture_output=True, text=True, timeout=600)
    assert "platform: Oclgrind" in proc.stdout, f"the driver did not run on Oclgrind:\n{proc.stdout}\n{proc.stderr}"
    return proc, log.read_text() if log.exists() else ""


def test_real_kernels_are_clean(oclgrind, tmp_path):
    proc, report = grind(oclgrind, tmp_path)
    assert report.strip() == "", f"Oclgrind reported:\n{report[:4000]}"
    assert proc.returncode == 0, f"wrong results under Oclgrind:\n{proc.stdout}\n{proc.stderr[-2000:]}"
    assert proc.stdout.count("\nok ") >= 20, proc.stdout


def _kernel_file(name):
    import hal_opencl.kernels

    return hal_opencl.kernels.source(name)


# (op, kernel family file, the barrier that is removed: text before it)
PLANTED = {
    "rms_norm": "        if (lid < s) red[lid] += red[lid + s];\n",
    "softmax": "    red_s[lid] = s;\n",
}


@pytest.mark.parametrize("op", sorted(PLANTED))
def test_planted_race_is_reported(oclgrind, tmp_path, op):
    source = _kernel_file(op).read_text()
    anchor = PLANTED[op] + "        barrier(CLK_LOCAL_MEM_FENCE);\n" if op == "rms_norm" else PLANTED[op] + "    barrier(CLK_LOCAL_MEM_FENCE);\n"
    assert source.count(anchor) == 1, f"the planted race no longer applies to {_kernel_file(op).name}"
    racy = tmp_path / f"racy_{_kernel_file(op).name}"
    racy.write_text(source.replace(anchor, PLANTED[op]))
    _, report = grind(oclgrind, tmp_path, "--candidate", f"{op}={racy}")
    assert "data race" in report and f"Kernel: {op}" in report, f"Oclgrind did not report the planted race:\n{report[:4000]}"
