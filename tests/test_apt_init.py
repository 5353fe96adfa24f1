"""APT's default initialisation is what the official runs train from (shared/specs/meter.md §3.2): the host
model's initialiser re-initialises both low-rank matrices to N(0, 0.02^2) after the module is built, so
W_dn is not N(0, 1) and W_up is not zero. P is N(0, 0.02^2) and the log-scale 0."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_low_rank_matrices_and_prompts_start_normal_with_init_std(std):
    from apt_deploy.methods.apt import APTConfig, APTModule

    torch.manual_seed(0)
    module = APTModule(768, APTConfig(init_std=std))
    for name in ("prompt", "down", "up"):
        t = getattr(module, name).detach()
        assert abs(t.mean().item()) < 0.1 * std and abs(t.std().item() / std - 1) < 0.1, name
    assert module.log_scale.item() == 0.0
    assert not torch.equal(module.keys(), module.prompt)  # W_up != 0: K differs from P from the first step


@pytest.mark.parametrize("backbone", ["vilt", "meter"])
def test_every_backbone_gets_the_official_init(backbone):
    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone

    spec = get_backbone(backbone)
    model = spec.build_tiny(seed=0)
    ad.apply_apt(model, ad.APTConfig(prompt_len=50, rank=4, cls_token_id=None))
    ups = torch.cat([s.module.apt.up.detach().flatten() for s in spec.apt_sites(model)])
    downs = torch.cat([s.module.apt.down.detach().flatten() for s in spec.apt_sites(model)])
    assert abs(ups.std().item() / 0.02 - 1) < 0.15 and abs(downs.std().item() / 0.02 - 1) < 0.15
