"""The layout rules CI checks (issue 23): the layers contract in .importlinter holds, no module passes 600 lines, and
imports inside functions that reach mmfuse's own modules are few, each with a comment saying why it is deferred.

The CLI (mmfuse/cli/) is exempt from the in-function rule: each verb imports its library when it runs, so that
--help, --version and ``mmfuse cache`` never import torch (tests/test_startup.py)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "mmfuse"
MAX_LINES = 600
MAX_DEFERRED = 4  # in-function imports of mmfuse's own modules outside mmfuse/cli/


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def deferred_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source) of each import inside a function that reaches mmfuse's own modules (or a relative one)."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [alias.name for alias in child.names]
                else:
                    names = ["mmfuse" if child.level else child.module or ""]
                if any(name == "mmfuse" or name.startswith("mmfuse.") for name in names):
                    found.append(child.lineno)
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, in_function or inner)

    text = path.read_text(encoding="utf-8")
    visit(ast.parse(text), False)
    lines = text.splitlines()
    return [(n, lines[n - 1]) for n in found]


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_few_deferred_imports_of_mmfuse_outside_the_cli_each_saying_why():
    deferred = {}
    for path in modules():
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for line, source in deferred_imports(path):
            deferred[f"{path.relative_to(SRC)}:{line}"] = source.strip()
    uncommented = []
    for where, source in deferred.items():
        path, line = where.rsplit(":", 1)
        lines = (SRC / path).read_text(encoding="utf-8").splitlines()
        above = lines[int(line) - 2].strip() if int(line) > 1 else ""
        if "#" not in source and not above.startswith("#"):
            uncommented.append(where)
    listing = "\n".join(f"  {where}: {source}" for where, source in deferred.items())
    assert len(deferred) <= MAX_DEFERRED, f"{len(deferred)} in-function imports of mmfuse modules:\n{listing}"
    assert not uncommented, f"deferred imports without a comment saying why: {uncommented}"


def test_the_layers_contract_holds():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed (it is in the dev extra: pip install -e '.[dev]')")
    # This tree's mmfuse, not whichever one is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    # lint-imports, run by this interpreter, reads .importlinter in the repository root.
    command = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
        "--no-cache",  # a test leaves no cache in the tree
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
