"""``apt-deploy verify``: re-run an artifact's parity checks from the artifact and its manifest."""

from __future__ import annotations

import argparse

NAME = "verify"
HELP = "re-check an exported artifact: file hashes, ONNX checker, fused op vs numpy, backend vs PyTorch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT_DIR", help="directory written by apt-deploy export")
    parser.add_argument("--model", default=None, help="base model directory (default: the manifest's source)")
    parser.add_argument("--prompts", default=None, help="prompt directory (default: the manifest's source)")
    parser.add_argument("--backend", default="onnxruntime", help="runner backend: onnxruntime (default), trt, torch-cuda")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    from apt_deploy.fileio import write_json_atomic
    from apt_deploy.verification import verify_artifact

    report = verify_artifact(args.artifact, args.model, args.prompts, backend=args.backend)
    for check, value in report.items():
        print(f"{check}: {_summary(value)}")
    if args.json:
        write_json_atomic(args.json, report)
    print("verify: OK")
    return 0


def _summary(value: dict) -> str:
    if "runs" in value:
        worst = max(o["max_abs"] for r in value["runs"] for o in r["outputs"])
        return f"max abs {worst:.2e} (tolerance atol={value['tolerance']['atol']:g}) over {len(value['runs'])} shape sets"
    if "nodes" in value:
        return f"{value['nodes']} nodes, max abs {value['max_abs']:.2e}"
    if "skipped" in value:
        return f"SKIPPED: {value['skipped']}"
    return ", ".join(f"{k}={v}" for k, v in value.items())
