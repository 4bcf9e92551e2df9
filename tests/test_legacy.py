"""--legacy against a stand-in for the original scripts (tests/original_peer.py), both directions, on real
processes: what a person still running them sees."""

import time

import pytest
from procs import PASSPHRASE, connected

pytestmark = pytest.mark.slow


def original_client(spawn, port, *flags):
    """The stand-in client, answering its prompts as a person would: address, port, key."""
    original = spawn("proc", ["tests/original_peer.py", "client", *flags], passphrase=None)
    original.send(f"127.0.0.1\n{port}\n")
    original.expect("Connected")
    original.send(PASSPHRASE + "\n")
    return original


def original_server(spawn, *flags):
    original = spawn("proc", ["tests/original_peer.py", "server", "0", *flags], passphrase=None)
    port = original.expect(r"Listening on port (\d+)").group(1)
    return original, port


def test_legacy_client_with_legacy_server(spawn):
    server, client, _ = connected(spawn, "--once", "--legacy")
    client.send("old ~ style\n")
    server.expect(r"Received: old ~ style  ☒")
    client.expect("warning: an original receiver will mangle this message: it contains '~'")
    server.send("x" * 100 + "\n")
    client.expect(r"Received: x{100}  ☒")
    client.close_stdin()
    assert client.wait() == 0
    assert "the legacy format cannot confirm delivery" in client.output()[1]
    server.expect("the peer closed the connection")


def test_v2_client_against_legacy_server_is_told_why(spawn):
    server, port = spawn("server", "--legacy")
    client = spawn("client", port)
    assert client.wait() == 1
    assert "is an aeschat v2 server listening there? (--legacy talks to the original scripts)" in client.output()[1]
    server.expect("the peer speaks aeschat v2, not the legacy format: leave out --legacy")


@pytest.mark.parametrize("typed", ["", "hello\n"])
def test_legacy_client_against_v2_server_is_told_why(spawn, typed):
    """The v2 server's greeting is recognised: not a lost connection, nor a message claimed sent and exit 0."""
    server, port = spawn("server")
    client = spawn("client", port, "--legacy")
    client.send(typed)
    client.expect(r"aeschat-client: error: the peer speaks aeschat v2, not the legacy format: leave out --legacy$")
    assert client.wait() == 3


def test_an_original_client_reaching_a_v2_server_is_named_and_the_server_suggests_legacy(spawn):
    server, port = spawn("server")
    original = original_client(spawn, port)
    original.send("hello from the past\n")
    server.expect(r"127\.0\.0\.1:\d+ dropped: an original aeschat script .*start this server with --legacy")


def test_legacy_server_talks_with_the_original_client_both_ways(spawn):
    server, port = spawn("server", "--once", "--legacy")
    original = original_client(spawn, port)
    server.expect("legacy format")
    server.expect("the original scripts")  # the banner tells both conventions of marks
    original.send("hello from the past\n")
    server.expect(r"Received: hello from the past  ☒")
    server.send("hello from the future\n")
    original.expect(r"Received: hello from the future\s+☑  \d\d:\d\d:\d\d$")
    # What an original receiver would mangle is sent all the same, with a warning first.
    server.send("tilde ~ here\n")
    server.expect("warning: an original receiver will mangle this message: it contains '~'")
    original.expect(r"Received: tilde  here\s+☒")  # the original deletes every ~, and its hash fails
    server.send("y" * 1000 + "\n")
    server.expect("over 1024")
    original.expect("Unrecognised Data")  # the original loses it, as we warned


def test_legacy_client_reads_the_original_server_in_any_segmentation(spawn):
    original, port = original_server(spawn)
    client = spawn("client", port, "--legacy")
    original.expect("Connection from")
    original.send(PASSPHRASE + "\n")
    client.expect("legacy format")
    lines = [f"quick {i} ~" for i in range(50)] + ["z" * 3000]
    original.send("".join(line + "\n" for line in lines))  # many arrive in one read, one spans many
    for line in lines:
        client.expect(rf"Received: {line}  ☒")
    client.send("got them\n")
    original.expect(r"Received: got them\s+☑")


def test_a_burst_of_twenty_from_aeschat_is_shown_twenty_of_twenty_by_an_original(spawn):
    server, port = spawn("server", "--once", "--legacy")
    original = original_client(spawn, port)
    server.expect("legacy format")
    burst = [f"burst line {i}" for i in range(20)]
    server.send("".join(line + "\n" for line in burst))  # one write of 20 lines: a paste, or a script
    for line in burst:
        original.expect(rf"Received: {line}\s+☑")
    assert not any("Unrecognised Data" in line for _, line in original.seen)


def test_a_long_silence_from_the_original_does_not_end_the_chat(spawn):
    # With --keepalive 0.3 a v2 chat would count the peer dead after 0.9 s; legacy has no keepalive at all:
    # an original user may say nothing for an hour (the session machine's tests run an hour of silence).
    server, port = spawn("server", "--once", "--legacy", "--keepalive", "0.3")
    original = original_client(spawn, port)
    server.expect("legacy format")
    server.send("anyone there?\n")
    original.expect(r"Received: anyone there\?")
    time.sleep(3)  # the silence itself is what is tested: ten times what a v2 chat would bear here
    server.send("still here\n")
    original.expect(r"Received: still here\s+☑")
    original.send("yes, thinking\n")
    server.expect(r"Received: yes, thinking  ☒")
    assert not any("connection lost" in line for _, line in server.seen)


def test_the_stricter_copy_of_the_originals_loses_68_characters_and_aeschat_warned_first(spawn):
    server, port = spawn("server", "--once", "--legacy")
    original = original_client(spawn, port, "--spaced")
    server.expect("legacy format")
    server.send("a" * 68 + "\n")
    server.expect("warning: an original receiver will mangle this message: they do not show a message of 68")
    server.send("short\n")
    original.expect(r"Received : short\s+☑")
    assert not any("a" * 68 in line for _, line in original.seen)


def test_legacy_never_claims_delivery(spawn):
    server, port = spawn("server", "--once", "--legacy")
    original = original_client(spawn, port)
    server.expect("legacy format")
    server.send("z" * 2000 + "\nquit()\n")  # lost by the original, whatever we do
    assert server.wait() == 0
    out, err = server.output()
    assert "sent 1 message (the legacy format cannot confirm delivery)" in err
    assert "delivered" not in out
    original.expect("Unrecognised Data")
