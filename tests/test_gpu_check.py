"""scripts/gpu_check.sh and its benchmark modules, as far as a CPU machine can check them: shell syntax, the
refusal without a GPU, and each module's --help / --dry-run path (argument and plan validation, no CUDA).
The GPU run itself is documented in docs/tensorrt.md; nothing here claims it ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apt_deploy.features import has

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/gpu_check.sh", "scripts/gpu_wheelhouse.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(has("cuda"), reason="this machine has a GPU")
def test_gpu_check_refuses_to_run_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), str(tmp_path)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2 and "no NVIDIA GPU" in proc.stderr


def test_wheel_pins_are_exact_versions():
    pins = [line.strip() for line in (ROOT / "scripts/gpu_wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins and all("==" in pin for pin in pins)


def test_kernel_bench_dry_run_plans_every_case(capsys):
    from engines.kernels import kernel_bench

    assert kernel_bench.main(["--dry-run", "--cases", "1024x64", "300x200", "--dtypes", "float16"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["rows"], c["p"], c["target_applies"]) for c in report["cases"]] == [(1024, 64, True), (300, 200, False)]
    for case in report["cases"]:
        assert case["macs"] == 2 * case["rows"] * case["p"] * 768 <= case["kernel_macs"]


@pytest.mark.parametrize("argv", [["--cases", "1024"], ["--cases", "8x513"], ["--dtypes", "int8"], ["--d", "0"]])
def test_kernel_bench_rejects_bad_arguments(argv, capsys):
    from engines.kernels import kernel_bench

    assert kernel_bench.main(["--dry-run", *argv]) == 2
    assert "Expected" in capsys.readouterr().err


def test_vilt_latency_dry_run_reports_the_mac_floor(capsys):
    from apt_deploy.experiments import gpu_latency

    assert gpu_latency.main(["--dry-run", "--prompts", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["floor"]["tokens"] == 40 + 12 * 12 + 1
    assert report["floor"]["overhead_floor"] == pytest.approx(report["floor"]["apt_extra_macs"] / report["floor"]["base_macs"])
    assert 0 < report["floor"]["overhead_floor"] < 0.02  # p = 50 at 384 px: ~1 % more multiply-adds
    assert gpu_latency.main(["--dry-run", "--image", "300"]) == 2


def test_vilt_latency_verdicts():
    from apt_deploy.experiments.gpu_latency import verdict

    timings = {"base": {"p50_ms": 1.0}, "apt": {"p50_ms": 1.05}, "apt_unfused": {"p50_ms": 1.2}}
    v = verdict(timings, overhead_floor=0.04)
    assert v["latency_within_1.3x_floor"] and v["overhead_within_1.3x_floor"]
    v = verdict({**timings, "apt": {"p50_ms": 1.06}}, overhead_floor=0.04)
    assert v["latency_within_1.3x_floor"] and not v["overhead_within_1.3x_floor"]


def test_trt_ab_without_tensorrt_says_skipped(capsys):
    from apt_deploy.experiments import gpu_trt_ab

    if has("tensorrt") and has("cuda"):
        pytest.skip("tensorrt and a GPU are here")
    assert gpu_trt_ab.main(["--dry-run"]) == 0
    assert "skipped" in json.loads(capsys.readouterr().out)
