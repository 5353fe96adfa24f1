"""Grounding DINO (transformers' GroundingDinoForObjectDetection): an open-set detector whose encoder
("feature enhancer") fuses image and text tokens with a bi-directional attention in every layer.

Method: SDPT (methods/sdpt.py) in every encoder fusion layer (``model.encoder.layers[i].fusion_layer.attn``);
checkpoint keys ``fusion.layers.{i}.prototypes`` and, for the "sdpt+head" variant, the box head as
``head.bbox_embed.*``. Deployed form (``export_module``):
``pixel_values, input_ids, attention_mask, pixel_mask -> logits, pred_boxes``.

Export fixes (docs/sdpt.md), applied by :meth:`GroundingDinoSpec.export_context` so the user never
sees them: (1) the phrase-mask helper uses ``cummax`` / ``cummin`` and ``isin`` (-> ``searchsorted``), which
have no ONNX lowering: an equivalent O(T^2) form replaces it; (2) ``torch_compilable_check`` lowers to ``aten._is_all_true``
(no ONNX function): ``TRANSFORMERS_DISABLE_TORCH_CHECK=1`` during export and parity runs; (3) a Swin
backbone's SDPA reshape cannot be decomposed: its attention runs "eager" during export.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apt_deploy.backbones.registry import (BackboneSpec, InputSpec, ShapeSettings, read_architecture,
                                           register_backbone)
from apt_deploy.errors import ConfigError

SUPPORTED = ("GroundingDinoForObjectDetection",)
OUTPUTS = ("logits", "pred_boxes")
DEFAULT_IMAGE_SIZE = 800  # used when the model config has no ``image_size`` (real checkpoints: 800 x 1333 inputs)
CLS, SEP, DOT, QUESTION = 101, 102, 1012, 1029  # BERT ids that transformers' Grounding DINO hard-codes as phrase delimiters


def phrase_masks_without_cummax(input_ids: torch.Tensor, special_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate_masks_with_special_tokens_and_transfer_map`` without cummax/cummin (no ONNX lowering):
    the previous / next delimiter of each position via triangular masks and amax / amin. Same outputs
    (tests/test_grounding_dino.py compares them on random id sequences)."""
    batch, length = input_ids.shape
    idx = torch.arange(length, device=input_ids.device)
    # explicit comparison: torch.isin decomposes to searchsorted (no ONNX function) once the batch is symbolic
    special = (input_ids[..., None] == special_tokens.to(input_ids.device)).any(-1)  # (B, T)
    before = idx[None, :] < idx[:, None]  # [i, j]: j < i
    after_or_at = idx[None, :] >= idx[:, None]  # [i, j]: j >= i
    cand = special[:, None, :]
    prev_special = torch.where(cand & before[None], idx[None, None, :], -1).amax(-1)
    next_special = torch.where(cand & after_or_at[None], idx[None, None, :], length).amin(-1)
    valid = (next_special != 0) & (next_special != length - 1) & (next_special != length)
    mask = (next_special[:, :, None] == next_special[:, None, :]) & valid[:, None, :]
    mask = mask | (idx[:, None] == idx[None, :])[None]
    positions = torch.where(valid, idx[None, :] - prev_special - 1, torch.zeros_like(prev_special)).clamp(min=0)
    return mask, positions.to(torch.long)


