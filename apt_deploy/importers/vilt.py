"""Official APT-ViLT checkpoints (original ViLT repository key names) -> transformers' ViltForQuestionAnswering
directory + a prompt checkpoint v1.

Key mapping (original ViLT -> transformers; the same correspondence transformers' own ViLT conversion script
documents, written here independently):

* ``transformer.blocks.{i}.attn.qkv.{weight,bias}`` -> split in 3 (q, k, v order) ->
  ``vilt.encoder.layer.{i}.attention.attention.{query,key,value}``
* ``transformer.blocks.{i}.{attn.proj, norm1, norm2, mlp.fc1, mlp.fc2}`` -> ``vilt.encoder.layer.{i}.{attention.output.dense,
  layernorm_before, layernorm_after, intermediate.dense, output.dense}``
* ``transformer.{cls_token, pos_embed, patch_embed.proj, norm}`` -> ``vilt.embeddings.{cls_token, position_embeddings,
  patch_embeddings.projection}``, ``vilt.layernorm``
* ``text_embeddings.*`` -> ``vilt.embeddings.text_embeddings.*``; ``token_type_embeddings`` ->
  ``vilt.embeddings.token_type_embeddings``; ``pooler.*`` -> ``vilt.pooler.*``; ``vqa_classifier.*`` -> ``classifier.*``
* dropped: ``text_embeddings.position_ids`` (a buffer), and with ``num_labels`` (pre-training) ``mlm_score.*`` / ``itm_score.*``
* APT (``transformer.blocks.{i}.attn.APT.{mm.0.weight, mm.1.weight, mm_tokens, scale}``, ``token4classifier``
  [1, 1, d]) -> prompt checkpoint v1 ``layers.{i}.{down, up, prompt, log_scale}`` and ``text.token4classifier``.
  The official ViLT recipe trains the scale (its filter is ``"APT"``), so ``train_log_scale`` is true.

LayerNorm eps: the original blocks use timm's 1e-6 and the text embeddings BERT's 1e-12; transformers' ViLT
has one ``layer_norm_eps`` for both, set to 1e-6 here (the text LayerNorm's change is ~1e-7 relative).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from apt_deploy.errors import CheckpointError, ConfigError
from apt_deploy.importers.common import check_keys, check_shapes, read_state_dict

log = logging.getLogger(__name__)
HEAD_DIM = 64
BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")
APT_KEY = re.compile(r"^transformer\.blocks\.(\d+)\.attn\.APT\.(.+)$")
APT_PARTS = {"mm_tokens": "prompt", "mm.0.weight": "down", "mm.1.weight": "up", "scale": "log_scale"}
BLOCK_RENAMES = {"attn.proj.": "attention.output.dense.", "norm1.": "layernorm_before.", "norm2.": "layernorm_after.",
                 "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}
RENAMES = {"transformer.cls_token": "vilt.embeddings.cls_token", "transformer.pos_embed": "vilt.embeddings.position_embeddings",
           "transformer.patch_embed.proj.": "vilt.embeddings.patch_embeddings.projection.",
           "transformer.norm.": "vilt.layernorm.", "text_embeddings.": "vilt.embeddings.text_embeddings.",
           "token_type_embeddings.": "vilt.embeddings.token_type_embeddings.", "pooler.": "vilt.pooler.",
           "vqa_classifier.": "classifier."}
FIX = "pass an official (APT-)ViLT VQA checkpoint with the original ViLT key names (README, 'Import')"


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no {key!r} (needed to infer the architecture)",
                              "an official ViLT checkpoint", FIX)
    return state[key]


def infer_config(state: dict[str, torch.Tensor], num_labels: int | None) -> dict:
    """ViltConfig kwargs from tensor shapes (head dim 64)."""
    hidden = _get(state, "transformer.cls_token").shape[-1]
    if hidden % HEAD_DIM:
        raise CheckpointError(f"ViLT width {hidden} is not a multiple of {HEAD_DIM}", "ViT widths (head dim 64)", FIX)
    patch = _get(state, "transformer.patch_embed.proj.weight").shape[-1]
    rows = _get(state, "transformer.pos_embed").shape[-2]
    grid = math.isqrt(rows - 1)
    if grid * grid != rows - 1:
        raise CheckpointError(f"transformer.pos_embed has {rows} rows", "1 + a square number of patches", FIX)
    layers = {int(m.group(1)) for k in state if (m := BLOCK.match(k))}
    if not layers or layers != set(range(len(layers))):
        raise CheckpointError(f"transformer blocks {sorted(layers)}", "a contiguous range 0..N-1", FIX)
    words = _get(state, "text_embeddings.word_embeddings.weight")
    labels = _labels(state, num_labels)
    return dict(hidden_size=hidden, num_hidden_layers=len(layers), num_attention_heads=hidden // HEAD_DIM,
                intermediate_size=_get(state, "transformer.blocks.0.mlp.fc1.weight").shape[0], vocab_size=words.shape[0],
                max_position_embeddings=_get(state, "text_embeddings.position_embeddings.weight").shape[0],
                type_vocab_size=_get(state, "text_embeddings.token_type_embeddings.weight").shape[0],
                modality_type_vocab_size=_get(state, "token_type_embeddings.weight").shape[0], image_size=grid * patch,
                patch_size=patch, layer_norm_eps=1e-6, max_image_length=-1, num_labels=labels,
                id2label={i: f"LABEL_{i}" for i in range(labels)}, label2id={f"LABEL_{i}": i for i in range(labels)})


def _labels(state: dict[str, torch.Tensor], num_labels: int | None) -> int:
    if "vqa_classifier.3.weight" in state:
        if num_labels is not None:
            raise ConfigError(f"--num-labels {num_labels} but the checkpoint has a VQA head",
                              "--num-labels only for a pre-training checkpoint", "drop --num-labels")
        return int(state["vqa_classifier.3.weight"].shape[0])
    if num_labels is None or num_labels < 1:
        raise CheckpointError("the checkpoint has no vqa_classifier (only ViLT VQA is supported)",
                              "a VQA checkpoint, or --num-labels N for a pre-training one (a fresh VQA head)", FIX)
    return num_labels


def map_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names -> transformers' (unknown keys pass through unchanged, so the key check names them)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = BLOCK.match(key)
        if m and m.group(2).startswith("attn.qkv."):
            kind = m.group(2).rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"vilt.encoder.layer.{m.group(1)}.attention.attention.{name}.{kind}"] = part
        elif m:
            out[f"vilt.encoder.layer.{m.group(1)}.{_rename(m.group(2), BLOCK_RENAMES)}"] = value
        else:
            out[_rename(key, RENAMES, keep=True)] = value
    return out


def _rename(key: str, table: dict[str, str], keep: bool = False) -> str:
    for old, new in table.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return key if keep else "unknown." + key


def official_keys(config: dict, fresh_head: bool) -> set[str]:
    """Every original key of this architecture (APT and dropped buffers aside)."""
    block = ("attn.qkv.weight", "attn.qkv.bias", *(f"{n}{w}" for n in BLOCK_RENAMES for w in ("weight", "bias")))
    out = {f"transformer.blocks.{i}.{p}" for i in range(config["num_hidden_layers"]) for p in block}
    out |= {"transformer.cls_token", "transformer.pos_embed", "transformer.patch_embed.proj.weight",
            "transformer.patch_embed.proj.bias", "transformer.norm.weight", "transformer.norm.bias",
            "token_type_embeddings.weight", "pooler.dense.weight", "pooler.dense.bias"}
    out |= {f"text_embeddings.{n}" for n in ("word_embeddings.weight", "position_embeddings.weight",
                                              "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}
    if not fresh_head:
        out |= {f"vqa_classifier.{i}.{w}" for i in (0, 1, 3) for w in ("weight", "bias")}
    return out


def convert_vilt(state: dict[str, torch.Tensor], num_labels: int | None = None):
    """(ViltForQuestionAnswering with the base weights, APT tensors by layer, token4classifier, dropped keys)."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    apt = {k: v for k, v in state.items() if APT_KEY.match(k)}
    token4 = state.get("token4classifier")
    fresh = num_labels is not None
    dropped = sorted(k for k in state if k == "text_embeddings.position_ids"
                     or (fresh and k.startswith(("mlm_score.", "itm_score."))))
    base = {k: v for k, v in state.items() if k not in apt and k != "token4classifier" and k not in dropped}
    config = infer_config(base, num_labels)
    check_keys("ViLT checkpoint", official_keys(config, fresh), base, FIX)
    model = ViltForQuestionAnswering(ViltConfig(**config)).eval()
    own = model.state_dict()
    mapped = map_state(base)
    if fresh:
        mapped.update({k: v for k, v in own.items() if k.startswith("classifier.")})
    check_shapes("ViLT checkpoint", {k: v.shape for k, v in own.items()}, mapped, FIX)
    check_keys("ViLT checkpoint (after mapping)", own, mapped, FIX)
    model.load_state_dict(mapped)
    return model, _group_apt(apt, config["num_hidden_layers"]), token4, dropped


