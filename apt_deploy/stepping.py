"""One optimizer step over K micro-batches: autocast (bf16 / fp16), gradient scaling (fp16), DDP's all-reduce
on the last micro-batch only, an optional gradient hook (GRAM), clipping, the optimizer and LR-schedule steps.

Master weights, optimizer state and everything saved stay fp32: autocast runs the matmuls in half
precision, it never converts a parameter. ``--precision fp32`` (the default) is the plain fp32 step,
bit for bit the loop the toolkit ran before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from apt_deploy.distributed import DistContext, sync_context
from apt_deploy.errors import ConfigError

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str) -> None:
    """Refuse a precision this device's autocast cannot run (probed with a tiny forward and backward)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}", f"one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return
    kind = torch.device(device).type
    if kind == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16 on {torch.cuda.get_device_name(device)}", "a GPU with bf16 support "
                          "(Ampere or newer)", "use --precision fp16 (with loss scaling) or fp32")
    try:
        w = torch.ones(4, 4, device=device, requires_grad=True)
        with autocast(precision, device):
            y = nn.functional.linear(torch.ones(2, 4, device=device), w)
        y.float().sum().backward()
        ok = y.dtype == PRECISIONS[precision]
    except (RuntimeError, TypeError, AssertionError) as e:  # torch raises these for unsupported autocast dtypes
        ok, why = False, f": {e}"
    else:
        why = "" if ok else f": autocast produced {y.dtype}"
    if not ok:
        raise ConfigError(f"--precision {precision} cannot run on {device}{why}",
                          f"a precision the {kind} autocast of torch {torch.__version__} supports",
                          "use --precision fp32 (or bf16 on CPUs), or train on a device that supports it")


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for bf16 / fp16, a no-op for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class GradientStepper:
    """``step(micro_batches, loss_fn)``: one optimizer step over ``grad_accum`` micro-batches; returns the loss
    averaged over the micro-batches and all ranks (= the loss of the effective batch)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ctx: DistContext,
                 precision: str = "fp32", grad_accum: int = 1, grad_clip: float | None = None,
                 before_step: Callable[[], None] | None = None) -> None:
        check_precision(precision, ctx.device)
        self.module, self.optimizer, self.scheduler, self.ctx = module, optimizer, scheduler, ctx
        self.precision, self.grad_accum, self.grad_clip, self.before_step = precision, grad_accum, grad_clip, before_step
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.scaler = torch.amp.GradScaler(torch.device(ctx.device).type, enabled=precision == "fp16")

    def step(self, micro_batches: Iterator[Any], loss_fn: Callable[[Any], torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(self.grad_accum):
            batch = next(micro_batches)
            with sync_context(self.module, k == self.grad_accum - 1):
                with autocast(self.precision, self.ctx.device):
                    loss = loss_fn(batch)
                self.scaler.scale(loss if self.grad_accum == 1 else loss / self.grad_accum).backward()
            total += float(loss.detach())
        self._apply()
        return self.ctx.mean(total / self.grad_accum)

    def _apply(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.before_step is not None:
            self.before_step()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
