"""Per-step latency of an SD 1.5-shaped UNet with APT on ONNX Runtime CPU, next to the FLOP floor (issue 9 item 6).

The UNet is diffusers' ``UNet2DConditionModel`` with Stable Diffusion 1.5's config written out below
(859.5 M parameters, random weights: latency does not depend on values), fp32, one evaluation = one
denoising step at batch 2 (classifier-free guidance) on 4 x 64 x 64 latents and 77 x 768 text states.
The VAE and the text encoder are small stand-ins: only the UNet component is exported and timed.

Variants: base; APT (rank 4) on attn2 at p = 16 / 64 / 200; on attn1 + attn2 at p = 64. Each is
exported with ``export_artifact`` (UNet component only: ONNX Runtime vs PyTorch, training vs folded and
every fused node checked before anything is timed), then timed with ``engines.bench.benchmark``,
interleaved in one process. Peer: diffusers' PyTorch UNet (eager, the base weights, same inputs).

Memory: one fp32 ONNX Runtime session of this UNet holds ~3.4 GB of weights plus its arena (the
64 x 64 self-attention scores are ~1 GB per batch of 2), the PyTorch model 3.4 GB; six of them at once do
not fit 24 GiB. So the paths are timed in groups, each group in a fresh process (spawned, so memory of
one group never counts in the next): the base plus ``--per-process`` APT variants (default 1: pairs),
and the base with the PyTorch peer. The base is re-timed in every group; each overhead is the paired
ratio to the base of its own group (engines.stats.paired_ratio: per-round ratios, bootstrap CI).

FLOP floor (shared/specs/stable-diffusion.md §1): APT adds 4 p N C FLOPs per module (x K^T and A V,
N tokens of width C); ``unet_flops`` counts the base UNet with torch's FlopCounterMode on the meta
device and N, C per attention with forward hooks in the same pass (0.37 % for attn2 at p = 64).

    python scripts/bench_sd_unet.py --threads 2 --export-only --keep          # exports, any machine load
    python scripts/bench_sd_unet.py --threads 2 --reuse --iterations 8        # timing, idle machine
    python scripts/bench_sd_unet.py --smoke --iterations 2                    # tiny UNet, pipeline check
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt_deploy.fileio import write_json_atomic
from apt_deploy.manifest import now_iso
from apt_deploy.settings import BenchSettings

log = logging.getLogger("bench_sd_unet")

# Stable Diffusion 1.5's unet/config.json, written out (runwayml/stable-diffusion-v1-5): no download.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
# --smoke: two levels (one with cross-attention), 32-64 channels, 16 x 16 latents (numbers meaningless).
SMOKE_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 16, "block_out_channels": (32, 64), "layers_per_block": 1,
                              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32}
RANK, TEXT_LEN, CFG_BATCH, SEED = 4, 77, 2, 0
WITHIN = 1.5  # the target: measured overhead within 1.5x of the FLOP floor
PEER = "base@torch-eager"
GROUP_METHOD = ("each group in a fresh spawned process: the ONNX Runtime base plus --per-process APT variants, or the "
                "base plus the PyTorch peer; paths of a group interleaved (engines.bench: seeded shuffled order per "
                "round); the base is re-timed in every group and each ratio is paired with the base of its own group")


@dataclass(frozen=True)
class UNetVariant:
    """``sites`` "" is the base UNet; else APT on "attn2" or "attn1+attn2" with ``p`` prompts."""

    sites: str = ""
    p: int = 0

    @property
    def name(self) -> str:
        return f"apt_{self.sites.replace('+', '_')}_p{self.p}" if self.sites else "base"


BASE = UNetVariant()
VARIANTS = [BASE, UNetVariant("attn2", 16), UNetVariant("attn2", 64), UNetVariant("attn2", 200),
            UNetVariant("attn1+attn2", 64)]


def unet_config(smoke: bool) -> dict[str, Any]:
    return dict(SMOKE_UNET if smoke else SD15_UNET)


def build_unet(cfg: dict[str, Any], seed: int = SEED) -> Any:
    """The seeded random UNet (the same weights on every call with the same seed)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).eval()


