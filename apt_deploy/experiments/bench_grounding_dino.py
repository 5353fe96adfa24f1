"""Benchmark a Grounding-DINO-T-shaped model on ONNX Runtime CPU: base vs SDPT folded (docs/sdpt.md).

Grounding-DINO-T = transformers' ``GroundingDinoConfig()`` defaults: Swin-T backbone (96, depths 2/2/6/2),
BERT-base text encoder, d_model 256, 6 encoder (fusion) + 6 decoder layers, fusion width E = 1024,
900 queries, 4 feature levels; random weights (latency does not depend on values). Input 800 x 1333
(``--height/--width``), text ``--text-len`` tokens (256 = max_text_len, the spec's FLOP estimate).
Variants: base, SDPT folded at N = 100 (the official code's default NUM_TOKENS) and N = 700 (its
README's command). Each is exported with ``export_artifact`` (ONNX Runtime checked against PyTorch
before anything is timed) and timed interleaved in one process with ``engines.bench.benchmark``.

Prediction: the fold adds 2 * Nt * N * E multiply-adds per fusion layer (scores against N prototype
keys + the weighted sum of N prototype values, text queries only); the base is counted with
``torch.utils.flop_counter.FlopCounterMode`` on the PyTorch model at the same shape (matmuls and
convolutions; grid-sample, softmax and norms are not counted, so the prediction is an upper bound on
the relative cost of the matmul work).

    flock /tmp/apt-bench.lock python scripts/bench_grounding_dino.py --threads 2 --iterations 10 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from apt_deploy.fileio import read_json, write_json_atomic
from apt_deploy.manifest import now_iso
from apt_deploy.settings import BenchSettings

log = logging.getLogger("bench_grounding_dino")
TOKENS = (100, 700)  # the official SDPT code's default NUM_TOKENS, and its README's
SMOKE_TOKENS = (4, 16)


def gdino_t_config(height: int, width: int) -> Any:
    """Grounding-DINO-T shapes (transformers' defaults), random init, no download; fixed (h, w) input."""
    from transformers import GroundingDinoConfig

    return GroundingDinoConfig(use_pretrained_backbone=False, image_size=[height, width])


def smoke_config(height: int, width: int) -> Any:
    """A tiny Grounding DINO with a tiny Swin backbone (the same export path as Swin-T, in seconds)."""
    from transformers import GroundingDinoConfig, SwinConfig

    from apt_deploy.backbones.grounding_dino import tiny_grounding_dino_config

    swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4,
                      out_features=["stage2", "stage3", "stage4"])
    return GroundingDinoConfig(**tiny_grounding_dino_config(backbone_config=swin, image_size=[height, width]))


def shape(config: Any, text_len: int, height: int, width: int) -> dict[str, int]:
    """What the MAC prediction needs: fusion layers, fusion width E, text tokens, input size."""
    return {"fusion_layers": int(config.encoder_layers), "fusion_dim": int(config.encoder_ffn_dim) // 2,
            "text_len": text_len, "height": height, "width": width, "queries": int(config.num_queries),
            "d_model": int(config.d_model)}


def sdpt_extra_macs(tokens: int, dims: dict[str, int]) -> int:
    """What the folded prototypes add: per fusion layer, Nt text queries x N keys x E (scores) + the same
    for the weighted sum of the N values (the image direction is unchanged)."""
    return dims["fusion_layers"] * 2 * dims["text_len"] * tokens * dims["fusion_dim"]


