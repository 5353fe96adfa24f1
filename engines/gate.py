"""``bench --compare BASE CANDIDATE``: an interleaved A/B in one process with a statistical verdict.

The run is cut into blocks. Each block creates fresh sessions of both artifacts (``GateSettings.sessions``
each, in a seeded random creation order), warms them up and times them in paired, shuffled rounds with the
one timing core (engines.timing) for ``GateSettings.block_s`` seconds; the block's value is the p50 of its
per-round ratios candidate/base. Why blocks: on this 2-core machine a whole ONNX Runtime session can run
2 to 8 % faster or slower than an identical one (memory layout, its threads' placement), so a verdict
from a few sessions carries their luck (the first gate, 3 sessions per side for the whole run, gave
A/A ratios from 0.97 to 1.02). Blocks are independent replicates: engines.stats.blocked_ratio gives the
geometric mean and a Student-t interval over them. After ``min_blocks`` blocks the run stops once the
interval's half-width reaches ``target_half_width``, or when ``budget_s`` or ``max_blocks`` is spent. The
verdict and the smallest detectable regression come from engines.stats.

:class:`AdaptiveStop` is the round-wise stop rule of the ``--baseline`` gate (one session per artifact).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import RegressionError
from apt_deploy.settings import BenchSettings, GateSettings
from engines.bench import (RunnerFactory, Target, artifact_targets, build_report, default_factory, load_artifacts,
                           prepare, resolve)
from engines.machine import OtherLoadMeter, load_average
from engines.stats import REGRESSION, assess, blocked_ratio
from engines.timing import time_interleaved

log = logging.getLogger(__name__)
SESSION_LOG = logging.getLogger(f"{__name__}.sessions")  # each block's session loads: not logged (a line per block is)
SESSION_LOG.setLevel(logging.WARNING)
Times = list[list[float]]
HalfWidth = Callable[[list[str], Times], float]
PRECISION, BUDGET, MAX_ROUNDS, MAX_BLOCKS = ("precision reached", "time budget spent", "max iterations reached",
                                             "max blocks reached")


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


def session_plan(gate: GateSettings, seed: int, block: int = 0) -> list[int]:
    """Which artifact each session of a block is (0 base, 1 candidate), ``gate.sessions`` of each, in a
    creation order that is balanced across blocks: a seeded random order for even blocks, the same order
    with the sides swapped for the odd block after it. The session created first runs at a different speed
    than the one created after it (seen here: the gate's A/A ratio sat 1 % below 1 while a seeded-random
    order happened to create the base first in 65 % of the blocks); pairs of mirrored blocks cancel that."""
    plan = [0] * gate.sessions + [1] * gate.sessions
    order = [plan[i] for i in np.random.default_rng(seed + 7919 + block // 2).permutation(len(plan))]
    return order if block % 2 == 0 else [1 - side for side in order]


@dataclass
class Block:
    """One block: per round, the mean time of each side's sessions (seconds), and the memory of its loads."""

    base: list[float]
    candidate: list[float]
    memory: list[dict[str, float]]
    first: int  # the side whose session was created first (0 base, 1 candidate)

    @property
    def ratio(self) -> float:
        return float(np.median(np.asarray(self.candidate) / np.asarray(self.base)))


class BlockStop:
    """Ends a block's rounds after ``block_s`` seconds of timing and at least ``block_min_rounds`` rounds."""

    def __init__(self, gate: GateSettings):
        self.gate = gate

    def __call__(self, times: Times) -> bool:
        rounds = len(times[0])
        return rounds >= self.gate.block_min_rounds and sum(sum(t) for t in times) >= self.gate.block_s


def time_block(targets: list[Target], settings: BenchSettings, gate: GateSettings, index: int,
               clock: Callable[[], float]) -> Block:
    """Fresh sessions (seeded creation order), warmed up, timed in paired shuffled rounds, then released."""
    plan = session_plan(gate, settings.seed, index)
    prepared = []
    try:
        for side in plan:
            prepared.append(prepare(targets[side], settings, SESSION_LOG))
        times = time_interleaved([p.runner for p in prepared], [p.feed for p in prepared], gate.max_iterations,
                                 warmup=1, clock=clock, seed=settings.seed + index, shuffle=settings.shuffle,
                                 stop=BlockStop(gate))
    finally:
        for p in prepared:
            p.runner.deactivate()
    per_side = [np.mean([times[i] for i, s in enumerate(plan) if s == side], axis=0).tolist() for side in (0, 1)]
    return Block(per_side[0], per_side[1], [prepared[plan.index(side)].memory for side in (0, 1)], plan[0])


