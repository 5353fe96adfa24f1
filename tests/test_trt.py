"""TensorRT: CPU-runnable checks of the plugin binding, the engine cache key, the build CLI and its errors;
TensorRT builds and runs (markers ``trt`` + ``gpu``) skip here with the reason (TensorRT cannot be
installed in this environment). Nothing here mocks TensorRT."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import apt_deploy.cli as cli
from apt_deploy.errors import ConfigError, MissingDependencyError
from apt_deploy.features import has, why_missing
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as SPEC
from engines.plugins import apt_plugin
from apt_deploy.settings import EngineSettings
from engines.trt_build import check_precision, engine_cache_key
from engines.trt_runner import check_compatible

BLOCKED = "tensorrt triton torch onnx onnxruntime onnxscript polygraphy".split()


def _main(monkeypatch, argv):
    monkeypatch.setattr(cli, "COMMANDS", ("apt_deploy.cli.build",))
    return cli.main(argv)


# --- plugin binding (no tensorrt needed) -------------------------------------------------------------

def test_plugin_names_come_from_the_schema():
    assert apt_plugin.PLUGIN_ID == f"{SPEC.plugin_namespace}::{SPEC.onnx_name}" == SPEC.plugin_id
    assert (apt_plugin.PLUGIN_NAMESPACE, apt_plugin.PLUGIN_NAME) == (SPEC.plugin_namespace, SPEC.onnx_name)
    assert apt_plugin.PLUGIN_VERSION == SPEC.plugin_version == apt_plugin.QDP_PLUGIN_VERSION
    assert apt_plugin.TENSOR_INPUTS == SPEC.inputs
    assert set(apt_plugin.TRT_TYPE_NAMES) == set(SPEC.dtypes)
    assert "tensorrt" not in sys.modules or has("tensorrt")


def test_exported_nodes_bind_to_the_plugin(apt_artifact):
    """TensorRT's parser: plugin name = op_type, namespace/version = the node's string attributes; the
    model-local function of the same domain/name is the fallback when the plugin is not registered."""
    from exporters.fused_op import fused_nodes

    model = onnx.load(str(apt_artifact / "model.onnx"), load_external_data=False)
    nodes = fused_nodes(model)
    assert nodes
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == apt_plugin.PLUGIN_NAME and node.domain == SPEC.domain
        assert attrs["plugin_namespace"].decode() == apt_plugin.PLUGIN_NAMESPACE
        assert attrs["plugin_version"].decode() == apt_plugin.PLUGIN_VERSION
        assert list(node.input)[2:] and len(node.input) == len(apt_plugin.TENSOR_INPUTS)
    assert any(f.domain == SPEC.domain and f.name == apt_plugin.PLUGIN_NAME for f in model.functions)


@pytest.mark.parametrize("mode,version,aot,expected", [
    ("auto", "11.4.0.106", True, "aot"), ("auto", "10.9.0", True, "aot"), ("auto", "10.8.0", False, "jit"),
    ("jit", "11.4.0", True, "jit"), ("aot", "10.9.0", True, "aot")])
def test_plugin_mode_resolution(mode, version, aot, expected):
    assert apt_plugin.resolve_mode(mode, version, aot) == expected


@pytest.mark.parametrize("mode,version,aot,match", [
    ("aot", "10.8.0", False, "10.9"), ("auto", "10.5.0", False, "10.6"), ("fast", "11.0.0", True, "one of")])
def test_plugin_mode_errors(mode, version, aot, match):
    with pytest.raises(ConfigError, match=match):
        apt_plugin.resolve_mode(mode, version, aot)


# --- engine cache key ---------------------------------------------------------------------------------

CODE = {"kernel_sha256": "k", "plugin_sha256": "p", "binding_sha256": "b", "triton": "3.9.0"}


def _key_inputs(tmp_path: Path):
    (tmp_path / "model.onnx").write_bytes(b"onnx-graph")
    (tmp_path / "model.onnx.data").write_bytes(b"weights")
    files = [tmp_path / "model.onnx", tmp_path / "model.onnx.data"]
    settings = EngineSettings(profiles=(("x", (1, 4), (2, 4), (8, 4)),))
    return files, settings, "11.4.0", {"name": "H100", "compute_capability": "9.0"}, {"id": SPEC.plugin_id, "mode": "aot"}


CHANGED = {"precision": "fp16", "use_plugin": False, "plugin_mode": "jit", "workspace_bytes": 2**30,
           "builder_optimization_level": 5, "tf32": True, "profiles": (("x", (1, 4), (4, 4), (8, 4)),)}


def test_cache_key_is_stable(tmp_path):
    files, settings, trt, device, plugin = _key_inputs(tmp_path)
    assert engine_cache_key(files, settings, trt, device, plugin, CODE) == engine_cache_key(files, settings, trt, device, plugin, dict(CODE))


def test_every_engine_setting_is_in_the_test():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(EngineSettings)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_cache_key_changes_with_each_setting(tmp_path, field):
    files, settings, trt, device, plugin = _key_inputs(tmp_path)
    base = engine_cache_key(files, settings, trt, device, plugin, CODE)
    assert engine_cache_key(files, dataclasses.replace(settings, **{field: CHANGED[field]}), trt, device, plugin, CODE) != base


@pytest.mark.parametrize("what", ["onnx", "external_data", "tensorrt", "device", "plugin", *sorted(CODE)])
def test_cache_key_changes_with_inputs(tmp_path, what):
    """Each input changes the key: the kernel source, the plugin registration source, the binding check and
    the Triton version that compiles the kernel included."""
    files, settings, trt, device, plugin = _key_inputs(tmp_path)
    base = engine_cache_key(files, settings, trt, device, plugin, CODE)
    code = dict(CODE)
    if what == "onnx":
        files[0].write_bytes(b"onnx-graph2")
    elif what == "external_data":
        files[1].write_bytes(b"weights2")
    elif what == "tensorrt":
        trt = "11.4.1"
    elif what == "device":
        device = {"name": "H200", "compute_capability": "9.0"}
    elif what == "plugin":
        plugin = {**plugin, "mode": "jit"}
    else:
        code[what] = code[what] + "2"
    assert engine_cache_key(files, settings, trt, device, plugin, code) != base


def test_plugin_code_identity_hashes_the_sources_and_triton_version():
    import importlib.metadata

    from apt_deploy.fileio import sha256_file
    from engines.kernels import triton_apd
    from engines.plugins import binding
    from engines.trt_build import plugin_code_identity

    code = plugin_code_identity()
    assert code == {"kernel_sha256": sha256_file(triton_apd.__file__), "plugin_sha256": sha256_file(apt_plugin.__file__),
                    "binding_sha256": sha256_file(binding.__file__),
                    "triton": importlib.metadata.version("triton") if has("triton") else "none"}
    assert len(set(code.values())) == len(code)


# --- the plugin build parses no function body; plugin layers are counted ---------------------------

def test_plugin_build_parses_the_model_without_the_function_body(apt_artifact):
    """On a real exported artifact: the temporary model has no apt FunctionProto, keeps every fused node
    and its initializers, is removed afterwards, and the artifact's files are unchanged."""
    from apt_deploy.manifest import onnx_files, read_manifest
    from engines.plugins.binding import fused_node_count, plugin_only_onnx

    manifest = read_manifest(apt_artifact)
    files = onnx_files(apt_artifact, manifest)
    before, listing = files[0].read_bytes(), list(apt_artifact.iterdir())
    with plugin_only_onnx(files) as path:
        assert path.parent == apt_artifact and path.name.startswith(".") and path != files[0]
        stripped = onnx.load(str(path))  # external data (if any) resolves through the links beside it
        assert not [f for f in stripped.functions if f.domain == SPEC.domain]
        assert fused_node_count(stripped) == manifest["fused_op"]["count"] > 0
        original = onnx.load(str(files[0]))
        assert [n.name for n in stripped.graph.node] == [n.name for n in original.graph.node]
        assert {i.name for i in stripped.graph.initializer} == {i.name for i in original.graph.initializer}
    assert not path.exists()
    assert files[0].read_bytes() == before and sorted(apt_artifact.iterdir()) == sorted(listing)
    assert any(f.domain == SPEC.domain for f in onnx.load(str(files[0]), load_external_data=False).functions)


