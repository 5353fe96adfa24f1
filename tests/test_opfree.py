"""APT's op-free inference form (K as extra query-projection columns, V as extra output-projection rows)
equals the fused-op fold and the training form, and exports with no custom op."""

from __future__ import annotations

import pytest
import torch

from apt_deploy.backbones import get_backbone
from apt_deploy.backbones.registry import ShapeSettings
from apt_deploy.errors import ConfigError
from apt_deploy.folding import fold
from apt_deploy.methods.apt import APTOutputProjection
from apt_deploy.methods.apt_opfree import OpFreeAPTAttention, fold_apt_opfree, fold_opfree
from apt_deploy.settings import TOLERANCES
from engines.compare import assert_close
from exporters.validate import torch_outputs
from tests.conftest import tiny_method_model

SPEC = get_backbone("vilt")


def _outputs(model, which: str, seed: int):
    specs = SPEC.input_specs(model, ShapeSettings(batch=(1, 2, 3), text_len=12))
    feed = SPEC.dummy_inputs(model, specs, which, seed)  # "max": batch 3 with padded text rows
    return torch_outputs(model, SPEC, model, feed)


@pytest.mark.parametrize("which,seed", [("opt", 1), ("max", 2)])
def test_opfree_equals_fused_fold_and_training_form(apt_model, which, seed):
    tol = TOLERANCES["training_vs_folded"]
    opfree = _outputs(fold_opfree(apt_model), which, seed)
    assert_close(_outputs(fold(apt_model), which, seed), opfree, tol, "op-free vs fused fold")
    assert_close(_outputs(apt_model, which, seed), opfree, tol, "op-free vs training form")


def test_opfree_structure_and_state(apt_model):
    before = {k: v.clone() for k, v in apt_model.state_dict().items()}
    out = fold_opfree(apt_model)
    hosts = [m for m in out.modules() if isinstance(m, OpFreeAPTAttention)]
    assert len(hosts) == 2 and not any(isinstance(m, APTOutputProjection) for m in out.modules())
    d, p = 32, 6
    assert hosts[0].query.weight.shape == (d + p, d) and hosts[0].dense.weight.shape == (d, d + p)
    assert torch.all(hosts[0].query.bias[d:] == 0)
    assert out.apt_deploy_state.folded and out.apt_deploy_state.method == "apt"
    assert not apt_model.apt_deploy_state.folded
    assert all(torch.equal(before[k], v) for k, v in apt_model.state_dict().items())  # original untouched
    assert not any(p.requires_grad for p in out.parameters())


def test_fold_pass_signature_counts_sites(apt_model):
    import copy

    model = copy.deepcopy(apt_model)
    assert fold_apt_opfree(model, SPEC) == 2
    assert fold_apt_opfree(model, SPEC) == 0  # idempotent: nothing left to fold


def test_output_attentions_passes_through(apt_model):
    host = next(m for m in fold_opfree(apt_model).modules() if isinstance(m, OpFreeAPTAttention))
    x = torch.randn(2, 5, 32)
    y, probs = host(x, None, output_attentions=True)
    assert y.shape == (2, 5, 32) and probs.shape == (2, 4, 5, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 5))


@pytest.mark.parametrize("bad", ["deep_prompt", "folded", "plain"])
def test_refuses_what_it_cannot_fold(bad):
    model = {"deep_prompt": lambda: tiny_method_model("deep_prompt"), "folded": lambda: fold(tiny_method_model("apt")),
             "plain": lambda: SPEC.build_tiny()}[bad]()
    with pytest.raises(ConfigError, match="fold_opfree"):
        fold_opfree(model)


def test_opfree_exports_without_the_custom_op(apt_model, tmp_path):
    import json

    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    out = export_artifact(fold_opfree(apt_model), tmp_path / "opfree", ExportSettings(batch_max=2))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "apt" and manifest["form"] == "folded" and manifest["fused_op"]["count"] == 0
    runs = manifest["validation"]["onnxruntime_vs_torch"]["runs"]
    assert all(o["max_abs"] <= TOLERANCES["onnxruntime_vs_torch"].atol for r in runs for o in r["outputs"])
