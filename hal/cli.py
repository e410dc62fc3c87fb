"""The `hal` command: backends, ops, check, bench, demo."""
import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


console = Console()


def _print_json(data):
    print(json.dumps(data, indent=2, default=str))


def cmd_backends(args):
    import hal

    if args.kernels:
        return show_kernels(args.json)
    rows = hal.list_backends()
    if args.json:
        return _print_json(rows)
    table = Table(title="hal backends")
    for col in ("backend", "available", "device", "arch", "priority", "kernels", "plugin", "why not"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r["name"]), "[green]yes[/]" if r["available"] else "[red]no[/]", escape(r["device"]), escape(r["arch"]),
                      str(r["priority"] if r["priority"] is not None else ""), str(r["kernels"]), escape(r["plugin"]), escape(r["reason"]))
    console.print(table)
    for r in rows:
        if r["available"] and r["details"]:
            console.print(f"[bold]{escape(r['name'])}[/]: " + "; ".join(f"{k} {escape(str(v))}" for k, v in r["details"].items()))


def compile_reports():
    """[(backends, report, error)]: each backend's compile report (see hal.Backend.compile_report), one
    entry per distinct report (an emulator that reports its device twin's kernels shares its entry)."""
    import hal

    out = {}
    for name, entry in hal.registry().backends.items():
        report, error = entry.compile_report()
        if report is None and error is None:
            continue
        key = json.dumps([report, error], sort_keys=True, default=str)
        out.setdefault(key, ([], report, error))[0].append(name)
    return list(out.values())


def show_kernels(as_json):
    """Registered kernels per backend, and each backend's compile report with the backend's own columns."""
    import hal

    reg = hal.registry()
    registered = [{"backend": k.backend, "op": k.op, "dtypes": sorted(k.dtypes), "requires": k.requires, "source": k.source}
                  for ks in reg.kernels.values() for k in ks]
    reports = compile_reports()
    if as_json:
        return _print_json({"registered": registered,
                            "compile_reports": [{"backends": names, "report": report, "error": error} for names, report, error in reports]})
    table = Table(title="registered kernels")
    for col in ("backend", "op", "dtypes", "requires", "source"):
        table.add_column(col)
    for k in registered:
        table.add_row(k["backend"], k["op"], ", ".join(k["dtypes"]), k["requires"], Path(k["source"]).name if k["source"] else "")
    console.print(table)
    for names, report, error in reports:
        who = ", ".join(names)
        if error is not None:
            console.print(f"[red]{escape(who)}: {escape(error)}[/]")
        elif not report["rows"]:
            console.print(escape(f"{report['title']} ({who}): {report['note'] or 'no kernels in the report'}"))
        else:
            table = Table(title=escape(f"{report['title']} ({who})"), caption=escape(report["note"]) or None)
            for _, header in report["columns"]:
                table.add_column(escape(header))
            for r in report["rows"]:
                table.add_row(*[f"[red]{r[key]}[/]" if key == "spills" and r[key] else escape(str(r.get(key, "")))
                                for key, _ in report["columns"]])
            console.print(table)


def op_table(per_dtype):
    """{op: {backend: status}} (or {"op dtype": ...}); status native, native: some dtypes, fallback -> cpu
    or missing."""
    import hal
    from hal.registry import FALLBACK_BACKEND

    reg = hal.registry()
    names = sorted(reg.backends, key=lambda b: -reg.backends[b].backend.priority)
    table = {}
    for op_name, op in hal.ops.ALL.items():
        dtypes = sorted(next(t.dtypes for t in op.tensors if t.name == op.primary))  # the dtypes it dispatches on
        cpu = {d for k in reg.kernels.get((op_name, FALLBACK_BACKEND), []) for d in k.dtypes}
        for key, wanted in ([(f"{op_name} {d}", [d]) for d in dtypes] if per_dtype else [(op_name, dtypes)]):
            row = table[key] = {}
            for b in names:
                have = {d for k in reg.kernels.get((op_name, b), []) for d in k.dtypes}
                native = [d for d in wanted if d in have]
                if len(native) == len(wanted):
                    row[b] = "native"
                elif native:
                    row[b] = "native: " + ", ".join(native)
                elif all(d in cpu for d in wanted):
                    row[b] = f"fallback -> {FALLBACK_BACKEND}"
                else:
                    row[b] = "missing"
    return names, table



