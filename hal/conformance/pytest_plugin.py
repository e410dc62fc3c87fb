"""pytest options for the conformance suite: `pytest --pyargs hal.conformance --hal-backend NAME`."""
import time

import pytest

_SEED = pytest.StashKey[int]()


def pytest_addoption(parser):
    group = parser.getgroup("hal")
    group.addoption("--hal-backend", action="append", default=[], help="backend to run the hal conformance suite on (repeatable; default: every available one)")
    group.addoption("--hal-op", action="append", default=[], help="only these ops (repeatable)")
    group.addoption("--hal-seed", type=int, default=None, help="seed of the random inputs (default: a fresh one, reported in the header)")
    group.addoption("--hal-hostile", action="store_true", help="also run the bad-input suite (hal.conformance.hostile) on each backend")
    group.addoption("--hal-torch", action="store_true", help="run the cases through torch.ops.hal with torch.library.opcheck (hal.torch)")
    group.addoption("--hal-hostile-budget", type=float, default=None, help="seconds the bad-input suite may start cases for, per backend")


def parametrize_cases(metafunc, default_backends=None):
    """Parametrize a test's `case` argument with the conformance cases of the chosen backends."""
    import hal
    from hal import conformance

    config = metafunc.config
    names = config.getoption("hal_backend") or default_backends or [b["name"] for b in hal.list_backends() if b["available"]]
    seed = config.stash[_SEED]
    params = []
    for name in names:
        available, reason = hal.registry().entry(name).status
        if not available:
            params.append(pytest.param(None, id=f"{name}-unavailable", marks=pytest.mark.skip(reason=f"backend {name} unavailable: {reason}")))
            continue
        params += [pytest.param(c, id=c.id) for c in conformance.cases(name, config.getoption("hal_op") or None, seed)]
    metafunc.parametrize("case", params)


def parametrize_hostile(metafunc):
    """Parametrize a test's `hostile_backend` argument with the chosen backends when --hal-hostile is given."""
    import hal

    config = metafunc.config
    names = config.getoption("hal_backend") or [b["name"] for b in hal.list_backends() if b["available"]]
    metafunc.parametrize("hostile_backend", names if config.getoption("hal_hostile") else [])


def check_hostile(config, backend):
    """The body of the hostile test: run the suite on `backend`, assert nothing crashed, came out wrong or
    raised something else than a HalError naming the op and argument."""
    import hal
    from hal.conformance import hostile

    available, reason = hal.registry().entry(backend).status
    if not available:
        pytest.skip(f"backend {backend} unavailable: {reason}")
    seed = config.stash[_SEED]
    report = hostile.run(backend, config.getoption("hal_op") or None, seed, config.getoption("hal_hostile_budget"))
    lines = [f"{f['outcome']}: {f['op']} [{f['variant']}]: {f['message']}\n    {f['reproduce']}" for f in report["failures"]]
    assert not lines, f"{len(lines)} of {report['cases']} hostile cases failed on {backend}:\n" + "\n".join(lines)


def pytest_configure(config):
    seed = config.getoption("hal_seed")
    config.stash[_SEED] = time.time_ns() % 2**31 if seed is None else seed


def pytest_report_header(config):
    seed = config.stash[_SEED]
    return f"hal conformance inputs: fresh random, seed {seed} (reproduce with --hal-seed {seed})"


def check_case(case, config=None):
    """The body of a conformance test: run the case (through torch.ops.hal with --hal-torch), skip when
    the kernel refuses it, else assert."""
    from hal import conformance

    result = (conformance.run_torch if config is not None and config.getoption("hal_torch") else conformance.run)(case)
    if result.status == "unsupported":
        pytest.skip(result.message)
    assert result.ok, f"{case.id}: {result.message}"
