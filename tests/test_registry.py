"""Registry completeness: every registered backbone has a tiny-model round trip here
(apply -> save -> load into a fresh base -> fold -> export -> ONNX Runtime parity)."""

from __future__ import annotations

import json

import onnx
import pytest

from apt_deploy.backbones import get_backbone, known_backbones
from apt_deploy.backbones.registry import BACKBONE_MODULES


def _vilt(tmp_path, clip_dir):
    from tests.conftest import tiny_method_model

    model_dir = tmp_path / "vilt"
    get_backbone("vilt").build_tiny(seed=0).save_pretrained(model_dir)
    return tiny_method_model("apt"), model_dir


def _clip(tmp_path, clip_dir):
    from tests.clip_helpers import clip_with_method

    return clip_with_method(clip_dir, "apt+coop")[0], clip_dir


def _sd(tmp_path, clip_dir):
    from tests.sd_helpers import tiny_sd_with_apt

    return tiny_sd_with_apt(tmp_path / "sd")


ROUND_TRIPS = {"vilt": _vilt, "clip": _clip}
ROUND_TRIPS["sd"] = _sd


def test_registry_lists_every_backbone_module():
    assert known_backbones() == sorted(ROUND_TRIPS)
    assert len(BACKBONE_MODULES) == len(known_backbones())


@pytest.mark.parametrize("backbone", known_backbones())
def test_every_registered_backbone_round_trips(backbone, tmp_path, clip_dir, one_thread):
    import apt_deploy as ad
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters import fused_op
    from exporters.onnx_export import export_artifact

    assert backbone in ROUND_TRIPS, f"backbone {backbone!r} is registered but has no tiny-model round trip here"
    model, model_dir = ROUND_TRIPS[backbone](tmp_path, clip_dir)
    ad.save_prompts(model, tmp_path / "prompts")
    reloaded = load_trained(model_dir, tmp_path / "prompts")
    out = export_artifact(reloaded, tmp_path / "artifact", ExportSettings(batch_max=2))
    manifest = json.loads((out / "manifest.json").read_text())
    # a multi-component artifact (sd) has one model.onnx and one validation per component
    parts = [(out / c["path"], c["validation"]) for c in manifest.get("components", [])] or [(out, manifest["validation"])]
    nodes = sum(len(fused_op.fused_nodes(onnx.load(str(d / "model.onnx"), load_external_data=False))) for d, _ in parts)
    assert manifest["backbone"] == backbone and nodes == get_backbone(backbone).num_layers(model)
    assert all(v["training_vs_folded"]["runs"] and v["onnxruntime_vs_torch"]["runs"] for _, v in parts)
