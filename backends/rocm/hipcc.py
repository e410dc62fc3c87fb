"""Offline compilation of hal's HIP kernels with Debian's hipcc (ROCm 5.2, clang 15): the ROCm
half of the CI architecture matrix. No GPU is needed.

hipcc has no name expressions (hipRTC's way of asking for template instantiations), so each
build is a small generated translation unit that includes the kernel file and explicitly
instantiates the requested kernels:

    #include "gemm.hip"
    template __global__ decltype(gemm_simt<float, __half>) gemm_simt<float, __half>;

It is compiled device-only for one architecture at a time with
`-Rpass-analysis=kernel-resource-usage`; the remarks (SGPRs, VGPRs, AGPRs, spills, scratch,
LDS, occupancy per kernel) are parsed and their mangled names mapped back to the name
expressions through a demangler (llvm-cxxfilt or binutils' c++filt).

Debian's hipcc is a wrapper that picks nvcc when one is on the PATH unless HIP_PLATFORM=amd;
every call here sets it.

    python -m hal.backends.rocm.hipcc [--arch gfx90a ...] [--family gemm ...] [--json out.json]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hal.errors import KernelCompileError

KERNEL_DIR = Path(__file__).resolve().parent
ARCHS = ("gfx90a", "gfx940", "gfx1030")  # the CI matrix; Debian's clang 15 does not know gfx942
MFMA_ARCHS = ("gfx90a", "gfx940", "gfx941", "gfx942")  # CDNA2/3: v_mfma_f32_32x32x8{f16,bf16_1k}
TYPES = ("float", "__half", "hip_bfloat16")
HALF_TYPES = ("__half", "hip_bfloat16")
POSITION_TYPES = ("int", "long long")
ROW_KERNELS = {"softmax": ("softmax",), "norms": ("rms_norm", "layer_norm"), "activations": ("silu_and_mul",)}
FAMILIES = ("gemm", "softmax", "norms", "activations", "rope")
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


def source(family):
    return KERNEL_DIR / f"{family}.hip"


def name_expressions(family, arch):
    """The template instantiations `family`.hip is built with for `arch`; gemm_mfma only for the
    half types and only on architectures with MFMA (gfx90a, gfx94x)."""
    if family == "gemm":
        names = [f"gemm_simt<{t}, {o}>" for t in TYPES for o in TYPES]
        if arch in MFMA_ARCHS:
            names += [f"gemm_mfma<{t}, {o}>" for t in HALF_TYPES for o in TYPES]
        return names
    if family == "rope":
        return [f"rope<{t}, {p}>" for t in TYPES for p in POSITION_TYPES]
    if family in ROW_KERNELS:
        return [f"{k}<{t}>" for k in ROW_KERNELS[family] for t in TYPES]
    raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)}")


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
        cmd = [hipcc, "-x", "hip", f"--offload-arch={arch}", "--cuda-device-only", "-c", *options, f"-I{path.parent}",
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


def compile_matrix(archs=ARCHS, families=FAMILIES, jobs=None, hipcc=None):
    """Every family for every architecture (one hipcc process each, `jobs` at a time)."""
    tasks = [(f, a) for f in families for a in archs]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        results = pool.map(lambda t: compile_report(source(t[0]), name_expressions(*t), t[1], hipcc=hipcc), tasks)
        return [record for records in results for record in records]


def format_table(records):
    cols = ("kernel", "arch", "sgprs", "vgprs", "agprs", "spill_sgprs", "spill_vgprs", "scratch_bytes", "lds_bytes", "occupancy_waves_per_simd")
    heads = ("kernel", "arch", "SGPR", "VGPR", "AGPR", "sSpill", "vSpill", "scratch", "LDS", "waves/SIMD")
    rows = [[str(r[c]) for c in cols] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*heads)] + [fmt.format(*row) for row in rows])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help=f"default: {' '.join(ARCHS)}")
    parser.add_argument("--family", action="append", help=f"default: {' '.join(FAMILIES)}")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        records = compile_matrix(tuple(args.arch or ARCHS), tuple(args.family or FAMILIES))
    except KernelCompileError as e:
        print(e, file=sys.stderr)
        return 1
    print(format_table(records))
    spills = [r for r in records if r["spill_sgprs"] or r["spill_vgprs"] or r["scratch_bytes"]]
    print(f"{len(records)} kernels in {time.perf_counter() - start:.1f} s; {len(spills)} spill or use scratch")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
