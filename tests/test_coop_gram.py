"""CoOp prompt layout and class-embedding folding; GRAM clustering, tasks, meta-step and regulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.clip_helpers import CLASS_NAMES, clip_with_method, tiny_processor


pytestmark = pytest.mark.usefixtures("one_thread")


def test_context_replaces_the_m_placeholders_right_after_sos(clip_dir):
    from apt_deploy.methods.coop import prompt_embeddings, text_token_ids

    model, tokenizer = clip_with_method(clip_dir, "coop", context_len=5)
    learner = model.prompt_learner
    emb = prompt_embeddings(model, learner.context, learner.layout())
    table = model.text_model.embeddings.token_embedding.weight
    assert emb.shape[0] == len(CLASS_NAMES) and learner.context.shape == (5, 32)
    for i, name in enumerate(CLASS_NAMES):
        name_ids = text_token_ids(tokenizer, f"{name}.")
        assert torch.equal(emb[i, 0], table[tokenizer.bos_token_id])
        assert torch.equal(emb[i, 1:6], learner.context)
        assert torch.equal(emb[i, 6:6 + len(name_ids)], table[name_ids])
        assert int(learner.eos_index[i]) == 6 + len(name_ids) and learner.input_ids[i, 6 + len(name_ids)] == tokenizer.eos_token_id


def test_default_context_is_16_random_vectors(clip_dir):
    from apt_deploy.clip_training import prepare_clip

    model, _, _ = prepare_clip(clip_dir, "coop", CLASS_NAMES)
    ctx = model.prompt_learner.context
    assert ctx.shape == (16, 32) and ctx.requires_grad and 0.005 < float(ctx.detach().std()) < 0.05


def test_folded_class_matrix_equals_the_full_text_tower(clip_dir):
    """Zero-shot init: the CoOp head equals get_text_features on "a photo of a {name}." exactly."""
    from apt_deploy.clip_training import prepare_clip
    from apt_deploy.folding import fold
    from apt_deploy.methods.coop import CoOpConfig

    model, tokenizer, _ = prepare_clip(clip_dir, "coop", CLASS_NAMES, CoOpConfig(context_init="a photo of a"))
    ids = tokenizer([f"a photo of a {n}." for n in CLASS_NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
        expected = model.logit_scale.exp() * text / text.norm(dim=-1, keepdim=True)
    weight = fold(model).prompt_learner.weight
    assert weight.shape == (3, 32) and (weight - expected).abs().max() <= 1e-5


def _bank(model, tokenizer, n: int = 96):
    from apt_deploy.data.imagefolder import pixel_tensor
    from apt_deploy.data.synthetic_shapes import make_caption_pairs
    from apt_deploy.methods.gram import embed_pairs

    pairs = make_caption_pairs(("solid", "outline", "noisy", "inverted"), n, seed=0)
    return embed_pairs(model, pixel_tensor(tiny_processor(), [i for i, _ in pairs]), [c for _, c in pairs], tokenizer)


def test_clustering_gives_nested_levels_and_cross_domain_tasks(clip_dir):
    from apt_deploy.methods.gram import build_meta_tasks, cross_modal_hierarchy, medoids

    model, tokenizer = clip_with_method(clip_dir, "gram")
    bank = _bank(model, tokenizer)
    domains, fine = cross_modal_hierarchy(bank, 3, 12)
    assert len(np.unique(domains)) == 3 and len(np.unique(fine)) == 12
    assert all(len(np.unique(domains[fine == c])) == 1 for c in np.unique(fine))  # pseudo-classes nest in domains
    names = medoids(bank, fine)
    tasks = build_meta_tasks(domains, fine, names, 8, ways=3, shots=2, rng=np.random.default_rng(0))
    for t in tasks:
        assert t.support_domain != t.query_domain
        assert set(domains[list(t.support)]) == {t.support_domain} and set(domains[list(t.query)]) == {t.query_domain}
        assert all(fine[t.support[k]] == fine[names_idx] for k, names_idx in
                   ((k, t.support_names[lab]) for k, lab in enumerate(t.support_labels)))


def test_one_meta_step_changes_theta_and_phi(clip_dir):
    from apt_deploy.methods.gram import GradientRegulator, GramConfig, build_meta_tasks, cross_modal_hierarchy, medoids, meta_step

    torch.manual_seed(0)
    model, tokenizer = clip_with_method(clip_dir, "gram")
    bank = _bank(model, tokenizer)
    domains, fine = cross_modal_hierarchy(bank, 3, 12)
    tasks = build_meta_tasks(domains, fine, medoids(bank, fine), 2, ways=3, shots=2, rng=np.random.default_rng(0))
    regulator = GradientRegulator(32, rank=4)
    theta, phi = model.prompt_learner.context.detach().clone(), [p.detach().clone() for p in regulator.parameters()]
    config = GramConfig(ways=3, shots=2, n_domains=3, n_pseudo_classes=12)
    opts = (torch.optim.Adam([model.prompt_learner.context], lr=1e-2), torch.optim.Adam(regulator.parameters(), lr=1e-2))
    loss = meta_step(model, regulator, bank, tasks, config, opts)
    assert np.isfinite(loss) and not torch.equal(theta, model.prompt_learner.context)
    changed = [not torch.equal(a, b) for a, b in zip(phi, regulator.parameters())]
    assert all(changed), [n for (n, _), c in zip(regulator.named_parameters(), changed) if not c]


def test_regulator_keeps_row_norms_and_mixes_with_the_gate():
    from apt_deploy.methods.gram import GradientRegulator

    torch.manual_seed(0)
    reg = GradientRegulator(16, rank=3, layers=2)
    g = torch.randn(5, 16)
    with torch.no_grad():
        reg.gate_logit.fill_(30.0)
        assert torch.allclose(reg(g), g, atol=1e-6)
        reg.gate_logit.fill_(-30.0)
        out = reg(g)
    nonzero = out.norm(dim=1) > 0
    assert torch.allclose(out.norm(dim=1)[nonzero], g.norm(dim=1)[nonzero], rtol=1e-4)


def test_meta_train_then_regulated_tuning_saves_and_reloads_the_regulator(clip_dir, tmp_path):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import load_prompts, save_prompts, trained_tensors
    from apt_deploy.clip_training import train_clip
    from apt_deploy.settings import ClipTrainSettings
    from apt_deploy.data.imagefolder import ClassificationData
    from apt_deploy.methods.gram import GramConfig, meta_train

    model, tokenizer = clip_with_method(clip_dir, "gram")
    before = model.prompt_learner.context.detach().clone()
    reg = meta_train(model, _bank(model, tokenizer), GramConfig(meta_steps=2, tasks_per_step=2, ways=3, shots=2,
                                                                n_domains=3, n_pseudo_classes=12))
    assert model.gram_regulator is reg and not torch.equal(before, model.prompt_learner.context)
    data = ClassificationData(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]), CLASS_NAMES)
    assert len(train_clip(model, data, ClipTrainSettings(steps=2, batch_size=4))) == 2
    assert {k for k in trained_tensors(model) if k.startswith("gram.regulator.")} == {
        "gram.regulator.gate_logit", "gram.regulator.layers.0.u", "gram.regulator.layers.0.v", "gram.regulator.layers.0.bias"}
    save_prompts(model, tmp_path / "p")
    loaded = load_prompts(get_backbone("clip").load(str(clip_dir)), tmp_path / "p")
    assert torch.equal(loaded.gram_regulator.gate_logit, reg.gate_logit)
    assert torch.equal(loaded.prompt_learner.context, model.prompt_learner.context)


def test_meta_train_needs_a_gram_model_and_enough_domains(clip_dir):
    from apt_deploy.errors import ConfigError
    from apt_deploy.methods.gram import GramConfig, build_meta_tasks, meta_train

    model, tokenizer = clip_with_method(clip_dir, "apt")
    with pytest.raises(ConfigError, match="apply the gram method"):
        meta_train(model, _bank(model, tokenizer, 16), GramConfig())
    with pytest.raises(ConfigError, match="two or more domains"):
        build_meta_tasks(np.zeros(8, int), np.repeat([0, 1], 4), {0: 0, 1: 4}, 1, 2, 2, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="at least 2 domains"):
        GramConfig(n_domains=1)
