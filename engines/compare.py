"""Compare outputs of runners against each other with declared tolerances (Polygraphy's Comparator idea).

All outputs are compared, then all failures are reported together with max abs / rel error, the
output name and the tolerance that was applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from apt_deploy.errors import ParityError
from apt_deploy.settings import Tolerance


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    shape: tuple[int, ...]
    ok: bool

    def line(self, tol: Tolerance) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (f"{verdict:4s} {self.name}: max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e} "
                f"(tolerance atol={tol.atol:g}, rtol={tol.rtol:g}; {tol.reason}) shape={self.shape}")


def diff_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], tol: Tolerance) -> list[OutputDiff]:
    """Per-output differences; an output missing on either side is a failure."""
    diffs = []
    for name in sorted(set(expected) | set(actual)):
        if name not in expected or name not in actual:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), (), False))
            continue
        e, a = np.asarray(expected[name], np.float64), np.asarray(actual[name], np.float64)
        if e.shape != a.shape:
            diffs.append(OutputDiff(name, float("inf"), float("inf"), a.shape, False))
            continue
        # Infinities must match exactly (same sign, same place: e.g. -inf logits of padded text slots)
        # and are then left out; any other non-finite value (NaN, inf on one side only) fails.
        finite = np.isfinite(e) & np.isfinite(a)
        nonfinite_ok = bool(np.all(finite | (np.isinf(e) & (e == a))))
        err, ref = np.abs(e[finite] - a[finite]), np.abs(e[finite])
        max_abs = float(err.max()) if err.size else 0.0
        max_rel = float((err / np.maximum(ref, 1e-12)).max()) if err.size else 0.0
        ok = bool(np.all(err <= tol.atol + tol.rtol * ref)) and nonfinite_ok
        diffs.append(OutputDiff(name, max_abs if nonfinite_ok else float("inf"), max_rel, e.shape, ok))
    return diffs


def assert_close(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray], tol: Tolerance,
                 what: str) -> list[OutputDiff]:
    """Raise :class:`ParityError` listing every failing output; return all diffs otherwise."""
    diffs = diff_outputs(expected, actual, tol)
    failed = [d for d in diffs if not d.ok]
    if failed:
        lines = "; ".join(d.line(tol) for d in diffs)
        raise ParityError(f"{what}: {len(failed)} of {len(diffs)} outputs differ beyond tolerance: {lines}",
                          f"every output within atol={tol.atol:g} + rtol={tol.rtol:g}*|expected|",
                          "see docs/pitfalls.md for known causes (folding order, fp16 accumulation, padding)")
    return diffs
