"""Few-shot style transfer on a tiny Grounding DINO: zero-shot vs full fine-tuning vs SDPT vs head-only.

No pretrained Grounding DINO is reachable here, and prompt tuning a random frozen network says little,
so: stage A pre-trains a tiny Grounding DINO fully on synthetic detection images (1-3 coloured shapes
per image, categories circle / square / triangle / cross, prompt "circle . square . triangle . cross .")
in the source styles; stage B transfers few-shot (``--shots`` images per category) to the held-out
style, every method from the same stage-A weights with the same number of steps and batch size, for
each seed. AP50 and mAP (COCO, pycocotools) on held-out-style test images; trainable-parameter counts.

    python scripts/sdpt_experiment.py --out benchmarks/results/sdpt_experiment.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sdpt_experiment")
SOURCE_STYLES, TARGET_STYLE = ("solid", "outline", "noisy", "striped"), "inverted"
METHODS = ("zero-shot", "full-ft", "head-only", "sdpt", "sdpt+head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tokens", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--pretrain-images", type=int, default=400, help="images per source style (stage A)")
    p.add_argument("--pretrain-steps", type=int, default=900)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=60, help="stage-B steps, equal for every method")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4, help="stage-B AdamW lr of full / head-only fine-tuning")
    p.add_argument("--sdpt-lr", type=float, default=3e-2, help="stage-B AdamW lr of the SDPT prototypes")
    p.add_argument("--test-images", type=int, default=60)
    p.add_argument("--source-test-images", type=int, default=30, help="per source style: the stage-A model's own AP")
    p.add_argument("--no-proposal-loss", dest="proposal_loss", action="store_false",
                   help="train with transformers' loss only (its two-stage proposal terms get no gradient: "
                        "stage A then plateaus, docs/sdpt.md)")
    p.add_argument("--workdir", default="sdpt-experiment-work", help="stage-A checkpoint cache")
    p.add_argument("--pretrain-only", action="store_true", help="stop after stage A (cached in --workdir)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine result files of runs over disjoint --seeds (e.g. run in parallel) into --out")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def coco_eval(gt: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """COCO bbox AP (IoU .50:.95) and AP50 with pycocotools."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"mAP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        ground = COCO()
        ground.dataset = gt
        ground.createIndex()
        result = ground.loadRes(detections)
        ev = COCOeval(ground, result, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mAP": float(ev.stats[0]), "AP50": float(ev.stats[1])}


def phrase_token_spans(input_ids: list[int], n_phrases: int) -> list[list[int]]:
    """Token positions of each phrase ("circle . square ." -> [[1], [3]]), split at the "." id."""
    from apt_deploy.backbones.grounding_dino import CLS, DOT, SEP

    spans, current = [], []
    for i, t in enumerate(input_ids):
        if t == DOT or t == SEP:
            if current:
                spans.append(current)
            current = []
        elif t != CLS and t != 0:
            current.append(i)
    return spans[:n_phrases]


def detections_for(model: Any, batches: list, image_ids: list[int], category_ids: list[int], size: int) -> list[dict]:
    """Every (query, category) pair as a COCO detection: score = max sigmoid over the phrase's tokens."""
    import torch

    from apt_deploy.detection_training import predict_batches

    spans = phrase_token_spans(batches[0].inputs["input_ids"][0].tolist(), len(category_ids))
    dets, k = [], 0
    for logits, boxes in predict_batches(model, batches):
        probs = torch.sigmoid(logits)
        scores = torch.stack([probs[..., s].amax(-1) for s in spans], -1)  # (B, Q, C)
        for b in range(scores.shape[0]):
            for q in range(scores.shape[1]):
                cx, cy, w, h = (float(v) * size for v in boxes[b, q])
                for c, cat in enumerate(category_ids):
                    dets.append({"image_id": image_ids[k], "category_id": cat, "score": float(scores[b, q, c]),
                                 "bbox": [cx - w / 2, cy - h / 2, w, h]})
            k += 1
    return dets


def make_split(style: str, n: int, seed: int, size: int) -> tuple[dict, list]:
    from apt_deploy.data.coco import DetectionExample
    from apt_deploy.data.synthetic_shapes import detection_coco

    coco, images = detection_coco(style, n, seed, size)
    examples = []
    for entry, img in zip(coco["images"], images):
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        boxes = [[(a["bbox"][0] + a["bbox"][2] / 2) / size, (a["bbox"][1] + a["bbox"][3] / 2) / size,
                  a["bbox"][2] / size, a["bbox"][3] / size] for a in anns]
        examples.append(DetectionExample(img, boxes, [a["category_id"] - 1 for a in anns], entry["id"], entry["file_name"]))
    return coco, examples


def pretrain(args: argparse.Namespace, processor: Any) -> Path:
    """Stage A (cached in --workdir): full training of a tiny Grounding DINO on the source styles."""
    from apt_deploy.backbones.grounding_dino import GroundingDinoSpec, save_tiny_grounding_dino
    from apt_deploy.data.coco import category_prompt
    from apt_deploy.data.synthetic_shapes import SHAPES
    from apt_deploy.detection_training import train_detection
    from apt_deploy.settings import DetectionTrainSettings

    tag = "" if args.proposal_loss else "_noprop"
    out = Path(args.workdir) / f"pretrained_{args.pretrain_steps}_{args.pretrain_images}_{args.pretrain_lr:g}{tag}"
    if (out / "config.json").is_file():
        log.info("stage A: reusing %s", out)
        return out
    model = GroundingDinoSpec().build_tiny(seed=1234)
    examples = [e for i, style in enumerate(SOURCE_STYLES) for e in make_split(style, args.pretrain_images, 100 + i, 128)[1]]
    settings = DetectionTrainSettings(steps=args.pretrain_steps, batch_size=8, lr=args.pretrain_lr, seed=0)
    result = train_detection(model, examples, processor, category_prompt(SHAPES), settings, text_len=16,
                             proposals=args.proposal_loss)
    save_tiny_grounding_dino(out, model=model, overwrite=True)
    (out / "pretrain_log.json").write_text(json.dumps({"seconds": result.seconds, "losses": result.losses[::10]}))
    return out


def run_method(method: str, tokens: int | None, model_dir: Path, shots: list, test: tuple, args: argparse.Namespace,
               seed: int, processor: Any) -> dict[str, Any]:
    """Stage B for one method / seed: train from the stage-A weights, evaluate on the held-out style."""
    import torch

    from apt_deploy.backbones import get_backbone
    from apt_deploy.data.coco import category_prompt
    from apt_deploy.data.synthetic_shapes import SHAPES
    from apt_deploy.detection_training import train_detection
    from apt_deploy.methods.sdpt import SDPTConfig
    from apt_deploy.settings import DetectionTrainSettings
    from apt_deploy.tuning import apply_sdpt, trainable_parameters

    torch.manual_seed(seed)
    model = get_backbone("grounding_dino").load(str(model_dir))
    prompt, lr = category_prompt(SHAPES), args.lr
    if method.startswith("sdpt"):
        apply_sdpt(model, SDPTConfig(tokens=tokens, train_head=method == "sdpt+head", seed=seed))
        lr = args.sdpt_lr
    elif method == "head-only":
        model.requires_grad_(False)
        model.bbox_embed[0].requires_grad_(True)
    n_train = trainable_parameters(model) if method != "zero-shot" else 0
    seconds = 0.0
    if method != "zero-shot":
        settings = DetectionTrainSettings(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed)
        seconds = train_detection(model, shots, processor, prompt, settings, text_len=16,
                                  proposals=args.proposal_loss).seconds
    scores = evaluate(model, test, processor)
    return {"method": method, "tokens": tokens, "seed": seed, "trainable_params": n_train, "train_seconds": seconds,
            **scores}


def evaluate(model: Any, test: tuple, processor: Any) -> dict[str, float]:
    """COCO AP / AP50 of ``model`` on a (coco dict, examples) split."""
    from apt_deploy.data.coco import category_prompt
    from apt_deploy.data.synthetic_shapes import SHAPES
    from apt_deploy.detection_training import make_batches

    gt, examples = test
    batches = make_batches(examples, processor, category_prompt(SHAPES), 128, 16, 16)
    return coco_eval(gt, detections_for(model, batches, [e.image_id for e in examples], [1, 2, 3, 4], 128))


def source_style_ap(model_dir: Path, args: argparse.Namespace, processor: Any) -> dict[str, dict[str, float]]:
    """The stage-A model on fresh test images of each source style: is it a working detector at all?"""
    from apt_deploy.backbones import get_backbone

    model = get_backbone("grounding_dino").load(str(model_dir))
    return {style: evaluate(model, make_split(style, args.source_test_images, 3000 + i, 128), processor)
            for i, style in enumerate(SOURCE_STYLES)}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        rows.setdefault(r["method"] + (f" N={r['tokens']}" if r["tokens"] else ""), []).append(r)
    out = []
    for name, rs in rows.items():
        row = {"method": name, "trainable_params": rs[0]["trainable_params"], "seeds": len(rs)}
        for key in ("AP50", "mAP"):
            vals = [r[key] for r in rs]
            row[key] = statistics.mean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = ["| method | trainable params | AP50 (mean ± std) | mAP (mean ± std) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['trainable_params']:,} | {100 * r['AP50']:.1f} ± {100 * r['AP50_std']:.1f} | "
              f"{100 * r['mAP']:.1f} ± {100 * r['mAP_std']:.1f} |" for r in summary]
    return "\n".join(lines)


def merge(paths: list[str], out: str | None) -> int:
    """One result from several runs over disjoint seeds (same stage A and settings, else refused)."""
    from apt_deploy.errors import ConfigError
    from apt_deploy.fileio import read_json, write_json_atomic

    parts = [read_json(Path(p), "an sdpt_experiment result", "the JSON that --out wrote", "re-run the experiment")
             for p in paths]
    fixed = lambda r: {k: v for k, v in r["args"].items() if k not in ("seeds", "out")}  # noqa: E731
    if any(fixed(p) != fixed(parts[0]) for p in parts) or any(p["stage_a_source_style_ap"] != parts[0]["stage_a_source_style_ap"] for p in parts):
        raise ConfigError(f"result files {paths} with different settings or stage-A models",
                          "runs of the same command differing only in --seeds", "re-run with identical options")
    seeds = [s for p in parts for s in p["args"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds} across {paths}", "disjoint --seeds per file", "drop the duplicate run")
    runs = [r for p in parts for r in p["runs"]]
    result = {**parts[0], "args": {**parts[0]["args"], "seeds": seeds, "out": out}, "merged_from": paths,
              "total_seconds": max(p["total_seconds"] for p in parts), "summary": summarise(runs), "runs": runs}
    log.info("\n%s", markdown(result["summary"]))
    if out:
        write_json_atomic(Path(out), result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """1. stage A (cached)  2. per seed: few-shot split + test split  3. every method  4. JSON + table."""
    import torch

    from apt_deploy.backbones.grounding_dino import build_tiny_processor
    from apt_deploy.data.coco import few_shot_images

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    processor = build_tiny_processor(128, 40)
    model_dir = pretrain(args, processor)
    pretrain_seconds = time.perf_counter() - t0
    if args.pretrain_only:
        return 0
    source_ap = source_style_ap(model_dir, args, processor)
    log.info("stage-A model on the source styles: %s", source_ap)
    runs = []
    for seed in args.seeds:
        pool_gt, pool = make_split(TARGET_STYLE, 60, 1000 + seed, 128)
        chosen = set(few_shot_images(pool_gt, args.shots, seed))
        shots = [e for e in pool if e.image_id in chosen]
        test = make_split(TARGET_STYLE, args.test_images, 2000 + seed, 128)
        for method in METHODS:
            for tokens in (args.tokens if method.startswith("sdpt") else [None]):
                runs.append(run_method(method, tokens, model_dir, shots, test, args, seed, processor))
                log.info("%s", runs[-1])
    summary = summarise(runs)
    result = {"args": vars(args), "source_styles": SOURCE_STYLES, "target_style": TARGET_STYLE,
              "pretrain_seconds": pretrain_seconds, "stage_a_source_style_ap": source_ap,
              "pretrain_log": json.loads((model_dir / "pretrain_log.json").read_text()), "total_seconds": time.perf_counter() - t0,
              "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "threads": 1},
              "summary": summary, "runs": runs}
    log.info("\n%s", markdown(summary))
    if args.out:
        from apt_deploy.fileio import write_json_atomic

        write_json_atomic(Path(args.out), result)
    return 0
