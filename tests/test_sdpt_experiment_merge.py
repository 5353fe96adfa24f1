"""``scripts/sdpt_experiment.py --merge``: per-seed result files combine into one summary; mismatches are refused."""

from __future__ import annotations

import json

import pytest


def _result(seed: int, ap50: float, steps: int = 60) -> dict:
    run = {"method": "full-ft", "tokens": None, "seed": seed, "trainable_params": 10, "train_seconds": 1.0,
           "AP50": ap50, "mAP": ap50 / 2}
    return {"args": {"seeds": [seed], "steps": steps, "out": f"s{seed}.json"}, "stage_a_source_style_ap": {"solid": {"AP50": 0.4}},
            "total_seconds": 10.0 + seed, "summary": [], "runs": [run]}


def test_merge_summarises_all_seeds(tmp_path):
    from apt_deploy.experiments.sdpt_experiment import main

    paths = []
    for seed, ap in ((0, 0.2), (1, 0.4)):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(_result(seed, ap)))
    out = tmp_path / "all.json"
    assert main(["--merge", *map(str, paths), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["args"]["seeds"] == [0, 1] and len(merged["runs"]) == 2
    assert merged["summary"][0]["AP50"] == pytest.approx(0.3) and merged["summary"][0]["seeds"] == 2


def test_merge_refuses_different_settings_or_duplicate_seeds(tmp_path):
    from apt_deploy.errors import ConfigError
    from apt_deploy.experiments.sdpt_experiment import main

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_result(0, 0.2)))
    b.write_text(json.dumps(_result(1, 0.2, steps=30)))
    c.write_text(json.dumps(_result(0, 0.3)))
    with pytest.raises(ConfigError, match="different settings"):
        main(["--merge", str(a), str(b)])
    with pytest.raises(ConfigError, match="disjoint"):
        main(["--merge", str(a), str(c)])
