"""End to end through pipes: real server.py and client.py processes on 127.0.0.1."""

import re
import signal
import socket
import subprocess
import time

import pytest
from procs import PASSPHRASE, connected

pytestmark = pytest.mark.slow


def test_messages_both_ways_with_unicode_then_quit(spawn):
    server, client, _ = connected(spawn, "--once")
    client.send("héllo ✓ wörld 😀\n")
    server.expect(r"^Received: héllo ✓ wörld 😀  ☒  \d\d:\d\d:\d\d$")
    client.expect(r"^Sent: héllo ✓ wörld 😀  \d\d:\d\d:\d\d$")
    server.send("and back ~ with a tilde\n")
    client.expect(r"^Received: and back ~ with a tilde  ☒  ")
    client.send("quit()\n")
    server.expect("peer left the chat")
    assert client.wait() == 0
    assert server.wait() == 0


def test_end_of_input_flushes_and_says_goodbye(spawn):
    server, client, _ = connected(spawn, "--once")
    client.send("build done\n")
    client.close_stdin()
    assert client.wait() == 0  # returns only once the message is delivered
    server.expect("Received: build done  ☒")
    server.expect("peer left the chat")
    assert server.wait() == 0


def test_one_shot_script_usage(spawn, tmp_path):
    key = tmp_path / "k"
    key.write_text(PASSPHRASE + "\n")
    server, port = spawn("server", "--once")
    client = spawn("proc", ["client.py", "127.0.0.1", port, "--key-file", key], passphrase=None)
    client.send("build done\n")
    client.close_stdin()
    assert client.wait() == 0
    server.expect("Received: build done  ☒")


def test_a_thousand_messages_as_fast_as_possible_all_shown_in_order(spawn):
    server, client, _ = connected(spawn, "--once")
    client.send("".join(f"message {i}\n" for i in range(1000)))
    client.close_stdin()
    for i in range(1000):
        server.expect(rf"^Received: message {i}  ☒")
    assert client.wait() == 0
    out, _ = client.output()
    assert "not delivered" not in out


def test_a_64_kib_message(spawn):
    server, client, _ = connected(spawn, "--once")
    big = "".join(chr(0x41 + i % 26) for i in range(64 * 1024))
    client.send(big + "\n")
    match = server.expect(r"^Received: ([A-Z]+)  ☒")
    assert match.group(1) == big
    client.send(big + "x\n")
    client.expect("not sent: the message is 65537 bytes; the limit is 65536")
    client.close_stdin()
    assert client.wait() == 1  # a line that could not be sent: a script is told by the exit code
    assert "1 line typed could not be sent" in client.output()[1]


def test_windows_line_endings_are_line_endings(spawn):
    server, client, _ = connected(spawn, "--once")
    client.send("from a windows file\r\n")
    server.expect(r"^Received: from a windows file  ☒")
    client.close_stdin()
    assert client.wait() == 0


def test_a_line_of_30_mb_is_refused_without_being_read_whole(spawn):
    server, client, _ = connected(spawn, "--once")

    def peak():
        with open(f"/proc/{client.proc.pid}/status") as status:
            return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024

    before = peak()  # the interpreter's own: some 35 MiB on CPython, 90 on PyPy
    client.send("é" * 15_000_000 + "\nafter\n")  # 30 MB of UTF-8, no line end for a long while
    client.expect("not sent: the message is 30000000 bytes; the limit is 65536")
    server.expect(r"^Received: after  ☒")
    assert peak() - before < 24 * 2**20  # never the line whole (it was 230 MB for 100 MB of input)
    client.close_stdin()
    assert client.wait() == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_ctrl_c_and_sigterm_leave_with_a_goodbye_and_the_shell_code(spawn, sig, code):
    server, client, _ = connected(spawn, "--once")
    server.send("are you there\n")  # the chat runs: the client is past attaching its connection, in its input loop
    client.expect("Received: are you there")
    client.proc.send_signal(sig)
    assert client.wait() == code
    _, err = client.output()
    assert "Traceback" not in err and "you left the chat (interrupted)" in err
    server.expect("the peer left the chat")


