"""A multi-component model's export plan: one :class:`ComponentPlan` per ONNX file.

A backbone spec whose model is several networks (Stable Diffusion: text encoder, UNet, VAE decoder)
returns a list of these from ``export_components``; the exporter (exporters/components.py) then
exports, validates and describes each without calling back into the spec (conventions.md #15).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from apt_deploy.backbones.registry import InputSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

# which: "min" / "opt" / "max" shape set, or "export" (opt with every dynamic axis at >= 2, the shapes
# torch.export traces with: a size-1 example would be specialised, docs/pitfalls.md); seed
InputFactory = Callable[[str, int], "dict[str, torch.Tensor]"]


@dataclass
class ComponentPlan:
    """Everything needed to export and check one component.

    ``module`` is what is exported (already cast to the export dtype); ``reference`` is the fp32 PyTorch
    module it is validated against (the same object for fp32 exports). Both take the inputs as keyword
    arguments and return one tensor or a tuple in ``output_names`` order. ``make_inputs`` returns a seeded
    feed in each input's own dtype (``inputs[i].dtype``). ``check_shapes`` lists the shape sets validation
    runs at. ``extra`` goes into the component's manifest as is.
    """

    name: str
    module: nn.Module
    reference: nn.Module
    inputs: list[InputSpec]
    output_names: list[str]
    dynamic_shapes: dict[str, dict[int, Any]]
    make_inputs: InputFactory
    check_shapes: tuple[str, ...] = ("opt", "max")
    extra: dict[str, Any] = field(default_factory=dict)
