"""The README and docs/ against the code: every config key is documented, every command line they show runs."""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from comp import config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_config_key_is_in_the_configuration_page():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    sections = re.split(r"^### `\[([\w.]+)\]`", text, flags=re.M)
    tables = dict(zip(sections[1::2], sections[2::2], strict=True))
    classes = dict(config.SECTIONS)
    for name, cls in config.SECTIONS.items():  # nested tables such as [model.tfidf]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                classes[f"{name}.{f.name}"] = f.default_factory
    assert set(tables) == set(classes)
    for name, cls in classes.items():
        for f in dataclasses.fields(cls):
            assert re.search(rf"`{f.name}`", tables[name]), f"[{name}] {f.name} is not in docs/configuration.md"


def command_lines() -> list[tuple[str, str, str]]:
    """(page, command, the rest of its line) for each `-m comp.X` in the README and docs; lines ending in a
    backslash continue."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8").replace("\\\n", " ")
        for m in re.finditer(r"-m comp\.(\w+)([^\n`|]*)", text):
            found.append((page.name, m.group(1), m.group(2).split("#")[0]))
    return found


def options(command: str, capsys) -> set[str]:
    module = importlib.import_module(f"comp.{command}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", capsys.readouterr().out))


def test_every_command_line_in_the_docs_names_a_real_command_and_flags(capsys):
    lines = command_lines()
    assert len(lines) > 40
    known: dict[str, set[str]] = {}
    for page, command, rest in lines:
        path = ROOT / "comp" / f"{command}.py"
        assert path.is_file(), f"{page}: python -m comp.{command} is no command"
        if command not in known:
            known[command] = options(command, capsys)
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest):
            assert flag in known[command], f"{page}: python -m comp.{command} has no flag {flag}"


def test_the_readme_stays_short_and_links_only_to_pages_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    for page in PAGES:
        body = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]+)?\)", body):
            assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"
