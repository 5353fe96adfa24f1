"""One exception hierarchy for the whole toolkit.

Every message says what was received, what was expected, and how to fix it. The CLI turns any
:class:`AptDeployError` into a one-paragraph message and exit code 2; anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Iterable


class AptDeployError(Exception):
    """Base class of every error this toolkit raises on purpose."""

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None) -> None:
        parts = [what.rstrip(".") + "."]
        if expected:
            parts.append(f"Expected: {expected.rstrip('.')}.")
        if fix:
            parts.append(f"Fix: {fix.rstrip('.')}.")
        super().__init__(" ".join(parts))


class ConfigError(AptDeployError):
    """A setting, flag or config value is out of range or inconsistent."""


class UnknownNameError(AptDeployError):
    """A registry lookup failed; the message lists the known names."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known_list = ", ".join(sorted(known)) or "(none registered)"
        super().__init__(
            f"Unknown {kind} {name!r}",
            expected=f"one of: {known_list}",
            fix=f"pass one of the known {kind} names",
        )


class InputPathError(AptDeployError):
    """A file or directory the user pointed at is missing or unreadable."""


class CheckpointError(AptDeployError):
    """A prompt checkpoint is malformed, corrupt, or does not match the model."""


class OutputExistsError(AptDeployError):
    """An output directory exists and overwriting was not requested."""


class ExportError(AptDeployError):
    """Exporting to ONNX failed or produced an invalid model."""


class ParityError(AptDeployError):
    """Two runners disagree beyond the declared tolerance."""


class BackendError(AptDeployError):
    """A library underneath (ONNX Runtime, Polygraphy, TensorRT, ...) failed to load or run a model."""


class MissingDependencyError(AptDeployError):
    """An optional dependency (tensorrt, triton, ...) is needed but not installed."""


class RegressionError(AptDeployError):
    """A benchmark regressed past the allowed threshold against a baseline."""


class DataError(AptDeployError):
    """A dataset file is malformed or inconsistent (missing fields, boxes outside the image, too few images)."""
