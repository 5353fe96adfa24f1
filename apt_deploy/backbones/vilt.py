"""ViLT (transformers' ViltModel / ViltForQuestionAnswering): single-stream pre-LN ViT-B/32.

APT placement (official code): one module per block, between the attention output projection and
its dropout, x_in = LN1 output (the input of the attention sub-layer). All tokens pass through it.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones.registry import (BackboneSpec, InputSpec, ShapeSettings, Site, load_pretrained,
                                           read_architecture, register_backbone)
from apt_deploy.errors import ConfigError, ExportError

SUPPORTED = ("ViltForQuestionAnswering", "ViltModel")


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "vilt", model)


def static_visual_embed(self: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, max_image_length: int = 200):
    """Export-time ViltEmbeddings.visual_embed that honours ``pixel_mask`` without data-dependent shapes.

    The original keeps each image's valid patches plus randomly sampled padding patches (masked out), with
    position embeddings interpolated to each image's valid size, in a Python loop. Here every patch stays,
    in raster order, with the patch-level mask as its attention mask, and each image's position
    embeddings come from a per-image bilinear (align_corners) interpolation written as two small matrix
    products. Masked tokens never reach valid ones (attention mask) and every other op is per token, so
    logits and pooled outputs equal the original's to float precision, padded or not (docs/pitfalls.md).
    """
    x = self.patch_embeddings(pixel_values)
    b, c, h, w = x.shape
    pd = self.config.image_size // self.config.patch_size
    x_mask = nn.functional.interpolate(pixel_mask[:, None].to(x.dtype), size=(h, w)).long()[:, 0]  # as the original
    valid_h, valid_w = x_mask[:, :, 0].sum(1), x_mask[:, 0, :].sum(1)  # patches per column 0 / row 0
    grid = self.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, c, pd, pd)
    rows, cols = _interpolation_matrix(valid_h, h, pd, x.dtype), _interpolation_matrix(valid_w, w, pd, x.dtype)
    # (b, 1, h, pd) @ (1, c, pd, pd) @ (b, 1, pd, w): MatMul, not Einsum (ONNX Einsum has no bfloat16)
    pos = (rows[:, None] @ grid @ cols[:, None].transpose(-1, -2)).flatten(2).transpose(1, 2)
    x = x.flatten(2).transpose(1, 2)
    r_idx = torch.arange(h, device=x.device).repeat_interleave(w)
    c_idx = torch.arange(w, device=x.device).repeat(h)
    patch_index = torch.stack([r_idx, c_idx], -1).unsqueeze(0).expand(b, -1, -1)
    x = torch.cat((self.cls_token.expand(b, -1, -1), x), 1)
    pos = torch.cat((self.position_embeddings[:, :1, :].expand(b, -1, -1), pos), 1)
    x = self.dropout(x + pos)
    x_mask = torch.cat([torch.ones(b, 1, dtype=torch.long, device=x.device), x_mask.flatten(1)], 1)
    return x, x_mask, (patch_index, (h, w))


def _interpolation_matrix(valid: torch.Tensor, size: int, source: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, size, source) weights of 1-D linear interpolation (align_corners=True) from ``source`` points
    to each row's ``valid`` points, zero beyond them: F.interpolate per image, as a matrix."""
    out = torch.arange(size, device=valid.device, dtype=torch.float32)[None, :]
    n = valid.to(torch.float32)[:, None]
    scale = torch.where(n > 1, (source - 1) / (n - 1).clamp(min=1), torch.zeros_like(n))
    src = out * scale
    lo = src.floor().clamp(max=source - 1)
    frac = src - lo
    hi = (lo + 1).clamp(max=source - 1)
    points = torch.arange(source, device=valid.device, dtype=torch.float32)[None, None, :]
    weights = (points == lo[..., None]) * (1 - frac)[..., None] + (points == hi[..., None]) * frac[..., None]
    return (weights * (out < n)[..., None]).to(dtype)


