"""``apt-deploy loadtest``: bounded concurrent requests against a KServe v2 endpoint (loopback by default)."""

from __future__ import annotations

import argparse

NAME = "loadtest"
HELP = "load-test a served model: N requests from C threads, p50/p90/p99 latency, requests/s, errors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="KServe v2 HTTP endpoint, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="model (ensemble) name, e.g. the artifact's name")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--requests", type=int, default=500, help="requests in all (default 500)")
    parser.add_argument("--deadline", type=float, default=120.0, metavar="S", help="stop sending after S seconds (default 120)")
    parser.add_argument("--image", default=None, metavar="PATH", help="image to send (default: a 64x64 random PNG)")
    parser.add_argument("--question", default=None, help="question for VQA models (default: a fixed one)")
    parser.add_argument("--task", default=None, metavar="NAME", help="the task to ask, on a multi-task artifact")
    parser.add_argument("--allow-remote", action="store_true", help="allow a host that is not loopback")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON report here")


def run(args: argparse.Namespace) -> int:
    import json

    from apt_deploy.serving.loadtest import LoadSettings, check_url, default_image, run_loadtest

    check_url(args.url, args.allow_remote)  # refuse a remote host before anything else
    image = _read_image(args.image) if args.image else default_image()
    settings = LoadSettings(concurrency=args.concurrency, requests=args.requests, deadline_s=args.deadline)
    report = run_loadtest(args.url, args.model, image, args.question, settings, args.allow_remote, args.task)
    if args.out:
        from apt_deploy.fileio import write_json_atomic

        write_json_atomic(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lat = report["latency_ms"]
        print(f"{report['completed']}/{args.requests} ok, {report['errors']} errors, {report['not_sent']} not sent, "
              f"{report['requests_per_s']} req/s, p50 {lat.get('p50_ms')} ms, p90 {lat.get('p90_ms')} ms, "
              f"p99 {lat.get('p99_ms')} ms (concurrency {args.concurrency})")
        for sample in report["error_samples"]:
            print(f"  error: {sample}")
    return 0 if report["errors"] == 0 and report["not_sent"] == 0 else 2


def _read_image(path: str) -> bytes:
    from pathlib import Path

    from apt_deploy.errors import InputPathError

    if not Path(path).is_file():
        raise InputPathError(f"image {path!r} does not exist", "an image file", "check --image")
    return Path(path).read_bytes()
