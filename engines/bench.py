"""Benchmark exported artifacts on one backend, interleaved in one process, and report them as JSON.

Steps (``benchmark``):
1. read every artifact's manifest (fail on a bad path before loading anything);
2. per artifact: build inputs from the manifest's shapes in numpy, create the runner and warm it up
   under a peak-RSS sampler (memory method: see ``MEMORY_METHOD``);
3. time all of them interleaved, a seeded random order per round, with ``engines.timing.time_interleaved``
   (the one timing core: ``bench``, ``bench --compare`` and the baseline gate all use it), measuring the
   CPU other processes used meanwhile; ONNX Runtime threads do not spin (``BenchSettings.spinning``);
4. summarize each (p50/p90/p99/mean/std, throughput at the batch) and its p50 ratio to the first.

PyTorch peers (``BenchSettings.peers``: torch-eager / torch-compile) are extra rows ``<artifact>@<peer>``
timed in the same rounds; their modules come from a caller's ``load_model`` (engines.torch_runner).
No torch here: inputs are numpy, the runners come from ``engines.runners.make_runner``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from apt_deploy.errors import ConfigError
from apt_deploy.manifest import component_dirs, now_iso, onnx_files, read_manifest, tool_versions
from apt_deploy.progress import progress, timed_step
from engines.machine import (MB, OtherLoadMeter, PeakRssSampler, load_average, machine_info,
                             process_peak_rss_bytes)
from engines.runners import Runner, make_runner
from engines.timing import ratio_table, summarize, time_interleaved
from apt_deploy.settings import BenchSettings

log = logging.getLogger(__name__)
REPORT_KIND, SCHEMA_VERSION = "apt-deploy-bench", 1
TOKEN_ID_RANGE = (1, 100)  # valid in any vocabulary of >= 100 tokens; latency does not depend on values
HIGH_OTHER_LOAD_CORES = 0.3
# Imported before the first artifact is sampled, so its memory delta does not include the library import.
BACKEND_IMPORTS = {"onnxruntime": "onnxruntime", "trt": "tensorrt", "torch-cuda": "torch"}
MEMORY_METHOD = (
    "Artifacts are loaded one after another and stay loaded. For each, a thread polls the process RSS "
    "(psutil, every 2 ms) while its session is created and warmed up; peak_rss_delta_mb = that peak minus "
    "the RSS just before, i.e. what the artifact adds to a process at its worst (weights + arena + "
    "transient buffers); resident_delta_mb = what stays resident after warm-up. process_peak_rss_mb is "
    "getrusage ru_maxrss of the whole bench process. Never sampled during timing. Valid in a fresh process (as "
    "apt-deploy bench runs): memory an earlier session in the same process freed is reused without raising RSS.")
ORDER_METHOD = ("each round times every path once, in a random order drawn per round from a numpy RNG seeded with "
                "settings.seed (no path is systematically first or right after another); rounds are paired")
ROTATION_METHOD = "fixed rotation A B C, B C A, ... (settings.shuffle = false): carries order effects"
SPINNING_NOTE = {False: "ONNX Runtime sessions: session.intra_op.allow_spinning = session.inter_op.allow_spinning = 0 "
                        "(idle threads sleep instead of stealing the cores from the path timed next)",
                 True: "ONNX Runtime sessions: thread spinning allowed (its default; interleaved ratios are biased)"}


@dataclass
class Artifact:
    """One artifact directory and its manifest."""

    name: str
    path: Path
    manifest: dict[str, Any] = field(repr=False)


RunnerFactory = Callable[[Artifact, BenchSettings], Runner]
LoadModel = Callable[[Artifact], Any]  # an artifact's PyTorch module, forward(**feed) -> outputs in manifest order
StopRule = Callable[[list[str], list[list[float]]], bool]  # (target names, seconds so far) -> stop now?


def load_artifacts(dirs: Sequence[str | Path]) -> list[Artifact]:
    """Read every manifest first; names are the directory names, made unique with ``#2``, ``#3``."""
    if not dirs:
        raise ConfigError("no artifact directory given", "one or more ARTIFACT_DIRs", "pass artifact directories")
    out: list[Artifact] = []
    for d, manifest in _expand_components(dirs):
        path = Path(d)
        base = name = f"{path.resolve().parent.name}/{path.name}" if manifest.get("component") else path.resolve().name
        k, taken = 2, {a.name for a in out}
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        out.append(Artifact(name, path, manifest))
    return out


