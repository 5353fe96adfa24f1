"""TensorRT: the APT plugin engine vs the ``--no-plugin`` engine (TensorRT's fusion of the function body).

    python -m apt_deploy.experiments.gpu_trt_ab --out benchmarks/results/gpu/trt_ab.json
    python -m apt_deploy.experiments.gpu_trt_ab --dry-run

Where tensorrt does not import, writes ``{"skipped": reason}`` and exits 0 (the GPU machines of this
project have no TensorRT). Otherwise: exports a ViLT-B APT artifact (random weights, the
configuration of :mod:`apt_deploy.experiments.bench_variants`, ``--prompts`` p) into a temporary
directory, builds the plugin engine in this process and the ``--no-plugin`` engine in a fresh one
(``apt-deploy build --no-plugin``), records each engine's plugin-layer count (engine inspector), and times
both with the ``trt`` runner, interleaved, after checking both against ONNX Runtime's outputs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("gpu_trt_ab")


def export(workdir: Path, prompts: int) -> Path:
    import copy

    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone
    from apt_deploy.experiments.bench_variants import RANK, VILT_B, randomize
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    model = copy.deepcopy(get_backbone("vilt").build_tiny(seed=0, **VILT_B))
    ad.apply_apt(model, ad.APTConfig(prompt_len=prompts, rank=RANK, method="apt"))
    randomize(model)
    return export_artifact(model, workdir / "vilt_b_apt", ExportSettings(batch_max=1), source={"variant": "gpu_trt_ab"})


def engines(artifact: Path) -> dict[str, Path]:
    from engines.trt_build import build_engine

    plugin = build_engine(artifact, "fp32")
    no_plugin = artifact / "model.fp32.noplugin.plan"
    proc = subprocess.run([sys.executable, "-m", "apt_deploy", "build", str(artifact), "--no-plugin", "--out", str(no_plugin)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"apt-deploy build --no-plugin failed:\n{proc.stderr[-3000:]}")
    return {"plugin": plugin, "no_plugin": no_plugin}


def time_engines(artifact: Path, plans: dict[str, Path], iterations: int) -> dict[str, Any]:
    from apt_deploy.manifest import read_manifest
    from apt_deploy.settings import tolerance
    from engines.bench import build_feed
    from engines.compare import assert_close
    from engines.runners import OnnxRuntimeRunner
    from engines.trt_runner import TensorRTRunner, read_metadata

    feed = build_feed(read_manifest(artifact), batch=1)
    with OnnxRuntimeRunner(artifact / "model.onnx") as ort:
        expected = ort.infer(feed)
    runners = {name: TensorRTRunner(path) for name, path in plans.items()}
    out: dict[str, Any] = {}
    for name, runner in runners.items():
        runner.activate()
        assert_close(expected, runner.infer(feed), tolerance("onnxruntime_vs_torch"), f"TensorRT {name} vs ONNX Runtime")
        out[name] = {"plugin_layers": read_metadata(plans[name]).get("plugin_layers"), "ms": []}
    for _ in range(iterations):
        for name, runner in runners.items():
            runner.synchronize()
            t0 = time.perf_counter()
            runner.infer(feed)
            runner.synchronize()
            out[name]["ms"].append((time.perf_counter() - t0) * 1e3)
    for name, runner in runners.items():
        runner.deactivate()
        ms = out[name].pop("ms")
        out[name].update({"p50_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "min_ms": min(ms)})
    out["plugin_speedup"] = out["no_plugin"]["p50_ms"] / out["plugin"]["p50_ms"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apt_deploy.features import has, why_missing
    from apt_deploy.manifest import now_iso

    report: dict[str, Any] = {"created": now_iso(), "what": "TensorRT plugin vs --no-plugin engine, ViLT-B APT fp32",
                              "settings": vars(args)}
    if not has("tensorrt") or not has("cuda"):
        return {**report, "skipped": why_missing("tensorrt") if not has("tensorrt") else why_missing("cuda")}
    if args.dry_run:
        return {**report, "plan": ["export ViLT-B APT", "build plugin engine", "build --no-plugin engine", "time both"]}
    with tempfile.TemporaryDirectory(prefix="apt-trt-ab-") as tmp:
        artifact = export(Path(tmp), args.prompts)
        report["results"] = time_engines(artifact, engines(artifact), args.iterations)
    return report


def main(argv: list[str] | None = None) -> int:
    from engines.report_cli import report_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m apt_deploy.experiments.gpu_trt_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", help="write the JSON report here (atomically)")
    parser.add_argument("--dry-run", action="store_true", help="say what would run; needs no GPU")
    args = parser.parse_args(argv)
    return report_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
