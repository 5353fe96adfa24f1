"""Local tiny ViLT checkpoints (random weights) that load like a user's model directory.

No model hub is reachable, so the demo and the tests write a complete ``save_pretrained`` directory:
ViltForQuestionAnswering weights + config (id2label from the answers) + tokenizer + image processor.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError

log = logging.getLogger(__name__)


def demo_vilt_config() -> dict[str, Any]:
    """The demo size: ~0.9 M backbone parameters; APT training + export run in well under 5 min on 2 cores."""
    return dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                max_position_embeddings=16, image_size=64, patch_size=16, max_image_length=-1)


def save_tiny_vilt(directory: str | Path, seed: int = 0, answers: Sequence[str] | None = None,
                   overwrite: bool = False, **config_overrides: Any) -> Path:
    """Write a random tiny ViLT VQA checkpoint to ``directory`` (atomically) and return the path.

    ``answers`` (default: the synthetic task's) become id2label; the tokenizer is the synthetic task's
    BERT-layout vocabulary; ``config_overrides`` go to ``ViltConfig`` via ``ViltSpec.build_tiny``.
    """
    from apt_deploy.backbones import get_backbone
    from apt_deploy.data.synthetic_vqa import ANSWERS, build_processor, build_tokenizer
    from apt_deploy.fileio import atomic_directory

    answers = list(answers if answers is not None else ANSWERS)
    tokenizer = build_tokenizer(max_length=config_overrides.get("max_position_embeddings", 16))
    config = {"vocab_size": len(tokenizer), **config_overrides}
    _check_config(config, len(tokenizer), answers)
    model = get_backbone("vilt").build_tiny(seed=seed, num_labels=len(answers), **config)
    model.config.id2label = dict(enumerate(answers))
    model.config.label2id = {a: i for i, a in enumerate(answers)}
    processor = build_processor(tokenizer, model.config.image_size, model.config.patch_size)
    with atomic_directory(directory, overwrite=overwrite) as stage:
        model.save_pretrained(stage)
        processor.save_pretrained(stage)
    log.info("wrote a tiny ViLT (%d labels, hidden %d, %d layers) to %s", len(answers),
             model.config.hidden_size, model.config.num_hidden_layers, directory)
    return Path(directory)


def _check_config(config: dict[str, Any], tokens: int, answers: list[str]) -> None:
    if config["vocab_size"] < tokens:
        raise ConfigError(f"vocab_size={config['vocab_size']}", f"at least the tokenizer's {tokens} tokens",
                          "drop the vocab_size override")
    if not answers or len(set(answers)) != len(answers):
        raise ConfigError(f"answers={answers[:5]}...", "a non-empty list of distinct answers",
                          "pass each answer once, or omit answers for the synthetic task's")


def save_tiny_meter(directory: str | Path, seed: int = 0, answers: Sequence[str] | None = None,
                    overwrite: bool = False, **config_overrides: Any) -> Path:
    """Write a random tiny METER (apt_deploy.models.meter) + an offline RoBERTa tokenizer (whole words of the
    synthetic task) + METER's image preprocessing to ``directory`` (atomically); ``answers`` become id2label."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.data.meter import MeterProcessor, image_processor, tiny_roberta_tokenizer
    from apt_deploy.data.synthetic_vqa import ANSWERS, synthetic_vocab
    from apt_deploy.models.meter import save_meter

    answers = list(answers if answers is not None else ANSWERS)
    tokenizer = tiny_roberta_tokenizer(w for w in synthetic_vocab() if w.isalpha())
    config = {"vocab_size": len(tokenizer), **config_overrides}
    _check_config(config, len(tokenizer), answers)
    model = get_backbone("meter").build_tiny(seed=seed, num_labels=len(answers), **config)
    model.config.id2label = dict(enumerate(answers))
    model.config.label2id = {a: i for i, a in enumerate(answers)}
    processor = MeterProcessor(tokenizer, image_processor(model.config.image_size))
    save_meter(model, directory, extras=processor.save_pretrained, overwrite=overwrite)
    log.info("wrote a tiny METER (%d labels, hidden %d) to %s", len(answers), model.config.hidden_size, directory)
    return Path(directory)
