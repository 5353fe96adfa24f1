"""``apt-deploy generate``: text-to-image from an exported Stable Diffusion artifact (no PyTorch model needed)."""

from __future__ import annotations

import argparse

NAME = "generate"
HELP = ("generate images from a Stable Diffusion artifact: text encoder, UNet (with the fused APT op) and VAE "
        "decoder on ONNX Runtime / TensorRT, diffusers' schedulers, classifier-free guidance, PNG out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT_DIR", help="directory written by apt-deploy export --backbone sd")
    g = parser.add_argument_group("image")
    g.add_argument("--prompt", required=True, help="text prompt (longer than the text encoder's 77 tokens: truncated)")
    g.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the export size, "
                   "512 for SD 1.5)")
    g.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the export size)")
    g.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; <= 1 turns it off "
                   "(default 7.5)")
    g.add_argument("--scheduler", choices=("ddim", "euler", "dpm"), default=None,
                   help="scheduler class, configured from the artifact's scheduler config (default: the model's own)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial latents (torch.Generator, as diffusers)")
    g.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    r = parser.add_argument_group("runtime and output")
    r.add_argument("--backend", default="onnxruntime", help="onnxruntime (default), trt (engines from apt-deploy "
                   "build), torch-cuda")
    r.add_argument("--threads", type=int, default=None, help="intra-op threads (onnxruntime)")
    r.add_argument("--out", required=True, metavar="IMAGE.png", help="PNG to write (IMAGE-<i>.png with --batch > 1)")
    r.add_argument("--overwrite", action="store_true", help="replace existing images")


def run(args: argparse.Namespace) -> int:
    from apt_deploy.generate import generate, image_paths, refuse_existing_images, save_images
    from apt_deploy.settings import GenerateSettings

    settings = GenerateSettings(prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                                width=args.width, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                                seed=args.seed, batch=args.batch, backend=args.backend, threads=args.threads)
    refuse_existing_images(image_paths(args.out, args.batch), args.overwrite)  # before any model is loaded
    result = generate(args.artifact, settings)
    for path in save_images(result.images, args.out, overwrite=args.overwrite):
        print(f"wrote {path}")
    if args.verbose:
        print(format_timings(result))
    return 0


def format_timings(result) -> str:
    rows = [f"  {name:<14} {seconds * 1e3:10.1f} ms" + (f"  ({result.calls[name]} calls, "
                                                        f"{seconds * 1e3 / result.calls[name]:.1f} ms each)"
                                                        if name in result.calls else "")
            for name, seconds in result.seconds.items()]
    return "per-component time:\n" + "\n".join(rows)
