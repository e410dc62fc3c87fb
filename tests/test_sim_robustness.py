"""The emulator and the GPU glue under hostile conditions (issue 14): bad HAL_SIM_* settings, a damaged
build cache, empty grids, NaN in the kernels' comparisons (docs/conformance.md's NaN rules)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hal
from hal.backends.gpu.glue import KernelEntry, Template
from hal.backends.gpu.vendor import CUDA
from hal.backends.sim import executor

SIMS = ["cuda-sim", "rocm-sim"]


@pytest.fixture
def fresh_settings(monkeypatch):
    """HAL_SIM_* read again by the next build, and again after the test (with the environment restored)."""
    executor._settings.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    executor._settings.cache_clear()


@pytest.mark.parametrize("name, value", [
    ("HAL_SIM_STACK_KB", "-1"), ("HAL_SIM_STACK_KB", "99999999"), ("HAL_SIM_STACK_KB", "8"), ("HAL_SIM_WORKERS", "0"),
    ("HAL_SIM_WORKERS", "four"), ("HAL_SIM_TIMEOUT", "nan"), ("HAL_SIM_TIMEOUT", "-5"), ("HAL_SIM_CXXFLAGS", "-O2 '-g"),
])
def test_a_bad_setting_is_a_schema_error_naming_it(fresh_settings, name, value):
    fresh_settings.setenv(name, value)
    with pytest.raises(hal.SchemaError, match=rf"'{name}': expected .*, got {value!r}") as info:
        executor._settings()
    assert info.value.arg == name


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unusable_cache_directory_is_a_schema_error(fresh_settings, tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fresh_settings.setenv("HAL_SIM_CACHE", str(blocker if where == "a file" else blocker / "cache"))
    with pytest.raises(hal.SchemaError, match="HAL_SIM_CACHE.*writable directory.*[Nn]ot a directory"):
        executor._settings()


def test_a_negative_stack_size_no_longer_crashes_the_interpreter():
    """HAL_SIM_STACK_KB=-1 used to reach the runtime (a segfault): now the first build refuses it."""
    code = ("import numpy as np, hal\n"
            "try:\n    hal.ops.softmax(np.ones((2, 3), np.float32), backend='cuda-sim')\n"
            "except hal.SchemaError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HAL_SIM_STACK_KB": "-1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "refused:" in r.stdout and "HAL_SIM_STACK_KB" in r.stdout, r.stdout + r.stderr


# ---- the build cache heals itself -------------------------------------------------------------------
# In a subprocess per build: a process that has loaded a library keeps using its mapping.

TINY = """#include <cuda_runtime.h>
template <typename T>
__global__ void scale_by(const T* x, T* y, T s, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = s * x[i];
}
"""

BUILD_TWICE = """
import json, sys, warnings
import numpy as np
from hal.backends.sim.executor import SimModule
report = {"hits": [], "right": [], "warnings": []}
for _ in range(2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = SimModule(sys.argv[1], "cuda", ["scale_by<float>"])
    x = np.random.default_rng().standard_normal(37).astype(np.float32)
    y = np.full_like(x, np.nan)
    module.launch("scale_by<float>", (2,), (32,), 0, (x, y, np.float32(-1.5), np.int32(37)))
    report["hits"].append(module.cache_hit)
    report["right"].append(bool((y == -1.5 * x).all()))
    report["warnings"] += [str(w.message) for w in caught]
report["artifact"] = str(module.artifact)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """build() -> what BUILD_TWICE reports, for a one-kernel file in a private cache; the cache."""
    root = tmp_path_factory.mktemp("sim-cache")
    (root / "tiny.cu").write_text(TINY)
    env = {**os.environ, "HAL_SIM_CACHE": str(root / "cache")}

    def build():
        r = subprocess.run([sys.executable, "-c", BUILD_TWICE, str(root / "tiny.cu")], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    first = build()
    assert first["hits"] == [False, True] and first["right"] == [True, True] and not first["warnings"]
    return build, root / "cache", first["artifact"]


def _corrupt(path):  # the same length, with ud2 (a SIGILL if ever run) in the middle
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\x0f\x0b" * 2048
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])


def _unloadable(path):  # not a library, with a hash that matches it: only loading finds out
    path.write_bytes(b"\x7fELF garbage")
    executor._hash_path(path).write_text(executor._file_sha(path))


