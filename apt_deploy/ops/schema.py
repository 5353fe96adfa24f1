"""The single declaration of the fused APT op. Every other face derives its names from here:

* ONNX: node ``{domain}::{onnx_name}`` (opset version ``version``) with attributes
  ``plugin_namespace`` / ``plugin_version``, plus a model-local FunctionProto of the same name;
* torch: ``torch.ops.{torch_namespace}.{torch_name}``;
* TensorRT: plugin ``{plugin_namespace}::{onnx_name}`` version ``plugin_version``;
* numpy: :func:`apt_deploy.ops.reference.approx_prompt_diffusion`.

Pure Python: importable without torch, onnx or tensorrt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedOpSpec:
    """Names, signature and supported dtypes of one fused op."""

    domain: str
    onnx_name: str
    version: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constant_inputs: tuple[str, ...]
    torch_namespace: str
    torch_name: str
    plugin_namespace: str
    plugin_version: str
    dtypes: tuple[str, ...]
    doc: str

    @property
    def torch_qualname(self) -> str:
        return f"{self.torch_namespace}::{self.torch_name}"

    @property
    def plugin_id(self) -> str:
        """The id TensorRT's ``tensorrt.plugin`` API registers: ``namespace::name``."""
        return f"{self.plugin_namespace}::{self.onnx_name}"

    def node_attributes(self) -> dict[str, str]:
        """Attributes every ONNX node of this op carries (how TensorRT's parser binds a plugin)."""
        return {"plugin_namespace": self.plugin_namespace, "plugin_version": self.plugin_version}


APPROX_PROMPT_DIFFUSION = FusedOpSpec(
    domain="apt",
    onnx_name="ApproxPromptDiffusion",
    version=1,
    inputs=("x_in", "o", "K", "V"),
    outputs=("y",),
    constant_inputs=("K", "V"),
    torch_namespace="apt",
    torch_name="approx_prompt_diffusion",
    plugin_namespace="apt",
    plugin_version="1",
    dtypes=("float32", "float16", "bfloat16"),
    doc=(
        "APT prompt diffusion, inference form: A = ReLU(x_in @ K^T); w = max_j A; "
        "y = o + w * (A @ V). x_in, o: [B, n, d]; K, V: [p, d] constants; y: [B, n, d]."
    ),
)


# Version 2: per-row K and V, for one artifact that serves many tasks (docs/serving.md "One server, many
# tasks"). Each folded module gathers its rows from a [T, p, d] bank by the request's task index, then runs
# this op; the math per row is version 1's.
APPROX_PROMPT_DIFFUSION_ROWS = FusedOpSpec(
    domain="apt",
    onnx_name="ApproxPromptDiffusion",
    version=2,
    inputs=("x_in", "o", "K", "V"),
    outputs=("y",),
    constant_inputs=(),
    torch_namespace="apt",
    torch_name="approx_prompt_diffusion_rows",
    plugin_namespace="apt",
    plugin_version="2",
    dtypes=("float32", "float16", "bfloat16"),
    doc=(
        "APT prompt diffusion with per-row prompts (multi-task): A_b = ReLU(x_in_b @ K_b^T); w = max_j A_b; "
        "y_b = o_b + w * (A_b @ V_b). x_in, o: [B, n, d]; K, V: [B, p, d] (rows of a task bank); y: [B, n, d]."
    ),
)
FUSED_OPS: tuple[FusedOpSpec, ...] = (APPROX_PROMPT_DIFFUSION, APPROX_PROMPT_DIFFUSION_ROWS)
