"""One artifact, many APT tasks: each row of a mixed-task batch equals its task's single-task artifact and
PyTorch model; op version 2 = its numpy reference; add-task keeps model.onnx; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apt_deploy.cli import main
from apt_deploy.fileio import sha256_file
from apt_deploy.settings import tolerance
from tests.conftest import randomize_method
from tests.test_serving_artifact import png_bytes

TASKS = ("red", "blue", "count")
SINGLES = ("red", "blue")  # tasks also exported alone (each export costs seconds; "count" is checked vs PyTorch)


def _save_task(model_dir: Path, out: Path, seed: int, prompt_len: int = 6, head_seed: int | None = None) -> Path:
    import torch

    import apt_deploy as ad

    model = ad.get_backbone("vilt").load(str(model_dir))
    ad.apply_apt(model, ad.APTConfig(prompt_len=prompt_len, rank=2))
    randomize_method(model, seed)
    if head_seed is not None:  # a task that trained its own head: cannot share an artifact
        with torch.no_grad():
            model.classifier[-1].bias.add_(torch.randn(model.classifier[-1].bias.shape,
                                                       generator=torch.Generator().manual_seed(head_seed)))
    ad.save_prompts(model, out)
    return out


@pytest.fixture(scope="module")
def mt(tmp_path_factory, one_thread) -> dict[str, Path]:
    """A tiny VQA ViLT base, 4 APT tasks on it (3 exported together, 1 to add), the multi-task artifact and
    single-task artifacts of SINGLES."""
    from apt_deploy.tiny import save_tiny_vilt

    root = tmp_path_factory.mktemp("multitask")
    model = save_tiny_vilt(root / "model", seed=0, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=16, image_size=32, patch_size=16,
                           max_image_length=-1)
    dirs = {name: _save_task(model, root / name, seed) for seed, name in enumerate((*TASKS, "added"), 11)}
    pairs = [f"{n}={dirs[n]}" for n in TASKS]
    assert main(["export", "--model", str(model), "--prompts", *pairs, "--out", str(root / "multi"), "--batch", "1,2,4"]) == 0
    for name in SINGLES:
        assert main(["export", "--model", str(model), "--prompts", str(dirs[name]), "--out", str(root / f"single_{name}"),
                     "--batch", "1,2,4", "--no-validate"]) == 0
    return {"root": root, "model": model, "multi": root / "multi", **{f"prompts_{k}": v for k, v in dirs.items()}}


def _feed(artifact: Path, batch: int, seed: int = 5) -> dict[str, np.ndarray]:
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import InputSpec
    from apt_deploy.manifest import read_manifest

    manifest = read_manifest(artifact)
    specs = [InputSpec(i["name"], i["dtype"], tuple(i["axes"]), *(tuple(i[f"{w}_shape"]) for w in ("min", "opt", "max")))
             for i in manifest["inputs"] if i["name"] != "task"]
    spec = get_backbone("vilt")
    model = spec.load(manifest["source"]["model_dir"])
    feed = spec.dummy_inputs(model, specs, "max", seed)
    return {k: v.numpy()[:batch] for k, v in feed.items()}


def _multi_outputs(artifact: Path, feed: dict[str, np.ndarray], tasks: list[str]) -> np.ndarray:
    from apt_deploy.manifest import read_manifest
    from apt_deploy.serving.tasks import TaskFeed
    from engines.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(artifact / "model.onnx") as runner:
        return runner.infer({**feed, **TaskFeed(artifact, read_manifest(artifact))(tasks)})["logits"]


def test_mixed_batch_rows_equal_single_task_artifacts_and_pytorch(mt):
    import torch

    from apt_deploy.folding import fold
    from apt_deploy.pipeline import load_trained
    from engines.runners import OnnxRuntimeRunner

    tasks = ["blue", "red", "count", "blue"]
    feed = _feed(mt["multi"], len(tasks))
    mixed = _multi_outputs(mt["multi"], feed, tasks)
    tol, ort_tol = tolerance("multitask_vs_single_task"), tolerance("onnxruntime_vs_torch")
    for row, name in enumerate(tasks):
        if name in SINGLES:
            with OnnxRuntimeRunner(mt["root"] / f"single_{name}" / "model.onnx") as single:
                expected = single.infer(feed)["logits"][row]
            np.testing.assert_allclose(mixed[row], expected, rtol=0, atol=tol.atol, err_msg=f"row {row} ({name})")
        with torch.no_grad():
            torch_out = fold(load_trained(mt["model"], mt[f"prompts_{name}"]))(**{k: torch.from_numpy(v) for k, v in feed.items()})
        np.testing.assert_allclose(mixed[row], torch_out.logits[row].numpy(), rtol=0, atol=ort_tol.atol)
    assert not np.allclose(mixed[0], mixed[1], atol=1e-3), "tasks with different prompts gave the same answer"


def test_manifest_bank_and_one_fused_op_per_module(mt):
    import onnx

    from apt_deploy.prompt_bank import read_bank
    from exporters import fused_op

    manifest = json.loads((mt["multi"] / "manifest.json").read_text())
    section = manifest["tasks"]
    assert section["names"] == list(TASKS) and section["layers"] == 2 and section["prompt_len"] == 6
    assert manifest["fused_op"]["version"] == 2 and manifest["fused_op"]["count"] == 2
    assert manifest["validation"]["onnxruntime_vs_torch"]["runs"][0]["max_abs"] <= 1e-4
    proto = onnx.load(str(mt["multi"] / "model.onnx"), load_external_data=False)
    assert len(fused_op.fused_nodes(proto)) == 2 and fused_op.model_op_spec(proto).version == 2
    assert {"task", *section["bank_inputs"]} <= {i.name for i in proto.graph.input}
    banks = read_bank(mt["multi"], section)
    assert banks["apt_bank_k_0"].shape == (3, 6, 32) and banks["apt_bank_scale_1"].shape == (3,)


def test_op_version_2_reference_torch_and_onnx_body():
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from apt_deploy.ops import reference, torch_op
    from apt_deploy.ops.schema import APPROX_PROMPT_DIFFUSION_ROWS as OP
    from exporters import fused_op

    rng = np.random.default_rng(0)
    x, o = rng.standard_normal((3, 5, 8), dtype=np.float32), rng.standard_normal((3, 5, 8), dtype=np.float32)
    k, v = rng.standard_normal((3, 4, 8), dtype=np.float32), rng.standard_normal((3, 4, 8), dtype=np.float32)
    ref = reference.approx_prompt_diffusion_rows(x, o, k, v)
    for b in range(3):  # per row: version 1 with that row's K, V
        np.testing.assert_allclose(ref[b], reference.approx_prompt_diffusion(x[b], o[b], k[b], v[b]), atol=1e-6)
    got = torch_op.approx_prompt_diffusion_rows(*(torch.from_numpy(a) for a in (x, o, k, v))).numpy()
    tol = tolerance("fused_op_vs_reference")
    np.testing.assert_allclose(got, ref, atol=tol.atol, rtol=tol.rtol)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in zip(OP.inputs, (x, o, k, v))]
    node = helper.make_node(OP.onnx_name, list(OP.inputs), ["y"], domain=OP.domain, **OP.node_attributes())
    graph = helper.make_graph([node], "rows", io, [helper.make_tensor_value_info("y", TensorProto.FLOAT, o.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(OP.domain, OP.version)])
    fused_op.attach_function(model)
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, dict(zip(OP.inputs, (x, o, k, v))))[0]
    np.testing.assert_allclose(out, ref, atol=tol.atol, rtol=tol.rtol)


def test_predict_mixed_tasks_and_errors(mt, tmp_path, capsys):
    from apt_deploy import Predictor
    from apt_deploy.errors import ConfigError, UnknownNameError

    multi, image = Predictor(mt["multi"]), png_bytes(32, 32, 3)
    requests = [{"image": image, "question": "what color?", "task": t} for t in ("blue", "red")]
    answers = multi.predict_batch(requests, top_k=3)
    for r, a in zip(requests, answers):
        single = Predictor(mt["root"] / f"single_{r['task']}").predict(image, "what color?", top_k=3)
        assert [p["label"] for p in a] == [p["label"] for p in single]
        np.testing.assert_allclose([p["score"] for p in a], [p["score"] for p in single], atol=1e-5)
    with pytest.raises(UnknownNameError, match="blue, count, red"):
        multi.predict(image, "what color?", task="green")
    with pytest.raises(ConfigError, match=r"task id 7.*\[0, 2\]"):
        multi.predict(image, "what color?", task=7)
    with pytest.raises(ConfigError, match="without a task"):
        multi.predict(image, "what color?")
    (tmp_path / "a.png").write_bytes(image)
    assert main(["predict", str(mt["multi"]), "--image", str(tmp_path / "a.png"), "--question", "q", "--task", "green"]) == 2
    assert "Unknown task 'green'" in capsys.readouterr().err
    lines = [{"image": "a.png", "question": "q", "task": "red"}, {"image": "a.png", "question": "q", "task": "nope"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["predict", str(mt["multi"]), "--requests", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert "predictions" in out[0] and "Unknown task 'nope'" in out[1]["error"]


def test_add_task_rewrites_only_bank_and_manifest(mt, tmp_path):
    import shutil

    import torch

    from apt_deploy.folding import fold
    from apt_deploy.pipeline import load_trained
    from apt_deploy.prompt_bank import read_bank

    art = tmp_path / "multi"
    shutil.copytree(mt["multi"], art)
    before = json.loads((art / "manifest.json").read_text())["tasks"]
    onnx_sha, old_banks = sha256_file(art / "model.onnx"), read_bank(art, before)
    assert main(["add-task", str(art), f"added={mt['prompts_added']}"]) == 0
    after = json.loads((art / "manifest.json").read_text())["tasks"]
    assert after["names"] == [*TASKS, "added"] and sha256_file(art / "model.onnx") == onnx_sha
    assert sorted(p.name for p in art.glob("prompt_bank.*")) == [after["bank_file"]] != [before["bank_file"]]
    new_banks = read_bank(art, after)
    for key, old in old_banks.items():
        np.testing.assert_array_equal(new_banks[key][:3], old)
    feed = _feed(art, 2)
    got = _multi_outputs(art, feed, ["added", "red"])
    with torch.no_grad():
        expected = fold(load_trained(mt["model"], mt["prompts_added"]))(**{k: torch.from_numpy(v) for k, v in feed.items()})
    np.testing.assert_allclose(got[0], expected.logits[0].numpy(), rtol=0, atol=tolerance("onnxruntime_vs_torch").atol)
    assert main(["add-task", str(art), f"red={mt['prompts_added']}"]) == 2  # name taken


def test_bad_tasks_exit_2_with_received_expected_fix(mt, capsys):
    root, model = mt["root"], str(mt["model"])
    short = _save_task(mt["model"], root / "short_prompts", seed=30, prompt_len=4)
    own_head = _save_task(mt["model"], root / "own_head", seed=31, head_seed=1)
    cases = [
        (["--prompts", f"red={mt['prompts_red']}", f"short={short}"], "prompt length"),
        (["--prompts", f"red={mt['prompts_red']}", f"head={own_head}"], "outside the APT prompts"),
        (["--prompts", f"red={mt['prompts_red']}", str(short)], "not NAME=DIR"),
        (["--prompts", f"red={mt['prompts_red']}", f"red={mt['prompts_blue']}"], "distinct names"),
    ]
    for args, needle in cases:
        assert main(["export", "--model", model, *args, "--out", str(root / "never")]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and "Expected:" in err and "Fix:" in err, err
    assert main(["add-task", str(mt["multi"]), f"short={short}"]) == 2
    assert "prompt length" in capsys.readouterr().err
    assert main(["add-task", str(root / "single_red"), f"x={short}"]) == 2
    assert "serves one task" in capsys.readouterr().err
    assert main(["triton-repo", str(mt["multi"]), "--out", str(root / "repo")]) == 2
    assert "serves 3 tasks" in capsys.readouterr().err
    assert main(["verify", str(mt["multi"])]) == 2
    assert "serves 3 tasks" in capsys.readouterr().err
    assert not (root / "never").exists()


@pytest.mark.slow
def test_bench_multitask_smoke(tmp_path):
    """The measurement script end to end at tiny shapes (numbers meaningless): JSON with every field."""
    from apt_deploy.experiments.bench_multitask import MIXED, MULTI, SINGLE, main as bench

    out = tmp_path / "multitask.json"
    assert bench(["--smoke", "--tasks", "3", "--batch", "3", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 0
    result = json.loads(out.read_text())
    assert set(result["p50_ms"]) == {SINGLE, MULTI, MIXED} and result["parity"]["max_abs"] <= 1e-5
    assert set(result["memory"]["session_rss_mb"]) == {MULTI, SINGLE, f"3 x {SINGLE}"}
    assert result["memory"]["disk_bytes"][MULTI] < result["memory"]["disk_bytes"][f"3 x {SINGLE}"]


def test_triton_repo_of_a_multi_task_artifact(mt, tmp_path, capsys):
    """The python model step gets the bank and a per-row ``task`` name; the ensemble takes ``task``; the
    other backends are refused (they cannot feed the bank)."""
    pytest.importorskip("tritonclient")
    from apt_deploy.serving.triton_validate import parse_config

    out = tmp_path / "repo"
    assert main(["triton-repo", f"mt={mt['multi']}", "--out", str(out), "--backend", "python"]) == 0
    ensemble, pre, step = (parse_config(out / n / "config.pbtxt") for n in ("mt", "mt_pre", "mt_model"))
    assert [i.name for i in ensemble.input] == ["image", "question", "task"]
    assert "task" not in [o.name for o in pre.output]
    task_in = [i for i in step.input if i.name == "task"][0]
    assert list(task_in.dims) == [1] and task_in.data_type == 13  # TYPE_STRING: names, mapped in the model step
    bank = json.loads((mt["multi"] / "manifest.json").read_text())["tasks"]["bank_file"]
    assert (out / "mt_model" / "1" / bank).is_file()
    assert main(["triton-repo", f"mt={mt['multi']}", "--out", str(tmp_path / "ort")]) == 2
    err = capsys.readouterr().err
    assert "serves 3 tasks" in err and "--backend python" in err and not (tmp_path / "ort").exists()


@pytest.fixture(scope="module")
def mt_server(mt, tmp_path_factory):
    """``apt-deploy serve`` of the multi-task artifact (tests/test_serve.py's helper)."""
    from apt_deploy.features import has, why_missing

    for module in ("pytriton", "tritonclient"):
        if not has(module):
            pytest.skip(why_missing(module))
    from tests.test_serve import serving

    with serving(mt["multi"], "mt", tmp_path_factory.mktemp("serve_mt")) as server:
        yield server


def test_one_server_answers_mixed_tasks_like_predict(mt, mt_server):
    """Concurrent requests of different tasks (batched together by Triton) get each task's answer; an unknown
    task gets a 400 naming the known ones; loadtest needs --task."""
    from concurrent.futures import ThreadPoolExecutor

    from tritonclient.utils import InferenceServerException

    from apt_deploy import Predictor
    from apt_deploy.errors import ConfigError
    from apt_deploy.serving.loadtest import LoadSettings, default_image, run_loadtest
    from tests.test_serve import ask

    predictor = Predictor(mt["multi"])
    requests = [(png_bytes(32, 32, i), "what color?", TASKS[i % 3]) for i in range(18)]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda req: ask(mt_server, "mt", req), requests))
    for (image, question, task), got in zip(requests, answers):
        want = predictor.predict(image, question, top_k=5, task=task)
        assert got["labels"] == [p["label"] for p in want], task
        np.testing.assert_allclose(got["scores"], [p["score"] for p in want], atol=1e-5)
    assert len({tuple(a["scores"]) for a in answers[:3]}) == 3  # the tasks really answer differently
    with pytest.raises(InferenceServerException, match="unknown task 'green'.*blue, count") as e:
        ask(mt_server, "mt", (png_bytes(32, 32), "what color?", "green"))
    assert e.value.status() == "400"
    settings = LoadSettings(concurrency=2, requests=8, deadline_s=60)
    report = run_loadtest(mt_server["url"], "mt", default_image(32), "what color?", settings, task="count")
    assert report["errors"] == 0 and report["completed"] == 8 and report["task"] == "count"
    with pytest.raises(ConfigError, match="serves several tasks"):
        run_loadtest(mt_server["url"], "mt", default_image(32), "what color?", settings)
