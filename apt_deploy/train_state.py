"""Training checkpoints (``--checkpoint-every N``) and resuming (``--resume DIR``), for every training loop.

A training checkpoint is a directory, replaced atomically each time (a crash mid-write leaves the
previous one), written by rank 0 only:

    train_state.json      format, step, what must match to resume (backbone, method and its config, base
                          fingerprint, recipe, world size), the data stream position, the losses so far
    trained.safetensors   the trained tensors (the names of the prompt checkpoint, apt_deploy.checkpoint)
    optimizer.pt          optimizer, LR scheduler and loss-scaler state, every rank's RNG states
                          (torch CPU / CUDA, Python, numpy), the sampler state

Resuming restores all of it, so with the same world size an interrupted run ends with the same trained
tensors as an uninterrupted one (bit for bit on the CPU in fp32; tests/test_distributed.py).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from apt_deploy.distributed import DistContext
from apt_deploy.errors import CheckpointError, ConfigError, InputPathError
from apt_deploy.fileio import atomic_directory, write_json_atomic
from apt_deploy.settings import ScaleSettings

log = logging.getLogger(__name__)
FORMAT, VERSION = "apt-deploy-train-state", 1
STATE_NAME, TENSORS_NAME, OPTIM_NAME = "train_state.json", "trained.safetensors", "optimizer.pt"
MODEL_KEYS = ("backbone", "method", "base_fingerprint", "method_config")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class History:
    """What the loop reports: the loss of every optimizer step and (step, accuracy) evaluations."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)


