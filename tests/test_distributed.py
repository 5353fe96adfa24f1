"""Scale-out training on CPU with gloo: torchrun data parallelism, gradient accumulation, precision, resume.

The equalities the issue asks for: 2 processes x batch B == 1 process x batch 2B (same data, <= 1e-6);
K micro-batches of B == one batch of K*B; an interrupted and resumed run == the uninterrupted run (bit for bit,
CPU fp32, same world size). Multi-process runs go through real ``torchrun --standalone`` on loopback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import apt_deploy.cli as cli
from apt_deploy.cli import main
from apt_deploy.data.synthetic_vqa import ANSWERS, COLORS, render
from apt_deploy.distributed import DistContext, ShardedBatches
from apt_deploy.errors import ConfigError
from apt_deploy.settings import ClipTrainSettings, ScaleSettings, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = dict(steps=4, batch_size=4, lr=5e-3, seed=0)


@pytest.fixture(autouse=True)
def only_present_commands(monkeypatch):
    present = tuple(m for m in cli.COMMANDS if importlib.util.find_spec(m) is not None)
    monkeypatch.setattr(cli, "COMMANDS", present)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A saved tiny ViLT and 12 questions on PNGs (as tests/test_cli_train.py)."""
    from PIL import Image

    from apt_deploy.tiny import save_tiny_vilt

    root = tmp_path_factory.mktemp("ddp")
    save_tiny_vilt(root / "model", seed=0)
    save_tiny_vilt(root / "other_model", seed=1)
    rng, rows = np.random.default_rng(0), []
    for i in range(12):
        color = list(COLORS)[i % 4]
        Image.fromarray(render(rng, 32, color, "circle", "left")).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "what color is the shape?", "answers": [color]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    return root


