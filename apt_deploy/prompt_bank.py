"""The prompt bank of a multi-task artifact: one safetensors file beside ``model.onnx``.

Tensors (float32), named as the graph inputs they feed: ``apt_bank_k_{i}`` ``[T, p, d]``,
``apt_bank_v_{i}`` ``[T, p, d]`` and ``apt_bank_scale_{i}`` ``[T]`` for APT module ``i``; row ``t`` is task
``t``. The manifest's ``tasks`` section names the file, its sha256 and the task names in row order. A new
bank is written under a new name (``prompt_bank.<sha256[:12]>.safetensors``) and the manifest is then
replaced atomically: a reader sees either the old bank and names or the new ones, never a mix.

numpy + safetensors only (no torch): the Predictor and runners read it without the torch side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import CheckpointError, ConfigError, InputPathError, UnknownNameError
from apt_deploy.fileio import sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)
TASK_INPUT = "task"
FORMAT = "apt-prompt-bank/1"


def bank_names(index: int) -> tuple[str, str, str]:
    """Graph input / tensor names of APT module ``index``: (K bank, V bank, scale bank)."""
    return f"apt_bank_k_{index}", f"apt_bank_v_{index}", f"apt_bank_scale_{index}"


def stack_tasks(names: Sequence[str], rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-task rows ``{name: [p, d] | []}`` -> banks ``{name: [T, p, d] | [T]}``, checking every task has the
    same modules, prompt length and width."""
    _check_names(names)
    first = rows[0]
    for name, row in zip(names[1:], rows[1:]):
        for key, ref in first.items():
            got = row.get(key)
            if got is None or np.shape(got) != np.shape(ref):
                raise ConfigError(f"task {name!r} has {key} of shape {None if got is None else np.shape(got)}, "
                                  f"task {names[0]!r} {np.shape(ref)}",
                                  "every task with the same APT modules, prompt length p and width d",
                                  "train every task with the same APTConfig (prompt_len) on the same base model")
    return {key: np.stack([np.asarray(r[key], dtype=np.float32) for r in rows]) for key in first}


def append_task(banks: dict[str, np.ndarray], names: Sequence[str], name: str,
                row: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Banks and names with one more task (row ``T``); the existing rows are unchanged."""
    if name in names:
        raise ConfigError(f"task {name!r} is already in the bank ({', '.join(names)})", "a new task name",
                          "pick another name, or re-export the artifact to replace a task")
    extra = stack_tasks([names[0], name], [{k: v[0] for k, v in banks.items()}, row])
    return {k: np.concatenate([banks[k], extra[k][1:]]) for k in banks}, [*names, name]


def write_bank(directory: str | Path, banks: dict[str, np.ndarray], names: Sequence[str]) -> tuple[str, str]:
    """Write the bank file into ``directory`` under a content-named file; returns (file name, sha256)."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in banks.items()},
                metadata={"format": FORMAT, "tasks": json.dumps(list(names))})
    digest = hashlib.sha256(data).hexdigest()
    file_name = f"prompt_bank.{digest[:12]}.safetensors"
    write_bytes_atomic(Path(directory) / file_name, data)
    return file_name, digest


def read_bank(directory: str | Path, section: dict[str, Any]) -> dict[str, np.ndarray]:
    """The banks named by a manifest's ``tasks`` section, checked against its sha256 and task count."""
    from safetensors.numpy import load_file

    path = Path(directory) / section["bank_file"]
    if not path.is_file() or sha256_file(path) != section["bank_sha256"]:
        raise InputPathError(f"prompt bank {str(path)!r} is missing or does not match the sha256 in manifest.json",
                             "the bank file apt-deploy export / add-task wrote", "re-run apt-deploy add-task or export")
    try:
        banks = load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read prompt bank {str(path)!r}: {e}", "a complete safetensors file",
                              "re-export the artifact") from e
    rows = {int(v.shape[0]) for v in banks.values()}
    if rows != {len(section["names"])}:
        raise CheckpointError(f"prompt bank rows {sorted(rows)} but {len(section['names'])} task names in manifest.json",
                              "one bank row per task", "re-export the artifact")
    return banks


def task_index(section: dict[str, Any], task: str | int) -> int:
    """A task name (or index) -> its row; unknown names list the known ones."""
    names = list(section["names"])
    if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
        if not 0 <= int(task) < len(names):
            raise ConfigError(f"task id {int(task)}", f"an index in [0, {len(names) - 1}] ({', '.join(names)})",
                              "pass a task name or an index below the number of tasks")
        return int(task)
    if task not in names:
        raise UnknownNameError("task", str(task), names)
    return names.index(task)


def remove_stale_banks(directory: str | Path, keep: str) -> None:
    """Delete bank files other than ``keep`` (after the manifest switched to it)."""
    for path in Path(directory).glob("prompt_bank.*.safetensors"):
        if path.name != keep:
            path.unlink(missing_ok=True)
            log.info("removed old prompt bank %s", path.name)


def _check_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not n or not all(c.isalnum() or c in "-_." for c in n)]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"task names {list(names)}", "distinct names of letters, digits, '-', '_' or '.'",
                          "rename the tasks (NAME=DIR)")
