"""What differs between the two GPU vendors, as data: file suffix, type names, warp size, the
matrix-instruction variant of gemm and the architectures that have it."""
import re
from dataclasses import dataclass
from pathlib import Path

BACKENDS_DIR = Path(__file__).resolve().parent.parent
# Kernel files written once for both vendors (through the vendor shim header `hal_vendor.h` that
# each vendor's kernel directory provides); a vendor file of the same family name takes precedence.
SHARED_KERNEL_DIR = Path(__file__).resolve().parent / "kernels"


@dataclass(frozen=True)
class Vendor:
    name: str  # "cuda" or "rocm": the device backend; the emulated one is f"{name}-sim"
    suffix: str
    types: dict  # hal dtype name -> C++ type name
    warp: int
    matrix: str  # suffix of the kernel variants on matrix units: gemm_mma, flash_attention_mfma, ...
    matrix_instruction: str
    matrix_block: int  # threads per block of that variant
    sim_arch: str  # the architecture the emulator presents (one with matrix units)
    compile_archs: tuple  # the CI architecture matrix
    dlpack_device: int
    shared_memory: str  # per-block limit, for the porting checklist
    fp8: str
    runtime_compiler: str

    @property
    def kernel_dir(self):
        return BACKENDS_DIR / self.name

    @property
    def include_dirs(self):
        """Include path of every build of this vendor's kernels: its own directory (the shim) first."""
        return (self.kernel_dir, SHARED_KERNEL_DIR)

    def source(self, family):
        own = self.kernel_dir / f"{family}{self.suffix}"
        return own if own.exists() else SHARED_KERNEL_DIR / f"{family}.cu"

    def has_matrix_units(self, arch):
        if self.name == "cuda":
            match = re.fullmatch(r"sm_(\d+)a?", arch)
            return bool(match) and int(match.group(1)) >= 80
        return arch in ("gfx90a", "gfx940", "gfx941", "gfx942")

    def has_fp8_matrix_units(self, arch):
        """Whether the fp8 form of the matrix instruction runs on fp8 tensor cores: mma.sync with e4m3
        inputs on Ada (sm_89; Hopper and Blackwell accept it but ptxas lowers it to f16 conversions and
        an f16 mma, their fp8 units being reached through wgmma / tcgen05), fp8 MFMA (FNUZ) on gfx94x."""
        if self.name == "cuda":
            return arch == "sm_89"
        return arch in ("gfx940", "gfx941", "gfx942")


CUDA = Vendor(
    name="cuda", suffix=".cu", types={"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}, warp=32,
    matrix="mma", matrix_instruction="mma.sync.m16n8k16", matrix_block=128, sim_arch="sm_80",
    compile_archs=("sm_80", "sm_89", "sm_90a", "sm_100a"), dlpack_device=2,
    shared_memory="48 KiB per block by default; opt-in up to 164 KiB (sm_80) / 227 KiB (sm_90)",
    fp8="OCP e4m3fn / e5m2 in hardware from sm_89; hal kernels decode fp8 KV caches in software", runtime_compiler="NVRTC through CuPy",
)
ROCM = Vendor(
    name="rocm", suffix=".hip", types={"float32": "float", "float16": "__half", "bfloat16": "hip_bfloat16"}, warp=64,
    matrix="mfma", matrix_instruction="v_mfma_f32_32x32x8", matrix_block=256, sim_arch="gfx90a",
    compile_archs=("gfx90a", "gfx940", "gfx1030"), dlpack_device=10,
    shared_memory="64 KiB LDS per workgroup (160 KiB on gfx950)",
    fp8="FNUZ (e4m3fnuz / e5m2fnuz) on gfx94x, OCP on gfx950; hal kernels decode fp8 KV caches in software",
    runtime_compiler="hipRTC through CuPy's ROCm build",
)
VENDORS = {v.name: v for v in (CUDA, ROCM)}
