"""Export a multi-component model (Stable Diffusion) to one artifact directory.

Layout: ``ART/manifest.json`` (lists the components, their inputs/outputs and validation) and, per
component, ``ART/<name>/model.onnx`` (+ ``model.onnx.data`` when large) with its own ``manifest.json``
in the single-model schema, so ``apt-deploy bench|build|verify ART/<name>`` work on one component
unchanged. Non-ONNX assets the runtime needs (tokenizer, scheduler config) go beside them.

Steps (``export_components_artifact``), in a staging directory renamed into place only on success:
1. per component: export (dynamo, one fused node per APT module), attach the op's function, check;
2. validate: training form vs folded (PyTorch), each fused node vs numpy, ONNX Runtime vs PyTorch
   at every shape set of the plan; a failure raises and nothing is written;
3. the component's manifest; 4. the assets and the top-level manifest.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from apt_deploy.backbones import get_backbone
from apt_deploy.backbones.components import ComponentPlan
from apt_deploy.errors import ConfigError
from apt_deploy.fileio import atomic_directory
from apt_deploy.manifest import MODEL_NAME, write_manifest
from apt_deploy.progress import timed_step
from apt_deploy.settings import ExportSettings, tolerance
from engines.compare import assert_close
from engines.runners import OnnxRuntimeRunner
from exporters import fused_op
from exporters.onnx_export import build_manifest, export_program

log = logging.getLogger(__name__)


def export_components_artifact(model: nn.Module, folded: nn.Module, state: Any, plans: list[ComponentPlan],
                               out_dir: str | Path, settings: ExportSettings, source: dict[str, str] | None = None) -> Path:
    """Export, validate and describe every component of ``folded`` (see module docstring); ``state`` is the
    method state (``none`` for a base model)."""
    spec = get_backbone(state.backbone)
    training = _training_references(model, folded, spec, settings)
    with atomic_directory(out_dir, overwrite=settings.overwrite) as stage:
        entries = [_export_one(plan, stage, spec, folded, state, settings, source, training.get(plan.name))
                   for plan in plans]
        assets = spec.write_assets(folded, stage)
        write_manifest(stage, _top_manifest(spec, folded, state, settings, source, entries, assets, stage))
    log.info("wrote %s (%s)", out_dir, ", ".join(e["name"] for e in entries))
    return Path(out_dir)


def select_components(plans: list[ComponentPlan], names: tuple[str, ...] | None) -> list[ComponentPlan]:
    """The plans named in ``names`` (in run order); None: all. An unknown name raises."""
    if names is None:
        return plans
    known = [p.name for p in plans]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"components {list(names)}", f"a non-empty subset of {', '.join(known)}",
                          "name components this model exports (or pass None for all)")
    return [p for p in plans if p.name in names]


def _training_references(model: nn.Module, folded: nn.Module, spec: Any, settings: ExportSettings) -> dict[str, nn.Module]:
    """The training form's fp32 component modules (for training-vs-folded), when ``model`` is not folded."""
    if model is folded:
        return {}
    fp32 = dataclasses.replace(settings, dtype="fp32")
    return {p.name: p.reference for p in spec.export_components(model, fp32)}


def _export_one(plan: ComponentPlan, stage: Path, spec: Any, folded: nn.Module, state: Any, settings: ExportSettings,
                source: dict[str, str] | None, training: nn.Module | None) -> dict[str, Any]:
    directory = stage / plan.name
    directory.mkdir()
    names = [i.name for i in plan.inputs]
    with timed_step(f"export component {plan.name} to ONNX"):
        path = export_program(plan.module, plan.make_inputs("export", settings.seed), names, plan.output_names,
                              plan.dynamic_shapes, directory / MODEL_NAME, settings, f"{spec.name}/{plan.name}")
    manifest = build_manifest(spec, folded, state, plan.inputs, path, settings, source)
    manifest.update(component=plan.name, model_class=_inner_class(plan.reference), **plan.extra)
    if settings.validate:
        with timed_step(f"validate {plan.name}: ONNX Runtime vs PyTorch"):
            manifest["validation"] = validate_component(plan, path, settings, training)
    write_manifest(directory, manifest)
    return {"name": plan.name, "path": plan.name, "inputs": manifest["inputs"], "outputs": manifest["outputs"],
            "fused_op_count": manifest["fused_op"]["count"], "validation": manifest.get("validation")}


