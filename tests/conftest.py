"""Shared fixtures: seeded tiny models, their directories, and one exported artifact per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("APT_DEPLOY_NO_PROGRESS", "1")


def randomize_method(model, seed: int = 0) -> None:
    """Give every trained tensor non-trivial values (fresh APT has log_scale=0 and K ~ P, since W_up W_dn is
    tiny at init std 0.02, which would make e^s == 1 and hide folding mistakes)."""
    import torch

    from apt_deploy.checkpoint import trained_tensors

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained_tensors(model).items():
            if name.endswith(".log_scale"):
                p.fill_(0.25)
            elif name.endswith(".up") or name.endswith(".prompt"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def tiny_method_model(method: str = "apt", seed: int = 0, prompt_len: int = 6, rank: int = 2, **tiny):
    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone

    model = get_backbone("vilt").build_tiny(seed=seed, **tiny)
    config = ad.APTConfig(prompt_len=prompt_len, rank=rank, method=method)
    (ad.apply_apt if method == "apt" else ad.apply_deep_prompt)(model, config)
    randomize_method(model, seed)
    return model


@pytest.fixture
def apt_model():
    return tiny_method_model("apt")


@pytest.fixture
def deep_model():
    return tiny_method_model("deep_prompt")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny base model and APT / deep-prompt checkpoints trained (randomized) on it."""
    from apt_deploy import save_prompts
    from apt_deploy.backbones import get_backbone

    root = tmp_path_factory.mktemp("tiny")
    get_backbone("vilt").build_tiny(seed=0).save_pretrained(root / "model")
    for method in ("apt", "deep_prompt"):
        save_prompts(tiny_method_model(method), root / f"prompts_{method}")
    return {"root": root, "model": root / "model", "apt": root / "prompts_apt", "deep_prompt": root / "prompts_deep_prompt"}


@pytest.fixture(scope="session")
def apt_artifact(tiny_dirs) -> Path:
    """One exported APT artifact for the session (export costs seconds)."""
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    model = load_trained(tiny_dirs["model"], tiny_dirs["apt"])
    source = {"model_dir": str(tiny_dirs["model"]), "prompts_dir": str(tiny_dirs["apt"])}
    return export_artifact(model, tiny_dirs["root"] / "artifact_apt", ExportSettings(batch_max=4), source=source)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread on the 2-core CI box (thread hand-off dominates)."""
    import torch

    from tests.clip_helpers import single_thread

    before = single_thread()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A saved tiny CLIP (model, offline tokenizer, image processor)."""
    from apt_deploy.backbones.clip import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "model", seed=0)


@pytest.fixture(scope="session")
def vqa_artifact(tmp_path_factory) -> Path:
    """A tiny APT ViLT VQA artifact exported from a model directory WITH its processor (tokenizer + image
    processor), so it carries its inference assets (serving tests: predict, triton-repo, serve)."""
    from apt_deploy import save_prompts
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from apt_deploy.tiny import save_tiny_vilt
    from exporters.onnx_export import export_artifact

    root = tmp_path_factory.mktemp("vqa")
    model_dir = save_tiny_vilt(root / "model", seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=16, image_size=32, patch_size=16,
                               max_image_length=-1)
    model = load_trained_or_apply(model_dir)
    save_prompts(model, root / "prompts")
    source = {"model_dir": str(model_dir), "prompts_dir": str(root / "prompts")}
    return export_artifact(load_trained(model_dir, root / "prompts"), root / "artifact", ExportSettings(batch_max=8),
                           source=source)


def load_trained_or_apply(model_dir: Path):
    """The tiny ViLT in ``model_dir`` with APT applied and randomized (what training would leave)."""
    import apt_deploy as ad

    model = ad.get_backbone("vilt").load(str(model_dir))
    ad.apply_apt(model, ad.APTConfig(prompt_len=6, rank=2))
    randomize_method(model, 0)
    return model


@pytest.fixture(scope="session")
def clip_artifact(clip_dir, tmp_path_factory) -> Path:
    """A tiny CoOp CLIP artifact with its inference assets (class names, image recipe)."""
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact
    from tests.clip_helpers import clip_with_method

    model, _ = clip_with_method(clip_dir, "coop")
    return export_artifact(model, tmp_path_factory.mktemp("clipart") / "artifact", ExportSettings(batch_max=4),
                           source={"model_dir": str(clip_dir)})


@pytest.fixture(scope="session")
def sd_artifact(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Stable Diffusion directory, APT (attn2) prompts on it and their fp32 artifact, exported once."""
    pytest.importorskip("diffusers")
    import torch

    import apt_deploy as ad
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact
    from tests.clip_helpers import single_thread
    from tests.sd_helpers import tiny_sd_with_apt

    root = tmp_path_factory.mktemp("sd")
    before = single_thread()
    try:
        model, model_dir = tiny_sd_with_apt(root / "model")
        ad.save_prompts(model, root / "prompts")
        source = {"model_dir": str(model_dir), "prompts_dir": str(root / "prompts")}
        artifact = export_artifact(load_trained(model_dir, root / "prompts"), root / "artifact",
                                   ExportSettings(batch_max=2), source=source)
    finally:
        torch.set_num_threads(before)
    return {"root": root, "model_dir": model_dir, "prompts": root / "prompts", "artifact": artifact}