@pytest.mark.parametrize("wrong_side", ["client", "server"])
def test_wrong_passphrase_is_a_clear_error_on_connect(spawn, wrong_side):
    server, port = spawn("server", passphrase="server secret" if wrong_side == "server" else PASSPHRASE)
    client = spawn("client", port, passphrase="client secret" if wrong_side == "client" else PASSPHRASE)
    assert client.wait() == 3
    _, err = client.output()
    assert "passphrases differ" in err and "Traceback" not in err
    server.expect(r"failed passphrase attempt from 127\.0\.0\.1:\d+")
    # The server goes on: a client with the server's passphrase is served (after the guessing delay).
    right = "server secret" if wrong_side == "server" else PASSPHRASE
    good = spawn("client", port, passphrase=right)
    good.expect("authenticated and encrypted")


def test_server_serves_a_second_client_after_the_first_leaves(spawn):
    server, first, port = connected(spawn)
    first.send("one\n")
    first.close_stdin()
    assert first.wait() == 0
    server.expect("Received: one")
    server.expect("waiting for the next client")
    second = spawn("client", port)
    second.expect("authenticated and encrypted")
    second.send("two\n")
    server.expect("Received: two  ☒")


def test_busy_while_idle_unauthenticated_sockets_are_open(spawn):
    server, port = spawn("server")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    try:
        chatting = spawn("client", port)
        chatting.expect("authenticated and encrypted")  # not blocked by the idle sockets
        intruder = spawn("client", port, "--no-reconnect")  # else, in a pipe, it waits its turn
        intruder.send("x\n")
        assert intruder.wait() == 1
        out, err = intruder.output()
        assert err == "aeschat-client: error: the server is busy with another chat\n"
        assert out == ""  # nothing announced, nothing shown as sent
        chatting.send("still here\n")
        server.expect("Received: still here  ☒")
        server.send("me too\n")
        chatting.expect("Received: me too  ☒")
    finally:
        for sock in idle:
            sock.close()


def test_a_script_at_a_busy_server_tries_for_all_the_time_it_was_given(spawn):
    """Once, with --reconnect-for 5 it said "trying again for up to 5 s" and gave up after 3.2 s: the next back-off
    would have passed the time, so it did not try at the end of it."""
    server, port = spawn("server")
    chatting = spawn("client", port)
    chatting.expect("authenticated and encrypted")
    started = time.monotonic()
    waiting = spawn("client", port, "--reconnect-for", "3")
    waiting.send("x\n")
    waiting.expect("trying again for up to 3 s", stream="err")
    assert waiting.wait() == 1
    assert time.monotonic() - started >= 3.0


def test_one_shot_clients_arriving_together_at_a_sink_take_turns(spawn):
    server, port = spawn("server", "--receive-only")
    senders = [spawn("client", port) for _ in range(4)]
    for i, sender in enumerate(senders):
        sender.send(f"build {i} done\n")
        sender.close_stdin()
    assert [sender.wait() for sender in senders] == [0, 0, 0, 0]
    got = sorted(server.expect(r"^Received: (build \d done)  ☒").group(1) for _ in range(4))
    assert got == [f"build {i} done" for i in range(4)]


def test_idle_unauthenticated_connection_is_dropped_by_its_deadline(spawn):
    server, port = spawn("server")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        server.expect(r"127\.0\.0\.1:\d+ dropped: no aeschat handshake within 5 s")
        assert sock.recv(100) == b"\x00\x00\x00\x0baeschat\x00\x02go"  # its greeting, and nothing computed


def test_client_killed_with_sigkill_and_a_new_one_takes_over(spawn):
    server, client, port = connected(spawn)
    client.proc.kill()
    server.expect(r"connection lost: .*; waiting for the client \(0 undelivered\)")
    server.send("are you back?\n")  # queued while the client is away
    server.expect("Queued: are you back")
    newcomer = spawn("client", port)
    newcomer.expect("authenticated and encrypted")
    server.expect(r"a new client \(127\.0\.0\.1:\d+\) took the conversation over")
    newcomer.expect("Received: are you back\\?  ☒")
    newcomer.send("a new me\n")
    server.expect("Received: a new me  ☒")


