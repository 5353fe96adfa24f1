"""``apt-deploy train --backbone grounding_dino --method sdpt|sdpt+head``: few-shot SDPT on a COCO JSON.

Not a subcommand of its own: apt_deploy/cli/train.py dispatches here. Shared flags (--model --data
--image-root --shots --steps --batch-size --lr --seed --text-len --out) keep their meaning; --tokens
is SDPT's prototype count per fusion layer.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from apt_deploy.errors import ConfigError, UnknownNameError

DETECTION_METHODS = ("sdpt", "sdpt+head")
log = logging.getLogger(__name__)


def add_detection_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Grounding DINO (--backbone grounding_dino; methods sdpt, sdpt+head; "
                                  "--data is a COCO JSON, --shots images per category)")
    g.add_argument("--tokens", type=int, default=8, help="SDPT prototype tokens per fusion layer (default 8; the SDPT "
                   "README uses 700 on GLIP-L, the paper's 0.04 %% parameters implies ~10)")


def train_detection_from_args(args: argparse.Namespace) -> int:
    """1. check flags  2. load model + processor  3. read / sample / check the COCO data  4. apply SDPT
    5. train with Grounding DINO's loss  6. save the prompt checkpoint."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.grounding_dino import load_detection_processor
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.data.coco import load_coco_detection
    from apt_deploy.detection_training import train_detection
    from apt_deploy.methods.sdpt import SDPTConfig
    from apt_deploy.tuning import apply_sdpt, trainable_parameters

    settings = _settings(args)
    model = get_backbone("grounding_dino").load(args.model)
    processor = load_detection_processor(args.model)
    text_len = _text_len(args.text_len, int(model.config.max_text_len))
    shots = args.shots if args.shots and args.shots > 0 else None
    data = load_coco_detection(args.data, args.image_root, shots, args.seed, processor.tokenizer, text_len)
    apply_sdpt(model, SDPTConfig(tokens=args.tokens, train_head=args.method == "sdpt+head", seed=args.seed))
    log.info("%s: %d images (%d skipped), prompt %r, %d trainable parameters", args.method, len(data.examples),
             len(data.skipped), data.prompt, trainable_parameters(model))
    result = train_detection(model, data.examples, processor, data.prompt, settings, text_len)
    save_prompts(model, args.out, overwrite=args.overwrite)
    log.info("summary: %s, %d steps in %.1f s, loss %.3f -> %.3f, saved to %s", args.method, settings.steps,
             result.seconds, result.mean_loss(first=True), result.mean_loss(), args.out)
    return 0


def check_detection_flags(args: argparse.Namespace) -> None:
    if args.method not in DETECTION_METHODS:
        raise UnknownNameError("method for --backbone grounding_dino", args.method, DETECTION_METHODS)
    if not args.data:
        raise ConfigError("apt-deploy train --backbone grounding_dino is missing --data", "--data COCO.json",
                          "pass a COCO-format detection JSON")


def _settings(args: argparse.Namespace) -> Any:
    from apt_deploy.settings import DetectionTrainSettings

    default = DetectionTrainSettings()
    return DetectionTrainSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                  lr=default.lr if args.lr is None else args.lr)


def _text_len(requested: int | None, max_text_len: int) -> int:
    if requested is not None and not 4 <= requested <= max_text_len:
        raise ConfigError(f"--text-len {requested}", f"4..{max_text_len} (the model's max_text_len)",
                          "pass a smaller --text-len or omit it")
    return requested or min(40, max_text_len)
