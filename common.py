"""What client.py and server.py share: the aeschat protocol core, and the chat session around it.

The first half is the protocol core and does no I/O at all: it takes bytes and returns bytes and
events, never touches a socket, starts a thread or prints, so every property of it is tested directly
(tests/test_core.py). PROTOCOL.md describes the wire formats it speaks, byte by byte.

The second half (from "The session" on) is the small piece that feeds the core from one socket: a
listener thread that receives and displays, an input loop that reads lines and sends them.
"""

import argparse
import contextlib
import datetime
import enum
import getpass
import hashlib
import hmac
import json
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass

import pyaes
import spake2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2.ed25519_basic import NotOnCurve

__version__ = "1.0.0"

# ---------------------------------------------------------------------------------------------------
# Errors: one tree, split by whose fault it is. The CLI maps it to exit codes in one place.


class AeschatError(Exception):
    """Base of every error this project raises on purpose."""


class LocalProtocolError(AeschatError):
    """We asked for something the protocol cannot do (a message too large, a closed connection)."""


class RemoteProtocolError(AeschatError):
    """The peer sent something that is not valid aeschat: it is fatal for the connection."""


class TruncatedFrame(RemoteProtocolError):
    """The connection ended in the middle of a frame."""


class NotAeschatPeer(RemoteProtocolError):
    """The peer speaks some other protocol (the legacy format, HTTP, TLS, another version)."""


class AuthenticationError(RemoteProtocolError):
    """Key confirmation failed: the passphrases differ, or someone interfered."""


class Refused(AeschatError):
    """The server turned us away: it is busy with a chat with another client."""


class IntegrityError(RemoteProtocolError):
    """A record failed its check: tampered, replayed, reordered, dropped, truncated or reflected."""


# ---------------------------------------------------------------------------------------------------
# Blocks and padding, as the original scripts had them: 16-byte chunks, right-padded with `~`.

BLOCK = 16
PAD = b"~"


def process_bytes(data):
    """Split bytes into 16-byte chunks (the last one shorter if the length is not a multiple)."""
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def process_text(text):
    """Encode text as UTF-8 and right-pad it with `~` to whole 16-byte blocks; returns the blocks."""
    data = text.encode("utf-8")
    return process_bytes(data + PAD * (-len(data) % BLOCK))


def strip_padding(data):
    """Undo process_text for a JSON object: only the `~` after the closing brace is padding."""
    body = data.rstrip(PAD)
    if len(data) % BLOCK or len(data) - len(body) >= BLOCK or not body.endswith(b"}"):
        raise RemoteProtocolError("payload is not a padded JSON object")
    return body


# ---------------------------------------------------------------------------------------------------
# Framing: every unit on the wire is a 4-byte big-endian length N, then N bytes.

LENGTH = struct.Struct("!I")

# The largest frame we accept. A message is at most 64 KiB of UTF-8; in its JSON record quotes and
# backslashes double and the common control characters (\n, \t) double too, so 256 KiB holds the
# largest message with room for its escaping, the record fields, padding and tag. Anything larger is
# refused before a byte of it is buffered, so a peer can make us hold at most this much per connection.
MAX_FRAME = 256 * 1024


class FrameDecoder:
    """Incremental frame decoder: feed(data) any segmentation, then next_frame() until None."""

    def __init__(self, max_size=MAX_FRAME):
        self.max_size = max_size
        self._buffer = bytearray()
        self._eof = False

    def feed(self, data):
        """Add received bytes; b"" means the peer closed the connection."""
        if not data:
            self._eof = True
        self._buffer += data

    def next_frame(self):
        """The next whole frame's payload, or None when more data is needed (or the stream ended cleanly)."""
        if len(self._buffer) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self._buffer)
            if size > self.max_size:
                raise RemoteProtocolError(f"frame of {size} bytes is over the limit of {self.max_size}")
            end = LENGTH.size + size
            if len(self._buffer) >= end:
                frame = bytes(self._buffer[LENGTH.size : end])
                del self._buffer[:end]
                return frame
        if self._eof and self._buffer:
            raise TruncatedFrame("connection closed in the middle of a frame")
        return None

    @property
    def closed(self):
        """True once the peer closed the connection and every whole frame has been taken."""
        return self._eof and not self._buffer


def frame(payload):
    return LENGTH.pack(len(payload)) + payload


# ---------------------------------------------------------------------------------------------------
# Keys and ciphers.


def normalize_passphrase(passphrase):
    """The passphrase as SPAKE2 takes it: NFC-normalised UTF-8, so it matches across systems."""
    if not passphrase:
        raise LocalProtocolError("the passphrase is empty")
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def hkdf_sha256(ikm, info, length=32, salt=None):
    """HKDF-SHA256 (RFC 5869); aeschat uses an empty salt, as SPAKE2's output is already uniformly random."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


class CounterCipher:
    """AES-256-CTR (NIST SP 800-38A, 6.5) from pyaes's block cipher, the key expanded once: the costly part.

    The counter block is a 128-bit big-endian integer that adds one per block. Records start theirs at
    sequence_number << 64, so no keystream block is ever used twice under one key.
    """

    def __init__(self, key):
        self._aes = pyaes.AES(key)

    def apply(self, counter, data):
        """Encrypt or decrypt (the same in CTR) data with the keystream that starts at counter."""
        encrypt = self._aes.encrypt
        blocks = (len(data) + BLOCK - 1) // BLOCK
        stream = b"".join(bytes(encrypt(((counter + i) % 2**128).to_bytes(BLOCK, "big"))) for i in range(blocks))
        xored = int.from_bytes(data, "big") ^ int.from_bytes(stream[: len(data)], "big")
        return xored.to_bytes(len(data), "big")


def legacy_key(passphrase):
    """The original scripts' key: SHA-256 of the passphrase, used directly for AES-256."""
    return hashlib.sha256(passphrase.encode("utf-8")).digest()


