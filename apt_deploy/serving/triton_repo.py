"""A Triton model repository from artifacts: per artifact NAME,

* ``NAME_model``  -- the model: ``onnxruntime_onnx`` (model.onnx), ``tensorrt_plan`` (the engine of
                     ``apt-deploy build``), or a python-backend model running ONNX Runtime (``python``);
* ``NAME_pre``    -- python backend: encoded ``image`` bytes (+ ``question``) -> the model's inputs;
* ``NAME_post``   -- python backend: ``logits`` -> top-k ``labels`` (BYTES) and ``scores`` (FP32);
* ``NAME``        -- the ensemble of the three: ``image`` (+ ``question``) in, ``labels`` + ``scores`` out.

A multi-task artifact (docs/serving.md, "One server, many tasks") also takes ``task`` (the task's name, BYTES,
per row): the ensemble passes it to the python model step, which maps names to rows of the prompt bank it
feeds with every batch; one dynamic batch may mix tasks.

Every ``config.pbtxt`` is generated with tritonclient's ``model_config`` protobuf from the manifest and
validated by re-parsing it plus our own checks (:func:`validate_repository`).
"""

from __future__ import annotations

import logging
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError, InputPathError, MissingDependencyError
from apt_deploy.fileio import atomic_directory, write_bytes_atomic, write_json_atomic
from apt_deploy.manifest import read_manifest
from apt_deploy.serving.predict import check_assets
from apt_deploy.prompt_bank import TASK_INPUT
from apt_deploy.serving.triton_validate import step_inputs, validate_repository
from apt_deploy.settings import TritonRepoSettings

log = logging.getLogger(__name__)
BACKENDS = ("onnxruntime", "tensorrt", "python")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "bytes": "TYPE_STRING"}
MANIFEST_COPY = "apt_deploy_manifest.json"  # inside NAME_model/1/: what the validator checks the config against
REPO_INFO = "apt_deploy_repository.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_config_pb2() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2 as mc
    except ImportError as e:
        raise MissingDependencyError(f"tritonclient's model_config protobuf is not importable ({e})",
                                     "tritonclient[grpc] installed", 'pip install "apt-deploy[serve]"') from e
    return mc


def build_repository(artifacts: dict[str, str | Path], out: str | Path, settings: TritonRepoSettings,
                     overwrite: bool = False) -> dict[str, Any]:
    """Write the repository for ``{model name: artifact dir}`` atomically; returns the validation report."""
    _check_settings(settings)
    for name in artifacts:
        _check_name(name)
    with atomic_directory(out, overwrite=overwrite) as stage:
        info = {name: add_artifact(stage, name, Path(art), settings) for name, art in artifacts.items()}
        report = validate_repository(stage)
        write_json_atomic(stage / REPO_INFO, {"backend": settings.backend, "models": info})
    return report


def add_artifact(repo: Path, name: str, artifact: Path, settings: TritonRepoSettings) -> dict[str, Any]:
    """The four models of one artifact; returns its entry of ``apt_deploy_repository.json``."""
    manifest = read_manifest(artifact)
    _check_tasks(artifact, manifest, settings)
    assets = check_assets(artifact, manifest)
    batch = resolve_max_batch(manifest, settings.max_batch)
    recipe_inputs = request_inputs(manifest)
    step = _write_model_step(repo, name, artifact, manifest, settings, batch)
    for kind in ("pre", "post"):
        _write_python_model(repo / f"{name}_{kind}", kind, assets)
    labels = _label_count(manifest)
    k = min(settings.top_k, labels)
    write_config(repo / f"{name}_pre", pre_config(f"{name}_pre", manifest, recipe_inputs, batch, settings))
    write_config(repo / f"{name}_post", post_config(f"{name}_post", manifest, k, batch, settings))
    write_config(repo / name, ensemble_config(name, manifest, recipe_inputs, k, batch))
    (repo / name / "1").mkdir(exist_ok=True)  # Triton wants a version directory even for an ensemble
    return {"artifact": str(artifact.resolve()), "max_batch_size": batch, "top_k": k, "model_step": step,
            "inputs": ensemble_inputs(manifest, recipe_inputs), "task": manifest["inference"].get("task"),
            "tasks": list(manifest["tasks"]["names"]) if manifest.get("tasks") else None}


