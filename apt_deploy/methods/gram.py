"""GRAM (Li et al., "Gradient-Regulated Meta-Prompt Learning for Generalizable Vision-Language
Models", ICCV 2023) for CoOp on CLIP — a **reconstruction**: no official code exists.

What is from the paper (abstract-level): meta-learn (a) the prompt initialisation θ and (b) a
lightweight gradient-regulating function ψ_φ from unlabeled image-text pairs; meta-tasks come from a
cross-modal hierarchical clustering (coarse clusters act as domains, fine ones as pseudo-classes);
each task takes its support set from one domain and its query set from another; downstream few-shot
tuning starts from θ* and applies ψ_φ* to every gradient. GRAM is training-only: the deployed model
is plain CoOp (methods/coop.py).

What is reconstructed here (specs/sdpt-gram.md, methods-research.md §3.3-3.4), every choice ours:
- Clustering: Ward linkage (scipy) on [normalised frozen-CLIP image feature, normalised frozen-CLIP
  caption feature] per pair, cut at ``n_domains`` and ``n_pseudo_classes`` (nested cuts of one tree).
  A pseudo-class is named by the caption of its medoid, which follows the learnable context in the
  CoOp layout: [SOS, ctx, caption tokens, EOS].
- Task: ``ways`` pseudo-classes x ``shots`` pairs from domain a (support) and from domain b != a
  (query; different pseudo-classes, since the fine clusters nest in the domains and CoOp's context is
  class-agnostic). Loss: cross-entropy over the task's pseudo-class prompts (CLIP logits).
- Meta step, first-order: g = ∇θ L_S(θ) (no create_graph); θ' = θ − α ψ_φ(g); L_Q(θ') back-propagates
  into θ (∂θ'/∂θ = I) and into φ; gradient-norm clipping; Adam for θ and for φ.
- ψ_φ after SUPMER (``beepkh/SUPMER`` model/grad_trans.py, the same group's NLP sibling, *not* GRAM):
  layers x ← ReLU(U V x + b) over gradient rows (U: D x r, V: r x D), rows rescaled to the raw
  gradient's row norm, mixed ψ(g) = (1 − c) x + c g. SUPMER computes c from the encoder's hidden
  state; here c = sigmoid(a learned scalar), initialised at sigmoid(2) ≈ 0.88 so that an untrained
  ψ is close to plain gradient descent (with c = 0.5 an untrained ψ halves the gradient and adds a
  random positive-orthant direction; docs/clip.md has the run that showed it).

Checkpoint: the regulator may be saved with the prompts as ``gram.regulator.{layers.i.u, layers.i.v,
layers.i.bias, gate_logit}`` and its shape in ``apt_config.json["gram_regulator"]`` (loaded back by
``load_prompts``); it is never exported.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from apt_deploy.errors import ConfigError
from apt_deploy.methods.coop import (PromptLayout, build_layout, context_text_features, cosine_logits, image_features,
                                     l2_normalize, text_token_ids)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GramConfig:
    """Meta-training settings (all reconstructed; none are published)."""

    meta_steps: int = 60
    tasks_per_step: int = 4
    ways: int = 4
    shots: int = 4
    n_domains: int = 4
    n_pseudo_classes: int = 24
    inner_lr: float = 1.0
    context_lr: float = 2e-3
    regulator_lr: float = 1e-3
    regulator_rank: int = 4
    regulator_layers: int = 1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_domains < 2 or self.n_pseudo_classes < self.n_domains:
            raise ConfigError(f"n_domains={self.n_domains}, n_pseudo_classes={self.n_pseudo_classes}",
                              "at least 2 domains and at least as many pseudo-classes as domains")
        if min(self.meta_steps, self.tasks_per_step, self.ways - 1, self.shots) < 1:
            raise ConfigError(f"meta_steps={self.meta_steps}, tasks_per_step={self.tasks_per_step}, ways={self.ways}, "
                              f"shots={self.shots}", "positive counts and ways >= 2")


class LowRankLayer(nn.Module):
    """x ← ReLU(x Vᵀ Uᵀ + b) over rows of a gradient (SUPMER's LRLinear)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.randn(dim, rank) / math.sqrt(rank))
        self.v = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x @ self.v.t()) @ self.u.t() + self.bias)


