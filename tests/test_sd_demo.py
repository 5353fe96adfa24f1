"""``apt-deploy demo --backbone sd`` at its smallest: build, train, fold, export, generate vs diffusers, time."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")


@pytest.mark.slow  # ~25 s idle (a third tiny export); every stage is also covered by a default-run test
def test_sd_demo_end_to_end(tmp_path, capsys, one_thread):
    from apt_deploy.cli.sd_options import print_sd_summary
    from apt_deploy.sd_demo import SDDemoSettings, run_sd_demo

    settings = SDDemoSettings(workdir=str(tmp_path / "demo"), size="tiny", steps=30, num_images=8, batch_size=4,
                              sample_steps=3, latency_iterations=3)
    summary = run_sd_demo(settings)
    t, e, g = summary["training"], summary["export"], summary["generate"]
    assert t["steps"] == 30 and t["eval_loss_after"] < t["eval_loss_before"]
    assert e["fused_nodes"] == 4 and e["training_vs_folded"] <= 1e-5 and max(e["components"].values()) <= 1e-4
    assert g["max_abs_vs_diffusers"] <= 1e-4 and (tmp_path / "demo" / "image.png").is_file()
    assert summary["latency"]["bypassed_nodes"] == 4 and set(summary["latency"]["stats"]) == {"base", "apt"}
    print_sd_summary(summary)
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def test_bypassed_unet_equals_the_base_model(sd_artifact, tmp_path, one_thread):
    """engines.graph_edit.bypass_fused_nodes: the APT UNet with its fused nodes bypassed is the folded UNet with
    y = o (e^s stays folded into to_out, so this is the base UNet's cost, and the base model itself when s = 0)."""
    import shutil

    import numpy as np
    import torch

    from apt_deploy.folding import fold
    from apt_deploy.methods.apt_processor import FoldedAPTAttnProcessor
    from apt_deploy.pipeline import load_trained
    from engines.graph_edit import bypass_fused_nodes
    from engines.runners import OnnxRuntimeRunner

    unet = tmp_path / "unet"
    shutil.copytree(sd_artifact["artifact"] / "unet", unet)
    assert bypass_fused_nodes(unet / "model.onnx", unet / "model.base.onnx") == 4
    base = fold(load_trained(sd_artifact["model_dir"], sd_artifact["prompts"]))
    for proc in base.unet.attn_processors.values():
        if isinstance(proc, FoldedAPTAttnProcessor):
            proc.k.zero_()  # A = ReLU(x K^T) = 0, so y = o
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((2, 4, 32, 32)).astype(np.float32), "timestep": np.array([3.0, 600.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 8)).astype(np.float32)}
    with torch.no_grad():
        expected = base.unet(*(torch.from_numpy(v) for v in feed.values())).sample.numpy()
    with OnnxRuntimeRunner(unet / "model.base.onnx") as runner:
        assert np.abs(runner.infer(feed)["out_sample"] - expected).max() <= 1e-4
