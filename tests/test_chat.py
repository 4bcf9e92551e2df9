"""End to end through pipes: real server.py and client.py processes on 127.0.0.1."""

import signal
import socket

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
    assert client.wait() == 0


def test_ctrl_c_exits_cleanly(spawn):
    server, client, _ = connected(spawn, "--once")
    client.proc.send_signal(signal.SIGINT)
    assert client.wait() == 0
    _, err = client.output()
    assert "Traceback" not in err
    server.expect("peer left the chat|connection lost")


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
        intruder = spawn("client", port)
        assert intruder.wait() == 1
        assert "busy" in intruder.output()[1]
        chatting.send("still here\n")
        server.expect("Received: still here  ☒")
        server.send("me too\n")
        chatting.expect("Received: me too  ☒")
    finally:
        for sock in idle:
            sock.close()


def test_idle_unauthenticated_connection_is_dropped_by_its_deadline(spawn):
    server, port = spawn("server")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        server.expect(r"127\.0\.0\.1:\d+ dropped: no aeschat handshake within 5 s")
        assert sock.recv(100)[:4] == b"\x00\x00\x00\x2a"  # it had sent its hello


def test_client_killed_with_sigkill_and_a_new_one_takes_over(spawn):
    server, client, port = connected(spawn)
    client.proc.kill()
    server.expect(r"connection lost: .*; waiting for the client \(0 unsent\)")
    server.send("are you back?\n")  # queued while the client is away
    newcomer = spawn("client", port)
    newcomer.expect("authenticated and encrypted")
    server.expect("reconnected to 127.0.0.1")
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
    client.expect(r"connection lost: .*reconnecting \(0 unsent\)")
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


def test_legacy_client_with_legacy_server(spawn):
    server, port = spawn("server", "--once", "--legacy")
    client = spawn("client", port, "--legacy")
    client.expect("legacy format")
    server.expect("legacy format")
    client.send("old ~ style\n")
    server.expect(r"^Received: old ~ style  ☒")
    client.expect("warning: an original receiver may mangle this message: it contains '~'")
    server.send("x" * 100 + "\n")
    client.expect(r"^Received: x{100}  ☒")
    client.close_stdin()
    assert client.wait() == 0
    server.expect("peer left the chat")


def test_v1_client_against_legacy_server_is_told_why(spawn):
    server, port = spawn("server", "--legacy")
    client = spawn("client", port)
    assert client.wait() == 1
    assert "not in --legacy mode" in client.output()[1]
    server.expect("cannot decrypt the peer's data")


def test_legacy_client_against_v1_server(spawn):
    server, port = spawn("server")
    client = spawn("client", port, "--legacy")
    client.send("hello\n")
    # Whichever reads first: the server takes the legacy bytes for no aeschat peer, or the client takes
    # the server's hello for data it cannot decrypt and leaves before its message went out.
    server.expect(r"dropped: (the peer is not an aeschat v1 peer|the connection closed during the handshake)")
    client.expect(r"cannot decrypt the peer's data|connection lost")
    assert client.wait() in (1, 3)


def test_legacy_server_talks_with_the_original_client_both_ways(spawn):
    server, port = spawn("server", "--once", "--legacy")
    original = spawn("proc", ["tests/original_peer.py", "client", "127.0.0.1", port])
    original.expect("connected")
    server.expect("legacy format")
    original.send("hello from the past\n")
    server.expect(r"^Received: hello from the past  ☒")
    server.send("hello from the future\n")
    original.expect(r"^Received: hello from the future\s+☒")
    # What an original receiver would mangle is sent all the same, with a warning.
    server.send("tilde ~ here\n")
    server.expect("warning: an original receiver may mangle this message: it contains '~'")
    original.expect(r"^Received: tilde  here\s+☐")  # the original deletes every ~, and its hash fails
    server.send("y" * 1000 + "\n")
    server.expect("over 1024")
    original.expect("Unrecognised Data")  # the original loses it, as we warned


def test_legacy_client_reads_the_original_server_in_any_segmentation(spawn):
    original = spawn("proc", ["tests/original_peer.py", "server", "0"])
    port = original.expect(r"listening on (\d+)").group(1)
    client = spawn("client", port, "--legacy")
    original.expect("connected")
    lines = [f"quick {i} ~" for i in range(50)] + ["z" * 3000]
    original.send("".join(line + "\n" for line in lines))  # many arrive in one read, one spans many
    for line in lines:
        client.expect(rf"^Received: {line}  ☒")
    client.send("got them\n")
    original.expect(r"^Received: got them\s+☒")
