"""``manifest.json``: the hand-off between exporting and running (pure Python).

An engine, a server configuration or a benchmark is derived from the artifact directory alone:
``model.onnx`` (+ ``model.onnx.data``) and this manifest.
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from apt_deploy.errors import CheckpointError, InputPathError
from apt_deploy.fileio import read_json, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME, MODEL_NAME = "manifest.json", "model.onnx"
VERSIONED_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "numpy", "tensorrt", "triton")


def tool_versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact (absent ones omitted)."""
    from apt_deploy import __version__

    out = {"apt_deploy": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and sanity-check an artifact's manifest."""
    d = Path(directory)
    if not d.is_dir():
        raise InputPathError(f"artifact directory {str(d)!r} does not exist",
                             "a directory written by `apt-deploy export`", "check the path")
    manifest = read_json(d / MANIFEST_NAME, "manifest", "a directory written by `apt-deploy export`",
                         "re-run apt-deploy export")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"manifest schema_version={manifest.get('schema_version')!r}", f"{SCHEMA_VERSION}",
                              "re-export the artifact with this version of apt-deploy")
    return manifest


def input_shapes(manifest: dict[str, Any], which: str = "opt") -> dict[str, tuple[int, ...]]:
    """name -> the ``min``/``opt``/``max`` shape of every input."""
    return {i["name"]: tuple(i[f"{which}_shape"]) for i in manifest["inputs"]}


def onnx_files(directory: str | Path, manifest: dict[str, Any]) -> list[Path]:
    """``model.onnx`` and its external data file (if any) as the manifest lists them, in hashing order;
    a missing one is an error."""
    files = manifest.get("files") or {"model": MODEL_NAME}
    names = [files["model"]] + ([files["external_data"]] if files.get("external_data") else [])
    paths = [Path(directory) / name for name in names]
    for path in paths:
        if not path.is_file():
            raise InputPathError(f"artifact file {str(path)!r} is missing", "the files listed in manifest.json",
                                 "re-export the artifact")
    return paths


def component_dirs(directory: str | Path, manifest: dict[str, Any], first: str = "unet") -> list[tuple[str, Path]]:
    """(name, directory) of every component of a multi-component artifact (Stable Diffusion), ``first``
    first (the UNet: it runs once per denoising step); [] for a single-model artifact."""
    entries = sorted(manifest.get("components") or [], key=lambda c: c["name"] != first)
    return [(c["name"], Path(directory) / c["path"]) for c in entries]
