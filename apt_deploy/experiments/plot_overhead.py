"""Plot measured vs predicted latency overhead over the base model from bench_variants.py's JSON.

    python scripts/plot_overhead.py benchmarks/results/vilt_b_variants.json --out docs/img/overhead.png

Left: overhead vs prompt count p (384 px). Right: overhead vs sequence length n (image 224/384/512 px,
p = 200). Markers are measured p50 ratios - 1; the dashed line is the MAC prediction (engines/flops.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from apt_deploy.fileio import read_json, write_bytes_atomic

log = logging.getLogger(__name__)

SERIES = {("apt", "fused"): ("APT, fused op", "o-"), ("apt", "opfree"): ("APT, op-free", "s-"),
          ("deep_prompt", "prefix"): ("deep prompt, prefix K/V", "^-")}


def series(rows: list[dict[str, Any]], x_key: str) -> dict[tuple[str, str], tuple[list, list, list]]:
    """(method, form) -> (x, measured %, predicted %), sorted by x."""
    out: dict[tuple[str, str], tuple[list, list, list]] = {}
    for r in sorted(rows, key=lambda r: r[x_key]):
        key = (r["method"], r["form"])
        if key in SERIES:
            xs, meas, pred = out.setdefault(key, ([], [], []))
            xs.append(r[x_key])
            meas.append(100 * r["overhead_measured"])
            pred.append(100 * r["overhead_predicted"])
    return out


def panel(ax: Any, rows: list[dict[str, Any]], x_key: str, xlabel: str, title: str) -> None:
    data = series(rows, x_key)
    for key, (xs, meas, _) in data.items():
        label, style = SERIES[key]
        ax.plot(xs, meas, style, label=f"{label} (measured)")
    xs, _, pred = data[("apt", "fused")]
    ax.plot(xs, pred, "k--", label="MAC prediction, APT = prefix K/V (2·n·p·d per block)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel=xlabel, ylabel="p50 latency overhead over base (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _harness_tag(group: dict[str, Any]) -> str:
    """Marks a sweep measured with the harness before issue 14 (rotated order, ORT threads spinning)."""
    return "\n[old harness: rotated order, ORT spinning]" if "before issue 14" in group.get("harness", "before issue 14") else ""


def variants_panel(ax: Any, group: dict[str, Any]) -> None:
    """p50 of every path of the variants group (ONNX Runtime and the PyTorch peers), one bar each."""
    rows = group["report"]["artifacts"]
    names = [a["name"].replace("_384", "").replace("_p200", "") for a in rows]
    colors = ["tab:orange" if "@torch" in a["name"] else "tab:blue" for a in rows]
    ax.barh(names[::-1], [a["stats"]["p50_ms"] for a in rows][::-1], color=colors[::-1])
    ax.set_xlabel("p50 ms (blue: ONNX Runtime, orange: PyTorch eager)")
    load = group["report"]["load"]["other_processes_cores"]
    ax.set_title(f"variants, p = 200, 384 px{_harness_tag(group)}\nother processes used {load:.2f} cores while timing",
                 fontsize=10)
    ax.tick_params(axis="y", labelsize=7)


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, left, right) = plt.subplots(1, 3, figsize=(16, 4.6))
    groups = results["groups"]
    variants_panel(bars, groups["variants"])
    panel(left, groups["prompt_len"]["rows"], "p", "prompt count p",
          f"overhead vs p (384 px, n = 185){_harness_tag(groups['prompt_len'])}")
    panel(right, groups["image_size"]["rows"], "tokens", "sequence length n (40 text + image tokens)",
          f"overhead vs n (224/384/512 px, p = 200){_harness_tag(groups['image_size'])}")
    cpus = {name: g["report"]["machine"]["cpu_model"] for name, g in groups.items() if name in ("variants", "prompt_len")}
    cfg = results["vilt_config"]
    fig.suptitle(f"ViLT (d={cfg['hidden_size']}, {cfg['num_hidden_layers']} layers) on ONNX Runtime CPU, 2 threads, batch 1; "
                 f"variants on {cpus['variants']}, sweeps on {cpus['prompt_len']}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def markdown_table(group: dict[str, Any]) -> str:
    """One group's rows as the markdown table docs/benchmarks.md quotes."""
    stats = {a["name"]: a for a in group["report"]["artifacts"]}
    lines = ["| variant | p | image px | n | p50 ms | p90 ms | p99 ms | overhead measured | MAC prediction | "
             "measured / predicted | peak ΔRSS MB | size MB |", "|" + "---|" * 12]
    for r in group["rows"]:
        a, ratio = stats[r["name"]], r["measured_over_predicted"]
        lines.append(f"| {r['name']} | {r['p']} | {r['image']} | {r['tokens']} | {a['stats']['p50_ms']:.1f} | "
                     f"{a['stats']['p90_ms']:.1f} | {a['stats']['p99_ms']:.1f} | {100 * r['overhead_measured']:+.1f} % | "
                     f"{100 * r['overhead_predicted']:+.1f} % | {'' if ratio is None else f'{ratio:.2f}x'} | "
                     f"{a['memory']['peak_rss_delta_mb']:.0f} | {a['size']['total_mb']:.0f} |")
    for r in group.get("peers", []):
        a = stats[r["name"]]["stats"]
        lines.append(f"| {r['name']} ({r['form']}) | | | | {a['p50_ms']:.1f} | {a['p90_ms']:.1f} | {a['p99_ms']:.1f} | "
                     f"{100 * (r['over_ort_base'] - 1):+.1f} % over ORT base; {r['torch_over_ort']:.2f}x its ORT path "
                     f"| | | {stats[r['name']]['memory']['peak_rss_delta_mb']:.0f} | - |")
    load = group["report"]["load"]
    lines.append(f"\nOther processes used {load['other_processes_cores']:.2f} cores while timing "
                 f"(load average before {load['before']}, after {load['after']}); attempts: {group['attempts']}. "
                 f"Harness: {group.get('harness', 'engines.bench before issue 14')}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?", default="benchmarks/results/vilt_b_variants.json")
    p.add_argument("--out", default="docs/img/overhead.png")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write each group as a markdown table to FILE")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = read_json(args.results, "bench results", "the JSON scripts/bench_variants.py writes",
                        "run scripts/bench_variants.py first, or pass the file its --out named")
    log.info("wrote %s", plot(results, Path(args.out)))
    if args.markdown:
        tables = [f"### {name}\n\n{markdown_table(group)}\n" for name, group in results["groups"].items()]
        write_bytes_atomic(args.markdown, "\n".join(tables).encode())
        log.info("wrote %s", args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
