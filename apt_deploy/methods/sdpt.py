"""SDPT (Synchronous Dual Prompt Tuning, ECCV'24) on a bi-directional fusion attention (GLIP / Grounding DINO).

Official formulation (specs/sdpt-grounding-dino.md, ``vpt_only = -4``), per fusion layer: k trainable
"unified prototype tokens" P in the fusion space (k x E, init uniform(-1, 1)) are mapped into the
image space by the least-squares inverse of the frozen image query projection, bias included:
x_v = (P - b_v) pinv(W_vᵀ) (k x d); x_v is appended to the image tokens (a text-side copy to the text
tokens) after the block's LayerNorm, all projections run on the extended sequences, the k extra output
rows are dropped, and the text-side copies are masked for image queries. Net effect, exactly: text
queries attend over [image keys; scale * vision_proj(x_v)] with values [image values;
values_vision_proj(x_v)]; image queries and the text-side copies are unchanged / inert.

Here that net effect is computed directly (:func:`fusion_attention_with_prototypes`) from per-layer
prototype keys/values (H, k, hd). Training form (:class:`SDPTFusionAttention`): K_p, V_p are recomputed
differentiably from P each forward (pseudo-inverse of the detached weight, as the official code does).
Inference form (:class:`FoldedSDPTFusionAttention`): K_p, V_p are buffers (ONNX initializers); no
pseudo-inverse, no extra tokens, any batch size. Both reproduce transformers'
GroundingDinoBiMultiHeadAttention numerics (global max shift, +-50000 clamps, -inf image padding).

Variants: "sdpt" trains the prototypes only (the paper's parameter claim); "sdpt+head" also trains
the box head (closest to the released command, which leaves the detection head trainable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

CLAMP = 50000.0  # transformers' (and GLIP's) clamp of the fusion logits


@dataclass(frozen=True)
class SDPTConfig:
    """``tokens``: prototypes per fusion layer (README: 700 on GLIP-L; the paper's 0.04 % implies ~10).
    ``train_head``: the "sdpt+head" variant. ``seed``: the prototypes' uniform(-1, 1) init."""

    tokens: int = 8
    train_head: bool = False
    seed: int = 0
    init_range: float = 1.0

    def __post_init__(self) -> None:
        from apt_deploy.errors import ConfigError

        if self.tokens < 1 or self.init_range <= 0:
            raise ConfigError(f"tokens={self.tokens}, init_range={self.init_range}", "tokens >= 1, init_range > 0",
                              "pass --tokens N with N >= 1")

    @property
    def method(self) -> str:
        return "sdpt+head" if self.train_head else "sdpt"


def inverse_projection(prototypes: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """x = (P - b) pinv(Wᵀ): the least-squares pre-image of P under the frozen ``linear`` (no gradient to W, b)."""
    weight, bias = linear.weight.detach(), linear.bias.detach()
    return (prototypes - bias) @ torch.linalg.pinv(weight.t())


def prototype_kv(attn: nn.Module, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer prototype keys (scaled like image queries) and values, each (H, k, head_dim)."""
    x = inverse_projection(prototypes, attn.vision_proj)
    k = (attn.vision_proj(x) * attn.scale).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
    v = attn.values_vision_proj(x).view(-1, attn.num_heads, attn.head_dim).transpose(0, 1)
    return k, v


def fusion_attention_with_prototypes(attn: nn.Module, vision: torch.Tensor, text: torch.Tensor,
                                     proto_k: torch.Tensor, proto_v: torch.Tensor,
                                     vision_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None):
    """GroundingDinoBiMultiHeadAttention.forward with k extra keys/values for the text queries only.

    ``vision_mask`` / ``text_mask``: True = padding (transformers' convention). Returns
    ``((vision_out, vision_weights), (text_out, text_weights))`` like the wrapped module; the text
    weights have Nv + k columns (the prototypes last)."""
    b, nv, _ = vision.shape
    h, hd = attn.num_heads, attn.head_dim
    q_v = attn.vision_proj(vision).mul(attn.scale).view(b, nv, h, hd).transpose(1, 2)  # (B,H,Nv,hd)
    k_t = attn.text_proj(text).view(b, -1, h, hd).transpose(1, 2)  # (B,H,Nt,hd)
    v_v = attn.values_vision_proj(vision).view(b, nv, h, hd).transpose(1, 2)
    v_t = attn.values_text_proj(text).view(b, -1, h, hd).transpose(1, 2)
    logits = q_v @ k_t.transpose(-1, -2)  # (B,H,Nv,Nt)
    shift = logits.max()
    logits = (logits - shift).clamp(-CLAMP, CLAMP)
    text_logits = logits.transpose(-1, -2)  # (B,H,Nt,Nv)
    proto_logits = ((k_t @ proto_k.transpose(-1, -2).to(k_t.dtype)) - shift).clamp(-CLAMP, CLAMP)  # (B,H,Nt,k)
    row_max = torch.maximum(text_logits.amax(-1, keepdim=True), proto_logits.amax(-1, keepdim=True))
    text_logits = (text_logits - row_max).clamp(-CLAMP, CLAMP)
    proto_logits = (proto_logits - row_max).clamp(-CLAMP, CLAMP)
    if vision_mask is not None:
        text_logits = text_logits.masked_fill(vision_mask[:, None, None, :], float("-inf"))
    weights = torch.cat([text_logits, proto_logits], -1).softmax(-1)
    probs = F.dropout(weights, p=attn.dropout, training=attn.training)
    text_out = probs[..., :nv] @ v_v + probs[..., nv:] @ proto_v.to(v_v.dtype)
    if text_mask is not None:
        logits = logits.masked_fill(text_mask[:, None, None, :], float("-inf"))
    vision_weights = logits.softmax(-1)
    vision_out = F.dropout(vision_weights, p=attn.dropout, training=attn.training) @ v_t
    vision_out = attn.out_vision_proj(vision_out.transpose(1, 2).reshape(b, nv, attn.embed_dim))
    text_out = attn.out_text_proj(text_out.transpose(1, 2).reshape(b, -1, attn.embed_dim))
    return (vision_out, vision_weights.flatten(0, 1)), (text_out, weights.flatten(0, 1))


class SDPTFusionAttention(nn.Module):
    """Training form: wraps a frozen bi-attention; ``prototypes`` (k x E) is the only new parameter."""

    def __init__(self, attn: nn.Module, config: SDPTConfig) -> None:
        super().__init__()
        self.attn = attn
        g = torch.Generator().manual_seed(config.seed)
        init = (torch.rand(config.tokens, attn.embed_dim, generator=g) * 2 - 1) * config.init_range
        self.prototypes = nn.Parameter(init.to(attn.vision_proj.weight.dtype))

    @property
    def embed_dim(self) -> int:
        return int(self.attn.embed_dim)

    def prototype_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return prototype_kv(self.attn, self.prototypes)

    def forward(self, vision_features: torch.Tensor, text_features: torch.Tensor,
                vision_attention_mask: torch.Tensor | None = None, text_attention_mask: torch.Tensor | None = None):
        k, v = self.prototype_kv()
        return fusion_attention_with_prototypes(self.attn, vision_features, text_features, k, v,
                                                vision_attention_mask, text_attention_mask)

    def fold(self) -> FoldedSDPTFusionAttention:
        with torch.no_grad():
            k, v = self.prototype_kv()
        return FoldedSDPTFusionAttention(self.attn, k.detach().clone(), v.detach().clone())


class FoldedSDPTFusionAttention(nn.Module):
    """Inference form: the prototypes' keys/values as constants (H, k, head_dim)."""

    def __init__(self, attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.attn = attn
        self.register_buffer("proto_k", k)
        self.register_buffer("proto_v", v)

    @property
    def embed_dim(self) -> int:
        return int(self.attn.embed_dim)

    def forward(self, vision_features: torch.Tensor, text_features: torch.Tensor,
                vision_attention_mask: torch.Tensor | None = None, text_attention_mask: torch.Tensor | None = None):
        return fusion_attention_with_prototypes(self.attn, vision_features, text_features, self.proto_k, self.proto_v,
                                                vision_attention_mask, text_attention_mask)


def insert_sdpt(fusion_layers: list[nn.Module], config: SDPTConfig) -> None:
    """Wrap each fusion layer's ``attn`` (one independent prototype set per layer, seeds seed, seed+1, ...)."""
    from dataclasses import replace

    for i, layer in enumerate(fusion_layers):
        layer.attn = SDPTFusionAttention(layer.attn, replace(config, seed=config.seed + i))


def fold_sdpt_layers(model: nn.Module) -> int:
    """Replace every :class:`SDPTFusionAttention` in ``model`` by its folded form; returns how many."""
    parents = [(m, name) for m in model.modules() for name, c in m.named_children() if isinstance(c, SDPTFusionAttention)]
    for parent, name in parents:
        setattr(parent, name, getattr(parent, name).fold())
    return len(parents)
