"""The code passes the project's linter (ruff, configured in pyproject.toml), so the test command checks it too; its
pieces stay small; and common.py says in __all__ what it offers."""

import ast
import importlib.util
import re
import subprocess
import sys

import pytest
from procs import ROOT


def test_ruff_finds_nothing():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_class_over_400_lines_and_no_function_over_40():
    """The session grew to 848 lines once; small pieces stay small."""
    for name in ("common.py", "client.py", "server.py"):
        tree = ast.parse((ROOT / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            size = node.end_lineno - node.lineno + 1 if hasattr(node, "end_lineno") else 0
            if isinstance(node, ast.ClassDef):
                assert size <= 400, f"{name}: class {node.name} is {size} lines"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert size <= 40, f"{name}: {node.name} (line {node.lineno}) is {size} lines"


def test_all_names_what_the_programs_use_and_every_event_type():
    import common

    used = set()
    for name in ("client.py", "server.py"):
        used |= set(re.findall(r"\bcommon\.([A-Za-z_]\w*)", (ROOT / name).read_text(encoding="utf-8")))
    events = {name for name, value in vars(common).items()
              if isinstance(value, type) and issubclass(value, (common._Event, common.AeschatError))
              and not name.startswith("_")}
    assert used - {"py"} <= set(common.__all__)
    assert events <= set(common.__all__)
    assert all(hasattr(common, name) for name in common.__all__) and len(set(common.__all__)) == len(common.__all__)


def test_ci_runs_the_readmes_test_command_exactly():
    """A newcomer pastes the README's command into a fresh shell; CI runs that very line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"Run the tests.*?\n\n    (.+?)\n", readme, re.S).group(1)
    assert command.startswith("python3 -m venv .venv && ")
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
