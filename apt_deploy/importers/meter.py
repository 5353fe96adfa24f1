"""Official METER / APT-METER checkpoints -> a METER model directory (+ a prompt checkpoint v1).

Key mapping (shared/specs/meter.md §2.1; official -> ours):

* ``vit_model.visual.conv1 / class_embedding / positional_embedding / ln_pre / ln_post`` ->
  ``vision.embeddings.patch_embedding / class_embedding / position_embedding.weight / pre_layrnorm / post_layernorm``
* ``vit_model.visual.transformer.resblocks.{i}.attn.in_proj_{weight,bias}`` -> split in 3 (q, k, v order) ->
  ``vision.encoder.layers.{i}.self_attn.{q,k,v}_proj``; ``attn.out_proj`` -> ``self_attn.out_proj``;
  ``ln_1 / ln_2 / mlp.c_fc / mlp.c_proj`` -> ``layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2``
* ``text_transformer.*`` -> ``text.*``; ``{vqa,nlvr2,snli}_classifier.*`` -> ``classifier.*``; the cross
  layers, transforms, poolers and token-type embeddings keep their names.
* dropped: CLIP's text-tower leftovers (``vit_model.*`` outside ``vit_model.visual``), RoBERTa's pooler and
  ``position_ids`` buffer; with ``num_labels`` (a pre-training checkpoint) also ``mlm_score.*``/``itm_score.*``.
* APT (``...{attention,crossattention}.output.APT.{mm.0.weight, mm.1.weight, mm_tokens, scale}``,
  ``token4classifier``) -> prompt checkpoint v1: prompt = mm_tokens, down = mm.0, up = mm.1, log_scale = scale.

The architecture is inferred from shapes (head dim 64, as CLIP, RoBERTa and METER use); the position
table is re-gridded bicubically (align_corners=False, as METER's adapt_position_encoding) when
``image_size`` differs from the checkpoint's grid.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from apt_deploy.errors import CheckpointError, ConfigError
from apt_deploy.importers.common import check_keys, check_shapes, read_state_dict
from apt_deploy.models.meter import MeterConfig, MeterModel, TASKS

log = logging.getLogger(__name__)
HEAD_DIM = 64
VIS = "vit_model.visual."
BLOCK = re.compile(r"^vit_model\.visual\.transformer\.resblocks\.(\d+)\.(.+)$")
APT_KEY = re.compile(r"^cross_modal_(text|image)_layers\.(\d+)\.(attention|crossattention)\.output\.APT\.(.+)$")
APT_PARTS = {"mm_tokens": "prompt", "mm.0.weight": "down", "mm.1.weight": "up", "scale": "log_scale"}
BLOCK_RENAMES = {"attn.out_proj.": "self_attn.out_proj.", "ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.",
                 "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
VISUAL_RENAMES = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
                  "positional_embedding": "embeddings.position_embedding.weight"}
FIX = "pass an official METER checkpoint (clip16 + text_roberta) whose keys are listed in the README, 'Import'"


@dataclass
class OfficialMeter:
    """A converted checkpoint: the model (base weights loaded) and the official APT tensors, by our site key."""

    model: MeterModel
    apt: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    token4classifier: torch.Tensor | None = None
    dropped: list[str] = field(default_factory=list)


def convert_meter(state: dict[str, torch.Tensor], image_size: int | None = None,
                  num_labels: int | None = None) -> OfficialMeter:
    """Official state dict -> :class:`OfficialMeter` (everything checked before anything is written)."""
    apt = {k: v for k, v in state.items() if APT_KEY.match(k)}
    token4 = state.get("token4classifier")
    dropped = sorted(k for k in state if _dropped(k, num_labels is not None))
    base = {k: v for k, v in state.items() if k not in apt and k != "token4classifier" and k not in dropped}
    config = infer_config(base, image_size, num_labels)
    model = MeterModel(config)
    mapped = map_state(base, config)
    own = model.state_dict()
    if num_labels is not None:  # a pre-training checkpoint: the task head starts fresh (METER's init)
        mapped.update({k: v for k, v in own.items() if k.startswith("classifier.")})
    check_keys("METER checkpoint", official_keys(model, num_labels is not None), base, FIX)
    check_shapes("METER checkpoint", {k: v.shape for k, v in own.items()}, mapped, FIX)
    model.load_state_dict(mapped)
    log.info("converted METER (%s, %d labels, image %d, %d+%d cross layers); dropped %d keys", config.task,
             config.num_labels, config.image_size, config.num_cross_layers, config.num_cross_layers, len(dropped))
    return OfficialMeter(model.eval(), _group_apt(apt, config), token4, dropped)


def _dropped(key: str, pretrain_heads: bool) -> bool:
    if key.startswith("vit_model.") and not key.startswith(VIS):
        return True  # CLIP text-tower leftovers (positional_embedding [77, 512], ln_final, ...)
    if key == "text_transformer.embeddings.position_ids" or key.startswith("text_transformer.pooler."):
        return True
    return pretrain_heads and key.startswith(("mlm_score.", "itm_score."))


def _get(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no {key!r} (needed to infer the architecture)",
                              "an official METER checkpoint (clip16 + text_roberta)", FIX)
    return state[key]


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in state if (m := rx.match(k))}
    if found != set(range(len(found))) or not found:
        raise CheckpointError(f"layers matching {pattern!r}: indices {sorted(found)}", "a contiguous range 0..N-1", FIX)
    return len(found)


def _heads(width: int, what: str) -> int:
    if width % HEAD_DIM:
        raise CheckpointError(f"{what} width {width} is not a multiple of the head size {HEAD_DIM}",
                              "CLIP / RoBERTa / METER widths (head dim 64)", FIX)
    return width // HEAD_DIM


def infer_config(state: dict[str, torch.Tensor], image_size: int | None, num_labels: int | None) -> MeterConfig:
    """Every size from tensor shapes; the task from the head present (or ``num_labels`` for a fresh VQA head)."""
    width, patch = _get(state, VIS + "class_embedding").shape[0], _get(state, VIS + "conv1.weight").shape[-1]
    grid = _grid(_get(state, VIS + "positional_embedding").shape[0])
    size = _image_size(image_size, grid * patch, patch)
    vision = dict(hidden_size=width, intermediate_size=_get(state, VIS + "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
                  num_hidden_layers=_count(state, BLOCK.pattern.replace("(.+)", ".+")), num_attention_heads=_heads(width, "CLIP"),
                  image_size=size, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    words = _get(state, "text_transformer.embeddings.word_embeddings.weight")
    t_width = words.shape[1]
    text = dict(vocab_size=words.shape[0], hidden_size=t_width, num_attention_heads=_heads(t_width, "RoBERTa"),
                num_hidden_layers=_count(state, r"^text_transformer\.encoder\.layer\.(\d+)\..+$"),
                intermediate_size=_get(state, "text_transformer.encoder.layer.0.intermediate.dense.weight").shape[0],
                max_position_embeddings=_get(state, "text_transformer.embeddings.position_embeddings.weight").shape[0],
                type_vocab_size=_get(state, "text_transformer.embeddings.token_type_embeddings.weight").shape[0],
                layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    hidden = _get(state, "cross_modal_text_transform.weight").shape[0]
    task, labels = _task(state, num_labels)
    return MeterConfig(vision=vision, text=text, hidden_size=hidden, num_attention_heads=_heads(hidden, "cross-layer"),
                       intermediate_size=_get(state, "cross_modal_text_layers.0.intermediate.dense.weight").shape[0],
                       num_cross_layers=_count(state, r"^cross_modal_text_layers\.(\d+)\..+$"), task=task,
                       num_labels=labels, max_text_len=min(50, text["max_position_embeddings"] - 2))


def _grid(rows: int) -> int:
    grid = math.isqrt(rows - 1)
    if grid * grid != rows - 1:
        raise CheckpointError(f"vit_model.visual.positional_embedding has {rows} rows", "1 + a square number of patches", FIX)
    return grid


def _image_size(requested: int | None, native: int, patch: int) -> int:
    if requested is None:
        return native
    if requested <= 0 or requested % patch:
        raise ConfigError(f"--image-size {requested}", f"a positive multiple of the patch size {patch}",
                          f"pass e.g. --image-size {max(patch, requested // patch * patch)}")
    return requested


def _task(state: dict[str, torch.Tensor], num_labels: int | None) -> tuple[str, int]:
    heads = [t for t in TASKS if f"{t}_classifier.3.weight" in state]
    if len(heads) > 1:
        raise CheckpointError(f"the checkpoint has several task heads {heads}", "exactly one task head", FIX)
    if heads and num_labels is not None:
        raise ConfigError(f"--num-labels {num_labels} but the checkpoint has a {heads[0]} head",
                          "--num-labels only for a pre-training checkpoint (no task head)", "drop --num-labels")
    if heads:
        return heads[0], int(state[f"{heads[0]}_classifier.3.weight"].shape[0])
    if num_labels is None:
        raise CheckpointError("the checkpoint has no task head (vqa_classifier / nlvr2_classifier / snli_classifier)",
                              "a fine-tuned METER checkpoint, or --num-labels N for a pre-training one",
                              "pass --num-labels N to start a fresh VQA head (mlm_score / itm_score are dropped)")
    if num_labels < 1:
        raise ConfigError(f"--num-labels {num_labels}", "a positive answer count (VQAv2: 3129)")
    return "vqa", num_labels


def map_state(state: dict[str, torch.Tensor], config: MeterConfig) -> dict[str, torch.Tensor]:
    """Official names -> ours (unknown keys pass through unchanged, so the key check names them)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if (m := BLOCK.match(key)) and m.group(2).startswith("attn.in_proj_"):
            kind = m.group(2).rsplit("_", 1)[1]  # weight | bias
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"vision.encoder.layers.{m.group(1)}.self_attn.{name}_proj.{kind}"] = part
        elif m:
            out[f"vision.encoder.layers.{m.group(1)}.{_rename(m.group(2), BLOCK_RENAMES)}"] = value
        elif key.startswith(VIS):
            out["vision." + _visual_name(key[len(VIS):])] = value
        elif key.startswith("text_transformer."):
            out["text." + key[len("text_transformer."):]] = value
        elif key.split(".", 1)[0] in {f"{t}_classifier" for t in TASKS}:
            out["classifier." + key.split(".", 1)[1]] = value
        else:
            out[key] = value
    pos = "vision.embeddings.position_embedding.weight"
    if pos in out:
        out[pos] = regrid_positions(out[pos], config.image_size // config.patch_size)
    return out


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return "unknown." + rest


def _visual_name(rest: str) -> str:
    if rest in VISUAL_RENAMES:
        return VISUAL_RENAMES[rest]
    for old, new in (("ln_pre.", "pre_layrnorm."), ("ln_post.", "post_layernorm.")):
        if rest.startswith(old):
            return new + rest[len(old):]
    return "unknown." + rest


def regrid_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g^2, C] -> [1 + grid^2, C]: the class row kept, the grid resized bicubically (align_corners=False)."""
    old = math.isqrt(table.shape[0] - 1)
    if old == grid:
        return table
    log.info("re-gridding the position table %dx%d -> %dx%d (bicubic)", old, old, grid, grid)
    patches = table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)])


def official_keys(model: MeterModel, fresh_head: bool) -> set[str]:
    """Every official key a checkpoint of this architecture holds (APT and dropped leftovers aside)."""
    out = {VIS + k for k in ("class_embedding", "conv1.weight", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
                             "ln_post.weight", "ln_post.bias")}
    parts = ("attn.in_proj_weight", "attn.in_proj_bias", *(f"{n}{w}" for n in BLOCK_RENAMES for w in ("weight", "bias")))
    out |= {f"{VIS}transformer.resblocks.{i}.{p}" for i in range(model.config.vision["num_hidden_layers"]) for p in parts}
    for key in model.state_dict():
        if key.startswith("text."):
            out.add("text_transformer." + key[len("text."):])
        elif key.startswith("classifier."):
            out |= set() if fresh_head else {f"{model.config.task}_classifier." + key[len("classifier."):]}
        elif not key.startswith("vision."):
            out.add(key)
    return out


def _group_apt(apt: dict[str, torch.Tensor], config: MeterConfig) -> dict[str, dict[str, torch.Tensor]]:
    """{``text.layers.0.self``: {prompt, down, up, log_scale}} for all 4 x layers sites, or {} when there is no APT."""
    if not apt:
        return {}
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in apt.items():
        stream, i, which, part = APT_KEY.match(key).groups()
        if part not in APT_PARTS:
            raise CheckpointError(f"unknown APT tensor {key!r}", f"one of {', '.join(APT_PARTS)} per APT module", FIX)
        sites.setdefault(f"{stream}.layers.{i}.{'self' if which == 'attention' else 'cross'}", {})[APT_PARTS[part]] = value
    expected = {f"{s}.layers.{i}.{w}" for s in ("text", "image") for i in range(config.num_cross_layers) for w in ("self", "cross")}
    incomplete = sorted(k for k, v in sites.items() if set(v) != set(APT_PARTS.values()))
    if set(sites) != expected or incomplete:
        raise CheckpointError(f"APT modules at {len(sites)} sites (missing {sorted(expected - set(sites))[:6]}, "
                              f"unexpected {sorted(set(sites) - expected)[:6]}, incomplete {incomplete[:6]})",
                              f"all {len(expected)} sites with mm.0.weight, mm.1.weight, mm_tokens and scale", FIX)
    return sites


def apply_official_apt(model: MeterModel, apt: dict[str, dict[str, torch.Tensor]], token4: torch.Tensor | None) -> MeterModel:
    """Apply APT as the official recipe does (scale frozen) and copy the official tensors in. In place."""
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import apply_apt

    first = next(iter(apt.values()))
    p, r = first["prompt"].shape[0], first["down"].shape[0]
    apply_apt(model, APTConfig(prompt_len=p, rank=r, train_log_scale=False, cls_token_id=0 if token4 is not None else None))
    from apt_deploy.backbones import get_backbone

    spec = get_backbone("meter")
    hosts = {site.key: site.module.apt for site in spec.apt_sites(model)}
    for key, tensors in apt.items():
        module = hosts[key]
        expected = {n: getattr(module, n).shape for n in APT_PARTS.values()}
        tensors = {**tensors, "log_scale": tensors["log_scale"].reshape(())}
        check_shapes(f"APT module {key}", expected, tensors, "all APT modules must share p, r and the hidden size")
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(module, name).copy_(value)
    if token4 is not None:
        check_shapes("token4classifier", {"t": model.token4classifier.shape}, {"t": token4}, FIX)
        with torch.no_grad():
            model.token4classifier.copy_(token4)
    return model


def import_meter(checkpoint: str | Path, model_out: str | Path, prompts_out: str | Path | None = None,
                 image_size: int | None = None, tokenizer: str | Path | None = None, num_labels: int | None = None,
                 overwrite: bool = False) -> dict[str, object]:
    """1. read (weights only)  2. convert and check everything  3. write the model dir  4. write the prompts."""
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.fileio import refuse_existing
    from apt_deploy.models.meter import save_meter

    refuse_existing(model_out, overwrite, flag="--model-out")
    if prompts_out is not None:
        refuse_existing(prompts_out, overwrite, flag="--prompts-out")
    converted = convert_meter(read_state_dict(checkpoint), image_size, num_labels)
    _check_prompt_target(converted, prompts_out)
    extras = _directory_extras(converted.model, tokenizer)
    save_meter(converted.model, model_out, extras=extras, overwrite=overwrite)
    if converted.apt:
        apply_official_apt(converted.model, converted.apt, converted.token4classifier)
        save_prompts(converted.model, prompts_out, overwrite=overwrite)
    return {"model_out": str(model_out), "prompts_out": str(prompts_out) if converted.apt else None,
            "task": converted.model.config.task, "image_size": converted.model.config.image_size,
            "apt_modules": len(converted.apt), "dropped": converted.dropped}


def _check_prompt_target(converted: OfficialMeter, prompts_out: str | Path | None) -> None:
    if converted.apt and prompts_out is None:
        raise ConfigError(f"the checkpoint holds {len(converted.apt)} APT modules but no --prompts-out was given",
                          "a directory for the prompt checkpoint", "pass --prompts-out PROMPT_DIR")
    if not converted.apt and prompts_out is not None:
        raise ConfigError("--prompts-out was given but the checkpoint holds no APT tensors (...output.APT.*)",
                          "an APT-trained METER checkpoint", "drop --prompts-out")
    if converted.token4classifier is not None and not converted.apt:
        raise CheckpointError("the checkpoint has token4classifier but no APT modules", "both or neither", FIX)


def _directory_extras(model: MeterModel, tokenizer: str | Path | None):
    """A writer for the model directory's tokenizer (from --tokenizer) and METER's image preprocessing."""
    from apt_deploy.data.meter import image_processor, load_tokenizer

    tok = load_tokenizer(tokenizer, model.config.vocab_size) if tokenizer is not None else None
    images = image_processor(model.config.image_size)

    def write(stage: Path) -> None:
        images.save_pretrained(stage)
        if tok is not None:
            tok.save_pretrained(stage)

    return write
