"""Unlabeled image-caption pairs for GRAM's meta-training: a captions JSONL, one object per line,
``{"image": "<path relative to the JSONL's folder or to image_root>", "caption": "..."}``.

Lines whose image fails to decode are skipped with a count (logged); a malformed line is an error
that names its line number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PIL import Image

from apt_deploy.errors import ConfigError, InputPathError

log = logging.getLogger(__name__)


def read_caption_pairs(jsonl: str | Path, image_root: str | Path | None = None) -> list[tuple[Image.Image, str]]:
    """(RGB image, caption) pairs from a captions JSONL."""
    path = Path(jsonl)
    if not path.is_file():
        raise InputPathError(f"captions file {str(path)!r} does not exist",
                             'a JSONL with {"image": ..., "caption": ...} per line', "check --captions")
    root = Path(image_root) if image_root else path.parent
    pairs, skipped = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image, text = _parse_line(line, n, path)
        img = _open(root / image)
        if img is None:
            skipped.append(image)
        else:
            pairs.append((img, text))
    if skipped:
        log.warning("skipped %d caption pair(s) whose image failed to decode or is missing, e.g. %s", len(skipped), skipped[:3])
    if len(pairs) < 2:
        raise ConfigError(f"{len(pairs)} readable image-caption pair(s) in {str(path)!r}",
                          "enough pairs to cluster into domains and pseudo-classes (dozens at least)",
                          "add pairs or fix the image paths (relative to the JSONL's folder or --image-root)")
    return pairs


def _parse_line(line: str, n: int, path: Path) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"line {n} of {str(path)!r} is not JSON ({e})", 'one {"image": ..., "caption": ...} per line') from e
    if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("caption"), str):
        raise ConfigError(f"line {n} of {str(path)!r} is {line[:80]!r}", 'an object with string "image" and "caption"')
    return obj["image"], obj["caption"]


def _open(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception:  # missing or undecodable: skipped and counted by the caller
        return None
