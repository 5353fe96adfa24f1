"""Benchmark METER-B deployment variants on ONNX Runtime CPU, next to the MAC prediction (docs/meter.md).

METER-B = CLIP-ViT-B/16 (11 layers) + RoBERTa-base + 6+6 cross layers of 768, 384 px (577 image tokens),
50 text tokens, random weights (latency does not depend on values). Variants, all at p = 200, r = 4:
base, APT fused op, APT op-free, deep prompt naive (training form), deep prompt prefix-K/V folded. Every
variant is exported with ``export_artifact`` (ONNX Runtime checked against PyTorch before anything is
timed) and timed interleaved in one process with ``engines.bench.benchmark``.

    flock /tmp/apt-bench.lock python scripts/bench_meter.py --threads 2 --iterations 20 --warmup 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from apt_deploy.experiments.bench_variants import Variant, _parity, wait_for_quiet
from apt_deploy.fileio import write_json_atomic
from apt_deploy.manifest import now_iso
from apt_deploy.settings import BenchSettings

log = logging.getLogger("bench_meter")
RANK, PROMPTS, TEXT_LEN, IMAGE = 4, 200, 50, 384
# deep prompt naive = the training form exported as is (p tokens through every cross layer of both streams)
VARIANTS = [Variant("none", "base", 0, IMAGE), Variant("apt", "fused", PROMPTS, IMAGE), Variant("apt", "opfree", PROMPTS, IMAGE),
            Variant("deep_prompt", "naive", PROMPTS, IMAGE), Variant("deep_prompt", "prefix", PROMPTS, IMAGE)]
SMOKE_OUT = "/tmp/apt_bench_meter_smoke.json"  # smoke numbers are meaningless: never next to the real results


def meter_macs(d: int, ffn: int, vision_layers: int, text_layers: int, cross_layers: int, n_img: int, n_txt: int,
               patch: int = 16) -> float:
    """Multiply-adds of one METER forward (batch 1): encoders, transforms, both cross stacks (head ignored)."""
    def encoder(n: int, layers: int) -> float:
        return layers * (4 * n * d * d + 2 * n * d * ffn + 2 * n * n * d)

    def cross(n: int, m: int) -> float:  # this stream n tokens, the other m
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * d + 2 * m * d * d + 2 * n * m * d + 2 * n * d * ffn

    return (encoder(n_img, vision_layers) + encoder(n_txt, text_layers) + n_img * 3 * patch * patch * d
            + (n_img + n_txt) * d * d + cross_layers * (cross(n_txt, n_img) + cross(n_img, n_txt)))


def extra_macs(method: str, form: str, p: int, d: int, ffn: int, cross_layers: int, n_img: int, n_txt: int) -> float:
    """What a variant adds: APT 2 n p d per module (4 modules per cross layer pair of streams ... per stream 2);
    deep prompt naive: p more query tokens through every cross layer; prefix: p more keys in each self-attention."""
    if method == "apt":
        return cross_layers * 2 * (2 * n_txt * p * d + 2 * n_img * p * d)
    if method == "deep_prompt" and form == "prefix":
        return cross_layers * (2 * n_txt * p * d + 2 * n_img * p * d)
    if method == "deep_prompt":
        def naive(n: int, m: int) -> float:
            return 6 * p * d * d + 2 * p * d * ffn + 2 * (2 * n * p + p * p) * d + 2 * p * m * d

        return cross_layers * (naive(n_txt, n_img) + naive(n_img, n_txt))
    return 0.0


def shape(config: Any) -> dict[str, int]:
    v = config.vision
    return {"d": config.hidden_size, "ffn": config.intermediate_size, "vision_layers": v["num_hidden_layers"],
            "text_layers": config.text["num_hidden_layers"], "cross_layers": config.num_cross_layers,
            "n_img": (config.image_size // config.patch_size) ** 2 + 1, "n_txt": TEXT_LEN}


def randomize(model: Any, seed: int = 0) -> None:
    """Non-trivial trained values (K != P): APT up ~ N(0, 0.02) as at init; the METER scale stays frozen at 0."""
    import torch

    from apt_deploy.checkpoint import trained_tensors

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained_tensors(model).items():
            if name.endswith(".up"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build(v: Variant, base: Any) -> Any:
    import apt_deploy as ad
    from apt_deploy.methods.apt_opfree import fold_opfree

    model = copy.deepcopy(base)
    if v.method == "none":
        return model
    config = ad.APTConfig(prompt_len=v.p, rank=RANK, train_log_scale=False, cls_token_id=0, method=v.method)
    (ad.apply_apt if v.method == "apt" else ad.apply_deep_prompt)(model, config)
    randomize(model)
    return fold_opfree(model) if v.form == "opfree" else model


def export(v: Variant, base: Any, workdir: Path) -> dict[str, Any]:
    from apt_deploy.manifest import read_manifest
    from apt_deploy.settings import ExportSettings
    from exporters.onnx_export import export_artifact

    t0, out = time.perf_counter(), workdir / v.name
    model = build(v, base)
    settings = ExportSettings(batch_max=2, text_len=TEXT_LEN, overwrite=True)
    export_artifact(model, out, settings, source={"variant": v.name, "form": v.form}, fold_first=v.form not in ("naive", "opfree"))
    del model
    gc.collect()
    return {"path": str(out), "export_s": round(time.perf_counter() - t0, 1), **_parity(read_manifest(out))}


def reused(v: Variant, workdir: Path) -> dict[str, Any]:
    """An artifact an earlier ``--export-only`` run wrote (its parity record comes from its manifest)."""
    from apt_deploy.manifest import read_manifest

    out = workdir / v.name
    log.info("reusing %s", out)
    return {"path": str(out), "export_s": None, "reused": True, **_parity(read_manifest(out))}


def rows(report: dict[str, Any], dims: dict[str, int]) -> list[dict[str, Any]]:
    p50 = {a["name"]: a["stats"]["p50_ms"] for a in report["artifacts"]}
    base_macs, base = meter_macs(**dims), p50[VARIANTS[0].name]
    out = []
    for v in VARIANTS:
        extra = extra_macs(v.method, v.form, v.p, dims["d"], dims["ffn"], dims["cross_layers"], dims["n_img"], dims["n_txt"])
        measured, predicted = p50[v.name] / base - 1.0, extra / base_macs
        out.append({"name": v.name, "method": v.method, "form": v.form, "p50_ms": p50[v.name], "overhead_measured": measured,
                    "extra_gmacs": extra / 1e9, "overhead_predicted": predicted,
                    "measured_over_predicted": measured / predicted if predicted else None})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/apt_bench_meter", help="where the ONNX artifacts go (never commit them)")
    p.add_argument("--out", default=None,
                   help=f"the JSON (default benchmarks/results/meter_b_variants.json; with --smoke {SMOKE_OUT})")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-wait", type=float, default=None,
                   help="seconds to wait for a quiet machine before timing (default 300; 0 with --smoke)")
    p.add_argument("--keep", action="store_true", help="keep --workdir afterwards")
    p.add_argument("--export-only", action="store_true", help="export the artifacts (kept), time nothing; time them "
                   "later with --reuse on a quiet machine")
    p.add_argument("--reuse", action="store_true", help="reuse artifacts already in --workdir (same seeded model)")
    p.add_argument("--smoke", action="store_true", help="a tiny METER: checks the pipeline in minutes (numbers meaningless)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """1. build METER-B  2. export every variant (parity-checked)  3. time them interleaved  4. write the JSON."""
    import torch

    from apt_deploy.cli import setup_logging
    from apt_deploy.models.meter import MeterModel, meter_b_config, tiny_meter_config
    from engines.bench import benchmark, format_table

    args = parse_args(argv)
    out = Path(args.out or (SMOKE_OUT if args.smoke else "benchmarks/results/meter_b_variants.json"))
    setup_logging(verbose=0, quiet=False)  # the CLI's: INFO, library chatter at WARNING
    config = tiny_meter_config(image_size=IMAGE, max_text_len=TEXT_LEN) if args.smoke else meter_b_config(IMAGE)
    torch.manual_seed(0)
    base = MeterModel(config).eval()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    exports = {v.name: reused(v, workdir) if args.reuse and (workdir / v.name / "manifest.json").is_file()
               else export(v, base, workdir) for v in VARIANTS}
    del base
    gc.collect()
    if args.export_only:
        log.info("exported %d variants to %s (time them with --reuse)", len(exports), workdir)
        return 0
    other = wait_for_quiet(args.max_wait if args.max_wait is not None else 0.0 if args.smoke else 300.0)
    settings = BenchSettings(iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    report = benchmark([exports[v.name]["path"] for v in VARIANTS], settings)
    log.info("METER variants:\n%s", format_table(report))
    dims = shape(config)
    write_json_atomic(out, {"kind": "apt-deploy-bench-meter", "created": now_iso(), "command": sys.argv,
                            "smoke": args.smoke, "shape": dims, "prompts": PROMPTS, "rank": RANK,
                            "base_gmacs": meter_macs(**dims) / 1e9, "other_cores_before": other,
                            "exports": exports, "report": report, "rows": rows(report, dims)})
    log.info("wrote %s", out)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