def test_plugin_build_copy_finds_external_data(apt_artifact, tmp_path):
    """With weights in an external data file, the stripped copy (beside model.onnx) reads the same weights."""
    import numpy as np
    from onnx import numpy_helper

    from engines.plugins.binding import plugin_only_onnx

    model = onnx.load(str(apt_artifact / "model.onnx"))
    expected = [numpy_helper.to_array(t) for t in model.graph.initializer]
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    with plugin_only_onnx([tmp_path / "model.onnx", tmp_path / "model.onnx.data"]) as path:
        stripped = onnx.load(str(path))
    assert len(expected) == len(stripped.graph.initializer) > 0
    for a, b in zip(expected, stripped.graph.initializer):
        np.testing.assert_array_equal(a, numpy_helper.to_array(b))
    with pytest.raises(Exception, match="does not list"):
        with plugin_only_onnx([tmp_path / "model.onnx"]):
            pass


def _inspector_json(layer_types):
    """Text in the documented shape of IEngineInspector.get_engine_information(LayerInformationFormat.JSON) for a
    DETAILED engine. A unit test of our parser only: no TensorRT ran here."""
    import json

    layers = [{"Name": f"layer{i}", "LayerType": t, "Inputs": [], "Outputs": []} for i, t in enumerate(layer_types)]
    return json.dumps({"Layers": layers, "Bindings": ["input_ids", "logits"]})