class ClsEmbeddingReplacement(nn.Module):
    """The official recipe's ``token4classifier``: a learned replacement of the first text token's whole
    embedding output (word + position + type, LayerNorm), initialised to that output for ``cls_token_id``
    (APT's vilt_module_apt.py builds it as ``text_embeddings([[101]])`` and substitutes it after the text
    embeddings, before the modality-type add)."""

    def __init__(self, text_embeddings: nn.Module, cls_token_id: int) -> None:
        super().__init__()
        self.text_embeddings = text_embeddings
        was_training = text_embeddings.training
        with torch.no_grad():
            ids = torch.tensor([[cls_token_id]], device=text_embeddings.word_embeddings.weight.device)
            first = text_embeddings.eval()(input_ids=ids)[0, 0]
        text_embeddings.train(was_training)
        self.token4classifier = nn.Parameter(first.detach().clone())

    @property
    def word_embeddings(self) -> nn.Module:
        return self.text_embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds)
        first = self.token4classifier.to(emb.dtype).expand(emb.shape[0], 1, -1)
        return torch.cat([first, emb[:, 1:]], dim=1)


@register_backbone("vilt")
class ViltSpec(BackboneSpec):
    model_classes = SUPPORTED

    def load(self, model_dir: str) -> nn.Module:
        import transformers

        arch = read_architecture(model_dir, SUPPORTED, "convert the checkpoint to a supported ViLT head")
        return load_pretrained(getattr(transformers, arch), model_dir)

    def hidden_size(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def num_layers(self, model: nn.Module) -> int:
        return len(_core(model).encoder.layer)

    def apt_sites(self, model: nn.Module) -> list[Site]:
        return [Site(f"layers.{i}", layer.attention, "output") for i, layer in enumerate(_core(model).encoder.layer)]

    def deep_prompt_sites(self, model: nn.Module) -> list[Site]:
        layers = _core(model).encoder.layer
        return [Site(f"layers.{i}", layers, str(i)) for i in range(len(layers))]

    def deep_prompt_host(self, layer: nn.Module) -> tuple[nn.Module, str, nn.Module]:
        """(parent of the self-attention, its attribute, the LN1 that feeds it)."""
        return layer.attention, "attention", layer.layernorm_before

    def insert_cls_embedding(self, model: nn.Module, cls_token_id: int) -> None:
        emb = _core(model).embeddings
        emb.text_embeddings = ClsEmbeddingReplacement(emb.text_embeddings, cls_token_id)

    def method_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        emb = _core(model).embeddings.text_embeddings
        return {"text.token4classifier": emb.token4classifier} if isinstance(emb, ClsEmbeddingReplacement) else {}

    def trainable_extras(self, model: nn.Module) -> dict[str, nn.Module]:
        core = _core(model)
        extras: dict[str, nn.Module] = {"embeddings.modality_type": core.embeddings.token_type_embeddings}
        if getattr(core, "pooler", None) is not None:
            extras["pooler"] = core.pooler
        if hasattr(model, "classifier"):
            extras["head"] = model.classifier
        return extras

    def load_with_head(self, model_dir: str, labels: list[str]) -> tuple[nn.Module, str | None]:
        import transformers

        arch = read_architecture(model_dir, SUPPORTED, "convert the checkpoint to a supported ViLT head")
        if arch == "ViltModel":  # no head: transformers builds (and initialises) a fresh one, as the official recipe
            model = load_pretrained(transformers.ViltForQuestionAnswering, model_dir, num_labels=len(labels),
                                    id2label=dict(enumerate(labels)), label2id={a: i for i, a in enumerate(labels)})
            model.classifier.apply(model._init_weights)
            return model, f"{model_dir} is a ViltModel without a VQA head"
        model = self.load(model_dir)
        reason = _head_mismatch(model.config, labels)
        if reason:
            self.resize_head(model, labels)
        else:
            _set_labels(model.config, labels)
        return model, reason

    def resize_head(self, model: nn.Module, labels: list[str]) -> None:
        """A fresh VQA head (transformers' own initialisation of every head layer) with ``len(labels)`` outputs."""
        if not hasattr(model, "classifier"):
            raise ConfigError(f"{type(model).__name__} has no VQA head to resize", "a ViltForQuestionAnswering",
                              "load it with get_backbone('vilt').load_with_head(model_dir, labels)")
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, len(labels), device=last.weight.device, dtype=last.weight.dtype)
        model.classifier.apply(model._init_weights)
        _set_labels(model.config, labels)

    # --- export ----------------------------------------------------------------------------
    def input_specs(self, model: nn.Module, shapes: ShapeSettings) -> list[InputSpec]:
        cfg = model.config
        if shapes.text_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"text length {shapes.text_len}",
                f"at most the model's max_position_embeddings={cfg.max_position_embeddings}",
                "pass a smaller --text-len",
            )
        (bmin, bopt, bmax), t = shapes.batch, shapes.text_len
        h, w = shapes.image_size or (cfg.image_size, cfg.image_size)
        lo, hi = shapes.image_range or (min(h, w), max(h, w))
        hw_axes: tuple[int | str, int | str] = ("height", "width") if shapes.dynamic_image else (h, w)
        text = [InputSpec(n, "int64", ("batch", t), (bmin, t), (bopt, t), (bmax, t))
                for n in ("input_ids", "attention_mask", "token_type_ids")]
        pix = InputSpec("pixel_values", "float32", ("batch", 3, *hw_axes),
                        (bmin, 3, *(_img(lo, h, w, shapes))), (bopt, 3, h, w), (bmax, 3, *(_img(hi, h, w, shapes))))
        mask = InputSpec("pixel_mask", "int64", ("batch", *hw_axes), (bmin, *pix.min_shape[2:]),
                         (bopt, h, w), (bmax, *pix.max_shape[2:]))
        return [*text, pix, mask]

    def inference_assets(self, model: nn.Module, model_dir: str | None, specs: list[InputSpec],
                         out_dir: Path) -> dict[str, Any]:
        """VQA: answers in logit order, tokenizer.json, the image recipe with an exact resize to the export's
        image size (unpadded, pixel_mask all ones), sigmoid scores (ViLT's VQA head is trained with BCE)."""
        from apt_deploy.assets import image_recipe, missing_assets, save_tokenizer, write_assets
        from apt_deploy.data.vqa import PROCESSOR_FILES, load_processor

        if not hasattr(model, "classifier"):
            return missing_assets("a bare ViltModel has no answer head")
        if not model_dir or not any((Path(model_dir) / f).is_file() for f in PROCESSOR_FILES):
            return missing_assets(f"model directory {model_dir!r} holds no ViLT processor (tokenizer + image processor)")
        processor = load_processor(model_dir)
        shapes = {s.name: s.opt_shape for s in specs}
        tok = processor.tokenizer
        recipe = {"task": "visual_question_answering", "score": "sigmoid", "pixel_mask": True,
                  "image": image_recipe(processor.image_processor, exact_size=tuple(shapes["pixel_values"][2:])),
                  "text": {"tokenizer": save_tokenizer(tok, out_dir), "max_length": int(shapes["input_ids"][1]),
                           "pad_id": int(tok.pad_token_id), "pad_token": str(tok.pad_token)}}
        write_assets(out_dir, [model.config.id2label[i] for i in range(model.config.num_labels)], recipe, processor)
        return {"task": recipe["task"], "request_inputs": ["image", "question"]}

    def output_names(self, model: nn.Module) -> list[str]:
        return ["logits"] if hasattr(model, "classifier") else ["last_hidden_state", "pooler_output"]

    def dummy_inputs(self, model: nn.Module, specs: list[InputSpec], which: str, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shapes = {s.name: getattr(s, f"{which}_shape") for s in specs}
        b, t = shapes["input_ids"]
        ids = torch.randint(1, model.config.vocab_size, (b, t), generator=g)
        lengths = torch.randint(max(1, t // 2), t + 1, (b,), generator=g)
        lengths[0] = t  # at least one row without padding
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        return {
            "input_ids": ids * mask,
            "attention_mask": mask,
            "token_type_ids": torch.zeros(b, t, dtype=torch.long),
            "pixel_values": torch.randn(shapes["pixel_values"], generator=g),
            "pixel_mask": torch.ones(shapes["pixel_mask"], dtype=torch.long),
        }

    def check_export_shapes(self, model: nn.Module, specs: list[InputSpec]) -> None:
        cfg, (h, w) = model.config, next(s.max_shape[2:] for s in specs if s.name == "pixel_values")
        patches = (h // cfg.patch_size) * (w // cfg.patch_size)
        if cfg.max_image_length is not None and 0 < cfg.max_image_length < patches:
            raise ExportError(
                f"model config max_image_length={cfg.max_image_length} is below the {patches} patches of a {h}x{w} image, "
                "so ViLT would randomly subsample patches at inference",
                "max_image_length <= 0 or >= the patch count",
                "export a smaller image size, or set max_image_length=-1 in the model's config.json",
            )

    def dynamic_dim(self, model: nn.Module, axis: str, low: int, high: int) -> Any:
        """Image height/width are multiples of the patch size (ViLT's conv floors the rest away)."""
        from torch.export import Dim

        if axis in ("height", "width"):
            patch = model.config.patch_size
            return patch * Dim(f"{axis}_patches", min=max(1, low // patch), max=high // patch)
        return Dim(axis, min=low, max=high)

    @contextlib.contextmanager
    def export_context(self, model: nn.Module) -> Iterator[None]:
        emb = _core(model).embeddings
        emb.visual_embed = types.MethodType(static_visual_embed, emb)
        try:
            yield
        finally:
            del emb.visual_embed

    # --- tests -----------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, **kwargs: Any) -> nn.Module:
        from transformers import ViltConfig, ViltForQuestionAnswering, ViltModel

        num_labels = kwargs.pop("num_labels", 10)
        head = kwargs.pop("head", True)
        cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=128, max_position_embeddings=16, image_size=32, patch_size=16, max_image_length=-1)
        cfg.update(kwargs)
        labels = {i: f"answer_{i}" for i in range(num_labels)}
        config = ViltConfig(**cfg, num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()})
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(config) if head else ViltModel(config)
        return model.eval()


def _set_labels(config: Any, labels: list[str]) -> None:
    config.num_labels = len(labels)  # transformers rebuilds id2label from num_labels; set the names after
    config.id2label = dict(enumerate(labels))
    config.label2id = {a: i for i, a in enumerate(labels)}


GENERIC_LABELS = ("LABEL_", "answer_")  # transformers' and build_tiny's placeholder names: no vocabulary to disagree with


def _head_mismatch(config: Any, labels: list[str]) -> str | None:
    """Why the checkpoint's VQA head does not fit ``labels`` (None: same size and names, or placeholder names)."""
    if config.num_labels != len(labels):
        return f"the model's VQA head has {config.num_labels} outputs but the answer vocabulary has {len(labels)}"
    old = [str(config.id2label.get(i, "")) for i in range(len(labels))]
    differ = [i for i, (a, o) in enumerate(zip(labels, old)) if a != o.strip().lower()]
    if differ and not all(o.startswith(GENERIC_LABELS) for o in old):
        i = differ[0]
        return (f"the model's VQA head is labelled for other answers in {len(differ)} places "
                f"(e.g. label {i}: {old[i]!r} vs {labels[i]!r})")
    return None


def _img(side: int, h: int, w: int, shapes: ShapeSettings) -> tuple[int, int]:
    return (side, side) if shapes.dynamic_image else (h, w)
