"""Regenerate the scoreboard in SECURITY.md from a fresh run of the attack suite:

    python tests/scoreboard.py

It runs the tests that attack real processes (and the outside known answers) with hypothesis at CI
strength; only if all of them pass does it rewrite the table between the scoreboard markers.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECURITY = ROOT / "SECURITY.md"
BEGIN, END = "<!-- scoreboard: begin -->", "<!-- scoreboard: end -->"
SUITES = ["tests/test_attacks.py", "tests/test_vectors.py"]


def main():
    with tempfile.TemporaryDirectory() as folder:
        figures_file = Path(folder) / "figures.json"
        env = {**os.environ, "AESCHAT_SCOREBOARD": str(figures_file), "CI": "1"}
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", *SUITES], cwd=ROOT, env=env)
        if code != 0:
            print("scoreboard: the attack suite failed; SECURITY.md is unchanged", file=sys.stderr)
            return code
        figures = json.loads(figures_file.read_text(encoding="utf-8"))
    rows = ["| test category | figure from the last run |", "|---|---|"]
    rows += [f"| {category} | {figure} |" for category, figure in sorted(figures.items())]
    text = SECURITY.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    SECURITY.write_text(text[:start] + "\n" + "\n".join(rows) + "\n" + text[end:], encoding="utf-8")
    print(f"scoreboard: {len(figures)} figures written to {SECURITY.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