def cmd_ops(args):
    names, table = op_table(args.dtypes)
    if args.json:
        return _print_json(table)
    out = Table(title="hal ops: native kernels per backend")
    out.add_column("op")
    for b in names:
        out.add_column(b)
    colors = {"native": "green", "missing": "red"}
    for key, row in table.items():
        out.add_row(key, *[f"[{colors.get(row[b], 'yellow')}]{row[b]}[/]" for b in names])
    console.print(out)


def cmd_candidate(args):
    import hal
    from hal import conformance

    if not args.op or len(args.op) != 1:
        console.print("[red]--kernel needs exactly one --op[/]")
        return 2
    op = hal.ops.ALL[args.op[0]]
    results, timings = conformance.evaluate_candidate(args.backend, op, args.kernel, args.seed)
    failed = sorted((r for r in results if r.status == "fail"), key=lambda r: -r.worst)
    passed = sum(r.status == "pass" for r in results)
    if args.json:
        _print_json({"correct": not failed, "passed": passed, "failed": [{"case": r.case.id, "message": r.message} for r in failed],
                     "seconds": timings})
        return 1 if failed else 0
    verdict = "[green]CORRECT[/]" if not failed else "[red]WRONG[/]"
    console.print(f"candidate {args.kernel} for {op.name} on {args.backend}: {verdict} ({passed} passed, {len(failed)} failed)")
    for r in failed[:5]:
        console.print(f"  [red]{r.case.id}[/]: {r.message[:300]}")
    table = Table(title="time on the largest ordinary sample")
    table.add_column("kernel")
    table.add_column("median ms", justify="right")
    for label, t in timings.items():
        table.add_row(label, f"{t * 1e3:.3f}" if isinstance(t, float) else t)
    console.print(table)
    return 1 if failed else 0


def cmd_check(args):
    from hal import conformance
    from hal.errors import BackendUnavailable

    if args.kernel:
        return cmd_candidate(args)
    if args.hostile:
        return cmd_hostile(args)

    seed = conformance.new_seed() if args.seed is None else args.seed
    try:
        cases = conformance.cases(args.backend, args.op or None, seed)
    except BackendUnavailable as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    import hal

    available, reason = hal.registry().entry(args.backend).status
    if not available:
        console.print(f"[red]backend {args.backend} is unavailable: {reason}[/]")
        return 2
    results = []
    run = conformance.run_torch if args.torch else conformance.run
    with Progress(TextColumn("[bold]hal check {task.fields[backend]}" + (" --torch" if args.torch else "")), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True),
                  disable=args.json) as progress:
        task = progress.add_task("", total=len(cases), backend=args.backend)
        for case in cases:
            progress.update(task, description=f"{case.op.name} {case.dtype}")
            results.append(run(case))
            progress.advance(task)
    summary = {}
    for r in results:
        s = summary.setdefault((r.case.op.name, r.case.dtype), {"pass": 0, "fail": 0, "unsupported": 0, "worst": 0.0})
        s[r.status] += 1
        s["worst"] = max(s["worst"], r.worst)
    failed = [r for r in results if r.status == "fail"]
    if args.json:
        _print_json({
            "backend": args.backend, "seed": seed,
            "summary": [{"op": op, "dtype": dt, **s} for (op, dt), s in summary.items()],
            "failures": [{"case": r.case.id, "message": r.message} for r in failed],
        })
        return 1 if failed else 0
    table = Table(title=f"hal check {args.backend} (seed {seed})")
    for col in ("op", "dtype", "passed", "failed", "unsupported", "worst err/tol"):
        table.add_column(col, justify="right" if col not in ("op", "dtype") else "left")
    for (op, dt), s in summary.items():
        table.add_row(op, dt, str(s["pass"]), f"[red]{s['fail']}[/]" if s["fail"] else "0", str(s["unsupported"]),
                      "" if dt == "-" else f"{s['worst']:.3f}")
    console.print(table)
    for r in failed:
        console.print(f"[red]FAIL[/] {r.case.id}: {r.message}")
    passed = sum(r.status == "pass" for r in results)
    console.print(f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} unsupported "
                  f"(seed {seed}; reproduce with --seed {seed})")
    return 1 if failed else 0


