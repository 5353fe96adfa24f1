"""Deep prompt tuning (the APT paper's baseline) and its honest deployment form.

Training form: p fresh learnable tokens are appended to the input of every layer, go through the
whole layer, and their outputs are discarded. Only their keys and values ever reach the real
tokens, and those, LN1(P) W_k + b_k and LN1(P) W_v + b_v, do not depend on the input: the folded form
is a per-layer prefix K/V constant (specs/apt.md, "The deep-prompt baseline, honestly folded").
"""

from __future__ import annotations

import math

import torch
from torch import nn


def pad_attention_mask(mask: torch.Tensor | None, extra: int, pad_queries: bool) -> torch.Tensor | None:
    """Extend a 4D attention mask [B, 1, q, kv] (additive float or boolean) by ``extra`` always-visible keys
    (and queries when ``pad_queries``). ``None`` (no masking) stays ``None``."""
    if mask is None:
        return None
    value = True if mask.dtype == torch.bool else 0.0
    pad = (0, extra, 0, extra) if pad_queries and mask.shape[-2] > 1 else (0, extra)
    return nn.functional.pad(mask, pad, value=value)


class DeepPromptLayer(nn.Module):
    """Training form: wraps a transformer layer ``layer(hidden, mask, output_attentions)``."""

    def __init__(self, layer: nn.Module, prompt_len: int, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.layer = layer
        self.prompt = nn.Parameter(torch.randn(prompt_len, hidden_size) * init_std)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        n, p = hidden_states.shape[1], self.prompt.shape[0]
        x = torch.cat([hidden_states, self.prompt.to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1)], 1)
        out = self.layer(x, pad_attention_mask(attention_mask, p, pad_queries=True), *args, **kwargs)
        return (drop_prompts(out[0], n),) + tuple(out[1:])


def drop_prompts(hidden_states: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` tokens of [B, n + p, d] as a contiguous copy, not a view.

    The view ``hidden_states[:, :n]`` is contiguous only when B == 1. Ops that branch on contiguity
    (``aten::linear`` folding the batch into one GEMM, ``.contiguous()``) then make torch.export, traced at an
    example batch of 1, guard ``batch == 1``, and torch.onnx silently exports a static batch (METER feeds
    the sliced stream straight into the other stream's cross-attention key/value Linears; docs/pitfalls.md,
    "METER"). ``clone`` never asks; in ONNX it is a no-op.
    """
    return hidden_states[:, :n].clone(memory_format=torch.contiguous_format)


class PrefixKVSelfAttention(nn.Module):
    """Folded form for a BERT-style self-attention (query/key/value Linears, eager softmax attention).

    The prompt keys/values are constants [heads, p, head_dim]; per input only the real tokens are
    projected and attention runs over n + p keys.
    """

    def __init__(self, attn: nn.Module, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dropout = attn.query, attn.key, attn.value, attn.dropout
        self.num_heads = attn.num_attention_heads
        self.head_dim = attn.attention_head_size
        self.register_buffer("prefix_k", prefix_k)
        self.register_buffer("prefix_v", prefix_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions=False):
        b = hidden_states.shape[0]
        q = self._heads(self.query(hidden_states))
        k = torch.cat([self._heads(self.key(hidden_states)), self.prefix_k.expand(b, -1, -1, -1)], 2)
        v = torch.cat([self._heads(self.value(hidden_states)), self.prefix_v.expand(b, -1, -1, -1)], 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = pad_attention_mask(attention_mask, self.prefix_k.shape[1], pad_queries=False)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
        probs = self.dropout(scores.softmax(dim=-1))
        ctx = (probs @ v).transpose(1, 2).reshape(*hidden_states.shape[:-1], self.num_heads * self.head_dim)
        return (ctx, probs) if output_attentions else (ctx,)


def prefix_kv(attn: nn.Module, layernorm: nn.Module, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LN1(P) W_k + b_k and LN1(P) W_v + b_v, as [heads, p, head_dim]."""
    with torch.no_grad():
        x = layernorm(prompt)
        shape = (prompt.shape[0], attn.num_attention_heads, attn.attention_head_size)
        k = attn.key(x).view(shape).transpose(0, 1).contiguous()
        v = attn.value(x).view(shape).transpose(0, 1).contiguous()
    return k, v
