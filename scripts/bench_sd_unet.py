"""Thin wrapper around :mod:`apt_deploy.experiments.bench_sd_unet` (``--help`` for its options)."""

import sys

from apt_deploy.experiments.bench_sd_unet import main

if __name__ == "__main__":
    sys.exit(main())