def _check_tasks(artifact: Path, manifest: dict[str, Any], settings: TritonRepoSettings) -> None:
    """A multi-task artifact needs its prompt bank fed with every batch: only the python model step does that."""
    if manifest.get("tasks") and settings.backend != "python":
        raise ConfigError(f"artifact {str(artifact)!r} serves {len(manifest['tasks']['names'])} tasks, "
                          f"--backend {settings.backend}",
                          "--backend python (its model step feeds the prompt bank with every batch; Triton's "
                          "onnxruntime / tensorrt_plan backends cannot, and the TensorRT plugin for op version 2 is "
                          "not written)", "pass --backend python (apt-deploy serve uses it), or export one artifact "
                          "per task")


def ensemble_inputs(manifest: dict[str, Any], request_inputs: list[str]) -> list[str]:
    """What a request sends: ``image`` (+ ``question``), + ``task`` (its name) for a multi-task artifact."""
    return [*request_inputs, TASK_INPUT] if manifest.get("tasks") else list(request_inputs)


def pre_outputs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The model inputs the pre step computes: all of them, except a multi-task artifact's ``task`` (the request's
    own input, passed straight to the model step)."""
    return [i for i in manifest["inputs"] if i["name"] != TASK_INPUT or not manifest.get("tasks")]


def request_inputs(manifest: dict[str, Any]) -> list[str]:
    """The ensemble's inputs: ``image`` (+ ``question`` for VQA), as the artifact's inference section says."""
    inputs = manifest["inference"].get("request_inputs")
    if inputs not in (["image"], ["image", "question"]):
        raise ConfigError(f"inference.request_inputs {inputs!r} in the manifest", '["image"] or ["image", "question"]',
                          "re-export the artifact with this version of apt-deploy")
    return list(inputs)


def resolve_max_batch(manifest: dict[str, Any], wanted: int | None) -> int:
    """``max_batch_size``: within the export's batch range (whose minimum must be 1: Triton sends any size)."""
    low = max(int(i["min_shape"][0]) for i in manifest["inputs"])
    high = min(int(i["max_shape"][0]) for i in manifest["inputs"])
    if low != 1:
        raise ConfigError(f"the artifact's batch range starts at {low}", "an export with a minimum batch of 1 "
                          "(Triton's dynamic batcher sends batches of any size up to max_batch_size)",
                          "re-export with --batch 1,OPT,MAX")
    batch = high if wanted is None else wanted
    if not 1 <= batch <= high:
        raise ConfigError(f"--max-batch {wanted}", f"1..{high} (the export's batch range is {low}..{high})",
                          f"pass --max-batch {high} or less, or re-export with a larger --batch")
    return batch


# --- configs -------------------------------------------------------------------------------------
def model_step_config(name: str, manifest: dict[str, Any], settings: TritonRepoSettings, batch: int) -> Any:
    mc = model_config_pb2()
    cfg = mc.ModelConfig(name=name, max_batch_size=batch)
    if settings.backend == "onnxruntime":
        cfg.platform, cfg.default_model_filename = "onnxruntime_onnx", "model.onnx"
    elif settings.backend == "tensorrt":
        cfg.platform, cfg.default_model_filename = "tensorrt_plan", "model.plan"
    else:
        cfg.backend = "python"
        cfg.parameters["intra_op_threads"].string_value = str(settings.intra_op_threads)
    for i in step_inputs(manifest):
        cfg.input.add(name=i["name"], data_type=_dtype(i["dtype"]), dims=_dims(i["axes"]))
    for o in manifest["outputs"]:
        cfg.output.add(name=o["name"], data_type=_dtype(o["dtype"]), dims=_dims(o["axes"]))
    _batching(cfg, settings, batch)
    kind = {"tensorrt": "KIND_GPU", "python": "KIND_CPU"}.get(settings.backend, "KIND_AUTO")
    cfg.instance_group.add(count=settings.instances, kind=kind)
    return cfg


