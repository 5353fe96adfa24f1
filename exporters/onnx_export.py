"""Export a method-applied model to an artifact directory: ``model.onnx`` (+ data) and ``manifest.json``.

Steps (``export_artifact``): 1. fold (training form -> constants + fused op); 2. export with the
dynamo exporter, the fused op as one opaque ``apt::ApproxPromptDiffusion`` node per APT module;
3. attach the op's FunctionProto and check the model; 4. validate on ONNX Runtime CPU against the
PyTorch model on seeded inputs, failing loudly beyond the declared tolerance; 5. write the manifest.
Everything happens in a staging directory that is renamed into place only on success.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from apt_deploy.backbones import BackboneSpec, get_backbone, spec_for_model
from apt_deploy.backbones.registry import InputSpec, ShapeSettings
from apt_deploy.errors import ConfigError, ExportError
from apt_deploy.fileio import atomic_directory, sha256_file
from apt_deploy.folding import fold
from apt_deploy.manifest import MODEL_NAME, SCHEMA_VERSION, now_iso, tool_versions, write_manifest
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as OP
from apt_deploy.progress import timed_step
from apt_deploy.settings import ExportSettings
from exporters import fused_op

log = logging.getLogger(__name__)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXTERNAL_DATA_BYTES = 100 * 2**20
# bfloat16 Conv/MatMul need opset 22+ (Conv-22 added bfloat16); None: the exporter's default (20)
OPSETS: dict[str, int | None] = {"fp32": None, "fp16": None, "bf16": 23}
# torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" (and 3 more) on every export; our
# models use no torchvision op, so those lines are noise (docs/pitfalls.md "Honest paths"). Only they are dropped.
TORCH_ONNX_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


_TORCHVISION_FILTER = _DropTorchvisionNotice()


def export_artifact(model: nn.Module, out_dir: str | Path, settings: ExportSettings | None = None,
                    source: dict[str, str] | None = None, fold_first: bool = True) -> Path:
    """Fold, export, check and validate ``model`` into ``out_dir`` (see module docstring)."""
    settings = settings or ExportSettings()
    state = _method_state(model)
    spec = get_backbone(state.backbone)
    folded = fold(model) if fold_first and not state.folded else model
    plans = spec.export_components(folded, settings)
    if plans is not None:  # a multi-component model (Stable Diffusion): one ONNX per component
        from exporters.components import export_components_artifact, select_components

        plans = select_components(plans, settings.components)
        return export_components_artifact(model, folded, state, plans, out_dir, settings, source)
    if settings.components:
        raise ConfigError(f"components {list(settings.components)} for the single-model backbone {spec.name!r}",
                          "component selection only for multi-component backbones (sd)", "drop the components setting")
    cast = _cast(folded, settings.dtype)
    module = spec.export_module(cast)
    specs = _input_specs(spec, folded, settings)
    with atomic_directory(out_dir, overwrite=settings.overwrite) as stage:
        with timed_step(f"export {spec.name}/{state.method} to ONNX"):
            onnx_path = export_onnx(module, spec, cast, specs, stage / MODEL_NAME, settings)
        manifest = build_manifest(spec, folded, state, specs, onnx_path, settings, source)
        manifest["inference"] = write_inference_assets(spec, folded, specs, source, stage)
        if settings.validate:
            from exporters.validate import validate_export

            with timed_step("validate ONNX Runtime vs PyTorch"):
                manifest["validation"] = validate_export(model, folded, module, spec, specs, onnx_path, settings)
        write_manifest(stage, manifest)
    log.info("wrote %s", out_dir)
    return Path(out_dir)


def export_onnx(module: nn.Module, spec: BackboneSpec, model: nn.Module, specs: list[InputSpec],
                path: Path, settings: ExportSettings) -> Path:
    """torch.onnx.export (dynamo) with the fused op as an opaque node, then the function attached.
    ``model`` is the (cast) HF model ``module`` was derived from; the spec's export patches apply to it."""
    example = cast_feed(spec.dummy_inputs(model, specs, "opt", settings.seed), settings.dtype)
    with spec.export_context(model):
        export_program(module, example, [s.name for s in specs], spec.output_names(model),
                       _dynamic_shapes(spec, model, specs), path, settings, spec.name)
    return check_dynamic_axes(path, specs)


