"""apt-deploy import --backbone meter: an official-format APT-METER checkpoint, built here from the official key
names (shared/specs/meter.md §2), imports to a model equal to an independent reference forward written below
from the spec (it reads the official state dict directly; no apt_deploy model code). Bad input exits 2 and
writes nothing."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from apt_deploy.cli import main

V = "vit_model.visual."
VW, TW, H, P, R = 128, 64, 64, 8, 2  # vision / text / cross widths (head dim 64), APT p and r
VL, TL, CL, VOCAB, POS, LABELS, PATCH, GRID = 2, 2, 2, 70, 20, 5, 16, 2


# --- an official checkpoint --------------------------------------------------------------------------------
def _lin(sd, name, n_out, n_in, g):
    sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in)
    sd[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.1


def _ln(sd, name, n, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)


def _bert_layer(sd, name, w, g, cross=False):
    for att in ("attention", "crossattention") if cross else ("attention",):
        for m in ("query", "key", "value"):
            _lin(sd, f"{name}.{att}.self.{m}", w, w, g)
        _lin(sd, f"{name}.{att}.output.dense", w, w, g)
        _ln(sd, f"{name}.{att}.output.LayerNorm", w, g)
    _lin(sd, f"{name}.intermediate.dense", 4 * w, w, g)
    _lin(sd, f"{name}.output.dense", w, 4 * w, g)
    _ln(sd, f"{name}.output.LayerNorm", w, g)


def official_state(seed=0, apt=True, grid=GRID):
    g = torch.Generator().manual_seed(seed)
    sd = {V + "class_embedding": torch.randn(VW, generator=g) * 0.1,
          V + "positional_embedding": torch.randn(grid * grid + 1, VW, generator=g) * 0.1,
          V + "conv1.weight": torch.randn(VW, 3, PATCH, PATCH, generator=g) * 0.03}
    _ln(sd, V + "ln_pre", VW, g)
    _ln(sd, V + "ln_post", VW, g)
    for i in range(VL):
        b = f"{V}transformer.resblocks.{i}"
        _lin(sd, f"{b}.attn.in_proj", 3 * VW, VW, g)
        sd[f"{b}.attn.in_proj_weight"] = sd.pop(f"{b}.attn.in_proj.weight")
        sd[f"{b}.attn.in_proj_bias"] = sd.pop(f"{b}.attn.in_proj.bias")
        _lin(sd, f"{b}.attn.out_proj", VW, VW, g)
        _ln(sd, f"{b}.ln_1", VW, g)
        _ln(sd, f"{b}.ln_2", VW, g)
        _lin(sd, f"{b}.mlp.c_fc", 4 * VW, VW, g)
        _lin(sd, f"{b}.mlp.c_proj", VW, 4 * VW, g)
    e = "text_transformer.embeddings"
    sd[f"{e}.word_embeddings.weight"] = torch.randn(VOCAB, TW, generator=g) * 0.3
    sd[f"{e}.position_embeddings.weight"] = torch.randn(POS, TW, generator=g) * 0.3
    sd[f"{e}.token_type_embeddings.weight"] = torch.randn(1, TW, generator=g) * 0.3
    _ln(sd, f"{e}.LayerNorm", TW, g)
    for i in range(TL):
        _bert_layer(sd, f"text_transformer.encoder.layer.{i}", TW, g)
    _lin(sd, "cross_modal_text_transform", H, TW, g)
    _lin(sd, "cross_modal_image_transform", H, VW, g)
    sd["token_type_embeddings.weight"] = torch.randn(2, H, generator=g) * 0.3
    for s in ("text", "image"):
        for i in range(CL):
            _bert_layer(sd, f"cross_modal_{s}_layers.{i}", H, g, cross=True)
        _lin(sd, f"cross_modal_{s}_pooler.dense", H, H, g)
    _lin(sd, "vqa_classifier.0", 2 * H, 2 * H, g)
    _ln(sd, "vqa_classifier.1", 2 * H, g)
    _lin(sd, "vqa_classifier.3", LABELS, 2 * H, g)
    # leftovers the import drops
    sd["vit_model.positional_embedding"] = torch.randn(77, 32, generator=g)
    _ln(sd, "vit_model.ln_final", 32, g)
    sd["text_transformer.embeddings.position_ids"] = torch.arange(POS)[None]
    _lin(sd, "text_transformer.pooler.dense", TW, TW, g)
    if apt:
        for s in ("text", "image"):
            for i in range(CL):
                for att in ("attention", "crossattention"):
                    a = f"cross_modal_{s}_layers.{i}.{att}.output.APT"
                    sd[f"{a}.mm.0.weight"] = torch.randn(R, H, generator=g) * 0.2
                    sd[f"{a}.mm.1.weight"] = torch.randn(H, R, generator=g) * 0.2
                    sd[f"{a}.mm_tokens"] = torch.randn(P, H, generator=g) * 0.1
                    sd[f"{a}.scale"] = torch.zeros(1)
        sd["token4classifier"] = torch.randn(1, 1, H, generator=g) * 0.3
    return sd


# --- the independent reference forward (spec §1.1-1.4, §3.1), on official names -----------------------------
def _linear(sd, name, x):
    return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]


def _norm(sd, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _mha(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        s = s + mask
    return (s.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def _apt(sd, name, x_in, o):
    if f"{name}.APT.mm_tokens" not in sd:
        return o
    p = sd[f"{name}.APT.mm_tokens"]
    keys = p + p @ sd[f"{name}.APT.mm.0.weight"].t() @ sd[f"{name}.APT.mm.1.weight"].t()
    a = torch.relu(x_in @ keys.t())
    return (o + (a @ p) * a.max(-1, keepdim=True)[0]) * sd[f"{name}.APT.scale"].exp()


def _bert(sd, name, x, mask, eps, other=None, other_mask=None):
    def attend(att, h, ctx, m):
        q, k, v = (_linear(sd, f"{name}.{att}.self.{n}", t) for n, t in (("query", h), ("key", ctx), ("value", ctx)))
        o = _linear(sd, f"{name}.{att}.output.dense", _mha(q, k, v, h.shape[-1] // 64, m))
        return _norm(sd, f"{name}.{att}.output.LayerNorm", _apt(sd, f"{name}.{att}.output", h, o) + h, eps)

    a = attend("attention", x, x, mask)
    if other is not None:
        a = attend("crossattention", a, other, other_mask)
    f = _linear(sd, f"{name}.output.dense", F.gelu(_linear(sd, f"{name}.intermediate.dense", a)))
    return _norm(sd, f"{name}.output.LayerNorm", f + a, eps)


def reference_logits(sd, ids, mask, pixels):
    x = F.conv2d(pixels, sd[V + "conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd[V + "class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd[V + "positional_embedding"]
    x = _norm(sd, V + "ln_pre", x, 1e-5)
    for i in range(VL):
        b = f"{V}transformer.resblocks.{i}"
        q, k, v = (_norm(sd, f"{b}.ln_1", x, 1e-5) @ sd[f"{b}.attn.in_proj_weight"].t() + sd[f"{b}.attn.in_proj_bias"]).chunk(3, -1)
        x = x + _linear(sd, f"{b}.attn.out_proj", _mha(q, k, v, VW // 64))
        h = _linear(sd, f"{b}.mlp.c_fc", _norm(sd, f"{b}.ln_2", x, 1e-5))
        x = x + _linear(sd, f"{b}.mlp.c_proj", h * torch.sigmoid(1.702 * h))
    image = _linear(sd, "cross_modal_image_transform", _norm(sd, V + "ln_post", x, 1e-5))
    e = "text_transformer.embeddings"
    real = (ids != 1).long()
    pos = torch.cumsum(real, 1) * real + 1  # RoBERTa: pads at 1, real tokens from 2
    t = sd[f"{e}.word_embeddings.weight"][ids] + sd[f"{e}.position_embeddings.weight"][pos] + sd[f"{e}.token_type_embeddings.weight"][0]
    t = _norm(sd, f"{e}.LayerNorm", t, 1e-5)
    add = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(TL):
        t = _bert(sd, f"text_transformer.encoder.layer.{i}", t, add, 1e-5)
    t = _linear(sd, "cross_modal_text_transform", t)
    if "token4classifier" in sd:
        t = torch.cat([sd["token4classifier"].expand(t.shape[0], -1, -1), t[:, 1:]], 1)
    tt = sd["token_type_embeddings.weight"]
    xs, ys = t + tt[0], image + tt[1]
    for i in range(CL):
        xs, ys = (_bert(sd, f"cross_modal_text_layers.{i}", xs, add, 1e-12, ys, None),
                  _bert(sd, f"cross_modal_image_layers.{i}", ys, None, 1e-12, xs, add))
    cls = torch.cat([torch.tanh(_linear(sd, "cross_modal_text_pooler.dense", xs[:, 0])),
                     torch.tanh(_linear(sd, "cross_modal_image_pooler.dense", ys[:, 0]))], -1)
    h = F.gelu(_norm(sd, "vqa_classifier.1", _linear(sd, "vqa_classifier.0", cls), 1e-5))
    return _linear(sd, "vqa_classifier.3", h)


def _inputs(size, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 4:] = 0, 0
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
    return ids, mask, torch.randn(3, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "apt_meter.ckpt"
    torch.save({"state_dict": official_state(), "epoch": 9, "global_step": 100,
                "hyper_parameters": {"config": {"image_size": GRID * PATCH, "max_text_len": 10}}}, path)
    return path


def _import(ckpt, tmp_path, *extra):
    return main(["import", "--backbone", "meter", "--checkpoint", str(ckpt), "--model-out", str(tmp_path / "model"),
                 "--prompts-out", str(tmp_path / "prompts"), *extra])


def test_official_apt_meter_imports_equal_to_the_reference_forward(official_ckpt, tmp_path, one_thread, capsys):
    from apt_deploy.pipeline import load_trained
    from apt_deploy.checkpoint import read_prompt_config

    assert _import(official_ckpt, tmp_path) == 0
    assert "dropped 6 unused keys" in capsys.readouterr().out
    model = load_trained(tmp_path / "model", tmp_path / "prompts")
    cfg = read_prompt_config(tmp_path / "prompts")
    assert (cfg["backbone"], cfg["method"], cfg["prompt_len"], cfg["rank"], cfg["train_log_scale"]) == ("meter", "apt", P, R, False)
    ids, mask, pixels = _inputs(GRID * PATCH)
    with torch.no_grad():
        expected = reference_logits(official_state(), ids, mask, pixels)
        torch.testing.assert_close(model(ids, mask, pixels).logits, expected, atol=1e-5, rtol=0)
        # without the APT modules (the base model directory alone) the output differs: APT was really applied
        from apt_deploy.backbones import get_backbone

        base = get_backbone("meter").load(str(tmp_path / "model"))
        assert (base(ids, mask, pixels).logits - expected).abs().max() > 1e-3


def test_image_size_regrids_the_position_table_bicubically(tmp_path, one_thread):
    sd = official_state(apt=False)
    path = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert main(["import", "--backbone", "meter", "--checkpoint", str(path), "--model-out", str(tmp_path / "m"),
                 "--image-size", "48"]) == 0
    from apt_deploy.backbones import get_backbone

    model = get_backbone("meter").load(str(tmp_path / "m"))
    grid = sd[V + "positional_embedding"][1:].reshape(1, GRID, GRID, VW).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(9, VW)
    sd[V + "positional_embedding"] = torch.cat([sd[V + "positional_embedding"][:1], grid])
    ids, mask, pixels = _inputs(48)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, pixels).logits, reference_logits(sd, ids, mask, pixels), atol=1e-5, rtol=0)
    assert model.config.image_size == 48 and (tmp_path / "m" / "preprocessor_config.json").is_file()


class _Boom:
    """A pickle that runs a shell command when unpickled (it must never be)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _bad_inputs(tmp_path):
    sd = official_state()
    unknown = {**sd, "cross_modal_text_layers.0.extra.weight": torch.zeros(1)}
    missing = {k: v for k, v in sd.items() if k != "cross_modal_image_pooler.dense.bias"}
    shape = {**sd, "cross_modal_image_pooler.dense.weight": torch.zeros(H, H + 1)}
    cases = {}
    for name, state in (("unknown", unknown), ("missing", missing), ("shape", shape)):
        cases[name] = tmp_path / f"{name}.pt"
        torch.save(state, cases[name])
    cases["code"] = tmp_path / "code.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": _Boom(tmp_path / "pwned")}, cases["code"])
    return cases


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown keys ['cross_modal_text_layers.0.extra.weight']"),
    ("missing", "missing keys ['cross_modal_image_pooler.dense.bias']"),
    ("shape", "cross_modal_image_pooler.dense.weight: (64, 65) (expected (64, 64))"),
    ("code", "pickle that needs code"),
    ("image_size", "a positive multiple of the patch size 16"),
    ("prompts_exist", "already exists"),
])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(case, message, tmp_path, official_ckpt, capsys):
    ckpt, extra = official_ckpt, []
    if case in ("unknown", "missing", "shape", "code"):
        ckpt = _bad_inputs(tmp_path)[case]
    elif case == "image_size":
        extra = ["--image-size", "40"]
    else:
        (tmp_path / "prompts").mkdir()
    assert _import(ckpt, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Expected:" in err and "Fix:" in err
    assert not (tmp_path / "model").exists()
    assert case == "prompts_exist" or not (tmp_path / "prompts").exists()
    assert not (tmp_path / "pwned").exists()  # the pickled command never ran


def test_pretraining_checkpoint_needs_num_labels_and_gets_a_fresh_head(tmp_path, capsys):
    from apt_deploy.backbones import get_backbone

    sd = {k: v for k, v in official_state(apt=False).items() if not k.startswith("vqa_classifier.")}
    sd["itm_score.fc.weight"] = torch.zeros(2, 2 * H)
    torch.save({"state_dict": sd}, tmp_path / "pretrain.ckpt")
    argv = ["import", "--backbone", "meter", "--checkpoint", str(tmp_path / "pretrain.ckpt"), "--model-out", str(tmp_path / "m")]
    assert main(argv) == 2 and "no task head" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert main([*argv, "--num-labels", "7"]) == 0 and "itm_score.fc.weight" in capsys.readouterr().out
    assert get_backbone("meter").load(str(tmp_path / "m")).config.num_labels == 7