def text_hash(text):
    """The seed's integrity hash: SHA-256 hex of the text (a lone surrogate hashes, it never raises)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Events: what the connection hands the session, and what the session asks it to send.

MAX_MESSAGE = 64 * 1024  # bytes of UTF-8 text in one message


@dataclass(frozen=True)
class HandshakeComplete:
    """Both sides proved they know the passphrase; records may flow."""


@dataclass(frozen=True)
class Message:
    id: int  # per-direction message number, from 0
    text: str
    timestamp: str  # ISO 8601 with UTC offset (v1) or HH:MM:SS (legacy)
    hash: str = ""  # SHA-256 hex of text; filled in by the sender when empty

    @property
    def verified(self):
        return hmac.compare_digest(self.hash, text_hash(self.text))


@dataclass(frozen=True)
class Ack:
    """The peer received and displayed message `id`."""

    id: int


@dataclass(frozen=True)
class Ping:
    """A keepalive: proof that the peer is still there."""


@dataclass(frozen=True)
class Goodbye:
    """The peer is leaving on purpose."""


@dataclass(frozen=True)
class Busy:
    """The server is in a chat with another client: this one is turned away."""


@dataclass(frozen=True)
class Resume:
    """The first record each way on every connection: which conversation, and where each direction stands."""

    conv: str  # the conversation id, 32 hex digits, chosen by the client when it first starts
    next: int  # the id of the next message the sender expects: it has shown every one below
    base: int  # the sender's lowest unacknowledged message id (its next id if none is waiting)
    resumed: bool = False  # from the server: it still held the conversation the client named


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection (after a Goodbye, a normal end; without one, a loss)."""


def now_iso(clock=None):
    moment = clock() if clock else datetime.datetime.now().astimezone()
    return moment.isoformat(timespec="seconds")


def check_message_text(text):
    """Refuse what cannot be sent, before anything is encrypted."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalProtocolError("the message is not valid Unicode text") from None
    if size > MAX_MESSAGE:
        raise LocalProtocolError(f"the message is {size} bytes; the limit is {MAX_MESSAGE} bytes of UTF-8")


# The payload inside a record: the seed's JSON object plus a type and an id.

_SIGNAL_TYPES = {Ping: "ping", Goodbye: "bye", Busy: "busy"}  # the events that carry no fields


def encode_payload(event):
    if isinstance(event, Message):
        check_message_text(event.text)
        obj = {"type": "msg", "id": event.id, "timestamp": event.timestamp, "message": event.text,
               "hash": event.hash or text_hash(event.text)}
    elif isinstance(event, Ack):
        obj = {"type": "ack", "id": event.id}
    elif isinstance(event, Resume):
        obj = {"type": "resume", "conv": event.conv, "next": event.next, "base": event.base, "resumed": event.resumed}
    elif type(event) in _SIGNAL_TYPES:
        obj = {"type": _SIGNAL_TYPES[type(event)]}
    else:
        raise LocalProtocolError(f"cannot send {event!r}")
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"".join(process_text(text))


def _field(obj, name, kind):
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RemoteProtocolError(f"payload field {name!r} is missing or not a {kind.__name__}")
    return value


def decode_payload(data):
    try:
        obj = json.loads(strip_padding(data).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RemoteProtocolError("payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("payload is not a JSON object")
    kind = obj.get("type")
    if kind == "msg":
        text = _field(obj, "message", str)
        try:
            check_message_text(text)
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"peer's {e}") from None
        return Message(_field(obj, "id", int), text, _field(obj, "timestamp", str), _field(obj, "hash", str))
    if kind == "ack":
        return Ack(_field(obj, "id", int))
    if kind == "resume":
        resumed = obj.get("resumed")
        if not isinstance(resumed, bool):
            raise RemoteProtocolError("payload field 'resumed' is missing or not a bool")
        return Resume(_field(obj, "conv", str), _field(obj, "next", int), _field(obj, "base", int), resumed)
    for signal_class, name in _SIGNAL_TYPES.items():
        if kind == name:
            return signal_class()
    raise RemoteProtocolError(f"unknown payload type {kind!r}")


# ---------------------------------------------------------------------------------------------------
# The records: AES-256-CTR, then HMAC-SHA256 over (sequence number, ciphertext): encrypt-then-MAC.

TAG_SIZE = 32
SEQ = struct.Struct("!Q")
MAX_SEQ = 2**64 - 1  # the last usable number: the record layer refuses to wrap


class RecordLayer:
    """One direction's keys and sequence number. The sequence number is implicit: never on the wire."""

    def __init__(self, enc_key, mac_key, seq=0):
        self._cipher = CounterCipher(enc_key)
        self._mac_key = mac_key
        self.seq = seq

    def _tag(self, ciphertext):
        return hmac.new(self._mac_key, SEQ.pack(self.seq) + ciphertext, hashlib.sha256).digest()

    def _advance(self):
        if self.seq >= MAX_SEQ:
            raise LocalProtocolError("sequence numbers exhausted: reconnect to get fresh keys")
        self.seq += 1

    def seal(self, plaintext):
        if self.seq >= MAX_SEQ:
            raise LocalProtocolError("sequence numbers exhausted: reconnect to get fresh keys")
        ciphertext = self._cipher.apply(self.seq << 64, plaintext)
        record = ciphertext + self._tag(ciphertext)
        self._advance()
        return record

    def open(self, record):
        if len(record) < TAG_SIZE:
            raise IntegrityError("record too short to hold its tag")
        ciphertext, tag = record[:-TAG_SIZE], record[-TAG_SIZE:]
        # The tag is checked, in constant time, before anything is decrypted.
        if not hmac.compare_digest(tag, self._tag(ciphertext)):
            raise IntegrityError(
                "a record failed its integrity check: it was altered, replayed, reordered, dropped or reflected")
        plaintext = self._cipher.apply(self.seq << 64, ciphertext)
        self._advance()
        return plaintext


# ---------------------------------------------------------------------------------------------------
# The v1 connection: handshake, then records. Sans-I/O in the manner of h11: receive_data(bytes),
# next_event() -> event or None, send(event) and data_to_send() -> bytes.

