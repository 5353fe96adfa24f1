"""Glue used by the CLI and the runners: rebuild trained / folded models from local directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from apt_deploy.backbones import get_backbone
from apt_deploy.checkpoint import load_prompts, read_prompt_config
from apt_deploy.errors import CheckpointError, InputPathError
from apt_deploy.folding import fold


def load_trained(model_dir: str | Path, prompts_dir: str | Path, backbone: str | None = None) -> nn.Module:
    """Base model from ``model_dir`` + the method and tensors from ``prompts_dir`` (training form)."""
    if backbone is not None:
        get_backbone(backbone)  # an unknown name fails first, listing the known ones
    cfg = read_prompt_config(prompts_dir)
    name = backbone or cfg["backbone"]
    if backbone and backbone != cfg["backbone"]:
        raise CheckpointError(f"--backbone {backbone} but the prompts were trained on {cfg['backbone']!r}",
                              "the same backbone for model and prompts", f"pass --backbone {cfg['backbone']}")
    model = get_backbone(name).load(str(model_dir))
    return load_prompts(model, prompts_dir)


def load_folded_from_manifest(manifest: dict[str, Any], model_dir: str | None = None,
                              prompts_dir: str | None = None) -> nn.Module:
    """The folded PyTorch model an artifact was exported from (paths default to the manifest's source)."""
    source = manifest.get("source") or {}
    model_dir = model_dir or source.get("model_dir")
    prompts_dir = prompts_dir or source.get("prompts_dir")
    if not model_dir or not prompts_dir or not Path(model_dir).is_dir() or not Path(prompts_dir).is_dir():
        raise InputPathError(f"the artifact's source directories are not available (model={model_dir!r}, "
                             f"prompts={prompts_dir!r})", "the base model and prompt directories it was exported from",
                             "pass --model MODEL_DIR --prompts PROMPT_DIR")
    return fold(load_trained(model_dir, prompts_dir, manifest["backbone"]))
