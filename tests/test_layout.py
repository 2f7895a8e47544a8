"""The house rule of the code's shape: the core (every module without a command line) imports no command-line
module, directly or through another core module, so the data, training and output layers never depend on argv."""

import ast
from pathlib import Path

import comp

ROOT = Path(comp.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in ROOT.glob("*.py") if p.stem != "__init__"}


def _imports(tree: ast.Module) -> set[str]:
    """The comp modules a module imports at its top level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "comp":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comp."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("comp.")}
    return out


def test_no_core_module_imports_a_command_line_module():
    modules = _modules()
    commands = {name for name, tree in modules.items()
                if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)} | {"cli"}
    core = set(modules) - commands
    assert {"tables", "splits", "engine", "loop", "state", "batching", "runs", "outputs"} <= core
    for name in sorted(core):
        assert not _imports(modules[name]) & commands, f"comp/{name}.py imports {_imports(modules[name]) & commands}"
