"""``apt-deploy bench``, its PyTorch peers, ``--compare`` and the baseline gate.

Speed is never asserted. The gates' own tests use a sleep-injecting test double (CallableRunner) on a
fake clock with seeded log-normal noise, so a planted 10 % slowdown is exactly that and every run is
deterministic; the one real-timing test (A/A) asserts only an interval, at a loose limit.
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
import engines.gate
from apt_deploy.cli import main
from apt_deploy.errors import ConfigError, RegressionError
from dataclasses import replace

from apt_deploy.settings import BenchSettings, GateSettings
from engines.bench import benchmark, build_feed, load_artifacts
from engines.gate import compare_artifacts, gate_compare
from engines.runners import BACKENDS, CallableRunner
from engines.stats import blocked_ratio, paired_ratio, t_quantile
from engines.timing import round_orders, time_interleaved


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
    clock, latency, calls, session_speed = FakeClock(), {}, {}, {}

    def factory(artifact_dir, **_):
        name = Path(artifact_dir).resolve().name
        speed = session_speed[name]() if name in session_speed else 1.0  # this session's own speed, as a whole

        def infer(feed):
            calls[name] = calls.get(name, 0) + 1
            value = latency[name]
            clock.sleep(speed * (value(calls[name]) if callable(value) else value))
            return {"logits": np.zeros((1, 1), np.float32)}

        return CallableRunner(infer, f"sleep[{name}]")

    monkeypatch.setitem(BACKENDS, "sleep-double", factory)
    fake_time = SimpleNamespace(perf_counter=clock, monotonic=clock)
    monkeypatch.setattr(engines.bench, "time", fake_time)
    monkeypatch.setattr(engines.gate, "time", fake_time)
    return SimpleNamespace(clock=clock, latency=latency, session_speed=session_speed)


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
    assert base["ratio_p50"] == 1.0 and apt["ratio_p50"] > 0 and "random order" in report["order"]
    assert report["settings"]["shuffle"] is True and report["settings"]["spinning"] is False
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


def noisy(ms: float, seed: int, sigma: float = 0.05):
    """A latency (s) per call index: ``ms`` times seeded log-normal noise (deterministic, like a real machine)."""
    rng = np.random.default_rng(seed)
    draws = ms * 1e-3 * np.exp(rng.normal(0.0, sigma, size=100_000))
    return lambda call: float(draws[call])


GATE = GateSettings(budget_s=1e6, min_iterations=20, max_iterations=2000, max_blocks=200)


def test_compare_flags_a_planted_10pct_slowdown_and_passes_an_unchanged_one(artifacts, sleep_double):
    """A/B on the fake clock with 5 % log-normal noise: identical -> no regression; +10 % -> regression."""
    settings = BenchSettings(backend="sleep-double", warmup=1)
    sleep_double.latency.update(base=noisy(30, 1), apt=noisy(30, 2))
    same = compare_artifacts(artifacts["base"], artifacts["apt"], settings, GATE)["compare"]
    assert same["verdict"] == "no regression" and same["low"] < 1.0 < same["high"]
    assert same["stopped_because"] == "precision reached" and same["half_width"] < 1.1 * GATE.target_half_width  # final CI: more resamples
    assert 0.02 < same["min_detectable_regression"] < 0.04 and same["rounds"] < GATE.max_iterations
    sleep_double.latency.update(base=noisy(30, 3), apt=noisy(33, 4))
    report = compare_artifacts(artifacts["base"], artifacts["apt"], settings, GATE)
    slower = report["compare"]
    assert slower["verdict"] == "regression" and slower["low"] > 1.02 and slower["ratio"] == pytest.approx(1.10, abs=0.02)
    with pytest.raises(RegressionError, match=r"p50 of 'apt' is 1\.\d+x that of 'base'.*Expected: a CI reaching at most 1\.0200"):
        gate_compare(report)


def test_compare_stops_on_its_time_budget_and_says_inconclusive(artifacts, sleep_double):
    """30 % noise cannot give a +-1 % interval within 2 s of (fake) timing: inconclusive, budget named; the
    minimum number of blocks is timed whatever the budget."""
    settings = BenchSettings(backend="sleep-double", warmup=1)
    sleep_double.latency.update(base=noisy(30, 5, 0.3), apt=noisy(31, 6, 0.3))
    c = compare_artifacts(artifacts["base"], artifacts["apt"], settings, replace(GATE, budget_s=2.0))["compare"]
    assert c["stopped_because"] == "time budget spent" and len(c["blocks"]) == GATE.min_blocks
    assert c["rounds"] == sum(b["rounds"] for b in c["blocks"]) and all(b["rounds"] >= GATE.block_min_rounds for b in c["blocks"])
    assert c["verdict"] == "inconclusive" and c["min_detectable_regression"] > 0.05


def test_planted_order_bias_is_not_reproduced_once_the_order_is_shuffled():
    """The issue-14 mechanism on a fake clock: within a round, a call right after runner A's is 20 % slower (A's
    threads still spin). B and C are identical; the old rotation (A B C, B C A, C A B) puts B right after A in
    two rounds of three and C never, so B looks 20 % slower than C; shuffled per round, the interval of the
    B/C ratio contains 1."""
    clock, last = FakeClock(), {"name": None}

    def runner(name: str, ms: float, seed: int) -> CallableRunner:
        latency = noisy(ms, seed)
        calls = [0]

        def infer(feed):
            calls[0] += 1
            clock.sleep(latency(calls[0]) * (1.2 if last["name"] == "A" else 1.0))
            last["name"] = name
            return {}

        return CallableRunner(infer, name)

    def ratio(shuffle: bool):
        runners = [runner("A", 30, 7), runner("B", 30, 8), runner("C", 30, 9)]
        times = time_interleaved(runners, [{}] * 3, 300, warmup=1, clock=clock, shuffle=shuffle, seed=0,
                                 on_round=lambda r: last.update(name=None))  # rounds are apart: threads idle
        return paired_ratio(times[2], times[1])  # candidate B over base C

    rotated, shuffled = ratio(False), ratio(True)
    assert rotated.low > 1.1  # the planted bias, reproduced by the fixed order
    assert shuffled.low < 1.0 < shuffled.high < 1.1  # equal within noise, and the planted bias is excluded


def test_a_whole_session_being_slower_widens_the_interval_instead_of_deciding_it(artifacts, sleep_double):
    """Identical artifacts, but each session has its own speed as a whole (seen here: 2 to 8 %). One pair of
    sessions turns that into a confident, wrong ratio; blocks of fresh sessions make the sessions the
    replicates: the interval contains 1 and the verdict is never a regression."""
    rng = np.random.default_rng(0)

    def speeds(first: float):  # a session speed per creation: ``first``, then log-normal with 3 % spread
        draws = iter([first] + list(np.exp(rng.normal(0.0, 0.03, 1000))))
        return lambda: float(next(draws))

    sleep_double.session_speed.update(base=speeds(1.0), apt=speeds(1.05))
    sleep_double.latency.update(base=noisy(30, 30, 0.02), apt=noisy(30, 31, 0.02))
    settings = BenchSettings(backend="sleep-double", warmup=1)
    one = replace(GATE, min_blocks=2, max_blocks=2)  # one pair of sessions, twice
    pair = compare_artifacts(artifacts["base"], artifacts["apt"], settings, one)["compare"]
    assert pair["blocks"][0]["ratio"] == pytest.approx(1.05, abs=0.01)  # one pair of sessions: "5 % slower"
    c = compare_artifacts(artifacts["base"], artifacts["apt"], settings, replace(GATE, target_half_width=0.015))["compare"]
    assert c["low"] < 1.0 < c["high"] and c["verdict"] != "regression" and len(c["blocks"]) > 8
    assert np.std([b["ratio"] for b in c["blocks"]]) > 0.02  # the session spread is in the blocks, not hidden


def test_the_session_created_second_being_faster_does_not_bias_the_ratio(artifacts, sleep_double):
    """Identical artifacts; in every block the session created second runs 3 % faster (the effect seen here).
    Creation order alternates in mirrored pairs of blocks, so the A/A ratio stays 1 and the report names the
    effect; a fixed order would have reported a 3 % difference."""
    created = [0]

    def second_is_faster():
        created[0] += 1
        return 1.0 if created[0] % 2 else 0.97

    sleep_double.session_speed.update(base=second_is_faster, apt=second_is_faster)
    sleep_double.latency.update(base=noisy(30, 40, 0.02), apt=noisy(30, 41, 0.02))
    c = compare_artifacts(artifacts["base"], artifacts["apt"], BenchSettings(backend="sleep-double", warmup=1),
                          GATE)["compare"]
    firsts = [b["created_first"] for b in c["blocks"]]
    assert len(firsts) % 2 == 0 and firsts.count("base") == firsts.count("candidate")
    assert c["ratio"] == pytest.approx(1.0, abs=0.003) and c["low"] < 1.0 < c["high"]
    assert c["creation_order_effect"] == pytest.approx(0.97, abs=0.005)
    by_first = {side: np.mean([b["ratio"] for b in c["blocks"] if b["created_first"] == side]) for side in ("base", "candidate")}
    assert by_first["base"] == pytest.approx(0.97, abs=0.01) and by_first["candidate"] == pytest.approx(1.03, abs=0.01)


def test_blocked_ratio_is_a_student_t_interval_on_log_ratios():
    stats = pytest.importorskip("scipy.stats")

    ratios = [1.01, 0.98, 1.03, 1.00, 0.99, 1.02]
    est = blocked_ratio(ratios, 0.95)
    logs = np.log(ratios)
    low, high = stats.t.interval(0.95, len(logs) - 1, loc=logs.mean(), scale=stats.sem(logs))
    assert est.ratio == pytest.approx(np.exp(logs.mean())) and est.low == pytest.approx(np.exp(low), rel=1e-4)
    assert est.high == pytest.approx(np.exp(high), rel=1e-4)
    for df in (1, 2, 3, 5, 30):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=2e-3)
    with pytest.raises(ConfigError, match="block ratios"):
        blocked_ratio([1.0])


def test_round_orders_are_seeded_permutations():
    orders = round_orders(3, 60, seed=1)
    assert orders == round_orders(3, 60, seed=1) != round_orders(3, 60, seed=2)
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert {o[0] for o in orders} == {0, 1, 2} and round_orders(3, 3, shuffle=False) == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]


def test_timing_sessions_do_not_spin(artifacts):
    """The bench's ONNX Runtime sessions are built with intra/inter-op spinning off (ORT's default is on)."""
    import onnxruntime as ort

    from engines.bench import Artifact, default_factory
    from engines.runners import SPIN_KEYS, session_options

    off, on = session_options(ort.SessionOptions(), 2, False), session_options(ort.SessionOptions(), 2, True)
    assert [off.get_session_config_entry(k) for k in SPIN_KEYS] == ["0", "0"]
    assert [on.get_session_config_entry(k) for k in SPIN_KEYS] == ["1", "1"] and off.intra_op_num_threads == 2
    art = Artifact("apt", artifacts["apt"], {})
    assert default_factory(art, BenchSettings()).spinning is False
    assert default_factory(art, BenchSettings(spinning=True)).spinning is True


def test_identical_real_artifacts_compare_equal_within_noise(artifacts, tmp_path, capsys):
    """A/A on a real tiny artifact: the same ORT graph first or second per round is not a regression even at a
    loose 20 % limit (the interval, not a timing threshold; a 2 s budget)."""
    out = tmp_path / "aa.json"
    rc = main(["bench", "--compare", str(artifacts["apt"]), str(artifacts["apt"]), "--threads", "1", "--budget", "2",
               "--block-seconds", "0.2", "--min-blocks", "4", "--max-regression", "20%", "--json", str(out)])
    stdout = capsys.readouterr().out
    c = json.loads(out.read_text())["compare"]
    assert rc == 0 and c["verdict"] != "regression" and c["base"] == c["candidate"] == "apt"
    assert len(c["blocks"]) >= 4 and c["sessions_per_block"] == 1
    assert "paired rounds" in stdout and "smallest regression this run could detect" in stdout
    assert json.loads(out.read_text())["settings"]["spinning"] is False


def test_cli_compare_exit_code(artifacts, sleep_double, tmp_path, capsys):
    sleep_double.latency.update(base=noisy(30, 10), apt=noisy(33, 11))
    out = tmp_path / "c.json"
    rc = main(["bench", "--compare", str(artifacts["base"]), str(artifacts["apt"]), "--backend", "sleep-double",
               "--json", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "latency regression" in err and "--max-regression 2.0%" in err
    assert json.loads(out.read_text())["compare"]["verdict"] == "regression"  # written before the gate fails
    assert main(["bench", "--compare", str(artifacts["base"]), str(artifacts["apt"]), "--backend", "sleep-double",
                 "--max-regression", "15%"]) == 0


def _bench_noisy(artifacts, *extra: str) -> list[str]:
    return _bench(artifacts, "--backend", "sleep-double", "--iterations", "200", "--budget", "10", *extra)


def test_baseline_gate_flags_a_planted_10pct_slowdown(artifacts, sleep_double, tmp_path, capsys):
    base_file, report = tmp_path / "baseline.json", tmp_path / "r.json"
    sleep_double.latency.update(base=noisy(30, 12), apt=noisy(30, 13))
    assert main(_bench_noisy(artifacts, "--save-baseline", str(base_file))) == 0
    saved = json.loads(base_file.read_text())
    assert saved["kind"] == "apt-deploy-bench-baseline" and saved["schema_version"] == 2
    assert len(saved["artifacts"]["apt"]["times_ms"]) == 200 and set(saved["key"]) == {"machine", "versions"}
    sleep_double.latency.update(base=noisy(30, 14), apt=noisy(30, 15))
    assert main(_bench_noisy(artifacts, "--baseline", str(base_file))) == 0
    out = capsys.readouterr().out
    assert "latency gate: OK" in out and "cross-run comparison" in out
    sleep_double.latency.update(base=noisy(30, 16), apt=noisy(33, 17))
    rc = main(_bench_noisy(artifacts, "--baseline", str(base_file), "--json", str(report)))
    err = capsys.readouterr().err
    assert rc == 2 and "REGRESSION" in err and "p50 of 'apt'" in err and "'base'" not in err.split("Expected")[0]
    regression = json.loads(report.read_text())["regression"]
    assert regression["regressed"] is True and "drift" in regression["note"]


def test_p99_has_its_own_threshold(artifacts, sleep_double, tmp_path, capsys):
    base_file = tmp_path / "baseline.json"
    sleep_double.latency.update(base=noisy(30, 18), apt=noisy(30, 19))
    assert main(_bench_noisy(artifacts, "--save-baseline", str(base_file))) == 0
    steady = noisy(30, 20)
    sleep_double.latency["apt"] = lambda call: 3 * steady(call) if call % 10 == 0 else steady(call)  # a tail
    assert main(_bench_noisy(artifacts, "--baseline", str(base_file))) == 2
    err = capsys.readouterr().err
    assert "p99 of 'apt'" in err and "p50 of 'apt'" not in err
    assert main(_bench_noisy(artifacts, "--baseline", str(base_file), "--max-regression-p99", "500%")) == 0


def test_baseline_from_another_machine_warns_loudly(artifacts, sleep_double, tmp_path, caplog):
    base_file, report = tmp_path / "baseline.json", tmp_path / "r.json"
    sleep_double.latency.update(base=noisy(30, 21), apt=noisy(30, 22))
    assert main(_bench_noisy(artifacts, "--save-baseline", str(base_file))) == 0
    data = json.loads(base_file.read_text())
    data["key"]["machine"] = "Some Other CPU | 64 cores | gpu: none"
    base_file.write_text(json.dumps(data))
    assert main(_bench_noisy(artifacts, "--baseline", str(base_file), "--json", str(report))) == 0
    assert "BASELINE FROM ANOTHER MACHINE KIND" in caplog.text and "Some Other CPU" in caplog.text
    assert any("ANOTHER MACHINE" in w for w in json.loads(report.read_text())["regression"]["warnings"])


def test_a_schema_1_baseline_is_refused_with_the_fix(artifacts, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"kind": "apt-deploy-bench-baseline", "schema_version": 1}))
    assert main(["bench", str(artifacts["apt"]), "--baseline", str(old)]) == 2
    assert "re-record it" in capsys.readouterr().err


def test_torch_eager_peer_runs_the_artifacts_model_in_the_same_rounds(apt_artifact, capsys, tmp_path):
    """--peers torch-eager: the model rebuilt from the manifest's sources, timed as an extra row, same threads;
    its outputs are the ONNX Runtime ones."""
    import torch

    from apt_deploy.pipeline import load_reference_module
    from apt_deploy.settings import tolerance
    from engines.compare import assert_close
    from engines.runners import make_runner
    from engines.torch_runner import TorchRunner

    out = tmp_path / "p.json"
    assert main(["bench", str(apt_artifact), "--peers", "torch-eager", "--iterations", "5", "--warmup", "1",
                 "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["artifacts"]
    assert [r["name"] for r in rows] == ["artifact_apt", "artifact_apt@torch-eager"] and torch.get_num_threads() == 1
    assert rows[1]["runner"] == "torch-eager" and rows[1]["size"] is None and len(rows[1]["times_ms"]) == 5
    assert "artifact_apt@torch-eager" in capsys.readouterr().out
    art = load_artifacts([apt_artifact])[0]
    feed = build_feed(art.manifest, 1)
    peer = TorchRunner(lambda: load_reference_module(art.manifest), [o["name"] for o in art.manifest["outputs"]])
    with peer, make_runner("onnxruntime", apt_artifact) as ort_runner:
        assert_close(peer.infer(feed), ort_runner.infer(feed), tolerance("onnxruntime_vs_torch"), "peer vs ORT")


def test_peers_need_a_model_loader_and_a_known_name(artifacts, capsys):
    with pytest.raises(ConfigError, match="no way to load the PyTorch models"):
        benchmark([artifacts["apt"]], BenchSettings(peers=("torch-eager",)))
    assert main(["bench", str(artifacts["apt"]), "--peers", "torch-jit", "--model", "/x"]) == 2
    assert "Unknown peer 'torch-jit'" in capsys.readouterr().err


@pytest.mark.slow
def test_torch_compile_peer(apt_artifact, tmp_path):
    out = tmp_path / "p.json"
    assert main(["bench", str(apt_artifact), "--peers", "torch-compile", "--iterations", "3", "--warmup", "1",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["artifacts"][1]["name"] == "artifact_apt@torch-compile"


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


def test_planted_slowdown_adds_work_but_changes_no_output(artifacts, tmp_path):
    """The gate experiment's graph edit (apt_deploy.experiments.gate_experiment): more nodes, same outputs."""
    import onnx

    from apt_deploy.experiments.gate_experiment import plant_slowdown, same_outputs

    planted = plant_slowdown(artifacts["base"], tmp_path / "planted", steps=3)
    before, after = (len(onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node)
                     for d in (artifacts["base"], planted))
    assert after == before + 3 + 5 and same_outputs(artifacts["base"], planted) == 0.0
