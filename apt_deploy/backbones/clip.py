"""CLIP (transformers' CLIPModel) as an image classifier: APT on the image tower, CoOp on the text side.

APT placement (our choice; no official CLIP placement exists, specs/apt.md): one module per
self-attention of the **vision** tower, the same place as ViLT's — x_in is the layer's
``layer_norm1`` output (the input of ``self_attn``), o is ``self_attn``'s output after
``out_proj`` (bias included), and y = e^s (o + w * A P) replaces o before the residual add.
:class:`APTAttention` wraps a whole ``CLIPAttention`` so no transformers code is patched; its
``fold_apt`` folds e^s into ``out_proj`` and calls the fused op. Checkpoint keys are
``vision.layers.{i}.prompt/.down/.up/.log_scale``. The text tower is never given APT: for a
classifier its output is constant per class and folds away (methods/coop.py).

Deployed form (``export_module``): ``pixel_values -> logits`` = the image tower (with the fused
APT ops when APT was used) + one GEMM with the constant matrix logit_scale.exp() * normalised class
embeddings. ``manifest_extras`` records ``class_names`` in logit order.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones.registry import (BackboneSpec, InputSpec, ShapeSettings, Site, load_pretrained,
                                           read_architecture, register_backbone)
from apt_deploy.errors import CheckpointError, ConfigError
from apt_deploy.methods.coop import class_embedding_matrix, image_features

SUPPORTED = ("CLIPModel",)


class APTAttention(nn.Module):
    """Training form: a CLIPAttention whose output o (after out_proj) goes through APT with x_in = its input."""

    def __init__(self, attn: nn.Module, apt: nn.Module) -> None:
        super().__init__()
        self.attn, self.apt = attn, apt

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        o, weights = self.attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        return self.apt(hidden_states, o), weights

    def fold_apt(self) -> nn.Module:
        from apt_deploy.methods.apt import scaled_linear

        k, v, scale = self.apt.folded_constants()
        attn = copy.deepcopy(self.attn)
        attn.out_proj = scaled_linear(self.attn.out_proj, scale)
        return FoldedAPTAttention(attn, k, v)


class FoldedAPTAttention(nn.Module):
    """Inference form: e^s folded into ``out_proj``, then ``torch.ops.apt.approx_prompt_diffusion``."""

    def __init__(self, attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.attn = attn
        self.register_buffer("k", k)
        self.register_buffer("v", v)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        from apt_deploy.ops import torch_op  # noqa: F401  (registers torch.ops.apt)

        o, weights = self.attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        return torch.ops.apt.approx_prompt_diffusion(hidden_states, o, self.k, self.v), weights


class ClipImageClassifier(nn.Module):
    """``pixel_values -> logits``: image tower, projection, L2 norm, one GEMM with the class matrix."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, class_weight: torch.Tensor) -> None:
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection
        self.register_buffer("class_weight", class_weight.detach().clone())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_features(self, pixel_values) @ self.class_weight.t()


