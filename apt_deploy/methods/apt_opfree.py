"""APT's op-free inference form (specs/apt.md, "An equivalent form with no new op at all").

No fused op: the two small APT GEMMs ride along the attention's own projections.

* K (p x d) consumes the same x_in as the query projection, so it becomes p extra output columns of
  it: ``[q | S] = x_in [W_q^T | K^T] + [b_q | 0]``; then ``A = ReLU(S)`` and ``w = rowmax(A)``.
* V (p x d) becomes p extra input rows of the output projection, which is fed ``[ctx | w * A]``:
  ``y = [ctx | w * A] [e^s W_o^T ; V] + e^s b_o = e^s o + w * (A V)``.

That is exactly the fused fold's ``y`` (e^s folded into W_o, b_o; V = e^s P), so the op-free form
and the fused form must agree to fp32 rounding (tests/test_opfree.py). Which one is faster on a
backend is a measurement (docs/benchmarks.md).

Host: a BERT/ViLT-style attention block (``ViltAttention``: ``.attention`` with query/key/value and
``.output`` = the APT output-projection wrapper). ``fold_opfree(model)`` is the entry point.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from apt_deploy.backbones import BackboneSpec
from apt_deploy.errors import ConfigError
from apt_deploy.folding import fold, freeze_for_inference
from apt_deploy.methods.apt import APTOutputProjection, scaled_linear

log = logging.getLogger(__name__)


class OpFreeAPTAttention(nn.Module):
    """Replaces a ViltAttention whose output projection hosts APT: widened query and output projections."""

    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, dense: nn.Linear,
                 probs_dropout: nn.Module, out_dropout: nn.Module, num_heads: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.dense = query, key, value, dense
        self.probs_dropout, self.out_dropout = probs_dropout, out_dropout
        self.num_heads, self.hidden = num_heads, key.out_features
        self.head_dim = self.hidden // num_heads

    @classmethod
    def from_host(cls, attention: nn.Module) -> OpFreeAPTAttention:
        """Build from a ViltAttention whose ``.output`` is an :class:`APTOutputProjection` (training form)."""
        self_attn, host = attention.attention, attention.output
        k, v, scale = host.apt.folded_constants()
        query = widened_query(self_attn.query, k)
        dense = widened_output(host.dense, v, scale)
        return cls(query, self_attn.key, self_attn.value, dense, self_attn.dropout, host.dropout,
                   self_attn.num_attention_heads)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The unchanged multi-head softmax attention (as ViltSelfAttention computes it)."""
        scores = self._heads(q) @ self._heads(self.key(x)).transpose(-1, -2) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        probs = self.probs_dropout(scores.softmax(dim=-1))
        ctx = (probs @ self._heads(self.value(x))).transpose(1, 2).reshape(*x.shape[:-1], self.hidden)
        return ctx, probs

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        q, s = self.query(hidden_states).split([self.hidden, self.query.out_features - self.hidden], dim=-1)
        a = torch.relu(s)
        w = a.amax(dim=-1, keepdim=True)
        ctx, probs = self._attend(q, hidden_states, attention_mask)
        y = self.out_dropout(self.dense(torch.cat([ctx, w * a], dim=-1)))
        return (y, probs) if output_attentions else (y,)


def widened_query(query: nn.Linear, k: torch.Tensor) -> nn.Linear:
    """``[W_q ; K]`` as one Linear d -> d + p (the K columns have zero bias)."""
    out = nn.Linear(query.in_features, query.out_features + k.shape[0], bias=query.bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.cat([query.weight, k.to(query.weight.dtype)], 0))
        if query.bias is not None:
            out.bias.copy_(torch.cat([query.bias, query.bias.new_zeros(k.shape[0])]))
    return out.to(query.weight.device)


def widened_output(dense: nn.Linear, v: torch.Tensor, scale: torch.Tensor) -> nn.Linear:
    """``[e^s W_o | V^T]`` as one Linear d + p -> d with bias ``e^s b_o`` (e^s folded as the fused form does)."""
    scaled = scaled_linear(dense, scale)
    out = nn.Linear(dense.in_features + v.shape[0], dense.out_features, bias=dense.bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.cat([scaled.weight, v.t().to(dense.weight.dtype)], 1))
        if dense.bias is not None:
            out.bias.copy_(scaled.bias)
    return out.to(dense.weight.device)


def fold_apt_opfree(model: nn.Module, spec: BackboneSpec) -> int:
    """Fold pass (same signature as apt_deploy.folding's): every APT-hosting attention -> op-free form."""
    parents = {id(m): (parent, name) for parent in model.modules() for name, m in parent.named_children()}
    folded = 0
    for site in spec.apt_sites(model):
        attention = site.parent
        if not isinstance(getattr(attention, site.attr, None), APTOutputProjection):
            continue  # not APT, or already op-free
        _check_host(attention)
        parent, name = parents[id(attention)]
        setattr(parent, name, OpFreeAPTAttention.from_host(attention))
        folded += 1
    return folded


def fold_opfree(model: nn.Module) -> nn.Module:
    """The op-free inference form of an APT model (training form); ``model`` itself is untouched."""
    state = getattr(model, "apt_deploy_state", None)
    if state is None or state.method != "apt" or state.folded:
        raise ConfigError(f"fold_opfree() got method={getattr(state, 'method', None)!r}, "
                          f"folded={getattr(state, 'folded', None)!r}",
                          "an APT model in training form (apply_apt / load_prompts)",
                          "apply APT or load an APT checkpoint first; fold from the training form, not a folded copy")
    from apt_deploy.backbones import get_backbone

    return fold(model, passes=(get_backbone(state.backbone).opfree_fold_pass() or fold_apt_opfree, freeze_for_inference))


def _check_host(attention: nn.Module) -> None:
    inner = getattr(attention, "attention", None)
    if not all(isinstance(getattr(inner, n, None), nn.Linear) for n in ("query", "key", "value")):
        raise ConfigError(f"APT host {type(attention).__name__} has no BERT-style self-attention (query/key/value)",
                          "a ViLT/BERT-style attention block (ViltAttention)",
                          "use the fused-op fold (apt_deploy.fold) for this backbone")