MAGIC = b"aeschat\x00"  # eight bytes that no legacy, HTTP or TLS peer starts with
VERSION = 1
HELLO_PREFIX = MAGIC + bytes([VERSION])
SPAKE2_MESSAGE_SIZE = 33  # a side byte, then an Ed25519 point
HELLO_SIZE = len(HELLO_PREFIX) + SPAKE2_MESSAGE_SIZE
# In place of its confirmation, a server sends a refusal when the client's was wrong: the prefix, "!",
# and the reason. It is not authenticated (there are no keys yet): a man in the middle could forge one,
# but he can always cut the connection anyway.
REFUSAL = HELLO_PREFIX + b"!"
DENIED = b"denied"
ID_A = b"aeschat-v1-client"
ID_B = b"aeschat-v1-server"


_CONSUMED = object()  # a handshake frame was handled and there is nothing to report


class State(enum.Enum):
    HELLO = "waiting for the peer's hello"
    CONFIRM = "waiting for the peer's key confirmation"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


class Connection:
    """One side of a v1 connection. Use ClientConnection (SPAKE2 side A) or ServerConnection (side B)."""

    _spake_class = None
    side = b""
    peer_side = b""
    acknowledges = True  # the session keeps messages until the peer acknowledges them

    def __init__(self, passphrase, entropy=os.urandom):
        self._spake = self._spake_class(normalize_passphrase(passphrase), idA=ID_A, idB=ID_B,
                                        entropy_f=entropy)
        self._frames = FrameDecoder(max_size=HELLO_SIZE)
        self._outgoing = bytearray()
        self._transcript = {}
        self._send = self._receive = None
        self.state = State.HELLO
        self._hello = HELLO_PREFIX + self._spake.start()  # spake2 guards start() against a second call
        self._transcript[self.side] = self._hello
        self._outgoing += frame(self._hello)

    # -- what the session calls

    def data_to_send(self):
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data):
        """Feed bytes from the peer; b"" means it closed the connection."""
        self._check_usable()
        self._frames.feed(data)

    def next_event(self):
        """The next event, or None when more data is needed."""
        self._check_usable()
        try:
            return self._next_event()
        except AeschatError:
            self.state = State.ERROR
            raise

    def send(self, event):
        """Queue a record carrying event (Message, Ack, Ping or Goodbye) for data_to_send()."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send while the connection is {self.state.value}")
        payload = encode_payload(event)  # refuses a message too large before anything is sealed
        self._outgoing += frame(self._send.seal(payload))

    # -- inside

    def _check_usable(self):
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection already failed")

    def _next_event(self):
        event = self._step()
        while event is _CONSUMED:
            event = self._step()
        return event

    def _step(self):
        """Handle at most one frame: an event, None for "need data", or _CONSUMED for a handshake frame."""
        if self.state is State.CLOSED:
            return None
        try:
            payload = self._frames.next_frame()
        except TruncatedFrame:
            raise  # the peer closed mid-frame: a lost connection, whatever the state
        except RemoteProtocolError:
            if self.state is State.HELLO:
                raise NotAeschatPeer("the peer is not an aeschat v1 peer") from None
            raise
        if payload is None:
            if self._frames.closed:
                self.state = State.CLOSED
                return ConnectionClosed()
            return None
        if self.state is not State.OPEN and payload.startswith(REFUSAL):
            self._on_refusal(payload[len(REFUSAL) :])
        if self.state is State.HELLO:
            return self._on_hello(payload)
        if self.state is State.CONFIRM:
            return self._on_confirm(payload)
        return decode_payload(self._receive.open(payload))

    def _on_hello(self, hello):
        if not hello.startswith(MAGIC):
            raise NotAeschatPeer("the peer is not an aeschat v1 peer")
        if hello[len(MAGIC)] != VERSION:
            raise NotAeschatPeer(f"the peer speaks aeschat version {hello[len(MAGIC)]}, we speak {VERSION}")
        if len(hello) != HELLO_SIZE:
            raise NotAeschatPeer("the peer's hello has the wrong length")
        message = hello[len(HELLO_PREFIX) :]
        if message[:1] != self.peer_side:
            raise AuthenticationError("the peer's hello is from the wrong side (a reflected hello?)")
        try:
            key = self._spake.finish(message)
        except (spake2.SPAKEError, NotOnCurve, ValueError):
            # spake2 raises its own errors, ValueError or NotOnCurve (not a SPAKEError) on a bad element.
            raise RemoteProtocolError("the peer's SPAKE2 message is not a valid group element") from None
        self._transcript[self.peer_side] = hello
        transcript = self._transcript[b"A"] + self._transcript[b"B"]
        keys = {label: hkdf_sha256(key, b"aeschat v1 " + label) for label in
                (b"A->B enc", b"A->B mac", b"B->A enc", b"B->A mac", b"confirm A", b"confirm B")}
        out, back = (b"A->B", b"B->A") if self.side == b"A" else (b"B->A", b"A->B")
        self._send = RecordLayer(keys[out + b" enc"], keys[out + b" mac"])
        self._receive = RecordLayer(keys[back + b" enc"], keys[back + b" mac"])
        mine = hmac.new(keys[b"confirm " + self.side], transcript, hashlib.sha256).digest()
        self._expected_confirm = hmac.new(keys[b"confirm " + self.peer_side], transcript, hashlib.sha256).digest()
        # The client confirms first; the server answers only a valid confirmation, so that every guess
        # at the passphrase costs the guesser a confirmation the server sees, counts and slows down.
        self._my_confirm = frame(mine)
        if self.confirms_first:
            self._outgoing += self._my_confirm
        self._frames.max_size = MAX_FRAME
        self.state = State.CONFIRM
        return _CONSUMED

    def _on_confirm(self, confirm):
        if not hmac.compare_digest(confirm, self._expected_confirm):
            raise AuthenticationError("the passphrases differ (or someone interfered with the connection)")
        if not self.confirms_first:
            self._outgoing += self._my_confirm
        self.state = State.OPEN
        return HandshakeComplete()

    def _on_refusal(self, reason):
        if self.side == b"B":
            raise RemoteProtocolError("a client sent a refusal")
        if reason == DENIED:
            raise AuthenticationError("the server says the passphrases differ (or someone interfered)")
        raise RemoteProtocolError("the server refused the connection for an unknown reason")


class ClientConnection(Connection):
    """The connecting side: SPAKE2 side A; it sends its key confirmation first."""

    _spake_class = spake2.SPAKE2_A
    side, peer_side = b"A", b"B"
    confirms_first = True


class ServerConnection(Connection):
    """The listening side: SPAKE2 side B; it confirms only after checking the client's confirmation."""

    _spake_class = spake2.SPAKE2_B
    side, peer_side = b"B", b"A"
    confirms_first = False

    def refuse(self, reason):
        """Queue a refusal (DENIED, after a wrong passphrase); then close."""
        self._outgoing += frame(REFUSAL + reason)
        self.state = State.CLOSED