def check_dynamic_axes(path: Path, specs: list[InputSpec]) -> Path:
    """Fail when an axis declared dynamic (a named axis whose min and max differ) came out fixed. When torch.export guards a Dim to the example size,
    torch.onnx re-exports with that Dim replaced by the constant (its capture strategy "refines" the dynamic
    shapes from the suggested fixes) without an error; ONNX Runtime would only refuse other sizes later."""
    got = {i.name: _axes(i) for i in onnx.load(str(path), load_external_data=False).graph.input}
    fixed = [f"{s.name} axis {i} ({axis!r}) = {got[s.name][i]}" for s in specs if s.name in got
             for i, axis in enumerate(s.axes) if isinstance(axis, str) and s.min_shape[i] != s.max_shape[i]
             and not isinstance(got[s.name][i], str)]  # min == max: declared static (_dynamic_shapes)
    if fixed:
        raise ExportError(f"the exported ONNX model has fixed sizes on axes declared dynamic: {'; '.join(fixed)}",
                          "every named axis symbolic in the graph inputs",
                          "the model's code makes torch.export specialise that axis to the example size (a "
                          "contiguity check on a sliced view at batch 1 is the usual cause; docs/pitfalls.md, "
                          "\"METER\"): find the guard with TORCH_LOGS=+dynamic, or trace at another size (--batch 1,2,N)")
    return path


def export_program(module: nn.Module, example: dict[str, torch.Tensor], input_names: list[str],
                   output_names: list[str], dynamic_shapes: dict[str, dict[int, Any]], path: Path,
                   settings: ExportSettings, what: str) -> Path:
    """The one torch.onnx.export call (dynamo, fused op opaque, external data when large), then
    :func:`attach_and_check`. Used by the single-model path and per component (exporters/components.py)."""
    logging.getLogger(TORCH_ONNX_REGISTRATION_LOGGER).addFilter(_TORCHVISION_FILTER)  # idempotent
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, args=(), kwargs=example, dynamo=True, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes,
                custom_translation_table=fused_op.translation_table(), optimize=True, verbose=False,
                opset_version=OPSETS.get(settings.dtype))
        except Exception as e:  # torch raises many types here; keep the cause chained
            raise ExportError(f"torch.onnx.export failed for {what}: {type(e).__name__}: {str(e)[:2000]}",
                              "an exportable folded model", "see docs/pitfalls.md; re-run with -vv for the trace") from e
    external = settings.external_data
    if external is None:
        external = sum(p.numel() * p.element_size() for p in module.state_dict().values()) > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    return attach_and_check(path)


def attach_and_check(path: Path) -> Path:
    """Append the fused op's FunctionProto to the saved model (keeping external data) and run the checker."""
    proto = onnx.load(str(path), load_external_data=False)
    fused_op.attach_function(proto)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported model: {e}", "a valid ONNX model") from e
    return path


def build_manifest(spec: BackboneSpec, model: nn.Module, state: Any, specs: list[InputSpec], onnx_path: Path,
                   settings: ExportSettings, source: dict[str, str] | None) -> dict[str, Any]:
    proto = onnx.load(str(onnx_path), load_external_data=False)
    data = onnx_path.with_name(onnx_path.name + ".data")
    outputs = [{"name": o.name, "dtype": _elem_type(o), "axes": _axes(o)} for o in proto.graph.output]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "backbone": spec.name,
        "model_class": type(model).__name__,
        "method": state.method,
        "method_config": asdict(state.config),
        "form": "folded" if state.folded else "training",
        "dtype": settings.dtype,
        "files": {"model": onnx_path.name, "external_data": data.name if data.exists() else None},
        "inputs": [s.to_json() for s in specs],
        "outputs": outputs,
        "fused_op": {"domain": OP.domain, "name": OP.onnx_name, "version": OP.version,
                     "plugin_namespace": OP.plugin_namespace, "plugin_version": OP.plugin_version,
                     "count": len(fused_op.fused_nodes(proto))},
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "sha256": _hashes(onnx_path, data, state, source),
        "source": source or {},
        "versions": tool_versions(),
        "export_settings": asdict(settings),
        **spec.manifest_extras(model),
    }


