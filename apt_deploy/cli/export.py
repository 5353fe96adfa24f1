"""``apt-deploy export``: fold a trained prompt checkpoint into its base model and write an ONNX artifact."""

from __future__ import annotations

import argparse

from apt_deploy.cli.common import add_export_arguments, add_model_arguments, add_output_arguments, parse_ints, refuse_existing

NAME = "export"
HELP = "fold prompts into the model and export ONNX (one fused op per APT module) + manifest, validated on ONNX Runtime"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, prompts_required=False, many_tasks=True)
    add_output_arguments(parser, "artifact (model.onnx + manifest.json)")
    add_export_arguments(parser)
    parser.add_argument("--max-tasks", type=int, default=64,
                        help="with NAME=DIR prompts: the most tasks the artifact's bank inputs accept (default 64)")


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
    if isinstance(args.prompts, str):
        args.prompts = [args.prompts]
    tasks = task_pairs(args.prompts)
    if tasks is not None:
        return _run_multitask(args, tasks, settings)
    args.prompts = args.prompts[0] if args.prompts else None
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


def task_pairs(prompts: list[str] | None) -> list[tuple[str, str]] | None:
    """``--prompts NAME=DIR ...`` -> [(name, dir)]; None for the single-task form (one DIR, no ``=``)."""
    from apt_deploy.errors import ConfigError

    if not prompts or (len(prompts) == 1 and "=" not in prompts[0]):
        return None
    pairs = [p.partition("=") for p in prompts]
    bad = [p for p, (name, eq, path) in zip(prompts, pairs) if not (name and eq and path)]
    if bad:
        raise ConfigError(f"--prompts {' '.join(prompts)} (not NAME=DIR: {', '.join(bad)})",
                          "one PROMPT_DIR, or NAME=DIR pairs for a multi-task artifact",
                          "write each task as NAME=DIR, e.g. --prompts vqa=runs/vqa colors=runs/colors")
    return [(name, path) for name, _, path in pairs]


def _run_multitask(args: argparse.Namespace, tasks: list[tuple[str, str]], settings) -> int:
    from pathlib import Path

    from apt_deploy.pipeline import load_trained
    from exporters.multitask import export_multitask_artifact

    models = [load_trained(args.model, path, args.backbone) for _, path in tasks]
    sources = {name: str(Path(path).resolve()) for name, path in tasks}
    out = export_multitask_artifact([n for n, _ in tasks], models, args.out, settings, sources,
                                    model_dir=str(Path(args.model).resolve()), max_tasks=args.max_tasks)
    print(f"wrote {out}/model.onnx, {out}/manifest.json and the prompt bank of {len(tasks)} tasks "
          f"({', '.join(n for n, _ in tasks)})")
    return 0