def counted_macs(model: Any, feed: dict[str, Any]) -> int:
    """Multiply-adds of one PyTorch forward counted by torch's FlopCounterMode (FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from apt_deploy.backbones.grounding_dino import GroundingDinoDetector

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        GroundingDinoDetector(model)(**feed)
    return counter.get_total_flops() // 2


def build(base: Any, tokens: int | None, seed: int = 0) -> Any:
    """A copy of ``base``: plain (``tokens`` None) or with SDPT (prototypes at their uniform(-1, 1) init)."""
    from apt_deploy.methods.sdpt import SDPTConfig
    from apt_deploy.tuning import apply_sdpt

    model = copy.deepcopy(base)
    return model if tokens is None else apply_sdpt(model, SDPTConfig(tokens=tokens, seed=seed))


def variant_name(tokens: int | None) -> str:
    return "base" if tokens is None else f"sdpt_fold_n{tokens}"


def export(base: Any, tokens: int | None, workdir: Path, text_len: int, validate: bool = True) -> dict[str, Any]:
    """Export one variant (folded, batch 1); parity-checked by export_artifact, or with ``validate=False`` by
    :func:`matched_parity` (query order is not stable at full size); its path, time and parity."""
    from apt_deploy.experiments.bench_variants import _parity
    from apt_deploy.manifest import read_manifest
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    t0, out = time.perf_counter(), workdir / variant_name(tokens)
    model = build(base, tokens)
    settings = ExportSettings(batch_min=1, batch_opt=1, batch_max=1, text_len=text_len, overwrite=True,
                              validate=validate)
    export_artifact(model, out, settings, source={"variant": variant_name(tokens)})
    manifest = read_manifest(out)
    matched = None if validate else matched_parity(model, out, [i["name"] for i in manifest["inputs"]], text_len)
    del model
    gc.collect()
    return {"path": str(out), "export_s": round(time.perf_counter() - t0, 1),
            "process_peak_rss_mb": round(peak_rss_mb(), 1), **_parity(manifest),
            "exact_parity_checked": validate, "matched_parity": matched}


def matched_parity(model: Any, artifact: Path, inputs: list[str], text_len: int, seed: int = 0) -> dict[str, Any]:
    """ORT vs PyTorch with the queries matched: the two-stage top-k picks 900 of ~22k proposals *in score
    order*, and at this size near-tied scores reorder (or swap at the boundary) under fp32 reordering noise
    (docs/pitfalls.md). Each ORT query is paired with the PyTorch query nearest in (boxes, finite logits);
    ``inputs``: the artifact's input names (its manifest). Returns how many pairs agree within the export
    tolerance and the largest difference among them."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings
    from apt_deploy.settings import tolerance

    spec = get_backbone("grounding_dino")
    feed = spec.dummy_inputs(model, spec.input_specs(model, ShapeSettings(batch=(1, 1, 1), text_len=text_len)), "opt", seed)
    with torch.no_grad():
        ref = model(**feed)
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip(["logits", "pred_boxes"], session.run(["logits", "pred_boxes"], {n: feed[n].numpy() for n in inputs})))
    vec = [np.concatenate([np.nan_to_num(o["logits"][0], neginf=-1e4), o["pred_boxes"][0]], axis=1)
           for o in (got, {"logits": ref.logits.numpy(), "pred_boxes": ref.pred_boxes.numpy()})]
    dist = np.abs(vec[0][:, None, :] - vec[1][None, :, :]).max(axis=2)  # [900 ORT, 900 torch]
    nearest, same_slot = dist.min(axis=1), dist.argmin(axis=1)
    atol = tolerance("onnxruntime_vs_torch").atol
    ok = nearest <= atol
    return {"queries": int(len(nearest)), "matched_within_atol": int(ok.sum()), "atol": atol,
            "max_abs_matched": float(nearest[ok].max()) if ok.any() else None,
            "one_to_one": bool(len(set(same_slot[ok].tolist())) == int(ok.sum())),
            "same_position": int((same_slot == np.arange(len(same_slot)))[ok].sum()),
            "unmatched_nearest_max_abs": float(nearest[~ok].max()) if (~ok).any() else None}


