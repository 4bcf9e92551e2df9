"""The protocol core, tested directly: no sockets, no threads, bytes in and events out."""

import contextlib
import copy
import hashlib
import json
import os
import random
import time
import unicodedata
from dataclasses import replace

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
    """A client and a server connection, with one side's bytes piped into the other's."""

    def __init__(self, client_pass="correct horse", server_pass="correct horse", **kwargs):
        self.client = ClientConnection(client_pass, **kwargs)
        self.server = ServerConnection(server_pass, **kwargs)

    def pipe(self, sender, receiver):
        data = sender.data_to_send()
        if data:  # b"" would tell the receiver that the connection closed
            receiver.receive_data(data)
        return events(receiver)

    def handshake(self):
        done = []
        for _ in range(2):  # hello, then confirmation, each way
            done += self.pipe(self.client, self.server) + self.pipe(self.server, self.client)
        assert done == [HandshakeComplete()] * 2
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


def test_max_frame_is_at_most_256_kib():
    assert common.MAX_FRAME <= 256 * 1024


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


def cross(pair):
    """Both sides send at once, as on a real connection: one flight each way, delivered together."""
    from_client, from_server = pair.client.data_to_send(), pair.server.data_to_send()
    pair.server.receive_data(from_client)
    pair.client.receive_data(from_server)


def test_wrong_passphrase_is_an_authentication_error_on_both_sides():
    pair = Pair("correct horse", "correct h0rse")
    cross(pair)  # hellos
    assert events(pair.server) == events(pair.client) == []
    assert pair.server.data_to_send() == b""  # the server confirms only a valid client confirmation
    pair.server.receive_data(pair.client.data_to_send())
    with pytest.raises(AuthenticationError, match="passphrases differ"):
        pair.server.next_event()
    assert pair.server.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        pair.server.next_event()  # once in error, the object refuses further calls
    # The server says so; the client reports it the same way.
    pair.server.refuse(common.DENIED)
    pair.client.receive_data(pair.server.data_to_send())
    with pytest.raises(AuthenticationError, match="passphrases differ"):
        pair.client.next_event()


def test_client_checks_the_server_confirmation_too():
    pair = Pair("correct horse", "correct h0rse")
    cross(pair)
    events(pair.server), events(pair.client)
    pair.client.receive_data(pair.server._my_confirm)  # what a server with another passphrase would confirm
    with pytest.raises(AuthenticationError, match="passphrases differ"):
        pair.client.next_event()


def test_odd_refusals_are_remote_errors():
    odd = ClientConnection("pw")
    odd.receive_data(common.frame(common.REFUSAL + b"why not"))
    with pytest.raises(RemoteProtocolError, match="unknown reason"):
        odd.next_event()
    server = ServerConnection("pw")
    server.receive_data(common.frame(common.REFUSAL + common.DENIED))
    with pytest.raises(RemoteProtocolError, match="client sent a refusal"):
        server.next_event()


def test_passphrase_is_nfc_normalised():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    Pair(composed, decomposed).handshake()


def test_empty_passphrase_is_refused():
    with pytest.raises(LocalProtocolError, match="empty"):
        ClientConnection("")


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
    common.frame(common.MAGIC + bytes([2]) + bytes(33)),
    common.frame(bytes(common.HELLO_SIZE)),
], ids=["legacy", "http", "tls", "ssh", "noise", "v2", "zeros"])
def test_other_protocols_get_not_an_aeschat_peer(junk):
    server = ServerConnection("pw")
    server.receive_data(junk)
    with pytest.raises(NotAeschatPeer):
        events(server)


def test_future_version_is_named():
    server = ServerConnection("pw")
    server.receive_data(common.frame(common.MAGIC + bytes([2]) + bytes(33)))
    with pytest.raises(NotAeschatPeer, match="version 2"):
        server.next_event()


def test_spake2_message_with_junk_appended_is_refused():
    client, server = ClientConnection("pw"), ServerConnection("pw")
    hello = client.data_to_send()[4:]
    server.receive_data(common.frame(hello + b"junk"))
    with pytest.raises(NotAeschatPeer):
        server.next_event()


@given(st.binary(min_size=32, max_size=32))
def test_malformed_spake2_element_is_a_remote_error(point):
    server = ServerConnection("pw", entropy=fixed_entropy(b"s"))
    server.receive_data(common.frame(common.HELLO_PREFIX + b"A" + point))
    with contextlib.suppress(RemoteProtocolError):  # not on the curve, not in the group: the peer's fault
        events(server)


def test_reflected_hello_is_refused():
    client = ClientConnection("pw")
    client.receive_data(client.data_to_send())
    with pytest.raises(AuthenticationError, match="wrong side"):
        client.next_event()