def write_inference_assets(spec: BackboneSpec, model: nn.Module, specs: list[InputSpec],
                           source: dict[str, str] | None, stage: Path) -> dict[str, Any]:
    """The spec writes labels / tokenizer / recipe under ``inference/``; every file is listed with its sha256."""
    from apt_deploy.assets import ASSETS_DIR

    out = stage / ASSETS_DIR
    out.mkdir()
    section = spec.inference_assets(model, (source or {}).get("model_dir"), specs, out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    if not files:
        out.rmdir()
    return {**section, "files": {p.relative_to(stage).as_posix(): sha256_file(p) for p in files}}


def cast_feed(feed: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating inputs to the export dtype; integer inputs unchanged."""
    target = TORCH_DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in feed.items()}


def _hashes(onnx_path: Path, data: Path, state: Any, source: dict[str, str] | None) -> dict[str, str | None]:
    prompts = Path(source["prompts_dir"]) / "prompts.safetensors" if source and source.get("prompts_dir") else None
    return {"onnx": sha256_file(onnx_path), "onnx_data": sha256_file(data) if data.exists() else None,
            "base_weights": state.base_fingerprint,
            "prompts": sha256_file(prompts) if prompts and prompts.exists() else None}


def _method_state(model: nn.Module) -> Any:
    """The model's method state; a plain backbone exports as method "none" (the base-model baseline)."""
    state = getattr(model, "apt_deploy_state", None)
    if state is not None:
        return state
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import MethodState, base_fingerprint

    spec = spec_for_model(model)
    model.eval()
    return MethodState("none", APTConfig(prompt_len=1, rank=1), spec.name, base_fingerprint(model, spec), folded=True)


def _cast(module: nn.Module, dtype: str) -> nn.Module:
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"dtype {dtype!r}", f"one of {', '.join(TORCH_DTYPES)}")
    return module if dtype == "fp32" else copy.deepcopy(module).to(TORCH_DTYPES[dtype])


def _input_specs(spec: BackboneSpec, model: nn.Module, settings: ExportSettings) -> list[InputSpec]:
    cfg = model.config
    if not settings.batch_min <= settings.batch_opt <= settings.batch_max or settings.batch_min < 1:
        raise ConfigError(f"batch min/opt/max = {settings.batch_min}/{settings.batch_opt}/{settings.batch_max}",
                          "1 <= min <= opt <= max", "fix --batch")
    size = settings.image_size
    shapes = ShapeSettings(
        batch=(settings.batch_min, settings.batch_opt, settings.batch_max),
        text_len=settings.text_len or min(40, getattr(cfg, "max_position_embeddings", 40)),
        image_size=(size, size) if size else None, dynamic_image=settings.dynamic_image,
        image_range=(settings.image_min, settings.image_max) if settings.image_min and settings.image_max else None)
    specs = spec.input_specs(model, shapes)
    spec.check_export_shapes(model, specs)
    return [_with_dtype(s, settings.dtype) for s in specs]


def _with_dtype(s: InputSpec, dtype: str) -> InputSpec:
    return s if not s.dtype.startswith("float") else InputSpec(s.name, ONNX_DTYPE_NAMES[dtype], s.axes,
                                                                 s.min_shape, s.opt_shape, s.max_shape)


def _dynamic_shapes(spec: BackboneSpec, model: nn.Module, specs: list[InputSpec]) -> dict[str, dict[int, Any]]:
    dims: dict[str, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for s in specs:
        axes = {}
        for i, axis in enumerate(s.axes):
            if isinstance(axis, str) and s.min_shape[i] != s.max_shape[i]:  # min == max: a static axis
                if axis not in dims:
                    dims[axis] = spec.dynamic_dim(model, axis, s.min_shape[i], s.max_shape[i])
                axes[i] = dims[axis]
        out[s.name] = axes
    return out


def _elem_type(value_info: onnx.ValueInfoProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name


def _axes(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]
