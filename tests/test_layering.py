"""design.md's layering: engines/ imports no torch at module level and uses only apt_deploy's pure-Python
parts; those parts import without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = {"apt_deploy", "apt_deploy.errors", "apt_deploy.settings", "apt_deploy.manifest", "apt_deploy.fileio",
        "apt_deploy.features", "apt_deploy.progress", "apt_deploy.ops", "apt_deploy.ops.schema",
        "apt_deploy.ops.reference"}


def _module_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:  # top level only: imports inside functions are lazy
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engines_use_only_pure_apt_deploy_modules_and_no_torch_at_module_level():
    offenders = {}
    for path in sorted((ROOT / "engines").rglob("*.py")):
        imports = _module_level_imports(path)
        bad = {m for m in imports if m.split(".")[0] in ("torch", "transformers", "exporters")}
        bad |= {m for m in imports if m.startswith("apt_deploy") and m not in PURE}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, offenders


def test_pure_parts_and_engines_import_without_torch():
    modules = sorted(PURE) + sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "engines").rglob("*.py")
        if p.name != "__init__.py")
    code = "import sys, importlib; sys.modules['torch'] = None\nfor m in %r: importlib.import_module(m)" % modules
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