def peak_rss_mb() -> float:
    """getrusage ru_maxrss of this process so far (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rows(report: dict[str, Any], tokens: tuple[int, ...], dims: dict[str, int], base_macs: int) -> list[dict[str, Any]]:
    """Measured p50 overhead over the base beside the MAC prediction (the floor)."""
    stats = {a["name"]: a["stats"] for a in report["artifacts"]}
    base = stats["base"]["p50_ms"]
    out = [{"name": "base", "tokens": 0, "p50_ms": base, "std_ms": stats["base"].get("std_ms"),
            "overhead_measured": 0.0, "extra_gmacs": 0.0, "overhead_predicted": 0.0}]
    for n in tokens:
        name, extra = variant_name(n), sdpt_extra_macs(n, dims)
        measured, predicted = stats[name]["p50_ms"] / base - 1.0, extra / base_macs
        out.append({"name": name, "tokens": n, "p50_ms": stats[name]["p50_ms"], "std_ms": stats[name].get("std_ms"),
                    "overhead_measured": measured, "extra_gmacs": extra / 1e9, "overhead_predicted": predicted,
                    "predicted_ms": base * predicted, "measured_ms": stats[name]["p50_ms"] - base,
                    "measured_over_predicted": measured / predicted if predicted else None})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--text-len", type=int, default=256, help="text tokens (256 = Grounding DINO's max_text_len)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help=f"SDPT N values (default {TOKENS})")
    p.add_argument("--workdir", default="/tmp/apt_bench_gdino", help="where the ONNX artifacts go (never commit them)")
    p.add_argument("--out", default="benchmarks/results/grounding_dino_t_sdpt.json")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine before timing")
    p.add_argument("--keep", action="store_true", help="keep --workdir afterwards")
    p.add_argument("--export-only", action="store_true", help="count the MACs and export the variants (kept), time "
                   "nothing; time them later with --reuse on a quiet machine")
    p.add_argument("--matched-parity", action="store_true",
                   help="check ORT vs PyTorch with the 900 queries matched instead of position by position: at full "
                        "size the two-stage top-k reorders near-tied proposals under fp32 noise (docs/sdpt.md)")
    p.add_argument("--reuse", action="store_true", help="reuse what an --export-only run left in --workdir")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny Swin Grounding DINO at 128 x 160, text 16: checks the pipeline in a few minutes (numbers meaningless)")
    args = p.parse_args(argv)
    if args.smoke:
        args.height, args.width, args.text_len = 128, 160, 16
    args.tokens = tuple(args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS))
    return args


PREPARED = "prepared.json"  # an --export-only run's MAC count and exports, for --reuse


def prepare_variants(config: Any, args: argparse.Namespace, workdir: Path) -> tuple[int, float, dict[str, Any]]:
    """Build the model, count its MACs (one PyTorch forward), export every variant (parity-checked)."""
    import torch
    from transformers import GroundingDinoForObjectDetection

    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings
    from apt_deploy.progress import timed_step

    spec = get_backbone("grounding_dino")
    with timed_step("build the Grounding DINO model"):
        torch.manual_seed(0)
        base = GroundingDinoForObjectDetection(config).eval()
    specs = spec.input_specs(base, ShapeSettings(batch=(1, 1, 1), text_len=args.text_len))
    with timed_step("count the base model's multiply-adds (one PyTorch forward)"):
        t0 = time.perf_counter()
        base_macs = counted_macs(base, spec.dummy_inputs(base, specs, "opt", 0))
        torch_forward_s = time.perf_counter() - t0
    exports = {variant_name(n): export(base, n, workdir, args.text_len, validate=not args.matched_parity)
               for n in (None, *args.tokens)}
    del base
    gc.collect()
    return base_macs, torch_forward_s, exports


def main(argv: list[str] | None = None) -> int:
    """1. build the model  2. count its MACs  3. export every variant (parity-checked)  4. time them
    interleaved  5. write the JSON."""
    import torch

    from apt_deploy.cli import setup_logging
    from apt_deploy.experiments.bench_variants import wait_for_quiet
    from engines.bench import benchmark, format_table

    args = parse_args(argv)
    setup_logging(verbose=0, quiet=False)
    torch.set_num_threads(args.threads)
    config = smoke_config(args.height, args.width) if args.smoke else gdino_t_config(args.height, args.width)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dims = shape(config, args.text_len, args.height, args.width)
    prepared = workdir / PREPARED
    if args.reuse and prepared.is_file():
        log.info("reusing the MAC count and exports in %s", workdir)
        saved = read_json(prepared, "prepared exports", "the JSON an --export-only run wrote into --workdir",
                          "re-run with --export-only (or without --reuse)")
        base_macs, torch_forward_s, exports = saved["base_macs"], saved["torch_forward_s"], saved["exports"]
    else:
        base_macs, torch_forward_s, exports = prepare_variants(config, args, workdir)
        write_json_atomic(prepared, {"base_macs": base_macs, "torch_forward_s": torch_forward_s, "exports": exports,
                                     "command": sys.argv})
    if args.export_only:
        log.info("exported %d variants to %s (time them with --reuse)", len(exports), workdir)
        return 0
    other = wait_for_quiet(args.max_wait)
    settings = BenchSettings(iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    report = benchmark([e["path"] for e in exports.values()], settings)
    log.info("Grounding DINO variants:\n%s", format_table(report))
    write_json_atomic(Path(args.out), {
        "kind": "apt-deploy-bench-grounding-dino", "created": now_iso(), "command": sys.argv, "smoke": args.smoke,
        "shape": dims, "tokens": list(args.tokens), "base_gmacs": base_macs / 1e9,
        "macs_method": "torch.utils.flop_counter.FlopCounterMode / 2 on the PyTorch forward (matmul, conv, attention)",
        "torch_forward_with_counter_s": round(torch_forward_s, 1), "other_cores_before": other,
        "process_peak_rss_mb": round(peak_rss_mb(), 1), "exports": exports, "report": report,
        "rows": rows(report, args.tokens, dims, base_macs)})
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