@pytest.mark.parametrize("damage", ["corrupted", "unloadable", "truncated runtime"])
def test_a_damaged_artifact_is_discarded_and_rebuilt_with_one_warning(tiny, damage):
    build, cache, artifact = tiny
    artifact = Path(artifact)
    if damage == "truncated runtime":  # the runtime object is rebuilt when the library is
        _truncate(next((cache / "runtime").glob("*.o")))
        _truncate(artifact)
    else:
        (_corrupt if damage == "corrupted" else _unloadable)(artifact)
    report = build()
    assert report["hits"] == [False, True] and report["right"] == [True, True]
    assert len(report["warnings"]) == (2 if damage == "truncated runtime" else 1)
    assert all(w.startswith("hal sim cache: discarded") for w in report["warnings"])
    assert executor._hash_path(artifact).read_text() == executor._file_sha(artifact)


# ---- empty grids --------------------------------------------------------------------------------------


def test_an_empty_grid_launches_nothing():
    class Executor:
        vendor = CUDA
        launched = []

        def launch(self, *args):
            self.launched.append(args)

    ex = Executor()
    entry = KernelEntry("softmax", "softmax", None, (Template("softmax", ("float32",)),))
    entry.launch(ex, ["float"], (0, 4), ())
    assert ex.launched == []
    entry.launch(ex, ["float"], (3,), ())
    assert [a[2] for a in ex.launched] == [(3, 1, 1)]


@pytest.mark.parametrize("backend", SIMS)
def test_decode_with_zero_heads_is_an_empty_result(backend):
    rng = np.random.default_rng()
    tables, lens = np.array([[0, 1], [2, 3]], np.int32), np.array([5, 20], np.int32)
    cache = rng.standard_normal((4, 16, 1, 16)).astype(np.float32)
    out = hal.ops.paged_decode_attention(rng.standard_normal((2, 0, 16)).astype(np.float32), cache, cache, tables, lens, backend=backend)
    assert out.shape == (2, 0, 16)
    latent, rope = rng.standard_normal((4, 16, 32)).astype(np.float32), rng.standard_normal((4, 16, 8)).astype(np.float32)
    out = hal.ops.mla_decode(rng.standard_normal((2, 0, 32)).astype(np.float32), rng.standard_normal((2, 0, 8)).astype(np.float32),
                             latent, rope, tables, lens, scale=0.2, backend=backend)
    assert out.shape == (2, 0, 32)


# ---- NaN in the kernels' comparisons --------------------------------------------------------------------


@pytest.mark.parametrize("backend", SIMS)
def test_relu_epilogue_keeps_nan(backend):
    rng = np.random.default_rng()
    a, b = rng.standard_normal((5, 24)).astype(np.float32), rng.standard_normal((24, 7)).astype(np.float32)
    a[2, rng.integers(24)] = np.nan
    out = hal.ops.gemm(a, b, activation="relu", backend=backend)
    assert np.isnan(out[2]).all()
    rest = [0, 1, 3, 4]
    np.testing.assert_allclose(out[rest], np.maximum(a[rest].astype(np.float64) @ b, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", SIMS)
def test_moe_route_ranks_nan_first_like_torch_topk(backend):
    rng = np.random.default_rng()
    logits = rng.standard_normal((3, 16)).astype(np.float32)
    first, second = sorted(rng.choice(16, 2, replace=False))
    logits[0, [second, first]] = np.nan  # two NaN: both rank first, the lower index before the higher
    logits[1, second] = np.nan
    _, ids = hal.ops.moe_route(logits, 3, scoring="sigmoid", backend=backend)
    finite = np.where(np.isnan(logits[0]), -np.inf, logits[0])
    assert ids[0].tolist() == [first, second, int(np.argmax(finite))]
    assert ids[1, 0] == second and ids[2].tolist() == np.argsort(-logits[2], kind="stable")[:3].tolist()
    weights, ids = hal.ops.moe_route(logits, 3, scoring="softmax", backend=backend)
    assert ids[0].tolist() == ids[1].tolist() == [0, 1, 2]  # a NaN logit makes every softmax score NaN
    assert np.isnan(weights[:2]).all() and np.isfinite(weights[2]).all()


@pytest.mark.parametrize("backend", SIMS)
def test_embedding_bag_max_propagates_nan(backend):
    rng = np.random.default_rng()
    table = rng.standard_normal((9, 6)).astype(np.float32)
    table[4, 2] = np.nan
    indices, offsets = np.array([1, 4, 7, 0, 8], np.int64), np.array([0, 3, 5], np.int64)
    out = hal.ops.embedding_bag(table, indices, offsets, mode="max", backend=backend)
    want = np.stack([table[[1, 4, 7]].max(0), table[[0, 8]].max(0)])  # NumPy's max propagates NaN
    np.testing.assert_array_equal(out, want)
    assert np.isnan(out[0, 2])
