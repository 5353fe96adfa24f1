"""``apt-deploy bench``: time exported artifacts (and their PyTorch peers) interleaved in one process; an
A/B comparison with a statistical verdict (``--compare``); a stored-baseline gate (``--baseline``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apt_deploy.settings import BenchSettings, GateSettings

NAME = "bench"
HELP = ("time exported artifacts interleaved in one process, a shuffled order per round (p50/p90/p99, throughput, "
        "memory, size, ratio to the first), with PyTorch peers; --compare A B gives a statistical regression verdict")
DEFAULT_MAX_REGRESSION = {"compare": "2%", "baseline": "5%"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="*", metavar="ARTIFACT_DIR", help="directories written by apt-deploy export; "
                        "the first is the reference of the ratio column")
    g = parser.add_argument_group("timing")
    g.add_argument("--backend", default="onnxruntime", help="runner backend (default onnxruntime)")
    g.add_argument("--batch", type=int, default=1, help="batch size of the inputs (default 1)")
    g.add_argument("--iterations", type=int, default=30, help="timed rounds (default 30; --compare/--baseline: "
                   "adaptive, see the gate options)")
    g.add_argument("--warmup", type=int, default=3, help="untimed runs per path first (default 3)")
    g.add_argument("--threads", type=int, default=None, help="intra-op threads of ONNX Runtime and torch alike "
                   "(default: the physical cores)")
    g.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the per-round order (default 0)")
    g.add_argument("--no-shuffle", action="store_true", help="rotate the order instead of shuffling it per round "
                   "(carries order effects; for demonstrations)")
    g.add_argument("--spinning", action="store_true", help="let ONNX Runtime threads spin after a run (its default; "
                   "biases interleaved ratios, off here unless given)")
    g.add_argument("--json", default=None, metavar="FILE", help="write the full report (machine, versions, raw times)")
    p = parser.add_argument_group("PyTorch peers")
    p.add_argument("--peers", default="", metavar="LIST", help="also time the PyTorch model each artifact came from, "
                   "same rounds: torch-eager,torch-compile (rows named ARTIFACT@PEER)")
    p.add_argument("--model", default=None, metavar="DIR", help="base model directory for the peers (default: the "
                   "manifest's source)")
    p.add_argument("--prompts", default=None, metavar="DIR", help="prompt directory for the peers (default: the "
                   "manifest's source)")
    r = parser.add_argument_group("statistical latency gate")
    r.add_argument("--compare", nargs=2, default=None, metavar=("BASE_DIR", "CANDIDATE_DIR"),
                   help="interleaved A/B: CI of the p50 of per-round ratios CANDIDATE/BASE; exit 2 on a regression")
    r.add_argument("--baseline", default=None, metavar="FILE", help="compare with a stored baseline (two-sample CI); "
                   "exit 2 on a regression")
    r.add_argument("--max-regression", default=None, metavar="PCT", help="allowed p50 slowdown: a regression is a CI "
                   "wholly above it (default 2%% with --compare, 5%% with --baseline)")
    r.add_argument("--max-regression-p99", default="10%", metavar="PCT", help="allowed p99 slowdown, --baseline "
                   "(default 10%%)")
    r.add_argument("--confidence", default="95%", metavar="PCT", help="confidence of the interval (default 95%%)")
    r.add_argument("--target-ci", default="1%", metavar="PCT", help="stop timing once the CI half-width is at most "
                   "this (default 1%%)")
    r.add_argument("--budget", type=float, default=60.0, metavar="S", help="stop after S seconds (default 60; "
                   "--compare: no new block after S, session creation included; --baseline: timing seconds)")
    r.add_argument("--min-iterations", type=int, default=20, help="--baseline: rounds before the first CI check "
                   "(default 20)")
    r.add_argument("--max-iterations", type=int, default=5000, help="--baseline: rounds at most (default 5000)")
    r.add_argument("--sessions", type=int, default=1, help="--compare: fresh sessions per artifact in each block "
                   "(default 1)")
    r.add_argument("--block-seconds", type=float, default=1.0, metavar="S", help="--compare: timing seconds per "
                   "block of fresh sessions (default 1; at least 10 rounds)")
    r.add_argument("--min-blocks", type=int, default=8, help="--compare: blocks always timed, whatever the budget "
                   "(default 8)")
    r.add_argument("--save-baseline", default=None, metavar="FILE", help="write this run (raw times) as a baseline "
                   "(after the gate passes, when --baseline is also given); record it with --iterations 200 or more")


def run(args: argparse.Namespace) -> int:
    settings, gate_settings = _settings(args)
    if args.compare:
        return _run_compare(args, settings, gate_settings)
    return _run_bench(args, settings, gate_settings)


def _settings(args: argparse.Namespace) -> tuple[BenchSettings, GateSettings]:
    from apt_deploy.errors import ConfigError
    from apt_deploy.settings import BenchSettings, GateSettings
    from engines import baseline as bl

    if bool(args.compare) == bool(args.artifacts) or (args.compare and (args.baseline or args.peers)):
        raise ConfigError(f"artifacts {args.artifacts}, --compare {args.compare}, --baseline {args.baseline}, "
                          f"--peers {args.peers!r}", "either ARTIFACT_DIR ... (with --peers / --baseline if wanted) or "
                          "--compare BASE_DIR CANDIDATE_DIR alone", "pass one of the two forms")
    mode = "compare" if args.compare else "baseline"
    max_regression = args.max_regression or DEFAULT_MAX_REGRESSION[mode]
    gate_settings = GateSettings(
        max_regression=bl.parse_percent(max_regression, "--max-regression"),
        max_regression_p99=bl.parse_percent(args.max_regression_p99, "--max-regression-p99"),
        confidence=bl.parse_percent(args.confidence, "--confidence"),
        target_half_width=bl.parse_percent(args.target_ci, "--target-ci"), budget_s=args.budget,
        min_iterations=args.min_iterations, max_iterations=args.max_iterations, sessions=args.sessions,
        block_s=args.block_seconds, min_blocks=args.min_blocks)
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    settings = BenchSettings(backend=args.backend, batch=args.batch, iterations=args.iterations, warmup=args.warmup,
                             threads=args.threads, seed=args.seed, shuffle=not args.no_shuffle,
                             spinning=args.spinning, peers=peers)
    return settings, gate_settings


def _run_compare(args: argparse.Namespace, settings: BenchSettings, gate_settings: GateSettings) -> int:
    from apt_deploy.fileio import write_json_atomic
    from engines.bench import format_table
    from engines.gate import compare_artifacts, format_compare, gate_compare

    report = compare_artifacts(args.compare[0], args.compare[1], settings, gate_settings)
    print(format_table(report))
    print(format_compare(report))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    gate_compare(report)
    return 0


def _run_bench(args: argparse.Namespace, settings: BenchSettings, gate_settings: GateSettings) -> int:
    from dataclasses import replace

    from apt_deploy.fileio import write_json_atomic
    from engines import baseline as bl
    from engines.bench import benchmark, format_table

    reference = bl.load_baseline(args.baseline) if args.baseline else None
    stop = None
    if reference is not None:
        from engines.gate import AdaptiveStop

        settings = replace(settings, iterations=max(settings.iterations, gate_settings.max_iterations))
        stop = AdaptiveStop(gate_settings, bl.half_width_rule(reference, gate_settings, settings.seed))
    # reads every manifest before any session is created
    report = benchmark(args.artifacts, settings, load_model=_load_model(args) if settings.peers else None, stop=stop)
    print(format_table(report))
    comparisons = _compare(reference, report, gate_settings, stop) if reference is not None else None
    if args.json:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}")
    if comparisons is not None:
        bl.gate(comparisons)
        print("latency gate: OK (no p50/p99 interval wholly above its allowed slowdown)")
    if args.save_baseline:
        bl.save_baseline(report, args.save_baseline)
        print(f"wrote baseline {args.save_baseline}")
    return 0


def _load_model(args: argparse.Namespace) -> Any:
    """The peers' load_model: the PyTorch form of an artifact, from its manifest's sources or --model/--prompts."""
    def load(artifact: Any) -> Any:
        from apt_deploy.pipeline import load_reference_module

        return load_reference_module(artifact.manifest, args.model, args.prompts)

    return load


def _compare(reference: dict[str, Any], report: dict[str, Any], gate_settings: GateSettings,
             stop: Any) -> list[Any]:
    """Print the comparisons and record them in ``report["regression"]`` (the gate itself runs after the
    JSON is written)."""
    from engines import baseline as bl

    warnings = bl.warn_if_incomparable(reference, report)
    comparisons = bl.compare(reference, report, gate_settings)
    for c in comparisons:
        print(c.line())
    print(bl.DRIFT_NOTE)
    bl.record(report, comparisons, warnings, gate_settings, stop.reason if stop else None)
    return comparisons
