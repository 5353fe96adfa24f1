"""VQA data for ViLT: soft target scores over a fixed answer vocabulary (ViLT's VQA head trains with BCE).

User format: a JSONL file, one object per line::

    {"image": "images/0001.jpg", "question": "what is on the table?", "answers": ["cup", "cup", "mug"]}

``image`` is absolute or relative to ``image_root`` (default: the JSONL file's folder). ``answers``
is the list of annotator answers (one string is fine). The answer vocabulary is a JSON list of
strings; its index is the label id and its length must equal the model's ``num_labels``.

Scores: an answer given by k of the n annotators scores ``min(1, k / min(3, n))``. With VQAv2's ten
annotators this is the standard ``min(1, k/3)``; with a single answer it is 1.0 (plain ``k/3`` would
cap single-answer data at 0.33).

Answers not in the vocabulary are **skipped and counted** (one log line with the count and a few
examples); a question left with no in-vocabulary answer keeps an all-zero target, as in VQA practice,
and scores 0 in :func:`apt_deploy.training.evaluate`. If *no* answer of the whole file is in the
vocabulary, loading fails (the vocabulary file is almost certainly the wrong one).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from apt_deploy.fileio import read_json
from apt_deploy.errors import ConfigError, InputPathError

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class VQAExample:
    """One question: an image (path, or an H x W x 3 uint8 array), the question and sparse soft scores."""

    image: str | np.ndarray
    question: str
    scores: tuple[tuple[int, float], ...]
    source: str = ""  # "file.jsonl:12", for error messages


class VQADataset(Dataset):
    """Yields dicts of ``input_ids, attention_mask, token_type_ids`` [T], ``pixel_values`` [3, H, W],
    ``pixel_mask`` [H, W] and ``labels`` [num_labels] (float soft scores). Batch with :func:`collate`."""

    def __init__(self, examples: Sequence[VQAExample], processor: Any, num_labels: int, text_len: int,
                 cache: bool = False) -> None:
        self.examples, self.processor = list(examples), processor
        self.num_labels, self.text_len = num_labels, text_len
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = self._encode(self.examples[index])
        if self._cache is not None:
            self._cache[index] = item
        return item

    def _encode(self, ex: VQAExample) -> dict[str, torch.Tensor]:
        text = self.processor.tokenizer(ex.question, padding="max_length", truncation=True,
                                        max_length=self.text_len, return_tensors="pt")
        pixels = self.processor.image_processor(load_image(ex), return_tensors="pt")
        labels = torch.zeros(self.num_labels)
        for label, score in ex.scores:
            labels[label] = score
        item = {k: text[k][0] for k in TEXT_KEYS if k in text}
        item.setdefault("token_type_ids", torch.zeros_like(item["input_ids"]))
        item.update({k: pixels[k][0] for k in ("pixel_values", "pixel_mask") if k in pixels})  # CLIP's (METER's) has no mask
        return {**item, "labels": labels}


def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of items; images of different sizes are zero-padded bottom/right (pixel_mask 0 there).
    Items without ``pixel_mask`` (METER's center-cropped images) are stacked as they are."""
    out = {k: torch.stack([b[k] for b in batch]) for k in (*TEXT_KEYS, "labels")}
    if "pixel_mask" not in batch[0]:  # fixed-size (center-cropped) images: nothing to pad
        return {**out, "pixel_values": torch.stack([b["pixel_values"] for b in batch])}
    h = max(b["pixel_values"].shape[-2] for b in batch)
    w = max(b["pixel_values"].shape[-1] for b in batch)
    pix = torch.zeros(len(batch), 3, h, w)
    mask = torch.zeros(len(batch), h, w, dtype=torch.long)
    for i, b in enumerate(batch):
        bh, bw = b["pixel_values"].shape[-2:]
        pix[i, :, :bh, :bw] = b["pixel_values"]
        mask[i, :bh, :bw] = b["pixel_mask"]
    return {**out, "pixel_values": pix, "pixel_mask": mask}


def answer_scores(answers: Sequence[str], label2id: Mapping[str, int]) -> tuple[tuple[tuple[int, float], ...], list[str]]:
    """(sparse (label id, score) pairs, the answers not in the vocabulary). Answers are compared lower-cased."""
    norm = [a.strip().lower() for a in answers]
    denom = min(3, len(norm)) or 1
    known = tuple((label2id[a], min(1.0, c / denom)) for a, c in sorted(Counter(norm).items()) if a in label2id)
    return known, [a for a in norm if a not in label2id]


def load_image(ex: VQAExample) -> Any:
    """The example's image as RGB (PIL for files, the array itself for in-memory images)."""
    if isinstance(ex.image, np.ndarray):
        return ex.image
    from PIL import Image

    try:
        with Image.open(ex.image) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise InputPathError(f"image {ex.image!r} ({ex.source}) does not exist", "an existing image file",
                             "fix the path, or pass --image-root for relative paths") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        raise InputPathError(f"image {ex.image!r} ({ex.source}) cannot be decoded: {e}",
                             "an image PIL can read (JPEG, PNG, ...)", "re-encode or remove that line") from e


