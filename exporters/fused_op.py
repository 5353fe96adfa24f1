"""The ONNX face of the fused op: schema, opaque node for the exporter, and the model-local function.

The public dynamo exporter inlines onnxscript functions, so the op is exported as an *opaque* node
(its OpSchema is registered so onnxscript can emit it) and the FunctionProto, whose body is standard
ops, is appended to the saved model afterwards with its default-domain opset equal to the model's.
ONNX Runtime then runs the body on any provider; TensorRT binds the node to the plugin through the
``plugin_namespace`` / ``plugin_version`` attributes, or runs the body when no plugin is loaded.
"""

from __future__ import annotations

import functools
from typing import Any

import onnx
from onnx import helper

from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as SPEC
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION_ROWS as ROWS
from apt_deploy.ops.schema import FUSED_OPS, FusedOpSpec

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}


@functools.cache
def register_schema(spec: FusedOpSpec = SPEC) -> onnx.defs.OpSchema:
    """Register one version's OpSchema once per process (onnxscript needs it to emit the node)."""
    from onnx.defs import OpSchema

    if onnx.defs.has(spec.onnx_name, spec.version, spec.domain):
        found = onnx.defs.get_schema(spec.onnx_name, spec.version, spec.domain)
        if found.since_version == spec.version:
            return found
    schema = OpSchema(
        spec.onnx_name, spec.domain, spec.version, doc=spec.doc,
        inputs=[OpSchema.FormalParameter(n, "T") for n in spec.inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in spec.outputs],
        type_constraints=[("T", [_ONNX_TYPES[t] for t in spec.dtypes], "floating point")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.STRING, "TensorRT plugin binding")
                    for name in spec.node_attributes()],
    )
    onnx.defs.register_schema(schema)
    return schema


@functools.cache
def _opset(spec: FusedOpSpec = SPEC) -> Any:
    import onnxscript

    for version in FUSED_OPS:  # lower versions first: a schema lookup by version returns the newest <= it
        register_schema(version)
    return onnxscript.values.Opset(spec.domain, spec.version)


def opaque_translation(x_in: Any, o: Any, k: Any, v: Any) -> Any:
    """custom_translation_table entry: torch.ops.apt.approx_prompt_diffusion -> one apt node."""
    return getattr(_opset(SPEC), SPEC.onnx_name)(x_in, o, k, v, **SPEC.node_attributes())


def opaque_translation_rows(x_in: Any, o: Any, k: Any, v: Any) -> Any:
    """torch.ops.apt.approx_prompt_diffusion_rows -> one apt node of version 2 (per-row K, V)."""
    return getattr(_opset(ROWS), ROWS.onnx_name)(x_in, o, k, v, **ROWS.node_attributes())


def translation_table() -> dict[Any, Any]:
    import torch

    from apt_deploy.ops import torch_op  # noqa: F401  (registers the torch ops)

    ops = getattr(torch.ops, SPEC.torch_namespace)
    return {ops.__getattr__(SPEC.torch_name).default: opaque_translation,
            ops.__getattr__(ROWS.torch_name).default: opaque_translation_rows}


def function_proto(default_opset: int, spec: FusedOpSpec = SPEC) -> onnx.FunctionProto:
    """The portable body from standard ops: Relu(x K^T), ReduceMax, MatMul, Mul, Add (version 2: K^T
    per row, a batched MatMul)."""
    x, o, k, v = spec.inputs
    perm = [1, 0] if spec.version == 1 else [0, 2, 1]
    nodes = [
        helper.make_node("Transpose", [k], ["k_t"], perm=perm),
        helper.make_node("MatMul", [x, "k_t"], ["scores"]),
        helper.make_node("Relu", ["scores"], ["a"]),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("ReduceMax", ["a", "axes"], ["w"], keepdims=1),
        helper.make_node("MatMul", ["a", v], ["e"]),
        helper.make_node("Mul", ["w", "e"], ["we"]),
        helper.make_node("Add", [o, "we"], list(spec.outputs)),
    ]
    return helper.make_function(
        spec.domain, spec.onnx_name, list(spec.inputs), list(spec.outputs), nodes,
        opset_imports=[helper.make_opsetid("", default_opset)],
        attributes=list(spec.node_attributes()),
        doc_string=spec.doc,
    )


def model_op_spec(model: onnx.ModelProto) -> FusedOpSpec:
    """The op version a model uses: the version its opset_import gives the op's domain (1 when absent)."""
    version = next((o.version for o in model.opset_import if o.domain == SPEC.domain), SPEC.version)
    specs = {s.version: s for s in FUSED_OPS}
    if version not in specs:
        raise ValueError(f"model imports domain {SPEC.domain!r} at version {version}; known versions {sorted(specs)}")
    return specs[version]


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append the FunctionProto of the op version the model imports (once) and make sure the model
    imports the op's domain."""
    if any(f.domain == SPEC.domain and f.name == SPEC.onnx_name for f in model.functions):
        return model
    versions = {o.domain: o.version for o in model.opset_import}
    default = versions.get("", versions.get("ai.onnx"))
    if default is None or default < 18:
        raise ValueError(f"model default opset {default} < 18 (ReduceMax with axes input needs 18+)")
    model.functions.append(function_proto(default, model_op_spec(model)))
    if SPEC.domain not in versions:
        model.opset_import.append(helper.make_opsetid(SPEC.domain, SPEC.version))
    return model


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every fused-op node in the main graph."""
    return [n for n in model.graph.node if n.domain == SPEC.domain and n.op_type == SPEC.onnx_name]
