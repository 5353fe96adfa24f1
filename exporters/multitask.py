"""Export T APT tasks as ONE artifact: ``model.onnx`` whose inputs are the model's, ``task`` [B] and the
per-module prompt banks, plus the bank file (apt_deploy/prompt_bank.py) and the manifest's ``tasks`` section.

Steps (``export_multitask_artifact``): 1. check the tasks share everything but their APT prompts and
stack their folded K, V, e^s into banks; 2. export the bank-reading model (apt_deploy/methods/multitask.py)
with one fused op of version 2 per APT module; 3. write the bank file and the manifest; 4. validate ONNX
Runtime against PyTorch on a batch that mixes every task. All in a staging directory renamed into place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from apt_deploy.backbones import get_backbone
from apt_deploy.backbones.registry import InputSpec
from apt_deploy.errors import ConfigError
from apt_deploy.fileio import atomic_directory
from apt_deploy.manifest import MODEL_NAME, write_manifest
from apt_deploy.methods.multitask import (MultiTaskModel, build_multitask_model, check_shared, shared_fingerprint,
                                         task_bank)
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION_ROWS as OP
from apt_deploy.progress import timed_step
from apt_deploy.prompt_bank import TASK_INPUT, stack_tasks, write_bank
from apt_deploy.settings import ExportSettings, tolerance
from engines.compare import assert_close
from engines.runners import OnnxRuntimeRunner
from exporters.onnx_export import _dynamic_shapes, _input_specs, build_manifest, export_program, write_inference_assets

log = logging.getLogger(__name__)
MAX_TASKS = 64


def export_multitask_artifact(names: Sequence[str], models: Sequence[nn.Module], out_dir: str | Path,
                              settings: ExportSettings | None = None, sources: dict[str, str] | None = None,
                              model_dir: str | None = None, max_tasks: int = MAX_TASKS) -> Path:
    """``models[t]`` is task ``names[t]`` in training form, all on the same base model (see module docstring)."""
    check_shared(names, models)
    rows = [{k: v.numpy() for k, v in task_bank(m).items()} for m in models]
    return export_banked_artifact(models[0], names, rows, out_dir, settings, sources, model_dir, max_tasks)


def export_banked_artifact(model: nn.Module, names: Sequence[str], rows: Sequence[dict[str, np.ndarray]],
                           out_dir: str | Path, settings: ExportSettings | None = None,
                           sources: dict[str, str] | None = None, model_dir: str | None = None,
                           max_tasks: int = MAX_TASKS) -> Path:
    """Steps 1-4 from the tasks' bank rows (:func:`task_bank`); ``model`` is any one task in training form,
    whose non-prompt tensors every task shares (the caller checked that)."""
    settings = settings or ExportSettings()
    if settings.dtype != "fp32":
        raise ConfigError(f"--dtype {settings.dtype} with several tasks", "fp32 for multi-task artifacts",
                          "drop --dtype (half-precision multi-task export is not implemented)")
    if not 1 <= len(names) <= max_tasks:
        raise ConfigError(f"{len(names)} tasks", f"1 to {max_tasks}", "pass fewer NAME=DIR pairs or raise --max-tasks")
    banks = stack_tasks(names, rows)
    multi = build_multitask_model(model)
    spec = get_backbone(multi.inner.apt_deploy_state.backbone)
    specs = _input_specs(spec, multi.inner, settings)
    source = {"model_dir": model_dir} if model_dir else None
    with atomic_directory(out_dir, overwrite=settings.overwrite) as stage:
        with timed_step(f"export {spec.name}/apt with {len(names)} tasks to ONNX"):
            onnx_path = _export(multi, spec, specs, banks, stage / MODEL_NAME, settings, max_tasks)
        manifest = build_manifest(spec, multi.inner, _folded(model.apt_deploy_state), [*specs, task_spec(specs)],
                                  onnx_path, settings, source)
        manifest["fused_op"].update(version=OP.version, plugin_version=OP.plugin_version)
        manifest["inference"] = write_inference_assets(spec, multi.inner, specs, source, stage)
        bank_file, digest = write_bank(stage, banks, names)
        manifest["tasks"] = tasks_section(names, banks, bank_file, digest, sources or {}, max_tasks)
        manifest["tasks"]["shared_sha256"] = shared_fingerprint(model)
        if settings.validate:
            with timed_step("validate ONNX Runtime vs PyTorch on a mixed-task batch"):
                manifest["validation"] = {"onnxruntime_vs_torch": validate_mixed(multi, spec, specs, banks, onnx_path,
                                                                                 settings.seed)}
        write_manifest(stage, manifest)
    log.info("wrote %s (%d tasks)", out_dir, len(names))
    return Path(out_dir)


def task_spec(specs: list[InputSpec]) -> InputSpec:
    """``task`` [batch] int64, on the model inputs' batch range."""
    first = specs[0]
    return InputSpec(TASK_INPUT, "int64", ("batch",), first.min_shape[:1], first.opt_shape[:1], first.max_shape[:1])


