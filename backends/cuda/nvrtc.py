"""Compile the CUDA kernel files with NVRTC from pip, with no GPU and no CUDA toolkit.

Used by the compile report (hal.backends.gpu.compile_report: every CUDA family for sm_80, sm_89,
sm_90a and sm_100a) to prove the kernels compile and to collect ptxas' resource report per kernel.
Needs `cuda-bindings` (the Python bindings), `nvidia-cuda-nvrtc` (libnvrtc) and
`nvidia-cuda-runtime` (the headers: NVRTC ships no cuda_fp16.h / cuda_bf16.h of its own, the
runtime wheel has them under site-packages/nvidia/cu13/include, or nvidia/cuda_runtime/include
for the CUDA 12 wheels).

    from hal.backends.cuda import nvrtc
    result = nvrtc.compile_file("gemm", "sm_90a")       # all instantiations of the gemm family
    result.report   # [{"kernel": "gemm_mma<__half, float>", "arch": "sm_90a", "registers": ..., ...}]
    nvrtc.compile_all()                                 # every family x every arch
"""
import importlib.util
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from hal.backends.gpu.catalog import FAMILIES, block_threads, instantiations
from hal.backends.gpu.vendor import CUDA
from hal.codes import define_options
from hal.errors import BackendUnavailable, KernelCompileError

ARCHS = CUDA.compile_archs

# Per-SM limits of each architecture, from NVIDIA's CUDA C++ Programming Guide (compute capability
# table) and the occupancy calculator: max resident threads, blocks, 32-bit registers, shared memory
# usable by blocks (bytes), shared memory the driver reserves per block (bytes).
SM_LIMITS = {
    80: dict(threads=2048, blocks=32, registers=65536, shared=167936, reserved=1024),
    86: dict(threads=1536, blocks=16, registers=65536, shared=102400, reserved=1024),
    89: dict(threads=1536, blocks=24, registers=65536, shared=102400, reserved=1024),
    90: dict(threads=2048, blocks=32, registers=65536, shared=233472, reserved=1024),
    100: dict(threads=2048, blocks=32, registers=65536, shared=233472, reserved=1024),
}
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256


def arch_number(arch):
    match = re.fullmatch(r"sm_(\d+)[af]?", arch)
    if not match:
        raise ValueError(f"not a CUDA architecture: {arch!r} (expected e.g. sm_80, sm_90a)")
    return int(match.group(1))


def name_expressions(family, arch):
    """The template instantiations a kernel file is built with for one architecture."""
    return instantiations(CUDA, family, arch)


# ---------------------------------------------------------------- locating NVRTC and its headers


def _nvidia_roots():
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def include_dirs():
    """Directories holding cuda_fp16.h / cuda_bf16.h for NVRTC: the pip runtime wheel's headers
    (CUDA 13: nvidia/cu13/include; CUDA 12: nvidia/cuda_runtime/include), else a CUDA toolkit
    named by CUDA_HOME / CUDA_PATH."""
    candidates = []
    for root in _nvidia_roots():
        candidates += sorted(root.glob("cu*/include")) + [root / "cuda_runtime" / "include"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    for path in candidates:
        if (path / "cuda_fp16.h").is_file() and (path / "cuda_bf16.h").is_file():
            # The CCCL headers (nv/target) that newer cuda_fp16.h may include sit beside or below.
            extra = [path / "cccl"] if (path / "cccl").is_dir() else []
            return [path, *extra]
    return []


def _bindings():
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            from cuda import nvrtc  # cuda-python < 12.6 spelling
        except ImportError:
            raise BackendUnavailable("NVRTC bindings are not installed (pip install cuda-bindings nvidia-cuda-nvrtc nvidia-cuda-runtime)") from None
    return nvrtc


def available():
    """(True, "") when NVRTC and the fp16/bf16 headers are there, else (False, the reason)."""
    try:
        nvrtc = _bindings()
        err, major, minor = nvrtc.nvrtcVersion()
        _check(nvrtc, err, "nvrtcVersion")
    except Exception as exc:  # a missing libnvrtc surfaces here as a RuntimeError from the loader
        return False, f"NVRTC is not usable: {exc}"
    if not include_dirs():
        return False, "cuda_fp16.h / cuda_bf16.h not found (pip install nvidia-cuda-runtime, or set CUDA_HOME)"
    return True, ""


def _check(nvrtc, err, what, log=""):
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(err)
        raise KernelCompileError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}", log)


# ---------------------------------------------------------------- compiling


@dataclass
class Compiled:
    family: str
    arch: str
    cubin: bytes
    lowered: dict  # name expression -> mangled kernel name in the cubin
    log: str  # NVRTC + ptxas output
    report: list = field(default_factory=list)
    seconds: float = 0.0


def options(arch, verbose=True, extra=()):
    opts = [f"--gpu-architecture={arch}", "-std=c++17", *(f"-I{d}" for d in CUDA.include_dirs), *define_options()]
    opts += [f"-I{d}" for d in include_dirs()]
    if verbose:
        opts.append("--ptxas-options=-v")
    return opts + list(extra)


