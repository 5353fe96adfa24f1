"""Atomic writes and hashing (pure Python). A crash never leaves a half-written artifact that looks valid."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apt_deploy.errors import OutputExistsError


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_existing(out: str | Path, overwrite: bool, flag: str = "path") -> None:
    """Raise OutputExistsError when ``out`` exists and overwriting was not asked for."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"output directory {str(out)!r} already exists", "a path that does not exist yet",
                                f"choose another {flag} or pass --overwrite")


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``out_dir``; on success it is renamed into place.

    On any error the staging directory is removed, so ``out_dir`` is either absent, the previous
    version, or complete. ``out_dir`` existing without ``overwrite`` is refused before work starts.
    """
    out = Path(out_dir)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield stage
        if out.exists():
            trash = out.with_name(f".{out.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(out, trash)
            os.replace(stage, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path, what: str, expected: str, fix: str, error: type[Exception] | None = None) -> Any:
    """Parse a JSON file; a missing file raises InputPathError, invalid JSON ``error`` (default
    CheckpointError), both saying what was expected and how to fix it."""
    from apt_deploy.errors import CheckpointError, InputPathError

    path = Path(path)
    if not path.is_file():
        raise InputPathError(f"{what} {str(path)!r} does not exist", expected, fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise (error or CheckpointError)(f"{what} {str(path)!r} is not valid JSON ({e})", expected, fix) from e