def validate_component(plan: ComponentPlan, onnx_path: Path, settings: ExportSettings,
                       training: nn.Module | None) -> dict[str, Any]:
    """Training vs folded (PyTorch), fused nodes vs numpy, ONNX Runtime vs the fp32 reference; raises on failure."""
    from exporters.validate import ORT_CPU_UNSUPPORTED, _report, check_fused_nodes, parity_tolerance

    result: dict[str, Any] = {}
    if training is not None:
        tol = tolerance("training_vs_folded")
        feed = _fp32(plan.make_inputs("opt", settings.seed))
        diffs = assert_close(run_module(training, feed, plan.output_names), run_module(plan.reference, feed, plan.output_names),
                             tol, f"{plan.name}: training form vs folded PyTorch model")
        result["training_vs_folded"] = {"tolerance": tol.to_json(), "runs": [_report("opt", diffs)]}
    if settings.dtype in ORT_CPU_UNSUPPORTED:
        return {**result, "onnxruntime_vs_torch": {"skipped": ORT_CPU_UNSUPPORTED[settings.dtype]}}
    if fused_op.fused_nodes(onnx.load(str(onnx_path), load_external_data=False)):
        result["fused_op_vs_reference"] = check_fused_nodes(onnx_path)
    result["onnxruntime_vs_torch"] = runtime_vs_reference(OnnxRuntimeRunner(onnx_path), plan, settings.dtype,
                                                          settings.seed)
    return result


def runtime_vs_reference(runner: Any, plan: ComponentPlan, dtype: str, seed: int) -> dict[str, Any]:
    """``runner`` (any engines runner) vs the plan's fp32 PyTorch reference at each of its shape sets."""
    from exporters.validate import _report, parity_tolerance

    tol, runs = parity_tolerance(dtype), []
    with runner:
        for i, which in enumerate(plan.check_shapes):
            feed = plan.make_inputs(which, seed + 1 + i)
            expected = run_module(plan.reference, _fp32(feed), plan.output_names)
            actual = runner.infer({k: v.numpy() for k, v in feed.items()})
            runs.append(_report(which, assert_close(expected, actual, tol,
                                                    f"{plan.name}: {runner.name} vs PyTorch at {which} shapes")))
    return {"tolerance": tol.to_json(), "runs": runs}


def run_module(module: nn.Module, feed: dict[str, torch.Tensor], output_names: list[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(**feed)
    values = [out] if isinstance(out, torch.Tensor) else list(out)
    return {n: v.detach().float().cpu().numpy() for n, v in zip(output_names, values)}


def _fp32(feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}


def _inner_class(module: nn.Module) -> str:
    inner = next(iter(module.children()), module)
    return type(inner).__name__


def _top_manifest(spec: Any, folded: nn.Module, state: Any, settings: ExportSettings, source: dict[str, str] | None,
                  entries: list[dict[str, Any]], assets: dict[str, str], stage: Path) -> dict[str, Any]:
    """The artifact's manifest: what every component manifest shares, plus the component list and assets."""
    first = (stage / entries[0]["path"] / "manifest.json")
    from apt_deploy.fileio import read_json

    shared = read_json(first, "component manifest", "a manifest written just now", "re-run the export")
    for key in ("files", "inputs", "outputs", "fused_op", "opset", "validation", "component"):
        shared.pop(key, None)
    shared["model_class"] = type(folded).__name__
    shared["sha256"] = {k: v for k, v in shared["sha256"].items() if k not in ("onnx", "onnx_data")}
    return {**shared, "components": entries, "assets": assets,
            "fused_op_count": sum(e["fused_op_count"] for e in entries)}


class _OutputsAsList(nn.Module):
    """A component's reference in the torch-cuda runner's form (outputs as a list)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **feed: torch.Tensor) -> list[torch.Tensor]:
        out = self.module(**feed)
        return [out] if isinstance(out, torch.Tensor) else list(out)
