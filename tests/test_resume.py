"""Surviving the network: faults injected by a proxy, then the conversation resumes exactly once."""

import random
import signal
import threading

import pytest
from mitm import C2S, Proxy
from procs import connected, received

pytestmark = pytest.mark.slow

FAST = ("--keepalive", "0.3")  # silence is noticed within a second


@pytest.fixture
def proxy():
    made = []

    def _make(port):
        made.append(Proxy(port))
        return made[-1].port

    yield _make, made
    for p in made:
        p.close()


def through(hook, proxies):
    """For connected(): the chat goes through a new Proxy with hook, added to proxies."""

    def port(server_port):
        proxies.append(Proxy(server_port, hook))
        return proxies[-1].port

    return port


def batch(prefix, start, count):
    return [f"{prefix} {i}" for i in range(start, start + count)]


FAULTS = {
    "reset": lambda relay: relay.close(reset=True),
    "black hole": lambda relay: relay.stall(),
    "cut mid-record": lambda relay: relay.cut_after.update({C2S: relay.forwarded[C2S] + 150}),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_while_both_type_then_every_message_once_in_order(spawn, proxy, fault):
    make_proxy, proxies = proxy
    server, client, _ = connected(spawn, "--once", *FAST, client_args=FAST, port=make_proxy)
    first = proxies[0].relay(0)
    sent_by_client, sent_by_server = batch("from client", 0, 40), batch("from server", 0, 40)
    client.send("".join(line + "\n" for line in sent_by_client[:20]))
    server.send("".join(line + "\n" for line in sent_by_server[:20]))
    FAULTS[fault](first)  # while those are in flight
    client.send("".join(line + "\n" for line in sent_by_client[20:]))
    server.send("".join(line + "\n" for line in sent_by_server[20:]))
    client.expect(r"connection lost: .*reconnecting")
    client.expect("reconnected to")
    server.expect("the client reconnected from")
    server.expect(rf"Received: {sent_by_client[-1]}  ☒")
    client.expect(rf"Received: {sent_by_server[-1]}  ☒")
    client.send("quit()\n")
    assert client.wait() == 0
    assert server.wait() == 0
    assert received(server) == sent_by_client
    assert received(client) == sent_by_server


def test_a_man_in_the_middle_who_cuts_again_and_again_never_ends_the_chat(spawn):
    """Connection after connection cut in a record (part of it, then a FIN or a reset) while both sides type:
    each time the client reconnects, every message is shown once, in order, and both leave with exit 0. (A
    server that had not yet noticed the old connection once acknowledged on the new one before its Resume, and
    both ended as a security failure.)"""
    rng, cutting, cuts = random.Random(8), threading.Event(), []

    def hook(relay, direction, index, frame):
        if cutting.is_set() and len(cuts) < 40 and index >= 3 and rng.random() < 0.05:
            cuts.append(direction)
            relay.send(direction, frame[: rng.randrange(len(frame))])
            relay.close(reset=rng.random() < 0.5)
            return []
        return [frame]

    proxies = []
    server, client, _ = connected(spawn, "--once", client_args=FAST, port=through(hook, proxies))
    cutting.set()
    sent_by_client, sent_by_server = [], []
    for start in range(0, 300, 2):  # in rounds, so that there are many lone messages and many connections
        sent_by_client += batch("from client", start, 2)
        sent_by_server += batch("from server", start, 2)
        client.send("".join(line + "\n" for line in sent_by_client[-2:]))
        server.send("".join(line + "\n" for line in sent_by_server[-2:]))
        server.expect(rf"Received: {sent_by_client[-1]}  ☒", timeout=30)
        client.expect(rf"Received: {sent_by_server[-1]}  ☒", timeout=30)
    client.send("quit()\n")
    assert client.wait() == 0
    assert server.wait() == 0
    proxies[0].close()
    assert len(cuts) >= 3, "the test cut too little to show anything"
    assert received(server) == sent_by_client
    assert received(client) == sent_by_server


def test_a_reconnection_while_the_server_still_reads_the_old_connection(spawn):
    """The proxy holds the client's first 30 long messages, hands them to the server at once and closes: the
    server is still reading them when the client has reconnected. Its Resume comes first on the new connection,
    then the rest is sent again, and every message is shown once. (An acknowledgement of those it had read went
    first, and both ended as a security failure.)"""
    proxies, held = [], []

    def hook(relay, direction, index, frame):
        if direction == C2S and relay is proxies[0].relays[0] and index >= 3:  # past the hello, confirmation, Resume
            held.append(frame)
            if len(held) == 30:
                relay.send(C2S, b"".join(held))
                relay.close()
            return []
        return [frame]

    server, client, _ = connected(spawn, "--once", port=through(hook, proxies))
    lines = [f"{i} " + "x" * 3000 for i in range(30)]
    client.send("".join(line + "\n" for line in lines))
    client.expect("reconnected to")
    server.expect(rf"Received: {lines[-1]}  ☒")
    client.send("quit()\n")
    assert client.wait() == 0
    assert server.wait() == 0
    assert received(server) == lines
    proxies[0].close()


def test_messages_typed_while_disconnected_are_sent_after(spawn, proxy):
    make_proxy, proxies = proxy
    server, client, _ = connected(spawn, "--once", *FAST, client_args=FAST, port=make_proxy)
    proxies[0].relay(0).stall()
    client.expect(r"connection lost: no sign of the peer")
    client.send("typed in the dark\n")
    client.expect("reconnected to")
    server.expect("Received: typed in the dark  ☒")


def test_a_record_from_the_old_connection_is_rejected_in_the_resumed_one(spawn, proxy):
    make_proxy, proxies = proxy
    server, client, _ = connected(spawn, "--once", client_args=("--reconnect-for", "3"), port=make_proxy)
    client.send("original\n")
    server.expect("Received: original  ☒")
    old = proxies[0].relay(0)
    captured = old.frames[C2S][3]  # hello, confirmation, resume, then the message
    old.close(reset=True)
    client.expect("reconnected to")
    server.expect("the client reconnected from")
    proxies[0].relay(1).send(C2S, captured)
    server.expect("security failure: a record failed its integrity check")
    assert server.wait() == 3
    assert received(server) == ["original"]


def test_pipe_mode_still_delivers_after_a_blip(spawn, proxy):
    make_proxy, proxies = proxy
    server, client, _ = connected(spawn, "--once", port=make_proxy)
    proxies[0].relay(0).close(reset=True)
    client.send("after the blip\n")
    client.close_stdin()
    assert client.wait() == 0
    server.expect("Received: after the blip  ☒")


def test_an_old_connection_the_server_still_trusts_is_replaced_not_busy(spawn, proxy):
    make_proxy, proxies = proxy
    server, client, _ = connected(spawn, "--once", "--keepalive", "30", client_args=FAST, port=make_proxy)
    # The server is slow to notice (it waits 90 s); its pings are rare, so the client's silence limit is the same.
    proxies[0].relay(0).stall()
    client.expect("reconnected to")
    server.expect("the client reconnected from")
    client.send("through the new one\n")
    server.expect("Received: through the new one  ☒")


def test_quit_while_disconnected_reports_what_was_never_delivered(spawn):
    server, client, _ = connected(spawn)
    server.proc.kill()
    client.expect("reconnecting")
    client.send("into the void\nquit()\n")
    client.expect(r"leaving: waiting up to \d+ s for the peer to acknowledge 1 message; Ctrl-C leaves now")
    client.proc.send_signal(signal.SIGINT)  # rather than wait the 10 s out
    client.expect(r"you left the chat \(interrupted\); 1 message never sent: “into the void”")
    assert client.wait() == 130
