"""Few-shot image classification from an ImageFolder directory (``root/<class name>/<image>``), and
the CLIP preprocessing (tokenizer + PIL image processor) read from the model directory.

Images that fail to decode are **skipped with a count** (logged as a warning and returned in
``ClassificationData.skipped``); a class left with no readable image is an error. Class names are the
sorted folder names (underscores become spaces in the prompt text, e.g. ``traffic_light``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from apt_deploy.errors import ConfigError, InputPathError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


@dataclass
class ClassificationData:
    """Preprocessed images [N, 3, H, W], integer labels [N] and the class names in label order."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def scan_image_folder(root: str | Path) -> dict[str, list[Path]]:
    """Class folder name -> sorted image paths; clear errors for a missing root, no classes, an empty class."""
    root = Path(root)
    if not root.is_dir():
        raise InputPathError(f"image folder {str(root)!r} does not exist",
                             "a directory with one sub-folder of images per class", "check --data / --eval-data")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputPathError(f"{str(root)!r} has no class sub-folders", "root/<class name>/<images>",
                             "put each class's images in its own folder")
    out = {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}
    empty = [name for name, paths in out.items() if not paths]
    if empty:
        raise InputPathError(f"class folder(s) {empty} in {str(root)!r} hold no images ({', '.join(IMAGE_SUFFIXES)})",
                             "at least one image per class folder", "add images or remove the empty folder(s)")
    return out


def few_shot(paths: dict[str, list[Path]], shots: int | None, seed: int) -> dict[str, list[Path]]:
    """A seeded k-shot sample per class (all images when ``shots`` is None)."""
    if shots is None:
        return paths
    if shots < 1:
        raise ConfigError(f"shots={shots}", "a positive number of images per class (CoOp: 1, 2, 4, 8, 16)")
    short = {c: len(p) for c, p in paths.items() if len(p) < shots}
    if short:
        raise ConfigError(f"class(es) with fewer images than --shots {shots}: {short}",
                          f"at least {shots} images in every class folder", "lower --shots or add images")
    rng = random.Random(seed)
    return {c: sorted(rng.sample(p, shots)) for c, p in paths.items()}


def decode_images(paths: list[Path]) -> tuple[list[Image.Image], list[str]]:
    """Open every image as RGB; unreadable files are skipped and reported as ``"path: reason"``."""
    images, skipped = [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            skipped.append(f"{path}: {type(e).__name__}")
    return images, skipped


def check_class_names(found: list[str], expected: list[str], where: str) -> None:
    """The class names of a data set must match the model's / checkpoint's (count first, then order)."""
    if len(found) != len(expected):
        raise ConfigError(f"{where} has {len(found)} classes ({found[:6]}...) but {len(expected)} were expected "
                          f"({expected[:6]}...)", "the same class folders as the training data",
                          "use matching folders, or retrain the prompts for these classes")
    if list(found) != list(expected):
        raise ConfigError(f"{where} class names {found} differ from {expected}", "the same names in the same order",
                          "rename the folders to match the training classes")


def load_image_folder(root: str | Path, processor: Any, shots: int | None = None, seed: int = 0,
                      class_names: list[str] | None = None) -> ClassificationData:
    """ImageFolder -> preprocessed tensors (seeded k-shot when ``shots`` is given)."""
    paths = few_shot(scan_image_folder(root), shots, seed)
    names = list(paths)
    if class_names is not None:
        check_class_names(names, class_names, f"image folder {str(root)!r}")
    images, labels, skipped = [], [], []
    for label, name in enumerate(names):
        imgs, bad = decode_images(paths[name])
        if not imgs:
            raise InputPathError(f"no image in class folder {name!r} could be decoded ({len(bad)} failed: {bad[:3]})",
                                 "readable image files", "replace the corrupt files")
        images += imgs
        labels += [label] * len(imgs)
        skipped += bad
    if skipped:
        log.warning("skipped %d image(s) that failed to decode in %s, e.g. %s", len(skipped), root, skipped[:3])
    return ClassificationData(pixel_tensor(processor, images), torch.tensor(labels), [display_name(n) for n in names], skipped)


def from_samples(samples: list[tuple[Image.Image, int]], class_names: list[str], processor: Any) -> ClassificationData:
    """In-memory (image, label) pairs (e.g. data.synthetic_shapes.make_samples) -> preprocessed tensors."""
    return ClassificationData(pixel_tensor(processor, [img for img, _ in samples]),
                              torch.tensor([label for _, label in samples]), list(class_names))


def pixel_tensor(processor: Any, images: list[Image.Image], chunk: int = 256) -> torch.Tensor:
    """``processor``'s ``pixel_values`` for ``images``, ``chunk`` images per call, concatenated [N, 3, H, W]."""
    parts = [processor(images=images[i:i + chunk], return_tensors="pt")["pixel_values"] for i in range(0, len(images), chunk)]
    return torch.cat(parts)


def display_name(folder: str) -> str:
    return folder.replace("_", " ")


def load_clip_preprocessing(model_dir: str | Path) -> tuple[Any, Any]:
    """(CLIPTokenizer, CLIPImageProcessorPil) from the model directory, offline; clear errors if absent."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    d = Path(model_dir)
    if not any(all((d / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise InputPathError(f"model directory {str(d)!r} has no tokenizer (vocab.json + merges.txt or tokenizer.json)",
                             "the CLIP tokenizer saved beside the model (CoOp tokenises class names with it)",
                             "save it there: CLIPTokenizer.from_pretrained(...).save_pretrained(MODEL_DIR)")
    if not (d / "preprocessor_config.json").is_file():
        raise InputPathError(f"model directory {str(d)!r} has no preprocessor_config.json",
                             "the CLIP image processor saved beside the model",
                             "save it there: CLIPImageProcessorPil(...).save_pretrained(MODEL_DIR)")
    try:
        return CLIPTokenizer.from_pretrained(str(d)), CLIPImageProcessorPil.from_pretrained(str(d))
    except Exception as e:  # OSError, ValueError, JSONDecodeError, ... from transformers
        raise InputPathError(f"cannot load the CLIP tokenizer / image processor from {str(d)!r}: {type(e).__name__}: {e}",
                             "a tokenizer and image processor written by save_pretrained", "re-save them") from e
