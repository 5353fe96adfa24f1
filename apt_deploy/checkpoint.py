"""Prompt checkpoint format v1: ``apt_config.json`` + ``prompts.safetensors`` (trained tensors only).

Tensor names (ViLT): ``layers.{i}.prompt`` (p x d), ``layers.{i}.down`` (r x d), ``layers.{i}.up``
(d x r), ``layers.{i}.log_scale`` (scalar) for APT; ``layers.{i}.prompt`` for deep prompt; the
recipe's extras as ``head.*``, ``pooler.*``, ``embeddings.modality_type.weight`` and
``text.token4classifier``. See README "Prompt checkpoint format".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones import BackboneSpec, get_backbone, spec_for_model
from apt_deploy.errors import CheckpointError, ConfigError, InputPathError
from apt_deploy.fileio import atomic_directory, write_json_atomic
from apt_deploy.methods.apt import is_apt_host
from apt_deploy.methods.deep_prompt import DeepPromptLayer
from apt_deploy.tuning import APT_METHODS, base_fingerprint

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
CONFIG_NAME, TENSORS_NAME = "apt_config.json", "prompts.safetensors"


def trained_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """Checkpoint name -> parameter, for everything the method trains."""
    state = _state(model)
    spec = get_backbone(state.backbone)
    out: dict[str, nn.Parameter] = {}
    sites = spec.apt_sites(model) if state.method in APT_METHODS else spec.deep_prompt_sites(model)
    for site in sites:
        module = site.module
        if is_apt_host(module):
            for name in ("prompt", "down", "up", "log_scale"):
                out[f"{site.key}.{name}"] = getattr(module.apt, name)
        elif isinstance(module, DeepPromptLayer):
            out[f"{site.key}.prompt"] = module.prompt
    if getattr(state.config, "train_head", False):
        for prefix, module in spec.trainable_extras(model).items():
            out.update({f"{prefix}.{n}": p for n, p in module.named_parameters()})
    out.update(spec.method_tensors(model))
    return out


def save_prompts(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the trained tensors and their config (format v1) atomically to ``directory``."""
    from safetensors.torch import save_file

    state = _state(model)
    if state.folded:
        raise ConfigError("save_prompts() got a folded model", "the training form", "save before calling fold()")
    spec = get_backbone(state.backbone)
    tensors = {k: v.detach().contiguous().cpu() for k, v in trained_tensors(model).items()}
    with atomic_directory(directory, overwrite=overwrite) as stage:
        save_file(tensors, str(stage / TENSORS_NAME), metadata={"format_version": str(FORMAT_VERSION)})
        write_json_atomic(stage / CONFIG_NAME, _config_json(model, spec, state))
    log.info("saved %d tensors to %s", len(tensors), directory)
    return Path(directory)


