"""The conformance suite on real GPUs (`cuda`, `rocm` through CuPy) for anyone who has one;
elsewhere each backend shows as one skipped test with the reason it is unavailable."""
from hal.conformance.pytest_plugin import check_case, parametrize_cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        parametrize_cases(metafunc, default_backends=["cuda", "rocm"])


def test_device_conformance(case):
    check_case(case)
