"""`hal checklist BACKEND`: what is left to port, generated, never maintained by hand.

Built from three sources: the registry (which kernels a backend has, their dtypes and
conditions), a conformance run on the backend (pass / fail with the worst error against the
tolerance), and the backend's own compile report (`Backend.compile_report()`: registers, spills,
shared memory per architecture, matched to kernels by source file name). The backend items are
what the backend's `info()` says about itself, shown as given, after its DLPack device type and
priority; the core knows no vendor and asks for no particular field.
"""
import datetime
import html
import json
from pathlib import Path

from . import conformance
from .ops import ALL
from .registry import FALLBACK_BACKEND, registry


def _resource_summary(rows):
    """Per architecture: the kernels reported, the most registers, how many spill, the most shared memory."""
    out = {}
    for r in rows:
        s = out.setdefault(str(r["arch"]), {"kernels": 0, "max_registers": 0, "spilling": 0, "max_shared_bytes": 0})
        s["kernels"] += 1
        s["max_registers"] = max(s["max_registers"], r.get("registers") or 0)
        s["spilling"] += bool(r.get("spills"))
        s["max_shared_bytes"] = max(s["max_shared_bytes"], r.get("shared_bytes") or 0)
    return out


def build(backend, run_suite=True, seed=None, ops=None):
    """The checklist of one backend as a dict (the JSON format); `ops` limits the conformance run."""
    reg = registry()
    entry = reg.entry(backend)
    available, reason = entry.status
    report, report_error = entry.compile_report()
    report_rows = report["rows"] if report else []
    items = {"DLPack device type": str(entry.backend.device_type), "priority": str(entry.backend.priority)}
    items.update(entry.info() if available else {"info": f"not asked: the backend is unavailable ({reason})"})
    if report_error:
        items["compile report"] = report_error
    elif report:
        items["compile report"] = f"{report['title']}: {len(report_rows)} row{'' if len(report_rows) == 1 else 's'}" + (f" ({report['note']})" if report["note"] else "")
    results = {}
    if run_suite and available:
        for result in map(conformance.run, conformance.cases(backend, ops, seed)):
            if result.case.kind != "error":
                results.setdefault((result.case.op.name, result.case.dtype), []).append(result)
    pairs = []
    for op in ALL.values():
        kernels = reg.kernels.get((op.name, backend), [])
        cpu = {d for k in reg.kernels.get((op.name, FALLBACK_BACKEND), []) for d in k.dtypes}
        for dtype in op.tensors[0].dtypes:
            mine = [k for k in kernels if dtype in k.dtypes]
            row = {"op": op.name, "dtype": dtype}
            if mine:
                runs = results.get((op.name, dtype), [])
                failed = [r for r in runs if r.status == "fail"]
                worst = max((r.worst for r in runs if r.status != "unsupported"), default=None)
                row["status"] = "failing" if failed else ("native" if runs else "untested")
                row["worst_error_over_tolerance"] = worst
                row["cases"] = {s: sum(r.status == s for r in runs) for s in ("pass", "fail", "unsupported")}
                row["failures"] = [f"{r.case.sample.label}: {r.message}" for r in failed[:3]]
                row["conditions"] = [k.requires for k in mine if k.requires]
                row["sources"] = sorted({Path(k.source).name for k in mine if k.source})
                row["resources"] = _resource_summary([r for r in report_rows if r.get("file") in row["sources"]])
            elif dtype in cpu and backend != FALLBACK_BACKEND:
                have = sorted({d for k in kernels for d in k.dtypes})
                row["status"] = "falls back"
                row["fallback"] = f"to {FALLBACK_BACKEND}: " + (f"no {dtype} kernel (has {', '.join(have)})" if have else "no kernel")
            else:
                row["status"] = "missing"
            pairs.append(row)
    native = sum(p["status"] in ("native", "failing", "untested") for p in pairs)
    passing = sum(p["status"] == "native" for p in pairs)
    return {
        "backend": backend,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "available": available,
        "reason": reason,
        "plugin": entry.plugin,
        "items": items,
        "pairs": pairs,
        "summary": f"{native} of {len(pairs)} op-dtype pairs native, {passing} passing",
    }


def detail(p):
    if p["status"] == "falls back":
        return p["fallback"]
    if p["status"] == "missing":
        return f"no kernel here or on {FALLBACK_BACKEND}"
    parts = []
    if p.get("worst_error_over_tolerance") is not None:
        parts.append(f"worst err/tol {p['worst_error_over_tolerance']:.3f}")
    if p.get("conditions"):
        parts.append("needs " + "; ".join(p["conditions"]))
    for arch, s in p.get("resources", {}).items():
        parts.append(f"{arch}: {s['max_registers']} regs, {s['max_shared_bytes']} B shared, {s['spilling']} spilling")
    parts += p.get("failures", [])
    return "; ".join(parts)


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(c):
    lines = [f"# Porting checklist: {c['backend']}", "", f"**{c['summary']}**  ", f"generated {c['generated']} from the registry, "
             "a conformance run and the compile report", "", "| item | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in c["items"].items()]
    lines += ["", "| op | dtype | status | details |", "|---|---|---|---|"]
    lines += [f"| {p['op']} | {p['dtype']} | {p['status']} | {_cell(detail(p))} |" for p in c["pairs"]]
    return "\n".join(lines) + "\n"


def html_page(c):
    colors = {"native": "#d4f4d4", "failing": "#f8c8c8", "falls back": "#fbeec0", "missing": "#eeeeee", "untested": "#e0e8f8"}
    rows = "".join(f"<tr style='background:{colors[p['status']]}'><td>{html.escape(p['op'])}</td><td>{p['dtype']}</td>"
                   f"<td>{p['status']}</td><td>{html.escape(detail(p))}</td></tr>" for p in c["pairs"])
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in c["items"].items())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>hal checklist: " + html.escape(c["backend"]) + "</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}</style></head><body>"
            f"<h1>Porting checklist: {html.escape(c['backend'])}</h1><p><b>{html.escape(c['summary'])}</b><br>generated "
            f"{c['generated']}</p><table>{items}</table><table><tr><th>op</th><th>dtype</th><th>status</th><th>details</th></tr>"
            f"{rows}</table></body></html>\n")


def diff(old, new):
    """What changed between two checklist JSON documents: item and op-dtype status changes."""
    changes = [f"summary: {old['summary']} -> {new['summary']}"] if old["summary"] != new["summary"] else []
    changes += [f"{k}: {old['items'].get(k)} -> {v}" for k, v in new["items"].items() if old["items"].get(k) != v]
    before = {(p["op"], p["dtype"]): p for p in old["pairs"]}
    for p in new["pairs"]:
        q = before.get((p["op"], p["dtype"]))
        if q is None:
            changes.append(f"{p['op']} {p['dtype']}: new, {p['status']}")
        elif q["status"] != p["status"]:
            changes.append(f"{p['op']} {p['dtype']}: {q['status']} -> {p['status']}")
    gone = {(p["op"], p["dtype"]) for p in new["pairs"]}
    changes += [f"{op} {dt}: removed" for op, dt in before if (op, dt) not in gone]
    return changes


def write(c, fmt, out=None):
    text = {"markdown": markdown, "html": html_page, "json": lambda c: json.dumps(c, indent=1) + "\n"}[fmt](c)
    if out:
        Path(out).write_text(text)
    return text
