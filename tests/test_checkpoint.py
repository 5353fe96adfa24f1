"""Prompt checkpoint format v1: names, round trip, and every bad-input error."""

from __future__ import annotations

import json

import pytest
import torch

import apt_deploy as ad
from apt_deploy.backbones import get_backbone
from apt_deploy.checkpoint import CONFIG_NAME, TENSORS_NAME, read_prompt_config
from apt_deploy.errors import CheckpointError, InputPathError, OutputExistsError, UnknownNameError

SPEC = get_backbone("vilt")


def test_contract_names_and_config(apt_model, tmp_path):
    from safetensors.torch import load_file

    ad.save_prompts(apt_model, tmp_path / "p")
    tensors = load_file(str(tmp_path / "p" / TENSORS_NAME))
    for i in range(2):
        assert tensors[f"layers.{i}.prompt"].shape == (6, 32)
        assert tensors[f"layers.{i}.down"].shape == (2, 32)
        assert tensors[f"layers.{i}.up"].shape == (32, 2)
        assert tensors[f"layers.{i}.log_scale"].shape == ()
    assert {"head.0.weight", "pooler.dense.weight", "embeddings.modality_type.weight", "text.token4classifier"} <= set(tensors)
    assert not any("attention.attention" in k or "intermediate" in k for k in tensors)  # only trained tensors
    cfg = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    assert {k: cfg[k] for k in ("format_version", "method", "backbone", "prompt_len", "rank", "hidden_size", "num_layers")} == \
        {"format_version": 1, "method": "apt", "backbone": "vilt", "prompt_len": 6, "rank": 2, "hidden_size": 32, "num_layers": 2}
    assert len(cfg["base_fingerprint"]) == 64


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_round_trip_is_exact(method, request, tmp_path):
    model = request.getfixturevalue("apt_model" if method == "apt" else "deep_model")
    ad.save_prompts(model, tmp_path / "p")
    loaded = ad.load_prompts(SPEC.build_tiny(seed=0), tmp_path / "p")
    assert loaded.apt_deploy_state.method == method
    src, dst = ad.checkpoint.trained_tensors(model), ad.checkpoint.trained_tensors(loaded)
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)


def test_existing_output_is_refused(apt_model, tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ad.save_prompts(apt_model, tmp_path / "p")
    ad.save_prompts(apt_model, tmp_path / "p", overwrite=True)
    assert (tmp_path / "p" / TENSORS_NAME).is_file()


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(InputPathError, match="does not exist"):
        read_prompt_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no apt_config.json"):
        read_prompt_config(tmp_path / "empty")


def test_truncated_safetensors(apt_model, tmp_path):
    ad.save_prompts(apt_model, tmp_path / "p")
    path = tmp_path / "p" / TENSORS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ad.load_prompts(SPEC.build_tiny(seed=0), tmp_path / "p")


def test_garbage_safetensors(apt_model, tmp_path):
    ad.save_prompts(apt_model, tmp_path / "p")
    (tmp_path / "p" / TENSORS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        ad.load_prompts(SPEC.build_tiny(seed=0), tmp_path / "p")


@pytest.mark.parametrize("override,match", [
    ({"hidden_size": 48, "num_attention_heads": 4}, "hidden_size=32 but the model has hidden_size=48"),
    ({"num_hidden_layers": 3}, "num_layers=2 but the model has num_layers=3"),
])
def test_shape_mismatch(apt_model, tmp_path, override, match):
    ad.save_prompts(apt_model, tmp_path / "p")
    with pytest.raises(CheckpointError, match=match):
        ad.load_prompts(SPEC.build_tiny(seed=0, **override), tmp_path / "p")


def test_fingerprint_mismatch(apt_model, tmp_path):
    ad.save_prompts(apt_model, tmp_path / "p")
    with pytest.raises(CheckpointError, match="fingerprint"):
        ad.load_prompts(SPEC.build_tiny(seed=1), tmp_path / "p")  # same shapes, other weights


def test_label_count_mismatch_without_fingerprint(apt_model, tmp_path):
    ad.save_prompts(apt_model, tmp_path / "p")
    cfg_path = tmp_path / "p" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    del cfg["base_fingerprint"]
    cfg_path.write_text(json.dumps(cfg))
    resized = ad.load_prompts(SPEC.build_tiny(seed=0, num_labels=7), tmp_path / "p")  # the checkpoint's head wins
    assert resized.classifier[-1].out_features == 10 and resized.config.num_labels == 10
    del cfg["labels"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"head\.\d\.weight' has shape \(10, 64\)"):
        ad.load_prompts(SPEC.build_tiny(seed=0, num_labels=7), tmp_path / "p")


def test_wrong_format_version(apt_model, tmp_path):
    ad.save_prompts(apt_model, tmp_path / "p")
    cfg_path = tmp_path / "p" / CONFIG_NAME
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "format_version": 9}))
    with pytest.raises(CheckpointError, match="format_version=9"):
        read_prompt_config(tmp_path / "p")


def test_unknown_backbone_lists_known():
    with pytest.raises(UnknownNameError, match="vilt"):
        ad.get_backbone("not-a-backbone")
