"""The SD 1.5-shaped UNet step benchmark (apt_deploy/experiments/bench_sd_unet.py): FLOP floor, grouping,
the smoke run end to end (slow), and the plot / table from its JSON."""

from __future__ import annotations

import json

import pytest

from apt_deploy.experiments import bench_sd_unet as sdb


def test_flop_floor_matches_the_spec_for_sd15():
    """Meta-device count: 859.5 M parameters, 0.803 TFLOPs per sample, sum N C = 11,550,720 per attention
    type, so attn2 at p = 16 / 64 / 200 costs 0.09 / 0.37 / 1.15 % and attn1+attn2 at p = 64 0.74 %."""
    flops = sdb.unet_flops(sdb.SD15_UNET)
    assert flops["parameters"] == 859_520_964
    assert flops["flops_per_sample"] == pytest.approx(0.8033e12, rel=1e-3)
    tokens = flops["attention_tokens_x_width"]
    assert len(tokens) == 32
    assert sum(n * c for name, (n, c) in tokens.items() if name.endswith("attn2")) == 11_550_720
    share = {v.name: sdb.apt_flops(v, tokens) / flops["flops_per_sample"] for v in sdb.VARIANTS}
    assert share["base"] == 0
    assert share["apt_attn2_p16"] == pytest.approx(0.00092, abs=5e-5)
    assert share["apt_attn2_p64"] == pytest.approx(0.0037, abs=5e-5)
    assert share["apt_attn2_p200"] == pytest.approx(0.0115, abs=5e-5)
    assert share["apt_attn1_attn2_p64"] == pytest.approx(2 * share["apt_attn2_p64"])


def test_groups_keep_the_base_in_every_process():
    names = [v.name for v in sdb.VARIANTS]
    pairs = sdb.groups(names, 1, peer=True)
    assert pairs[:4] == [["base", n] for n in names[1:]] and pairs[-1] == ["base", sdb.PEER]
    assert sdb.groups(names, 4, peer=False) == [names]
    assert sdb.groups(names, 3, peer=False) == [["base", *names[1:4]], ["base", names[4]]]


def test_verdict_is_decided_by_the_whole_interval():
    assert sdb.verdict(0.001, 0.004, 0.005) == "yes"
    assert sdb.verdict(0.006, 0.02, 0.005) == "no"
    assert sdb.verdict(-0.01, 0.02, 0.005) == "not resolved"


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """Exports (parity-checked) every variant of a tiny UNet, times the groups, writes JSON, plot and table."""
    from apt_deploy.experiments import plot_sd_unet

    out = tmp_path / "sd.json"
    assert sdb.main(["--smoke", "--iterations", "2", "--warmup", "0", "--workdir", str(tmp_path / "work"),
                     "--out", str(out), "--max-wait", "0", "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert not (tmp_path / "work").exists()  # cleaned up without --keep
    assert [r["name"] for r in res["rows"]] == [v.name for v in sdb.VARIANTS[1:]]
    exports = res["exports"]
    assert exports["base"]["fused_op_nodes"] == 0
    attn2 = exports["apt_attn2_p64"]["fused_op_nodes"]
    assert attn2 > 0 and exports["apt_attn1_attn2_p64"]["fused_op_nodes"] == 2 * attn2
    assert all(e["ort_vs_torch_max_abs"] <= 1e-4 for e in exports.values())
    assert len({e["base_fingerprint"] for e in exports.values()}) == 1  # every variant on the same base weights
    assert len(res["groups"]) == 5 and all(g["paths"][0] == "base" for g in res["groups"])
    predicted = {r["name"]: r["overhead_predicted"] for r in res["rows"]}
    assert 0 < predicted["apt_attn2_p16"] < predicted["apt_attn2_p64"] < predicted["apt_attn2_p200"]
    assert res["peer"]["torch_over_ort"] > 0 and res["peer"]["ort_faster"] in ("yes", "no", "not resolved")
    png, md = tmp_path / "sd.png", tmp_path / "sd.md"
    assert plot_sd_unet.main([str(out), "--out", str(png), "--markdown", str(md)]) == 0
    assert png.stat().st_size > 10_000 and "APT attn2, p = 64" in md.read_text()


def test_select_components_keeps_run_order_and_rejects_unknown_names():
    from types import SimpleNamespace

    from apt_deploy.errors import ConfigError
    from exporters.components import select_components

    plans = [SimpleNamespace(name=n) for n in ("text_encoder", "unet", "vae_decoder")]
    assert select_components(plans, None) == plans
    assert [p.name for p in select_components(plans, ("vae_decoder", "unet"))] == ["unet", "vae_decoder"]
    for bad in (("unet", "vae"), ()):
        with pytest.raises(ConfigError):
            select_components(plans, bad)