def test_plugin_layers_are_counted_from_inspector_json():
    from engines.plugins.binding import count_plugin_layers

    assert count_plugin_layers(_inspector_json(["Myelin", "PluginV3", "Reformat", "PluginV3", "PluginV2"])) == 3
    assert count_plugin_layers(_inspector_json(["Myelin", "CaskGemm"])) == 0
    with pytest.raises(ConfigError, match="DETAILED"):
        count_plugin_layers('{"Layers": ["layer0", "layer1"], "Bindings": []}')
    with pytest.raises(ConfigError, match="Layers"):
        count_plugin_layers('{"Bindings": []}')


def test_an_engine_with_the_wrong_plugin_count_is_refused():
    from engines.plugins.binding import check_plugin_layers

    check_plugin_layers(2, 2, "the built engine", use_plugin=True)
    check_plugin_layers(0, 0, "the built engine", use_plugin=False)
    with pytest.raises(ConfigError, match="0 APT plugin layer.*2 fused node"):
        check_plugin_layers(0, 2, "the built engine", use_plugin=True)
    with pytest.raises(ConfigError, match="--no-plugin build has 1 plugin"):
        check_plugin_layers(1, 0, "the built engine", use_plugin=False)


def test_expected_plugin_layers_come_from_the_manifest():
    from engines.trt_build import expected_plugin_layers

    assert expected_plugin_layers({"fused_op": {"count": 12}}) == 12
    with pytest.raises(ConfigError, match="fused_op.count"):
        expected_plugin_layers({})


# --- precision, compatibility ----------------------------------------------------------------------

def test_precision_must_match_the_exported_dtype():
    check_precision("fp16", {"dtype": "fp16"})
    with pytest.raises(ConfigError, match="export --dtype fp16"):
        check_precision("fp16", {"dtype": "fp32"})
    with pytest.raises(ConfigError, match="one of"):
        check_precision("int8", {"dtype": "fp32"})


def test_engine_from_another_tensorrt_or_gpu_is_refused(tmp_path):
    meta = {"tensorrt_version": "11.4.0", "device": {"name": "H100", "compute_capability": "9.0"},
            "settings": {"precision": "fp32"}}
    here = {"name": "H100", "compute_capability": "9.0"}
    check_compatible(meta, "11.4.0", here, tmp_path / "model.fp32.plan")
    with pytest.raises(ConfigError, match="TensorRT 11.4.0.*TensorRT 10.13"):
        check_compatible(meta, "10.13", here, tmp_path / "model.fp32.plan")
    with pytest.raises(ConfigError, match="H100.*H200"):
        check_compatible(meta, "11.4.0", {"name": "H200", "compute_capability": "9.0"}, tmp_path / "e.plan")


# --- CLI and backends without tensorrt ------------------------------------------------------------------

def test_build_is_a_cli_command():
    assert "apt_deploy.cli.build" in cli.COMMANDS


def test_build_help_without_torch_tensorrt_triton():
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED) +
            "import apt_deploy.cli as cli\ncli.COMMANDS = ('apt_deploy.cli.build',)\ncli.main(['build', '--help'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: apt-deploy build" in proc.stdout and "--no-plugin" in proc.stdout and "--precision" in proc.stdout


