"""What differs between the GPU vendors, as data: file suffix, type names, warp size, the tensor-op
(matrix-instruction) variant of the kernels and the architectures that have it, how a device names
its architecture and which CuPy build drives it. No code branches on a vendor's name."""
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
    tensor_op: str  # suffix of the kernel variants on matrix units: gemm_mma, flash_attention_mfma, ...
    tensor_op_instruction: str
    tensor_op_block: int  # threads per block of those variants
    tensor_op_archs: str  # regular expression of the architectures with the tensor-op instruction
    fp8_tensor_op_archs: str  # ... and of those whose fp8 form runs on fp8 units (see has_fp8_tensor_ops)
    fp8_tensor_op_format: str  # the fp8 flavour that form reads (the shim's HAL_FMT_NATIVE_FP8); the other is decoded
    sim_arch: str  # the architecture the emulator presents (one with tensor ops)
    compile_archs: tuple  # the architectures of the offline compile report (CI)
    dlpack_device: int
    shared_memory: str  # per-block limit, for the porting checklist
    fp8: str
    runtime_compiler: str
    cupy_is_hip: bool  # cupy.cuda.runtime.is_hip of the CuPy build that drives this vendor
    cupy_package: str  # what to pip install when CuPy is missing
    arch_format: str  # the architecture from cupy's device properties: str.format(**properties)
    runtime_headers: str  # "module:function" giving the runtime compiler's extra include directories, or ""
    offline_compiler: str  # the module that compiles the kernel files offline: available(), compile_all()
    report_columns: tuple  # (key, header) of the compile report as `hal backends --kernels` shows it
    report_keys: dict  # the offline compiler's names of the report's common keys: {its key: common key}

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

    def has_tensor_ops(self, arch):
        return re.fullmatch(self.tensor_op_archs, arch) is not None

    def has_fp8_tensor_ops(self, arch):
        """Whether the fp8 form of the tensor-op instruction runs on fp8 units: mma.sync with e4m3
        inputs on Ada (sm_89; Hopper and Blackwell accept it but ptxas lowers it to f16 conversions and
        an f16 mma, their fp8 units being reached through wgmma / tcgen05), fp8 MFMA (FNUZ) on gfx94x."""
        return re.fullmatch(self.fp8_tensor_op_archs, arch) is not None

    def fp8_format(self, arch):
        """The e4m3 flavour `arch` computes in (hal.Backend.fp8_format): the fp8 units' where there are any, else OCP."""
        return self.fp8_tensor_op_format if self.has_fp8_tensor_ops(arch) else "float8_e4m3fn"

    def arch_of(self, properties):
        """The architecture name of a device, from its CuPy device properties (bytes decoded)."""
        props = {k: v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in properties.items()}
        return self.arch_format.format(**props).split(":")[0]


CUDA = Vendor(
    name="cuda", suffix=".cu", types={"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}, warp=32,
    tensor_op="mma", tensor_op_instruction="mma.sync.m16n8k16", tensor_op_block=128,
    tensor_op_archs=r"sm_([89]\d|[1-9]\d\d+)a?", fp8_tensor_op_archs=r"sm_89", fp8_tensor_op_format="float8_e4m3fn", sim_arch="sm_80",
    compile_archs=("sm_80", "sm_89", "sm_90a", "sm_100a"), dlpack_device=2,
    shared_memory="48 KiB per block by default; opt-in up to 164 KiB (sm_80) / 227 KiB (sm_90)",
    fp8="OCP e4m3fn / e5m2 in hardware from sm_89; hal kernels decode fp8 KV caches in software", runtime_compiler="NVRTC through CuPy",
    cupy_is_hip=False, cupy_package="cupy-cuda12x", arch_format="sm_{major}{minor}",
    runtime_headers="hal.backends.cuda.nvrtc:include_dirs",  # cuda_fp16.h and friends from the pip wheels when no toolkit is installed
    offline_compiler="hal.backends.cuda.nvrtc",
    report_columns=(("kernel", "kernel"), ("arch", "arch"), ("registers", "registers"), ("spills", "spills"),
                    ("shared_bytes", "shared bytes"), ("occupancy_blocks_per_sm", "occupancy blocks per SM")),
    report_keys={},
)
ROCM = Vendor(
    name="rocm", suffix=".hip", types={"float32": "float", "float16": "__half", "bfloat16": "hip_bfloat16"}, warp=64,
    tensor_op="mfma", tensor_op_instruction="v_mfma_f32_32x32x8", tensor_op_block=256,
    tensor_op_archs=r"gfx90a|gfx94[012]", fp8_tensor_op_archs=r"gfx94[012]", fp8_tensor_op_format="float8_e4m3fnuz", sim_arch="gfx90a",
    compile_archs=("gfx90a", "gfx940", "gfx1030"), dlpack_device=10,
    shared_memory="64 KiB LDS per workgroup (160 KiB on gfx950)",
    fp8="FNUZ (e4m3fnuz / e5m2fnuz) on gfx94x, OCP on gfx950; hal kernels decode fp8 KV caches in software",
    runtime_compiler="hipRTC through CuPy's ROCm build",
    cupy_is_hip=True, cupy_package="cupy-rocm-6-0 (CuPy's ROCm build)", arch_format="{gcnArchName}",
    runtime_headers="", offline_compiler="hal.backends.rocm.hipcc",
    report_columns=(("kernel", "kernel"), ("arch", "arch"), ("registers", "VGPRs"), ("sgprs", "SGPRs"), ("agprs", "AGPRs"),
                    ("spills", "spills"), ("shared_bytes", "LDS bytes"), ("occupancy_waves_per_simd", "occupancy waves per SIMD")),
    report_keys={"vgprs": "registers", "lds_bytes": "shared_bytes"},
)
VENDORS = {v.name: v for v in (CUDA, ROCM)}