class GradientRegulator(nn.Module):
    """ψ_φ(g) = (1 − c)·rescale(layers(g)) + c·g with a learned gate c ∈ (0, 1)."""

    def __init__(self, dim: int, rank: int = 4, layers: int = 1, gate_init: float = 2.0) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        self.layers = nn.ModuleList(LowRankLayer(dim, rank) for _ in range(layers))
        self.gate_logit = nn.Parameter(torch.tensor(float(gate_init)))

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        x = grad
        for layer in self.layers:
            x = layer(x)
        x = x / (x.norm(dim=-1, keepdim=True) + 1e-8) * grad.norm(dim=-1, keepdim=True)
        c = self.gate()
        return (1 - c) * x + c * grad

    def config_json(self) -> dict[str, int]:
        return {"dim": self.dim, "rank": self.rank, "layers": len(self.layers)}

    @classmethod
    def from_config_json(cls, cfg: dict[str, Any]) -> GradientRegulator:
        return cls(int(cfg["dim"]), int(cfg["rank"]), int(cfg["layers"]))


# --- the unlabeled pairs and their cross-modal hierarchical clustering --------------------------
@dataclass
class PairBank:
    """Frozen-CLIP features of the unlabeled pairs: normalised image and caption features [N, D]
    and the caption token ids (without SOS/EOS)."""

    image_feats: torch.Tensor
    text_feats: torch.Tensor
    caption_ids: list[tuple[int, ...]]

    @property
    def joint(self) -> torch.Tensor:
        """[image; caption] feature per pair [N, 2D]: the space both clusterings and medoids use."""
        return torch.cat([self.image_feats, self.text_feats], dim=1)


@dataclass(frozen=True)
class MetaTask:
    """Support from one domain, query from another; each a list of pair indices with task-local labels
    and the pair index that names each pseudo-class."""

    support_domain: int
    query_domain: int
    support: tuple[int, ...]
    support_labels: tuple[int, ...]
    support_names: tuple[int, ...]
    query: tuple[int, ...]
    query_labels: tuple[int, ...]
    query_names: tuple[int, ...]


def embed_pairs(model: nn.Module, pixel_values: torch.Tensor, captions: list[str], tokenizer: Any) -> PairBank:
    """Run the frozen CLIP towers once over the pairs (image side without any method modules)."""
    ids = [tuple(text_token_ids(tokenizer, c)) for c in captions]
    tok = tokenizer(captions, padding=True, truncation=True, return_tensors="pt",
                    max_length=int(model.config.text_config.max_position_embeddings))
    with torch.no_grad():
        img = image_features(model, pixel_values)
        txt = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    return PairBank(img, l2_normalize(txt), ids)


