"""``apt-deploy train`` end to end on a tiny saved model dir and a JSONL file of PNGs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import apt_deploy.cli as cli
from apt_deploy.cli import main
from apt_deploy.data.synthetic_vqa import ANSWERS, COLORS, render

QUESTIONS = ("what color is the shape?", "is it red?")


@pytest.fixture(autouse=True)
def only_present_commands(monkeypatch):
    """Other subcommands are written concurrently; build the parser from the modules that exist."""
    present = tuple(m for m in cli.COMMANDS if importlib.util.find_spec(m) is not None)
    monkeypatch.setattr(cli, "COMMANDS", present)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    from PIL import Image

    from apt_deploy.tiny import save_tiny_vilt

    root = tmp_path_factory.mktemp("cli_train")
    save_tiny_vilt(root / "model", seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        color = list(COLORS)[i % 4]
        Image.fromarray(render(rng, 32, color, "circle", "left")).save(root / f"{i}.png")
        q = QUESTIONS[i % 2]
        rows.append({"image": f"{i}.png", "question": q, "answers": [color] if i % 2 == 0 else ["yes" if color == "red" else "no"]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    return root


def args(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "train", "--backbone", "vilt", "--model", str(ws / "model"), "--data", str(ws / "train.jsonl"),
            "--answers", str(ws / "answers.json"), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--prompt-len", "6", "--rank", "2", *extra]


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_train_writes_a_prompt_dir_that_loads_back(workspace, tmp_path, method):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import load_prompts, read_prompt_config

    out = tmp_path / "prompts"
    assert main(args(workspace, out, "--method", method, "--eval-data", str(workspace / "train.jsonl"))) == 0
    cfg = read_prompt_config(out)
    assert cfg["method"] == method and cfg["prompt_len"] == 6 and cfg["cls_token_id"] == 101
    assert cfg["labels"] == ANSWERS
    model = load_prompts(get_backbone("vilt").load(str(workspace / "model")), out)
    assert model.apt_deploy_state.method == method


def test_existing_out_is_refused_before_training(workspace, tmp_path, capsys):
    out = tmp_path / "prompts"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args(workspace, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(args(workspace, out, "--overwrite")) == 0
    assert (out / "prompts.safetensors").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("change, message", [
    (("--answers", "dupes.json"), "repeats ['yes']"),
    (("--data", "missing.jsonl"), "does not exist"),
    (("--backbone", "resnet"), "Unknown backbone for training 'resnet'"),
    (("--text-len", "99"), "--text-len 99"),
    (("--method", "coop"), "Unknown method for --backbone vilt 'coop'"),
])
def test_bad_inputs_exit_2_with_a_clear_message(workspace, tmp_path, capsys, change, message):
    (workspace / "dupes.json").write_text(json.dumps(["yes", "no", "yes"]))
    argv = args(workspace, tmp_path / "out")
    flag, value = change
    if flag in argv:
        argv[argv.index(flag) + 1] = value if flag in ("--backbone", "--text-len", "--method") else str(workspace / value)
    else:
        argv += [flag, value]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_backbone_lists_the_trainable_ones(workspace, tmp_path, capsys):
    assert main(args(workspace, tmp_path / "out", "--backbone", "not-a-backbone")) == 2
    assert "one of: clip, grounding_dino, meter, sd, vilt" in capsys.readouterr().err


def test_help_works_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import apt_deploy.cli as c; "
            "c.COMMANDS = ('apt_deploy.cli.train',); c.main(['train', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--head-lr-mult" in proc.stdout and "--prompt-len" in proc.stdout


def test_cache_images_trains_to_the_same_tensors(workspace, tmp_path):
    from safetensors.torch import load_file

    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(args(workspace, plain)) == 0
    assert main(args(workspace, cached, "--cache-images")) == 0
    a, b = load_file(str(plain / "prompts.safetensors")), load_file(str(cached / "prompts.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_13_answers_on_an_11_label_model_trains_a_fresh_head(workspace, tmp_path, caplog, capsys):
    """A third-party answer set on a checkpoint whose head has another size: a fresh head, said loudly, whose
    answers travel in the checkpoint so load, export and verify rebuild it."""
    import logging

    from apt_deploy.backbones import get_backbone
    from apt_deploy.checkpoint import load_prompts, read_prompt_config
    from apt_deploy.pipeline import load_trained

    answers = [*ANSWERS, "purple", "maybe"]
    assert len(answers) == 13 and get_backbone("vilt").load(str(workspace / "model")).config.num_labels == 11
    (workspace / "answers13.json").write_text(json.dumps(answers))
    out = tmp_path / "prompts"
    argv = args(workspace, out)
    argv[argv.index("--answers") + 1] = str(workspace / "answers13.json")
    with caplog.at_level(logging.WARNING, logger="apt_deploy"):
        assert main(argv) == 0
    assert "has 11 outputs but the answer vocabulary has 13: built a FRESH 13-answer VQA head" in caplog.text
    assert read_prompt_config(out)["labels"] == answers
    assert load_trained(workspace / "model", out).config.id2label[12] == "maybe"
    fresh = load_prompts(get_backbone("vilt").load(str(workspace / "model")), out)  # the Python API path resizes too
    assert fresh.classifier[-1].out_features == 13 and fresh.config.num_labels == 13
    art = tmp_path / "art"
    assert main(["-q", "export", "--model", str(workspace / "model"), "--prompts", str(out), "--out", str(art),
                 "--batch", "1,1,2"]) == 0
    assert json.loads((art / "manifest.json").read_text())["outputs"][0]["axes"][-1] == 13
    assert main(["-q", "verify", str(art)]) == 0


def test_a_model_without_a_vqa_head_gets_a_fresh_one(tmp_path):
    from apt_deploy.backbones import get_backbone

    spec = get_backbone("vilt")
    spec.build_tiny(seed=0, head=False).save_pretrained(tmp_path / "bare")
    model, reason = spec.load_with_head(str(tmp_path / "bare"), ["yes", "no", "2"])
    assert type(model).__name__ == "ViltForQuestionAnswering" and "ViltModel without a VQA head" in reason
    assert model.classifier[-1].out_features == 3 and model.config.id2label == {0: "yes", 1: "no", 2: "2"}
    same, kept = spec.load_with_head(str(tmp_path / "bare"), ["yes", "no", "2"])
    assert torch.equal(same.vilt.embeddings.cls_token, model.vilt.embeddings.cls_token)  # the base weights load