# ---------------------------------------------------------------------------------------------------
# The legacy format of the original scripts (../shared/legacy-wire-format.md): JSON padded with `~`,
# each 16-byte block encrypted alone with AES-256 (ECB) under SHA-256(passphrase). Insecure by design.

LEGACY_PREFIX = b'{"timestamp": "'  # how every legacy plaintext starts: a wrong key shows at once
# The largest legacy message we buffer: the original scripts set none, and json.dumps escapes every
# non-ASCII character (six bytes for one, twelve for a pair), so this leaves room for 64 KiB of any text.
LEGACY_MAX = 1024 * 1024
LEGACY_ORIGINAL_LIMIT = 1024  # what an original receiver reads in one recv and takes as one message
LEGACY_DISPLAY_LIMIT = 79  # an original receiver shows a message only if "Received: " + it is shorter


def legacy_plaintext(text, timestamp):
    return json.dumps({"timestamp": timestamp, "message": text, "hash": text_hash(text)})


def legacy_encode(cipher, text, timestamp):
    """One legacy message, encrypted block by block; cipher is pyaes.AES(legacy_key(passphrase))."""
    check_message_text(text)
    return b"".join(bytes(cipher.encrypt(block)) for block in process_text(legacy_plaintext(text, timestamp)))


def legacy_size(text):
    """How many bytes a legacy message takes on the wire."""
    return len(b"".join(process_text(legacy_plaintext(text, "00:00:00"))))


def legacy_warnings(text, encrypted_size):
    """Why an original receiver would mangle this message (it is sent all the same)."""
    warnings = []
    if encrypted_size > LEGACY_ORIGINAL_LIMIT:
        warnings.append(f"it is {encrypted_size} bytes encrypted, and the original scripts lose messages "
                        f"over {LEGACY_ORIGINAL_LIMIT}")
    if "~" in text:
        warnings.append("it contains '~', which the original scripts delete (their hash check will fail)")
    if len("Received: " + text) >= LEGACY_DISPLAY_LIMIT:
        warnings.append("the original scripts do not display messages this long")
    return warnings


class LegacyDecoder:
    """Streaming decoder for legacy messages: any segmentation, any size, `~` inside messages."""

    def __init__(self, cipher):
        self._cipher = cipher
        self._encrypted = bytearray()
        self._plain = bytearray()  # decrypted bytes of the message being received
        self._scanned = 0  # how much of _plain has been looked at for a message end
        self._eof = self._closed = False
        self._count = 0

    def feed(self, data):
        if not data:
            self._eof = True
        self._encrypted += data
        whole = len(self._encrypted) - len(self._encrypted) % BLOCK
        for block in process_bytes(bytes(self._encrypted[:whole])):
            self._plain += bytes(self._cipher.decrypt(block))
        del self._encrypted[:whole]
        if not self._plain[: len(LEGACY_PREFIX)] == LEGACY_PREFIX[: len(self._plain)]:
            raise RemoteProtocolError("cannot decrypt the peer's data: the passphrases differ, "
                                      "or the peer does not speak the legacy format")
        if len(self._plain) > LEGACY_MAX:
            raise RemoteProtocolError(f"legacy message over {LEGACY_MAX} bytes")

    def next_message(self):
        """The next Message, ConnectionClosed once the stream ended cleanly, or None for "need data"."""
        # A message ends with a block whose text, less its `~` padding, ends with the closing brace;
        # a `}` inside the message text can look the same, so a candidate counts only if it parses.
        while self._scanned + BLOCK <= len(self._plain):
            self._scanned += BLOCK
            end = self._scanned
            if not self._plain[end - BLOCK : end].rstrip(PAD).endswith(b"}"):
                continue
            try:
                obj = json.loads(self._plain[:end].rstrip(PAD).decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if not (isinstance(obj, dict) and all(isinstance(obj.get(k), str)
                                                  for k in ("timestamp", "message", "hash"))):
                raise RemoteProtocolError("legacy message without its timestamp, message and hash")
            del self._plain[:end]
            self._scanned = 0
            self._count += 1
            return Message(self._count - 1, obj["message"], obj["timestamp"], obj["hash"])
        if self._eof and not self._closed:
            if self._plain or self._encrypted:
                raise TruncatedFrame("connection closed in the middle of a legacy message")
            self._closed = True  # reported once, as Connection does
            return ConnectionClosed()
        return None


# ---------------------------------------------------------------------------------------------------
# Display. Every control character from the peer (Unicode Cc and Cf, line and paragraph separators,
# lone surrogates) is shown escaped, so a peer cannot move the cursor, retitle the window, reorder or
# hide text, or fake a line of ours: one message, one line.

VERIFIED, FAILED = "☒", "☐"
_UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text):
    if text.isprintable():  # fast path: no category above is printable
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) not in _UNSAFE:
            out.append(ch)
        elif ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def local_time(timestamp):
    """HH:MM:SS in this machine's zone, from an ISO 8601 time (v1) or an HH:MM:SS one (legacy)."""
    try:
        moment = datetime.datetime.fromisoformat(timestamp)
    except ValueError:
        moment = None
    if moment is not None and moment.tzinfo is not None:
        return moment.astimezone().strftime("%H:%M:%S")
    try:
        return datetime.datetime.strptime(timestamp, "%H:%M:%S").strftime("%H:%M:%S")
    except ValueError:
        return "??:??:??"


