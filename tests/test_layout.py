"""The package's shape: no import cycle inside ldm/, and the `ldm` command and scripts/*.py answer --help."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldm"


# --------------------------------------------------------------------------- the import graph


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The module of ldm that `import name` runs last: name itself, else its longest known prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported ldm module: line of the first such import}, from the source of every
    module of ldm/: imports at any depth (module level, in functions, under TYPE_CHECKING).
    `from ldm.x import y` is an import of ldm.x.y where that is a module, else of ldm.x."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    modules = set(files)
    # folders without __init__.py (namespace packages) are modules too: `from ldm.models import unet`
    modules |= {name.rpartition(".")[0] for name in files if "." in name}
    graph: dict[str, dict[str, int]] = {name: {} for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..y import z
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target != "ldm" and not target.startswith("ldm."):
                    continue
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    graph[name].setdefault(resolved, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a, b, ..., a) through each strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first inside the component: the shortest way from start back to start
        paths = {start: [start]}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            following = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        cycle = [*paths[v], start]
                        break
                    if w in component and w not in paths:
                        paths[w] = [*paths[v], w]
                        following.append(w)
                if cycle:
                    break
            frontier = following
        cycles.append(cycle)
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    ".join(steps)


def test_finds_a_planted_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_graph_sees_function_level_and_submodule_imports():
    graph = import_graph()
    assert "ldm.training.setup" in graph["ldm.training.loop"]  # `from ldm.training import setup`
    assert "ldm.training.data" in graph["ldm.training.setup"]  # `from ldm.training import data as d`
    assert "ldm.pipelines.pipeline" in graph["ldm.training.setup"]  # imported inside a function
    assert "ldm.pipelines.pipeline" in graph["ldm"]  # the package's re-exports


def test_no_import_cycle_inside_ldm():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles inside ldm/:\n  " + "\n  ".join(_describe(c, graph) for c in cycles)


# --------------------------------------------------------------------------- the console command


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ldm_help_lists_every_subcommand():
    from ldm.cli import COMMANDS

    result = _run("-m", "ldm", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ldm COMMAND")
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")}
    assert listed == set(COMMANDS)


def test_unknown_subcommand_is_one_line_and_exit_2():
    result = _run("-m", "ldm", "nosuch")
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "nosuch" in result.stderr and "txt2img" in result.stderr


def test_version():
    from ldm._version import __version__

    result = _run("-m", "ldm", "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ldm {__version__}"
    assert _pyproject()["project"]["version"] == __version__


@pytest.mark.parametrize("command", ["txt2img", "train"])
def test_subcommand_help_names_itself(command):
    result = _run("-m", "ldm", command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: ldm {command} ")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_script_help(script):
    result = _run(str(ROOT / "scripts" / script), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} ")


def test_every_subcommand_names_itself_in_process(capsys):
    """`ldm NAME --help` of every subcommand shows `usage: ldm NAME` (in process: one import each)."""
    from ldm.cli import COMMANDS, main

    wrong = {}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        out = capsys.readouterr().out
        if exit_.value.code != 0 or not out.startswith(f"usage: ldm {name} "):
            wrong[name] = (exit_.value.code, out.splitlines()[:1])
    assert not wrong


def test_console_entry_point_is_declared_and_resolves():
    from ldm.cli import main

    scripts = _pyproject()["project"]["scripts"]
    module, _, attr = scripts["ldm"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main
    installed = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "ldm"]
    # requirements.txt installs ldm with `-e .`, which creates the script; an older install lacks it
    assert installed, "the installed ldm has no `ldm` console script; run `pip install -e .` again"
    assert installed[0].value == scripts["ldm"] and installed[0].load() is main
