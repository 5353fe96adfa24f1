"""The stored-baseline latency gate: save a baseline from a bench report, compare a later run with it.

A baseline stores every artifact's raw per-iteration times (schema 2), so a later run is compared with
the same statistics as ``bench --compare`` (engines.stats): a two-sample bootstrap interval on the
p50 ratio now/baseline (and on the p99 ratio, with its own threshold), the verdict regression /
no regression / inconclusive, and the smallest detectable regression. Unlike ``--compare`` (paired
rounds in one process), the two samples come from different sessions: drift between them (other
load, thermal state, the OS) is not in the interval, which the report says.

A baseline is keyed by the machine kind (CPU model, usable cores, GPU) and the library versions it
was recorded with. Comparing against a baseline from another machine kind is allowed but logged as
a loud warning: cross-machine latency deltas say nothing about the code. Every regression found is
named (metric, artifact, both values, the interval) in one RegressionError.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apt_deploy.errors import CheckpointError, ConfigError, RegressionError
from apt_deploy.fileio import read_json, write_json_atomic
from apt_deploy.settings import GateSettings
from engines.stats import REGRESSION, assess, two_sample_ratio

log = logging.getLogger(__name__)
BASELINE_KIND, SCHEMA_VERSION = "apt-deploy-bench-baseline", 2
GATED_METRICS = {"p50_ms": 0.5, "p99_ms": 0.99}  # metric -> quantile
DRIFT_NOTE = ("cross-run comparison: the interval covers the iteration-to-iteration noise of both sessions, not "
              "the drift between them (other load, thermal state, OS); prefer bench --compare BASE CANDIDATE")
VERSION_KEYS = ("apt_deploy", "onnxruntime", "onnx", "numpy", "tensorrt", "python")
Times = list[list[float]]
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Comparison:
    """One gated metric of one artifact: the two-sample ratio now/baseline with its verdict."""

    artifact: str
    metric: str
    baseline: float
    current: float
    allowed: float
    assessment: dict[str, Any]

    @property
    def change(self) -> float:
        return self.assessment["ratio"] - 1.0

    @property
    def regressed(self) -> bool:
        return self.assessment["verdict"] == REGRESSION

    def line(self) -> str:
        a = self.assessment
        return (f"{a['verdict'].upper():13s} {self.metric[:-3]} of {self.artifact!r}: baseline {self.baseline:.3f} ms "
                f"-> now {self.current:.3f} ms ({self.change:+.1%}, {a['confidence']:.0%} CI {a['low'] - 1:+.1%} .. "
                f"{a['high'] - 1:+.1%}, allowed +{self.allowed:.1%}, detectable >= +{a['min_detectable_regression']:.1%})")


def parse_percent(text: str, flag: str) -> float:
    """``"5%"`` -> 0.05. Only an explicit percentage is accepted (a bare 0.05 would be ambiguous)."""
    match = _PERCENT.match(str(text))
    if not match:
        raise ConfigError(f"{flag} {text!r}", "a non-negative percentage such as 5% or 2.5%",
                          f"pass e.g. {flag} 5%")
    return float(match.group(1)) / 100.0


def make_baseline(report: dict[str, Any]) -> dict[str, Any]:
    """The subset of a bench report a later run is gated against."""
    return {"kind": BASELINE_KIND, "schema_version": SCHEMA_VERSION, "created": report["created"],
            "key": {"machine": report["machine"]["machine_key"], "versions": _keyed_versions(report)},
            "machine": report["machine"], "settings": report["settings"],
            "artifacts": {a["name"]: {**{m: a["stats"][m] for m in (*GATED_METRICS, "p90_ms", "mean_ms")},
                                      "times_ms": a["times_ms"]} for a in report["artifacts"]}}


def save_baseline(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, make_baseline(report))
    log.info("saved latency baseline for %d artifacts to %s", len(report["artifacts"]), path)
    return path


def load_baseline(path: str | Path) -> dict[str, Any]:
    data = read_json(path, "baseline file", "a file written by --save-baseline",
                     "record one first: apt-deploy bench ... --save-baseline FILE")
    if data.get("kind") != BASELINE_KIND or data.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{str(path)!r} has kind={data.get('kind')!r}, schema_version={data.get('schema_version')!r}",
                              f"kind={BASELINE_KIND!r}, schema_version={SCHEMA_VERSION} (it stores the raw times)",
                              "re-record it with apt-deploy bench ... --iterations 200 --save-baseline FILE")
    return data


def _keyed_versions(report: dict[str, Any]) -> dict[str, str]:
    """The library versions a baseline is keyed by (VERSION_KEYS present in the report)."""
    return {k: v for k, v in report["versions"].items() if k in VERSION_KEYS}


def warn_if_incomparable(baseline: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Loud warning on another machine kind; a plain warning on other library versions or settings."""
    warnings: list[str] = []
    here, there = report["machine"]["machine_key"], baseline["key"]["machine"]
    if here != there:
        warnings.append(f"BASELINE FROM ANOTHER MACHINE KIND: baseline recorded on [{there}], this run on [{here}]; "
                        "latency deltas across machines say nothing about the code; record a baseline on this machine")
        log.warning("\n%s\n%s\n%s", "!" * 100, warnings[-1], "!" * 100)
    old_versions = baseline["key"]["versions"]
    changed = {k: (old_versions.get(k), v) for k, v in _keyed_versions(report).items() if old_versions.get(k) != v}
    if changed:
        warnings.append(f"library versions differ from the baseline's: {changed}")
        log.warning(warnings[-1])
    settings = {k: v for k, v in report["settings"].items() if baseline["settings"].get(k) != v and k != "iterations"}
    if settings:
        warnings.append(f"bench settings differ from the baseline's: {settings} vs {baseline['settings']}")
        log.warning(warnings[-1])
    return warnings


