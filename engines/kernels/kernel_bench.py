"""GPU benchmark of the fused Triton kernel against the unfused torch sequence it replaces.

    python -m engines.kernels.kernel_bench --out benchmarks/results/gpu/kernel_bench.json
    python -m engines.kernels.kernel_bench --dry-run          # validates the plan, needs no GPU

For each dtype (fp16, bf16 by default) and each case (rows n = B*tokens, prompts p, hidden d): checks the
fused output against the unfused one, then times both with ``triton.testing.do_bench`` (median of CUDA-event
timings, L2 flushed between runs by triton) and records the speedup. The unfused sequence is what PyTorch
runs without the kernel: ``S = x K^T``, ``A = relu(S)``, ``w = rowmax(A)``, ``o + w * (A V)`` (4-5 launches
and two [n, p] intermediates in memory). Target (docs/tensorrt.md): speedup >= 1.5 wherever n*p >= 65536.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from apt_deploy.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_CASES = ("256x64", "1024x16", "1024x64", "512x128", "2048x64", "1024x200", "4096x64", "8192x200")
"""rows x prompts; with d = 768 (ViLT-B / CLIP ViT-B). n*p spans 16k..1.6M."""
DTYPES = ("float16", "bfloat16", "float32")
TARGET_SPEEDUP, TARGET_MIN_NP = 1.5, 65536
CHECK_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}  # max |fused - unfused| / max |unfused|


def parse_case(text: str) -> tuple[int, int]:
    """``ROWSxP`` -> (rows, p); a malformed case says what is expected."""
    try:
        rows, p = (int(x) for x in text.lower().split("x"))
    except ValueError as e:
        raise ConfigError(f"benchmark case {text!r}", "ROWSxPROMPTS, e.g. 1024x64", "pass --cases 1024x64 4096x200") from e
    if rows < 1 or not 1 <= p <= 512:
        raise ConfigError(f"benchmark case {text!r}", "rows >= 1 and 1 <= prompts <= 512 (the kernel's limit)")
    return rows, p


def plan(cases: list[str], dtypes: list[str], d: int) -> list[dict[str, Any]]:
    """Every (case, dtype) with its work: multiply-adds (2 n p d) and the launch config the kernel picks."""
    from engines.kernels.triton_apd import dot_macs, grid, pick_config

    if d < 1:
        raise ConfigError(f"--d {d}", "a positive hidden size")
    out = []
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ConfigError(f"--dtypes {dtype}", f"some of {', '.join(DTYPES)}")
        for case in cases:
            rows, p = parse_case(case)
            cfg = pick_config(rows, dtype, p)
            out.append({"dtype": dtype, "rows": rows, "p": p, "d": d, "np": rows * p, "macs": 2 * rows * p * d,
                        "kernel_macs": dot_macs(rows, p, d, cfg), "programs": grid(rows, cfg)[0],
                        "config": {k: getattr(cfg, k) for k in ("block_m", "block_n", "block_k", "block_p", "num_warps")},
                        "target_applies": rows * p >= TARGET_MIN_NP})
    return out


def unfused(x: Any, o: Any, k: Any, v: Any) -> Any:
    """The torch sequence the fused kernel replaces (what the op runs without it)."""
    import torch

    a = torch.relu(x @ k.T)
    return o + a.amax(dim=-1, keepdim=True) * (a @ v)


def measure(case: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Check the fused output against the unfused one, then time both (median ms, do_bench)."""
    import torch
    from triton.testing import do_bench

    from engines.kernels.triton_apd import approx_prompt_diffusion_triton

    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    rows, p, d = case["rows"], case["p"], case["d"]
    x, o = (torch.randn(rows, d, device="cuda", generator=g).to(dtype) for _ in range(2))
    k, v = ((torch.randn(p, d, device="cuda", generator=g) * 0.02).to(dtype) for _ in range(2))
    fused = approx_prompt_diffusion_triton(x, o, k, v)
    reference = unfused(x.float(), o.float(), k.float(), v.float())
    rel_err = ((fused.float() - reference).abs().max() / reference.abs().max()).item()
    fused_ms = do_bench(lambda: approx_prompt_diffusion_triton(x, o, k, v), return_mode="median")
    unfused_ms = do_bench(lambda: unfused(x, o, k, v), return_mode="median")
    speedup = unfused_ms / fused_ms
    result = {**case, "max_rel_err": rel_err, "check_ok": rel_err <= CHECK_TOLERANCE[case["dtype"]],
              "fused_ms": fused_ms, "unfused_ms": unfused_ms, "speedup": speedup,
              "fused_tflops": case["macs"] * 2 / fused_ms / 1e9}
    result["target_met"] = (speedup >= TARGET_SPEEDUP) if case["target_applies"] else None
    return result


def environment() -> dict[str, Any]:
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark as a JSON-able report (``--dry-run``: the plan only, no CUDA)."""
    from apt_deploy.features import require
    from apt_deploy.manifest import now_iso

    cases = plan(args.cases, args.dtypes, args.d)
    report: dict[str, Any] = {"created": now_iso(), "what": "fused Triton APT kernel vs unfused torch sequence",
                              "target": f"speedup >= {TARGET_SPEEDUP} where n*p >= {TARGET_MIN_NP}", "dry_run": args.dry_run}
    if args.dry_run:
        return {**report, "cases": cases}
    require("cuda", "the kernel benchmark")
    require("triton", "the kernel benchmark")
    results = []
    for case in cases:
        results.append(measure(case))
        log.info("%(dtype)s rows=%(rows)d p=%(p)d: fused %(fused_ms).4f ms, unfused %(unfused_ms).4f ms, x%(speedup).2f",
                 results[-1])
    applicable = [r for r in results if r["target_met"] is not None]
    return {**report, "environment": environment(), "cases": results,
            "all_checks_ok": all(r["check_ok"] for r in results),
            "target_met": all(r["target_met"] for r in applicable) if applicable else None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines.kernels.kernel_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="ROWSxPROMPTS (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], help="of " + ", ".join(DTYPES))
    parser.add_argument("--d", type=int, default=768, help="hidden size (default 768)")
    parser.add_argument("--out", help="write the JSON report here (atomically)")
    parser.add_argument("--dry-run", action="store_true", help="validate arguments and print the plan; needs no GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engines.report_cli import report_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return report_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
