"""The conformance suite as pytest tests: `pytest --pyargs hal.conformance --hal-backend NAME`."""
from hal.conformance.pytest_plugin import check_case, parametrize_cases


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        parametrize_cases(metafunc)


def test_conformance(request, case):
    check_case(case, request.config)