def load_answers(path: str | Path, num_labels: int | None = None) -> list[str]:
    """Read the answer vocabulary (JSON list of strings; index = label id) and check it against the model."""
    data = read_json(path, "answer vocabulary file", "a JSON file (the answer vocabulary: a JSON list of strings)",
                     "check the path and the file's JSON", error=ConfigError)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) for a in data):
        raise ConfigError(f"answer vocabulary {str(path)!r} is not a non-empty JSON list of strings",
                          'a JSON list like ["yes", "no", "2"] whose index is the label id', "rewrite the file")
    norm = [a.strip().lower() for a in data]
    dupes = sorted(a for a, c in Counter(norm).items() if c > 1)
    if dupes:
        raise ConfigError(f"answer vocabulary {str(path)!r} repeats {dupes[:5]}", "each answer once",
                          "remove the duplicates (the model's label ids must stay aligned)")
    if num_labels is not None and len(norm) != num_labels:
        raise ConfigError(f"answer vocabulary {str(path)!r} has {len(norm)} answers but the model has num_labels={num_labels}",
                          "one answer per output of the model's VQA head",
                          "pass the vocabulary the model's head was built for (its config.json id2label)")
    return norm


def load_processor(model_dir: str | Path) -> Any:
    """``ViltProcessor.from_pretrained(model_dir)`` offline, with clear errors for missing parts.

    transformers 5 has no torchvision here and falls back to ``ViltImageProcessorPil`` (same output).
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise InputPathError(f"model directory {str(d)!r} does not exist", "a local save_pretrained directory",
                             "check --model; no model hub is contacted")
    for files, what in ((TOKENIZER_FILES, "tokenizer"), (PROCESSOR_FILES, "image processor")):
        if not any((d / f).is_file() for f in files):
            raise InputPathError(f"{str(d)!r} has no {what} (none of {', '.join(files)})",
                                 "a model directory with its tokenizer and image processor",
                                 "save them next to the weights: ViltProcessor(image_processor, tokenizer).save_pretrained(model_dir)")
    from transformers import ViltProcessor

    try:
        return ViltProcessor.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # OSError, ValueError, JSONDecodeError, ... from transformers
        raise InputPathError(f"cannot load the processor from {str(d)!r}: {e}",
                             "a tokenizer and image processor written by save_pretrained", "re-save them") from e


def read_vqa_jsonl(path: str | Path, label2id: Mapping[str, int], image_root: str | Path | None = None) -> list[VQAExample]:
    """Parse and check every line (JSON, fields, image exists) before any training starts."""
    path = Path(path)
    if not path.is_file():
        raise InputPathError(f"data file {str(path)!r} does not exist", "a JSONL file, one question per line",
                             "check --data / --eval-data")
    root = Path(image_root) if image_root is not None else path.parent
    examples, skipped = [], Counter()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                ex, missing = _parse_line(line, f"{path.name}:{number}", label2id, root)
                examples.append(ex)
                skipped.update(missing)
    _check_examples(path, examples, skipped)
    return examples


def load_vqa_jsonl(path: str | Path, answers: Sequence[str], processor: Any, text_len: int,
                   image_root: str | Path | None = None, cache: bool = False) -> VQADataset:
    """A :class:`VQADataset` from a JSONL file and the answer vocabulary (see the module docstring)."""
    label2id = {a.strip().lower(): i for i, a in enumerate(answers)}
    examples = read_vqa_jsonl(path, label2id, image_root)
    return VQADataset(examples, processor, num_labels=len(answers), text_len=text_len, cache=cache)


def _parse_line(line: str, where: str, label2id: Mapping[str, int], root: Path) -> tuple[VQAExample, list[str]]:
    expected = '{"image": "path.jpg", "question": "...", "answers": ["...", ...]}'
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e.msg} at column {e.colno})", f"one JSON object per line: {expected}",
                          "fix or remove that line") from e
    answers = obj.get("answers") if isinstance(obj, dict) else None
    answers = [answers] if isinstance(answers, str) else answers
    if not (isinstance(obj, dict) and isinstance(obj.get("image"), str) and isinstance(obj.get("question"), str)
            and isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
        raise ConfigError(f"{where} has the wrong fields: {line.strip()[:120]}", f"an object like {expected}",
                          "give every line an image path, a question and a non-empty answers list")
    image = Path(obj["image"]) if Path(obj["image"]).is_absolute() else root / obj["image"]
    if not image.is_file():
        raise InputPathError(f"{where}: image {str(image)!r} does not exist", "an existing image file",
                             "fix the path, or pass --image-root (relative paths resolve against it)")
    scores, unknown = answer_scores(answers, label2id)
    return VQAExample(str(image), obj["question"], scores, where), unknown


def _check_examples(path: Path, examples: list[VQAExample], skipped: Counter) -> None:
    if not examples:
        raise ConfigError(f"data file {str(path)!r} has no questions", "at least one JSON line")
    if not any(ex.scores for ex in examples):
        raise ConfigError(f"none of the answers in {str(path)!r} is in the answer vocabulary (e.g. {list(skipped)[:5]})",
                          "answers spelled as in the vocabulary file", "pass the matching --answers file")
    if skipped:
        log.warning("%s: skipped %d answers not in the vocabulary (%d distinct, e.g. %s); %d of %d questions have none left",
                    path.name, sum(skipped.values()), len(skipped), ", ".join(list(skipped)[:5]),
                    sum(not ex.scores for ex in examples), len(examples))
