"""Build a TensorRT engine from an exported artifact directory, through Polygraphy's loaders.

``build_engine`` reads as its steps: 1. read the manifest and check the precision against the
artifact's dtype; 2. settle the settings and the cache key (ONNX bytes + external data, TensorRT
version, plugin, GPU, the plugin's code: kernel and registration sources and the Triton version, every
engine-affecting setting); 3. reuse a cached engine with the same key; 4. otherwise register the plugin
(or refuse when ``use_plugin=False`` but it is registered), parse the ONNX into a strongly typed network
(a plugin build parses a temporary copy without the fused op's function body, so the parser can only
take the plugin), check its plugin-layer count, build with the manifest's min/opt/max profile and the
timing cache, and check the built engine's plugin-layer count with TensorRT's engine inspector
(:mod:`engines.plugins.binding`); 5. write the engine atomically and its metadata JSON beside it.

Strongly typed always: TensorRT 11 has no FP16/BF16 builder flags, so a half-precision engine comes from
a half-precision ONNX (``apt-deploy export --dtype fp16|bf16``). tensorrt is imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError
from apt_deploy.features import require
from apt_deploy.fileio import sha256_file, write_bytes_atomic, write_json_atomic
from apt_deploy.manifest import now_iso, onnx_files, read_manifest, tool_versions
from apt_deploy.progress import timed_step
from apt_deploy.settings import EngineSettings

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "bf16")
METADATA_SUFFIX = ".json"
KEY_SCHEMA = 2


def default_engine_path(artifact_dir: str | Path, precision: str, use_plugin: bool = True) -> Path:
    """``model.<precision>[.noplugin].plan`` inside the artifact directory."""
    return Path(artifact_dir) / f"model.{precision}{'' if use_plugin else '.noplugin'}.plan"


def metadata_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + METADATA_SUFFIX)


def profiles_from_manifest(manifest: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]:
    """One (name, min, opt, max) per manifest input."""
    try:
        return tuple((i["name"], tuple(i["min_shape"]), tuple(i["opt_shape"]), tuple(i["max_shape"])) for i in manifest["inputs"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"manifest inputs without shapes ({e})", "inputs with name/min_shape/opt_shape/max_shape",
                          "re-export the artifact") from e


def check_precision(precision: str, manifest: dict[str, Any]) -> None:
    """The engine precision must be the ONNX's own (strong typing): say how to get the other one."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}", f"one of {', '.join(PRECISIONS)}",
                          f"pass --precision {manifest.get('dtype', 'fp32')} (the artifact's export dtype)")
    exported = manifest.get("dtype", "fp32")
    if precision != exported:
        raise ConfigError(
            f"--precision {precision} for an artifact exported with dtype {exported}",
            f"--precision {exported} (engines are strongly typed: TensorRT 11 has no FP16/BF16 builder flags, "
            "the ONNX's tensor types decide)",
            f"build with --precision {exported}, or re-export with `apt-deploy export --dtype {precision}` and build that")