def test_reflected_confirmation_is_refused():
    pair = Pair()
    cross(pair)
    assert events(pair.client) == []
    pair.client.receive_data(pair.client.data_to_send())  # its own confirmation, sent back to it
    with pytest.raises(AuthenticationError):
        pair.client.next_event()


def test_closed_during_handshake_is_reported():
    server = ServerConnection("pw")
    server.receive_data(b"")
    assert events(server) == [ConnectionClosed()]


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


@pytest.mark.parametrize("payload", [
    b"{}", b'{"type": "msg"}', b'{"type": "msg", "id": true, "timestamp": "", "message": "", "hash": ""}',
    b'{"type": "nope"}', b"[1]", b"{", b'{"type": "msg", "id": 1, "timestamp": "", "message": "\\ud800", "hash": ""}',
])
def test_bad_payloads_are_remote_errors(payload):
    with pytest.raises(RemoteProtocolError):
        common.decode_payload(b"".join(common.process_bytes(payload + b"~" * (-len(payload) % 16))))


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
def test_any_text_round_trips_through_v1(text):
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
    good = Message(0, "hi", "2026-11-27T12:34:56+02:00", common.text_hash("hi"))
    assert common.verify_and_display(good) == "Received: hi  ☒  10:34:56"
    bad = Message(0, "hi", "12:00:00", common.text_hash("ho"))
    assert common.verify_and_display(bad) == "Received: hi  ☐  12:00:00"
    assert common.verify_and_display(Message(0, "x", "\x1b[2J", "")).endswith("??:??:??")
    monkeypatch.delenv("TZ")
    time.tzset()


@pytest.mark.parametrize("hostile, shown", [
    ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
    ("a\nReceived: fake", "a\\nReceived: fake"),
    ("\r\x08\x7f\x9b", "\\r\\x08\\x7f\\x9b"),
    ("abc\u202edef\u2066\u200b\ufeff", "abc\\u202edef\\u2066\\u200b\\ufeff"),
    ("\u2028\u2029", "\\u2028\\u2029"),
])
def test_controls_are_shown_escaped(hostile, shown):
    assert common.visible(hostile) == shown


@given(st.text(alphabet=st.characters(codec=None)))
def test_no_control_character_ever_reaches_the_terminal(text):
    line = common.verify_and_display(Message(0, text, TS, common.text_hash(text)))
    assert "\n" not in line
    assert not any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"} for ch in line)


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


def test_ctr_matches_nist_sp_800_38a_f_5_5():
    cipher = common.CounterCipher(bytes.fromhex(NIST_CTR_KEY))
    counter = 0xF0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFF
    assert cipher.apply(counter, bytes.fromhex(NIST_CTR_PLAIN)).hex() == NIST_CTR_CIPHER
    assert cipher.apply(counter, bytes.fromhex(NIST_CTR_CIPHER)).hex() == NIST_CTR_PLAIN


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


def test_legacy_wrong_passphrase_is_clear_at_the_first_block():
    data = common.legacy_encode(pyaes.AES(common.legacy_key("right")), "hi", "12:00:00")
    with pytest.raises(RemoteProtocolError, match="passphrases differ"):
        common.LegacyDecoder(pyaes.AES(common.legacy_key("wrong"))).feed(data[:16])


def test_legacy_warnings():
    assert common.legacy_warnings("short", 128) == []
    assert len(common.legacy_warnings("a~b", 2000)) == 2
    assert "long" in common.legacy_warnings("x" * 70, 200)[0]


