"""hal inside PyTorch: torch.ops.hal from the op definitions (opcheck on every conformance sample),
torch.compile, the inference-only rule, and backend choice through the torch operators."""
import os
import time

import numpy as np
import pytest
import torch

import hal
import hal.torch
from hal import conformance
from hal.conformance.pytest_plugin import parametrize_cases
from hal.torch import GradNotSupported

ops = torch.ops.hal


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        # every op on cpu; the emulated CUDA kernels behind the same operators for three op families
        # (the sims' kernels are slow to emulate: the full sweep is `hal check cuda-sim --torch`)
        parametrize_cases(metafunc, default_backends=["cpu"])
    if "sim_case" in metafunc.fixturenames:
        seed = metafunc.config.getoption("hal_seed") or 0
        params = [pytest.param(c, id=c.id) for c in conformance.cases("cuda-sim", ["rms_norm", "rope", "moe_align"], seed)]
        metafunc.parametrize("sim_case", params)


def test_opcheck_cpu(case):
    result = conformance.run_torch(case)
    assert result.ok, f"{case.id}: {result.message}"


def test_opcheck_cuda_sim(sim_case):
    result = conformance.run_torch(sim_case)
    assert result.ok, f"{sim_case.id}: {result.message}"


def test_every_op_is_a_torch_operator_with_its_results():
    for name, op in hal.ops.ALL.items():
        schema = str(getattr(ops, name).default._schema)
        assert schema.startswith(f"hal::{name}("), schema
        assert "str? backend=None" in schema
        if any(r.endswith("?") for r in op.results):
            assert schema.endswith("-> Tensor[]"), schema
        elif len(op.results) > 1:
            assert schema.endswith(", ".join(f"Tensor {r}" for r in op.results) + ")"), schema
    assert hal.torch.schema(hal.ops.rms_norm) == \
        "rms_norm(Tensor x, Tensor weight, Tensor? residual=None, *, float eps=1e-06, str? backend=None) -> Tensor[]"


def test_results_declare_the_output_counts(rng):
    """`results` (names, "?" for outputs only some calls have) matches what each sample returns."""
    for op in hal.ops.ALL.values():
        required = sum(not r.endswith("?") for r in op.results)
        for dtype in next(t for t in op.tensors if t.name == op.primary).dtypes:
            for sample in op.samples(rng, dtype):
                n = len(op.outputs(op.validate(op.bind((), sample.args))))
                assert required <= n <= len(op.results), (op.name, sample.label, n, op.results)