@pytest.mark.skipif(has("tensorrt"), reason="tensorrt is installed here")
def test_build_without_tensorrt_exits_2_naming_tensorrt(apt_artifact, monkeypatch, capsys):
    assert _main(monkeypatch, ["build", str(apt_artifact), "--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err.lower() and "pypi.nvidia.com" in err
    assert not list(apt_artifact.glob("*.plan"))


def test_build_with_the_wrong_precision_exits_2(apt_artifact, monkeypatch, capsys):
    assert _main(monkeypatch, ["build", str(apt_artifact), "--precision", "bf16"]) == 2
    assert "--dtype bf16" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["lots", "nan", "inf"])
def test_build_bad_workspace_exits_2(apt_artifact, monkeypatch, capsys, size):
    assert _main(monkeypatch, ["build", str(apt_artifact), "--workspace", size]) == 2
    assert "--workspace" in capsys.readouterr().err


def test_backends_register_without_gpu_dependencies(apt_artifact):
    from engines.runners import BACKENDS, make_runner

    runner = make_runner("trt", apt_artifact)  # lazy: nothing imported yet
    assert {"trt", "torch-cuda"} <= set(BACKENDS)
    if not has("tensorrt"):
        with pytest.raises(MissingDependencyError, match="tensorrt"):
            runner.activate()
    if not has("cuda"):
        with pytest.raises(MissingDependencyError, match="cuda"):
            make_runner("torch-cuda", apt_artifact, load_model=lambda: None).activate()


# --- TensorRT builds and runs (skip without tensorrt / GPU) -----------------------------------------

def needs_trt(test):
    test = pytest.mark.skipif(not has("tensorrt"), reason=why_missing("tensorrt"))(test)
    test = pytest.mark.skipif(not has("cuda"), reason=why_missing("cuda"))(test)
    return pytest.mark.gpu(pytest.mark.trt(test))


def _feeds(artifact: Path):
    from apt_deploy.manifest import read_manifest
    from engines.runners import OnnxRuntimeRunner

    manifest = read_manifest(artifact)
    rng = np.random.default_rng(0)
    feed = {}
    for i in manifest["inputs"]:
        shape = tuple(i["opt_shape"])
        feed[i["name"]] = (rng.integers(0, 2, shape) if i["dtype"].startswith("int") else
                           rng.standard_normal(shape)).astype(i["dtype"])
    with OnnxRuntimeRunner(artifact / "model.onnx") as ort:
        return feed, ort.infer(feed)


@needs_trt
def test_plugin_engine_matches_onnxruntime(apt_artifact, tmp_path):
    import json

    from apt_deploy.manifest import read_manifest
    from apt_deploy.settings import tolerance
    from engines.compare import assert_close
    from engines.trt_build import build_engine, metadata_path
    from engines.trt_runner import TensorRTRunner

    engine = build_engine(apt_artifact, "fp32", out=tmp_path / "e.plan", timing_cache=tmp_path / "t.cache")
    meta = json.loads(metadata_path(engine).read_text())
    assert meta["plugin_layers"] == read_manifest(apt_artifact)["fused_op"]["count"] > 0  # engine inspector count
    feed, expected = _feeds(apt_artifact)
    with TensorRTRunner(engine) as trt_runner:
        assert_close(expected, trt_runner.infer(feed), tolerance("onnxruntime_vs_torch"), "TensorRT (plugin) vs ORT")
    again = build_engine(apt_artifact, "fp32", out=tmp_path / "e.plan", timing_cache=tmp_path / "t.cache")
    assert again == engine  # cache hit: same key


@needs_trt
def test_no_plugin_engine_builds_in_a_fresh_process(apt_artifact, tmp_path):
    import json

    proc = subprocess.run([sys.executable, "-m", "apt_deploy", "build", str(apt_artifact), "--no-plugin",
                           "--out", str(tmp_path / "np.plan")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "np.plan").is_file()
    assert json.loads((tmp_path / "np.plan.json").read_text())["plugin_layers"] == 0  # the function body ran


# --- a failed activation leaves a runner inactive -----------------------------------------------------

def test_onnxruntime_runner_with_a_failed_activation_is_not_active(apt_artifact):
    """The CPU build of ONNX Runtime falls back from CUDA to CPU; the runner refuses that, and must not keep
    the fallback session (a later infer would otherwise run on the wrong provider)."""
    from engines.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(apt_artifact / "model.onnx", providers=("CUDAExecutionProvider",))
    if has("cuda"):
        pytest.skip("this machine has CUDA; the fallback does not happen")
    for _ in range(2):  # the second try fails the same way instead of reusing a half-made session
        with pytest.raises(ConfigError, match="fell back"):
            runner.activate()
        assert runner._session is None


@pytest.mark.skipif(has("cuda"), reason="needs a machine without CUDA for the move to fail")
def test_torch_cuda_runner_with_a_failed_activation_is_not_active(apt_artifact, monkeypatch):
    """The model loads, then moving it to CUDA fails (CPU-only torch): nothing of the half-done activation is kept.
    The CUDA availability check is bypassed so that the failure happens after load_model, as an out-of-memory would."""
    import torch

    from engines.kernels import torch_cuda

    monkeypatch.setattr(torch_cuda, "require", lambda *a: None)
    loads = []
    runner = torch_cuda.TorchCudaRunner(apt_artifact, load_model=lambda: loads.append(1) or torch.nn.Linear(2, 2),
                                        mode="eager", use_triton=False)
    for attempt in (1, 2):
        with pytest.raises((AssertionError, RuntimeError)):
            runner.activate()
        assert runner._module is None and not hasattr(runner, "manifest") and len(loads) == attempt


@pytest.mark.skipif(has("tensorrt"), reason="tensorrt is installed here")
def test_trt_runner_with_a_failed_activation_is_not_active(tmp_path):
    from engines.trt_runner import TensorRTRunner

    runner = TensorRTRunner(tmp_path / "missing.plan")
    with pytest.raises(MissingDependencyError):
        runner.activate()
    assert runner._runner is None
