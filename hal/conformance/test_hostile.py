"""The bad-input suite as a pytest test: `pytest --pyargs hal.conformance --hal-hostile [--hal-backend NAME]`."""
from hal.conformance.pytest_plugin import check_hostile, parametrize_hostile


def pytest_generate_tests(metafunc):
    if "hostile_backend" in metafunc.fixturenames:
        parametrize_hostile(metafunc)


def test_hostile(request, hostile_backend):
    check_hostile(request.config, hostile_backend)
