"""The one-way module layering, declared once (tests/test_layering.py enforces it on every import,
lazy ones included; docs/architecture.md explains it).

    L0 core       the pure-Python parts of apt_deploy (listed in L0_MODULES): stdlib, numpy, other L0
    L1 engines    engines/*: ONNX -> running (runners, TensorRT, bench, kernels); L0 and L1
    L2 torch side every other apt_deploy module (methods, backbones, folding, training, data, ...): L0 and L2
    L3 exporters  exporters/*: L0, L1, L2
    L4 app        apt_deploy's orchestration (listed in L4_PREFIXES: CLI, demo, pipeline, ...): anything

A module is classified by its dotted name: L0 and L4 are explicit lists, ``engines`` is L1,
``exporters`` is L3, and any other ``apt_deploy`` module is L2. A new orchestration module (a server,
an import command, ...) goes in L4 by adding its name to L4_PREFIXES. Pure data: no imports but stdlib.
"""

from __future__ import annotations

L0_MODULES: frozenset[str] = frozenset({
    "apt_deploy", "apt_deploy.errors", "apt_deploy.settings", "apt_deploy.manifest", "apt_deploy.fileio",
    "apt_deploy.features", "apt_deploy.progress", "apt_deploy.layers",
    "apt_deploy.ops", "apt_deploy.ops.schema", "apt_deploy.ops.reference",
})
# A module is L4 when its name equals one of these or starts with one of them followed by a dot.
L4_PREFIXES: tuple[str, ...] = (
    "apt_deploy.__main__", "apt_deploy.cli", "apt_deploy.demo", "apt_deploy.pipeline", "apt_deploy.verification",
    "apt_deploy.experiments", "apt_deploy.serving", "apt_deploy.importers", "apt_deploy.generation",
    "apt_deploy.detection_predict", "apt_deploy.generate", "apt_deploy.sd_demo",
)
LAYER_NAMES: dict[int, str] = {0: "L0 core", 1: "L1 engines", 2: "L2 torch side", 3: "L3 exporters", 4: "L4 app"}
# layer -> the layers its modules may import
MAY_IMPORT: dict[int, frozenset[int]] = {
    0: frozenset({0}),
    1: frozenset({0, 1}),
    2: frozenset({0, 2}),
    3: frozenset({0, 1, 2, 3}),
    4: frozenset({0, 1, 2, 3, 4}),
}
FIRST_PARTY: tuple[str, ...] = ("apt_deploy", "engines", "exporters")
# third-party packages that L0 and L1 may import only inside functions (never at module level)
HEAVY: tuple[str, ...] = ("torch", "transformers", "safetensors", "diffusers", "tensorrt", "triton")
LAZY_HEAVY_ONLY: frozenset[int] = frozenset({0, 1})


def _has_prefix(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int | None:
    """The layer of a first-party dotted module name; None for anything else (stdlib, third party)."""
    top = module.split(".")[0]
    if top == "engines":
        return 1
    if top == "exporters":
        return 3
    if top != "apt_deploy":
        return None
    if module in L0_MODULES:
        return 0
    return 4 if _has_prefix(module, L4_PREFIXES) else 2


def may_import(importer: str, imported: str) -> bool:
    """True when first-party module ``importer`` may import ``imported`` (non-first-party: always)."""
    a, b = layer_of(importer), layer_of(imported)
    return a is None or b is None or b in MAY_IMPORT[a]
