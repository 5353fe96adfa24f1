"""Does ``apt-deploy bench --compare`` hold on a noisy 2-core machine? A/A false alarms and a planted 5 % slowdown.

1. Export a moderate ViLT (random weights, validated against PyTorch by ``export_artifact``), a few ms per call.
2. Plant extra work in a copy of its graph (``plant_slowdown``): a chain of MatMuls on the pixel values whose
   result is multiplied by 0 and added to the logits, so the outputs are unchanged and the work is real. The
   chain length is calibrated so the copy costs about 5 % more (a long, tight compare measures it).
3. At the default gate settings (``GateSettings()``, the CLI's defaults), alternate ``--runs`` A/A compares (the
   base artifact against itself) and ``--runs`` compares base vs planted; count verdicts, record each run's
   ratio, interval, rounds, duration and the CPU other processes used meanwhile.

    flock /tmp/apt-bench.lock python scripts/gate_experiment.py --out benchmarks/results/gate_experiment.json
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from apt_deploy.fileio import write_json_atomic
from apt_deploy.manifest import MANIFEST_NAME, MODEL_NAME, now_iso, read_manifest, write_manifest
from apt_deploy.settings import BenchSettings, GateSettings
from engines.gate import compare_artifacts
from engines.machine import OtherLoadMeter, load_average

log = logging.getLogger("gate_experiment")
MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, vocab_size=30522,
             max_position_embeddings=40, image_size=224, patch_size=32, max_image_length=-1, num_labels=3129)
CHAIN_WIDTH = 16  # the pixel values are viewed as rows of this width for the planted MatMul chain
CHAIN_ROWS = 1176  # ... of which the first CHAIN_ROWS rows (an eighth of a 224 px image) go through the chain
PROBE_STEPS = 48  # a step costs ~0.45 %: the chain length can hit 5 % within a quarter of a point
CALIBRATION = GateSettings(target_half_width=0.003, budget_s=150.0, min_blocks=20)


def export_base(workdir: Path) -> Path:
    from apt_deploy.backbones import get_backbone
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    if (workdir / "base" / MANIFEST_NAME).is_file():
        return workdir / "base"  # reused: the same seeded model
    model = get_backbone("vilt").build_tiny(seed=0, **MODEL)
    return export_artifact(model, workdir / "base", ExportSettings(batch_max=2, overwrite=True),
                           source={"variant": "gate_experiment_base"})


def plant_slowdown(base: Path, out: Path, steps: int, seed: int = 0) -> Path:
    """A copy of ``base`` whose graph also runs ``steps`` MatMuls (the first CHAIN_ROWS rows of the pixel values
    viewed as rows of CHAIN_WIDTH, times random orthogonal matrices), reduced to a scalar, times 0, added to
    every output: same values, more work."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    model = onnx.load(str(out / MODEL_NAME), load_external_data=False)
    graph, rng = model.graph, np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([-1, CHAIN_WIDTH], np.int64), "planted_shape"),
             numpy_helper.from_array(np.array([0], np.int64), "planted_start"),
             numpy_helper.from_array(np.array([CHAIN_ROWS], np.int64), "planted_end"),
             numpy_helper.from_array(np.array(0.0, np.float32), "planted_zero")]
    nodes = [helper.make_node("Reshape", ["pixel_values", "planted_shape"], ["planted_rows"]),
             helper.make_node("Slice", ["planted_rows", "planted_start", "planted_end"], ["planted_0"])]
    for i in range(steps):
        q = np.linalg.qr(rng.standard_normal((CHAIN_WIDTH, CHAIN_WIDTH)))[0].astype(np.float32)
        inits.append(numpy_helper.from_array(q, f"planted_w{i}"))
        nodes.append(helper.make_node("MatMul", [f"planted_{i}", f"planted_w{i}"], [f"planted_{i + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"planted_{steps}"], ["planted_sum"], keepdims=0),
              helper.make_node("Mul", ["planted_sum", "planted_zero"], ["planted_nothing"])]
    for output in graph.output:
        inner = f"{output.name}_before_planted"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
        nodes.append(helper.make_node("Add", [inner, "planted_nothing"], [output.name]))
    graph.initializer.extend(inits)
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out / MODEL_NAME))
    manifest = read_manifest(out)
    manifest["source"] = {**(manifest.get("source") or {}), "variant": f"planted_{steps}_matmuls"}
    write_manifest(out, manifest)
    return out


def same_outputs(a: Path, b: Path) -> float:
    """Max abs difference of the two artifacts' outputs on one feed (the planted work must change nothing)."""
    import numpy as np

    from engines.bench import build_feed
    from engines.runners import make_runner

    feed = build_feed(read_manifest(a), 1)
    with make_runner("onnxruntime", a) as ra, make_runner("onnxruntime", b) as rb:
        oa, ob = ra.infer(feed), rb.infer(feed)
    return max(float(np.abs(oa[k] - ob[k]).max()) for k in oa)


