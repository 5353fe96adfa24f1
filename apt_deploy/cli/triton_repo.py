"""``apt-deploy triton-repo``: a Triton model repository (model, pre/post python models, ensemble) from artifacts."""

from __future__ import annotations

import argparse

NAME = "triton-repo"
HELP = "write a validated Triton model repository: per artifact the model, python pre/post models and an ensemble"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="+", metavar="[NAME=]ARTIFACT_DIR",
                        help="artifact directories (model name: the directory's name unless NAME= is given)")
    parser.add_argument("--out", required=True, metavar="REPO", help="repository directory to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace REPO if it exists")
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt", "python"), default="onnxruntime",
                        help="model step: onnxruntime_onnx (default), tensorrt_plan (engine of apt-deploy build), "
                             "or python (ONNX Runtime inside a python-backend model)")
    parser.add_argument("--engine", default=None, metavar="PLAN", help="tensorrt: the engine (default: the artifact's)")
    parser.add_argument("--max-batch", type=int, default=None, help="max_batch_size (default: the export's max batch)")
    parser.add_argument("--instances", type=int, default=1, help="instances of every model (default 1)")
    parser.add_argument("--top-k", type=int, default=5, help="labels returned per request (default 5)")
    parser.add_argument("--queue-delay-us", type=int, default=500, help="dynamic batcher's max queue delay (default 500)")


def settings_from_args(args: argparse.Namespace):
    from apt_deploy.settings import TritonRepoSettings

    return TritonRepoSettings(backend=args.backend, max_batch=args.max_batch, instances=args.instances, top_k=args.top_k,
                              queue_delay_us=args.queue_delay_us, engine=args.engine)


def run(args: argparse.Namespace) -> int:
    from apt_deploy.cli.common import refuse_existing

    refuse_existing(args.out, args.overwrite)
    from apt_deploy.serving.triton_repo import build_repository, parse_artifact_args

    report = build_repository(parse_artifact_args(args.artifacts), args.out, settings_from_args(args), args.overwrite)
    print(f"wrote {args.out}: {', '.join(report['models'])} (every config.pbtxt re-parsed and checked)")
    from pathlib import Path

    print(f"run it: docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v {Path(args.out).resolve()}:/models "
          "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models  (see docs/serving.md)")
    return 0
