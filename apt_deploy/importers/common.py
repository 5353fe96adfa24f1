"""Reading an official checkpoint without executing pickled code, and key-set checks with full lists."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch

from apt_deploy.errors import CheckpointError, InputPathError

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning ``.ckpt`` (``["state_dict"]``), a plain ``.pt``/``.pth`` state dict or a
    ``.safetensors`` file. Pickles load with ``torch.load(weights_only=True)``: a pickle that needs code
    (any class or function outside torch's weights-only allow-list) is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise InputPathError(f"checkpoint {str(path)!r} does not exist", "a .ckpt, .pt, .pth or .safetensors file",
                             "check --checkpoint")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict",
                              "a dict of tensors, or a Lightning checkpoint with one under 'state_dict'",
                              "save model.state_dict() (or the Lightning checkpoint itself)")
    odd = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise CheckpointError(f"the state dict of {str(path)!r} has non-tensor entries {odd[:8]}",
                              "tensors only under 'state_dict'", "re-save the weights alone")
    log.info("read %d tensors from %s", len(state), path)
    return dict(state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: {e}", "a complete .safetensors file",
                              "re-copy or re-save it") from e


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{str(path)!r} is a pickle that needs code to load ({_unsafe_globals(path, e)}); it was not loaded",
            "a weights-only checkpoint: tensors and plain Python containers (torch.load(weights_only=True) accepts it)",
            "in an environment you trust, re-save only the weights, e.g. "
            "torch.save(torch.load(F, weights_only=False)['state_dict'], 'weights.pt'), or save them as .safetensors") from e
    except Exception as e:  # a truncated zip, not a torch file at all, ...
        raise CheckpointError(f"cannot read {str(path)!r}: {type(e).__name__}: {str(e)[:300]}",
                              "a file written by torch.save or safetensors", "re-copy the file; check it is complete") from e


def _unsafe_globals(path: Path, error: Exception) -> str:
    """The globals the pickle references outside the allow-list (torch lists them for zip checkpoints)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a legacy (non-zip) pickle: torch's own message names the first offending global
        first = next((line for line in str(error).splitlines() if "global" in line.lower()), str(error)[:200])
        return first.strip()
    return "references " + ", ".join(names[:8])


def check_keys(kind: str, expected: Iterable[str], received: Iterable[str], fix: str) -> None:
    """Raise with both lists when the key sets differ."""
    expected, received = set(expected), set(received)
    missing, unknown = sorted(expected - received), sorted(received - expected)
    if missing or unknown:
        raise CheckpointError(f"{kind}: {len(unknown)} unknown keys {unknown[:20]}, {len(missing)} missing keys {missing[:20]}",
                              "exactly the official key names of one model (see the README, 'Import')", fix)


def check_shapes(kind: str, expected: dict[str, torch.Size], received: dict[str, torch.Tensor], fix: str) -> None:
    wrong = [f"{k}: {tuple(received[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if k in received and tuple(received[k].shape) != tuple(s)]
    if wrong:
        raise CheckpointError(f"{kind}: {len(wrong)} tensors have the wrong shape: {wrong[:10]}",
                              "shapes consistent with the architecture inferred from the checkpoint", fix)
