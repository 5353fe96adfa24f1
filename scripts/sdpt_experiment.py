"""Thin wrapper around :mod:`apt_deploy.experiments.sdpt_experiment` (``--help`` for its options)."""

import sys

from apt_deploy.experiments.sdpt_experiment import main

if __name__ == "__main__":
    sys.exit(main())
