"""apt-deploy triton-repo: configs generated from the manifest, re-parsed with tritonclient's protobuf and
checked (names, dtypes, dims, batch range, ensemble wiring); broken ones are refused with the reason."""

from __future__ import annotations

import json
import re

import pytest

from apt_deploy.cli import main
from apt_deploy.errors import ConfigError
from apt_deploy.features import has, why_missing

pytestmark = pytest.mark.skipif(not has("tritonclient"), reason=why_missing("tritonclient"))


@pytest.fixture(scope="module")
def repo(vqa_artifact, clip_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "repo"
    assert main(["triton-repo", f"vqa={vqa_artifact}", f"cls={clip_artifact}", "--out", str(out),
                 "--max-batch", "4", "--instances", "2", "--top-k", "3"]) == 0
    return out


def _cfg(path):
    from apt_deploy.serving.triton_validate import parse_config

    return parse_config(path / "config.pbtxt")


def test_layout_and_platforms(repo):
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "cls", "cls_model", "cls_post", "cls_pre", "vqa", "vqa_model", "vqa_post", "vqa_pre"]
    assert (repo / "vqa_model" / "1" / "model.onnx").is_file() and (repo / "vqa_pre" / "1" / "apt_preprocess.py").is_file()
    assert _cfg(repo / "vqa_model").platform == "onnxruntime_onnx" and _cfg(repo / "vqa").platform == "ensemble"
    assert _cfg(repo / "vqa_pre").backend == "python" and _cfg(repo / "vqa_model").instance_group[0].count == 2
    info = json.loads((repo / "apt_deploy_repository.json").read_text())
    assert info["models"]["vqa"]["inputs"] == ["image", "question"] and info["models"]["cls"]["inputs"] == ["image"]


def test_model_step_matches_the_manifest(repo, vqa_artifact):
    manifest = json.loads((vqa_artifact / "manifest.json").read_text())
    cfg = _cfg(repo / "vqa_model")
    assert cfg.max_batch_size == 4 and cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(i.name, list(i.dims)) for i in cfg.input] == [(i["name"], i["max_shape"][1:]) for i in manifest["inputs"]]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [11])]


def test_ensemble_takes_bytes_and_returns_top_k(repo):
    cfg = _cfg(repo / "vqa")
    assert [(i.name, i.data_type) for i in cfg.input] == [("image", 13), ("question", 13)]  # 13 = TYPE_STRING
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("labels", [3]), ("scores", [3])]
    assert [s.model_name for s in cfg.ensemble_scheduling.step] == ["vqa_pre", "vqa_model", "vqa_post"]
    assert [i.name for i in _cfg(repo / "cls").input] == ["image"]


def _copy(repo, tmp_path):
    import shutil

    dst = tmp_path / "repo"
    shutil.copytree(repo, dst)
    return dst


@pytest.mark.parametrize("edit,match", [
    (("vqa_model", "max_batch_size: 4", "max_batch_sise: 4"), r"config.pbtxt: 3:1 : .*no field named \"max_batch_sise\""),
    (("vqa_model", "TYPE_INT64", "TYPE_INT65"), r"TYPE_INT65"),
    (("vqa_model", "dims: 16", "dims: 17"), r"vqa_model: inputs .* differ from the manifest"),
    (("vqa_model", "max_batch_size: 4", "max_batch_size: 9"), r"max_batch_size 9 outside the export's batch range 1..8"),
    (("vqa_post", "dims: 3", "dims: 2"), r"vqa: output 'labels' is .* but declared"),
    (("vqa", 'value: "logits"', 'value: "logit"'), r"vqa step 2 \(vqa_post\): input 'logits' is neither an ensemble input nor an earlier output"),
    (("cls_pre", 'name: "cls_pre"', 'name: "other"'), r"cls_pre: config name 'other' differs from its directory"),
])
def test_broken_configs_are_refused_with_the_reason(repo, tmp_path, edit, match):
    from apt_deploy.serving.triton_validate import validate_repository

    copy = _copy(repo, tmp_path)
    model, old, new = edit
    path = copy / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match):
        validate_repository(copy)


@pytest.mark.parametrize("extra,match", [
    (["--max-batch", "9"], r"--max-batch 9.*1..8"),
    (["--backend", "tensorrt"], r"TensorRT engine .*model.fp32.plan' does not exist.*apt-deploy build"),
    (["--instances", "0"], r"--instances 0"),
])
def test_bad_flags_exit_2_and_leave_nothing(vqa_artifact, tmp_path, capsys, extra, match):
    out = tmp_path / "repo"
    assert main(["triton-repo", str(vqa_artifact), "--out", str(out), *extra]) == 2
    assert re.search(match, capsys.readouterr().err) and not out.exists()


def test_artifact_without_assets_is_refused(apt_artifact, tmp_path, capsys):
    assert main(["triton-repo", str(apt_artifact), "--out", str(tmp_path / "r")]) == 2
    assert "has no inference assets" in capsys.readouterr().err


def test_python_backend_model_step(vqa_artifact, tmp_path):
    out = tmp_path / "repo"
    assert main(["triton-repo", f"m={vqa_artifact}", "--out", str(out), "--backend", "python"]) == 0
    cfg = _cfg(out / "m_model")
    assert cfg.backend == "python" and cfg.max_batch_size == 8 and (out / "m_model" / "1" / "model.py").is_file()
    assert cfg.parameters["intra_op_threads"].string_value == "1"


def test_serve_refuses_backends_the_bundled_server_lacks(repo, capsys):
    pytest.importorskip("pytriton")
    assert main(["serve", str(repo)]) == 2
    err = capsys.readouterr().err
    assert "uses 'onnxruntime_onnx'" in err and "triton-repo --backend python" in err
