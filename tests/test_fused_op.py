"""The fused op's four faces agree: numpy reference, torch custom op, ONNX function body; one declaration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt_deploy.ops import reference
from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION as OP
from apt_deploy.settings import tolerance
from engines.compare import assert_close

SHAPES = [(1, 1, 8, 3), (2, 7, 16, 5), (3, 33, 64, 200), (1, 145, 768, 200)]  # (B, n, d, p)


def _case(b, n, d, p, seed=0, dtype=np.float32, prompt_std=0.05):
    """Realistic magnitudes: x_in is a LayerNorm output (~N(0,1)), o an attention output, K and V trained
    prompts (init std 0.02; a few times that after training). The 1e-5 tolerance is absolute."""
    rng = np.random.default_rng(seed)
    x, o = (rng.standard_normal((b, n, d)).astype(dtype) for _ in range(2))
    k, v = ((rng.standard_normal((p, d)) * prompt_std).astype(dtype) for _ in range(2))
    return [x, o, k, v]


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_op_matches_numpy_reference(shape):
    from apt_deploy.ops import torch_op  # noqa: F401

    x, o, k, v = _case(*shape)
    y = torch.ops.apt.approx_prompt_diffusion(*(torch.from_numpy(a) for a in (x, o, k, v))).numpy()
    assert_close({"y": reference.approx_prompt_diffusion(x, o, k, v)}, {"y": y},
                 tolerance("fused_op_vs_reference"), "torch op vs numpy")


@pytest.mark.parametrize("shape", SHAPES)
def test_onnx_function_body_matches_numpy_reference(shape):
    from exporters.validate import _run_single_node

    x, o, k, v = _case(*shape, seed=1)
    y = _run_single_node(np.float32, x, o, k, v)
    assert_close({"y": reference.approx_prompt_diffusion(x, o, k, v)}, {"y": y},
                 tolerance("fused_op_vs_reference"), "ONNX function body vs numpy")


def test_training_form_reference_equals_folded_reference():
    rng = np.random.default_rng(2)
    d, p, r = 16, 5, 2
    x, o = rng.standard_normal((2, 4, d)), rng.standard_normal((2, 4, d))
    prompt, down, up = rng.standard_normal((p, d)), rng.standard_normal((r, d)), rng.standard_normal((d, r))
    k, v = reference.fold_constants(prompt, down, up, 0.3)
    folded = reference.approx_prompt_diffusion(x, np.exp(0.3) * o, k, v)
    np.testing.assert_allclose(reference.apt_training_form(x, o, prompt, down, up, 0.3), folded, atol=1e-12)


def test_relu_and_rowmax_semantics():
    x = np.array([[[1.0, 0.0]]], np.float32)  # S = x K^T = [2, -1] -> A = [2, 0], w = 2
    k = np.array([[2.0, 0.0], [-1.0, 0.0]], np.float32)
    v = np.array([[1.0, 1.0], [5.0, 5.0]], np.float32)
    y = reference.approx_prompt_diffusion(x, np.zeros_like(x), k, v)
    np.testing.assert_allclose(y, [[[4.0, 4.0]]])  # w * (A V) = 2 * [2, 2]


def test_fake_kernel_traces_symbolically():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from apt_deploy.ops import torch_op  # noqa: F401

    with FakeTensorMode():
        y = torch.ops.apt.approx_prompt_diffusion(torch.empty(2, 5, 8), torch.empty(2, 5, 8), torch.empty(3, 8),
                                                  torch.empty(3, 8))
    assert tuple(y.shape) == (2, 5, 8)


def test_declaration_drives_every_name():
    from exporters import fused_op

    schema = fused_op.register_schema()
    assert (schema.domain, schema.name, schema.since_version) == (OP.domain, OP.onnx_name, OP.version)
    assert [i.name for i in schema.inputs] == list(OP.inputs)
    assert set(schema.attributes) == set(OP.node_attributes())
    fn = fused_op.function_proto(20)
    assert (fn.domain, fn.name, list(fn.input), list(fn.output)) == (OP.domain, OP.onnx_name, list(OP.inputs), list(OP.outputs))
    assert OP.plugin_id == "apt::ApproxPromptDiffusion" and OP.node_attributes() == {"plugin_namespace": "apt", "plugin_version": "1"}
    assert hasattr(torch.ops.apt, OP.torch_name)


def test_function_body_runs_in_half_precision():
    from exporters.validate import _run_single_node

    x, o, k, v = _case(2, 5, 16, 4, seed=3, dtype=np.float16)
    y = _run_single_node(np.float16, x, o, k, v)
    assert_close({"y": reference.approx_prompt_diffusion(x, o, k, v)}, {"y": y}, tolerance("fp16_vs_fp32"), "fp16 body")
