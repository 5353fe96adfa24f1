"""``apt-deploy bench``: time exported artifacts interleaved in one process; optional latency regression gate."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engines.baseline import Comparison, Thresholds

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
    from apt_deploy.settings import BenchSettings
    from engines import baseline as bl
    from engines.bench import benchmark, format_table

    thresholds = bl.Thresholds(bl.parse_percent(args.max_regression, "--max-regression"),
                               bl.parse_percent(args.max_regression_p99, "--max-regression-p99"))
    reference = bl.load_baseline(args.baseline) if args.baseline else None
    settings = BenchSettings(backend=args.backend, batch=args.batch, iterations=args.iterations,
                             warmup=args.warmup, threads=args.threads)
    report = benchmark(args.artifacts, settings)  # reads every manifest before any session is created
    print(format_table(report))
    comparisons = _compare(reference, report, thresholds) if reference is not None else None
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    if comparisons is not None:
        bl.gate(comparisons, thresholds)
        print("latency gate: OK")
    if args.save_baseline:
        bl.save_baseline(report, args.save_baseline)
        print(f"wrote baseline {args.save_baseline}")
    return 0


def _compare(reference: dict[str, Any], report: dict[str, Any], thresholds: Thresholds) -> list[Comparison]:
    """Print the comparisons and record them in ``report["regression"]`` (the gate itself runs after the
    JSON is written)."""
    from dataclasses import asdict

    from engines import baseline as bl

    warnings = bl.warn_if_incomparable(reference, report)
    comparisons = bl.compare(reference, report, thresholds)
    for c in comparisons:
        print(c.line())
    report["regression"] = {"thresholds": asdict(thresholds), "warnings": warnings,
                            "comparisons": [asdict(c) for c in comparisons],
                            "regressed": any(c.regressed for c in comparisons)}
    return comparisons
