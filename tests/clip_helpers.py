"""Shared pieces of the CLIP tests (tiny model directories, methods with non-trivial tensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLASS_NAMES = ["circle", "square", "triangle"]


def tiny_processor() -> Any:
    """The 32x32 CLIPImageProcessorPil that :func:`apt_deploy.backbones.clip.save_tiny_clip` saves."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def single_thread() -> int:
    """Tiny models run ~20x faster on one thread on the 2-core CI box (thread hand-off dominates)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def clip_with_method(model_dir: Path, method: str, context_init: str | None = None, context_len: int = 4,
                     prompt_len: int = 6, rank: int = 2, seed: int = 0) -> tuple[Any, Any]:
    """A tiny CLIP from ``model_dir`` with ``method`` applied and every trained tensor randomized."""
    import torch

    from apt_deploy.clip_training import prepare_clip
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.methods.coop import CoOpConfig
    from tests.conftest import randomize_method

    apt = APTConfig(prompt_len=prompt_len, rank=rank) if method.startswith("apt") else None
    model, tokenizer, _ = prepare_clip(model_dir, method, CLASS_NAMES, CoOpConfig(context_len, context_init), apt)
    randomize_method(model, seed)
    context = model.prompt_learner.context
    with torch.no_grad():
        context.add_(torch.randn(context.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model, tokenizer