def cross_modal_hierarchy(bank: PairBank, n_domains: int, n_pseudo_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(domain, pseudo-class) label per pair: nested cuts of one Ward tree on [image; caption] features."""
    from scipy.cluster.hierarchy import cut_tree, linkage

    joint = bank.joint.double().numpy()
    if joint.shape[0] < n_pseudo_classes:
        raise ConfigError(f"{joint.shape[0]} image-caption pairs for {n_pseudo_classes} pseudo-classes",
                          "more pairs than pseudo-classes", "add pairs or lower n_pseudo_classes")
    cuts = cut_tree(linkage(joint, method="ward"), n_clusters=[n_domains, n_pseudo_classes])
    return cuts[:, 0].astype(int), cuts[:, 1].astype(int)


def medoids(bank: PairBank, fine: np.ndarray) -> dict[int, int]:
    """Pseudo-class -> the pair closest to its centroid in the joint space (its caption names the class)."""
    joint = bank.joint
    out = {}
    for c in np.unique(fine):
        idx = torch.as_tensor(np.flatnonzero(fine == c))
        centre = joint[idx].mean(0, keepdim=True)
        out[int(c)] = int(idx[(joint[idx] - centre).norm(dim=1).argmin()])
    return out


def build_meta_tasks(domains: np.ndarray, fine: np.ndarray, names: dict[int, int], n_tasks: int, ways: int,
                     shots: int, rng: np.random.Generator) -> list[MetaTask]:
    """``n_tasks`` tasks, support and query from two different domains (each with >= 2 usable pseudo-classes)."""
    usable = _usable_classes(domains, fine, shots)
    eligible = sorted(d for d, cs in usable.items() if len(cs) >= 2)
    if len(eligible) < 2:
        raise ConfigError(f"only {len(eligible)} domain(s) hold >= 2 pseudo-classes of >= {shots} pairs "
                          f"(pseudo-classes per domain: { {d: len(c) for d, c in usable.items()} })",
                          "two or more domains to draw support and query from",
                          "add pairs, lower --shots for meta-tasks, or raise the number of pseudo-classes")
    tasks = []
    for _ in range(n_tasks):
        a, b = rng.choice(eligible, size=2, replace=False)
        s, s_lab, s_names = _sample_set(usable[a], fine, names, ways, shots, rng)
        q, q_lab, q_names = _sample_set(usable[b], fine, names, ways, shots, rng)
        tasks.append(MetaTask(int(a), int(b), s, s_lab, s_names, q, q_lab, q_names))
    return tasks


def _usable_classes(domains: np.ndarray, fine: np.ndarray, shots: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for c in np.unique(fine):
        members = np.flatnonzero(fine == c)
        if len(members) >= shots:
            out.setdefault(int(domains[members[0]]), []).append(int(c))
    return out


def _sample_set(classes: list[int], fine: np.ndarray, names: dict[int, int], ways: int, shots: int,
                rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    chosen = rng.choice(classes, size=min(ways, len(classes)), replace=False)
    idx, labels = [], []
    for label, c in enumerate(chosen):
        members = rng.choice(np.flatnonzero(fine == c), size=shots, replace=False)
        idx += [int(i) for i in members]
        labels += [label] * shots
    return tuple(idx), tuple(labels), tuple(names[int(c)] for c in chosen)


# --- meta-training ------------------------------------------------------------------------------
def set_loss(model: nn.Module, context: torch.Tensor, bank: PairBank, idx: tuple[int, ...],
             labels: tuple[int, ...], name_pairs: tuple[int, ...]) -> torch.Tensor:
    """CLIP cross-entropy of a support/query set against its pseudo-class prompts [SOS, ctx, caption, EOS]."""
    layout = _layout(model, bank, name_pairs, context.shape[0])
    logits = cosine_logits(model, bank.image_feats[list(idx)], context_text_features(model, context, layout))
    return nn.functional.cross_entropy(logits, torch.tensor(labels))


def _layout(model: nn.Module, bank: PairBank, name_pairs: tuple[int, ...], n_ctx: int) -> PromptLayout:
    p = model.prompt_learner.prompts
    max_len = int(model.config.text_config.max_position_embeddings)
    return build_layout([bank.caption_ids[i] for i in name_pairs], n_ctx, p.sos_id, p.eos_id, p.pad_id, max_len, truncate=True)


def meta_step(model: nn.Module, regulator: GradientRegulator, bank: PairBank, tasks: list[MetaTask],
              config: GramConfig, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer]) -> float:
    """One first-order meta-update of θ (``model.prompt_learner.context``) and φ (the regulator)."""
    theta = model.prompt_learner.context
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total = 0.0
    for task in tasks:
        support = set_loss(model, theta, bank, task.support, task.support_labels, task.support_names)
        (g,) = torch.autograd.grad(support, theta)
        adapted = theta - config.inner_lr * regulator(g)
        query = set_loss(model, adapted, bank, task.query, task.query_labels, task.query_names) / len(tasks)
        query.backward()
        total += query.item()
    nn.utils.clip_grad_norm_([theta, *regulator.parameters()], config.grad_clip)
    for opt in optimizers:
        opt.step()
    return total


def meta_train(model: nn.Module, bank: PairBank, config: GramConfig | None = None) -> GradientRegulator:
    """Meta-learn θ* in place (the CoOp context of a model with method "gram") and ψ_φ*; attach the
    regulator as ``model.gram_regulator`` (saved with the prompts) and return it."""
    from apt_deploy.progress import progress, timed_step

    config = config or GramConfig()
    _check_gram_model(model)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    domains, fine = cross_modal_hierarchy(bank, config.n_domains, config.n_pseudo_classes)
    names = medoids(bank, fine)
    regulator = GradientRegulator(model.prompt_learner.context.shape[1], config.regulator_rank, config.regulator_layers)
    optimizers = (torch.optim.Adam([model.prompt_learner.context], lr=config.context_lr),
                  torch.optim.Adam(regulator.parameters(), lr=config.regulator_lr))
    with timed_step(f"GRAM meta-training ({config.meta_steps} steps x {config.tasks_per_step} tasks)", log):
        for step in progress(range(config.meta_steps), total=config.meta_steps, desc="GRAM meta"):
            tasks = build_meta_tasks(domains, fine, names, config.tasks_per_step, config.ways, config.shots, rng)
            loss = meta_step(model, regulator, bank, tasks, config, optimizers)
            log.debug("meta step %d: query loss %.4f, gate %.3f", step, loss, regulator.gate().item())
    model.gram_regulator = regulator.requires_grad_(False)
    return regulator


def regulate_gradients(model: nn.Module) -> None:
    """Downstream GRAM step: replace the context's gradient by ψ_φ*(gradient), before the optimiser step."""
    regulator = getattr(model, "gram_regulator", None)
    context = model.prompt_learner.context
    if regulator is not None and context.grad is not None:
        with torch.no_grad():
            context.grad.copy_(regulator(context.grad))


def _check_gram_model(model: nn.Module) -> None:
    state = getattr(model, "apt_deploy_state", None)
    if state is None or state.method not in ("gram", "coop") or getattr(model, "prompt_learner", None) is None:
        raise ConfigError(f"meta_train() got a model with method {getattr(state, 'method', None)!r}",
                          'a CLIP model from apply_clip_method(model, "gram", ...)', "apply the gram method first")
