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


def proposal_loss(model: nn.Module, outputs: Any, labels: list[dict[str, torch.Tensor]], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """The two-stage encoder-proposal loss that transformers' Grounding DINO loss leaves without gradient.

    transformers (5.x) computes its ``*_enc`` terms on ``encoder_pred_boxes`` = the DETACHED top-k proposal
    boxes and on ``encoder_logits`` = scores of the learned query embeddings, so neither the per-token
    proposal scores that pick the top-k (``enc_outputs_class``) nor the proposal box head
    (``encoder_output_bbox_embed``, not shared by default) ever receive a gradient: the decoder starts from
    proposals chosen by untrained scores, which is why full training plateaus (docs/sdpt.md). The original
    Grounding DINO supervises the un-detached top-k proposals; this is that term, with transformers' own
    matcher and criterion on the same top-k the model selects: 2 * focal + bbox_coef * L1 + giou_coef * GIoU."""
    from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher, GroundingDinoImageLoss
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps, build_text_mask

    cfg = model.config
    scores, coords = outputs.enc_outputs_class, outputs.enc_outputs_coord_logits
    top = scores.max(-1)[0].topk(cfg.num_queries, dim=1)[1][..., None]
    logits = torch.gather(scores, 1, top.expand(-1, -1, scores.shape[-1]))
    boxes = torch.gather(coords, 1, top.expand(-1, -1, 4)).sigmoid()
    matcher = GroundingDinoHungarianMatcher(class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost, giou_cost=cfg.giou_cost)
    criterion = GroundingDinoImageLoss(matcher, cfg.focal_alpha, ["labels", "boxes"])
    parts = criterion({"logits": logits, "pred_boxes": boxes, "label_maps": build_label_maps(logits, input_ids),
                       "text_mask": build_text_mask(logits, attention_mask)}, labels)
    return (2.0 * parts["loss_ce"] + cfg.bbox_loss_coefficient * parts["loss_bbox"]
            + cfg.giou_loss_coefficient * parts["loss_giou"])


def train_detection(model: nn.Module, examples: Sequence[DetectionExample], processor: Any, prompt: str,
                    settings: DetectionTrainSettings, text_len: int,
                    params: Iterable[nn.Parameter] | None = None, proposals: bool = False) -> DetectionTrainResult:
    """``settings.steps`` AdamW steps on seeded shuffles of ``examples``; trains ``params`` (default: every
    parameter with requires_grad, i.e. what the method left trainable). ``proposals``: add
    :func:`proposal_loss` (the two-stage term transformers' loss leaves without gradient)."""
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
        out = model(**batch.inputs, labels=batch.labels)
        loss = out.loss
        if proposals:
            loss = loss + proposal_loss(model, out, batch.labels, batch.inputs["input_ids"], batch.inputs["attention_mask"])
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
