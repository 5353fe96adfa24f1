"""Training form -> folded -> ONNX -> ONNX Runtime on seeded tiny models, and the artifact contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as OP
from apt_deploy.settings import ExportSettings
from exporters import fused_op
from exporters.onnx_export import export_artifact
from tests.conftest import tiny_method_model


def _load(artifact):
    return onnx.load(str(artifact / "model.onnx"), load_external_data=False)


def test_one_fused_node_per_apt_module_with_constant_k_v(apt_artifact):
    proto = _load(apt_artifact)
    nodes = fused_op.fused_nodes(proto)
    assert len(nodes) == 2  # tiny ViLT has 2 layers
    inits = {i.name: i for i in proto.graph.initializer}
    for node in nodes:
        assert {a.name: a.s.decode() for a in node.attribute} == {"plugin_namespace": "apt", "plugin_version": "1"}
        assert node.input[2] in inits and node.input[3] in inits and node.input[2] != node.input[3]
        assert list(inits[node.input[2]].dims) == [6, 32]
    assert [(f.domain, f.name) for f in proto.functions] == [(OP.domain, OP.onnx_name)]
    assert {o.domain: o.version for o in proto.opset_import}[OP.domain] == OP.version
    onnx.checker.check_model(str(apt_artifact / "model.onnx"), full_check=True)


def test_io_names_follow_transformers(apt_artifact):
    proto = _load(apt_artifact)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "token_type_ids", "pixel_values", "pixel_mask"]
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_manifest_records_the_contract(apt_artifact):
    m = json.loads((apt_artifact / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["backbone"] == "vilt" and m["method"] == "apt" and m["dtype"] == "fp32"
    assert m["fused_op"] == {"domain": "apt", "name": "ApproxPromptDiffusion", "version": 1,
                             "plugin_namespace": "apt", "plugin_version": "1", "count": 2}
    pix = next(i for i in m["inputs"] if i["name"] == "pixel_values")
    assert pix["axes"][0] == "batch" and pix["min_shape"][0] == 1 and pix["max_shape"][0] == 4
    assert len(m["sha256"]["onnx"]) == 64 and len(m["sha256"]["prompts"]) == 64 and m["sha256"]["base_weights"]
    v = m["validation"]
    assert v["fused_op_vs_reference"]["nodes"] == 2
    assert v["training_vs_folded"]["runs"][0]["outputs"][0]["max_abs"] <= 1e-5
    assert all(o["max_abs"] <= 1e-4 for r in v["onnxruntime_vs_torch"]["runs"] for o in r["outputs"])
    assert {"torch", "onnx", "onnxruntime", "apt_deploy"} <= set(m["versions"])


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_dynamic_batch_runs_on_onnxruntime(apt_artifact, tiny_dirs, batch):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings
    from apt_deploy.folding import fold
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import tolerance
    from engines.compare import assert_close
    from engines.runners import OnnxRuntimeRunner
    from exporters.validate import torch_outputs

    spec, folded = get_backbone("vilt"), fold(load_trained(tiny_dirs["model"], tiny_dirs["apt"]))
    feed = spec.dummy_inputs(folded, spec.input_specs(folded, ShapeSettings(batch=(batch,) * 3, text_len=16)), "opt", 7)
    with OnnxRuntimeRunner(apt_artifact / "model.onnx") as runner:
        got = runner.infer({k: v.numpy() for k, v in feed.items()})
    assert_close(torch_outputs(folded, spec, folded, feed), got, tolerance("onnxruntime_vs_torch"), f"batch {batch}")


def test_deep_prompt_exports_with_prefix_constants(tmp_path):
    model = tiny_method_model("deep_prompt")
    out = export_artifact(model, tmp_path / "deep", ExportSettings(batch_max=2))
    proto = _load(out)
    assert not fused_op.fused_nodes(proto)
    prefix = [i for i in proto.graph.initializer if list(i.dims) == [4, 6, 8]]  # [heads, p, head_dim]
    assert len(prefix) >= 2 * 2  # K and V for each of 2 layers
    ok = json.loads((out / "manifest.json").read_text())["validation"]["onnxruntime_vs_torch"]["runs"]
    assert len(ok) == 2


def test_base_model_exports_as_method_none(tmp_path):
    from apt_deploy.backbones import get_backbone

    model = get_backbone("vilt").build_tiny()
    out = export_artifact(model, tmp_path / "base", ExportSettings(batch_max=2))
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "none" and m["fused_op"]["count"] == 0
    assert getattr(model, "apt_deploy_state", None) is None  # the user's model is not modified


def test_dynamic_image_size(tmp_path):
    from apt_deploy.backbones import get_backbone
    from engines.runners import OnnxRuntimeRunner

    model = tiny_method_model("apt")
    out = export_artifact(model, tmp_path / "dyn", ExportSettings(batch_max=2, dynamic_image=True, image_min=32,
                                                                  image_max=64, text_len=8))
    m = json.loads((out / "manifest.json").read_text())
    pix = next(i for i in m["inputs"] if i["name"] == "pixel_values")
    assert pix["axes"][2:] == ["height", "width"] and pix["min_shape"][2:] == [32, 32] and pix["max_shape"][2:] == [64, 64]
    spec = get_backbone("vilt")
    with OnnxRuntimeRunner(out / "model.onnx") as r:
        for h, w in ((32, 48), (64, 64)):
            feed = {"input_ids": np.ones((1, 8), np.int64), "attention_mask": np.ones((1, 8), np.int64),
                    "token_type_ids": np.zeros((1, 8), np.int64),
                    "pixel_values": np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32),
                    "pixel_mask": np.ones((1, h, w), np.int64)}
            assert r.infer(feed)["logits"].shape == (1, 10)
    assert spec.name == "vilt"


def test_failed_validation_leaves_no_artifact(tmp_path, monkeypatch):
    from apt_deploy.errors import ParityError
    from apt_deploy.settings import TOLERANCES, Tolerance

    monkeypatch.setitem(TOLERANCES, "onnxruntime_vs_torch", Tolerance(0.0, 0.0, "impossible, for this test"))
    with pytest.raises(ParityError, match="impossible, for this test"):
        export_artifact(tiny_method_model("apt"), tmp_path / "art", ExportSettings(batch_max=2))
    assert list(tmp_path.iterdir()) == []


def test_half_precision_export(tmp_path):
    out = export_artifact(tiny_method_model("apt"), tmp_path / "fp16", ExportSettings(batch_max=2, dtype="fp16"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "fp16" and next(i for i in m["inputs"] if i["name"] == "pixel_values")["dtype"] == "float16"
    assert m["validation"]["onnxruntime_vs_torch"]["tolerance"]["atol"] == 2e-2


def test_bf16_export_is_checked_but_not_run_on_ort_cpu(tmp_path, capsys):
    from apt_deploy.cli import main

    out = export_artifact(tiny_method_model("apt"), tmp_path / "bf16", ExportSettings(batch_max=2, dtype="bf16"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "bf16" and m["opset"]["ai.onnx"] >= 22 and m["fused_op"]["count"] == 2
    assert "no bfloat16 kernels" in m["validation"]["onnxruntime_vs_torch"]["skipped"]
    assert m["validation"]["training_vs_folded"]["runs"]
    assert main(["verify", str(out), "--model", "unused", "--prompts", "unused"]) == 2
    assert "cannot run on ONNX Runtime CPU" in capsys.readouterr().err