def _expand_components(dirs: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) per artifact; a multi-component artifact (Stable Diffusion) becomes one entry
    per component, the UNet first."""
    out = []
    for d in dirs:
        manifest = read_manifest(d)
        parts = component_dirs(d, manifest)
        out += [(p, read_manifest(p)) for _, p in parts] if parts else [(Path(d), manifest)]
    return out


def batch_shape(inp: dict[str, Any], batch: int) -> tuple[int, ...]:
    """The manifest's opt shape with every ``batch`` axis set to ``batch`` (checked against min/max)."""
    shape = list(inp["opt_shape"])
    for i, axis in enumerate(inp["axes"]):
        if axis == "batch":
            lo, hi = inp["min_shape"][i], inp["max_shape"][i]
            if not lo <= batch <= hi:
                raise ConfigError(f"--batch {batch} for input {inp['name']!r}",
                                  f"a batch the artifact was exported for ({lo}..{hi})",
                                  "pass a batch in that range or re-export with a wider --batch")
            shape[i] = batch
    return tuple(shape)


def input_array(inp: dict[str, Any], shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Masks all ones, type ids zero, token ids in TOKEN_ID_RANGE, floating inputs standard normal."""
    name, dtype = inp["name"], _numpy_dtype(inp)
    if "mask" in name:
        return np.ones(shape, dtype)
    if np.issubdtype(dtype, np.integer):
        return np.zeros(shape, dtype) if "type" in name else rng.integers(*TOKEN_ID_RANGE, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def build_feed(manifest: dict[str, Any], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i["name"]: input_array(i, batch_shape(i, batch), rng) for i in manifest["inputs"]}


def _numpy_dtype(inp: dict[str, Any]) -> np.dtype:
    try:
        return np.dtype(inp["dtype"])
    except TypeError as e:
        raise ConfigError(f"input {inp['name']!r} has dtype {inp['dtype']!r}, which numpy cannot build",
                          "float32 / float16 / int64 inputs", "benchmark an fp32 or fp16 export") from e


def artifact_size(art: Artifact) -> dict[str, Any]:
    """Bytes of model.onnx and its external data (the files the manifest lists)."""
    sizes = [path.stat().st_size for path in onnx_files(art.path, art.manifest)]
    onnx_bytes, data_bytes = sizes[0], sum(sizes[1:])
    return {"onnx_bytes": onnx_bytes, "data_bytes": data_bytes, "total_mb": round((onnx_bytes + data_bytes) / MB, 2)}


def describe(art: Artifact) -> dict[str, Any]:
    m = art.manifest
    return {"name": art.name, "path": str(art.path), "backbone": m.get("backbone"), "method": m.get("method"),
            "form": m.get("form"), "dtype": m.get("dtype"), "variant": (m.get("source") or {}).get("variant"),
            "prompt_len": (m.get("method_config") or {}).get("prompt_len") if m.get("method") != "none" else 0,
            "fused_op_nodes": (m.get("fused_op") or {}).get("count")}


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def resolve(settings: BenchSettings) -> BenchSettings:
    """``threads=None`` becomes the physical core count, so ONNX Runtime and torch get the same."""
    return settings if settings.threads else replace(settings, threads=physical_cores())


def default_factory(art: Artifact, settings: BenchSettings) -> Runner:
    extra = {"spinning": settings.spinning} if settings.backend == "onnxruntime" else {}
    return make_runner(settings.backend, art.path, threads=settings.threads, **extra)


@dataclass
class Target:
    """One timed row: an artifact on the bench's backend, or a PyTorch peer of an artifact."""

    name: str
    artifact: Artifact
    make: Callable[[], Runner]
    runner: str  # the backend, or the peer (torch-eager / torch-compile / a caller's name)


def artifact_targets(artifacts: Sequence[Artifact], settings: BenchSettings, factory: RunnerFactory,
                     load_model: LoadModel | None = None) -> list[Target]:
    """Each artifact, followed by its ``settings.peers`` (named ``<artifact>@<peer>``)."""
    if settings.peers and load_model is None:
        raise ConfigError(f"peers {list(settings.peers)} but no way to load the PyTorch models",
                          "a load_model callable (the CLI passes apt_deploy.pipeline.load_reference_module)",
                          "call benchmark(..., load_model=...) or drop the peers")
    out: list[Target] = []
    for art in artifacts:
        out.append(Target(art.name, art, partial(factory, art, settings), settings.backend))
        out += [peer_target(art, peer, partial(load_model, art), settings.threads) for peer in settings.peers]
    return out


def peer_target(art: Artifact, peer: str, load_model: Callable[[], Any], threads: int | None,
                name: str | None = None) -> Target:
    """A PyTorch peer of ``art`` (same inputs): ``load_model()`` returns its module (forward(**feed))."""
    from engines.torch_runner import make_peer_runner

    name = name or f"{art.name}@{peer}"
    outputs = [o["name"] for o in art.manifest["outputs"]]
    return Target(name, art, lambda: make_peer_runner(peer, load_model, outputs, threads, name), peer)


class Prepared(NamedTuple):
    """A loaded, warmed-up runner with its feed and the memory its loading took."""

    runner: Runner
    feed: dict[str, np.ndarray]
    memory: dict[str, float]


def prepare(target: Target, settings: BenchSettings, logger: logging.Logger = log) -> Prepared:
    """Runner created and warmed up under the RSS sampler; returns (runner, feed, memory)."""
    feed = build_feed(target.artifact.manifest, settings.batch, settings.seed)
    with timed_step(f"load + warm up {target.name} ({settings.warmup} runs)", logger), PeakRssSampler() as mem:
        runner = target.make()
        runner.activate()
        for _ in range(settings.warmup):
            runner.infer(feed)
        runner.synchronize()
    return Prepared(runner, feed, mem.to_json())


def _preimport(backend: str) -> None:
    import importlib

    module = BACKEND_IMPORTS.get(backend)
    if module:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the runner raises the proper MissingDependencyError when it activates


def _round_ticker(total: int, desc: str) -> Callable[[int], None]:
    """An ``on_round`` callback that advances apt_deploy.progress's bar / log lines."""
    ticks: Iterator[int] = progress(range(total), total=total, desc=desc)

    def tick(_round: int) -> None:
        next(ticks, None)
        if _round == total - 1:
            next(ticks, None)  # exhaust so a bar closes

    return tick


def benchmark(dirs: Sequence[str | Path], settings: BenchSettings | None = None,
              factory: RunnerFactory | None = None, clock: Callable[[], float] | None = None,
              load_model: LoadModel | None = None, extra: Sequence[Target] = (),
              stop: StopRule | None = None) -> dict[str, Any]:
    """Time every artifact (and its peers, and ``extra`` targets) interleaved in this process; returns
    the JSON report (module docstring). ``stop(names, times)`` may end the rounds early (the gates)."""
    settings = resolve(settings or BenchSettings())
    factory, clock = factory or default_factory, clock or time.perf_counter
    artifacts = load_artifacts(dirs)
    targets = artifact_targets(artifacts, settings, factory, load_model) + list(extra)
    _preimport(settings.backend)
    load_before, prepared = load_average(), []
    names = [t.name for t in targets]
    try:
        for target in targets:
            prepared.append(prepare(target, settings))
        with timed_step(f"time {len(prepared)} paths x {settings.iterations} rounds, interleaved", log), \
                OtherLoadMeter() as other:
            t0 = time.monotonic()
            times = time_interleaved([p.runner for p in prepared], [p.feed for p in prepared], settings.iterations,
                                     warmup=1, clock=clock, on_round=_round_ticker(settings.iterations, "bench"),
                                     seed=settings.seed, shuffle=settings.shuffle,
                                     stop=partial(stop, names) if stop else None)
            seconds = time.monotonic() - t0
    finally:
        for p in prepared:
            p.runner.deactivate()
    load = {"before": load_before, "after": load_average(), "other_processes_cores": round(other.other_cores, 3)}
    report = build_report(targets, [p.memory for p in prepared], times, settings, load)
    report["timing_s"] = round(seconds, 2)
    return report


def build_report(targets: list[Target], memory: list[dict], times: list[list[float]],
                 settings: BenchSettings, load: dict[str, Any]) -> dict[str, Any]:
    stats = {t.name: summarize(s, settings.batch) for t, s in zip(targets, times)}
    ratios = ratio_table(stats, "p50_ms")
    entries = [{**describe(t.artifact), "name": t.name, "runner": t.runner,
                "input_shapes": {i["name"]: list(batch_shape(i, settings.batch)) for i in t.artifact.manifest["inputs"]},
                "size": artifact_size(t.artifact) if t.runner == settings.backend else None, "memory": mem,
                "stats": stats[t.name], "ratio_p50": ratios[t.name], "overhead_p50": ratios[t.name] - 1.0,
                "times_ms": [round(s * 1e3, 4) for s in ts]}
               for t, mem, ts in zip(targets, memory, times)]
    _warn_load(load)
    peak = process_peak_rss_bytes()
    return {"kind": REPORT_KIND, "schema_version": SCHEMA_VERSION, "created": now_iso(), "machine": machine_info(),
            "versions": tool_versions(), "settings": asdict(settings), "order": ORDER_METHOD if settings.shuffle
            else ROTATION_METHOD, "spinning": SPINNING_NOTE[settings.spinning],
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "load": load,
            "memory_method": MEMORY_METHOD, "process_peak_rss_mb": round(peak / MB, 1) if peak else None,
            "artifacts": entries}


def _warn_load(load: dict[str, Any]) -> None:
    if load["other_processes_cores"] > HIGH_OTHER_LOAD_CORES:
        log.warning("other processes used %.2f cores while timing (load average %s): these numbers are noisy; "
                    "re-run on an idle machine", load["other_processes_cores"], load["after"])


def format_table(report: dict[str, Any]) -> str:
    """A readable fixed-width table of a report (the CLI prints it)."""
    head = (f"{'path':<36} {'method':<12} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean±std ms':>16} "
            f"{'items/s':>9} {'x p50':>7} {'peak ΔRSS MB':>13} {'size MB':>9}")
    lines = [head, "-" * len(head)]
    for a in report["artifacts"]:
        s = a["stats"]
        mean = f"{s['mean_ms']:.2f}±{s['std_ms']:.2f}"
        size = f"{a['size']['total_mb']:>9.1f}" if a.get("size") else f"{'-':>9}"
        lines.append(f"{a['name'][:36]:<36} {str(a['method'])[:12]:<12} {s['p50_ms']:>9.2f} {s['p90_ms']:>9.2f} "
                     f"{s['p99_ms']:>9.2f} {mean:>16} {s['throughput_per_s']:>9.2f} {a['ratio_p50']:>7.3f} "
                     f"{a['memory']['peak_rss_delta_mb']:>13.1f} {size}")
    st, ld = report["settings"], report["load"]
    rounds = len(report["artifacts"][0]["times_ms"])
    order = f"shuffled per round (seed {st['seed']})" if st["shuffle"] else "rotated (not shuffled)"
    lines.append(f"backend {st['backend']}, batch {st['batch']}, {rounds} rounds interleaved, order {order}, after "
                 f"{st['warmup']} warm-up, threads {st['threads']}, ORT spinning {'on' if st['spinning'] else 'off'}; "
                 f"machine: {report['machine']['machine_key']}; other processes used "
                 f"{ld['other_processes_cores']:.2f} cores while timing")
    return "\n".join(lines)
