"""``apt-deploy train --backbone sd``: captioned images (JSONL or image + .txt folder), frozen model, cached
latents, the denoising loss the scheduler's prediction_type asks for, AdamW on the APT tensors only."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")


def test_train_cli_on_a_caption_folder_saves_prompts(sd_artifact, tmp_path, one_thread):
    from apt_deploy.checkpoint import read_prompt_config
    from apt_deploy.cli import main
    from apt_deploy.data.synthetic_shapes import make_caption_pairs

    folder = tmp_path / "data"
    folder.mkdir()
    for i, (image, caption) in enumerate(make_caption_pairs(("solid",), 4, seed=0, size=40)):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    out = tmp_path / "prompts"
    rc = main(["train", "--backbone", "sd", "--model", str(sd_artifact["model_dir"]), "--data", str(folder),
               "--out", str(out), "--steps", "3", "--batch-size", "2", "--prompt-len", "4", "--sites", "attn1+attn2"])
    assert rc == 0
    cfg = read_prompt_config(out)
    assert cfg["backbone"] == "sd" and cfg["sites"] == "attn1+attn2" and cfg["prompt_len"] == 4


def test_denoising_training_lowers_the_fixed_eval_loss_and_touches_only_apt(tmp_path, one_thread):
    import torch

    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.sd import apply_sd_apt
    from apt_deploy.data.synthetic_shapes import make_caption_pairs
    from apt_deploy.sd_training import cache_data, train_sd_apt
    from apt_deploy.settings import TrainSettings

    model = get_backbone("sd").build_tiny(seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_sd_apt(model, ad.APTConfig(prompt_len=8, rank=2), "attn2")
    data = cache_data(model, make_caption_pairs(("solid",), 8, seed=0, size=64), 64, seed=0)
    assert data.latents.shape == (8, 4, 32, 32) and data.embeddings.shape == (8, 77, 8)
    result = train_sd_apt(model, data, TrainSettings(steps=40, batch_size=8, lr=5e-3))
    assert result.eval_after < result.eval_before
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # VAE, text encoder, UNet untouched


def test_v_prediction_target(one_thread):
    import torch

    from apt_deploy.backbones import get_backbone
    from apt_deploy.sd_training import denoising_loss, noise_scheduler

    model = get_backbone("sd").build_tiny(seed=0)
    model.scheduler = model.scheduler.__class__.from_config(model.scheduler.config, prediction_type="v_prediction")
    scheduler = noise_scheduler(model)
    latents, noise, steps = torch.randn(2, 4, 32, 32), torch.randn(2, 4, 32, 32), torch.tensor([5, 900])
    emb = torch.randn(2, 77, 8)
    with torch.no_grad():
        loss = denoising_loss(model, scheduler, latents, emb, noise, steps)
        pred = model.unet(scheduler.add_noise(latents, noise, steps), steps, emb).sample
    expected = torch.nn.functional.mse_loss(pred, scheduler.get_velocity(latents, noise, steps))
    assert scheduler.config.prediction_type == "v_prediction" and torch.allclose(loss, expected)
