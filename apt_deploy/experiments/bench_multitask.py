"""One server, many tasks: latency and memory of a T-task artifact vs single-task artifacts (docs/serving.md).

Builds a ViLT-B-shaped model (random weights: latency does not depend on values, as bench_variants), T APT
tasks at p = 200, r = 4 (different random prompts, low-rank factors and scales), exports task 0 alone and all
T together (both validated on ONNX Runtime vs PyTorch at export), checks that the multi-task artifact's task-0
rows equal the single-task artifact's, then times, interleaved in one process (engines.bench.benchmark):

* ``single_task``: the single-task artifact (op version 1, K/V constants), B rows;
* ``multi_task``: the T-task artifact, B rows all of one task;
* ``multi_task@mixed``: the T-task artifact, B rows of mixed tasks (row b is task b mod T).

Memory: on-disk bytes of one T-task artifact vs T single-task artifacts, and the resident memory of loaded
ONNX Runtime sessions (each measured in a fresh process: one T-task session + its bank, one single-task
session, T single-task sessions). JSON to ``benchmarks/results/multitask.json``.

    python scripts/bench_multitask.py                 # full: ViLT-B, 384 px, p = 200, T = 8, batch 8
    python scripts/bench_multitask.py --smoke --out /tmp/multitask_smoke.json   # pipeline check, ~1-2 min
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from apt_deploy.experiments.bench_variants import RANK, SMOKE, VILT_B
from apt_deploy.fileio import write_json_atomic
from apt_deploy.manifest import now_iso
from engines.runners import Runner

log = logging.getLogger("bench_multitask")
SINGLE, MULTI, MIXED = "single_task", "multi_task", "multi_task@mixed"
TARGET_RATIO = 1.1


class TaskRowsRunner(Runner):
    """A runner of a multi-task artifact that adds ``task`` (fixed rows) and the bank arrays to every feed."""

    def __init__(self, inner: Runner, task_feed: dict[str, np.ndarray], name: str) -> None:
        self.inner, self.task_feed, self.name = inner, task_feed, name

    def activate(self) -> None:
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.infer({**feed, **self.task_feed})


def task_rows(batch: int, tasks: int, mixed: bool) -> list[int]:
    """Row b's task: b mod T (mixed), or task T - 1 for every row (one task, not the single artifact's task 0)."""
    return [b % tasks for b in range(batch)] if mixed else [tasks - 1] * batch


def randomize_task(model: Any, seed: int) -> None:
    """Task ``seed``'s trained APT tensors: prompts, low-rank factors and scale all different per task."""
    import torch

    from apt_deploy.checkpoint import trained_tensors

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained_tensors(model).items():
            if name.endswith(".log_scale"):
                p.fill_(0.1 + 0.02 * seed)
            elif name.rsplit(".", 1)[-1] in ("prompt", "up", "down"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def export_artifacts(config: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Task 0 alone, then all T tasks in one artifact; returns export times."""
    import apt_deploy as ad
    from apt_deploy.methods.multitask import task_bank
    from apt_deploy.settings import ExportSettings
    from exporters.multitask import export_banked_artifact
    from exporters.onnx_export import export_artifact

    model = ad.get_backbone("vilt").build_tiny(seed=0, **config)
    ad.apply_apt(model, ad.APTConfig(prompt_len=args.prompt_len, rank=RANK))
    settings = ExportSettings(batch_max=max(args.batch, 2), image_size=args.image, overwrite=True)
    rows, times = [], {}
    for t in range(args.tasks):
        randomize_task(model, t)
        rows.append({k: v.numpy() for k, v in task_bank(model).items()})
        if t == 0:
            t0 = time.perf_counter()
            export_artifact(model, workdir / SINGLE, settings, source={"variant": "task 0 alone"})
            times[SINGLE] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    export_banked_artifact(model, [f"task{t}" for t in range(args.tasks)], rows, workdir / MULTI, settings)
    times[MULTI] = round(time.perf_counter() - t0, 1)
    return times


def rows_parity(workdir: Path, batch: int) -> dict[str, Any]:
    """The T-task artifact's rows of task 0 vs the single-task artifact on the same inputs (ONNX Runtime)."""
    from apt_deploy.manifest import read_manifest
    from apt_deploy.serving.tasks import TaskFeed
    from apt_deploy.settings import tolerance
    from engines.bench import build_feed
    from engines.runners import OnnxRuntimeRunner

    manifest, tol = read_manifest(workdir / MULTI), tolerance("multitask_vs_single_task")
    feed = {k: v for k, v in build_feed(manifest, batch, seed=3).items() if k != "task"}
    tasks = task_rows(batch, len(manifest["tasks"]["names"]), mixed=True)
    with OnnxRuntimeRunner(workdir / MULTI / "model.onnx") as multi, OnnxRuntimeRunner(workdir / SINGLE / "model.onnx") as one:
        got = multi.infer({**feed, **TaskFeed(workdir / MULTI, manifest)(tasks)})
        want = one.infer(feed)
    rows = [b for b, t in enumerate(tasks) if t == 0]
    diff = max(float(np.abs(got[k][rows] - want[k][rows]).max()) for k in want)
    if diff > tol.atol:
        from apt_deploy.errors import ParityError

        raise ParityError(f"multi-task rows of task 0 differ from the single-task artifact by {diff:.3g}",
                          f"<= {tol.atol:g} ({tol.reason})", "see docs/serving.md")
    return {"rows": rows, "max_abs": diff, "tolerance": tol.to_json()}


def time_paths(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from apt_deploy.settings import BenchSettings
    from apt_deploy.serving.tasks import TaskFeed
    from engines.bench import Target, benchmark, default_factory, load_artifacts

    settings = BenchSettings(batch=args.batch, iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    multi = load_artifacts([workdir / MULTI])[0]
    feeds = TaskFeed(multi.path, multi.manifest)

    def factory(art: Any, s: BenchSettings, mixed: bool = False, name: str = MULTI) -> Runner:
        runner = default_factory(art, s)
        if "tasks" not in art.manifest:
            return runner
        return TaskRowsRunner(runner, feeds([f"task{t}" for t in task_rows(s.batch, args.tasks, mixed)]), name)

    mixed = Target(MIXED, multi, partial(factory, multi, settings, True, MIXED), settings.backend)
    return benchmark([workdir / SINGLE, workdir / MULTI], settings, factory=factory, extra=[mixed])


def session_rss_mb(artifacts: list[str], batch: int, threads: int) -> float:
    """Resident memory added by loading each artifact's session (+ bank) and running it once (a fresh process)."""
    import psutil

    from apt_deploy.manifest import read_manifest
    from apt_deploy.serving.tasks import TaskFeed
    from engines.bench import build_feed
    from engines.runners import OnnxRuntimeRunner

    before, keep = psutil.Process().memory_info().rss, []
    for path in artifacts:
        manifest = read_manifest(path)
        feed = {k: v for k, v in build_feed(manifest, batch).items() if k != "task"}
        tasks = TaskFeed(path, manifest)
        runner = OnnxRuntimeRunner(Path(path) / "model.onnx", threads=threads)
        runner.infer({**feed, **(tasks(["task0"] * batch) if tasks.section else {})})
        keep.append((runner, tasks))
    return round((psutil.Process().memory_info().rss - before) / 2**20, 1)


def memory(workdir: Path, tasks: int, batch: int, threads: int) -> dict[str, Any]:
    """Disk and resident memory: one T-task artifact vs T single-task artifacts (T sessions of task 0's file:
    single-task artifacts of one shape are the same size whatever their prompts)."""
    import multiprocessing

    def disk(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "manifest.json")

    single, multi = str(workdir / SINGLE), str(workdir / MULTI)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        rss = {name: pool.apply(session_rss_mb, (paths, batch, threads))
               for name, paths in ((MULTI, [multi]), (SINGLE, [single]), (f"{tasks} x {SINGLE}", [single] * tasks))}
    return {"disk_bytes": {MULTI: disk(workdir / MULTI), SINGLE: disk(workdir / SINGLE),
                           f"{tasks} x {SINGLE}": tasks * disk(workdir / SINGLE)},
            "bank_bytes": sum(p.stat().st_size for p in (workdir / MULTI).glob("prompt_bank.*")),
            "session_rss_mb": rss,
            "method": "RSS of a fresh process after loading the sessions (and bank) and one run each, minus before"}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    p50 = {a["name"]: a["stats"]["p50_ms"] for a in report["artifacts"]}
    ratio = {MULTI: p50[MULTI] / p50[SINGLE], MIXED: p50[MIXED] / p50[SINGLE]}
    return {"p50_ms": p50, "ratio_vs_single": {k: round(v, 4) for k, v in ratio.items()},
            "target_mixed_over_single": TARGET_RATIO, "target_met": ratio[MIXED] <= TARGET_RATIO}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/apt_multitask_work", help="where the artifacts go (never commit them)")
    p.add_argument("--out", default="benchmarks/results/multitask.json")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--image", type=int, default=384)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="reuse artifacts already in --workdir")
    p.add_argument("--keep", action="store_true", help="keep --workdir afterwards")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (numbers meaningless): checks the pipeline in minutes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from apt_deploy.cli import setup_logging

    args = parse_args(argv)
    setup_logging(0, False)
    if args.smoke:
        args.image, args.prompt_len, args.iterations, args.warmup = 64, 16, 5, 1
    config = {**VILT_B, **(SMOKE if args.smoke else {})}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reused = args.reuse and all((workdir / n / "manifest.json").is_file() for n in (SINGLE, MULTI))
    export_s = {} if reused else export_artifacts(config, args, workdir)
    result = {"kind": "apt-deploy/multitask", "created": now_iso(), "command": " ".join(["python scripts/bench_multitask.py",
              *(argv if argv is not None else sys.argv[1:])]), "smoke": args.smoke,
              "shape": {"model": {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size")},
                        "image": args.image, "prompt_len": args.prompt_len, "rank": RANK, "tasks": args.tasks,
                        "batch": args.batch},
              "export_s": export_s, "parity": rows_parity(workdir, args.batch)}
    report = time_paths(workdir, args)
    result.update(summary(report), memory=memory(workdir, args.tasks, args.batch, args.threads), bench=report,
                  total_s=round(time.perf_counter() - t0, 1))
    write_json_atomic(args.out, result)
    log.info("mixed / single p50 = %.3f, one task / single = %.3f; wrote %s", result["ratio_vs_single"][MIXED],
             result["ratio_vs_single"][MULTI], args.out)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
