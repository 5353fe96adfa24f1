"""`apt-deploy verify` on every artifact `export` writes: base-model artifacts, the source directories
from --model/--prompts, and bf16 artifacts (fused-node check skipped with the reason, the backend still
compared with PyTorch on CPU).

Backends other than ONNX Runtime need a GPU here, so these tests register a real PyTorch-CPU runner
built, like the torch-cuda one, from the ``load_model`` callable verify hands to every backend."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import pytest

from apt_deploy.cli import main
from apt_deploy.settings import ExportSettings
from engines.runners import BACKENDS, Runner, to_host_numpy


class TorchCpuRunner(Runner):
    """The artifact's PyTorch form (from ``load_model``) on CPU in ``dtype``; ``perturb`` adds to its logits."""

    def __init__(self, artifact_dir, load_model, dtype: str = "bf16", perturb: float = 0.0, **_):
        import torch

        from apt_deploy.manifest import read_manifest

        self.load_model, self.perturb, self.module = load_model, perturb, None
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.output_names = [o["name"] for o in read_manifest(artifact_dir)["outputs"]]
        self.name = f"torch-cpu[{dtype}]"

    def activate(self):
        if self.module is None:
            self.module = self.load_model().to(dtype=self.dtype).eval()

    def infer(self, feed):
        import torch

        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        with torch.no_grad():
            outs = self.module(**tensors)
        return {n: to_host_numpy(o) + self.perturb for n, o in zip(self.output_names, outs)}


@contextlib.contextmanager
def _torch_onnx_log():
    """Records that reach handlers of torch.onnx's op-registration logger (after its filters)."""
    from exporters.onnx_export import TORCH_ONNX_REGISTRATION_LOGGER

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(TORCH_ONNX_REGISTRATION_LOGGER)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def torch_cpu_backend(monkeypatch):
    def register(**options):
        monkeypatch.setitem(BACKENDS, "torch-cpu", lambda d, **kw: TorchCpuRunner(d, **{**kw, **options}))

    register()
    return register


def test_verify_takes_the_model_and_prompts_from_the_flags(apt_artifact, tiny_dirs, tmp_path, capsys, torch_cpu_backend):
    """The backend's model comes from --model/--prompts when the manifest's source directories are gone."""
    copy = tmp_path / "copy"
    shutil.copytree(apt_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"] = {"model_dir": str(tmp_path / "gone"), "prompts_dir": str(tmp_path / "gone_too")}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    torch_cpu_backend(dtype="fp32")
    assert main(["verify", str(copy), "--backend", "torch-cpu"]) == 2
    assert "pass --model MODEL_DIR --prompts PROMPT_DIR" in capsys.readouterr().err
    flags = ["--model", str(tiny_dirs["model"]), "--prompts", str(tiny_dirs["apt"])]
    assert main(["verify", str(copy), "--backend", "torch-cpu", *flags]) == 0
    assert "torch-cpu_vs_torch: max abs" in capsys.readouterr().out


def test_verify_compares_the_backend_with_a_separate_pytorch_reference(apt_artifact, capsys, torch_cpu_backend):
    torch_cpu_backend(dtype="fp32", perturb=1e-2)  # beyond the fp32 tolerance (1e-4)
    assert main(["verify", str(apt_artifact), "--backend", "torch-cpu"]) == 2
    assert "torch-cpu[fp32] vs PyTorch" in capsys.readouterr().err


def test_bf16_artifact_skips_the_ort_node_check_and_compares_a_bf16_backend(tiny_dirs, tmp_path, capfd, torch_cpu_backend):
    from apt_deploy.pipeline import load_trained
    from exporters.onnx_export import export_artifact

    source = {"model_dir": str(tiny_dirs["model"]), "prompts_dir": str(tiny_dirs["apt"])}
    with _torch_onnx_log() as records:
        out = export_artifact(load_trained(tiny_dirs["model"], tiny_dirs["apt"]), tmp_path / "bf16",
                              ExportSettings(batch_max=2, dtype="bf16"), source=source)
    exported = capfd.readouterr()
    # torch.onnx's "torchvision is not installed" notices are dropped (torch's own handler writes them to
    # the stderr of the moment it was imported, so the log records are checked, not only the captured text)
    assert not [r for r in records if "torchvision" in r.getMessage()]
    assert "torchvision" not in exported.out + exported.err
    assert main(["verify", str(out), "--backend", "torch-cpu", "--json", str(tmp_path / "r.json")]) == 0
    printed = capfd.readouterr().out
    assert "fused_op_vs_reference: SKIPPED" in printed and "no bfloat16 kernels" in printed
    report = json.loads((tmp_path / "r.json").read_text())
    assert "ONNX Runtime CPU" in report["fused_op_vs_reference"]["skipped"]
    compared = report["torch-cpu_vs_torch"]
    assert compared["tolerance"]["atol"] == 6e-2 and len(compared["runs"]) == 2
    worst = max(o["max_abs"] for r in compared["runs"] for o in r["outputs"])
    assert 0 < worst <= 6e-2  # bf16 rounding shows: the backend really ran in bf16, apart from the fp32 reference
    assert main(["verify", str(out)]) == 2  # ONNX Runtime keeps its clear refusal
    assert "cannot run on ONNX Runtime CPU" in capfd.readouterr().err


def test_verify_a_base_model_artifact(tiny_dirs, tmp_path, capsys):
    """`export` without --prompts writes the base model (method none); verify checks it, from its recorded
    source or, when that is gone, from --model."""
    out = tmp_path / "base"
    assert main(["export", "--model", str(tiny_dirs["model"]), "--out", str(out), "--batch", "1,1,2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "none" and manifest["fused_op"]["count"] == 0
    assert main(["verify", str(out), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fused_op_vs_reference"]["nodes"] == 0 and len(report["onnxruntime_vs_torch"]["runs"]) == 2
    manifest["source"] = {"model_dir": str(tmp_path / "gone")}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(out)]) == 2
    assert "pass --model MODEL_DIR" in capsys.readouterr().err
    assert main(["verify", str(out), "--model", str(tiny_dirs["model"])]) == 0
