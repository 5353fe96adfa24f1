"""``apt-deploy demo``: the main job on a built-in default (no downloads, no GPU, a few minutes on 2 cores)."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = ("train APT on a built-in synthetic VQA task with a small random-init ViLT (or METER; or Stable Diffusion on captioned images), fold, export to ONNX, "
        "validate parity and time ONNX Runtime (no network, no GPU)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="apt-deploy-demo", help="where the model, prompts and artifacts go")
    parser.add_argument("--backbone", choices=("vilt", "meter", "sd"), default="vilt",
                        help="vilt (default): the VQA job above; meter: a tiny random METER, the official APT-METER "
                             "recipe; sd: a small random-weight Stable Diffusion, APT on its UNet trained on synthetic "
                             "captioned images, exported, an image generated on ONNX Runtime and compared with diffusers "
                             "(uses --workdir/--steps/--prompt-len/--rank/--seed when given)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (default 1500, ~1 min on 2 cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=50, help="APT prompt count p (default 50)")
    parser.add_argument("--rank", type=int, default=4, help="APT rank r (default 4)")
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--latency-iterations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.backbone == "sd":
        from apt_deploy.cli.sd_options import run_sd_demo_from_args

        return run_sd_demo_from_args(args)
    from apt_deploy.demo import run_demo
    from apt_deploy.settings import DemoSettings

    settings = DemoSettings(workdir=args.workdir, backbone=args.backbone, steps=args.steps, batch_size=args.batch_size,
                            num_train=args.num_train, num_test=args.num_test, prompt_len=args.prompt_len,
                            rank=args.rank, latency_iterations=args.latency_iterations, seed=args.seed)
    print_summary(run_demo(settings))
    return 0


def print_summary(s: dict) -> None:
    from apt_deploy.demo import DISPLAY

    t, e, lat = s["training"], s["export"], s["latency"]
    v = e["validation"]
    worst = max(o["max_abs"] for r in v["onnxruntime_vs_torch"]["runs"] for o in r["outputs"])
    rows = [
        ("model", f"{DISPLAY[s['settings'].get('backbone', 'vilt')]}, RANDOM INIT (no pretrained weights reachable)"),
        ("backbone parameters", f"{t['backbone_parameters']:,}"),
        ("trainable parameters", f"{t['trainable_parameters']:,} (APT modules {t['apt_parameters']:,})"),
        ("held-out accuracy", f"{t['accuracy_before']:.3f} before -> {t['accuracy_after']:.3f} after {t['steps']} steps"),
        ("  blind baselines", f"majority answer {t['baselines']['majority_answer']:.3f}, "
                              f"question-only {t['baselines']['question_only']:.3f} (no image)"),
        ("training loss", f"{t['loss_first']:.4f} -> {t['loss_last']:.4f} ({t['seconds']:.1f} s)"),
        ("ONNX size", f"{e['onnx_bytes'] / 1e6:.2f} MB (base {e['base_onnx_bytes'] / 1e6:.2f} MB), "
                      f"{e['fused_nodes']} apt::ApproxPromptDiffusion nodes"),
        ("parity: training vs folded", f"max abs {v['training_vs_folded']['runs'][0]['outputs'][0]['max_abs']:.2e}"),
        ("parity: fused op vs numpy", f"max abs {v['fused_op_vs_reference']['max_abs']:.2e}"),
        ("parity: ONNX Runtime vs PyTorch", f"max abs {worst:.2e}"),
        ("ORT CPU latency, batch 1 (p50)", f"base {lat['stats']['base']['p50_ms']:.2f} ms, APT "
                                           f"{lat['stats']['apt']['p50_ms']:.2f} ms (x{lat['p50_ratio']['apt']:.3f})"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\napt-deploy demo summary")
    for k, val in rows:
        print(f"  {k:<{width}}  {val}")
    print(f"\nartifact: {e['artifact']}  (try: apt-deploy verify {e['artifact']})")
