"""Shared skips: every test here needs the plugin installed and an OpenCL device (PoCL on CI);
the Oclgrind tests also need the `oclgrind` program."""
import shutil

import pytest


def opencl_unavailable():
    """None when the opencl backend can run here, else why not (what is missing)."""
    try:
        import pyopencl  # noqa: F401
    except ImportError as exc:
        return f"pyopencl is not installed ({exc}); pip install pyopencl"
    import hal

    rows = {r["name"]: r for r in hal.list_backends()}
    if "opencl" not in rows:
        return "the hal-opencl plugin is not installed (pip install -e plugins/opencl)"
    if not rows["opencl"]["available"]:
        return f"opencl backend unavailable: {rows['opencl']['reason']} (Debian: apt-get install pocl-opencl-icd)"
    return None


@pytest.fixture(scope="session")
def opencl():
    why = opencl_unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def oclgrind(opencl):
    path = shutil.which("oclgrind")
    if path is None:
        pytest.skip("oclgrind is not installed (Debian: apt-get install oclgrind)")
    return path
