"""The built-in synthetic visual-question task (demo and tests): generated in-process with numpy.

Each image is a noisy grey background with one coloured shape (circle / square / triangle in red /
green / blue / yellow, random size, in the left or right half). Questions ask its colour, its shape,
yes/no about either, or its side. One answer per question (score 1.0). Deterministic given the seed;
train and test come from independent random streams (a held-out split of the same distribution).

The tokenizer is a tiny WordPiece vocabulary built in code, laid out like BERT's ([PAD]=0,
[unused*], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), so ``APTConfig(cls_token_id=101)`` is right.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

import numpy as np

from apt_deploy.data.vqa import VQADataset, VQAExample

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIDES: tuple[str, ...] = ("left", "right")
ANSWERS: list[str] = [*COLORS, *SHAPES, "yes", "no", *SIDES]
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the shape?", "which color is the object?"),
    "shape": ("what shape is it?", "what is the shape?"),
    "is_color": ("is the shape {c}?", "is it {c}?"),
    "is_shape": ("is there a {s}?", "is it a {s}?"),
    "side": ("which side is the shape on?", "is the shape on the left or the right?"),
}
EXTRA_WORDS = ("a", "an", "of", "in", "on", "to", "and", "or", "this", "that", "there", "image", "picture",
               "photo", "how", "many", "where", "which", "what", "who", "does", "do", "are", "it", "its")


@dataclass
class SyntheticVQA:
    train: VQADataset
    test: VQADataset
    answers: list[str]
    tokenizer: Any
    processor: Any


def synthetic_vocab() -> list[str]:
    """BERT layout: [PAD], [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then words and characters."""
    words = {w.strip("?{}") for t in TEMPLATES.values() for q in t for w in q.split()} | set(ANSWERS) | set(EXTRA_WORDS)
    words -= {"c", "s", ""}
    chars = list(string.ascii_lowercase + string.digits)
    tail = sorted(words) + chars + list("?.,!'\"-") + [f"##{c}" for c in chars]
    return ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]",
            *dict.fromkeys(tail)]


def build_tokenizer(max_length: int = 40) -> Any:
    """A ``BertTokenizerFast`` over :func:`synthetic_vocab` (no files, no hub).

    transformers 5 ignores ``vocab_file=``: the vocabulary must be passed as ``vocab=`` (dict or path).
    """
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(synthetic_vocab())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=max_length)


def build_processor(tokenizer: Any, image_size: int, patch_size: int = 16) -> Any:
    """ViltProcessor with the PIL image processor: shortest edge ``image_size``, sides multiples of the patch."""
    from transformers import ViltProcessor
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    images = ViltImageProcessorPil(size={"shortest_edge": image_size}, size_divisor=patch_size)
    return ViltProcessor(image_processor=images, tokenizer=tokenizer)


def render(rng: np.random.Generator, size: int, color: str, shape: str, side: str) -> np.ndarray:
    """An H x W x 3 uint8 image: noisy grey background, one filled shape in the given half."""
    img = rng.uniform(60, 160) + rng.normal(0, 20, (size, size, 3))
    r = rng.uniform(0.12, 0.22) * size
    cx = rng.uniform(r, size / 2 - 1) if side == "left" else rng.uniform(size / 2 + 1, size - r)
    cy = rng.uniform(r, size - r)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = _shape_mask(shape, xx - cx, yy - cy, r)
    img[mask] = np.asarray(COLORS[color]) + rng.normal(0, 10, (int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    # upward triangle with apex at (0, -r) and base at y = +r
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def question(rng: np.random.Generator, color: str, shape: str, side: str) -> tuple[str, str]:
    """(question, answer) of a random type for an image with this colour, shape and side."""
    kind = list(TEMPLATES)[rng.integers(len(TEMPLATES))]
    template = TEMPLATES[kind][rng.integers(2)]
    if kind in ("color", "shape", "side"):
        return template, {"color": color, "shape": shape, "side": side}[kind]
    truth, pool = (color, list(COLORS)) if kind == "is_color" else (shape, list(SHAPES))
    asked = truth if rng.random() < 0.5 else rng.choice([p for p in pool if p != truth])
    return template.format(c=asked, s=asked), "yes" if asked == truth else "no"


def make_examples(count: int, image_size: int, rng: np.random.Generator) -> list[VQAExample]:
    label = {a: i for i, a in enumerate(ANSWERS)}
    out = []
    for i in range(count):
        color, shape, side = (str(rng.choice(options)) for options in (list(COLORS), SHAPES, SIDES))
        q, a = question(rng, color, shape, side)
        out.append(VQAExample(render(rng, image_size, color, shape, side), q, ((label[a], 1.0),), f"synthetic:{i}"))
    return out


def build_synthetic_vqa(num_train: int, num_test: int, image_size: int = 64, text_len: int = 16,
                        seed: int = 0, patch_size: int = 16, processor: Any | None = None) -> SyntheticVQA:
    """Train and held-out test splits (independent streams of ``seed``), tokenizer and processor
    (default: the ViLT processor over :func:`build_tokenizer`; METER passes its own)."""
    if processor is None:
        processor = build_processor(build_tokenizer(max_length=text_len), image_size, patch_size)
    tokenizer = processor.tokenizer
    train, test = (make_examples(n, image_size, np.random.default_rng([seed, k]))
                   for k, n in ((0, num_train), (1, num_test)))
    train_set, test_set = (VQADataset(ex, processor, len(ANSWERS), text_len, cache=True) for ex in (train, test))
    return SyntheticVQA(train_set, test_set, list(ANSWERS), tokenizer, processor)
