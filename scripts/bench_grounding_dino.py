"""Thin wrapper around :mod:`apt_deploy.experiments.bench_grounding_dino` (``--help`` for its options)."""

import sys

from apt_deploy.experiments.bench_grounding_dino import main

if __name__ == "__main__":
    sys.exit(main())
