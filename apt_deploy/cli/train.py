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
    from apt_deploy.settings import TrainSettings

NAME = "train"
HELP = "train APT or deep-prompt tensors on local data (official recipe) and save a prompt checkpoint"
TRAINABLE_BACKBONES = ("vilt", "clip", "sd")
VILT_METHODS = ("apt", "deep_prompt")
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and method")
    g.add_argument("--backbone", default="vilt", help=f"backbone family: {', '.join(TRAINABLE_BACKBONES)} (default vilt)")
    g.add_argument("--model", required=True, metavar="MODEL_DIR", help="local save_pretrained directory (weights, config, "
                   "tokenizer, image processor); no hub access")
    g.add_argument("--method", default="apt", help="prompt method (default apt): apt | deep_prompt for vilt; "
                   "coop | gram | apt | apt+coop for clip")
    g.add_argument("--prompt-len", type=int, default=200, help="prompts per layer (paper: 200)")
    g.add_argument("--rank", type=int, default=4, help="APT low-rank size (paper: 4; unused by deep_prompt)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", metavar="TRAIN", help='vilt: JSONL, one {"image", "question", "answers"} object per line; '
                   'sd: a captions JSONL {"image", "caption"} or a folder of images with same-name .txt captions')
    d.add_argument("--answers", metavar="ANSWERS.json", help="vilt: JSON list of answers; index = label id; "
                   "length = the model's num_labels")
    d.add_argument("--eval-data", metavar="EVAL", help="held-out data, evaluated at the end (vilt: VQA accuracy)")
    d.add_argument("--image-root", metavar="DIR", help="folder relative image paths resolve against (default: the file's)")
    d.add_argument("--cache-images", action="store_true", help="keep preprocessed examples in memory after the "
                   "first epoch (faster; ~4.4 MB per 384x384 image in fp32 — only for datasets that fit in RAM)")
    d.add_argument("--text-len", type=int, default=None, help="vilt: question tokens incl. [CLS]/[SEP] "
                   "(default min(40, model max))")
    _add_recipe_arguments(parser)
    add_output_arguments(parser, "prompt checkpoint (apt_config.json + prompts.safetensors)")
    from apt_deploy.clip_training import add_clip_arguments  # torch-free at import time (tested)

    add_clip_arguments(parser)
    from apt_deploy.cli.sd_options import add_sd_arguments  # torch-free at import time (tested)

    add_sd_arguments(parser)


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    from apt_deploy.settings import TrainSettings

    s = TrainSettings()
    g = parser.add_argument_group("training recipe (defaults: specs/apt.md)")
    g.add_argument("--steps", type=int, default=s.steps, help=f"optimizer steps (default {s.steps})")
    g.add_argument("--batch-size", type=int, default=s.batch_size, help=f"batch size (default {s.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"learning rate of the prompt tensors (default: vilt {s.lr}, "
                   "the APT recipe; clip: per optimizer)")
    g.add_argument("--head-lr-mult", type=float, default=s.head_lr_mult, help=f"head lr = lr x this (default {s.head_lr_mult})")
    g.add_argument("--seed", type=int, default=s.seed, help=f"seed of initialisation and shuffling (default {s.seed})")
    g.add_argument("--eval-every", type=int, default=s.eval_every, help="evaluate every N steps (default: at the end)")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    from apt_deploy.settings import TrainSettings

    lr = TrainSettings.lr if args.lr is None else args.lr
    return TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=lr, head_lr_mult=args.head_lr_mult,
                         seed=args.seed, eval_every=args.eval_every)


def run(args: argparse.Namespace) -> int:
    if args.backbone == "clip":
        from apt_deploy.clip_training import train_from_args

        refuse_existing(args.out, args.overwrite)
        return train_from_args(args)
    if args.backbone == "sd":
        from apt_deploy.sd_training import train_from_args as train_sd

        refuse_existing(args.out, args.overwrite)
        return train_sd(args, settings_from_args(args))
    if args.backbone != "vilt":
        raise UnknownNameError("backbone for training", args.backbone, TRAINABLE_BACKBONES)
    return train_vilt(args)


def train_vilt(args: argparse.Namespace) -> int:
    """1. check flags and --out  2. load model, processor, answers, data  3. apply the method  4. train  5. save."""
    _require(args, "data", "answers")
    if args.method not in VILT_METHODS:
        raise UnknownNameError("method for --backbone vilt", args.method, VILT_METHODS)
    refuse_existing(args.out, args.overwrite)
    settings = settings_from_args(args)
    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.training import train

    model = get_backbone("vilt").load(args.model)
    processor, train_set, eval_set = _vilt_data(args, model)
    _apply_method(args, model, processor.tokenizer)
    result = train(model, train_set, settings, eval_dataset=eval_set)
    accuracy = result.evals[-1][1] if result.evals else None
    save_prompts(model, args.out, overwrite=args.overwrite)
    log.info("summary: %s on %s, %d steps in %.1f s, loss %.4f -> %.4f, eval accuracy %s, saved to %s", args.method,
             args.model, result.steps, result.seconds, result.mean_loss(first=True), result.mean_loss(),
             "n/a" if accuracy is None else f"{accuracy:.4f}", args.out)
    return 0


def _vilt_data(args: argparse.Namespace, model: nn.Module) -> tuple[Any, VQADataset, VQADataset | None]:
    """(processor, train dataset, eval dataset or None); the model's id2label is set to the answer vocabulary."""
    from apt_deploy.data.vqa import load_answers, load_processor, load_vqa_jsonl

    answers = load_answers(args.answers, num_labels=model.config.num_labels)
    _set_labels(model, answers)
    processor = load_processor(args.model)
    text_len = _text_len(args.text_len, model.config.max_position_embeddings)
    cache = args.cache_images
    train_set = load_vqa_jsonl(args.data, answers, processor, text_len, args.image_root, cache=cache)
    eval_set = load_vqa_jsonl(args.eval_data, answers, processor, text_len, args.image_root, cache=cache) \
        if args.eval_data else None
    return processor, train_set, eval_set


def _apply_method(args: argparse.Namespace, model: nn.Module, tokenizer: Any) -> None:
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import apply_apt, apply_deep_prompt

    config = APTConfig(prompt_len=args.prompt_len, rank=args.rank, cls_token_id=tokenizer.cls_token_id, method=args.method)
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


def _text_len(requested: int | None, max_positions: int) -> int:
    if requested is not None and not 3 <= requested <= max_positions:
        raise ConfigError(f"--text-len {requested}", f"3..{max_positions} (the model's max_position_embeddings)",
                          "pass a smaller --text-len or omit it")
    return requested or min(40, max_positions)


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if not getattr(args, n, None)]
    if missing:
        raise ConfigError(f"apt-deploy train --backbone vilt is missing {', '.join(missing)}",
                          "--data TRAIN.jsonl and --answers ANSWERS.json", "pass both flags")
