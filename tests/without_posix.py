"""Run one of aeschat's programs as on a system without what only POSIX systems have (Windows):

    python tests/without_posix.py client.py ARGS...

CI has no Windows. This takes away, before aeschat imports anything, the names Windows lacks that aeschat could
touch (signal.SIGHUP, os.O_NONBLOCK, os.O_NOFOLLOW, os.pread, the resource module), so that a test shows start-up,
a chat and a file need none of them.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REMOVED = {os: ("O_NONBLOCK", "O_NOFOLLOW", "pread"), signal: ("SIGHUP",)}

for module, names in REMOVED.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
sys.modules["resource"] = None  # `import resource` raises ImportError, as on Windows

program = Path(sys.argv[1]).resolve()
sys.argv = sys.argv[1:]
sys.path.insert(0, str(program.parent))
runpy.run_path(str(program), run_name="__main__")
