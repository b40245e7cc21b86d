"""The vocabularies a user types are the registries' own: every output format the
CLI and the config accept has a registry entry (and the other way round), and so
does every criterion; objects, not names, travel below the API."""

from __future__ import annotations

import ast
from pathlib import Path

from ewq.config import Criterion, Format
from ewq.formats import FORMATS, GGUF, HF, format_for, output_format
from ewq.sensitivity import CRITERIA
from ewq.types import Container

SRC = Path(__file__).resolve().parents[1] / "src" / "ewq"


def test_config_format_is_the_format_registry():
    assert {f.value for f in Format} == set(FORMATS)
    for f in Format:
        assert output_format(f) is FORMATS[f.value]


def test_config_criterion_is_the_criterion_registry():
    assert {c.value for c in Criterion} == set(CRITERIA)


def test_a_source_is_written_in_the_format_that_reads_it_as_it_is():
    assert format_for(Container.GGUF) is GGUF
    assert format_for(Container.SAFETENSORS) is HF
    assert output_format(GGUF) is GGUF  # an entry passes through


def _literals(path: Path, value: str) -> list[int]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    return [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value == value and id(n) not in docstrings
    ]


def test_no_format_name_below_the_cli_outside_the_registries():
    """The output format is resolved once per API call and passed as the registry's
    entry: "gguf" is spelled only where the names are declared (ewq.formats, the
    config's choices, the container vocabulary) and in the CLI's parsing."""
    allowed = {"formats", "cli", "config/_choices.py", "types.py"}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.split("/")[0] in allowed or rel in allowed:
            continue
        found += [f"{rel}:{line}" for line in _literals(path, "gguf")]
    assert not found


def test_no_parameter_is_a_format_name():
    """No ``fmt: str`` below the CLI: functions take the registry's entry."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("formats/", "cli/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.arg) and node.arg in ("fmt", "format_name"):
                found.append(f"{rel}:{node.lineno}")
    assert not found


def test_the_method_cited_is_the_repositorys_own_and_its_sections_exist():
    """The code and the README cite docs/method.md (in the clone), by sections that
    it has; nothing cites a path outside the repository."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    method = (root / "docs" / "method.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", method, re.M)}
    assert sections == set(range(1, 9))
    files = [root / "README.md", *sorted((root / "src" / "ewq").rglob("*.py"))]
    cited = 0
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert "METHOD.md" not in text and "../shared/docs" not in text, f
        for found in re.findall(r"docs/method\.md`?,? sections? ([\d, -]+)", text):
            numbers = re.findall(r"\d+", found)
            assert numbers and {int(n) for n in numbers} <= sections, (f, found)
            cited += 1
    assert cited >= 10
