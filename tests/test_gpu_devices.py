"""The conformance suite on real GPUs (`cuda`, `rocm` through CuPy) for anyone who has one;
elsewhere each backend shows as one skipped test with the reason it is unavailable."""
from hal.conformance.pytest_plugin import check_case, parametrize_cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        parametrize_cases(metafunc, default_backends=["cuda", "rocm"])


def test_device_conformance(case):
    check_case(case)


def test_torch_tensors_run_on_torchs_stream_and_allocator():
    """torch CUDA/HIP tensors: kernels on torch's current stream (a side stream here), outputs from its
    caching allocator, no host synchronization in a call whose output size does not depend on data."""
    import pytest
    import torch

    import hal
    import hal.torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA or ROCm device")
    name = "rocm" if torch.version.hip else "cuda"
    available, reason = hal.registry().entry(name).status
    if not available:
        pytest.skip(f"backend {name} unavailable: {reason}")
    x = torch.randn(4096, 1024, device="cuda")
    w = torch.rand(1024, device="cuda") + 0.5
    expected = torch.nn.functional.rms_norm(x, (1024,), w, eps=1e-6)
    torch.ops.hal.rms_norm(x, w)  # compile and warm up outside the checks
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call in torch raises
        try:
            y = torch.ops.hal.rms_norm(x, w)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.cuda.memory_allocated() >= before + y.numel() * 4  # the output came from torch's allocator
        done = torch.cuda.Event()
        done.record(stream)
    done.synchronize()
    torch.testing.assert_close(y, expected)


def test_expert_parallel_on_a_device(tmp_path):
    """hal.distributed on one GPU (a group of one on NCCL / RCCL): both modes against the single-process
    layer, and low_latency dispatch + combine without a host synchronization in torch's calls."""
    import pytest
    import torch
    import torch.distributed as dist

    import hal
    from hal.distributed import ExpertParallel, moe_layer

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("torch sees no CUDA or ROCm device, or has no NCCL")
    name = "rocm" if torch.version.hip else "cuda"
    available, reason = hal.registry().entry(name).status
    if not available:
        pytest.skip(f"backend {name} unavailable: {reason}")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        experts, hidden, inter, tokens = 16, 256, 128, 24
        x = torch.randn(tokens, hidden, device="cuda").bfloat16()
        router = torch.randn(hidden, experts, device="cuda").bfloat16() / 16
        w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda") / 16).bfloat16()
        w2 = (torch.randn(experts, hidden, inter, device="cuda") / 11).bfloat16()
        ref = moe_layer(None, x, router, w13, w2, k=4)
        for mode in ("normal", "low_latency"):
            ep = ExpertParallel(experts, hidden, mode=mode, max_tokens=tokens)
            out = moe_layer(ep, x, router, w13, w2, k=4)
            torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1.6e-2 * float(ref.abs().max()))
        ids = torch.randint(0, experts, (tokens, 4), device="cuda", dtype=torch.int32)
        weights = torch.rand(tokens, 4, device="cuda")
        ep.dispatch(x, ids, weights)  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            recv = ep.dispatch(x, ids, weights)
            ep.combine(recv.x, recv)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()