V1_PASSPHRASE = "correct horse battery staple"
# Client randomness SHA-512(b"client"), server randomness SHA-512(b"server"), as PROTOCOL.md says.
V1_HANDSHAKE = {
    "client hello": "0000002a61657363686174000141cef6ee33f15c2f6666c6b72bb14a2328a38d6cc0a98e539b051eadffe1b62021",
    "server hello": "0000002a6165736368617400014275231ec040574fd129e53f76a5101345907ff223777196c872beb7c36af1dfe4",
    "client confirm": "00000020df0dbc90570236760cd93e40d405c71e05b9ad9c3c7f3c4cf044164bcf162dd9",
    "server confirm": "000000202b7b91d605b0f9292bf5c83f4a493a6153c7942f28f7c3ae769c3ce57173193e",
}
# Records sent after that handshake, in this order: (sender, event, the frame's hex, or its SHA-256).
V1_RECORDS = [
    ("client", Message(0, "", TS),
     "000000c02e7b18f88b81381b1edca303c9bbdddb73d098be5308f0887a57e672c087fc242bdb893dc51c229b1710cadc8c8c59"
     "42fc9fe631f2e4a65946b5d955c446449d6bed47282b9495d565da18ae4865165f933b709bf3e31818e047c79d3b3694043e7b"
     "4d0d743f86e83445129716a5869427f20a9f77369ec2f7ab2795378c852b23d3e98e3286f5636fdd23616cd2cfcd81de04b1a6"
     "c077fca64f5a627ddec154f58eb4e613f91d00b92fc337b447748043f4b541170ca2932ee544d738b7bab7"),
    ("client", Message(1, "hello ✓", TS),
     "000000c01b4d4f0cd358726af6e3d549b5a1eaeee6bf24688e9976b6622c2cb3f27d65647c3645e20c2b2a837946a6b1d9ac07"
     "473b7702772e8ac62a4ef686819cb2059108dec7e5d0f442452ce244c5fe4e4b247055b402f59e69a75b0f036a10f917e9f6db"
     "b5a3066320d19852f1518a082ef41bba07b32f761b0d1dfc81626bc72c39e24a6a386d458cfb4f2e773b7382b816e10ce31fc3"
     "9dd3d0b0e7c5d33534705097308d1585e30176cbee1970e04cc478e9ec06bb3ec3689460f2bdafb0f2bb45"),
    ("client", Message(2, "x" * common.MAX_MESSAGE, TS),
     "sha256:7776f7112197b328af7d90f04805b8a462dbc8e5879e217c06b8918574fb57a1"),
    ("server", Ack(0),
     "00000040d8aa56602061cd03e3750630c1a08830660c4511968547349006b5c269eb5cb0e70d4337f1a02d4a4c659773fdcdb3"
     "469216eb883c64e71423db527367a8c2c7"),
    ("server", Message(0, "hi", TS),
     "000000c0c2438d746c08f6f3bfb0bf6d6679b942daa32e0afa5afb8a94c5539e8005225b5f04e65f7eca7cede6e9b614957220"
     "faf768b35f76f83d679ebe9a66798956a1bb7619f853113424913c967fa7ad70e31032aa289d1465d908f0c3f777765c46642f"
     "55817417be08c9def6c07581ae984f651d94c3c49f496fb16513e9090b32feafef98aaf7ade2368407ecb26324f71ac2f43086"
     "df0b77f5c5fc0372941c23c7ec2a8dc7d41e218995709174450cd3c9b9749907fe50b3f7dad05a8417ab05"),
    ("server", Ping(),
     "00000030a586978b6a7fb82793737387979b02a6567dfadfb8b705822992ad6416a1262217ffdbe75828bd4ba5dc643b46538583"),
    ("server", Goodbye(),
     "00000030379d69b9f35e9aafe37ffff0d07a432a7af5bf1b6336ce8f7f79f16e87a41ac71649879a5f3559b686bb103d6fdcaee5"),
]


def known_pair():
    pair = Pair()
    pair.client = ClientConnection(V1_PASSPHRASE, entropy=fixed_entropy(b"client"))
    pair.server = ServerConnection(V1_PASSPHRASE, entropy=fixed_entropy(b"server"))
    return pair


def test_v1_handshake_known_answer():
    pair = known_pair()
    seen = {"client hello": pair.client.data_to_send(), "server hello": pair.server.data_to_send()}
    pair.server.receive_data(seen["client hello"])
    pair.client.receive_data(seen["server hello"])
    assert events(pair.server) == events(pair.client) == []
    seen["client confirm"] = pair.client.data_to_send()
    pair.server.receive_data(seen["client confirm"])
    assert events(pair.server) == [HandshakeComplete()]
    seen["server confirm"] = pair.server.data_to_send()
    assert {k: v.hex() for k, v in seen.items()} == V1_HANDSHAKE


def test_v1_records_known_answers_both_ways():
    pair = known_pair().handshake()
    for sender_name, event, expected in V1_RECORDS:
        sender, receiver = pair.sides(sender_name)
        sender.send(event)
        record = sender.data_to_send()
        shown = "sha256:" + hashlib.sha256(record).hexdigest() if expected.startswith("sha256:") else record.hex()
        assert shown == expected
        receiver.receive_data(record)
        [got] = events(receiver)
        assert got == (replace(event, hash=common.text_hash(event.text)) if isinstance(event, Message) else event)


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
    reply, server_again = server.on_resume(client.resume_request(), server=True)
    _, client_again = client.on_resume(reply, server=False)
    return client_again, server_again


def deliver(sender, receiver, messages):
    shown = [m.text for m in messages if receiver.accept(m)]
    for m in messages:
        sender.acknowledged(m.id)
    return shown


def test_resume_sends_again_only_what_was_not_shown_and_shows_each_once():
    client, server = common.Conversation.new(), common.Conversation.new()
    exchange(client, server)
    sent = [client.new_message(f"c{i}", TS) for i in range(5)]
    assert deliver(client, server, sent[:2]) == ["c0", "c1"]
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
    without_resumed = b"".join(common.process_text('{"type":"resume","conv":"x","next":0,"base":0}'))
    with pytest.raises(RemoteProtocolError, match="resumed"):
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
