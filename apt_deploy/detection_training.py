"""Few-shot training of Grounding DINO with SDPT (or any set of trainable parameters, for baselines).

Loss: Grounding DINO's own (transformers computes it from ``labels``: Hungarian matching, focal
classification over phrase tokens, L1 + GIoU boxes, auxiliary decoder and encoder losses). Optimiser:
the SDPT README's AdamW (weight decay 0.01) with gradient clipping 1.0, linear warm-up over
``warmup_ratio`` of the steps, then constant. Preprocessing: the model directory's processor, images
resized to the model's fixed export size, the category prompt padded to ``text_len`` tokens.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from apt_deploy.data.coco import DetectionExample
from apt_deploy.progress import progress
from apt_deploy.settings import DetectionTrainSettings

log = logging.getLogger(__name__)


@dataclass
class DetectionBatch:
    """Model inputs (pixel_values, pixel_mask, input_ids, attention_mask, token_type_ids) + DETR-style labels."""

    inputs: dict[str, torch.Tensor]
    labels: list[dict[str, torch.Tensor]]


@dataclass
class DetectionTrainResult:
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    def mean_loss(self, first: bool = False, window: int = 10) -> float:
        part = self.losses[:window] if first else self.losses[-window:]
        return sum(part) / max(1, len(part))


def image_size(model: nn.Module) -> int:
    from apt_deploy.backbones.grounding_dino import DEFAULT_IMAGE_SIZE

    return int(getattr(model.config, "image_size", None) or DEFAULT_IMAGE_SIZE)


def encode(processor: Any, images: Sequence[Any], prompt: str, size: int | tuple[int, int],
           text_len: int) -> dict[str, torch.Tensor]:
    """Processor outputs for ``images`` with the same ``prompt``: resized to ``size`` (side or (h, w)) pixels,
    the fixed size the model is exported with; text padded to ``text_len`` tokens."""
    h, w = (size, size) if isinstance(size, int) else size
    enc = processor(images=list(images), text=[prompt] * len(images), padding="max_length", max_length=text_len,
                    truncation=True, return_tensors="pt", size={"height": h, "width": w})
    return {k: enc[k] for k in ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids")}


def make_batches(examples: Sequence[DetectionExample], processor: Any, prompt: str, size: int, text_len: int,
                 batch_size: int) -> list[DetectionBatch]:
    """Preprocess once (few-shot sets are small): batches of ``batch_size`` in the given order."""
    out = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        labels = [{"class_labels": torch.tensor(e.labels, dtype=torch.long),
                   "boxes": torch.tensor(e.boxes, dtype=torch.float32).reshape(-1, 4)} for e in part]
        out.append(DetectionBatch(encode(processor, [e.image for e in part], prompt, size, text_len), labels))
    return out


def train_detection(model: nn.Module, examples: Sequence[DetectionExample], processor: Any, prompt: str,
                    settings: DetectionTrainSettings, text_len: int,
                    params: Iterable[nn.Parameter] | None = None) -> DetectionTrainResult:
    """``settings.steps`` AdamW steps on seeded shuffles of ``examples``; trains ``params`` (default: every
    parameter with requires_grad, i.e. what the method left trainable)."""
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        from apt_deploy.errors import ConfigError

        raise ConfigError("train_detection got no trainable parameters", "a model with a method applied (apply_sdpt)")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warm = max(1, int(settings.warmup_ratio * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    result, start = DetectionTrainResult(), time.perf_counter()
    model.train()
    for batch in progress(_batch_stream(examples, processor, prompt, image_size(model), text_len, settings),
                          total=settings.steps, desc="train"):
        loss = model(**batch.inputs, labels=batch.labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        schedule.step()
        result.losses.append(float(loss.detach()))
    model.eval()
    result.seconds = time.perf_counter() - start
    log.info("trained %d steps in %.1f s: loss %.3f -> %.3f", settings.steps, result.seconds,
             result.mean_loss(first=True), result.mean_loss())
    return result


def _batch_stream(examples: Sequence[DetectionExample], processor: Any, prompt: str, size: int, text_len: int,
                  settings: DetectionTrainSettings):
    """``settings.steps`` batches: seeded reshuffles of the (preprocessed-once) examples."""
    rng = random.Random(settings.seed)
    encoded = make_batches(examples, processor, prompt, size, text_len, 1)
    order: list[int] = []
    for _ in range(settings.steps):
        if len(order) < settings.batch_size:
            order += rng.sample(range(len(encoded)), len(encoded))
        take, order = order[:settings.batch_size], order[settings.batch_size:]
        yield _stack([encoded[i] for i in dict.fromkeys(take)])


def _stack(parts: list[DetectionBatch]) -> DetectionBatch:
    inputs = {k: torch.cat([p.inputs[k] for p in parts]) for k in parts[0].inputs}
    return DetectionBatch(inputs, [lab for p in parts for lab in p.labels])


@torch.no_grad()
def predict_batches(model: nn.Module, batches: Sequence[DetectionBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, pred_boxes) per batch, eval mode."""
    model.eval()
    return [(out.logits, out.pred_boxes) for out in (model(**b.inputs) for b in batches)]
