"""``apt-deploy serve``: a real Triton server (the one bundled in nvidia-pytriton) for an artifact or a repository."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "serve an artifact (or a python-backend model repository) with tritonserver: KServe v2 HTTP + gRPC, metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="ARTIFACT_DIR|REPO", help="an exported artifact, or a repository of apt-deploy "
                        "triton-repo --backend python")
    parser.add_argument("--name", default=None, help="model name for an artifact (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=None, help="max_batch_size (default: the export's max batch)")
    parser.add_argument("--instances", type=int, default=1, help="instances of every model (default 1)")
    parser.add_argument("--top-k", type=int, default=5, help="labels per answer (default 5)")
    parser.add_argument("--max-image-bytes", type=int, default=16 * 2**20, help="larger images get HTTP 400 (default 16 MiB)")
    parser.add_argument("--log", default=None, metavar="FILE", help="write tritonserver's output here")


def _warn_if_exposed(host: str) -> None:
    import logging

    from apt_deploy.serving.loadtest import is_loopback

    if not is_loopback(host):
        logging.getLogger(__name__).warning("binding %s: the server (no authentication) is reachable from other "
                                            "machines; put it behind your own gateway", host)


class _Stop(Exception):
    """Raised by the SIGINT / SIGTERM handler to leave the server's context (which stops it)."""


def run(args: argparse.Namespace) -> int:
    import signal
    from pathlib import Path
    import tempfile
    import time

    from apt_deploy.serving.server import Endpoints, TritonServer, repository_for

    def stop(signum: int, frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    endpoints = Endpoints(args.host, args.http_port, args.grpc_port, args.metrics_port)
    _warn_if_exposed(args.host)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tempfile.TemporaryDirectory(prefix="apt-deploy-serve-") as work:
            repo = repository_for(args.path, args.name, Path(work), max_batch=args.max_batch,
                                  instances=args.instances, top_k=args.top_k, max_image_bytes=args.max_image_bytes)
            with TritonServer(repo, endpoints, log_file=args.log) as server:
                print(f"serving {repo} -- KServe v2 HTTP {endpoints.http_url}, gRPC {args.host}:{args.grpc_port}, "
                      f"metrics http://{args.host}:{args.metrics_port}/metrics; Ctrl-C or SIGTERM stops it", flush=True)
                while server.process is not None and server.process.poll() is None:
                    time.sleep(0.5)
                code = server.process.returncode if server.process is not None else None
        print(f"tritonserver exited on its own (code {code})")
        return 2
    except _Stop as e:
        print(f"stopped ({e})", flush=True)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
