"""TensorRT plugin for the fused APT op, written with ``tensorrt.plugin`` (Quickly Deployable Plugins).

Plugin id ``{plugin_namespace}::{onnx_name}`` = ``apt::ApproxPromptDiffusion``, version ``"1"``: all
derived from :data:`apt_deploy.ops.schema.APPROX_PROMPT_DIFFUSION`. TensorRT's ONNX parser binds the
exported node to it because the node's op_type is the plugin name and its ``plugin_namespace`` /
``plugin_version`` attributes name the namespace and version; when the plugin is not registered the
parser runs the node's model-local function body instead.

Per process ONE implementation is registered, because the parser creates our node with
``QuickPluginCreationRequest.kUNKNOWN`` unless the network has a PREFER_AOT/JIT flag, which Polygraphy's
``NetworkFromOnnxPath`` does not set, and a plugin with both implementations then refuses to build:

* ``aot`` (TensorRT >= 10.9): :func:`engines.kernels.triton_apd.compile_for_aot` compiles the Triton kernel
  to PTX; TensorRT bakes it into the engine, which then runs without Python, triton or this module.
* ``jit`` (TensorRT >= 10.6): a Python callback launches the same Triton kernel on TensorRT's stream; the
  engine then needs this module loaded (``engines.plugins.load("jit")``) before deserialization.

tensorrt is imported inside functions only. This module deliberately has no
``from __future__ import annotations``: ``tensorrt.plugin`` validates real annotation objects, so the
decorated functions are defined inside :func:`_define` after tensorrt.plugin is imported.
"""

import inspect
import logging
from typing import Any, List, Tuple, Union

from apt_deploy.errors import ConfigError
from apt_deploy.features import require
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as SPEC

log = logging.getLogger(__name__)

PLUGIN_NAMESPACE: str = SPEC.plugin_namespace
PLUGIN_NAME: str = SPEC.onnx_name
PLUGIN_VERSION: str = SPEC.plugin_version
PLUGIN_ID: str = SPEC.plugin_id
TENSOR_INPUTS: tuple = SPEC.inputs
QDP_PLUGIN_VERSION = "1"  # tensorrt.plugin registers every creator as version "1"
TRT_TYPE_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}
MIN_TRT_JIT = (10, 6)
MIN_TRT_AOT = (10, 9)
MODES = ("auto", "aot", "jit")
_REGISTERED: dict = {}


def plugin_fingerprint(mode: str) -> dict:
    """What identifies the plugin inside an engine (part of the engine cache key and build metadata)."""
    return {"id": PLUGIN_ID, "version": PLUGIN_VERSION, "mode": mode}


def trt_version_tuple(version: str) -> tuple:
    return tuple(int(p) for p in version.split(".")[:2])


def resolve_mode(mode: str, trt_version: str, aot_supported: bool) -> str:
    """``auto`` -> ``aot`` where TensorRT supports it, else ``jit``; errors name what is missing."""
    if mode not in MODES:
        raise ConfigError(f"plugin mode {mode!r}", f"one of {', '.join(MODES)}", "pass --plugin-mode aot|jit|auto")
    version = trt_version_tuple(trt_version)
    if version < MIN_TRT_JIT:
        raise ConfigError(f"TensorRT {trt_version}", "TensorRT >= 10.6 for Python plugins (tensorrt.plugin)",
                          "upgrade TensorRT, or build with --no-plugin (the ONNX function body runs instead)")
    aot_ok = aot_supported and version >= MIN_TRT_AOT
    if mode == "aot" and not aot_ok:
        raise ConfigError(f"AOT plugin requested on TensorRT {trt_version}", "TensorRT >= 10.9 for AOT plugins",
                          "upgrade TensorRT or use the JIT plugin (mode='jit')")
    return "aot" if mode == "aot" or (mode == "auto" and aot_ok) else "jit"


def register_plugin(mode: str = "auto") -> str:
    """Register the plugin with TensorRT (idempotent); returns the registered implementation."""
    require("tensorrt", "the APT TensorRT plugin")
    require("triton", "the APT TensorRT plugin's kernel")
    import tensorrt as trt

    resolved = resolve_mode(mode, trt.__version__, hasattr(trt, "QuickPluginCreationRequest"))
    if _REGISTERED:
        if mode != "auto" and _REGISTERED["mode"] != resolved:
            raise ConfigError(f"plugin mode {resolved!r} requested, but this process registered {_REGISTERED['mode']!r}",
                              "one plugin implementation per process", "run the other mode in a fresh process")
        return _REGISTERED["mode"]
    if PLUGIN_VERSION != QDP_PLUGIN_VERSION:
        raise ConfigError(f"schema plugin_version {PLUGIN_VERSION!r}", f"{QDP_PLUGIN_VERSION!r} (tensorrt.plugin)")
    _define(resolved)
    _REGISTERED["mode"] = resolved
    log.info("registered TensorRT plugin %s v%s (%s implementation)", PLUGIN_ID, PLUGIN_VERSION, resolved)
    return resolved


