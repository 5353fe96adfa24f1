"""Stable Diffusion (diffusers' UNet2DConditionModel + AutoencoderKL + transformers' CLIPTextModel).

The model is a :class:`StableDiffusionModel` holding the three networks, the tokenizer and the
scheduler of a local diffusers layout (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``).

APT placement (docs/stable-diffusion.md): a diffusers attention processor
(methods/apt_processor.py) on the cross-attention ``attn2`` of every transformer block by default, or
on ``attn1`` and ``attn2`` (``sites="attn1+attn2"``). x_in is the processor's ``hidden_states`` (the
block's LayerNorm output), o is the ``to_out`` output; y = e^s (o + w * A P) replaces o before the
block's residual add. The text encoder and the VAE are never given APT. Checkpoint keys are
``unet.<attention module name>.prompt / .down / .up / .log_scale``, e.g.
``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.prompt``; ``apt_config.json`` records
``sites``.

Export (``export_components``): ``text_encoder`` (input_ids -> last_hidden_state), ``unet``
(sample, timestep float32, encoder_hidden_states -> out_sample; one fused node per APT module) and
``vae_decoder`` (latent_sample -> sample), each with dynamic batch and latent height/width.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones.components import ComponentPlan
from apt_deploy.backbones.registry import BackboneSpec, InputSpec, Site, register_backbone
from apt_deploy.errors import ConfigError, InputPathError

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SITE_CHOICES: dict[str, tuple[str, ...]] = {"attn2": ("attn2",), "attn1+attn2": ("attn1", "attn2")}
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class StableDiffusionModel(nn.Module):
    """The three networks as submodules (one state_dict, one fingerprint), tokenizer and scheduler as
    plain attributes. ``apt_site_kinds`` says which attentions APT goes on."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.apt_site_kinds: tuple[str, ...] = SITE_CHOICES["attn2"]
        self.config = types.SimpleNamespace(model_type="stable-diffusion")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: 8 and the VAE factor x the UNet's down-sampling (a latent
        side the UNet cannot halve evenly takes diffusers' data-dependent upsample-size branch)."""
        unet_factor = 2 ** (len(self.unet.config.down_block_types) - 1)
        return math.lcm(8, self.vae_scale_factor * unet_factor)

    @property
    def text_len(self) -> int:
        return int(min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings))


