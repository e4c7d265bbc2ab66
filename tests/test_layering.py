"""Who may import whom, read from the source (any import, at module level or inside a function).

checkpoint/ is the bottom layer; runtime/ reads checkpoints and quantize/ writes them, and neither
imports the other; benchmarks live in bench/, which nothing in the product imports; only the CLI
imports the CLI. The parts' imports form no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("checkpoint", "runtime", "quantize", "bench", "cli", "dockerfiles", "reference")
FORBIDDEN = {
    "checkpoint": {"runtime", "quantize", "bench", "cli", "dockerfiles"},
    "runtime": {"quantize", "bench", "cli", "dockerfiles"},
    "quantize": {"runtime", "bench", "cli", "dockerfiles"},
    "dockerfiles": {"runtime", "quantize", "bench", "cli"},
    "reference": {"runtime", "quantize", "bench", "cli", "dockerfiles"},
}


def imported_parts(part: str) -> dict[str, set[str]]:
    """{other part: the files of `part` that import it}."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / part).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                bits = name.split(".")
                if bits[0] == "llmctl" and len(bits) > 1 and bits[1] in PARTS and bits[1] != part:
                    found.setdefault(bits[1], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_imports_only_what_it_may(part):
    bad = {other: files for other, files in imported_parts(part).items() if other in FORBIDDEN[part]}
    assert bad == {}


def test_no_import_circle_between_parts():
    graph = {part: set(imported_parts(part)) for part in PARTS}
    done: set[str] = set()

    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in path, " -> ".join((*path, part))
        if part not in done:
            for other in graph[part]:
                visit(other, (*path, part))
            done.add(part)

    for part in PARTS:
        visit(part, ())
