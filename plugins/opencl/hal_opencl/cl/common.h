/* Shared by every hal-opencl kernel file (prepended to the source before it is built).

   Storage types. Each tensor argument gets a "kind" from the launcher as a -D build option
   (F32, F16 or BF16); all arithmetic is fp32:
   - F32: plain float.
   - F16: `half` buffers read and written only with vload_half / vstore_half_rte, which are core
     OpenCL C 1.2 and need no cl_khr_fp16 (PoCL's CPU device does not have it). Rounding to
     nearest even on store, like NumPy's float32 -> float16 cast.
   - BF16: ushort bits. Widening is exact (bits << 16); narrowing rounds to nearest even and
     keeps NaN a (quiet) NaN, like ml_dtypes' float32 -> bfloat16 cast.
*/
#define TYPE_F32 float
#define TYPE_F16 half
#define TYPE_BF16 ushort

#define LOAD_F32(p, i) ((float)(p)[i])
#define LOAD_F16(p, i) vload_half((i), (p))
#define LOAD_BF16(p, i) bf16_to_float((p)[i])
#define STORE_F32(p, i, v) ((p)[i] = (v))
#define STORE_F16(p, i, v) vstore_half_rte((v), (i), (p))
#define STORE_BF16(p, i, v) ((p)[i] = float_to_bf16(v))

/* Two-level expansion so that a kind given as a macro (-DX_KIND=F16) is substituted first. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define TYPE(kind) CAT(TYPE_, kind)
#define LOAD(kind, p, i) CAT(LOAD_, kind)(p, i)
#define STORE(kind, p, i, v) CAT(STORE_, kind)(p, i, v)

inline float bf16_to_float(ushort b) { return as_float(((uint)b) << 16); }

inline ushort float_to_bf16(float f) {
    uint u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x0040u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* nearest even; inf stays inf */
    return (ushort)(u >> 16);
}

/* Index arithmetic in the kernels writes a remainder as i - (i / n) * n, never i % n next to i / n:
   LLVM turns such a div/rem pair into a `freeze` instruction that Oclgrind 21.10's
   --uninitialized checker cannot interpret (it aborts the kernel with "Unsupported instruction"). */

/* The epilogue activations: `act` is a code of hal.codes.ACTIVATIONS, which the build options
   define as HAL_ACT_* (hal.codes.define_options(), given to every build); 0 (none) passes x. */
inline float silu(float x) { return x / (1.0f + exp(-x)); }

inline float activate(float x, int act) {
    switch (act) {
    case HAL_ACT_RELU: return x != x ? x : fmax(x, 0.0f); /* relu(NaN) is NaN: fmax alone returns 0 */
    case HAL_ACT_GELU: return 0.5f * x * (1.0f + erf(x * 0.70710678118654752f));
    case HAL_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case HAL_ACT_SILU: return silu(x);
    default: return x;
    }
}
