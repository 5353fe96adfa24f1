"""Argument groups shared by subcommands (no heavy imports here)."""

from __future__ import annotations

import argparse

from apt_deploy import fileio
from apt_deploy.errors import ConfigError

BACKBONE_NAMES = ("vilt", "clip", "meter", "grounding_dino", "sd")  # for --help only; the registry is the source of truth at run time


def add_model_arguments(parser: argparse.ArgumentParser, prompts_required: bool = True, many_tasks: bool = False) -> None:
    """``many_tasks``: --prompts also takes NAME=DIR pairs (one artifact serving several tasks, export)."""
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default=None, help="backbone family (default: read from the prompt checkpoint), "
                   f"e.g. {', '.join(BACKBONE_NAMES)}")
    g.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="local directory of the base model (save_pretrained layout); no hub access")
    g.add_argument("--prompts", required=prompts_required, metavar="PROMPT_DIR", nargs="+" if many_tasks else None,
                   help="prompt checkpoint directory (apt_config.json + prompts.safetensors)"
                   + ("" if prompts_required else "; omit it to export the base model alone")
                   + ("; or several NAME=DIR pairs: one artifact serving those APT tasks (docs/serving.md)"
                      if many_tasks else ""))


def add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="OUT_DIR", help=f"directory to write the {what} to (must not exist)")
    g.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("export shapes and precision")
    g.add_argument("--batch", default="1,1,8", metavar="MIN,OPT,MAX", help="dynamic batch range (default 1,1,8)")
    g.add_argument("--text-len", type=int, default=None, help="fixed text length (default min(40, model max))")
    g.add_argument("--image-size", type=int, default=None, help="image side in pixels (default: the model's)")
    g.add_argument("--dynamic-image", action="store_true", help="export with dynamic image height/width")
    g.add_argument("--image-range", default=None, metavar="MIN,MAX", help="pixel range with --dynamic-image")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="export precision")
    g.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime parity check (not advised)")
    g.add_argument("--seed", type=int, default=0, help="seed of the validation inputs")


def parse_ints(text: str, count: int, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"{flag} {text!r}", f"{count} comma-separated integers", f"e.g. {flag} " + ",".join(["1"] * count))
    return values


def refuse_existing(out: str, overwrite: bool) -> None:
    """Fail fast, before any heavy work, when the output exists."""
    fileio.refuse_existing(out, overwrite, flag="--out")