def pre_config(name: str, manifest: dict[str, Any], request_inputs: list[str], batch: int,
               settings: TritonRepoSettings) -> Any:
    mc = model_config_pb2()
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=batch)
    for n in request_inputs:
        cfg.input.add(name=n, data_type="TYPE_STRING", dims=[1])
    for i in pre_outputs(manifest):
        cfg.output.add(name=i["name"], data_type=_dtype(i["dtype"]), dims=_dims(i["axes"]))
    cfg.parameters["max_image_bytes"].string_value = str(settings.max_image_bytes)
    _batching(cfg, settings, batch)
    cfg.instance_group.add(count=settings.instances, kind="KIND_CPU")
    return cfg


def post_config(name: str, manifest: dict[str, Any], k: int, batch: int, settings: TritonRepoSettings) -> Any:
    mc = model_config_pb2()
    logits = _logits(manifest)
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=batch)
    cfg.input.add(name="logits", data_type=_dtype(logits["dtype"]), dims=_dims(logits["axes"]))
    cfg.output.add(name="labels", data_type="TYPE_STRING", dims=[k])
    cfg.output.add(name="scores", data_type="TYPE_FP32", dims=[k])
    cfg.parameters["top_k"].string_value = str(k)
    _batching(cfg, settings, batch)
    cfg.instance_group.add(count=settings.instances, kind="KIND_CPU")
    return cfg


def ensemble_config(name: str, manifest: dict[str, Any], request_inputs: list[str], k: int, batch: int) -> Any:
    mc = model_config_pb2()
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=batch)
    for n in ensemble_inputs(manifest, request_inputs):
        cfg.input.add(name=n, data_type="TYPE_STRING", dims=[1])
    cfg.output.add(name="labels", data_type="TYPE_STRING", dims=[k])
    cfg.output.add(name="scores", data_type="TYPE_FP32", dims=[k])
    model_inputs = [i["name"] for i in manifest["inputs"]]
    steps = [(f"{name}_pre", request_inputs, [i["name"] for i in pre_outputs(manifest)]),
             (f"{name}_model", model_inputs, ["logits"]),
             (f"{name}_post", ["logits"], ["labels", "scores"])]
    for model, ins, outs in steps:
        step = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update({n: n for n in ins})
        step.output_map.update({n: n for n in outs})
    return cfg


def write_config(model_dir: Path, cfg: Any) -> Path:
    from google.protobuf import text_format

    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    write_bytes_atomic(path, text_format.MessageToString(cfg).encode())
    return path


def _batching(cfg: Any, settings: TritonRepoSettings, batch: int) -> None:
    cfg.dynamic_batching.max_queue_delay_microseconds = settings.queue_delay_us
    if batch > 1:
        cfg.dynamic_batching.preferred_batch_size.append(batch)


def _dtype(name: str) -> str:
    if name not in TRITON_DTYPES:
        raise ConfigError(f"tensor dtype {name!r}", f"one of {', '.join(TRITON_DTYPES)}", "re-export as fp32 or fp16")
    return TRITON_DTYPES[name]


def _dims(axes: list[int | str]) -> list[int]:
    """Manifest axes without the batch axis; other named (dynamic) axes become -1."""
    return [a if isinstance(a, int) else -1 for a in axes[1:]]


def _logits(manifest: dict[str, Any]) -> dict[str, Any]:
    out = [o for o in manifest["outputs"] if o["name"] == "logits"]
    if not out:
        raise ConfigError(f"artifact outputs {[o['name'] for o in manifest['outputs']]}", "a 'logits' output (a task head)",
                          "export a model with its task head (ViltForQuestionAnswering, CLIP with class names)")
    return out[0]


def _label_count(manifest: dict[str, Any]) -> int:
    return int(_logits(manifest)["axes"][-1])


