"""Plot the SD 1.5-shaped UNet step benchmark: measured vs predicted APT overhead, and per-step latencies.

    python scripts/plot_sd_unet.py benchmarks/results/sd_unet_step.json --out docs/img/sd_unet_step.png \
        --markdown /tmp/sd_unet_step.md

Left: per APT variant, the measured overhead over the base of its group (p50 of the per-round ratios,
95 % bootstrap interval as the error bar) beside the FLOP floor and 1.5x the floor. Right: p50 ms per
step of every path (ONNX Runtime base in each group, the variants, diffusers' PyTorch UNet).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from apt_deploy.fileio import read_json, write_bytes_atomic

log = logging.getLogger(__name__)


def overhead_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    x = list(range(len(rows)))
    meas = [100 * r["overhead_measured"] for r in rows]
    err = [[100 * (r["overhead_measured"] - r["overhead_ci95"][0]) for r in rows],
           [100 * (r["overhead_ci95"][1] - r["overhead_measured"]) for r in rows]]
    pred = [100 * r["overhead_predicted"] for r in rows]
    ax.errorbar(x, meas, yerr=err, fmt="o", capsize=4, label="measured (p50 of paired ratios, 95 % CI)")
    ax.plot(x, pred, "k_", markersize=22, mew=2, label="FLOP floor (4 p N C per module)")
    ax.plot(x, [1.5 * p for p in pred], "r_", markersize=22, mew=1, label="1.5x the floor (target)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(x, [f"{r['sites']}\np = {r['p']}" for r in rows], fontsize=8)
    ax.set(ylabel="per-step latency overhead over base (%)", title="APT overhead vs its FLOP floor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def latency_panel(ax: Any, groups: list[dict[str, Any]]) -> None:
    names, p50, colors = [], [], []
    for i, g in enumerate(groups, 1):
        for a in g["report"]["artifacts"]:
            torch = a["runner"] != "onnxruntime"
            names.append(f"g{i}: {a['name'].removesuffix('/unet')}")
            p50.append(a["stats"]["p50_ms"] / 1e3)
            colors.append("tab:orange" if torch else "tab:blue")
    ax.barh(names[::-1], p50[::-1], color=colors[::-1])
    ax.set_xlabel("p50 s per UNet step (blue: ONNX Runtime, orange: PyTorch eager)")
    ax.set_title("per-step latency, each group g<i> in its own process", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    overhead_panel(left, results["rows"])
    latency_panel(right, results["groups"])
    report = results["groups"][0]["report"]
    fig.suptitle(f"{'SMOKE (tiny UNet) ' if results['smoke'] else ''}SD 1.5-shaped UNet ({results['base_parameters'] / 1e6:.0f} M "
                 f"params, fp32), latent {'x'.join(map(str, results['latent']))}, ONNX Runtime CPU, "
                 f"{report['settings']['threads']} threads; {report['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def markdown_table(results: dict[str, Any]) -> str:
    """The README / docs table: one row per APT variant, then the PyTorch peer."""
    key = next(k for k in results["rows"][0] if k.startswith("within_")) if results["rows"] else "within"
    lines = ["| variant | p50 s/step | base p50 s (same group) | overhead measured [95 % CI] | FLOP floor | "
             "measured / floor | within 1.5x of floor |", "|" + "---|" * 7]
    for r in results["rows"]:
        low, high = r["overhead_ci95"]
        lines.append(f"| APT {r['sites']}, p = {r['p']} | {r['p50_ms'] / 1e3:.3f} | {r['base_p50_ms'] / 1e3:.3f} | "
                     f"{100 * r['overhead_measured']:+.2f} % [{100 * low:+.2f}, {100 * high:+.2f}] | "
                     f"{100 * r['overhead_predicted']:.2f} % | {r['measured_over_predicted']:.2f}x | {r[key]} |")
    peer = results.get("peer")
    if peer:
        low, high = peer["torch_over_ort_ci95"]
        lines.append(f"\ndiffusers' PyTorch UNet (eager) {peer['p50_ms'] / 1e3:.3f} s/step vs ONNX Runtime base "
                     f"{peer['ort_p50_ms'] / 1e3:.3f} s/step: PyTorch / ORT = {peer['torch_over_ort']:.3f} "
                     f"[{low:.3f}, {high:.3f}]; ONNX Runtime faster: {peer['ort_faster']}.")
    peaks = ", ".join(f"{g['group_peak_rss_mb'] / 1024:.1f}" for g in results["groups"])
    lines.append(f"Rounds per group: {results['groups'][0]['report']['settings']['iterations']}; "
                 f"process peak RSS per group (GiB): {peaks}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="benchmarks/results/sd_unet_step.json")
    p.add_argument("--out", default="docs/img/sd_unet_step.png")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the table as markdown to FILE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = read_json(args.results, "bench results", "the JSON scripts/bench_sd_unet.py writes",
                        "run scripts/bench_sd_unet.py first, or pass the file its --out named")
    log.info("wrote %s", plot(results, Path(args.out)))
    if args.markdown:
        write_bytes_atomic(args.markdown, (markdown_table(results) + "\n").encode())
        log.info("wrote %s", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
