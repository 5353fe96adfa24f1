"""The Grounding-DINO-T SDPT benchmark (scripts/bench_grounding_dino.py): its MAC prediction against torch's
own FLOP counter on the tiny model, and (slow) the whole --smoke pipeline. Speed is never asserted."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_predicted_sdpt_macs_equal_counted_difference():
    """sdpt_extra_macs (2 * Nt * N * E per fusion layer) = FlopCounterMode(folded SDPT) - FlopCounterMode(base)."""
    from apt_deploy import fold
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings
    from apt_deploy.experiments.bench_grounding_dino import build, counted_macs, sdpt_extra_macs, shape

    spec = get_backbone("grounding_dino")
    base = spec.build_tiny(seed=0)
    text_len, tokens = 12, 5
    feed = spec.dummy_inputs(base, spec.input_specs(base, ShapeSettings(batch=(1, 1, 1), text_len=text_len)), "opt", 0)
    folded = fold(build(base, tokens))
    dims = shape(base.config, text_len, 128, 128)
    assert counted_macs(folded, feed) - counted_macs(base, feed) == sdpt_extra_macs(tokens, dims)
    assert sdpt_extra_macs(tokens, dims) == 2 * 2 * text_len * tokens * 64  # 2 fusion layers, E = 64


def test_non_square_image_size_from_config():
    """A config image_size of [h, w] (Grounding-DINO-T at 800 x 1333) gives (h, w) input specs."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings

    spec = get_backbone("grounding_dino")
    model = spec.build_tiny(seed=0, image_size=[128, 160])
    pix = {s.name: s for s in spec.input_specs(model, ShapeSettings(batch=(1, 1, 1), text_len=8))}["pixel_values"]
    assert pix.opt_shape == (1, 3, 128, 160)


@pytest.mark.slow  # three tiny Swin exports + ONNX Runtime timing (several minutes; 15 min on the loaded machine)
def test_smoke_run_writes_rows(tmp_path):
    """--export-only with the matched parity check (every query pairs with its own position on the tiny
    model), then --reuse times what it left and writes the rows."""
    from apt_deploy.experiments.bench_grounding_dino import main

    out, work = tmp_path / "gdino.json", tmp_path / "work"
    common = ["--smoke", "--iterations", "2", "--warmup", "1", "--threads", "1", "--max-wait", "0", "--workdir", str(work)]
    assert main([*common, "--export-only", "--matched-parity", "--keep"]) == 0
    prepared = json.loads((work / "prepared.json").read_text())
    for e in prepared["exports"].values():
        m = e["matched_parity"]
        assert m["matched_within_atol"] == m["same_position"] == m["queries"] and m["one_to_one"], m
    assert main([*common, "--reuse", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["rows"]]
    assert names == ["base", "sdpt_fold_n4", "sdpt_fold_n16"]
    assert all(e["exact_parity_checked"] is False for e in result["exports"].values())
    assert result["rows"][2]["extra_gmacs"] == 4 * result["rows"][1]["extra_gmacs"]
