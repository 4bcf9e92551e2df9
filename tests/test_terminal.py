"""On a real terminal, through pexpect: the prompt_toolkit path."""

import os
import re
import sys

import pexpect
import pytest
from procs import PASSPHRASE, ROOT, TIMEOUT, start_client, start_server

pytestmark = pytest.mark.slow

CPR_REQUEST = "\x1b[6n"  # prompt_toolkit asks where the cursor is; a real terminal answers


class Terminal:
    """A program on a pseudo-terminal that answers cursor position requests as a terminal does."""

    def __init__(self, args, env=None):
        full_env = {**os.environ, "AESCHAT_KEY": PASSPHRASE, "TERM": "xterm-256color", **(env or {})}
        self.child = pexpect.spawn(sys.executable, [str(a) for a in args], cwd=ROOT, env=full_env,
                                   encoding="utf-8", dimensions=(30, 120), timeout=TIMEOUT)
        self.transcript = []

    def expect(self, pattern):
        while True:
            index = self.child.expect([pattern, re.escape(CPR_REQUEST)])
            self.transcript.append(self.child.before + (self.child.after if isinstance(self.child.after, str) else ""))
            if index == 0:
                return self.child.match
            self.child.send("\x1b[1;1R")

    def exit_code(self):
        self.expect(pexpect.EOF)
        self.child.close()
        return self.child.exitstatus

    def output(self):
        return "".join(self.transcript)

    def kill(self):
        self.child.terminate(force=True)


@pytest.fixture
def pair():
    """A server on a terminal, a client through pipes; both killed at the end."""
    made = []
    server = Terminal(["server.py", "0", "--host", "127.0.0.1", "--once"])
    made.append(server)
    port = server.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    client = start_client(port)
    made.append(client)
    client.expect("authenticated and encrypted")
    server.expect("authenticated and encrypted")
    yield server, client
    for proc in made:
        proc.kill()


def test_typed_text_survives_an_arriving_message_and_is_sent_whole(pair):
    server, client = pair
    server.child.send("half a li")
    server.expect("half a li")
    client.send("interrupting you\n")
    server.expect("Received: interrupting you  ☒")
    server.child.send("ne\r")
    client.expect(r"^Received: half a line  ☒")
    server.expect(r"Sent: half a line")


def test_status_line_shows_peer_protocol_and_undelivered(pair):
    server, _ = pair
    server.expect(r"127\.0\.0\.1:\d+ \| aeschat v2, encrypted \| 0 undelivered")


def test_history_recalls_the_last_line(pair):
    server, client = pair
    server.child.send("first line\r")
    client.expect("Received: first line")
    server.child.send("\x1b[A\r")  # up arrow, enter
    client.expect("Received: first line")


def test_quit_on_the_terminal(pair):
    server, client = pair
    server.child.send("quit()\r")
    assert server.exit_code() == 0
    client.expect("peer left the chat")
    assert client.wait() == 0


def test_ctrl_d_on_the_terminal(pair):
    server, client = pair
    server.expect("undelivered")  # the prompt is up (before it, the tty itself would take the Ctrl-D)
    server.child.sendcontrol("d")
    assert server.exit_code() == 0
    client.expect("peer left the chat")


def test_ctrl_c_on_the_terminal_restores_it_without_a_traceback(pair):
    server, client = pair
    server.child.send("unfinished")
    server.expect("unfinished")
    server.child.sendcontrol("c")
    assert server.exit_code() == 130
    assert "Traceback" not in server.output()
    assert "\x1b[?2004l" in server.output()  # bracketed paste switched off again: the terminal is restored
    client.expect("peer left the chat")


def test_client_on_a_terminal_and_no_color():
    server, port = start_server("--once")
    client = Terminal(["client.py", "127.0.0.1", port], env={"NO_COLOR": "1"})
    try:
        client.expect("authenticated and encrypted")
        server.expect("authenticated and encrypted")
        server.send("to the terminal\n")
        client.expect("Received: to the terminal  ☒")
        client.child.send("quit()\r")
        assert client.exit_code() == 0
        assert not re.search(r"\x1b\[[0-9;]*(3[0-9]|4[0-9]|38;5)", client.output()), "a colour escape with NO_COLOR"
    finally:
        client.kill()
        server.kill()


def test_passphrase_prompt_does_not_echo():
    server, port = start_server("--once")
    env = {k: v for k, v in os.environ.items() if k != "AESCHAT_KEY"}
    child = pexpect.spawn(sys.executable, ["client.py", "127.0.0.1", str(port)], cwd=ROOT, env=env,
                          encoding="utf-8", timeout=TIMEOUT)
    try:
        child.expect("Passphrase: ")
        child.sendline(PASSPHRASE)
        child.expect("authenticated and encrypted")
        assert PASSPHRASE not in child.before
    finally:
        child.terminate(force=True)
        server.kill()


def test_host_and_port_are_asked_for_on_a_terminal():
    server, port = start_server("--once")
    client = Terminal(["client.py"])
    try:
        client.expect("Server address: ")
        client.child.sendline("127.0.0.1")
        client.expect(r"Port \[5555\]: ")
        client.child.sendline(str(port))
        client.expect("authenticated and encrypted")
    finally:
        client.kill()
        server.kill()
