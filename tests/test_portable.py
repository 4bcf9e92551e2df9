"""Nothing POSIX-only is needed to start, chat or send a file: the programs run with those names taken away
(tests/without_posix.py), as on Windows, which CI does not have."""

import hashlib
import os

import pytest
from procs import Proc

pytestmark = pytest.mark.slow


def without_posix(program, *args):
    return ["tests/without_posix.py", program, *map(str, args)]


def test_start_up_without_posix_names():
    for program in ("client.py", "server.py"):
        proc = Proc(without_posix(program, "--version"))
        assert proc.wait() == 0 and proc.output()[0].startswith("aeschat-"), proc.output()


def test_a_chat_and_a_file_without_posix_names(tmp_path):
    inbox, payload = tmp_path / "inbox", os.urandom(100_000)
    inbox.mkdir()
    (tmp_path / "notes.bin").write_bytes(payload)
    server = Proc(without_posix("server.py", "0", "--host", "127.0.0.1", "--once", "--receive-dir", inbox))
    port = server.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    client = Proc(without_posix("client.py", "127.0.0.1", port, "--send", tmp_path / "notes.bin"))
    client.send("hello from a system without POSIX\n")
    server.expect("Received: hello from a system without POSIX  ☒")
    server.send("and back\n")
    client.expect("Received: and back  ☒")
    client.expect("delivered file notes.bin")
    client.close_stdin()
    assert client.wait() == 0, client.output()
    assert server.wait() == 0, server.output()
    assert hashlib.sha256((inbox / "notes.bin").read_bytes()).digest() == hashlib.sha256(payload).digest()
