"""Shared by the Grounding DINO / SDPT tests: a seeded tiny detector with SDPT, padded inputs, and the
official SDPT formulation written out as the oracle (prototypes concatenated as tokens)."""

from __future__ import annotations

import contextlib

import torch


def tiny_sdpt(tokens: int = 5, seed: int = 0, train_head: bool = False, **tiny):
    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone

    model = get_backbone("grounding_dino").build_tiny(seed=seed, **tiny)
    return ad.apply_sdpt(model, ad.SDPTConfig(tokens=tokens, train_head=train_head, seed=seed))


def padded_inputs(model, batch: int = 2, text_len: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Batch > 1 with padded text rows and one image padded bottom-right (the spec's dummy factory)."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings

    spec = get_backbone("grounding_dino")
    specs = spec.input_specs(model, ShapeSettings(batch=(1, batch, batch), text_len=text_len))
    feed = spec.dummy_inputs(model, specs, "opt", seed)
    assert feed["attention_mask"][1:].sum() < feed["attention_mask"][1:].numel()  # some text padding
    assert feed["pixel_mask"].sum() < feed["pixel_mask"].numel()  # some image padding
    return feed


def official_forward(sdpt_attn, vision, text, vision_mask=None, text_mask=None):
    """SDPT as the official code computes it (fuse_helper.py, vpt_only=-4), on transformers' own module:
    x_v = (P - b_v) pinv(W_vᵀ) and x_l = (P - b_l) pinv(W_lᵀ) appended as tokens, the text-side copies
    masked for image queries, transformers' bi-attention run on the extended sequences, extra rows dropped."""
    attn, p = sdpt_attn.attn, sdpt_attn.prototypes
    b, k = vision.shape[0], p.shape[0]
    w_v, b_v = attn.vision_proj.weight.detach(), attn.vision_proj.bias.detach()
    w_l, b_l = attn.text_proj.weight.detach(), attn.text_proj.bias.detach()
    x_v = (p - b_v) @ torch.linalg.pinv(w_v.t())
    x_l = (p - b_l) @ torch.linalg.pinv(w_l.t())
    v = torch.cat([vision, x_v.expand(b, -1, -1)], 1)
    t = torch.cat([text, x_l.expand(b, -1, -1)], 1)
    vm = torch.zeros(b, vision.shape[1], dtype=torch.bool) if vision_mask is None else vision_mask
    tm = torch.zeros(b, text.shape[1], dtype=torch.bool) if text_mask is None else text_mask
    vm = torch.cat([vm, torch.zeros(b, k, dtype=torch.bool)], 1)  # image-side prototypes: visible to text queries
    tm = torch.cat([tm, torch.ones(b, k, dtype=torch.bool)], 1)  # text-side copies: masked (cpt_maskpad = 0)
    (vo, vw), (to, tw) = attn(v, t, vision_attention_mask=vm, text_attention_mask=tm)
    return (vo[:, :-k], vw), (to[:, :-k], tw)


@contextlib.contextmanager
def official_form(model):
    """Run every SDPT layer of ``model`` in the official (concatenated-token) form."""
    from apt_deploy.methods.sdpt import SDPTFusionAttention

    layers = [m for m in model.modules() if isinstance(m, SDPTFusionAttention)]
    for m in layers:
        m.forward = lambda *a, _m=m, **kw: official_forward(_m, *a, **_rename(kw))
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _rename(kw):
    return {"vision_mask": kw.get("vision_attention_mask"), "text_mask": kw.get("text_attention_mask")}


def finite_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over finite entries, after checking both have the same -inf pattern."""
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    return float((a[fin] - b[fin]).abs().max())
