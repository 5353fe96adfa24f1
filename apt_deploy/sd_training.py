"""Train APT on Stable Diffusion's UNet with the denoising loss (``apt-deploy train --backbone sd``).

1. VAE, text encoder and UNet are frozen; APT processors go on the chosen attentions (backbones/sd.py).
2. Latents and caption embeddings are computed once and cached: images resized (shorter side) and
   centre-cropped to the resolution, scaled to [-1, 1], ``vae.encode(x).latent_dist.sample() * scaling_factor``.
3. Per step: a batch of cached latents, Gaussian noise, uniform timesteps, ``DDPMScheduler.add_noise``
   (configured from the model's own scheduler config); the target is what ``prediction_type`` asks
   for: the noise (``epsilon``) or ``get_velocity`` (``v_prediction``); MSE.
4. AdamW on the APT tensors only (training.build_optimizer: the APT recipe's betas, decay, warm-up).
5. ``eval_loss``: the same loss on a fixed seeded set of (noise, timestep) per example, so before and
   after are comparable (the per-step loss is dominated by the random timestep).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from apt_deploy.errors import ConfigError
from apt_deploy.progress import progress, timed_step
from apt_deploy.settings import TrainSettings
from apt_deploy.training import TrainResult, build_optimizer

log = logging.getLogger(__name__)
ENCODE_BATCH = 8
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class SDTrainResult(TrainResult):
    eval_before: float = 0.0
    eval_after: float = 0.0


@dataclass
class CachedData:
    latents: torch.Tensor  # N x C x h x w, already x scaling_factor
    embeddings: torch.Tensor  # N x T x D


def preprocess(image: Any, resolution: int) -> torch.Tensor:
    """PIL image -> 3 x R x R in [-1, 1]: shorter side resized to R (bicubic), centre crop."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    pixels = np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def cache_data(model: nn.Module, pairs: list[tuple[Any, str]], resolution: int, seed: int) -> CachedData:
    """Latents (one VAE posterior sample each, seeded) and caption embeddings, computed once."""
    from apt_deploy.backbones.sd import tokenize

    g = torch.Generator().manual_seed(seed)
    latents, embeddings = [], []
    with torch.no_grad():
        for i in range(0, len(pairs), ENCODE_BATCH):
            chunk = pairs[i:i + ENCODE_BATCH]
            pixels = torch.stack([preprocess(img, resolution) for img, _ in chunk])
            posterior = model.vae.encode(pixels).latent_dist
            latents.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g))
            ids = torch.from_numpy(tokenize(model.tokenizer, [c for _, c in chunk], model.text_len))
            embeddings.append(model.text_encoder(ids, return_dict=False)[0])
    return CachedData(torch.cat(latents) * model.vae.config.scaling_factor, torch.cat(embeddings))


def noise_scheduler(model: nn.Module) -> Any:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(model.scheduler.config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler prediction_type {scheduler.config.prediction_type!r}",
                          f"one of {', '.join(PREDICTION_TYPES)}", "train a model whose scheduler predicts noise or v")
    return scheduler


def denoising_loss(model: nn.Module, scheduler: Any, latents: torch.Tensor, embeddings: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    prediction = model.unet(noisy, timesteps, embeddings, return_dict=False)[0]
    return nn.functional.mse_loss(prediction, target)


def eval_loss(model: nn.Module, scheduler: Any, data: CachedData, seed: int = 1234, batch: int = 16) -> float:
    """The denoising loss over every example with a fixed (seeded) noise and timestep each."""
    g = torch.Generator().manual_seed(seed)
    n = data.latents.shape[0]
    noise = torch.randn(data.latents.shape, generator=g)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            s = slice(i, i + batch)
            total += float(denoising_loss(model, scheduler, data.latents[s], data.embeddings[s], noise[s], steps[s])) * len(steps[s])
    return total / n


def train_sd_apt(model: nn.Module, data: CachedData, settings: TrainSettings) -> SDTrainResult:
    """AdamW on the APT tensors with the denoising loss (module docstring, steps 3-5)."""
    scheduler = noise_scheduler(model)
    optimizer, lr_schedule = build_optimizer(model, settings)
    g = torch.Generator().manual_seed(settings.seed)
    result = SDTrainResult(eval_before=eval_loss(model, scheduler, data))
    n, t0 = data.latents.shape[0], time.perf_counter()
    model.unet.train()
    for _ in progress(range(settings.steps), total=settings.steps, desc="train sd"):
        idx = torch.randint(0, n, (min(settings.batch_size, n),), generator=g)
        latents = data.latents[idx]
        noise = torch.randn(latents.shape, generator=g)
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        loss = denoising_loss(model, scheduler, latents, data.embeddings[idx], noise, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        result.losses.append(loss.item())
    model.unet.eval()
    result.seconds = time.perf_counter() - t0
    result.eval_after = eval_loss(model, scheduler, data)
    return result


def train_from_args(args: argparse.Namespace, settings: TrainSettings) -> int:
    """1. load the model and data  2. apply APT  3. cache latents  4. train  5. save the prompts."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.sd import apply_sd_apt
    from apt_deploy.checkpoint import save_prompts
    from apt_deploy.data.captioned_images import read_captioned_images
    from apt_deploy.methods.apt import APTConfig

    if not args.data:
        raise ConfigError("apt-deploy train --backbone sd is missing --data", "a captions JSONL or a captioned image folder",
                          "pass --data PATH")
    model = get_backbone("sd").load(args.model)
    pairs = read_captioned_images(args.data)
    apply_sd_apt(model, APTConfig(prompt_len=args.prompt_len, rank=args.rank), args.sites)
    resolution = args.resolution or int(model.unet.config.sample_size) * model.vae_scale_factor
    with timed_step(f"cache latents and caption embeddings of {len(pairs)} images at {resolution}px"):
        data = cache_data(model, pairs, resolution, settings.seed)
    result = train_sd_apt(model, data, settings)
    save_prompts(model, args.out, overwrite=args.overwrite)
    log.info("summary: APT on %s (%s), %d steps in %.1f s, eval denoising loss %.4f -> %.4f, saved to %s", args.model,
             args.sites, result.steps, result.seconds, result.eval_before, result.eval_after, args.out)
    return 0
