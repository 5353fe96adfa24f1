"""``apt-deploy bench`` and the latency regression gate.

Speed is never asserted. The gate's own tests use a sleep-injecting test double (CallableRunner) on a
fake clock, so a planted 10 % slowdown is exactly 10 % and an unchanged run is exactly unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import engines.bench
from apt_deploy.cli import main
from apt_deploy.errors import ConfigError, RegressionError
from engines import baseline as bl
from apt_deploy.settings import BenchSettings
from engines.bench import benchmark, build_feed, load_artifacts
from engines.runners import BACKENDS, CallableRunner


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """Two tiny artifacts (base model, APT fused op), exported once for this module."""
    from apt_deploy.backbones import get_backbone
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact
    from tests.conftest import tiny_method_model

    root, settings = tmp_path_factory.mktemp("bench"), ExportSettings(batch_max=2)
    return {"base": export_artifact(get_backbone("vilt").build_tiny(seed=0), root / "base", settings),
            "apt": export_artifact(tiny_method_model("apt"), root / "apt", settings)}


class FakeClock:
    """A clock that only moves when the test double sleeps on it: latencies are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def sleep_double(monkeypatch):
    """Backend "sleep-double": a CallableRunner per artifact that sleeps ``latency[name]`` seconds on a fake
    clock (or a callable of the call index), which engines.bench is made to read."""
    clock, latency, calls = FakeClock(), {}, {}

    def factory(artifact_dir, **_):
        name = Path(artifact_dir).resolve().name

        def infer(feed):
            calls[name] = calls.get(name, 0) + 1
            value = latency[name]
            clock.sleep(value(calls[name]) if callable(value) else value)
            return {"logits": np.zeros((1, 1), np.float32)}

        return CallableRunner(infer, f"sleep[{name}]")

    monkeypatch.setitem(BACKENDS, "sleep-double", factory)
    monkeypatch.setattr(engines.bench, "time", SimpleNamespace(perf_counter=clock))
    return SimpleNamespace(clock=clock, latency=latency)


def _bench(artifacts, *extra: str) -> list[str]:
    return ["bench", str(artifacts["base"]), str(artifacts["apt"]), "--iterations", "8", "--warmup", "1", *extra]


@pytest.mark.bench
def test_bench_cli_report_and_json(artifacts, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(_bench(artifacts, "--threads", "1", "--json", str(out))) == 0
    stdout = capsys.readouterr().out
    assert "p50 ms" in stdout and "x p50" in stdout and "base" in stdout
    report = json.loads(out.read_text())
    assert report["kind"] == "apt-deploy-bench" and report["settings"]["threads"] == 1
    assert {"cpu_model", "logical_cores", "physical_cores", "gpu", "machine_key"} <= set(report["machine"])
    assert "hostname" not in json.dumps(report["machine"]) and {"onnxruntime", "numpy"} <= set(report["versions"])
    assert set(report["load"]) == {"before", "after", "other_processes_cores"} and report["memory_method"]
    base, apt = report["artifacts"]
    assert base["method"] == "none" and apt["method"] == "apt" and apt["fused_op_nodes"] == 2
    assert base["ratio_p50"] == 1.0 and apt["ratio_p50"] > 0
    for a in (base, apt):
        assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s"} <= set(a["stats"])
        assert len(a["times_ms"]) == 8 and a["size"]["onnx_bytes"] > 0 and "peak_rss_delta_mb" in a["memory"]
        assert a["input_shapes"]["pixel_values"][0] == 1


def test_inputs_follow_the_manifest(artifacts):
    manifest = load_artifacts([artifacts["apt"]])[0].manifest
    feed = build_feed(manifest, batch=2, seed=0)
    assert set(feed) == {i["name"] for i in manifest["inputs"]}
    assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].shape[0] == 2
    assert feed["input_ids"].min() >= 1 and feed["input_ids"].max() < 100
    assert np.all(feed["attention_mask"] == 1) and np.all(feed["pixel_mask"] == 1)
    assert np.all(feed["token_type_ids"] == 0) and feed["pixel_values"].dtype == np.float32
    with pytest.raises(ConfigError, match="1..2"):
        build_feed(manifest, batch=3)


def test_gate_catches_a_planted_10pct_slowdown_and_passes_an_unchanged_one(artifacts, sleep_double):
    """The API: same CallableRunner double, 30 ms vs 33 ms on the fake clock."""
    settings, thresholds = BenchSettings(backend="sleep-double", iterations=9, warmup=1), bl.Thresholds(0.05, 0.15)
    sleep_double.latency.update(base=0.030, apt=0.030)
    reference = bl.make_baseline(benchmark([artifacts["base"], artifacts["apt"]], settings))
    same = benchmark([artifacts["base"], artifacts["apt"]], settings)
    bl.gate(bl.compare(reference, same, thresholds), thresholds)  # unchanged: passes
    sleep_double.latency["apt"] = 0.033
    slower = benchmark([artifacts["base"], artifacts["apt"]], settings)
    with pytest.raises(RegressionError) as e:
        bl.gate(bl.compare(reference, slower, thresholds), thresholds)
    assert "p50 of 'apt': baseline 30.000 ms -> now 33.000 ms (+10.0%, allowed +5.0%)" in str(e.value)
    assert "'base'" not in str(e.value) and "p99" not in str(e.value).split("Expected")[0]


