"""The protocol core, tested directly: no sockets, no threads, bytes in and events out."""

import contextlib
import copy
import datetime
import hashlib
import json
import os
import random
import time
import unicodedata

import pyaes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

import common
from common import (
    Ack,
    AuthenticationError,
    ClientConnection,
    ConnectionClosed,
    FrameDecoder,
    Goodbye,
    HandshakeComplete,
    IntegrityError,
    LocalProtocolError,
    Message,
    NotAeschatPeer,
    Ping,
    RemoteProtocolError,
    ServerConnection,
    State,
    TruncatedFrame,
)

TS = "2026-11-27T12:34:56+00:00"


def fixed_entropy(tag):
    """Deterministic randomness for spake2, so that a handshake is a known answer."""
    return lambda n: hashlib.sha512(tag).digest()[:n]


def events(conn):
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


class Pair:
    """A client and a server connection, with one side's bytes piped into the other's. The server is driven as
    the Gate drives it: its hello answered with server_pass, the client's confirmation checked at once."""

    def __init__(self, client_pass="correct horse", server_pass="correct horse", entropy=os.urandom):
        self.client = ClientConnection(client_pass, entropy=entropy)
        self.server = ServerConnection(entropy=entropy)
        self.server_pass = server_pass

    def pipe(self, sender, receiver):
        data = sender.data_to_send()
        if data:  # b"" would tell the receiver that the connection closed
            receiver.receive_data(data)
        got = events(receiver)
        if receiver is self.server:
            for event in got:
                if isinstance(event, common.HelloReceived):
                    self.server.answer(self.server_pass)
                elif isinstance(event, common.ConfirmationReceived) and not self.server.check():
                    raise AuthenticationError("the passphrases differ")
        return got

    def handshake(self):
        for _ in range(3):  # greeting and hello, hellos, confirmations
            self.pipe(self.client, self.server)
            self.pipe(self.server, self.client)
        assert self.client.state is self.server.state is State.OPEN
        return self

    def sides(self, which):
        return (self.client, self.server) if which == "client" else (self.server, self.client)


@pytest.fixture(scope="module")
def opened():
    """One handshaken pair; tests take deep copies so that each starts from the same state."""
    return Pair().handshake()


def fresh(opened):
    return copy.deepcopy(opened)


# ---------------------------------------------------------------------------------------------------
# Framing


