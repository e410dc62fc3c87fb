"""The CPU GEMM driver (backends/cpu/gemm_core.py) on every microkernel rung this CPU has, forced one at
a time: odd shapes (tails of every tile and block size, K = 1), transposed and strided b, the fused
epilogue, gated grouped GEMMs, and inf / NaN propagation, judged against the float64 reference with
the conformance suite's bounds. Rungs the CPU lacks are skipped with the reason."""
import numpy as np
import pytest

from hal import ops
from hal.backends.cpu import gemm_core, kernels
from hal.conformance import judge
from hal.opdef import random, strided

RUNGS = ("amx", "avx512bf16", "fma")


@pytest.fixture(params=RUNGS)
def rung(request, monkeypatch):
    if request.param not in gemm_core.RUNGS:
        pytest.skip(f"this CPU (or the OS) offers only the rungs {', '.join(gemm_core.RUNGS)}")
    monkeypatch.setattr(gemm_core, "RUNG", request.param)
    return request.param


def _check(op, args):
    out = op(**args, backend="cpu")
    worst, _, message = judge(op, args, out if isinstance(out, tuple) else (out,))
    assert worst <= 1.0, message
    return out


# (M, K, N): every tail of the 32 x 32 block, the 32-k step, the 128 x 256 x 512 cache blocks; K = 1.
SHAPES = [(17, 1, 33), (33, 31, 17), (129, 513, 257), (300, 40, 520)]


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_epilogue_on_odd_shapes(rung, m, k, n, rng):
    dtype = "bfloat16"  # the rungs differ for bfloat16 only (float16 always widens: the conformance suite)
    args = {"a": random(rng, (m, k), dtype), "b": random(rng, (k, n), dtype), "bias": random(rng, (n,), dtype),
            "c": random(rng, (m, n), dtype), "activation": "silu", "alpha": 0.75, "beta": -0.5}
    _check(ops.gemm, args)


def test_gemm_b_packed_per_task(rung, monkeypatch, rng):
    """Big B is packed by each task of up to _FUSED_MC rows (here forced on a small B, several row blocks)."""
    monkeypatch.setattr(gemm_core, "_FUSED_B_BYTES", 0)
    monkeypatch.setattr(gemm_core, "_FUSED_MC", 64)
    m, k, n = 200, 100, 300
    _check(ops.gemm, {"a": random(rng, (m, k), "bfloat16"), "b": random(rng, (k, n), "bfloat16"),
                      "bias": random(rng, (n,), "bfloat16"), "activation": "gelu_tanh"})


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_gemm_b_layouts(rung, layout, rng):
    m, k, n = 70, 96, 45
    b = random(rng, (n, k), "bfloat16").T if layout == "transposed" else strided(random(rng, (k, n), "bfloat16"))
    _check(ops.gemm, {"a": random(rng, (m, k), "bfloat16"), "b": b, "activation": "gelu", "out_dtype": "float32"})


@pytest.fixture
def strip_spy(monkeypatch):
    """The calls of gemm_core.strip_gemm (the register-tiled driver), to check that a test reaches it on avx512bf16."""
    calls = []
    run = gemm_core.strip_gemm
    monkeypatch.setattr(gemm_core, "strip_gemm", lambda *args: calls.append(args) or run(*args))
    return calls


# bfloat16 on vdpbf16ps, float32 on FMAs: both take the driver on avx512bf16 only.
STRIP_DTYPES = {"bfloat16": np.int16, "float32": np.float32}  # a's raw dtype, the key of gemm_core._DP_BLOCKS


@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("dtype", STRIP_DTYPES)
def test_gemm_strip_blocks(rung, strip_spy, monkeypatch, dtype, layout, activation, rng):
    """The register-tiled driver with its blocks shrunk: M 101 in row blocks of up to 40 (3 of 33-34 rows: groups
    of 5 and 6 rows), N 203 in column blocks of 128 (a strip of 11 columns last), K 151 in chunks of 64 (the
    sums kept in the block between chunks; the last chunk odd, W.T packed by blocks of 16 steps of k), a
    strided; every activation, alpha, beta with c, a float32 out."""
    monkeypatch.setitem(gemm_core._DP_BLOCKS, np.dtype(STRIP_DTYPES[dtype]), (40, 128, 64))
    m, k, n = 101, 151, 203
    b = random(rng, (n, k), dtype).T if layout == "transposed" else random(rng, (k, n), dtype)
    _check(ops.gemm, {"a": strided(random(rng, (m, k), dtype)), "b": b, "bias": random(rng, (n,), dtype),
                      "c": random(rng, (m, n), dtype), "activation": activation, "alpha": 0.75, "beta": -0.5,
                      "out_dtype": "float32" if activation is None else None})
    assert bool(strip_spy) == (rung == "avx512bf16")


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("dtype", STRIP_DTYPES)
def test_gemm_inf_nan_propagate(rung, strip_spy, dtype, layout, rng):
    m, k, n = 40, 70, 50
    a = random(rng, (m, k), dtype)
    b = random(rng, (n, k), dtype).T if layout == "transposed" else random(rng, (k, n), dtype)
    a[3, 5], a[20, 69] = np.nan, np.inf
    b[0, 7] = -np.inf
    out = _check(ops.gemm, {"a": a, "b": b, "bias": random(rng, (n,), dtype), "activation": "relu"})
    assert np.isnan(out[3].astype(np.float32)).all()  # a NaN reaches its whole row, and no further
    assert not np.isnan(out[[0, 1, 39]].astype(np.float32)).any()
    assert bool(strip_spy) == (rung == "avx512bf16")


