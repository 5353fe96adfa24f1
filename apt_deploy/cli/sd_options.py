"""Stable Diffusion options of ``apt-deploy train`` (no heavy imports: ``--help`` works without torch)."""

from __future__ import annotations

import argparse


def add_sd_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Stable Diffusion (--backbone sd)")
    g.add_argument("--sites", choices=("attn2", "attn1+attn2"), default="attn2",
                   help="attentions that get APT: cross-attention only (default) or self- and cross-attention")
    g.add_argument("--resolution", type=int, default=None,
                   help="training image side in pixels (default: the model's native size, 512 for SD 1.5)")


def run_sd_demo_from_args(args: argparse.Namespace) -> int:
    """``apt-deploy demo --backbone sd``: the ViLT demo's flags keep their meaning; their ViLT defaults
    (workdir, 1500 steps, p=50) are replaced by the SD demo's own unless given."""
    from apt_deploy.sd_demo import SDDemoSettings, run_sd_demo

    base = SDDemoSettings()
    given = {"workdir": (args.workdir, "apt-deploy-demo"), "steps": (args.steps, 1500),
             "prompt_len": (args.prompt_len, 50), "rank": (args.rank, base.rank), "seed": (args.seed, base.seed),
             "latency_iterations": (args.latency_iterations, 100)}
    overrides = {k: v for k, (v, vilt_default) in given.items() if v != vilt_default}
    print_sd_summary(run_sd_demo(SDDemoSettings(**overrides)))
    return 0


def print_sd_summary(s: dict) -> None:
    t, e, g, lat = s["training"], s["export"], s["generate"], s["latency"]
    rows = [
        ("model", f"Stable Diffusion ({s['settings']['size']} config), RANDOM WEIGHTS (no pretrained weights reachable)"),
        ("parameters", f"{t['model_parameters']:,} (APT {t['apt_parameters']:,} on {s['settings']['sites']})"),
        ("denoising loss, fixed eval set", f"{t['eval_loss_before']:.4f} before -> {t['eval_loss_after']:.4f} after "
                                           f"{t['steps']} steps ({t['seconds']:.1f} s)"),
        ("exported components", ", ".join(f"{k} (ORT vs torch max abs {v:.1e})" for k, v in e["components"].items())),
        ("fused APT nodes in the UNet", str(e["fused_nodes"])),
        ("parity: training vs folded", f"max abs {e['training_vs_folded']:.2e}"),
        ("image (ONNX Runtime)", f"{g['image']} ({g['size']}x{g['size']}, {g['steps']} steps, '{g['prompt']}')"),
        ("  vs diffusers pipeline", f"max abs {g['max_abs_vs_diffusers']:.2e} on pixels in [0, 1]"),
        ("UNet step, ORT CPU, batch 2 (p50)", f"base {lat['stats']['base']['p50_ms']:.2f} ms, APT "
                                               f"{lat['stats']['apt']['p50_ms']:.2f} ms (x{lat['p50_ratio']['apt']:.3f})"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\napt-deploy demo --backbone sd summary")
    for k, val in rows:
        print(f"  {k:<{width}}  {val}")
    print(f"\n{s['note']}\nartifact: {e['artifact']}  (try: apt-deploy generate {e['artifact']} --prompt 'a cat' "
          "--out cat.png -v)")