class GroundingDinoDetector(nn.Module):
    """The exported module: the detector's forward returning ``(logits, pred_boxes)`` only. Token types are
    always 0 in Grounding DINO (its processor writes zeros), so they are not an input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=torch.zeros_like(input_ids), pixel_mask=pixel_mask)
        return out.logits, out.pred_boxes


@register_backbone("grounding_dino")
class GroundingDinoSpec(BackboneSpec):
    model_classes = SUPPORTED
    methods = ("sdpt", "sdpt+head")

    def load(self, model_dir: str) -> nn.Module:
        from transformers import GroundingDinoForObjectDetection

        read_architecture(model_dir, SUPPORTED, "save a GroundingDinoForObjectDetection (save_pretrained)")
        return GroundingDinoForObjectDetection.from_pretrained(model_dir, local_files_only=True).eval()

    def hidden_size(self, model: nn.Module) -> int:
        return int(model.config.d_model)

    def num_layers(self, model: nn.Module) -> int:
        return len(model.model.encoder.layers)

    def fusion_layers(self, model: nn.Module) -> list[nn.Module]:
        """The fusion layers whose ``attn`` SDPT wraps, in encoder order."""
        return [layer.fusion_layer for layer in model.model.encoder.layers]

    def apt_sites(self, model: nn.Module) -> list:
        return []  # APT is not offered for Grounding DINO (methods: sdpt, sdpt+head)

    def deep_prompt_sites(self, model: nn.Module) -> list:
        return []

    def trainable_extras(self, model: nn.Module) -> dict[str, nn.Module]:
        """The box head, shared by every decoder layer (tied weights). (The two-stage proposal box head gets no
        gradient from the loss transformers computes without auxiliary_loss, so it is not listed.)"""
        return {"head.bbox_embed": model.bbox_embed[0]}

    def method_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        from apt_deploy.methods.sdpt import SDPTFusionAttention

        return {f"fusion.layers.{i}.prototypes": f.attn.prototypes
                for i, f in enumerate(self.fusion_layers(model)) if isinstance(f.attn, SDPTFusionAttention)}

    def method_config_json(self, model: nn.Module, state: Any) -> dict[str, Any]:
        import dataclasses

        cfg = dataclasses.asdict(state.config)
        return {"prompt_len": cfg["tokens"], "sdpt": cfg, "embed_dim": int(self.fusion_layers(model)[0].attn.embed_dim)}

    def apply_method_from_config(self, model: nn.Module, cfg: dict[str, Any], **options: Any) -> None:
        from apt_deploy.errors import CheckpointError
        from apt_deploy.methods.sdpt import SDPTConfig
        from apt_deploy.tuning import apply_sdpt

        if "sdpt" not in cfg:
            raise CheckpointError("apt_config.json of a Grounding DINO checkpoint lacks 'sdpt'",
                                  "the fields save_prompts writes for SDPT", "re-save the prompts")
        apply_sdpt(model, SDPTConfig(**cfg["sdpt"]))

    def export_module(self, model: nn.Module) -> nn.Module:
        return GroundingDinoDetector(model)

    # --- export ----------------------------------------------------------------------------
    def input_specs(self, model: nn.Module, shapes: ShapeSettings) -> list[InputSpec]:
        cfg = model.config
        if shapes.dynamic_image:
            raise ConfigError("--dynamic-image for grounding_dino", "a fixed image size (the deformable attention's "
                              "level shapes are traced as constants)", "drop --dynamic-image; pass --image-size")
        if shapes.text_len > cfg.max_text_len:
            raise ConfigError(f"text length {shapes.text_len}", f"at most the model's max_text_len={cfg.max_text_len}",
                              "pass a smaller --text-len")
        side = getattr(cfg, "image_size", None) or DEFAULT_IMAGE_SIZE
        h, w = shapes.image_size or (tuple(side) if isinstance(side, (list, tuple)) else (side, side))  # (h, w) or a side
        (bmin, bopt, bmax), t = shapes.batch, shapes.text_len
        # The export traces the "opt" shapes: an example batch of 1 lets torch.export specialise the batch
        # axis (size-1 broadcasting in the encoder), so the ONNX model would refuse batch 2 (docs/pitfalls.md).
        bopt = max(bopt, min(2, bmax))
        text = [InputSpec(n, "int64", ("batch", t), (bmin, t), (bopt, t), (bmax, t))
                for n in ("input_ids", "attention_mask")]
        pix = InputSpec("pixel_values", "float32", ("batch", 3, h, w), (bmin, 3, h, w), (bopt, 3, h, w), (bmax, 3, h, w))
        mask = InputSpec("pixel_mask", "int64", ("batch", h, w), (bmin, h, w), (bopt, h, w), (bmax, h, w))
        return [pix, *text, mask]

    def output_names(self, model: nn.Module) -> list[str]:
        return list(OUTPUTS)

    def dummy_inputs(self, model: nn.Module, specs: list[InputSpec], which: str, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shapes = {s.name: getattr(s, f"{which}_shape") for s in specs}
        ids, mask = dummy_prompt_ids(shapes["input_ids"], int(model.config.text_config.vocab_size), g)
        pixel_mask = torch.ones(shapes["pixel_mask"], dtype=torch.long)
        if pixel_mask.shape[0] > 1:  # one padded image (bottom-right padding, as the processor pads a batch)
            h, w = pixel_mask.shape[1:]
            pixel_mask[-1, (3 * h) // 4:, :] = 0
            pixel_mask[-1, :, (3 * w) // 4:] = 0
        return {"pixel_values": torch.randn(shapes["pixel_values"], generator=g), "input_ids": ids,
                "attention_mask": mask, "pixel_mask": pixel_mask}

    @contextlib.contextmanager
    def export_context(self, model: nn.Module) -> Iterator[None]:
        from transformers.models.grounding_dino import modeling_grounding_dino as gd

        original = gd.generate_masks_with_special_tokens_and_transfer_map
        env = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
        swin = _swin_configs(model)
        attn_impl = [c._attn_implementation for c in swin]
        gd.generate_masks_with_special_tokens_and_transfer_map = phrase_masks_without_cummax
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
        for c in swin:
            c._attn_implementation = "eager"
        try:
            yield
        finally:
            gd.generate_masks_with_special_tokens_and_transfer_map = original
            if env is None:
                os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
            else:
                os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = env
            for c, impl in zip(swin, attn_impl):
                c._attn_implementation = impl

    # --- tests -----------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, **kwargs: Any) -> nn.Module:
        from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection

        torch.manual_seed(seed)
        return GroundingDinoForObjectDetection(GroundingDinoConfig(**tiny_grounding_dino_config(**kwargs))).eval()


def dummy_prompt_ids(shape: tuple[int, int], vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``[CLS] w w . w . [SEP] [PAD]...`` rows: phrases split by ".", row 0 unpadded, others padded."""
    b, t = shape
    ids = torch.randint(104, min(vocab, DOT), (b, t), generator=g)  # word ids below the hard-coded delimiters
    ids[:, 0] = CLS
    lengths = torch.randint(max(3, t // 2), t + 1, (b,), generator=g)
    lengths[0] = t
    pos = torch.arange(t)[None, :]
    ids = torch.where((pos % 3 == 0) & (pos > 0), torch.full_like(ids, DOT), ids)
    ids = torch.where(pos == lengths[:, None] - 1, torch.full_like(ids, SEP), ids)
    mask = (pos < lengths[:, None]).long()
    return ids * mask, mask


def _swin_configs(model: nn.Module) -> list[Any]:
    """Configs of Swin backbone modules (their SDPA reshape does not export; eager does)."""
    return [m.config for m in model.modules() if type(m).__name__.startswith("Swin") and hasattr(m, "config")]


# --- a tiny offline model + processor (tests, demo, experiment) ---------------------------------
def tiny_grounding_dino_config(d_model: int = 32, layers: int = 2, decoder_layers: int = 2, fusion_embed: int = 64,
                               queries: int = 10,
                               image_size: int = 128, max_text_len: int = 40, **overrides: Any) -> dict[str, Any]:
    """ResNet backbone from ``backbone_config`` (no timm, no download), a 1-layer BERT over
    :func:`tiny_vocab`, and a fusion space wider than d_model (``fusion_embed`` = encoder_ffn_dim / 2 >
    d_model) so that SDPT's pseudo-inverse is a real least-squares projection, as in GLIP/GDINO.
    ``decoder_layers`` >= 2: transformers' tied box-head keys assume more than one decoder layer."""
    from transformers import BertConfig, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=max(64, max_text_len))
    cfg = dict(backbone_config=backbone, text_config=text, d_model=d_model, encoder_layers=layers, decoder_layers=decoder_layers,
               encoder_ffn_dim=2 * fusion_embed, decoder_ffn_dim=2 * d_model, encoder_attention_heads=4,
               decoder_attention_heads=4, num_queries=queries, num_feature_levels=4, encoder_n_points=2,
               decoder_n_points=2, max_text_len=max_text_len, two_stage=True, use_pretrained_backbone=False,
               image_size=image_size)
    cfg.update(overrides)
    return cfg


TINY_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "circle", "square", "triangle",
              "cross", "star", "shape", "filled", "outlined", "noisy", "striped", "glowing", "an", "the", "and",
              "of", "cat", "dog", "person", "car")


