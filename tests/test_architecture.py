"""The one-way house: the import contracts in pyproject.toml hold, no project module takes part in
an import cycle (function-level imports count too), and functions stay short.

Layers, top to bottom: guardtune (the front door) > jobs (the training platform) > serving | training
(independent) > guardrails | rag (independent) > kernel.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import grimp
import networkx

from tests.conftest import ROOT

PACKAGES = ("kernel", "guardtune", "jobs", "training", "serving", "guardrails", "rag")
MAX_FUNCTION_LINES = 60
# A longer function is allowed when a comment on its def line, or on the line above, says why.
LONG_MARK = "long:"


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.is_file(), "lint-imports missing: pip install -e '.[test]' (requirements/test.txt)"
    p = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_COLOR": "1"})
    out = re.sub(r"\x1b\[[0-9;]*m", "", p.stdout)
    assert p.returncode == 0, out[-6000:] + p.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in out, out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one module (networkx's Tarjan; networkx comes with torch)."""
    g = networkx.DiGraph()
    g.add_nodes_from(graph)
    g.add_edges_from((a, b) for a, targets in graph.items() for b in targets)
    return sorted(sorted(c) for c in networkx.strongly_connected_components(g) if len(c) > 1)


def test_strongly_connected_finds_a_cycle_and_only_it():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(g) == [["a", "b", "c"]]


def test_no_import_cycles_between_modules():
    g = grimp.build_graph(*PACKAGES, cache_dir=None)
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    cycles = strongly_connected(graph)
    detail = []
    for comp in cycles:
        members = set(comp)
        edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
        detail.append(f"{len(comp)} modules: " + ", ".join(edges))
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        marked = any(LONG_MARK in _comment(lines[i - 1]) for i in (node.lineno, node.lineno - 1) if i >= 1)
        if length > limit and not marked:
            where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            out.append(f"{where}:{node.lineno} {node.name} ({length} lines)")
    return out


def _comment(line: str) -> str:
    """The comment part of a source line (a '#' inside a string is rare enough on a def line)."""
    return line.split("#", 1)[1] if "#" in line else ""


def test_long_function_check_honours_the_marker(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    src = tmp_path / "m.py"
    src.write_text(f"def plain():\n{body}\n# long: a table of cases\ndef marked():\n{body}"
                   f"def inline():  # long: one case per line\n{body}")
    assert [s.split()[1] for s in long_functions(src)] == ["plain"]


def test_no_function_over_sixty_lines_without_a_reason():
    found = [f for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py")) for f in long_functions(path)]
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines without a '# {LONG_MARK} why' comment:\n" + \
        "\n".join(found)
