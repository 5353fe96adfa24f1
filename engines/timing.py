"""The one timing core: several runners timed interleaved in one process, round by round, and summary statistics.

Every round times each runner once, in an order drawn from a seeded RNG (``shuffle=True``), so no
runner is systematically first, or systematically right after a particular other runner: effects such
as one backend's worker threads still spinning while the next one runs average out instead of
biasing a ratio. Rounds are paired: ``times[i][r]`` and ``times[j][r]`` were measured moments apart,
which is what engines.stats' paired statistics use. ``stop(times)`` ends the timing early (adaptive
iteration counts for ``--compare``); ``iterations`` is then the maximum.

Never used in assertions: speed is measured by benchmark commands that write JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from engines.runners import Feed, Runner

Times = list[list[float]]


def round_orders(n: int, rounds: int, seed: int = 0, shuffle: bool = True) -> list[list[int]]:
    """The order of each round: a seeded random permutation per round, or (``shuffle=False``) the old
    rotation A B C, B C A, ... (kept to show the bias it carries)."""
    if shuffle:
        rng = np.random.default_rng(seed)
        return [[int(i) for i in rng.permutation(n)] for _ in range(rounds)]
    return [[(r + k) % n for k in range(n)] for r in range(rounds)]


def warm_up(runners: Sequence[Runner], feeds: Sequence[Feed], warmup: int) -> None:
    for runner, feed in zip(runners, feeds):
        for _ in range(warmup):
            runner.infer(feed)
        runner.synchronize()


def time_interleaved(runners: Sequence[Runner], feeds: Sequence[Feed], iterations: int, warmup: int = 3,
                     on_round: Callable[[int], None] | None = None,
                     clock: Callable[[], float] = time.perf_counter, seed: int = 0, shuffle: bool = True,
                     stop: Callable[[Times], bool] | None = None) -> Times:
    """Seconds per call for each runner (runner i gets ``feeds[i]``), one entry per round, at most
    ``iterations`` rounds. ``on_round(r)`` and ``stop(times)`` run after round ``r``, outside the timed
    calls; ``clock`` is injectable so tests can use a fake one."""
    warm_up(runners, feeds, warmup)
    times: Times = [[] for _ in runners]
    for r, order in enumerate(round_orders(len(runners), iterations, seed, shuffle)):
        for i in order:
            t0 = clock()
            runners[i].infer(feeds[i])
            runners[i].synchronize()
            times[i].append(clock() - t0)
        if on_round:
            on_round(r)
        if stop is not None and stop(times):
            break
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
