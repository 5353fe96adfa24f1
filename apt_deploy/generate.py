"""Text-to-image from a Stable Diffusion artifact (``apt-deploy generate``): the exported components on
any runner backend, diffusers' scheduler classes in the loop, numpy between them.

Steps (``generate``), the same as diffusers' ``StableDiffusionPipeline.__call__`` so that, for the
same seed, the images agree (tested, tiny fp32 models, <= 1e-4):
1. read the manifest, check the component directories, sizes and the scheduler;
2. tokenise ``[negative] * N + [prompt] * N`` (padded to the text length, truncated with a warning)
   and run the text encoder once (the unconditional half only when guidance > 1);
3. initial latents ``torch.randn((N, C, H/f, W/f), generator=manual_seed(seed)) * init_noise_sigma``;
4. per step: ``scale_model_input``, the UNet on ``[x; x]``, ``u + g (c - u)``, ``scheduler.step``;
5. the VAE decoder on ``latents / scaling_factor``; pixels ``clip(x / 2 + 0.5, 0, 1)`` as N x H x W x 3.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import ConfigError, InputPathError
from apt_deploy.manifest import read_manifest
from apt_deploy.progress import progress
from apt_deploy.settings import GenerateSettings

log = logging.getLogger(__name__)
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler"}


@dataclass
class GenerateResult:
    images: np.ndarray  # N x H x W x 3, float32 in [0, 1]
    seconds: dict[str, float] = field(default_factory=dict)  # per component (+ "scheduler", "total")
    calls: dict[str, int] = field(default_factory=dict)


class SDArtifact:
    """An exported Stable Diffusion artifact: its manifest, component runners, tokenizer and scheduler config."""

    def __init__(self, directory: str | Path, backend: str = "onnxruntime", threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if "components" not in self.manifest or self.manifest.get("backbone") != "sd":
            raise ConfigError(f"artifact {str(self.directory)!r} is a {self.manifest.get('backbone')!r} artifact",
                              "a Stable Diffusion artifact (apt-deploy export --backbone sd)", "pass an sd artifact")
        self.components = {c["name"]: c for c in self.manifest["components"]}
        self._check_files()
        self.sd = self.manifest["sd"]
        self.runners = {name: _make_runner(backend, self.directory, self.manifest, name, threads) for name in COMPONENTS}
        self.dtypes = {name: {i["name"]: np.dtype(i["dtype"]) for i in self.components[name]["inputs"]} for name in COMPONENTS}

    def _check_files(self) -> None:
        expected = [self.components.get(n, {}).get("path", n) for n in COMPONENTS] + list(self.manifest["assets"].values())
        missing = [p for p in expected if not (self.directory / p).is_dir()]
        if missing or set(COMPONENTS) - set(self.components):
            raise InputPathError(f"artifact {str(self.directory)!r} lacks the component directories {missing}",
                                 f"{', '.join(expected)} beside manifest.json", "re-export the artifact (apt-deploy export)")

    def image_range(self) -> tuple[int, int, int]:
        """(min, opt, max) image side the UNet was exported and validated for."""
        sample = next(i for i in self.components["unet"]["inputs"] if i["name"] == "sample")
        f = self.sd["vae_scale_factor"]
        return sample["min_shape"][2] * f, sample["opt_shape"][2] * f, sample["max_shape"][2] * f

    def tokenizer(self) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(self.directory / self.manifest["assets"]["tokenizer"]), local_files_only=True)

    def scheduler(self, choice: str | None) -> Any:
        import diffusers

        from apt_deploy.fileio import read_json

        config = dict(read_json(self.directory / self.manifest["assets"]["scheduler"] / "scheduler_config.json",
                                "scheduler config", "the artifact's scheduler/scheduler_config.json", "re-export"))
        _pipeline_config_fixes(config)
        name = SCHEDULER_CLASSES[choice] if choice else config.get("_class_name", "DDIMScheduler")
        return getattr(diffusers, name).from_config(config)

    def run(self, name: str, feed: dict[str, np.ndarray], timer: dict[str, float]) -> np.ndarray:
        t0 = time.perf_counter()
        cast = {k: np.ascontiguousarray(v, dtype=self.dtypes[name][k]) for k, v in feed.items()}
        out = next(iter(self.runners[name].infer(cast).values()))
        timer[name] += time.perf_counter() - t0
        return out.astype(np.float32)

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()


def _pipeline_config_fixes(config: dict[str, Any]) -> None:
    """The two scheduler-config corrections StableDiffusionPipeline.__init__ applies (docs/pitfalls.md):
    ``steps_offset`` 1 and ``clip_sample`` False. Without them the timesteps (or x0) differ from diffusers'."""
    for key, value in (("steps_offset", 1), ("clip_sample", False)):
        if key in config and config[key] != value:
            log.warning("scheduler config has %s=%s; using %s as StableDiffusionPipeline does", key, config[key], value)
            config[key] = value


def _make_runner(backend: str, directory: Path, manifest: dict[str, Any], name: str, threads: int | None) -> Any:
    from engines.runners import make_runner

    comp_dir = directory / name
    if backend == "torch-cuda":
        return make_runner(backend, comp_dir, load_model=_component_loader(manifest, name))
    return make_runner(backend, comp_dir, threads=threads)


