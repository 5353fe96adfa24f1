"""Raw request -> model inputs -> labelled scores, from an artifact's own files (``inference/``).

Standalone by design: this file imports only the standard library, numpy, Pillow and ``tokenizers`` --
never apt_deploy, torch or transformers -- because ``apt-deploy triton-repo`` copies it verbatim next to
the Triton python-backend models (which run in Triton's python stub, possibly in NVIDIA's container),
and the same file serves ``apt-deploy predict``. So predict and serve preprocess identically.

The recipe (``preprocess.json``) is resolved at export time from transformers' processor
(apt_deploy/assets.py); the steps below are transformers' PIL image-processor steps (resize with the
recorded resample, optional centre crop, rescale in float64 then float32, normalise), checked against
transformers in tests/test_serving_artifact.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RECIPE_NAME, LABELS_NAME = "preprocess.json", "labels.json"
MAX_IMAGE_BYTES = 16 * 2**20
MAX_QUESTION_CHARS = 1000


class RequestError(ValueError):
    """A request is malformed. The message says what was received, what was expected and how to fix it
    (the format of apt_deploy.errors); servers answer it with a 4xx status, the CLI with exit code 2."""

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None) -> None:
        parts = [what.rstrip(".") + "."]
        parts += [f"Expected: {expected.rstrip('.')}."] if expected else []
        parts += [f"Fix: {fix.rstrip('.')}."] if fix else []
        super().__init__(" ".join(parts))


class Preprocessor:
    """Images (encoded bytes) and questions -> the artifact's input arrays, batched."""

    def __init__(self, assets_dir: str | Path, max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.dir = Path(assets_dir)
        self.recipe: dict[str, Any] = json.loads((self.dir / RECIPE_NAME).read_text(encoding="utf-8"))
        self.max_image_bytes = max_image_bytes
        self._tokenizer: Any = None

    @property
    def needs_question(self) -> bool:
        return "text" in self.recipe

    def __call__(self, images: Sequence[bytes], questions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """A batch: ``pixel_values`` [B,3,H,W] float32 (+ ``pixel_mask``; + ``input_ids``, ``attention_mask``,
        ``token_type_ids`` [B,T] int64 when the recipe has text)."""
        if not images:
            raise RequestError("an empty batch of images", "at least one image")
        pixels = np.stack([self.image(b, i) for i, b in enumerate(images)])
        feed = {"pixel_values": pixels}
        if self.recipe.get("pixel_mask"):
            feed["pixel_mask"] = np.ones((pixels.shape[0], *pixels.shape[2:]), dtype=np.int64)
        if self.needs_question:
            if questions is None or len(questions) != len(images):
                got = "no question" if questions is None else f"{len(questions)} questions"
                raise RequestError(f"{got} for {len(images)} images", "one question per image (a VQA model)",
                                   "send a question with every image")
            feed.update(self.text(questions))
        return feed

    def image(self, data: bytes, index: int = 0) -> np.ndarray:
        """Encoded image bytes -> [3, H, W] float32."""
        return transform_image(decode_image(data, self.max_image_bytes, index), self.recipe["image"])

    def text(self, questions: Sequence[str]) -> dict[str, np.ndarray]:
        """Questions -> ``input_ids``, ``attention_mask``, ``token_type_ids`` [B, T] int64, padded to T."""
        for i, q in enumerate(questions):
            check_question(q, i)
        encodings = self.tokenizer.encode_batch(list(questions))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            text = self.recipe["text"]
            tok = Tokenizer.from_file(str(self.dir / text["tokenizer"]))
            tok.enable_truncation(max_length=text["max_length"])
            tok.enable_padding(length=text["max_length"], pad_id=text["pad_id"], pad_token=text["pad_token"])
            self._tokenizer = tok
        return self._tokenizer


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, index: int = 0) -> Any:
    """Encoded bytes -> an RGB PIL image; empty, oversized or undecodable input is a RequestError."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise RequestError(f"image {index} is empty or not bytes ({type(data).__name__})",
                           "the encoded bytes of a JPEG/PNG/... file", "send the file's bytes")
    if len(data) > max_bytes:
        raise RequestError(f"image {index} is {len(data)} bytes, over the limit of {max_bytes}",
                           f"an encoded image of at most {max_bytes} bytes", "downscale or recompress the image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        raise RequestError(f"image {index} ({len(data)} bytes) cannot be decoded: {type(e).__name__}: {e}",
                           "an image Pillow can read (JPEG, PNG, WebP, ...)", "send a valid encoded image") from e


def check_question(question: Any, index: int = 0) -> None:
    if not isinstance(question, str) or not question.strip():
        raise RequestError(f"question {index} is empty ({question!r})", "a non-empty question (UTF-8 text)",
                           "send the question text with the image")
    if len(question) > MAX_QUESTION_CHARS:
        raise RequestError(f"question {index} has {len(question)} characters", f"at most {MAX_QUESTION_CHARS}",
                           "shorten the question (the model reads only its first tokens anyway)")


def transform_image(image: Any, recipe: dict[str, Any]) -> np.ndarray:
    """transformers' PIL image-processor steps on an RGB PIL image -> [3, H, W] float32."""
    from PIL import Image

    image = image.resize(resize_size(image.width, image.height, recipe["resize"])[::-1],
                         resample=Image.Resampling(recipe["resize"]["resample"]))
    x = np.asarray(image).transpose(2, 0, 1)
    if recipe.get("center_crop"):
        x = center_crop(x, recipe["center_crop"]["height"], recipe["center_crop"]["width"])
    x = (x.astype(np.float64) * recipe["rescale"]).astype(np.float32) if recipe.get("rescale") else x.astype(np.float32)
    if recipe.get("mean") is not None:
        mean, std = np.array(recipe["mean"], np.float32), np.array(recipe["std"], np.float32)
        x = ((x.T - mean) / std).T
    return np.ascontiguousarray(x, dtype=np.float32)


def resize_size(width: int, height: int, resize: dict[str, Any]) -> tuple[int, int]:
    """(height, width) after the resize step: exact, or the shortest edge to ``size`` keeping the aspect
    ratio (the long side truncated, as transformers' get_resize_output_image_size does)."""
    if resize["mode"] == "exact":
        return int(resize["height"]), int(resize["width"])
    size = int(resize["size"])
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of a [C, H, W] array (zero-padded first when it is smaller, as transformers does)."""
    h, w = x.shape[-2:]
    if h < height or w < width:
        padded = np.zeros((x.shape[0], max(h, height), max(w, width)), dtype=x.dtype)
        top, left = (padded.shape[1] - h) // 2, (padded.shape[2] - w) // 2
        padded[:, top:top + h, left:left + w] = x
        x, h, w = padded, *padded.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[:, top:top + height, left:left + width]


class Postprocessor:
    """Logits [B, L] -> the top-k labels and scores per row (sigmoid for VQA, softmax for classification)."""

    def __init__(self, assets_dir: str | Path) -> None:
        d = Path(assets_dir)
        self.labels: list[str] = json.loads((d / LABELS_NAME).read_text(encoding="utf-8"))
        self.score: str = json.loads((d / RECIPE_NAME).read_text(encoding="utf-8"))["score"]

    def __call__(self, logits: np.ndarray, top_k: int) -> tuple[list[list[str]], np.ndarray]:
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise RequestError(f"logits of shape {logits.shape}", f"[batch, {len(self.labels)}] (one per label)",
                               "re-export the artifact; its labels.json does not match the model")
        scores = scores_from_logits(logits, self.score)
        k = max(1, min(int(top_k), scores.shape[1]))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[self.labels[j] for j in row] for row in order], np.take_along_axis(scores, order, 1).astype(np.float32)


def scores_from_logits(logits: np.ndarray, score: str) -> np.ndarray:
    z = logits.astype(np.float64)
    if score == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if score == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise RequestError(f"score function {score!r} in preprocess.json", "'sigmoid' or 'softmax'", "re-export the artifact")
