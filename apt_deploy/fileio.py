"""Atomic writes and hashing (pure Python). A crash never leaves a half-written artifact that looks valid."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apt_deploy.errors import OutputExistsError


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _create_temp_file(path)
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


def _temp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` created with mode 0666 minus the umask (mkstemp would make it 0600, so an
    artifact could not be read by a server running as another user)."""
    while True:
        tmp = _temp_name(path, ".tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _create_temp_dir(out: Path) -> Path:
    """A new staging directory beside ``out``, mode 0777 minus the umask (mkdtemp would make it 0700)."""
    while True:
        stage = _temp_name(out, ".partial")
        try:
            stage.mkdir(0o777)
            return stage
        except FileExistsError:
            continue


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
    stage = _create_temp_dir(out)
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