def verify_and_display(message):
    """The line that shows a received message: `Received: MESSAGE  TAG  HH:MM:SS`."""
    tag = VERIFIED if message.verified else FAILED
    return f"Received: {visible(message.text)}  {tag}  {local_time(message.timestamp)}"


def sent_line(text, timestamp):
    return f"Sent: {visible(text)}  {local_time(timestamp)}"


class LegacyConnection:
    """The legacy format behind Connection's interface: no handshake, no acknowledgements, no goodbye."""

    acknowledges = False
    state = State.OPEN

    def __init__(self, passphrase):
        if not passphrase:
            raise LocalProtocolError("the passphrase is empty")
        self._cipher = pyaes.AES(legacy_key(passphrase))
        self._decoder = LegacyDecoder(self._cipher)
        self._outgoing = bytearray()

    def data_to_send(self):
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data):
        self._decoder.feed(data)

    def next_event(self):
        return self._decoder.next_message()

    def send(self, event):
        """Encrypt a Message as the original scripts do; the other events have no legacy form."""
        if isinstance(event, Message):
            self._outgoing += legacy_encode(self._cipher, event.text, local_time(event.timestamp))


class GuessLimiter:
    """Slows online passphrase guessing: after a failed attempt, at most one check a second,
    the interval doubling as failures repeat (up to MAX_GUESS_INTERVAL); a success resets it."""

    MAX_GUESS_INTERVAL = 8  # seconds: at worst 7.5 guesses a minute, a wait a real user can bear

    def __init__(self, clock):
        self._clock = clock
        self.failures = 0
        self._next_slot = 0.0

    def interval(self):
        return 0 if self.failures == 0 else min(2 ** (self.failures - 1), self.MAX_GUESS_INTERVAL)

    def reserve(self):
        """Book the next passphrase check; returns how many seconds to wait before doing it."""
        now = self._clock()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self.interval()
        return slot - now

    def failed(self):
        self.failures += 1
        self._next_slot = max(self._next_slot, self._clock() + self.interval())

    def succeeded(self):
        self.failures = 0
        self._next_slot = 0.0


class Conversation:
    """What survives reconnects, without I/O: the conversation id, the message numbers both ways, and
    the messages the peer has not acknowledged, to be sent again on the next connection.

    Each connection starts with a Resume each way (the client's first). Each side then forgets what the
    peer says it has shown and sends the rest again with the same ids; the receiver shows an id once.
    """

    def __init__(self, conv_id):
        self.id = conv_id
        self.next_id = 0  # the id of our next message
        self.expected_id = 0  # the id of the peer's next message
        self.unacked = {}  # id -> Message, oldest first

    @classmethod
    def new(cls, entropy=os.urandom):
        return cls(entropy(16).hex())

    def new_message(self, text, timestamp):
        check_message_text(text)
        message = Message(self.next_id, text, timestamp, text_hash(text))
        self.unacked[message.id] = message
        self.next_id += 1
        return message

    def base(self):
        return next(iter(self.unacked), self.next_id)

    def resume_request(self):
        return Resume(self.id, self.expected_id, self.base())

    def accept(self, message):
        """True if message is the next one to show; False for one shown before (sent again after a resume)."""
        if message.id < self.expected_id:
            return False
        if message.id > self.expected_id:
            raise RemoteProtocolError(f"message {self.expected_id} never arrived (got {message.id})")
        self.expected_id += 1
        return True

    def acknowledged(self, message_id):
        self.unacked.pop(message_id, None)

    def on_resume(self, peer, server):
        """Take the peer's Resume; returns (our reply or None, the messages to send again, in order)."""
        if server:
            resumed = peer.conv == self.id
            if not resumed:  # a client new to us takes the conversation over: its numbering starts anew
                self.id, self.expected_id = peer.conv, peer.base
            reply = Resume(self.id, max(self.expected_id, peer.base), self.base(), resumed)
        else:
            if peer.conv != self.id:
                raise RemoteProtocolError("the server answered for another conversation")
            reply = None
            if not peer.resumed:  # the server started afresh (or restarted): take its numbering
                self.expected_id = peer.base
        self.expected_id = max(self.expected_id, peer.base)
        for message_id in [i for i in self.unacked if i < peer.next]:
            del self.unacked[message_id]
        return reply, list(self.unacked.values())


# ===================================================================================================
# The session: one chat over one socket. A reader thread receives, feeds the protocol and displays; a
# writer thread sends, so that a peer who stops reading never freezes the input loop; the input loop
# (the caller's thread) reads lines and sends them. One lock guards the protocol object.

EXIT_OK, EXIT_NETWORK, EXIT_USAGE, EXIT_SECURITY = 0, 1, 2, 3
DEFAULT_PORT = 5555
HANDSHAKE_DEADLINE = 5.0  # seconds a server gives an unauthenticated connection to finish its handshake
CLIENT_HANDSHAKE_DEADLINE = 30.0  # a client waits longer: a server slowing down guesses may hold it back
KEEPALIVE = 15.0  # seconds of our silence before we send a ping
DEAD_AFTER = 45.0  # seconds of the peer's silence before we call the connection lost (pings come every 15)
FLUSH_TIMEOUT = 10.0  # how long leaving waits for the peer to acknowledge what we sent
RECONNECT_FOR = 300.0  # how long a client tries to reconnect, and a server holds a dropped conversation
MAX_QUEUED = 10_000  # messages waiting for acknowledgement; past it, new ones are refused with a message
RECV_SIZE = 256 * 1024


class UsageError(AeschatError):
    """The user asked for something that cannot be done (a bad option, no passphrase)."""