def test_cli_gate_exit_codes_save_and_compare(artifacts, sleep_double, tmp_path, capsys):
    base_file, backend = tmp_path / "baseline.json", ["--backend", "sleep-double"]
    sleep_double.latency.update(base=0.030, apt=0.030)
    assert main(_bench(artifacts, *backend, "--save-baseline", str(base_file))) == 0
    saved = json.loads(base_file.read_text())
    assert saved["kind"] == "apt-deploy-bench-baseline" and set(saved["key"]) == {"machine", "versions"}
    assert saved["artifacts"]["apt"]["p50_ms"] == pytest.approx(30.0)
    assert main(_bench(artifacts, *backend, "--baseline", str(base_file))) == 0
    assert "latency gate: OK" in capsys.readouterr().out
    sleep_double.latency["apt"] = 0.033
    report = tmp_path / "r.json"
    rc = main(_bench(artifacts, *backend, "--baseline", str(base_file), "--max-regression", "5%",
                     "--max-regression-p99", "15%", "--json", str(report)))
    err = capsys.readouterr().err
    assert rc == 2 and "latency regression" in err and "p50 of 'apt'" in err and "30.000 ms -> now 33.000 ms" in err
    assert json.loads(report.read_text())["regression"]["regressed"] is True  # JSON written before the gate fails


def test_p99_has_its_own_threshold(artifacts, sleep_double, tmp_path, capsys):
    base_file, backend = tmp_path / "baseline.json", ["--backend", "sleep-double"]
    sleep_double.latency.update(base=0.030, apt=0.030)
    assert main(_bench(artifacts, *backend, "--save-baseline", str(base_file))) == 0
    sleep_double.latency["apt"] = lambda call: 0.060 if call % 4 == 0 else 0.030  # a tail, same median
    assert main(_bench(artifacts, *backend, "--baseline", str(base_file))) == 2
    err = capsys.readouterr().err
    assert "p99 of 'apt'" in err and "p50 of 'apt'" not in err
    assert main(_bench(artifacts, *backend, "--baseline", str(base_file), "--max-regression-p99", "150%")) == 0


def test_baseline_from_another_machine_warns_loudly(artifacts, sleep_double, tmp_path, caplog):
    base_file, backend = tmp_path / "baseline.json", ["--backend", "sleep-double"]
    sleep_double.latency.update(base=0.030, apt=0.030)
    assert main(_bench(artifacts, *backend, "--save-baseline", str(base_file))) == 0
    data = json.loads(base_file.read_text())
    data["key"]["machine"] = "Some Other CPU | 64 cores | gpu: none"
    base_file.write_text(json.dumps(data))
    report = tmp_path / "r.json"
    assert main(_bench(artifacts, *backend, "--baseline", str(base_file), "--json", str(report))) == 0
    assert "BASELINE FROM ANOTHER MACHINE KIND" in caplog.text and "Some Other CPU" in caplog.text
    assert any("ANOTHER MACHINE" in w for w in json.loads(report.read_text())["regression"]["warnings"])


def test_real_sleep_double_large_slowdown_is_caught(artifacts):
    """The same gate on the wall clock, with a 4x planted slowdown (a margin no scheduler jitter closes)."""
    def double(seconds):
        return lambda art, settings: CallableRunner(lambda feed: time.sleep(seconds) or {}, art.name)

    settings, thresholds = BenchSettings(iterations=5, warmup=1), bl.Thresholds()
    reference = bl.make_baseline(benchmark([artifacts["apt"]], settings, factory=double(0.005)))
    slower = benchmark([artifacts["apt"]], settings, factory=double(0.020))
    with pytest.raises(RegressionError, match="p50 of 'apt'"):
        bl.gate(bl.compare(reference, slower, thresholds), thresholds)


@pytest.mark.parametrize("argv,message", [
    (["bench", "/nonexistent/artifact"], "does not exist"),
    (["bench", "{apt}", "--max-regression", "five"], "percentage such as 5%"),
    (["bench", "{apt}", "--max-regression-p99", "0.1"], "percentage such as 5%"),
    (["bench", "{apt}", "--baseline", "/nonexistent/baseline.json"], "baseline file"),
    (["bench", "{apt}", "--iterations", "0"], "iterations >= 1"),
    (["bench", "{apt}", "--batch", "3"], "exported for (1..2)"),
    (["bench", "{apt}", "--backend", "nope"], "Unknown backend 'nope'"),
])
def test_bad_input_exits_2_with_a_clear_message(artifacts, capsys, argv, message):
    argv = [a.format(apt=artifacts["apt"]) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_not_a_baseline_is_refused(artifacts, tmp_path, capsys):
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"kind": "something-else"}))
    assert main(["bench", str(artifacts["apt"]), "--baseline", str(bad)]) == 2
    assert "apt-deploy-bench-baseline" in capsys.readouterr().err


def test_engines_bench_imports_no_torch():
    code = ("import sys; import engines.bench, engines.baseline, engines.machine, engines.flops, apt_deploy.cli.bench; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr


def test_flop_model_matches_the_spec_floor():
    from engines.flops import VitShape, block_floor, predicted_overhead

    s = VitShape()
    assert s.tokens(384) == 185 and block_floor(s, 384, 200) == pytest.approx(2 * 200 / (12 * 768 + 2 * 185))
    apt = predicted_overhead(s, 384, "apt", "folded", 200)
    assert 0.9 * block_floor(s, 384, 200) < apt < block_floor(s, 384, 200)  # embedding + head dilute it a little
    assert predicted_overhead(s, 384, "deep_prompt", "folded", 200) == pytest.approx(apt)
    assert predicted_overhead(s, 384, "deep_prompt", "training", 200) > 1.0  # the naive form more than doubles
    assert predicted_overhead(s, 384, "apt", "folded", 400) == pytest.approx(2 * apt)
