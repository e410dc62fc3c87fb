"""The CPU backend on the edges of issue 14: every attention scale, zero-size dims, the NaN / Inf rules
(docs/conformance.md), forked and spawned worker processes, and a damaged Numba cache."""
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import hal
import hal.ops as o
from hal import HalError, conformance
from hal.backends.cpu import CpuBackend
from hal.backends.cpu import attention as cpu_attention
from hal.backends.cpu import common
from hal.ops.attention import _mla_args, _paged_args


def f64(a):
    return {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for k, v in a.items()}


def assert_close(got, want, tol=1e-4):
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any() and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=tol)


# ---------------------------------------------------------------- attention scales (item 3)

SCALES = [0.0, -1.0, -0.2, 1e30, None]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("causal, window, softcap", [(False, None, None), (True, None, None), (True, 9, None), (False, 9, 5.0)])
def test_attention_any_scale(rng, scale, causal, window, softcap):
    q = rng.standard_normal((2, 24, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 70, 2, 16)).astype(np.float32) for _ in range(2))
    a = dict(q=q, k=k, v=v, causal=causal, scale=scale, window=window, softcap=softcap, cu_seqlens_q=None, cu_seqlens_k=None)
    got = o.attention(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, backend="cpu")
    assert_close(got, o.attention.reference(f64(a))[0])


@pytest.mark.parametrize("scale", SCALES[:4])
def test_decode_any_scale(rng, scale):
    a = _paged_args(rng, "float32", [200, 3], 4, 2, 32, 16, scale=scale, softcap=None)
    got = o.paged_decode_attention(*(a[n] for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")), scale=scale, backend="cpu")
    assert_close(got, o.paged_decode_attention.reference(f64(a))[0])
    a = _mla_args(rng, "float32", [1100, 7], 8, 16, latent=32, rope=8) | {"scale": scale}
    got = o.mla_decode(*(a[n] for n in ("q_nope", "q_pe", "kv_latent", "k_pe", "block_table", "seq_lens")), scale=scale, backend="cpu")
    assert_close(got, o.mla_decode.reference(f64(a))[0])


# ---------------------------------------------------------------- zero-size dims (item 7), on the kernels themselves

def test_attention_kernels_take_zero_size_dims(rng):
    """The kernels return without touching anything when the output is empty, and handle head dim 0."""
    x = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    out = np.empty((1, 5, 0, 8), np.float32)
    cpu_attention.attention([out], x(1, 5, 0, 8), x(1, 6, 0, 8), x(1, 6, 0, 8), False, None, None, None, None, None)
    out = np.empty((0, 4, 8), np.float32)
    cpu_attention.paged_decode_attention([out], x(0, 4, 8), x(3, 4, 2, 8), x(3, 4, 2, 8), np.zeros((0, 2), np.int32),
                                         np.zeros(0, np.int32), None, None, None, None)
    out = np.empty((2, 0, 8), np.float32)
    cpu_attention.mla_decode([out], x(2, 0, 8), x(2, 0, 4), x(3, 4, 8), x(3, 4, 4), np.zeros((2, 1), np.int32),
                             np.ones(2, np.int32), 1.0)
    # head dim 0: every score is 0, so each query averages the values it sees
    v = x(1, 6, 2, 8)
    out = np.full((1, 5, 2, 8), np.nan, np.float32)
    cpu_attention.attention([out], x(1, 5, 2, 0), x(1, 6, 2, 0), v, False, None, None, None, None, None)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=1, keepdims=True), out.shape), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the NaN / Inf rules (item 8)

def topk_order(s, k):
    """torch.topk's order: NaN above every number, ties to the lower index."""
    return sorted(range(len(s)), key=lambda j: (not math.isnan(s[j]), -s[j] if not math.isnan(s[j]) else 0.0, j))[:k]


def test_moe_route_nan(rng):
    logits = rng.standard_normal((3, 16)).astype(np.float32)
    logits[0, 11] = logits[1, 4] = logits[1, 9] = np.nan
    weights, ids = o.moe_route(logits, 4, scoring="sigmoid", renormalize=False, backend="cpu")
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert ids.tolist() == [topk_order(s, 4) for s in scores]
    np.testing.assert_allclose(weights, np.take_along_axis(scores, ids.astype(np.int64), 1), rtol=1e-5)
    weights, ids = o.moe_route(logits, 3, scoring="softmax", backend="cpu")  # a NaN logit: every score NaN
    assert ids[:2].tolist() == [[0, 1, 2]] * 2 and np.isnan(weights[:2]).all() and not np.isnan(weights[2]).any()
    weights, ids = o.moe_route(logits, 4, scoring="sigmoid", n_group=4, topk_group=2, backend="cpu")
    for t, s in enumerate(scores):
        groups = [sorted(s[g * 4:(g + 1) * 4], key=lambda v: (not math.isnan(v), -v))[:2] for g in range(4)]
        kept = topk_order([a + b for a, b in groups], 2)
        allowed = np.where(np.repeat(np.isin(np.arange(4), kept), 4), s, -np.inf)
        assert ids[t].tolist() == topk_order(allowed, 4)