def build_model(cfg: dict[str, Any], seed: int = SEED) -> Any:
    """A StableDiffusionModel around the UNet; VAE (4 levels: latent x 8 = pixels, as SD) and text encoder
    are small stand-ins, never exported here."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from apt_deploy.backbones.sd import StableDiffusionModel
    from apt_deploy.backbones.sd_tiny import byte_level_tokenizer

    unet, tokenizer = build_unet(cfg, seed), byte_level_tokenizer(TEXT_LEN)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[32] * 4, in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=1, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=len(tokenizer),
                                        max_position_embeddings=TEXT_LEN, hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionModel(unet, vae, text, tokenizer, scheduler).eval()


def unet_flops(cfg: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one UNet evaluation at batch 1 (FlopCounterMode, meta device) and N x C of every
    transformer-block attention (its ``hidden_states`` [B, N, C], read by forward hooks in the same pass)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    tokens: dict[str, tuple[int, int]] = {}

    def hook(name: str) -> Any:
        def record(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            tokens[name] = (int(h.shape[-2]), int(h.shape[-1]))
        return record

    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] in ("attn1", "attn2") and ".transformer_blocks." in name:
            module.register_forward_hook(hook(name), with_kwargs=True)
    side = cfg["sample_size"]
    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.empty(1, cfg["in_channels"], side, side), torch.empty(1), torch.empty(1, TEXT_LEN, cfg["cross_attention_dim"]))
    return {"flops_per_sample": int(counter.get_total_flops()), "attention_tokens_x_width": tokens,
            "parameters": sum(p.numel() for p in unet.parameters())}


def apt_flops(v: UNetVariant, tokens: dict[str, tuple[int, int]]) -> int:
    """FLOPs APT adds per sample: 4 p N C over the attentions it sits on (ReLU / row max / adds ignored)."""
    if not v.sites:
        return 0
    kinds = tuple(v.sites.split("+"))
    return 4 * v.p * sum(n * c for name, (n, c) in tokens.items() if name.rsplit(".", 1)[-1] in kinds)


def export_settings(cfg: dict[str, Any]) -> Any:
    """Batch 1..2 (CFG: the UNet sees 2 at opt), latent side opt = the config's, min one unit below."""
    from apt_deploy.settings import ExportSettings

    opt, unit = cfg["sample_size"] * 8, 8 * 2 ** (len(cfg["block_out_channels"]) - 1)
    return ExportSettings(batch_min=1, batch_opt=1, batch_max=1, image_size=opt, image_min=opt - unit, image_max=opt,
                          overwrite=True, components=("unet",))


def export_variant(v: UNetVariant, cfg: dict[str, Any], workdir: Path, reuse: bool) -> dict[str, Any]:
    """Export one variant's UNet (parity-checked by the exporter); returns its path and checks. Run in a
    fresh process (``export_all``): its peak RSS is recorded."""
    import apt_deploy as ad
    from apt_deploy.cli import setup_logging
    from apt_deploy.backbones.sd import apply_sd_apt
    from apt_deploy.experiments.bench_variants import randomize
    from apt_deploy.manifest import read_manifest
    from exporters.onnx_export import export_artifact

    out = workdir / v.name
    if reuse and (out / "unet" / "manifest.json").is_file():
        return {"path": str(out / "unet"), "reused": True, **checks(read_manifest(out / "unet"))}
    setup_logging(verbose=0, quiet=False)
    t0 = time.perf_counter()
    model = build_model(cfg)
    if v.sites:
        apply_sd_apt(model, ad.APTConfig(prompt_len=v.p, rank=RANK), v.sites)
        randomize(model, SEED)
    export_artifact(model, out, export_settings(cfg), source={"variant": v.name})
    return {"path": str(out / "unet"), "export_s": round(time.perf_counter() - t0, 1), "export_peak_rss_mb": peak_rss_mb(),
            **checks(read_manifest(out / "unet"))}


