"""Detection post-processing for a Grounding DINO artifact: image + text prompt -> boxes, labels, scores.

1. read the manifest (fixed image size, text length) and the model directory's processor (the
   artifact's ``source.model_dir`` unless given); 2. encode the image (resized to the exported size)
   and the prompt (padded to the exported length); 3. run the artifact on the chosen backend;
4. transformers' ``GroundingDinoProcessor.post_process_grounded_object_detection`` on the runtime's
   numpy outputs (sigmoid, max over phrase tokens, threshold, phrase labels from the token ids, boxes
   scaled to the original image). ``apt-deploy predict`` (the serving command) dispatches here for
   grounding_dino artifacts.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from apt_deploy.errors import ConfigError, InputPathError


def predict_detection(artifact_dir: str | Path, image_path: str | Path, text: str, threshold: float = 0.3,
                      backend: str = "onnxruntime", text_threshold: float | None = None,
                      model_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Detections ``[{"box": [x0, y0, x1, y1] (pixels of the original image), "label": str, "score": float}]``,
    highest score first. ``text``: phrases separated by " . " (e.g. ``"cat . dog ."``)."""
    import torch

    from apt_deploy.manifest import read_manifest
    from engines.runners import make_runner

    manifest = read_manifest(artifact_dir)
    _check_artifact(manifest, threshold)
    processor = _processor(manifest, model_dir)
    image = _open_image(image_path)
    feed = _encode(processor, manifest, image, text)
    runner = make_runner(backend, artifact_dir, load_model=lambda: _reference(manifest, model_dir))
    with runner:
        out = runner.infer({k: v.numpy() for k, v in feed.items()})
    outputs = SimpleNamespace(logits=torch.from_numpy(out["logits"]).float(),
                              pred_boxes=torch.from_numpy(out["pred_boxes"]).float())
    result = processor.post_process_grounded_object_detection(
        outputs, input_ids=feed["input_ids"], threshold=threshold,
        text_threshold=threshold if text_threshold is None else text_threshold,
        target_sizes=[(image.height, image.width)])[0]
    detections = [{"box": [round(float(v), 2) for v in box], "label": str(label), "score": float(score)}
                  for box, label, score in zip(result["boxes"], result["text_labels"], result["scores"])]
    return sorted(detections, key=lambda d: -d["score"])


def normalise_prompt(text: str) -> str:
    """Lower case, each phrase ending in " ." (Grounding DINO's phrase delimiter)."""
    phrases = [p.strip() for p in text.lower().split(".") if p.strip()]
    if not phrases:
        raise ConfigError(f"text prompt {text!r}", 'one or more phrases, e.g. "cat . dog ."', "pass --text")
    return " ".join(f"{p} ." for p in phrases)


def _check_artifact(manifest: dict[str, Any], threshold: float) -> None:
    if manifest.get("backbone") != "grounding_dino":
        raise ConfigError(f"a {manifest.get('backbone')!r} artifact", "a grounding_dino artifact (detection)",
                          "point at an artifact exported from a Grounding DINO model")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold {threshold}", "a probability in [0, 1]", "pass e.g. --threshold 0.3")


def _processor(manifest: dict[str, Any], model_dir: str | Path | None) -> Any:
    from apt_deploy.backbones.grounding_dino import load_detection_processor

    model_dir = model_dir or (manifest.get("source") or {}).get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        raise InputPathError(f"the model directory with the processor is not available ({model_dir!r})",
                             "the Grounding DINO directory the artifact was exported from (tokenizer + image processor)",
                             "pass the model directory explicitly")
    return load_detection_processor(model_dir)


def _open_image(path: str | Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise InputPathError(f"image {str(path)!r} does not exist", "an image file", "check --image") from e
    except (OSError, UnidentifiedImageError) as e:
        raise InputPathError(f"image {str(path)!r} cannot be decoded ({e})", "a PNG / JPEG / ... image",
                             "pass a readable image") from e


def _encode(processor: Any, manifest: dict[str, Any], image: Any, text: str) -> dict[str, Any]:
    from apt_deploy.detection_training import encode

    shapes = {i["name"]: i["opt_shape"] for i in manifest["inputs"]}
    _, _, h, w = shapes["pixel_values"]
    text_len = shapes["input_ids"][1]
    prompt = normalise_prompt(text)
    tokens = len(processor.tokenizer(prompt)["input_ids"])
    if tokens > text_len:
        raise ConfigError(f"a prompt of {tokens} tokens", f"at most the artifact's text length {text_len}",
                          "shorten the prompt, or export with a larger --text-len")
    return encode(processor, [image], prompt, (h, w), text_len)


def _reference(manifest: dict[str, Any], model_dir: str | Path | None) -> Any:
    from apt_deploy.pipeline import load_reference_module

    return load_reference_module(manifest, str(model_dir) if model_dir else None)
