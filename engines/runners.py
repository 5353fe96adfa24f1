"""One runner interface for every backend (Polygraphy's BaseRunner idea, kept minimal).

A runner is built lazily from a loader-like description, activated (session/engine created), fed
``dict[name, np.ndarray]`` and returns ``dict[name, np.ndarray]``. The comparator and the benchmark
know only this interface.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import BackendError, ConfigError, InputPathError, UnknownNameError
from apt_deploy.manifest import MODEL_NAME

log = logging.getLogger(__name__)
Feed = Mapping[str, np.ndarray]
_LOCK_GUARD = threading.Lock()


class Runner(ABC):
    """Base runner: ``with runner: outputs = runner.infer(feed)``.

    Thread safety: one runner may be shared by many threads. Activation happens once, under
    :attr:`lock`; a runner whose ``infer`` reuses per-runner state (TensorRT bindings, CUDA-graph static
    buffers) is decorated with :func:`serialized`. ``deactivate`` must not race with ``infer``.
    """

    name: str = "runner"

    @property
    def lock(self) -> threading.RLock:
        """This runner's re-entrant lock (created on first use; subclasses need not call ``__init__``)."""
        lock = self.__dict__.get("_runner_lock")
        if lock is None:
            with _LOCK_GUARD:
                lock = self.__dict__.setdefault("_runner_lock", threading.RLock())
        return lock

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:  # noqa: B027 - optional hook
        """Create sessions / engines. Idempotent."""

    def deactivate(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    @abstractmethod
    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Run once; inputs and outputs are host numpy arrays."""

    def synchronize(self) -> None:  # noqa: B027 - device runners wait for the device here
        """Block until queued work is done (for timing)."""


def serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a runner method under the runner's lock (for runners with per-runner buffers or contexts)."""

    @functools.wraps(method)
    def wrapper(self: Runner, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


def to_host_numpy(t: Any) -> np.ndarray:
    """A (device) torch tensor as a host numpy array, bf16 as float32 (numpy has no bfloat16); numpy
    arrays pass through. For the torch-based runners (trt, torch-cuda); torch is imported lazily."""
    if isinstance(t, np.ndarray):
        return t
    import torch

    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session over a model file (the function body of the fused op runs unchanged)."""

    def __init__(self, model_path: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 threads: int | None = None, name: str | None = None, spinning: bool | None = None) -> None:
        """``spinning=False`` stops ONNX Runtime's intra/inter-op threads from busy-waiting after a run
        (what interleaved timing needs, engines.bench); None keeps ONNX Runtime's default (they spin)."""
        self.model_path, self.providers, self.threads = Path(model_path), providers, threads
        self.spinning = spinning
        self.name = name or f"onnxruntime[{','.join(p.replace('ExecutionProvider', '') for p in providers)}]"
        self._session: Any = None
        self._input_names: list[str] = []
        self._output_names: list[str] = []

    def activate(self) -> None:
        """Create the session once, even when many threads make their first call at the same time
        (``InferenceSession.run`` itself is thread-safe, so ``infer`` takes no lock)."""
        if self._session is not None:
            return
        with self.lock:
            if self._session is None:
                self._create_session()

    def _create_session(self) -> None:
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise InputPathError(f"ONNX model {str(self.model_path)!r} does not exist", "an exported model.onnx",
                                 "check the path, or write the artifact with apt-deploy export")
        options = session_options(ort.SessionOptions(), self.threads, self.spinning)
        t0 = time.perf_counter()
        try:
            session = ort.InferenceSession(str(self.model_path), options, providers=list(self.providers))
        except Exception as e:  # onnxruntime's Fail, InvalidProtobuf, InvalidGraph, NoSuchFile, ...
            raise BackendError(f"ONNX Runtime cannot load {str(self.model_path)!r}: {type(e).__name__}: {str(e)[:800]}",
                               "a complete ONNX model (with its .data file beside it) that ONNX Runtime supports",
                               "check the file is complete (apt-deploy verify checks its sha256), or re-export it") from e
        got = session.get_providers()
        if got[0] != self.providers[0]:
            raise ConfigError(f"ONNX Runtime fell back to {got} instead of {list(self.providers)}",
                              f"the provider {self.providers[0]} to be usable", "install the matching onnxruntime build")
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]
        self._session = session  # published last, once every check passed: a failed activation leaves it None
        log.info("ONNX Runtime session for %s in %.2f s (%s)", self.model_path.name, time.perf_counter() - t0, got[0])

    def deactivate(self) -> None:
        with self.lock:
            self._session = None

    @property
    def input_names(self) -> list[str]:
        self.activate()
        return self._input_names

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Inputs the model does not take are dropped; the names are read once, in :meth:`activate`."""
        self.activate()
        wanted = {k: v for k, v in feed.items() if k in self._input_names}
        try:
            outputs = self._session.run(self._output_names, wanted)
        except Exception as e:  # onnxruntime's InvalidArgument (shape, dtype, missing input), Fail, ...
            got = {k: (tuple(v.shape), str(v.dtype)) for k, v in wanted.items()}
            raise BackendError(f"ONNX Runtime failed to run {self.model_path.name} on {got}: {type(e).__name__}: "
                               f"{str(e)[:800]}", "inputs with the names, dtypes and shapes in the artifact's manifest",
                               "feed what manifest.json lists (min..max shapes), or re-export with wider ranges") from e
        return dict(zip(self._output_names, outputs))


SPIN_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def session_options(options: Any, threads: int | None, spinning: bool | None) -> Any:
    """Quiet logging, ``threads`` intra-op threads, and (unless ``spinning`` is None) thread spinning on/off."""
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if spinning is not None:
        for key in SPIN_KEYS:
            options.add_session_config_entry(key, "1" if spinning else "0")
    return options


class CallableRunner(Runner):
    """Wraps a Python callable ``feed -> outputs`` (used for PyTorch models and test doubles)."""

    def __init__(self, fn: Callable[[Feed], dict[str, np.ndarray]], name: str) -> None:
        self.fn, self.name = fn, name

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        return self.fn(feed)


# Backend name -> factory(model_dir) -> Runner. Other backends (trt, torch-cuda) register here.
BACKENDS: dict[str, Callable[..., Runner]] = {}


def register_backend(name: str) -> Callable[[Callable[..., Runner]], Callable[..., Runner]]:
    def wrap(factory: Callable[..., Runner]) -> Callable[..., Runner]:
        BACKENDS[name] = factory
        return factory

    return wrap


@register_backend("onnxruntime")
def _ort_backend(artifact_dir: str | Path, **kwargs: Any) -> Runner:
    return OnnxRuntimeRunner(Path(artifact_dir) / MODEL_NAME, threads=kwargs.get("threads"), spinning=kwargs.get("spinning"))


def make_runner(backend: str, artifact_dir: str | Path, **kwargs: Any) -> Runner:
    """Build a runner for an exported artifact directory."""
    _load_optional_backends()
    if backend not in BACKENDS:
        raise UnknownNameError("backend", backend, BACKENDS)
    return BACKENDS[backend](artifact_dir, **kwargs)


OPTIONAL_BACKEND_MODULES: tuple[str, ...] = ("engines.trt_runner", "engines.kernels.torch_cuda")


def _load_optional_backends() -> None:
    import importlib

    for module in OPTIONAL_BACKEND_MODULES:
        importlib.import_module(module)
