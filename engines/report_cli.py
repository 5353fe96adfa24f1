"""The tail every JSON-report script shares (kernel benchmark, GPU latency, TensorRT A/B): run, print the
report, write it atomically with ``--out``, and turn apt-deploy errors into exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def report_main(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> int:
    """``run(args)`` -> report; printed as JSON and written to ``args.out`` when given. Exit 2 on AptDeployError."""
    from apt_deploy.errors import AptDeployError
    from apt_deploy.fileio import write_json_atomic

    try:
        report = run(args)
    except AptDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "out", None):
        write_json_atomic(args.out, report)
    print(json.dumps(report, indent=1))
    return 0
