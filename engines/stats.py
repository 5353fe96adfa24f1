"""Confidence intervals on latency ratios and the regression verdict (numpy only, seeded, no torch).

Three estimators, one verdict rule:

- ``paired_ratio``: both artifacts were timed in the same rounds, so the ratio candidate/base is taken
  per round and its quantile (the p50 by default) is the estimate. The bootstrap resamples whole rounds
  (in blocks of consecutive rounds), which keeps the pairing: machine-wide drift that hits both
  artifacts in a round cancels in the ratio. It sees one pair of sessions only.
- ``blocked_ratio`` (``bench --compare``): the run is cut into blocks, each with fresh sessions of both
  artifacts and its own paired rounds; each block gives one ratio and the blocks are the replicates, so
  a whole session being a few % fast or slow widens the interval instead of deciding the verdict.
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

import math

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


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: closed forms for 1 and 2 degrees of freedom, else the Cornish-Fisher expansion
    in the normal quantile (within 0.2 % of the exact value for df >= 3 at the 90-99 % levels used here)."""
    if df < 1:
        raise ConfigError(f"{df} degrees of freedom", ">= 1 (two or more blocks)", "time at least two blocks")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    terms = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
    return z + sum(t / df ** (k + 1) for k, t in enumerate(terms))


def blocked_ratio(block_ratios: Sequence[float], confidence: float = 0.95, quantile: float = 0.5,
                  rounds: int = 0) -> RatioEstimate:
    """One ratio per block (``bench --compare``: each block creates fresh sessions of both artifacts and
    times them in paired, shuffled rounds; its value is the quantile of its per-round ratios). Blocks are
    independent replicates, so a session that is fast or slow as a whole (memory layout, its threads'
    placement: 2 to 8 % seen here) is one block's error, not the verdict's. The estimate is the geometric
    mean over blocks; the interval is Student's t on the log ratios (n - 1 degrees of freedom)."""
    x = np.log(_as_array(block_ratios, "block ratios"))
    n, mean = x.size, float(x.mean())
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * float(x.std(ddof=1)) / np.sqrt(n)
    return RatioEstimate(float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half)), confidence,
                         quantile, f"blocked: geometric mean over {n} blocks of fresh sessions (each the p"
                         f"{quantile * 100:g} of its per-round ratios), Student-t interval on the log ratios",
                         rounds, rounds, 0)


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
