"""The latency regression gate: save a baseline from a bench report, compare a later report with it.

A baseline is keyed by the machine kind (CPU model, usable cores, GPU) and the library versions it
was recorded with. Comparing against a baseline from another machine kind is allowed but logged as
a loud warning: cross-machine latency deltas say nothing about the code. p50 and p99 have their own
thresholds; every regression found is named (metric, artifact, both values) in one RegressionError.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt_deploy.errors import CheckpointError, ConfigError, RegressionError
from apt_deploy.fileio import read_json, write_json_atomic

log = logging.getLogger(__name__)
BASELINE_KIND, SCHEMA_VERSION = "apt-deploy-bench-baseline", 1
GATED_METRICS = ("p50_ms", "p99_ms")
VERSION_KEYS = ("apt_deploy", "onnxruntime", "onnx", "numpy", "tensorrt", "python")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Thresholds:
    """Allowed relative slowdowns as fractions (0.05 = 5 %)."""

    p50_ms: float = 0.05
    p99_ms: float = 0.10


@dataclass(frozen=True)
class Comparison:
    artifact: str
    metric: str
    baseline: float
    current: float
    allowed: float

    @property
    def change(self) -> float:
        return self.current / self.baseline - 1.0 if self.baseline > 0 else float("inf")

    @property
    def regressed(self) -> bool:
        return self.change > self.allowed

    def line(self) -> str:
        verdict = "REGRESSED" if self.regressed else "ok"
        return (f"{verdict:9s} {self.metric[:-3]} of {self.artifact!r}: baseline {self.baseline:.3f} ms -> now "
                f"{self.current:.3f} ms ({self.change:+.1%}, allowed +{self.allowed:.1%})")


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
            "artifacts": {a["name"]: {m: a["stats"][m] for m in (*GATED_METRICS, "p90_ms", "mean_ms")}
                          for a in report["artifacts"]}}


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
                              f"kind={BASELINE_KIND!r}, schema_version={SCHEMA_VERSION}",
                              "pass a file written by apt-deploy bench --save-baseline")
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


def compare(baseline: dict[str, Any], report: dict[str, Any], thresholds: Thresholds) -> list[Comparison]:
    """One Comparison per (artifact present in both, gated metric); artifacts in only one are logged."""
    current = {a["name"]: a["stats"] for a in report["artifacts"]}
    only = sorted(set(current) ^ set(baseline["artifacts"]))
    if only:
        log.warning("artifacts not in both the baseline and this run (not gated): %s", ", ".join(only))
    return [Comparison(name, m, baseline["artifacts"][name][m], current[name][m], getattr(thresholds, m))
            for name in current if name in baseline["artifacts"] for m in GATED_METRICS]


def gate(comparisons: list[Comparison], thresholds: Thresholds) -> None:
    """Raise RegressionError naming every regressed metric, artifact and both values."""
    failed = [c for c in comparisons if c.regressed]
    if not comparisons:
        raise RegressionError("no artifact of this run is in the baseline, so nothing was gated",
                              "the same artifact directory names as when the baseline was saved",
                              "benchmark the same artifacts, or re-record the baseline")
    if failed:
        raise RegressionError(f"{len(failed)} latency regression(s): " + "; ".join(c.line() for c in failed),
                              f"p50 at most +{thresholds.p50_ms:.1%} and p99 at most +{thresholds.p99_ms:.1%} over the baseline",
                              "find the slowdown, or re-record the baseline with --save-baseline if it is intended")
