"""Captioned images for Stable Diffusion fine-tuning (``apt-deploy train --backbone sd --data PATH``).

PATH is either a captions JSONL (``{"image": ..., "caption": ...}`` per line, data/captions.py), a
directory holding exactly one such JSONL, or a directory of images each with a same-name ``.txt``
caption (``cat.png`` + ``cat.txt``, the layout most SD fine-tuning tools use).
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from apt_deploy.data.captions import read_caption_pairs
from apt_deploy.errors import ConfigError, InputPathError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captioned_images(path: str | Path) -> list[tuple[Image.Image, str]]:
    """(RGB image, caption) pairs from a JSONL or a folder (module docstring)."""
    path = Path(path)
    if path.is_file():
        return read_caption_pairs(path)
    if not path.is_dir():
        raise InputPathError(f"training data {str(path)!r} does not exist",
                             "a captions JSONL or a folder of images with same-name .txt captions", "check --data")
    jsonls = sorted(path.glob("*.jsonl"))
    if len(jsonls) == 1:
        return read_caption_pairs(jsonls[0])
    return _folder_pairs(path)


def _folder_pairs(folder: Path) -> list[tuple[Image.Image, str]]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pairs, uncaptioned = [], []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            uncaptioned.append(image.name)
            continue
        with Image.open(image) as img:
            pairs.append((img.convert("RGB"), caption.read_text(encoding="utf-8").strip()))
    if uncaptioned:
        log.warning("skipped %d image(s) without a same-name .txt caption, e.g. %s", len(uncaptioned), uncaptioned[:3])
    if not pairs:
        raise ConfigError(f"no captioned images in {str(folder)!r} ({len(images)} image(s), "
                          f"{len(list(folder.glob('*.jsonl')))} JSONL file(s))",
                          "one captions JSONL, or images with same-name .txt captions",
                          "add cat.txt beside cat.png, or put one captions JSONL in the folder")
    return pairs