def parse_sites(sites: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"attn2"`` / ``"attn1+attn2"`` (or the tuple) -> the attention kinds APT goes on."""
    key = sites if isinstance(sites, str) else "+".join(sites)
    if key not in SITE_CHOICES:
        raise ConfigError(f"APT sites {key!r}", f"one of {', '.join(SITE_CHOICES)}", "pass --sites attn2 or attn1+attn2")
    return SITE_CHOICES[key]


def apply_sd_apt(model: StableDiffusionModel, config: Any = None, sites: str | tuple[str, ...] = "attn2") -> nn.Module:
    """Freeze the whole model and install one APT processor per chosen attention of the UNet. In place."""
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import apply_apt

    model.apt_site_kinds = parse_sites(sites)
    config = dataclasses.replace(config or APTConfig(prompt_len=64), cls_token_id=None, train_head=False)
    return apply_apt(model, config)


@register_backbone("sd")
class StableDiffusionSpec(BackboneSpec):
    model_classes = ("StableDiffusionModel",)
    methods: tuple[str, ...] = ("apt",)

    def load(self, model_dir: str) -> nn.Module:
        root = Path(model_dir)
        missing = [c for c in COMPONENTS if not (root / c).is_dir()]
        if missing:
            raise InputPathError(f"Stable Diffusion directory {str(root)!r} lacks {', '.join(f'{m}/' for m in missing)}",
                                 f"a local diffusers layout with {', '.join(f'{c}/' for c in COMPONENTS)}",
                                 "point --model at a directory written by StableDiffusionPipeline.save_pretrained")
        import diffusers
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from apt_deploy.fileio import read_json

        sched_cfg = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config",
                              "a diffusers scheduler_config.json", "re-save the pipeline with save_pretrained")
        scheduler_cls = getattr(diffusers, sched_cfg.get("_class_name", ""), None)
        if scheduler_cls is None:
            raise ConfigError(f"scheduler class {sched_cfg.get('_class_name')!r}", "a diffusers scheduler class name")
        return StableDiffusionModel(
            UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True),
            AutoencoderKL.from_pretrained(root / "vae", local_files_only=True),
            CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True),
            CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True),
            scheduler_cls.from_config(sched_cfg)).eval()

    def hidden_size(self, model: nn.Module) -> int:
        return int(max(model.unet.config.block_out_channels))

    def num_layers(self, model: nn.Module) -> int:
        """Transformer blocks in the UNet (one attn1 each)."""
        return sum(1 for name, _ in _attentions(model.unet, ("attn1",)))

    def apt_sites(self, model: nn.Module) -> list[Site]:
        return [Site(f"unet.{name}", attn, "processor", {"hidden_size": self._check_host(name, attn)})
                for name, attn in _attentions(model.unet, model.apt_site_kinds)]

    @staticmethod
    def _check_host(name: str, attn: nn.Module) -> int:
        from apt_deploy.methods.apt_processor import check_apt_host

        return check_apt_host(name, attn)

    def deep_prompt_sites(self, model: nn.Module) -> list[Site]:
        return []

    def wrap_apt(self, host: Any, apt: nn.Module) -> nn.Module:
        from apt_deploy.methods.apt_processor import APTAttnProcessor

        return APTAttnProcessor(apt)

    def fold_apt_site(self, site: Site) -> nn.Module:
        return site.module.fold_apt(site.parent)

    def method_config_json(self, model: nn.Module, state: Any) -> dict[str, Any]:
        return {**super().method_config_json(model, state), "sites": "+".join(model.apt_site_kinds)}

    def apply_method_from_config(self, model: nn.Module, cfg: dict[str, Any], **options: Any) -> None:
        from apt_deploy.methods.apt import APTConfig

        config = APTConfig(**{k: cfg[k] for k in self.CONFIG_FIELDS if k in cfg}, method=cfg["method"])
        apply_sd_apt(model, config, cfg.get("sites", "attn2"))

    def manifest_extras(self, model: nn.Module) -> dict[str, Any]:
        return {"sd": {"vae_scaling_factor": float(model.vae.config.scaling_factor),
                       "vae_scale_factor": model.vae_scale_factor, "pixel_multiple": model.pixel_multiple,
                       "latent_channels": int(model.unet.config.in_channels), "text_len": model.text_len,
                       "guidance": model.unet.config.time_cond_proj_dim is None,
                       "scheduler_class": type(model.scheduler).__name__,
                       "apt_sites": "+".join(model.apt_site_kinds)}}

    def write_assets(self, model: nn.Module, directory: Path) -> dict[str, str]:
        model.tokenizer.save_pretrained(str(directory / "tokenizer"))
        model.scheduler.save_config(str(directory / "scheduler"))
        return {"tokenizer": "tokenizer", "scheduler": "scheduler"}

    def export_components(self, model: nn.Module, settings: Any) -> list[ComponentPlan]:
        from apt_deploy.backbones.sd_export import component_plans

        return component_plans(model, settings)

    def build_tiny(self, seed: int = 0, **kwargs: Any) -> nn.Module:
        from apt_deploy.backbones.sd_tiny import build_tiny_sd

        return build_tiny_sd(seed=seed, **kwargs)


def _attentions(unet: nn.Module, kinds: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(name, Attention) of every transformer-block attention whose last name part is in ``kinds``."""
    return [(name, module) for name, module in unet.named_modules()
            if name.rsplit(".", 1)[-1] in kinds and hasattr(module, "to_out") and ".transformer_blocks." in name]


def tokenize(tokenizer: Any, prompts: list[str], length: int) -> Any:
    """input_ids padded to ``length``; a longer prompt is truncated with a warning (as diffusers does)."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if full.shape[-1] > length:
        cut = tokenizer.batch_decode(full[:, length - 1:-1])
        log.warning("the prompt is longer than the text encoder's %d tokens and was truncated; dropped: %s", length, cut)
    return ids.astype("int64")


def save_sd(model: StableDiffusionModel, directory: str | Path) -> Path:
    """Write a plain model as a diffusers layout (StableDiffusionPipeline.save_pretrained, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    if getattr(model, "apt_deploy_state", None) is not None:
        raise ConfigError("save_sd() got a model with APT applied", "the base model",
                          "save the base model before apply_sd_apt; save prompts with save_prompts")
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


def check_dtype(dtype: str) -> str:
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} for Stable Diffusion", f"one of {', '.join(EXPORT_DTYPES)}",
                          "export with --dtype fp32 or fp16")
    return dtype


def cast_component(module: nn.Module, dtype: str) -> nn.Module:
    """``module`` itself for fp32, else a cast copy (the fp32 original stays the validation reference)."""
    check_dtype(dtype)
    return module if dtype == "fp32" else copy.deepcopy(module).to(EXPORT_DTYPES[dtype])
