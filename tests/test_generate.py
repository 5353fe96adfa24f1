"""``apt-deploy generate``: the ONNX pipeline equals diffusers' StableDiffusionPipeline running the same
APT-tuned UNet (tiny fp32 models, same seed); bad input exits 2 with a clear message."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")


def _diffusers_images(sd_artifact, scheduler: str, prompt: str, steps: int, guidance: float, batch: int = 1):
    import torch
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    from apt_deploy.pipeline import load_trained

    model = load_trained(sd_artifact["model_dir"], sd_artifact["prompts"])  # training form: APT processors
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=cls.from_config(model.scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                    num_images_per_prompt=batch, generator=torch.Generator("cpu").manual_seed(3),
                    output_type="np").images


@pytest.mark.parametrize("scheduler,guidance,batch", [("ddim", 7.5, 1), ("euler", 5.0, 2)])
def test_onnx_pipeline_equals_diffusers(sd_artifact, one_thread, scheduler, guidance, batch):
    from apt_deploy.generate import generate
    from apt_deploy.settings import GenerateSettings

    settings = GenerateSettings(prompt="a red circle", height=64, width=64, steps=4, guidance=guidance,
                                scheduler=scheduler, seed=3, batch=batch, threads=1)
    ours = generate(sd_artifact["artifact"], settings)
    expected = _diffusers_images(sd_artifact, scheduler, "a red circle", 4, guidance, batch)
    assert ours.images.shape == expected.shape == (batch, 64, 64, 3)
    assert np.abs(ours.images - expected).max() <= 1e-4
    assert ours.calls["unet"] == 4 and ours.seconds["unet"] > 0


def test_generate_cli_writes_png_and_refuses_existing(sd_artifact, tmp_path, capsys, one_thread):
    from PIL import Image

    from apt_deploy.cli import main

    out = tmp_path / "image.png"
    args = ["generate", str(sd_artifact["artifact"]), "--prompt", "x" * 200, "--steps", "2", "--out", str(out)]
    assert main(["-v", *args]) == 0
    assert Image.open(out).size == (64, 64)
    assert "per-component time" in capsys.readouterr().out
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_long_prompt_is_truncated_with_a_warning(sd_artifact, caplog):
    from apt_deploy.backbones.sd import tokenize
    from apt_deploy.generate import SDArtifact

    art = SDArtifact(sd_artifact["artifact"])
    with caplog.at_level("WARNING"):
        ids = tokenize(art.tokenizer(), ["y" * 100], 77)
    assert ids.shape == (1, 77) and "truncated" in caplog.text


@pytest.mark.parametrize("extra,match", [
    (["--height", "60"], "--height 60.*multiple of 8"),
    (["--steps", "0"], "--steps 0.*at least 1"),
    (["--guidance", "nan"], "--guidance nan.*finite"),
    (["--width", "512"], "--width 512.*in \\[32, 96\\].*re-export"),
])
def test_generate_bad_input_exits_2(sd_artifact, tmp_path, capsys, extra, match):
    import re

    from apt_deploy.cli import main

    out = tmp_path / "img.png"
    assert main(["generate", str(sd_artifact["artifact"]), "--prompt", "a", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Fix:" in err, err
    assert not out.exists()


def test_generate_missing_component_directory(sd_artifact, tmp_path, capsys):
    import shutil

    from apt_deploy.cli import main

    copy = tmp_path / "art"
    shutil.copytree(sd_artifact["artifact"], copy)
    shutil.rmtree(copy / "vae_decoder")
    assert main(["generate", str(copy), "--prompt", "a", "--out", str(tmp_path / "i.png")]) == 2
    assert "lacks the component directories ['vae_decoder']" in capsys.readouterr().err


def test_verify_and_bench_understand_components(sd_artifact, tmp_path, capsys, one_thread):
    import json

    from apt_deploy.cli import main

    assert main(["verify", str(sd_artifact["artifact"]), "--json", str(tmp_path / "v.json")]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["unet.fused_op_vs_reference"]["nodes"] == 4 and report["vae_decoder.integrity"]["sha256"] == "ok"
    assert max(o["max_abs"] for r in report["unet.onnxruntime_vs_torch"]["runs"] for o in r["outputs"]) <= 1e-4
    assert main(["bench", str(sd_artifact["artifact"]), "--iterations", "2", "--warmup", "1", "--threads", "1",
                 "--json", str(tmp_path / "b.json")]) == 0
    names = [a["name"] for a in json.loads((tmp_path / "b.json").read_text())["artifacts"]]
    assert names == ["artifact/unet", "artifact/text_encoder", "artifact/vae_decoder"]


def test_build_refuses_one_out_for_many_components(sd_artifact, capsys):
    from apt_deploy.cli import main

    assert main(["build", str(sd_artifact["artifact"]), "--out", "x.plan"]) == 2
    assert "one engine per component" in capsys.readouterr().err
