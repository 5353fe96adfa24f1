"""``bench --compare BASE CANDIDATE``: an interleaved A/B in one process with a statistical verdict.

Each artifact gets ``GateSettings.sessions`` ONNX Runtime sessions, created in a seeded random order: on a
loaded machine a whole session can run a few % faster or slower than an identical one (seen here: up to
2 to 8 % between sessions of the same file), so one session per side would turn that into a false verdict.
All sessions are timed by the one timing core (engines.bench.benchmark -> engines.timing) in paired,
shuffled rounds. The rounds go on until the bootstrap interval (sessions and blocks of rounds resampled,
engines.stats.replicated_ratio) of the p50 of the per-round ratios candidate/base is narrow enough (``GateSettings.target_half_width``), or the time budget or the round
limit is spent (:class:`AdaptiveStop`, also used by the baseline gate). The verdict and the smallest
detectable regression come from engines.stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from apt_deploy.errors import RegressionError
from apt_deploy.settings import BenchSettings, GateSettings
from engines.bench import RunnerFactory, benchmark
from engines.stats import REGRESSION, assess, replicated_ratio

log = logging.getLogger(__name__)
Times = list[list[float]]
HalfWidth = Callable[[list[str], Times], float]
PRECISION, BUDGET, MAX_ROUNDS = "precision reached", "time budget spent", "max iterations reached"


class AdaptiveStop:
    """A ``StopRule`` for engines.bench.benchmark: after ``min_iterations`` rounds, every ``check_every``
    rounds, ``half_width(names, times)`` is computed; timing stops once it is <= the target, or once
    ``budget_s`` (on ``clock``) has passed since the first round began. ``reason`` says which."""

    def __init__(self, gate: GateSettings, half_width: HalfWidth, clock: Callable[[], float] | None = None):
        self.gate, self.half_width, self.clock = gate, half_width, clock or time.perf_counter
        self.reason, self.checks = MAX_ROUNDS, []
        self._t0: float | None = None

    def __call__(self, names: list[str], times: Times) -> bool:
        rounds = len(times[0])
        if self._t0 is None:
            self._t0 = self.clock() - sum(t[0] for t in times)  # the first round started before this call
        if rounds >= self.gate.min_iterations and (rounds - self.gate.min_iterations) % self.gate.check_every == 0:
            width = self.half_width(names, times)
            self.checks.append([rounds, round(width, 5)])
            if width <= self.gate.target_half_width:
                self.reason = PRECISION
                return True
        if self.clock() - self._t0 >= self.gate.budget_s:
            self.reason = BUDGET
            return True
        return False


def interim_resamples(gate: GateSettings) -> int:
    """Fewer resamples for the interim checks (the final interval uses ``gate.resamples``)."""
    return max(200, gate.resamples // 4)


def session_plan(gate: GateSettings, seed: int) -> list[int]:
    """Which artifact each session is (0 base, 1 candidate), ``gate.sessions`` of each, in a seeded random
    creation order (a session created first or last must not always be the same artifact's)."""
    import numpy as np

    plan = [0] * gate.sessions + [1] * gate.sessions
    return [plan[i] for i in np.random.default_rng(seed + 7919).permutation(len(plan))]


def compare_artifacts(base: str | Path, candidate: str | Path, settings: BenchSettings | None = None,
                      gate: GateSettings | None = None, factory: RunnerFactory | None = None,
                      clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """The bench report of ``gate.sessions`` sessions each of BASE and CANDIDATE (adaptive rounds) with a
    ``compare`` section: the p50 ratio candidate/base, its interval, the verdict against
    ``gate.max_regression`` and the detectable slowdown."""
    import numpy as np

    settings, gate = settings or BenchSettings(), gate or GateSettings()
    settings = replace(settings, iterations=gate.max_iterations, peers=())
    clock = clock or time.perf_counter
    plan = session_plan(gate, settings.seed)
    sides = [[i for i, side in enumerate(plan) if side == k] for k in (0, 1)]

    def estimate(times: Times, resamples: int) -> Any:
        return replicated_ratio([times[i] for i in sides[0]], [times[i] for i in sides[1]], 0.5, gate.confidence,
                                resamples, settings.seed)

    stop = AdaptiveStop(gate, lambda _names, times: estimate(times, interim_resamples(gate)).half_width, clock)
    report = benchmark([candidate if side else base for side in plan], settings, factory, clock, stop=stop)
    rows = report["artifacts"]
    for row, side in zip(rows, plan):
        row["compare_side"] = ("base", "candidate")[side]
    times = [r["times_ms"] for r in rows]
    pooled = [np.median([t for i in idx for t in times[i]]) for idx in sides]
    report["compare"] = {"base": Path(base).resolve().name, "candidate": Path(candidate).resolve().name,
                         "sessions": {"base": [rows[i]["name"] for i in sides[0]],
                                      "candidate": [rows[i]["name"] for i in sides[1]]},
                         **assess(estimate(times, gate.resamples), gate.max_regression),
                         "ratio_of_p50s": float(pooled[1] / pooled[0]), "rounds": len(times[0]),
                         "stopped_because": stop.reason, "checks": stop.checks, "gate": asdict(gate)}
    log.info("compare: %s", format_compare(report))
    return report


def format_compare(report: dict[str, Any]) -> str:
    """Two lines: the ratio with its interval and the verdict, then the precision the run reached."""
    c = report["compare"]
    return (f"{c['verdict'].upper()}: p50 of {c['candidate']!r} / {c['base']!r} = {c['ratio']:.4f} "
            f"({c['confidence']:.0%} CI {c['low']:.4f} .. {c['high']:.4f}; allowed +{c['max_regression']:.1%})\n"
            f"{c['rounds']} paired rounds x {len(c['sessions']['base'])} sessions each in {report['timing_s']:.1f} s ({c['stopped_because']}); CI half-width "
            f"{c['half_width']:.2%}; smallest regression this run could detect (power {c['power']:.0%}): "
            f"+{c['min_detectable_regression']:.1%}; other processes used "
            f"{report['load']['other_processes_cores']:.2f} cores")


def gate_compare(report: dict[str, Any]) -> None:
    """RegressionError when the verdict is a regression beyond the allowed slowdown."""
    c = report["compare"]
    if c["verdict"] == REGRESSION:
        raise RegressionError(f"latency regression: p50 of {c['candidate']!r} is {c['ratio']:.4f}x that of "
                              f"{c['base']!r} ({c['confidence']:.0%} CI {c['low']:.4f} .. {c['high']:.4f}, "
                              f"{c['rounds']} paired rounds)",
                              f"a CI reaching at most {1 + c['max_regression']:.4f} (--max-regression "
                              f"{c['max_regression']:.1%})",
                              "find the slowdown in the candidate, or raise --max-regression if it is intended")