def test_embedding_bag_max_propagates_nan(rng):
    table = rng.standard_normal((10, 5)).astype(np.float32)
    table[3, 1] = table[6, 4] = np.nan
    indices = np.array([3, 1, 5, 2, 6, 0, 8], np.int32)  # NaN first in bag 0, last in bag 1
    offsets = np.array([0, 3, 5, 7], np.int32)
    got = o.embedding_bag(table, indices, offsets, mode="max", backend="cpu")
    want = np.stack([table[indices[a:b]].max(axis=0) for a, b in zip(offsets, offsets[1:])])
    np.testing.assert_array_equal(got, want)  # NaN where a bag holds one, like np.max / torch.amax


def test_activations_propagate_nan(rng):
    a = rng.standard_normal((4, 8)).astype(np.float32)
    a[1, 3] = np.nan
    b = rng.standard_normal((8, 6)).astype(np.float32)
    for act in ("relu", "gelu", "gelu_tanh", "silu"):
        y = o.gemm(a, b, activation=act, backend="cpu")
        assert np.isnan(y[1]).all() and not np.isnan(y[[0, 2, 3]]).any(), act
    w = rng.standard_normal((2, 12, 8)).astype(np.float32)
    for act in ("relu", "silu_and_mul", "gelu_and_mul"):
        y = o.grouped_gemm(a, w, np.array([0, 2, 4], np.int32), activation=act, backend="cpu")
        assert np.isnan(y[1]).all() and not np.isnan(y[[0, 2, 3]]).any(), act


def test_fp8_inf_scale_multiplies_block_sums(rng):
    """An inf scale times each 128-K block's partial sum: +-inf, NaN where that sum is 0 or infinities of both signs meet."""
    fp8 = ml_dtypes.float8_e4m3fn
    m, k, n = 5, 300, 7
    a, b = rng.standard_normal((m, k)).astype(fp8), rng.standard_normal((n, k)).astype(fp8)
    a[1, 128:256] = 0  # row 1's partial sums in the inf block are 0
    a_scales = rng.uniform(0.5, 2, (m, 3)).astype(np.float32)
    b_scales = rng.uniform(0.5, 2, (1, 3)).astype(np.float32)
    a_scales[:, 1] = np.inf
    a_scales[3, 2] = -np.inf  # row 3: inf and -inf blocks meet unless the signs agree
    af, bf = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        want = sum((af[:, s] @ bf[:, s].T) * (a_scales[:, i:i + 1] * b_scales[0, i].astype(np.float64))
                   for i, s in enumerate((slice(0, 128), slice(128, 256), slice(256, k))))
    assert np.isnan(want[1]).all() and np.isinf(want[0]).all()
    got = o.fp8_gemm_blockscale(a, a_scales, b, b_scales, out_dtype="float32", backend="cpu")
    np.testing.assert_array_equal(got, want.astype(np.float32))
    got = o.fp8_grouped_gemm_blockscale(a, a_scales, b[None], b_scales[None], np.array([0, m], np.int32), out_dtype="float32",
                                        backend="cpu")
    np.testing.assert_array_equal(got, want.astype(np.float32))


# ---------------------------------------------------------------- worker processes (item 10)

def _softmax_error(_):
    x = np.random.default_rng().standard_normal((3, 7)).astype(np.float32)
    return float(np.abs(o.softmax(x, dim=1, backend="cpu").sum(axis=1) - 1).max())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_cpu_ops_in_worker_processes(method):
    assert _softmax_error(None) < 1e-5  # the parent has run a parallel kernel before the workers start
    layer = CpuBackend().info()["threading_layer"]
    tbb_is_a_dependency = sys.platform == "linux" and platform.machine() == "x86_64"
    assert layer == "tbb (fork-safe)" or not tbb_is_a_dependency, layer
    with multiprocessing.get_context(method).Pool(1) as pool:
        if method == "fork" and "fork-safe" not in layer:  # GNU OpenMP elsewhere: see the next test
            with pytest.raises(HalError, match="spawn"):
                pool.map(_softmax_error, [0])
        else:
            assert pool.map(_softmax_error, [0])[0] < 1e-5