def summary(report: dict[str, Any], wall_s: float) -> dict[str, Any]:
    c = report["compare"]
    keep = ("verdict", "ratio", "low", "high", "half_width", "min_detectable_regression", "rounds", "stopped_because")
    return {**{k: c[k] for k in keep}, "blocks": len(c["blocks"]), "block_ratios": [b["ratio"] for b in c["blocks"]],
            "timing_s": report["timing_s"], "wall_s": round(wall_s, 2),
            "base_p50_ms": report["artifacts"][0]["stats"]["p50_ms"],
            "other_processes_cores": report["load"]["other_processes_cores"], "load_after": report["load"]["after"]}


def run_compare(base: Path, candidate: Path, settings: BenchSettings, gate: GateSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = compare_artifacts(base, candidate, settings, gate)
    return {**summary(report, time.perf_counter() - t0), "_report": report}


def calibrate(base: Path, workdir: Path, settings: BenchSettings, target: float) -> tuple[int, dict[str, Any]]:
    """Chain length for a ``target`` slowdown, from a probe of PROBE_STEPS MatMuls timed against the base."""
    probe = plant_slowdown(base, workdir / "probe", PROBE_STEPS)
    measured = run_compare(base, probe, settings, CALIBRATION)
    per_step = max((measured["ratio"] - 1.0) / PROBE_STEPS, 1e-4)
    steps = max(1, round(target / per_step))
    log.info("probe: %d MatMuls cost %+.2f%% -> %d MatMuls for %+.1f%%", PROBE_STEPS, 100 * (measured["ratio"] - 1),
             steps, 100 * target)
    measured.pop("_report")
    return steps, {"probe_steps": PROBE_STEPS, "probe": measured, "per_step": per_step, "steps": steps}


def experiment(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings, gate = BenchSettings(seed=0), GateSettings()
    base = export_base(workdir)
    if args.steps:
        steps, calibration = args.steps, {"steps": args.steps, "given": True}
    else:
        steps, calibration = calibrate(base, workdir, settings, args.slowdown)
    planted = plant_slowdown(base, workdir / "planted", steps)
    calibration["outputs_max_abs_diff"] = same_outputs(base, planted)
    check = run_compare(base, planted, settings, CALIBRATION)
    calibration["planted_measured"] = {k: v for k, v in check.items() if k != "_report"}
    log.info("planted slowdown measured at %+.2f%%", 100 * (check["ratio"] - 1))
    runs: dict[str, list[dict[str, Any]]] = {"aa": [], "planted": []}
    example = None
    with OtherLoadMeter() as other:
        for i in range(args.runs):
            for kind, candidate in (("aa", base), ("planted", planted)):
                if kind not in args.kinds:
                    continue
                r = run_compare(base, candidate, replace(settings, seed=i), gate)
                example = example or r["_report"]
                r.pop("_report")
                runs[kind].append(r)
                log.info("run %d %s: %s ratio %.4f [%.4f, %.4f] %d blocks %d rounds %.1f s (other cores %.2f)",
                         i + 1, kind, r["verdict"], r["ratio"], r["low"], r["high"], r["blocks"], r["rounds"],
                         r["wall_s"], r["other_processes_cores"])
    for rows in runs.values():
        for r in rows:
            r.pop("_report", None)
    return {"kind": "apt-deploy-gate-experiment", "created": now_iso(), "command": sys.argv, "model": MODEL,
            "gate": asdict(gate), "settings": asdict(settings), "calibration": calibration, "runs": runs,
            "counts": {k: _counts(v) for k, v in runs.items()}, "durations": _durations(runs),
            "load": {"other_processes_cores_during_runs": round(other.other_cores, 3), "after": load_average()},
            "machine": example["machine"] if example else None, "versions": example["versions"] if example else None}


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["verdict"]] = out.get(r["verdict"], 0) + 1
    return out


def _durations(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    import numpy as np

    wall = np.array([r["wall_s"] for rows in runs.values() for r in rows])
    rounds = np.array([r["rounds"] for rows in runs.values() for r in rows])
    blocks = np.array([r["blocks"] for rows in runs.values() for r in rows])
    return {"wall_s_median": float(np.median(wall)), "wall_s_max": float(wall.max()),
            "rounds_median": float(np.median(rounds)), "rounds_max": int(rounds.max()),
            "blocks_median": float(np.median(blocks)), "blocks_max": int(blocks.max())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/apt_gate_work", help="where the ONNX artifacts go (never commit them)")
    p.add_argument("--out", default="benchmarks/results/gate_experiment.json")
    p.add_argument("--runs", type=int, default=20, help="A/A runs and planted runs, each (default 20)")
    p.add_argument("--slowdown", type=float, default=0.05, help="the planted slowdown to calibrate for (default 0.05)")
    p.add_argument("--steps", type=int, default=None, help="plant this many MatMuls instead of calibrating (still "
                   "measured by a long compare)")
    p.add_argument("--kinds", default="aa,planted", help="which runs: aa, planted or both (default aa,planted)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "torch", "transformers", "onnx_ir", "engines", "apt_deploy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    results = experiment(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, results)
    log.info("A/A: %s; planted: %s; a default run takes %.1f s (median), %.1f s at most -> %s", results["counts"]["aa"],
             results["counts"]["planted"], results["durations"]["wall_s_median"], results["durations"]["wall_s_max"],
             args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