def engine_cache_key(files: list[Path], settings: EngineSettings, trt_version: str, device: dict[str, Any],
                     plugin: dict[str, Any] | None, plugin_code: dict[str, Any] | None) -> str:
    """sha256 over the ONNX bytes (+ external data), TensorRT version, GPU, plugin, the plugin's code
    (:func:`plugin_code_identity`) and settings."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    meta = {"key_schema": KEY_SCHEMA, "tensorrt": trt_version, "device": device, "plugin": plugin,
            "plugin_code": plugin_code, "settings": settings.to_json()}
    h.update(json.dumps(meta, sort_keys=True, default=list).encode())
    return h.hexdigest()


def plugin_code_identity() -> dict[str, str]:
    """What compiled the code inside a plugin engine: sha256 of the Triton kernel's source, of the plugin
    registration source (``engines/plugins/apt_plugin.py``: descriptor, tactics, launch parameters) and of
    the binding check, plus the Triton version that compiled the kernel. Any change rebuilds plugin engines."""
    from engines.kernels.triton_apd import source_path
    from engines.plugins import apt_plugin, binding

    return {"kernel_sha256": sha256_file(source_path()), "plugin_sha256": sha256_file(apt_plugin.__file__),
            "binding_sha256": sha256_file(binding.__file__), "triton": _triton_version()}


def _triton_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def device_info() -> dict[str, Any]:
    """Name and compute capability of CUDA device 0 (what an engine is tied to)."""
    require("cuda", "building or running a TensorRT engine")
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build_engine(artifact_dir: str | Path, precision: str = "fp32", use_plugin: bool = True, out: str | Path | None = None,
                 timing_cache: str | Path | None = None, workspace_bytes: int | None = None,
                 builder_optimization_level: int | None = None, tf32: bool = False, plugin_mode: str = "auto",
                 force: bool = False) -> Path:
    """Build (or reuse) the engine of an artifact; returns the engine path (see module docstring)."""
    artifact = Path(artifact_dir)
    manifest = read_manifest(artifact)                                                  # 1
    check_precision(precision, manifest)
    require("tensorrt", "apt-deploy build")
    import tensorrt as trt

    engine_path = Path(out) if out else default_engine_path(artifact, precision, use_plugin)
    settings = EngineSettings(precision, use_plugin, plugin_mode, workspace_bytes, builder_optimization_level, tf32,
                              profiles_from_manifest(manifest))
    settings, plugin = _prepare_plugin(settings)                                        # 2 (+ 4: registration)
    files, device = onnx_files(artifact, manifest), device_info()
    key = engine_cache_key(files, settings, trt.__version__, device, plugin, plugin_code_identity() if use_plugin else None)
    if not force and _cached(engine_path, key):                                         # 3
        log.info("engine cache hit: %s (key %s...)", engine_path, key[:12])
        return engine_path
    with timed_step(f"build TensorRT engine {engine_path.name} ({precision}, plugin={plugin and plugin['mode']})", log) as t:
        engine_bytes, layers = _build(files, settings, timing_cache, expected_plugin_layers(manifest))   # 4
    write_bytes_atomic(engine_path, engine_bytes)                                       # 5
    meta = _metadata(key, settings, plugin, device, manifest, t["seconds"], engine_bytes)
    write_json_atomic(metadata_path(engine_path), {**meta, "plugin_layers": layers})
    log.info("wrote %s (%.1f MB) and %s", engine_path, len(engine_bytes) / 2**20, metadata_path(engine_path).name)
    return engine_path


def _prepare_plugin(settings: EngineSettings) -> tuple[EngineSettings, dict[str, Any] | None]:
    from engines.plugins import apt_plugin

    if not settings.use_plugin:
        if apt_plugin.registered_mode() is not None:
            raise ConfigError("a build without the plugin in a process where the APT plugin is registered",
                              "no registered plugin (the ONNX parser would bind the node to it)",
                              "run the --no-plugin build in a fresh process")
        return replace(settings, plugin_mode="none"), None
    mode = apt_plugin.register_plugin(settings.plugin_mode)
    return replace(settings, plugin_mode=mode), apt_plugin.plugin_fingerprint(mode)


def _cached(engine_path: Path, key: str) -> bool:
    meta = metadata_path(engine_path)
    if not engine_path.is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("cache_key") == key
    except json.JSONDecodeError:
        return False


def expected_plugin_layers(manifest: dict[str, Any]) -> int:
    """The manifest's fused-node count (what a plugin engine must hold as plugin layers)."""
    count = (manifest.get("fused_op") or {}).get("count")
    if not isinstance(count, int):
        raise ConfigError("a manifest without fused_op.count", "the fused-node count apt-deploy export records",
                          "re-export the artifact")
    return count


def _build(files: list[Path], settings: EngineSettings, timing_cache: str | Path | None,
           fused_nodes: int) -> tuple[bytes, int]:
    """Parse (plugin builds: the function-free copy), check the network's plugin layers, build, check the
    engine's plugin layers; returns the engine bytes and its plugin-layer count."""
    from engines.plugins.binding import plugin_only_onnx

    expected = fused_nodes if settings.use_plugin else 0
    with (plugin_only_onnx(files) if settings.use_plugin else contextlib.nullcontext(files[0])) as onnx_path:
        engine_bytes = _build_network(onnx_path, settings, timing_cache, expected)
    return engine_bytes, _check_engine_plugin_layers(engine_bytes, expected, settings.use_plugin)


def _build_network(onnx_path: Path, settings: EngineSettings, timing_cache: str | Path | None, expected: int) -> bytes:
    """Polygraphy: NetworkFromOnnxPath (strongly typed) -> CreateConfig (profile, cache, DETAILED layer info) -> bytes."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    from engines.plugins.binding import check_plugin_layers, count_network_plugin_layers

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()  # (builder, network, parser)
    check_plugin_layers(count_network_plugin_layers(network[1]), expected, "the parsed network", settings.use_plugin)
    profile = Profile()
    for name, low, opt, high in settings.profiles:
        profile.add(name, min=low, opt=opt, max=high)
    pools = {trt.MemoryPoolType.WORKSPACE: settings.workspace_bytes} if settings.workspace_bytes else None
    cache = str(timing_cache) if timing_cache else None
    config = CreateConfig(profiles=[profile], tf32=settings.tf32, memory_pool_limits=pools, load_timing_cache=cache,
                          builder_optimization_level=settings.builder_optimization_level,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)
    return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)())


def _check_engine_plugin_layers(engine_bytes: bytes, expected: int, use_plugin: bool) -> int:
    """Deserialize the built engine and count its plugin layers with TensorRT's engine inspector."""
    import tensorrt as trt
    from polygraphy.backend.trt import EngineFromBytes

    from engines.plugins.binding import check_plugin_layers, count_plugin_layers

    engine = EngineFromBytes(engine_bytes)()
    found = count_plugin_layers(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    check_plugin_layers(found, expected, "the built engine", use_plugin)
    return found


def _metadata(key: str, settings: EngineSettings, plugin: dict[str, Any] | None, device: dict[str, Any],
              manifest: dict[str, Any], seconds: float, engine_bytes: bytes) -> dict[str, Any]:
    import tensorrt as trt

    return {"cache_key": key, "created": now_iso(), "tensorrt_version": trt.__version__, "device": device,
            "plugin": plugin, "settings": settings.to_json(), "build_seconds": round(seconds, 3),
            "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(), "artifact_sha256": manifest.get("sha256"),
            "backbone": manifest.get("backbone"), "versions": tool_versions()}
