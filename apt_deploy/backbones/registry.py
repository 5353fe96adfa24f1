"""Registry of backbone specs (Optimum's OnnxConfig + TasksManager, timm's @register_model).

A spec owns everything model-family specific: loading from a local directory, where APT / deep
prompt go, which extra tensors train, input/output names, dynamic axes with min/opt/max shapes,
a seeded dummy-input factory, export-time patches, and a tiny-model builder for tests. The
exporter, the trainer, the manifest and the tests all read the spec; nothing else knows a family.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt_deploy.errors import UnknownNameError

if TYPE_CHECKING:
    import torch
    from torch import nn

_REGISTRY: dict[str, type[BackboneSpec]] = {}
# Modules that register backbones when imported (kept explicit so the registry test can check it).
BACKBONE_MODULES: tuple[str, ...] = ("apt_deploy.backbones.vilt", "apt_deploy.backbones.clip",
                                     "apt_deploy.backbones.meter", "apt_deploy.backbones.grounding_dino",
                                     "apt_deploy.backbones.sd")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, dtype, axis names (str = dynamic) and min/opt/max shapes."""

    name: str
    dtype: str
    axes: tuple[int | str, ...]
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "axes": list(self.axes),
            "min_shape": list(self.min_shape),
            "opt_shape": list(self.opt_shape),
            "max_shape": list(self.max_shape),
        }


@dataclass(frozen=True)
class Site:
    """A place where a method inserts a module: ``key`` names it in checkpoints (``layers.3``)."""

    key: str
    parent: Any
    attr: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)

    def replace(self, new: nn.Module) -> None:
        setattr(self.parent, self.attr, new)


@dataclass(frozen=True)
class ShapeSettings:
    """Shapes a user asks the export to support (dynamic batch always; image fixed unless asked)."""

    batch: tuple[int, int, int] = (1, 1, 8)
    text_len: int = 40
    image_size: tuple[int, int] | None = None
    dynamic_image: bool = False
    image_range: tuple[int, int] | None = None