def tiny_vocab() -> list[str]:
    """BERT id layout where it matters to Grounding DINO: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
    "." = 1012 and "?" = 1029 (transformers hard-codes these delimiter ids), words and word pieces after."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [*TINY_WORDS, *chars, *(f"##{c}" for c in chars), ",", "!", "'", "-"]
    vocab = head + pieces
    unused = (f"[unused{i}]" for i in range(99, 10_000))
    for token, position in ((".", DOT), ("?", QUESTION), (None, QUESTION + 17)):
        vocab += [next(unused) for _ in range(position - len(vocab))]
        vocab += [token] if token else []
    return vocab


def build_tiny_processor(image_size: int = 128, max_text_len: int = 40) -> Any:
    """GroundingDinoProcessor: a BertTokenizerFast over :func:`tiny_vocab` + the PIL image processor
    resizing to a fixed ``image_size`` square (the exported model has a fixed input size)."""
    from transformers import BertTokenizerFast, GroundingDinoProcessor
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True,
                                  model_max_length=max_text_len)
    images = GroundingDinoImageProcessorPil(size={"height": image_size, "width": image_size})
    return GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer)


def save_tiny_grounding_dino(directory: str | Path, seed: int = 0, model: nn.Module | None = None,
                             overwrite: bool = False, **config: Any) -> Path:
    """Write a tiny random (or the given) Grounding DINO + its offline processor to ``directory`` (atomically)."""
    from apt_deploy.fileio import atomic_directory

    model = model if model is not None else GroundingDinoSpec().build_tiny(seed, **config)
    processor = build_tiny_processor(int(model.config.image_size), int(model.config.max_text_len))
    with atomic_directory(directory, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        processor.save_pretrained(stage)
    return Path(directory)


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_detection_processor(model_dir: str | Path) -> Any:
    """GroundingDinoProcessor (tokenizer + image processor) from the model directory, offline."""
    from transformers import GroundingDinoProcessor

    from apt_deploy.errors import InputPathError

    d = Path(model_dir)
    if not (d / "tokenizer_config.json").is_file() or not any((d / n).is_file() for n in PROCESSOR_FILES):
        raise InputPathError(f"{str(d)!r} has no tokenizer / image processor files",
                             f"tokenizer_config.json and one of {PROCESSOR_FILES} next to the weights",
                             "save them: GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(MODEL_DIR)")
    return GroundingDinoProcessor.from_pretrained(str(d), local_files_only=True)
