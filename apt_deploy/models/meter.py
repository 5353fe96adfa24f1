"""METER (Dou et al., CVPR 2022) built from transformers parts: CLIPVisionModel + RobertaModel + 2 x N
hand-written co-attention layers (post-LN, LayerNorm eps 1e-12, erf GELU), VQA / NLVR2 / SNLI-VE heads.

Forward (shared/specs/meter.md §1.4)::

    t = cross_modal_text_transform(roberta(ids, mask))            # [B, T, H]
    v = cross_modal_image_transform(ln_post(clip(pixels)))        # [B, 1+N, H], ln_post on ALL tokens, no proj
    (t[:, 0] = token4classifier when the APT recipe inserted it)
    t, v = t + token_type[0], v + token_type[1]
    for i: t, v = text_layers[i](t, v), image_layers[i](v, t)     # both streams updated simultaneously
    logits = head(cat(tanh(text_pooler(t[:, 0])), tanh(image_pooler(v[:, 0]))))

Submodule names are METER's own (``cross_modal_text_layers.{i}.attention.self.query`` ...), so official
checkpoints map onto it by renaming the two encoders only (apt_deploy/importers/meter.py).

Directory format (``save_meter`` / ``load_meter``): ``config.json`` (``MeterConfig`` as JSON, with
``"model_type": "meter"`` and ``"architectures": ["MeterModel"]``) + ``model.safetensors`` (the state dict
above), optionally with a RoBERTa tokenizer and a ``preprocessor_config.json`` (CLIP image processor).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from apt_deploy.errors import CheckpointError, ConfigError

TASKS = ("vqa", "nlvr2", "snli")
WEIGHTS_NAME, CONFIG_NAME, ARCHITECTURE = "model.safetensors", "config.json", "MeterModel"
MASK_VALUE = -10000.0  # METER's additive mask value (fp16-safe, unlike finfo.min)


@dataclass
class MeterConfig:
    """Everything needed to rebuild a METER. ``vision`` / ``text`` are CLIPVisionConfig / RobertaConfig kwargs."""

    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    num_cross_layers: int = 6
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    task: str = "vqa"
    num_labels: int = 3129
    max_text_len: int = 50
    id2label: dict[int, str] = field(default_factory=dict)
    label2id: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"METER task {self.task!r}", f"one of {', '.join(TASKS)}")
        self.id2label = {int(k): v for k, v in self.id2label.items()} or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.label2id = self.label2id or {v: k for k, v in self.id2label.items()}
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} with {self.num_attention_heads} heads",
                              "a hidden size divisible by the head count")

    # attributes the rest of the toolkit reads from ``model.config`` (as on transformers configs)
    @property
    def vocab_size(self) -> int:
        return int(self.text["vocab_size"])

    @property
    def max_position_embeddings(self) -> int:
        """The longest text the model takes (METER's max_text_len; RoBERTa itself allows max_pos - 2)."""
        return self.max_text_len

    @property
    def image_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def patch_size(self) -> int:
        return int(self.vision["patch_size"])

    @property
    def token_types(self) -> int:
        return 3 if self.task == "nlvr2" else 2

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return {"model_type": "meter", "architectures": [ARCHITECTURE], **out}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"model_type", "architectures", "apt_deploy_version"})
        if data.get("model_type") != "meter" or unknown:
            raise ConfigError(f"config.json with model_type={data.get('model_type')!r} and unknown fields {unknown}",
                              "a METER config written by save_meter / apt-deploy import",
                              "point --model at a directory written by apt-deploy import --backbone meter")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class MeterOutput(ModelOutput):
    logits: torch.Tensor | None = None


