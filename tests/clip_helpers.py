"""Shared pieces of the CLIP tests (tiny model directories, methods with non-trivial tensors)."""

from __future__ import annotations

from pathlib import Path

CLASS_NAMES = ["circle", "square", "triangle"]


def single_thread():
    """Tiny models run ~20x faster on one thread on the 2-core CI box (thread hand-off dominates)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def clip_with_method(model_dir: Path, method: str, context_init: str | None = None, context_len: int = 4,
                     prompt_len: int = 6, rank: int = 2, seed: int = 0):
    """A tiny CLIP from ``model_dir`` with ``method`` applied and every trained tensor randomized."""
    import torch

    from apt_deploy.clip_training import prepare_clip
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.methods.coop import CoOpConfig
    from tests.conftest import randomize_method

    apt = APTConfig(prompt_len=prompt_len, rank=rank) if method.startswith("apt") else None
    model, tokenizer, _ = prepare_clip(model_dir, method, CLASS_NAMES, CoOpConfig(context_len, context_init), apt)
    randomize_method(model, seed)
    with torch.no_grad():
        model.prompt_learner.context.add_(torch.randn(model.prompt_learner.context.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return model, tokenizer
