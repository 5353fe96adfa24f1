"""TensorRT runner for the runner interface (``backend="trt"``), over Polygraphy's ``TrtRunner``.

Before deserializing, the engine's metadata JSON (written by :mod:`engines.trt_build`) is checked
against this machine: a different TensorRT version or GPU gives a clear error instead of a crash, and
a JIT-plugin engine gets its plugin registered first. Feeds are host numpy arrays keyed by ONNX input
names; they travel as torch CUDA tensors cast to the engine's input types (numpy has no bfloat16), and
outputs come back as numpy (bf16 as float32). tensorrt and torch are imported lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import ConfigError, InputPathError
from apt_deploy.features import require
from apt_deploy.fileio import read_json
from engines.runners import Feed, Runner, register_backend, serialized, to_host_numpy

log = logging.getLogger(__name__)


def check_compatible(metadata: dict[str, Any], trt_version: str, device: dict[str, Any], engine_path: Path) -> None:
    """Refuse an engine built by another TensorRT version or on another GPU (pure function, testable)."""
    rebuild = f"rebuild it here: apt-deploy build {engine_path.parent} --precision {metadata.get('settings', {}).get('precision', 'fp32')}"
    if metadata.get("tensorrt_version") != trt_version:
        raise ConfigError(f"engine {engine_path.name} was built with TensorRT {metadata.get('tensorrt_version')}, "
                          f"this process has TensorRT {trt_version}", "the same TensorRT version", rebuild)
    built_on = metadata.get("device") or {}
    if built_on.get("compute_capability") != device.get("compute_capability") or built_on.get("name") != device.get("name"):
        raise ConfigError(f"engine {engine_path.name} was built on {built_on.get('name')} (sm {built_on.get('compute_capability')}), "
                          f"this GPU is {device.get('name')} (sm {device.get('compute_capability')})",
                          "an engine built on this GPU model", rebuild)


def read_metadata(engine_path: Path) -> dict[str, Any]:
    """The metadata JSON beside an engine; a missing engine, missing or invalid JSON each say how to fix it."""
    from engines.trt_build import metadata_path

    if not engine_path.is_file():
        raise InputPathError(f"TensorRT engine {str(engine_path)!r} does not exist", "an engine built by apt-deploy build",
                             f"run: apt-deploy build {engine_path.parent}")
    return read_json(metadata_path(engine_path), "engine metadata", "the JSON apt-deploy build writes beside the engine",
                     "rebuild the engine with apt-deploy build")


class TensorRTRunner(Runner):
    """A built engine run through Polygraphy's TrtRunner."""

    def __init__(self, engine_path: str | Path, name: str | None = None) -> None:
        self.engine_path = Path(engine_path)
        self.name = name or f"tensorrt[{self.engine_path.name}]"
        self._runner: Any = None

    @serialized  # thread safety: one activation, one infer at a time (shared bindings / graph buffers)
    def activate(self) -> None:
        if self._runner is not None:
            return
        require("tensorrt", "the trt backend")
        import tensorrt as trt
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from engines.trt_build import device_info

        self.metadata = read_metadata(self.engine_path)
        check_compatible(self.metadata, trt.__version__, device_info(), self.engine_path)
        plugin = self.metadata.get("plugin")
        if plugin and plugin.get("mode") == "jit":
            from engines.plugins import load

            load("jit")  # a JIT plugin's Python callback must be registered before deserialization
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.engine_path))), name=self.name)
        runner.activate()
        try:
            engine = runner.engine
            inputs = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in _io_names(engine, trt.TensorIOMode.INPUT)}
        except BaseException:
            runner.deactivate()  # release the engine and context of a half-finished activation
            raise
        self._runner, self._inputs = runner, inputs  # active only after everything succeeded
        log.info("TensorRT engine %s loaded (inputs %s)", self.engine_path.name, list(self._inputs))

    def deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = None

    @serialized
    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        self.activate()
        missing = sorted(set(self._inputs) - set(feed))
        if missing:
            raise ConfigError(f"feed without inputs {missing} (got {sorted(feed)})", f"every engine input {list(self._inputs)}")
        tensors = {n: torch.from_numpy(np.ascontiguousarray(feed[n])).to(device="cuda", dtype=dt)
                   for n, dt in self._inputs.items()}
        outputs = self._runner.infer(tensors, copy_outputs_to_host=True)
        return {n: to_host_numpy(t) for n, t in outputs.items()}

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()


def _io_names(engine: Any, mode: Any) -> list[str]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return [n for n in names if engine.get_tensor_mode(n) == mode]


def _torch_dtype(trt_dtype: Any) -> Any:
    import tensorrt as trt
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
             trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
             trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8}
    if trt_dtype not in table:
        raise ConfigError(f"engine input type {trt_dtype}", f"one of {sorted(str(k) for k in table)}")
    return table[trt_dtype]


@register_backend("trt")
def _trt_backend(artifact_dir: str | Path, **kwargs: Any) -> Runner:
    """``engine=PATH`` or the default engine of the artifact's dtype (``use_plugin=False`` for the no-plugin one)."""
    from apt_deploy.manifest import read_manifest
    from engines.trt_build import default_engine_path

    engine = kwargs.get("engine")
    if engine is None:
        dtype = read_manifest(artifact_dir).get("dtype", "fp32")
        engine = default_engine_path(artifact_dir, dtype, kwargs.get("use_plugin", True))
    return TensorRTRunner(engine)