def run_identity(model: nn.Module, **recipe: Any) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the model side and the recipe (JSON values)."""
    from apt_deploy.backbones import get_backbone

    state = getattr(model, "apt_deploy_state", None)
    if state is None:
        raise ConfigError("the model has no prompt method applied", "a model after apply_apt / apply_clip_method")
    config = get_backbone(state.backbone).method_config_json(model, state)
    return {"backbone": state.backbone, "method": state.method, "base_fingerprint": state.base_fingerprint,
            "method_config": json.loads(json.dumps(config, default=str)), "recipe": json.loads(json.dumps(recipe))}


class TrainCheckpointer:
    """Saves every ``scale.checkpoint_every`` steps and resumes from ``scale.resume``; a no-op when neither is set.
    ``stepper`` and ``batches`` are anything with ``state_dict`` / ``load_state_dict``."""

    def __init__(self, model: nn.Module, stepper: Stateful, batches: Stateful, ctx: DistContext,
                 scale: ScaleSettings, identity: dict[str, Any]) -> None:
        from apt_deploy.checkpoint import trained_tensors

        self.tensors = trained_tensors(model)
        self.stepper, self.batches, self.ctx, self.scale = stepper, batches, ctx, scale
        self.identity = {**identity, "world_size": ctx.world_size}

    def resume(self) -> tuple[int, History]:
        """(optimizer steps already done, their history); (0, empty) without ``scale.resume``."""
        if not self.scale.resume:
            return 0, History()
        directory = Path(self.scale.resume)
        meta = read_train_state(directory)
        check_identity(meta["identity"], self.identity, directory)
        self._load_tensors(directory / TENSORS_NAME)
        extra = torch.load(directory / OPTIM_NAME, map_location="cpu", weights_only=True)
        self.stepper.load_state_dict(extra["stepper"])
        self.batches.load_state_dict(extra["batches"])
        set_rng_state(extra["rng"][self.ctx.rank], self.ctx.device)
        history = History(list(meta["losses"]), [tuple(e) for e in meta["evals"]])
        log.info("resumed from %s at step %d", directory, meta["step"])
        return int(meta["step"]), history

    def maybe_save(self, step: int, history: History) -> None:
        every = self.scale.checkpoint_every
        if every and step % every == 0:
            self.save(step, history)

    def save(self, step: int, history: History) -> None:
        """Collective (every rank calls it: the RNG states are gathered); rank 0 writes the directory."""
        rng = self.ctx.gather_objects(get_rng_state(self.ctx.device))
        if not self.ctx.is_main:
            return
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        meta = {"format": FORMAT, "version": VERSION, "step": step, "identity": self.identity,
                "data_position": _plain(self.batches.state_dict()), "losses": history.losses, "evals": history.evals}
        with atomic_directory(self.scale.checkpoint_dir, overwrite=True) as stage:
            save_file(tensors, str(stage / TENSORS_NAME))
            torch.save({"stepper": self.stepper.state_dict(), "batches": self.batches.state_dict(), "rng": rng},
                       stage / OPTIM_NAME)
            write_json_atomic(stage / STATE_NAME, meta)
        log.info("step %d: training checkpoint written to %s", step, self.scale.checkpoint_dir)

    def _load_tensors(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            saved = load_file(str(path))
        except Exception as e:  # safetensors raises SafetensorError, OSError, ...
            raise CheckpointError(f"cannot read {str(path)!r}: {e}", "a complete safetensors file",
                                  "the checkpoint is corrupt; resume from an older copy or start again") from e
        if saved.keys() != self.tensors.keys():
            raise CheckpointError(f"{str(path)!r} holds {len(saved)} tensors that do not match the model's "
                                  f"{len(self.tensors)} trained tensors", "a checkpoint of this method and model")
        with torch.no_grad():
            for name, param in self.tensors.items():
                param.copy_(saved[name].to(param.device, param.dtype))


def read_train_state(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise InputPathError(f"resume directory {str(directory)!r} does not exist",
                             "a training checkpoint directory written with --checkpoint-every",
                             "check --resume (the default checkpoint directory is OUT_DIR.train_state)")
    for name in (STATE_NAME, TENSORS_NAME, OPTIM_NAME):
        if not (directory / name).is_file():
            raise CheckpointError(f"{str(directory)!r} has no {name}", f"{STATE_NAME}, {TENSORS_NAME} and {OPTIM_NAME}",
                                  "point --resume at a directory written by --checkpoint-every (not a prompt checkpoint)")
    try:
        meta = json.loads((directory / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{STATE_NAME} in {str(directory)!r} is not valid JSON ({e})",
                              "the file --checkpoint-every writes") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{str(directory / STATE_NAME)!r} is format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}", f"{FORMAT} version {VERSION}",
                              "resume with the matching apt-deploy")
    return meta


def check_identity(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> None:
    """Refuse to resume into another model (backbone, method, base weights) or another recipe / world size."""
    for key in MODEL_KEYS:
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"--resume {directory} was trained with {key} {_short(saved.get(key))}, this run has "
                                  f"{_short(current.get(key))}", "the backbone, method, method settings and base model of "
                                  "the interrupted run", "pass the same --backbone, --method, --model, --prompt-len and "
                                  "--rank as the interrupted run, or start without --resume")
    diff = sorted(k for k in set(saved["recipe"]) | set(current["recipe"])
                  if saved["recipe"].get(k) != current["recipe"].get(k))
    if saved.get("world_size") != current.get("world_size"):
        diff.append("world_size")
    if diff:
        got = ", ".join(f"{k}={_pick(saved, k)} (now {_pick(current, k)})" for k in diff)
        raise ConfigError(f"--resume {directory} was written with {got}", "the recipe and world size of the interrupted "
                          "run (the data order, schedule and RNG streams depend on them)",
                          "resume with the same flags and torchrun size, or start without --resume")


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """The JSON-readable part of a sampler state (the full state, tensors included, is in optimizer.pt)."""
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str))}


def _pick(identity: dict[str, Any], key: str) -> Any:
    return identity.get("world_size") if key == "world_size" else identity["recipe"].get(key)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def get_rng_state(device: str) -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values (torch.load(weights_only=True) reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: str) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)
