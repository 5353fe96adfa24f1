"""``apt-deploy verify`` as a function: re-run an artifact's parity checks from the artifact directory and
its manifest (plus the source model / prompt directories for the PyTorch side).

Orchestration (layer L4, apt_deploy/layers.py): it composes the PyTorch form of the artifact
(apt_deploy.pipeline), a runner (engines) and the checks (exporters.validate).
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def verify_artifact(artifact_dir: str | Path, model_dir: str | None = None, prompts_dir: str | None = None,
                    backend: str = "onnxruntime", seed: int | None = None) -> dict[str, Any]:
    """1. integrity  2. runner up (a missing backend fails before any model loads)  3. fused nodes vs numpy
    (ONNX Runtime CPU; skipped with the reason for dtypes it cannot run)  4. the backend vs PyTorch on CPU
    in fp32, at every shape set the export checked. Works on base-model artifacts (method ``none``) too."""
    from apt_deploy.errors import ConfigError
    from apt_deploy.manifest import read_manifest
    from apt_deploy.pipeline import load_reference_module
    from engines.runners import make_runner
    from exporters.validate import ORT_CPU_UNSUPPORTED, check_fused_nodes, check_integrity

    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    if manifest.get("tasks"):  # docs/serving.md "One server, many tasks"
        raise ConfigError(f"artifact {str(directory)!r} serves {len(manifest['tasks']['names'])} tasks",
                          "a single-task artifact (verify does not feed the prompt bank)",
                          "its export validated ONNX Runtime vs PyTorch on a mixed-task batch (manifest "
                          "\"validation\"); re-export to re-check, or export a task alone and verify that")
    if "components" in manifest:  # Stable Diffusion: one check set per component
        return verify_components(directory, manifest, model_dir, prompts_dir, backend, seed)
    dtype = manifest["dtype"]
    report: dict[str, Any] = {"integrity": check_integrity(directory, manifest)}
    if backend == "onnxruntime" and dtype in ORT_CPU_UNSUPPORTED:
        raise ConfigError(f"a {dtype} artifact cannot run on ONNX Runtime CPU", "a backend with bfloat16 kernels",
                          ORT_CPU_UNSUPPORTED[dtype])
    reference = functools.cache(lambda: load_reference_module(manifest, model_dir, prompts_dir))
    # the backend gets its own copy: it may move it to a device / dtype, the CPU fp32 reference stays put
    runner = make_runner(backend, directory, load_model=lambda: copy.deepcopy(reference()))
    runner.activate()
    if dtype in ORT_CPU_UNSUPPORTED:
        reason = f"fused-node check skipped: it runs on ONNX Runtime CPU. {ORT_CPU_UNSUPPORTED[dtype]}"
        log.warning("%s", reason)
        report["fused_op_vs_reference"] = {"skipped": reason}
    else:
        report["fused_op_vs_reference"] = check_fused_nodes(directory / manifest["files"]["model"])
    with runner:
        report[f"{backend}_vs_torch"] = _backend_vs_torch(runner, reference(), manifest, seed)
    return report


def _backend_vs_torch(runner: Any, reference: Any, manifest: dict[str, Any], seed: int | None) -> dict[str, Any]:
    from apt_deploy.backbones.registry import InputSpec
    from exporters.validate import runtime_vs_torch

    specs = [InputSpec(i["name"], i["dtype"], tuple(i["axes"]), tuple(i["min_shape"]), tuple(i["opt_shape"]),
                       tuple(i["max_shape"])) for i in manifest["inputs"]]
    seed = manifest["export_settings"]["seed"] if seed is None else seed
    return runtime_vs_torch(runner, reference.module, reference.spec, reference.folded, specs, manifest["dtype"], seed)


def verify_components(directory: Path, manifest: dict[str, Any], model_dir: str | None, prompts_dir: str | None,
                      backend: str, seed: int | None) -> dict[str, Any]:
    """``apt-deploy verify`` for a multi-component artifact: per component, file hashes + checker, fused nodes vs
    numpy, ``backend`` vs the folded PyTorch component (rebuilt from the source directories). Keys are
    ``<component>.<check>``."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.manifest import MODEL_NAME, read_manifest
    from apt_deploy.pipeline import load_folded_from_manifest
    from apt_deploy.settings import ExportSettings
    from engines.runners import make_runner
    from exporters.components import _OutputsAsList, runtime_vs_reference
    from exporters.validate import check_fused_nodes, check_integrity

    folded = load_folded_from_manifest(manifest, model_dir, prompts_dir)
    settings = ExportSettings(**manifest["export_settings"])
    plans = {p.name: p for p in get_backbone(manifest["backbone"]).export_components(folded, settings)}
    seed = settings.seed if seed is None else seed
    report: dict[str, Any] = {}
    for entry in manifest["components"]:
        name, sub_dir = entry["name"], directory / entry["path"]
        sub = read_manifest(sub_dir)
        report[f"{name}.integrity"] = check_integrity(sub_dir, sub)
        if sub["fused_op"]["count"]:
            report[f"{name}.fused_op_vs_reference"] = check_fused_nodes(sub_dir / MODEL_NAME)
        plan = plans[name]
        extra = {"load_model": lambda plan=plan: _OutputsAsList(plan.reference)} if backend == "torch-cuda" else {}
        report[f"{name}.{backend}_vs_torch"] = runtime_vs_reference(make_runner(backend, sub_dir, **extra), plan,
                                                                    sub["dtype"], seed)
    return report
