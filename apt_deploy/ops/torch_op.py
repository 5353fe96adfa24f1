"""The torch face of the fused op: a ``torch.library`` custom op with a fake kernel.

The folded model calls ``torch.ops.apt.approx_prompt_diffusion``; the ONNX exporter translates it to
one ``apt::ApproxPromptDiffusion`` node (exporters.fused_op). The default kernel is the unfused
PyTorch sequence; a CUDA kernel may be registered on top of it (engines.kernels).
"""

from __future__ import annotations

import torch

from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as SPEC
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION_ROWS as ROWS


@torch.library.custom_op(SPEC.torch_qualname, mutates_args=())
def approx_prompt_diffusion(x_in: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """y = o + rowmax(A) * (A @ V) with A = ReLU(x_in @ K^T)."""
    return unfused_approx_prompt_diffusion(x_in, o, k, v)


@torch.library.custom_op(ROWS.torch_qualname, mutates_args=())
def approx_prompt_diffusion_rows(x_in: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Version 2: per-row prompts, K and V [B, p, d] (the rows a multi-task bank gathered for the batch)."""
    return unfused_approx_prompt_diffusion(x_in, o, k, v)


@approx_prompt_diffusion.register_fake
@approx_prompt_diffusion_rows.register_fake
def _fake(x_in: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    torch._check(x_in.shape == o.shape, lambda: f"x_in {tuple(x_in.shape)} and o {tuple(o.shape)} differ")
    torch._check(k.shape == v.shape, lambda: f"K {tuple(k.shape)} and V {tuple(v.shape)} differ")
    return torch.empty_like(o)


def unfused_approx_prompt_diffusion(
    x_in: torch.Tensor, o: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """The plain PyTorch sequence (also the baseline the fused GPU kernel is timed against). K, V are [p, d]
    (version 1) or [B, p, d] (version 2: batched matmuls against each row's own K, V)."""
    a = torch.relu(torch.matmul(x_in, k.transpose(-1, -2)))
    w = a.amax(dim=-1, keepdim=True)
    return o + w * torch.matmul(a, v)