def checks(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the exporter verified, from the UNet component's manifest."""
    v = manifest.get("validation", {})
    runs = v.get("onnxruntime_vs_torch", {}).get("runs", [])
    tvf = v.get("training_vs_folded", {}).get("runs", [])
    return {"ort_vs_torch_max_abs": max((o["max_abs"] for r in runs for o in r["outputs"]), default=None),
            "ort_vs_torch_shapes": [r["shapes"] for r in runs],
            "training_vs_folded_max_abs": max((o["max_abs"] for r in tvf for o in r["outputs"]), default=None),
            "fused_op_vs_reference_max_abs": v.get("fused_op_vs_reference", {}).get("max_abs"),
            "fused_op_nodes": manifest["fused_op"]["count"], "base_fingerprint": manifest["sha256"]["base_weights"]}


class UNetPeer:
    """diffusers' UNet as a bench peer: ``forward(**feed)`` -> [out_sample] (picklable factory)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def __call__(self) -> Any:
        from torch import nn

        unet = build_unet(self.cfg)

        class Step(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet

            def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any) -> list[Any]:
                return [self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]]

        return Step().eval()


def groups(names: list[str], per_process: int, peer: bool) -> list[list[str]]:
    """[base, variants...] chunks of ``per_process`` APT variants, then [base, PEER]."""
    apt = [n for n in names if n != BASE.name]
    out = [[BASE.name, *apt[i:i + per_process]] for i in range(0, len(apt), per_process)]
    return out + ([[BASE.name, PEER]] if peer else [])


def run_group(group: list[str], paths: dict[str, str], cfg: dict[str, Any], settings: BenchSettings) -> dict[str, Any]:
    """Time one group in this (fresh) process; the PEER entry becomes a PyTorch target on the base's inputs."""
    from apt_deploy.cli import setup_logging
    from engines.bench import benchmark, format_table, load_artifacts, peer_target

    setup_logging(verbose=0, quiet=False)
    extra = []
    if PEER in group:
        art = load_artifacts([paths[BASE.name]])[0]
        extra = [peer_target(art, "torch-eager", UNetPeer(cfg), settings.threads, PEER)]
    report = benchmark([paths[n] for n in group if n != PEER], settings, extra=extra)
    log.info("group %s:\n%s", group, format_table(report))
    return {**report, "group_peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float | None:
    """This process's own RSS high-water mark (VmHWM; getrusage's ru_maxrss is inherited from the parent
    across fork + exec on Linux, so in a spawned child it can report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None
    return round(kb / 1024, 1)


def in_fresh_process(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a spawned process (its memory is returned to the OS when it ends)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def run_groups(plan: list[list[str]], paths: dict[str, str], cfg: dict[str, Any], settings: BenchSettings,
               max_wait: float) -> list[dict[str, Any]]:
    from apt_deploy.experiments.bench_variants import wait_for_quiet

    out = []
    for i, group in enumerate(plan, 1):
        other = wait_for_quiet(max_wait)
        log.info("group %d/%d: %s", i, len(plan), ", ".join(group))
        report = in_fresh_process(run_group, group, paths, cfg, settings)
        out.append({"paths": group, "other_cores_before": other, "report": report})
    return out


def _name(entry: dict[str, Any], paths: dict[str, str]) -> str:
    """A report entry's variant name (reports name artifacts "<variant>/unet")."""
    return entry["name"] if entry["runner"] != "onnxruntime" else entry["name"].split("/")[0]


def verdict(low: float, high: float, bound: float) -> str:
    """'yes' when the whole interval is at or below ``bound``, 'no' when all above, else 'not resolved'."""
    return "yes" if high <= bound else "no" if low > bound else "not resolved"


def rows(results: list[dict[str, Any]], flops: dict[str, Any], paths: dict[str, str]) -> list[dict[str, Any]]:
    """Per APT variant: overhead over the base of its group (paired ratio + CI) beside the FLOP floor."""
    from engines.stats import paired_ratio

    by_name = {v.name: v for v in VARIANTS}
    out = []
    for g in results:
        entries = {_name(a, paths): a for a in g["report"]["artifacts"]}
        base = entries[BASE.name]
        for name, a in entries.items():
            if name == BASE.name or name == PEER:
                continue
            v, est = by_name[name], paired_ratio(base["times_ms"], a["times_ms"])
            predicted = apt_flops(v, flops["attention_tokens_x_width"]) / flops["flops_per_sample"]
            low, high = est.low - 1.0, est.high - 1.0
            out.append({"name": name, "sites": v.sites, "p": v.p, "rank": RANK, "p50_ms": a["stats"]["p50_ms"],
                        "base_p50_ms": base["stats"]["p50_ms"], "overhead_measured": est.ratio - 1.0,
                        "overhead_ci95": [low, high], "overhead_predicted": predicted,
                        "extra_gflops_per_sample": apt_flops(v, flops["attention_tokens_x_width"]) / 1e9,
                        "measured_over_predicted": (est.ratio - 1.0) / predicted,
                        f"within_{WITHIN}x_floor": verdict(low, high, WITHIN * predicted),
                        "rounds": len(a["times_ms"]), "ratio_estimate": est.to_json()})
    return out


def peer_row(results: list[dict[str, Any]], paths: dict[str, str]) -> dict[str, Any] | None:
    """PyTorch eager / ONNX Runtime base per step, paired in the peer's group."""
    from engines.stats import paired_ratio

    for g in results:
        entries = {_name(a, paths): a for a in g["report"]["artifacts"]}
        if PEER in entries:
            est = paired_ratio(entries[BASE.name]["times_ms"], entries[PEER]["times_ms"])
            return {"name": PEER, "p50_ms": entries[PEER]["stats"]["p50_ms"], "ort_p50_ms": entries[BASE.name]["stats"]["p50_ms"],
                    "torch_over_ort": est.ratio, "torch_over_ort_ci95": [est.low, est.high],
                    "ort_faster": "yes" if est.low > 1.0 else "no" if est.high < 1.0 else "not resolved",
                    "ratio_estimate": est.to_json()}
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/apt_bench_sd_unet", help="where the ONNX artifacts go (~3.3 GB each; never commit)")
    p.add_argument("--out", default="benchmarks/results/sd_unet_step.json")
    p.add_argument("--iterations", type=int, default=8, help="interleaved rounds per group")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-process", type=int, default=1,
                   help="APT variants timed in one process beside the base (memory: ~5 GB per ONNX Runtime session)")
    p.add_argument("--no-peer", action="store_true", help="do not time diffusers' PyTorch UNet")
    p.add_argument("--reuse", action="store_true", help="reuse exports already in --workdir")
    p.add_argument("--keep", action="store_true", help="keep --workdir afterwards")
    p.add_argument("--export-only", action="store_true", help="export (parity-checked), time nothing; then --reuse")
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine before each group")
    p.add_argument("--smoke", action="store_true", help="a tiny UNet of the same structure: checks the pipeline in minutes")
    return p.parse_args(argv)


def export_all(cfg: dict[str, Any], workdir: Path, reuse: bool) -> dict[str, dict[str, Any]]:
    from apt_deploy.progress import timed_step

    workdir.mkdir(parents=True, exist_ok=True)
    exports = {}
    for i, v in enumerate(VARIANTS, 1):
        with timed_step(f"export {i}/{len(VARIANTS)}: {v.name}", log):
            exports[v.name] = in_fresh_process(export_variant, v, cfg, workdir, reuse)
    return exports


def main(argv: list[str] | None = None) -> int:
    """1. FLOP floor  2. export every variant (parity-checked)  3. time the groups  4. write the JSON."""
    from apt_deploy.cli import setup_logging

    args = parse_args(argv)
    setup_logging(verbose=0, quiet=False)
    cfg, workdir = unet_config(args.smoke), Path(args.workdir)
    flops = unet_flops(cfg)
    exports = export_all(cfg, workdir, args.reuse)
    if args.export_only:
        return 0
    paths = {k: e["path"] for k, e in exports.items()}
    settings = BenchSettings(batch=CFG_BATCH, iterations=args.iterations, warmup=args.warmup, threads=args.threads)
    plan = groups([v.name for v in VARIANTS], args.per_process, not args.no_peer)
    results = run_groups(plan, paths, cfg, settings, args.max_wait)
    write_json_atomic(Path(args.out), {
        "kind": "apt-deploy-bench-sd-unet", "created": now_iso(), "command": sys.argv, "smoke": args.smoke,
        "unet_config": cfg, "latent": [CFG_BATCH, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]],
        "text": [CFG_BATCH, TEXT_LEN, cfg["cross_attention_dim"]], "rank": RANK, "dtype": "fp32",
        "base_parameters": flops["parameters"], "base_gflops_per_sample": flops["flops_per_sample"] / 1e9,
        "flop_method": "torch FlopCounterMode on the meta device (conv, matmul, SDPA); APT 4 p N C per module",
        "group_method": GROUP_METHOD, "per_process": args.per_process, "exports": exports,
        "groups": [{"paths": g["paths"], "other_cores_before": g["other_cores_before"],
                    "group_peak_rss_mb": g["report"]["group_peak_rss_mb"], "report": g["report"]} for g in results],
        "rows": rows(results, flops, paths), "peer": peer_row(results, paths)})
    log.info("wrote %s", args.out)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
