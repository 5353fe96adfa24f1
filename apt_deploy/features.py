"""Optional heavy dependencies, probed once. The same probe gives code its error message and tests
their skip reason (``pytest.mark.skipif(not has("tensorrt"), reason=why_missing("tensorrt"))``)."""

from __future__ import annotations

import functools
import importlib.util

from apt_deploy.errors import MissingDependencyError

_HOW_TO_GET = {
    "tensorrt": "install TensorRT from NVIDIA's index: pip install --extra-index-url https://pypi.nvidia.com tensorrt "
                "(not installable in this project's CI, which has no access to that index)",
    "triton": "pip install triton (needs a CUDA GPU to run compiled; TRITON_INTERPRET=1 runs it on CPU)",
    "cuda": "a machine with an NVIDIA GPU and a CUDA build of torch",
    "matplotlib": "pip install matplotlib",
    "sklearn": "pip install scikit-learn",
    "scipy": "pip install scipy",
    "pytriton": 'pip install "apt-deploy[serve]" (nvidia-pytriton bundles tritonserver; Linux x86_64, glibc >= 2.35)',
    "tritonclient": 'pip install "apt-deploy[serve]"',
}


@functools.cache
def has(feature: str) -> bool:
    """True when the optional feature is usable here (``cuda`` means a visible CUDA device)."""
    if feature == "cuda":
        if importlib.util.find_spec("torch") is None:
            return False
        import torch

        return bool(torch.cuda.is_available())
    if feature == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except Exception:  # the PyPI stubs raise at import, not only ImportError
            return False
        return True
    return importlib.util.find_spec(feature) is not None


def why_missing(feature: str) -> str:
    return f"{feature} is not available here; to get it: {_HOW_TO_GET.get(feature, f'pip install {feature}')}"


def require(feature: str, for_what: str) -> None:
    """Raise a clear :class:`MissingDependencyError` unless ``feature`` is usable."""
    if not has(feature):
        raise MissingDependencyError(f"{for_what} needs {feature}, which is not available",
                                     fix=_HOW_TO_GET.get(feature, f"pip install {feature}"))
