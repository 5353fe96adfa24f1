"""METER (apt_deploy.models.meter) on a tiny random model: APT placement and trainable set as the official
recipe, save/load, folding, padded text rows, the deep-prompt baseline."""

from __future__ import annotations

import copy

import pytest
import torch

from apt_deploy.backbones import get_backbone
from apt_deploy.backbones.registry import ShapeSettings


@pytest.fixture(scope="module")
def base(one_thread):
    return get_backbone("meter").build_tiny(seed=0)


def _feed(model, batch=3, text_len=12, seed=0):
    spec = get_backbone("meter")
    specs = spec.input_specs(model, ShapeSettings(batch=(1, batch, batch), text_len=text_len))
    return spec.dummy_inputs(model, specs, "opt", seed)


def _apt(base, p=6, r=2):
    import apt_deploy as ad
    from tests.conftest import randomize_method

    model = copy.deepcopy(base)
    ad.apply_apt(model)  # the METER defaults: scale frozen, token4classifier from <s>
    model2 = copy.deepcopy(base)
    ad.apply_apt(model2, ad.APTConfig(prompt_len=p, rank=r, train_log_scale=False, cls_token_id=0))
    randomize_method(model2)
    return model, model2


def test_apt_sites_and_trainable_set_follow_the_official_recipe(base):
    from apt_deploy.checkpoint import trained_tensors
    from apt_deploy.methods.apt import count_parameters

    model, _ = _apt(base)
    cfg, spec = model.config, get_backbone("meter")
    sites = spec.apt_sites(model)
    assert len(sites) == 2 * 2 * cfg.num_cross_layers  # self + cross attention, both streams
    assert all(type(s.module).__name__ == "APTSelfOutput" for s in sites)
    assert not any(s.module.apt.log_scale.requires_grad for s in sites)  # official: scale frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = ("classifier.", "cross_modal_text_pooler.", "cross_modal_image_pooler.", "token_type_embeddings.",
                "token4classifier")
    assert all(n.startswith(prefixes) or ".apt." in n for n in trainable)
    h = cfg.hidden_size
    extras = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".apt." not in n)
    head = (2 * h) * (2 * h) + 2 * h + 2 * (2 * h) + (2 * h) * cfg.num_labels + cfg.num_labels
    assert extras == head + 2 * (h * h + h) + 2 * h + h  # head, poolers, token types, token4classifier
    apt = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".apt." in n)
    assert apt == len(sites) * (count_parameters(h, model.apt_deploy_state.config) - 1)  # minus the frozen scale
    # token4classifier starts as RoBERTa's embedding output of <s> (id 0), as the official code builds it
    with torch.no_grad():
        assert torch.allclose(model.token4classifier, model.text.embeddings(input_ids=torch.tensor([[0]])))
    assert "text.token4classifier" in trained_tensors(model)


def test_save_load_round_trip_is_exact(base, tmp_path):
    from apt_deploy.models.meter import load_meter, save_meter

    save_meter(base, tmp_path / "m")
    loaded = get_backbone("meter").load(str(tmp_path / "m"))
    feed = _feed(base)
    with torch.no_grad():
        assert torch.equal(base(**feed).logits, loaded(**feed).logits)
    assert load_meter(tmp_path / "m").config.to_json() == base.config.to_json()


