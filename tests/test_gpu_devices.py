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