def _group_apt(apt: dict[str, torch.Tensor], layers: int) -> dict[str, dict[str, torch.Tensor]]:
    if not apt:
        return {}
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in apt.items():
        i, part = APT_KEY.match(key).groups()
        if part not in APT_PARTS:
            raise CheckpointError(f"unknown APT tensor {key!r}", f"one of {', '.join(APT_PARTS)} per APT module", FIX)
        sites.setdefault(f"layers.{i}", {})[APT_PARTS[part]] = value
    expected = {f"layers.{i}" for i in range(layers)}
    incomplete = sorted(k for k, v in sites.items() if set(v) != set(APT_PARTS.values()))
    if set(sites) != expected or incomplete:
        raise CheckpointError(f"APT modules at {sorted(sites)[:6]}... (incomplete {incomplete[:6]})",
                              f"all {layers} blocks with mm.0.weight, mm.1.weight, mm_tokens and scale", FIX)
    return sites


def apply_official_apt(model: nn.Module, apt: dict[str, dict[str, torch.Tensor]], token4: torch.Tensor | None,
                       cls_token_id: int = 101) -> nn.Module:
    """APT as the official ViLT recipe (scale trained) with the official tensors copied in. In place."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import apply_apt

    first = next(iter(apt.values()))
    config = APTConfig(prompt_len=first["prompt"].shape[0], rank=first["down"].shape[0], train_log_scale=True,
                       cls_token_id=cls_token_id if token4 is not None else None)
    apply_apt(model, config)
    spec = get_backbone("vilt")
    hosts = {site.key: site.module.apt for site in spec.apt_sites(model)}
    for key, tensors in apt.items():
        tensors = {**tensors, "log_scale": tensors["log_scale"].reshape(())}
        check_shapes(f"APT module {key}", {n: getattr(hosts[key], n).shape for n in APT_PARTS.values()}, tensors,
                     "all APT modules must share p, r and the hidden size")
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(hosts[key], name).copy_(value)
    if token4 is not None:
        target = spec.method_tensors(model)["text.token4classifier"]
        check_shapes("token4classifier", {"t": (1, 1, target.shape[0])}, {"t": token4}, FIX)
        with torch.no_grad():
            target.copy_(token4.reshape(-1))
    return model


def import_vilt(checkpoint: str | Path, model_out: str | Path, prompts_out: str | Path | None = None,
                image_size: int | None = None, tokenizer: str | Path | None = None, num_labels: int | None = None,
                overwrite: bool = False) -> dict[str, object]:
    """1. read (weights only)  2. convert and check  3. write the model dir  4. write the prompts."""
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.fileio import atomic_directory, refuse_existing

    if image_size is not None:
        raise ConfigError(f"--image-size {image_size} for ViLT", "no --image-size: ViLT interpolates its position "
                          "table at run time", "export at another size with apt-deploy export --image-size N instead")
    refuse_existing(model_out, overwrite, flag="--model-out")
    if prompts_out is not None:
        refuse_existing(prompts_out, overwrite, flag="--prompts-out")
    model, apt, token4, dropped = convert_vilt(read_state_dict(checkpoint), num_labels)
    _check_targets(apt, token4, prompts_out)
    processor = _processor(model, tokenizer)
    cls_token_id = processor.tokenizer.cls_token_id if processor is not None else 101
    if token4 is not None and not 0 <= cls_token_id < model.config.vocab_size:
        raise ConfigError(f"[CLS] id {cls_token_id} outside the checkpoint's vocabulary of {model.config.vocab_size}",
                          "the BERT tokenizer the checkpoint was trained with", "pass --tokenizer DIR")
    with atomic_directory(model_out, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        if processor is not None:
            processor.save_pretrained(stage)
    if apt:
        apply_official_apt(model, apt, token4, cls_token_id)
        save_prompts(model, prompts_out, overwrite=overwrite)
    return {"model_out": str(model_out), "prompts_out": str(prompts_out) if apt else None, "task": "vqa",
            "image_size": model.config.image_size, "apt_modules": len(apt), "dropped": dropped}


def _check_targets(apt: dict, token4: torch.Tensor | None, prompts_out: str | Path | None) -> None:
    if apt and prompts_out is None:
        raise ConfigError(f"the checkpoint holds {len(apt)} APT modules but no --prompts-out was given",
                          "a directory for the prompt checkpoint", "pass --prompts-out PROMPT_DIR")
    if not apt and prompts_out is not None:
        raise ConfigError("--prompts-out was given but the checkpoint holds no APT tensors (...attn.APT.*)",
                          "an APT-trained ViLT checkpoint", "drop --prompts-out")
    if token4 is not None and not apt:
        raise CheckpointError("the checkpoint has token4classifier but no APT modules", "both or neither", FIX)


def _processor(model: nn.Module, tokenizer: str | Path | None):
    """ViltProcessor (the local BERT tokenizer + ViLT's image processor at the model's size), or None without --tokenizer."""
    if tokenizer is None:
        return None
    from transformers import BertTokenizerFast, ViltProcessor
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    try:
        tok = BertTokenizerFast.from_pretrained(str(tokenizer), local_files_only=True)
    except Exception as e:  # OSError, ValueError, ... from transformers
        raise ConfigError(f"cannot load a BERT tokenizer from {str(tokenizer)!r}: {e}",
                          "a local bert-base-uncased tokenizer directory", "check --tokenizer") from e
    images = ViltImageProcessorPil(size={"shortest_edge": model.config.image_size}, size_divisor=model.config.patch_size)
    return ViltProcessor(image_processor=images, tokenizer=tok)
