"""Few-shot detection data from a COCO-format JSON, for grounded detectors (Grounding DINO + SDPT).

The text prompt is the category names joined as phrases, ``"cat . dog ."`` (category order = the
JSON's ``categories`` order, label i = phrase i, the index transformers' Grounding DINO loss uses).
``k`` shots per category: for each category, ``k`` images that contain it are drawn (seeded); every
annotation of a drawn image is kept. Checks, each a :class:`DataError` (exit code 2 in the CLI) with
received / expected / fix: missing fields, boxes outside their image, a category that does not appear
in the (tokenised) prompt, fewer images of a category than ``--shots``. An image that cannot be decoded
is skipped and counted (``DetectionData.skipped``); nothing readable left is an error.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apt_deploy.errors import DataError, InputPathError

log = logging.getLogger(__name__)
REQUIRED = {"images": ("id", "file_name", "width", "height"), "annotations": ("image_id", "category_id", "bbox"),
            "categories": ("id", "name")}
BOX_SLACK = 1.0  # pixels a box may overhang its image (COCO rounding)


@dataclass
class DetectionExample:
    """One image with its boxes (cx, cy, w, h) normalised to [0, 1] and labels (phrase indices)."""

    image: Any  # PIL.Image.Image
    boxes: list[list[float]]
    labels: list[int]
    image_id: int
    file_name: str


@dataclass
class DetectionData:
    examples: list[DetectionExample]
    category_names: list[str]
    category_ids: list[int]
    prompt: str
    skipped: list[str] = field(default_factory=list)


def category_prompt(names: Sequence[str]) -> str:
    """``"cat . dog ."``: Grounding DINO's phrase format (lower-cased, "." after each phrase)."""
    return " ".join(f"{n.strip().lower()} ." for n in names)


def read_coco(path: str | Path) -> dict[str, Any]:
    """The JSON with every field this loader needs checked (DataError names the first missing one)."""
    from apt_deploy.fileio import read_json

    data = read_json(Path(path), "COCO annotation file", "a COCO-format detection JSON", "check --data",
                     error=DataError)
    for key, fields in REQUIRED.items():
        items = data.get(key) if isinstance(data, dict) else None
        if not isinstance(items, list) or (key != "annotations" and not items):
            raise DataError(f"{path}: top-level {key!r} is missing or empty", f"a list of {key} with {', '.join(fields)}",
                            "write a COCO-format JSON (images, annotations, categories)")
        for i, item in enumerate(items):
            missing = [f for f in fields if not isinstance(item, dict) or f not in item]
            if missing:
                raise DataError(f"{path}: {key}[{i}] lacks {', '.join(missing)} (got {item!r:.200})",
                                f"every entry of {key} to have {', '.join(fields)}", "add the missing fields")
    return data


def check_boxes(data: dict[str, Any]) -> None:
    """Every bbox [x, y, w, h] has w, h > 0 and lies inside its image (BOX_SLACK px of rounding allowed)."""
    images = {im["id"]: im for im in data["images"]}
    categories = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        im = images.get(ann["image_id"])
        if im is None or ann["category_id"] not in categories:
            raise DataError(f"annotations[{i}] refers to image_id={ann['image_id']} / category_id={ann['category_id']}, "
                            "which the file does not define", "ids listed in images / categories", "fix the ids")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0 or x < -BOX_SLACK or y < -BOX_SLACK or x + w > im["width"] + BOX_SLACK \
                or y + h > im["height"] + BOX_SLACK:
            raise DataError(f"annotations[{i}] bbox [x, y, w, h] = {ann['bbox']} lies outside image {im['file_name']!r} "
                            f"({im['width']}x{im['height']}) or is empty",
                            "0 <= x, y; x + w <= width; y + h <= height; w, h > 0 (COCO pixel boxes)",
                            "fix or drop the annotation (boxes are absolute pixels, not normalised)")


