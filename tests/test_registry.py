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


def _meter(tmp_path, clip_dir):
    import apt_deploy as ad
    from apt_deploy.models.meter import save_meter
    from tests.conftest import randomize_method

    model = get_backbone("meter").build_tiny(seed=0)
    save_meter(model, tmp_path / "meter")
    ad.apply_apt(model, ad.APTConfig(prompt_len=6, rank=2, train_log_scale=False, cls_token_id=0))
    randomize_method(model)
    return model, tmp_path / "meter"


ROUND_TRIPS = {"vilt": _vilt, "clip": _clip, "meter": _meter}


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
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert manifest["backbone"] == backbone and len(fused_op.fused_nodes(proto)) == len(get_backbone(backbone).apt_sites(model))
    assert manifest["validation"]["training_vs_folded"]["runs"] and manifest["validation"]["onnxruntime_vs_torch"]["runs"]
