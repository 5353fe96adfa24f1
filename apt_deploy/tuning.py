"""Insert a method into a model: ``apply_apt`` and ``apply_deep_prompt``.

Both freeze the model, insert one trainable module per site (the backbone spec says where), unfreeze
the official recipe's extras (task head, pooler, modality-type embeddings, learned [CLS] embedding)
and record what was done in ``model.apt_deploy_state`` for save / fold / export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from apt_deploy.backbones import BackboneSpec, spec_for_model
from apt_deploy.errors import ConfigError
from apt_deploy.methods.apt import APTConfig, APTModule
from apt_deploy.methods.coop import ClassPrompts, ClipMethodConfig, CoOpConfig, PromptLearner, initial_context
from apt_deploy.methods.deep_prompt import DeepPromptLayer
from apt_deploy.methods.sdpt import SDPTConfig, insert_sdpt

log = logging.getLogger(__name__)
APT_METHODS = ("apt", "apt+coop")  # methods whose sites hold APT modules


@dataclass
class MethodState:
    """What a method did to a model (stored on it as ``apt_deploy_state``)."""

    method: str
    config: APTConfig
    backbone: str
    base_fingerprint: str
    folded: bool = False


def base_fingerprint(model: nn.Module, spec: BackboneSpec) -> str:
    """sha256 over the frozen base weights (names, dtypes, shapes, bytes), excluding trained extras."""
    skip = {id(p) for m in spec.trainable_extras(model).values() for p in m.parameters()}
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if id(t) in skip:
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def apply_apt(model: nn.Module, config: APTConfig | None = None) -> nn.Module:
    """Insert one APT module per attention sub-layer (specs/apt.md placement); freeze the rest. In place."""
    config = config or default_apt_config(model, "apt")
    spec, fingerprint = _prepare(model, config)
    _insert_apt(model, spec, config)
    _finish(model, spec, config, "apt", fingerprint)
    return model


def apply_deep_prompt(model: nn.Module, config: APTConfig | None = None) -> nn.Module:
    """Deep prompt tuning baseline: ``config.prompt_len`` fresh tokens per layer (rank is unused). In place."""
    config = config or default_apt_config(model, "deep_prompt")
    spec, fingerprint = _prepare(model, config)
    d = spec.hidden_size(model)
    for site in spec.deep_prompt_sites(model):
        site.replace(DeepPromptLayer(site.module, config.prompt_len, d, config.init_std))
    _finish(model, spec, config, "deep_prompt", fingerprint)
    return model


def default_apt_config(model: nn.Module, method: str = "apt") -> APTConfig:
    """APTConfig() with the backbone's official-recipe overrides (``spec.apt_defaults``; METER: frozen scale)."""
    return APTConfig(**{**spec_for_model(model).apt_defaults, "method": method})


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _prepare(model: nn.Module, config: APTConfig) -> tuple[BackboneSpec, str]:
    """Check the model is plain, fingerprint its base weights, freeze it."""
    if getattr(model, "apt_deploy_state", None) is not None:
        raise ConfigError("this model already has a prompt method applied",
                          "a plain backbone model", "load a fresh model before applying a method")
    spec = spec_for_model(model)
    vocab = getattr(model.config, "vocab_size", None)
    if config.cls_token_id is not None and vocab is not None and not 0 <= config.cls_token_id < vocab:
        raise ConfigError(f"cls_token_id={config.cls_token_id} outside the vocabulary of {vocab} tokens",
                          "the tokenizer's [CLS] id", "set APTConfig(cls_token_id=tokenizer.cls_token_id) or None")
    fingerprint = base_fingerprint(model, spec)
    model.requires_grad_(False)
    return spec, fingerprint


def _insert_apt(model: nn.Module, spec: BackboneSpec, config: APTConfig) -> None:
    """One fresh APTModule per APT site (new parameters train; log_scale as ``config`` says). A site's
    ``extra["hidden_size"]`` overrides the model's (Stable Diffusion: the width differs per UNet level)."""
    d = spec.hidden_size(model)
    for site in spec.apt_sites(model):
        site.replace(spec.wrap_apt(site.module, APTModule(site.extra.get("hidden_size", d), config)))


def _finish(model: nn.Module, spec: BackboneSpec, config: APTConfig, method: str, fingerprint: str) -> None:
    if config.train_head:
        for module in spec.trainable_extras(model).values():
            module.requires_grad_(True)
    if config.cls_token_id is not None:
        spec.insert_cls_embedding(model, config.cls_token_id)
    _record(model, MethodState(method, config, spec.name, fingerprint))


def _record(model: nn.Module, state: MethodState) -> None:
    model.apt_deploy_state = state
    log.info("applied %s to %s: %d trainable parameters", state.method, state.backbone, trainable_parameters(model))


# --- CLIP: CoOp / GRAM text context, APT on the image tower (backbones/clip.py) ------------------
CLIP_METHODS = ("coop", "gram", "apt", "apt+coop")


def apply_clip_method(model: nn.Module, method: str, prompts: ClassPrompts, coop: CoOpConfig | None = None,
                      apt: APTConfig | None = None) -> nn.Module:
    """Give a CLIPModel a class head (``model.prompt_learner``, CoOp layout) and, for "apt"/"apt+coop",
    one APT module per vision self-attention; freeze the rest. "gram" is CoOp trained with GRAM
    (methods/gram.py); "apt" keeps the text context frozen at its init (zero-shot head). In place."""
    coop, apt = _clip_configs(method, coop, apt)
    spec, fingerprint = _prepare(model, apt or APTConfig(cls_token_id=None))
    if apt is not None:
        _insert_apt(model, spec, apt)
    context = initial_context(model, prompts, coop)
    max_len = int(model.config.text_config.max_position_embeddings)
    model.prompt_learner = PromptLearner(context, prompts, max_len, train=coop.train_context)
    config = ClipMethodConfig(dataclasses.replace(coop, context_len=context.shape[0]), apt)
    _record(model, MethodState(method, config, spec.name, fingerprint))
    return model


def _clip_configs(method: str, coop: CoOpConfig | None, apt: APTConfig | None) -> tuple[CoOpConfig, APTConfig | None]:
    if method not in CLIP_METHODS:
        raise ConfigError(f"CLIP method {method!r}", f"one of {', '.join(CLIP_METHODS)}")
    coop = coop or CoOpConfig()
    if method == "apt":
        coop = dataclasses.replace(coop, train_context=False)
    if method.startswith("apt"):
        return coop, dataclasses.replace(apt or APTConfig(), cls_token_id=None, train_head=False, method=method)
    return coop, None


# --- Grounding DINO: SDPT prototypes in every encoder fusion layer (methods/sdpt.py) -------------
def apply_sdpt(model: nn.Module, config: SDPTConfig | None = None) -> nn.Module:
    """Insert SDPT prototypes into every fusion layer (spec.fusion_layers); freeze the rest; the
    "sdpt+head" variant (``config.train_head``) also trains the box head. In place."""
    config = config or SDPTConfig()
    spec, fingerprint = _prepare(model, APTConfig(cls_token_id=None))
    if not hasattr(spec, "fusion_layers"):
        raise ConfigError(f"SDPT on backbone {spec.name!r}", "a backbone with bi-directional fusion layers "
                          "(grounding_dino)", "use --backbone grounding_dino, or another method")
    insert_sdpt(spec.fusion_layers(model), config)
    if config.train_head:
        for module in spec.trainable_extras(model).values():
            module.requires_grad_(True)
    _record(model, MethodState(config.method, config, spec.name, fingerprint))
    return model
