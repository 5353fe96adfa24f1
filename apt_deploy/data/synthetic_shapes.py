"""A synthetic few-shot classification task with a domain shift, generated in code.

Classes are shapes (circle, square, triangle, cross); domains are rendering styles (solid fill,
outline, noisy fill, stripes, light-on-dark). A model tuned on a few shots of one style is tested on
that style and on a held-out one. The same generator gives GRAM's unlabeled image-caption pairs
(``"an outlined triangle"``...). Samples come in memory (PIL images) or as an ImageFolder on disk
(``root/<class>/<i>.png``) / a captions JSONL (``{"image": ..., "caption": ...}``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from apt_deploy.errors import UnknownNameError

SHAPES = ("circle", "square", "triangle", "cross")
STYLES = ("solid", "outline", "noisy", "striped", "inverted")
STYLE_WORDS = {"solid": "filled", "outline": "outlined", "noisy": "noisy", "striped": "striped", "inverted": "glowing"}
CAPTION_TEMPLATES = ("a {w} {s}", "a {s}, {w}", "{w} drawing of a {s}", "picture of a {w} {s}")


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with radius r, rotated by ``angle`` radians."""
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * i / 24), math.sin(2 * math.pi * i / 24)) for i in range(24)]
    elif shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "cross":
        t = 0.3
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_shape(shape: str, style: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One RGB image of ``shape`` in ``style`` with random position, size, rotation and colours."""
    r = rng.uniform(0.25, 0.36) * size
    cx, cy = (rng.uniform(r, size - r) for _ in range(2))
    poly = shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi) if shape != "circle" else 0.0)
    dark = style == "inverted"
    bg = tuple(int(v) for v in (rng.integers(0, 50, 3) if dark else rng.integers(190, 256, 3)))
    fg = tuple(int(v) for v in (rng.integers(170, 256, 3) if dark else rng.integers(0, 140, 3)))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if style == "outline":
        draw.line(poly + poly[:1], fill=fg, width=2)
    else:
        draw.polygon(poly, fill=fg)
    return _finish_style(img, style, bg, rng)


def _finish_style(img: Image.Image, style: str, bg: tuple[int, ...], rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img).astype(np.float32)
    if style == "noisy":
        arr = arr + rng.normal(0, 45, arr.shape)
    elif style == "striped":
        rows = (np.arange(arr.shape[0]) // 2) % 2 == 1
        arr[rows] = np.asarray(bg, np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_samples(style: str, n_per_class: int, seed: int, size: int = 32,
                 shapes: tuple[str, ...] = SHAPES) -> list[tuple[Image.Image, int]]:
    """``n_per_class`` (image, label) pairs per shape in one style; label = index in ``shapes``."""
    _check_style(style)
    rng = np.random.default_rng([seed, STYLES.index(style)])
    return [(render_shape(s, style, rng, size), label) for label, s in enumerate(shapes) for _ in range(n_per_class)]


def write_image_folder(root: str | Path, style: str, n_per_class: int, seed: int, size: int = 32) -> Path:
    """Write ``root/<shape>/<i>.png`` (an ImageFolder) for one style."""
    root = Path(root)
    for i, (img, label) in enumerate(make_samples(style, n_per_class, seed, size)):
        folder = root / SHAPES[label]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.png")
    return root


def caption(shape: str, style: str, rng: np.random.Generator) -> str:
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(w=STYLE_WORDS[style], s=shape)


def make_caption_pairs(styles: tuple[str, ...], n: int, seed: int, size: int = 32) -> list[tuple[Image.Image, str]]:
    """``n`` unlabeled (image, caption) pairs drawn uniformly over ``styles`` x shapes (GRAM's meta-data)."""
    for style in styles:
        _check_style(style)
    rng = np.random.default_rng([seed, 99])
    pairs = []
    for _ in range(n):
        style, shape = styles[int(rng.integers(len(styles)))], SHAPES[int(rng.integers(len(SHAPES)))]
        pairs.append((render_shape(shape, style, rng, size), caption(shape, style, rng)))
    return pairs


def write_caption_pairs(root: str | Path, styles: tuple[str, ...], n: int, seed: int, size: int = 32) -> Path:
    """Write ``root/images/<i>.png`` and ``root/captions.jsonl``; returns the JSONL path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, text) in enumerate(make_caption_pairs(styles, n, seed, size)):
        img.save(root / "images" / f"{i:05d}.png")
        lines.append(json.dumps({"image": f"images/{i:05d}.png", "caption": text}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise UnknownNameError("style", style, STYLES)


# --- detection: several shapes per image, with boxes (Grounding DINO / SDPT experiment and tests) ---------
def render_detection(style: str, rng: np.random.Generator, size: int = 128, max_objects: int = 3,
                     shapes: tuple[str, ...] = SHAPES) -> tuple[Image.Image, list[list[float]], list[int]]:
    """One image with 1..max_objects non-overlapping shapes in ``style``: (image, COCO [x, y, w, h] boxes, labels)."""
    dark = style == "inverted"
    bg = tuple(int(v) for v in (rng.integers(0, 50, 3) if dark else rng.integers(190, 256, 3)))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        placed = _place(rng, size, boxes)
        if placed is None:
            continue
        label = int(rng.integers(len(shapes)))
        fg = tuple(int(v) for v in (rng.integers(170, 256, 3) if dark else rng.integers(0, 140, 3)))
        cx, cy, r = placed
        poly = shape_polygon(shapes[label], cx, cy, r, rng.uniform(0, 2 * math.pi) if shapes[label] != "circle" else 0.0)
        if style == "outline":
            draw.line(poly + poly[:1], fill=fg, width=2)
        else:
            draw.polygon(poly, fill=fg)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        x0, y0, x1, y1 = max(0.0, min(xs)), max(0.0, min(ys)), min(float(size), max(xs)), min(float(size), max(ys))
        boxes.append([x0, y0, x1 - x0, y1 - y0])
        labels.append(label)
    return _finish_style(img, style, bg, rng), boxes, labels


def _place(rng: np.random.Generator, size: int, boxes: list[list[float]]) -> tuple[float, float, float] | None:
    """A centre and radius whose square does not overlap ``boxes`` (None after 20 tries)."""
    for _ in range(20):
        r = rng.uniform(0.09, 0.2) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if all(cx + r < x or cx - r > x + w or cy + r < y or cy - r > y + h for x, y, w, h in boxes):
            return cx, cy, r
    return None


def detection_coco(style: str, n: int, seed: int, size: int = 128, max_objects: int = 3,
                   shapes: tuple[str, ...] = SHAPES) -> tuple[dict, list[Image.Image]]:
    """``n`` images of one style as a COCO dict (categories = ``shapes``) and the images in id order."""
    _check_style(style)
    rng = np.random.default_rng([seed, STYLES.index(style), 7])
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": s} for i, s in enumerate(shapes)]}
    images = []
    for i in range(n):
        img, boxes, labels = render_detection(style, rng, size, max_objects, shapes)
        coco["images"].append({"id": i + 1, "file_name": f"{style}_{i:05d}.png", "width": size, "height": size})
        for box, label in zip(boxes, labels):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": label + 1,
                                        "bbox": [round(v, 2) for v in box], "area": round(box[2] * box[3], 2),
                                        "iscrowd": 0})
        images.append(img)
    return coco, images


def write_detection_coco(root: str | Path, style: str, n: int, seed: int, size: int = 128) -> Path:
    """Write ``root/<style>_<i>.png`` and ``root/<style>.json`` (COCO format); returns the JSON path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    coco, images = detection_coco(style, n, seed, size)
    for entry, img in zip(coco["images"], images):
        img.save(root / entry["file_name"])
    path = root / f"{style}.json"
    path.write_text(json.dumps(coco))
    return path
