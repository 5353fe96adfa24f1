"""Stable Diffusion's export plan: text encoder, UNet and VAE decoder as three :class:`ComponentPlan`s.

Shapes: ``--batch MIN,OPT,MAX`` counts images; the text encoder and the UNet see twice that (classifier-
free guidance runs [unconditional; conditional] as one batch), the VAE decoder sees it as is. Height
and width are dynamic between ``--image-range`` (default: half to 1.5x the model's native size) in
multiples of ``pixel_multiple``; the latent is that divided by the VAE factor. The UNet's timestep is
float32 [B] in every export dtype (the sinusoidal embedding runs in fp32; docs/pitfalls.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones.components import ComponentPlan
from apt_deploy.backbones.registry import InputSpec
from apt_deploy.backbones.sd import StableDiffusionModel, cast_component, check_dtype
from apt_deploy.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
ONNX_DTYPE = {"fp32": "float32", "fp16": "float16"}


class TextEncoderForExport(nn.Module):
    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class UNetForExport(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoderForExport(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


@dataclass(frozen=True)
class Geometry:
    """Batch (images) and latent side ranges, as (min, opt, max)."""

    images: tuple[int, int, int]
    latent_h: tuple[int, int, int]
    latent_w: tuple[int, int, int]
    unit: int  # latent sides are multiples of this


def geometry(model: StableDiffusionModel, settings: Any) -> Geometry:
    """Shapes from ExportSettings: batch from --batch, image sides from --image-size / --image-range."""
    bmin, bopt, bmax = settings.batch_min, settings.batch_opt, settings.batch_max
    if not 1 <= bmin <= bopt <= bmax:
        raise ConfigError(f"batch min/opt/max = {bmin}/{bopt}/{bmax}", "1 <= min <= opt <= max", "fix --batch")
    mult, vae = model.pixel_multiple, model.vae_scale_factor
    opt = settings.image_size or int(model.unet.config.sample_size) * vae
    lo = settings.image_min or max(mult, opt // 2 // mult * mult)
    hi = settings.image_max or -(-opt * 3 // 2 // mult) * mult
    bad = [s for s in (lo, opt, hi) if s % mult]
    if bad or not lo <= opt <= hi:
        raise ConfigError(f"image sides min/opt/max = {lo}/{opt}/{hi}",
                          f"multiples of {mult} with min <= opt <= max (this model's VAE x UNet down-sampling)",
                          f"pass --image-size and --image-range in multiples of {mult}")
    side = (lo // vae, opt // vae, hi // vae)
    return Geometry((bmin, bopt, bmax), side, side, mult // vae)


def _dims(g: Geometry, cfg_batch: bool) -> dict[str, Any]:
    from torch.export import Dim

    b = _batches(g, cfg_batch)
    lo, hi = (g.latent_h[0] // g.unit, g.latent_h[2] // g.unit)
    return {"batch": Dim("batch", min=b[0], max=max(2, b[2])),
            "height": g.unit * Dim("latent_height_units", min=lo, max=hi),
            "width": g.unit * Dim("latent_width_units", min=lo, max=hi)}


def _spec(name: str, dtype: str, axes: tuple, shapes: list[tuple[int, ...]]) -> InputSpec:
    return InputSpec(name, dtype, axes, *shapes)


def _batches(g: Geometry, cfg_batch: bool) -> list[int]:
    """Images (VAE), or the guided batch (text encoder, UNet): min stays (guidance <= 1 runs unguided)."""
    bmin, bopt, bmax = g.images
    return [bmin, 2 * bopt, 2 * bmax] if cfg_batch else [bmin, bopt, bmax]


def component_plans(model: StableDiffusionModel, settings: Any) -> list[ComponentPlan]:
    """The three components of a folded (or plain) model, in run order."""
    g, dtype = geometry(model, settings), check_dtype(settings.dtype)
    fdt = ONNX_DTYPE[dtype]
    return [_text_plan(model, g, dtype), _unet_plan(model, g, dtype, fdt), _vae_plan(model, g, dtype, fdt)]


def _text_plan(model: StableDiffusionModel, g: Geometry, dtype: str) -> ComponentPlan:
    t, vocab = model.text_len, int(model.text_encoder.config.vocab_size)
    inputs = [_spec("input_ids", "int64", ("batch", t), [(b, t) for b in _batches(g, True)])]

    def make(which: str, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab, _shape(inputs[0], which), generator=gen)}

    return ComponentPlan("text_encoder", TextEncoderForExport(cast_component(model.text_encoder, dtype)),
                         TextEncoderForExport(model.text_encoder), inputs, ["last_hidden_state"],
                         {"input_ids": {0: _dims(g, True)["batch"]}}, make)


def _unet_plan(model: StableDiffusionModel, g: Geometry, dtype: str, fdt: str) -> ComponentPlan:
    c, t, d = int(model.unet.config.in_channels), model.text_len, int(model.unet.config.cross_attention_dim)
    bs = _batches(g, True)
    sample_shapes = [(b, c, h, w) for b, h, w in zip(bs, g.latent_h, g.latent_w)]
    inputs = [_spec("sample", fdt, ("batch", c, "height", "width"), sample_shapes),
              _spec("timestep", "float32", ("batch",), [(b,) for b in bs]),
              _spec("encoder_hidden_states", fdt, ("batch", t, d), [(b, t, d) for b in bs])]
    dims = _dims(g, True)

    def make(which: str, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        s, ts, e = (_shape(i, which) for i in inputs)
        return {"sample": torch.randn(s, generator=gen).to(_torch(fdt)),
                "timestep": torch.randint(0, NUM_TRAIN_TIMESTEPS, ts, generator=gen).float(),
                "encoder_hidden_states": torch.randn(e, generator=gen).to(_torch(fdt))}

    return ComponentPlan("unet", UNetForExport(cast_component(model.unet, dtype)), UNetForExport(model.unet), inputs,
                         ["out_sample"], {"sample": {0: dims["batch"], 2: dims["height"], 3: dims["width"]},
                                          "timestep": {0: dims["batch"]}, "encoder_hidden_states": {0: dims["batch"]}},
                         make, check_shapes=("opt", "min", "max"))


def _vae_plan(model: StableDiffusionModel, g: Geometry, dtype: str, fdt: str) -> ComponentPlan:
    c = int(model.vae.config.latent_channels)
    inputs = [_spec("latent_sample", fdt, ("batch", c, "height", "width"),
                    [(b, c, h, w) for b, h, w in zip(g.images, g.latent_h, g.latent_w)])]
    dims = _dims(g, False)

    def make(which: str, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"latent_sample": torch.randn(_shape(inputs[0], which), generator=gen).to(_torch(fdt))}

    return ComponentPlan("vae_decoder", VaeDecoderForExport(cast_component(model.vae, dtype)),
                         VaeDecoderForExport(model.vae), inputs, ["sample"],
                         {"latent_sample": {0: dims["batch"], 2: dims["height"], 3: dims["width"]}}, make)


def _shape(spec: InputSpec, which: str) -> tuple[int, ...]:
    """min/opt/max shape; "export" = opt with the batch at least 2 (a size-1 example is specialised)."""
    if which != "export":
        return tuple(getattr(spec, f"{which}_shape"))
    return tuple(max(2, n) if axis == "batch" else n for axis, n in zip(spec.axes, spec.opt_shape))


def _torch(onnx_dtype: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}[onnx_dtype]
