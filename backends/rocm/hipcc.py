"""Offline compilation of hal's HIP kernels with Debian's hipcc (ROCm 5.2, clang 15): the ROCm
half of the compile report (hal.backends.gpu.compile_report). No GPU is needed.

hipcc has no name expressions (hipRTC's way of asking for template instantiations), so each
build is a small generated translation unit that includes the kernel file and explicitly
instantiates the requested kernels:

    #include "gemm.hip"
    template __global__ decltype(gemm_simt<float, __half>) gemm_simt<float, __half>;

The kernel file is the vendor's own (backends/rocm/<family>.hip) or the shared CUDA-dialect one
(backends/gpu/kernels/<family>.cu, compiled as HIP with `-x hip`); the include path is
ROCM.include_dirs (the HIP shim hal_vendor.h first, then the shared headers) and the kernel codes
come from hal.codes as -D options. It is compiled device-only for one architecture at a time with
`-Rpass-analysis=kernel-resource-usage`; the remarks (SGPRs, VGPRs, AGPRs, spills, scratch,
LDS, occupancy per kernel) are parsed and their mangled names mapped back to the name
expressions through a demangler (llvm-cxxfilt or binutils' c++filt).

Debian's hipcc is a wrapper that picks nvcc when one is on the PATH unless HIP_PLATFORM=amd;
every call here sets it.

    python -m hal.backends.gpu.compile_report --vendor rocm   # every family x arch, and its JSON report
"""
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hal.backends.gpu.catalog import FAMILIES, instantiations
from hal.backends.gpu.vendor import ROCM
from hal.codes import define_options
from hal.errors import KernelCompileError

ARCHS = ROCM.compile_archs  # Debian's clang 15 does not know gfx942
OPTIONS = ("-O3", "-std=c++17")

_REMARK_FIELDS = {
    "SGPRs": "sgprs",
    "VGPRs": "vgprs",
    "AGPRs": "agprs",
    "ScratchSize [bytes/lane]": "scratch_bytes",
    "Occupancy [waves/SIMD]": "occupancy_waves_per_simd",
    "SGPRs Spill": "spill_sgprs",
    "VGPRs Spill": "spill_vgprs",
    "LDS Size [bytes/block]": "lds_bytes",
}
_REMARK = re.compile(r"remark:\s+(Function Name|" + "|".join(re.escape(k) for k in _REMARK_FIELDS) + r"):\s+(\S+)")


def name_expressions(family, arch):
    """The template instantiations `family`.hip is built with for `arch`."""
    return instantiations(ROCM, family, arch)


def available():
    """(True, "") when hipcc and a demangler are here, else (False, the reason)."""
    if find_hipcc() is None:
        return False, "hipcc not found (apt-get install -y hipcc: Debian's ROCm 5.2 toolchain)"
    if not (shutil.which("llvm-cxxfilt") or shutil.which("c++filt")):
        return False, "no demangler (llvm-cxxfilt or c++filt)"
    return True, ""


def find_hipcc():
    return shutil.which("hipcc")


def translation_unit(path, names):
    """C++ that includes the kernel file and explicitly instantiates each name expression."""
    lines = [f'#include "{Path(path).name}"']
    lines += [f"template __global__ decltype({n}) {n};" for n in names]
    return "\n".join(lines) + "\n"


def _key(name):
    return re.sub(r"\s+", "", name)


def _demangle(symbols):
    tool = shutil.which("llvm-cxxfilt") or shutil.which("c++filt")
    if tool is None:
        raise KernelCompileError("no demangler (llvm-cxxfilt or c++filt) to map kernel symbols to name expressions")
    out = subprocess.run([tool], input="\n".join(symbols) + "\n", capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _expression_of(demangled):
    """'void gemm_simt<float, __half>(float const*, ...)' -> 'gemm_simt<float,__half>' (spaces removed)."""
    head = demangled.split("(", 1)[0]
    if head.startswith("void "):
        head = head[len("void "):]
    return _key(head)


def parse_remarks(log):
    """Per function symbol, its resource numbers, from -Rpass-analysis=kernel-resource-usage output."""
    report, current = {}, None
    for line in log.splitlines():
        m = _REMARK.search(line)
        if not m:
            continue
        field, value = m.groups()
        if field == "Function Name":
            current = report.setdefault(value, {})
        elif current is not None:
            current[_REMARK_FIELDS[field]] = int(value)
    return report


def compile_report(path, names, arch, options=OPTIONS, hipcc=None, timeout=900):
    """Compile kernel file `path` for `arch` with the given name expressions; return one resource
    record per name expression. Raises KernelCompileError on any compiler error."""
    path = Path(path)
    hipcc = hipcc or find_hipcc()
    if hipcc is None:
        raise KernelCompileError("hipcc not found: apt-get install -y hipcc (Debian's ROCm 5.2 toolchain)")
    env = dict(os.environ, HIP_PLATFORM="amd")  # otherwise hipcc drives nvcc when it is on the PATH
    with tempfile.TemporaryDirectory(prefix="hal-hipcc-") as tmp:
        tu = Path(tmp) / f"{path.stem}.{arch}.hip"
        tu.write_text(translation_unit(path, names))
        cmd = [hipcc, "-x", "hip", f"--offload-arch={arch}", "--cuda-device-only", "-c", *options, *define_options(),
               *(f"-I{d}" for d in (path.parent, *ROCM.include_dirs)),
               "-Rpass-analysis=kernel-resource-usage", str(tu), "-o", str(Path(tmp) / "out.o")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise KernelCompileError(f"hipcc timed out after {timeout} s on {path.name} for {arch}", str(e.stderr or "")) from None
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = "\n".join(line for line in log.splitlines() if "remark:" not in line)
        raise KernelCompileError(f"hipcc failed on {path.name} for {arch} (exit {proc.returncode}): {' '.join(cmd)}", errors)
    by_symbol = parse_remarks(log)
    symbols = list(by_symbol)
    by_name = {}
    for symbol, demangled in zip(symbols, _demangle(symbols) if symbols else []):
        by_name.setdefault(_expression_of(demangled), by_symbol[symbol])
    records = []
    for name in names:
        numbers = by_name.get(_key(name))
        if numbers is None:
            raise KernelCompileError(f"hipcc gave no resource report for {name} in {path.name} for {arch}", log)
        records.append({"kernel": name, "arch": arch, "file": path.name, **{k: numbers.get(k, 0) for k in _REMARK_FIELDS.values()}})
    return records


def compile_all(families=FAMILIES, archs=ARCHS, jobs=None, hipcc=None):
    """Every family for every architecture (one hipcc process each, `jobs` at a time)."""
    tasks = [(f, a) for f in families for a in archs]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        results = pool.map(lambda t: compile_report(ROCM.source(t[0]), name_expressions(*t), t[1], hipcc=hipcc), tasks)
        return [record for records in results for record in records]
