"""``apt-deploy export``: fold a trained prompt checkpoint into its base model and write an ONNX artifact."""

from __future__ import annotations

import argparse

from apt_deploy.cli.common import add_export_arguments, add_model_arguments, add_output_arguments, parse_ints, refuse_existing

NAME = "export"
HELP = "fold prompts into the model and export ONNX (one fused op per APT module) + manifest, validated on ONNX Runtime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, prompts_required=False)
    add_output_arguments(parser, "artifact (model.onnx + manifest.json)")
    add_export_arguments(parser)


def settings_from_args(args: argparse.Namespace):
    from apt_deploy.settings import ExportSettings

    bmin, bopt, bmax = parse_ints(args.batch, 3, "--batch")
    lo, hi = parse_ints(args.image_range, 2, "--image-range") if args.image_range else (None, None)
    return ExportSettings(batch_min=bmin, batch_opt=bopt, batch_max=bmax, text_len=args.text_len,
                          image_size=args.image_size, dynamic_image=args.dynamic_image, image_min=lo, image_max=hi,
                          dtype=args.dtype, validate=not args.no_validate, seed=args.seed, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    refuse_existing(args.out, args.overwrite)
    settings = settings_from_args(args)
    from apt_deploy.pipeline import load_base, load_trained
    from exporters.onnx_export import export_artifact

    source = {"model_dir": str(Path(args.model).resolve())}
    if args.prompts is None:  # the base model: what verify and bench compare APT against
        model = load_base(args.model, args.backbone)
    else:
        model = load_trained(args.model, args.prompts, args.backbone)
        source["prompts_dir"] = str(Path(args.prompts).resolve())
    out = export_artifact(model, args.out, settings, source=source)
    from apt_deploy.manifest import component_dirs, read_manifest

    parts = component_dirs(out, read_manifest(out))
    files = ", ".join(f"{name}/model.onnx" for name, _ in parts) if parts else "model.onnx"
    print(f"wrote {out}/{{{files}}} and {out}/manifest.json" if parts else f"wrote {out}/model.onnx and {out}/manifest.json")
    return 0
