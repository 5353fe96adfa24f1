"""The one-way layering of apt_deploy/layers.py, checked on EVERY import of every .py file in apt_deploy/,
exporters/ and engines/ (module level, inside functions, under TYPE_CHECKING), plus: L0 and engines
import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import apt_deploy
from apt_deploy.layers import FIRST_PARTY, HEAVY, L0_MODULES, LAYER_NAMES, LAZY_HEAVY_ONLY, MAY_IMPORT, layer_of

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """Dotted names of what an import statement loads; ``from pkg import sub`` counts as ``pkg.sub`` when
    ``sub`` is a module, and ``from apt_deploy import fold`` as the module behind the lazy public API."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    module = node.module or ""
    if node.level:  # relative import
        base = importer.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        module = ".".join(base + ([module] if module else []))
    out = []
    for alias in node.names:
        sub = f"{module}.{alias.name}"
        if module == "apt_deploy" and alias.name in apt_deploy._LAZY:
            out.append(apt_deploy._LAZY[alias.name])
        else:
            out.append(sub if _is_module(sub) else module)
    return out


def _runtime_module_level(tree: ast.Module) -> set[int]:
    """ids of import nodes that run when the module is imported (not in functions, not under TYPE_CHECKING)."""
    found: set[int] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for n in nodes:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                found.add(id(n))
            elif isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                visit(n.orelse)
            elif isinstance(n, (ast.If, ast.Try, ast.With)):
                for block in (getattr(n, "body", []), getattr(n, "orelse", []), getattr(n, "finalbody", []),
                              *[h.body for h in getattr(n, "handlers", [])]):
                    visit(block)
            elif isinstance(n, ast.ClassDef):
                visit(n.body)

    visit(tree.body)
    return found


def layering_violations() -> list[str]:
    problems = []
    for top in FIRST_PARTY:
        for path in sorted((ROOT / top).rglob("*.py")):
            problems += _file_violations(path)
    return problems


def _file_violations(path: Path, source: str | None = None) -> list[str]:
    importer, rel = _module_name(path), path.relative_to(ROOT)
    layer = layer_of(importer)
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    module_level = _runtime_module_level(tree)
    problems = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target in _targets(node, importer, path.name == "__init__.py"):
            where = f"{rel}:{node.lineno} ({LAYER_NAMES[layer]}) imports {target!r}"
            other = layer_of(target)
            if other is not None and other not in MAY_IMPORT[layer]:
                allowed = ", ".join(LAYER_NAMES[i] for i in sorted(MAY_IMPORT[layer]))
                problems.append(f"{where} ({LAYER_NAMES[other]}); rule: {LAYER_NAMES[layer]} may import only {allowed}")
            if layer in LAZY_HEAVY_ONLY and target.split(".")[0] in HEAVY and id(node) in module_level:
                problems.append(f"{where} at module level; rule: {LAYER_NAMES[layer]} imports {target.split('.')[0]} "
                                "only inside functions")
    return problems


def test_every_import_follows_the_layering():
    problems = layering_violations()
    assert not problems, "layering violations (apt_deploy/layers.py, docs/architecture.md):\n  " + "\n  ".join(problems)


def test_the_checker_catches_a_lazy_upward_import():
    """The check must be able to fail: a lazy import of the torch side inside an engines function."""
    fake = ROOT / "engines" / "_layering_probe.py"
    source = "def f():\n    from apt_deploy.folding import fold\n    import exporters.fused_op\n"
    problems = _file_violations(fake, source)
    assert any("apt_deploy.folding" in p and "L2 torch side" in p and "L1 engines may import only" in p for p in problems)
    assert any("exporters.fused_op" in p for p in problems)
    assert any("'torch' at module level" in p for p in _file_violations(fake, "import torch\n"))
    assert not _file_violations(fake, "def f():\n    import torch\n")
    assert any("L4 app" in p for p in _file_violations(ROOT / "exporters" / "_probe.py", "from apt_deploy import pipeline\n"))


def test_layer_table_classifies_by_path():
    assert layer_of("apt_deploy.errors") == 0 and layer_of("apt_deploy.ops.reference") == 0
    assert layer_of("apt_deploy.ops.torch_op") == 2 and layer_of("apt_deploy.backbones.vilt") == 2
    assert layer_of("apt_deploy.some_new_model_code") == 2  # L2 by default
    assert layer_of("apt_deploy.cli.verify") == 4 and layer_of("apt_deploy.pipeline") == 4
    assert layer_of("engines.kernels.torch_cuda") == 1 and layer_of("exporters.validate") == 3
    assert layer_of("torch") is None and layer_of("numpy") is None


def test_pure_parts_and_engines_import_without_torch():
    modules = sorted(L0_MODULES) + sorted(
        _module_name(p) for p in (ROOT / "engines").rglob("*.py") if p.name != "__init__.py")
    code = "import sys, importlib; sys.modules['torch'] = None\nfor m in %r: importlib.import_module(m)" % modules
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
