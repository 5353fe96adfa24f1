"""APT (arXiv 2306.15706) training form, exactly as the official ``approximate_prompt`` class.

See ``specs/apt.md``: K = P + (P W_dn^T) W_up^T; A = dropout(ReLU(x_in K^T)); E = A P;
w = stop_grad(max_p A); y = e^s (o + w * E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from apt_deploy.errors import ConfigError


@dataclass(frozen=True)
class APTConfig:
    """Settings of APT. Defaults are the published ViLT/METER settings (p=200, r=4). ``init_std`` is the
    standard deviation of the normal init of P, W_dn and W_up (0.02, as the official runs; APTModule)."""

    prompt_len: int = 200
    rank: int = 4
    dropout: float = 0.0
    train_log_scale: bool = True
    init_std: float = 0.02
    train_head: bool = True
    cls_token_id: int | None = 101
    method: str = "apt"

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ConfigError(f"prompt_len={self.prompt_len}", "a positive prompt count (paper: 200)")
        if self.rank < 1:
            raise ConfigError(f"rank={self.rank}", "a positive rank (paper: 4)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout}", "a probability in [0, 1)")


class APTModule(nn.Module):
    """One APT module: trainable P (p x d), down (r x d), up (d x r), log_scale (scalar).

    Initialisation: P, W_dn and W_up all N(0, init_std^2) (0.02), log_scale 0. This is what the official
    runs train from: the ``approximate_prompt`` class sets W_dn ~ N(0, 1) and W_up = 0, but the host
    model's initialiser runs afterwards and re-initialises every nn.Linear, both low-rank matrices
    included, to N(0, 0.02^2) (METER: ``objectives.init_weights``; ViLT: timm's trunc_normal(0.02), whose
    +-2 cut-off is 100 sigma away) — shared/specs/meter.md §3.2.
    """

    def __init__(self, hidden_size: int, config: APTConfig) -> None:
        super().__init__()
        p, r, d = config.prompt_len, config.rank, hidden_size
        self.prompt = nn.Parameter(torch.randn(p, d) * config.init_std)
        self.down = nn.Parameter(torch.randn(r, d) * config.init_std)
        self.up = nn.Parameter(torch.randn(d, r) * config.init_std)
        self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=config.train_log_scale)
        self.dropout = nn.Dropout(config.dropout)

    def keys(self) -> torch.Tensor:
        """K = P + (P W_dn^T) W_up^T, [p, d]."""
        return self.prompt + (self.prompt @ self.down.t()) @ self.up.t()

    def forward(self, x_in: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        a = self.dropout(torch.relu(x_in @ self.keys().t()))
        w = a.amax(dim=-1, keepdim=True).detach()
        return self.log_scale.exp() * (o + w * (a @ self.prompt))

    def folded_constants(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, V, e^s) of the inference form: y = e^s o + rowmax(A) (A V), V = e^s P."""
        with torch.no_grad():
            scale = self.log_scale.exp()
            return self.keys().clone(), (scale * self.prompt).clone(), scale.clone()


class APTOutputProjection(nn.Module):
    """Replaces a BERT-style self-output (dense, dropout; forward(hidden, input_tensor)).

    o = dense(ctx) is the attention output after the output projection; x_in = input_tensor is the
    input of the attention sub-layer; APT runs between the projection and the dropout, as in the
    official code (``x = proj(attn v); x = APT(x, res); x = proj_drop(x)``).
    """

    def __init__(self, dense: nn.Linear, dropout: nn.Module, apt: APTModule) -> None:
        super().__init__()
        self.dense, self.dropout, self.apt = dense, dropout, apt

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.apt(input_tensor, self.dense(hidden_states)))

    def fold_apt(self) -> nn.Module:
        """The inference form (every APT host wrapper implements ``fold_apt``)."""
        k, v, scale = self.apt.folded_constants()
        return FoldedOutputProjection(scaled_linear(self.dense, scale), self.dropout, k, v)


class FoldedOutputProjection(nn.Module):
    """Inference form of :class:`APTOutputProjection`: e^s folded into ``dense``, the fused op after it."""

    def __init__(self, dense: nn.Linear, dropout: nn.Module, k: torch.Tensor, v: torch.Tensor) -> None:
        super().__init__()
        self.dense, self.dropout = dense, dropout
        self.register_buffer("k", k)
        self.register_buffer("v", v)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        from apt_deploy.ops import torch_op  # noqa: F401  (registers torch.ops.apt)

        o = self.dense(hidden_states)
        return self.dropout(torch.ops.apt.approx_prompt_diffusion(input_tensor, o, self.k, self.v))


def scaled_linear(linear: nn.Linear, scale: torch.Tensor) -> nn.Linear:
    """A copy of ``linear`` with weight and bias multiplied by ``scale`` (folds e^s into W_o, b_o)."""
    import copy

    out = copy.deepcopy(linear)
    with torch.no_grad():
        out.weight.mul_(scale)
        if out.bias is not None:
            out.bias.mul_(scale)
    return out


def is_apt_host(module: nn.Module) -> bool:
    """True for any wrapper that hosts an :class:`APTModule` as ``.apt`` and can fold itself."""
    return isinstance(getattr(module, "apt", None), APTModule) and hasattr(module, "fold_apt")


def count_parameters(hidden_size: int, config: APTConfig) -> int:
    """p*d + 2*d*r + 1 per module (specs/apt.md)."""
    return config.prompt_len * hidden_size + 2 * hidden_size * config.rank + 1
