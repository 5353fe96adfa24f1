"""Parity checks of an exported artifact: training form vs folded (torch), ONNX Runtime vs PyTorch,
and every fused-op node's function body vs the numpy reference. Tolerances come from
``apt_deploy.settings.TOLERANCES`` and are printed in every failure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from apt_deploy.backbones import BackboneSpec
from apt_deploy.backbones.registry import InputSpec
from apt_deploy.ops import reference
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as OP
from apt_deploy.settings import Tolerance, tolerance
from engines.compare import OutputDiff, assert_close
from engines.runners import OnnxRuntimeRunner
from exporters import fused_op

log = logging.getLogger(__name__)
CHECK_SHAPES = ("opt", "max")
# dtypes ONNX Runtime's CPU provider cannot run, with what to do instead
ORT_CPU_UNSUPPORTED = {
    "bf16": "ONNX Runtime's CPU provider has no bfloat16 kernels (Add, MatMul); the bf16 model passed onnx.checker "
            "only. Validate it on the target: apt-deploy verify ARTIFACT --backend trt (or torch-cuda)",
}


def torch_outputs(module: nn.Module, spec: BackboneSpec, model: nn.Module, feed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Run a PyTorch module (under the spec's export patches) and name its outputs like the ONNX model."""
    names = spec.output_names(model)
    with torch.no_grad(), spec.export_context(model):
        out = module(**feed)
    if isinstance(out, torch.Tensor):
        values = [out]
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        values = [getattr(out, n) for n in names]
    return {n: v.detach().float().cpu().numpy() for n, v in zip(names, values)}


def parity_tolerance(dtype: str) -> Tolerance:
    return tolerance({"fp32": "onnxruntime_vs_torch", "fp16": "fp16_vs_fp32", "bf16": "bf16_vs_fp32"}[dtype])


def validate_export(model: nn.Module, folded: nn.Module, module: nn.Module, spec: BackboneSpec,
                    specs: list[InputSpec], onnx_path: Path, settings: Any) -> dict[str, Any]:
    """All parity checks for a fresh export; raises ParityError on the first failing check."""
    result: dict[str, Any] = {}
    if model is not folded:
        result["training_vs_folded"] = _compare_torch(model, folded, spec, specs, settings.seed)
    if settings.dtype in ORT_CPU_UNSUPPORTED:
        log.warning("NOT validated on ONNX Runtime: %s", ORT_CPU_UNSUPPORTED[settings.dtype])
        return {**result, "onnxruntime_vs_torch": {"skipped": ORT_CPU_UNSUPPORTED[settings.dtype]}}
    result["fused_op_vs_reference"] = check_fused_nodes(onnx_path)
    reference_module = spec.export_module(folded) if settings.dtype != "fp32" else module
    with OnnxRuntimeRunner(onnx_path) as ort_runner:
        result["onnxruntime_vs_torch"] = runtime_vs_torch(ort_runner, reference_module, spec, folded, specs,
                                                          settings.dtype, settings.seed)
    return result


def runtime_vs_torch(runner: Any, reference: nn.Module, spec: BackboneSpec, folded: nn.Module,
                     specs: list[InputSpec], dtype: str, seed: int) -> dict[str, Any]:
    """``runner`` vs the PyTorch ``reference`` on seeded inputs at every shape set of CHECK_SHAPES."""
    tol, runs = parity_tolerance(dtype), []
    for i, which in enumerate(CHECK_SHAPES):
        if i and all(getattr(s, f"{which}_shape") == getattr(s, f"{CHECK_SHAPES[0]}_shape") for s in specs):
            continue  # the same shapes as the first check (e.g. a batch-1-only export)
        feed = spec.dummy_inputs(folded, specs, which, seed + 1 + i)
        expected = torch_outputs(reference, spec, folded, feed)
        actual = runner.infer(_numpy_feed(feed, dtype))
        runs.append(_report(which, assert_close(expected, actual, tol, f"{runner.name} vs PyTorch at {which} shapes")))
    return {"tolerance": tol.to_json(), "runs": runs}


