"""``apt-deploy predict``: answer from an artifact alone (image [+ question] -> top-k labels and scores)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from apt_deploy.errors import ConfigError, InputPathError, UnknownNameError

NAME = "predict"
HELP = "predict from an exported artifact: an image (+ a question for VQA) -> top-k labels with scores"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT_DIR", help="directory written by apt-deploy export")
    src = parser.add_argument_group("request (one of --image or --requests)")
    src.add_argument("--image", default=None, metavar="PATH", help="image file (JPEG, PNG, ...)")
    src.add_argument("--question", default=None, help="the question (VQA artifacts)")
    src.add_argument("--requests", default=None, metavar="FILE.jsonl",
                     help='one request per line: {"image": PATH (relative to the file), "question": TEXT, "id": ...}; '
                          "one JSON result per line out")
    src.add_argument("--task", default=None, metavar="NAME",
                     help="task of a multi-task artifact (export --prompts NAME=DIR ...); JSONL requests may carry "
                          '"task" instead')
    src.add_argument("--text", default=None, help="text prompt (detection artifacts, e.g. grounding_dino)")
    src.add_argument("--threshold", type=float, default=0.3, help="score threshold (detection artifacts; default 0.3)")
    out = parser.add_argument_group("output")
    out.add_argument("--top-k", type=int, default=5, help="labels per answer (default 5)")
    out.add_argument("--json", action="store_true", help='print {"predictions": [{"label", "score"}, ...]}')
    out.add_argument("--out", default=None, metavar="FILE.jsonl", help="with --requests: write results here (default stdout)")
    parser.add_argument("--backend", default="onnxruntime", help="runner backend: onnxruntime (default), trt, torch-cuda")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from apt_deploy.manifest import read_manifest
    from apt_deploy.serving.predict import task_predictor

    special = task_predictor(read_manifest(args.artifact))
    if special is not None:
        predictions = special(args.artifact, args.image, args.text, args.threshold, args.backend)
        return _print(predictions, args.json)
    if args.text is not None:
        raise ConfigError("--text for an artifact that is not a detection model", "--question for VQA, nothing for "
                          "classification (--text/--threshold are for detection backbones such as grounding_dino)",
                          "pass --question TEXT instead")
    from apt_deploy.serving.predict import Predictor

    predictor = Predictor(args.artifact, backend=args.backend, threads=args.threads)
    if args.requests:
        return _run_requests(predictor, args)
    if predictor.needs_question and not args.question:
        raise ConfigError("no --question for a visual question answering artifact", "--question TEXT",
                          'pass e.g. --question "what color is the shape?"')
    return _print(predictor.predict(args.image, args.question, args.top_k, task=args.task), args.json)


def _check_args(args: argparse.Namespace) -> None:
    if bool(args.image) == bool(args.requests):
        raise ConfigError(f"--image {args.image!r} and --requests {args.requests!r}", "exactly one of them",
                          "pass --image PATH for one request or --requests FILE.jsonl for many")
    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}", "an integer >= 1", "pass e.g. --top-k 5")
    if args.out and not args.requests:
        raise ConfigError("--out without --requests", "--out only with --requests", "drop --out")


def _print(predictions: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps({"predictions": predictions}))
    else:
        for p in predictions:
            print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()))
    return 0


def _run_requests(predictor: Any, args: argparse.Namespace) -> int:
    """Read every line first (bad JSON fails before any work), then answer in batches; a request that
    fails (e.g. an undecodable image) gets an ``error`` record and the exit code is 2."""
    requests = read_requests(Path(args.requests))
    results, failed = [], 0
    for start in range(0, len(requests), predictor.max_batch):
        chunk = requests[start:start + predictor.max_batch]
        try:
            answers: list[Any] = predictor.predict_batch([_with_task(r["request"], args.task) for r in chunk], args.top_k)
        except (ConfigError, InputPathError, UnknownNameError):
            answers = [_one(predictor, _with_task(r["request"], args.task), args.top_k) for r in chunk]
        for r, a in zip(chunk, answers):
            failed += isinstance(a, str)
            results.append({**r["meta"], **({"error": a} if isinstance(a, str) else {"predictions": a})})
    _write_jsonl(results, args.out)
    if failed:
        print(f"apt-deploy predict: {failed} of {len(results)} requests failed (see their \"error\")", file=sys.stderr)
    return 2 if failed else 0


def _with_task(request: dict[str, Any], task: str | None) -> dict[str, Any]:
    """--task is the default of requests that carry no "task"."""
    return request if request.get("task") is not None or task is None else {**request, "task": task}


def _one(predictor: Any, request: dict[str, Any], top_k: int) -> Any:
    try:
        return predictor.predict_batch([request], top_k)[0]
    except (ConfigError, InputPathError, UnknownNameError) as e:
        return str(e)


def read_requests(path: Path) -> list[dict[str, Any]]:
    """[{"request": {"image", "question"}, "meta": {"line", "id"?}}] from a JSONL file."""
    if not path.is_file():
        raise InputPathError(f"requests file {str(path)!r} does not exist", "a JSONL file, one request per line",
                             "check --requests")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path.name}:{number} is not JSON ({e})", '{"image": PATH, "question": TEXT}',
                              "fix that line") from e
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise ConfigError(f"{path.name}:{number} has no \"image\" path", '{"image": PATH, "question": TEXT}',
                              "add the image path")
        meta = {"line": number, **({"id": item["id"]} if "id" in item else {})}
        request = {"image": path.parent / item["image"], "question": item.get("question"), "task": item.get("task")}
        out.append({"request": request, "meta": meta})
    return out


def _write_jsonl(results: list[dict[str, Any]], out: str | None) -> None:
    text = "".join(json.dumps(r) + "\n" for r in results)
    if out:
        from apt_deploy.fileio import write_bytes_atomic

        write_bytes_atomic(out, text.encode())
    else:
        sys.stdout.write(text)
