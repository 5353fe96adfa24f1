"""CLIP backbone: APT on the vision tower, CoOp class head, save/load/fold round trips, export."""

from __future__ import annotations

import json

import pytest
import torch

from apt_deploy.settings import TOLERANCES
from tests.clip_helpers import CLASS_NAMES, clip_with_method

METHODS = ("coop", "gram", "apt", "apt+coop")


pytestmark = pytest.mark.usefixtures("one_thread")


def _pixels(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_clip_is_registered_and_loads_from_its_directory(clip_dir):
    from apt_deploy.backbones import get_backbone, known_backbones, spec_for_model
    from apt_deploy.backbones.registry import BACKBONE_MODULES

    assert "clip" in known_backbones() and "apt_deploy.backbones.clip" in BACKBONE_MODULES
    model = get_backbone("clip").load(str(clip_dir))
    assert spec_for_model(model).name == "clip"
    assert get_backbone("clip").num_layers(model) == 2 and get_backbone("clip").hidden_size(model) == 32


def test_apt_wraps_every_vision_self_attention_with_checkpoint_keys(clip_dir):
    from apt_deploy.backbones.clip import APTAttention
    from apt_deploy.checkpoint import trained_tensors

    model, _ = clip_with_method(clip_dir, "apt+coop")
    layers = model.vision_model.encoder.layers
    assert all(isinstance(layer.self_attn, APTAttention) for layer in layers)
    assert not any(isinstance(m, APTAttention) for m in model.text_model.modules())
    keys = set(trained_tensors(model))
    expected = {f"vision.layers.{i}.{n}" for i in range(2) for n in ("prompt", "down", "up", "log_scale")}
    assert keys == expected | {"text.context"}


def test_apt_x_in_is_layer_norm1_output_and_o_is_after_out_proj(clip_dir):
    """y = e^s (o + w * A P) with x_in = LN1(h) and o = out_proj(attention), checked by hooks."""
    model, _ = clip_with_method(clip_dir, "apt")
    layer = model.vision_model.encoder.layers[0]
    seen = {}
    layer.layer_norm1.register_forward_hook(lambda m, i, o: seen.__setitem__("ln1", o))
    layer.self_attn.attn.out_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
    layer.self_attn.register_forward_hook(lambda m, i, o: seen.__setitem__("y", o[0]))
    with torch.no_grad():
        model.vision_model(pixel_values=_pixels())
        expected = layer.self_attn.apt(seen["ln1"], seen["o"])
    assert torch.equal(seen["y"], expected)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_apply_save_load_fold(clip_dir, tmp_path, method):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.clip import FoldedAPTAttention
    from apt_deploy.checkpoint import load_prompts, save_prompts
    from apt_deploy.folding import fold
    from apt_deploy.methods.coop import FoldedClassHead, class_logits

    model, _ = clip_with_method(clip_dir, method, context_init="a photo of a" if method == "apt" else None)
    x = _pixels()
    with torch.no_grad():
        reference = class_logits(model, x)
    save_prompts(model, tmp_path / "prompts")
    loaded = load_prompts(get_backbone("clip").load(str(clip_dir)), tmp_path / "prompts", class_names=CLASS_NAMES)
    folded = fold(loaded)
    with torch.no_grad():
        assert torch.equal(class_logits(loaded, x), reference)
        out = get_backbone("clip").export_module(folded)(x)
    assert (out - reference).abs().max().item() <= TOLERANCES["training_vs_folded"].atol
    assert isinstance(folded.prompt_learner, FoldedClassHead)
    n_fused = sum(isinstance(m, FoldedAPTAttention) for m in folded.modules())
    assert n_fused == (2 if method.startswith("apt") else 0)
    cfg = json.loads((tmp_path / "prompts" / "apt_config.json").read_text())
    assert cfg["class_names"] == CLASS_NAMES and cfg["method"] == method and cfg["backbone"] == "clip"


def test_fold_puts_e_s_into_out_proj(clip_dir):
    from apt_deploy.folding import fold

    model, _ = clip_with_method(clip_dir, "apt")
    attn = model.vision_model.encoder.layers[1].self_attn
    folded_attn = fold(model).vision_model.encoder.layers[1].self_attn
    scale = attn.apt.log_scale.exp()
    assert torch.allclose(folded_attn.attn.out_proj.weight, scale * attn.attn.out_proj.weight)
    assert torch.allclose(folded_attn.v, scale * attn.apt.prompt)


def test_manifest_extras_and_export_io(clip_dir):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings
    from apt_deploy.errors import ConfigError

    spec = get_backbone("clip")
    model, _ = clip_with_method(clip_dir, "coop")
    specs = spec.input_specs(model, ShapeSettings(batch=(1, 2, 8)))
    assert [s.name for s in specs] == ["pixel_values"] and specs[0].axes == ("batch", 3, 32, 32)
    assert spec.output_names(model) == ["logits"] and spec.manifest_extras(model) == {"class_names": CLASS_NAMES}
    assert spec.dummy_inputs(model, specs, "max", 0)["pixel_values"].shape == (8, 3, 32, 32)
    with pytest.raises(ConfigError, match="position embeddings"):
        spec.input_specs(model, ShapeSettings(dynamic_image=True))


@pytest.mark.parametrize("case", ["hidden", "layers", "fingerprint", "class_names", "corrupt", "method"])
def test_load_prompts_rejects_mismatches(clip_dir, tmp_path, case):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import load_prompts, save_prompts
    from apt_deploy.errors import CheckpointError

    spec = get_backbone("clip")
    prompts = save_prompts(clip_with_method(clip_dir, "apt+coop")[0], tmp_path / "p")
    target, kwargs = spec.build_tiny(seed=0), {}
    if case == "hidden":
        target = spec.build_tiny(seed=0, hidden=48)
    elif case == "layers":
        target = spec.build_tiny(seed=0, layers=3)
    elif case == "fingerprint":
        target = spec.build_tiny(seed=1)
    elif case == "class_names":
        kwargs = {"class_names": CLASS_NAMES[:2]}
    elif case == "corrupt":
        path = prompts / "prompts.safetensors"
        path.write_bytes(path.read_bytes()[:-40])
    else:
        cfg = json.loads((prompts / "apt_config.json").read_text())
        (prompts / "apt_config.json").write_text(json.dumps({**cfg, "method": "deep_prompt"}))
    match = {"hidden": "hidden_size", "layers": "num_layers", "fingerprint": "fingerprint", "class_names": "class names",
             "corrupt": "cannot read", "method": "unknown method"}[case]
    with pytest.raises(CheckpointError, match=match):
        load_prompts(target, prompts, **kwargs)


def test_export_artifact_matches_full_clip_with_prompt_learner(clip_dir, tmp_path):
    """ONNX (image tower with fused APT + one class GEMM) vs the full PyTorch CLIP with CoOp's text tower."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from apt_deploy.methods.coop import class_logits
    from apt_deploy.settings import ExportSettings
    from exporters import fused_op

    from exporters.onnx_export import export_artifact

    model, _ = clip_with_method(clip_dir, "apt+coop")
    artifact = export_artifact(model, tmp_path / "artifact", ExportSettings(batch_max=4))
    proto = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    assert len(fused_op.fused_nodes(proto)) == 2
    assert [i.name for i in proto.graph.input] == ["pixel_values"] and [o.name for o in proto.graph.output] == ["logits"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["class_names"] == CLASS_NAMES and manifest["backbone"] == "clip" and manifest["method"] == "apt+coop"
    x = _pixels(4, seed=7)
    with torch.no_grad():
        expected = class_logits(model, x).numpy()
    got = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(got - expected).max() <= TOLERANCES["onnxruntime_vs_torch"].atol
