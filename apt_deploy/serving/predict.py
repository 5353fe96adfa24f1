"""Predict from an artifact alone: raw image (+ question) -> the top-k labels with scores.

``Predictor`` reads the artifact's ``inference/`` files (apt_deploy/assets.py) for pre- and
post-processing -- the same code the Triton python models run (apt_deploy/serving/preprocess.py) -- and
runs the model with any runner backend (onnxruntime, trt, torch-cuda). Backbones whose answer is not a
list of labels (detection) are dispatched through ``TASK_PREDICTORS`` instead.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import ConfigError, InputPathError
from apt_deploy.fileio import sha256_file
from apt_deploy.manifest import read_manifest
from apt_deploy.serving.preprocess import Postprocessor, Preprocessor, RequestError

log = logging.getLogger(__name__)
# manifest "backbone" -> "module:function(artifact_dir, image_path, text, threshold, backend) -> list[dict]"
# for backbones whose predictions are not (label, score) lists; imported only when such an artifact is used.
TASK_PREDICTORS: dict[str, str] = {"grounding_dino": "apt_deploy.detection_predict:predict_detection"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class Predictor:
    """``Predictor(artifact_dir).predict(image, question=None, top_k=5)`` -> ``[{"label", "score"}, ...]``.

    Thread-safe: the runner is shared (engines.runners' lock); preprocessing holds no per-call state.
    """

    def __init__(self, artifact_dir: str | Path, backend: str = "onnxruntime", threads: int | None = None,
                 **runner_options: Any) -> None:
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        assets = check_assets(self.dir, self.manifest)
        self.pre, self.post = Preprocessor(assets), Postprocessor(assets)
        self.input_dtypes = {i["name"]: NP_DTYPES.get(i["dtype"], np.float32) for i in self.manifest["inputs"]}
        from apt_deploy.serving.tasks import TaskFeed

        self.tasks = TaskFeed(self.dir, self.manifest)  # multi-task artifacts: the prompt bank, read once
        self.max_batch = min(int(i["max_shape"][0]) for i in self.manifest["inputs"])
        self.runner = _make_runner(backend, self.dir, self.manifest, threads, runner_options)

    @property
    def needs_question(self) -> bool:
        return self.pre.needs_question

    @property
    def task_names(self) -> list[str]:
        """The tasks of a multi-task artifact, in bank order (empty for a single-task one)."""
        return self.tasks.names

    def predict(self, image: bytes | str | Path, question: str | None = None, top_k: int = 5,
                task: str | int | None = None) -> list[dict[str, Any]]:
        """``task``: a task name (or bank index) of a multi-task artifact; None for a single-task one."""
        return self.predict_batch([{"image": image, "question": question, "task": task}], top_k)[0]

    def predict_batch(self, requests: Sequence[dict[str, Any]], top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Requests ``{"image": bytes | path, "question": str, "task": name}`` (a batch may mix tasks), run in
        chunks of the export's max batch."""
        out: list[list[dict[str, Any]]] = []
        for chunk in _chunks(list(requests), self.max_batch):
            out += self._run(chunk, top_k)
        return out

    def _run(self, requests: list[dict[str, Any]], top_k: int) -> list[list[dict[str, Any]]]:
        task_feed = self.tasks([r.get("task") for r in requests])  # unknown tasks fail before any work
        images = [read_image(r["image"]) for r in requests]
        questions = [r.get("question") for r in requests] if self.needs_question else None
        try:
            feed = self.pre(images, questions)
        except RequestError as e:
            raise ConfigError(str(e)) from e
        feed = {k: v.astype(self.input_dtypes[k]) for k, v in feed.items() if k in self.input_dtypes}
        feed.update(task_feed)
        logits = np.asarray(self.runner.infer(feed)["logits"], dtype=np.float32)
        labels, scores = self.post(logits, top_k)
        return [[{"label": lab, "score": float(s)} for lab, s in zip(row, srow)] for row, srow in zip(labels, scores)]


def check_assets(directory: Path, manifest: dict[str, Any]) -> Path:
    """The artifact's ``inference/`` folder, its files checked against the manifest's sha256."""
    section = manifest.get("inference") or {"missing": "the artifact predates inference assets"}
    if "missing" in section:
        raise ConfigError(f"artifact {str(directory)!r} has no inference assets ({section['missing']})",
                          "an artifact exported from a model directory holding its processor / tokenizer",
                          "save the processor beside the model (save_pretrained) and re-run apt-deploy export")
    for rel, digest in section["files"].items():
        path = directory / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise InputPathError(f"inference file {str(path)!r} is missing or does not match the sha256 in manifest.json",
                                 "the files apt-deploy export wrote", "re-export the artifact")
    return directory / "inference"


def read_image(image: bytes | str | Path) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    path = Path(image)
    if not path.is_file():
        raise InputPathError(f"image {str(path)!r} does not exist", "an image file", "check the path")
    return path.read_bytes()


def task_predictor(manifest: dict[str, Any]) -> Callable[..., list[dict[str, Any]]] | None:
    """The dedicated predict function of this artifact's backbone (``TASK_PREDICTORS``), or None."""
    target = TASK_PREDICTORS.get(manifest.get("backbone", ""))
    if target is None:
        return None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _make_runner(backend: str, directory: Path, manifest: dict[str, Any], threads: int | None,
                 options: dict[str, Any]) -> Any:
    from engines.runners import make_runner

    if backend == "torch-cuda" and "load_model" not in options:
        from apt_deploy.pipeline import load_reference_module

        options = {**options, "load_model": lambda: load_reference_module(manifest)}
    return make_runner(backend, directory, threads=threads, **options)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