def shared_names(baseline: dict[str, Any], names: list[str]) -> list[str]:
    return [n for n in names if n in baseline["artifacts"]]


def half_width_rule(baseline: dict[str, Any], gate: GateSettings, seed: int = 0) -> Callable[[list[str], Times], float]:
    """For engines.gate.AdaptiveStop: the widest p50 interval over the artifacts the baseline has."""
    from engines.gate import interim_resamples

    def width(names: list[str], times: Times) -> float:
        widths = [two_sample_ratio(baseline["artifacts"][n]["times_ms"], [t * 1e3 for t in ts], 0.5,
                                   gate.confidence, interim_resamples(gate), seed).half_width
                  for n, ts in zip(names, times) if n in baseline["artifacts"]]
        return max(widths, default=0.0)

    return width


def compare(baseline: dict[str, Any], report: dict[str, Any], gate: GateSettings) -> list[Comparison]:
    """One Comparison per (artifact present in both, gated metric); artifacts in only one are logged."""
    current = {a["name"]: a for a in report["artifacts"]}
    only = sorted(set(current) ^ set(baseline["artifacts"]))
    if only:
        log.warning("artifacts not in both the baseline and this run (not gated): %s", ", ".join(only))
    allowed = {"p50_ms": gate.max_regression, "p99_ms": gate.max_regression_p99}
    out = []
    for name in shared_names(baseline, list(current)):
        old, new = baseline["artifacts"][name], current[name]
        for metric, q in GATED_METRICS.items():
            est = two_sample_ratio(old["times_ms"], new["times_ms"], q, gate.confidence, gate.resamples,
                                   report["settings"]["seed"])
            out.append(Comparison(name, metric, old[metric], new["stats"][metric], allowed[metric],
                                  assess(est, allowed[metric])))
    return out


def record(report: dict[str, Any], comparisons: list[Comparison], warnings: list[str], gate: GateSettings,
           stopped_because: str | None = None) -> None:
    """The comparisons, in ``report["regression"]`` (written to the JSON before the gate fails)."""
    report["regression"] = {"gate": asdict(gate), "warnings": warnings, "note": DRIFT_NOTE,
                            "stopped_because": stopped_because,
                            "comparisons": [{**{k: v for k, v in asdict(c).items()}, "regressed": c.regressed}
                                            for c in comparisons],
                            "regressed": any(c.regressed for c in comparisons)}


def gate(comparisons: list[Comparison]) -> None:
    """Raise RegressionError naming every regressed metric, artifact and both values."""
    failed = [c for c in comparisons if c.regressed]
    if not comparisons:
        raise RegressionError("no artifact of this run is in the baseline, so nothing was gated",
                              "the same artifact directory names as when the baseline was saved",
                              "benchmark the same artifacts, or re-record the baseline")
    if failed:
        limits = sorted({f"{c.metric[:-3]} +{c.allowed:.1%}" for c in failed})
        raise RegressionError(f"{len(failed)} latency regression(s): " + "; ".join(c.line() for c in failed),
                              f"a ratio interval reaching at most the allowed slowdown ({', '.join(limits)}); "
                              + DRIFT_NOTE,
                              "find the slowdown, or re-record the baseline with --save-baseline if it is intended")
