"""The host emulator's executor: builds a `.cu` / `.hip` kernel file with the host C++20 compiler
against the emulation headers in `include/`, and launches its kernels on NumPy arrays.

    module = SimModule("backends/cuda/norms.cu", "cuda", ["rms_norm<float>"])
    module.launch("rms_norm<float>", (rows, 1, 1), (256, 1, 1), 0, (x, None, w, y, None, np.int32(rows), ...))

Build: one generated translation unit includes the kernel file and defines an `extern "C"` entry
point per name expression, which unpacks the packed arguments by the kernel's parameter types
(deduced from `&kernel<...>` by templates, see include/hal_sim/entry.h), checks them against what
Python packed and runs the launch. The runtime (include/hal_sim/runtime_impl.h) is compiled once
per mode and warp size. Everything is cached on disk under $HAL_SIM_CACHE, else
$XDG_CACHE_HOME/hal/sim, else ~/.cache/hal/sim, keyed by the compiler, the flags, the name
expressions and the content of every file the build included (ccache-style: a manifest of the
dependencies the compiler reported is checked before a cached library is used).

Modes:
- "release": a shared library loaded with ctypes; launches run in this process on the NumPy
  buffers directly.
- "tsan" / "asan": sanitized code cannot be loaded into a plain Python process, so the build is an
  executable driver (include/hal_sim/driver.h) run once per launch: it allocates every device
  buffer itself (exact sizes, so ASan knows the bounds), copies the inputs in, launches and
  writes the buffers of non-const pointer parameters back. A sanitizer report becomes a
  KernelLaunchError carrying the report.

Environment: CXX (compiler) and the HAL_SIM_* settings of SETTINGS, checked once, before the first
build: a bad value is a SchemaError naming the variable, what it takes and what it holds.

The cache heals itself: every artifact (library, driver, runtime object) has its SHA-256 beside
it (`<artifact>.sha256`), checked before it is used; a damaged one (truncated, overwritten, or a
library that does not load) is discarded and rebuilt, with one warning per artifact.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from hal.codes import defines as kernel_codes
from hal.errors import KernelCompileError, KernelLaunchError, SchemaError

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
MODES = ("release", "tsan", "asan")
WARP = {"cuda": 32, "rocm": 64}
GENERATOR_VERSION = "2"  # bump when the generated code or the build layout changes
ERROR_BUFFER = 1 << 16

COMMON_FLAGS = ("-std=c++20", "-fPIC", "-pthread", "-fno-strict-aliasing", "-DHAL_SIM")
# Kernels reinterpret buffers (16-byte vector loads of half arrays) as device code does: no strict aliasing.
MODE_FLAGS = {
    "release": ("-O2",),
    "tsan": ("-O1", "-g", "-fsanitize=thread", "-fno-omit-frame-pointer"),
    "asan": ("-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"),
}
SANITIZER_ENV = {
    "tsan": ("TSAN_OPTIONS", "halt_on_error=1:exitcode=66:report_signal_unsafe=0:atexit_sleep_ms=0"),
    "asan": ("ASAN_OPTIONS", "halt_on_error=1:exitcode=66:detect_leaks=0:abort_on_error=0"),
}
SANITIZER_MARKERS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "SUMMARY: ")

# ---- toolchain ---------------------------------------------------------------------------------


def _compiler():
    cxx = os.environ.get("CXX")
    if cxx:
        return shlex.split(cxx)
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


@functools.lru_cache(maxsize=None)
def _probe(compiler):
    """(ok, reason, identity) for a compiler command (a tuple)."""
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"host compiler {' '.join(compiler)} does not run: {exc}", ""
    identity = version.stdout.strip()
    with tempfile.TemporaryDirectory(prefix="hal-sim-probe-") as tmp:
        src = Path(tmp, "probe.cpp")
        src.write_text("#include <source_location>\n#include <atomic>\n"
                       "int main() { float f = 0; std::atomic_ref<float>(f).fetch_add(1.0f);"
                       " return int(std::source_location::current().line()) - 2 + int(f) - 1; }\n")
        try:
            r = subprocess.run([*compiler, "-std=c++20", "-pthread", str(src), "-o", str(Path(tmp, "probe"))],
                               capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"host compiler {' '.join(compiler)} failed: {exc}", identity
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["?"])[0]
            return False, f"host compiler {' '.join(compiler)} cannot build C++20 (source_location, atomic_ref): {first}", identity
    return True, identity.splitlines()[0] if identity else " ".join(compiler), identity


def toolchain() -> tuple[bool, str]:
    """(available, reason): whether a C++20 host compiler (CXX, else g++ or clang++) can build the emulator."""
    compiler = _compiler()
    if compiler is None:
        return False, "no C++20 host compiler: set CXX or install g++ (apt-get install g++) or clang++"
    ok, reason, _ = _probe(tuple(compiler))
    return ok, reason


@functools.lru_cache(maxsize=None)
def sanitizer_available(mode) -> tuple[bool, str]:
    """(available, reason) for "tsan" / "asan": the compiler links and runs a sanitized program here."""
    ok, reason = toolchain()
    if not ok:
        return False, reason
    if mode == "release":
        return True, ""
    compiler = _compiler()
    with tempfile.TemporaryDirectory(prefix="hal-sim-probe-") as tmp:
        src, exe = Path(tmp, "probe.cpp"), Path(tmp, "probe")
        src.write_text("#include <thread>\nint x; int main() { std::thread t([]{ x = 1; }); t.join(); return x - 1; }\n")
        r = subprocess.run([*compiler, "-std=c++20", "-pthread", *MODE_FLAGS[mode][1:], str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return False, f"{mode} runtime missing: {r.stderr.strip()[:300]}"
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return False, f"{mode} programs do not run here: {r.stderr.strip()[:300]}"
    return True, ""


# ---- settings ------------------------------------------------------------------------------------


def _number(kind, lo, hi):
    """A parser of numbers of `kind` (int / float) in [lo, hi]; empty text is None (the default)."""

    def parse(text):
        if not text:
            return None
        value = kind(text)
        if not lo <= value <= hi:  # False for NaN too
            raise ValueError(text)
        return value

    return parse


def _cache_dir(text):
    """The cache directory: created if missing, and writable."""
    path = Path(text or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "hal", "sim"))
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    path.mkdir(parents=True, exist_ok=True)  # OSError (a file on the way, no permission): caught by _settings
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable", str(path))
    return path


# variable: (default, parse(text) -> value or ValueError / OSError, what it takes). The runtime
# (runtime_impl.h) reads HAL_SIM_WORKERS and HAL_SIM_STACK_KB itself, after they were checked here.
SETTINGS = {
    "HAL_SIM_CACHE": ("", _cache_dir, "a writable directory (default $XDG_CACHE_HOME/hal/sim, else ~/.cache/hal/sim)"),
    "HAL_SIM_CXXFLAGS": ("", shlex.split, "host compiler flags as a POSIX shell splits them (balanced quotes)"),
    "HAL_SIM_WORKERS": ("", _number(int, 1, 4096), "an integer number of worker threads in [1, 4096] (default: cores)"),
    "HAL_SIM_STACK_KB": ("", _number(int, 16, 16384), "an integer fiber stack size in KiB in [16, 16384] (default 64, 256 with sanitizers)"),
    "HAL_SIM_TIMEOUT": ("600", _number(float, 1e-3, 1e7), "the seconds a sanitized launch may take, in [0.001, 1e7]"),
}


@functools.lru_cache(maxsize=None)
def _settings():
    """{variable: value}, checked once per process (a failed check is not cached: it raises again)."""
    values = {}
    for name, (default, parse, expected) in SETTINGS.items():
        text = os.environ.get(name) or default
        try:
            values[name] = parse(text)
        except (ValueError, OSError) as exc:
            reason = f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else ""
            raise SchemaError("environment", name, expected, f"{text!r}{reason}") from None
    return values


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path) -> str | None:
    try:
        return _sha(Path(path).read_bytes())
    except OSError:
        return None


def _headers_sha() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE_DIR.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(INCLUDE_DIR)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _dir_headers_sha(dirs) -> str:
    """The headers (.h, .cuh) directly in the given include directories."""
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted(Path(d).glob("*")):
            if p.suffix in (".h", ".cuh") and p.is_file():
                h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _parse_deps(text):
    """Dependencies from a make-style .d file written by -MMD."""
    text = text.replace("\\\n", " ")
    _, _, rest = text.partition(":")
    deps, word = [], ""
    i = 0
    while i < len(rest):  # spaces in paths are escaped as "\ "
        c = rest[i]
        if c == "\\" and i + 1 < len(rest) and rest[i + 1] == " ":
            word += " "
            i += 2
            continue
        if c.isspace():
            if word:
                deps.append(word)
            word = ""
        else:
            word += c
        i += 1
    if word:
        deps.append(word)
    return deps


def _run(cmd, cwd, what):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise KernelCompileError(f"{what}: the host compiler timed out", " ".join(map(shlex.quote, cmd))) from None
    except OSError as exc:
        raise KernelCompileError(f"{what}: the host compiler could not run: {exc}") from None
    if r.returncode != 0:
        log = f"$ {' '.join(map(shlex.quote, cmd))}\n{r.stderr}{r.stdout}"
        raise KernelCompileError(f"{what} failed to compile", log)
    return r


_build_lock = threading.Lock()
CACHE_ENTRIES = 256  # builds kept (least recently used go first)
_damaged = set()  # artifacts found damaged in this process (warned once each)


def _hash_path(artifact):
    return artifact.with_name(artifact.name + ".sha256")


def _store(built, artifact):
    """Move a freshly built file into the cache, its hash first (an artifact without one is not used)."""
    tmp_hash = built.with_name(built.name + ".sha256")
    tmp_hash.write_text(_file_sha(built))
    os.replace(tmp_hash, _hash_path(artifact))
    os.replace(built, artifact)


def _intact(artifact):
    """Whether a cached artifact exists and matches its recorded hash; a damaged one is discarded."""
    if not artifact.exists():
        return False
    try:
        recorded = _hash_path(artifact).read_text().strip()
    except OSError:
        recorded = None
    if recorded and _file_sha(artifact) == recorded:
        return True
    _discard(artifact, "its content does not match its recorded SHA-256")
    return False


def _discard(artifact, why):
    """Remove a damaged artifact (and its hash and manifest) so that it is rebuilt; warn once."""
    for p in (artifact, _hash_path(artifact), artifact.with_suffix(".json")):
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass
    if artifact not in _damaged:
        _damaged.add(artifact)
        warnings.warn(f"hal sim cache: discarded {artifact} ({why}); rebuilding it", RuntimeWarning, stacklevel=3)


def _touch(directory):
    try:
        os.utime(directory)
    except OSError:
        pass


def _prune(directory, keep):
    """Keep the cache bounded: in `directory` only the newest builds of this kernel file (older
    header versions go), and at most CACHE_ENTRIES kernel directories. A library that a running
    process has loaded stays valid after its file is removed."""
    _touch(directory)
    try:
        stale = sorted((p for p in directory.iterdir() if p.suffix in (".so", ".driver") and p != keep), key=lambda p: p.stat().st_mtime)
        for p in stale[:-2]:
            for q in (p, _hash_path(p), p.with_suffix(".json")):
                q.unlink(missing_ok=True)
        entries = sorted((p for p in directory.parent.iterdir() if p.is_dir() and p.name != "runtime"), key=lambda p: p.stat().st_mtime)
        for p in entries[:-CACHE_ENTRIES]:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


def _runtime_flags(mode, warp):
    flags = [*COMMON_FLAGS, f"-DHAL_SIM_WARP={warp}", *MODE_FLAGS[mode], f"-I{INCLUDE_DIR}"]
    if mode == "tsan":  # the runtime is not instrumented, only annotated (see runtime_impl.h)
        flags = [f for f in flags if f != "-fsanitize=thread"] + ["-DHAL_SIM_TSAN=1"]
    return flags


def _runtime_object(compiler, identity, mode, warp, base_flags):
    """The runtime compiled for (mode, warp), cached."""
    key = _sha(json.dumps([GENERATOR_VERSION, identity, compiler, base_flags, mode, warp, _headers_sha()]).encode())[:24]
    root = _settings()["HAL_SIM_CACHE"] / "runtime"
    obj = root / f"runtime-{mode}-w{warp}-{key}.o"
    if _intact(obj):
        return obj
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hal-sim-rt-", dir=root) as tmp:
        src = Path(tmp, "runtime.cpp")
        src.write_text("// generated by hal.backends.sim.executor\n#include <hal_sim/runtime_impl.h>\n")
        out = Path(tmp, "runtime.o")
        _run([*compiler, *base_flags, "-fvisibility=hidden", "-c", str(src), "-o", str(out)], tmp, f"the emulator runtime ({mode}, warp {warp})")
        _store(out, obj)
    return obj


# ---- argument packing ----------------------------------------------------------------------------

K_ARRAY, K_NULL, K_INTEGER, K_FLOATING, K_BOOL = range(5)
E_UNKNOWN, E_FLOATING, E_INTEGER = range(3)


class _ArgDesc(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("size", ctypes.c_int32), ("elem_size", ctypes.c_int32), ("elem_kind", ctypes.c_int32),
                ("desc", ctypes.c_char_p), ("value", ctypes.c_void_p)]


class _LaunchDesc(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3), ("shared_bytes", ctypes.c_uint64), ("nargs", ctypes.c_int32),
                ("pad_", ctypes.c_int32), ("args", ctypes.POINTER(_ArgDesc)), ("error", ctypes.c_char_p), ("error_size", ctypes.c_uint64)]


class _Packed:
    """One argument as the entry point sees it."""

    __slots__ = ("kind", "size", "elem_size", "elem_kind", "desc", "value", "array")

    def __init__(self, kind, size, desc, value=b"", elem_size=0, elem_kind=E_UNKNOWN, array=None):
        self.kind, self.size, self.desc, self.value = kind, size, desc, value
        self.elem_size, self.elem_kind, self.array = elem_size, elem_kind, array


def _pack(index, a):
    if a is None:
        return _Packed(K_NULL, 8, "None")
    if isinstance(a, np.ndarray):
        if not a.flags.c_contiguous:
            raise KernelLaunchError(f"argument {index}: arrays must be C-contiguous (got strides {a.strides} for shape {a.shape})")
        kind = a.dtype.kind
        elem_kind = E_FLOATING if kind in "fc" else E_INTEGER if kind in "iub" else E_UNKNOWN
        return _Packed(K_ARRAY, 8, f"a {a.dtype} array", elem_size=a.itemsize, elem_kind=elem_kind, array=a)
    # Python scalars are converted like NumPy does (int -> int64, float -> float64), as CuPy does.
    if isinstance(a, bool):
        a = np.bool_(a)
    elif isinstance(a, int):
        a = np.int64(a)
    elif isinstance(a, float):
        a = np.float64(a)
    if isinstance(a, np.generic):
        kind = a.dtype.kind
        desc = f"numpy.{a.dtype.name}"
        if kind == "b":
            return _Packed(K_BOOL, a.itemsize, desc, a.tobytes())
        if kind in "iu":
            return _Packed(K_INTEGER, a.itemsize, desc, a.tobytes())
        if kind == "f":
            return _Packed(K_FLOATING, a.itemsize, desc, a.tobytes())
        raise KernelLaunchError(f"argument {index}: unsupported scalar type {desc}")
    raise KernelLaunchError(f"argument {index}: cannot pass {type(a).__name__} to a kernel (NumPy arrays, None or NumPy scalars)")


def _dim3(v, what):
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3:
        raise KernelLaunchError(f"{what} must have 1 to 3 dimensions, got {v}")
    if any(x < 0 or x >= 2 ** 32 for x in v):
        raise KernelLaunchError(f"{what} {v}: dimensions must be in [1, 2^32)")
    return v + (1,) * (3 - len(v))


_FRAME = re.compile(r"^\s*#0 .*?\s(/\S+?:\d+)(?::\d+)?(?:\s|$)", re.M)
_ACCESS = re.compile(r"^\s*(?:(Previous )?(?:atomic )?(read|write)|(READ|WRITE)) of size (\d+)", re.M | re.I)


def _headline(report, mode, status):
    """One line naming what the sanitizer found and where in the kernel source (frame #0 of each
    access, the emulator's own files left out), e.g. "ThreadSanitizer: data race: write at
    reduce.cu:13, previous read at reduce.cu:18"."""
    what = {"tsan": "ThreadSanitizer", "asan": "AddressSanitizer"}[mode]
    kind = re.search(rf"(?:WARNING|ERROR): {what}: ([\w\- ]+?)(?: on address| \(|$)", report, re.M)
    parts = []
    for access in _ACCESS.finditer(report):
        frame = _FRAME.search(report, access.end())
        if frame and "/hal_sim/" not in frame.group(1) and "libsanitizer" not in frame.group(1):
            label = f"{'previous ' if access.group(1) else ''}{(access.group(2) or access.group(3)).lower()}"
            parts.append(f"{label} at {frame.group(1)}")
    if not parts:
        frame = _FRAME.search(report)
        if frame:
            parts.append(f"at {frame.group(1)}")
    found = kind.group(1).strip() if kind else f"a problem (exit status {status})"
    return f"{what} reported {found}" + (": " + ", ".join(dict.fromkeys(parts)) if parts else "")


# ---- the module ---------------------------------------------------------------------------------


class SimModule:
    """A kernel file built for the host emulator, with one entry point per name expression."""

    def __init__(self, source, vendor, name_expressions, mode="release", include_dirs=(), defines=None):
        if vendor not in WARP:
            raise ValueError(f"vendor must be 'cuda' or 'rocm', got {vendor!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.source = Path(source).resolve()
        if not self.source.is_file():
            raise KernelCompileError(f"kernel source {self.source} does not exist")
        self.vendor, self.mode, self.warp = vendor, mode, WARP[vendor]
        self.name_expressions = list(dict.fromkeys(name_expressions))
        if not self.name_expressions:
            raise ValueError("at least one name expression is needed")
        self._index = {self._canonical(n): i for i, n in enumerate(self.name_expressions)}
        self.include_dirs = [Path(d).resolve() for d in include_dirs]
        # The kernel codes of hal/codes.py (HAL_ACT_*, HAL_FMT_*, ...) come with every build, as they
        # do with NVRTC and hipcc; `defines` adds to (or overrides) them.
        self.defines = {**kernel_codes(), **(defines or {})}
        ok, reason = toolchain() if mode == "release" else sanitizer_available(mode)
        if not ok:
            raise KernelCompileError(f"{self.source.name}: the {vendor}-sim {mode} build is unavailable: {reason}")
        self.artifact = self._build()
        self._lib = None
        if mode == "release":
            try:
                self._load()
            except KernelCompileError as exc:
                if not self.cache_hit:
                    raise
                _discard(self.artifact, f"it does not load: {exc}")
                self.artifact = self._build()
                self._load()

    @staticmethod
    def _canonical(name):
        return re.sub(r"\s+", "", name)

    # -- build --

    def _flags(self):
        flags = [*COMMON_FLAGS, f"-DHAL_SIM_WARP={self.warp}", *MODE_FLAGS[self.mode], *_settings()["HAL_SIM_CXXFLAGS"],
                 f"-I{INCLUDE_DIR}", f"-I{self.source.parent}"]
        flags += [f"-I{d}" for d in self.include_dirs]
        for k, v in sorted(self.defines.items()):
            flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
        return flags

    def _generated(self):
        lines = ["// generated by hal.backends.sim.executor: entry points for the host emulator",
                 f'#include "{self.source}"', "#include <hal_sim/entry.h>", ""]
        for i, name in enumerate(self.name_expressions):
            lit = json.dumps(name)
            lines.append(f'extern "C" __attribute__((visibility("default"))) int hal_sim_entry_{i}(const ::hal_sim::LaunchDesc* d) '
                         f"{{ return ::hal_sim::launch_kernel(&{name}, {lit}, d); }}")
            lines.append(f'extern "C" __attribute__((visibility("default"))) int hal_sim_info_{i}(int32_t* out, int32_t capacity) '
                         f"{{ return ::hal_sim::param_info(&{name}, out, capacity); }}")
        if self.mode != "release":
            n = len(self.name_expressions)
            lines.append("#ifdef HAL_SIM_DRIVER")
            lines.append("static int (*const hal_sim_entries[])(const ::hal_sim::LaunchDesc*) = {"
                         + ", ".join(f"&hal_sim_entry_{i}" for i in range(n)) + "};")
            lines.append("static int (*const hal_sim_infos[])(int32_t*, int32_t) = {" + ", ".join(f"&hal_sim_info_{i}" for i in range(n)) + "};")
            lines.append("#include <hal_sim/driver.h>")
            lines.append("#endif")
        return "\n".join(lines) + "\n"

    def _build(self):
        self.cache_hit = False
        compiler = _compiler()
        _, _, identity = _probe(tuple(compiler))
        flags = self._flags()
        generated = self._generated()
        # flags carry the include path and the defines (kernel codes); the headers of the include
        # directories (vendor shim, shared hal_gpu.h) are hashed here as well as in the manifest.
        base = _sha(json.dumps([GENERATOR_VERSION, identity, compiler, flags, self.mode, generated, str(self.source),
                                _file_sha(self.source), _headers_sha(), _dir_headers_sha(self.include_dirs)]).encode())[:24]
        directory = _settings()["HAL_SIM_CACHE"] / f"{self.source.stem}-{self.vendor}-{self.mode}-{base}"
        suffix = ".so" if self.mode == "release" else ".driver"
        for manifest in sorted(directory.glob("*.json")) if directory.exists() else ():
            try:
                deps = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            artifact = manifest.with_suffix(suffix)
            if all(_file_sha(p) == h for p, h in deps.items()) and _intact(artifact):
                self.cache_hit = True
                _touch(directory)
                return artifact
        with _build_lock:
            runtime = _runtime_object(compiler, identity, self.mode, self.warp, _runtime_flags(self.mode, self.warp))
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=directory) as tmp:
            src = Path(tmp, f"{self.source.stem}.sim.cpp")
            src.write_text(generated)
            out = Path(tmp, "artifact")
            cmd = [*compiler, *flags, "-MMD", "-MF", str(Path(tmp, "deps.d"))]
            if self.mode == "release":
                cmd += ["-shared", str(src), str(runtime), "-o", str(out)]
            else:
                cmd += ["-DHAL_SIM_DRIVER", str(src), str(runtime), "-o", str(out)]
            _run(cmd, tmp, f"{self.source.name} ({self.vendor}-sim, {self.mode})")
            deps = {}
            for dep in _parse_deps(Path(tmp, "deps.d").read_text()):
                path = Path(tmp, dep).resolve() if not os.path.isabs(dep) else Path(dep)
                if path == src.resolve() or path.parent == Path(tmp).resolve():
                    continue
                deps[str(path)] = _file_sha(path)
            deps[str(self.source)] = _file_sha(self.source)
            dep_key = _sha(json.dumps(sorted(deps.items())).encode())[:16]
            artifact = directory / f"{dep_key}{suffix}"
            _store(out, artifact)
            tmp_manifest = Path(tmp, "manifest.json")
            tmp_manifest.write_text(json.dumps(deps, indent=0))
            os.replace(tmp_manifest, artifact.with_suffix(".json"))
        _prune(directory, artifact)
        return artifact

    def _load(self):
        try:
            lib = ctypes.CDLL(str(self.artifact), mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError as exc:
            raise KernelCompileError(f"{self.source.name}: the built library does not load: {exc}") from None
        self._entries = []
        for i in range(len(self.name_expressions)):
            fn = getattr(lib, f"hal_sim_entry_{i}")
            fn.argtypes = [ctypes.POINTER(_LaunchDesc)]
            fn.restype = ctypes.c_int
            self._entries.append(fn)
        self._lib = lib

    # -- launch --

    def launch(self, name_expression, grid, block, shared_bytes, args):
        index = self._index.get(self._canonical(name_expression))
        if index is None:
            raise KernelLaunchError(f"{name_expression} is not one of the name expressions {self.source.name} was built with: {self.name_expressions}")
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        shared_bytes = int(shared_bytes)
        if shared_bytes < 0:
            raise KernelLaunchError(f"{name_expression}: negative shared_bytes {shared_bytes}")
        packed = [_pack(i, a) for i, a in enumerate(args)]
        if self.mode == "release":
            self._launch_here(index, name_expression, grid, block, shared_bytes, packed)
        else:
            self._launch_driver(index, name_expression, grid, block, shared_bytes, packed)

    def _launch_here(self, index, name, grid, block, shared_bytes, packed):
        n = len(packed)
        descs = (_ArgDesc * max(n, 1))()
        keep = []
        for i, p in enumerate(packed):
            if p.kind in (K_ARRAY, K_NULL):
                slot = ctypes.c_void_p(p.array.ctypes.data if p.array is not None else None)
            else:
                slot = ctypes.create_string_buffer(p.value, max(len(p.value), 1))
            desc = p.desc.encode()
            keep += [slot, desc]
            descs[i] = _ArgDesc(p.kind, p.size, p.elem_size, p.elem_kind, desc, ctypes.addressof(slot))
        error = ctypes.create_string_buffer(ERROR_BUFFER)
        d = _LaunchDesc((ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*block), shared_bytes, n, 0, descs,
                        ctypes.cast(error, ctypes.c_char_p), ERROR_BUFFER)
        status = self._entries[index](ctypes.byref(d))
        if status != 0:
            raise KernelLaunchError(error.value.decode(errors="replace") or f"{name}: launch failed")

    def _launch_driver(self, index, name, grid, block, shared_bytes, packed):
        # One buffer per distinct array; an array passed twice (in place) stays one buffer.
        buffers, bound = [], []
        by_address = {}
        for p in packed:
            if p.array is None:
                bound.append(-1)
                continue
            key = (p.array.ctypes.data, p.array.nbytes)
            if key not in by_address:
                by_address[key] = len(buffers)
                buffers.append(p.array)
            bound.append(by_address[key])
        parts = [b"HALSIMQ1", struct.pack("<i3I3IQii", index, *grid, *block, shared_bytes, len(packed), len(buffers))]
        for a in buffers:
            parts += [struct.pack("<Q", a.nbytes), a.tobytes()]
        for p, b in zip(packed, bound):
            desc = p.desc.encode()
            parts += [struct.pack("<iiiiiI", p.kind, p.size, p.elem_size, p.elem_kind, b, len(desc)), desc]
            if p.kind not in (K_ARRAY, K_NULL):
                parts.append(p.value)
        var, options = SANITIZER_ENV[self.mode]
        env = dict(os.environ)
        env[var] = options + (":" + env[var] if env.get(var) else "")
        timeout = _settings()["HAL_SIM_TIMEOUT"]
        with tempfile.TemporaryDirectory(prefix="hal-sim-launch-") as tmp:
            req, resp = Path(tmp, "request"), Path(tmp, "response")
            req.write_bytes(b"".join(parts))
            try:
                r = subprocess.run([str(self.artifact), str(req), str(resp)], capture_output=True, text=True, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise KernelLaunchError(f"{name} ({self.mode}): the launch did not finish within {timeout:.0f} s") from None
            report = r.stderr
            if r.returncode != 0 or any(m in report for m in SANITIZER_MARKERS):
                raise KernelLaunchError(f"{name} (grid {grid}, block {block}): {_headline(report, self.mode, r.returncode)}\n{report}")
            data = resp.read_bytes() if resp.exists() else b""
        if data[:8] != b"HALSIMR1":
            raise KernelLaunchError(f"{name} ({self.mode}): the driver gave no answer:\n{r.stderr}")
        status, mlen = struct.unpack_from("<iI", data, 8)
        at = 16
        message = data[at:at + mlen].decode(errors="replace")
        at += mlen
        if status != 0:
            raise KernelLaunchError(message or f"{name}: launch failed")
        (count,) = struct.unpack_from("<i", data, at)
        at += 4
        for _ in range(count):
            i, nbytes = struct.unpack_from("<iQ", data, at)
            at += 12
            target = buffers[i]
            if target.flags.writeable:
                target.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8, nbytes, at)
            at += nbytes

    def __repr__(self):
        return f"SimModule({self.source.name!r}, {self.vendor!r}, mode={self.mode!r}, {len(self.name_expressions)} kernels)"