def tasks_section(names: Sequence[str], banks: dict[str, np.ndarray], bank_file: str, digest: str,
                  sources: dict[str, str], max_tasks: int) -> dict[str, Any]:
    """The manifest's ``tasks``: names in bank-row order, the bank file and its shapes."""
    k = banks["apt_bank_k_0"]
    return {"names": list(names), "input": TASK_INPUT, "bank_file": bank_file, "bank_sha256": digest,
            "bank_inputs": sorted(banks), "layers": sum(n.startswith("apt_bank_k_") for n in banks),
            "prompt_len": int(k.shape[1]), "hidden_size": int(k.shape[2]), "max_tasks": max_tasks,
            "sources": {n: sources.get(n) for n in names},
            "fused_op": {"domain": OP.domain, "name": OP.onnx_name, "version": OP.version}}


def mixed_feed(spec: Any, model: nn.Module, specs: list[InputSpec], banks: dict[str, np.ndarray], which: str,
               seed: int) -> dict[str, torch.Tensor]:
    """Seeded model inputs at the ``which`` shapes, every row a different task (cycling), and the banks."""
    feed = spec.dummy_inputs(model, specs, which, seed)
    batch = next(iter(feed.values())).shape[0]
    task = torch.arange(batch, dtype=torch.long) % next(iter(banks.values())).shape[0]
    return {TASK_INPUT: task, **feed, **{k: torch.from_numpy(v) for k, v in banks.items()}}


def validate_mixed(multi: MultiTaskModel, spec: Any, specs: list[InputSpec], banks: dict[str, np.ndarray],
                   onnx_path: Path, seed: int) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch at the opt and max shapes, rows of mixed tasks."""
    from exporters.validate import torch_outputs

    tol, runs = tolerance("onnxruntime_vs_torch"), []
    with OnnxRuntimeRunner(onnx_path) as runner:
        for i, which in enumerate(("opt", "max")):
            feed = mixed_feed(spec, multi.inner, specs, banks, which, seed + 1 + i)
            expected = torch_outputs(multi, spec, multi.inner, dict(feed))
            actual = runner.infer({k: v.numpy() for k, v in feed.items()})
            diffs = assert_close(expected, actual, tol, f"multi-task {runner.name} vs PyTorch at {which} shapes")
            runs.append({"shapes": which, "max_abs": max(d.max_abs for d in diffs)})
    return {"tolerance": tol.to_json(), "runs": runs}


def _export(multi: MultiTaskModel, spec: Any, specs: list[InputSpec], banks: dict[str, np.ndarray], path: Path,
            settings: ExportSettings, max_tasks: int) -> Path:
    if next(iter(banks.values())).shape[0] == 1:  # torch.export specialises a size-1 dim: trace with 2 rows
        banks = {k: np.concatenate([v, v]) for k, v in banks.items()}
    example = mixed_feed(spec, multi.inner, specs, banks, "opt", settings.seed)
    dynamic = _dynamic_shapes(spec, multi.inner, specs)
    batch = next((axes[0] for axes in dynamic.values() if 0 in axes), None)
    tasks = Dim("tasks", min=1, max=max_tasks)
    shapes: dict[str, Any] = {TASK_INPUT: {0: batch} if batch is not None else {}, **dynamic,
                              **{name: {0: tasks} for name in banks}}
    names = list(example)
    with spec.export_context(multi.inner):
        return export_program(_NamedInputs(multi, names), example, names, spec.output_names(multi.inner), shapes,
                              path, settings, f"{spec.name} multi-task")


class _NamedInputs(nn.Module):
    """``forward`` with one named parameter per graph input (torch.export maps dynamic shapes and ONNX
    input names by parameter name; MultiTaskModel.forward takes ``**feed``)."""

    def __init__(self, multi: MultiTaskModel, names: list[str]) -> None:
        super().__init__()
        import inspect

        self.multi = multi
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]

        def forward(*args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
            return self.multi(**dict(zip(names, args)), **kwargs)

        forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        self.forward = forward


def _folded(state: Any) -> Any:
    import dataclasses

    return dataclasses.replace(state, folded=True)
