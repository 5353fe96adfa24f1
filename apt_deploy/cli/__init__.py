"""``apt-deploy`` command line: subcommands built from shared argument groups.

Each subcommand lives in its own module (listed in ``COMMANDS``) exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Modules import torch and friends only inside
``run``, so every ``--help`` works on a machine without torch or tensorrt.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from apt_deploy import __version__
from apt_deploy.errors import AptDeployError

COMMANDS: tuple[str, ...] = (
    "apt_deploy.cli.demo",
    "apt_deploy.cli.train",
    "apt_deploy.cli.export",
    "apt_deploy.cli.verify",
    "apt_deploy.cli.bench",
    "apt_deploy.cli.build",
)
COMMANDS += ("apt_deploy.cli.generate",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-deploy", description=__doc__.splitlines()[0].strip("`` "))
    parser.add_argument("--version", action="version", version=f"apt-deploy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "torch", "transformers", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except AptDeployError as e:
        print(f"apt-deploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
