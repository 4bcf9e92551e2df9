"""The shell's own duties, on real sockets and threads: a Link writes what it is given and closes in bounded time,
whatever the peer does; only the latest acknowledgement or pong waits for a writer that cannot write."""

import socket
import time

import pytest

import common
from common import CLIENT, PASSPHRASE, V2, Chat, Conversation, Resume, Session

pytestmark = pytest.mark.slow


class Screen:
    """The user interface a Chat talks to, keeping what it would have shown."""

    interactive = False

    def __init__(self):
        self.lines = []

    def show(self, lines, kind="chat"):
        self.lines += lines

    def set_status(self, fields, order):
        pass

    def wake(self):
        pass


def opened_pair():
    """A client and a server connection after a real handshake, bytes carried by hand."""
    client, server = common.ClientConnection("pw"), common.ServerConnection()
    server.receive_data(client.data_to_send())
    server.next_event()
    server.answer("pw")
    client.receive_data(server.data_to_send())
    client.next_event()
    server.receive_data(client.data_to_send())
    server.next_event()
    assert server.check()
    client.receive_data(server.data_to_send())
    assert client.next_event() == common.HandshakeComplete()
    return client, server


def live_chat_with_a_peer_that_reads_nothing():
    """A client's chat, live over one end of a socketpair with small buffers; the other end never reads."""
    ours, theirs = socket.socketpair()
    for sock, option in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4096)
    client, server = opened_pair()
    chat = Chat(Screen(), Session(CLIENT, V2, Conversation("ab" * 16), time.monotonic()))
    chat.attach(ours, client, "192.0.2.7:5555", PASSPHRASE)
    theirs.sendall(server.seal(Resume("ab" * 16, 0, 0, True)))
    assert chat.begun.wait(5)
    [link] = chat._links
    return chat, link, ours, theirs


def test_a_closing_link_whose_peer_reads_nothing_is_shut_after_its_grace():
    """A chat ended with its goodbye queued behind what a peer never reads once kept a socket and two threads for
    ever; now its writer has CLOSE_GRACE seconds."""
    chat, link, ours, theirs = live_chat_with_a_peer_that_reads_nothing()
    for i in range(40):  # 320 KB that will never be read: the writer blocks
        chat.typed(f"{i} " + "z" * 8000)
    assert not link.written.wait(1.0)  # stuck, as the peer wants
    started = time.monotonic()
    chat.interrupt(common.EXIT_INTERRUPTED)  # the chat ends: a goodbye, queued behind it all
    assert link.written.wait(common.Link.CLOSE_GRACE + 3)
    assert time.monotonic() - started < common.Link.CLOSE_GRACE + 1
    assert ours.fileno() == -1  # the socket is closed
    theirs.close()


def test_only_the_latest_acknowledgement_and_pong_wait_for_a_stuck_writer():
    chat, link, _, theirs = live_chat_with_a_peer_that_reads_nothing()
    link.put(common.Message(0, "x" * 60_000, common.now_iso()))  # the writer is stuck on this
    for i in range(10_000):
        link.put(common.Pong())
        link.put(common.Ack(i))
    assert link._outbox.qsize() <= 3  # the message, one pong, one acknowledgement
    chat.interrupt(common.EXIT_INTERRUPTED)
    theirs.close()
