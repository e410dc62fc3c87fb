"""The compile report: every kernel file compiled offline for every architecture of the vendor's
`compile_archs`, and the compilers' resource reports (registers or VGPRs/SGPRs, spills, shared
memory or LDS, occupancy) collected per kernel and architecture into one JSON report.

    python -m hal.backends.gpu.compile_report [--vendor cuda|rocm] [--out FILE]

CUDA files compile with NVRTC from pip (no GPU needed), HIP files with Debian's hipcc. The
report lands in the user cache (each GPU backend's `compile_report()` shows its vendor's rows:
`hal backends --kernels`); `BASELINE` is the report committed with the kernels, which the tests
compare against so that a kernel that was spill-free cannot start spilling unnoticed.
"""
import argparse
import datetime
import json
import os
import sys
import time
from importlib import import_module
from pathlib import Path

from .vendor import VENDORS

BASELINE = Path(__file__).resolve().parent / "resources-baseline.json"
MODULE = "hal.backends.gpu.compile_report"


def report_path():
    return Path(os.environ.get("HAL_KERNEL_REPORT") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hal" / "kernel-resources.json")


def spills(record):
    """Bytes or registers spilled by a kernel, whatever the vendor calls them."""
    return sum(record.get(k, 0) or 0 for k in ("spill_stores", "spill_loads", "spill_sgprs", "spill_vgprs", "scratch_bytes"))


def toolchain(vendor):
    """(available, reason) of the offline compiler for a vendor's kernel files."""
    return import_module(VENDORS[vendor].offline_compiler).available()


def build(vendors=tuple(VENDORS)):
    """Compile every kernel file for every architecture, for the vendors whose toolchain is here; the report as a dict."""
    report = {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "toolchains": {}, "kernels": []}
    for name in vendors:
        available, reason = toolchain(name)
        entry = report["toolchains"][name] = {"available": available, "reason": reason, "archs": list(VENDORS[name].compile_archs)}
        if not available:
            continue
        start = time.perf_counter()
        records = import_module(VENDORS[name].offline_compiler).compile_all()
        entry["seconds"] = round(time.perf_counter() - start, 1)
        report["kernels"] += [{"vendor": name, **r, "spills": spills(r)} for r in records]
    return report


def save(report, path):
    """Write a report to `path` whole or not at all (a reader in another process never sees half of it); the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(report, indent=1) + "\n")
    partial.replace(path)
    return path


def vendor_report(vendor, path=None):
    """One vendor's part of the latest report in the form of `hal.Backend.compile_report()`: the
    vendor's columns, rows with the common keys (VGPRs are "registers", LDS bytes "shared_bytes").
    The latest report is the user's build, else the committed baseline; a build made where the vendor's
    toolchain was missing has no rows for it, and the baseline's are shown instead."""
    title = f"{vendor.name} kernels per architecture"
    found = None  # (report, path) of the first report that exists, for the note when none has rows
    for where in [Path(path)] if path else [report_path(), BASELINE]:
        if not where.exists():
            continue
        report = json.loads(where.read_text())
        found = found or (report, where)
        rows = []
        for r in report["kernels"]:
            if r.get("vendor") != vendor.name:
                continue
            row = dict(r)
            for theirs, common in vendor.report_keys.items():
                row.setdefault(common, r.get(theirs, 0))
            row.setdefault("file", "")
            rows.append(row)
        if rows:
            return {"title": title, "columns": list(vendor.report_columns), "rows": rows,
                    "note": f"{where}, generated {report.get('generated', '?')}"}
    if found is None:
        note = f"no compile report yet: python -m {MODULE} builds one"
    else:
        report, where = found
        reason = report.get("toolchains", {}).get(vendor.name, {}).get("reason") or "toolchain missing"
        note = f"no {vendor.name} rows in {where} ({reason}): python -m {MODULE} builds them"
    return {"title": title, "columns": list(vendor.report_columns), "rows": [], "note": note}


def main(argv=None):
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--vendor", action="append", choices=list(VENDORS))
    parser.add_argument("--out", default=None, help=f"default: {report_path()}")
    args = parser.parse_args(argv)
    report = build(tuple(args.vendor or VENDORS))
    out = save(report, Path(args.out) if args.out else report_path())
    for name, entry in report["toolchains"].items():
        rows = [r for r in report["kernels"] if r["vendor"] == name]
        status = f"{len(rows)} kernel x arch builds in {entry.get('seconds')} s, {sum(r['spills'] > 0 for r in rows)} spilling" if entry["available"] else f"skipped: {entry['reason']}"
        print(f"{name}: {status}")
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