def read_prompt_config(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``apt_config.json`` of a prompt directory."""
    d = Path(directory)
    if not d.is_dir():
        raise InputPathError(f"prompt directory {str(d)!r} does not exist",
                             f"a directory with {CONFIG_NAME} and {TENSORS_NAME}", "check --prompts")
    for name in (CONFIG_NAME, TENSORS_NAME):
        if not (d / name).is_file():
            raise CheckpointError(f"{str(d)!r} has no {name}", f"a directory with {CONFIG_NAME} and {TENSORS_NAME}",
                                  "point at a directory written by save_prompts / apt-deploy train")
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{CONFIG_NAME} is not valid JSON ({e})", "the file written by save_prompts") from e
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"format_version={cfg.get('format_version')!r}", f"{FORMAT_VERSION}",
                              "re-save the prompts with this version of apt-deploy")
    for key in ("method", "backbone", "prompt_len", "hidden_size", "num_layers"):
        if key not in cfg:
            raise CheckpointError(f"{CONFIG_NAME} lacks {key!r}", "the fields of prompt checkpoint format v1")
    return cfg


def load_prompts(model: nn.Module, directory: str | Path, class_names: list[str] | None = None) -> nn.Module:
    """Apply the checkpoint's method to a plain ``model`` and load its trained tensors. In place.
    ``class_names`` (CLIP only, optional) must equal the checkpoint's, in logit order."""
    cfg = read_prompt_config(directory)
    spec = spec_for_model(model)
    tensors = _read_tensors(Path(directory) / TENSORS_NAME)
    _match_head(model, spec, cfg, tensors)
    _check_compatible(model, spec, cfg)
    spec.apply_method_from_config(model, cfg, class_names=class_names)
    _copy_tensors(model, tensors)
    return model


def has_trained_head(cfg: dict[str, Any]) -> bool:
    """The checkpoint carries an answer head (its ``labels`` and ``head.*`` tensors): a model's own head,
    of whatever size, is replaced by it on load."""
    return bool(cfg.get("labels")) and bool(cfg.get("train_head", False))


def _match_head(model: nn.Module, spec: BackboneSpec, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint with a trained head for another answer set resizes the model's head first (train built it
    fresh for ``--answers``); its labels become the model's."""
    labels = cfg.get("labels")
    if not labels or not any(k.startswith("head.") for k in tensors) or not hasattr(model, "classifier"):
        return
    if len(labels) != model.config.num_labels:
        log.info("the checkpoint's head answers %d labels, the model's %d: resizing the model's head before loading it",
                 len(labels), model.config.num_labels)
        spec.resize_head(model, labels)
    else:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {a: i for i, a in enumerate(labels)}


def _state(model: nn.Module):
    state = getattr(model, "apt_deploy_state", None)
    if state is None:
        raise ConfigError("the model has no prompt method applied", "a model from apply_apt / apply_deep_prompt")
    return state


def _config_json(model: nn.Module, spec: BackboneSpec, state) -> dict[str, Any]:
    from apt_deploy import __version__

    cfg: dict[str, Any] = {"format_version": FORMAT_VERSION, "method": state.method, "backbone": spec.name,
                           "hidden_size": spec.hidden_size(model), "num_layers": spec.num_layers(model)}
    cfg.update(spec.method_config_json(model, state))
    cfg["base_fingerprint"] = state.base_fingerprint
    if getattr(model.config, "id2label", None) and hasattr(model, "classifier"):
        cfg["labels"] = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    cfg["apt_deploy_version"] = __version__
    return cfg


def _check_compatible(model: nn.Module, spec: BackboneSpec, cfg: dict[str, Any]) -> None:
    if cfg["backbone"] != spec.name:
        raise CheckpointError(f"prompts were trained on backbone {cfg['backbone']!r} but the model is {spec.name!r}",
                              "prompts and model of the same backbone", "pass the model the prompts were trained on")
    if cfg["method"] not in spec.methods:
        raise CheckpointError(f"unknown method {cfg['method']!r} for backbone {spec.name!r}",
                              f"one of {', '.join(spec.methods)}")
    for key, actual in (("hidden_size", spec.hidden_size(model)), ("num_layers", spec.num_layers(model))):
        if cfg[key] != actual:
            raise CheckpointError(f"prompts have {key}={cfg[key]} but the model has {key}={actual}",
                                  "the base model the prompts were trained on", "pass the matching --model")
    labels, model_labels = cfg.get("labels"), getattr(model.config, "num_labels", None)
    if labels is not None and hasattr(model, "classifier") and len(labels) != model_labels:
        raise CheckpointError(f"prompts were trained with {len(labels)} answer labels but the model has {model_labels}",
                              "the base model the prompts were trained on (same answer vocabulary)",
                              "pass the matching --model")
    fp = cfg.get("base_fingerprint")
    if fp and fp != base_fingerprint(model, spec):
        raise CheckpointError("the model's base weights do not match the fingerprint stored with the prompts",
                              f"base weights with sha256 {fp[:16]}...",
                              "pass the exact base checkpoint the prompts were trained on "
                              "(or remove base_fingerprint from apt_config.json to skip this check at your own risk)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError, ...
        raise CheckpointError(f"cannot read {str(path)!r}: {e}", "a complete safetensors file",
                              "the file is corrupt or truncated; re-copy or re-save it") from e


def _copy_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = trained_tensors(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint tensors do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                              "exactly the tensors save_prompts writes for this method and model")
    for name, param in params.items():
        t = tensors[name]
        if t.shape != param.shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)} but the model expects {tuple(param.shape)}",
                                  "a checkpoint trained on this model (same label count, prompt length, rank)")
        with torch.no_grad():
            param.copy_(t.to(param.dtype))
