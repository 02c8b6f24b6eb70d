"""The package's layering: no import cycle between sub-packages, and package-level names that
are imported on first use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bids_qsmnet

PACKAGE = Path(bids_qsmnet.__file__).parent


def _module_parts(path: Path) -> list[str]:
    """``bids_qsmnet/phase/chain.py`` → ``["phase", "chain"]`` (a package: its folder)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path) -> set[tuple[str, int]]:
    """``(first part below bids_qsmnet, line)`` of every import of the package in a file,
    at module level or inside functions."""
    parts = _module_parts(path)
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names
                       if a.name.startswith("bids_qsmnet.")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                targets = [base + node.module.split(".")]
            else:  # from . import x, y
                targets = [base + [a.name] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bids_qsmnet."):
            targets = [node.module.split(".")[1:]]
        found.update((t[0], node.lineno) for t in targets if t)
    return found


def _subpackage_graph() -> dict[str, dict[str, str]]:
    """sub-package → {sub-package it imports: "file:line" of one such import}."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = _module_parts(path)
        if not parts:  # bids_qsmnet/__init__.py
            continue
        for target, line in _imported(path):
            if target != parts[0]:
                graph.setdefault(parts[0], {}).setdefault(
                    target, f"{path.relative_to(PACKAGE.parent)}:{line}")
    return graph


def _find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_imports():
    graph = _subpackage_graph()
    # inference/run.py imports models only inside run_qsmnet
    assert "models" in graph["inference"]
    assert "physics" in graph["phase"] and "errors" in graph["io"]


def test_no_import_cycle_between_subpackages():
    graph = _subpackage_graph()
    cycle = _find_cycle(graph)
    where = [graph[a][b] for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, f"import cycle {' → '.join(cycle)} ({', '.join(where)})"


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b": ""}, "b": {}}) is None


def test_package_level_names_are_imported_on_first_use():
    """``bids_qsmnet.interfaces`` and ``bids_qsmnet.workflows`` export their public names;
    importing the packages alone imports neither Nipype nor torch."""
    code = (
        "import sys\n"
        "import bids_qsmnet.interfaces, bids_qsmnet.workflows\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('nipype', 'torch')]\n"
        "from bids_qsmnet.interfaces import ExtractPatches, QSMnetInference, TrainQSMnet\n"
        "from bids_qsmnet.workflows import init_qsmnet_wf, init_training_wf\n"
        "from bids_qsmnet.interfaces.training import ExtractPatches as E, TrainQSMnet as T\n"
        "from bids_qsmnet.interfaces.inference import QSMnetInference as Q\n"
        "from bids_qsmnet.workflows.qsmnet import init_qsmnet_wf as q\n"
        "from bids_qsmnet.workflows.training import init_training_wf as t\n"
        "assert (ExtractPatches, TrainQSMnet, QSMnetInference) == (E, T, Q)\n"
        "assert (init_qsmnet_wf, init_training_wf) == (q, t)\n"
        "assert 'TrainQSMnet' in dir(bids_qsmnet.interfaces)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stderr


def test_unknown_package_names_raise_attribute_error():
    import pytest

    import bids_qsmnet.interfaces as interfaces
    import bids_qsmnet.workflows as workflows

    for package in (interfaces, workflows):
        with pytest.raises(AttributeError, match="no attribute 'nothing'"):
            package.nothing  # noqa: B018
