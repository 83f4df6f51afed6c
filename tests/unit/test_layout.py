"""The package layout: one installed top-level package, no import cycles, and a torch-free core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "autoprec"

#: modules a user with only an .onnx file, and the search and cost model, load without torch
TORCH_FREE = ["autoprec.core", "autoprec.cost", "autoprec.search", "autoprec.onnx", "autoprec.ort.providers",
              "autoprec.ort.runtime", "autoprec.report"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """autoprec modules ``path`` imports anywhere: at module level, in functions (deferred so that a
    command starts fast or a path stays torch-free, never to hide a cycle) and for type checkers."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycles():
    mods = _modules()
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        g.add_edges_from((name, m) for m in _imports(path, set(mods)) if m != name)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]


def test_every_module_opens_with_a_one_line_docstring():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip().splitlines()[0].strip(), f"{name} has no docstring naming its concept"


@pytest.mark.parametrize("prefix", TORCH_FREE)
def test_torch_free_modules_import_no_torch(prefix):
    names = [m for m in _modules() if m == prefix or m.startswith(prefix + ".")]
    code = "import sys\n" + "".join(f"import {m}\n" for m in names) + \
        "bad = [m for m in ('torch', 'torch.fx') if m in sys.modules]\nassert not bad, bad\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_only_autoprec_is_installed_as_a_top_level_package():
    """pyproject finds packages under autoprec only: no `passes` (or other) package lands in
    site-packages beside it."""
    from setuptools import find_packages

    text = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["autoprec*"]' in text
    found = find_packages(str(ROOT), include=["autoprec*"])
    assert found and {p.split(".")[0] for p in found} == {"autoprec"}
    assert not (ROOT / "passes").exists()
