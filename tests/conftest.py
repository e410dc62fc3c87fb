import numpy as np
import pytest

import hal
from hal.dtypes import FLOATS
from hal.testing import HostBackend


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
