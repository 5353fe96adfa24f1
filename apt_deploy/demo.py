"""The main job on a built-in default: train APT on a synthetic VQA task, fold, export, validate, time.

No network and no GPU. The ViLT (or, with ``backbone="meter"``, a tiny METER) is randomly initialised (no
pretrained weights are reachable), so accuracies show that the pipeline learns, not what APT achieves on a
pretrained model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any
from apt_deploy.settings import DemoSettings

log = logging.getLogger(__name__)
DISPLAY = {"vilt": "ViLT", "meter": "METER"}


def run_demo(settings: DemoSettings = DemoSettings()) -> dict[str, Any]:
    """Steps 1-6 below; returns the summary (also written to WORKDIR/summary.json)."""
    from apt_deploy.fileio import write_json_atomic

    work = Path(settings.workdir)
    work.mkdir(parents=True, exist_ok=True)
    name = DISPLAY[settings.backbone]
    log.warning("Demo %s is RANDOMLY INITIALISED: no pretrained weights are reachable here. Accuracies show the "
                "pipeline learns; they say nothing about APT on a pretrained %s.", name, name)
    data, base_dir = _data_and_base_model(work, settings)                       # 1. data + base checkpoint
    summary: dict[str, Any] = {"settings": asdict(settings)}
    prompts_dir = _train(base_dir, data, work, settings, summary)               # 2-3. apply APT, train, save
    artifact, base_artifact = _export(base_dir, prompts_dir, work, summary)     # 4-5. fold, export, validate
    summary["latency"] = _latency(base_artifact, artifact, settings)            # 6. ORT latency, interleaved
    write_json_atomic(work / "summary.json", summary)
    return summary


def _data_and_base_model(work: Path, settings: DemoSettings):
    if settings.backbone == "meter":
        return _meter_data_and_base_model(work, settings)
    from apt_deploy.data.synthetic_vqa import build_synthetic_vqa
    from apt_deploy.progress import timed_step
    from apt_deploy.tiny import demo_vilt_config, save_tiny_vilt

    cfg = demo_vilt_config()
    with timed_step("build the synthetic VQA task and a random-init ViLT"):
        data = build_synthetic_vqa(settings.num_train, settings.num_test, image_size=cfg["image_size"],
                                   text_len=cfg["max_position_embeddings"], seed=settings.seed,
                                   patch_size=cfg["patch_size"])
        base_dir = save_tiny_vilt(work / "base_model", seed=settings.seed, answers=data.answers, overwrite=True, **cfg)
    return data, base_dir


def _meter_data_and_base_model(work: Path, settings: DemoSettings):
    from apt_deploy.data.meter import load_meter_processor
    from apt_deploy.data.synthetic_vqa import ANSWERS, build_synthetic_vqa
    from apt_deploy.progress import timed_step
    from apt_deploy.tiny import save_tiny_meter

    with timed_step("build the synthetic VQA task and a random-init METER"):
        base_dir = save_tiny_meter(work / "base_model", seed=settings.seed, answers=ANSWERS, overwrite=True, image_size=64)
        processor = load_meter_processor(base_dir, vocab_size=10**6)
        data = build_synthetic_vqa(settings.num_train, settings.num_test, image_size=64, text_len=16,
                                   seed=settings.seed, processor=processor)
    return data, base_dir


def _train(base_dir: Path, data: Any, work: Path, settings: DemoSettings, summary: dict[str, Any]) -> Path:
    import apt_deploy as ad
    from apt_deploy.settings import BACKBONE_TRAIN_DEFAULTS, TrainSettings
    from apt_deploy.training import evaluate, train

    spec = ad.get_backbone(settings.backbone)
    model = spec.load(str(base_dir))
    total = sum(p.numel() for p in model.parameters())
    config = ad.APTConfig(**{**spec.apt_defaults, "prompt_len": settings.prompt_len, "rank": settings.rank,
                             "cls_token_id": data.tokenizer.cls_token_id})
    ad.apply_apt(model, config)
    before = evaluate(model, data.test)
    recipe = BACKBONE_TRAIN_DEFAULTS.get(settings.backbone, {})
    result = train(model, data.train, TrainSettings(steps=settings.steps, batch_size=settings.batch_size,
                                                    seed=settings.seed, **recipe))
    summary["training"] = {"backbone_parameters": total, "trainable_parameters": ad.trainable_parameters(model),
                           "apt_parameters": sum(p.numel() for n, p in model.named_parameters() if ".apt." in n),
                           "accuracy_before": before, "accuracy_after": evaluate(model, data.test),
                           "baselines": answer_baselines(data.train.examples, data.test.examples),
                           "loss_first": result.mean_loss(first=True), "loss_last": result.mean_loss(),
                           "steps": result.steps, "seconds": result.seconds}
    return ad.save_prompts(model, work / "prompts", overwrite=True)


def answer_baselines(train: Any, test: Any) -> dict[str, float]:
    """Test accuracy of two blind answerers fitted on the training split: the single most common answer,
    and the most common answer per question text (what a model can reach without looking at the image)."""
    from collections import Counter, defaultdict

    overall, per_question = Counter(), defaultdict(Counter)
    for ex in train:
        for label, score in ex.scores:
            overall[label] += score
            per_question[ex.question][label] += score
    majority = overall.most_common(1)[0][0]

    def accuracy(answer_for) -> float:
        return sum(dict(ex.scores).get(answer_for(ex), 0.0) for ex in test) / max(1, len(test))

    return {"majority_answer": accuracy(lambda ex: majority),
            "question_only": accuracy(lambda ex: (per_question.get(ex.question) or overall).most_common(1)[0][0])}


def _export(base_dir: Path, prompts_dir: Path, work: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    import apt_deploy as ad
    from apt_deploy.manifest import read_manifest
    from apt_deploy.pipeline import load_trained
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    settings = ExportSettings(batch_max=8, overwrite=True)
    source = {"model_dir": str(base_dir.resolve()), "prompts_dir": str(prompts_dir.resolve())}
    artifact = export_artifact(load_trained(base_dir, prompts_dir), work / "artifact", settings, source=source)
    backbone = read_manifest(artifact)["backbone"]
    base = export_artifact(ad.get_backbone(backbone).load(str(base_dir)), work / "artifact_base", settings,
                           source={"model_dir": source["model_dir"]})
    manifest = read_manifest(artifact)
    summary["export"] = {"artifact": str(artifact), "fused_nodes": manifest["fused_op"]["count"],
                         "onnx_bytes": _size(artifact, manifest), "base_onnx_bytes": _size(base, read_manifest(base)),
                         "validation": manifest["validation"]}
    return artifact, base


def _latency(base: Path, artifact: Path, settings: DemoSettings) -> dict[str, Any]:
    from apt_deploy.manifest import read_manifest
    from apt_deploy.progress import timed_step
    from engines.bench import build_feed
    from engines.runners import OnnxRuntimeRunner
    from engines.timing import ratio_table, summarize, time_interleaved

    feed = build_feed(read_manifest(artifact), batch=1)
    # no thread spinning, so neither session steals the cores from the next timed call (docs/pitfalls.md)
    runners = [OnnxRuntimeRunner(base / "model.onnx", name="base", spinning=False),
               OnnxRuntimeRunner(artifact / "model.onnx", name="apt", spinning=False)]
    with timed_step(f"ONNX Runtime latency, base vs APT interleaved, {settings.latency_iterations} iterations"):
        times = time_interleaved(runners, [feed, feed], settings.latency_iterations, warmup=5)
    stats = {r.name: summarize(t) for r, t in zip(runners, times)}
    return {"batch": 1, "stats": stats, "p50_ratio": ratio_table(stats)}


def _size(artifact: Path, manifest: dict[str, Any]) -> int:
    from apt_deploy.manifest import onnx_files

    return sum(p.stat().st_size for p in onnx_files(artifact, manifest))