def _component_loader(manifest: dict[str, Any], name: str) -> Callable[[], Any]:
    """For torch-cuda: the folded fp32 component the artifact came from (needs the source directories)."""

    def load() -> Any:
        import dataclasses

        from torch import nn

        from apt_deploy.backbones import get_backbone
        from apt_deploy.pipeline import load_folded_from_manifest
        from apt_deploy.settings import ExportSettings

        folded = load_folded_from_manifest(manifest)
        settings = dataclasses.replace(ExportSettings(**{k: v for k, v in manifest["export_settings"].items()}), dtype="fp32")
        plan = next(p for p in get_backbone("sd").export_components(folded, settings) if p.name == name)

        class AsList(nn.Module):
            def __init__(self, module: nn.Module) -> None:
                super().__init__()
                self.module = module

            def forward(self, **feed: Any) -> list[Any]:
                return [self.module(**feed)]

        return AsList(plan.reference)

    return load


def check_size(art: SDArtifact, height: int, width: int) -> None:
    lo, _, hi = art.image_range()
    mult = art.sd["pixel_multiple"]
    for name, side in (("height", height), ("width", width)):
        if side % mult or not lo <= side <= hi:
            raise ConfigError(f"--{name} {side}", f"a multiple of {mult} in [{lo}, {hi}] (the sizes the UNet was "
                              "exported and validated for)", "pass a size in that range, or re-export with --image-range")


def generate(artifact: str | Path | SDArtifact, settings: GenerateSettings) -> GenerateResult:
    """Images for ``settings.prompt`` (module docstring)."""
    import torch

    art = artifact if isinstance(artifact, SDArtifact) else SDArtifact(artifact, settings.backend, settings.threads)
    _, opt, _ = art.image_range()
    height, width = settings.height or opt, settings.width or opt
    check_size(art, height, width)                                                        # 1
    scheduler, timer, t_start = art.scheduler(settings.scheduler), defaultdict(float), time.perf_counter()
    guided = settings.guidance > 1.0 and art.sd["guidance"]
    n = settings.batch
    prompts = ([settings.negative_prompt] * n if guided else []) + [settings.prompt] * n
    from apt_deploy.backbones.sd import tokenize

    embeddings = art.run("text_encoder", {"input_ids": tokenize(art.tokenizer(), prompts, art.sd["text_len"])}, timer)  # 2
    f = art.sd["vae_scale_factor"]
    shape = (n, art.sd["latent_channels"], height // f, width // f)
    scheduler.set_timesteps(settings.steps)  # before init_noise_sigma, which depends on it (Euler)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(settings.seed), dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma                                         # 3
    for t in progress(scheduler.timesteps, total=len(scheduler.timesteps), desc="denoising"):  # 4
        latents = _step(art, scheduler, latents, t, embeddings, settings.guidance if guided else None, timer)
    decoded = art.run("vae_decoder", {"latent_sample": (latents / art.sd["vae_scaling_factor"]).numpy()}, timer)  # 5
    images = np.clip(decoded / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    timer["total"] = time.perf_counter() - t_start
    calls = {"text_encoder": 1, "unet": settings.steps, "vae_decoder": 1}
    return GenerateResult(images.astype(np.float32), dict(timer), calls)


def _step(art: SDArtifact, scheduler: Any, latents: Any, t: Any, embeddings: np.ndarray, guidance: float | None,
          timer: dict[str, float]) -> Any:
    import torch

    model_in = torch.cat([latents] * 2) if guidance is not None else latents
    model_in = scheduler.scale_model_input(model_in, t)
    timestep = np.full(model_in.shape[0], float(t), np.float32)
    noise = art.run("unet", {"sample": model_in.numpy(), "timestep": timestep, "encoder_hidden_states": embeddings}, timer)
    if guidance is not None:
        uncond, cond = np.split(noise, 2)
        noise = uncond + guidance * (cond - uncond)
    t0 = time.perf_counter()
    out = scheduler.step(torch.from_numpy(noise), t, latents, return_dict=False)[0]
    timer["scheduler"] += time.perf_counter() - t0
    return out


def image_paths(out: str | Path, count: int) -> list[Path]:
    out = Path(out)
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def refuse_existing_images(paths: list[Path], overwrite: bool) -> None:
    from apt_deploy.errors import OutputExistsError

    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"output image {existing[0]!r} already exists", "a path that does not exist yet",
                                "choose another --out or pass --overwrite")


def save_images(images: np.ndarray, out: str | Path, overwrite: bool = False) -> list[Path]:
    """PNG per image, atomically: ``out`` for one image, ``<stem>-<i><suffix>`` for several."""
    import io

    from PIL import Image

    from apt_deploy.fileio import write_bytes_atomic

    paths = image_paths(out, len(images))
    refuse_existing_images(paths, overwrite)
    for image, path in zip(images, paths):
        buffer = io.BytesIO()
        Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format="PNG")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, buffer.getvalue())
    return paths
