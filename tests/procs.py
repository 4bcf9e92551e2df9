"""Real server.py and client.py processes for the end-to-end tests, driven through pipes.

Every wait is for output we expect, with a timeout: no sleeps stand in for synchronisation.
"""

import os
import queue
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = "correct horse battery staple"
TIMEOUT = 20  # seconds any one expected line may take on a loaded 2-core CI machine


class Proc:
    """A child process with its stdout and stderr read line by line into one queue."""

    def __init__(self, args, passphrase=PASSPHRASE, env=None, stdin=subprocess.PIPE, max_files=None):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("AESCHAT_KEY", None)
        if passphrase is not None:
            full_env["AESCHAT_KEY"] = passphrase

        def limits():  # in the child, before it runs: at most max_files descriptors
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        self.proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=full_env, stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=limits if max_files else None)
        self.lines = queue.Queue()
        self.seen = []  # every (stream, line) read so far
        self.pending = {"out": [], "err": []}  # lines not yet consumed by expect, per stream
        self.closed = set()
        self.raw = {"out": bytearray(), "err": bytearray()}
        self._readers = [threading.Thread(target=self._read, args=(name, stream), daemon=True)
                         for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, name, stream):
        for raw in stream:
            self.raw[name] += raw
            self.lines.put((name, raw.decode("utf-8", "replace").rstrip("\r\n")))
        self.lines.put((name, None))

    def expect(self, pattern, timeout=TIMEOUT, stream=None):
        """Wait for a line matching pattern (on stdout or stderr, or the one named); returns the match.

        Lines are consumed up to the match on its own stream only: stdout and stderr are read by two
        threads, so their order relative to each other is not guaranteed, only each one's own order."""
        streams = ("out", "err") if stream is None else (stream,)
        for name in streams:  # lines already read and not consumed
            match = self._consume(name, pattern, 0)
            if match:
                return match
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0 or len(self.closed) == 2:
                raise AssertionError(f"no line matching {pattern!r}; seen: {self.seen[-15:]}")
            try:
                name, line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.closed.add(name)
                continue
            self.seen.append((name, line))
            self.pending[name].append(line)
            if name in streams:  # only the new line can match now
                match = self._consume(name, pattern, len(self.pending[name]) - 1)
                if match:
                    return match

    def _consume(self, name, pattern, start):
        pending = self.pending[name]
        for i in range(start, len(pending)):
            match = re.search(pattern, pending[i])
            if match:
                del pending[: i + 1]
                return match
        return None

    def send(self, text):
        self.proc.stdin.write(text.encode("utf-8"))
        self.proc.stdin.flush()

    def close_stdin(self):
        self.proc.stdin.close()

    def wait(self, timeout=TIMEOUT):
        """The exit code; the process must end within timeout."""
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return code

    def output(self):
        """Everything the process wrote so far, as text; call after wait()."""
        return self.raw["out"].decode("utf-8", "replace"), self.raw["err"].decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(*extra, passphrase=PASSPHRASE, env=None, max_files=None):
    """server.py on 127.0.0.1 and a free port; returns (process, port) once it is listening."""
    server = Proc(["server.py", "0", "--host", "127.0.0.1", *extra], passphrase=passphrase, env=env,
                  max_files=max_files)
    port = int(server.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1))
    return server, port


def start_client(port, *extra, passphrase=PASSPHRASE, env=None, host="127.0.0.1"):
    return Proc(["client.py", host, port, *extra], passphrase=passphrase, env=env)


def connected(spawn, *server_args, client_args=(), port=None):
    """A server and a client in a chat (through port, a proxy's, if given), both past their banners; with
    --legacy in the server's arguments, both speak the legacy format."""
    legacy = "--legacy" in server_args
    banner = "legacy format" if legacy else "authenticated and encrypted"
    server, server_port = spawn("server", *server_args)
    client = spawn("client", port(server_port) if port else server_port, *client_args, *(["--legacy"] * legacy))
    client.expect(banner)
    server.expect(banner)
    return server, client, server_port


def received(proc):
    """The texts of every message proc showed as received, in order; call after it exited."""
    return [m.group(1) for m in re.finditer(r"^Received: (.*?)  [☒☐]  \d\d:\d\d:\d\d$", proc.output()[0], re.M)]