def train_argv(ws: Path, out: Path, *extra: str, model: str = "model") -> list[str]:
    return ["train", "--backbone", "vilt", "--method", "apt", "--model", str(ws / model), "--data", str(ws / "train.jsonl"),
            "--answers", str(ws / "answers.json"), "--out", str(out), "--steps", "4", "--prompt-len", "6", "--rank", "2",
            "--device", "cpu", *extra]


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def torchrun(nproc: int, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m apt_deploy ...`` (free loopback port), bounded in time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "APT_DEPLOY_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "apt_deploy", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "prompts.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_match_one_process_with_double_batch(workspace, tmp_path, one_thread):
    two, one = tmp_path / "two", tmp_path / "one"
    proc = torchrun(2, train_argv(workspace, two, "--batch-size", "2", "--eval-data", str(workspace / "train.jsonl")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("effective batch 4 = --batch-size 2 x --grad-accum 1 x 2 process(es)") == 1  # rank 0 only
    assert proc.stderr.count("training 4 steps at batch 4 (2 x 1 accumulation x 2 processes) done") == 1
    assert proc.stderr.count("saved 18 tensors") == 1  # only rank 0 writes and logs
    assert main(["-q", *train_argv(workspace, one, "--batch-size", "4")]) == 0
    assert max_diff(tensors(two), tensors(one)) <= 1e-6
    fresh = tmp_path / "fresh"  # the tensors did train: one step fewer differs by far more than that
    assert main(["-q", *with_flag(train_argv(workspace, fresh, "--batch-size", "4"), "--steps", "3")]) == 0
    assert max_diff(tensors(fresh), tensors(one)) > 1e-4


def test_sharded_batches_split_the_global_batch_and_skip_exactly():
    data = list(range(10))
    take = lambda stream, n: [next(stream) for _ in range(n)]  # noqa: E731
    ranks = [ShardedBatches(data, 2, DistContext(rank=r, world_size=2), seed=3, collate_fn=list) for r in range(2)]
    single = ShardedBatches(data, 4, DistContext(), seed=3, collate_fn=list)
    per_rank = [take(iter(s), 5) for s in ranks]
    whole = take(iter(single), 5)
    assert ranks[0].per_epoch == single.per_epoch == 2  # 5 per rank // 2; 10 // 4 (partial batches dropped)
    for step in range(5):  # the union of the ranks' micro-batches is the single process's batch
        assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(whole[step])
    assert len(set(whole[0] + whole[1])) == 8 and whole[:2] != whole[2:4]  # an epoch: distinct indices, then reshuffled
    resumed = ShardedBatches(data, 4, DistContext(), seed=3, collate_fn=list)
    resumed.load_state_dict({**single.state_dict(), "consumed": 3})
    assert take(iter(resumed), 2) == whole[3:5]


def test_world_size_larger_than_the_data_is_refused():
    from apt_deploy.clip_training import GlobalDraws

    with pytest.raises(ConfigError, match="world size 4 .* only 3 examples.*Fix: launch fewer processes"):
        ShardedBatches([1, 2, 3], 1, DistContext(rank=0, world_size=4), seed=0, collate_fn=list)
    with pytest.raises(ConfigError, match="world size 4"):
        GlobalDraws(3, 8, DistContext(rank=1, world_size=4), grad_accum=1, seed=0)


@pytest.fixture(scope="module")
def vqa_task():
    from apt_deploy.data.synthetic_vqa import build_synthetic_vqa

    return build_synthetic_vqa(num_train=24, num_test=8, image_size=32, text_len=12, seed=0)


def vilt_apt(task):
    from apt_deploy.backbones import get_backbone
    from apt_deploy.data.synthetic_vqa import synthetic_vocab
    from apt_deploy.methods.apt import APTConfig
    from apt_deploy.tuning import apply_apt

    model = get_backbone("vilt").build_tiny(seed=0, num_labels=len(task.answers), vocab_size=len(synthetic_vocab()),
                                            image_size=32)
    torch.manual_seed(0)
    return apply_apt(model, APTConfig(prompt_len=4, rank=2, cls_token_id=task.tokenizer.cls_token_id))


def trained(model) -> dict[str, torch.Tensor]:
    from apt_deploy.checkpoint import trained_tensors

    return {k: v.detach().clone() for k, v in trained_tensors(model).items()}


def test_grad_accumulation_equals_the_larger_batch(vqa_task, one_thread):
    from apt_deploy.training import train

    accumulated = vilt_apt(vqa_task)
    r1 = train(accumulated, vqa_task.train, TrainSettings(**{**TINY_TRAIN, "batch_size": 2, "lr": 5e-4}),
               scale=ScaleSettings(grad_accum=3))
    large = vilt_apt(vqa_task)
    r2 = train(large, vqa_task.train, TrainSettings(**{**TINY_TRAIN, "batch_size": 6, "lr": 5e-4}))
    assert max_diff(trained(accumulated), trained(large)) <= 1e-6
    assert r1.losses == pytest.approx(r2.losses, abs=1e-5)


def test_interrupted_run_resumes_to_identical_tensors(vqa_task, tmp_path, monkeypatch, one_thread):
    from apt_deploy.stepping import GradientStepper
    from apt_deploy.training import train

    settings = TrainSettings(**TINY_TRAIN)
    reference = vilt_apt(vqa_task)
    full = train(reference, vqa_task.train, settings, eval_dataset=vqa_task.test)
    ckpt = str(tmp_path / "state")
    real_step, calls = GradientStepper.step, []

    def crash_at_step_4(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(GradientStepper, "step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(vilt_apt(vqa_task), vqa_task.train, settings, scale=ScaleSettings(checkpoint_every=2, checkpoint_dir=ckpt))
    monkeypatch.setattr(GradientStepper, "step", real_step)
    assert json.loads((tmp_path / "state" / "train_state.json").read_text())["step"] == 2
    torch.manual_seed(123)  # the resumed process's RNG is elsewhere; the checkpoint restores it
    resumed_model = vilt_apt(vqa_task)
    resumed = train(resumed_model, vqa_task.train, settings, eval_dataset=vqa_task.test,
                    scale=ScaleSettings(resume=ckpt))
    a, b = trained(reference), trained(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert resumed.losses == full.losses and resumed.evals == full.evals


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_and_keeps_fp32_tensors(vqa_task, precision, one_thread):
    from apt_deploy.training import train

    model = vilt_apt(vqa_task)
    before = trained(model)
    result = train(model, vqa_task.train, TrainSettings(**TINY_TRAIN), scale=ScaleSettings(precision=precision))
    after = trained(model)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all(np.isfinite(result.losses)) and max_diff(before, after) > 1e-4


def test_a_precision_the_device_cannot_run_is_refused(monkeypatch):
    import contextlib

    import apt_deploy.stepping as stepping

    monkeypatch.setattr(stepping, "autocast", lambda precision, device: contextlib.nullcontext())  # autocast ignores fp16
    with pytest.raises(ConfigError, match="--precision fp16 cannot run on cpu: autocast produced torch.float32.*Fix"):
        stepping.check_precision("fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_exits_2(workspace, tmp_path, capsys):
    assert main(with_flag(train_argv(workspace, tmp_path / "o"), "--device", "cuda")) == 2
    assert "--device cuda, but torch sees no CUDA device" in capsys.readouterr().err


def test_clip_accumulation_and_resume(clip_dir, tmp_path, monkeypatch, one_thread):
    from apt_deploy.clip_training import train_clip
    from apt_deploy.data.imagefolder import ClassificationData
    from apt_deploy.stepping import GradientStepper
    from tests.clip_helpers import CLASS_NAMES, clip_with_method as seeded

    def clip_with_method(directory, method):  # the fresh APT W_dn is drawn from the global RNG: seed it
        torch.manual_seed(0)
        return seeded(directory, method)

    data = ClassificationData(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                              torch.arange(12) % 3, CLASS_NAMES)
    settings = ClipTrainSettings(steps=4, batch_size=6, optimizer="adamw")
    big, _ = clip_with_method(clip_dir, "apt+coop")
    losses = train_clip(big, data, settings)
    small, _ = clip_with_method(clip_dir, "apt+coop")
    train_clip(small, data, ClipTrainSettings(steps=4, batch_size=2, optimizer="adamw"), ScaleSettings(grad_accum=3))
    assert max_diff(trained(big), trained(small)) <= 1e-6

    real_step, calls = GradientStepper.step, []

    def crash_at_step_4(self, *a):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(GradientStepper, "step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_clip(clip_with_method(clip_dir, "apt+coop")[0], data, settings,
                   ScaleSettings(checkpoint_every=3, checkpoint_dir=str(tmp_path / "s")))
    monkeypatch.setattr(GradientStepper, "step", real_step)
    resumed, _ = clip_with_method(clip_dir, "apt+coop")
    assert train_clip(resumed, data, settings, ScaleSettings(resume=str(tmp_path / "s"))) == losses
    a, b = trained(big), trained(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_into_another_model_or_recipe_exits_2(workspace, tmp_path, capsys, one_thread):
    state = tmp_path / "state"
    first = train_argv(workspace, tmp_path / "first", "--batch-size", "4", "--checkpoint-every", "2",
                       "--checkpoint-dir", str(state))
    assert main(["-q", *first]) == 0 and (state / "optimizer.pt").is_file()
    capsys.readouterr()
    cases = [(("--method", "deep_prompt"), "was trained with method \"apt\", this run has \"deep_prompt\""),
             (("--model", str(workspace / "other_model")), "was trained with base_fingerprint"),
             (("--steps", "6"), "was written with steps=4 (now 6)"),
             (("--resume", str(tmp_path / "first")), "has no train_state.json")]
    for (flag, value), message in cases:
        argv = with_flag(train_argv(workspace, tmp_path / "second", "--batch-size", "4", "--resume", str(state)),
                         flag, value)
        assert main(["-q", *argv]) == 2, flag
        err = capsys.readouterr().err
        assert message in err and "Expected:" in err and "Fix:" in err, err
        assert not (tmp_path / "second").exists()


def _descendants(pid: int) -> list[int]:
    """Child processes, recursively, from Linux's /proc (children first in the returned order)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [d for c in found for d in (*_descendants(c), c)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through Linux /proc")
def test_torchrun_killed_run_resumes_to_the_uninterrupted_tensors(workspace, tmp_path):
    """A real kill: SIGKILL torchrun's workers once a checkpoint exists, then resume with the same world size."""
    import contextlib
    import signal
    import time

    full, part, state = tmp_path / "full", tmp_path / "part", tmp_path / "state"
    common = ("--batch-size", "2", "--steps", "12", "--method", "deep_prompt")  # (apt resumes in the default run)
    assert torchrun(2, train_argv(workspace, full, *common)).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "APT_DEPLOY_NO_PROGRESS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "apt_deploy",
            *train_argv(workspace, part, *common, "--checkpoint-every", "3", "--checkpoint-dir", str(state))]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (state / "train_state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [*_descendants(proc.pid), proc.pid]:  # the workers (own sessions) and torchrun itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    step = json.loads((state / "train_state.json").read_text())["step"]
    assert not part.exists() and 3 <= step < 12  # killed mid-run
    resumed = torchrun(2, train_argv(workspace, part, *common, "--resume", str(state)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr
    a, b = tensors(full), tensors(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_torchrun_agents_meet_through_c10d_rendezvous(workspace, tmp_path):
    """Two "machines" (two torchrun agents, one process each) on loopback: --nnodes 2 --rdzv-backend c10d."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "APT_DEPLOY_NO_PROGRESS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend",
            "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "apt-deploy-test", "-m", "apt_deploy",
            *train_argv(workspace, tmp_path / "two", "--batch-size", "2")]
    agents = [subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=400) for a in agents]
    assert all(a.returncode == 0 for a in agents), [err[-2000:] for _, err in outputs]
    assert sum(out.count("effective batch 4") for out, _ in outputs) == 1
    assert main(["-q", *train_argv(workspace, tmp_path / "one", "--batch-size", "4")]) == 0
    assert max_diff(tensors(tmp_path / "two"), tensors(tmp_path / "one")) <= 1e-6


@pytest.mark.slow
def test_torchrun_clip_two_processes_match_one_process(clip_dir, tmp_path):
    from apt_deploy.data.synthetic_shapes import write_image_folder

    data = write_image_folder(tmp_path / "train", "solid", 4, seed=0)
    base = ["train", "--backbone", "clip", "--method", "apt+coop", "--model", str(clip_dir), "--data", str(data),
            "--shots", "4", "--context-len", "3", "--prompt-len", "4", "--rank", "2", "--steps", "4", "--device", "cpu"]
    proc = torchrun(2, [*base, "--batch-size", "3", "--out", str(tmp_path / "two"), "--eval-data", str(data)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["-q", *base, "--batch-size", "6", "--out", str(tmp_path / "one")]) == 0
    assert max_diff(tensors(tmp_path / "two"), tensors(tmp_path / "one")) <= 1e-6


@pytest.mark.slow
def test_torchrun_more_processes_than_examples_exits_with_the_reason(workspace, tmp_path):
    (tmp_path / "two.jsonl").write_text("".join((workspace / "train.jsonl").read_text().splitlines(True)[:2])
                                        .replace('"image": "', f'"image": "{workspace}/'))
    proc = torchrun(3, with_flag(train_argv(workspace, tmp_path / "o", "--batch-size", "1"), "--data",
                                 str(tmp_path / "two.jsonl")))
    assert proc.returncode != 0
    assert "world size 3 (torchrun --nnodes x --nproc_per_node) but the training data has only 2 examples" in proc.stderr
