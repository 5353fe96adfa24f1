"""One model, many APT tasks: per-module prompt banks selected per row by a ``task`` index.

Every task is an APT checkpoint trained on the same base model. Its folded constants per module are
``K_t``, ``V_t`` (:meth:`APTModule.folded_constants`, exactly what a single-task fold produces) and the
scale ``e^s_t``. A single-task fold multiplies ``e^s`` into the output projection; here the projection is
shared, so the scale is a per-row multiply of its output instead, and the prompt step is the fused op's
version 2 (per-row K, V: ``torch.ops.apt.approx_prompt_diffusion_rows``).

The banks are not weights of the model: :class:`MultiTaskModel` takes them as inputs (``apt_bank_k_{i}``
``[T, p, d]``, ``apt_bank_v_{i}``, ``apt_bank_scale_{i}`` ``[T]``) together with ``task`` ``[B]``, so the
exported graph (and any engine built from it) never changes when a task is added; only the bank file
(apt_deploy/prompt_bank.py) does.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from apt_deploy.errors import ConfigError
from apt_deploy.methods.apt import APTOutputProjection
from apt_deploy.prompt_bank import bank_names

APT_KEYS = ("prompt", "down", "up", "log_scale")


class _Rows:
    """The current batch's task rows, set by :class:`MultiTaskModel` around one forward."""

    def __init__(self) -> None:
        self.task: torch.Tensor | None = None
        self.banks: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        if self.task is None:
            raise ConfigError("a multi-task module ran outside MultiTaskModel.forward", "task ids and banks",
                              "call the MultiTaskModel, not its inner model")
        return torch.index_select(self.banks[name], 0, self.task)


class MultiTaskOutputProjection(nn.Module):
    """Folded :class:`APTOutputProjection` for many tasks: o = e^s_t * dense(h), then the per-row fused op."""

    def __init__(self, dense: nn.Linear, dropout: nn.Module, index: int, rows: _Rows) -> None:
        super().__init__()
        self.dense, self.dropout, self.index = dense, dropout, index
        self._rows = rows

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        from apt_deploy.ops import torch_op  # noqa: F401  (registers torch.ops.apt)

        k_name, v_name, s_name = bank_names(self.index)
        scale = self._rows.take(s_name).to(hidden_states.dtype)
        o = self.dense(hidden_states) * scale[:, None, None]
        y = torch.ops.apt.approx_prompt_diffusion_rows(input_tensor, o, self._rows.take(k_name), self._rows.take(v_name))
        return self.dropout(y)


class MultiTaskModel(nn.Module):
    """``forward(task, apt_bank_k_0, ..., **model_inputs)``: the shared model with each row's task prompts."""

    def __init__(self, inner: nn.Module, layers: int, rows: _Rows) -> None:
        super().__init__()
        self.inner, self.layers, self._rows = inner, layers, rows

    @property
    def bank_input_names(self) -> list[str]:
        return [n for i in range(self.layers) for n in bank_names(i)]

    def forward(self, task: torch.Tensor, **feed: torch.Tensor) -> Any:
        names = self.bank_input_names
        self._rows.task, self._rows.banks = task, {n: feed.pop(n) for n in names}
        try:
            return self.inner(**feed)
        finally:
            self._rows.task, self._rows.banks = None, {}


def task_bank(model: nn.Module) -> dict[str, torch.Tensor]:
    """One task's bank rows from a training-form APT model: ``{apt_bank_k_i: [p, d], ..._v_i, ..._scale_i: []}``."""
    out: dict[str, torch.Tensor] = {}
    for i, site in enumerate(_apt_hosts(model)):
        k, v, scale = site.module.apt.folded_constants()
        for name, t in zip(bank_names(i), (k, v, scale)):
            out[name] = t.detach().float().cpu().contiguous()
    return out


def check_shared(names: Sequence[str], models: Sequence[nn.Module]) -> None:
    """Every tensor except the APT prompts must be equal across tasks (one shared base, head and extras)."""
    from apt_deploy.checkpoint import trained_tensors

    ref = _shared_tensors(trained_tensors(models[0]))
    for name, model in zip(names[1:], models[1:]):
        other = _shared_tensors(trained_tensors(model))
        differ = sorted(k for k in ref if k not in other or not torch.equal(ref[k], other[k]))
        if differ:
            raise ConfigError(f"task {name!r} differs from task {names[0]!r} outside the APT prompts: {differ[:5]}",
                              "tasks that share everything but their APT prompts (base model, head, pooler, extras)",
                              "train the tasks with train_head=False on the same base and head, or export them "
                              "as separate artifacts")


def shared_fingerprint(model: nn.Module) -> str:
    """sha256 of everything a task shares with the others (trained tensors but the APT prompts, and the base
    weights' fingerprint): ``add-task`` compares a new task's with the artifact's."""
    import hashlib

    from apt_deploy.checkpoint import trained_tensors

    h = hashlib.sha256(model.apt_deploy_state.base_fingerprint.encode())
    for name, t in sorted(_shared_tensors(trained_tensors(model)).items()):
        h.update(name.encode())
        h.update(t.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_multitask_model(model: nn.Module) -> MultiTaskModel:
    """The inference form of ``model`` (training form, any one of the tasks) with every APT module turned into
    a bank-reading :class:`MultiTaskOutputProjection`; the original is untouched."""
    state = getattr(model, "apt_deploy_state", None)
    if state is None or state.method != "apt":
        raise ConfigError(f"a model with method {getattr(state, 'method', None)!r}", "an APT model (method 'apt')",
                          "multi-task artifacts bank APT prompts only; export other methods one task at a time")
    out = copy.deepcopy(model)
    rows = _Rows()
    sites = _apt_hosts(out)
    for i, site in enumerate(sites):
        host = site.module
        site.replace(MultiTaskOutputProjection(host.dense, host.dropout, i, rows))
    out.eval().requires_grad_(False)
    out.apt_deploy_state = dataclasses.replace(state, folded=True)
    return MultiTaskModel(out, len(sites), rows).eval()


def _apt_hosts(model: nn.Module) -> list[Any]:
    from apt_deploy.backbones import get_backbone

    spec = get_backbone(model.apt_deploy_state.backbone)
    sites = spec.apt_sites(model)
    wrong = [type(s.module).__name__ for s in sites if not isinstance(s.module, APTOutputProjection)]
    if wrong or not sites:
        raise ConfigError(f"backbone {spec.name!r} with APT hosts {wrong or 'none'}",
                          "APT modules at BERT-style output projections (ViLT)",
                          "multi-task export supports ViLT; export this backbone one task at a time")
    return sites


def _shared_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in APT_KEYS}
