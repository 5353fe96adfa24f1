"""Tiny random Stable Diffusion models built in-process (tests, the demo): no downloads.

Configs follow diffusers' own pipeline tests (tests/pipelines/stable_diffusion/test_stable_diffusion.py):
"tiny" = the current test config (UNet block_out_channels (4, 8), 8 attention modules), "small" = the
older one ((32, 64), 12 attention modules). The tokenizer is a CLIP BPE tokenizer over an in-memory
byte-level vocabulary (2 specials + 256 byte symbols + 256 end-of-word symbols, no merges): it tokenises
any text character by character, which is all a random model needs.
"""

from __future__ import annotations

from typing import Any

import torch

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"unet": (4, 8), "layers": 1, "cross": 8, "groups": 2, "text": dict(hidden_size=8, intermediate_size=16,
                                                                              num_attention_heads=2, num_hidden_layers=2)},
    "small": {"unet": (32, 64), "layers": 2, "cross": 32, "groups": 32, "text": dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5)},
}
TEXT_LEN = 77


def byte_level_tokenizer(max_length: int = TEXT_LEN) -> Any:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(chars)})
    vocab.update({f"{c}</w>": i + 2 + len(chars) for i, c in enumerate(chars)})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_tiny_sd(seed: int = 0, size: str = "tiny", sample_size: int = 32) -> Any:
    """A seeded random :class:`~apt_deploy.backbones.sd.StableDiffusionModel` (DDIM scheduler, SD 1.x betas)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from apt_deploy.backbones.sd import StableDiffusionModel

    cfg = SIZES[size]
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=cfg["unet"], layers_per_block=cfg["layers"], sample_size=sample_size,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cfg["cross"],
                                norm_num_groups=cfg["groups"])
    vae = AutoencoderKL(block_out_channels=list(cfg["unet"]), in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=cfg["groups"])
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(tokenizer),
                                        max_position_embeddings=TEXT_LEN, layer_norm_eps=1e-5, **cfg["text"]))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionModel(unet, vae, text, tokenizer, scheduler).eval()
