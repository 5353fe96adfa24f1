"""The torch-cuda runner's CUDA-graph path: what is checkable on CPU (no host synchronisation in the captured
forward), and the GPU checks (marker ``gpu``) that skip here with the reason.

On CPU a TorchDispatchMode records every ``aten._local_scalar_dense`` (what ``.item()``, ``bool(tensor)`` and
``if tensor:`` run: a device-to-host copy on CUDA, refused inside a graph capture) and ``nonzero`` (a
data-dependent shape, also a sync) during the ViLT forward that the runner captures.
"""

from __future__ import annotations

import numpy as np
import pytest

from apt_deploy.features import has, why_missing
from tests.conftest import tiny_method_model

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")


def _reference_and_padded_feed():
    import torch

    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings
    from apt_deploy.folding import fold
    from apt_deploy.pipeline import ReferenceModule

    model = fold(tiny_method_model("apt")).eval()
    spec = get_backbone("vilt")
    specs = spec.input_specs(model, ShapeSettings(batch=(1, 2, 2), text_len=8))
    feed = spec.dummy_inputs(model, specs, "opt", 0)
    feed["attention_mask"] = torch.ones_like(feed["attention_mask"])  # unpadded: transformers would skip the mask
    return ReferenceModule(model, ["logits"]), feed


def _host_syncs(module, feed) -> list[str]:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class RecordSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in SYNC_OPS:
                seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), RecordSyncs():
        module(**feed)
    return seen


def test_captured_vilt_forward_has_no_host_synchronisation():
    """transformers' mask builder calls padding_mask.all() (a sync and a data-dependent branch) unless the
    forward runs in ReferenceModule.capture_context(), which the runner wraps around warm-up and capture."""
    module, feed = _reference_and_padded_feed()
    assert _host_syncs(module, feed), "expected transformers' mask skip check to sync (the test could not fail)"
    with module.capture_context():
        assert _host_syncs(module, feed) == []
    assert _host_syncs(module, feed), "the context must restore transformers' behaviour on exit"


def test_capture_context_keeps_the_outputs():
    """The always-built mask gives the same logits as transformers' own path, unpadded and padded."""
    import torch

    module, feed = _reference_and_padded_feed()
    for padded in (False, True):
        if padded:
            feed["attention_mask"][1, 5:] = 0
        with torch.no_grad():
            expected = module(**feed)[0].numpy()
            with module.capture_context():
                got = module(**feed)[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_graphs_mode_refuses_a_module_without_capture_context(tmp_path):
    from apt_deploy.errors import ConfigError
    from engines.kernels.torch_cuda import TorchCudaRunner

    runner = TorchCudaRunner(tmp_path, load_model=lambda: None)
    runner._module = object()
    with pytest.raises(ConfigError, match="capture_context"):
        runner._capture_context()


def needs_gpu(test):
    test = pytest.mark.skipif(not has("triton"), reason=why_missing("triton"))(test)
    test = pytest.mark.skipif(not has("cuda"), reason=why_missing("cuda"))(test)
    return pytest.mark.gpu(test)


@needs_gpu
def test_cuda_graph_replays_new_padding_correctly(apt_artifact):
    """One graph per input-shape set: captured on the first feed, replayed on a feed with other padding; both
    match the CPU reference (a frozen mask branch would break the second)."""
    import torch

    from apt_deploy.manifest import read_manifest
    from apt_deploy.pipeline import load_reference_module
    from apt_deploy.settings import tolerance
    from engines.compare import assert_close
    from engines.kernels.torch_cuda import TorchCudaRunner
    from engines.runners import CallableRunner

    manifest = read_manifest(apt_artifact)
    reference = load_reference_module(manifest)

    def on_cpu(feed):
        with torch.no_grad():
            return {"logits": reference(**{k: torch.from_numpy(v) for k, v in feed.items()})[0].numpy()}

    cpu = CallableRunner(on_cpu, "cpu")
    rng = np.random.default_rng(0)
    feeds = []
    for padding in (0, 3):
        feed = {}
        for i in manifest["inputs"]:
            shape = tuple(i["opt_shape"])
            feed[i["name"]] = (rng.integers(1, 50, shape) if i["dtype"].startswith("int") else
                               rng.standard_normal(shape)).astype(i["dtype"])
        feed["token_type_ids"][:] = 0
        feed["pixel_mask"][:] = 1
        feed["attention_mask"][:] = 1
        if padding:
            feed["attention_mask"][-1, -padding:] = 0
        feeds.append(feed)
    with TorchCudaRunner(apt_artifact, load_model=lambda: load_reference_module(manifest), mode="graphs") as gpu:
        for feed in feeds:
            assert_close(cpu.infer(feed), gpu.infer(feed), tolerance("onnxruntime_vs_torch"), "CUDA graph vs CPU")
        assert len(gpu._graphs) == 1
