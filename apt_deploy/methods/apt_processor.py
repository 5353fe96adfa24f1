"""APT as a diffusers attention processor (Stable Diffusion's UNet, backbones/sd.py).

diffusers' ``BasicTransformerBlock`` calls ``attn(norm_hidden_states, ...)`` and adds the residual
outside the attention, so inside a processor ``hidden_states`` is the LayerNorm output (APT's x_in)
and the processor's return value, ``to_out[1](to_out[0](attention))``, is APT's o. The training form
computes o with diffusers' own ``AttnProcessor2_0`` and returns ``y = e^s (o + w * A P)``; the folded
form has e^s folded into ``to_out[0]`` (W_o, b_o) and calls the fused op with constants K and V.

Both processors are ``nn.Module``s, so ``Attention.set_processor`` registers their tensors and they
show up in ``unet.parameters()`` / ``state_dict()`` (the mechanism IP-Adapter and Custom Diffusion use).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from apt_deploy.errors import ConfigError
from apt_deploy.methods.apt import APTModule, scaled_linear


def check_apt_host(name: str, attn: nn.Module) -> int:
    """The attention's hidden size, after checking APT's assumptions hold for it (3-D tokens in, the
    residual added outside, no output rescale, same width in and out)."""
    width_in, width_out = attn.to_q.in_features, attn.to_out[0].out_features
    problems = [text for bad, text in (
        (attn.residual_connection, "residual_connection=True"),
        (attn.rescale_output_factor != 1.0, f"rescale_output_factor={attn.rescale_output_factor}"),
        (getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None,
         "a spatial/group norm inside the attention (4-D input)"),
        (width_in != width_out, f"query width {width_in} != output width {width_out}"),
    ) if bad]
    if problems:
        raise ConfigError(f"attention {name!r} has {', '.join(problems)}",
                          "a transformer-block attention (LayerNorm outside, residual outside, 3-D tokens)",
                          "place APT only on the UNet's transformer blocks (attn1 / attn2)")
    return int(width_out)


def _base_processor() -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


class APTAttnProcessor(nn.Module):
    """Training form: o from diffusers' AttnProcessor2_0, then ``self.apt(x_in=hidden_states, o)``."""

    def __init__(self, apt: APTModule) -> None:
        super().__init__()
        self.apt = apt
        self.base = _base_processor()  # plain object (not a Module): holds no tensors

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        o = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.apt(hidden_states, o)

    def fold_apt(self, attn: nn.Module) -> FoldedAPTAttnProcessor:
        """The inference form. ``attn`` (the host, part of a model copy being folded) gets e^s folded into
        ``to_out[0]`` in place."""
        k, v, scale = self.apt.folded_constants()
        attn.to_out[0] = scaled_linear(attn.to_out[0], scale)
        return FoldedAPTAttnProcessor(k, v)


class FoldedAPTAttnProcessor(nn.Module):
    """Inference form: o (e^s already in ``to_out[0]``), then ``torch.ops.apt.approx_prompt_diffusion``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("k", k)
        self.register_buffer("v", v)
        self.base = _base_processor()

    def forward(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        from apt_deploy.ops import torch_op  # noqa: F401  (registers torch.ops.apt)

        o = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return torch.ops.apt.approx_prompt_diffusion(hidden_states, o, self.k, self.v)
