"""Making a plugin build really use the plugin, and proving it did.

TensorRT's ONNX parser may import a node through a model-local function of the same domain/name
instead of a registered plugin (the order changed across 10.x releases; see docs/tensorrt.md). So a
plugin build parses a copy of the model WITHOUT the fused op's FunctionProto
(:func:`plugin_only_onnx`: a hidden temporary file beside ``model.onnx``, removed after parsing; the
artifact's files are never modified), where the plugin is the only way to import
the node. Then the plugin layers are counted twice and must equal the manifest's fused-node count:
in the parsed network (:func:`count_network_plugin_layers`) and in the built engine, from TensorRT's
engine inspector JSON (:func:`count_plugin_layers`). A ``--no-plugin`` build keeps the function body and
must contain no plugin layer.

onnx and tensorrt are imported inside functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError, ExportError
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as SPEC

log = logging.getLogger(__name__)
PLUGIN_LAYER_TYPES = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
"""``trt.LayerType`` members of plugin layers (PLUGIN_V3 is what a tensorrt.plugin QDP becomes)."""


def strip_fused_functions(model: Any) -> int:
    """Remove the fused op's model-local FunctionProto(s) from ``model`` (an onnx.ModelProto, edited in
    place); the fused nodes stay. Returns how many functions were removed."""
    keep = [f for f in model.functions if not (f.domain == SPEC.domain and f.name == SPEC.onnx_name)]
    removed = len(model.functions) - len(keep)
    del model.functions[:]
    model.functions.extend(keep)
    return removed


def fused_node_count(model: Any) -> int:
    """Fused-op nodes in the main graph (what the plugin layers must number)."""
    return sum(1 for n in model.graph.node if n.domain == SPEC.domain and n.op_type == SPEC.onnx_name)


@contextlib.contextmanager
def plugin_only_onnx(files: list[Path]) -> Iterator[Path]:
    """A temporary copy of ``model.onnx`` without the fused op's function body (``files`` = [model.onnx,
    external data...] as the manifest lists them). Yields its path: a hidden file beside ``model.onnx``, so
    the external data's relative locations resolve to the artifact's own files (links are refused by onnx's
    loader, copies of gigabytes are slow); it is removed afterwards and the artifact's files are not modified."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(files[0]), load_external_data=False)
    listed = {f.name for f in files[1:]}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor) and ExternalDataInfo(tensor).location not in listed:
            raise ExportError(f"initializer {tensor.name!r} lives in {ExternalDataInfo(tensor).location!r}, which the "
                              "manifest does not list", "every external data file listed in manifest.json",
                              "re-export the artifact")
    removed = strip_fused_functions(model)
    log.info("plugin build: parsing %s without its %d fused-op function(s), %d fused node(s) kept",
             files[0].name, removed, fused_node_count(model))
    fd, name = tempfile.mkstemp(prefix=".apt-plugin-", suffix=".onnx", dir=files[0].parent)
    os.close(fd)
    path = Path(name)
    try:
        onnx.save(model, str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)


def count_plugin_layers(engine_info_json: str) -> int:
    """Plugin layers in TensorRT's engine inspector output (``get_engine_information(LayerInformationFormat.JSON)``
    of an engine built with ``ProfilingVerbosity.DETAILED``): ``{"Layers": [{"Name", "LayerType", ...}], ...}``;
    a layer counts when its ``LayerType`` starts with ``Plugin`` (PluginV2 / PluginV3)."""
    try:
        info = json.loads(engine_info_json)
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine inspector output that is not JSON ({e})", "LayerInformationFormat.JSON text") from e
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise ConfigError("engine inspector JSON without a 'Layers' list", '{"Layers": [...], "Bindings": [...]}')
    if any(not isinstance(layer, dict) for layer in layers):
        raise ConfigError("engine inspector JSON with layer names only (no LayerType)",
                          "an engine built with ProfilingVerbosity.DETAILED", "rebuild the engine with apt-deploy build --force")
    return sum(1 for layer in layers if str(layer.get("LayerType", "")).lower().startswith("plugin"))


def count_network_plugin_layers(network: Any) -> int:
    """Plugin layers in a parsed ``trt.INetworkDefinition`` (before building)."""
    import tensorrt as trt

    kinds = {getattr(trt.LayerType, name) for name in PLUGIN_LAYER_TYPES if hasattr(trt.LayerType, name)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def check_plugin_layers(found: int, expected: int, where: str, use_plugin: bool) -> None:
    """Refuse a network/engine whose plugin-layer count is not the manifest's fused-node count (plugin
    builds) or not 0 (``--no-plugin`` builds)."""
    if found == expected:
        return
    if use_plugin:
        raise ConfigError(
            f"{where} has {found} APT plugin layer(s) but the artifact has {expected} fused node(s)",
            "one plugin layer per apt::ApproxPromptDiffusion node",
            "check that TensorRT >= 10.6 is installed and the plugin registered (engines.plugins.load()), or build "
            "with --no-plugin to run the ONNX function body")
    raise ConfigError(f"{where} of a --no-plugin build has {found} plugin layer(s)",
                      "none (the fused op's function body runs as standard layers)",
                      "run the --no-plugin build in a fresh process (apt-deploy build --no-plugin)")
