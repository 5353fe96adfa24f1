"""``apt-deploy train``: train APT (or the deep-prompt baseline) on a local model and VQA data; write a prompt checkpoint."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from apt_deploy.cli.common import add_output_arguments, refuse_existing
from apt_deploy.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:  # torch-free at import time: `apt-deploy train --help` works without it (tested)
    from torch import nn

    from apt_deploy.data.vqa import VQADataset
    from apt_deploy.distributed import DistContext
    from apt_deploy.settings import ScaleSettings, TrainSettings

NAME = "train"
HELP = "train APT or deep-prompt tensors on local data (official recipe) and save a prompt checkpoint"
TRAINABLE_BACKBONES = ("vilt", "clip", "meter", "grounding_dino", "sd")
VILT_METHODS = ("apt", "deep_prompt")  # the VQA backbones (vilt, meter)
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and method")
    g.add_argument("--backbone", default="vilt", help=f"backbone family: {', '.join(TRAINABLE_BACKBONES)} (default vilt)")
    g.add_argument("--model", required=True, metavar="MODEL_DIR", help="local save_pretrained directory (weights, config, "
                   "tokenizer, image processor); no hub access")
    g.add_argument("--method", default="apt", help="prompt method (default apt): apt | deep_prompt for vilt / meter; "
                   "coop | gram | apt | apt+coop for clip; sdpt | sdpt+head for grounding_dino")
    g.add_argument("--prompt-len", type=int, default=200, help="prompts per layer (paper: 200)")
    g.add_argument("--rank", type=int, default=4, help="APT low-rank size (paper: 4; unused by deep_prompt)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", metavar="TRAIN", help='vilt / meter: JSONL, one {"image", "question", "answers"} object per '
                   'line; sd: a captions JSONL {"image", "caption"} or a folder of images with same-name .txt captions')
    d.add_argument("--answers", metavar="ANSWERS.json", help="vilt / meter: JSON list of answers; index = label id. "
                   "vilt: when it differs from the model's VQA head (size or labels), or the model has none, a fresh "
                   "head is built; meter: length = the model's num_labels")
    d.add_argument("--eval-data", metavar="EVAL", help="held-out data, evaluated at the end (vilt: VQA accuracy)")
    d.add_argument("--image-root", metavar="DIR", help="folder relative image paths resolve against (default: the file's)")
    d.add_argument("--cache-images", action="store_true", help="keep preprocessed examples in memory after the "
                   "first epoch (faster; ~4.4 MB per 384x384 image in fp32 — only for datasets that fit in RAM)")
    d.add_argument("--text-len", type=int, default=None, help="vilt / meter: question tokens incl. [CLS]/[SEP] "
                   "(default vilt min(40, model max); meter the model's max_text_len, 50 for METER-B)")
    _add_recipe_arguments(parser)
    add_output_arguments(parser, "prompt checkpoint (apt_config.json + prompts.safetensors)")
    from apt_deploy.clip_training import add_clip_arguments  # torch-free at import time (tested)

    add_clip_arguments(parser)
    _add_scale_arguments(parser)

    from apt_deploy.cli.train_detection import add_detection_arguments

    add_detection_arguments(parser)

    from apt_deploy.cli.sd_options import add_sd_arguments  # torch-free at import time (tested)

    add_sd_arguments(parser)


def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scale-out: torchrun data parallelism, accumulation, precision, resume "
                                  "(docs/distributed.md)")
    g.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per optimizer step: effective "
                   "batch = --batch-size x K x processes (default 1)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision of the "
                   "training step (fp16 with loss scaling); weights and the saved prompts stay fp32 (default fp32)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="write a training checkpoint every N "
                   "optimizer steps (default 0: never)")
    g.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="where (default OUT_DIR.train_state); replaced "
                   "atomically each time")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run from its training checkpoint")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda:LOCAL_RANK when CUDA "
                   "is available, else cpu (default auto)")


def scale_from_args(args: argparse.Namespace) -> ScaleSettings:
    from apt_deploy.settings import ScaleSettings

    directory = args.checkpoint_dir or f"{str(args.out).rstrip('/')}.train_state"
    return ScaleSettings(grad_accum=args.grad_accum, precision=args.precision, checkpoint_every=args.checkpoint_every,
                         checkpoint_dir=directory, resume=args.resume)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    from apt_deploy.settings import TrainSettings

    s = TrainSettings()
    g = parser.add_argument_group("training recipe (defaults: specs/apt.md)")
    g.add_argument("--steps", type=int, default=s.steps, help=f"optimizer steps (default {s.steps})")
    g.add_argument("--batch-size", type=int, default=s.batch_size, help=f"batch size (default {s.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate of the prompt tensors (default: vilt {s.lr}, "
                   "the APT recipe; meter 2.5e-5 with APT and poolers x5; clip: per optimizer)")
    g.add_argument("--head-lr-mult", type=float, default=None, help=f"head lr = lr x this (default vilt {s.head_lr_mult}, "
                   "meter 50)")
    g.add_argument("--seed", type=int, default=s.seed, help=f"seed of initialisation and shuffling (default {s.seed})")
    g.add_argument("--eval-every", type=int, default=s.eval_every, help="evaluate every N steps (default: at the end)")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """Flags given win; the rest is the backbone's official recipe (BACKBONE_TRAIN_DEFAULTS), else TrainSettings'."""
    from apt_deploy.settings import BACKBONE_TRAIN_DEFAULTS, TrainSettings

    recipe = {**{k: getattr(TrainSettings, k) for k in ("lr", "head_lr_mult", "cross_modal_lr_mult")},
              **BACKBONE_TRAIN_DEFAULTS.get(getattr(args, "backbone", "vilt"), {})}
    given = {k: getattr(args, k, None) for k in ("lr", "head_lr_mult")}
    recipe.update({k: v for k, v in given.items() if v is not None})
    return TrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed, eval_every=args.eval_every,
                         **recipe)


def run(args: argparse.Namespace) -> int:
    """One process, or one rank of a ``torchrun`` launch (it sets WORLD_SIZE / RANK; see docs/distributed.md)."""
    from apt_deploy.distributed import distributed, quiet_other_ranks

    scale = scale_from_args(args)
    with distributed(args.device) as ctx:
        quiet_other_ranks(ctx)
        if ctx.is_main and not args.quiet:
            print(f"effective batch {args.batch_size * scale.grad_accum * ctx.world_size} = --batch-size "
                  f"{args.batch_size} x --grad-accum {scale.grad_accum} x {ctx.world_size} process(es) on {ctx.device}")
        return _run_backbone(args, scale, ctx)


def _run_backbone(args: argparse.Namespace, scale: ScaleSettings, ctx: DistContext) -> int:
    if args.backbone == "clip":
        from apt_deploy.clip_training import train_from_args

        refuse_existing(args.out, args.overwrite)
        return train_from_args(args, scale, ctx)
    if args.backbone == "grounding_dino":
        from apt_deploy.cli.train_detection import check_detection_flags, train_detection_from_args

        _refuse_scale_out(args, scale, ctx)
        check_detection_flags(args)
        refuse_existing(args.out, args.overwrite)
        return train_detection_from_args(args)
    if args.backbone == "sd":
        from apt_deploy.sd_training import train_from_args as train_sd

        _refuse_scale_out(args, scale, ctx)
        refuse_existing(args.out, args.overwrite)
        return train_sd(args, settings_from_args(args))
    if args.backbone not in TRAINABLE_BACKBONES:
        raise UnknownNameError("backbone for training", args.backbone, TRAINABLE_BACKBONES)
    return train_vqa(args, scale, ctx)


def _refuse_scale_out(args: argparse.Namespace, scale: ScaleSettings, ctx: DistContext) -> None:
    """Detection (SDPT) and SD training run in one process, without accumulation, autocast or training checkpoints."""
    from apt_deploy.settings import ScaleSettings

    asked = {k: getattr(scale, k) for k in ("grad_accum", "precision", "checkpoint_every", "resume")
             if getattr(scale, k) != getattr(ScaleSettings, k)}
    if ctx.world_size > 1 or asked:
        raise ConfigError(f"--backbone {args.backbone} with world size {ctx.world_size} and {asked or 'no scale flags'}",
                          "one process without --grad-accum / --precision / --checkpoint-every / --resume "
                          "(this training loop has not adopted apt_deploy.distributed yet)",
                          "run it as one plain process, without torchrun and those flags")


def train_vqa(args: argparse.Namespace, scale: ScaleSettings | None = None, ctx: DistContext | None = None) -> int:
    """1. check flags and --out  2. load model, processor, answers, data  3. apply the method  4. train  5. save."""
    _require(args, "data", "answers")
    if args.method not in VILT_METHODS:
        raise UnknownNameError(f"method for --backbone {args.backbone}", args.method, VILT_METHODS)
    refuse_existing(args.out, args.overwrite)
    settings = settings_from_args(args)
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.training import train

    model, answers = _load_with_answers(args, settings.seed)
    processor, train_set, eval_set = _vqa_data(args, model, answers)
    _apply_method(args, model, processor.tokenizer)
    result = train(model, train_set, settings, eval_dataset=eval_set, scale=scale, ctx=ctx)
    accuracy = result.evals[-1][1] if result.evals else None
    if ctx is None or ctx.is_main:
        save_prompts(model, args.out, overwrite=args.overwrite)
    log.info("summary: %s on %s, %d steps in %.1f s, loss %.4f -> %.4f, eval accuracy %s, saved to %s", args.method,
             args.model, result.steps, result.seconds, result.mean_loss(first=True), result.mean_loss(),
             "n/a" if accuracy is None else f"{accuracy:.4f}", args.out)
    return 0


def _load_with_answers(args: argparse.Namespace, seed: int) -> tuple[nn.Module, list[str]]:
    """The model with a VQA head for ``--answers``. vilt: its own head when it fits, else a fresh one (seeded),
    said loudly; meter: the checkpoint's head, whose size the vocabulary must match."""
    import torch

    from apt_deploy.backbones import get_backbone
    from apt_deploy.data.vqa import load_answers

    spec = get_backbone(args.backbone)
    if args.backbone != "vilt":
        model = spec.load(args.model)
        answers = load_answers(args.answers, num_labels=model.config.num_labels)
        _set_labels(model, answers)
        return model, answers
    answers = load_answers(args.answers)
    torch.manual_seed(seed)
    model, reason = spec.load_with_head(args.model, answers)
    if reason:
        log.warning("%s: built a FRESH %d-answer VQA head (randomly initialised, as the official recipe does on a "
                    "pre-trained checkpoint); it trains with the prompts (head lr = lr x --head-lr-mult) and the answers "
                    "are recorded in the prompt checkpoint, so load and export rebuild it", reason, len(answers))
    return model, answers


