"""The package's layers (docs/architecture.md): each imports only the layers below it, no module imports
itself back through others, and the layers the command line lists and describes with stay free of torch
(and of the other heavy libraries)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "tavcli"

# What each layer may import from tavcli (besides itself). `core` is the shared leaves.
ALLOWED = {
    "core": set(),
    "runtime": {"core"},
    "settings": {"core"},
    "files": {"core", "settings"},
    "media": {"core", "settings", "files"},
    "store": {"core", "settings", "files"},
    "models": {"core", "settings", "files"},
    "method": {"core", "runtime", "models"},
    "workflow": {"core", "runtime", "settings", "files", "media", "store", "models", "method"},
    "batch": {"core", "runtime", "settings", "files", "media", "store", "models", "method", "workflow"},
    "ui": {"core", "runtime", "settings", "files", "media", "store", "models", "method", "workflow", "batch"},
    "cli": {"core", "runtime", "settings", "files", "media", "store", "models", "method", "workflow", "batch", "ui"},
}
CORE = {"tavcli", "tavcli.errors", "tavcli.progress", "tavcli.choices", "tavcli.cores", "tavcli.words"}
# Imported by `tav --help`, `tav ls` and the other store commands before any model work, and by the app's page
# before its first job: no torch at import.
TORCH_FREE = [
    "tavcli.cli",
    "tavcli.choices",
    "tavcli.words",
    "tavcli.settings.option",
    "tavcli.settings.options",
    "tavcli.settings.attention_options",
    "tavcli.settings.declared",
    "tavcli.settings.tuning",
    "tavcli.settings.sampling",
    "tavcli.settings.attention",
    "tavcli.settings.editing",
    "tavcli.settings.config",
    "tavcli.settings.inputs",
    "tavcli.files.atomic",
    "tavcli.files.hashing",
    "tavcli.files.reading",
    "tavcli.store.project",
    "tavcli.store.entry",
    "tavcli.store.payload",
    "tavcli.store.checkpoints",
    "tavcli.store.sidecar",
    "tavcli.store.housekeeping",
    "tavcli.store.locks",
    "tavcli.store.removal",
    "tavcli.store.specs",
    "tavcli.models.source",
    "tavcli.models.names",
    "tavcli.models.families",
    "tavcli.models.hub",
    "tavcli.models.architectures",
    "tavcli.models.tiny",
    "tavcli.media.plots",
    "tavcli.workflow",
    "tavcli.workflow.keys",
    "tavcli.workflow.planning",
    "tavcli.workflow.source_prompt",
    "tavcli.batch",
    # `tav ui`'s page is up before the first job loads torch.
    "tavcli.ui.app",
    "tavcli.ui.serve",
]
# Loaded only by the commands that need them (decoding video, ControlNets, launching, low-rank tunes).
HEAVY = ["torch", "av", "cv2", "accelerate", "peft"]


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module == "tavcli.__main__":
        return "cli"
    return module.split(".")[1]


def _imports(module: str) -> set[str]:
    """Every tavcli module `module` imports, at module level or in a function, annotations-only included."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and node.value in MODULES and "." in node.value:  # import_module("tavcli.x")
            found.add(node.value)
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tavcli")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            if base.startswith("tavcli"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {name for name in found if name != module}


def test_every_module_belongs_to_a_layer() -> None:
    assert {_layer(module) for module in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_the_layers_below_its_own(module: str) -> None:
    layer = _layer(module)
    own = set() if layer == "core" else {layer}  # the leaves import nothing of tavcli, not even each other
    upward = sorted(name for name in _imports(module) if _layer(name) not in ALLOWED[layer] | own)
    assert not upward, f"{module} ({layer}) imports {upward}"


def test_no_module_imports_itself_back() -> None:
    graph = {module: {name for name in _imports(module) if name in MODULES} for module in MODULES}
    # A module importing its package's lazy facade is no cycle; one whose __init__ imports the module is.
    eager = {package: _eager_imports(package) for package in MODULES if MODULES[package].name == "__init__.py"}
    graph = {
        m: {n for n in names if not (m.startswith(n + ".") and m not in eager.get(n, set()))}
        for m, names in graph.items()
    }
    cycles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.append(path)
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, " ; ".join(" -> ".join([*c, c[0]]) for c in cycles[:5])


def _eager_imports(package: str) -> set[str]:
    """The tavcli modules a package's __init__ imports when it is imported (not inside functions)."""
    found = set()
    for node in ast.parse(MODULES[package].read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tavcli"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module or ""}
    return found


def test_the_command_line_layers_import_nothing_heavy() -> None:
    code = "import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE)
    code += f"print([name for name in {HEAVY!r} if name in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
