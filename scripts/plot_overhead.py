"""Thin wrapper around :mod:`apt_deploy.experiments.plot_overhead` (``--help`` for its options)."""

import sys

from apt_deploy.experiments.plot_overhead import main

if __name__ == "__main__":
    sys.exit(main())
