"""Inference assets: what an artifact needs besides the ONNX model to answer a raw request.

Written by the backbone specs' ``inference_assets`` at export time into ``ARTIFACT/inference/``:

* ``labels.json``      -- the output labels in logit order (answers for VQA, class names for CLIP);
* ``preprocess.json``  -- the *resolved* pre- and post-processing recipe (resize, crop, rescale, normalise,
                          text length, score function, ...), read by ``apt_deploy.serving.preprocess``,
                          which needs only numpy, Pillow and ``tokenizers`` (no torch, no transformers);
* ``tokenizer.json``   -- the fast tokenizer (VQA backbones), saved from the model directory's tokenizer;
* ``processor/``       -- the original transformers processor files, for reference and other runtimes.

The recipe is derived from transformers' processor objects here (torch side, L2); the serving code then
never imports transformers. ``tests/test_serving_artifact.py`` checks the recipe against transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError
from apt_deploy.fileio import write_json_atomic

log = logging.getLogger(__name__)
ASSETS_DIR, RECIPE_NAME, LABELS_NAME, TOKENIZER_NAME = "inference", "preprocess.json", "labels.json", "tokenizer.json"
RECIPE_VERSION = 1


def image_recipe(image_processor: Any, exact_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The image steps of a transformers image processor as data. ``exact_size`` (h, w) replaces the
    processor's resize by an exact one (ViLT artifacts have a fixed image size; pitfalls #1: no padding)."""
    ip = image_processor
    size = dict(ip.size or {}) if ip.do_resize else {}
    if exact_size is not None:
        resize = {"mode": "exact", "height": int(exact_size[0]), "width": int(exact_size[1])}
    elif size.get("height") and size.get("width"):
        resize = {"mode": "exact", "height": int(size["height"]), "width": int(size["width"])}
    elif size.get("shortest_edge") and not size.get("longest_edge"):
        resize = {"mode": "shortest_edge", "size": int(size["shortest_edge"])}
    else:
        raise ConfigError(f"image processor size {size}", "{'height', 'width'} or {'shortest_edge'}",
                          "save an image processor with one of those sizes beside the model")
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    return {"resize": {**resize, "resample": int(ip.resample)},
            "center_crop": {"height": int(crop["height"]), "width": int(crop["width"])} if crop else None,
            "rescale": float(ip.rescale_factor) if ip.do_rescale else None,
            "mean": [float(v) for v in ip.image_mean] if ip.do_normalize else None,
            "std": [float(v) for v in ip.image_std] if ip.do_normalize else None}


def save_tokenizer(tokenizer: Any, out_dir: Path) -> str:
    """Save the fast tokenizer's ``tokenizer.json`` (the only tokenizer file serving reads)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer",
                          "a tokenizer with a tokenizer.json (transformers' *TokenizerFast)",
                          "save the fast tokenizer beside the model: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    tokenizer.backend_tokenizer.save(str(out_dir / TOKENIZER_NAME))
    return TOKENIZER_NAME


def write_assets(out_dir: Path, labels: Sequence[str], recipe: dict[str, Any], processor: Any | None) -> None:
    """labels.json, preprocess.json and (when given) the processor's own files under ``processor/``."""
    out_dir.mkdir(exist_ok=True)
    write_json_atomic(out_dir / LABELS_NAME, list(labels))
    write_json_atomic(out_dir / RECIPE_NAME, {"recipe_version": RECIPE_VERSION, **recipe})
    if processor is not None:
        processor.save_pretrained(str(out_dir / "processor"))


def missing_assets(reason: str) -> dict[str, Any]:
    """The manifest section of an artifact exported without its processor (predict/serve refuse it)."""
    log.warning("artifact exported WITHOUT inference assets: %s; predict/serve will refuse it", reason)
    return {"missing": reason}