def test_fork_child_on_gnu_openmp_gets_hal_error():
    """Without TBB (forced here), Numba runs on GNU OpenMP, which would kill the child: it gets a HalError instead."""
    code = textwrap.dedent("""
        import multiprocessing, numpy as np, hal, hal.ops as o
        from hal.backends.cpu import CpuBackend
        x = np.ones((2, 3), np.float32)
        o.softmax(x, dim=1, backend="cpu")
        print(CpuBackend().info()["threading_layer"])
        def child(q):
            try:
                o.softmax(x, dim=1, backend="cpu")
                q.put("ran")
            except hal.HalError as e:
                q.put(str(e))
        if __name__ == "__main__":
            q = multiprocessing.get_context("fork").Queue()
            p = multiprocessing.get_context("fork").Process(target=child, args=(q,))
            p.start(); p.join(60)
            print(p.exitcode, q.get(timeout=5))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"NUMBA_THREADING_LAYER": "omp"})
    assert run.returncode == 0, run.stderr
    layer, result = run.stdout.splitlines()
    assert layer.startswith("omp (GNU OpenMP") and result.startswith("0 ") and "'spawn'" in result


@pytest.mark.skipif(common.VECTOR_ISA == "avx2", reason="this host is an AVX2 target: every cpu test here compiles for one")
def test_an_avx2_target_compiles_and_passes_conformance(tmp_path):
    """Compiled for an AVX2 CPU (Numba's target forced to haswell, in a fresh cache), the kernels whose IR
    runs on every target (attention's 16-lane softmax and exp, two AVX2 vectors there) compile, without the
    AVX-512 instructions LLVM cannot lower (it aborts the process on one), and pass the conformance suite."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path), "NUMBA_CPU_NAME": "haswell",
                        "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+f16c,+sse4.2,+popcnt,+bmi,+bmi2"}
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-m", "hal.cli", "check", "cpu", "--op", "attention", "--op", "paged_decode_attention"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


# ---------------------------------------------------------------- a damaged Numba cache heals (item 11)

def test_truncated_numba_cache_heals(tmp_path):
    """In a fresh cache: compile moe_align's kernel, truncate its data file, then its index, each time
    reloading through a new dispatcher: the call works, the file is rewritten, one warning in all."""
    code = textwrap.dedent("""
        import warnings, numba, numpy as np, hal.ops as o
        from hal.backends.cpu import CACHE_DIR, moe
        ids = np.random.default_rng().integers(0, 3, (5, 2)).astype(np.int32)
        want = o.moe_align(ids, num_experts=3, block_m=2, backend="cpu")  # compiles and caches _align_kernel
        files = sorted(CACHE_DIR.rglob("*_align_kernel*.nb[ic]"))
        assert [f.suffix for f in files] == [".nbc", ".nbi"], files
        warnings.simplefilter("always")
        for f in files:
            f.write_bytes(f.read_bytes()[:100])
            moe._align_kernel = numba.njit(cache=True)(moe._align_kernel.py_func)  # loads the cache files again
            got = o.moe_align(ids, num_experts=3, block_m=2, backend="cpu")
            assert all(np.array_equal(g, w) for g, w in zip(got, want))
            assert len(f.read_bytes()) > 100, f  # rewritten by the recompile
        print("ok")
    """)
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr
    assert done.stderr.count("unreadable Numba cache file") == 1 and "_align_kernel" in done.stderr  # warned once
    # A compile says so, naming the kernel, once per compile (3: the first and after each truncation); a cache hit is silent.
    assert done.stderr.count("hal: compiling cpu kernel _align_kernel") == 3, done.stderr
    again = subprocess.run([sys.executable, "-c", "import numpy as np, hal.ops as o; o.moe_align(np.zeros((5, 2), np.int32), 3, 2, backend='cpu')"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "hal: compiling" not in again.stderr, again.stderr


def test_a_change_to_any_cpu_source_recompiles_every_kernel(tmp_path):
    """Cached kernels carry a digest of all of the cpu backend's sources (common.py's IR helpers are compiled
    into other modules' kernels): the same sources load from the cache, other ones compile again."""
    code = textwrap.dedent("""
        import sys, numpy as np, hal.ops as o
        import hal.backends.cpu as cpu
        if sys.argv[1] == "edited":
            cpu._sources_digest = lambda: "another digest"
        print(o.softmax(np.ones((3, 5), np.float32), dim=1, backend="cpu")[0, 0])
    """)
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    compiles = []
    for sources in ("as shipped", "as shipped", "edited"):
        done = subprocess.run([sys.executable, "-c", code, sources], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0 and done.stdout.split() == ["0.2"], done.stderr
        compiles.append("hal: compiling cpu kernel _softmax_rows_kernel" in done.stderr)
    assert compiles == [True, False, True]


def test_cache_saves_take_turns_and_write_the_data_before_the_index():
    """Processes compiling one kernel at once (ranks, pytest-xdist workers) save under an exclusive lock on the
    cache directory's .lock file, each data file before the index entry that names it."""
    import fcntl
    import shutil

    from numba.core.caching import IndexDataCacheFile

    hal.registry()  # the cpu backend registered: Numba's cache patched
    where = Path(os.environ["NUMBA_CACHE_DIR"]) / f"lock-test-{os.getpid()}"
    where.mkdir(parents=True)
    try:
        cache = IndexDataCacheFile(str(where), "probe", ("a stamp",))
        steps = []

        def save_data(name, data, save=cache._save_data):
            with open(where / ".lock", "a") as other:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the save
            steps.append(("data", name, (where / name).exists()))
            save(name, data)

        def save_index(overloads, save=cache._save_index):
            steps.append(("index", dict(overloads), all((where / n).exists() for n in overloads.values())))
            save(overloads)

        cache._save_data, cache._save_index = save_data, save_index
        cache.save("signature a", "code a")
        cache.save("signature b", "code b")
        cache.save("signature a", "code a again")
        a, b = "probe.1.nbc", "probe.2.nbc"
        assert steps == [("data", a, False), ("index", {"signature a": a}, True),
                         ("data", b, False), ("index", {"signature a": a, "signature b": b}, True),
                         ("data", a, True), ("index", {"signature a": a, "signature b": b}, True)]
        assert [IndexDataCacheFile(str(where), "probe", ("a stamp",)).load(k) for k in ("signature a", "signature b")] == ["code a again", "code b"]
    finally:
        shutil.rmtree(where)


def _compiled_signatures():
    import numba

    import hal.backends.cpu as cpu

    modules = [m for name, m in sys.modules.items() if name.startswith(cpu.__name__ + ".")]
    return sum(len(d.signatures) for m in modules for d in vars(m).values() if isinstance(d, numba.core.registry.CPUDispatcher))


def test_read_only_and_strided_inputs_reuse_the_compiled_kernels():
    """Numba compiles a kernel once per argument type, read-only flag and layout included: read-only inputs
    (np.load's memory maps) reach the kernels as writable aliases of their memory, gemm's strided bias and c as
    contiguous copies, so neither compiles anything more, and the results are the same bits."""
    rng = np.random.default_rng()
    x, w = rng.standard_normal((5, 67), np.float32), rng.standard_normal(67, np.float32)
    a, b = rng.standard_normal((40, 33), np.float32), rng.standard_normal((33, 19), np.float32)
    bias, c = rng.standard_normal(38, np.float32)[::2], rng.standard_normal((19, 40), np.float32).T

    def run(x, w, a, b, bias, c):
        return [o.rms_norm(x, w, eps=1e-5, backend="cpu"),
                o.gemm(a, b, bias=bias, c=c, beta=0.5, activation="silu", backend="cpu")]

    want = run(x, w, a, b, np.ascontiguousarray(bias), np.ascontiguousarray(c))
    compiled = _compiled_signatures()
    for t in (x, w, a, b, bias, c):
        t.flags.writeable = False
    got = run(x, w, a, b, bias, c)
    assert _compiled_signatures() == compiled
    assert all(np.array_equal(g, v) for g, v in zip(got, want))
    assert CpuBackend().to_native(x, True).ctypes.data == x.ctypes.data and not x.flags.writeable


# ---------------------------------------------------------------- serial and parallel builds of a kernel

def _bytes(result):
    return [np.ascontiguousarray(y).view(np.uint8).tobytes() for y in (result if isinstance(result, tuple) else (result,))]


@pytest.mark.parametrize("name", sorted(o.ALL))
def test_serial_and_parallel_builds_give_the_same_bits(name, monkeypatch):
    """A call under common.SERIAL_BYTES runs its kernel's serial build (common.sized), so the conformance suite's
    small samples no longer reach the parallel builds: every sample runs through both, bit for bit alike."""
    compared = 0
    for case in conformance.cases("cpu", ops=[name], seed=11):
        if case.kind == "error":
            continue
        serial = _bytes(case.op(**case.sample.args, backend="cpu"))
        monkeypatch.setattr(common, "SERIAL_BYTES", 0)  # every threshold that picks a serial build
        monkeypatch.setattr(cpu_attention, "_DECODE_SERIAL_BYTES", 0)
        parallel = _bytes(case.op(**case.sample.args, backend="cpu"))
        monkeypatch.undo()
        assert serial == parallel, f"{case.id}: the parallel build's results differ from the serial build's"
        compared += 1
    assert compared
