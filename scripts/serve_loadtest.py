"""Thin wrapper: load-test the demo-shaped artifact on the bundled tritonserver (apt_deploy/experiments/serve_loadtest.py).

    flock /tmp/apt-bench.lock python scripts/serve_loadtest.py --out benchmarks/results/serve_loadtest_demo.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from apt_deploy.experiments.serve_loadtest import run
from apt_deploy.fileio import write_json_atomic

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="serve-loadtest")
    p.add_argument("--artifact", default=None, help="serve this artifact instead of building the demo-shaped one")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results/serve_loadtest_demo.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    report = run(Path(a.workdir), Path(a.artifact) if a.artifact else None, a.concurrency, a.requests)
    write_json_atomic(a.out, report)
    c = report["concurrent"]
    print(f"ready {report['ready_seconds']} s; concurrent: {c['completed']} ok, {c['errors']} errors, "
          f"{c['requests_per_s']} req/s, p50/p90/p99 {c['latency_ms']}")
