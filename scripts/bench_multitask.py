"""Thin wrapper around :mod:`apt_deploy.experiments.bench_multitask` (``--help`` for its options)."""

import sys

from apt_deploy.experiments.bench_multitask import main

if __name__ == "__main__":
    sys.exit(main())
