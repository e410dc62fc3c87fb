"""The shipped conformance suite, run on the built-in CPU backend."""
from hal.conformance.pytest_plugin import check_case, parametrize_cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        parametrize_cases(metafunc, default_backends=["cpu"])


def test_cpu_conformance(case):
    check_case(case)