def check_prompt(prompt: str, names: Sequence[str], tokenizer: Any, max_text_len: int) -> None:
    """Every category name appears, whole, within the first ``max_text_len`` tokens of the prompt."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][:max_text_len]
    kept = tokenizer.decode(ids, skip_special_tokens=True)
    spaced = f" {' '.join(tokenizer.tokenize(kept))} "
    absent = [n for n in names if f" {' '.join(tokenizer.tokenize(n.lower()))} ." not in spaced]
    if absent:
        raise DataError(f"categories {absent[:5]} are absent from the text prompt {prompt[:120]!r} as the model reads it "
                        f"(first {max_text_len} tokens)", "every category name as a phrase followed by '.'",
                        "use fewer / shorter category names, or a model with a larger max_text_len")


def few_shot_images(data: dict[str, Any], shots: int | None, seed: int) -> list[int]:
    """Image ids: for each category ``shots`` images containing it (seeded); all images if ``shots`` is None."""
    by_cat: dict[int, list[int]] = {c["id"]: [] for c in data["categories"]}
    for ann in data["annotations"]:
        if ann["image_id"] not in by_cat[ann["category_id"]]:
            by_cat[ann["category_id"]].append(ann["image_id"])
    if shots is None:
        return [im["id"] for im in data["images"]]
    names = {c["id"]: c["name"] for c in data["categories"]}
    short = {names[c]: len(ids) for c, ids in by_cat.items() if len(ids) < shots}
    if short:
        raise DataError(f"--shots {shots} but some categories have fewer annotated images: {dict(list(short.items())[:5])}",
                        f"at least {shots} images per category", "lower --shots or add images")
    rng, chosen = random.Random(seed), []
    for cat in sorted(by_cat):
        ids = sorted(by_cat[cat])
        rng.shuffle(ids)
        chosen += [i for i in ids[:shots] if i not in chosen]
    return chosen


def load_coco_detection(path: str | Path, image_root: str | Path | None = None, shots: int | None = None,
                        seed: int = 0, tokenizer: Any = None, max_text_len: int | None = None) -> DetectionData:
    """Read, check and sample a COCO detection JSON (see the module docstring); images decoded as RGB PIL."""
    data = read_coco(path)
    check_boxes(data)
    names = [c["name"] for c in data["categories"]]
    prompt = category_prompt(names)
    if tokenizer is not None:
        check_prompt(prompt, names, tokenizer, max_text_len or 256)
    root = Path(image_root) if image_root else Path(path).parent
    if not root.is_dir():
        raise InputPathError(f"image root {str(root)!r} does not exist", "the folder the file_name entries are relative to",
                             "pass --image-root DIR")
    examples, skipped = _examples(data, few_shot_images(data, shots, seed), root)
    if skipped:
        log.warning("skipped %d image(s) that could not be decoded (first: %s)", len(skipped), skipped[0])
    if not examples:
        raise DataError(f"none of the selected images in {path} could be decoded ({len(skipped)} skipped)",
                        "readable image files", "check --image-root and the file_name entries")
    return DetectionData(examples, names, [c["id"] for c in data["categories"]], prompt, skipped)


def _examples(data: dict[str, Any], image_ids: list[int], root: Path) -> tuple[list[DetectionExample], list[str]]:
    images = {im["id"]: im for im in data["images"]}
    label_of = {c["id"]: i for i, c in enumerate(data["categories"])}
    anns: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    examples, skipped = [], []
    for image_id in image_ids:
        im = images[image_id]
        pil = _open_image(root / im["file_name"])
        if pil is None:
            skipped.append(str(im["file_name"]))
            continue
        w, h = float(im["width"]), float(im["height"])
        boxes = [_normalised_cxcywh(a["bbox"], w, h) for a in anns.get(image_id, [])]
        labels = [label_of[a["category_id"]] for a in anns.get(image_id, [])]
        examples.append(DetectionExample(pil, boxes, labels, int(image_id), str(im["file_name"])))
    return examples, skipped


def _open_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        log.debug("cannot decode %s: %s", path, e)
        return None


def _normalised_cxcywh(bbox: Sequence[float], width: float, height: float) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(width, x + w), min(height, y + h)
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
