"""Offline validation of a Triton model repository.

1. Syntax: every ``config.pbtxt`` is re-parsed with tritonclient's ``model_config`` protobuf
   (misspelled fields, bad enums and wrong value types fail with line:column).
2. Meaning, which the protobuf does not check: the name matches the directory, the model file exists,
   the batching makes sense, the model step's names / dtypes / dims match the artifact's manifest and its
   ``max_batch_size`` lies in the export's batch range, and every ensemble is wired consistently (each
   step's tensors exist with the same dtype and dims, every ensemble output is produced).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError, InputPathError
from apt_deploy.prompt_bank import TASK_INPUT

MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}


def step_inputs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The model step's inputs as Triton sees them: the manifest's, except that a multi-task artifact's int64
    ``task`` ids arrive as task *names* (BYTES [1] per row), which the python model step maps to ids."""
    if not manifest.get("tasks"):
        return list(manifest["inputs"])
    return [{**i, "dtype": "bytes", "axes": [i["axes"][0], 1]} if i["name"] == TASK_INPUT else i
            for i in manifest["inputs"]]


def parse_config(path: Path) -> Any:
    from google.protobuf import text_format

    from apt_deploy.serving.triton_repo import model_config_pb2

    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2().ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: {e}", "a config.pbtxt that parses as Triton's ModelConfig",
                          "fix the field at that line:column (see Triton's model_config.proto)") from e


def validate_repository(repo: str | Path) -> dict[str, Any]:
    """Parse and check every model of the repository; raise ConfigError listing every problem found."""
    repo = Path(repo)
    if not repo.is_dir():
        raise InputPathError(f"model repository {str(repo)!r} does not exist", "a directory of model directories",
                             "check the path")
    configs = {d.name: parse_config(d / "config.pbtxt") for d in sorted(repo.iterdir()) if (d / "config.pbtxt").is_file()}
    problems: list[str] = []
    for name, cfg in configs.items():
        problems += check_model(repo / name, cfg)
        if cfg.platform == "ensemble":
            problems += check_ensemble(cfg, configs)
    if not configs:
        problems.append("no model directory with a config.pbtxt")
    if problems:
        raise ConfigError(f"invalid Triton model repository {str(repo)!r}: " + "; ".join(problems),
                          "configs consistent with their artifacts and ensembles wired end to end",
                          "regenerate the repository with apt-deploy triton-repo")
    return {"repository": str(repo), "models": sorted(configs), "valid": True}


def check_model(model_dir: Path, cfg: Any) -> list[str]:
    name, problems = model_dir.name, []
    if cfg.name != name:
        problems.append(f"{name}: config name {cfg.name!r} differs from its directory")
    if not (model_dir / "1").is_dir():
        problems.append(f"{name}: no version directory 1/")
    wanted = "model.py" if cfg.backend == "python" else MODEL_FILES.get(cfg.platform)
    if wanted and not (model_dir / "1" / wanted).is_file():
        problems.append(f"{name}: 1/{wanted} is missing")
    if cfg.HasField("dynamic_batching") and cfg.max_batch_size < 1:
        problems.append(f"{name}: dynamic_batching with max_batch_size {cfg.max_batch_size}")
    for what, tensors in (("input", cfg.input), ("output", cfg.output)):
        names = [t.name for t in tensors]
        if not names:
            problems.append(f"{name}: no {what}s")
        if len(set(names)) != len(names):
            problems.append(f"{name}: repeated {what} names {names}")
    manifest = model_dir / "1" / "apt_deploy_manifest.json"
    if manifest.is_file():
        problems += check_against_manifest(name, cfg, json.loads(manifest.read_text(encoding="utf-8")))
    return problems


def check_against_manifest(name: str, cfg: Any, manifest: dict[str, Any]) -> list[str]:
    """The model step: inputs / outputs (name, dtype, dims without batch) and max_batch_size vs the export."""
    from apt_deploy.serving.triton_repo import TRITON_DTYPES

    mc_types = _type_names()
    problems = []
    for what, tensors, spec in (("input", cfg.input, step_inputs(manifest)), ("output", cfg.output, manifest["outputs"])):
        got = [(t.name, mc_types[t.data_type], list(t.dims)) for t in tensors]
        want = [(s["name"], TRITON_DTYPES.get(s["dtype"], s["dtype"]), [a if isinstance(a, int) else -1 for a in s["axes"][1:]])
                for s in spec]
        if got != want:
            problems.append(f"{name}: {what}s {got} differ from the manifest's {want}")
    high = min(int(i["max_shape"][0]) for i in manifest["inputs"])
    if not 1 <= cfg.max_batch_size <= high:
        problems.append(f"{name}: max_batch_size {cfg.max_batch_size} outside the export's batch range 1..{high}")
    return problems


def check_ensemble(cfg: Any, configs: dict[str, Any]) -> list[str]:
    """Each step's model exists; its input_map keys are its inputs (all of them) and the values are ensemble
    inputs or earlier outputs with the same dtype / dims; every ensemble output is produced."""
    types = _type_names()
    available = {t.name: (types[t.data_type], list(t.dims)) for t in cfg.input}
    problems: list[str] = []
    for number, step in enumerate(cfg.ensemble_scheduling.step):
        model = configs.get(step.model_name)
        where = f"{cfg.name} step {number} ({step.model_name})"
        if model is None:
            problems.append(f"{where}: no such model in the repository")
            continue
        inputs = {t.name: (types[t.data_type], list(t.dims)) for t in model.input}
        outputs = {t.name: (types[t.data_type], list(t.dims)) for t in model.output}
        if set(step.input_map) != set(inputs):
            problems.append(f"{where}: input_map keys {sorted(step.input_map)} are not its inputs {sorted(inputs)}")
        for key, tensor in step.input_map.items():
            if tensor not in available:
                problems.append(f"{where}: input {tensor!r} is neither an ensemble input nor an earlier output")
            elif key in inputs and available[tensor] != inputs[key]:
                problems.append(f"{where}: {tensor!r} is {available[tensor]} but {key!r} wants {inputs[key]}")
        for key, tensor in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: output_map key {key!r} is not one of its outputs {sorted(outputs)}")
            else:
                available[tensor] = outputs[key]
    for t in cfg.output:
        if t.name not in available:
            problems.append(f"{cfg.name}: ensemble output {t.name!r} is produced by no step")
        elif available[t.name] != (types[t.data_type], list(t.dims)):
            problems.append(f"{cfg.name}: output {t.name!r} is {available[t.name]} but declared "
                            f"{(types[t.data_type], list(t.dims))}")
    return problems


def _type_names() -> dict[int, str]:
    from apt_deploy.serving.triton_repo import model_config_pb2

    mc = model_config_pb2()
    return {v: k for k, v in mc.DataType.items()}
