"""Training loop for prompt methods: the official APT recipe (specs/apt.md), for APT and deep prompt alike.

AdamW(betas=(0.9, 0.98), eps=1e-8); weight decay 0.01 on everything trained except biases and
LayerNorm parameters (prompts, W_dn/W_up, log_scale and the learned [CLS] embedding do decay, as the
spec names no other exception); the task head at ``head_lr_mult`` x lr; linear warm-up over
``warmup_ratio`` of the steps, then linear decay to 0. Loss: ViLT's VQA loss, BCE-with-logits (mean)
x num_labels over soft target scores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from apt_deploy.backbones import get_backbone, spec_for_model
from apt_deploy.data.vqa import collate
from apt_deploy.errors import ConfigError
from apt_deploy.progress import progress, timed_step
from apt_deploy.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Per-step losses, (step, accuracy) evaluations, and wall time of the loop (evaluations included)."""

    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps taken: one loss is recorded per step."""
        return len(self.losses)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    def mean_loss(self, first: bool = False, window: int = 10) -> float:
        """Mean loss over the first or last ``window`` steps."""
        part = self.losses[:window] if first else self.losses[-window:]
        return sum(part) / max(1, len(part))


def vqa_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ViLT's VQA loss: mean BCE-with-logits over soft scores, times the number of answers."""
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)) * labels.shape[1]


def linear_warmup_decay(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: (s+1)/w for s < w (peak 1 at s = w-1), then (T-s)/(T-w), reaching 0 at s = T."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def param_groups(model: nn.Module, settings: TrainSettings) -> list[dict]:
    """AdamW groups named ``{head|cross_modal|body}/{decay|no_decay}``; frozen parameters are left out.
    ``cross_modal`` (METER: APT modules and poolers) exists only for backbones whose spec names such parameters."""
    head, cross = _head_parameter_ids(model), _cross_modal_parameter_ids(model)
    mult = {"head": settings.head_lr_mult, "cross_modal": settings.cross_modal_lr_mult, "body": 1.0}
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for p, no_decay in _trainable(model):
        part = "head" if id(p) in head else "cross_modal" if id(p) in cross else "body"
        groups.setdefault((part, "no_decay" if no_decay else "decay"), []).append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameters", "a model after apply_apt / apply_deep_prompt",
                          "apply a prompt method before training")
    return [{"name": f"{part}/{decay}", "params": params, "lr": settings.lr * mult[part],
             "weight_decay": 0.0 if decay == "no_decay" else settings.weight_decay}
            for (part, decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, settings: TrainSettings) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and the warm-up / linear-decay LambdaLR (step it once per step)."""
    optimizer = torch.optim.AdamW(param_groups(model, settings), betas=settings.betas, eps=settings.eps)
    warmup = int(round(settings.warmup_ratio * settings.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(settings.steps, warmup))
    return optimizer, scheduler


def train(model: nn.Module, dataset: Dataset, settings: TrainSettings, eval_dataset: Dataset | None = None) -> TrainResult:
    """Train the model's trainable parameters for ``settings.steps`` steps; leaves the model in eval mode."""
    torch.manual_seed(settings.seed)
    optimizer, scheduler = build_optimizer(model, settings)
    clipped = [p for group in optimizer.param_groups for p in group["params"]]
    batches, result = _batches(dataset, settings), TrainResult()
    model.train()
    try:
        with timed_step(f"training {settings.steps} steps at batch {settings.batch_size}", log) as timing:
            for step in progress(range(1, settings.steps + 1), total=settings.steps, desc="train"):
                result.losses.append(_step(model, next(batches), optimizer, scheduler, clipped, settings.grad_clip))
                if eval_dataset is not None and _eval_due(step, settings):
                    result.evals.append((step, evaluate(model, eval_dataset, settings.eval_batch_size)))
                    log.info("step %d: loss %.4f, eval accuracy %.4f", step, result.losses[-1], result.evals[-1][1])
    finally:
        model.eval()
    result.seconds = timing["seconds"]
    log.info("trained %d steps in %.1f s (%.2f steps/s); loss %.4f -> %.4f", result.steps, result.seconds,
             result.steps_per_second, result.mean_loss(first=True), result.mean_loss())
    return result


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 64) -> float:
    """VQA accuracy: the mean target score of the argmax answer (1.0 = always a fully correct answer)."""
    was_training, score, count = model.training, 0.0, 0
    model.eval()
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            labels = batch.pop("labels")
            predicted = model(**batch).logits.argmax(dim=-1, keepdim=True)
            score += labels.gather(1, predicted).sum().item()
            count += labels.shape[0]
    model.train(was_training)
    return score / max(1, count)


def _step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LambdaLR, params: list[nn.Parameter], grad_clip: float | None) -> float:
    """One optimizer step; ``params`` (the optimizer's, gathered once) are clipped to ``grad_clip`` if set."""
    labels = batch.pop("labels")
    loss = vqa_loss(model(**batch).logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


def _batches(dataset: Dataset, settings: TrainSettings) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled every epoch, seeded); a partial last batch only for tiny datasets."""
    if len(dataset) == 0:
        raise ConfigError("the training dataset is empty", "at least one example")
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator,
                        collate_fn=collate, drop_last=len(dataset) >= settings.batch_size)
    while True:
        yield from loader


def _eval_due(step: int, settings: TrainSettings) -> bool:
    return step == settings.steps or (settings.eval_every > 0 and step % settings.eval_every == 0)


def _trainable(model: nn.Module) -> Iterator[tuple[nn.Parameter, bool]]:
    """(parameter, excluded from weight decay) for every trainable parameter, once each."""
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield p, isinstance(module, nn.LayerNorm) or name == "bias"


def _spec(model: nn.Module):
    state = getattr(model, "apt_deploy_state", None)
    return get_backbone(state.backbone) if state is not None else spec_for_model(model)


def _head_parameter_ids(model: nn.Module) -> set[int]:
    head = _spec(model).trainable_extras(model).get("head")
    return {id(p) for p in head.parameters()} if head is not None else set()


def _cross_modal_parameter_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in _spec(model).cross_modal_parameters(model)}
