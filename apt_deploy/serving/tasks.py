"""Tasks of a multi-task artifact: add tasks without touching ``model.onnx``, and build a request's task feed.

Adding a task folds its APT checkpoint (the same ``folded_constants`` a single-task export uses), checks it
shares the artifact's base model and non-prompt tensors (``tasks.shared_sha256``), appends one row to every
bank, writes the new bank file under a new content name, then replaces ``manifest.json`` atomically and
removes the old bank. An exclusive lock on the artifact directory serialises concurrent ``add-task`` runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.errors import CheckpointError, ConfigError, InputPathError
from apt_deploy.manifest import read_manifest, write_manifest
from apt_deploy.prompt_bank import TASK_INPUT, append_task, read_bank, remove_stale_banks, task_index, write_bank

log = logging.getLogger(__name__)
LOCK_NAME = ".add-task.lock"


def tasks_section(manifest: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    section = manifest.get("tasks")
    if not section:
        raise ConfigError(f"artifact {str(directory)!r} serves one task (its manifest has no \"tasks\" section)",
                          "a multi-task artifact", "export one with apt-deploy export --prompts NAME=DIR NAME=DIR ...")
    return section


def add_tasks(artifact: str | Path, pairs: Sequence[tuple[str, str]], model_dir: str | None = None) -> list[str]:
    """Append tasks ``(name, prompt_dir)`` to a multi-task artifact; returns every task name, in row order."""
    directory = Path(artifact)
    with _locked(directory):
        manifest = read_manifest(directory)
        section = tasks_section(manifest, directory)
        banks, names = read_bank(directory, section), list(section["names"])
        if len(names) + len(pairs) > section["max_tasks"]:
            raise ConfigError(f"{len(names)} tasks + {len(pairs)} new", f"at most {section['max_tasks']} (the bank "
                              "inputs' range the artifact was exported with)", "re-export with a larger --max-tasks")
        sources = dict(section.get("sources") or {})
        for name, prompt_dir in pairs:
            banks, names = append_task(banks, names, name, _task_row(manifest, prompt_dir, model_dir))
            sources[name] = str(Path(prompt_dir).resolve())
        bank_file, digest = write_bank(directory, banks, names)
        manifest["tasks"] = {**section, "names": names, "bank_file": bank_file, "bank_sha256": digest, "sources": sources}
        write_manifest(directory, manifest)
        remove_stale_banks(directory, bank_file)
    log.info("%s: added %s (%d tasks)", directory, ", ".join(n for n, _ in pairs), len(names))
    return names


def _task_row(manifest: dict[str, Any], prompt_dir: str, model_dir: str | None) -> dict[str, np.ndarray]:
    from apt_deploy.methods.multitask import shared_fingerprint, task_bank
    from apt_deploy.pipeline import load_trained

    model_dir = model_dir or (manifest.get("source") or {}).get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        raise InputPathError(f"the artifact's base model directory is not available ({model_dir!r})",
                             "the base model directory the artifact was exported from", "pass --model MODEL_DIR")
    model = load_trained(model_dir, prompt_dir, manifest["backbone"])
    if shared_fingerprint(model) != manifest["tasks"]["shared_sha256"]:
        raise CheckpointError(f"prompts {prompt_dir!r} were trained with a base model, head or extras other than the "
                              "artifact's tasks", "a task sharing everything but its APT prompts with the artifact",
                              "train it on the same base (and head, train_head=False) or export it separately")
    return {k: v.numpy() for k, v in task_bank(model).items()}


class TaskFeed:
    """The bank arrays of a multi-task artifact and the ``task`` input for a batch of requests."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any]) -> None:
        self.section = manifest.get("tasks")
        self.banks = read_bank(directory, self.section) if self.section else {}

    @property
    def names(self) -> list[str]:
        return list(self.section["names"]) if self.section else []

    def __call__(self, tasks: Sequence[str | int | None]) -> dict[str, np.ndarray]:
        if not self.section:
            given = [t for t in tasks if t is not None]
            if given:
                raise ConfigError(f"task {given[0]!r} for a single-task artifact", "no task", "drop --task / \"task\"")
            return {}
        missing = [i for i, t in enumerate(tasks) if t is None]
        if missing:
            raise ConfigError("a request without a task for a multi-task artifact",
                              f"a task name, one of: {', '.join(self.names)}", 'pass --task NAME (JSONL: "task")')
        ids = np.array([task_index(self.section, t) for t in tasks], dtype=np.int64)
        return {TASK_INPUT: ids, **self.banks}


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    import fcntl

    if not directory.is_dir():
        raise InputPathError(f"artifact directory {str(directory)!r} does not exist", "a multi-task artifact",
                             "check the path")
    with open(directory / LOCK_NAME, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
