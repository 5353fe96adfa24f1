"""Confidence intervals on latency ratios and the regression verdict (numpy only, seeded, no torch).

Two estimators, one verdict rule:

- ``paired_ratio`` (``bench --compare``): both artifacts were timed in the same rounds, so the ratio
  candidate/base is taken per round and its quantile (the p50 by default) is the estimate. The
  bootstrap resamples whole rounds (in blocks of consecutive rounds), which keeps the pairing: machine-wide drift that hits both
  artifacts in a round cancels in the ratio.
- ``two_sample_ratio`` (``bench --baseline``): the stored times and this run's times are independent
  samples; the estimate is quantile(current) / quantile(baseline) and the bootstrap resamples each
  sample on its own. Drift between the two sessions (other load, thermal state, a library update) is
  *not* in the interval: a cross-run comparison carries it on top.

The verdict against an allowed slowdown m: ``regression`` when the whole interval lies above 1 + m,
``no regression`` when it lies at or below 1 + m, else ``inconclusive``. ``min_detectable`` is the
smallest slowdown such a run flags as a regression with probability ``POWER`` (normal approximation
of the interval): m + half_width * (z_conf + z_power) / z_conf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from apt_deploy.errors import ConfigError

POWER = 0.8
REGRESSION, NO_REGRESSION, INCONCLUSIVE = "regression", "no regression", "inconclusive"


@dataclass(frozen=True)
class RatioEstimate:
    """A ratio candidate/base of a latency quantile with its bootstrap percentile interval."""

    ratio: float
    low: float
    high: float
    confidence: float
    quantile: float
    method: str
    n_base: int
    n_candidate: int
    resamples: int

    @property
    def half_width(self) -> float:
        """Half the interval's width, in ratio units (0.01 = +-1 %)."""
        return (self.high - self.low) / 2.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "half_width": self.half_width}


def _interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    return float(low), float(high)


def _as_array(x: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 2 or not np.all(arr > 0):
        raise ConfigError(f"{what}: {arr.size} time(s), not all positive", ">= 2 positive per-iteration times",
                          "time more iterations (--min-iterations / --iterations), or re-record the baseline")
    return arr


def block_indices(rng: np.random.Generator, n: int, resamples: int, block: int | None = None) -> np.ndarray:
    """Circular block bootstrap indices (resamples x n): runs of ``block`` consecutive rounds (default
    ceil(n ** (1/3))), so load bursts that span several rounds widen the interval instead of hiding in it."""
    block = block or int(np.ceil(n ** (1.0 / 3.0)))
    starts = rng.integers(0, n, size=(resamples, -(-n // block)))
    return ((starts[:, :, None] + np.arange(block)) % n).reshape(resamples, -1)[:, :n]


def paired_ratio(base: Sequence[float], candidate: Sequence[float], quantile: float = 0.5,
                 confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> RatioEstimate:
    """Quantile of the per-round ratios candidate[r] / base[r], rounds resampled together."""
    a, b = _as_array(base, "base"), _as_array(candidate, "candidate")
    if a.size != b.size:
        raise ConfigError(f"paired times: {a.size} base vs {b.size} candidate values", "one value per round each",
                          "pass times from the same interleaved rounds")
    ratios = b / a
    boot = np.quantile(ratios[block_indices(np.random.default_rng(seed), ratios.size, resamples)], quantile, axis=1)
    low, high = _interval(boot, confidence)
    return RatioEstimate(float(np.quantile(ratios, quantile)), low, high, confidence, quantile,
                         "paired: quantile of per-round ratios, circular block bootstrap over rounds", a.size, b.size, resamples)


def replicated_ratio(base: Sequence[Sequence[float]], candidate: Sequence[Sequence[float]], quantile: float = 0.5,
                     confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> RatioEstimate:
    """Paired rounds over several sessions per side (``base[k][r]``: session k, round r). Per round, the mean
    over the candidate's sessions divided by the mean over the base's; the estimate is that ratio's quantile.
    The bootstrap resamples sessions (each side, with replacement) and blocks of rounds, so a session that
    happens to be fast or slow as a whole (memory layout, its threads' scheduling) widens the interval
    instead of biasing it. One session per side is ``paired_ratio``."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] < 2 or not (np.all(a > 0) and np.all(b > 0)):
        raise ConfigError(f"times of shapes {a.shape} and {b.shape}", "sessions x rounds, the same rounds, >= 2 rounds",
                          "pass the times of the same interleaved rounds")
    rng, n = np.random.default_rng(seed), a.shape[1]
    rounds = block_indices(rng, n, resamples)[:, None, :]

    def side(x: np.ndarray) -> np.ndarray:
        sessions = rng.integers(0, x.shape[0], size=(resamples, x.shape[0]))
        return np.take_along_axis(x[sessions], np.broadcast_to(rounds, (resamples, x.shape[0], n)), axis=2).mean(axis=1)

    boot = np.quantile(side(b) / side(a), quantile, axis=1)
    low, high = _interval(boot, confidence)
    ratio = float(np.quantile(b.mean(axis=0) / a.mean(axis=0), quantile))
    return RatioEstimate(ratio, low, high, confidence, quantile,
                         f"paired over {a.shape[0]}+{b.shape[0]} sessions: quantile of per-round ratios of session means; "
                         "sessions and blocks of rounds bootstrapped", int(a.size), int(b.size), resamples)


def two_sample_ratio(base: Sequence[float], candidate: Sequence[float], quantile: float = 0.5,
                     confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> RatioEstimate:
    """quantile(candidate) / quantile(base), each sample bootstrapped independently."""
    a, b = _as_array(base, "base"), _as_array(candidate, "candidate")
    rng = np.random.default_rng(seed)
    qa = np.quantile(a[block_indices(rng, a.size, resamples)], quantile, axis=1)
    qb = np.quantile(b[block_indices(rng, b.size, resamples)], quantile, axis=1)
    low, high = _interval(qb / qa, confidence)
    return RatioEstimate(float(np.quantile(b, quantile) / np.quantile(a, quantile)), low, high, confidence, quantile,
                         "two-sample: ratio of quantiles, each sample block-bootstrapped on its own", a.size, b.size, resamples)


def verdict(estimate: RatioEstimate, max_regression: float) -> str:
    """``regression`` / ``no regression`` / ``inconclusive`` against an allowed slowdown (0.02 = 2 %)."""
    limit = 1.0 + max_regression
    if estimate.low > limit:
        return REGRESSION
    if estimate.high <= limit:
        return NO_REGRESSION
    return INCONCLUSIVE


def min_detectable(estimate: RatioEstimate, max_regression: float, power: float = POWER) -> float:
    """The smallest slowdown (fraction) a run this precise flags as a regression with probability ``power``."""
    z_conf = NormalDist().inv_cdf(0.5 + estimate.confidence / 2.0)
    return max_regression + estimate.half_width * (z_conf + NormalDist().inv_cdf(power)) / z_conf


def assess(estimate: RatioEstimate, max_regression: float) -> dict[str, Any]:
    """The estimate, verdict and minimum detectable slowdown as one JSON-ready dict."""
    return {**estimate.to_json(), "verdict": verdict(estimate, max_regression), "max_regression": max_regression,
            "min_detectable_regression": min_detectable(estimate, max_regression), "power": POWER}