# --- files ---------------------------------------------------------------------------------------
def _write_model_step(repo: Path, name: str, artifact: Path, manifest: dict[str, Any], settings: TritonRepoSettings,
                      batch: int) -> dict[str, Any]:
    from apt_deploy.manifest import onnx_files

    version = repo / f"{name}_model" / "1"
    version.mkdir(parents=True)
    step: dict[str, Any] = {"backend": settings.backend}
    if settings.backend == "tensorrt":
        step.update(_copy_engine(artifact, manifest, settings, version / "model.plan"))
    else:
        for path in onnx_files(artifact, manifest):
            shutil.copyfile(path, version / path.name)
        if settings.backend == "python":
            _copy_template("ort_model", version / "model.py")
        if manifest.get("tasks"):  # the python model step feeds it (checked against bank_sha256 when loaded)
            shutil.copyfile(artifact / manifest["tasks"]["bank_file"], version / manifest["tasks"]["bank_file"])
    write_json_atomic(version / MANIFEST_COPY, manifest)
    write_config(version.parent, model_step_config(f"{name}_model", manifest, settings, batch))
    return step


def _copy_engine(artifact: Path, manifest: dict[str, Any], settings: TritonRepoSettings, dest: Path) -> dict[str, Any]:
    """The TensorRT engine of ``apt-deploy build``; a JIT-plugin engine is refused (it calls back into Python,
    which Triton's tensorrt_plan backend cannot do)."""
    from engines.trt_build import default_engine_path
    from engines.trt_runner import read_metadata

    engine = Path(settings.engine) if settings.engine else default_engine_path(artifact, manifest.get("dtype", "fp32"))
    meta = read_metadata(engine)
    mode = (meta.get("plugin") or {}).get("mode", "none")
    if mode == "jit":
        raise ConfigError(f"engine {str(engine)!r} uses the JIT (Python) plugin", "an engine with the AOT plugin or "
                          "without the plugin (Triton's tensorrt_plan backend runs no Python)",
                          f"rebuild: apt-deploy build {artifact} --plugin-mode aot (or --no-plugin)")
    shutil.copyfile(engine, dest)
    return {"engine": str(engine), "plugin_mode": mode, "tensorrt_version": meta.get("tensorrt_version"),
            "device": meta.get("device")}


def _write_python_model(model_dir: Path, kind: str, assets: Path) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True)
    _copy_template(kind, version / "model.py")
    shutil.copyfile(Path(__file__).with_name("preprocess.py"), version / "apt_preprocess.py")
    shutil.copytree(assets, version / "assets", copy_function=shutil.copyfile)


def _copy_template(kind: str, dest: Path) -> None:
    text = resources.files("apt_deploy.serving.triton_models").joinpath(f"{kind}.py").read_text(encoding="utf-8")
    write_bytes_atomic(dest, text.encode())


def _check_settings(settings: TritonRepoSettings) -> None:
    if settings.backend not in BACKENDS:
        raise ConfigError(f"--backend {settings.backend!r}", f"one of {', '.join(BACKENDS)}", "pick one of those")
    if settings.instances < 1 or settings.top_k < 1:
        raise ConfigError(f"--instances {settings.instances}, --top-k {settings.top_k}", "integers >= 1", "fix the flag")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name) or name.endswith(("_pre", "_post", "_model")):
        raise ConfigError(f"model name {name!r}", "letters, digits, '_', '-', '.', not ending in _pre/_post/_model",
                          "name it explicitly: NAME=ARTIFACT_DIR")


def parse_artifact_args(items: list[str]) -> dict[str, str]:
    """``ART`` or ``NAME=ART`` -> {name: dir}; the default name is the directory's name."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (re.sub(r"[^A-Za-z0-9_.-]", "_", Path(item).resolve().name), item)
        if name in out:
            raise ConfigError(f"two artifacts named {name!r}", "one name per artifact", f"name them: {name}2={path}")
        if not Path(path).is_dir():
            raise InputPathError(f"artifact directory {path!r} does not exist", "a directory written by apt-deploy export",
                                 "check the path")
        out[name] = path
    return out
