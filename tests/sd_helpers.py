"""Tiny random Stable Diffusion helpers shared by the SD tests (built in-process, no downloads)."""

from __future__ import annotations

from pathlib import Path


def tiny_sd_with_apt(directory: Path, sites: str = "attn2", seed: int = 0, prompt_len: int = 6, rank: int = 2):
    """(model with APT applied and randomized, the saved base-model directory)."""
    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.sd import apply_sd_apt, save_sd
    from tests.conftest import randomize_method

    model = get_backbone("sd").build_tiny(seed=seed)
    save_sd(model, directory)
    apply_sd_apt(model, ad.APTConfig(prompt_len=prompt_len, rank=rank), sites)
    randomize_method(model, seed)
    return model, directory
