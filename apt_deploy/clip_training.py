"""Few-shot training of CLIP classifiers: ``apt-deploy train --backbone clip --method coop|gram|apt|apt+coop``.

Python API: :func:`prepare_clip` (model + tokenizer + processor + method; :func:`load_clip_with_method`
when the tokenizer is already loaded), :func:`train_clip`,
:func:`evaluate_clip`, :func:`run_gram_meta_training`; CLI glue: :func:`add_clip_arguments` and
:func:`train_from_args` (apt_deploy/cli/train.py dispatches here for ``--backbone clip``).

Optimisation: CoOp's recipe is SGD (momentum 0.9), lr 2e-3, cosine decay; APT's is AdamW
(0.9, 0.98), lr 5e-4, weight decay 0.01, warm-up 10 %. ``ClipTrainSettings.optimizer`` picks one
("sgd" default for coop/gram, "adamw" for apt and apt+coop); both use 10 % linear warm-up then
cosine decay to 0. With GRAM, ψ_φ* rewrites the context gradient before every optimiser step.
A side that does not train is computed once and cached: the image features for coop / gram, the
class text features (the frozen zero-shot head) for apt.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt_deploy.errors import ConfigError
from apt_deploy.settings import ClipTrainSettings, DEFAULT_LR, ScaleSettings

if TYPE_CHECKING:  # torch is imported lazily: `apt-deploy train --help` works without it
    import torch
    from PIL import Image
    from torch import nn

    from apt_deploy.distributed import DistContext
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.methods.coop import CoOpConfig
    from apt_deploy.methods.gram import GradientRegulator, GramConfig

log = logging.getLogger(__name__)


def add_clip_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags used only with ``--backbone clip`` (the shared ones: --model --data --eval-data --out ...)."""
    g = parser.add_argument_group("CLIP (--backbone clip; methods coop, gram, apt, apt+coop)")
    g.add_argument("--shots", type=int, default=16, help="images per class drawn (seeded) from --data (default 16)")
    g.add_argument("--context-len", type=int, default=16, help="CoOp context vectors M with random init (default 16)")
    g.add_argument("--context-init", default=None,
                   help='init text for the context, e.g. "a photo of a" (zero-shot start; M = its token count)')
    g.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default=None,
                   help="default: sgd for coop/gram (CoOp), adamw when APT trains")
    g.add_argument("--captions", default=None, help='GRAM: unlabeled pairs, JSONL of {"image": ..., "caption": ...}')
    g.add_argument("--meta-steps", type=int, default=60, help="GRAM meta-training steps (default 60)")
    g.add_argument("--meta-shots", type=int, default=4, help="GRAM pairs per pseudo-class in a meta-task (default 4)")
    g.add_argument("--meta-ways", type=int, default=4, help="GRAM pseudo-classes per support/query set (default 4)")
    g.add_argument("--domains", type=int, default=4, help="GRAM coarse clusters (domains) (default 4)")
    g.add_argument("--pseudo-classes", type=int, default=24, help="GRAM fine clusters (pseudo-classes) (default 24)")
    g.add_argument("--inner-lr", type=float, default=1.0, help="GRAM inner step size alpha (default 1.0)")


def prepare_clip(model_dir: str | Path, method: str, class_names: list[str], coop: CoOpConfig | None = None,
                 apt: APTConfig | None = None) -> tuple[nn.Module, Any, Any]:
    """(model with the method applied, tokenizer, image processor), all read offline from ``model_dir``."""
    from apt_deploy.data.imagefolder import load_clip_preprocessing

    tokenizer, processor = load_clip_preprocessing(model_dir)
    return load_clip_with_method(model_dir, tokenizer, method, class_names, coop, apt), tokenizer, processor


