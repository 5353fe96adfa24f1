"""``apt-deploy bench``: time exported artifacts interleaved in one process; optional latency regression gate."""

from __future__ import annotations

import argparse

NAME = "bench"
HELP = ("time one or more exported artifacts interleaved in one process (p50/p90/p99, throughput, memory, size, "
        "ratio to the first), write JSON, save or gate against a latency baseline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="directories written by apt-deploy export; "
                        "the first is the reference of the ratio column")
    g = parser.add_argument_group("timing")
    g.add_argument("--backend", default="onnxruntime", help="runner backend (default onnxruntime)")
    g.add_argument("--batch", type=int, default=1, help="batch size of the inputs (default 1)")
    g.add_argument("--iterations", type=int, default=30, help="timed runs per artifact (default 30)")
    g.add_argument("--warmup", type=int, default=3, help="untimed runs per artifact first (default 3)")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    g.add_argument("--json", default=None, metavar="FILE", help="write the full report (machine, versions, raw times)")
    r = parser.add_argument_group("latency regression gate")
    r.add_argument("--baseline", default=None, metavar="FILE", help="compare with a baseline; exit 2 on a regression")
    r.add_argument("--max-regression", default="5%", metavar="PCT", help="allowed p50 slowdown (default 5%%)")
    r.add_argument("--max-regression-p99", default="10%", metavar="PCT", help="allowed p99 slowdown (default 10%%)")
    r.add_argument("--save-baseline", default=None, metavar="FILE", help="write this run as a baseline "
                   "(after the gate passes, when --baseline is also given)")


def run(args: argparse.Namespace) -> int:
    from apt_deploy.fileio import write_json_atomic
    from engines import baseline as bl
    from apt_deploy.settings import BenchSettings
    from engines.bench import benchmark, format_table, load_artifacts

    thresholds = bl.Thresholds(bl.parse_percent(args.max_regression, "--max-regression"),
                               bl.parse_percent(args.max_regression_p99, "--max-regression-p99"))
    reference = bl.load_baseline(args.baseline) if args.baseline else None
    settings = BenchSettings(backend=args.backend, batch=args.batch, iterations=args.iterations,
                             warmup=args.warmup, threads=args.threads)
    load_artifacts(args.artifacts)  # fail on a bad path before any session is created
    report = benchmark(args.artifacts, settings)
    print(format_table(report))
    if reference is not None:
        report["regression"] = _compare(bl, reference, report, thresholds)
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    if reference is not None:
        bl.gate([bl.Comparison(**c) for c in report["regression"]["comparisons"]], thresholds)
        print("latency gate: OK")
    if args.save_baseline:
        bl.save_baseline(report, args.save_baseline)
        print(f"wrote baseline {args.save_baseline}")
    return 0


def _compare(bl, reference: dict, report: dict, thresholds) -> dict:
    """Comparisons printed and recorded in the report (the gate itself runs after the JSON is written)."""
    from dataclasses import asdict

    warnings = bl.warn_if_incomparable(reference, report)
    comparisons = bl.compare(reference, report, thresholds)
    for c in comparisons:
        print(c.line())
    return {"thresholds": asdict(thresholds), "warnings": warnings,
            "comparisons": [asdict(c) for c in comparisons], "regressed": any(c.regressed for c in comparisons)}
