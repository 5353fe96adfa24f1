"""Stable Diffusion options of ``apt-deploy train`` (no heavy imports: ``--help`` works without torch)."""

from __future__ import annotations

import argparse


def add_sd_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Stable Diffusion (--backbone sd)")
    g.add_argument("--sites", choices=("attn2", "attn1+attn2"), default="attn2",
                   help="attentions that get APT: cross-attention only (default) or self- and cross-attention")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image side in pixels (default: the model's native size, 512 for SD 1.5)")
