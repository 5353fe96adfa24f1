"""apt-deploy import --backbone vilt: an official-format APT-ViLT checkpoint (original ViLT key names, built here)
imports to a ViltForQuestionAnswering + prompt checkpoint equal to an independent reference forward of the
official model (written below from the original code's computation, on the original state dict)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from apt_deploy.cli import main

D, L, P, R, PATCH, GRID, VOCAB, TPOS, LABELS = 64, 2, 6, 2, 16, 2, 120, 12, 4


def _lin(sd, name, n_out, n_in, g):
    sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
    sd[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.1


def _ln(sd, name, n, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)


def official_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"transformer.cls_token": torch.randn(1, 1, D, generator=g) * 0.1,
          "transformer.pos_embed": torch.randn(1, GRID * GRID + 1, D, generator=g) * 0.1}
    _lin(sd, "transformer.patch_embed.proj", D, 3 * PATCH * PATCH, g)
    sd["transformer.patch_embed.proj.weight"] = sd["transformer.patch_embed.proj.weight"].reshape(D, 3, PATCH, PATCH)
    for i in range(L):
        b = f"transformer.blocks.{i}"
        _ln(sd, f"{b}.norm1", D, g)
        _ln(sd, f"{b}.norm2", D, g)
        _lin(sd, f"{b}.attn.qkv", 3 * D, D, g)
        _lin(sd, f"{b}.attn.proj", D, D, g)
        _lin(sd, f"{b}.mlp.fc1", 4 * D, D, g)
        _lin(sd, f"{b}.mlp.fc2", D, 4 * D, g)
        sd[f"{b}.attn.APT.mm.0.weight"] = torch.randn(R, D, generator=g) * 0.2
        sd[f"{b}.attn.APT.mm.1.weight"] = torch.randn(D, R, generator=g) * 0.2
        sd[f"{b}.attn.APT.mm_tokens"] = torch.randn(P, D, generator=g) * 0.1
        sd[f"{b}.attn.APT.scale"] = torch.full((1,), 0.1 * (i + 1))  # trained in the ViLT recipe
    _ln(sd, "transformer.norm", D, g)
    sd["text_embeddings.word_embeddings.weight"] = torch.randn(VOCAB, D, generator=g) * 0.3
    sd["text_embeddings.position_embeddings.weight"] = torch.randn(TPOS, D, generator=g) * 0.3
    sd["text_embeddings.token_type_embeddings.weight"] = torch.randn(2, D, generator=g) * 0.3
    sd["text_embeddings.position_ids"] = torch.arange(TPOS)[None]
    _ln(sd, "text_embeddings.LayerNorm", D, g)
    sd["token_type_embeddings.weight"] = torch.randn(2, D, generator=g) * 0.3
    _lin(sd, "pooler.dense", D, D, g)
    _lin(sd, "vqa_classifier.0", 2 * D, D, g)
    _ln(sd, "vqa_classifier.1", 2 * D, g)
    _lin(sd, "vqa_classifier.3", LABELS, 2 * D, g)
    sd["token4classifier"] = torch.randn(1, 1, D, generator=g) * 0.3
    return sd


def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]


def _norm(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def reference_logits(sd, ids, mask, pixels):
    """The original ViLT + APT forward: pre-LN blocks (timm eps 1e-6), APT after attn.proj with x_in = norm1(x)."""
    e = "text_embeddings"
    t = sd[f"{e}.word_embeddings.weight"][ids] + sd[f"{e}.position_embeddings.weight"][: ids.shape[1]]
    t = _norm(sd, f"{e}.LayerNorm", t + sd[f"{e}.token_type_embeddings.weight"][0], 1e-12)
    t = torch.cat([sd["token4classifier"].expand(t.shape[0], -1, -1), t[:, 1:]], 1)
    v = F.conv2d(pixels, sd["transformer.patch_embed.proj.weight"], sd["transformer.patch_embed.proj.bias"], stride=PATCH)
    v = torch.cat([sd["transformer.cls_token"].expand(v.shape[0], -1, -1), v.flatten(2).transpose(1, 2)], 1)
    v = v + sd["transformer.pos_embed"]
    x = torch.cat([t + sd["token_type_embeddings.weight"][0], v + sd["token_type_embeddings.weight"][1]], 1)
    keep = torch.cat([mask, torch.ones(mask.shape[0], v.shape[1], dtype=mask.dtype)], 1).bool()
    heads = D // 64
    for i in range(L):
        b = f"transformer.blocks.{i}"
        h = _norm(sd, f"{b}.norm1", x, 1e-6)
        q, k, val = (_linear(sd, f"{b}.attn.qkv", h).reshape(*h.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D // heads)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        o = _linear(sd, f"{b}.attn.proj", (s.softmax(-1) @ val).transpose(1, 2).reshape(h.shape))
        p = sd[f"{b}.attn.APT.mm_tokens"]
        keys = p + p @ sd[f"{b}.attn.APT.mm.0.weight"].t() @ sd[f"{b}.attn.APT.mm.1.weight"].t()
        a = torch.relu(h @ keys.t())
        x = x + (o + (a @ p) * a.max(-1, keepdim=True)[0]) * sd[f"{b}.attn.APT.scale"].exp()
        x = x + _linear(sd, f"{b}.mlp.fc2", F.gelu(_linear(sd, f"{b}.mlp.fc1", _norm(sd, f"{b}.norm2", x, 1e-6))))
    x = _norm(sd, "transformer.norm", x, 1e-6)
    cls = torch.tanh(_linear(sd, "pooler.dense", x[:, 0]))
    return _linear(sd, "vqa_classifier.3", F.gelu(_norm(sd, "vqa_classifier.1", _linear(sd, "vqa_classifier.0", cls), 1e-5)))


def test_official_apt_vilt_imports_equal_to_the_reference_forward(tmp_path, one_thread, capsys):
    from apt_deploy.checkpoint import read_prompt_config
    from apt_deploy.pipeline import load_trained

    ckpt = tmp_path / "apt_vilt.ckpt"
    torch.save({"state_dict": official_state(), "epoch": 1}, ckpt)
    assert main(["import", "--backbone", "vilt", "--checkpoint", str(ckpt), "--model-out", str(tmp_path / "model"),
                 "--prompts-out", str(tmp_path / "prompts")]) == 0
    assert "dropped 1 unused keys: text_embeddings.position_ids" in capsys.readouterr().out
    cfg = read_prompt_config(tmp_path / "prompts")
    assert (cfg["backbone"], cfg["prompt_len"], cfg["rank"], cfg["train_log_scale"]) == ("vilt", P, R, True)
    model = load_trained(tmp_path / "model", tmp_path / "prompts")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[2, 3:] = 0, 0
    ids = ids * mask
    pixels = torch.randn(3, 3, GRID * PATCH, GRID * PATCH, generator=g)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), pixel_values=pixels,
                    pixel_mask=torch.ones(3, GRID * PATCH, GRID * PATCH, dtype=torch.long)).logits
        torch.testing.assert_close(got, reference_logits(official_state(), ids, mask, pixels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown keys ['transformer.blocks.0.extra']"),
    ("missing", "missing keys ['pooler.dense.bias']"),
    ("image_size", "ViLT interpolates its position table at run time"),
])
def test_bad_vilt_input_exits_2_and_writes_nothing(case, message, tmp_path, capsys):
    sd = official_state()
    extra = []
    if case == "unknown":
        sd["transformer.blocks.0.extra"] = torch.zeros(1)
    elif case == "missing":
        del sd["pooler.dense.bias"]
    else:
        extra = ["--image-size", "64"]
    torch.save(sd, tmp_path / "c.pt")
    assert main(["import", "--backbone", "vilt", "--checkpoint", str(tmp_path / "c.pt"), "--model-out",
                 str(tmp_path / "model"), "--prompts-out", str(tmp_path / "prompts"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Fix:" in err
    assert not (tmp_path / "model").exists() and not (tmp_path / "prompts").exists()


def test_vilt_pretraining_checkpoint_gets_a_fresh_head_with_num_labels(tmp_path, capsys):
    from apt_deploy.backbones import get_backbone

    sd = {k: v for k, v in official_state().items() if not k.startswith(("vqa_classifier.", "token4classifier"))
          and ".APT." not in k}
    sd["itm_score.fc.weight"] = torch.zeros(2, D)
    torch.save(sd, tmp_path / "pretrain.pt")
    argv = ["import", "--backbone", "vilt", "--checkpoint", str(tmp_path / "pretrain.pt"), "--model-out", str(tmp_path / "m")]
    assert main(argv) == 2 and "no vqa_classifier" in capsys.readouterr().err
    assert main([*argv, "--num-labels", "5"]) == 0
    assert get_backbone("vilt").load(str(tmp_path / "m")).config.num_labels == 5
