"""``apt-deploy import``: an official checkpoint (METER / APT-METER, APT-ViLT in the original ViLT key names) -> a model directory apt-deploy
loads (+ a prompt checkpoint v1 when the checkpoint holds APT tensors)."""

from __future__ import annotations

import argparse
import logging

from apt_deploy.errors import UnknownNameError

NAME = "import"
HELP = ("convert an official METER / APT-METER or APT-ViLT checkpoint (Lightning .ckpt, .pt/.pth, .safetensors; "
        "loaded weights-only) to a model directory, and its APT tensors to a prompt checkpoint")
IMPORTABLE = ("meter", "vilt")
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help=f"checkpoint family: {', '.join(IMPORTABLE)}")
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="official checkpoint (.ckpt with "
                        "'state_dict', or a plain state dict in .pt/.pth/.safetensors); never unpickles code")
    parser.add_argument("--model-out", required=True, metavar="MODEL_DIR", help="model directory to write (must not exist)")
    parser.add_argument("--prompts-out", metavar="PROMPT_DIR", help="prompt checkpoint to write the APT tensors to "
                        "(required when the checkpoint has them; must not exist)")
    parser.add_argument("--image-size", type=int, help="meter: run resolution; the position table is re-gridded "
                        "bicubically when it differs from the checkpoint's (a multiple of the patch size); "
                        "not for vilt, which interpolates at run time")
    parser.add_argument("--tokenizer", metavar="DIR", help="local tokenizer saved next to the weights "
                        "(meter: roberta-base; vilt: bert-base-uncased)")
    parser.add_argument("--num-labels", type=int, help="pre-training checkpoint (no task head): start a "
                        "fresh VQA head with N answers")
    parser.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR / PROMPT_DIR if they exist")


def run(args: argparse.Namespace) -> int:
    if args.backbone not in IMPORTABLE:
        raise UnknownNameError("backbone for import", args.backbone, IMPORTABLE)
    if args.backbone == "meter":
        from apt_deploy.importers.meter import import_meter as convert
    else:
        from apt_deploy.importers.vilt import import_vilt as convert
    report = convert(args.checkpoint, args.model_out, args.prompts_out, args.image_size, args.tokenizer,
                     args.num_labels, args.overwrite)
    print(f"import: wrote {report['model_out']}" + (f" and {report['prompts_out']} ({report['apt_modules']} APT modules)"
                                                    if report["prompts_out"] else ""))
    if report["dropped"]:
        print(f"  dropped {len(report['dropped'])} unused keys: {', '.join(report['dropped'][:6])}"
              + (" ..." if len(report["dropped"]) > 6 else ""))
    return 0
