"""The code passes the project's linter (ruff, configured in pyproject.toml), so the test command checks it too."""

import importlib.util
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
