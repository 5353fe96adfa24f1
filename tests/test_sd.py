"""Stable Diffusion: APT as a diffusers attention processor (training form vs folded), its checkpoint,
and the per-component export (ONNX Runtime vs PyTorch per component, manifest, dynamic shapes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")


def _unet_feed(seed: int = 0, batch: int = 2, side: int = 32):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.tensor([10.0, 700.0][:batch]),
            torch.randn(batch, 77, 8, generator=g))


def _unet_out(model, feed):
    import torch

    with torch.no_grad():
        return model.unet(*feed).sample.numpy()


@pytest.mark.parametrize("sites,count", [("attn2", 4), ("attn1+attn2", 8)])
def test_processor_training_form_vs_folded(tmp_path, one_thread, sites, count):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.folding import fold
    from apt_deploy.methods.apt_processor import APTAttnProcessor, FoldedAPTAttnProcessor
    from apt_deploy.settings import tolerance
    from engines.compare import assert_close
    from tests.sd_helpers import tiny_sd_with_apt

    model, _ = tiny_sd_with_apt(tmp_path / "sd", sites=sites)
    procs = [p for p in model.unet.attn_processors.values() if isinstance(p, APTAttnProcessor)]
    assert len(procs) == count and len(get_backbone("sd").apt_sites(model)) == count
    folded = fold(model)
    assert sum(isinstance(p, FoldedAPTAttnProcessor) for p in folded.unet.attn_processors.values()) == count
    feed = _unet_feed()
    trained, inference = _unet_out(model, feed), _unet_out(folded, feed)
    assert_close({"out": trained}, {"out": inference}, tolerance("training_vs_folded"), "sd processor vs folded")
    base = _unet_out(get_backbone("sd").build_tiny(seed=0), feed)
    assert np.abs(trained - base).max() > 1e-3  # APT really acts (randomized up / log_scale)


def test_only_apt_parameters_train_and_gradients_reach_them(tmp_path, one_thread):
    from tests.sd_helpers import tiny_sd_with_apt

    model, _ = tiny_sd_with_apt(tmp_path / "sd")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".processor.apt." in n and n.startswith("unet.") and ".attn2." in n for n in trainable)
    model.unet(*_unet_feed()).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_checkpoint_keys_sites_and_reload(tmp_path, one_thread):
    import apt_deploy as ad
    from apt_deploy.checkpoint import read_prompt_config
    from apt_deploy.pipeline import load_trained
    from tests.sd_helpers import tiny_sd_with_apt

    model, model_dir = tiny_sd_with_apt(tmp_path / "sd", sites="attn1+attn2")
    ad.save_prompts(model, tmp_path / "prompts")
    cfg = read_prompt_config(tmp_path / "prompts")
    assert cfg["backbone"] == "sd" and cfg["sites"] == "attn1+attn2" and cfg["cls_token_id"] is None
    from safetensors.numpy import load_file

    keys = set(load_file(str(tmp_path / "prompts" / "prompts.safetensors")))
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.prompt" in keys
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.log_scale" in keys and len(keys) == 8 * 4
    reloaded = load_trained(model_dir, tmp_path / "prompts")
    feed = _unet_feed(1)
    np.testing.assert_array_equal(_unet_out(model, feed), _unet_out(reloaded, feed))


def test_bad_sites_and_missing_component_directory(tmp_path):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.sd import parse_sites
    from apt_deploy.errors import ConfigError, InputPathError

    with pytest.raises(ConfigError, match="attn1\\+attn2"):
        parse_sites("attn3")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(InputPathError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        get_backbone("sd").load(str(tmp_path / "sd"))


def test_export_components_manifest_and_dynamic_shapes(sd_artifact):
    import onnx

    from apt_deploy.manifest import read_manifest

    art = sd_artifact["artifact"]
    manifest = read_manifest(art)
    assert [c["name"] for c in manifest["components"]] == ["text_encoder", "unet", "vae_decoder"]
    assert manifest["fused_op_count"] == 4 and (art / "tokenizer").is_dir() and (art / "scheduler").is_dir()
    for comp in manifest["components"]:
        sub = read_manifest(art / comp["path"])  # each component is a single-model artifact (bench/build/verify)
        assert sub["component"] == comp["name"] and sub["inputs"] == comp["inputs"]
        runs = sub["validation"]["onnxruntime_vs_torch"]["runs"]
        assert runs and max(o["max_abs"] for r in runs for o in r["outputs"]) <= 1e-4
    unet = onnx.load(str(art / "unet" / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in unet.graph.input}
    assert isinstance(dims["sample"][0], str) and isinstance(dims["sample"][2], str) and dims["sample"][1] == 4
    assert unet.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # timestep stays fp32
    unet_runs = read_manifest(art / "unet")["validation"]["onnxruntime_vs_torch"]["runs"]
    assert {r["shapes"] for r in unet_runs} == {"min", "opt", "max"}


def test_component_runs_at_an_unexported_size(sd_artifact, one_thread):
    """Dynamic batch and height/width: 3 images at 40x56 latents (not one of the validated shape sets)."""
    import torch

    from apt_deploy.pipeline import load_trained
    from apt_deploy.folding import fold
    from engines.runners import OnnxRuntimeRunner

    folded = fold(load_trained(sd_artifact["model_dir"], sd_artifact["prompts"]))
    feed = {"sample": np.random.default_rng(0).standard_normal((3, 4, 40, 24)).astype(np.float32),
            "timestep": np.array([1.0, 400.0, 999.0], np.float32),
            "encoder_hidden_states": np.random.default_rng(1).standard_normal((3, 77, 8)).astype(np.float32)}
    with torch.no_grad():
        expected = folded.unet(*(torch.from_numpy(v) for v in feed.values())).sample.numpy()
    with OnnxRuntimeRunner(sd_artifact["artifact"] / "unet" / "model.onnx") as runner:
        got = runner.infer(feed)["out_sample"]
    assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.slow
def test_export_fp16_components(sd_artifact, tmp_path, one_thread):
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    model = load_trained(sd_artifact["model_dir"], sd_artifact["prompts"])
    out = export_artifact(model, tmp_path / "fp16", ExportSettings(batch_max=2, dtype="fp16"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and all(c["validation"]["onnxruntime_vs_torch"]["runs"] for c in manifest["components"])
