"""Folding: training form -> inference form, as a list of passes with one signature.

Each pass takes the (copied) model and its backbone spec, rewrites it in place and returns how many
sites it folded. ``fold`` runs them all on a deep copy; the original model is untouched. Every pass
has an equivalence test on a seeded tiny model (tests/test_folding.py).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence

from torch import nn

from apt_deploy.backbones import BackboneSpec, get_backbone
from apt_deploy.errors import ConfigError
from apt_deploy.methods.apt import is_apt_host
from apt_deploy.methods.deep_prompt import DeepPromptLayer, PrefixKVSelfAttention, prefix_kv

log = logging.getLogger(__name__)
FoldPass = Callable[[nn.Module, BackboneSpec], int]


def fold_apt_modules(model: nn.Module, spec: BackboneSpec) -> int:
    """APT -> constants K, V and the fused op; e^s folded into the output projection (W_o, b_o)."""
    folded = 0
    for site in spec.apt_sites(model):
        if is_apt_host(site.module):
            site.replace(spec.fold_apt_site(site))
            folded += 1
    return folded


def fold_deep_prompt(model: nn.Module, spec: BackboneSpec) -> int:
    """Deep prompt -> per-layer prefix K/V constants (no prompt token recomputed per input)."""
    folded = 0
    for site in spec.deep_prompt_sites(model):
        wrapper = site.module
        if not isinstance(wrapper, DeepPromptLayer):
            continue
        layer = wrapper.layer
        parent, attr, layernorm = spec.deep_prompt_host(layer)
        attn = getattr(parent, attr)
        k, v = prefix_kv(attn, layernorm, wrapper.prompt)
        setattr(parent, attr, PrefixKVSelfAttention(attn, k, v))
        site.replace(layer)
        folded += 1
    return folded


def freeze_for_inference(model: nn.Module, spec: BackboneSpec) -> int:
    """Dropout off, no gradients."""
    model.eval().requires_grad_(False)
    return 0


def fold_class_embeddings(model: nn.Module, spec: BackboneSpec) -> int:
    """CLIP's text side (CoOp context or frozen template through the text tower) -> one constant
    matrix logit_scale.exp() * normalised class embeddings (methods/coop.py). No-op without a class head."""
    from apt_deploy.methods.coop import FoldedClassHead, PromptLearner, class_embedding_matrix

    learner = getattr(model, "prompt_learner", None)
    if not isinstance(learner, PromptLearner):
        return 0
    model.prompt_learner = FoldedClassHead(class_embedding_matrix(model).clone(), learner.class_names)
    return 1


def fold_sdpt(model: nn.Module, spec: BackboneSpec) -> int:
    """SDPT -> per-fusion-layer prototype keys/values as constants (no pseudo-inverse, no extra tokens)."""
    from apt_deploy.methods.sdpt import fold_sdpt_layers

    return fold_sdpt_layers(model)


# The passes each method needs, in order ("apt" serves ViLT and CLIP; fold_class_embeddings is a
# no-op on models without a CLIP class head).
FOLD_PASSES: dict[str, tuple[FoldPass, ...]] = {
    "apt": (fold_apt_modules, fold_class_embeddings, freeze_for_inference),
    "deep_prompt": (fold_deep_prompt, freeze_for_inference),
    "coop": (fold_class_embeddings, freeze_for_inference),
    "gram": (fold_class_embeddings, freeze_for_inference),
    "apt+coop": (fold_apt_modules, fold_class_embeddings, freeze_for_inference),
    "sdpt": (fold_sdpt, freeze_for_inference),
    "sdpt+head": (fold_sdpt, freeze_for_inference),
}


def fold(model: nn.Module, passes: Sequence[FoldPass] | None = None) -> nn.Module:
    """Return the inference form of a model with a method applied; ``model`` itself is untouched.
    ``passes`` overrides the method's default passes (e.g. the op-free APT form)."""
    state = getattr(model, "apt_deploy_state", None)
    if state is None:
        raise ConfigError("fold() got a model with no prompt method applied",
                          "a model returned by apply_apt / apply_deep_prompt / load_prompts",
                          "apply or load a method first")
    spec = get_backbone(state.backbone)
    out = copy.deepcopy(model)
    for fold_pass in FOLD_PASSES[state.method] if passes is None else passes:
        n = fold_pass(out, spec)
        if n:
            log.info("fold pass %s: %d sites", fold_pass.__name__, n)
    out.apt_deploy_state = dataclasses.replace(state, folded=True)
    return out
