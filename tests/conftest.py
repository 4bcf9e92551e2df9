"""Shared test settings: hypothesis runs 1,000 examples a property in CI, fewer on a quick local run."""

import json
import os

import procs
import pytest
from hypothesis import HealthCheck, settings

# The programs under test run as on a user's machine, their bytecode cached: where the environment forbids it (this
# machine sets PYTHONDONTWRITEBYTECODE), each process the suite starts compiled common.py afresh: 30 s of 265.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

settings.register_profile("ci", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def spawn():
    """Start processes through this, so that each is killed at the end of the test whatever happens."""
    started = []

    def _spawn(kind, *args, **kwargs):
        made = {"server": procs.start_server, "client": procs.start_client, "proc": procs.Proc}[kind](*args, **kwargs)
        started.append(made[0] if isinstance(made, tuple) else made)
        return made

    yield _spawn
    for proc in started:
        proc.kill()


@pytest.fixture(scope="session")
def score():
    """Record a figure for SECURITY.md's scoreboard: score(category, figure). tests/scoreboard.py asks
    for them by setting AESCHAT_SCOREBOARD to a file, which gets them as JSON at the end of the run."""
    figures = {}
    yield figures.__setitem__
    path = os.environ.get("AESCHAT_SCOREBOARD")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1, ensure_ascii=False)
