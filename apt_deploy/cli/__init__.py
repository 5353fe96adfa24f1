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
import traceback
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
    "apt_deploy.cli.predict",
    "apt_deploy.cli.triton_repo",
    "apt_deploy.cli.serve",
    "apt_deploy.cli.loadtest",
    "apt_deploy.cli.import_",
)
COMMANDS += ("apt_deploy.cli.generate",)
COMMANDS += ("apt_deploy.cli.add_task",)


def _verbosity_parser(suffix: str) -> argparse.ArgumentParser:
    """-v / -q, before the subcommand (``suffix`` "") or after it ("_after"); main() adds both up."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", dest=f"verbose{suffix}", action="count", default=0,
                   help="more logging (-vv for debug and tracebacks)")
    p.add_argument("-q", "--quiet", dest=f"quiet{suffix}", action="store_true", help="only warnings and errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apt-deploy", description=__doc__.splitlines()[0].strip("`` "),
                                     parents=[_verbosity_parser("")])
    parser.add_argument("--version", action="version", version=f"apt-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    after = _verbosity_parser("_after")
    for module_name in COMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP, parents=[after])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
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
    verbose, quiet = args.verbose + args.verbose_after, args.quiet or args.quiet_after
    setup_logging(verbose, quiet)
    try:
        return int(args._run(args) or 0)
    except AptDeployError as e:
        print(f"apt-deploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # last resort: a library failure no call site converted yet
        return _unexpected(args.command, e, verbose)


def _unexpected(command: str, error: Exception, verbose: int) -> int:
    """Exit 2 with the exception's type and message (the traceback at -vv) instead of a bare traceback."""
    if verbose > 1:
        traceback.print_exception(error, file=sys.stderr)
    print(f"apt-deploy {command}: error: unexpected {type(error).__module__}.{type(error).__name__}: "
          f"{str(error)[:2000] or '(no message)'}. Fix: check the inputs named above; if they look right this is a bug "
          f"in apt-deploy or a library underneath — re-run with -vv for the traceback and report it.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
