"""The two-stage proposal loss (apt_deploy.detection_training.proposal_loss): transformers' own Grounding DINO
loss gives the proposal scores and box head no gradient; the added term does."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch():
    from apt_deploy.backbones.grounding_dino import build_tiny_processor
    from apt_deploy.data.coco import category_prompt
    from apt_deploy.data.synthetic_shapes import SHAPES
    from apt_deploy.detection_training import make_batches
    from apt_deploy.experiments.sdpt_experiment import make_split

    _, examples = make_split("solid", 2, 0, 128)
    return make_batches(examples, build_tiny_processor(128, 40), category_prompt(SHAPES), 128, 16, 2)[0]


def _proposal_grads(model) -> float:
    head = model.model.encoder_output_bbox_embed
    return sum(float(p.grad.abs().sum()) for p in head.parameters() if p.grad is not None)


def test_transformers_loss_leaves_proposals_without_gradient_and_proposal_loss_fixes_it():
    from apt_deploy.backbones import get_backbone
    from apt_deploy.detection_training import proposal_loss

    model = get_backbone("grounding_dino").build_tiny(seed=0).train()
    batch = _batch()
    out = model(**batch.inputs, labels=batch.labels)
    out.loss.backward(retain_graph=True)
    assert _proposal_grads(model) == 0.0  # transformers' loss: the proposal box head gets nothing
    extra = proposal_loss(model, out, batch.labels, batch.inputs["input_ids"], batch.inputs["attention_mask"])
    assert extra.ndim == 0 and float(extra) > 0
    extra.backward()
    assert _proposal_grads(model) > 0.0