class MeterSelfAttention(nn.Module):
    """BertSelfAttention without the extras: softmax(Q K^T / sqrt(dh) + mask) V over ``context`` (default: itself)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = h // config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> tuple[torch.Tensor]:
        context = hidden_states if context is None else context
        q, k, v = self._heads(self.query(hidden_states)), self._heads(self.key(context)), self._heads(self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size)
        if attention_mask is not None:
            scores = scores + attention_mask
        ctx = self.dropout(scores.softmax(dim=-1)) @ v
        return (ctx.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1),)


class MeterSelfOutput(nn.Module):
    """Post-LN self-output: LayerNorm(dropout(dense(ctx)) + input_tensor). APT sits after ``dense``."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class MeterAttention(nn.Module):
    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.self = MeterSelfAttention(config)
        self.output = MeterSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:  # self-attention: called with two arguments (the deep-prompt fold relies on it)
            return self.output(self.self(hidden_states, attention_mask)[0], hidden_states)
        return self.output(self.self(hidden_states, attention_mask, context)[0], hidden_states)


class _Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)


class MeterOutputFFN(nn.Module):
    """FFN output: LayerNorm(dropout(dense(h)) + input_tensor)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class MeterCrossLayer(nn.Module):
    """METER's BertCrossLayer: self-attention, cross-attention to the other stream, FFN; all post-LN."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        self.attention = MeterAttention(config)
        self.crossattention = MeterAttention(config)
        self.intermediate = _Dense(config.hidden_size, config.intermediate_size)
        self.output = MeterOutputFFN(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None) -> tuple[torch.Tensor]:
        a = self.attention(hidden_states, attention_mask)
        c = self.crossattention(a, encoder_attention_mask, encoder_hidden_states)
        h = nn.functional.gelu(self.intermediate.dense(c))  # erf GELU, as BERT's "gelu"
        return (self.output(h, c),)


class MeterPooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_states[:, 0]))


