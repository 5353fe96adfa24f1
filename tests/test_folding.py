"""Every fold pass is an equivalence on a seeded tiny model; fold() leaves the original untouched."""

from __future__ import annotations

import pytest
import torch

import apt_deploy as ad
from apt_deploy.backbones import get_backbone
from apt_deploy.backbones.registry import ShapeSettings
from apt_deploy.errors import ConfigError
from apt_deploy.folding import FOLD_PASSES, fold_apt_modules, fold_deep_prompt
from apt_deploy.methods.apt import FoldedOutputProjection
from apt_deploy.methods.deep_prompt import PrefixKVSelfAttention
from apt_deploy.settings import tolerance
from engines.compare import assert_close
from exporters.validate import torch_outputs

SPEC = get_backbone("vilt")


def _outputs(model, seed=0, batch=3):
    specs = SPEC.input_specs(model, ShapeSettings(batch=(1, batch, batch), text_len=12))
    return torch_outputs(model, SPEC, model, SPEC.dummy_inputs(model, specs, "opt", seed))


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_fold_is_equivalent(method, request):
    model = request.getfixturevalue("apt_model" if method == "apt" else "deep_model")
    folded = ad.fold(model)
    assert_close(_outputs(model), _outputs(folded), tolerance("training_vs_folded"), f"{method} fold")


def test_fold_apt_pass_replaces_every_site_and_scales_projection(apt_model):
    before = [s.module.apt.log_scale.exp().item() for s in SPEC.apt_sites(apt_model)]
    folded = ad.fold(apt_model)
    sites = SPEC.apt_sites(folded)
    assert all(isinstance(s.module, FoldedOutputProjection) for s in sites)
    orig = SPEC.apt_sites(apt_model)[0].module.dense.weight
    torch.testing.assert_close(sites[0].module.dense.weight, orig * before[0])


def test_fold_deep_prompt_pass_builds_prefix_constants(deep_model):
    folded = ad.fold(deep_model)
    attn = folded.vilt.encoder.layer[0].attention.attention
    assert isinstance(attn, PrefixKVSelfAttention)
    heads = deep_model.config.num_attention_heads
    assert tuple(attn.prefix_k.shape) == (heads, 6, deep_model.config.hidden_size // heads)


def test_fold_leaves_original_untouched(apt_model):
    before = {k: v.clone() for k, v in apt_model.state_dict().items()}
    ad.fold(apt_model)
    after = apt_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not apt_model.apt_deploy_state.folded


def test_passes_are_registered_per_method():
    assert FOLD_PASSES["apt"][0] is fold_apt_modules and FOLD_PASSES["deep_prompt"][0] is fold_deep_prompt


def test_fold_without_method_is_a_clear_error():
    with pytest.raises(ConfigError, match="no prompt method"):
        ad.fold(SPEC.build_tiny())


def test_apply_twice_is_refused(apt_model):
    with pytest.raises(ConfigError, match="already has a prompt method"):
        ad.apply_apt(apt_model)


def test_apt_changes_outputs_and_only_method_tensors_train():
    base = SPEC.build_tiny(seed=0)
    model = ad.apply_apt(SPEC.build_tiny(seed=0), ad.APTConfig(prompt_len=4, rank=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("apt.prompt") for n in trainable) and "classifier.0.weight" in trainable
    assert not any("attention.attention.query" in n or "intermediate" in n for n in trainable)
    per_module = 4 * 32 + 2 * 32 * 2 + 1  # p*d + 2*d*r + 1
    assert sum(p.numel() for n, p in model.named_parameters() if ".apt." in n) == 2 * per_module
    assert ad.trainable_parameters(model) < sum(p.numel() for p in base.parameters())


def test_log_scale_trains_only_when_configured():
    for train in (True, False):
        model = ad.apply_apt(SPEC.build_tiny(seed=0), ad.APTConfig(prompt_len=4, rank=2, train_log_scale=train))
        flags = {n.rsplit(".", 1)[-1]: p.requires_grad for n, p in model.named_parameters() if ".apt." in n}
        assert flags == {"prompt": True, "down": True, "up": True, "log_scale": train}
