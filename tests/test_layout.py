"""The shape of the code: the commands at the top of comp/, the core in a few subpackages, and imports that go one
way: commands -> outputs -> nn -> classical -> tables -> the shared modules. Nothing in the core imports a command."""

import ast
from pathlib import Path

import comp

ROOT = Path(comp.__file__).parent
SHARED = {"config", "errors", "cli", "metrics", "artifacts", "images"}
PACKAGES = ("tables", "classical", "nn", "outputs")  # each may import those before it, never those after
MAY_IMPORT = {pkg: set(PACKAGES[:i + 1]) | {"shared"} for i, pkg in enumerate(PACKAGES)}


def _group(dotted: str) -> str:
    """'comp.nn.model' -> 'nn'; 'comp.config' -> 'shared'; 'comp.train' -> 'command'."""
    parts = dotted.split(".")
    if len(parts) > 2 or parts[1] in PACKAGES:
        return parts[1]
    return "shared" if parts[1] in SHARED else "command"


def _modules() -> dict[str, ast.Module]:
    """Every module of comp by its dotted name."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if name != "comp":
            out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(tree: ast.Module) -> set[str]:
    """The comp modules a module imports, at its top level or inside functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comp"):
            if node.module in ("comp", *(f"comp.{p}" for p in PACKAGES)):
                out |= {f"{node.module}.{a.name}" for a in node.names if a.name != "__version__"}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("comp.")}
    return out


def test_the_tree_is_the_commands_the_shared_modules_and_the_subpackages():
    top = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    commands = {name for name in top if name not in SHARED}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(PACKAGES) and len(folders) <= 5
    for name in commands:
        tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"comp/{name}.py has no main"
    for pkg in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) == 2, f"comp/{pkg}/__init__.py: say in two lines what it holds and imports"


def test_imports_go_one_way():
    for name, tree in sorted(_modules().items()):
        group = _group(name)
        if group == "command":
            continue
        for target in _imports(tree):
            to = _group(target)
            assert to != "command", f"{name} imports the command {target}"
            if group == "shared":
                assert to == "shared", f"{name} (shared) imports {target}"
            else:
                assert to in MAY_IMPORT[group], f"{name} ({group}) imports {target} ({to})"


def test_the_rule_catches_a_wrong_way_import():
    assert _group("comp.tables.read") == "tables" and _group("comp.train") == "command"
    assert _group("comp.metrics") == "shared" and _group("comp.nn") == "nn"
    assert "nn" not in MAY_IMPORT["tables"] and "outputs" not in MAY_IMPORT["nn"]
    tree = ast.parse("from comp.nn import model\nfrom comp import train, config\n")
    assert _imports(tree) == {"comp.nn.model", "comp.train", "comp.config"}
