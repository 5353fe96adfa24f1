"""CoOp (Zhou et al., IJCV 2022): M learnable text context vectors shared across classes, for CLIP.

Class prompt i is laid out as ``[SOS, ctx_1 .. ctx_M, tokens(classname_i + "."), EOS, pad ...]``: the
tokenizer's ids for ``SOS, X * M, name., EOS`` are embedded by CLIP's frozen token embedding and the
M placeholder embeddings right after SOS are replaced by the learnable context (CoOp's "end" class
token position; the trailing period is CoOp's too). The sequence goes through the frozen CLIP text
encoder with its causal mask; the feature is the final-LN state at the EOS position, projected by
``text_projection``. Logits are ``logit_scale.exp() * cos(image_feature, text_feature_i)``.

Initialisation (``CoOpConfig.context_init``): a text such as ``"a photo of a"`` sets M to its token
count and starts the context from those token embeddings, so step 0 *is* zero-shot CLIP with the
template "a photo of a {class}." (CoOp's ``ctx_init``); ``None`` draws M = ``context_len`` vectors
from N(0, 0.02²) (CoOp's default for its few-shot tables). At inference the whole text side is
constant: :func:`class_embedding_matrix` collapses it into one C x D matrix (folding pass
``fold_class_embeddings``), and a deployed CoOp classifier is the image tower plus one GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from apt_deploy.errors import ConfigError
from apt_deploy.methods.apt import APTConfig

ZERO_SHOT_TEMPLATE = "a photo of a"


@dataclass(frozen=True)
class CoOpConfig:
    """CoOp settings. ``train_context=False`` keeps the text head frozen (APT-only / zero-shot)."""

    context_len: int = 16
    context_init: str | None = None
    init_std: float = 0.02
    train_context: bool = True

    def __post_init__(self) -> None:
        if self.context_len < 1:
            raise ConfigError(f"context_len={self.context_len}", "a positive number of context vectors (CoOp: 16)")


@dataclass(frozen=True)
class ClipMethodConfig:
    """What a CLIP method uses (``MethodState.config`` for backbone "clip"): the text head's CoOp
    settings (frozen for "apt") and, for "apt" / "apt+coop", the vision tower's APT settings."""

    coop: CoOpConfig
    apt: APTConfig | None = None


@dataclass(frozen=True)
class ClassPrompts:
    """Tokenised class names and the special ids: everything needed to rebuild the prompt layout
    without a tokenizer (stored in the prompt checkpoint's ``apt_config.json``)."""

    class_names: tuple[str, ...]
    name_ids: tuple[tuple[int, ...], ...]
    sos_id: int
    eos_id: int
    pad_id: int
    init_ids: tuple[int, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "class_token_ids": [list(i) for i in self.name_ids],
                "special_tokens": {"sos": self.sos_id, "eos": self.eos_id, "pad": self.pad_id},
                "context_init_ids": list(self.init_ids)}

    @classmethod
    def from_json(cls, cfg: dict[str, Any]) -> ClassPrompts:
        special = cfg["special_tokens"]
        return cls(tuple(cfg["class_names"]), tuple(tuple(i) for i in cfg["class_token_ids"]),
                   int(special["sos"]), int(special["eos"]), int(special["pad"]),
                   tuple(cfg.get("context_init_ids") or ()))


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without the start/end tokens the tokenizer adds."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_class_prompts(tokenizer: Any, class_names: list[str], config: CoOpConfig) -> ClassPrompts:
    """Tokenise ``"{name}."`` per class (CoOp) and the context-init text with the model's own tokenizer."""
    if not class_names:
        raise ConfigError("an empty list of class names", "at least one class name")
    names = tuple(class_names)
    ids = tuple(tuple(text_token_ids(tokenizer, f"{n}.")) for n in names)
    init = tuple(text_token_ids(tokenizer, config.context_init)) if config.context_init else ()
    if config.context_init and not init:
        raise ConfigError(f"context_init={config.context_init!r} tokenises to nothing", "a non-empty init text")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ClassPrompts(names, ids, int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), int(pad), init)


@dataclass(frozen=True)
class PromptLayout:
    """Token ids with M placeholders after SOS ([C, L]) and the EOS position of each row ([C])."""

    input_ids: torch.Tensor
    eos_index: torch.Tensor
    n_ctx: int


def build_layout(name_ids: list[tuple[int, ...]] | tuple[tuple[int, ...], ...], n_ctx: int, sos: int, eos: int,
                 pad: int, max_len: int, truncate: bool = False) -> PromptLayout:
    """[SOS, pad * n_ctx (placeholders), name ids, EOS, pad ...]; raise (or truncate names) past ``max_len``."""
    room = max_len - n_ctx - 2
    longest = max(len(n) for n in name_ids)
    if longest > room and not truncate:
        raise ConfigError(f"a class prompt of {n_ctx + longest + 2} tokens ({n_ctx} context + {longest} name + SOS/EOS)",
                          f"at most the text encoder's max_position_embeddings={max_len}",
                          "use shorter class names or fewer context vectors (--context-len)")
    rows = [[sos] + [pad] * n_ctx + list(n[:room]) + [eos] for n in name_ids]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    return PromptLayout(ids, torch.tensor([len(r) - 1 for r in rows], dtype=torch.long), n_ctx)