@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
def test_any_segmentation_decodes_to_the_same_frames(payloads, data):
    stream = b"".join(common.frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder, got = FrameDecoder(), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        if start == end:
            continue  # feeding b"" would mean the peer closed
        decoder.feed(stream[start:end])
        while (f := decoder.next_frame()) is not None:
            got.append(f)
    decoder.feed(b"")
    assert decoder.next_frame() is None and decoder.closed
    assert got == payloads


def test_frames_one_byte_at_a_time_and_many_in_one_read():
    stream = b"".join(common.frame(bytes([i]) * i) for i in range(50))
    decoder, got = FrameDecoder(), []
    for b in stream:
        decoder.feed(bytes([b]))
        while (f := decoder.next_frame()) is not None:
            got.append(f)
    assert got == [bytes([i]) * i for i in range(50)]


def test_oversized_length_is_refused_before_its_bytes_arrive():
    decoder = FrameDecoder()
    decoder.feed(common.LENGTH.pack(common.MAX_FRAME + 1))
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        decoder.next_frame()
    ok = FrameDecoder()
    ok.feed(common.LENGTH.pack(common.MAX_FRAME))
    assert ok.next_frame() is None  # the limit itself is allowed


def test_max_frame_holds_the_worst_message_and_little_more():
    worst = Message(0, "\x01" * common.MAX_MESSAGE, TS)  # JSON writes each as \u0001: six bytes
    sealed = common.RecordLayer(bytes(32), bytes(32)).seal(common.encode_payload(worst))
    assert len(sealed) <= common.MAX_FRAME <= 512 * 1024


def test_a_record_over_the_limit_is_never_sealed():
    with pytest.raises(LocalProtocolError, match="over the limit"):
        common.RecordLayer(bytes(32), bytes(32)).seal(bytes(common.MAX_FRAME))


@pytest.mark.parametrize("partial", [b"\x00", b"\x00\x00\x00\x05ab"])
def test_peer_closing_mid_frame_is_its_own_error(partial):
    decoder = FrameDecoder()
    decoder.feed(partial)
    assert decoder.next_frame() is None
    decoder.feed(b"")
    with pytest.raises(TruncatedFrame):
        decoder.next_frame()


def test_process_text_pads_with_tilde_to_blocks():
    assert common.process_text("") == []
    assert common.process_text("a") == [b"a" + b"~" * 15]
    assert common.process_text("x" * 16) == [b"x" * 16]
    assert common.process_bytes(b"y" * 20) == [b"y" * 16, b"y" * 4]


# ---------------------------------------------------------------------------------------------------
# Handshake


def test_handshake_and_messages_both_ways(opened):
    pair = fresh(opened)
    pair.client.send(Message(0, "héllo ✓", TS))
    [got] = pair.pipe(pair.client, pair.server)
    assert (got.id, got.text, got.timestamp, got.verified) == (0, "héllo ✓", TS, True)
    pair.server.send(Ack(0))
    pair.server.send(Message(0, "and back", TS))
    pair.server.send(Ping())
    pair.server.send(Goodbye())
    assert pair.pipe(pair.server, pair.client)[:2] == [Ack(0), Message(0, "and back", TS, common.text_hash("and back"))]


def greeted(client, status=common.OPEN):
    client.receive_data(common.frame(common.PREFIX + common.GREETING + status))
    assert client.next_event() is None
    return client


def test_wrong_passphrase_is_an_authentication_error_on_both_sides():
    client, server = ClientConnection("correct horse"), ServerConnection()
    server.receive_data(client.data_to_send())
    [hello] = events(server)
    assert hello == common.HelloReceived(common.PASSPHRASE, b"")
    server.answer("correct h0rse")
    client.receive_data(server.data_to_send())
    assert events(client) == []
    server.receive_data(client.data_to_send())
    assert events(server) == [common.ConfirmationReceived()]
    assert server.data_to_send() == b""  # nothing until the confirmation is checked
    assert server.check() is False
    assert server.data_to_send() == b""  # the server never confirms a wrong one
    server.refuse(common.DENIED)
    client.receive_data(server.data_to_send())
    with pytest.raises(AuthenticationError, match="passphrases differ"):
        client.next_event()
    assert client.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        client.next_event()  # once in error, the object refuses further calls


def test_client_checks_the_server_confirmation_too():
    pair = Pair("correct horse", "correct h0rse")
    pair.pipe(pair.client, pair.server)
    pair.pipe(pair.server, pair.client)
    pair.client.data_to_send()
    pair.server.derive()
    pair.client.receive_data(common.frame(pair.server._mine))  # what a server with another passphrase confirms
    with pytest.raises(AuthenticationError, match="passphrases differ"):
        pair.client.next_event()


def test_a_server_that_closes_after_our_confirmation_is_an_unfinished_authentication():
    pair = Pair()
    pair.pipe(pair.client, pair.server)
    pair.pipe(pair.server, pair.client)
    assert pair.client.confirmation_sent
    pair.client.receive_data(b"")
    with pytest.raises(common.UnfinishedAuthentication, match="someone may be interfering"):
        pair.client.next_event()


def test_a_server_that_closes_before_its_hello_shed_us_and_is_waited_out():
    """Shed to make room under a flood, a client once said "is the peer an aeschat v2 program?" and gave up: the
    server had greeted it as one. It is a refusal a client waits out, trying again."""
    client = greeted(ClientConnection("pw"))
    client.receive_data(b"")
    with pytest.raises(common.Refused, match="closed the connection before answering") as refused:
        client.next_event()
    assert refused.value.reason in common.WAITED_OUT
    silent = ClientConnection("pw")  # a proxy that took the connection for a server that is not there
    silent.receive_data(b"")
    with pytest.raises(common.NetworkError, match="closed before the server greeted us: is an aeschat v2 server"):
        silent.next_event()


@pytest.mark.parametrize("kind, reason, error", [
    (common.PASSPHRASE, common.BUSY_REFUSAL, common.Refused),
    (common.PASSPHRASE, common.LATER, common.Refused),  # passphrase checks spent: come back, having given nothing
    (common.RESUME, common.UNKNOWN, common.Refused),
    (common.RESUME, common.LATER, RemoteProtocolError),  # a resumption is never held back for guesses
    (common.PASSPHRASE, common.UNKNOWN, RemoteProtocolError),  # no server says unknown to a passphrase hello
    (common.RESUME, common.BUSY_REFUSAL, RemoteProtocolError),  # nor busy to a resumption
    (common.PASSPHRASE, common.DENIED, RemoteProtocolError),  # nor denied before it has a confirmation
    (common.PASSPHRASE, b"why not", RemoteProtocolError),
])
def test_a_refusal_means_what_it_says_only_where_a_server_sends_it(kind, reason, error):
    client = greeted(ClientConnection("pw" if kind == common.PASSPHRASE else bytes(32), kind, bytes(16)))
    client.receive_data(common.frame(common.PREFIX + common.REFUSAL + reason))
    with pytest.raises(error):
        client.next_event()


@pytest.mark.parametrize("answer", [common.PREFIX + common.REFUSAL + common.BUSY_REFUSAL,
                                    common.PREFIX + common.REFUSAL + common.UNKNOWN,
                                    common.PREFIX + common.REFUSAL + b"odd",
                                    b"\xff\xff\xff\xff", b"\x00\x00\x00\x20" + bytes(31)])
def test_after_our_confirmation_anything_but_the_servers_is_an_unfinished_authentication(answer):
    """A man in the middle who answered with his own guess has the client's confirmation: whatever he sends then
    (a forged busy, an oversized frame, half a frame), the client must call it interference, not a network error."""
    pair = Pair()
    pair.pipe(pair.client, pair.server)
    pair.pipe(pair.server, pair.client)
    assert pair.client.confirmation_sent
    data = answer if answer.startswith(b"\x00") or answer.startswith(b"\xff") else common.frame(answer)
    pair.client.receive_data(data)
    pair.client.receive_data(b"")
    with pytest.raises(common.UnfinishedAuthentication):
        pair.client.next_event()


def test_a_client_sending_a_refusal_is_not_an_aeschat_peer():
    server = ServerConnection()
    server.receive_data(common.frame(common.PREFIX + common.REFUSAL + common.DENIED))
    with pytest.raises(NotAeschatPeer):
        server.next_event()


def test_the_greeting_comes_first_and_says_busy():
    server = ServerConnection(common.BUSY)
    assert server.data_to_send() == common.frame(b"aeschat\x00\x02gb")
    busy = common.ServerConnection()
    busy.receive_data(ClientConnection("pw").data_to_send())
    busy.next_event()
    busy.data_to_send()
    busy.refuse(common.BUSY_REFUSAL)
    assert busy.data_to_send() == common.frame(b"aeschat\x00\x02!busy")  # the reason on the wire, as PROTOCOL.md says
    client = greeted(ClientConnection("pw"), common.BUSY)
    assert client.greeting == common.BUSY


def test_the_server_computes_nothing_before_a_hello():
    server = ServerConnection()
    assert server.state is State.HELLO and not hasattr(server, "_mine")
    server.receive_data(b"\x00\x00")
    assert server.next_event() is None


def test_passphrase_is_nfc_normalised():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    Pair(composed, decomposed).handshake()


@pytest.mark.parametrize("empty", ["", " ", "\t\n "])
def test_empty_passphrase_is_refused(empty):
    with pytest.raises(LocalProtocolError, match="empty"):
        ClientConnection(empty)


def test_nothing_can_be_sent_before_the_handshake():
    with pytest.raises(LocalProtocolError, match="cannot send"):
        ClientConnection("pw").send(Message(0, "early", TS))


LEGACY_HELLO = bytes.fromhex("cc0591d526d75ad887b1d8a9080cfddda19cea9040016bf4920a2d146c81dbcd")
TLS_CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + os.urandom(32)


@pytest.mark.parametrize("junk", [
    LEGACY_HELLO,
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    TLS_CLIENT_HELLO,
    b"SSH-2.0-OpenSSH_9.6\r\n",
    common.frame(b"Noise_XX_25519_ChaChaPoly_SHA256" + bytes(10)),
    common.frame(common.MAGIC + bytes([1]) + b"A" + bytes(32)),
    common.frame(common.MAGIC),
    common.frame(common.PREFIX),
    common.frame(common.PREFIX + common.PASSPHRASE),
    common.frame(common.PREFIX + common.RESUME + bytes(33)),
    common.frame(common.PREFIX + common.GREETING + common.OPEN),
    common.frame(bytes(42)),
], ids=["legacy", "http", "tls", "ssh", "noise", "v1", "magic only", "prefix only", "no spake2", "no resume id",
        "a greeting", "zeros"])
def test_other_protocols_get_not_an_aeschat_peer(junk):
    server = ServerConnection()
    server.receive_data(junk)
    with pytest.raises(NotAeschatPeer):
        events(server)


@pytest.mark.parametrize("junk", [common.MAGIC, common.MAGIC + b"\x02", common.PREFIX + common.GREETING])
def test_a_short_handshake_frame_to_the_client_is_an_error_not_a_crash(junk):
    client = ClientConnection("pw")
    client.receive_data(common.frame(junk))
    with pytest.raises(NotAeschatPeer):
        client.next_event()


@pytest.mark.parametrize("version", [1, 3])
def test_other_versions_are_named(version):
    server = ServerConnection()
    server.receive_data(common.frame(common.MAGIC + bytes([version]) + b"p" + bytes(33)))
    with pytest.raises(NotAeschatPeer, match=f"version {version}; this is version 2"):
        server.next_event()


def test_spake2_message_with_junk_appended_is_refused():
    client, server = ClientConnection("pw"), ServerConnection()
    hello = client.data_to_send()[4:]
    server.receive_data(common.frame(hello + b"junk"))
    with pytest.raises(NotAeschatPeer):
        server.next_event()


# Each example is a SPAKE2 computation, 7 ms: 1,000 would be 7 s of the suite (a quick run has its 100).
@settings(max_examples=min(300, settings.default.max_examples))
@given(st.binary(min_size=32, max_size=32))
def test_malformed_spake2_element_is_a_remote_error(point):
    server = ServerConnection(entropy=fixed_entropy(b"s"))
    server.receive_data(common.frame(common.PREFIX + common.PASSPHRASE + b"A" + point))
    events(server)
    server.answer("pw")  # our hello goes before the peer's element is used
    with contextlib.suppress(RemoteProtocolError):  # not on the curve, not in the group: the peer's fault
        server.derive()


def test_reflected_hello_is_refused():
    client = ClientConnection("pw")
    hello = client.data_to_send()
    greeted(client).receive_data(hello)
    with pytest.raises(AuthenticationError, match="wrong side"):
        client.next_event()


def test_reflected_confirmation_is_refused():
    pair = Pair()
    pair.pipe(pair.client, pair.server)
    pair.pipe(pair.server, pair.client)
    pair.client.receive_data(pair.client.data_to_send())  # its own confirmation, sent back to it
    with pytest.raises(AuthenticationError):
        pair.client.next_event()


def test_closed_during_handshake_is_reported():
    server = ServerConnection()
    server.receive_data(b"")
    assert events(server) == [ConnectionClosed()]


def test_a_passphrase_handshake_gives_both_sides_the_same_resumption_secret():
    pair = Pair().handshake()
    assert pair.client.resumption == pair.server.resumption
    resume_id, secret = pair.client.resumption
    assert len(resume_id) == 16 and len(secret) == 32
    assert Pair().handshake().client.resumption != pair.client.resumption  # fresh for every conversation


def resume_pair(resumption, server_secret=None):
    resume_id, secret = resumption
    client = ClientConnection(secret, common.RESUME, resume_id)
    server = ServerConnection()
    server.receive_data(client.data_to_send())
    assert events(server) == [common.HelloReceived(common.RESUME, resume_id)]
    server.answer(server_secret or secret)
    greeted_and_hello = server.data_to_send()
    client.receive_data(greeted_and_hello)
    assert events(client) == []
    server.receive_data(client.data_to_send())
    assert events(server) == [common.ConfirmationReceived()]
    return client, server


def test_a_resumption_handshake_proves_the_secret_with_fresh_keys():
    first = Pair().handshake()
    client, server = resume_pair(first.client.resumption)
    assert server.check()
    client.receive_data(server.data_to_send())
    assert events(client) == [HandshakeComplete()]
    assert client.resumption is None  # a resumption does not replace the conversation's secret
    client.send(Message(0, "resumed", TS))
    server.receive_data(client.data_to_send())
    assert events(server)[0].text == "resumed"
    first.client.send(Message(0, "resumed", TS))
    assert first.client.data_to_send() != client.seal(Message(0, "resumed", TS))  # new keys


def test_a_resumption_with_the_wrong_secret_fails_on_both_sides():
    first = Pair().handshake()
    client, server = resume_pair(first.client.resumption, server_secret=os.urandom(32))
    assert server.check() is False
    server.refuse(common.DENIED)
    client.receive_data(server.data_to_send())
    with pytest.raises(AuthenticationError, match="resumption secret"):
        client.next_event()


def test_the_kind_of_handshake_is_bound_into_the_confirmations():
    """A hello whose kind byte a man in the middle changed cannot be confirmed."""
    client = ClientConnection("pw")
    hello = bytearray(client.data_to_send())
    server = ServerConnection()
    hello[4 + len(common.PREFIX)] = common.RESUME[0]
    server.receive_data(bytes(hello[:4]) + bytes(hello[4:]))
    with pytest.raises(NotAeschatPeer):  # a resumption hello has a different size: refused outright
        events(server)


# ---------------------------------------------------------------------------------------------------
# Records


def recorded(opened, text="attack at dawn"):
    pair = fresh(opened)
    pair.client.send(Message(0, text, TS))
    return pair, pair.client.data_to_send()


def test_every_single_bit_flip_of_a_record_is_detected(opened):
    pair, record = recorded(opened)
    for bit in range(len(record) * 8):
        server = copy.deepcopy(pair.server)
        damaged = bytearray(record)
        damaged[bit // 8] ^= 1 << (bit % 8)
        server.receive_data(bytes(damaged) + b"")
        server.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            events(server)


def test_replay_is_detected(opened):
    pair, record = recorded(opened)
    pair.server.receive_data(record)
    assert isinstance(pair.server.next_event(), Message)
    pair.server.receive_data(record)
    with pytest.raises(IntegrityError):
        pair.server.next_event()


def test_reorder_and_drop_are_detected(opened):
    pair = fresh(opened)
    records = []
    for i in range(3):
        pair.client.send(Message(i, f"m{i}", TS))
        records.append(pair.client.data_to_send())
    for order in ([1, 0, 2], [0, 2]):
        server = copy.deepcopy(pair.server)
        server.receive_data(b"".join(records[i] for i in order))
        with pytest.raises(IntegrityError):
            events(server)


def test_connection_cut_mid_record_is_its_own_error(opened):
    pair, record = recorded(opened)
    pair.server.receive_data(record[:-5])
    assert pair.server.next_event() is None
    pair.server.receive_data(b"")
    with pytest.raises(TruncatedFrame):
        pair.server.next_event()


def test_truncated_record_in_a_continuing_stream_is_detected(opened):
    pair = fresh(opened)
    pair.client.send(Message(0, "m0", TS))
    first = pair.client.data_to_send()
    pair.client.send(Message(1, "m1", TS))
    second = pair.client.data_to_send()
    body = first[4:-5]  # five bytes cut from the end, the length prefix made to match
    pair.server.receive_data(common.frame(body) + second)
    with pytest.raises(IntegrityError):
        events(pair.server)


def test_reflection_is_detected(opened):
    pair, record = recorded(opened)
    pair.client.receive_data(record)  # the client's own record, sent back to it
    with pytest.raises(IntegrityError):
        pair.client.next_event()


def test_record_from_another_session_is_rejected(opened):
    _, record = recorded(opened)
    other = Pair().handshake()  # the same passphrase, fresh keys
    other.server.receive_data(record)
    with pytest.raises(IntegrityError):
        other.server.next_event()


def test_sequence_numbers_never_wrap():
    layer = common.RecordLayer(bytes(32), bytes(32), seq=common.MAX_SEQ - 1)
    layer.seal(b"x" * 16)
    with pytest.raises(LocalProtocolError, match="exhausted"):
        layer.seal(b"x" * 16)


def test_no_keystream_reuse_across_records():
    layer = common.RecordLayer(bytes(32), bytes(32))
    a, b = layer.seal(bytes(32)), layer.seal(bytes(32))
    assert a[:32] != b[:32]


# ---------------------------------------------------------------------------------------------------
# The payload


def test_payload_is_the_seed_object_plus_type_and_id():
    payload = common.encode_payload(Message(7, "hi~", TS))
    assert len(payload) % 16 == 0
    obj = json.loads(common.strip_padding(payload))
    assert obj == {"type": "msg", "id": 7, "timestamp": TS, "message": "hi~", "hash": common.text_hash("hi~")}


def test_a_64_kib_message_goes_and_one_byte_more_is_refused_before_sending(opened):
    pair = fresh(opened)
    big = "é" * (common.MAX_MESSAGE // 2)
    pair.client.send(Message(0, big, TS))
    [got] = pair.pipe(pair.client, pair.server)
    assert got.text == big and got.verified
    seq = pair.client._send.seq
    with pytest.raises(LocalProtocolError, match="limit is 65536 bytes"):
        pair.client.send(Message(1, big + "x", TS))
    assert pair.client.data_to_send() == b"" and pair.client._send.seq == seq


def test_text_that_is_not_unicode_is_refused():
    with pytest.raises(LocalProtocolError, match="not valid Unicode"):
        common.encode_payload(Message(0, "lone \ud800 surrogate", TS))


HASH = common.text_hash("")
CONV = "ab" * 16


def padded(text):
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return data + b"~" * (-len(data) % 16)


@pytest.mark.parametrize("payload", [
    b"{}", b'{"type": "msg"}', b'{"type": "msg", "id": true, "timestamp": "", "message": "", "hash": ""}',
    b'{"type": "nope"}', b"[1]", b"{", b'{"type": 5}', b'{"type": ["msg"]}',
    b'{"type": "msg", "id": 1, "timestamp": "", "message": "\\ud800", "hash": ""}',
    b'{"type": "ack", "id": 1, "extra": 2}', b'{"type": "ping", "id": 1}',
])
def test_bad_payloads_are_remote_errors(payload):
    with pytest.raises(RemoteProtocolError):
        common.decode_payload(padded(payload))


# The odd fields that once wedged a server (each inside a record whose MAC was valid): every one is refused.
ODD_FIELDS = {
    "conv lone surrogate": ("resume", {"conv": "\ud800" * 32, "next": 0, "base": 0, "resumed": False}),
    "conv upper case": ("resume", {"conv": CONV.upper(), "next": 0, "base": 0, "resumed": False}),
    "conv short": ("resume", {"conv": "ab", "next": 0, "base": 0, "resumed": False}),
    "hash not hex": ("msg", {"id": 0, "timestamp": TS, "message": "x", "hash": "é" * 64}),
    "hash short": ("msg", {"id": 0, "timestamp": TS, "message": "x", "hash": "ab"}),
    "timestamp overflows": ("msg", {"id": 0, "timestamp": "9999-12-31T23:59:59-23:59", "message": "x",
                                    "hash": common.text_hash("x")}),
    "timestamp year 1": ("msg", {"id": 0, "timestamp": "0001-01-01T00:00:00+23:59", "message": "x",
                                 "hash": common.text_hash("x")}),
    "timestamp huge": ("msg", {"id": 0, "timestamp": "2026-11-27T12:34:56+00:00" * 1000, "message": "x",
                               "hash": common.text_hash("x")}),
    "timestamp no offset": ("msg", {"id": 0, "timestamp": "2026-11-27T12:34:56", "message": "x",
                                    "hash": common.text_hash("x")}),
    "id negative": ("ack", {"id": -1}),
    "id 2^63": ("ack", {"id": 2**63}),
    "id float": ("ack", {"id": 1.0}),
    "base 4300 digits": ("resume", {"conv": CONV, "next": 0, "base": int("9" * 4300), "resumed": False}),
    "resumed not bool": ("resume", {"conv": CONV, "next": 0, "base": 0, "resumed": 1}),
    "alert unknown": ("alert", {"reason": "nope"}),
}


@pytest.mark.parametrize("case", list(ODD_FIELDS))
def test_odd_fields_inside_valid_records_are_refused(case):
    kind, fields = ODD_FIELDS[case]
    text = json.dumps({"type": kind, **fields}, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(RemoteProtocolError, match="payload"):
        common.decode_payload(padded(text))


@pytest.mark.parametrize("text", ['{"type": "ping"}', '{"type":"ping"' + " " * 1000 + "}",
                                  '{"type":"\\u0070ing"}', '{"type":"ping","type":"ping"}'])
def test_json_not_written_as_aeschat_writes_it_is_refused(text):
    """Padding a ping to 512 KiB with spaces cost its receiver a second of pyaes and its sender nothing."""
    with pytest.raises(RemoteProtocolError, match="not written as aeschat writes JSON"):
        common.decode_payload(padded(text))


def test_json_nested_deeply_is_refused_not_a_crash():
    deep = '{"type":"ping","x":' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(RemoteProtocolError):
        common.decode_payload(padded(deep))


def test_a_message_over_64_kib_from_the_peer_is_refused():
    text = json.dumps({"type": "msg", "id": 0, "timestamp": TS, "message": "x" * (common.MAX_MESSAGE + 1),
                       "hash": HASH}, separators=(",", ":"))
    with pytest.raises(RemoteProtocolError, match="limit"):
        common.decode_payload(padded(text))


@pytest.mark.parametrize("padded", [b"{}~~~~~~~~~~~~~", b"{}" + b"~" * 30, b"{}~~~x~~~~~~~~~~", b"~" * 16])
def test_padding_is_strict(padded):
    with pytest.raises(RemoteProtocolError):
        common.strip_padding(padded)


text_strategy = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from("~}{\"\\\x00\x1b\n\u202e\u2028é✓😀")),
    st.just(""),
    st.just("~" * 64),
)


@given(text_strategy)
def test_any_text_round_trips_through_v2(text):
    layer_out = common.RecordLayer(b"k" * 32, b"m" * 32)
    layer_in = common.RecordLayer(b"k" * 32, b"m" * 32)
    got = common.decode_payload(layer_in.open(layer_out.seal(common.encode_payload(Message(3, text, TS)))))
    assert got.text == text and got.verified


@given(text_strategy, st.integers(0, 100))
def test_any_text_round_trips_through_legacy_in_any_segmentation(text, step):
    cipher = pyaes.AES(common.legacy_key("pw"))
    stream = common.legacy_encode(cipher, text, "12:00:00") + common.legacy_encode(cipher, "second", "12:00:01")
    decoder, got = common.LegacyDecoder(cipher), []
    step = step or len(stream)
    for i in range(0, len(stream), step):
        decoder.feed(stream[i : i + step])
        while (m := decoder.next_message()) is not None:
            got.append(m)
    decoder.feed(b"")
    assert decoder.next_message() == ConnectionClosed()
    assert decoder.next_message() is None  # once
    assert [m.text for m in got] == [text, "second"] and all(m.verified for m in got)


def test_64_kib_round_trips_through_both_codecs():
    text = "~}" * (common.MAX_MESSAGE // 2)
    cipher = pyaes.AES(common.legacy_key("pw"))
    decoder = common.LegacyDecoder(cipher)
    decoder.feed(common.legacy_encode(cipher, text, "12:00:00"))
    assert decoder.next_message().text == text
    layer_out, layer_in = common.RecordLayer(b"k" * 32, b"m" * 32), common.RecordLayer(b"k" * 32, b"m" * 32)
    sealed = layer_out.seal(common.encode_payload(Message(0, text, TS)))
    assert common.decode_payload(layer_in.open(sealed)).text == text


# ---------------------------------------------------------------------------------------------------
# Random bytes only ever raise the project's remote-protocol error


def _drain(decoder_next):
    try:
        while decoder_next() not in (None, ConnectionClosed()):
            pass
    except RemoteProtocolError:
        pass


@given(st.binary(max_size=600))
def test_random_bytes_to_the_frame_decoder(data):
    decoder = FrameDecoder()
    decoder.feed(data)
    decoder.feed(b"")
    _drain(decoder.next_frame)


# Half the examples are a whole handshake, 28 ms: 1,000 would be 14 s of the suite (a quick run has its 100).
@settings(max_examples=min(300, settings.default.max_examples))
@given(st.binary(max_size=600), st.booleans())
def test_random_bytes_to_a_connection_in_every_state(data, open_first):
    pair = Pair(entropy=fixed_entropy(b"x"))
    if open_first:
        pair.handshake()
    pair.server.receive_data(data)
    pair.server.receive_data(b"")
    _drain(pair.server.next_event)


@given(st.binary(max_size=600))
def test_random_bytes_to_the_record_and_payload_decoders(data):
    with contextlib.suppress(RemoteProtocolError):
        common.RecordLayer(bytes(32), bytes(32)).open(data)
    with contextlib.suppress(RemoteProtocolError):
        common.decode_payload(data)


@given(st.binary(max_size=600))
def test_random_bytes_to_the_legacy_decoder(data):
    cipher = pyaes.AES(common.legacy_key("pw"))
    # Half the time, behind a valid start, so the decoder gets past its first-block check.
    for stream in (data, common.legacy_encode(cipher, "ok", "12:00:00")[:16] + data):
        decoder = common.LegacyDecoder(cipher)
        try:
            decoder.feed(stream)
            decoder.feed(b"")
        except RemoteProtocolError:
            continue
        _drain(decoder.next_message)


def test_seeded_garbage_into_payloads_that_decrypt(opened):
    """Garbage under valid keys: past the MAC, the payload parser must still only raise remote errors."""
    rng = random.Random(1234)
    for _ in range(300):
        layer_out = common.RecordLayer(b"k" * 32, b"m" * 32)
        layer_in = common.RecordLayer(b"k" * 32, b"m" * 32)
        size = rng.choice([0, 1, 15, 16, 17, 32, 64])
        with contextlib.suppress(RemoteProtocolError):
            common.decode_payload(layer_in.open(layer_out.seal(rng.randbytes(size))))


# ---------------------------------------------------------------------------------------------------
# verify_and_display


def test_display_line_and_tags(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    good = Message(0, "hi", "2026-11-27T12:34:56+02:00")
    assert common.verify_and_display(good) == ["Received: hi  ☒  10:34:56"]
    bad = Message(0, "hi", "12:00:00", common.text_hash("ho"))
    assert common.verify_and_display(bad) == ["Received: hi  ☐  12:00:00"]
    assert common.verify_and_display(Message(0, "x", "\x1b[2J", ""))[0].endswith("??:??:??")
    assert common.verify_and_display(Message(0, "x", "9999-12-31T23:59:59-23:59", ""))[0].endswith("??:??:??")
    assert common.verify_and_display(Message(0, "one\ntwo\n", TS)) == ["Received: one  ☒  12:34:56", "two", ""]
    monkeypatch.delenv("TZ")
    time.tzset()


def test_a_late_message_also_shows_when_it_arrived_and_a_log_shows_dates_and_the_sender(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    sent = Message(0, "hi", "2026-11-27T23:00:00+00:00")
    at = datetime.datetime(2026, 11, 27, 23, 0, 0, tzinfo=datetime.timezone.utc).timestamp()
    show = common.verify_and_display
    assert show(sent, at + 60) == ["Received: hi  ☒  23:00:00"]  # a minute late at most: its own time only
    assert show(sent, at + 61) == ["Received: hi  ☒  23:00:00 (arrived 23:01:01)"]
    assert show(sent, at + 3600) == ["Received: hi  ☒  2026-11-27 23:00:00 (arrived 2026-11-28 00:00:00)"]
    assert show(sent, at - 3600) == ["Received: hi  ☒  23:00:00"]  # a clock ahead of ours: nothing to add
    assert show(sent, at, "127.0.0.1:4000") == ["Received: hi  ☒  2026-11-27 23:00:00  from 127.0.0.1:4000"]
    assert show(sent, at + 61, "h:1") == [
        "Received: hi  ☒  2026-11-27 23:00:00 (arrived 2026-11-27 23:01:01)  from h:1"]
    legacy = Message(0, "hi", "23:00:00")  # no date: a log shows when it arrived
    assert show(legacy, at + 3600) == ["Received: hi  ☒  23:00:00"]
    assert show(legacy, at, "[::1]:4000") == [
        "Received: hi  ☒  23:00:00 (arrived 2026-11-27 23:00:00)  from [::1]:4000"]
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.mark.parametrize("hostile, shown", [
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    ("a\rReceived: fake", "a\\rReceived: fake"),
    ("\r\x08\x7f\x9b", "\\r\\x08\\x7f\\x9b"),
    ("abc\u202edef\u2066\u200b\ufeff", "abc\\u202edef\\u2066\\u200b\\ufeff"),
    ("\u2028\u2029", "\\u2028\\u2029"),
    ("a\u3000b\u00a0c\u2003d", "a\\u3000b\\xa0c\\u2003d"),  # spaces that are not U+0020
    ("\u3164\u115f\u2800\uffa0", "\\u3164\\u115f\\u2800\\uffa0"),  # letters and symbols that show as nothing
    ("e" + "\u0301" * 6, "e" + "\u0301" * 4 + "\\u0301" * 2),  # marks stacked past four
    ("\U000e0041", "\\U000e0041"),  # a tag character
])
def test_what_could_act_on_the_terminal_or_hide_text_is_escaped(hostile, shown):
    assert common.visible(hostile) == shown


@pytest.mark.parametrize("text", ["👨\u200d👩\u200d👧", "क्\u200dष", "می\u200cخواهم", "café", "日本語", "a b"])
def test_text_people_write_shows_as_written(text):
    assert common.visible(text) == text


@given(st.text(alphabet=st.characters(codec=None)))
def test_no_control_character_ever_reaches_the_terminal(text):
    for line in common.verify_and_display(Message(0, text, TS)):
        assert not any(unicodedata.category(ch)[0] in "CZ" and ch not in " \u200c\u200d" for ch in line)


@given(st.text(alphabet=st.characters(codec=None), max_size=300), st.integers(20, 200))
def test_every_row_after_the_first_begins_with_the_mark_and_fits(text, width):
    rows = common.layout(common.verify_and_display(Message(0, text, TS)), width)
    assert rows[0].startswith("Received: ")
    for row in rows:
        assert sum(common.cells(ch) for ch in row) <= width - 1 or len(row) == 1
    assert all(row.startswith(common.MARK) for row in rows[1:])


def test_a_long_message_cannot_start_a_row_of_its_own():
    forged = "A" * 70 + "Sent: forged line  12:00:00"
    rows = common.layout(common.verify_and_display(Message(0, forged, TS)), 80)
    assert rows == ["Received: " + "A" * 69, common.MARK + "ASent: forged line  12:00:00  ☒  12:34:56"]


def test_wide_ambiguous_symbols_cannot_push_peer_text_to_the_start_of_a_row():
    """U+3248 is ambiguous in width and drawn two columns wide by glibc and tmux: counted as one, 38 of them let
    a peer's text begin a terminal row."""
    rows = common.layout(common.verify_and_display(Message(0, "ok?\n" + "\u3248" * 38 + "Sent: yes", TS)), 80)
    assert all(sum(2 if ch == "\u3248" else 1 for ch in row) <= 79 for row in rows)
    assert all(row.startswith(common.MARK) for row in rows[1:])


def test_rows_break_at_a_space_when_one_is_near_and_never_inside_a_grapheme():
    rows = common.layout(["the unknown-command hint breaks " + "right here (//text sends /text) " * 3], 40)
    assert rows[0].endswith(" ") and all(not row.endswith("(/") for row in rows)
    rows = common.layout(["x" * 38 + "e\u0301\u0301"], 40)
    assert rows[1] == common.MARK + "e\u0301\u0301"


def test_what_became_of_a_file_wraps_as_a_line_of_ours_not_as_a_message():
    """Outside round three: "received file ... → ./single" went on in a row beginning with the message mark."""
    line = "received file single.bin (200,000 bytes, sha256 ed9561f27449…) → ./single (1).bin"
    rows = common.layout([line], 40, "event")
    assert len(rows) == 3 and all(row.startswith(common.OWN) for row in rows[1:])


def test_nothing_reaches_the_terminal_unescaped_whoever_composed_the_line():
    assert common.layout(["our own line with \x1b[2J in it", "and \u202e"]) == [
        "our own line with \\x1b[2J in it", common.MARK + "and \\u202e"]


def test_hangul_vowels_and_finals_that_draw_nothing_are_escaped():
    assert common.visible("pay Bob" + "\u1161" * 3 + "\ud7b0") == "pay Bob" + "\\u1161" * 3 + "\\ud7b0"
    assert common.visible("한국어") == "한국어"


def test_the_status_line_is_shortened_not_cut():
    fields = [["127.0.0.1:5555", ""], ["aeschat v2, encrypted", "encrypted"], ["0 undelivered", "0 undeliv."],
              ["quit() to leave", ""]]
    assert common.fit_status(fields, (3, 0, 1, 2), 120) == (
        " 127.0.0.1:5555 | aeschat v2, encrypted | 0 undelivered | quit() to leave ")
    narrow = common.fit_status(fields, (3, 0, 1, 2), 50)
    assert len(narrow) <= 49 and "0 undelivered" in narrow and "encrypted" in narrow and "undeli " not in narrow
    assert common.fit_status(fields, (3, 0, 1, 2), 16) == " 0 undeliv. "  # fields go whole, the last stays whole
    assert common.fit_status(fields, (3, 0, 1, 2), 8) == " 0 unde"  # one field alone too wide: only then a cut


# ---------------------------------------------------------------------------------------------------
# Known answers. If one of these changes, the wire format changed: other implementations break.

RFC5869_CASE_3 = "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"


def test_hkdf_as_we_call_it_matches_rfc_5869_case_3():
    assert common.hkdf_sha256(b"\x0b" * 22, b"", 42).hex() == RFC5869_CASE_3


NIST_CTR_KEY = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
NIST_CTR_PLAIN = ("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                  "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
NIST_CTR_CIPHER = ("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
                   "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6")


@pytest.mark.parametrize("way", [common.CounterCipher._apply_with_integers, common.CounterCipher._apply_in_place])
def test_ctr_matches_nist_sp_800_38a_f_5_5_both_ways_of_computing_it(way):
    """CPython runs the first, PyPy the second: each is checked on both."""
    cipher = common.CounterCipher(bytes.fromhex(NIST_CTR_KEY))
    counter = 0xF0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFF
    assert way(cipher, counter, bytes.fromhex(NIST_CTR_PLAIN)).hex() == NIST_CTR_CIPHER
    assert way(cipher, counter, bytes.fromhex(NIST_CTR_CIPHER)).hex() == NIST_CTR_PLAIN
    for size in (0, 1, 15, 16, 17, 1000):  # partial blocks at the end: both ways agree
        data = bytes(range(256)) * 4
        assert way(cipher, 5 << 64, data[:size]) == common.CounterCipher._apply_with_integers(cipher, 5 << 64,
                                                                                             data[:size])


LEGACY_VECTORS = [  # from ../shared/legacy-wire-format.md
    ("correct horse battery staple", "12:34:56", "hello",
     "cc0591d526d75ad887b1d8a9080cfddda19cea9040016bf4920a2d146c81dbcd767ce5cc262fda6f85662518fbfc53a5"
     "ae90e95a8871ba50b9ba7ca495fd2e4b87c4937bb3e824a416fee0d589ba9305805d4fa046862d5d2944167e0cb3d258"
     "3f300deafc6f8e8afb1ea18271d0fdebf5f16000aa047f49079dd3e84aa3eaf2"),
    ("secret", "00:00:01", "héllo ✓ wörld",
     "12074213c33f662784a4ed59f2cbc8758ec3ce92abf2b393f908d7b2ce2defe78081e9676f4c092532acd66f2e9e9692"
     "dbeb6df0b03bf4b776ef62cf7b7a8bba321e8d8ac275baf365341090b64108000625d3f689fd120ede9708b7340992b7"
     "38cb640db434d84260b8f31326792fd0f0c2ee4169b3982bb5f6335d4779372a5dc58db17d004cb14fd13a44e3590fe4"),
    ("secret", "23:59:59", "a~b",
     "0637bd75b50f4cc90db2df1d5bcb10c7879b9b2e27637ddd7311e4e11e50aa79d45933bb32daaa0579fb30c84a998f7d"
     "265a48d30a11c31633c4759f99ffe5558fa024179f840a324708bdca1f5c901b49bfa5479efdb6be5ebe30301067b8bc"
     "4e4625e59b80cefdca39de6e1d0ec6ff920b6c80b03ac0bab5489f3a692e8fad"),
]


@pytest.mark.parametrize("passphrase, timestamp, text, ciphertext", LEGACY_VECTORS)
def test_legacy_known_answers(passphrase, timestamp, text, ciphertext):
    cipher = pyaes.AES(common.legacy_key(passphrase))
    assert common.legacy_encode(cipher, text, timestamp).hex() == ciphertext
    decoder = common.LegacyDecoder(cipher)
    for b in bytes.fromhex(ciphertext):
        decoder.feed(bytes([b]))
    message = decoder.next_message()
    assert (message.text, message.timestamp, message.verified) == (text, timestamp, True)


@pytest.mark.parametrize("text", ["x" * 7 + "}" * 9, ("x" * 15 + "}") * 500, '\\"}' * 300, "\\" * 31 + "}~", "{[" * 40])
def test_legacy_text_that_looks_like_the_end_of_a_message_is_text(text):
    """A message ends at the `}` that closes it, found in one pass (the text's braces, quotes, backslashes and
    tildes are inside its string); a `}` at the end of every block once cost a parse of all before it."""
    cipher = pyaes.AES(common.legacy_key("pw"))
    decoder = common.LegacyDecoder(cipher)
    stream = common.legacy_encode(cipher, text, "12:00:00") + common.legacy_encode(cipher, "next", "12:00:01")
    for i in range(0, len(stream), 16):
        decoder.feed(stream[i : i + 16])
    assert [decoder.next_message().text, decoder.next_message().text] == [text, "next"]


@pytest.mark.parametrize("plaintext, why", [
    ('{"timestamp": "1", "message": "a", "hash": "b"}x', "not a legacy message"),
    ('{"timestamp": "1", "x": ' + "[" * 40, "nested over 32 deep"),
    ('{"timestamp": "1", "message": "a"}', "without its timestamp, message and hash"),
])
def test_legacy_plaintext_that_is_not_one_message_is_refused(plaintext, why):
    cipher = pyaes.AES(common.legacy_key("pw"))
    decoder = common.LegacyDecoder(cipher)
    decoder.feed(b"".join(bytes(cipher.encrypt(block)) for block in common.process_text(plaintext)))
    with pytest.raises(RemoteProtocolError, match=why):
        decoder.next_message()


def test_a_legacy_decoder_tells_an_aeschat_v2_peer_by_its_first_frame():
    decoder = common.LegacyDecoder(pyaes.AES(common.legacy_key("pw")))
    greeting = common.frame(common.PREFIX + common.GREETING + common.OPEN)
    decoder.feed(greeting[:5])  # not enough to tell yet
    with pytest.raises(common.NotAeschatPeer, match="speaks aeschat v2"):
        decoder.feed(greeting[5:])


def test_legacy_wrong_passphrase_is_clear_at_the_first_block():
    data = common.legacy_encode(pyaes.AES(common.legacy_key("right")), "hi", "12:00:00")
    with pytest.raises(RemoteProtocolError, match="passphrases differ"):
        common.LegacyDecoder(pyaes.AES(common.legacy_key("wrong"))).feed(data[:16])


def test_legacy_warnings():
    assert common.legacy_warnings("short") == []
    assert len(common.legacy_warnings("a~b" + "c" * 1000)) == 3
    assert "1024" in common.legacy_warnings("c" * 1000)[0]
    # The stricter copy of the originals prints "Received : " and drops a 68-character message.
    assert common.legacy_warnings("x" * 67) == []
    assert "68 characters" in common.legacy_warnings("x" * 68)[0]


V2_PASSPHRASE = "correct horse battery staple"
# Randomness: the first n bytes of SHA-512 of the tag, as PROTOCOL.md says ("client", "server"; for the
# resumption handshake "client again", "server again").
V2_HANDSHAKE = {
    "greeting": "0000000b616573636861740002676f",
    "client hello": "0000002b6165736368617400027041cef6ee33f15c2f6666c6b72bb14a2328a38d6cc0a98e539b051eadffe1b62021",
    "server hello": "0000002b616573636861740002704275231ec040574fd129e53f76a5101345907ff223777196c872beb7c36af1dfe4",
    "client confirm": "0000002009f75c084219ef732d75c5275b6f6c4b4b31244559d52fd9c70c4bda05f78963",
    "server confirm": "000000202bc4b0e807a4ec6e2debd80ca3e9fe18db1b30c120fd2e4e6dd09baf6b1202a5",
}
V2_RESUMPTION = ("e160668c65fb15984fd49d13524e064a",
                 "99248ee9b2e7e6a6e5ba749bb3fe92887f664c450ff3e8d8cad165640d4da86a")
V2_RESUME_HANDSHAKE = {
    "greeting": "0000000b616573636861740002676f",
    "client hello": "0000003b61657363686174000272e160668c65fb15984fd49d13524e064a419ea66aff749fa42b20ae57c16b001d49"
                    "2175737104220dc272690480f843284b",
    "server hello": "0000002b6165736368617400027242de0e409b2d26a76e3e6d3d964c5804b3ce4a83232a578c1471bf52bb63d1be52",
    "client confirm": "000000205241704e2fd8aa0d812d5fc7a6e6cc21bbfd7c891a733eb5f5cb12704fec503f",
    "server confirm": "00000020dd0a5065e03e915c20d26d8c64065c27d33f244c032e5c3d366e348aa5192c12",
}
# Records sent after the passphrase handshake, in this order: (sender, event, the frame's hex, or its SHA-256).
V2_RECORDS = [
    ("client", Message(0, "", TS),
     "000000c05aeaa53a6cb6a5a2310bca218b7042125b2fb1aa2a6737e7a0af070d5325f111811b98dd7438bac5492ee782f9d08e"
     "9e1fc8af2aaf1f8e75f01b9ea2c09a4c1f1218bee81dff4d220cd824b72eeabbf497bcbaf9388a6876130661ea672a5c0f2f8d"
     "43cbabb0919506212a338a9d971b7d3b92af64b1f33f8265fadf68d8d2bba04b8dffda43f975009c542c97cf2affcd993ca03d"
     "0ea4c8dd7be06f089a355ae2aac94f69149e6e4b6672606d13145bff28cf488628806abda1d38ff1d8f089"),
    ("client", Message(1, "hello ✓", TS),
     "000000c04eb0dd99df71072633e4b1b6e885bb474db101e04019b7ced27d81de6876da2974e24132d8e0acccabfb0b4db477f0"
     "0808d31b3e28434022af68a16bdc23851b2ab33c367f6987de18b18aa0e2053c674628d95092fe025abeeaf8aca646c2bd91d0"
     "4eac5daa91824818a0cd198521802e66f10f850cc4ed0d2a1767361b97d101b63f5a95046e3ed1b68186b44ce9ab88be4f47d1"
     "5e5decbddd666250fb68acb5353e928d250cf494f76f0822ec40ba4462e22f722e5c7c9b3d398a18ca293a"),
    ("client", Message(2, "x" * common.MAX_MESSAGE, TS),
     "sha256:e30ca595c929fee0570f77b3fc14e0df7db8b663a2fb5fcb942d67a32c9d2875"),
    ("server", common.Resume("ab" * 16, 3, 0, True),
     "00000080e4fc4a156450897e626c8d2a98d3a9f8caee71609425054253c210a9defdffd512fd217922471ce4234c6a642bb187"
     "c25a6190dedf0d63a5a8b2aeed16b4c29ee2457f0e051cfddfa8e6179c0504256f3536cadf9b9cf6013f184c6a1157612cc90c"
     "8b22f003dc9de4336bdbcbbda882c02497cd37dde74be9cb2fbc717f6485"),
    ("server", Ack(2),
     "0000004037c425bfa7170b509ab688c24ca2194bb72ecf1d2067acc62d0bb12bc13dde461020f50a38617b715f4bf8c1d620ff"
     "2b13f9853c2a9fff4b96acf06ffe933d08"),
    ("server", Message(0, "hi", TS),
     "000000c032fdee6291eb01e4e54b0b24aa63994aa964b1f30b0fa55a61a7594a45aab52ae620c54eaacb4d3756975be310846c"
     "0b7551c7f271af22b904a12ffc098d5f1788b2d5d5d878058c23b5d07836dcad6e797089314fe03d54dc99f5187d388140d844"
     "2165ca7886bf72b0ce3393b1804c409426f807892b0a7d230b90b4f6c66017e2280e00fcdd0089bc00f424ac9aaaf06edbc365"
     "ec9a6bdde464fc70501e36123ba4299e305558dc10815eaffa4497113ef111026f7bed9def57684745539d"),
    ("server", Ping(),
     "000000303774dcc6f5c6b944dede09dbfda27bbf4d04e2294e38fbfe123dc325fed41cdededd31cb6e7576e00d688dafdc6fd5fd"),
    ("server", common.Alert("integrity"),
     "00000050dbdf6ec77636b2de4a4dcdec250215c3c2c9fd53cab59c16b241ce32cd9da3802789caeb941c9c2b4e2bbda6699eb6"
     "04fc4c30ec5e8fd01fbf532f0a45abcb0bb4c0451fe5873d137377c9dd85bd13a6"),
    ("server", Goodbye(),
     "00000030b6f1b6f7c13dae55ae102412b82244e12e8443fb5364b7501fa70df886a76d58e41332b593f130ad3dd9b37aaf1a2723"),
    # A file of 11 bytes, `hello, file`: offered, accepted, sent, acknowledged, saved; another refused, cancelled.
    ("client", common.Offer(0, "notes.txt", 11, "4444d0751827a9f4783eba8fcbc44f20225d068050b48310850b702b4cfbebdd"),
     "000000b0bc50884c7dbcb98e94280d6d416addbdd4ef5568d8baf938673366acb412030882fbc14594b5ea686bf7ba04247d319cb20d1"
     "7399b01c46aa1c9c527130aae516b036f878b3cd097cead7286802eda495e191e2c0c67d2360b6ec12096a4a6d4d0eac1515ccffe216d9"
     "12419103d5543a3d5c44c3ba85dbbcf1c93098b5977c54c27bdc1f4ce373ed90471eac2577b1ff75ddb2623456f74c7018932f2c9b925"
     "2020fe9b6e1dfd4041cf9348136752fb"),
    ("server", common.Accept(0, 0),
     "00000050bc5fb2d01a0041e782cda710d83b00040a1371f8e4c9d9f13b520ee0813934fc1d2ce89938fa171b8618d4ed533f51aa29cc36"
     "c3d9a4b274e531680abb307fbb5f7869240d32ff418420aaa54e99aec6"),
    ("client", common.Chunk(0, 0, b"hello, file"),
     "0000003c1ae653bbf76841c957def3b7d1560f4c082fbcbc35e5494be9899519622ba952529cc50d534718d9767b36adf3fca6c584d26b"
     "e2f780c8541bc52049"),
    ("server", common.FileAck(0, 11),
     "0000005020e2cfb97221b1270443187311ca8a7e2035798a50cb04efdf89ef6b13da77419cf57afbcbc0018eb4732adcdb4e917b55e79d"
     "9234f1a3582c8b2445945fac75c4deb354305afa7c8e0380fd9293f566"),
    ("server", common.Done(0),
     "0000004083554e806703472c3358c3d04ff922d430e8d457fe9f34c64cea6c932cef9243773e805609059dcb2f58f95bacc7bc68a40d5b"
     "873280149389a52beeaf44bfc3"),
    ("client", common.Offer(1, "big.iso", 2**40, "cd" * 32),
     "000000b0fd230731361a51fbe07069a1111051a2e1901abd14c137636f6d52cbac518265eb46b510574b8ec434d90d54c20c428cb867dc"
     "8b06fc588762ed092c5324fcd2abe1802f0caa45aecfd890be3a97251b5fc780d7abf07d6d7a7ccb02dcc5db8fbd5cf62a35a7d12ab1cd1"
     "095fdfac11f9bea7a3701ea84a1a99f5a8d093729a077d1f20ad5823f6be51d93129db75557bb35ff1f2c7cf48162ad879168b3d0f940"
     "db5d756b78b82aa0ac8cb4e3320362"),
    ("server", common.Refuse(1, "too large"),
     "00000050c211c8da7be70dae923d24b1621a17073f5300aec247bae2438e5aba6ce50d0edaf7eb579df407c83153d09e7d4ecdb057fbe2"
     "80a963b04bcad0b26c2e3578bb68fba75a790894b85427b0cdfaa412e0"),
    ("client", common.Cancel(1, "left"),
     "00000050183d4d9048e529c4355a474c75f774d851a54f94042255d5abe19f678b8f0a261cd6d325b6fafcc16885a6666cd30dc0ab014d"
     "6a2704110fc8bbca095ffa769c47709de1e2484df4a662ffba860a8dc9"),
]


def run_known_handshake(client, server, secret):
    """Every frame of a handshake between these two, by name."""
    seen = {"greeting": server.data_to_send(), "client hello": client.data_to_send()}
    client.receive_data(seen["greeting"])
    assert client.next_event() is None
    server.receive_data(seen["client hello"])
    assert isinstance(server.next_event(), common.HelloReceived)
    server.answer(secret)
    seen["server hello"] = server.data_to_send()
    client.receive_data(seen["server hello"])
    assert client.next_event() is None
    seen["client confirm"] = client.data_to_send()
    server.receive_data(seen["client confirm"])
    assert server.next_event() == common.ConfirmationReceived() and server.check()
    seen["server confirm"] = server.data_to_send()
    client.receive_data(seen["server confirm"])
    assert client.next_event() == HandshakeComplete()
    return {name: frame.hex() for name, frame in seen.items()}


def known_pair():
    pair = Pair()
    pair.client = ClientConnection(V2_PASSPHRASE, entropy=fixed_entropy(b"client"))
    pair.server = ServerConnection(entropy=fixed_entropy(b"server"))
    assert run_known_handshake(pair.client, pair.server, V2_PASSPHRASE) == V2_HANDSHAKE
    return pair


def test_v2_handshake_known_answer():
    pair = known_pair()
    assert tuple(part.hex() for part in pair.client.resumption) == V2_RESUMPTION
    assert pair.server.resumption == pair.client.resumption


def test_v2_resumption_handshake_known_answer():
    resume_id, secret = (bytes.fromhex(part) for part in V2_RESUMPTION)
    client = ClientConnection(secret, common.RESUME, resume_id, entropy=fixed_entropy(b"client again"))
    server = ServerConnection(entropy=fixed_entropy(b"server again"))
    assert run_known_handshake(client, server, secret) == V2_RESUME_HANDSHAKE


def test_v2_records_known_answers_both_ways():
    pair = known_pair()
    for sender_name, event, expected in V2_RECORDS:
        sender, receiver = pair.sides(sender_name)
        record = sender.seal(event)
        shown = "sha256:" + hashlib.sha256(record).hexdigest() if expected.startswith("sha256:") else record.hex()
        assert shown == expected
        receiver.receive_data(record)
        assert events(receiver) == [event]


def test_record_layer_known_answer_under_fixed_keys():
    layer = common.RecordLayer(bytes(range(32)), bytes(range(32, 64)))
    payload = common.encode_payload(Ping())
    assert payload == b'{"type":"ping"}~'
    assert layer.seal(payload).hex() == (
        "89b274cf5a2cbdea8b83f304ba0c0afef6d69e828be443e8689ba7fe95293f510196f2409270ea8ddf9acd1937faa1fa")
    assert layer.seal(payload).hex() == (
        "2a3fa196ea0d094786eff8a60b6d07bdac369c2346b04c53f27f8790370bc1c992b408dfbaa50713f96407f26f4f1c7d")


# ---------------------------------------------------------------------------------------------------
# Resuming a conversation over a new connection


def exchange(client, server):
    """The Resume exchange of a new connection; returns what each side sends again."""
    reply, server_again, _ = server.on_resume(client.resume_request(), server=True)
    _, client_again, _ = client.on_resume(reply, server=False)
    return client_again, server_again


def deliver(sender, receiver, messages):
    for m in messages:
        sender.put_on_wire(m.id)
    shown = [m.text for m in messages if receiver.accept(m)]
    for m in messages:
        sender.acknowledged(m.id)
    return shown


def test_resume_sends_again_only_what_was_not_shown_and_shows_each_once():
    client, server = common.Conversation.new(), common.Conversation.new()
    exchange(client, server)
    sent = [client.new_message(f"c{i}", TS) for i in range(5)]
    assert deliver(client, server, sent[:2]) == ["c0", "c1"]
    client.put_on_wire(sent[2].id)
    server.accept(sent[2])  # shown, but its acknowledgement was lost with the connection
    client_again, server_again = exchange(client, server)
    assert [m.text for m in client_again] == ["c3", "c4"]  # the server said it had shown c0..c2
    assert server_again == []
    assert deliver(client, server, [sent[2], *client_again]) == ["c3", "c4"]  # c2 again is not shown twice


def test_a_new_client_takes_over_and_gets_what_was_undelivered():
    old_client, server = common.Conversation.new(), common.Conversation.new()
    exchange(old_client, server)
    deliver(old_client, server, [old_client.new_message("hello", TS)])
    waiting = [server.new_message(f"s{i}", TS) for i in range(3)]
    server.put_on_wire(waiting[-1].id)
    server.acknowledged(waiting[0].id)  # the old client saw s0 before it vanished
    newcomer = common.Conversation.new()
    client_again, server_again = exchange(newcomer, server)
    assert [m.text for m in server_again] == ["s1", "s2"]
    assert deliver(server, newcomer, server_again) == ["s1", "s2"]
    assert deliver(newcomer, server, [newcomer.new_message("new me", TS)]) == ["new me"]  # numbering anew


def test_a_restarted_server_starts_the_numbering_afresh():
    client, server = common.Conversation.new(), common.Conversation.new()
    exchange(client, server)
    deliver(server, client, [server.new_message("before", TS)])
    restarted = common.Conversation.new()
    exchange(client, restarted)
    assert deliver(restarted, client, [restarted.new_message("after", TS)]) == ["after"]


def test_a_gap_in_message_ids_is_a_remote_error():
    conversation = common.Conversation.new()
    with pytest.raises(RemoteProtocolError, match="never arrived"):
        conversation.accept(Message(1, "skipped one", TS, ""))


def test_a_server_answering_for_another_conversation_is_refused():
    client = common.Conversation.new()
    with pytest.raises(RemoteProtocolError, match="another conversation"):
        client.on_resume(common.Resume("0" * 32, 0, 0, True), server=False)


def test_resume_payload_round_trips():
    event = common.Resume("ab" * 16, 3, 2, True)
    assert common.decode_payload(common.encode_payload(event)) == event
    without_resumed = b"".join(common.process_text(f'{{"type":"resume","conv":"{CONV}","next":0,"base":0}}'))
    with pytest.raises(RemoteProtocolError, match="missing or extra fields"):
        common.decode_payload(without_resumed)


# ---------------------------------------------------------------------------------------------------
# A stateful model of a session: sends, deliveries, tampering, replays and closes in any order


OPENED = None


class SessionModel(RuleBasedStateMachine):
    """Messages go through in order, exactly once; any tampering or replay ends the connection with the
    project's remote error and nothing altered is ever delivered."""

    def __init__(self):
        super().__init__()
        global OPENED
        OPENED = OPENED or Pair().handshake()
        self.pair = copy.deepcopy(OPENED)
        self.in_flight = {"client": [], "server": []}  # frames sent by that side, not yet delivered
        self.history = {"client": [], "server": []}  # every frame that side ever sent
        self.expected = {"client": [], "server": []}  # texts the other side should still receive, in order
        self.next_id = {"client": 0, "server": 0}
        self.over = False

    def receiver(self, side):
        return self.pair.sides(side)[1]

    @precondition(lambda self: not self.over)
    @rule(side=st.sampled_from(["client", "server"]), text=st.text(max_size=40))
    def send(self, side, text):
        sender = self.pair.sides(side)[0]
        sender.send(Message(self.next_id[side], text, TS))
        self.next_id[side] += 1
        frame = sender.data_to_send()
        self.in_flight[side].append(frame)
        self.history[side].append(frame)
        self.expected[side].append(text)

    @precondition(lambda self: not self.over and (self.in_flight["client"] or self.in_flight["server"]))
    @rule(side=st.sampled_from(["client", "server"]), cut=st.integers(0, 300))
    def deliver(self, side, cut):
        if not self.in_flight[side]:
            return
        frame = self.in_flight[side].pop(0)
        receiver = self.receiver(side)
        receiver.receive_data(frame[:cut] or frame)  # sometimes in two reads
        if frame[:cut] and cut < len(frame):
            assert receiver.next_event() is None
            receiver.receive_data(frame[cut:])
        [event] = events(receiver)
        assert event.text == self.expected[side].pop(0) and event.verified

    @precondition(lambda self: not self.over and (self.in_flight["client"] or self.in_flight["server"]))
    @rule(side=st.sampled_from(["client", "server"]), bit=st.integers(0, 10**6))
    def tamper(self, side, bit):
        if not self.in_flight[side]:
            return
        frame = bytearray(self.in_flight[side].pop(0))
        frame[bit // 8 % len(frame)] ^= 1 << (bit % 8)
        self._must_fail(side, bytes(frame))

    @precondition(lambda self: not self.over and (self.history["client"] or self.history["server"]))
    @rule(side=st.sampled_from(["client", "server"]), which=st.integers(0, 10**6), reflect=st.booleans())
    def replay(self, side, which, reflect):
        old = self.history[side]
        if not old:
            return
        frame = old[which % len(old)]
        if reflect:
            self.over = True
            sender = self.pair.sides(side)[0]
            sender.receive_data(frame)
            with pytest.raises(RemoteProtocolError):
                events(sender)
            return
        if which % len(old) == len(old) - len(self.in_flight[side]):
            return  # that is the next frame to deliver: no replay
        self._must_fail(side, frame)  # an earlier frame again (replay) or a later one first (reorder)

    def _must_fail(self, side, data):
        self.over = True
        receiver = self.receiver(side)
        receiver.receive_data(data)
        receiver.receive_data(b"")
        with pytest.raises(RemoteProtocolError):
            events(receiver)

    @rule()
    def idle(self):
        """Nothing happens (and once the connection is over, nothing can)."""

    @precondition(lambda self: not self.over)
    @rule(side=st.sampled_from(["client", "server"]))
    def close(self, side):
        self.over = True
        receiver = self.receiver(side)
        pending = b"".join(self.in_flight[side])
        if pending:
            receiver.receive_data(pending)
        receiver.receive_data(b"")
        got = events(receiver)
        assert got[-1] == ConnectionClosed()
        assert [e.text for e in got[:-1]] == self.expected[side]


SessionModel.TestCase.settings = settings(stateful_step_count=20)
test_session_model = SessionModel.TestCase


def test_the_legacy_warning_fits_80_columns():
    rows = common.legacy_warning("aeschat-client").splitlines()
    assert len(rows) > 1 and all(len(row) <= 80 for row in rows) and "NOT SECURE" in rows[0]


@pytest.mark.parametrize("typed, path", [
    ("/tmp/plain.txt", "/tmp/plain.txt"),
    ("/tmp/we ird name.txt", "/tmp/we ird name.txt"),  # unquoted, with spaces: as it is
    ("'/tmp/we ird name.txt'", "/tmp/we ird name.txt"),
    ('"/tmp/we ird ~ name ü.txt"', "/tmp/we ird ~ name ü.txt"),
    ("/tmp/we\\ ird.txt", "/tmp/we ird.txt"),
    ("/tmp/it's.txt", "/tmp/it's.txt"),
    ("~/notes.txt", "~/notes.txt"),  # expanded when opened
])
def test_a_path_typed_after_send_is_taken_as_a_shell_would(typed, path):
    assert common.typed_path(typed) == path


# ---------------------------------------------------------------------------------------------------
# A folder's stream


def folder_stream(entries):
    return b"".join(common.folder_header(kind, 0o755, len(data), hashlib.sha256(data).digest(), path) + data
                    for kind, path, data in entries)


FOLDER = [(b"d", "empty", b""), (b"f", "a/b.txt", b"hello"), (b"f", "z", b""), (b"f", "é/ü", b"x" * 1000)]


@given(st.data())
def test_a_folders_stream_parses_the_same_in_any_segmentation(data):
    stream = folder_stream(FOLDER)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    parser, items = common.FolderParser(len(stream)), []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        items += parser.feed(stream[start:end])
    merged = []
    for item in items:
        if isinstance(item, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += item
        else:
            merged.append(item)
    entries = [item for item in merged if isinstance(item, common.FolderEntry)]
    assert [e.parts for e in entries] == [("empty",), ("a", "b.txt"), ("z",), ("é", "ü")]
    assert [m for m in merged if isinstance(m, bytes)] == [b"hello", b"x" * 1000]
    assert merged.count(None) == 4 and parser.left == 0
    assert parser.manifest.hexdigest() == hashlib.sha256(b"".join(
        common.folder_header(k, 0o755, len(d), hashlib.sha256(d).digest(), p) for k, p, d in FOLDER)).hexdigest()


@pytest.mark.parametrize("stream, why", [
    (folder_stream([(b"x", "a", b"")]), "another kind"),
    (common.folder_header(b"f", 0, 0, bytes(32), "abc")[:-1], "ends in the middle of a header"),
    (common.folder_header(b"f", 0, 10**9, bytes(32), "a"), "larger than the stream"),
    (common.folder_header(b"d", 0, 5, bytes(32), "a") + b"12345", "a folder with bytes"),
    (folder_stream([(b"f", "/".join(["d"] * 65), b"")]), "too deep"),
    (common.ENTRY.pack(b"f", 0, 0, bytes(32), 2) + b"\xff\xfe", "not UTF-8"),
])
def test_a_malformed_folder_stream_is_the_peers_error(stream, why):
    with pytest.raises(common.RemoteProtocolError):
        common.FolderParser(len(stream)).feed(stream)


@given(st.binary(max_size=300))
def test_random_bytes_to_the_folder_parser_raise_only_the_peers_error(data):
    parser = common.FolderParser(len(data))
    with contextlib.suppress(common.RemoteProtocolError):
        parser.feed(data)