def cmd_hostile(args):
    """`hal check NAME --hostile`: the bad-input suite (hal.conformance.hostile), a table of outcomes per
    category and every failure with the command that reruns it."""
    from hal.conformance import hostile

    if args.case is not None and len(args.op or ()) != 1:
        console.print("[red]--case needs exactly one --op[/]")
        return 2
    seed = 0 if args.seed is None else args.seed
    with Progress(TextColumn(f"[bold]hal check {args.backend} --hostile"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), disable=args.json) as progress:
        task = progress.add_task("", total=None)
        report = hostile.run(args.backend, args.op, seed, args.budget, only=args.case,
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    failed = bool(report["failures"])
    if args.json:
        _print_json(report)
        return 1 if failed else 0
    table = Table(title=f"hal check {args.backend} --hostile (seed {seed}): {report['cases']} cases in {report['seconds']} s")
    table.add_column("category")
    for k in hostile.OUTCOMES:
        table.add_column(k, justify="right")
    for category, counts in [*report["counts"].items(), ("total", hostile.totals(report))]:
        table.add_row(category, *[f"[red]{counts[k]}[/]" if counts[k] and k in hostile.FAILURES else str(counts[k]) for k in hostile.OUTCOMES])
    console.print(table)
    for f in report["failures"]:
        console.print(escape(f"{f['outcome']}: {f['op']} {f['category']} [{f['variant']}]: {f['message']}"), style="red", highlight=False)
        console.print(f"    {escape(f['reproduce'])}", highlight=False)
    if report["left_out"]:
        console.print(f"[yellow]{report['left_out']} cases left out by --budget {args.budget:g}[/]")
    return 1 if failed else 0


def cmd_checklist(args):
    from hal import checklist

    if args.diff:
        old, new = (json.loads(open(path).read()) for path in args.diff)
        changes = checklist.diff(old, new)
        if args.format == "json":
            _print_json(changes)
        else:
            console.print("\n".join(changes) if changes else "no changes")
        return 0
    if not args.backend:
        console.print("[red]hal checklist: name a backend, or --diff OLD.json NEW.json[/]")
        return 2
    c = checklist.build(args.backend, run_suite=not args.no_run, seed=args.seed, ops=args.op)
    if args.format != "terminal":
        text = checklist.write(c, args.format, args.out)
        if not args.out:
            print(text, end="")
        else:
            console.print(f"{c['summary']} -> {args.out}")
        return 0
    items = Table(title=escape(f"hal checklist {c['backend']} ({'available' if c['available'] else 'unavailable: ' + c['reason']})"))
    items.add_column("item")
    items.add_column("value")
    for k, v in c["items"].items():
        items.add_row(escape(k), escape(v))
    console.print(items)
    colors = {"native": "green", "failing": "red", "falls back": "yellow", "missing": "red", "untested": "blue"}
    table = Table()
    for col in ("op", "dtype", "status", "details"):
        table.add_column(col)
    for p in c["pairs"]:
        table.add_row(p["op"], p["dtype"], f"[{colors[p['status']]}]{p['status']}[/]", escape(checklist.detail(p)))
    console.print(table)
    console.print(f"[bold]{c['summary']}[/]")
    return 0


def cmd_new_backend(args):
    from hal.scaffold import new_backend

    try:
        root = new_backend(args.name, args.dir)
    except (ValueError, FileExistsError) as exc:
        console.print(f"[red]hal new-backend: {exc}[/]")
        return 2
    console.print(escape(f"wrote {root}: pip install -e '{root}[test]', then hal backends, hal checklist {args.name}, pytest {root}"))
    return 0


def _default_bench_dtypes(op):
    """float32 and bfloat16 where the op's cpu kernels take them, else the first dtype they declare
    (the fp8 GEMMs dispatch on float8_e4m3fn, int8_gemm on int8)."""
    import hal

    declared = sorted({d for k in hal.registry().kernels.get((op.name, "cpu"), []) for d in k.dtypes})
    return [d for d in ("float32", "bfloat16") if d in declared] or declared[:1]


def cmd_bench(args):
    import hal
    from hal.bench import bench_op, roofline

    op = hal.ops.ALL.get(args.op)
    if op is None:
        console.print(f"[red]unknown op {args.op!r}; ops: {', '.join(hal.ops.ALL)}[/]")
        return 2
    dtypes = args.dtype or _default_bench_dtypes(op)
    rows = [bench_op(op, dtype, args.backend, args.vs == "torch") for dtype in dtypes]
    peak = roofline()
    if args.json:
        return _print_json({"roofline": peak, "results": rows})
    table = Table(title=f"hal bench {op.name}  (measured here: {peak['bandwidth_gbs']:.1f} GB/s copy, {peak['gemm_tflops']:.3f} TFLOP/s fp32 GEMM)")
    cols = ["dtype", "backend", "median ms", "throughput", "% roofline"] + (["torch ms", "speedup vs torch"] if args.vs else [])
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        cells = [r["dtype"], r["backend"], f"{r['ms']:.3f}", r["throughput"], f"{r['roofline_pct']:.0f}%"]
        if args.vs:
            cells += [f"{r['torch_ms']:.3f}", f"{r['speedup_vs_torch']:.2f}x"]
        table.add_row(*cells)
    console.print(table)


def cmd_demo(args):
    from hal import demo

    layer = demo.Layer(args.hidden, args.heads, args.kv_heads, args.head_dim, args.ffn, args.experts, args.top_k)
    if args.ep:
        return _demo_ep(args, layer)
    rows = demo.run(backend=args.backend, dtype=args.dtype, tokens=args.tokens, decode=args.decode, layer=layer, seed=args.seed)
    if args.json:
        _print_json(rows)
    else:
        table = Table(title=f"hal demo: decoder layer, {args.tokens} tokens prefill + {args.decode} decode, hidden {args.hidden}, "
                            f"{args.heads}/{args.kv_heads} heads x {args.head_dim}, shared ffn {args.ffn}, "
                            f"{args.experts} experts top-{args.top_k} in fp8, {args.dtype}")
        for col in ("step", "ran on", "ms", "max |err|", "err/tol", "check", "fallback"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["step"], r["backend"], f"{r['ms']:.2f}", f"{r['max_abs_err']:.3g}", f"{r['err_over_tol']:.3f}",
                          "[green]ok[/]" if r["ok"] else "[red]MISMATCH[/]", r["fallback"])
        console.print(table)
        for r in rows:
            if not r["ok"]:
                console.print(f"[red]{r['step']}: {r['message']}[/]")
    return 0 if all(r["ok"] for r in rows) else 1


def _demo_ep(args, layer):
    from hal import demo

    rows = demo.run_ep(args.ep, backend=args.backend, dtype=args.dtype, tokens=args.tokens, decode=args.decode, layer=layer, seed=args.seed)
    if args.json:
        _print_json(rows)
    else:
        table = Table(title=f"hal demo --ep {args.ep}: the MoE block ({args.experts} experts top-{args.top_k}, fp8 experts and transport, "
                            f"{args.dtype}) over {args.ep} processes (gloo), against the single-process block",
                      caption="a2a: time in the collectives; B/token: token bytes sent to other ranks per token; min B: distinct remote "
                              "ranks x hidden x 1 byte; meta B: ids, weights and fp8 scales per token")
        for col in ("mode", "rank", "tokens", "ms", "a2a ms", "B/token", "min B", "meta B", "err/tol", "check"):
            table.add_column(col)
        for r in rows:
            per = lambda key: f"{r[key] / max(r['tokens'], 1):.0f}"  # noqa: E731
            table.add_row(r["mode"], str(r["rank"]), str(r["tokens"]), f"{r['ms']:.1f}", f"{r['exchange_ms']:.1f}", per("payload"),
                          per("minimum"), per("metadata"), f"{r['err_over_tol']:.3f}", "[green]ok[/]" if r["ok"] else "[red]MISMATCH[/]")
        console.print(table)
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv=None):
    from hal.dtypes import DTYPES, FLOATS

    parser = argparse.ArgumentParser(prog="hal", description="hal: one op API, hand-written kernels per backend, a conformance suite.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="every known backend, its availability and the reason when unavailable")
    p.add_argument("--kernels", action="store_true", help="registered kernels, and each backend's compile report (resources per architecture)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_backends)
    p = sub.add_parser("ops", help="op x backend table: native / fallback / missing")
    p.add_argument("--dtypes", action="store_true", help="one row per op and dtype")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ops)
    p = sub.add_parser("check", help="run the conformance suite against one backend")
    p.add_argument("backend")
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--seed", type=int, help="seed of the random inputs (default: fresh)")
    p.add_argument("--kernel", help="a kernel source that is not registered (with one --op): check it and time it")
    p.add_argument("--hostile", action="store_true", help="run the bad-input suite instead (docs/errors.md); --seed defaults to 0")
    p.add_argument("--budget", type=float, help="with --hostile: stop starting cases after this many seconds")
    p.add_argument("--case", type=int, help="with --hostile and one --op: only this case (as a failure's reproducer names it)")
    p.add_argument("--torch", action="store_true", help="run every case through torch.ops.hal (torch.library.opcheck, docs/torch.md)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("checklist", help="porting checklist of a backend: native / falls back / missing / failing, resources")
    p.add_argument("backend", nargs="?")
    p.add_argument("--format", choices=["terminal", "markdown", "json", "html"], default="terminal")
    p.add_argument("--out", help="write to this file")
    p.add_argument("--no-run", action="store_true", help="skip the conformance run (pairs show as untested)")
    p.add_argument("--op", action="append", help="run the conformance suite for this op only (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--diff", nargs=2, metavar=("OLD.json", "NEW.json"), help="what changed between two JSON checklists")
    p.set_defaults(fn=cmd_checklist)
    p = sub.add_parser("new-backend", help="write a ready plugin package for a new backend")
    p.add_argument("name")
    p.add_argument("--dir", default=".", help="where to create hal-NAME/")
    p.set_defaults(fn=cmd_new_backend)
    p = sub.add_parser("bench", help="time an op: median, throughput, %% of the measured roofline, ratio vs torch")
    p.add_argument("op")
    p.add_argument("--vs", choices=["torch"], help="also time the same computation in PyTorch")
    p.add_argument("--dtype", action="append", choices=DTYPES, help="repeatable; default float32 and bfloat16 where the op takes them")
    p.add_argument("--backend", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("demo", help="the main job: a decoder layer (attention, paged decode, fp8 MoE) checked step by step against float64")
    p.add_argument("--backend", default=None, help="default: the best available for host arrays")
    p.add_argument("--dtype", default="bfloat16", choices=FLOATS)
    p.add_argument("--tokens", type=int, default=512, help="prefill length")
    p.add_argument("--decode", type=int, default=4, help="generated positions")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=5632, help="shared expert's hidden size")
    p.add_argument("--experts", type=int, default=64, help="routed experts (a multiple of 8: 8 expert groups)")
    p.add_argument("--top-k", type=int, default=6, help="experts per token")
    p.add_argument("--ep", type=int, metavar="N", help="run only the MoE block, expert-parallel over N local processes, "
                   "and check it against the single-process block (docs/distributed.md)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    from hal.errors import HalError

    try:
        return args.fn(args) or 0
    except HalError as exc:
        console.print(f"[red]hal {args.command}: {exc}[/]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
