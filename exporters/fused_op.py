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

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}


@functools.cache
def register_schema() -> onnx.defs.OpSchema:
    """Register the op's OpSchema once per process (onnxscript needs it to emit the node)."""
    from onnx.defs import OpSchema

    if onnx.defs.has(SPEC.onnx_name, SPEC.version, SPEC.domain):
        return onnx.defs.get_schema(SPEC.onnx_name, SPEC.version, SPEC.domain)
    schema = OpSchema(
        SPEC.onnx_name, SPEC.domain, SPEC.version, doc=SPEC.doc,
        inputs=[OpSchema.FormalParameter(n, "T") for n in SPEC.inputs],
        outputs=[OpSchema.FormalParameter(n, "T") for n in SPEC.outputs],
        type_constraints=[("T", [_ONNX_TYPES[t] for t in SPEC.dtypes], "floating point")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.STRING, "TensorRT plugin binding")
                    for name in SPEC.node_attributes()],
    )
    onnx.defs.register_schema(schema)
    return schema


@functools.cache
def _opset() -> Any:
    import onnxscript

    register_schema()
    return onnxscript.values.Opset(SPEC.domain, SPEC.version)


def opaque_translation(x_in: Any, o: Any, k: Any, v: Any) -> Any:
    """custom_translation_table entry: torch.ops.apt.approx_prompt_diffusion -> one apt node."""
    return getattr(_opset(), SPEC.onnx_name)(x_in, o, k, v, **SPEC.node_attributes())


def translation_table() -> dict[Any, Any]:
    import torch

    from apt_deploy.ops import torch_op  # noqa: F401  (registers the torch op)

    return {getattr(torch.ops, SPEC.torch_namespace).__getattr__(SPEC.torch_name).default: opaque_translation}


def function_proto(default_opset: int) -> onnx.FunctionProto:
    """The portable body from standard ops: Relu(x K^T), ReduceMax, MatMul, Mul, Add."""
    x, o, k, v = SPEC.inputs
    nodes = [
        helper.make_node("Transpose", [k], ["k_t"], perm=[1, 0]),
        helper.make_node("MatMul", [x, "k_t"], ["scores"]),
        helper.make_node("Relu", ["scores"], ["a"]),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [-1])),
        helper.make_node("ReduceMax", ["a", "axes"], ["w"], keepdims=1),
        helper.make_node("MatMul", ["a", v], ["e"]),
        helper.make_node("Mul", ["w", "e"], ["we"]),
        helper.make_node("Add", [o, "we"], list(SPEC.outputs)),
    ]
    return helper.make_function(
        SPEC.domain, SPEC.onnx_name, list(SPEC.inputs), list(SPEC.outputs), nodes,
        opset_imports=[helper.make_opsetid("", default_opset)],
        attributes=list(SPEC.node_attributes()),
        doc_string=SPEC.doc,
    )


def attach_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append the FunctionProto (once) and make sure the model imports the op's domain."""
    if any(f.domain == SPEC.domain and f.name == SPEC.onnx_name for f in model.functions):
        return model
    versions = {o.domain: o.version for o in model.opset_import}
    default = versions.get("", versions.get("ai.onnx"))
    if default is None or default < 18:
        raise ValueError(f"model default opset {default} < 18 (ReduceMax with axes input needs 18+)")
    model.functions.append(function_proto(default))
    if SPEC.domain not in versions:
        model.opset_import.append(helper.make_opsetid(SPEC.domain, SPEC.version))
    return model


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every fused-op node in the main graph."""
    return [n for n in model.graph.node if n.domain == SPEC.domain and n.op_type == SPEC.onnx_name]
