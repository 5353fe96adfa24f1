"""METER's text and image preprocessing (shared/specs/meter.md §1.5), offline.

* Text: a RoBERTa byte-level BPE tokenizer (``<s>``=0, ``<pad>``=1, ``</s>``=2), padded to max length with
  id 1 (RoBERTa derives position ids from ``ids != 1``, so other pad ids shift them).
* Image: resize the shorter side to ``size`` (bicubic), **center-crop** ``size`` x ``size``, CLIP's mean / std
  — transformers' CLIP image processor with those settings.

:func:`tiny_roberta_tokenizer` builds a small RoBERTa tokenizer in code (the 256 byte symbols, the
specials and whole-word merges for a word list), the way the ViLT path builds its offline BERT vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError, InputPathError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
PROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class MeterProcessor:
    """``tokenizer`` + ``image_processor``, the two attributes apt_deploy.data.vqa.VQADataset reads."""

    tokenizer: Any
    image_processor: Any

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def image_processor(size: int) -> Any:
    """METER's eval transform: shorter side -> size (bicubic), center crop size x size, CLIP normalisation."""
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 resample=PILImageResampling.BICUBIC, do_center_crop=True,
                                 image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))


def _byte_symbols() -> list[str]:
    from apt_deploy.backbones.clip import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def tiny_roberta_tokenizer(words: Iterable[str] = ()) -> Any:
    """A RobertaTokenizer over the 256 byte symbols + specials, with merges that make each of ``words``
    (with and without the leading space) one token. No files, no hub."""
    from transformers import RobertaTokenizer

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: len(vocab) + i for i, c in enumerate(_byte_symbols())})
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w for w in words if len(w) > 1 and w.isascii()):
        for form in (word, "\u0120" + word):  # "Ġ" is the byte-level symbol of a leading space
            for i in range(1, len(form)):
                pair = (form[:i], form[i])
                if form[: i + 1] not in vocab:
                    vocab[form[: i + 1]] = len(vocab)
                    merges.append(pair)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges)


def load_tokenizer(directory: str | Path, vocab_size: int) -> Any:
    """A local RoBERTa-style tokenizer, checked against the model's vocabulary and METER's pad id 1."""
    d = Path(directory)
    if not d.is_dir() or not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise InputPathError(f"tokenizer directory {str(d)!r} has none of {', '.join(TOKENIZER_FILES)}",
                             "a RoBERTa tokenizer saved with save_pretrained (roberta-base for METER)",
                             "point --tokenizer at a local copy of the roberta-base tokenizer")
    try:
        tok = _tokenizer_class(d).from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # OSError, ValueError, ... from transformers
        raise InputPathError(f"cannot load the tokenizer from {str(d)!r}: {e}", "a tokenizer written by save_pretrained",
                             "re-save it") from e
    if len(tok) > vocab_size or tok.pad_token_id != 1:
        raise ConfigError(f"tokenizer with {len(tok)} tokens and pad id {tok.pad_token_id}",
                          f"at most the model's {vocab_size} tokens and pad id 1 (RoBERTa)", "pass the roberta-base tokenizer")
    return tok


def _tokenizer_class(directory: Path) -> Any:
    """The class tokenizer_config.json names (AutoTokenizer would read the METER config.json beside it and warn)."""
    import json

    import transformers

    config = directory / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    return (getattr(transformers, name, None) if name else None) or transformers.AutoTokenizer


def load_meter_processor(model_dir: str | Path, vocab_size: int) -> MeterProcessor:
    """The tokenizer and image processor saved in a METER model directory (apt-deploy import --tokenizer)."""
    from transformers import CLIPImageProcessorPil

    d = Path(model_dir)
    if not (d / PROCESSOR_FILE).is_file():
        raise InputPathError(f"{str(d)!r} has no {PROCESSOR_FILE}", "a METER directory written by apt-deploy import",
                             "re-run apt-deploy import --backbone meter")
    tok = load_tokenizer(d, vocab_size)
    return MeterProcessor(tok, CLIPImageProcessorPil.from_pretrained(str(d), local_files_only=True))
