"""The naive (training-form) deep prompt exports with a dynamic batch when traced at batch 1.

Cause of the old failure (docs/pitfalls.md, "METER"): ``DeepPromptLayer`` dropped the prompt outputs with the
view ``out[:, :n]``, contiguous only at batch 1; METER feeds that view straight into the other stream's
cross-attention key/value ``nn.Linear``, whose ``aten::linear`` branches on ``is_contiguous()``, so torch.export
guarded batch == 1 and torch.onnx silently exported a static batch. ``drop_prompts`` copies instead, and
``exporters.onnx_export.check_dynamic_axes`` now refuses an export whose declared dynamic axis came out fixed.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from apt_deploy.errors import ExportError

BATCH_MAX = 3


class _SliceThenLinear(nn.Module):
    """The construct in miniature: prompts appended, dropped again, the result into a Linear."""

    def __init__(self, copy_first: bool) -> None:
        super().__init__()
        self.linear, self.copy_first = nn.Linear(4, 4), copy_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from apt_deploy.methods.deep_prompt import drop_prompts

        y = torch.cat([x, x], 1)
        return self.linear(drop_prompts(y, x.shape[1]) if self.copy_first else y[:, :x.shape[1]])


def _exported_batch_axis(module: nn.Module) -> object:
    """The batch size of the input as torch.onnx's capture sees it (its 0/1 mode: backed_size_oblivious)."""
    import torch.fx.experimental._config as fx_config
    from torch.export import Dim, export

    with fx_config.patch(backed_size_oblivious=True):
        try:
            program = export(module, (torch.randn(1, 3, 4),), dynamic_shapes={"x": {0: Dim("batch", min=1, max=8)}})
        except torch._dynamo.exc.UserError:  # "Constraints violated (batch)": specialised to the example's 1
            return 1
    return next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x").meta["val"].shape[0]


def test_slice_then_linear_specialises_the_batch_and_drop_prompts_does_not():
    # Canary for the torch behaviour behind the workaround (torch 2.13): if the first assert ever fails,
    # aten::linear stopped guarding on contiguity and drop_prompts could return the view again.
    assert _exported_batch_axis(_SliceThenLinear(copy_first=False)) == 1
    assert isinstance(_exported_batch_axis(_SliceThenLinear(copy_first=True)), torch.SymInt)


def test_check_dynamic_axes_refuses_a_fixed_batch(tmp_path):
    from apt_deploy.backbones.registry import InputSpec
    from exporters.onnx_export import check_dynamic_axes

    def save(batch: int | str):
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 4])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
        path = tmp_path / f"{batch}.onnx"
        onnx.save(onnx.helper.make_model(graph), str(path))
        return path

    specs = [InputSpec("x", "float32", ("batch", 4), (1, 4), (1, 4), (8, 4))]
    assert check_dynamic_axes(save("batch"), specs).name == "batch.onnx"
    with pytest.raises(ExportError, match=r"x axis 0 \('batch'\) = 1.*TORCH_LOGS"):
        check_dynamic_axes(save(1), specs)
    batch_one = [InputSpec("x", "float32", ("batch", 4), (1, 4), (1, 4), (1, 4))]  # --batch 1,1,1: static
    assert check_dynamic_axes(save(1), batch_one).name == "1.onnx"


def _naive_deep_prompt(backbone: str) -> nn.Module:
    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone
    from tests.conftest import randomize_method

    spec = get_backbone(backbone)
    model = spec.build_tiny(seed=0)
    ad.apply_deep_prompt(model, ad.APTConfig(prompt_len=5, method="deep_prompt", **spec.apt_defaults))
    randomize_method(model)
    return model


@pytest.mark.parametrize("backbone", ["meter", "vilt"])
def test_naive_deep_prompt_exports_with_a_dynamic_batch(backbone, tmp_path, one_thread):
    """Traced at the default example batch 1; ONNX Runtime equals the PyTorch training form at batch 1 and 3
    (padded text rows in the batch of 3), within the declared onnxruntime_vs_torch tolerance (1e-4)."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.settings import ExportSettings, tolerance
    from engines.runners import OnnxRuntimeRunner
    from exporters.onnx_export import _input_specs, export_artifact
    from exporters.validate import torch_outputs

    spec, model = get_backbone(backbone), _naive_deep_prompt(backbone)
    settings = ExportSettings(batch_min=1, batch_opt=1, batch_max=BATCH_MAX, text_len=12)
    art = export_artifact(copy.deepcopy(model), tmp_path / "art", settings, fold_first=False)
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    assert all(isinstance(i.type.tensor_type.shape.dim[0].dim_param, str) and i.type.tensor_type.shape.dim[0].dim_param
               for i in graph.input)  # the batch axis is symbolic in every input
    specs, tol = _input_specs(spec, model, settings), tolerance("onnxruntime_vs_torch")
    with OnnxRuntimeRunner(art / "model.onnx") as runner:
        for which, seed in (("min", 11), ("max", 12)):  # batch 1, batch 3
            feed = spec.dummy_inputs(model, specs, which, seed)
            batch = feed["pixel_values"].shape[0]
            if backbone == "meter" and batch > 1:
                assert (feed["attention_mask"].sum(1) < feed["attention_mask"].shape[1]).any()  # a padded row
            expected = torch_outputs(spec.export_module(model), spec, model, feed)["logits"]
            actual = runner.infer({k: v.numpy() for k, v in feed.items()})["logits"]
            assert actual.shape == expected.shape == (batch, model.config.num_labels)
            diff = float(np.abs(actual - expected).max())
            assert diff <= tol.atol, f"{backbone} batch {batch}: max |ORT - PyTorch| = {diff:.2e} > {tol.atol}"
