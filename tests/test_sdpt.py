"""SDPT on a tiny Grounding DINO: official formulation (the oracle, written in tests/sdpt_helpers.py) ≡
training form ≡ folded form, with padded text, a padded image and batch 2; base weights bit-identical
after training; the prototype gradient lies in the image projection's column space; export fixes."""

from __future__ import annotations

import pytest
import torch

from tests.sdpt_helpers import finite_max_diff, official_form, padded_inputs, tiny_sdpt

pytestmark = pytest.mark.usefixtures("one_thread")


def _live_layer_scale(model) -> None:
    """transformers initialises the fusion layer scales at 1e-4, which would hide any SDPT mistake
    below 1e-5: give them O(1) values (they are base weights; the test only needs them fixed)."""
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "text_param"):
                module.text_param.fill_(1.0)
                module.vision_param.fill_(0.5)


@pytest.fixture(scope="module")
def sdpt_model():
    model = tiny_sdpt(tokens=5)
    _live_layer_scale(model)
    return model.eval()


def test_official_equals_training_equals_folded(sdpt_model):
    import apt_deploy as ad
    from apt_deploy.settings import tolerance

    tol = tolerance("training_vs_folded").atol
    feed = padded_inputs(sdpt_model, batch=2)
    with torch.no_grad():
        training = sdpt_model(**feed)
        with official_form(sdpt_model):
            official = sdpt_model(**feed)
        folded = ad.fold(sdpt_model)(**feed)
        base = ad.get_backbone("grounding_dino").build_tiny(seed=0)
        _live_layer_scale(base)
        plain = base(**feed)
    assert torch.isinf(training.logits).any()  # padded text slots are -inf: compared by pattern
    assert finite_max_diff(official.logits, training.logits) <= tol
    assert finite_max_diff(training.logits, folded.logits) <= tol
    assert float((official.pred_boxes - folded.pred_boxes).abs().max()) <= tol
    assert finite_max_diff(plain.logits, training.logits) > 100 * tol  # the prototypes do change the output


def test_text_side_copies_and_image_queries_are_inert(sdpt_model):
    """The official text-side copies are masked for image queries: the image-direction output is the
    plain module's, bit for bit up to rounding, whatever the prototypes."""
    attn = sdpt_model.model.encoder.layers[0].fusion_layer.attn
    g = torch.Generator().manual_seed(3)
    vision, text = torch.randn(2, 30, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        (v_sdpt, _), (t_sdpt, _) = attn(vision, text)
        (v_plain, _), (t_plain, _) = attn.attn(vision, text)
    assert float((v_sdpt - v_plain).abs().max()) <= 1e-6
    assert float((t_sdpt - t_plain).abs().max()) > 1e-3


def test_fold_has_no_pseudo_inverse_and_batches(sdpt_model):
    import apt_deploy as ad
    from apt_deploy.methods.sdpt import FoldedSDPTFusionAttention, SDPTFusionAttention

    folded = ad.fold(sdpt_model)
    layers = [m for m in folded.modules() if isinstance(m, FoldedSDPTFusionAttention)]
    assert len(layers) == 2 and not any(isinstance(m, SDPTFusionAttention) for m in folded.modules())
    assert layers[0].proto_k.shape == (2, 5, 32) and not any(p.requires_grad for p in folded.parameters())
    feed = padded_inputs(sdpt_model, batch=3, seed=5)
    with torch.no_grad():
        full = folded(**feed).logits
        one = folded(**{k: v[2:] for k, v in feed.items()}).logits
    assert finite_max_diff(full[2:], one) <= 1e-5  # rows are independent (no batch-1 assumption)


def test_prototype_gradient_lies_in_the_image_projection_column_space(sdpt_model):
    feed = padded_inputs(sdpt_model, batch=2)
    attn = sdpt_model.model.encoder.layers[1].fusion_layer.attn
    attn.prototypes.grad = None
    out = sdpt_model(**feed)
    finite = out.logits[torch.isfinite(out.logits)]
    (finite.sum() + out.pred_boxes.sum()).backward()
    grad = attn.prototypes.grad
    q, _ = torch.linalg.qr(attn.attn.vision_proj.weight.detach())  # (E, d): basis of col(W_v)
    outside = grad - (grad @ q) @ q.t()
    assert float(grad.norm()) > 0
    assert float(outside.norm()) <= 1e-4 * float(grad.norm())
    attn.prototypes.grad = None


@pytest.mark.parametrize("variant", ["sdpt", "sdpt+head"])
def test_training_moves_only_the_method_tensors(variant, tmp_path):
    from apt_deploy.checkpoint import trained_tensors
    from apt_deploy.data.coco import load_coco_detection
    from apt_deploy.data.synthetic_shapes import write_detection_coco
    from apt_deploy.detection_training import train_detection
    from apt_deploy.backbones.grounding_dino import build_tiny_processor
    from apt_deploy.settings import DetectionTrainSettings

    model = tiny_sdpt(tokens=4, train_head=variant == "sdpt+head")
    trained = {id(p) for p in trained_tensors(model).values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = load_coco_detection(write_detection_coco(tmp_path, "solid", 4, seed=0))
    result = train_detection(model, data.examples, build_tiny_processor(), data.prompt,
                             DetectionTrainSettings(steps=2, batch_size=2, lr=0.05), text_len=16)
    assert len(result.losses) == 2
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, p in model.named_parameters() if id(p) in trained}
    assert moved == expected and any("prototypes" in n for n in moved)
    assert any("bbox_embed" in n for n in moved) == (variant == "sdpt+head")


def test_phrase_mask_rewrite_matches_transformers():
    from transformers.models.grounding_dino.modeling_grounding_dino import (
        SPECIAL_TOKENS, generate_masks_with_special_tokens_and_transfer_map)

    from apt_deploy.backbones.grounding_dino import phrase_masks_without_cummax

    g = torch.Generator().manual_seed(0)
    special = torch.tensor(SPECIAL_TOKENS)
    for _ in range(50):
        ids = torch.randint(0, 6, (3, int(torch.randint(2, 20, (1,), generator=g))), generator=g)
        ids = special[ids.clamp(max=3)] * (ids < 4) + 2000 * (ids >= 4)
        want, got = generate_masks_with_special_tokens_and_transfer_map(ids, special), phrase_masks_without_cummax(ids, special)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
