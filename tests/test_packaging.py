"""The distribution puts only `hal` on sys.path and registers the CPU backend like any plugin."""
import subprocess
import sys
from importlib.metadata import entry_points


def test_no_generic_top_level_packages():
    code = "import importlib.util as u; print(u.find_spec('ops'), u.find_spec('backends'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60).stdout
    assert out.strip() == "None None"


def test_cpu_backend_is_an_entry_point_plugin():
    eps = {ep.name: ep.value for ep in entry_points(group="hal.plugins")}
    assert eps.get("cpu") == "hal.backends.cpu"


def test_import_hal_is_lazy_about_plugins():
    code = "import sys, hal; print('numba' in sys.modules, 'hal.backends.cpu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.split() == ["False", "False"]
