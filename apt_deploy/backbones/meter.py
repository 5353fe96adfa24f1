"""METER (apt_deploy.models.meter.MeterModel): CLIP-ViT + RoBERTa + co-attention cross layers.

APT placement (official code, shared/specs/meter.md §3): one module inside the self-output of **both**
attentions (self-attention and cross-attention) of every cross layer on both streams, between
``dense`` and the dropout: ``LayerNorm(dropout(APT(x_in, dense(ctx))) + x_in)`` with x_in = the
query-side input of that sub-layer (the layer input for ``attention``, the post-LN self-attention
output for ``crossattention``). 2 x 2 x 6 = 24 modules for METER-B. Checkpoint keys:
``{text,image}.layers.{i}.{self,cross}.{prompt,down,up,log_scale}``. The official recipe freezes the
scale (e^s = 1): :attr:`MeterSpec.apt_defaults` sets ``train_log_scale=False``.

Trainable besides the method (the official filter): the task head, both poolers, the token-type
embeddings and ``token4classifier`` (the learned first text token, inserted after the text transform).

Deep prompt (baseline): p tokens appended to the query stream of every cross layer (both streams);
they are keys/values of that stream's self-attention and are discarded after the layer. Folded: a
prefix K/V of the self-attention (post-LN host: the prompt enters the projections un-normalised).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones.registry import BackboneSpec, InputSpec, ShapeSettings, Site, register_backbone
from apt_deploy.errors import ConfigError
from apt_deploy.models.meter import MeterModel, MeterSelfOutput, load_meter, tiny_meter_config

SUPPORTED = ("MeterModel",)
STREAMS = ("text", "image")


class APTSelfOutput(nn.Module):
    """Training form: a post-LN self-output with APT after ``dense``: LN(dropout(APT(x, dense(ctx))) + x)."""

    def __init__(self, host: MeterSelfOutput, apt: nn.Module) -> None:
        super().__init__()
        self.dense, self.LayerNorm, self.dropout, self.apt = host.dense, host.LayerNorm, host.dropout, apt

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.apt(input_tensor, self.dense(hidden_states))) + input_tensor)

    def fold_apt(self) -> nn.Module:
        from apt_deploy.methods.apt import scaled_linear

        k, v, scale = self.apt.folded_constants()
        return FoldedSelfOutput(scaled_linear(self.dense, scale), self.LayerNorm, self.dropout, k, v)


class FoldedSelfOutput(nn.Module):
    """Inference form: e^s folded into ``dense``, then ``torch.ops.apt.approx_prompt_diffusion``, then the post-LN."""

    def __init__(self, dense: nn.Linear, layer_norm: nn.LayerNorm, dropout: nn.Module, k: torch.Tensor,
                 v: torch.Tensor) -> None:
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = dense, copy.deepcopy(layer_norm), dropout
        self.register_buffer("k", k)
        self.register_buffer("v", v)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        from apt_deploy.ops import torch_op  # noqa: F401  (registers torch.ops.apt)

        y = torch.ops.apt.approx_prompt_diffusion(input_tensor, self.dense(hidden_states), self.k, self.v)
        return self.LayerNorm(self.dropout(y) + input_tensor)


class OpFreeMeterAttention(nn.Module):
    """APT's op-free form in a METER attention (self or cross): K as p extra output columns of the query
    projection (it reads the same x_in), V as p extra input rows of ``dense`` fed ``[ctx | w * A]``, then the
    post-LN. Same y as the fused fold up to fp32 rounding (methods/apt_opfree.py explains the algebra)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        from apt_deploy.methods.apt_opfree import widened_output, widened_query

        core, host = attention.self, attention.output
        k, v, scale = host.apt.folded_constants()
        self.core, self.hidden = core, core.key.out_features
        self.query, self.dense = widened_query(core.query, k), widened_output(host.dense, v, scale)
        self.LayerNorm, self.dropout = host.LayerNorm, host.dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        import math

        q, s = self.query(hidden_states).split([self.hidden, self.query.out_features - self.hidden], dim=-1)
        a = torch.relu(s)
        context = hidden_states if context is None else context
        c = self.core
        scores = c._heads(q) @ c._heads(c.key(context)).transpose(-1, -2) / math.sqrt(c.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        ctx = (c.dropout(scores.softmax(-1)) @ c._heads(c.value(context))).transpose(1, 2).reshape(hidden_states.shape)
        y = self.dense(torch.cat([ctx, a.amax(dim=-1, keepdim=True) * a], dim=-1))
        return self.LayerNorm(self.dropout(y) + hidden_states)


def fold_meter_apt_opfree(model: nn.Module, spec: BackboneSpec) -> int:
    """Fold pass: every METER attention whose self-output hosts APT -> :class:`OpFreeMeterAttention`."""
    folded = 0
    for stream in STREAMS:
        for layer in _layers(model, stream):
            for attr in ("attention", "crossattention"):
                if isinstance(getattr(layer, attr).output, APTSelfOutput):
                    setattr(layer, attr, OpFreeMeterAttention(getattr(layer, attr)))
                    folded += 1
    return folded


def _layers(model: nn.Module, stream: str) -> nn.ModuleList:
    return getattr(model, f"cross_modal_{stream}_layers")


@register_backbone("meter")
class MeterSpec(BackboneSpec):
    model_classes = SUPPORTED
    apt_defaults = {"train_log_scale": False, "cls_token_id": 0}  # official: scale frozen; <s> = 0 in RoBERTa

    def load(self, model_dir: str) -> nn.Module:
        from apt_deploy.backbones.registry import read_architecture

        read_architecture(model_dir, SUPPORTED, "import the checkpoint with apt-deploy import --backbone meter")
        return load_meter(model_dir)

    def hidden_size(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def num_layers(self, model: nn.Module) -> int:
        return len(model.cross_modal_text_layers)

    def apt_sites(self, model: nn.Module) -> list[Site]:
        return [Site(f"{s}.layers.{i}.{short}", getattr(layer, attr), "output")
                for s in STREAMS for i, layer in enumerate(_layers(model, s))
                for short, attr in (("self", "attention"), ("cross", "crossattention"))]

    def wrap_apt(self, host: nn.Module, apt: nn.Module) -> nn.Module:
        return APTSelfOutput(host, apt)

    def deep_prompt_sites(self, model: nn.Module) -> list[Site]:
        return [Site(f"{s}.layers.{i}", _layers(model, s), str(i)) for s in STREAMS for i in range(len(_layers(model, s)))]

    def deep_prompt_host(self, layer: nn.Module) -> tuple[nn.Module, str, nn.Module]:
        """(parent of the self-attention core, its attribute, identity: post-LN, the prompt enters un-normalised)."""
        return layer.attention, "self", nn.Identity()

    def opfree_fold_pass(self):
        return fold_meter_apt_opfree

    def insert_cls_embedding(self, model: nn.Module, cls_token_id: int) -> None:
        """token4classifier = RoBERTa's embedding output of the single token ``cls_token_id`` (official init)."""
        with torch.no_grad():
            ids = torch.tensor([[cls_token_id]], device=model.cross_modal_text_transform.weight.device)
            model.token4classifier = nn.Parameter(model.text.embeddings(input_ids=ids).detach().clone())

    def method_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {"text.token4classifier": model.token4classifier} if model.token4classifier is not None else {}

    def trainable_extras(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"head": model.classifier, "pooler.text": model.cross_modal_text_pooler,
                "pooler.image": model.cross_modal_image_pooler, "embeddings.token_type": model.token_type_embeddings}

    def cross_modal_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The official "cross_modal" group: every trained name containing ``cross_modal`` — the APT modules
        (inside cross_modal_*_layers) and both poolers — at lr x lr_mult_cross_modal (5)."""
        return [p for n, p in model.named_parameters() if "cross_modal" in n and p.requires_grad]

    # --- export ----------------------------------------------------------------------------
    def input_specs(self, model: nn.Module, shapes: ShapeSettings) -> list[InputSpec]:
        cfg, t = model.config, shapes.text_len
        size = cfg.image_size
        if shapes.dynamic_image or (shapes.image_size and tuple(shapes.image_size) != (size, size)):
            raise ConfigError(f"image size {shapes.image_size} / dynamic={shapes.dynamic_image}",
                              f"the model's fixed {size}x{size} (the position table is re-gridded at import, not in the graph)",
                              f"re-import with apt-deploy import --image-size N, or drop --image-size / --dynamic-image")
        limit = int(cfg.text["max_position_embeddings"]) - 2
        if not 2 <= t <= limit:
            raise ConfigError(f"text length {t}", f"2..{limit} (RoBERTa's position table minus pad offset)",
                              "pass a smaller --text-len")
        (bmin, bopt, bmax) = shapes.batch
        images = (2, 3, size, size) if cfg.task == "nlvr2" else (3, size, size)
        text = [InputSpec(n, "int64", ("batch", t), (bmin, t), (bopt, t), (bmax, t)) for n in ("input_ids", "attention_mask")]
        return [*text, InputSpec("pixel_values", "float32", ("batch", *images), (bmin, *images), (bopt, *images), (bmax, *images))]

    def output_names(self, model: nn.Module) -> list[str]:
        return ["logits"]

    def dummy_inputs(self, model: nn.Module, specs: list[InputSpec], which: str, seed: int) -> dict[str, torch.Tensor]:
        """RoBERTa layout: <s>=0 first, pad=1 after each row's length (at least one row unpadded)."""
        g = torch.Generator().manual_seed(seed)
        shapes = {s.name: getattr(s, f"{which}_shape") for s in specs}
        b, t = shapes["input_ids"]
        ids = torch.randint(3, model.config.vocab_size, (b, t), generator=g)
        lengths = torch.randint(max(2, t // 2), t + 1, (b,), generator=g)
        lengths[0] = t
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        ids[:, 0] = 0
        ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(shapes["pixel_values"], generator=g)}

    # --- tests -----------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, **kwargs: Any) -> nn.Module:
        torch.manual_seed(seed)
        return MeterModel(tiny_meter_config(**kwargs)).eval()