def prompt_embeddings(model: nn.Module, context: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """Token embeddings of the layout with the placeholders replaced by ``context`` ([C, L, d])."""
    emb = model.text_model.embeddings.token_embedding(layout.input_ids.to(context.device))
    ctx = context.to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
    return torch.cat([emb[:, :1], ctx, emb[:, 1 + layout.n_ctx:]], dim=1)


def encode_prompt_embeddings(model: nn.Module, embeds: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP text tower on given token embeddings: positions, causal encoder, final LN,
    the EOS row, ``text_projection`` (what ``CLIPModel.get_text_features`` does from ids)."""
    from transformers.masking_utils import create_causal_mask

    text = model.text_model
    positions = text.embeddings.position_ids[:, : embeds.shape[1]]
    hidden = embeds + text.embeddings.position_embedding(positions)
    mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
    out = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
    last = text.final_layer_norm(out.last_hidden_state)
    pooled = last[torch.arange(last.shape[0], device=last.device), eos_index.to(last.device)]
    return model.text_projection(pooled)


def context_text_features(model: nn.Module, context: torch.Tensor, layout: PromptLayout) -> torch.Tensor:
    """Unnormalised text features [C, D] for a context tensor (functional form, used by GRAM)."""
    return encode_prompt_embeddings(model, prompt_embeddings(model, context, layout), layout.eos_index)


class PromptLearner(nn.Module):
    """CoOp's prompt learner: the ``context`` parameter (M x d_text) and the class-prompt layout."""

    def __init__(self, context: torch.Tensor, prompts: ClassPrompts, max_len: int, train: bool = True) -> None:
        super().__init__()
        self.prompts = prompts
        self.context = nn.Parameter(context.detach().clone(), requires_grad=train)
        layout = build_layout(prompts.name_ids, context.shape[0], prompts.sos_id, prompts.eos_id, prompts.pad_id, max_len)
        self.register_buffer("input_ids", layout.input_ids, persistent=False)
        self.register_buffer("eos_index", layout.eos_index, persistent=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.prompts.class_names)

    def layout(self) -> PromptLayout:
        return PromptLayout(self.input_ids, self.eos_index, self.context.shape[0])

    def text_features(self, model: nn.Module) -> torch.Tensor:
        return context_text_features(model, self.context, self.layout())


class FoldedClassHead(nn.Module):
    """Inference form of the text side: logit_scale.exp() * normalised class embeddings, a constant [C, D]."""

    def __init__(self, weight: torch.Tensor, class_names: list[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.register_buffer("weight", weight)


def initial_context(model: nn.Module, prompts: ClassPrompts, config: CoOpConfig) -> torch.Tensor:
    """Template token embeddings when ``context_init`` was tokenised, else N(0, init_std²) of M x d."""
    emb = model.text_model.embeddings.token_embedding
    if prompts.init_ids:
        with torch.no_grad():
            return emb(torch.tensor(prompts.init_ids, dtype=torch.long)).clone()
    return torch.randn(config.context_len, emb.embedding_dim) * config.init_std


def class_embedding_matrix(model: nn.Module) -> torch.Tensor:
    """logit_scale.exp() * L2-normalised class text features [C, D]: the whole text side as one constant."""
    head = model.prompt_learner
    if isinstance(head, FoldedClassHead):
        return head.weight
    with torch.no_grad():
        feats = head.text_features(model)
        return model.logit_scale.exp() * feats / feats.norm(dim=-1, keepdim=True)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their L2 norm (no epsilon: CLIP's own normalisation)."""
    return x / x.norm(dim=-1, keepdim=True)


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image features [B, D] (``model``: anything with ``vision_model`` and
    ``visual_projection``, a CLIPModel or the exported classifier)."""
    out = model.vision_model(pixel_values=pixel_values)
    return l2_normalize(model.visual_projection(out.pooler_output))


def cosine_logits(model: nn.Module, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``logit_scale.exp() * image_feats @ normalise(text_feats).T`` for normalised image features [B, D]
    and unnormalised text features [C, D]."""
    return model.logit_scale.exp() * image_feats @ l2_normalize(text_feats).t()


def class_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Full PyTorch CLIP classifier (training form): image tower, text tower with the prompt learner, cosine."""
    text = model.prompt_learner.text_features(model)
    return cosine_logits(model, image_features(model, pixel_values), text)