def registered_mode() -> Union[str, None]:
    return _REGISTERED.get("mode")


def _define(mode: str) -> None:
    import tensorrt.plugin as trtp

    functions = [_descriptor(trtp), _autotune(trtp, mode), _aot_impl(trtp) if mode == "aot" else _jit_impl(trtp)]
    for fn in functions:
        names = tuple(inspect.signature(fn).parameters)[: len(TENSOR_INPUTS)]
        if names != TENSOR_INPUTS:
            raise ConfigError(f"plugin function {fn.__name__} takes {names}", f"the schema's inputs {TENSOR_INPUTS}")
    trtp.register(PLUGIN_ID)(functions[0])
    trtp.autotune(PLUGIN_ID)(functions[1])
    (trtp.aot_impl if mode == "aot" else trtp.impl)(PLUGIN_ID)(functions[2])


def _descriptor(trtp: Any) -> Any:
    def approx_prompt_diffusion_desc(x_in: trtp.TensorDesc, o: trtp.TensorDesc, K: trtp.TensorDesc,
                                     V: trtp.TensorDesc) -> trtp.TensorDesc:
        return o.like()

    return approx_prompt_diffusion_desc


def _autotune(trtp: Any, mode: str) -> Any:
    from engines.kernels.triton_apd import CONFIGS

    types = "|".join(TRT_TYPE_NAMES[d] for d in SPEC.dtypes)
    io = ", ".join([types] * (len(SPEC.inputs) + len(SPEC.outputs)))
    tactics = list(range(1, len(CONFIGS) + 1)) if mode == "jit" else None  # AOT: one heuristic kernel

    def approx_prompt_diffusion_autotune(x_in, o, K, V, outputs) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(io, "LINEAR", tactics)]

    return approx_prompt_diffusion_autotune


def _aot_impl(trtp: Any) -> Any:
    from engines.kernels import triton_apd

    def approx_prompt_diffusion_aot(x_in, o, K, V, outputs, tactic: int) -> Tuple[
            Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        dtype = _dtype_name(o.dtype)
        config = triton_apd.aot_config(dtype, _constant_prompts(K.shape_expr[0]))
        compiled = triton_apd.compile_for_aot(dtype, config)  # PTX ISA AOT_PTX_VERSION: loadable by CUDA 12 drivers
        rows, d, p = _rows_expr(x_in.shape_expr), x_in.shape_expr[len(x_in.shape_expr) - 1], K.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(rows, config.block_m)  # one program per row tile (it owns all d columns);
        # grid_y / grid_z keep their default 1: the kernel's grid is one-dimensional
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (rows, p, d)])  # M, P, D in kernel order
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra

    return approx_prompt_diffusion_aot


def _jit_impl(trtp: Any) -> Any:
    def approx_prompt_diffusion_jit(x_in, o, K, V, outputs, stream: int, tactic: int) -> None:
        import torch

        from engines.kernels import triton_apd

        config = triton_apd.CONFIGS[tactic - 1] if 1 <= tactic <= len(triton_apd.CONFIGS) else None
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            inputs = [_as_torch(t) for t in (x_in, o, K, V)]
            triton_apd.approx_prompt_diffusion_triton(*inputs, config=config, out=_as_torch(outputs[0]))

    return approx_prompt_diffusion_jit


def _constant_prompts(p_expr: Any) -> int:
    """P at build time: the kernel's prompt tile is a compile-time constant, and K/V are folded initializers."""
    if not p_expr.is_constant:
        raise ConfigError("the APT plugin's K input with a dynamic prompt dimension",
                          "K and V as constant initializers (a fixed prompt count)", "re-export the artifact")
    return int(p_expr.constant_value())


def _rows_expr(shape_expr: Any) -> Any:
    """B * n * ...: every dimension but the last (the batch folds into rows)."""
    dims = list(shape_expr)
    rows = dims[0]
    for dim in dims[1:-1]:
        rows = rows * dim
    return rows


def _dtype_name(trt_dtype: Any) -> str:
    import tensorrt as trt

    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}
    if trt_dtype not in names:
        raise ConfigError(f"plugin I/O type {trt_dtype}", "FP32, FP16 or BF16")
    return names[trt_dtype]


class _CudaArray:
    """``__cuda_array_interface__`` for a ``tensorrt.plugin.Tensor`` (its own one refuses BF16)."""

    _TYPESTR = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2"}

    def __init__(self, tensor: Any, dtype: str) -> None:
        itemsize = int(self._TYPESTR[dtype][-1])
        self.__cuda_array_interface__ = {
            "shape": tuple(tensor.shape), "typestr": self._TYPESTR[dtype], "version": 3,
            "data": (tensor.data_ptr, False), "strides": tuple(s * itemsize for s in tensor.strides),
            "stream": None,
        }


def _as_torch(tensor: Any) -> Any:
    """Zero-copy torch view of a TensorRT plugin tensor (bf16 travels as int16 and is re-viewed)."""
    import torch

    dtype = _dtype_name(tensor.dtype)
    t = torch.as_tensor(_CudaArray(tensor, dtype), device="cuda")
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