def run_blocks(targets: list[Target], settings: BenchSettings, gate: GateSettings,
               clock: Callable[[], float]) -> tuple[list[Block], str, list[list[float]]]:
    """Blocks until the interval is narrow enough (after ``min_blocks``), the budget or ``max_blocks`` is spent."""
    blocks: list[Block] = []
    checks: list[list[float]] = []
    t0, reason = clock(), MAX_BLOCKS
    while len(blocks) < gate.max_blocks:
        blocks.append(time_block(targets, settings, gate, len(blocks), clock))
        if len(blocks) < gate.min_blocks or len(blocks) % 2:  # whole mirrored pairs only
            log.info("block %d: ratio %.4f (%d rounds)", len(blocks), blocks[-1].ratio, len(blocks[-1].base))
            continue
        width = blocked_ratio([b.ratio for b in blocks], gate.confidence).half_width
        checks.append([len(blocks), round(width, 5)])
        log.info("block %d: ratio %.4f (%d rounds); CI half-width over %d blocks %.2f %% (target %.2f %%)",
                 len(blocks), blocks[-1].ratio, len(blocks[-1].base), len(blocks), width * 100,
                 gate.target_half_width * 100)
        if width <= gate.target_half_width:
            reason = PRECISION
            break
        if clock() - t0 >= gate.budget_s:
            reason = BUDGET
            break
    return blocks, reason, checks


def creation_order_effect(blocks: list[Block]) -> float | None:
    """Geometric-mean ratio of the blocks whose base session was created first over those whose candidate
    was, square-rooted: how much faster (< 1) or slower the later-created session ran. None without both."""
    by_first = [[np.log(b.ratio) for b in blocks if b.first == side] for side in (0, 1)]
    if not all(by_first):
        return None
    return float(np.exp((np.mean(by_first[0]) - np.mean(by_first[1])) / 2))


def compare_artifacts(base: str | Path, candidate: str | Path, settings: BenchSettings | None = None,
                      gate: GateSettings | None = None, factory: RunnerFactory | None = None,
                      clock: Callable[[], float] | None = None) -> dict[str, Any]:
    """The bench report of BASE and CANDIDATE (all blocks' rounds; memory of the first block's sessions) with a
    ``compare`` section: the p50 ratio candidate/base over blocks, its interval, the verdict against
    ``gate.max_regression``, the detectable slowdown and each block's ratio."""
    settings, gate = settings or BenchSettings(), gate or GateSettings()
    settings = replace(resolve(settings), peers=())
    clock = clock or time.perf_counter
    targets = artifact_targets(load_artifacts([base, candidate]), settings, factory or default_factory)
    load_before, t0 = load_average(), time.monotonic()
    with OtherLoadMeter() as other:
        blocks, reason, checks = run_blocks(targets, settings, gate, clock)
    seconds = time.monotonic() - t0
    load = {"before": load_before, "after": load_average(), "other_processes_cores": round(other.other_cores, 3)}
    times = [[t for b in blocks for t in b.base], [t for b in blocks for t in b.candidate]]
    report = build_report(targets, blocks[0].memory, times, settings, load)
    report["timing_s"] = round(seconds, 2)
    for row, side in zip(report["artifacts"], ("base", "candidate")):
        row["compare_side"] = side
    estimate = blocked_ratio([b.ratio for b in blocks], gate.confidence, rounds=len(times[0]))
    report["compare"] = {"base": Path(base).resolve().name, "candidate": Path(candidate).resolve().name,
                         **assess(estimate, gate.max_regression),
                         "ratio_of_p50s": float(np.median(times[1]) / np.median(times[0])), "rounds": len(times[0]),
                         "blocks": [{"ratio": round(b.ratio, 5), "rounds": len(b.base),
                                     "created_first": ("base", "candidate")[b.first]} for b in blocks],
                         "creation_order_effect": creation_order_effect(blocks),
                         "sessions_per_block": gate.sessions, "stopped_because": reason, "checks": checks,
                         "gate": asdict(gate)}
    log.info("compare: %s", format_compare(report))
    return report


def format_compare(report: dict[str, Any]) -> str:
    """Two lines: the ratio with its interval and the verdict, then the precision the run reached."""
    c = report["compare"]
    return (f"{c['verdict'].upper()}: p50 of {c['candidate']!r} / {c['base']!r} = {c['ratio']:.4f} "
            f"({c['confidence']:.0%} CI {c['low']:.4f} .. {c['high']:.4f}; allowed +{c['max_regression']:.1%})\n"
            f"{c['rounds']} paired rounds in {len(c['blocks'])} blocks of fresh sessions, {report['timing_s']:.1f} s "
            f"({c['stopped_because']}); CI half-width "
            f"{c['half_width']:.2%}; smallest regression this run could detect (power {c['power']:.0%}): "
            f"+{c['min_detectable_regression']:.1%}; other processes used "
            f"{report['load']['other_processes_cores']:.2f} cores")


def gate_compare(report: dict[str, Any]) -> None:
    """RegressionError when the verdict is a regression beyond the allowed slowdown."""
    c = report["compare"]
    if c["verdict"] == REGRESSION:
        raise RegressionError(f"latency regression: p50 of {c['candidate']!r} is {c['ratio']:.4f}x that of "
                              f"{c['base']!r} ({c['confidence']:.0%} CI {c['low']:.4f} .. {c['high']:.4f}, "
                              f"{c['rounds']} paired rounds in {len(c['blocks'])} blocks)",
                              f"a CI reaching at most {1 + c['max_regression']:.4f} (--max-regression "
                              f"{c['max_regression']:.1%})",
                              "find the slowdown in the candidate, or raise --max-regression if it is intended")
