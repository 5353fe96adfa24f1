"""Interleaved latency timing of several runners in one process (A B A B ...), and summary statistics.

Never used in assertions: speed is measured by benchmark commands that write JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engines.runners import Feed, Runner


def time_interleaved(runners: Sequence[Runner], feeds: Sequence[Feed], iterations: int, warmup: int = 3,
                     on_round: Callable[[int], None] | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per call for each runner; runner i gets ``feeds[i]``. Order rotates every round so no
    runner is always first after the others; ``on_round(r)`` runs after round ``r``, outside the timed
    calls. ``clock`` is injectable so tests can use a fake one."""
    for runner, feed in zip(runners, feeds):
        for _ in range(warmup):
            runner.infer(feed)
        runner.synchronize()
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(iterations):
        for i in order[r % len(order):] + order[: r % len(order)]:
            t0 = clock()
            runners[i].infer(feeds[i])
            runners[i].synchronize()
            times[i].append(clock() - t0)
        if on_round:
            on_round(r)
    return times


def summarize(seconds: Sequence[float], batch: int = 1) -> dict[str, float]:
    """p50/p90/p99/mean/std in milliseconds and throughput in samples/s."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std()), "min_ms": float(ms.min()), "iterations": int(ms.size),
            "throughput_per_s": float(batch * 1e3 / p50) if p50 > 0 else float("inf")}


def ratio_table(stats: Mapping[str, Mapping[str, float]], key: str = "p50_ms") -> dict[str, float]:
    """Each entry's ``key`` divided by the first entry's."""
    names = list(stats)
    base = stats[names[0]][key]
    return {n: stats[n][key] / base for n in names}