def test_values_and_errors_as_for_numpy_callers(rng):
    x, w, r = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((5, 33), (33,), (5, 33)))
    y, s = ops.rms_norm(x, w, r, eps=1e-5)
    y_np, s_np = hal.ops.rms_norm(x.numpy(), w.numpy(), eps=1e-5, residual=r.numpy())
    assert torch.equal(y, torch.from_numpy(y_np)) and torch.equal(s, torch.from_numpy(s_np))
    assert len(ops.rms_norm(x, w)) == 1
    with pytest.raises(hal.SchemaError, match="rms_norm: argument 'weight'"):
        ops.rms_norm(x, w[:7])
    with pytest.raises(hal.SchemaError, match="grouped_gemm: argument 'expert_offsets'"):  # index values checked, torch tensors too
        ops.grouped_gemm(torch.ones(8, 8), torch.ones(2, 6, 8), torch.tensor([0, 3, 10_000_000], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="hal::softmax.*argument 'dim'"):  # torch's own argument check
        ops.softmax(x, dim="last")


def test_backend_choice_fallback_and_strict_mode(rng, make_backend):
    x = torch.from_numpy(rng.standard_normal((4, 9)).astype(np.float32))
    expected = torch.softmax(x, -1)
    torch.testing.assert_close(ops.softmax(x, backend="cuda-sim"), expected)
    with hal.use("cuda-sim"):
        torch.testing.assert_close(ops.softmax(x), expected)
    make_backend("no-softmax", {"silu_and_mul": lambda outs, x: None})
    hal.fallbacks(clear=True)
    with pytest.warns(hal.FallbackWarning, match="softmax ran on cpu instead of no-softmax"):
        torch.testing.assert_close(ops.softmax(x, backend="no-softmax"), expected)
    assert [(e["op"], e["requested"]) for e in hal.fallbacks(clear=True)] == [("softmax", "no-softmax")]
    with pytest.raises(hal.KernelNotFound), hal.use(fallback="error"):
        ops.softmax(x, backend="no-softmax")


def test_a_vendor_backend_behind_the_torch_operators(rng, make_backend):
    calls = []

    def softmax(outs, x, dim):
        calls.append(x.shape)
        e = np.exp(x - x.max(axis=dim, keepdims=True))
        outs[0][...] = e / e.sum(axis=dim, keepdims=True)

    make_backend("vendor", {"softmax": softmax})
    x = torch.from_numpy(rng.standard_normal((3, 6)).astype(np.float32))
    torch.testing.assert_close(ops.softmax(x, backend="vendor"), torch.softmax(x, -1))
    assert calls == [(3, 6)]


def test_inference_only(rng):
    x = torch.from_numpy(rng.standard_normal((4, 16)).astype(np.float32))
    w = torch.ones(16, requires_grad=True)
    with pytest.raises(GradNotSupported, match="rms_norm: hal kernels are inference only"):
        ops.rms_norm(x, w)
    assert issubclass(GradNotSupported, hal.HalError)
    with torch.no_grad():
        assert ops.rms_norm(x, w)[0].shape == (4, 16)
    with torch.inference_mode():
        assert ops.rms_norm(x, w)[0].shape == (4, 16)
    assert ops.rms_norm(x, w.detach())[0].shape == (4, 16)
    with pytest.raises(GradNotSupported, match="rms_norm: hal kernels are inference only"):  # hal.ops directly: the same rule
        hal.ops.rms_norm(x, w)
    assert hal.GradNotSupported is GradNotSupported
    with torch.no_grad():
        torch.testing.assert_close(hal.ops.rms_norm(x, w), ops.rms_norm(x, w)[0])
    with pytest.raises(Exception, match="rms_norm: hal kernels are inference only"):  # dynamo wraps it, message kept
        torch.compile(lambda a, b: ops.rms_norm(a, b)[0], fullgraph=True)(x, w)


def _threads():
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_a_parallel_cpu_kernel_releases_torchs_openmp_workers(rng):
    """After a torch op its OpenMP workers spin on the cores hal's next parallel kernel needs: that kernel pauses
    them first (omp_pause_resource_all; libgomp's workers exit), a serial one leaves them for torch's next op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # at least one worker, on any machine
    try:
        big = rng.standard_normal((512, 512)).astype(np.float32)  # 1 MiB: the parallel build
        small = big[:2]  # 4 KiB: the serial build
        w = rng.standard_normal(512).astype(np.float32)
        hal.ops.rms_norm(big, w)  # Numba's workers started before counting
        a = torch.from_numpy(big)
        for x, released in ((small, False), (big, True)):
            a @ a  # torch's worker runs, and spins
            before = _threads()
            hal.ops.rms_norm(x, w)
            deadline = time.monotonic() + 5
            while released and _threads() >= before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (_threads() < before) == released, (x.shape, before, _threads())
        torch.testing.assert_close(a @ a, torch.from_numpy(big @ big), rtol=1e-4, atol=1e-3)  # new workers do torch's next op
    finally:
        torch.set_num_threads(threads)


class Block(torch.nn.Module):
    """A small MoE decoder layer made of twelve different hal ops."""

    def __init__(self, hidden=64, heads=4, d=16, experts=4, top_k=2, ffn=48):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads, self.d, self.experts, self.top_k = heads, d, experts, top_k
        self.norm = torch.rand(hidden, generator=g) + 0.5
        self.wqkv = torch.randn(hidden, 3 * hidden, generator=g) / 8
        self.wo = torch.randn(hidden, hidden, generator=g) / 8
        self.router = torch.randn(hidden, experts, generator=g) / 8
        self.w13 = torch.randn(experts, 2 * ffn, hidden, generator=g) / 8
        self.w2 = torch.randn(experts, hidden, ffn, generator=g) / 8
        angles = torch.arange(512)[:, None] / (10000 ** (torch.arange(0, d, 2) / d))[None]
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, x):
        t = x.shape[0]
        h, s = ops.rms_norm(x, self.norm, x, eps=1e-6)
        q, k, v = ops.gemm(h, self.wqkv).view(t, 3, self.heads, self.d).unbind(1)
        q, k = ops.rope(q.contiguous(), k.contiguous(), self.cos, self.sin, torch.arange(t, dtype=torch.int32))
        o = ops.attention(q[None], k[None], v.contiguous()[None], causal=True, window=24)
        x = ops.gemm(o.reshape(t, -1), self.wo, c=s, beta=1.0)
        h = ops.layer_norm(x, self.norm, None)[0]
        weights, ids = ops.moe_route(ops.gemm(h, self.router), self.top_k)
        sorted_ids, _, offsets, _ = ops.moe_align(ids, self.experts, 1)
        y = ops.grouped_gemm(ops.moe_permute(h, ids, sorted_ids), self.w13, offsets, activation="silu_and_mul")
        y = ops.moe_unpermute(ops.grouped_gemm(y, self.w2, offsets), sorted_ids, weights)
        return ops.softmax(ops.silu_and_mul(torch.cat([y, x], -1)))


def test_compile_fullgraph_dynamic_without_recompiling(rng):
    torch._dynamo.reset()
    block = Block()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for i, t in enumerate((5, 19, 40)):
            x = torch.from_numpy(rng.standard_normal((t, 64)).astype(np.float32))
            if i == 1:  # after the first compile, a new sequence length must not compile again
                torch._dynamo.config.error_on_recompile = True
            try:
                torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)
            finally:
                torch._dynamo.config.error_on_recompile = False
