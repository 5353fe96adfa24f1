"""ViLT-B on a GPU through the torch-cuda path (CUDA graphs): base model vs APT, against the MAC floor.

    python -m apt_deploy.experiments.gpu_latency --out benchmarks/results/gpu/vilt_latency.json
    python -m apt_deploy.experiments.gpu_latency --dry-run        # the plan and MAC floor, no GPU

Random ViLT-B weights (latency does not depend on values; the configuration of
:mod:`apt_deploy.experiments.bench_variants`). Each variant is wrapped like an artifact's PyTorch form
(:class:`apt_deploy.pipeline.ReferenceModule`), cast to the dtype, captured as one CUDA graph inside its
``capture_context()`` (:class:`engines.kernels.torch_cuda.CapturedGraph`, what the ``torch-cuda`` runner
uses), and the graphs are replayed interleaved (base, APT, base, ...) with CUDA events around each replay.
Variants: ``base``; ``apt`` (folded, fused op on the Triton kernel); ``apt_unfused`` (folded, the op's
unfused torch kernel). APT's output is checked against the CPU fp32 model first.

Floor (engines/flops.py): the APT model needs ``1 + overhead_floor`` times the base model's multiply-adds.
Two verdicts are recorded: ``latency_within_1.3x_floor``: apt_ms <= 1.3 * base_ms * (1 + overhead_floor);
``overhead_within_1.3x_floor`` (stricter): apt_ms / base_ms - 1 <= 1.3 * overhead_floor.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from typing import Any

log = logging.getLogger("gpu_latency")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
TARGET = 1.3


def floor(args: argparse.Namespace) -> dict[str, Any]:
    """MACs of the base model and what APT adds (engines.flops), for the plan and the verdict."""
    from apt_deploy.experiments.bench_variants import VILT_B, shape_of
    from engines.flops import extra_macs, model_macs, predicted_overhead

    shape = shape_of({**VILT_B, "max_position_embeddings": args.text_len})
    return {"tokens": shape.tokens(args.image), "base_macs": model_macs(shape, args.image) * args.batch,
            "apt_extra_macs": extra_macs(shape, args.image, "apt", "folded", args.prompts) * args.batch,
            "overhead_floor": predicted_overhead(shape, args.image, "apt", "folded", args.prompts)}


def check_args(args: argparse.Namespace) -> None:
    from apt_deploy.errors import ConfigError

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype}", f"one of {', '.join(DTYPES)}")
    if args.image % 32 or not 32 <= args.image <= 1024:
        raise ConfigError(f"--image {args.image}", "a multiple of 32 (ViLT-B/32 patches) in 32..1024")
    if not 1 <= args.prompts <= 512 or args.batch < 1 or args.iterations < 10 or not 2 <= args.text_len <= 512:
        raise ConfigError(f"--prompts {args.prompts} --batch {args.batch} --iterations {args.iterations} --text-len {args.text_len}",
                          "1 <= prompts <= 512, batch >= 1, iterations >= 10, 2 <= text-len <= 512")


def models(args: argparse.Namespace) -> dict[str, Any]:
    """base / apt (folded) as ReferenceModules on CPU in fp32."""
    import apt_deploy as ad
    from apt_deploy.backbones import get_backbone
    from apt_deploy.experiments.bench_variants import RANK, VILT_B, randomize
    from apt_deploy.folding import fold
    from apt_deploy.pipeline import ReferenceModule

    base = get_backbone("vilt").build_tiny(seed=0, **{**VILT_B, "image_size": args.image,
                                                      "max_position_embeddings": args.text_len})
    apt = copy.deepcopy(base)
    ad.apply_apt(apt, ad.APTConfig(prompt_len=args.prompts, rank=RANK, method="apt"))
    randomize(apt)
    return {"base": ReferenceModule(base.eval(), ["logits"]), "apt": ReferenceModule(fold(apt).eval(), ["logits"])}


def feed(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from apt_deploy.backbones import get_backbone
    from apt_deploy.backbones.registry import ShapeSettings

    spec = get_backbone("vilt")
    specs = spec.input_specs(model.folded, ShapeSettings(batch=(args.batch,) * 3, text_len=args.text_len,
                                                         image_size=(args.image, args.image)))
    return spec.dummy_inputs(model.folded, specs, "opt", 0)


def capture(module: Any, inputs: dict[str, Any]) -> Any:
    import torch

    from engines.kernels.torch_cuda import CapturedGraph

    def forward(tensors: dict[str, Any]) -> list[Any]:
        with torch.no_grad():
            return module(**tensors)

    return CapturedGraph(forward, inputs, module.capture_context())


def timed_replays(graphs: dict[str, Any], iterations: int, warmup: int = 20) -> dict[str, list[float]]:
    """Interleaved replays, one CUDA-event pair around each; per-variant lists of milliseconds."""
    import torch

    for _ in range(warmup):
        for g in graphs.values():
            g.graph.replay()
    events = {name: [] for name in graphs}
    for _ in range(iterations):
        for name, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.graph.replay()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in events.items()}


def stats(ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ms, n=100)
    return {"p50_ms": statistics.median(ms), "p90_ms": q[89], "mean_ms": statistics.fmean(ms), "min_ms": min(ms)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from apt_deploy.features import require
    from apt_deploy.manifest import now_iso

    check_args(args)
    report: dict[str, Any] = {"created": now_iso(), "what": "ViLT-B torch-cuda (CUDA graphs) base vs APT, random weights",
                              "settings": vars(args), "floor": floor(args)}
    if args.dry_run:
        return report
    require("cuda", "the GPU latency benchmark")
    require("triton", "the fused Triton kernel")
    import torch

    from engines.kernels.torch_cuda import enable_triton_kernel

    cpu = models(args)
    inputs = feed(cpu["apt"], args)
    with torch.no_grad():
        expected = cpu["apt"](**inputs)[0]
    dtype = getattr(torch, DTYPES[args.dtype])
    gpu_inputs = {n: t.to("cuda", dtype if t.is_floating_point() else t.dtype) for n, t in inputs.items()}
    graphs = {"base": capture(cpu["base"].to("cuda", dtype), gpu_inputs)}
    graphs["apt_unfused"] = capture(cpu["apt"].to("cuda", dtype), gpu_inputs)  # the op's default (unfused) kernel
    enable_triton_kernel()  # from here the op's CUDA kernel is the fused Triton one
    graphs["apt"] = capture(cpu["apt"], gpu_inputs)
    graphs["apt"].graph.replay()
    got = graphs["apt"].static_outputs[0].float().cpu()
    report["apt_vs_cpu_fp32_max_abs"] = (got - expected).abs().max().item()
    report["apt_vs_cpu_fp32_logits_scale"] = expected.abs().max().item()
    timings = {name: stats(ms) for name, ms in timed_replays(graphs, args.iterations).items()}
    report["timings"] = timings
    report["environment"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    report["verdict"] = verdict(timings, report["floor"]["overhead_floor"])
    return report


def verdict(timings: dict[str, dict[str, float]], overhead_floor: float) -> dict[str, Any]:
    base, apt = timings["base"]["p50_ms"], timings["apt"]["p50_ms"]
    measured = apt / base - 1.0
    return {"overhead_measured": measured, "overhead_floor": overhead_floor,
            "overhead_over_floor": measured / overhead_floor if overhead_floor else None,
            f"latency_within_{TARGET}x_floor": apt <= TARGET * base * (1 + overhead_floor),
            f"overhead_within_{TARGET}x_floor": measured <= TARGET * overhead_floor,
            "fused_vs_unfused_apt": timings["apt_unfused"]["p50_ms"] / apt}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m apt_deploy.experiments.gpu_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200, help="APT prompt length p (default 200)")
    parser.add_argument("--image", type=int, default=384, help="image side in pixels (default 384)")
    parser.add_argument("--text-len", type=int, default=40, help="text tokens (default 40)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="fp16", help="fp16 (default), bf16 or fp32")
    parser.add_argument("--iterations", type=int, default=300, help="timed replays per variant (default 300)")
    parser.add_argument("--out", help="write the JSON report here (atomically)")
    parser.add_argument("--dry-run", action="store_true", help="validate arguments, print the MAC floor; needs no GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    from engines.report_cli import report_main

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return report_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