def test_client_killed_with_sigkill_without_reconnect(spawn):
    server, client, port = connected(spawn, "--no-reconnect")
    client.proc.kill()
    server.expect("connection lost")
    server.expect("waiting for the next client")
    spawn("client", port).expect("authenticated and encrypted")


def test_server_killed_with_sigkill(spawn):
    server, client, _ = connected(spawn, client_args=("--no-reconnect",))
    server.proc.kill()
    client.expect("connection lost")
    assert client.wait() == 1


def test_server_gone_for_good_ends_the_reconnecting_client(spawn):
    server, client, _ = connected(spawn, client_args=("--reconnect-for", "1"))
    server.proc.kill()
    client.expect(r"connection lost: .*reconnecting \(0 undelivered\)")
    client.expect("could not reconnect within 1 s")
    assert client.wait() == 1


def test_silent_peer_is_noticed_by_keepalive(spawn):
    server, client, _ = connected(spawn, client_args=("--keepalive", "0.3", "--no-reconnect"))
    server.proc.send_signal(signal.SIGSTOP)  # alive to TCP, silent to us: a frozen machine
    try:
        client.expect(r"connection lost: no sign of the peer for 1 s")
        assert client.wait() == 1
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_escape_sequences_from_the_peer_never_reach_stdout(spawn):
    server, client, _ = connected(spawn, "--once")
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[1A\u202eevil\x9b31m\rfake"
    client.send(hostile + "\n")
    server.expect(r"Received: \\x1b\]0;pwned\\x07\\x1b\[2J\\x1b\[1A\\u202eevil\\x9b31m\\rfake  ☒")
    client.close_stdin()
    assert server.wait() == 0
    raw = bytes(server.raw["out"])
    assert b"\x1b" not in raw and b"\x07" not in raw and b"\r" not in raw and "\u202e".encode() not in raw


def test_in_a_pipe_stdout_carries_only_the_transcript(spawn):
    server, client, _ = connected(spawn, "--once")
    client.send("one\n")
    server.expect("Received: one  ☒")
    server.send("two\n")
    client.expect("Received: two  ☒")
    client.close_stdin()
    assert client.wait() == 0
    out, err = client.output()
    assert [line.split(":")[0] for line in out.splitlines()] == ["Sent", "Received"]
    assert "Connected to" in err and "quit()" not in out + err and "you left the chat" in err


def test_lines_typed_on_the_server_before_anyone_connects_are_sent_when_the_chat_begins(spawn):
    server, port = spawn("server", "--once")
    server.send("typed early\n")
    server.expect(r"^Queued: typed early  \d\d:\d\d:\d\d$")
    client = spawn("client", port)
    client.expect("Received: typed early  ☒")
    server.expect("sent 1 message typed before the chat began")
    client.close_stdin()
    assert client.wait() == 0


def test_receive_only_serves_one_client_after_another_until_a_signal(spawn, tmp_path):
    key = tmp_path / "k"
    key.write_text(PASSPHRASE)
    key.chmod(0o600)
    server = spawn("proc", ["server.py", "0", "--host", "127.0.0.1", "--receive-only", "--key-file", key],
                   passphrase=None, stdin=subprocess.DEVNULL)
    port = server.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    for text in ("build 1 done", "build 2 done"):
        shot = spawn("proc", ["client.py", "127.0.0.1", port, "--key-file", key], passphrase=None)
        shot.send(text + "\n")
        shot.close_stdin()
        assert shot.wait() == 0
        server.expect(f"Received: {text}  ☒  " + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  from 127\.0\.0\.1:\d+$")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 143
    assert "Traceback" not in server.output()[1]


def test_without_receive_only_end_of_input_stops_a_waiting_server_and_says_so(spawn):
    server = spawn("proc", ["server.py", "0", "--host", "127.0.0.1"], stdin=subprocess.DEVNULL)
    assert server.wait() == 0
    assert "end of input: the server stops" in server.output()[1]


def test_quit_stops_a_waiting_server_and_says_so_as_the_end_of_input_does(spawn):
    """Outside round three: quit() with no client stopped the server without a word; Ctrl-D said so."""
    server, _ = spawn("server")
    server.send("quit()\n")
    server.expect("^the server stops$")
    assert server.wait() == 0