def load_clip_with_method(model_dir: str | Path, tokenizer: Any, method: str, class_names: list[str],
                          coop: CoOpConfig | None = None, apt: APTConfig | None = None) -> nn.Module:
    """The CLIPModel in ``model_dir`` with ``method`` applied; ``tokenizer`` (the model's own) tokenises the class names."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.methods.coop import CoOpConfig, tokenize_class_prompts
    from apt_deploy.tuning import apply_clip_method

    model = get_backbone("clip").load(str(model_dir))
    coop = coop or CoOpConfig()
    return apply_clip_method(model, method, tokenize_class_prompts(tokenizer, class_names, coop), coop, apt)


def run_gram_meta_training(model: nn.Module, tokenizer: Any, processor: Any, pairs: list[tuple[Image.Image, str]],
                           config: GramConfig | None = None) -> GradientRegulator:
    """Embed the unlabeled pairs with the frozen towers, cluster them, meta-train θ and ψ (methods/gram.py)."""
    from apt_deploy.data.imagefolder import pixel_tensor
    from apt_deploy.methods.gram import embed_pairs, meta_train

    bank = embed_pairs(model, pixel_tensor(processor, [img for img, _ in pairs]), [c for _, c in pairs], tokenizer)
    return meta_train(model, bank, config)


def build_clip_optimizer(model: nn.Module, settings: ClipTrainSettings,
                         method: str) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD(momentum 0.9) or AdamW(0.9, 0.98; no decay on 1-D tensors) + warm-up/cosine LambdaLR."""
    import torch

    kind, lr = settings.resolved(method)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method {method!r} left nothing trainable", "at least one trainable tensor",
                          "apply coop, gram, apt or apt+coop (with a trainable context for coop / gram) before training")
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)
    warm = max(1, int(settings.warmup_ratio * settings.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, settings.steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_clip(model: nn.Module, data: Any, settings: ClipTrainSettings | None = None,
               scale: ScaleSettings | None = None, ctx: DistContext | None = None) -> list[float]:
    """Few-shot cross-entropy tuning of whatever the method left trainable; returns the loss per optimizer step.

    Each step draws ``batch_size`` x ``grad_accum`` x world size indices with replacement from one seeded
    generator that every rank shares (CoOp's sampling; one process draws exactly what it always did);
    rank r trains on its slices and DDP all-reduces the gradients. ``scale``: accumulation, precision,
    training checkpoints, resume (docs/distributed.md).
    """
    import torch
    from torch import nn
    from apt_deploy.distributed import DistContext, main_progress, wrap_trainable
    from apt_deploy.methods.gram import regulate_gradients
    from apt_deploy.progress import timed_step
    from apt_deploy.settings import ScaleSettings
    from apt_deploy.stepping import GradientStepper
    from apt_deploy.train_state import History, TrainCheckpointer, run_identity

    settings, scale, ctx = settings or ClipTrainSettings(), scale or ScaleSettings(), ctx or DistContext()
    method = model.apt_deploy_state.method
    model.to(ctx.device)
    pixels, labels = data.pixel_values.to(ctx.device), data.labels.to(ctx.device)
    opt, sched = build_clip_optimizer(model, settings, method)
    net = wrap_trainable(_logits_module(model, pixels, _frozen_features(model, pixels)), ctx)
    draws = GlobalDraws(len(data), settings.batch_size, ctx, scale.grad_accum, settings.seed)
    stepper = GradientStepper(net, opt, sched, ctx, scale.precision, scale.grad_accum, settings.grad_clip,
                              before_step=lambda: regulate_gradients(model))
    identity = run_identity(model, **dataclasses.asdict(settings), grad_accum=scale.grad_accum,
                            precision=scale.precision, data_size=len(data))
    checkpointer = TrainCheckpointer(model, stepper, draws, ctx, scale, identity)
    done, history = checkpointer.resume()
    stream = iter(draws)
    net.train()  # the model's mode, through its DDP wrapper
    with timed_step(f"train clip/{method} for {settings.steps} steps at batch {draws.per_step}", log):
        for step in main_progress(ctx, range(done + 1, settings.steps + 1), total=settings.steps - done,
                                  desc=f"train {method}"):
            history.losses.append(stepper.step(stream, lambda idx: nn.functional.cross_entropy(net(idx), labels[idx])))
            checkpointer.maybe_save(step, history)
    model.eval()
    return history.losses


class GlobalDraws:
    """CoOp's sampling, shared by all ranks: per optimizer step one draw of ``min(batch, n)`` x grad_accum x
    world size indices (with replacement) from a generator seeded once; micro-batch k of rank r is slice
    k x world + r. Resumable: the state is the generator's."""

    def __init__(self, n: int, batch_size: int, ctx: DistContext, grad_accum: int, seed: int) -> None:
        import torch
        from apt_deploy.distributed import check_world_size

        check_world_size(n, ctx)
        self.n, self.batch, self.ctx, self.accum = n, min(batch_size, n), ctx, grad_accum
        self.per_step = self.batch * grad_accum * ctx.world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Any:
        import torch

        while True:
            idx = torch.randint(self.n, (self.per_step,), generator=self.generator)
            for k in range(self.accum):
                start = (k * self.ctx.world_size + self.ctx.rank) * self.batch
                yield idx[start:start + self.batch].to(self.ctx.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "dataset_size": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset_size"] != self.n:
            raise ConfigError(f"the resumed run trained on {state['dataset_size']} images, this one on {self.n}",
                              "the same --data and --shots as the interrupted run", "resume with the same data")
        self.generator.set_state(state["generator"])


def evaluate_clip(model: nn.Module, data: Any, batch_size: int = 256, ctx: DistContext | None = None) -> float:
    """Top-1 accuracy of the (training-form or folded) classifier: the image tower + the class GEMM.
    With ``ctx`` each rank scores its shard and the counts are all-reduced."""
    import torch
    from apt_deploy.backbones import get_backbone
    from apt_deploy.distributed import DistContext, shard_range

    ctx = ctx or DistContext()
    classifier = get_backbone("clip").export_module(model).eval()
    shard = torch.tensor(list(shard_range(len(data), ctx)), dtype=torch.long)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(shard), batch_size):
            idx = shard[i:i + batch_size]
            logits = classifier(data.pixel_values[idx].to(ctx.device))
            correct += int((logits.argmax(-1).cpu() == data.labels[idx]).sum())
    correct, count = ctx.sum([correct, len(shard)])
    return correct / max(1, count)


def _logits_module(model: nn.Module, pixel_values: torch.Tensor,
                   frozen: tuple[torch.Tensor | None, torch.Tensor | None]) -> nn.Module:
    """A module whose ``forward(idx)`` gives the training-form logits of ``pixel_values[idx]`` (DDP all-reduces
    through a module's forward); ``model`` is its only submodule, so its parameters are the model's."""
    from torch import nn

    class TrainingLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return _logits(self.model, pixel_values, idx, frozen)

    return TrainingLogits()


def _frozen_features(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(normalised image features of every image, unnormalised class text features), each computed once
    when nothing on its side trains (image: coop, gram; text: apt's frozen zero-shot head), else None."""
    import torch
    from apt_deploy.methods.coop import image_features

    image_side = [*model.vision_model.parameters(), *model.visual_projection.parameters()]
    text_side = [*model.text_model.parameters(), *model.text_projection.parameters(), *model.prompt_learner.parameters()]
    with torch.no_grad():
        image = None if any(p.requires_grad for p in image_side) else torch.cat(
            [image_features(model, pixel_values[i:i + 256]) for i in range(0, len(pixel_values), 256)])
        text = None if any(p.requires_grad for p in text_side) else model.prompt_learner.text_features(model)
    return image, text


def _logits(model: nn.Module, pixel_values: torch.Tensor, idx: torch.Tensor,
            frozen: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
    """The training-form class logits of ``pixel_values[idx]``, reusing whichever side :func:`_frozen_features` cached."""
    from apt_deploy.methods.coop import cosine_logits, image_features

    image, text = frozen
    text = model.prompt_learner.text_features(model) if text is None else text
    image = image_features(model, pixel_values[idx]) if image is None else image[idx]
    return cosine_logits(model, image, text)


def train_from_args(args: argparse.Namespace, scale: ScaleSettings | None = None, ctx: DistContext | None = None) -> int:
    """``apt-deploy train --backbone clip``: 1. data, 2. model + method, 3. GRAM meta-training (every rank runs
    it, seeded), 4. few-shot tuning (data-parallel under torchrun), 5. evaluation, 6. save_prompts (rank 0)."""
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.data.imagefolder import check_class_names, load_clip_preprocessing, load_image_folder

    method = args.method
    _check_clip_args(args)
    tokenizer, processor = load_clip_preprocessing(args.model)
    train = load_image_folder(args.data, processor, shots=args.shots, seed=args.seed)
    import torch

    torch.manual_seed(args.seed)  # the fresh context / APT tensors: a function of --seed (the same on every rank)
    model = load_clip_with_method(args.model, tokenizer, method, train.class_names, _coop_config(args), _apt_config(args))
    if method == "gram":
        _meta_train_from_args(model, tokenizer, processor, args)
    settings = ClipTrainSettings(steps=args.steps, batch_size=args.batch_size, lr=getattr(args, "lr", None),
                                 optimizer=getattr(args, "optimizer", None), seed=args.seed)
    losses = train_clip(model, train, settings, scale, ctx)
    log.info("final training loss %.4f, train accuracy %.3f", losses[-1] if losses else float("nan"),
             evaluate_clip(model, train, ctx=ctx))
    if getattr(args, "eval_data", None):
        evaluation = load_image_folder(args.eval_data, processor)
        check_class_names(evaluation.class_names, train.class_names, f"--eval-data {args.eval_data}")
        log.info("eval accuracy on %s: %.4f", args.eval_data, evaluate_clip(model, evaluation, ctx=ctx))
    if ctx is None or ctx.is_main:
        save_prompts(model, args.out, overwrite=bool(getattr(args, "overwrite", False)))
    return 0


def _meta_train_from_args(model: nn.Module, tokenizer: Any, processor: Any, args: argparse.Namespace) -> None:
    from apt_deploy.data.captions import read_caption_pairs
    from apt_deploy.methods.gram import GramConfig

    pairs = read_caption_pairs(args.captions, getattr(args, "image_root", None))
    config = GramConfig(meta_steps=args.meta_steps, ways=args.meta_ways, shots=args.meta_shots, n_domains=args.domains,
                        n_pseudo_classes=args.pseudo_classes, inner_lr=args.inner_lr, seed=args.seed)
    run_gram_meta_training(model, tokenizer, processor, pairs, config)


def _coop_config(args: argparse.Namespace) -> CoOpConfig:
    from apt_deploy.methods.coop import ZERO_SHOT_TEMPLATE, CoOpConfig

    init = getattr(args, "context_init", None)
    if init is None and args.method == "apt":
        init = ZERO_SHOT_TEMPLATE  # APT alone: the frozen text head is zero-shot CLIP
    return CoOpConfig(context_len=getattr(args, "context_len", 16), context_init=init or None)


def _apt_config(args: argparse.Namespace) -> APTConfig | None:
    from apt_deploy.methods.apt import APTConfig

    if not args.method.startswith("apt"):
        return None
    return APTConfig(prompt_len=getattr(args, "prompt_len", None) or 200, rank=getattr(args, "rank", None) or 4,
                     cls_token_id=None, train_head=False)


def _check_clip_args(args: argparse.Namespace) -> None:
    from apt_deploy.tuning import CLIP_METHODS

    if args.method not in CLIP_METHODS:
        raise ConfigError(f"--method {args.method} with --backbone clip", f"one of {', '.join(CLIP_METHODS)}")
    if args.method == "gram" and not getattr(args, "captions", None):
        raise ConfigError("--method gram without --captions", "a JSONL of unlabeled image-caption pairs for meta-training",
                          'pass --captions PAIRS.jsonl (lines {"image": "images/0.png", "caption": "..."})')
    for flag in ("model", "data", "out"):
        if not getattr(args, flag, None):
            raise ConfigError(f"--{flag} is missing", f"--{flag} for apt-deploy train --backbone clip")
