"""CLI: every --help works without torch; export / verify end to end; bad input exits 2 with a clear message
and leaves no partial output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apt_deploy.cli import COMMANDS, main

NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; from apt_deploy.cli import main; "


def _names():
    import importlib

    return [importlib.import_module(m).NAME for m in COMMANDS]


@pytest.mark.parametrize("name", _names())
def test_help_works_without_torch(name):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH + f"main([{name!r}, '--help'])"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: apt-deploy " + name in proc.stdout


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(n in out for n in _names())


def test_export_then_verify(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "art"
    rc = main(["export", "--backbone", "vilt", "--model", str(tiny_dirs["model"]), "--prompts", str(tiny_dirs["apt"]),
               "--out", str(out), "--batch", "1,2,3"])
    assert rc == 0 and (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["inputs"][0]["max_shape"][0] == 3
    assert main(["verify", str(out), "--json", str(tmp_path / "report.json")]) == 0
    assert "verify: OK" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["integrity"]["sha256"] == "ok" and report["fused_op_vs_reference"]["nodes"] == 2


def test_verify_detects_a_modified_model(apt_artifact, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(apt_artifact, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["verify", str(copy)]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


def _export(tiny_dirs, out, *extra, model=None, prompts=None):
    return main(["export", "--model", str(model or tiny_dirs["model"]), "--prompts", str(prompts or tiny_dirs["apt"]),
                 "--out", str(out), *extra])


@pytest.mark.parametrize("case,match", [
    ("missing_model", "model directory .* does not exist"),
    ("missing_prompts", "prompt directory .* does not exist"),
    ("unknown_backbone", "Unknown backbone 'not-a-backbone'.*vilt"),
    ("bad_batch", "--batch '1,2'"),
])
def test_export_bad_input(tiny_dirs, tmp_path, capsys, case, match):
    out = tmp_path / "art"
    args = {"missing_model": dict(model=tmp_path / "nope"), "missing_prompts": dict(prompts=tmp_path / "nope")}.get(case, {})
    extra = {"unknown_backbone": ["--backbone", "not-a-backbone"], "bad_batch": ["--batch", "1,2"]}.get(case, [])
    assert _export(tiny_dirs, out, *extra, **args) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(match, err), err
    assert not out.exists() and not any(p.name.startswith(".art") for p in tmp_path.iterdir())


def test_export_refuses_existing_out_unless_overwrite(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _export(tiny_dirs, out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert _export(tiny_dirs, out, "--overwrite") == 0 and not (out / "keep.txt").exists()


def test_export_prompts_on_wrong_model(tiny_dirs, tmp_path, capsys):
    from apt_deploy.backbones import get_backbone

    other = tmp_path / "other_model"
    get_backbone("vilt").build_tiny(seed=0, num_hidden_layers=3).save_pretrained(other)
    assert _export(tiny_dirs, tmp_path / "art", model=other) == 2
    assert "num_layers=2 but the model has num_layers=3" in capsys.readouterr().err


def test_export_corrupt_prompts(tiny_dirs, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad_prompts"
    shutil.copytree(tiny_dirs["apt"], bad)
    (bad / "prompts.safetensors").write_bytes(b"garbage")
    assert _export(tiny_dirs, tmp_path / "art", prompts=bad) == 2
    assert "corrupt or truncated" in capsys.readouterr().err and not (tmp_path / "art").exists()
