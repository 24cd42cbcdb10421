"""The shape of the package: the torch boundary is a package boundary, and no stage imports in a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kaito_tuning"
HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate")
TORCH_FREE = ("spec", "controller", "artifacts")


@pytest.mark.parametrize("entry", [
    # the operator's entry point and everything it registers (admission included)
    "import kaito_tuning.cli, kaito_tuning.controller.handlers as h; "
    "from kaito_tuning.controller.settings import Settings; h.register(Settings(webhook_port=1))",
    "import kaito_tuning.spec.check, kaito_tuning.spec.info, kaito_tuning.controller.manifests",
    "import kaito_tuning.artifacts.cli",
])
def test_torch_free_entry_points_load_no_training_library(entry):
    code = f"{entry}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loaded {out.stdout.strip()}"


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PKG / rel).with_suffix(".py").is_file() or (PKG / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports; ``from pkg import submodule`` counts as importing ``pkg.submodule``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            if node.module.startswith("kaito_tuning") and all(_is_module(m) for m in subs):
                names.update(subs)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_torch_free_packages_do_not_import_training_libraries_anywhere():
    """Not at the top, not inside a function: the operator image has none of them."""
    offenders = []
    for stage in TORCH_FREE:
        for f in sorted((PKG / stage).rglob("*.py")):
            bad = {n for n in _imports(f) if n.split(".")[0] in HEAVY or
                   n.startswith(("kaito_tuning.tuner", "kaito_tuning.serving", "kaito_tuning.dev"))}
            if bad:
                offenders.append(f"{f.relative_to(PKG)}: {sorted(bad)}")
    assert offenders == []


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        mod = "kaito_tuning." + ".".join(f.relative_to(PKG).with_suffix("").parts)
        mod = mod.removesuffix(".__init__")
        graph[mod] = {n for n in _imports(f) if n.startswith("kaito_tuning.") and n != mod}
    # only top-level (module-load) cycles matter, but a function-level import in a cycle hides one too
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in graph.get(m, ()):
            visit(n)
        stack.pop()
    for m in sorted(graph):
        visit(m)
    assert cycles == []