class NetworkError(AeschatError):
    """The network failed us: cannot connect, the connection was lost."""


def exit_code(error):
    """The one place where errors become exit codes."""
    if isinstance(error, (NetworkError, Refused, OSError, TruncatedFrame)):
        return EXIT_NETWORK
    if isinstance(error, RemoteProtocolError):
        return EXIT_SECURITY
    return EXIT_USAGE


WAKE = object()  # what read_line returns when something other than the user needs the input loop


class PlainUI:
    """Pipes and scripts: plain lines in and out, no escape codes at all."""

    def __init__(self):
        for stream in (sys.stdin, sys.stdout, sys.stderr):
            stream.reconfigure(errors="replace" if stream is sys.stdin else "backslashreplace")
        self._inbox = queue.Queue()
        self._lock = threading.Lock()
        self.status = ""
        threading.Thread(target=self._read_stdin, name="stdin", daemon=True).start()

    def _read_stdin(self):
        for line in sys.stdin:
            self._inbox.put(line.rstrip("\r\n"))
        self._inbox.put(None)

    def read_line(self):
        """The next typed line, None at end of input (and ever after), or WAKE."""
        line = self._inbox.get()
        if line is None:
            self._inbox.put(None)
        return line

    def wake(self):
        self._inbox.put(WAKE)

    def show(self, line):
        with self._lock:
            print(line, flush=True)

    def error(self, line):
        with self._lock:
            print(line, file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TerminalUI:
    """A terminal (prompt_toolkit): the typed line stays intact while messages print above it, with line
    editing, history and a status line. Imported only here, to keep it off the non-terminal path."""

    def __init__(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        self._prompt = PromptSession(history=None, erase_when_done=True)  # "Sent: ..." replaces the typed line
        self._patch = patch_stdout()
        self._woken = threading.Event()
        self.status = ""

    def __enter__(self):
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)

    def read_line(self):
        if self._woken.is_set():
            self._woken.clear()
            return WAKE
        try:
            return self._prompt.prompt("> ", bottom_toolbar=lambda: self.status, refresh_interval=0.5,
                                       pre_run=self._exit_if_woken)
        except EOFError:
            return None

    def _exit_if_woken(self):
        app = self._prompt.app
        if self._woken.is_set() and app.is_running and not app.future.done():
            self._woken.clear()
            app.exit(result=WAKE)

    def wake(self):
        self._woken.set()
        app = self._prompt.app
        if app.is_running:
            app.loop.call_soon_threadsafe(self._exit_if_woken)

    def show(self, line):
        print(line, flush=True)

    error = show


def make_ui():
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalUI()
    return PlainUI()


class Link:
    """One connection of a chat: a reader thread and a writer thread over one socket."""

    def __init__(self, chat, sock, conn, peer):
        self.chat, self.sock, self.conn, self.peer = chat, sock, conn, peer
        self.ready = False  # messages may flow (after the Resume exchange)
        self.goodbye = False  # the peer said goodbye
        self.closed = False
        self._outbox = queue.Queue()
        self._last_sent = self._last_received = time.monotonic()
        self._writer = threading.Thread(target=self._write, name="writer", daemon=True)

    def start(self):
        self._writer.start()
        threading.Thread(target=self._read, name="reader", daemon=True).start()

    def send(self, event):
        """Seal event and queue it for the writer; the caller holds the chat's lock."""
        self.conn.send(event)
        self._outbox.put(self.conn.data_to_send())

    def finish(self, timeout):
        """Let the writer send what is queued (bounded), then close."""
        self._outbox.put(None)
        self._writer.join(timeout=timeout)
        self.close()

    def close(self):
        self.closed = True
        self._outbox.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _write(self):
        while True:
            data = self._outbox.get()
            while data is not None and not self._outbox.empty():  # coalesce what is waiting
                more = self._outbox.get()
                if more is None:
                    self._outbox.put(None)
                    break
                data += more
            if data is None:
                return
            try:
                self.sock.sendall(data)
            except OSError as e:
                self.chat.lost(self, e.strerror or str(e))
                return
            self._last_sent = time.monotonic()

    def _read(self):
        chat = self.chat
        try:
            while not self.closed:
                readable, _, _ = select.select([self.sock], [], [], min(1.0, chat.keepalive))
                if readable:
                    data = self.sock.recv(RECV_SIZE)
                    self._last_received = time.monotonic()
                    with chat.lock:
                        self.conn.receive_data(data)
                    while (event := self._next_event()) is not None:
                        chat.handle(self, event)
                    if not data:
                        return
                elif time.monotonic() - self._last_received > chat.dead_after:
                    chat.lost(self, f"no sign of the peer for {chat.dead_after:.0f} s")
                    return
                elif time.monotonic() - self._last_sent > chat.keepalive and self.conn.acknowledges:
                    self._last_sent = time.monotonic()
                    with chat.lock:
                        self.send(Ping())
        except TruncatedFrame:
            chat.lost(self, "the connection was cut in the middle of a record")
        except Refused as e:
            chat.end(EXIT_NETWORK, str(e))
        except RemoteProtocolError as e:
            chat.end(EXIT_SECURITY, f"security failure: {e}; the chat is closed")
        except (OSError, ValueError) as e:  # ValueError: select on a socket closed under it
            chat.lost(self, getattr(e, "strerror", None) or str(e))

    def _next_event(self):
        with self.chat.lock:
            if self.closed:
                return None
            return self.conn.next_event()


class Chat:
    """One conversation: its state, the link it runs over now (if any), and what the user sees.

    When a link is lost without a goodbye, a client reconnects (reconnect() gives a new link's
    socket, connection and peer) and a server holds the conversation for a client to come back, both
    for `grace` seconds; then each side sends again what the other had not acknowledged.
    """

    def __init__(self, ui, conversation, legacy=False, keepalive=KEEPALIVE, grace=0.0, reconnect=None):
        self.ui, self.conversation, self.legacy = ui, conversation, legacy
        self.keepalive, self.dead_after = keepalive, keepalive * DEAD_AFTER / KEEPALIVE
        self.grace, self.reconnect = (0.0 if legacy else grace), reconnect
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.link = None
        self.peer = ""
        self.outcome = None  # (exit code, what to tell the user) once the chat is over
        self._lost_at = None

    @property
    def active(self):
        return self.outcome is None

    # -- links

    def attach(self, sock, conn, peer, peer_resume=None):
        """Run the chat over a new connection (replacing any old one); the server passes the client's
        Resume, which it has already read; a client sends its own and waits for the server's.
        False if the chat ended meanwhile (and the socket is closed)."""
        link = Link(self, sock, conn, peer)
        with self.lock:
            if self.outcome is not None:
                link.close()
                return False
            old, self.link, self.peer, was_lost = self.link, link, peer, self._lost_at is not None
            self._lost_at = None
            self._changed.notify_all()  # a server holding the conversation stops waiting
            if self.legacy:
                link.ready = True
            elif peer_resume is None:
                link.send(self.conversation.resume_request())
            else:
                self._resume(link, peer_resume)
        if old is not None:
            old.close()
        if was_lost or old is not None:
            self.ui.show(f"reconnected to {peer}")
        link.start()
        self.update_status()
        return True

    def _resume(self, link, peer_resume):
        reply, again = self.conversation.on_resume(peer_resume, server=self.reconnect is None)
        if reply is not None:
            link.send(reply)
        for message in again:
            link.send(message)
        link.ready = True

    def lost(self, link, reason):
        """A link failed: reconnect, hold the conversation, or end the chat."""
        with self.lock:
            if link is not self.link or self.outcome is not None:
                return
            self.link = None
            self._lost_at = token = time.monotonic()
            unsent = len(self.conversation.unacked)
        link.close()
        if self.grace <= 0:
            self.end(EXIT_NETWORK, f"connection lost: {reason}")
            return
        self.ui.error(f"connection lost: {reason}; {'reconnecting' if self.reconnect else 'waiting for the client'}"
                      f" ({unsent} unsent)")
        self.update_status()
        target = self._reconnect if self.reconnect else self._hold
        threading.Thread(target=target, args=(token,), name="reconnect", daemon=True).start()

    def _hold(self, token):
        with self.lock:
            self._changed.wait_for(lambda: self._lost_at != token or self.outcome is not None, timeout=self.grace)
            expired = self._lost_at == token and self.outcome is None
        if expired:
            self.end(EXIT_NETWORK, f"the client did not come back within {self.grace:.0f} s")

    def _reconnect(self, _token):
        deadline, delay = time.monotonic() + self.grace, 0.2
        while time.monotonic() < deadline and self.outcome is None:
            try:
                sock, conn, peer = self.reconnect()
            except (AuthenticationError, NotAeschatPeer) as e:
                self.end(EXIT_SECURITY, f"cannot reconnect: {e}")
                return
            except (NetworkError, OSError, TruncatedFrame, Refused):
                with self.lock:  # back off, but wake at once if the chat ends meanwhile
                    self._changed.wait_for(lambda: self.outcome is not None, timeout=delay)
                delay = min(delay * 2, 2.0)  # when the network is back, we are back within 2 s
                continue
            self.attach(sock, conn, peer)
            return
        self.end(EXIT_NETWORK, f"connection lost: could not reconnect within {self.grace:.0f} s")

    # -- events from a link's reader

    def handle(self, link, event):
        with self.lock:
            if isinstance(event, Message):
                if self.legacy or self.conversation.accept(event):
                    self.ui.show(verify_and_display(event))
                if not self.legacy:
                    link.send(Ack(event.id))
            elif isinstance(event, Ack):
                self.conversation.acknowledged(event.id)
                self._changed.notify_all()
            elif isinstance(event, Resume):
                if link.ready or self.reconnect is None:
                    raise RemoteProtocolError("an unexpected Resume")
                self._resume(link, event)
            elif isinstance(event, Goodbye):
                link.goodbye = True
            elif isinstance(event, Busy):
                raise Refused("the server is busy with another chat")
            elif isinstance(event, ConnectionClosed):
                if link.goodbye or self.legacy:
                    self.end(EXIT_OK, "peer left the chat")
                else:
                    self.lost(link, "the peer went away without saying goodbye")
        self.update_status()

    # -- the input loop's side

    def send_text(self, text):
        """Send one typed line (queued while disconnected); one that cannot be sent gets a one-line error."""
        timestamp = now_iso()
        with self.lock:
            if len(self.conversation.unacked) >= MAX_QUEUED:
                self.ui.error(f"not sent: {MAX_QUEUED} messages are waiting for the peer already")
                return
            try:
                message = self.conversation.new_message(text, timestamp)
            except LocalProtocolError as e:
                self.ui.error(f"not sent: {e}")
                return
            link = self.link
            if link is not None and link.ready:
                link.send(message)
            if self.legacy:
                self.conversation.acknowledged(message.id)  # no acknowledgements in the legacy format
        self.ui.show(sent_line(text, timestamp))
        if self.legacy:
            for warning in legacy_warnings(text, legacy_size(text)):
                self.ui.error(f"warning: an original receiver may mangle this message: {warning}")
        self.update_status()

    def leave(self, wait=FLUSH_TIMEOUT):
        """Wait (bounded) for every message to be acknowledged, say goodbye, close."""
        with self.lock:
            self._changed.wait_for(lambda: not self.conversation.unacked or self.outcome is not None, timeout=wait)
            undelivered = len(self.conversation.unacked)
            link = self.link
            if link is not None and self.outcome is None and not self.legacy:
                link.send(Goodbye())
        self.end(EXIT_NETWORK if undelivered else EXIT_OK,
                 f"{undelivered} message{'s' if undelivered > 1 else ''} not delivered" if undelivered else None)
        if link is not None:
            link.finish(timeout=max(wait, 1.0))  # time to write the goodbye, even in a hurry

    def end(self, code, message):
        """The chat is over: record why and wake the input loop, which tells the user (run_chat)."""
        with self.lock:
            if self.outcome is not None:
                return
            self.outcome = (code, message)
            link, self.link = self.link, None
            self._changed.notify_all()
        if link is not None and code != EXIT_OK:
            link.close()
        self.ui.wake()

    def close(self):
        with self.lock:
            link, self.link = self.link, None
        if link is not None:
            link.close()

    def update_status(self):
        with self.lock:
            unsent, link = len(self.conversation.unacked), self.link
        if self.legacy:
            state = f"{self.peer} | legacy, NOT SECURE"
        elif link is None and self.outcome is None:
            state = f"connection lost, {'reconnecting' if self.reconnect else 'waiting for the client'}"
        else:
            state = f"{self.peer} | aeschat v1, encrypted"
        self.ui.status = f" {state} | {unsent} undelivered | quit() to leave "


LEGACY_WARNING = ("WARNING: --legacy is NOT SECURE: AES-ECB under an unsalted key, no authentication; anyone on "
                  "the network can read, alter and replay messages. Use it only with the original scripts.")


def banner(ui, peer, legacy):
    if legacy:
        ui.show(f"Connected to {peer} (legacy format: not authenticated, not protected).")
    else:
        ui.show(f"Connected to {peer}: authenticated and encrypted (aeschat v1: SPAKE2, AES-256-CTR, HMAC-SHA256).")
    ui.show(f"{VERIFIED} = message verified, {FAILED} = verification failed. Type quit() or press Ctrl-D to leave.")


def run_chat(chat, typed=()):
    """The input loop of one chat (after any lines already `typed` for it); returns its exit code.

    The final line (peer left, connection lost, security failure) is printed here, by the thread that
    then returns: a thread that ended the chat could be cut short as the program exits."""
    ui, typed = chat.ui, list(typed)
    try:
        while chat.active:
            line = typed.pop(0) if typed else ui.read_line()
            if line is WAKE:
                continue
            if line is None or line.strip() == "quit()":
                chat.leave()
                break
            if line.strip():
                chat.send_text(line)
    except KeyboardInterrupt:
        chat.leave(wait=0)  # Ctrl-C leaves at once, but still says goodbye
        raise
    finally:
        chat.close()
        if chat.outcome is not None and chat.outcome[1]:
            code, message = chat.outcome
            (ui.show if code == EXIT_OK else ui.error)(message)
    return chat.outcome[0]


def first_event(sock, conn, deadline):
    """Read until conn yields its first event after the handshake (the client's Resume), within deadline."""
    sock.settimeout(deadline)
    try:
        while (event := conn.next_event()) is None:
            conn.receive_data(sock.recv(RECV_SIZE))
        return event
    except socket.timeout:
        raise NetworkError(f"nothing from the peer within {deadline:.0f} s") from None
    finally:
        sock.settimeout(None)


def handshake(sock, conn, deadline):
    """Run the v1 handshake on a connected socket, within deadline seconds."""
    sock.settimeout(deadline)
    end = time.monotonic() + deadline
    try:
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(event, HandshakeComplete):
                return
            if isinstance(event, ConnectionClosed):
                raise NetworkError("the connection closed during the handshake "
                                   "(is the peer an aeschat v1 program, and not in --legacy mode?)")
            if event is None:
                sock.settimeout(max(0.01, end - time.monotonic()))
                conn.receive_data(sock.recv(RECV_SIZE))
    except socket.timeout:
        raise NetworkError(f"no aeschat handshake within {deadline:.0f} s "
                           "(is the peer an aeschat v1 program? --legacy talks to the original scripts)") from None
    finally:
        sock.settimeout(None)


def read_passphrase(args):
    """--key-file, else AESCHAT_KEY, else a prompt that does not echo; never argv."""
    if args.key_file:
        try:
            with open(args.key_file, encoding="utf-8") as f:
                passphrase = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the key file {args.key_file}: {getattr(e, 'strerror', None) or e}") from None
        passphrase = passphrase[:-1] if passphrase.endswith("\n") else passphrase
        passphrase = passphrase[:-1] if passphrase.endswith("\r") else passphrase
    elif os.environ.get("AESCHAT_KEY") is not None:
        passphrase = os.environ["AESCHAT_KEY"]
    elif sys.stdin.isatty():
        passphrase = getpass.getpass("Passphrase: ")
    else:
        raise UsageError("no passphrase: give one with --key-file PATH or the AESCHAT_KEY environment variable")
    if not passphrase:
        raise UsageError("the passphrase is empty")
    return passphrase


def port_number(text, lowest=1):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (a number from {lowest} to 65535)")
    return port


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not argparse's usage block: what is wrong and where to look."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def argument_parser(prog, description):
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--legacy", action="store_true",
                        help="speak the original scripts' format: NOT SECURE, only for a peer still running them")
    parser.add_argument("--key-file", metavar="PATH",
                        help="read the passphrase from PATH (else $AESCHAT_KEY, else a prompt)")
    parser.add_argument("--reconnect-for", type=float, default=RECONNECT_FOR, metavar="SECONDS",
                        help=f"when a connection drops, how long the client tries to reconnect and the server "
                             f"keeps the conversation for it (default {RECONNECT_FOR:.0f})")
    parser.add_argument("--no-reconnect", dest="reconnect_for", action="store_const", const=0.0,
                        help="end the chat when the connection drops")
    parser.add_argument("--keepalive", type=float, default=KEEPALIVE, metavar="SECONDS", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def run(main):
    """Run a program's main, mapping every error to a one-line message and its exit code."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = EXIT_OK
    except AeschatError as e:
        print(f"error: {e}", file=sys.stderr)
        code = exit_code(e)
    except BrokenPipeError:
        code = EXIT_OK
    sys.stdout.flush() if not sys.stdout.closed else None
    sys.exit(code)


def address(sockaddr):
    """host:port, with brackets around an IPv6 host."""
    host, port = sockaddr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
