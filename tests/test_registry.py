"""Registry completeness: every registered backbone has a tiny-model round trip here
(apply -> save -> load into a fresh base -> fold -> export -> ONNX Runtime parity)."""

from __future__ import annotations

import json

import onnx
import pytest

from apt_deploy.backbones import get_backbone, known_backbones
from apt_deploy.backbones.registry import BACKBONE_MODULES
from exporters import fused_op


def _vilt(tmp_path, clip_dir):
    from tests.conftest import tiny_method_model

    model_dir = tmp_path / "vilt"
    get_backbone("vilt").build_tiny(seed=0).save_pretrained(model_dir)
    return tiny_method_model("apt"), model_dir


def _clip(tmp_path, clip_dir):
    from tests.clip_helpers import clip_with_method

    return clip_with_method(clip_dir, "apt+coop")[0], clip_dir


def _meter(tmp_path, clip_dir):
    import apt_deploy as ad
    from apt_deploy.models.meter import save_meter
    from tests.conftest import randomize_method

    model = get_backbone("meter").build_tiny(seed=0)
    save_meter(model, tmp_path / "meter")
    ad.apply_apt(model, ad.APTConfig(prompt_len=6, rank=2, train_log_scale=False, cls_token_id=0))
    randomize_method(model)
    return model, tmp_path / "meter"


def _grounding_dino(tmp_path, clip_dir):
    from apt_deploy.backbones.grounding_dino import save_tiny_grounding_dino
    from tests.sdpt_helpers import tiny_sdpt

    save_tiny_grounding_dino(tmp_path / "gdino", seed=0, layers=1)
    return tiny_sdpt(tokens=3, seed=0, layers=1), tmp_path / "gdino"  # SDPT on the same seed-0 base


def _sd(tmp_path, clip_dir):
    from tests.sd_helpers import tiny_sd_with_apt

    return tiny_sd_with_apt(tmp_path / "sd")


ROUND_TRIPS = {"vilt": _vilt, "clip": _clip, "meter": _meter, "grounding_dino": _grounding_dino, "sd": _sd}


def _sdpt_exports_constants(proto, model, backbone):
    """SDPT folds to plain initializers, two per fusion layer: keys and values of shape (heads, tokens,
    head_dim) (the exporter may store the keys transposed, (heads, head_dim, tokens)); no fused op."""
    attn = model.model.encoder.layers[0].fusion_layer.attn
    h, k, hd = attn.attn.num_heads, attn.prototypes.shape[0], attn.attn.head_dim
    found = [list(i.dims) for i in proto.graph.initializer if list(i.dims) in ([h, k, hd], [h, hd, k])]
    assert len(found) == 2 * get_backbone(backbone).num_layers(model), (found, [list(i.dims) for i in proto.graph.initializer if len(i.dims) == 3])
    return not fused_op.fused_nodes(proto)


# What a round trip's ONNX must contain, when it is not one fused APT node per layer.
EXPORT_CHECKS = {"grounding_dino": _sdpt_exports_constants}


def test_registry_lists_every_backbone_module():
    assert known_backbones() == sorted(ROUND_TRIPS)
    assert len(BACKBONE_MODULES) == len(known_backbones())


@pytest.mark.parametrize("backbone", known_backbones())
def test_every_registered_backbone_round_trips(backbone, tmp_path, clip_dir, one_thread):
    import apt_deploy as ad
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    assert backbone in ROUND_TRIPS, f"backbone {backbone!r} is registered but has no tiny-model round trip here"
    model, model_dir = ROUND_TRIPS[backbone](tmp_path, clip_dir)
    ad.save_prompts(model, tmp_path / "prompts")
    reloaded = load_trained(model_dir, tmp_path / "prompts")
    out = export_artifact(reloaded, tmp_path / "artifact", ExportSettings(batch_max=2))
    manifest = json.loads((out / "manifest.json").read_text())
    # a multi-component artifact (sd) has one model.onnx and one validation per component
    parts = [(out / c["path"], c["validation"]) for c in manifest.get("components", [])] or [(out, manifest["validation"])]
    protos = [onnx.load(str(d / "model.onnx"), load_external_data=False) for d, _ in parts]
    assert manifest["backbone"] == backbone
    if backbone in EXPORT_CHECKS:
        assert EXPORT_CHECKS[backbone](protos[0], model, backbone)
    else:  # one fused APT node per APT site
        assert sum(len(fused_op.fused_nodes(p)) for p in protos) == len(get_backbone(backbone).apt_sites(model))
    assert all(v["training_vs_folded"]["runs"] and v["onnxruntime_vs_torch"]["runs"] for _, v in parts)
