"""Training loop for prompt methods: the official APT recipe (specs/apt.md), for APT and deep prompt alike.

AdamW(betas=(0.9, 0.98), eps=1e-8); weight decay 0.01 on everything trained except biases and
LayerNorm parameters (prompts, W_dn/W_up, log_scale and the learned [CLS] embedding do decay, as the
spec names no other exception); the task head at ``head_lr_mult`` x lr; linear warm-up over
``warmup_ratio`` of the steps, then linear decay to 0. Loss: ViLT's VQA loss, BCE-with-logits (mean)
x num_labels over soft target scores.

Scale-out (docs/distributed.md): run under ``torchrun`` with a :class:`~apt_deploy.distributed.DistContext`
for data parallelism; :class:`~apt_deploy.settings.ScaleSettings` adds gradient accumulation, bf16/fp16
autocast, training checkpoints and resuming. The data order is a function of (seed, epoch, position).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from apt_deploy.backbones import get_backbone, spec_for_model
from apt_deploy.data.vqa import collate
from apt_deploy.distributed import DistContext, ShardedBatches, main_progress, shard_range, wrap_trainable
from apt_deploy.errors import ConfigError
from apt_deploy.progress import timed_step
from apt_deploy.settings import ScaleSettings, TrainSettings
from apt_deploy.stepping import GradientStepper
from apt_deploy.train_state import History, TrainCheckpointer, run_identity

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


def train(model: nn.Module, dataset: Dataset, settings: TrainSettings, eval_dataset: Dataset | None = None,
          scale: ScaleSettings | None = None, ctx: DistContext | None = None) -> TrainResult:
    """Train the model's trainable parameters for ``settings.steps`` optimizer steps; leaves it in eval mode.

    ``ctx`` (from :func:`apt_deploy.distributed.distributed`) makes it data-parallel: each rank takes
    ``settings.batch_size`` examples per micro-batch from its shard, DDP all-reduces the gradients, so one
    step sees batch x grad_accum x world_size examples. ``scale``: accumulation, precision, checkpoints, resume.
    """
    scale, ctx = scale or ScaleSettings(), ctx or DistContext()
    net, stepper, batches, checkpointer = _prepare(model, dataset, settings, scale, ctx)
    done, history = checkpointer.resume()
    stream, result = iter(batches), TrainResult(losses=history.losses, evals=history.evals)
    loss_fn = _vqa_loss_fn(net, ctx.device)
    effective = settings.batch_size * scale.grad_accum * ctx.world_size
    net.train()  # the model's mode, through its DDP wrapper
    try:
        with timed_step(f"training {settings.steps} steps at batch {effective} ({settings.batch_size} x "
                        f"{scale.grad_accum} accumulation x {ctx.world_size} processes)", log) as timing:
            for step in main_progress(ctx, range(done + 1, settings.steps + 1), total=settings.steps - done, desc="train"):
                result.losses.append(stepper.step(stream, loss_fn))
                if eval_dataset is not None and _eval_due(step, settings):
                    result.evals.append((step, evaluate(model, eval_dataset, settings.eval_batch_size, ctx)))
                    log.info("step %d: loss %.4f, eval accuracy %.4f", step, result.losses[-1], result.evals[-1][1])
                checkpointer.maybe_save(step, History(result.losses, result.evals))
    finally:
        model.eval()
    result.seconds = timing["seconds"]
    log.info("trained %d steps in %.1f s (%.2f steps/s); loss %.4f -> %.4f", result.steps, result.seconds,
             result.steps_per_second, result.mean_loss(first=True), result.mean_loss())
    return result


def _prepare(model: nn.Module, dataset: Dataset, settings: TrainSettings, scale: ScaleSettings,
             ctx: DistContext) -> tuple[nn.Module, GradientStepper, ShardedBatches, TrainCheckpointer]:
    """(DDP-wrapped model, stepper, this rank's batch stream, checkpointer), the model on ``ctx.device``."""
    torch.manual_seed(settings.seed + ctx.rank)
    model.to(ctx.device)
    optimizer, scheduler = build_optimizer(model, settings)
    net = wrap_trainable(model, ctx)
    batches = ShardedBatches(dataset, settings.batch_size, ctx, settings.seed, collate)
    stepper = GradientStepper(net, optimizer, scheduler, ctx, scale.precision, scale.grad_accum, settings.grad_clip)
    identity = run_identity(model, **asdict(settings), grad_accum=scale.grad_accum, precision=scale.precision,
                            data_size=len(dataset))
    return net, stepper, batches, TrainCheckpointer(model, stepper, batches, ctx, scale, identity)


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 64, ctx: DistContext | None = None) -> float:
    """VQA accuracy: the mean target score of the argmax answer (1.0 = always a fully correct answer).
    With ``ctx`` each rank scores its shard and the sums are all-reduced (every example counted once)."""
    ctx = ctx or DistContext()
    was_training, score, count = model.training, 0.0, 0
    model.eval()
    with torch.inference_mode():
        shard = Subset(dataset, shard_range(len(dataset), ctx))
        for batch in DataLoader(shard, batch_size=batch_size, collate_fn=collate):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            predicted = model(**batch).logits.argmax(dim=-1, keepdim=True)
            score += labels.gather(1, predicted).sum().item()
            count += labels.shape[0]
    model.train(was_training)
    score, count = ctx.sum([score, count])
    return score / max(1, count)


def _vqa_loss_fn(net: nn.Module, device: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The loss of one collated micro-batch through ``net`` (the model, or its DDP wrapper)."""

    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        return vqa_loss(net(**batch).logits, labels)

    return loss_fn


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
