"""``apt-deploy demo --backbone sd``: the Stable Diffusion job end to end on a built-in default.

A small RANDOM-WEIGHT Stable Diffusion is built in-process (diffusers' test configs; no weights are
reachable here), so the images are noise-like and say nothing about APT's quality on a real model:
the demo shows that every stage runs and agrees.

1. build the model and a synthetic captioned image set (data/synthetic_shapes.py);
2. APT on the UNet's cross-attention, trained with the denoising loss (fixed-seed eval loss before/after);
3. save the prompts, fold, export the three components (each validated on ONNX Runtime);
4. generate an image through ONNX Runtime and compare it with diffusers' StableDiffusionPipeline
   running the trained (training-form) UNet, same seed;
5. per-step UNet latency on ONNX Runtime: APT vs the same graph with the APT nodes bypassed, interleaved.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
RANDOM_WEIGHTS = ("Demo Stable Diffusion has RANDOM WEIGHTS (no pretrained weights are reachable here): the image is "
                  "noise-like; the demo shows that training, folding, export and generation run and agree, not quality.")


@dataclass(frozen=True)
class SDDemoSettings:
    workdir: str = "apt-deploy-demo-sd"
    size: str = "tiny"  # backbones/sd_tiny.py: "tiny" (~0.1 s/step on 1 core) or "small" (~1.2 s/step)
    steps: int = 300
    batch_size: int = 4
    lr: float = 5e-3
    num_images: int = 64
    prompt_len: int = 16
    rank: int = 4
    sites: str = "attn2"
    sample_steps: int = 10
    latency_iterations: int = 50
    seed: int = 0


def run_sd_demo(settings: SDDemoSettings = SDDemoSettings()) -> dict[str, Any]:
    """Steps 1-5 (module docstring); returns the summary (also WORKDIR/summary.json)."""
    import torch

    work = Path(settings.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log.warning(RANDOM_WEIGHTS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread hand-off dominates on 2 cores (docs/pitfalls.md 15)
    try:
        return _run(work, settings)
    finally:
        torch.set_num_threads(threads)


def _run(work: Path, settings: SDDemoSettings) -> dict[str, Any]:
    from apt_deploy.fileio import write_json_atomic

    summary: dict[str, Any] = {"settings": asdict(settings), "note": RANDOM_WEIGHTS}
    model, model_dir, pairs = _build(work, settings)                                  # 1
    prompts = _train(model, pairs, work, settings, summary)                           # 2
    artifact = _export(model_dir, prompts, work, summary)                             # 3
    summary["generate"] = _generate(artifact, model_dir, prompts, work, settings)     # 4
    summary["latency"] = _latency(artifact, settings)                                 # 5
    write_json_atomic(work / "summary.json", summary)
    return summary


def _build(work: Path, settings: SDDemoSettings) -> tuple[Any, Path, list]:
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.sd import save_sd
    from apt_deploy.data.synthetic_shapes import STYLES, make_caption_pairs
    from apt_deploy.progress import timed_step

    with timed_step(f"build a random-weight {settings.size} Stable Diffusion and {settings.num_images} captioned images"):
        model = get_backbone("sd").build_tiny(seed=settings.seed, size=settings.size)
        model_dir = save_sd(model, _fresh(work / "base_model"))
        side = int(model.unet.config.sample_size) * model.vae_scale_factor
        pairs = make_caption_pairs(STYLES[:2], settings.num_images, seed=settings.seed, size=side)
    return model, model_dir, pairs


def _train(model: Any, pairs: list, work: Path, settings: SDDemoSettings, summary: dict[str, Any]) -> Path:
    import apt_deploy as ad
    from apt_deploy.backbones.sd import apply_sd_apt
    from apt_deploy.sd_training import cache_data, train_sd_apt
    from apt_deploy.settings import TrainSettings

    total = sum(p.numel() for p in model.parameters())
    apply_sd_apt(model, ad.APTConfig(prompt_len=settings.prompt_len, rank=settings.rank), settings.sites)
    side = int(model.unet.config.sample_size) * model.vae_scale_factor
    data = cache_data(model, pairs, side, settings.seed)
    result = train_sd_apt(model, data, TrainSettings(steps=settings.steps, batch_size=settings.batch_size,
                                                     lr=settings.lr, seed=settings.seed))
    summary["training"] = {"model_parameters": total, "apt_parameters": ad.trainable_parameters(model),
                           "images": len(pairs), "steps": result.steps, "seconds": result.seconds,
                           "eval_loss_before": result.eval_before, "eval_loss_after": result.eval_after,
                           "loss_first": result.mean_loss(first=True), "loss_last": result.mean_loss()}
    return ad.save_prompts(model, work / "prompts", overwrite=True)


def _export(model_dir: Path, prompts: Path, work: Path, summary: dict[str, Any]) -> Path:
    from apt_deploy.manifest import read_manifest
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    source = {"model_dir": str(model_dir.resolve()), "prompts_dir": str(prompts.resolve())}
    artifact = export_artifact(load_trained(model_dir, prompts), work / "artifact",
                               ExportSettings(batch_max=2, overwrite=True), source=source)
    manifest = read_manifest(artifact)
    summary["export"] = {"artifact": str(artifact), "fused_nodes": manifest["fused_op_count"],
                         "components": {c["name"]: _worst(c["validation"]) for c in manifest["components"]},
                         "training_vs_folded": max(c["validation"]["training_vs_folded"]["runs"][0]["outputs"][0]["max_abs"]
                                                   for c in manifest["components"])}
    return artifact


def _worst(validation: dict[str, Any]) -> float:
    return max(o["max_abs"] for r in validation["onnxruntime_vs_torch"]["runs"] for o in r["outputs"])


def _generate(artifact: Path, model_dir: Path, prompts: Path, work: Path, settings: SDDemoSettings) -> dict[str, Any]:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from apt_deploy.generate import generate, save_images
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import GenerateSettings

    gen = GenerateSettings(prompt="a filled circle", steps=settings.sample_steps, seed=settings.seed)
    ours = generate(artifact, gen)
    image = save_images(ours.images, work / "image.png", overwrite=True)[0]
    model = load_trained(model_dir, prompts)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=model.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    side = ours.images.shape[1]
    with torch.no_grad():
        reference = pipe(gen.prompt, height=side, width=side, num_inference_steps=gen.steps, guidance_scale=gen.guidance,
                         generator=torch.Generator("cpu").manual_seed(gen.seed), output_type="np").images
    return {"image": str(image), "prompt": gen.prompt, "steps": gen.steps, "size": side,
            "max_abs_vs_diffusers": float(np.abs(ours.images - reference).max()),
            "seconds": {k: round(v, 4) for k, v in ours.seconds.items()}}


def _latency(artifact: Path, settings: SDDemoSettings) -> dict[str, Any]:
    from apt_deploy.manifest import read_manifest
    from apt_deploy.progress import timed_step
    from engines.bench import build_feed
    from engines.graph_edit import bypass_fused_nodes
    from engines.runners import OnnxRuntimeRunner
    from engines.timing import ratio_table, summarize, time_interleaved

    unet = artifact / "unet"
    bypassed = bypass_fused_nodes(unet / "model.onnx", unet / "model.base.onnx")
    feed = build_feed(read_manifest(unet), batch=2, seed=settings.seed)
    runners = [OnnxRuntimeRunner(unet / "model.base.onnx", name="base"), OnnxRuntimeRunner(unet / "model.onnx", name="apt")]
    with timed_step(f"UNet step latency, base vs APT interleaved, {settings.latency_iterations} iterations"):
        times = time_interleaved(runners, [feed, feed], settings.latency_iterations, warmup=3)
    stats = {r.name: summarize(t) for r, t in zip(runners, times)}
    return {"component": "unet", "batch": 2, "bypassed_nodes": bypassed, "stats": stats, "p50_ratio": ratio_table(stats)}


def _fresh(path: Path) -> Path:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path
