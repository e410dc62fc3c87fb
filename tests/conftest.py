import numpy as np
import pytest

import hal
from hal.dtypes import FLOATS
from hal.testing import HostBackend

# Test files that take minutes on a fresh machine (compile report, Numba compiles), collected first: pytest-xdist's
# workers (`-n 2`, `--dist loadfile --no-loadscope-reorder`) take whole files in collection order, so the long ones
# do not finish the run alone.
SLOW_FILES_FIRST = ("test_compile_report.py", "test_hostile.py", "test_conformance_cpu.py", "test_cpu_robustness.py",
                    "test_gpu_backends.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    first = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: each file keeps its order


@pytest.fixture
def rng():
    """Fresh random inputs on every run (the seed is in the failure output through the fixture repr)."""
    return np.random.default_rng()


@pytest.fixture
def make_backend():
    """make_backend(name, {op: kernel}) registers a host test backend through the plugin path."""
    made = []

    def make(name, kernels, priority=-10, dtypes=FLOATS, **options):
        class Plugin:
            @hal.hookimpl
            def hal_register(self, registry):
                registry.add_backend(HostBackend(name, priority))
                for op, fn in kernels.items():
                    registry.add_kernel(op, name, fn, dtypes=dtypes, **options)

        hal.register_plugin(Plugin(), name=f"test-{name}")
        made.append(f"test-{name}")
        return name

    yield make
    for plugin in made:
        hal.unregister_plugin(plugin)
    hal.fallbacks(clear=True)


@pytest.fixture(autouse=True)
def fresh_dispatch_settings():
    """Each test starts and ends with no hal.use() choice and the environment re-read."""
    hal.use(None)
    yield
    hal.use(None)


@pytest.fixture(scope="module")
def sim_on():
    """sim_on(vendor, arch=None, mode="release", kernels=None) -> (name, launched): an extra emulated
    backend presenting `arch`, registered through the plugin path like the built-in ones, kept for the
    test module; `launched` collects the template names of the kernels it runs."""
    from hal.backends.gpu.backend import SimBackend, register

    made = {}

    def make(vendor, arch=None, mode="release", kernels=None):
        key = (vendor.name, arch, mode, None if kernels is None else tuple(map(id, kernels)))
        if key not in made:
            backend = SimBackend(vendor, arch, name=f"{vendor.name}-sim-{arch or vendor.sim_arch}-{mode}-{len(made)}", mode=mode)
            launched, launch = set(), backend.executor.launch

            def recording_launch(family, name, *args):
                launched.add(name.split("<")[0])
                launch(family, name, *args)

            backend.executor.launch = recording_launch

            class Plugin:
                @hal.hookimpl
                def hal_register(self, registry):
                    register(registry, backend, kernels)

            hal.register_plugin(Plugin(), name=f"test-{backend.name}")
            ok, reason = hal.registry().entry(backend.name).status
            if not ok:
                pytest.skip(f"{backend.name} unavailable: {reason}")
            made[key] = (backend.name, launched)
        return made[key]

    yield make
    for name, _ in made.values():
        hal.unregister_plugin(f"test-{name}")
    hal.fallbacks(clear=True)
