"""Training recipe: schedule shape, AdamW param groups, a short run on the synthetic task, deep prompt too."""

from __future__ import annotations

import pytest
import torch

from apt_deploy.backbones import get_backbone
from apt_deploy.checkpoint import trained_tensors
from apt_deploy.data.synthetic_vqa import build_synthetic_vqa, synthetic_vocab
from apt_deploy.errors import ConfigError
from apt_deploy.methods.apt import APTConfig
from apt_deploy.settings import TrainSettings
from apt_deploy.training import build_optimizer, evaluate, linear_warmup_decay, param_groups, train, vqa_loss
from apt_deploy.tuning import apply_apt, apply_deep_prompt

IMAGE, TEXT = 32, 12


@pytest.fixture(scope="module")
def task():
    return build_synthetic_vqa(num_train=128, num_test=32, image_size=IMAGE, text_len=TEXT, seed=0)


def tiny(task, method: str = "apt", **kw):
    model = get_backbone("vilt").build_tiny(seed=0, num_labels=len(task.answers), vocab_size=len(synthetic_vocab()),
                                            image_size=IMAGE, **kw)
    config = APTConfig(prompt_len=8, rank=2, cls_token_id=task.tokenizer.cls_token_id, method=method)
    return (apply_apt if method == "apt" else apply_deep_prompt)(model, config)


def test_schedule_warms_up_then_decays_to_zero():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(50, 5))
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert peak == 4 and lrs[peak] == pytest.approx(1e-3) and lrs[0] == pytest.approx(2e-4)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] > 0 and opt.param_groups[0]["lr"] == 0.0  # 0 after the last step
    assert linear_warmup_decay(10, 0)(0) == 1.0


def test_param_groups_follow_the_recipe(task):
    model = tiny(task)
    settings = TrainSettings(lr=5e-4, head_lr_mult=10.0, weight_decay=0.01)
    groups = {g["name"]: g for g in param_groups(model, settings)}
    assert set(groups) == {"body/decay", "body/no_decay", "head/decay", "head/no_decay"}
    assert groups["head/decay"]["lr"] == pytest.approx(5e-3) and groups["body/decay"]["lr"] == pytest.approx(5e-4)
    assert groups["body/no_decay"]["weight_decay"] == 0.0 and groups["body/decay"]["weight_decay"] == 0.01
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    head = model.classifier
    assert {id(head[0].weight), id(head[3].weight)} <= ids["head/decay"]
    assert {id(head[0].bias), id(head[1].weight), id(head[1].bias)} <= ids["head/no_decay"]
    apt = model.vilt.encoder.layer[0].attention.output.apt
    assert {id(apt.prompt), id(apt.down), id(apt.up)} <= ids["body/decay"]
    pooler = model.vilt.pooler.dense
    assert id(pooler.bias) in ids["body/no_decay"] and id(pooler.weight) in ids["body/decay"]
    everything = set().union(*ids.values())
    assert everything == {id(p) for p in model.parameters() if p.requires_grad}  # frozen excluded, no duplicates
    assert sum(len(v) for v in ids.values()) == len(everything)
    assert id(model.vilt.encoder.layer[0].layernorm_before.weight) not in everything


def test_optimizer_betas_and_errors(task):
    opt, sched = build_optimizer(tiny(task), TrainSettings(steps=10))
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    frozen = get_backbone("vilt").build_tiny().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(frozen, TrainSettings())
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainSettings(warmup_ratio=1.5)


def test_vqa_loss_matches_vilt(task):
    model = tiny(task)
    batch = {k: torch.stack([task.train[i][k] for i in range(4)]) for k in task.train[0]}
    out = model(**batch)
    assert torch.allclose(vqa_loss(out.logits, batch["labels"]), out.loss)


@pytest.mark.parametrize("method", ["apt", "deep_prompt"])
def test_short_run_lowers_loss_and_changes_only_trained_tensors(task, method):
    model = tiny(task, method)
    trained = {id(p) for p in trained_tensors(model).values()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, task.train, TrainSettings(steps=30, batch_size=16, lr=5e-3, seed=0), eval_dataset=task.test)
    assert result.steps == 30 and len(result.losses) == 30 and result.seconds > 0
    assert result.mean_loss(window=5) < result.mean_loss(first=True, window=5)
    assert result.evals and result.evals[-1][0] == 30 and 0.0 <= result.evals[-1][1] <= 1.0
    assert not model.training
    for name, p in model.named_parameters():
        if id(p) in trained:
            continue
        assert torch.equal(p, before[name]), f"frozen {name} changed"
    changed = [n for n, p in model.named_parameters() if id(p) in trained and not torch.equal(p, before[n])]
    assert len(changed) == len(trained)  # every trained tensor receives gradients


def test_training_is_deterministic(task):
    runs = [train(tiny(task), task.train, TrainSettings(steps=3, batch_size=8, seed=1)).losses for _ in range(2)]
    assert runs[0] == runs[1]


def test_evaluate_scores_argmax_answer(task):
    model = tiny(task)
    torch.nn.init.zeros_(model.classifier[3].weight)
    with torch.no_grad():
        model.classifier[3].bias.copy_(torch.arange(len(task.answers), dtype=torch.float32) == task.answers.index("yes"))
    expected = sum(ex.scores[0][0] == task.answers.index("yes") for ex in task.test.examples) / len(task.test)
    assert evaluate(model, task.test, batch_size=7) == pytest.approx(expected)