def _compare_torch(model: nn.Module, folded: nn.Module, spec: BackboneSpec, specs: list[InputSpec], seed: int) -> dict:
    tol = tolerance("training_vs_folded")
    feed = spec.dummy_inputs(folded, specs, "opt", seed)
    was_training = model.training
    model.eval()
    try:
        diffs = assert_close(torch_outputs(spec.export_module(model), spec, model, feed),
                             torch_outputs(spec.export_module(folded), spec, folded, feed), tol,
                             "training form vs folded PyTorch model")
    finally:
        model.train(was_training)
    return {"tolerance": tol.to_json(), "runs": [_report("opt", diffs)]}


def check_fused_nodes(onnx_path: Path, rows: int = 7, seed: int = 0) -> dict[str, Any]:
    """Run each fused node's function body (ONNX Runtime) on random x_in / o with the node's own K, V
    and compare with the numpy reference."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = fused_op.fused_nodes(proto)
    rng, worst = np.random.default_rng(seed), 0.0
    for node in nodes:
        k, v = (_initializer(inits, node.input[i], onnx_path) for i in (2, 3))
        tol = tolerance("fused_op_vs_reference") if k.dtype == np.float32 else parity_tolerance("fp16")
        x_in, o = (rng.standard_normal((2, rows, k.shape[1])).astype(k.dtype) for _ in range(2))
        got = {"y": _run_single_node(k.dtype, x_in, o, k, v)}
        diffs = assert_close({"y": reference.approx_prompt_diffusion(x_in, o, k, v)}, got, tol,
                             f"fused op node {node.name} (ONNX function body) vs numpy reference")
        worst = max(worst, diffs[0].max_abs)
    return {"nodes": len(nodes), "max_abs": worst, "tolerance": tolerance("fused_op_vs_reference").to_json()}


def _initializer(inits: dict[str, onnx.TensorProto], name: str, onnx_path: Path) -> np.ndarray:
    if name not in inits:
        raise ValueError(f"fused node input {name!r} is not an initializer (K and V must be constants)")
    return numpy_helper.to_array(inits[name], base_dir=str(onnx_path.parent))


def _run_single_node(dtype: np.dtype, x_in: np.ndarray, o: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node = helper.make_node(OP.onnx_name, list(OP.inputs), list(OP.outputs), domain=OP.domain, **OP.node_attributes())
    graph = helper.make_graph(
        [node], "fused_op_check",
        [helper.make_tensor_value_info(n, elem, None) for n in OP.inputs],
        [helper.make_tensor_value_info(OP.outputs[0], elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(OP.domain, OP.version)])
    fused_op.attach_function(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(OP.inputs, (x_in, o, k, v))))[0]


def _report(which: str, diffs: list[OutputDiff]) -> dict[str, Any]:
    return {"shapes": which, "outputs": [{"name": d.name, "max_abs": d.max_abs, "max_rel": d.max_rel,
                                          "shape": list(d.shape)} for d in diffs]}


def check_integrity(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The ONNX files still hash to what the manifest recorded, and the checker accepts the model."""
    from apt_deploy.errors import CheckpointError
    from apt_deploy.fileio import sha256_file
    from apt_deploy.manifest import onnx_files

    paths = onnx_files(directory, manifest)
    for key, path in zip(("onnx", "onnx_data"), paths):
        if sha256_file(path) != manifest["sha256"][key]:
            raise CheckpointError(f"{path.name} does not match the sha256 recorded in manifest.json (modified or truncated)",
                                  f"sha256 {manifest['sha256'][key][:16]}...", "re-export the artifact")
    for rel, digest in ((manifest.get("inference") or {}).get("files") or {}).items():
        if not (directory / rel).is_file() or sha256_file(directory / rel) != digest:
            raise CheckpointError(f"inference file {rel} is missing or does not match the sha256 recorded in manifest.json",
                                  f"sha256 {digest[:16]}...", "re-export the artifact")
    try:
        onnx.checker.check_model(str(paths[0]), full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, onnx.shape_inference.InferenceError, DecodeError, ...
        raise CheckpointError(f"the ONNX checker rejects {paths[0].name}: {type(e).__name__}: {str(e)[:800]}",
                              "a valid ONNX model as written by apt-deploy export", "re-export the artifact") from e
    return {"sha256": "ok", "onnx_checker": "ok"}


def _numpy_feed(feed: dict[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    from exporters.onnx_export import cast_feed

    return {k: v.numpy() if v.dtype != torch.bfloat16 else v.float().numpy() for k, v in cast_feed(feed, dtype).items()}
