"""``apt-deploy build``: a TensorRT engine (with or without the fused APT plugin) from an exported artifact."""

from __future__ import annotations

import argparse
import math

from apt_deploy.errors import ConfigError

NAME = "build"
HELP = "build a TensorRT engine from an exported artifact (fused APT plugin, or the ONNX function body with --no-plugin)"
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT_DIR", help="directory written by apt-deploy export")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="engine precision; must equal the artifact's export --dtype (strongly typed engines)")
    parser.add_argument("--no-plugin", action="store_true",
                        help="do not register the APT plugin: TensorRT runs the fused op's ONNX function body")
    parser.add_argument("--plugin-mode", choices=("auto", "aot", "jit"), default="auto",
                        help="plugin implementation: aot (PTX in the engine, TensorRT >= 10.9), jit (Python callback), "
                             "auto (aot where available)")
    parser.add_argument("--out", default=None, metavar="ENGINE",
                        help="engine path (default: ARTIFACT_DIR/model.<precision>[.noplugin].plan)")
    parser.add_argument("--timing-cache", default=None, metavar="FILE", help="timing cache to load and update")
    parser.add_argument("--workspace", default=None, metavar="SIZE", help="workspace pool limit, e.g. 2G or 512M")
    parser.add_argument("--opt-level", type=int, default=None, choices=range(0, 6), metavar="0-5",
                        help="TensorRT builder optimization level (default: TensorRT's, 3)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 layers (faster, less exact)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached engine has the same key")


def parse_size(text: str | None) -> int | None:
    """``2G`` / ``512M`` / ``1048576`` -> bytes."""
    if text is None:
        return None
    t = text.strip().lower().removesuffix("b")
    scale = _UNITS.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in _UNITS else t)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # also refuses nan and inf, which int() cannot take
        raise ConfigError(f"--workspace {text!r}", "a positive size such as 2G, 512M or a byte count",
                          "pass e.g. --workspace 2G")
    return int(value * scale)


def run(args: argparse.Namespace) -> int:
    from apt_deploy.manifest import component_dirs, read_manifest
    from engines.trt_build import build_engine

    # a multi-component artifact (Stable Diffusion): one engine per component, each in its own directory
    parts = component_dirs(args.artifact, read_manifest(args.artifact))
    if parts and args.out:
        raise ConfigError(f"--out {args.out} for a multi-component artifact", "no --out (one engine per component, "
                          "written into each component's directory)", "drop --out")
    for directory in [p for _, p in parts] or [args.artifact]:
        path = build_engine(directory, precision=args.precision, use_plugin=not args.no_plugin, out=args.out,
                            timing_cache=args.timing_cache, workspace_bytes=parse_size(args.workspace),
                            builder_optimization_level=args.opt_level, tf32=args.tf32, plugin_mode=args.plugin_mode,
                            force=args.force)
        print(f"build: wrote {path}")
    return 0