def compile_source(source, arch, names, filename="kernel.cu", family=None, extra_options=()):
    """Compile CUDA source text for one architecture with the given name expressions; returns a
    Compiled with the cubin and the per-kernel resource report. Raises KernelCompileError."""
    nvrtc = _bindings()
    arch_number(arch)
    started = time.perf_counter()
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), filename.encode(), 0, [], [])
    _check(nvrtc, err, "nvrtcCreateProgram")
    try:
        for name in names:
            (err,) = nvrtc.nvrtcAddNameExpression(prog, name.encode())
            _check(nvrtc, err, f"nvrtcAddNameExpression({name})")
        opts = [o.encode() for o in options(arch, extra=extra_options)]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        err, size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check(nvrtc, err, "nvrtcGetProgramLogSize")
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetProgramLog(prog, buf)
        log = buf.rstrip(b"\0").decode(errors="replace")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"{filename} failed to compile for {arch}", log)
        lowered = {}
        for name in names:
            err, mangled = nvrtc.nvrtcGetLoweredName(prog, name.encode())
            _check(nvrtc, err, f"nvrtcGetLoweredName({name})", log)
            lowered[name] = mangled.decode()
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, "nvrtcGetCUBINSize", log)
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check(nvrtc, err, "nvrtcGetCUBIN", log)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    compiled = Compiled(family or Path(filename).stem, arch, bytes(cubin), lowered, log, seconds=time.perf_counter() - started)
    compiled.report = resource_report(log, lowered, arch)
    return compiled


def compile_file(family, arch, names=None, path=None, extra_options=()):
    """Compile the family's kernel file (CUDA.source: backends/cuda/<family>.cu, else the shared
    backends/gpu/kernels/<family>.cu), or `path`, for `arch` with its name expressions."""
    path = Path(path) if path else CUDA.source(family)
    names = list(names) if names is not None else name_expressions(family, arch)
    return compile_source(path.read_text(), arch, names, filename=path.name, family=family, extra_options=extra_options)


# ---------------------------------------------------------------- ptxas' resource report

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log):
    """{mangled name: {"registers", "spill_stores", "spill_loads", "shared_bytes", "stack_bytes"}} from
    a `ptxas -v` log. Lines after "Compiling entry function" (and "Function properties for") belong
    to that entry until the next one."""
    out, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 0, "stack_bytes": 0})
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["shared_bytes"] = int(s.group(1)) if s else 0
    return out


def kernel_of(name_expression):
    return name_expression.split("<", 1)[0].strip()


def occupancy(arch, registers, shared_bytes, threads):
    """Resident blocks per SM, limited by threads, blocks, registers and shared memory (static only;
    the hal kernels use no dynamic shared memory). None for an architecture not in SM_LIMITS."""
    limits = SM_LIMITS.get(arch_number(arch))
    if limits is None or not threads:
        return None
    warps = -(-threads // 32)
    by_threads = limits["threads"] // (warps * 32)
    per_warp = -(-max(registers, 1) * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    by_registers = limits["registers"] // (per_warp * warps)
    by_shared = limits["shared"] // (shared_bytes + limits["reserved"]) if shared_bytes else limits["blocks"]
    return max(0, min(limits["blocks"], by_threads, by_registers, by_shared))


def resource_report(log, lowered, arch):
    """One row per name expression, in the order given."""
    parsed = parse_ptxas_log(log)
    rows = []
    for name, mangled in lowered.items():
        info = parsed.get(mangled)
        if info is None:
            raise KernelCompileError(f"ptxas reported nothing for {name} ({mangled}) on {arch}", log)
        rows.append({"kernel": name, "arch": arch, **info,
                     "occupancy_blocks_per_sm": occupancy(arch, info["registers"], info["shared_bytes"], block_threads(CUDA, kernel_of(name)))})
    return rows


def _compile_job(job):
    family, arch = job
    c = compile_file(family, arch)
    return c.report, c.seconds, c.log, CUDA.source(family).name


def compile_all(families=FAMILIES, archs=ARCHS, jobs=None):
    """Compile every file for every architecture: one report row per kernel and architecture, with
    the compile's seconds and compiler warnings. `jobs` > 1 compiles in that many processes (NVRTC
    is CPU-bound)."""
    work = [(f, a) for f in families for a in archs]
    jobs = jobs if jobs is not None else min(len(work), os.cpu_count() or 1)
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_job, work))
    else:
        results = [_compile_job(w) for w in work]
    rows = []
    for report, seconds, log, filename in results:
        rows += [{"file": filename, **r, "warnings": warnings_in(log)} for r in report]
    return rows


def warnings_in(log):
    """The compiler's warning lines (NVRTC front end and ptxas)."""
    return [line for line in log.splitlines() if "warning" in line.lower()]
