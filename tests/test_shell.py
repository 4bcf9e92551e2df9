"""The shell's own duties, on real sockets and threads: a Link writes what it is given and closes in bounded time,
whatever the peer does; only the latest acknowledgement or pong waits for a writer that cannot write."""

import os
import queue
import select
import socket
import struct
import threading
import time
import warnings

import pytest

import common
import server
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

    def progress(self, action):
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


def live_chat_with_a_peer_that_reads_nothing(with_peer=False):
    """A client's chat, live over one end of a socketpair with small buffers; the other end never reads. with_peer:
    the peer's connection too, to send it records."""
    ours, theirs = socket.socketpair()
    for sock, option in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, option, 4096)
    client, server = opened_pair()
    chat = Chat(Screen(), Session(CLIENT, V2, Conversation("ab" * 16), time.monotonic()))
    chat.attach(ours, client, "192.0.2.7:5555", PASSPHRASE)
    theirs.sendall(server.seal(Resume("ab" * 16, 0, 0, True)))
    assert chat.begun.wait(5)
    [link] = chat._links
    return (chat, link, ours, theirs, server) if with_peer else (chat, link, ours, theirs)


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
    while ours.fileno() != -1:  # the socket is closed as soon as its reader and writer, woken, have ended
        assert time.monotonic() - started < common.Link.CLOSE_GRACE + 2, "the socket was left open"
        time.sleep(0.01)
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


class Open:
    """A server with no chat on, as its door sees it."""

    def status(self):
        return common.OPEN

    def secret_for(self, resume_id):
        return None


def test_a_connection_reset_before_the_door_took_it_is_logged():
    """A client that sent a byte and reset before the door accepted it: the greeting's write meets the reset
    first, so the door's next read sees only an end, which must not pass for the quiet close of a probe."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"\x00")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset
    lines = queue.Queue()
    door = common.Door(listener, common.Gate("pw", Open()), admit=None, log=lines.put)
    threading.Thread(target=door.run, daemon=True).start()
    line = lines.get(timeout=5)
    assert line.startswith("127.0.0.1:") and "dropped" in line


def wait_until(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_client_arriving_as_the_chat_on_ends_gets_a_new_chat():
    """The chat's session has ended and its End is not yet carried out (held here by its acting lock): a client
    let in then starts the next chat. (Attached to the ended one, it was closed without a word, unlogged.)"""
    listener = socket.create_server(("127.0.0.1", 0))
    screen = Screen()
    screen.set_status = lambda *status: None
    host = common.Server(listener, "pw", server.parse_args(["0", "--no-reconnect"]), screen)
    first_ours, first_theirs = socket.socketpair()
    host.admit(first_ours, opened_pair()[1], PASSPHRASE, "192.0.2.1:1")
    first = host.chat
    with first._acting:
        first_theirs.close()  # the link fails; without reconnection the session ends, its End waits for the lock
        wait_until(first.over)
        assert first.active
        second_ours, second_theirs = socket.socketpair()
        client, conn = opened_pair()
        admission = threading.Thread(target=host.admit, args=(second_ours, conn, PASSPHRASE, "192.0.2.2:2"))
        admission.start()
        admission.join(5)
        assert not admission.is_alive(), "the client was taken to the ended chat"
        assert host.chat is not first and list(host._ended) == [first]
        client.send(Conversation.new().resume_request())
        second_theirs.sendall(client.data_to_send())
        second_theirs.settimeout(5)
        client.receive_data(second_theirs.recv(65536))
        assert isinstance(client.next_event(), Resume)  # the new chat speaks to its client
    assert first.done.wait(5) and not first.active
    host.chat.leave()


def test_a_peer_that_makes_requests_and_reads_no_answer_is_cut_off_with_bounded_memory():
    """Each offer from the peer gets an answer (in a pipe, a refusal); a peer that offered and never read once piled
    the answers up without end."""
    chat, link, _, theirs, peer = live_chat_with_a_peer_that_reads_nothing(with_peer=True)
    sent = 0
    while not chat.done.is_set() and sent < 5 * common.Link.MAX_REPLIES:
        if not select.select([], [theirs], [], 5)[1]:  # our reader takes what comes until it stops the link
            break
        theirs.send(peer.seal(common.Offer(sent, "x", 1, "ab" * 32)))
        sent += 1
    assert chat.done.wait(10), f"still on after {sent} offers"
    code, text = chat.outcome
    assert code == common.EXIT_SECURITY and "does not read the answers" in text
    assert link._replies <= common.Link.MAX_REPLIES + 1 and sent < 4 * common.Link.MAX_REPLIES  # + what buffers hold
    theirs.close()


def test_a_signal_while_a_terminal_interface_runs_is_never_raised_into_its_event_loop(monkeypatch):
    """Raised into one of the loop's callbacks, Terminated would be caught there ("Press ENTER to continue...",
    to a terminal that SIGHUP says is gone): the interface is told, and raises it between prompts."""
    told = []
    monkeypatch.setattr(common, "_on_terminate", [lambda: told.append(True)])
    monkeypatch.setattr(common, "_signalled", [])
    monkeypatch.setattr("sys.unraisablehook", None)  # _leaving_anyway replaces it, and silences warnings
    with warnings.catch_warnings():
        common._terminate(15, None)
        assert told == [True] and isinstance(common._signalled[0], common.Terminated)
        monkeypatch.setattr(common, "_on_terminate", [])
        with pytest.raises(common.Terminated):  # no interface: raised at once
            common._terminate(15, None)


def test_an_input_that_cannot_be_asked_unseen_offers_the_passphrase_given_at_the_start(monkeypatch):
    """/reconnect on a plain interface whose input is no terminal (so no echo to turn off: a pipe here, Windows
    there): it says so, and the passphrase given at the start goes again, rather than one typed for all to see."""
    shown = []
    with open(os.devnull) as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        ui = common.PlainUI("aeschat-client", read_input=False)
        monkeypatch.setattr(ui, "show", lambda lines, kind="chat": shown.append((kind, lines)))
        with ui:
            assert ui.ask_passphrase("Passphrase (Enter: the same as before): ") == ""
    assert shown == [("notice", ["(this terminal cannot be asked for a passphrase unseen: the one given at the start "
                                 "goes again)"])]
