"""Glue used by the CLI and the runners: rebuild trained / folded models from local directories."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from apt_deploy.backbones import get_backbone
from apt_deploy.checkpoint import has_trained_head, load_prompts, read_prompt_config
from apt_deploy.errors import CheckpointError, InputPathError
from apt_deploy.folding import fold


def load_trained(model_dir: str | Path, prompts_dir: str | Path, backbone: str | None = None) -> nn.Module:
    """Base model from ``model_dir`` + the method and tensors from ``prompts_dir`` (training form)."""
    if backbone is not None:
        get_backbone(backbone)  # an unknown name fails first, listing the known ones
    cfg = read_prompt_config(prompts_dir)
    name = backbone or cfg["backbone"]
    if backbone and backbone != cfg["backbone"]:
        raise CheckpointError(f"--backbone {backbone} but the prompts were trained on {cfg['backbone']!r}",
                              "the same backbone for model and prompts", f"pass --backbone {cfg['backbone']}")
    spec = get_backbone(name)
    # a head trained for another answer set (or on a checkpoint without one) is rebuilt to the checkpoint's labels
    model = spec.load_with_head(str(model_dir), cfg["labels"])[0] if has_trained_head(cfg) else spec.load(str(model_dir))
    return load_prompts(model, prompts_dir)


def load_base(model_dir: str | Path, backbone: str | None = None) -> nn.Module:
    """The plain base model of ``model_dir`` (no method); the backbone is the one whose model classes
    include config.json's ``architectures[0]`` unless given."""
    return get_backbone(backbone or _backbone_of(model_dir)).load(str(model_dir))


def _backbone_of(model_dir: str | Path) -> str:
    from apt_deploy.backbones import known_backbones
    from apt_deploy.backbones.registry import read_architecture

    names = known_backbones()
    classes = tuple(c for n in names for c in get_backbone(n).model_classes)
    arch = read_architecture(model_dir, classes, "pass --backbone, or save the model as one of these classes")
    return next(n for n in names if arch in get_backbone(n).model_classes)


def load_folded_from_manifest(manifest: dict[str, Any], model_dir: str | None = None,
                              prompts_dir: str | None = None) -> nn.Module:
    """The folded PyTorch model an artifact was exported from (paths default to the manifest's source)."""
    source = manifest.get("source") or {}
    model_dir = model_dir or source.get("model_dir")
    prompts_dir = prompts_dir or source.get("prompts_dir")
    if not model_dir or not prompts_dir or not Path(model_dir).is_dir() or not Path(prompts_dir).is_dir():
        raise InputPathError(f"the artifact's source directories are not available (model={model_dir!r}, "
                             f"prompts={prompts_dir!r})", "the base model and prompt directories it was exported from",
                             "pass --model MODEL_DIR --prompts PROMPT_DIR")
    return fold(load_trained(model_dir, prompts_dir, manifest["backbone"]))


class ReferenceModule(nn.Module):
    """The PyTorch form of an artifact for runners: ``forward(**feed)`` returns the outputs in the
    manifest's order, computed under the backbone's export patches (what the ONNX model was traced with).

    Built by :func:`load_reference_module`; the runners in ``engines`` receive it through a
    ``load_model`` callable, so they never import the torch side of apt_deploy.
    """

    def __init__(self, folded: nn.Module, output_names: list[str]) -> None:
        super().__init__()
        from apt_deploy.backbones import spec_for_model
        from apt_deploy.ops import torch_op  # noqa: F401  (defines the custom op before a runner registers kernels on it)

        self.spec = spec_for_model(folded)
        self.folded, self.module, self.output_names = folded, self.spec.export_module(folded), output_names

    def forward(self, **feed: Any) -> list[Any]:
        import torch

        with self.spec.export_context(self.folded):
            out = self.module(**feed)
        if isinstance(out, torch.Tensor):
            return [out]
        if isinstance(out, (tuple, list)):
            return list(out)
        return [getattr(out, n) for n in self.output_names]

    def capture_context(self) -> contextlib.AbstractContextManager[None]:
        """Wrap CUDA-graph warm-up and capture in this: :func:`static_attention_masks`."""
        return static_attention_masks()


@contextlib.contextmanager
def static_attention_masks() -> Iterator[None]:
    """Attention masks built without looking at the data, so a forward has no host synchronisation.

    transformers' mask builders skip the padding mask when no token is padded (``padding_mask.all()``:
    a device-to-host sync, which a CUDA-graph capture refuses, and a branch a graph would freeze: a graph
    captured on unpadded inputs would ignore padding at replay). Inside this context the mask is always
    built from the input tensors, as in the exported ONNX. Patches ``transformers.masking_utils`` for the
    duration (process-wide: hold the runner's lock while capturing).
    """
    import transformers.masking_utils as masking

    names = ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa")  # transformers 5.x
    saved = {name: getattr(masking, name) for name in names if hasattr(masking, name)}
    for name in saved:
        setattr(masking, name, _never_skip_mask)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(masking, name, fn)


def _never_skip_mask(*args: Any, **kwargs: Any) -> bool:
    return False


def load_reference_module(manifest: dict[str, Any], model_dir: str | None = None,
                          prompts_dir: str | None = None) -> ReferenceModule:
    """The folded PyTorch model an artifact came from, as a :class:`ReferenceModule` (eval, fp32, CPU).
    A base-model artifact (method ``none``) needs only the model directory."""
    names = [o["name"] for o in manifest["outputs"]]
    if manifest.get("method") == "none":
        source = manifest.get("source") or {}
        model_dir = model_dir or source.get("model_dir")
        if not model_dir or not Path(model_dir).is_dir():
            raise InputPathError(f"the base model directory of this base-model artifact is not available ({model_dir!r})",
                                 "the base model directory it was exported from", "pass --model MODEL_DIR")
        return ReferenceModule(get_backbone(manifest["backbone"]).load(str(model_dir)).eval(), names)
    return ReferenceModule(load_folded_from_manifest(manifest, model_dir, prompts_dir).eval(), names)