def build_head(task: str, hidden: int, num_labels: int) -> nn.Sequential:
    """vqa / snli: Linear(2H, 2H) LN GELU Linear(2H, n); nlvr2: Linear(4H, 2H) LN GELU Linear(2H, n)."""
    n_in = 4 * hidden if task == "nlvr2" else 2 * hidden
    return nn.Sequential(nn.Linear(n_in, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(), nn.Linear(2 * hidden, num_labels))


class MeterModel(nn.Module):
    """``forward(input_ids, attention_mask, pixel_values) -> MeterOutput(logits)``; NLVR2 takes pixel_values
    [B, 2, 3, H, W] (two images, token types 1 and 2)."""

    def __init__(self, config: MeterConfig) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

        self.config, h = config, config.hidden_size
        self.vision = CLIPVisionModel(CLIPVisionConfig(**config.vision))
        self.text = RobertaModel(RobertaConfig(**config.text), add_pooling_layer=False)
        self.cross_modal_text_transform = nn.Linear(int(config.text["hidden_size"]), h)
        self.cross_modal_image_transform = nn.Linear(int(config.vision["hidden_size"]), h)
        self.token_type_embeddings = nn.Embedding(config.token_types, h)
        self.cross_modal_text_layers = nn.ModuleList(MeterCrossLayer(config) for _ in range(config.num_cross_layers))
        self.cross_modal_image_layers = nn.ModuleList(MeterCrossLayer(config) for _ in range(config.num_cross_layers))
        self.cross_modal_text_pooler, self.cross_modal_image_pooler = MeterPooler(h), MeterPooler(h)
        self.classifier = build_head(config.task, h, config.num_labels)
        self.token4classifier: nn.Parameter | None = None  # the APT recipe's learned first text token
        self._init_new_parts()

    def _init_new_parts(self) -> None:
        """METER's init_weights on its own parts: Linear/Embedding N(0, 0.02), biases 0, LayerNorm (1, 0)."""
        for name, child in self.named_children():
            if name in ("vision", "text"):
                continue  # transformers initialises its own encoders
            for module in child.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP tokens after ``post_layernorm`` on all of them (METER's ln_post; no projection)."""
        return self.vision.post_layernorm(self.vision(pixel_values=pixel_values).last_hidden_state)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        t = self.text(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        t = self.cross_modal_text_transform(t)
        if self.token4classifier is not None:
            t = torch.cat([self.token4classifier.to(t.dtype).expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
        return t

    def pooled(self, text: torch.Tensor, text_mask: torch.Tensor, pixel_values: torch.Tensor, image_type: int) -> torch.Tensor:
        """One co-attention pass: [B, 2H] = cat(text pooler, image pooler)."""
        x = text + self.token_type_embeddings.weight[0]
        y = self.cross_modal_image_transform(self.image_features(pixel_values)) + self.token_type_embeddings.weight[image_type]
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x, y = text_layer(x, text_mask, y, None)[0], image_layer(y, None, x, text_mask)[0]
        return torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> MeterOutput:
        text = self.text_features(input_ids, attention_mask, token_type_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(text.dtype)) * MASK_VALUE
        if self.config.task == "nlvr2":
            cls = torch.cat([self.pooled(text, mask, pixel_values[:, 0], 1), self.pooled(text, mask, pixel_values[:, 1], 2)], -1)
        else:
            cls = self.pooled(text, mask, pixel_values, 1)
        return MeterOutput(logits=self.classifier(cls))


def save_meter(model: MeterModel, directory: str | Path, extras: Callable[[Path], None] | None = None,
               overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ whatever ``extras(stage)`` writes: tokenizer, image
    processor) atomically to ``directory``. The base model only: a learned token4classifier belongs to the
    prompt checkpoint."""
    from safetensors.torch import save_file

    from apt_deploy.fileio import atomic_directory, write_json_atomic

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != "token4classifier"}
    with atomic_directory(directory, overwrite=overwrite) as stage:
        save_file(state, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json_atomic(stage / CONFIG_NAME, model.config.to_json())
        if extras is not None:
            extras(stage)
    return Path(directory)


def load_meter(directory: str | Path) -> MeterModel:
    """Rebuild a :class:`MeterModel` from a directory written by :func:`save_meter` (eval mode)."""
    from safetensors.torch import load_file

    from apt_deploy.fileio import read_json

    d = Path(directory)
    config = MeterConfig.from_json(read_json(d / CONFIG_NAME, "METER config", "config.json written by save_meter",
                                             "point --model at a METER model directory", error=ConfigError))
    if not (d / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{str(d)!r} has no {WEIGHTS_NAME}", "config.json + model.safetensors",
                              "re-run apt-deploy import --backbone meter")
    model = MeterModel(config)
    load_state(model, load_file(str(d / WEIGHTS_NAME)))
    return model.eval()


def load_state(model: MeterModel, state: dict[str, torch.Tensor]) -> None:
    """Strict load with the missing / unexpected keys and wrong shapes in the error."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"METER weights do not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                              f"wrong shapes {wrong[:8]}", "the tensors save_meter writes for this config",
                              "re-run apt-deploy import; the directory was edited or mixed")
    model.load_state_dict(state)


def tiny_meter_config(task: str = "vqa", num_labels: int = 10, vocab_size: int = 261, image_size: int = 32,
                      head_dim: int = 32, cross_layers: int = 2, max_text_len: int = 16) -> MeterConfig:
    """A tiny METER (vision 2x64 wide, text 2x64, cross 2x(2+2) layers of 64) for tests and the demo."""
    vision = dict(hidden_size=2 * head_dim, intermediate_size=4 * head_dim, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=vocab_size, hidden_size=2 * head_dim, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=4 * head_dim, max_position_embeddings=max_text_len + 2, type_vocab_size=1,
                layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return MeterConfig(vision=vision, text=text, hidden_size=2 * head_dim, num_attention_heads=2,
                       intermediate_size=4 * head_dim, num_cross_layers=cross_layers, task=task,
                       num_labels=num_labels, max_text_len=max_text_len)


def meter_b_config(image_size: int = 384, num_labels: int = 3129, task: str = "vqa") -> MeterConfig:
    """METER-B: CLIP-ViT-B/16 (11 of 12 layers) + RoBERTa-base + 6+6 cross layers of 768 (spec §1)."""
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=11, num_attention_heads=12,
                  image_size=image_size, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                bos_token_id=0, eos_token_id=2)
    return MeterConfig(vision=vision, text=text, task=task, num_labels=num_labels)