class BackboneSpec:
    """Base class; subclasses implement one model family. All methods take the (HF) model."""

    name: str = ""
    model_classes: tuple[str, ...] = ()
    # APTConfig fields this family's official recipe sets differently (used when no config is passed)
    apt_defaults: dict[str, Any] = {}

    # --- loading and structure -------------------------------------------------------------
    def load(self, model_dir: str) -> nn.Module:
        raise NotImplementedError

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def hidden_size(self, model: nn.Module) -> int:
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        raise NotImplementedError

    def apt_sites(self, model: nn.Module) -> list[Site]:
        raise NotImplementedError

    def deep_prompt_sites(self, model: nn.Module) -> list[Site]:
        raise NotImplementedError

    def wrap_apt(self, host: nn.Module, apt: nn.Module) -> nn.Module:
        """Wrap the module at an APT site. Default: a BERT-style self-output (dense, dropout)."""
        from apt_deploy.methods.apt import APTOutputProjection

        return APTOutputProjection(host.dense, host.dropout, apt)

    def fold_apt_site(self, site: Site) -> nn.Module:
        """The folded replacement of an APT site's module (default: its own ``fold_apt()``; Stable
        Diffusion's processors also need their host attention, ``site.parent``)."""
        return site.module.fold_apt()

    def method_tensors(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Trained tensors owned by the backbone glue (e.g. ViLT's learned [CLS] embedding), by checkpoint name."""
        return {}

    def manifest_extras(self, model: nn.Module) -> dict[str, Any]:
        """Backbone-specific manifest fields (CLIP: ``class_names`` in logit order)."""
        return {}

    def inference_assets(self, model: nn.Module, model_dir: str | None, specs: list[InputSpec],
                         out_dir: Path) -> dict[str, Any]:
        """Write what inference needs besides the ONNX model into ``out_dir`` (labels, tokenizer, the resolved
        pre/post-processing recipe; apt_deploy/assets.py) and return the manifest's ``inference`` section
        (``task``, ``request_inputs``). Default: none (predict / serve refuse such an artifact, saying why)."""
        from apt_deploy.assets import missing_assets

        return missing_assets(f"backbone {self.name!r} defines no inference assets")

    def export_module(self, model: nn.Module) -> nn.Module:
        """The module to export / compare (default: the model itself; CLIP: image tower + class GEMM)."""
        return model

    methods: tuple[str, ...] = ("apt", "deep_prompt")
    # APTConfig fields recorded in apt_config.json by the default method_config_json
    CONFIG_FIELDS: tuple[str, ...] = ("prompt_len", "rank", "dropout", "train_log_scale", "init_std", "train_head",
                                      "cls_token_id")

    def method_config_json(self, model: nn.Module, state: Any) -> dict[str, Any]:
        """The method's settings as written to ``apt_config.json`` (default: the APTConfig fields)."""
        return {k: getattr(state.config, k) for k in self.CONFIG_FIELDS}

    def apply_method_from_config(self, model: nn.Module, cfg: dict[str, Any], **options: Any) -> None:
        """Re-apply a checkpoint's method to a plain model, before its tensors are loaded."""
        from apt_deploy.methods.apt import APTConfig
        from apt_deploy.tuning import apply_apt, apply_deep_prompt

        config = APTConfig(**{k: cfg[k] for k in self.CONFIG_FIELDS if k in cfg}, method=cfg["method"])
        (apply_apt if cfg["method"] == "apt" else apply_deep_prompt)(model, config)

    def trainable_extras(self, model: nn.Module) -> dict[str, nn.Module]:
        """Checkpoint prefix -> module whose parameters train besides the method's own."""
        return {}

    def load_with_head(self, model_dir: str, labels: list[str]) -> tuple[nn.Module, str | None]:
        """The model with an answer head of ``len(labels)`` outputs named ``labels``, and why a fresh head was
        built (None: the checkpoint's own head fits). Default, for families that cannot rebuild a head: the
        checkpoint's own head when its size fits, else a clear refusal."""
        from apt_deploy.errors import ConfigError

        model = self.load(model_dir)
        config = getattr(model, "config", None)
        if getattr(config, "num_labels", None) != len(labels):
            raise ConfigError(f"backbone {self.name!r} with a head of {getattr(config, 'num_labels', 'no')} outputs "
                              f"for {len(labels)} labels", "a checkpoint whose answer head has one output per label",
                              f"use the model the prompts were trained on ({self.name} cannot rebuild a head)")
        config.id2label = dict(enumerate(labels))
        config.label2id = {a: i for i, a in enumerate(labels)}
        return model, None

    def resize_head(self, model: nn.Module, labels: list[str]) -> None:
        """Replace the answer head by a freshly initialised one with ``len(labels)`` outputs. In place."""
        from apt_deploy.errors import ConfigError

        raise ConfigError(f"backbone {self.name!r} has no answer head to resize", "a backbone with a classification head")

    def cross_modal_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Trained parameters of the recipe's ``cross_modal`` lr group (TrainSettings.cross_modal_lr_mult; default none)."""
        return []

    def opfree_fold_pass(self) -> Callable[[nn.Module, BackboneSpec], int] | None:
        """The fold pass of APT's op-free form for this family (None: the BERT/ViLT pass in methods/apt_opfree.py)."""
        return None

    def insert_cls_embedding(self, model: nn.Module, cls_token_id: int) -> None:
        """Insert a learned replacement of the first text token's embedding (no-op if not applicable)."""

    # --- export ----------------------------------------------------------------------------
    def input_specs(self, model: nn.Module, shapes: ShapeSettings) -> list[InputSpec]:
        raise NotImplementedError

    def output_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def dummy_inputs(self, model: nn.Module, specs: list[InputSpec], which: str, seed: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_export_shapes(self, model: nn.Module, specs: list[InputSpec]) -> None:
        """Raise a clear error when the model cannot be exported at these shapes (default: nothing to check)."""

    def dynamic_dim(self, model: nn.Module, axis: str, low: int, high: int) -> Any:
        """The torch.export Dim for a named dynamic axis."""
        from torch.export import Dim

        return Dim(axis, min=low, max=high)

    @contextlib.contextmanager
    def export_context(self, model: nn.Module) -> Iterator[None]:
        """Patches that make the model exportable (and that parity runs must share)."""
        yield

    def export_components(self, model: nn.Module, settings: Any) -> list[Any] | None:
        """Multi-component models (Stable Diffusion): the components to export, each a
        ``backbones.components.ComponentPlan``. None (the default): the single-model path."""
        return None

    def write_assets(self, model: nn.Module, directory: Path) -> dict[str, str]:
        """Non-ONNX files a multi-component artifact needs at run time (tokenizer, scheduler config),
        written into ``directory``; returns name -> relative path for the manifest."""
        return {}

    # --- tests -----------------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, **kwargs: Any) -> nn.Module:
        raise NotImplementedError


def read_architecture(model_dir: str | Path, supported: tuple[str, ...], fix: str) -> str:
    """The first ``architectures`` entry of MODEL_DIR/config.json (default: ``supported[0]``), checked."""
    from apt_deploy.errors import ConfigError, InputPathError
    from apt_deploy.fileio import read_json

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputPathError(f"model directory {str(model_dir)!r} does not exist",
                             "a local directory written by save_pretrained (config.json + weights)",
                             "check the path; no model hub is contacted")
    config = read_json(model_dir / "config.json", "model config", "a directory written by save_pretrained",
                       "point --model at the directory that holds config.json", error=ConfigError)
    arch = (config.get("architectures") or [supported[0]])[0]
    if arch not in supported:
        raise ConfigError(f"model architecture {arch!r}", f"one of {', '.join(supported)}", fix)
    return arch


def load_pretrained(model_class: Any, model_dir: str | Path, **config_overrides: Any) -> nn.Module:
    """``model_class.from_pretrained(model_dir)`` offline, in eval mode; a directory transformers cannot read
    (broken config.json, missing or truncated weights, ...) is a :class:`CheckpointError` saying why."""
    from apt_deploy.errors import CheckpointError

    try:
        return model_class.from_pretrained(str(model_dir), local_files_only=True, **config_overrides).eval()
    except Exception as e:  # OSError, ValueError, SafetensorError, RuntimeError (size mismatch), ... from transformers
        raise CheckpointError(f"transformers cannot load {model_class.__name__} from {str(model_dir)!r}: "
                              f"{type(e).__name__}: {str(e)[:800]}",
                              "a complete save_pretrained directory (config.json + model.safetensors or pytorch_model.bin)",
                              "re-save the model with save_pretrained, or re-copy the directory (a truncated copy "
                              "is the usual cause)") from e


def register_backbone(name: str) -> Callable[[type[BackboneSpec]], type[BackboneSpec]]:
    """Class decorator: ``@register_backbone("vilt") class ViltSpec(BackboneSpec): ...``."""

    def wrap(cls: type[BackboneSpec]) -> type[BackboneSpec]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _import_all() -> None:
    for module in BACKBONE_MODULES:
        importlib.import_module(module)


def known_backbones() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    _import_all()
    if name not in _REGISTRY:
        raise UnknownNameError("backbone", name, _REGISTRY)
    return _REGISTRY[name]()


def spec_for_model(model: nn.Module) -> BackboneSpec:
    _import_all()
    for cls in _REGISTRY.values():
        spec = cls()
        if spec.matches(model):
            return spec
    known = [f"{n} ({', '.join(c.model_classes)})" for n, c in sorted(_REGISTRY.items())]
    raise UnknownNameError("model class", type(model).__name__, known)
