"""PyTorch CPU runners for the benchmark's peers: the model an artifact came from, eager or ``torch.compile``d.

The runner never builds the model itself (engines does not import apt_deploy's torch side): the caller
hands over ``load_model``, a callable returning a module whose ``forward(**feed)`` returns the outputs in
the manifest's order (apt_deploy.pipeline.load_reference_module). torch is imported lazily.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from apt_deploy.errors import MissingDependencyError, UnknownNameError
from engines.runners import Feed, Runner, to_host_numpy

log = logging.getLogger(__name__)
PEER_MODES = {"torch-eager": "eager", "torch-compile": "compile"}


class TorchRunner(Runner):
    """``load_model()`` on CPU in fp32, run under ``torch.inference_mode``; ``mode`` eager or compile."""

    def __init__(self, load_model: Callable[[], Any], output_names: Sequence[str], mode: str = "eager",
                 threads: int | None = None, name: str | None = None) -> None:
        if mode not in PEER_MODES.values():
            raise UnknownNameError("torch runner mode", mode, PEER_MODES.values())
        self.load_model, self.output_names, self.mode, self.threads = load_model, list(output_names), mode, threads
        self.name = name or f"torch-{mode}"
        self._module: Any = None

    def activate(self) -> None:
        if self._module is not None:
            return
        try:
            import torch
        except ImportError as e:
            raise MissingDependencyError("torch is not installed", "torch for the PyTorch peers",
                                         "pip install torch, or drop --peers") from e
        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        module = self.load_model().eval()
        self._module = torch.compile(module, dynamic=False) if self.mode == "compile" else module
        log.info("PyTorch %s model ready in %.2f s (%d threads, OMP_WAIT_POLICY=%s)", self.mode,
                 time.perf_counter() - t0, torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY", "unset"))

    def deactivate(self) -> None:
        self._module = None

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        import torch

        self.activate()
        inputs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
        with torch.inference_mode():
            out = self._module(**inputs)
        return {n: to_host_numpy(t) for n, t in zip(self.output_names, out)}


def make_peer_runner(peer: str, load_model: Callable[[], Any], output_names: Sequence[str],
                     threads: int | None, name: str) -> Runner:
    """The runner for one ``--peers`` entry (``torch-eager`` / ``torch-compile``)."""
    if peer not in PEER_MODES:
        raise UnknownNameError("peer", peer, PEER_MODES)
    return TorchRunner(load_model, output_names, PEER_MODES[peer], threads, name)