@register_backbone("clip")
class ClipSpec(BackboneSpec):
    model_classes = SUPPORTED

    def load(self, model_dir: str) -> nn.Module:
        from transformers import CLIPModel

        read_architecture(model_dir, SUPPORTED, "save the full CLIPModel (both towers), not a single tower")
        return load_pretrained(CLIPModel, model_dir)

    def hidden_size(self, model: nn.Module) -> int:
        return int(model.config.vision_config.hidden_size)

    def num_layers(self, model: nn.Module) -> int:
        return len(model.vision_model.encoder.layers)

    def apt_sites(self, model: nn.Module) -> list[Site]:
        layers = model.vision_model.encoder.layers
        return [Site(f"vision.layers.{i}", layer, "self_attn") for i, layer in enumerate(layers)]

    def deep_prompt_sites(self, model: nn.Module) -> list[Site]:
        return []  # deep prompt is not offered for CLIP (methods: coop, gram, apt, apt+coop)

    def wrap_apt(self, host: nn.Module, apt: nn.Module) -> nn.Module:
        return APTAttention(host, apt)

    def method_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``text.context`` (the class head's context, trained or frozen) and, when GRAM attached one,
        the gradient regulator as ``gram.regulator.*`` (training-time only; never exported)."""
        learner = getattr(model, "prompt_learner", None)
        out = {"text.context": learner.context} if learner is not None and hasattr(learner, "context") else {}
        regulator = getattr(model, "gram_regulator", None)
        if regulator is not None:
            out.update({f"gram.regulator.{n}": p for n, p in regulator.named_parameters()})
        return out

    @property
    def methods(self) -> tuple[str, ...]:
        from apt_deploy.tuning import CLIP_METHODS

        return CLIP_METHODS

    def method_config_json(self, model: nn.Module, state: Any) -> dict[str, Any]:
        return _clip_config_json(model, state)

    def apply_method_from_config(self, model: nn.Module, cfg: dict[str, Any], class_names: list[str] | None = None,
                                 **options: Any) -> None:
        _apply_clip_from_config(model, cfg, class_names)

    def manifest_extras(self, model: nn.Module) -> dict[str, Any]:
        learner = getattr(model, "prompt_learner", None)
        return {"class_names": list(learner.class_names)} if learner is not None else {}

    def inference_assets(self, model: nn.Module, model_dir: str | None, specs: list[InputSpec],
                         out_dir: Path) -> dict[str, Any]:
        """Image classification: class names in logit order, the image processor's recipe, softmax scores."""
        from transformers import CLIPImageProcessorPil

        from apt_deploy.assets import image_recipe, missing_assets, write_assets

        learner = getattr(model, "prompt_learner", None)
        if learner is None:
            return missing_assets("this CLIP model has no class head")
        if not model_dir or not (Path(model_dir) / "preprocessor_config.json").is_file():
            return missing_assets(f"model directory {model_dir!r} holds no preprocessor_config.json")
        processor = CLIPImageProcessorPil.from_pretrained(str(model_dir))
        recipe = {"task": "image_classification", "score": "softmax", "image": image_recipe(processor)}
        write_assets(out_dir, list(learner.class_names), recipe, processor)
        return {"task": recipe["task"], "request_inputs": ["image"]}

    def export_module(self, model: nn.Module) -> nn.Module:
        if getattr(model, "prompt_learner", None) is None:
            raise ConfigError("this CLIP model has no class head (prompt learner)",
                              "a CLIP model from apply_clip_method / load_prompts",
                              "apply a CLIP method (coop, gram, apt, apt+coop) with the class names first")
        return ClipImageClassifier(model.vision_model, model.visual_projection, class_embedding_matrix(model))

    # --- export ----------------------------------------------------------------------------
    def input_specs(self, model: nn.Module, shapes: ShapeSettings) -> list[InputSpec]:
        size = int(model.config.vision_config.image_size)
        if shapes.dynamic_image or (shapes.image_size and tuple(shapes.image_size) != (size, size)):
            raise ConfigError(f"image size {shapes.image_size} / dynamic={shapes.dynamic_image}",
                              f"the model's fixed {size}x{size} (CLIP's position embeddings are not interpolated here)",
                              "drop --image-size / --dynamic-image for CLIP")
        bmin, bopt, bmax = shapes.batch
        return [InputSpec("pixel_values", "float32", ("batch", 3, size, size),
                          (bmin, 3, size, size), (bopt, 3, size, size), (bmax, 3, size, size))]

    def output_names(self, model: nn.Module) -> list[str]:
        return ["logits"]

    def dummy_inputs(self, model: nn.Module, specs: list[InputSpec], which: str, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = next(getattr(s, f"{which}_shape") for s in specs if s.name == "pixel_values")
        return {"pixel_values": torch.randn(shape, generator=g)}

    # --- tests -----------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, **kwargs: Any) -> nn.Module:
        from transformers import CLIPConfig, CLIPModel

        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(**tiny_clip_config(**kwargs))).eval()


def tiny_clip_config(hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8,
                     projection: int = 32) -> dict[str, Any]:
    """A tiny CLIP whose text vocabulary is :func:`tiny_vocab` (special ids inside the vocab)."""
    vocab = tiny_vocab()
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=2 * hidden,
                  projection_dim=projection)
    text = dict(common, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=vocab[SOS],
                eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return dict(text_config=text, vision_config=dict(common, image_size=image_size, patch_size=patch),
                projection_dim=projection)


SOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode map (no longer importable from transformers 5)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_vocab() -> dict[str, int]:
    """Byte-level vocab with no merges: 256 byte chars, 256 end-of-word chars, SOS, EOS (514 ids)."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab[SOS], vocab[EOS] = 512, 513
    return vocab


def save_tiny_clip(directory: str | Path, seed: int = 0, **kwargs: Any) -> Path:
    """Write a tiny random CLIPModel + an offline CLIPTokenizer + a CLIPImageProcessorPil to ``directory``."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(tiny_vocab()))
    (out / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt")).save_pretrained(out)
    model = ClipSpec().build_tiny(seed, **kwargs)
    size = int(model.config.vision_config.image_size)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    model.save_pretrained(out)
    return out


def _clip_config_json(model: nn.Module, state: Any) -> dict[str, Any]:
    """CLIP fields of apt_config.json: class names + their token ids (no tokenizer needed to load),
    the CoOp and APT settings, the text width, and the GRAM regulator's shape when one is attached."""
    coop, apt = state.config.coop, state.config.apt
    out: dict[str, Any] = {"prompt_len": apt.prompt_len if apt else coop.context_len, "context_len": coop.context_len,
                           "text_hidden_size": int(model.config.text_config.hidden_size),
                           "coop": dataclasses.asdict(coop), "apt": dataclasses.asdict(apt) if apt else None}
    out.update(model.prompt_learner.prompts.to_json())
    regulator = getattr(model, "gram_regulator", None)
    if regulator is not None:
        out["gram_regulator"] = regulator.config_json()
    return out


def _apply_clip_from_config(model: nn.Module, cfg: dict[str, Any], class_names: list[str] | None) -> None:
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.methods.coop import ClassPrompts, CoOpConfig
    from apt_deploy.tuning import apply_clip_method

    _check_clip_fields(model, cfg, class_names)
    prompts = ClassPrompts.from_json(cfg)
    coop = CoOpConfig(**cfg["coop"])
    apt = APTConfig(**cfg["apt"]) if cfg.get("apt") else None
    apply_clip_method(model, cfg["method"], prompts, coop, apt)
    if cfg.get("gram_regulator"):
        from apt_deploy.methods.gram import GradientRegulator

        model.gram_regulator = GradientRegulator.from_config_json(cfg["gram_regulator"]).requires_grad_(False)


def _check_clip_fields(model: nn.Module, cfg: dict[str, Any], class_names: list[str] | None) -> None:
    for key in ("class_names", "class_token_ids", "special_tokens", "coop", "text_hidden_size"):
        if key not in cfg:
            raise CheckpointError(f"apt_config.json of a CLIP checkpoint lacks {key!r}", "the fields save_prompts writes for CLIP")
    names, ids = cfg["class_names"], cfg["class_token_ids"]
    if len(names) != len(ids):
        raise CheckpointError(f"{len(names)} class names but {len(ids)} tokenised class prompts", "one per class",
                              "re-save the prompts; the config was edited by hand")
    if class_names is not None and list(class_names) != list(names):
        raise CheckpointError(f"{len(class_names)} class names given ({list(class_names)[:5]}...) but the prompts were "
                              f"trained for {len(names)} ({names[:5]}...)", "the same class names in the same order",
                              "pass the class names from the checkpoint's apt_config.json (or retrain)")
    text = model.config.text_config
    if cfg["text_hidden_size"] != text.hidden_size:
        raise CheckpointError(f"prompts have text_hidden_size={cfg['text_hidden_size']} but the model has "
                              f"{text.hidden_size}", "the base model the prompts were trained on", "pass the matching --model")
    used = [i for row in ids for i in row] + list(cfg["special_tokens"].values()) + list(cfg.get("context_init_ids") or [])
    if used and max(used) >= text.vocab_size:
        raise CheckpointError(f"token id {max(used)} in the checkpoint is outside the text vocabulary of {text.vocab_size}",
                              "ids from the model's own tokenizer", "pass the model the prompts were trained on")
