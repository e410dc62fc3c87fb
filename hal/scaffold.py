"""`hal new-backend NAME`: a ready plugin package for a vendor's backend.

The package installs with pip, registers through the `hal.plugins` entry point, ships one
example kernel (silu_and_mul, in NumPy, as a stand-in for the vendor's own) and a test that runs
hal's conformance suite on it. docs/porting.md walks from there to a full checklist.
"""
import keyword
import re
from pathlib import Path

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "hal-{name}"
version = "0.1.0"
description = "The {name} backend for hal"
requires-python = ">=3.10"
dependencies = ["hal"]

[project.optional-dependencies]
test = ["pytest>=8"]

# hal finds backends through this entry-point group, the built-in ones included.
[project.entry-points."hal.plugins"]
{name} = "{module}"

[tool.setuptools]
packages = ["{module}"]
'''

MODULE = '''"""The {name} backend for hal: one example kernel so far; `hal checklist {name}` lists the rest."""
from pathlib import Path

import numpy as np

import hal


class {cls}(hal.Backend):
    name = "{name}"
    # A hal.Priority band: PORTING until the checklist is green (chosen only by name); then DEVICE for a
    # backend on its own device memory, or HOST / OFFLOAD for one that takes host arrays.
    priority = hal.Priority.PORTING
    # device_type = 1  # the DLPack device type of the arrays this backend runs on natively (1 = CPU)

    def probe(self):
        """(available, reason): say exactly what is missing when the device or its runtime is not there."""
        return True, ""

    def info(self):
        """What `hal backends` (device, arch) and `hal checklist` (every field, as given) show about this
        backend: choose the labels that describe your hardware; values are strings."""
        return {{
            "device": "example device (host memory)",
            "arch": "example-arch",
            "memory": "host NumPy arrays",
            "streams": "synchronous",
            "toolchain": "NumPy (stand-in for the vendor compiler)",
        }}

    def compile_report(self):
        """What your compiler says about each kernel per architecture, for `hal backends --kernels` and
        the checklist; None until you have one. Rows need kernel, arch, file (the kernel source's file
        name), registers, spills and shared_bytes; add your own columns."""
        return {{
            "title": "{name} kernels per architecture",
            "columns": [("kernel", "kernel"), ("arch", "arch"), ("registers", "registers"), ("spills", "spills"),
                        ("shared_bytes", "shared bytes")],
            "rows": [{{"kernel": "silu_and_mul", "arch": "example-arch", "file": Path(__file__).name, "registers": 0,
                      "spills": 0, "shared_bytes": 0}}],
            "note": "example numbers: report what the {name} compiler says",
        }}

    # Device memory: override to_native / from_native / empty / poisoned (see hal.Backend).


def silu_and_mul(outs, x):
    """Example kernel: outs[0][...] = silu(x[..., :d]) * x[..., d:], computed in fp32 like hal's kernels."""
    d = x.shape[-1] // 2
    gate = x[..., :d].astype(np.float32)
    up = x[..., d:].astype(np.float32)
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for very negative gates: silu -> 0, as intended
        outs[0][...] = (gate / (1.0 + np.exp(-gate)) * up).astype(outs[0].dtype)


@hal.hookimpl
def hal_register(registry):
    registry.add_backend({cls}())
    registry.add_kernel("silu_and_mul", "{name}", silu_and_mul, dtypes=("float32", "float16", "bfloat16"), source=__file__)
'''

TEST = '''"""hal's conformance suite on the {name} backend: every registered op, dtype and sample."""
import pytest

import hal
from hal import conformance


def _cases():
    return conformance.cases("{name}")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_conformance(case):
    result = conformance.run(case)
    if result.status == "unsupported":
        pytest.skip(result.message)
    assert result.ok, result.message


def test_registered_through_the_entry_point():
    assert any(b["name"] == "{name}" and b["available"] for b in hal.list_backends())


def test_checklist_shows_what_the_backend_reports():
    from hal import checklist

    c = checklist.build("{name}", run_suite=False)
    assert c["items"]["device"] and "compile report" in c["items"]
    silu = next(p for p in c["pairs"] if p["op"] == "silu_and_mul" and p["dtype"] == "float32")
    assert silu["status"] == "untested" and silu["resources"]
'''

README = '''# hal-{name}

The {name} backend for [hal](https://pypi.org/project/hal). Install and check it:

    pip install -e '.[test]'
    hal backends                 # {name} is listed
    hal checklist {name}         # what is native, what falls back, what is left
    python -m pytest -q          # the conformance suite on this backend
    hal check {name} --hostile   # bad input: a HalError or the right answer, never a crash (hal's docs/errors.md)

Port one op at a time: write the kernel, register it in `{module}/__init__.py` with
`registry.add_kernel(op, "{name}", fn, dtypes=...)`, and run `hal check {name} --op OP`. Describe the
hardware in `info()` and the compiler's resource report in `compile_report()`; raise the backend's
`priority` from `hal.Priority.PORTING` when the checklist is green.
'''


def new_backend(name, where="."):
    """Write the plugin package for backend `name` under `where`; returns its directory."""
    if not re.fullmatch(r"[a-z][a-z0-9]*([_-][a-z0-9]+)*", name) or keyword.iskeyword(name):
        raise ValueError(f"backend name {name!r}: use lowercase letters, digits, '-' and '_', starting with a letter")
    module = "hal_" + name.replace("-", "_")
    cls = "".join(part.capitalize() for part in re.split("[_-]", name)) + "Backend"
    root = Path(where) / f"hal-{name}"
    if root.exists():
        raise FileExistsError(f"{root} exists")
    files = {
        "pyproject.toml": PYPROJECT,
        f"{module}/__init__.py": MODULE,
        "tests/test_conformance.py": TEST,
        "README.md": README,
    }
    for rel, template in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(name=name, module=module, cls=cls))
    return root