def _vqa_data(args: argparse.Namespace, model: nn.Module, answers: list[str]) -> tuple[Any, VQADataset, VQADataset | None]:
    """(processor, train dataset, eval dataset or None).
    vilt: ViltProcessor; meter: RoBERTa tokenizer + METER's center-crop CLIP preprocessing (data/meter.py)."""
    from apt_deploy.data.vqa import load_processor, load_vqa_jsonl

    max_len = model.config.max_position_embeddings
    if args.backbone == "meter":
        from apt_deploy.data.meter import load_meter_processor

        processor, default_len = load_meter_processor(args.model, model.config.vocab_size), max_len
    else:
        processor, default_len = load_processor(args.model), min(40, max_len)
    text_len = _text_len(args.text_len, max_len, default_len)
    cache = args.cache_images
    train_set = load_vqa_jsonl(args.data, answers, processor, text_len, args.image_root, cache=cache)
    eval_set = load_vqa_jsonl(args.eval_data, answers, processor, text_len, args.image_root, cache=cache) \
        if args.eval_data else None
    return processor, train_set, eval_set


def _apply_method(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> None:
    import torch

    from apt_deploy.backbones import get_backbone
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import apply_apt, apply_deep_prompt

    torch.manual_seed(args.seed)  # the fresh prompt tensors: a function of --seed (the same on every rank)

    config = APTConfig(**{**get_backbone(args.backbone).apt_defaults, "prompt_len": args.prompt_len, "rank": args.rank,
                          "cls_token_id": tokenizer.cls_token_id, "method": args.method})
    (apply_apt if args.method == "apt" else apply_deep_prompt)(model, config)


def _set_labels(model: nn.Module, answers: list[str]) -> None:
    old = [str(model.config.id2label.get(i, "")) for i in range(len(answers))]
    generic = all(o.startswith(("LABEL_", "answer_")) for o in old)
    differ = [i for i, (a, o) in enumerate(zip(answers, old)) if a != o.strip().lower()]
    if differ and not generic:
        i = differ[0]
        log.warning("the answer vocabulary differs from the model's id2label in %d labels (e.g. label %d: %r vs %r); "
                    "training with the vocabulary file's labels", len(differ), i, answers[i], old[i])
    model.config.id2label = dict(enumerate(answers))
    model.config.label2id = {a: i for i, a in enumerate(answers)}


def _text_len(requested: int | None, max_positions: int, default: int) -> int:
    if requested is not None and not 3 <= requested <= max_positions:
        raise ConfigError(f"--text-len {requested}", f"3..{max_positions} (the model's max_position_embeddings)",
                          "pass a smaller --text-len or omit it")
    return requested or default


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n, None)]
    if missing:
        raise ConfigError(f"apt-deploy train --backbone {args.backbone} is missing {', '.join(missing)}",
                          "--data TRAIN.jsonl and --answers ANSWERS.json", "pass both flags")