@pytest.fixture
def small_m_up_to_32(monkeypatch):
    """Every M here takes the small-M paths: row-major b vdpbf16ps on the amx / avx512bf16 rungs; transposed
    b the float32 FMA kernel, or on amx (K and N multiples of 32, M > 1) AMX with W = b.T in place."""
    monkeypatch.setattr(kernels, "_SMALL_M_DOT", 32)
    monkeypatch.setitem(kernels._SMALL_M, kernels.BF16, 32)


# K: chunks of b's rows and an odd last row; N: strips of 64 columns and a masked tail of 11.
SMALL_K, SMALL_N = 301, 203


# (K, N): odd; multiples of 32 (transposed b: W in place on AMX).
@pytest.mark.parametrize("k,n", [(SMALL_K, SMALL_N), (96, 160)])
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 32])
def test_gemm_small_m(rung, small_m_up_to_32, layout, m, k, n, rng):
    a = strided(random(rng, (m, k), "bfloat16"))
    b = random(rng, (n, k), "bfloat16").T if layout == "transposed" else random(rng, (k, n), "bfloat16")
    _check(ops.gemm, {"a": a, "b": b, "bias": random(rng, (n,), "bfloat16"), "c": random(rng, (m, n), "bfloat16"),
                      "activation": "silu", "alpha": 0.75, "beta": -0.5})


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")
@pytest.mark.parametrize("k,n", [(SMALL_K, SMALL_N), (96, 160)])
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("m", [3, 17])
def test_gemm_small_m_inf_nan(rung, small_m_up_to_32, layout, m, k, n, rng):
    a = random(rng, (m, k), "bfloat16")
    b = random(rng, (n, k), "bfloat16").T if layout == "transposed" else random(rng, (k, n), "bfloat16")
    a[1, k - 1], a[m - 1, 7] = np.nan, np.inf  # the last row of K (odd or not), and a full pair
    out = _check(ops.gemm, {"a": a, "b": b, "activation": "relu", "out_dtype": "float32"})
    assert np.isnan(out[1]).all()
    assert not np.isnan(out[0]).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")
@pytest.mark.parametrize("layout", ["row-major", "transposed"])
@pytest.mark.parametrize("m", [1, 2, 17, 32, 33])
def test_gemm_float32_few_rows(rung, strip_spy, layout, m, rng):
    """float32 from 2 rows on the register-tiled driver (up to 32 rows with row-major b by decode's blocks: K in
    chunks of 16 rows, an odd last one), one row on OpenBLAS's gemv; a strided, NaN and inf in a."""
    k, n = SMALL_K, SMALL_N
    a = strided(random(rng, (m, k), "float32"))
    b = random(rng, (n, k), "float32").T if layout == "transposed" else random(rng, (k, n), "float32")
    a[0, k - 1], a[m - 1, 7] = np.nan, np.inf
    out = _check(ops.gemm, {"a": a, "b": b, "bias": random(rng, (n,), "float32"), "c": random(rng, (m, n), "float32"),
                            "activation": "silu", "alpha": 0.75, "beta": -0.5})
    assert np.isnan(out[0]).all()
    assert bool(strip_spy) == (m > kernels._SMALL_M_FMA32 and rung == "avx512bf16")


@pytest.mark.parametrize("activation", [None, "gelu", "silu_and_mul"])
def test_grouped_gemm(rung, activation, rng):
    counts, k, n = [3, 0, 40, 70], 40, 48  # an empty expert; segments off every tile boundary
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int32)
    nw = 2 * n if activation == "silu_and_mul" else n
    x = random(rng, (offsets[-1], k), "bfloat16")
    x[5, 2] = np.nan
    _check(ops.grouped_gemm, {"x_sorted": x, "w": random(rng, (len(counts), nw, k), "bfloat16"),
                              "expert_offsets": offsets, "activation": activation})


def test_grouped_gemm_masked(rung, rng):
    e, m, k, n = 3, 37, 64, 32
    _check(ops.grouped_gemm_masked, {"x": random(rng, (e, m, k), "bfloat16"), "w": random(rng, (e, 2 * n, k), "bfloat16"),
                                     "masked_m": np.array([37, 0, 20], np.int32), "activation": "silu_and_mul"})


def test_forced_rung(monkeypatch):
    monkeypatch.setenv("HAL_CPU_GEMM", "fma")
    assert gemm_core._chosen() == "fma"
    monkeypatch.setenv("HAL_CPU_GEMM", "tpu")
    with pytest.warns(RuntimeWarning, match="HAL_CPU_GEMM"):
        assert gemm_core._chosen() == gemm_core.RUNGS[0]