def test_padded_rows_give_the_same_logits_as_unpadded_ones(base):
    _, model = _apt(base)
    feed = _feed(model)
    lengths = feed["attention_mask"].sum(1)
    assert lengths.min() < feed["input_ids"].shape[1]  # at least one padded row
    with torch.no_grad():
        batched = model(**feed).logits
        for i, n in enumerate(lengths.tolist()):
            alone = model(feed["input_ids"][i:i + 1, :n], feed["attention_mask"][i:i + 1, :n], feed["pixel_values"][i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_training_form_equals_folded(base, method):
    import apt_deploy as ad
    from apt_deploy.settings import tolerance
    from tests.conftest import randomize_method

    if method == "apt":
        model = _apt(base)[1]
    else:
        model = copy.deepcopy(base)
        ad.apply_deep_prompt(model, ad.APTConfig(prompt_len=5, method="deep_prompt", cls_token_id=0))
        randomize_method(model)
    folded, feed, tol = ad.fold(model), _feed(model), tolerance("training_vs_folded")
    with torch.no_grad():
        y, y_folded, y_base = model(**feed).logits, folded(**feed).logits, base(**feed).logits
    assert (y - y_base).abs().max() > 1e-3  # the method changes the output
    torch.testing.assert_close(y, y_folded, atol=tol.atol, rtol=tol.rtol)
    if method == "deep_prompt":
        assert type(folded.cross_modal_text_layers[0].attention.self).__name__ == "PrefixKVSelfAttention"


def test_export_verify_and_padded_rows_on_onnx_runtime(base, tmp_path, one_thread, capsys):
    """apt-deploy export / verify on METER: inputs input_ids, attention_mask, pixel_values; output logits; one
    fused node per APT module; ONNX Runtime equals PyTorch on a batch of 3 with padded text rows."""
    import json

    import numpy as np
    import onnx

    import apt_deploy as ad
    from apt_deploy.cli import main
    from apt_deploy.models.meter import save_meter
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import tolerance
    from engines.runners import OnnxRuntimeRunner
    from exporters import fused_op

    save_meter(base, tmp_path / "model")
    ad.save_prompts(_apt(base)[1], tmp_path / "prompts")
    art = tmp_path / "art"
    assert main(["export", "--backbone", "meter", "--model", str(tmp_path / "model"), "--prompts",
                 str(tmp_path / "prompts"), "--out", str(art), "--batch", "1,3,3", "--text-len", "12"]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask", "pixel_values"]
    assert [o["name"] for o in manifest["outputs"]] == ["logits"]
    assert len(fused_op.fused_nodes(onnx.load(str(art / "model.onnx"), load_external_data=False))) == 8
    assert main(["verify", str(art)]) == 0 and "verify: OK" in capsys.readouterr().out
    model = load_trained(tmp_path / "model", tmp_path / "prompts")
    feed = _feed(model, batch=3, text_len=12, seed=5)
    assert (feed["attention_mask"].sum(1) < 12).sum() >= 1
    with torch.no_grad(), OnnxRuntimeRunner(art / "model.onnx") as runner:
        expected = ad.fold(model)(**feed).logits.numpy()
        actual = runner.infer({k: v.numpy() for k, v in feed.items()})["logits"]
    assert np.abs(actual - expected).max() <= tolerance("onnxruntime_vs_torch").atol


@pytest.mark.slow
def test_demo_runs_on_meter(tmp_path, capsys):
    import json

    from apt_deploy.cli import main

    work = tmp_path / "demo"
    assert main(["demo", "--backbone", "meter", "--workdir", str(work), "--steps", "20", "--num-train", "64",
                 "--num-test", "32", "--prompt-len", "8", "--latency-iterations", "3"]) == 0
    assert "METER, RANDOM INIT" in capsys.readouterr().out
    summary = json.loads((work / "summary.json").read_text())
    assert summary["export"]["fused_nodes"] == 8 and summary["training"]["loss_last"] < summary["training"]["loss_first"]
    assert main(["verify", str(work / "artifact")]) == 0


def test_opfree_form_equals_the_fused_fold(base):
    import apt_deploy as ad
    from apt_deploy.methods.apt_opfree import fold_opfree
    from apt_deploy.settings import tolerance

    model = _apt(base)[1]
    opfree, fused, feed, tol = fold_opfree(model), ad.fold(model), _feed(model), tolerance("training_vs_folded")
    assert type(opfree.cross_modal_image_layers[1].crossattention).__name__ == "OpFreeMeterAttention"
    with torch.no_grad():
        torch.testing.assert_close(opfree(**feed).logits, fused(**feed).logits, atol=tol.atol, rtol=tol.rtol)
