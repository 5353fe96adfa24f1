"""A failure of a library underneath (ONNX, ONNX Runtime, transformers, safetensors) reaches the user as
exit 2 with what happened and a fix, never a bare traceback; -v / -q work after the subcommand too."""

from __future__ import annotations

import json
import shutil

import pytest

import apt_deploy.cli as cli
from apt_deploy.cli import main
from apt_deploy.errors import BackendError
from apt_deploy.fileio import sha256_file


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


def test_corrupt_onnx_at_verify(apt_artifact, tmp_path, capsys):
    """A damaged model.onnx whose hash was updated too (so the sha256 check cannot catch it)."""
    copy = tmp_path / "copy"
    shutil.copytree(apt_artifact, copy)
    (copy / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe" * 50)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sha256"]["onnx"] = sha256_file(copy / "model.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "ONNX checker rejects model.onnx" in err and "Fix: re-export the artifact" in err
    _no_traceback(err)


def test_onnxruntime_session_failure_is_a_backend_error(tmp_path):
    from engines.runners import OnnxRuntimeRunner

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError, match=r"ONNX Runtime cannot load .*model.onnx.*Fix: check the file is complete"):
        OnnxRuntimeRunner(bad).activate()


def test_onnxruntime_run_failure_names_the_inputs(apt_artifact):
    import numpy as np

    from engines.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(apt_artifact / "model.onnx") as runner, \
            pytest.raises(BackendError, match=r"ONNX Runtime failed to run model.onnx on .*input_ids.*manifest"):
        runner.infer({"input_ids": np.zeros((1, 3), np.float32)})


@pytest.mark.parametrize("damage,match", [
    ("truncated_weights", r"transformers cannot load ViltForQuestionAnswering from .*Fix: re-save the model"),
    ("bad_config", r"transformers cannot load ViltForQuestionAnswering from .*Fix: re-save the model"),
    ("config_not_json", r"model config .*config.json"),
])
def test_broken_model_dir_at_export(tiny_dirs, tmp_path, capsys, damage, match):
    import re

    model = tmp_path / "model"
    shutil.copytree(tiny_dirs["model"], model)
    if damage == "truncated_weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "bad_config":
        cfg = json.loads((model / "config.json").read_text())
        cfg["hidden_size"] = 30  # not a multiple of the 4 attention heads
        (model / "config.json").write_text(json.dumps(cfg))
    else:
        (model / "config.json").write_text("{ not json")
    rc = main(["export", "--model", str(model), "--prompts", str(tiny_dirs["apt"]), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err, re.S), err
    _no_traceback(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,verbose,quiet", [
    (["-v", "verify", "ART"], 1, False),
    (["verify", "ART", "-vv"], 2, False),
    (["verify", "ART", "-q"], 0, True),
    (["-q", "verify", "--verbose", "ART"], 1, True),
])
def test_verbosity_flags_before_and_after_the_subcommand(monkeypatch, argv, verbose, quiet):
    seen = []
    monkeypatch.setattr(cli, "setup_logging", lambda v, q: seen.append((v, q)))
    import apt_deploy.cli.verify as verify

    monkeypatch.setattr(verify, "run", lambda args: 0)
    assert main(argv) == 0
    assert seen == [(verbose, quiet)]


def test_unexpected_exception_is_exit_2_with_type_message_and_hint(monkeypatch, capsys):
    import apt_deploy.cli.verify as verify

    def boom(args):
        raise RuntimeError("the library underneath broke")

    monkeypatch.setattr(verify, "run", boom)
    assert main(["verify", "ART"]) == 2
    err = capsys.readouterr().err
    assert "unexpected builtins.RuntimeError: the library underneath broke" in err and "re-run with -vv" in err
    _no_traceback(err)
    assert main(["verify", "ART", "-vv"]) == 2
    assert "Traceback" in capsys.readouterr().err
