"""The main job, end to end at a small size: train, save, reload, fold, export, validate, time."""

from __future__ import annotations

import json


def test_demo_runs_end_to_end(tmp_path, capsys):
    from apt_deploy.cli import main

    work = tmp_path / "demo"
    rc = main(["demo", "--workdir", str(work), "--steps", "30", "--num-train", "128", "--num-test", "64",
               "--prompt-len", "8", "--latency-iterations", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "RANDOM INIT" in out and "parity: ONNX Runtime vs PyTorch" in out and "blind baselines" in out
    summary = json.loads((work / "summary.json").read_text())
    t, e = summary["training"], summary["export"]
    assert t["steps"] == 30 and t["loss_last"] < t["loss_first"]
    assert 0.0 <= t["baselines"]["majority_answer"] <= t["baselines"]["question_only"] <= 1.0
    assert e["fused_nodes"] == 4 and e["validation"]["training_vs_folded"]["runs"][0]["outputs"][0]["max_abs"] <= 1e-5
    assert set(summary["latency"]["stats"]) == {"base", "apt"}
    for name in ("base_model", "prompts", "artifact", "artifact_base"):
        assert (work / name).is_dir()
    assert main(["verify", str(work / "artifact")]) == 0
    assert main(["verify", str(work / "artifact_base")]) == 0  # the base-model artifact records its source too
