"""``apt-deploy train --backbone meter``: the official APT-METER recipe on a tiny saved METER and a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apt_deploy.cli import main
from apt_deploy.data.synthetic_vqa import ANSWERS, COLORS, render


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from PIL import Image

    from apt_deploy.tiny import save_tiny_meter

    root = tmp_path_factory.mktemp("meter_train")
    save_tiny_meter(root / "model", seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        color = list(COLORS)[i % 4]
        Image.fromarray(render(rng, 40, color, "square", "right")).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what color is the shape?", "answers": [color]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    return root


def test_meter_preprocessing_is_center_crop_and_roberta_padding(workspace):
    from apt_deploy.data.meter import load_meter_processor
    from apt_deploy.data.vqa import collate, load_vqa_jsonl

    proc = load_meter_processor(workspace / "model", vocab_size=10_000)
    data = load_vqa_jsonl(workspace / "train.jsonl", ANSWERS, proc, text_len=16)
    batch = collate([data[0], data[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and "pixel_mask" not in batch  # 40 px -> resize + crop 32
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    assert ids[0] == 0 and (ids[mask == 0] == 1).all() and (mask == 0).any()  # <s> first, pads are id 1


def test_train_meter_uses_the_official_recipe_and_saves_prompts(workspace, tmp_path, one_thread):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import load_prompts, read_prompt_config
    from apt_deploy.cli.train import settings_from_args
    from apt_deploy.training import param_groups
    import argparse

    out = tmp_path / "prompts"
    rc = main(["-q", "train", "--backbone", "meter", "--model", str(workspace / "model"), "--data",
               str(workspace / "train.jsonl"), "--answers", str(workspace / "answers.json"), "--out", str(out),
               "--steps", "3", "--batch-size", "4", "--prompt-len", "6", "--rank", "2"])
    assert rc == 0
    cfg = read_prompt_config(out)
    assert (cfg["backbone"], cfg["train_log_scale"], cfg["cls_token_id"]) == ("meter", False, 0)
    model = load_prompts(get_backbone("meter").load(str(workspace / "model")), out)
    assert model.token4classifier is not None and len(get_backbone("meter").apt_sites(model)) == 8
    # the learning rates of the official recipe (shared/specs/meter.md §3.5)
    ns = argparse.Namespace(backbone="meter", lr=None, head_lr_mult=None, steps=10, batch_size=4, seed=0, eval_every=0)
    lrs = {g["name"]: g["lr"] for g in param_groups(model, settings_from_args(ns))}
    assert lrs["body/decay"] == pytest.approx(2.5e-5)  # token4classifier and the token-type embeddings
    assert lrs["cross_modal/decay"] == pytest.approx(1.25e-4) and lrs["head/decay"] == pytest.approx(1.25e-3)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(model, settings_from_args(ns))}
    apt = get_backbone("meter").apt_sites(model)[0].module.apt
    assert {id(apt.prompt), id(apt.down), id(apt.up)} <= groups["cross_modal/decay"]
    assert id(model.token4classifier) in groups["body/decay"] and id(model.token_type_embeddings.weight) in groups["body/decay"]
    assert id(model.cross_modal_text_pooler.dense.weight) in groups["cross_modal/decay"]
