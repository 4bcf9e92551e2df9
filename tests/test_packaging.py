"""What a wheel and a source distribution of aeschat contain: one package, aeschat, and nothing with a generic name
at the top of site-packages; the installed commands run from the package."""

import subprocess
import sys
import tarfile
import zipfile

import pytest
from procs import ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # Without isolation: the test extras carry the build backend, so nothing is fetched.
    result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_the_wheel_installs_one_package_and_its_commands(built, tmp_path):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = z.read(next(n for n in names if n.endswith("top_level.txt"))).decode().split()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        z.extractall(tmp_path)
    assert sorted(n for n in names if ".dist-info/" not in n) == [
        "aeschat/client.py", "aeschat/common.py", "aeschat/server.py"]
    assert top_level == ["aeschat"]
    assert "aeschat-client = aeschat.client:main" in entry_points
    assert "aeschat-server = aeschat.server:main" in entry_points
    env = {"PYTHONPATH": str(tmp_path)}
    for program in ("client", "server"):  # the package imports its own common, not one from elsewhere
        code = f"from aeschat import {program}; print({program}.common.__file__); {program}.main()"
        result = subprocess.run([sys.executable, "-c", code, "--version"], cwd=tmp_path, capture_output=True,
                                text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [str(tmp_path / "aeschat" / "common.py"), f"aeschat-{program}", "2.0.0"]


@pytest.mark.slow
def test_the_source_distribution_holds_the_checkout_that_builds_and_tests_it(built):
    _, sdist = built
    with tarfile.open(sdist) as t:
        names = {name.split("/", 1)[1] for name in t.getnames() if "/" in name}
    assert {"client.py", "common.py", "server.py", "pyproject.toml", "README.md", "PROTOCOL.md", "SECURITY.md",
            "tests/conftest.py", "tests/procs.py", "tests/test_core.py", "bench/__main__.py"} <= names
    assert not [name for name in names if name.startswith((".venv", ".git/", "build/"))]
