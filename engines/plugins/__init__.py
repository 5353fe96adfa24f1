"""TensorRT plugins. :func:`load` registers the fused APT op's plugin (``apt::ApproxPromptDiffusion``)
with TensorRT; call it before parsing an ONNX model or deserializing a JIT-plugin engine.

Importing this package never imports tensorrt.
"""

from __future__ import annotations


def load(mode: str = "auto") -> str:
    """Register the APT plugin once per process; returns the implementation used: ``"aot"`` or ``"jit"``.

    ``mode``: ``"aot"`` (kernel PTX baked into the engine; TensorRT >= 10.9, engines run without Python),
    ``"jit"`` (Python callback at run time; TensorRT >= 10.6), or ``"auto"`` (AOT where available).
    """
    from engines.plugins.apt_plugin import register_plugin

    return register_plugin(mode)
