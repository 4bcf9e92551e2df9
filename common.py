"""What client.py and server.py share: the aeschat protocol, the session rules, and the thin shell around them.

The map, in layers, each using only those above it:

  1. Errors        one tree, split by whose fault it is; exit_code() maps it to exit codes, in one place
  2. Wire          16-byte chunking and `~` padding (the original scripts'), length-prefixed frames
  3. Crypto        key derivation (passphrase, codes, HKDF, resumption secret), AES-256-CTR from pyaes, legacy key
  4. Records       the events a connection carries, their payloads (strictly validated), the record layer
  5. Handshake     the v2 connection: greeting, SPAKE2 with the passphrase or a resumption secret, records
  6. Legacy        the original scripts' format (--legacy), behind the same interface
  7. Display       verify_and_display, what may reach a terminal, rows laid out so that no peer can forge one
  8. Session       Conversation (what survives reconnects); small machines with tables of states (Transfers,
                   Redial, Leaving) and Messages, coordinated by Session, which holds the rules of a chat: inputs
                   in, actions out; and Gate, the server's door (pending handshakes, guessing)
  9. Shell         sockets and threads only, mapped in its header: Link (a reader and a writer thread per
                   connection), Chat (steps the session under a lock, carries out its actions after), the client's
                   dialling (happy eyeballs, or a SOCKS5 proxy), the server's door
 10. UI            PlainUI for pipes, TerminalUI (prompt_toolkit, imported only on a terminal)
 11. Command line  arguments, passphrase intake, run()

Layers 1 to 8 do no I/O at all: bytes and events in, bytes, events and actions out; no socket, thread, lock
or print. tests/test_core.py and tests/test_session.py test them directly; PROTOCOL.md gives the wire
formats byte by byte.
"""

import argparse
import collections
import contextlib
import datetime
import enum
import errno
import hashlib
import hmac
import itertools
import json
import math
import os
import queue
import re
import socket
import stat
import struct
import sys
import threading
import time
import unicodedata

import pyaes
import spake2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2.ed25519_basic import NotOnCurve

__version__ = "2.0.0"

__all__ = [
    # What client.py and server.py use (a test keeps this list in step with them).
    "BUSY", "BUSY_REFUSAL", "CLIENT", "DEFAULT_PORT", "EXIT_INTERRUPTED", "EXIT_NETWORK", "EXIT_TERMINATED",
    "FIRST_RETRY", "LAST_RETRY", "LEGACY", "PASSPHRASE", "REFUSALS", "V2", "Chat", "Conversation", "Dialer", "Files",
    "Server", "Session", "Terminated", "address", "argument_parser", "ask", "check_file_options", "describe",
    "first_connection", "greeting", "legacy_warning", "make_ui", "passphrase_given", "port_number",
    "prompt_passphrase", "run", "run_chat", "CODE_WORDS", "code_bits", "new_code", "proxy_argument", "tell",
    "warn_if_weak", "split_host", "hold_signals",
    # The error tree.
    "AeschatError", "LocalProtocolError", "UsageError", "NetworkError", "Refused", "RemoteProtocolError",
    "TruncatedFrame", "OutputFailed", "NotAeschatPeer", "AuthenticationError", "UnfinishedAuthentication",
    "IntegrityError", "IllegalMove", "NotListening",
    # The events: what a connection carries, what a session takes in and asks for, what the door asks for.
    "Message", "Ack", "Resume", "Alert", "Ping", "Pong", "Goodbye", "Busy", "ConnectionClosed", "Offer", "Accept",
    "FileAck", "Done", "Refuse", "Cancel", "Chunk", "FolderOffer", "Exec", "FolderEntry", "HandshakeComplete",
    "HelloReceived", "ConfirmationReceived",
    "Input", "Typed", "Attached", "Got", "Drained", "Failed", "Tick", "Leave", "Interrupt", "DialFailed", "FileReady",
    "FileOpened", "FileSaved", "FileFailed", "FileNote",
    "Action", "Send", "Show", "Close", "Dial", "Live", "ChunkOf", "PrepareFile", "OpenFile", "WriteFile", "SaveFile",
    "DiscardFile", "ReleaseFile", "Progress", "End", "Write", "Drop", "Admit", "Log",
]

# ===================================================================================================
# 1. Errors: one tree, split by whose fault it is.


class AeschatError(Exception):
    """Base of every error this project raises on purpose."""


class LocalProtocolError(AeschatError):
    """We asked for something the protocol cannot do (a message too large, a closed connection)."""


class UsageError(AeschatError):
    """The user asked for something that cannot be done (a bad option, no passphrase)."""


class NetworkError(AeschatError):
    """The network failed us: cannot connect, the connection was lost."""


class NotListening(NetworkError):
    """Nothing listens at the address (yet): the connection was refused."""


class Refused(AeschatError):
    """The server turned us away: `busy` (a chat with someone else is on) or `unknown` (no such conversation)."""

    def __init__(self, reason, text):
        super().__init__(text)
        self.reason = reason


class RemoteProtocolError(AeschatError):
    """The peer sent something that is not valid aeschat: it is fatal for the connection."""


class TruncatedFrame(RemoteProtocolError):
    """The connection ended in the middle of a frame: a lost connection, not an attack."""


class OutputFailed(AeschatError):
    """Our own output cannot be written (a full disk, a closed pipe): the program stops rather than go on taking
    messages it cannot show."""


class NotAeschatPeer(RemoteProtocolError):
    """The peer speaks some other protocol (the legacy format, HTTP, TLS, another version)."""


class AuthenticationError(RemoteProtocolError):
    """Key confirmation failed: the passphrases differ, or someone interfered."""


class UnfinishedAuthentication(AuthenticationError):
    """The peer had our key confirmation, then went away without proving it knows the secret itself."""


class IntegrityError(RemoteProtocolError):
    """A record failed its check: tampered, replayed, reordered, dropped, truncated or reflected."""


EXIT_OK, EXIT_NETWORK, EXIT_USAGE, EXIT_SECURITY, EXIT_INTERNAL = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells count it (128 + SIGINT)
EXIT_TERMINATED, EXIT_HUNG_UP = 143, 129  # SIGTERM, SIGHUP (the terminal closed): 128 + the signal, as shells count


def exit_code(error):
    """The one place where errors become exit codes."""
    if isinstance(error, (NetworkError, Refused, OSError, TruncatedFrame, OutputFailed)):
        return EXIT_NETWORK
    if isinstance(error, RemoteProtocolError):
        return EXIT_SECURITY
    if isinstance(error, (UsageError, LocalProtocolError)):
        return EXIT_USAGE
    return EXIT_INTERNAL


_NETWORK_WORDS = {errno.ECONNRESET: "connection reset", errno.EPIPE: "connection broken",
                  errno.ECONNREFUSED: "connection refused", errno.ETIMEDOUT: "timed out",
                  errno.ECONNABORTED: "connection aborted", errno.EHOSTUNREACH: "no route to the host",
                  errno.ENETUNREACH: "the network is unreachable", errno.ENETDOWN: "the network is down"}


def describe(error):
    """One line for any error: ours say what happened, the network's in its own words; anything else is named as
    the bug it is."""
    if isinstance(error, AeschatError):
        return str(error)
    if isinstance(error, socket.timeout):
        return "timed out"
    if isinstance(error, OSError):
        known = error.errno is not None and error.errno in errno.errorcode
        text = _NETWORK_WORDS.get(error.errno) or (os.strerror(error.errno) if known else str(error)) or type(
            error).__name__
        return text[:1].lower() + text[1:]
    return f"internal error ({type(error).__name__}: {error}); please report it"


# ===================================================================================================
# 2. Wire: blocks and padding, as the original scripts had them, and frames.

BLOCK = 16
PAD = b"~"


def process_bytes(data):
    """Split bytes into 16-byte chunks (the last one shorter if the length is not a multiple)."""
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def pad(data):
    """Right-pad bytes with `~` to whole 16-byte blocks."""
    return data + PAD * (-len(data) % BLOCK)


def process_text(text):
    """Encode text as UTF-8 and right-pad it with `~` to whole 16-byte blocks; returns the blocks."""
    return process_bytes(pad(text.encode("utf-8")))


def strip_padding(data):
    """Undo process_text for a JSON object: only the `~` after the closing brace is padding."""
    body = data.rstrip(PAD)
    if len(data) % BLOCK or len(data) - len(body) >= BLOCK or not body.endswith(b"}"):
        raise RemoteProtocolError("payload is not a padded JSON object")
    return body


LENGTH = struct.Struct("!I")

# The largest frame we accept. A message is at most 64 KiB of UTF-8; JSON writes a control character as
# six (\u0001), so the worst message is 384 KiB of JSON, plus its fields, padding and tag: 512 KiB holds
# every message that may be sent, and anything larger is refused before a byte of it is buffered, so a
# peer can make us hold at most this much per connection.
MAX_FRAME = 512 * 1024


class FrameDecoder:
    """Incremental frame decoder: feed(data) any segmentation, then next_frame() until None."""

    def __init__(self, max_size=MAX_FRAME):
        self.max_size = max_size
        self._buffer = bytearray()
        self._start = 0  # where the next frame begins: what is before it is dropped in one go, not frame by frame
        self._eof = False

    def feed(self, data):
        """Add received bytes; b"" means the peer closed the connection."""
        if not data:
            self._eof = True
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next_frame(self):
        """The next whole frame's body, or None when more data is needed (or the stream ended cleanly)."""
        start, buffer = self._start, self._buffer
        if len(buffer) - start >= LENGTH.size:
            (size,) = LENGTH.unpack_from(buffer, start)
            if size > self.max_size:
                raise RemoteProtocolError(f"frame of {size} bytes is over the limit of {self.max_size}")
            end = start + LENGTH.size + size
            if len(buffer) >= end:
                with memoryview(buffer) as view:
                    body = bytes(view[start + LENGTH.size : end])
                self._start = end
                return body
        if self._eof and len(buffer) > start:
            raise TruncatedFrame("the connection was cut in the middle of a record")
        return None

    @property
    def closed(self):
        """True once the peer closed the connection and every whole frame has been taken."""
        return self._eof and len(self._buffer) == self._start


def frame(body):
    return LENGTH.pack(len(body)) + body


# ===================================================================================================
# 3. Crypto: keys and the cipher.


def normalize_passphrase(passphrase):
    """The passphrase as SPAKE2 takes it: a code as its canonical form; NFC-normalised UTF-8, so that it matches
    across systems."""
    if not passphrase or not passphrase.strip():
        raise LocalProtocolError("the passphrase is empty")
    return unicodedata.normalize("NFC", as_code(passphrase) or passphrase).encode("utf-8")


# A code is words of BIP-39's English list (2048 words chosen to be read aloud and told apart by their first four
# letters; from the mnemonic package), joined by hyphens. Typed with spaces or hyphens, in any case, it is the same.
CODE_WORDS = 4  # the words of a new code: 44 bits
_WORDS_SHAPE = re.compile(r"[A-Za-z]+(?:[ \t-]+[A-Za-z]+)+\Z")
_WORD_LIST = []


def code_words():
    """The word list, loaded the first time a code is made or a passphrase looks like one."""
    if not _WORD_LIST:
        from mnemonic import Mnemonic

        _WORD_LIST.extend(Mnemonic("english").wordlist)
    return _WORD_LIST


def as_code(text):
    """The canonical form (lower case, hyphens) of text that is two or more words of the list; else None. Separators
    before and after the words do not count (Tab leaves one after the last)."""
    text = re.sub(r"^[\s-]+|[\s-]+$", "", text)  # white space of any kind (a pasted line's newline) and hyphens
    if not _WORDS_SHAPE.match(text):
        return None
    words = re.split(r"[ \t-]+", text.lower())
    known = set(code_words())
    return "-".join(words) if all(word in known for word in words) else None


def code_candidates(text):
    """The words that may end text, if text can be the beginning of a code (for Tab); else none."""
    parts = re.split(r"[ \t-]+", text.lower())
    if not re.fullmatch(r"[A-Za-z \t-]*", text) or not set(parts[:-1]) <= set(code_words()):
        return []
    return [word for word in code_words() if word.startswith(parts[-1])]


def new_code(words=CODE_WORDS, choose=None):
    """A fresh code, each word drawn from the list by the operating system's randomness (secrets)."""
    import secrets

    choose = choose or secrets.choice
    return "-".join(choose(code_words()) for _ in range(words))


def code_bits(code):
    """A code's strength: its words times log2 of the list's size (11 bits a word)."""
    return len(code.split("-")) * math.log2(len(code_words()))


def hkdf_sha256(ikm, info, length=32, salt=None):
    """HKDF-SHA256 (RFC 5869); aeschat uses an empty salt, as SPAKE2's output is already uniformly random."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


class CounterCipher:
    """AES-256-CTR (NIST SP 800-38A, 6.5) from pyaes's block cipher, the key expanded once: the costly part.

    The counter block is a 128-bit big-endian integer that adds one per block. Records start theirs at
    sequence_number << 64, so no keystream block is ever used twice under one key.
    """

    def __init__(self, key):
        self._encrypt = pyaes.AES(key).encrypt

    def _apply_with_integers(self, counter, data):
        """Encrypt or decrypt (the same in CTR) data with the keystream that starts at counter: on CPython, the
        keystream joined and XORed with the data as two big integers, in C."""
        encrypt = self._encrypt
        blocks = (len(data) + BLOCK - 1) // BLOCK
        stream = b"".join(bytes(encrypt((counter + i).to_bytes(BLOCK, "big"))) for i in range(blocks))
        xored = int.from_bytes(data, "big") ^ int.from_bytes(stream[: len(data)], "big")
        return xored.to_bytes(len(data), "big")

    def _apply_in_place(self, counter, data):
        """The same on PyPy, whose JIT compiles plain loops: each keystream block XORed into a copy of the data in
        place, unrolled (half again as fast there as big integers, which CPython does in C)."""
        encrypt, out, whole = self._encrypt, bytearray(data), len(data) // BLOCK
        for i in range(whole):
            k, b = encrypt((counter + i).to_bytes(BLOCK, "big")), BLOCK * i
            out[b] ^= k[0]; out[b + 1] ^= k[1]; out[b + 2] ^= k[2]; out[b + 3] ^= k[3]  # noqa: E702
            out[b + 4] ^= k[4]; out[b + 5] ^= k[5]; out[b + 6] ^= k[6]; out[b + 7] ^= k[7]  # noqa: E702
            out[b + 8] ^= k[8]; out[b + 9] ^= k[9]; out[b + 10] ^= k[10]; out[b + 11] ^= k[11]  # noqa: E702
            out[b + 12] ^= k[12]; out[b + 13] ^= k[13]; out[b + 14] ^= k[14]; out[b + 15] ^= k[15]  # noqa: E702
        if len(data) % BLOCK:
            k, b = encrypt((counter + whole).to_bytes(BLOCK, "big")), BLOCK * whole
            for j in range(len(data) - b):
                out[b + j] ^= k[j]
        return bytes(out)

    apply = _apply_in_place if sys.implementation.name == "pypy" else _apply_with_integers


def legacy_key(passphrase):
    """The original scripts' key: SHA-256 of the passphrase, used directly for AES-256."""
    return hashlib.sha256(passphrase.encode("utf-8")).digest()


def text_hash(text):
    """The seed's integrity hash: SHA-256 hex of the text (a lone surrogate hashes, it never raises)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ===================================================================================================
# 4. Records: the events a connection carries, their payloads, and the record layer.

MAX_MESSAGE = 64 * 1024  # bytes of UTF-8 text in one message
MAX_ID = 2**63 - 1  # message and file numbers, offsets and sizes: far beyond any chat, and a fixed width


class _Event:
    """A small immutable value: fields named in __slots__, equal when the fields are."""

    __slots__ = ()

    def __init__(self, *values):
        for name, value in zip(self.__slots__, values):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(self) is type(other) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self):
        return hash((type(self), *(getattr(self, n) for n in self.__slots__)))

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(repr(getattr(self, n)) for n in self.__slots__)})"


class Message(_Event):
    """A chat message: id numbers messages per direction from 0; timestamp is ISO 8601 with its UTC offset (v2)
    or HH:MM:SS (legacy); hash is SHA-256 hex of the text, the seed's integrity tag."""

    __slots__ = ("id", "text", "timestamp", "hash")

    def __init__(self, id, text, timestamp, hash=None):
        super().__init__(id, text, timestamp, text_hash(text) if hash is None else hash)

    @property
    def verified(self):
        return hmac.compare_digest(self.hash.encode("ascii", "replace"), text_hash(self.text).encode("ascii"))


class Ack(_Event):
    """The peer received and showed every message up to and including `id` (acknowledgements are cumulative)."""

    __slots__ = ("id",)


class Resume(_Event):
    """The first record each way on every connection: which conversation, and where each direction stands."""

    __slots__ = ("conv", "next", "base", "resumed")

    def __init__(self, conv, next, base, resumed=False):
        super().__init__(conv, next, base, resumed)


class Alert(_Event):
    """The peer found one of our records bad (`integrity`: it failed its check; `protocol`: it broke a rule)
    and is closing: the chat is over for both sides."""

    __slots__ = ("reason",)


class Ping(_Event):
    """A keepalive, sent when the peer has been silent for a while: the peer answers at once with a Pong, so each
    side notices a silent peer by its own clock, whatever the other's keepalive."""


class Pong(_Event):
    """The answer to a Ping."""


class Goodbye(_Event):
    """The peer is leaving on purpose."""


class Busy(_Event):
    """The server is in a chat with another client: this one is turned away."""


class ConnectionClosed(_Event):
    """The peer closed the connection (after a Goodbye, a normal end; without one, a loss)."""


# Files. A file is numbered per direction, like messages; the sender's number names it both ways.


class Offer(_Event):
    """(sender) A file: its name (the sender's base name), size in bytes and SHA-256 (hex)."""

    __slots__ = ("file", "name", "size", "sha256")


class Accept(_Event):
    """(receiver) Send file `file` from byte `offset` on: 0 at first, what it already has after a reconnection."""

    __slots__ = ("file", "offset")


class FileAck(_Event):
    """(receiver) Every byte of `file` below `offset` is written (cumulative)."""

    __slots__ = ("file", "offset")


class Done(_Event):
    """(receiver) The file arrived whole: its SHA-256 matched and it is saved."""

    __slots__ = ("file",)


class Refuse(_Event):
    """(receiver) The file will not be (or was not) saved; reason is one of REFUSALS_OF_FILES."""

    __slots__ = ("file", "reason")


class Cancel(_Event):
    """(sender) The sender stops sending the file; reason is one of CANCELS_OF_FILES."""

    __slots__ = ("file", "reason")


class Chunk(_Event):
    """(sender) Bytes of a file from offset on: a binary record, not JSON (the cipher is the cost)."""

    __slots__ = ("file", "offset", "data")


class FolderOffer(_Event):
    """(sender) A folder, sent as one stream of entries (FolderParser) and otherwise as a file is: its name, how many
    files it holds and their bytes, the stream's size, and the SHA-256 of its entries' headers (each file's own
    SHA-256 is in its header)."""

    __slots__ = ("file", "name", "files", "bytes", "size", "sha256")


class Exec(_Event):
    """(sender) The file just offered is executable: bits are its execute bits (some of 0o111)."""

    __slots__ = ("file", "bits")


REFUSALS_OF_FILES = {"declined": "declined it", "too large": "refused it as too large",
                     "no space": "has no room for it", "unwritable": "could not write it",
                     "failed verification": "found it damaged (its SHA-256 did not match) and discarded it",
                     "cancelled": "cancelled it"}
CANCELS_OF_FILES = {"left": "left", "cancelled": "cancelled it", "unreadable": "could not read it any more"}


class HandshakeComplete(_Event):
    """Both sides proved they hold the same secret; records may flow."""


ALERTS = {"integrity": "a record it received failed its integrity check (tampering on the way)",
          "protocol": "a record it received broke the protocol"}

_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?[+-]\d\d:\d\d\Z")


def now_iso(clock=None):
    moment = clock() if clock else datetime.datetime.now().astimezone()
    return moment.isoformat(timespec="seconds")


class Unsendable(str):
    """A line read that cannot be a message, in its place: it says why (a line over the limit is never read whole)."""


def check_message_text(text):
    """Refuse what cannot be sent, before anything is encrypted."""
    if isinstance(text, Unsendable):
        raise LocalProtocolError(str(text))
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalProtocolError("the message is not valid Unicode text") from None
    if size > MAX_MESSAGE:
        raise LocalProtocolError(f"the message is {size} bytes; the limit is {MAX_MESSAGE} bytes of UTF-8")


# Each field's check: a record that passed its MAC is authentic, not sane. A peer who knows the passphrase
# may send anything that JSON can say; nothing reaches the session unless it has the type, range and
# form the protocol gives it.


def _number(value):
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ValueError("not a whole number from 0 to 2^63 - 1")
    return value


def _flag(value):
    if type(value) is not bool:
        raise ValueError("not true or false")
    return value


def _matching(pattern):
    def check(value):
        if type(value) is not str or not pattern.match(value):
            raise ValueError("not of its form")
        return value

    return check


def _timestamp(value):
    if type(value) is not str or not _TIMESTAMP.match(value):
        raise ValueError("not an ISO 8601 time with its UTC offset")
    try:
        datetime.datetime.fromisoformat(value).astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        raise ValueError("not a time that exists") from None
    return value


def _text(value):
    if type(value) is not str:
        raise ValueError("not text")
    try:
        check_message_text(value)
    except LocalProtocolError as e:
        raise ValueError(str(e)) from None
    return value


def _one_of(names):
    def check(value):
        if type(value) is not str or value not in names:
            raise ValueError("not a known reason")
        return value

    return check


def _exec_bits(value):
    if type(value) is not int or not 0 < value <= 0o111 or value & ~0o111:
        raise ValueError("not execute bits")
    return value


def _file_name(value):
    if type(value) is not str or not value:
        raise ValueError("not a file name")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode") from None
    if size > 255:
        raise ValueError("longer than 255 bytes")
    return value


# type on the wire -> (event class, its fields in order with their checks)
PAYLOADS = {
    "msg": (Message, (("id", _number), ("timestamp", _timestamp), ("message", _text), ("hash", _matching(_HEX64)))),
    "ack": (Ack, (("id", _number),)),
    "resume": (Resume, (("conv", _matching(_HEX32)), ("next", _number), ("base", _number), ("resumed", _flag))),
    "alert": (Alert, (("reason", _one_of(ALERTS)),)),
    "offer": (Offer, (("file", _number), ("name", _file_name), ("size", _number), ("sha256", _matching(_HEX64)))),
    "accept": (Accept, (("file", _number), ("offset", _number))),
    "fack": (FileAck, (("file", _number), ("offset", _number))),
    "done": (Done, (("file", _number),)),
    "refuse": (Refuse, (("file", _number), ("reason", _one_of(REFUSALS_OF_FILES)))),
    "cancel": (Cancel, (("file", _number), ("reason", _one_of(CANCELS_OF_FILES)))),
    "folder": (FolderOffer, (("file", _number), ("name", _file_name), ("files", _number), ("bytes", _number),
                             ("size", _number), ("sha256", _matching(_HEX64)))),
    "exec": (Exec, (("file", _number), ("bits", _exec_bits))),
    "ping": (Ping, ()),
    "pong": (Pong, ()),
    "bye": (Goodbye, ()),
    "busy": (Busy, ()),
}
_WIRE_NAMES = {cls: (name, fields) for name, (cls, fields) in PAYLOADS.items()}
_ATTRIBUTES = {"message": "text"}  # a wire field whose attribute has another name


CHUNK = b"\x01"  # the first byte of a chunk's plaintext (a JSON payload begins with "{")
CHUNK_HEADER = struct.Struct("!QQ")  # file, offset
MAX_CHUNK = 64 * 1024


def encode_payload(event):
    """The plaintext of a record: the seed's JSON object (with its type), `~`-padded to 16-byte blocks; a chunk
    of a file is binary: CHUNK, the file's number and the offset (8 bytes each), then the bytes."""
    if type(event) is Chunk:
        return CHUNK + CHUNK_HEADER.pack(event.file, event.offset) + event.data
    try:
        name, fields = _WIRE_NAMES[type(event)]
    except KeyError:
        raise LocalProtocolError(f"cannot send {event!r}") from None
    obj = {"type": name}
    for field, check in fields:  # what we send passes the checks the peer makes: it is never refused
        try:
            obj[field] = check(getattr(event, _ATTRIBUTES.get(field, field)))
        except ValueError as e:
            raise LocalProtocolError(f"cannot send {name}: its {field} is {e}") from None
    return pad(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def decode_payload(data):
    """The event a record's plaintext carries; anything malformed, of another type or out of range is refused, and
    so is JSON written other than as aeschat writes it (white space, escapes): a record costs its receiver the
    decryption of every byte, so none may be bigger than what it says needs."""
    if data[:1] == CHUNK:
        if len(data) <= 1 + CHUNK_HEADER.size or len(data) > 1 + CHUNK_HEADER.size + MAX_CHUNK:
            raise RemoteProtocolError("a file chunk of the wrong size")
        file, offset = CHUNK_HEADER.unpack_from(data, 1)
        if file > MAX_ID or offset > MAX_ID:
            raise RemoteProtocolError("a file chunk's number or offset is out of range")
        return Chunk(file, offset, data[1 + CHUNK_HEADER.size :])
    try:
        text = strip_padding(data).decode("utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RemoteProtocolError("payload is not valid JSON") from None
    if type(obj) is not dict:
        raise RemoteProtocolError("payload is not a JSON object")
    if json.dumps(obj, ensure_ascii=False, separators=(",", ":")) != text:
        raise RemoteProtocolError("payload is not written as aeschat writes JSON")
    kind = obj.get("type")
    if type(kind) is not str or kind not in PAYLOADS:
        raise RemoteProtocolError(f"unknown payload type {str(kind)[:40]!r}")
    cls, fields = PAYLOADS[kind]
    if obj.keys() != {"type", *(field for field, _ in fields)}:
        raise RemoteProtocolError(f"payload {kind!r} has missing or extra fields")
    values = []
    for field, check in fields:
        try:
            values.append(check(obj[field]))
        except ValueError as e:
            raise RemoteProtocolError(f"payload field {field!r} of {kind!r} is {e}") from None
    if cls is Message:
        values = [values[0], values[2], values[1], values[3]]  # the wire's order to Message's
    return cls(*values)


# A folder goes as one stream of bytes, offered (FolderOffer), accepted, sent in chunks and acknowledged as a file's
# bytes are. The stream is its entries in turn: a header, then (for a file) the file's bytes. A header:
ENTRY = struct.Struct("!cHQ32sH")  # kind (b"f" a file, b"d" a folder), permission bits, size, SHA-256, path length
MAX_PATH = 4096  # bytes of an entry's path, as on Linux
MAX_DEPTH = 64  # folders within folders


class FolderEntry(_Event):
    """One entry of a folder's stream: kind b"f" or b"d", permission bits, size, SHA-256 (raw), path parts."""

    __slots__ = ("kind", "mode", "size", "sha256", "parts")


def folder_header(kind, mode, size, sha256, path):
    """The header of one entry; path is relative, its parts joined by "/"."""
    raw = path.encode("utf-8")
    return ENTRY.pack(kind, mode & 0o777, size, sha256, len(raw)) + raw


def folder_path(raw):
    """An entry's path as its parts; anything that is not a relative path of plain names is the peer's doing."""
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("a folder entry's path is not UTF-8") from None
    parts = path.split("/")
    if not 0 < len(raw) <= MAX_PATH or len(parts) > MAX_DEPTH or any(p in ("", ".", "..") or "\x00" in p
                                                                        for p in parts):
        raise RemoteProtocolError("a folder entry's path is not a relative path of names")
    return tuple(parts)


class FolderParser:
    """A folder's stream as it arrives, in any segmentation. feed(data) returns what it made of it, in order:
    FolderEntry, then a file's bytes (bytes), then None once an entry is whole. Anything malformed raises
    RemoteProtocolError, before a byte of it is used: another kind, a size past the stream's end, a bad path.
    manifest is the SHA-256 of every header so far: the offer's sha256, once the stream is whole."""

    def __init__(self, size):
        self.left = size  # bytes of the stream still to come
        self._buffer = bytearray()
        self._file_left = 0  # bytes of the current file still to come
        self.manifest = hashlib.sha256()

    def feed(self, data):
        if len(data) > self.left:
            raise RemoteProtocolError("a folder's stream went past its size")
        out, view = [], memoryview(data)
        while view:
            if self._file_left:
                piece, view = view[: self._file_left], view[self._file_left :]
                self._file_left -= len(piece)
                self.left -= len(piece)
                out.append(bytes(piece))
                if not self._file_left:
                    out.append(None)
                continue
            # A header: its fixed part, then its path (of at most 64 KiB: the length is two bytes).
            whole = ENTRY.size + (ENTRY.unpack_from(self._buffer)[4] if len(self._buffer) >= ENTRY.size else 0)
            piece, view = view[: whole - len(self._buffer)], view[whole - len(self._buffer) :]
            self._buffer += piece
            self.left -= len(piece)
            if len(self._buffer) >= ENTRY.size and len(self._buffer) == ENTRY.size + ENTRY.unpack_from(self._buffer)[4]:
                out += self._entry()
        if not self.left and (self._buffer or self._file_left):
            raise RemoteProtocolError("a folder's stream ended in the middle of an entry")
        return out

    def _entry(self):
        kind, mode, size, sha256, _ = ENTRY.unpack_from(self._buffer)
        header, self._buffer = bytes(self._buffer), bytearray()
        if kind not in (b"f", b"d") or (kind == b"d" and size) or size > self.left:
            raise RemoteProtocolError("a folder entry of another kind, or larger than the stream")
        self.manifest.update(header)
        self._file_left = size
        entry = FolderEntry(kind, mode & 0o777, size, sha256, folder_path(header[ENTRY.size :]))
        return [entry] if size else [entry, None]


TAG_SIZE = 32
SEQ = struct.Struct("!Q")
MAX_SEQ = 2**64 - 1  # the last usable number: the record layer refuses to wrap


class RecordLayer:
    """One direction's keys and sequence number. The sequence number is implicit: never on the wire.

    Encrypt-then-MAC: AES-256-CTR with the counter starting at seq << 64, then HMAC-SHA256 over
    (seq, ciphertext). The tag is checked, in constant time, before anything is decrypted."""

    def __init__(self, enc_key, mac_key, seq=0):
        self._cipher = CounterCipher(enc_key)
        self._mac_key = mac_key
        self.seq = seq

    def _tag(self, ciphertext):
        return hmac.digest(self._mac_key, SEQ.pack(self.seq) + ciphertext, "sha256")

    def _advance(self):
        if self.seq >= MAX_SEQ:
            raise LocalProtocolError("sequence numbers exhausted: reconnect to get fresh keys")
        self.seq += 1

    def seal(self, plaintext):
        if len(plaintext) + TAG_SIZE > MAX_FRAME:  # the peer would refuse it: never send it
            raise LocalProtocolError(f"a record of {len(plaintext) + TAG_SIZE} bytes is over the limit of {MAX_FRAME}")
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
        if not hmac.compare_digest(tag, self._tag(ciphertext)):
            raise IntegrityError(
                "a record failed its integrity check: it was altered, replayed, reordered, dropped or reflected")
        plaintext = self._cipher.apply(self.seq << 64, ciphertext)
        self._advance()
        return plaintext


# ===================================================================================================
# 5. The v2 connection: a greeting, a SPAKE2 handshake, then records. Sans-I/O in the manner of h11:
# receive_data(bytes), next_event() -> event or None, data_to_send() -> bytes, seal(event) -> bytes.

MAGIC = b"aeschat\x00"  # eight bytes that no legacy, HTTP or TLS peer starts with
VERSION = 2
PREFIX = MAGIC + bytes([VERSION])
# The byte after the prefix says what a handshake frame is.
GREETING = b"g"  # server, first thing: then OPEN or BUSY (advice, so a client learns "busy" before a prompt)
PASSPHRASE = b"p"  # a hello whose SPAKE2 password is the passphrase
RESUME = b"r"  # a hello whose password is a conversation's resumption secret; the client's names it by its id
REFUSAL = b"!"  # server, instead of its hello (BUSY_REFUSAL, LATER, UNKNOWN) or its confirmation (DENIED)
OPEN, BUSY = b"o", b"b"  # a greeting's status
DENIED, BUSY_REFUSAL, UNKNOWN, LATER = b"denied", b"busy", b"unknown", b"later"
SPAKE2_MESSAGE_SIZE = 33  # a side byte, then an Ed25519 point
RESUME_ID_SIZE = 16
HANDSHAKE_MAX_FRAME = 64  # the largest handshake frame is the client's resumption hello, 59 bytes
ID_A, ID_B = b"aeschat-v2-client", b"aeschat-v2-server"
LABEL = b"aeschat v2 "  # HKDF info prefix, followed by what the key is for

SHED = "shed"  # not a refusal on the wire: the server greeted us, then closed before its hello (it made room)
WAITED_OUT = ("busy", "later", SHED)  # what a client waits out, trying again

REFUSALS = {
    DENIED: "the server says the passphrases differ (or someone interfered with the connection)",
    BUSY_REFUSAL: "the server is busy with another chat",
    UNKNOWN: "the server no longer knows this conversation (it restarted, stopped waiting for us, or another client "
             "took it over)",
    LATER: "the server cannot take a passphrase now (too many were tried lately, or too many connections came at "
           "once: someone may be guessing or flooding); try again in a while",
}


class HelloReceived(_Event):
    """(server) A client's hello arrived: the caller answers it (with the secret its kind asks for) or refuses it."""

    __slots__ = ("kind", "resume_id")


class ConfirmationReceived(_Event):
    """(server) The client's key confirmation arrived: the caller checks it when its turn comes."""


class State:
    GREETING = "waiting for the server's greeting"
    HELLO = "waiting for the peer's hello"
    ANSWER = "waiting to answer the client's hello"
    CONFIRM = "waiting for the peer's key confirmation"
    CHECK = "waiting to check the client's key confirmation"
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


_CONSUMED = object()  # a handshake frame was handled and there is nothing to report


def parse_handshake_frame(body):
    """(kind byte, the rest) of a handshake frame; anything that is not aeschat v2 is refused, lengths first."""
    if not body.startswith(MAGIC):
        raise NotAeschatPeer("the peer is not an aeschat peer")
    if len(body) < len(PREFIX) + 1:
        raise NotAeschatPeer("the peer's handshake is too short to be aeschat")
    version = body[len(MAGIC)]
    if version != VERSION:
        raise NotAeschatPeer(f"the peer speaks aeschat version {version}; this is version {VERSION} "
                             "(both sides need the same version)")
    return body[len(PREFIX) : len(PREFIX) + 1], body[len(PREFIX) + 1 :]


class Connection:
    """What both sides share: the frame decoder, the keys once SPAKE2 has run, and the records after."""

    def __init__(self, entropy):
        self._entropy = entropy
        self._frames = FrameDecoder(max_size=HANDSHAKE_MAX_FRAME)
        self._outgoing = bytearray()
        self._send = self._receive = None
        self.resumption = None  # (id, secret) after a passphrase handshake: what later reconnections use
        self.state = None

    def data_to_send(self):
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data):
        """Feed bytes from the peer; b"" means it closed the connection."""
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection already failed")
        self._frames.feed(data)

    def next_event(self):
        """The next event, or None when more data is needed."""
        if self.state is State.ERROR:
            raise LocalProtocolError("the connection already failed")
        try:
            event = self._step()
            while event is _CONSUMED:
                event = self._step()
            return event
        except AeschatError:
            self.state = State.ERROR
            raise

    def seal(self, event):
        """The frame that carries event: the writer's side, usable even after the reading side failed."""
        if self._send is None or self.state not in (State.OPEN, State.ERROR, State.CLOSED):
            raise LocalProtocolError("cannot send before the handshake is complete")
        return frame(self._send.seal(encode_payload(event)))

    def send(self, event):
        """Queue a record carrying event for data_to_send()."""
        self._outgoing += self.seal(event)

    # -- inside

    def _derive(self, kind, spake, peer_message, transcript):
        """Finish SPAKE2, derive the keys, and return (our confirmation, the one we expect)."""
        try:
            key = spake.finish(peer_message)
        except (spake2.SPAKEError, NotOnCurve, ValueError):
            # spake2 raises its own errors, ValueError or NotOnCurve (not a SPAKEError) on a bad element.
            raise RemoteProtocolError("the peer's SPAKE2 message is not a valid group element") from None
        keys = {label: hkdf_sha256(key, LABEL + label) for label in
                (b"A->B enc", b"A->B mac", b"B->A enc", b"B->A mac", b"confirm A", b"confirm B")}
        out, back = (b"A->B", b"B->A") if self.side == b"A" else (b"B->A", b"A->B")
        self._send = RecordLayer(keys[out + b" enc"], keys[out + b" mac"])
        self._receive = RecordLayer(keys[back + b" enc"], keys[back + b" mac"])
        if kind == PASSPHRASE:  # the conversation's resumption secret: its reconnections prove it, not the passphrase
            secret = hkdf_sha256(key, LABEL + b"resume secret")
            self.resumption = (hkdf_sha256(secret, LABEL + b"resume id", RESUME_ID_SIZE), secret)
        mine = hmac.new(keys[b"confirm " + self.side], transcript, hashlib.sha256).digest()
        theirs = hmac.new(keys[b"confirm " + self.peer_side], transcript, hashlib.sha256).digest()
        return mine, theirs

    def _next_frame(self):
        try:
            return self._frames.next_frame()
        except TruncatedFrame:
            raise
        except RemoteProtocolError:
            if self._send is None:  # an oversized frame before keys: not an aeschat peer at all
                raise NotAeschatPeer("the peer is not an aeschat peer") from None
            raise

    def _open_record(self, body):
        return decode_payload(self._receive.open(body))


def _password(kind, secret):
    return normalize_passphrase(secret) if kind == PASSPHRASE else secret


class ClientConnection(Connection):
    """The connecting side: SPAKE2 side A. It sends its hello at once and confirms first.

    secret is the passphrase (kind PASSPHRASE) or the conversation's resumption secret (kind RESUME, with its id).
    """

    side, peer_side = b"A", b"B"

    def __init__(self, secret, kind=PASSPHRASE, resume_id=b"", entropy=os.urandom):
        super().__init__(entropy)
        self.kind = kind
        self._spake = spake2.SPAKE2_A(_password(kind, secret), idA=ID_A, idB=ID_B, entropy_f=entropy)
        self._hello = PREFIX + kind + (resume_id if kind == RESUME else b"") + self._spake.start()
        self._outgoing += frame(self._hello)
        self._expected = None
        self.greeting = None  # OPEN or BUSY once the server's greeting arrived
        self.state = State.GREETING

    @property
    def confirmation_sent(self):
        """True once our key confirmation went out: from then on, a peer that goes away has had a guess."""
        return self.state is State.CONFIRM

    def _step(self):
        if self.state is not State.CONFIRM:
            return self._handshake_step()
        # After our key confirmation, anything but the server's proving its own (or saying `denied`) means a peer
        # that had a guess at the secret and went away without proving it: an unfinished authentication.
        try:
            return self._handshake_step()
        except (AuthenticationError, LocalProtocolError):
            raise
        except RemoteProtocolError as e:
            raise UnfinishedAuthentication(f"after our key confirmation the server sent what an aeschat server "
                                           f"never sends ({e}): someone may be interfering") from None

    def _handshake_step(self):
        try:
            body = self._next_frame()
        except TruncatedFrame:
            if self.confirmation_sent:
                raise UnfinishedAuthentication("the server cut the connection after our key confirmation, without "
                                               "proving it knows the secret: someone may be interfering") from None
            raise
        if body is None:
            return self._at_end()
        if self.state is State.OPEN:
            return self._open_record(body)
        if self.state is State.CONFIRM and not body.startswith(PREFIX + REFUSAL):
            if not hmac.compare_digest(body, self._expected):
                raise AuthenticationError("the server's key confirmation is wrong: the passphrases differ, "
                                          "or someone interfered with the connection")
            self._frames.max_size = MAX_FRAME  # records may come now; until the server proved the secret, 64 bytes
            self.state = State.OPEN
            return HandshakeComplete()
        kind, rest = parse_handshake_frame(body)
        if kind == REFUSAL:
            raise self._refusal(rest)
        if self.state is State.GREETING:
            if kind != GREETING or rest not in (OPEN, BUSY):
                raise NotAeschatPeer("the server did not greet as an aeschat v2 server does")
            self.greeting = rest
            self.state = State.HELLO
            return _CONSUMED
        if kind != self.kind or len(rest) != SPAKE2_MESSAGE_SIZE:
            raise NotAeschatPeer("the server's hello is not of the kind and size we asked for")
        if rest[:1] != self.peer_side:
            raise AuthenticationError("the server's hello is from the wrong side (a reflected hello?)")
        mine, self._expected = self._derive(kind, self._spake, rest, self._hello + body)
        self._outgoing += frame(mine)
        self.state = State.CONFIRM
        return _CONSUMED

    def _at_end(self):
        if not self._frames.closed:
            return None
        if self.state is State.OPEN:
            self.state = State.CLOSED
            return ConnectionClosed()
        if self.state is State.CONFIRM:
            raise UnfinishedAuthentication("the server closed the connection after our key confirmation, without "
                                           "proving it knows the secret: someone may be interfering")
        if self.state is State.CLOSED:
            return None
        if self.state is State.GREETING:  # a proxy that took the connection, and found no server behind it
            raise NetworkError("the connection closed before the server greeted us: is an aeschat v2 server "
                               "listening there? (--legacy talks to the original scripts)")
        # An aeschat server greeted us, then closed before answering our hello: it shed us to make room.
        raise Refused(SHED, "the server closed the connection before answering (too many connections at once: "
                            "someone may be flooding it)")

    def _refusal(self, reason):
        """A refusal means what it says only where a server sends it: busy or later for a passphrase hello, unknown
        for a resumption hello, denied for a confirmation. Anywhere else it is someone else's doing."""
        expected = {State.CONFIRM: (DENIED,)}.get(self.state, (BUSY_REFUSAL, LATER) if self.kind == PASSPHRASE
                                                  else (UNKNOWN,))
        if reason not in expected:
            shown = reason.decode("ascii", "replace")[:20]
            if self.state is State.CONFIRM:
                return UnfinishedAuthentication(f"the server refused ({shown}) after our key confirmation, which an "
                                                "aeschat server never does: someone may be interfering")
            return RemoteProtocolError(f"the server refused ({shown}) where an aeschat server never does")
        if reason == DENIED:
            return AuthenticationError(REFUSALS[DENIED] if self.kind == PASSPHRASE else
                                       "the server refused our resumption secret: someone may be interfering")
        return Refused(reason.decode(), REFUSALS[reason])


class ServerConnection(Connection):
    """The listening side: SPAKE2 side B. It greets at once, computes nothing until the client's hello arrives,
    and lets its caller decide when to answer (answer() or refuse()) and when to check the client's confirmation
    (check()): the Gate keeps those rules."""

    side, peer_side = b"B", b"A"

    def __init__(self, status=OPEN, entropy=os.urandom):
        super().__init__(entropy)
        self._outgoing += frame(PREFIX + GREETING + status)
        self.kind = self.resume_id = self._spake = None
        self.state = State.HELLO

    def _step(self):
        body = self._next_frame()
        if body is None:
            if self._frames.closed and self.state is not State.CLOSED:
                self.state = State.CLOSED
                return ConnectionClosed()
            return None
        if self.state is State.OPEN:
            return self._open_record(body)
        if self.state is State.HELLO:
            kind, rest = parse_handshake_frame(body)
            size = SPAKE2_MESSAGE_SIZE + (RESUME_ID_SIZE if kind == RESUME else 0)
            if kind not in (PASSPHRASE, RESUME) or len(rest) != size:
                raise NotAeschatPeer("the client's hello is not a hello of aeschat v2")
            if rest[-SPAKE2_MESSAGE_SIZE:][:1] != self.peer_side:
                raise AuthenticationError("the client's hello is from the wrong side (a reflected hello?)")
            self.kind, self.resume_id = kind, rest[:-SPAKE2_MESSAGE_SIZE]
            self._hello, self._peer_message = body, rest[-SPAKE2_MESSAGE_SIZE:]
            self.state = State.ANSWER
            return HelloReceived(kind, self.resume_id)
        if self.state is State.CONFIRM:
            self._confirmation = body
            self.state = State.CHECK
            return ConfirmationReceived()
        raise RemoteProtocolError("the client sent more before its handshake was answered")

    def answer(self, secret, started=None):
        """Start SPAKE2 with the secret the hello's kind asks for and queue our hello. The other half, derive(),
        may wait until the hello is on its way: then both sides finish SPAKE2 at once, on two cores. started is
        a (SPAKE2_B, its message) begun beforehand for the passphrase (see Gate.spare), or None."""
        if self.state is not State.ANSWER:
            raise LocalProtocolError(f"cannot answer while {self.state}")
        if started is None:
            spake = spake2.SPAKE2_B(_password(self.kind, secret), idA=ID_A, idB=ID_B, entropy_f=self._entropy)
            started = spake, spake.start()  # spake2 guards start() against a second call
        self._spake, message = started
        self._ours = PREFIX + self.kind + message
        self._outgoing += frame(self._ours)
        self.state = State.CONFIRM

    def derive(self):
        """Finish SPAKE2 and derive the keys (once; check() does it if it was not done)."""
        if self._spake is not None:
            spake, self._spake = self._spake, None
            self._mine, self._expected = self._derive(self.kind, spake, self._peer_message, self._hello + self._ours)

    def check(self):
        """Check the client's confirmation; if right, send ours: the connection is open. Returns whether it was."""
        if self.state is not State.CHECK:
            raise LocalProtocolError(f"cannot check a confirmation while {self.state}")
        self.derive()
        if not hmac.compare_digest(self._confirmation, self._expected):
            self.state = State.CLOSED
            return False
        self._outgoing += frame(self._mine)
        self._frames.max_size = MAX_FRAME  # records may come now; until the confirmation was checked, 64 bytes
        self.state = State.OPEN
        return True

    def refuse(self, reason):
        """Queue a refusal (DENIED, BUSY or UNKNOWN, unauthenticated: there may be no keys); then close."""
        self._outgoing += frame(PREFIX + REFUSAL + reason)
        self.state = State.CLOSED


# ===================================================================================================
# 6. The legacy format of the original scripts (../shared/legacy-wire-format.md): JSON padded with `~`,
# each 16-byte block encrypted alone with AES-256 (ECB) under SHA-256(passphrase). Insecure by design.

LEGACY_HINT = ("an original aeschat script (its message opens with our passphrase's legacy key): to talk to "
               "it, start this server with --legacy (NOT SECURE), or have it run this aeschat")
LEGACY_PREFIX = b'{"timestamp": "'  # how every legacy plaintext starts: a wrong key shows at once
# The largest legacy message we buffer: the original scripts set none, and json.dumps escapes every
# non-ASCII character (six bytes for one, twelve for a pair), so this leaves room for 64 KiB of any text.
LEGACY_MAX = 1024 * 1024
LEGACY_ORIGINAL_LIMIT = 1024  # what an original receiver reads in one recv and takes as one message
# An original shows a message only if its display line is shorter than 79 columns; one public copy prints
# "Received : " (eleven columns), so a message of 68 characters already vanishes there.
LEGACY_DISPLAY_LIMIT = 79 - len("Received : ")


def legacy_plaintext(text, timestamp):
    return json.dumps({"timestamp": timestamp, "message": text, "hash": text_hash(text)})


def legacy_encode(cipher, text, timestamp):
    """One legacy message, encrypted block by block; cipher is pyaes.AES(legacy_key(passphrase))."""
    check_message_text(text)
    return b"".join(bytes(cipher.encrypt(block)) for block in process_text(legacy_plaintext(text, timestamp)))


def legacy_size(text):
    """How many bytes a legacy message takes on the wire."""
    return len(b"".join(process_text(legacy_plaintext(text, "00:00:00"))))


def legacy_warnings(text):
    """Why an original receiver would mangle this message (it is sent all the same)."""
    warnings = []
    size = legacy_size(text)
    if size > LEGACY_ORIGINAL_LIMIT:
        warnings.append(f"it is {size} bytes encrypted, and they lose every message over {LEGACY_ORIGINAL_LIMIT}")
    if "~" in text:
        warnings.append("it contains '~', which they delete (so its hash check fails)")
    if len(text) >= LEGACY_DISPLAY_LIMIT:
        warnings.append(f"they do not show a message of {LEGACY_DISPLAY_LIMIT} characters or more")
    return warnings


class LegacyDecoder:
    """Streaming decoder for legacy messages: any segmentation, any size, `~` inside messages."""

    def __init__(self, cipher):
        self._cipher = cipher
        self._encrypted = bytearray()
        self._plain = bytearray()  # decrypted bytes of the message being received
        self._scanned = 0  # how much of _plain has been looked at for a message end
        self._depth, self._in_string = 0, False  # where that look stands in the JSON
        self._eof = self._closed = False
        self._count = 0

    def feed(self, data):
        if not data:
            self._eof = True
        self._encrypted += data
        if self._count == 0 and not self._plain and self._encrypted[LENGTH.size : LENGTH.size + len(MAGIC)] == MAGIC:
            raise NotAeschatPeer("the peer speaks aeschat v2, not the legacy format: leave out --legacy")
        whole = len(self._encrypted) - len(self._encrypted) % BLOCK
        for block in process_bytes(bytes(self._encrypted[:whole])):
            self._plain += bytes(self._cipher.decrypt(block))
        del self._encrypted[:whole]
        if not self._plain[: len(LEGACY_PREFIX)] == LEGACY_PREFIX[: len(self._plain)]:
            raise RemoteProtocolError("cannot decrypt the peer's data: the passphrases differ, "
                                      "or the peer does not speak the legacy format")
        if len(self._plain) > LEGACY_MAX:
            raise RemoteProtocolError(f"legacy message over {LEGACY_MAX} bytes")

    # Outside a JSON string: what nests, and where a string begins. Inside one: where it ends, and escapes.
    _OUTSIDE, _INSIDE = re.compile(rb'[{}\[\]"]'), re.compile(rb'["\\]')
    MAX_DEPTH = 32

    def next_message(self):
        """The next Message, ConnectionClosed once the stream ended cleanly, or None for "need data"."""
        # A message is one JSON object, padded with `~` to the end of its block: it ends at the `}` that closes its
        # first `{`, found in one pass over the bytes that skips strings (a `}` or `~` in the text is in one).
        plain = self._plain
        while True:
            if self._in_string:
                found = self._INSIDE.search(plain, self._scanned)
                if found is None or found.end() == len(plain):  # an escape needs the character after it too
                    self._scanned = len(plain) if found is None else found.start()
                    break
                self._in_string = found.group() != b'"'
                self._scanned = found.end() + (found.group() == b"\\")
                continue
            found = self._OUTSIDE.search(plain, self._scanned)
            if found is None:
                self._scanned = len(plain)
                break
            self._scanned, token = found.end(), found.group()
            if token == b'"':
                self._in_string = True
            elif token in b"{[":
                self._depth += 1
                if self._depth > self.MAX_DEPTH:
                    raise RemoteProtocolError(f"legacy message nested over {self.MAX_DEPTH} deep")
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._take(self._scanned)
        if self._eof and not self._closed:
            if self._plain or self._encrypted:
                raise TruncatedFrame("the connection was cut in the middle of a legacy message")
            self._closed = True  # reported once, as Connection does
            return ConnectionClosed()
        return None

    def _take(self, end):
        padded = -(-end // BLOCK) * BLOCK
        try:
            if self._plain[end:padded].strip(PAD):
                raise ValueError("more after the message than padding")
            obj = json.loads(self._plain[:end].decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RemoteProtocolError("not a legacy message") from None
        if not (type(obj) is dict and all(type(obj.get(k)) is str for k in ("timestamp", "message", "hash"))):
            raise RemoteProtocolError("legacy message without its timestamp, message and hash")
        del self._plain[:padded]
        self._scanned, self._depth = 0, 0
        self._count += 1
        return Message(self._count - 1, obj["message"], obj["timestamp"], obj["hash"])


class LegacyConnection:
    """The legacy format behind Connection's interface: no handshake; only messages have a form on the wire."""

    resumption = None

    def __init__(self, passphrase):
        if not passphrase or not passphrase.strip():
            raise LocalProtocolError("the passphrase is empty")
        self._cipher = pyaes.AES(legacy_key(passphrase))
        self._decoder = LegacyDecoder(self._cipher)

    def receive_data(self, data):
        self._decoder.feed(data)

    def next_event(self):
        return self._decoder.next_message()

    def seal(self, event):
        """A Message encrypted as the original scripts do; the other events have no legacy form."""
        if not isinstance(event, Message):
            return b""
        return legacy_encode(self._cipher, event.text, local_time(event.timestamp))


# ===================================================================================================
# 7. Display. Whatever the peer sends is shown so that it can neither act on the terminal nor pass for
# something of ours: control and format characters are shown escaped, and every row of a block after its
# first (a line of a multi-line message, or a long line wrapped at the terminal's width) begins with MARK,
# which peer text cannot put at the start of a row. So a row that begins otherwise is always ours.

VERIFIED, FAILED = "☒", "☐"  # the seed's tags: ☒ verified, ☐ failed
ORIGINAL_VERIFIED, ORIGINAL_FAILED = "☑", "☒"  # what the original scripts print instead
MARK = "  │ "  # begins every row of a message after its first
MESSAGES = ("chat", "sent")  # the kinds of Show that are messages: their rows after the first begin with MARK
TRANSCRIPT = (*MESSAGES, "event")  # the kinds a pipe's stdout carries: messages, and what became of files
OWN = "    "  # begins every row of aeschat's own lines after their first
MAX_MARKS = 4  # combining marks shown on one character; more are escaped, so text cannot stack or hide
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_JOINERS = {"\u200c", "\u200d"}  # ZWNJ and ZWJ: emoji sequences, Indic scripts and Persian need them
# Letters and symbols that show as nothing: text could hide behind them or pose as a space; and the conjoining
# Hangul vowels and finals, which terminals draw with no width at all (Korean text uses precomposed syllables).
_BLANKS = {"\u115f", "\u3164", "\uffa0", "\u2800"}


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _careful(ch):
    """A printable character that visible() must still look at: a mark (it counts them) or a blank."""
    return unicodedata.category(ch) in ("Mn", "Me") or _blank(ch)


def _blank(ch):
    return ch in _BLANKS or "\u1160" <= ch <= "\u11ff" or "\ud7b0" <= ch <= "\ud7ff"


def _escape(ch):
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text):
    """Text as it may reach a terminal: C0 and C1 controls, bidi and other format characters (all but the
    joiners), separators and spaces other than U+0020, blank-looking letters, unassigned code points and lone
    surrogates escaped; at most MAX_MARKS combining marks on a character."""
    if text.isprintable() and (text.isascii() or not any(map(_careful, set(_NON_ASCII.findall(text))))):
        return text  # the fast path: nothing to escape, nor marks to count
    out, marks = [], 0
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Mn", "Me"):
            marks += 1
            out.append(ch if marks <= MAX_MARKS else _escape(ch))
            continue
        marks = 0
        if ch in _JOINERS or (category[0] not in "CZ" and not _blank(ch)) or ch == " ":
            out.append(ch)
        else:
            out.append(_escape(ch))
    return "".join(out)


LATE = 60.0  # seconds between a message's timestamp and its arrival past which both are shown
_FORMATS = {False: "%H:%M:%S", True: "%Y-%m-%d %H:%M:%S"}


def local_time(timestamp, dated=False):
    """HH:MM:SS in this machine's zone (dated: YYYY-MM-DD HH:MM:SS), from an ISO 8601 time (v2) or an HH:MM:SS one
    (legacy, which has no date to show); never raises."""
    moment = _moment(timestamp)
    if moment is not None:
        return moment.strftime(_FORMATS[dated])
    try:
        return datetime.datetime.strptime(timestamp[:8], "%H:%M:%S").strftime("%H:%M:%S")
    except ValueError:
        return "??:??:??"


def _moment(timestamp):
    """A v2 timestamp as an aware datetime in this machine's zone; None for any other."""
    try:
        moment = datetime.datetime.fromisoformat(timestamp[:64])
        return moment.astimezone() if moment.tzinfo is not None else None
    except (ValueError, OverflowError, OSError):
        return None


def _block(label, text, suffix):
    """A message as its logical lines: the first after the label, with the suffix (tag and time)."""
    lines = [visible(line) for line in text.split("\n")]
    lines[0] = f"{label}: {lines[0]}  {suffix}"
    return lines


def verify_and_display(message, arrived=None, sender=None):
    """The block that shows a received message: `Received: FIRST LINE  TAG  HH:MM:SS`, then its other lines. A
    message shown more than LATE seconds after its timestamp also says when it arrived (arrived: time.time()). With
    a sender (a log, as --receive-only keeps), times carry their date and the line ends with where it came from;
    a legacy timestamp has no date, so there the arrival is always shown."""
    log = sender is not None
    moment = _moment(message.timestamp)
    when = local_time(message.timestamp, log)
    if arrived is not None and (log if moment is None else arrived - moment.timestamp() > LATE):
        arrival = datetime.datetime.fromtimestamp(arrived).astimezone()
        dated = log or (moment is not None and arrival.date() != moment.date())
        when = f"{local_time(message.timestamp, dated)} (arrived {arrival.strftime(_FORMATS[dated])})"
    tag = VERIFIED if message.verified else FAILED
    return _block("Received", message.text, f"{tag}  {when}" + (f"  from {sender}" if log else ""))



def sent_lines(text, timestamp, label="Sent"):
    return _block(label, text, local_time(timestamp))


def typed_path(text):
    """A path as typed after /send: quoted or with escaped spaces as a shell would take it (a dropped file is
    often pasted so), else as it is; ~ is expanded when the file is opened."""
    import shlex

    for attempt in (text, text + text[:1]) if text[:1] in ("'", '"') else (text,):  # its closing quote may be left out
        try:
            words = shlex.split(attempt)
        except ValueError:  # an unmatched quote: part of the name
            continue
        return words[0] if len(words) == 1 else text
    return text


def safe_name(name):
    """A peer's file name made safe to save in a folder: its last part only, no separators, no control or format
    characters, not `.` or `..`, not hidden, at most 255 bytes (the extension kept)."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join("_" if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch for ch in name).strip()
    if name in ("", ".", ".."):
        name = "file"
    if name.startswith("."):  # never a hidden file (.bashrc in a home folder), nor one like our temporary files
        name = "_" + name.lstrip(".")
    return numbered(name, 0)


def numbered(name, number):
    """name, or for number n > 0 `stem (n).ext`, its stem shortened to keep it within 255 bytes."""
    stem, dot, extension = name.rpartition(".")
    if not stem or len(extension.encode("utf-8")) > 32:
        stem, dot, extension = name, "", ""
    tail = (f" ({number})" if number else "") + dot + extension
    while len((stem + tail).encode("utf-8")) > 255:
        stem = stem[:-1]
    return stem + tail


def first_words(text, limit=24):
    """A message named by its beginning, for lists of what was not delivered."""
    words = " ".join(text.split())
    return "“" + visible(words if len(words) <= limit else words[: limit - 1] + "…") + "”"


def _cjk_locale():
    locale = os.environ.get("LC_ALL") or os.environ.get("LC_CTYPE") or os.environ.get("LANG") or ""
    return locale[:2] in ("zh", "ja", "ko")


def cells(ch, wide_ambiguous=False):
    """Columns a character may take, counted high where terminals differ: a row we lay out must never be wider
    on screen than we think, or the terminal would wrap it and peer text would begin a row."""
    if " " <= ch <= "~":
        return 1
    category = unicodedata.category(ch)
    if category in ("Mn", "Me", "Cf"):
        return 1  # nothing in most terminals, a cell in some, and VS16 widens the symbol before it
    width = unicodedata.east_asian_width(ch)
    if width in ("W", "F") or category == "So" or "\U0001f1e6" <= ch <= "\U0001f1ff":
        return 2  # wide, or a symbol a terminal may draw as an emoji
    # Ambiguous width: narrow in Latin, Greek and Cyrillic text; elsewhere some terminals draw it wide (glibc does,
    # for circled numbers on black squares, say), so it counts as two.
    return 2 if width == "A" and (wide_ambiguous or ch >= "\u0530") else 1


def layout(lines, width=None, kind="chat"):
    """The rows that show a block: its first row as it is, every other row (its next lines, and the rest of any
    line wider than the terminal, broken at a space where one is near) after MARK, for a message; after OWN, for
    aeschat's own lines, so that a row that begins with MARK is always a message's. Every row goes through
    visible(), so nothing reaches the terminal unescaped, whoever composed the line. width None (a pipe) wraps
    nothing."""
    indent = MARK if kind in MESSAGES else OWN
    rows = [visible(lines[0])] + [indent + visible(line) for line in lines[1:]]
    if width is None:
        return rows
    wide = _cjk_locale()
    mark = sum(cells(ch, wide) for ch in indent)
    limit = max(width - 1, mark + 2)  # one column spare: no row ever ends in the terminal's last column
    out = []
    for row in rows:
        start, used = 0, 0
        for i, ch in enumerate(row):
            need = cells(ch, wide)
            if used + need > limit and i > start:
                cut = _break(row, start, i)
                out.append(row[start:cut] if start == 0 else indent + row[start:cut])
                start, used = cut, mark + sum(cells(c, wide) for c in row[cut:i])
            used += need
        out.append(row[start:] if start == 0 else indent + row[start:])
    return out


def _break(row, start, end):
    """Where to end a row that must end by `end`: after a space in its last third, else not between a character
    and its marks or joiners, else at `end`."""
    space = row.rfind(" ", start + (end - start) * 2 // 3, end)
    if space > start:
        return space + 1
    cut = end
    while end - cut < 4 and cut > start + 1 and (unicodedata.category(row[cut])[0] == "M" or row[cut] in _JOINERS
                                                  or row[cut - 1] in _JOINERS):
        cut -= 1
    return cut if cut > start else end


def fit_status(fields, order, width):
    """The status line for a terminal `width` columns wide. fields are in the order shown, each a list of ever
    shorter forms (the last may be empty: the field goes); `order` names the fields in the order they give way.
    So the line is shortened, never cut."""
    levels, gone = [0] * len(fields), set()

    def shown():
        return [f[level] for i, (f, level) in enumerate(zip(fields, levels)) if f[level] and i not in gone]

    line = " " + " | ".join(shown()) + " "
    while sum(cells(ch) for ch in line) > width - 1:
        shorter = next((i for i in order if levels[i] + 1 < len(fields[i])), None)
        if shorter is not None:
            levels[shorter] += 1
        elif len(shown()) > 1:  # not even the shortest forms fit: fields go whole, in the same order
            gone.add(next(i for i in order if i not in gone and fields[i][levels[i]]))
        else:
            return line[: max(width - 1, 0)]  # one field alone does not fit: a terminal this narrow gets a cut
        line = " " + " | ".join(shown()) + " "
    return line


# ===================================================================================================
# 8. The session: what survives reconnects (Conversation), the rules of a chat (Session) and of the
# server's door (Gate). Machines in the manner of magic-wormhole's: inputs in, actions out, no I/O; the
# caller passes the time in (`now`, monotonic seconds), so every rule is tested without a clock.

KEEPALIVE = 15.0  # seconds of the peer's silence before we ping it
DEAD_AFTER = 3  # keepalive intervals of the peer's silence before we call the connection lost (45 s)
FLUSH_TIMEOUT = 10.0  # how long leaving waits for the peer to acknowledge what we sent
LEAVING_NOTICE = 1.0  # leaving takes longer than this: say what it waits for
RECONNECT_FOR = 300.0  # how long a client tries to reconnect, and a server holds a dropped conversation
FIRST_RETRY, LAST_RETRY = 0.2, 2.0  # the client's reconnection backoff: when the network is back, so are we
MAX_QUEUED = 10_000  # messages waiting for acknowledgement; past it, new ones are refused with a message
LEGACY_PACE = 0.15  # seconds between legacy messages, so that an original receiver reads each alone
AUTH_FAILURES = 2  # reconnections in a row that fail to authenticate before a client stops trying
PASSPHRASE_TRIES = 3  # on a terminal: a wrong passphrase is asked again, each try a guess the server counts
RESUME_DEADLINE = 10.0  # seconds a peer has, once authenticated, to resume the conversation
MAX_PINGS = 20  # pings a second a peer may send: one every keepalive is the rule, a storm is an attack
# A file's chunk: about 30 ms of pyaes on CPython (16 KiB), 5 ms on PyPy (64 KiB, the protocol's largest, where
# the cipher is ten times faster and what each record costs besides shows): small enough that a message typed
# meanwhile waits little (it goes before the chunks queued, after the one being sealed), large enough that records,
# acknowledgements and steps cost little beside the bytes.
CHUNK_SIZE = (64 if sys.implementation.name == "pypy" else 16) * 1024
WINDOW_CHUNKS = 4  # chunks of a file in flight: enough to keep both sides' ciphers busy at once
MAX_FILE_SIZE = 2**30  # the largest file accepted unless --max-file-size says otherwise (1 GiB: an hour of pyaes)
FILE_STALL = 30.0  # leaving with a file on its way: how long without progress before giving it up
MAX_OFFERED = 32  # a side's files offered and not finished: more wait their turn; a peer's past it is a violation
MAX_OPEN_FILES = 4  # files received at once, each into a temporary file held open: the rest wait their turn
KEPT_FINISHED = 256  # finished files of the peer's remembered, to answer one offered again after a reconnection


class Conversation:
    """What survives reconnects: the conversation id, the message numbers both ways, and the messages the peer
    has not acknowledged, to be sent again on the next connection.

    Each connection starts with a Resume each way (the client's first). Each side then forgets what the peer
    says it has shown and sends the rest again with the same ids; the receiver shows an id once.
    """

    def __init__(self, conv_id):
        self.id = conv_id
        self.next_id = 0  # the id of our next message
        self.sent = 0  # every id below it has been put on a connection (the rest are queued)
        self.expected_id = 0  # the id of the peer's next message
        self.unacked = collections.OrderedDict()  # id -> Message, oldest first

    @classmethod
    def new(cls, entropy=os.urandom):
        return cls(entropy(16).hex())

    def new_message(self, text, timestamp):
        check_message_text(text)
        message = Message(self.next_id, text, timestamp)
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
        if message.id > self.expected_id or message.id >= MAX_ID:
            raise RemoteProtocolError(f"message {self.expected_id} never arrived (got {message.id})")
        self.expected_id += 1
        return True

    def put_on_wire(self, message_id):
        self.sent = max(self.sent, message_id + 1)

    def acknowledged(self, message_id):
        """The peer has shown every message up to message_id."""
        if message_id >= self.sent:
            raise RemoteProtocolError(f"the peer acknowledged message {message_id}, which was never sent")
        while self.unacked and next(iter(self.unacked)) <= message_id:
            self.unacked.popitem(last=False)

    def on_resume(self, peer, server):
        """Take the peer's Resume; returns (our reply or None, the messages to send again in order, whether a
        different client took the conversation over)."""
        took_over = server and peer.conv != self.id
        if peer.next > self.sent and not took_over:
            raise RemoteProtocolError("the peer says it has shown messages we never sent")
        if server:
            if took_over:  # a client new to us takes the conversation over: its numbering starts anew
                self.id, self.expected_id = peer.conv, peer.base
            reply = Resume(self.id, max(self.expected_id, peer.base), self.base(), not took_over)
        else:
            if peer.conv != self.id:
                raise RemoteProtocolError("the server answered for another conversation")
            reply = None
            if not peer.resumed:  # the server started afresh (or restarted): take its numbering
                self.expected_id = peer.base
        self.expected_id = max(self.expected_id, peer.base)
        if not took_over:  # a newcomer's `next` counts someone else's messages, not ours
            for message_id in [i for i in self.unacked if i < peer.next]:
                del self.unacked[message_id]
        return reply, list(self.unacked.values()), took_over


class Format:
    """What differs between the two wire formats, as far as the session is concerned."""

    def __init__(self, name, security, resumes, acknowledges, keepalive, signals, pace, files):
        self.name, self.security, self.resumes, self.acknowledges, self.keepalive, self.signals, self.pace = (
            name, security, resumes, acknowledges, keepalive, signals, pace)
        self.files = files


V2 = Format("aeschat v2", "encrypted", resumes=True, acknowledges=True, keepalive=True, signals=True, pace=0.0,
            files=True)
# The legacy format has no message numbers (no resume), no receipts, no pings (silence is not death there:
# an original user may say nothing for an hour) and no way to say anything but a message.
LEGACY = Format("legacy", "NOT SECURE", resumes=False, acknowledges=False, keepalive=False, signals=False,
                pace=LEGACY_PACE, files=False)


class Input(_Event):
    """What the shell tells a Session."""


class Typed(Input):
    """The user typed a line (or a block, from a paste) at timestamp (ISO 8601)."""

    __slots__ = ("text", "timestamp")


class Attached(Input):
    """A connection authenticated: link is the shell's token for it; how is the handshake's kind
    (RESUME: the same client, proven by the resumption secret; PASSPHRASE: a client that gave the passphrase)."""

    __slots__ = ("link", "peer", "how")


class Got(Input):
    """A link delivered an event (a record, or ConnectionClosed); at is when it arrived (time.time(), if known)."""

    __slots__ = ("link", "event", "at")

    def __init__(self, link, event, at=None):
        super().__init__(link, event, at)


class Drained(Input):
    """A link has no more whole records buffered: a moment to acknowledge what arrived (cumulatively)."""

    __slots__ = ("link",)


class Failed(Input):
    """A link failed with error (network, protocol or anything else)."""

    __slots__ = ("link", "error")


class Tick(Input):
    """Time passed: keepalives, silent peers, backoff, grace periods, leaving, pacing."""


class Leave(Input):
    """The user leaves (quit(), end of input): deliver what is pending, within wait seconds; answers is how long the
    peer has to answer the files offered (None: as long as it stays connected, for a script's --send)."""

    __slots__ = ("wait", "answers")

    def __init__(self, wait, answers=FLUSH_TIMEOUT):
        super().__init__(wait, answers)


class Interrupt(Input):
    """Ctrl-C or a signal: leave now, with this exit code."""

    __slots__ = ("code",)


class DialFailed(Input):
    """(client) A reconnection attempt failed with error."""

    __slots__ = ("error",)


class FileReady(Input):
    """(sender) What to offer is ready: its name to give, size and SHA-256; for a folder, (files, bytes) of it; a
    file's execute bits; lines to show (what a folder's walk could not read, or skipped)."""

    __slots__ = ("file", "name", "size", "sha256", "folder", "bits", "notes")

    def __init__(self, file, name, size, sha256, folder=None, bits=0, notes=()):
        super().__init__(file, name, size, sha256, folder, bits, tuple(notes))


class FileOpened(Input):
    """(receiver) The temporary file is ready for the bytes."""

    __slots__ = ("file",)


class FileSaved(Input):
    """(receiver) The file's SHA-256 matched and it is in place at path; or the folder is made there, problems
    naming its files that could not be saved (the first few; unlisted: how many others), got the (files, bytes)
    saved in it."""

    __slots__ = ("file", "path", "problems", "got", "unlisted")

    def __init__(self, file, path, problems=(), got=None, unlisted=0):
        super().__init__(file, path, tuple(problems), got, unlisted)


class FileNote(Input):
    """(sender) Part of what goes could not be read (a folder's file changed meanwhile): lines to show."""

    __slots__ = ("file", "lines")


class FileFailed(Input):
    """A file could not be read (outgoing) or written, checked or saved (incoming); reason is a wire reason."""

    __slots__ = ("file", "outgoing", "reason", "detail")


class Action(_Event):
    """What a Session asks the shell to do."""


class Send(Action):
    __slots__ = ("link", "event")


class Show(Action):
    """Show lines as one block; kind is chat (the transcript), sent (the transcript's copy of a line just sent,
    which a terminal showing typed lines itself leaves out), event (the transcript's lines of our own: a file
    delivered or received, a line queued), notice, keys (the editor's keys, which an interface
    without one leaves out), warning or error."""

    __slots__ = ("lines", "kind")

    def __init__(self, lines, kind="chat"):
        super().__init__(tuple(lines), kind)


class Close(Action):
    """Close a link; with flush, after what was queued for it is written (a goodbye, an alert)."""

    __slots__ = ("link", "flush")


class Dial(Action):
    """(client) Start one reconnection attempt, a handshake of this kind."""

    __slots__ = ("kind",)


class Live(Action):
    """The chat has begun: the input loop may take lines."""


class ChunkOf(Action):
    """What a Send carries for a file's bytes: the writer reads them (so no file is ever whole in memory)."""

    __slots__ = ("file", "offset", "length")


class PrepareFile(Action):
    """(sender) Open the file at path and hash it; then FileReady or FileFailed."""

    __slots__ = ("file", "path")


class OpenFile(Action):
    """(receiver) Check the room for size bytes and open a temporary file (or, for a folder of `folder` files, make
    the folder); then FileOpened or FileFailed."""

    __slots__ = ("file", "name", "size", "folder")

    def __init__(self, file, name, size, folder=None):
        super().__init__(file, name, size, folder)


class WriteFile(Action):
    __slots__ = ("file", "data")


class SaveFile(Action):
    """(receiver) Check the SHA-256 and put the file in place under name with these execute bits; then FileSaved
    or FileFailed."""

    __slots__ = ("file", "sha256", "name", "bits")

    def __init__(self, file, sha256, name, bits=0):
        super().__init__(file, sha256, name, bits)


class DiscardFile(Action):
    """(receiver) Remove the temporary file."""

    __slots__ = ("file",)


class Progress(Action):
    """A transfer got a percent further: for an interface without a status line (a bar, or a line per 10%)."""

    __slots__ = ("what", "outgoing", "percent", "done", "size", "rate")


class ReleaseFile(Action):
    """(sender) Close the file."""

    __slots__ = ("file",)


class End(Action):
    """The chat is over: exit with code, after telling the user text."""

    __slots__ = ("code", "text")


class Phase(enum.Enum):
    """Where a chat stands."""

    STARTING = "starting"  # a link is up; the Resume exchange has not finished
    LIVE = "live"
    AWAY = "away"  # no link: the client reconnects, the server holds the conversation
    ENDED = "ended"


class IllegalMove(AeschatError):
    """A machine was given an input its table has no cell for: a bug in aeschat (exit 4), never the peer's doing."""


STAY, VIOLATION = ".", "!"


class Table:
    """A transition table written as a grid, read as one: a row per state, a column per input. A cell in capitals
    names the state to move to (the input's rule then runs: `_on_<input>`, or the table's prefix); one in lower
    case names a rule that runs with no move (`_<rule>`); `.` means nothing happens; `!` means the peer broke the
    protocol. Every cell is filled, so every (state, input) pair has an answer written down."""

    def __init__(self, states, grid, prefix="_on_"):
        self.prefix = prefix
        rows = [line.split() for line in grid.strip().splitlines()]
        self.states, self.inputs, self.cells = states, tuple(rows[0]), {}
        for row in rows[1:]:
            if len(row) != len(self.inputs) + 1:
                raise ValueError(f"row {row[0]} has {len(row) - 1} cells for {len(self.inputs)} inputs")
            for name, cell in zip(self.inputs, row[1:]):
                self.cells[states[row[0]], name] = states[cell] if cell.isupper() else cell
        self.rows = tuple(dict.fromkeys(state for state, _ in self.cells))

    def move(self, machine, thing, name, *args):
        """Apply input `name` to thing (which has a .state) under machine's rules; True if the input did something.
        A state or input the table does not know is a bug; `!` is the peer's violation."""
        cell = self.cells.get((thing.state, name))
        if cell is None:
            raise IllegalMove(f"internal error: no rule for {name} in state {thing.state}; please report it")
        if cell == VIOLATION:
            raise RemoteProtocolError(f"an unexpected {name} (the {machine.NOUN} is {thing.state.value})")
        if cell == STAY:
            return False
        if isinstance(cell, str):
            getattr(machine, f"_{cell}")(thing, *args)
            return True
        old, thing.state = thing.state, cell
        rule = getattr(machine, f"{self.prefix}{name}", None)
        if rule is not None:
            rule(thing, old, *args)
        return True


class Outbox:
    """The actions of one step, in order, shared by a Session and its machines (none of which holds a reference to
    the others). send() goes to the current link, and before the Resume exchange on it is over only what may go
    then: the rest of the conversation waits, and the exchange says it again."""

    # What a link may carry before its Resume exchange is over. Anything else of the conversation waits for it, and
    # is then said again by the exchange itself: messages sent again, a file offered again (the receiver restates
    # where it stands: done, refused), what arrived acknowledged by the Resume.
    BEFORE_RESUME = (Resume, Ping, Pong, Alert, Goodbye, Busy)

    def __init__(self):
        self.actions = []
        self.link = None  # the current link's token
        self.live = False  # the conversation runs on it

    def do(self, action):
        self.actions.append(action)

    def show(self, lines, kind="chat"):
        self.do(Show(lines, kind))

    def send(self, event):
        """Send event on the current link if it may go now; returns whether it went."""
        if self.link is None or not (self.live or isinstance(event, self.BEFORE_RESUME)):
            return False
        self.do(Send(self.link, event))
        return True

    def take(self):
        actions, self.actions = self.actions, []
        return actions


# ---------------------------------------------------------------------------------------------------
# Transfers: every file on its way, each way, with its own state.


class Out(enum.Enum):
    """A file we send."""

    PREPARING = "preparing"  # being opened and hashed (PrepareFile)
    READY = "ready"  # waiting for room among the MAX_OFFERED on their way
    OFFERED = "offered"  # the peer has the offer (again, after a reconnection)
    SENDING = "sending"  # accepted: chunks go, at most WINDOW unacknowledged
    DONE = "done"  # final: the peer saved it
    REFUSED = "refused"  # final: the peer declined it, or could not save it
    CANCELLED = "cancelled"  # final: we stopped it (unreadable, we left, the chat ended or changed hands)


class In(enum.Enum):
    """A file the peer sends."""

    ASKED = "asked"  # offered: the user has not answered yet
    WAITING = "waiting"  # accepted: waiting for room among the MAX_OPEN_FILES written at once
    OPENING = "opening"  # its temporary file is being made (OpenFile)
    RECEIVING = "receiving"
    VERIFYING = "verifying"  # whole: its SHA-256 is checked and it is put in place (SaveFile)
    DONE = "done"  # final: saved
    REFUSED = "refused"  # final: we declined it, could not write it, or stopped it
    CANCELLED = "cancelled"  # final: the sender stopped it, or the chat ended or changed hands


FINAL = {Out.DONE, Out.REFUSED, Out.CANCELLED, In.DONE, In.REFUSED, In.CANCELLED}
HOLDING = {In.OPENING, In.RECEIVING, In.VERIFYING}  # a temporary file exists (or is being made)


class _Transfer:
    """One file on its way, either way. done is the bytes the receiver has (acknowledged, for a sender); next, for a
    sender, the offset of the next chunk to send."""

    def __init__(self, file, outgoing, state, name="", size=0, sha256=""):
        self.file, self.outgoing, self.state, self.name, self.size, self.sha256 = (
            file, outgoing, state, name, size, sha256)
        self.done = self.next = 0
        self.sent = 0  # for a sender, the most ever sent (an offer made again starts from what the receiver has)
        self.most = 0  # for a sender, the most the receiver ever had: leaving waits only while that grows
        self.started = self.start_done = None  # when bytes began to flow, and how many there were then
        self.offered = False  # told the user (once; an offer goes again after every reconnection)
        self.restated = False  # for a receiver: answered an offer made again on this link (once per link)
        self.reason = None  # why it was refused or cancelled
        self.folder = None  # for a folder: (its files, their bytes)
        self.bits = 0  # a file's execute bits
        self.unread = 0  # for a sender's folder: its files that could not be read, and so are not in it
        self.shown_percent = -1  # the last progress told

    @property
    def kind(self):
        return "folder" if self.folder else "file"

    def described(self):
        if self.folder:
            files, total = self.folder
            return f"folder {visible(self.name)} ({files:,} file{'s' if files != 1 else ''}, {size_text(total)})"
        return f"file {visible(self.name)} ({size_text(self.size)})"

    @property
    def active(self):
        return self.state not in FINAL

    def progress(self, now):
        """Percent, and bytes a second since bytes began to flow (None until they have for a moment)."""
        percent = 100 * self.done // self.size if self.size else 100
        if self.started is None or now - self.started < 0.5:
            return percent, None
        return percent, (self.done - self.start_done) / (now - self.started)


def progressed(out, t, now):
    """A Progress action when a transfer reached another whole percent."""
    percent, rate = t.progress(now)
    if percent != t.shown_percent:
        t.shown_percent = percent
        if t.folder and t.size:  # its stream holds a header for each entry: the bytes shown are its files'
            scale = t.folder[1] / t.size
            done, size, rate = round(t.done * scale), t.folder[1], rate and rate * scale
        else:
            done, size = t.done, t.size
        out.do(Progress(t.described(), t.outgoing, percent, done, size, rate))


def briefly(items, limit=5):
    """The first items of a long list, and how many more there are (0 if none)."""
    return items[:limit], max(0, len(items) - limit)


def listed(transfers, what):
    """ "2 files not delivered: a.txt, b.txt", each name once (a name sent twice: "a.txt (2x)"), at most five."""
    counts = collections.Counter(f"{t.kind}\0{t.name}" for t in transfers)
    counted = " and ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind in ("file", "folder")
                           if (n := sum(t.kind == kind for t in transfers)))  # "2 files and 1 folder"
    names = [visible(key.split("\0", 1)[1]) + (f" ({c}x)" if c > 1 else "") for key, c in list(counts.items())[:5]]
    more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
    return f"{counted} {what}: {', '.join(names)}{more}"


def progress_field(t, others, now, live):
    """A transfer's progress for the status line, in ever shorter forms: percent, rate and time left."""
    percent, rate = t.progress(now)
    verb = "sending" if t.outgoing else "receiving"
    more = f" (+{others})" if others else ""
    if not live:
        return [f"{verb} {visible(t.name)} {percent}%, paused{more}", f"{verb} {percent}%, paused{more}", f"{percent}%"]
    long = f"{verb} {visible(t.name)} {percent}%{more}"
    if rate:
        left = (t.size - t.done) / rate
        long = f"{verb} {visible(t.name)} {percent}%, {size_text(int(rate))}/s, {left:.0f} s left{more}"
    return [long, f"{verb} {percent}%{more}", f"{percent}%"]


class Sending:
    """Our files, each in its own state (Out) in one table: prepared by the shell, offered (at most MAX_OFFERED on
    their way), sent in chunks with at most a window in flight as the peer acknowledges them, and finished: done,
    refused, or cancelled. No I/O: the shell prepares, reads and releases when asked."""

    NOUN = "file"

    # Ours. ready: hashed; unreadable: cannot be read; offer: room among MAX_OFFERED; accept, fack, done, refuse: the
    # peer's records; stop: we leave; again: offered again after a reconnection; abandon: the chat ended or a new
    # client took it over. An accept answers an offer: one more while sending is ignored, or a peer could make us
    # send the file again and again for a few bytes each time.
    TABLE = Table(Out, """
                ready   unreadable  offer    accept   fack     done   refuse   stop       again    abandon
    PREPARING   READY   CANCELLED   .        !        !        !      !        CANCELLED  .        .
    READY       .       CANCELLED   OFFERED  !        !        !      !        CANCELLED  .        CANCELLED
    OFFERED     .       CANCELLED   .        SENDING  .        DONE   REFUSED  CANCELLED  OFFERED  CANCELLED
    SENDING     .       CANCELLED   .        .        SENDING  DONE   REFUSED  CANCELLED  OFFERED  CANCELLED
    DONE        .       .           .        .        .        .      .        .          .        .
    REFUSED     .       .           .        .        .        .      .        .          .        .
    CANCELLED   .       .           .        .        .        .      .        .          .        .
    """, prefix="_our_")


    def __init__(self, out, chunk_size=CHUNK_SIZE, strict=False):
        self.out, self.strict = out, strict  # strict: a script's (see left_behind)
        self.chunk_size, self.window = chunk_size, WINDOW_CHUNKS * chunk_size
        self.outgoing = {}  # file number -> _Transfer
        self._next_file = 0
        self.progress_at = None  # when a file of ours last got further than it ever had
        self.now = 0.0

    def _out(self, t, name, *args):
        return self.TABLE.move(self, t, name, *args)

    def send(self, path):
        """/send or --send: the shell prepares the file, then FileReady (or FileFailed)."""
        file, self._next_file = self._next_file, self._next_file + 1
        self.outgoing[file] = _Transfer(file, True, Out.PREPARING, name=path)
        self.out.do(PrepareFile(file, path))

    def ready(self, event):
        t = self.outgoing.get(event.file)
        if t is not None and self._out(t, "ready", event):
            self.offer_ready()

    def unreadable(self, event):
        t = self.outgoing.get(event.file)
        if t is not None and self._out(t, "unreadable", event.detail):
            self.offer_ready()

    def note(self, event):
        t = self.outgoing.get(event.file)
        if t is not None:
            t.unread += len(event.lines)
            for line in event.lines:
                self.out.show([f"{t.kind} {visible(t.name)}: cannot read {visible(line)} any more: it goes damaged, "
                               "and the peer will not save it"], "error")

    def offer_ready(self):
        """Offer the files ready to go, while fewer than MAX_OFFERED are on their way (and the chat is live)."""
        if not self.out.live:
            return
        room = MAX_OFFERED - sum(t.state in (Out.OFFERED, Out.SENDING) for t in self.outgoing.values())
        ready = itertools.takewhile(lambda t: t.state is not Out.PREPARING, self.outgoing.values())  # in the order
        for t in [t for t in ready if t.state is Out.READY][: max(room, 0)]:  # asked for: not the first hashed first
            self._out(t, "offer")

    def again(self):
        """A new link: offer again what was on its way (the receiver answers with where it stands)."""
        for t in list(self.outgoing.values()):
            self._out(t, "again")
        self.offer_ready()

    def stop(self):
        for t in list(self.outgoing.values()):
            self._out(t, "stop")

    def abandon(self, why):
        for t in list(self.outgoing.values()):
            self._out(t, "abandon", why)

    @property
    def unfinished(self):
        """Files of ours not yet finished: leaving waits for them."""
        return [t for t in self.outgoing.values() if t.active]

    @property
    def moving(self):
        return [t for t in self.outgoing.values() if t.state is Out.SENDING]

    def left_behind(self, code, text):
        """The last line, with our files that did not arrive. Declined is the peer's choice: listed as such, and an
        error only for a script (strict), whose --send promises exit 1 unless every file was saved; so is a folder
        delivered without the files of it that could not be read (the user was told of each). Not delivered:
        unfinished, refused otherwise, or stopped because we left (not the unreadable, nor those abandoned on the
        way: the user was told at the time)."""
        ours = list(self.outgoing.values())
        partly = [t for t in ours if t.state is Out.DONE and t.unread]  # folders without what could not be read
        if partly:
            text = f"{text}; {listed(partly, 'delivered without the files that could not be read')}"
            code = code or EXIT_NETWORK * self.strict
        declined = [t for t in ours if t.state is Out.REFUSED and t.reason == "declined"]
        lost = [t for t in ours if t.active or (t.state is Out.REFUSED and t.reason != "declined")
                or (t.state is Out.CANCELLED and t.reason == "left")]
        if declined:
            text, code = f"{text}; {listed(declined, 'declined by the peer')}", code or (EXIT_NETWORK * self.strict)
        if lost:
            text, code = f"{text}; {listed(lost, 'not delivered')}", code or EXIT_NETWORK
        return code, text

    # -- the peer's answers: every field checked before the table moves

    def _got_accept(self, accept):
        t = self.outgoing.get(accept.file)
        if t is None or accept.offset > t.size:
            raise RemoteProtocolError("an acceptance of a file never offered, or past its end")
        if accept.offset < t.done:  # a receiver keeps what it acknowledged: asking for it again is only a way to
            raise RemoteProtocolError("an acceptance from before what the peer acknowledged")  # make us resend
        self._out(t, "accept", accept.offset)

    def _got_fack(self, ack):
        t = self.outgoing.get(ack.file)
        if t is None or ack.offset > t.next:
            raise RemoteProtocolError("an acknowledgement of file bytes never sent")
        self._out(t, "fack", ack.offset)

    def _got_done(self, done):
        t = self.outgoing.get(done.file)
        if t is None or t.sent < t.size:
            raise RemoteProtocolError("a file reported whole before it was sent")
        if self._out(t, "done"):
            self.offer_ready()

    def _got_refuse(self, refuse):
        t = self.outgoing.get(refuse.file)
        if t is None:
            raise RemoteProtocolError("a refusal of a file never offered")
        if self._out(t, "refuse", refuse.reason):
            self.offer_ready()

    RECORDS = {Accept: _got_accept, FileAck: _got_fack, Done: _got_done, Refuse: _got_refuse}

    # -- the rules: _our_<input>(t, the state it was in, ...)

    def _our_ready(self, t, old, event):
        t.name, t.size, t.sha256, t.folder, t.bits = event.name, event.size, event.sha256, event.folder, event.bits
        self.progress_at = self.now
        for note in event.notes:
            unread = note.startswith("cannot")
            t.unread += unread
            self.out.show([f"{t.kind} {visible(t.name)}: {note}"], "error" if unread else "notice")

    def _our_unreadable(self, t, old, detail):
        t.reason = "unreadable"
        if old is Out.PREPARING:
            return self.out.show([f"cannot send {visible(t.name)}: {detail}"], "error")
        self._release(t, old, "unreadable")
        self.out.show([f"stopped sending {t.kind} {visible(t.name)}: {detail}"], "error")

    def _our_offer(self, t, old):
        if t.folder:
            self.out.send(FolderOffer(t.file, t.name, *t.folder, t.size, t.sha256))
        else:
            self.out.send(Offer(t.file, t.name, t.size, t.sha256))
            if t.bits:
                self.out.send(Exec(t.file, t.bits))
        if not t.offered:
            t.offered = True
            self.out.show([f"offering {t.described()}"], "notice")

    def _our_accept(self, t, old, offset):
        if t.started is None:
            t.started, t.start_done = self.now, offset
        t.done = t.next = offset
        self._moved(t)
        self._pump()

    def _our_fack(self, t, old, offset):
        if offset > t.done:
            t.done = offset
            self._moved(t)
            self._pump()

    def _our_done(self, t, old):
        t.done = t.size
        self.out.do(ReleaseFile(t.file))
        unread = f", without {t.unread} file{'s' if t.unread != 1 else ''} that could not be read" if t.unread else ""
        self.out.show([f"delivered {t.kind} {visible(t.name)}{unread}"], "event")

    def _our_refuse(self, t, old, reason):
        t.reason = reason
        self.out.do(ReleaseFile(t.file))
        self.out.show([f"{t.kind} {visible(t.name)} not delivered: the peer {REFUSALS_OF_FILES[reason]}"],
                      "error" if reason == "failed verification" else "notice")

    def _our_stop(self, t, old):
        t.reason = "left"
        self._release(t, old, "left")

    def _our_again(self, t, old):
        t.next = t.done
        self._our_offer(t, old)

    def _our_abandon(self, t, old, why):
        t.reason = "abandoned"
        self.out.do(ReleaseFile(t.file))
        self.out.show([f"transfer of {t.kind} {visible(t.name)} abandoned: {why}"], "notice")

    def _release(self, t, old, reason):
        """Close our file; tell the peer, if it had the offer."""
        if old is not Out.PREPARING:
            self.out.do(ReleaseFile(t.file))
        if old in (Out.OFFERED, Out.SENDING):
            self.out.send(Cancel(t.file, reason))

    def _moved(self, t):
        if t.done > t.most:  # a receiver that starts over again and again is not progress
            t.most, self.progress_at = t.done, self.now
        progressed(self.out, t, self.now)

    def _pump(self):
        """Send chunks of the files being sent, round the files, while each has less than its window in flight."""
        if not self.out.live:
            return
        for t in self.moving:
            while t.next < t.size and t.next - t.done < self.window:
                length = min(self.chunk_size, t.size - t.next)
                self.out.send(ChunkOf(t.file, t.next, length))
                t.next += length
                t.sent = max(t.sent, t.next)


class Receiving:
    """The peer's files, each in its own state (In) in one table: offered, answered (by the user, or at once: a
    folder to receive into, a pipe that declines), written a few at a time (MAX_OPEN_FILES), checked and saved. No
    I/O: the shell opens, writes, saves and discards when asked."""

    NOUN = "file"

    # The peer's. offer: offered again (after a reconnection); accept, decline: the user's answer (or the folder's);
    # open: room among MAX_OPEN_FILES; opened, saved, failed: the shell's; chunk, cancel: the peer's; whole: the last
    # byte is written; stop: we leave; abandon: the chat ended or a new client took it over.
    TABLE = Table(In, """
              offer   accept  decline open    opened    chunk     whole     saved failed  cancel    stop    abandon
    ASKED     .       WAITING REFUSED .       discard   !         .         .     REFUSED CANCELLED REFUSED CANCELLED
    WAITING   .       .       .       OPENING discard   !         .         .     REFUSED CANCELLED REFUSED CANCELLED
    OPENING   .       .       .       .       RECEIVING !         .         .     REFUSED CANCELLED REFUSED CANCELLED
    RECEIVING restate .       .       .       discard   RECEIVING VERIFYING .     REFUSED CANCELLED REFUSED CANCELLED
    VERIFYING .       .       .       .       discard   !         .         DONE  REFUSED CANCELLED REFUSED CANCELLED
    DONE      restate .       .       .       discard   !         .         .     .       .         .       .
    REFUSED   restate .       .       .       discard   .         .         .     .       .         .       .
    CANCELLED restate .       .       .       discard   .         .         .     .       .         .       .
    """, prefix="_their_")


    def __init__(self, out, interactive=False, receive_files=False, max_file_size=MAX_FILE_SIZE):
        self.out, self.interactive = out, interactive
        self.receive_files, self.max_file_size = receive_files, max_file_size  # accept offers into a folder
        self.incoming = {}  # file number (the peer's) -> _Transfer
        self.left_unfinished = []  # accepted files we stopped receiving when we left
        self.now = 0.0

    def _in(self, t, name, *args):
        return self.TABLE.move(self, t, name, *args)

    def failed(self, event):
        t = self.incoming.get(event.file)
        if t is not None and self._in(t, "failed", event.reason, event.detail):
            self._open_waiting()

    def opened(self, event):
        t = self.incoming.get(event.file)
        if t is None:
            return self.out.do(DiscardFile(event.file))
        self._in(t, "opened")

    def saved(self, event):
        t = self.incoming.get(event.file)
        if t is not None and self._in(t, "saved", event.path, event.problems, event.got, event.unlisted):
            self._open_waiting()

    def answer(self, accept):
        """/accept or /decline: the oldest file the peer offered that is not answered."""
        asked = [t for t in self.incoming.values() if t.state is In.ASKED]
        if not asked:
            return self.out.show([f"/{'accept' if accept else 'decline'}: no file is offered"], "error")
        t = asked[0]
        if accept:
            self._in(t, "accept")
            return self._open_waiting()
        self._in(t, "decline", "declined")
        self.out.show([f"declined file {visible(t.name)}"], "notice")

    def again(self, fresh):
        """A new link: answer an offer made again once more; a fresh numbering forgets the files of the last."""
        if fresh:
            self.abandon(fresh)
            self.incoming.clear()
        for t in self.incoming.values():
            t.restated = False

    def stop(self):
        """We are leaving: what the peer sends us is of no use any more."""
        for t in list(self.incoming.values()):
            self._in(t, "stop")

    def abandon(self, why):
        for t in list(self.incoming.values()):
            self._in(t, "abandon", why)

    # -- the peer's offers and bytes: every field checked before the table moves

    def _got_offer(self, offer):
        t = self.incoming.get(offer.file)
        if t is not None:  # offered again after a reconnection: say where we stand, once on each link
            if not t.restated:
                t.restated = True
                self._in(t, "offer")
            return
        if sum(t.active for t in self.incoming.values()) >= MAX_OFFERED:
            raise RemoteProtocolError(f"more than {MAX_OFFERED} files offered at once")
        finished = [file for file, t in self.incoming.items() if not t.active]
        for file in finished[: max(0, len(finished) - KEPT_FINISHED + 1)]:
            del self.incoming[file]
        t = self.incoming[offer.file] = _Transfer(offer.file, False, In.ASKED, safe_name(offer.name), offer.size,
                                                  offer.sha256)
        if type(offer) is FolderOffer:
            t.folder = (offer.files, offer.bytes)
        shown = t.described()
        if offer.size > self.max_file_size:
            self._in(t, "decline", "too large")
            self.out.show([f"refused {shown}: it is over --max-file-size ({size_text(self.max_file_size)})"], "notice")
        elif self.receive_files:
            self._in(t, "accept")
            self._open_waiting()
        elif self.interactive:
            self.out.show([f"the peer offers {shown}: /accept to save it, /decline not to"], "notice")
        else:
            self._in(t, "decline", "declined")
            self.out.show([f"declined {shown}: there is no --receive-dir to save it in"], "notice")

    def _got_chunk(self, chunk):
        t = self.incoming.get(chunk.file)
        if t is None:
            raise RemoteProtocolError("a file chunk out of place")
        self._in(t, "chunk", chunk)

    def _got_cancel(self, cancel):
        t = self.incoming.get(cancel.file)
        if t is None:
            raise RemoteProtocolError("a cancellation of a file never offered")
        if self._in(t, "cancel", cancel.reason):
            self._open_waiting()

    def _got_exec(self, record):
        t = self.incoming.get(record.file)
        if t is None or t.folder:
            raise RemoteProtocolError("execute bits for a file never offered")
        if t.active:
            t.bits = record.bits

    RECORDS = {Offer: _got_offer, FolderOffer: _got_offer, Exec: _got_exec, Chunk: _got_chunk, Cancel: _got_cancel}

    # -- the rules: _their_<input>(t, the state it was in, ...)

    def _their_decline(self, t, old, reason):
        t.reason = reason
        self.out.send(Refuse(t.file, reason))

    def _their_open(self, t, old):
        self.out.do(OpenFile(t.file, t.name, t.size, t.folder[0] if t.folder else None))

    def _their_opened(self, t, old):
        t.started, t.start_done = self.now, 0
        self.out.show([f"receiving {t.described()}"], "notice")
        self.out.send(Accept(t.file, 0))
        if t.size == 0:
            self._in(t, "whole")

    def _their_chunk(self, t, old, chunk):
        if chunk.offset != t.done or t.done + len(chunk.data) > t.size:
            raise RemoteProtocolError("a file chunk out of place")
        self.out.do(WriteFile(t.file, chunk.data))
        t.done += len(chunk.data)
        progressed(self.out, t, self.now)
        self.out.send(FileAck(t.file, t.done))  # at once, not when drained: the sender's next chunk overlaps ours
        if t.done == t.size:
            self._in(t, "whole")

    def _their_whole(self, t, old):
        self.out.do(SaveFile(t.file, t.sha256, t.name, t.bits))

    def _their_saved(self, t, old, path, problems, got, unlisted=0):
        self.out.send(Done(t.file))
        if t.folder:
            files, size = got or (t.folder[0] - len(problems) - unlisted, t.folder[1])  # what arrived, not claimed
            self.out.show([f"received folder {visible(t.name)} ({files:,} file{'s' if files != 1 else ''}, "
                           f"{size_text(size)}) → {visible(path)}"], "event")
            shown, more = briefly(problems)
            more += unlisted
            for problem in shown:
                self.out.show([f"not saved from folder {visible(t.name)}: {problem}"], "error")
            if more:
                self.out.show([f"not saved from folder {visible(t.name)}: {more} more files"], "error")
        else:
            self.out.show([f"received file {visible(t.name)} ({t.size:,} bytes, sha256 {t.sha256[:12]}…) → "
                           f"{visible(path)}"], "event")

    def _their_failed(self, t, old, reason, detail):
        self._refuse(t, old, reason)
        self.out.show([f"{t.kind} {visible(t.name)} not saved: {detail}"], "error")

    def _their_cancel(self, t, old, reason):
        self.out.show([f"transfer of {t.kind} {visible(t.name)} abandoned: the peer {CANCELS_OF_FILES[reason]}"],
                      "notice")
        self._discard(t, old)  # (after: what of a folder stays is said after it)

    def _their_stop(self, t, old):
        self._refuse(t, old, "cancelled")
        if old is not In.ASKED:  # accepted, and on its way when we left: the last line lists it
            self.left_unfinished.append(t)

    def _their_abandon(self, t, old, why):
        self.out.show([f"transfer of {t.kind} {visible(t.name)} abandoned: {why}"], "notice")
        self._discard(t, old)

    def _refuse(self, t, old, reason):
        self._discard(t, old)
        t.reason = reason
        self.out.send(Refuse(t.file, reason))

    def _discard(self, t, old=None):
        """Remove the temporary file, if there is one (or a late one, opened after the file was given up)."""
        if old is None or old in HOLDING:
            self.out.do(DiscardFile(t.file))

    def _restate(self, t):
        """Offered again: say where we stand."""
        if t.state is In.RECEIVING:
            self.out.send(Accept(t.file, t.done))
        elif t.state is In.DONE:
            self.out.send(Done(t.file))
        else:
            self.out.send(Refuse(t.file, t.reason or "cancelled"))

    def _open_waiting(self):
        """Open the files accepted and waiting, while fewer than MAX_OPEN_FILES are being written."""
        busy = sum(t.state in HOLDING for t in self.incoming.values())
        for t in [t for t in self.incoming.values() if t.state is In.WAITING][: max(MAX_OPEN_FILES - busy, 0)]:
            self._in(t, "open")


class Transfers:
    """Files, both ways: Sending (ours) and Receiving (the peer's), each a table of its own; this routes the
    session's inputs and the peer's records to them, and answers for both."""

    OUTGOING, INCOMING = Sending.TABLE, Receiving.TABLE

    def __init__(self, out, interactive=False, receive_files=False, max_file_size=MAX_FILE_SIZE, chunk_size=CHUNK_SIZE):
        self.out, self.sending = out, Sending(out, chunk_size, strict=not interactive)
        self.receiving = Receiving(out, interactive, receive_files, max_file_size)
        self.outgoing, self.incoming = self.sending.outgoing, self.receiving.incoming

    @property
    def now(self):
        return self.sending.now

    @now.setter
    def now(self, now):
        self.sending.now = self.receiving.now = now

    def send(self, path):
        self.sending.send(path)

    def ready(self, event):
        self.sending.ready(event)

    def failed(self, event):
        (self.sending.unreadable if event.outgoing else self.receiving.failed)(event)

    def opened(self, event):
        self.receiving.opened(event)

    def saved(self, event):
        self.receiving.saved(event)

    def note(self, event):
        self.sending.note(event)

    def answer(self, accept):
        self.receiving.answer(accept)

    def resumed(self, fresh):
        """The conversation resumed on a new link: what was on its way goes on from where the receiver stands.
        fresh is why the numbering starts afresh (a new client, a restarted server), or None."""
        if fresh:
            self.sending.abandon(fresh)
        self.receiving.again(fresh)
        self.sending.again()

    def stop_incoming(self):
        """We are leaving: what the peer sends us is of no use any more."""
        self.receiving.stop()

    def stop_all(self):
        """We leave now: our files are cancelled (and listed as not delivered), the peer's refused."""
        self.sending.stop()
        self.receiving.stop()

    def abandon(self, why):
        """A new peer, or the end: no transfer goes on; the user is told of each that was on its way."""
        self.sending.abandon(why)
        self.receiving.abandon(why)

    @property
    def unfinished(self):
        return self.sending.unfinished

    @property
    def moving(self):
        return self.sending.moving

    @property
    def unanswered(self):
        """Whether the peer has yet to answer one of our files (or one is still being prepared)."""
        return any(t.state in (Out.PREPARING, Out.READY, Out.OFFERED) for t in self.unfinished)

    @property
    def progress_at(self):
        return self.sending.progress_at

    @progress_at.setter
    def progress_at(self, when):
        self.sending.progress_at = when

    def left_behind(self, code, text):
        """The last line, with our files that did not arrive, and the peer's we left before they had."""
        code, text = self.sending.left_behind(code, text)
        if self.receiving.left_unfinished:
            text = f"{text}; {listed(self.receiving.left_unfinished, 'left unfinished')}"
        return code, text

    def status(self, now, live):
        """The status line's field for the first file moving, in ever shorter forms."""
        moving = [t for t in (*self.outgoing.values(), *self.incoming.values())
                  if t.state in (Out.SENDING, In.RECEIVING)]
        return progress_field(moving[0], len(moving) - 1, now, live) if moving else [""]

    def record(self, event, now):
        """A record of the peer's about files: an offer or bytes (Receiving), an answer to ours (Sending)."""
        self.now = now
        machine = self.receiving if type(event) in Receiving.RECORDS else self.sending
        machine.RECORDS[type(event)](machine, event)


# ---------------------------------------------------------------------------------------------------
# Redial: the client reconnecting (the server holding the conversation) while no link is up.


class Away(enum.Enum):
    UP = "up"  # a link is attached (the first is dialled by the program, before the session exists)
    HOLDING = "holding"  # (server) no link: the conversation is kept for its client
    BACKING_OFF = "backing off"  # (client) the next attempt is due at next_at
    DIALING = "dialing"  # (client) an attempt is on its way
    ASKING = "asking"  # (client, on a terminal) only the user may offer the passphrase: /reconnect


class Redial:
    """One outage, from the loss of a link to the conversation resuming on another, whatever fails in between: its
    deadline (the grace period), its one back-off rule, and which secret the next attempt proves. The passphrase
    goes only when the user asks (/reconnect), or for a script's client that was never let in (it waits its turn
    with the passphrase it was started with); after any authenticated link, the next attempt proves the resumption
    secret that link's handshake gave."""

    NOUN = "reconnection"

    # lost: the conversation's link went (an outage begins); cut: a link went before the conversation resumed on it
    # (the same outage goes on); due: the time for the next attempt came; retry: an attempt failed, or the server
    # was busy: try again later; ask: only the user may decide (the server does not know the conversation, or the
    # user's own attempt failed); reconnect: the user typed /reconnect; attached: a link is up.
    CLIENT = Table(Away, """
                  lost     cut          due      retry        ask      reconnect  attached
    UP            DIALING  BACKING_OFF  .        BACKING_OFF  ASKING   .          UP
    BACKING_OFF   .        .            DIALING  .            ASKING   .          UP
    DIALING       .        .            .        BACKING_OFF  ASKING   .          UP
    ASKING        .        .            .        .            .        DIALING    UP
    """)
    SERVER = Table(Away, """
                  lost     cut      due  retry  ask  reconnect  attached
    UP            HOLDING  HOLDING  .    .      .    .          UP
    HOLDING       .        .        .    .      .    .          UP
    """)

    def __init__(self, out, table, grace, dials):
        self.out, self.table, self.grace, self.dials = out, table, grace, dials
        self.state = Away.UP
        self.since = None  # when the outage began (None: there is none)
        self.next_at = None  # when the next attempt is due
        self.retry = FIRST_RETRY  # the back-off: doubled after each failure, to LAST_RETRY
        self.kind = RESUME  # what the next attempt proves: the resumption secret, or the passphrase
        self.failures = 0  # attempts in a row that failed to authenticate
        self.last = None  # why the last attempt failed
        self.now = 0.0

    def move(self, name, *args):
        return self.table.move(self, self, name, *args)

    @property
    def away(self):
        return self.state is not Away.UP

    def expired(self, now):
        return self.away and now >= self.since + self.grace

    def due(self, now):
        return self.state is Away.BACKING_OFF and now >= self.next_at

    def next_wakeup(self):
        if not self.away:
            return []
        return [self.since + self.grace] + ([self.next_at] if self.state is Away.BACKING_OFF else [])

    def resumed(self):
        """The conversation runs again: the outage is over."""
        self.since, self.failures, self.retry = None, 0, FIRST_RETRY

    # Each of the next three returns how the chat ends, (exit code, line, whether to list what was not delivered),
    # or None while it goes on.

    def failed(self, error, begun, interactive):
        """An attempt failed: back off and try again, ask the user, or give up."""
        kind, self.kind, self.last = self.kind, RESUME if begun else PASSPHRASE, describe(error)
        if isinstance(error, Refused) and error.reason in WAITED_OUT and not begun:
            return self.wait_turn(interactive, error)
        if isinstance(error, Refused) and error.reason == SHED:  # a reconnection shed: tried again, as if lost
            self.move("retry")
            return None
        if isinstance(error, Refused):
            return self.refused(error, interactive)
        if kind == PASSPHRASE and interactive and type(error) is AuthenticationError:
            # The user's own attempt was refused (the server may have started again with another passphrase): theirs
            # to type again, each a try the server counts, as at the first prompt: three in a row, and it stops (a
            # man in the middle who forges "unknown" and refuses gets a guess from each).
            self.failures += 1
            if self.failures >= PASSPHRASE_TRIES:
                return (EXIT_SECURITY, f"stopped: {self.failures} passphrases in a row were refused (the last: "
                        f"{describe(error)})", True)
            self.move("ask")
            self.out.show([f"the reconnection failed: {describe(error)}. /reconnect asks for the passphrase again."],
                          "notice")
            return None
        if isinstance(error, RemoteProtocolError) and not isinstance(error, TruncatedFrame):
            why = str(error) if "interfer" in str(error) else f"{error}; someone may be interfering"
            self.failures += 1
            if kind == PASSPHRASE and not interactive:  # a script's client waiting its turn: never a second guess
                return EXIT_SECURITY, f"a connection with the passphrase failed to authenticate: {why}", True
            if self.failures >= AUTH_FAILURES:
                return (EXIT_SECURITY, f"stopped reconnecting: {self.failures} reconnections in a row failed to "
                        f"authenticate (the last: {why})", True)
            self.out.show([f"a reconnection failed to authenticate: {why}"], "warning")
        elif not isinstance(error, (NetworkError, OSError, TruncatedFrame)):
            return EXIT_INTERNAL, describe(error), False
        if kind == PASSPHRASE and interactive:  # one passphrase handshake per deliberate request
            self.move("ask")
            self.out.show([f"the reconnection failed: {describe(error)}. /reconnect tries again."], "notice")
            return None
        self.move("retry")
        return None

    def wait_turn(self, interactive, error=None):
        """Turned away before the chat began, as busy (or told to come back later): a person is told; a script's
        client tries again, backing off, within the grace period, with the passphrase it was started with (a sink
        serves one-shot clients one after another, and several may come at once)."""
        why = str(error) if error is not None else REFUSALS[BUSY_REFUSAL]
        if interactive or not self.dials or self.grace <= 0:
            return EXIT_NETWORK, why, False
        if self.since is None:
            self.out.show([f"{why}; trying again for up to {self.grace:.0f} s"], "notice")
        self.last = why
        self.move("retry", PASSPHRASE)
        return None

    def refused(self, error, interactive):
        """The server will not resume this conversation (unknown), or is busy: only the user may decide to offer
        the passphrase again; a pipe has no one to ask."""
        if not interactive:
            return (EXIT_NETWORK, f"{error}; not offering the passphrase again without you (start the client again "
                    "to begin afresh)", True)
        self.move("ask")
        self.out.show([f"{error}."], "notice")
        self.out.show(["Type /reconnect to connect again with the passphrase (it is asked for), or quit() to leave."],
                      "notice")
        return None

    # -- rules: _on_<input>(self, the state it was in, ...)

    def _on_lost(self, _, old):
        self.since, self.next_at, self.retry, self.kind = self.now, self.now, FIRST_RETRY, RESUME
        if self.state is Away.DIALING:
            self.out.do(Dial(RESUME))

    def _on_cut(self, _, old, reason):
        self.last = reason
        self._back_off()

    def _on_due(self, _, old):
        self.out.do(Dial(self.kind))

    def _on_retry(self, _, old, kind=None):
        if self.since is None:
            self.since = self.now
        self.kind = kind or self.kind
        self._back_off()

    def _on_reconnect(self, _, old):
        self.kind = PASSPHRASE
        self.out.do(Dial(PASSPHRASE))

    def _on_attached(self, _, old, begun):
        # The link authenticated. If it is cut before the conversation resumes, the next attempt proves the secret
        # its handshake gave (the server holds our conversation, or says it does not and the user is asked); a
        # passphrase attempt never repeats itself. A client that was never let in has no conversation to resume.
        self.kind = RESUME if begun else PASSPHRASE

    def _back_off(self):
        self.next_at, self.retry = self.now + self.retry, min(self.retry * 2, LAST_RETRY)


# ---------------------------------------------------------------------------------------------------
# Leaving: the user asked to go; what is still on its way gets a bounded wait.


class Going(enum.Enum):
    STAYING = "staying"
    WAITING = "waiting"  # for what is still on its way, until the deadline
    TOLD = "told"  # and the user has been told what it waits for
    GONE = "gone"  # the session says goodbye and ends


class Waits(collections.namedtuple("Waits", "messages paced pace moving files unanswered progress")):
    """What leaving waits for, at a moment: messages not acknowledged, legacy messages not yet sent (and their pace),
    the names of our files on their way, whether any of ours is unfinished, whether the peer has yet to answer one,
    and when one last got further."""

    __slots__ = ()

    def __bool__(self):
        return bool(self.messages or self.paced or self.files)


class Leaving:
    """Leaving waits up to FLUSH_TIMEOUT for messages and offers, and for a file on its way as long as it gets
    further within FILE_STALL; it says what it waits for once that takes more than LEAVING_NOTICE."""

    NOUN = "leaving"

    # leave: quit(), Ctrl-D or end of input; notice: LEAVING_NOTICE passed; idle: nothing is waited for any more;
    # due: the deadline passed.
    TABLE = Table(Going, """
                leave    notice  idle  due
    STAYING     WAITING  .       .     .
    WAITING     .        TOLD    GONE  GONE
    TOLD        .        .       GONE  GONE
    GONE        .        .       .     .
    """)

    def __init__(self, out):
        self.out = out
        self.state = Going.STAYING
        self.by = self.notice_at = None
        self.answers_by = math.inf

    def move(self, name, *args):
        return self.TABLE.move(self, self, name, *args)

    @property
    def waiting(self):
        return self.state in (Going.WAITING, Going.TOLD)

    def deadline(self, waits):
        """Messages get FLUSH_TIMEOUT; a file on its way, as long as it keeps moving; an offer not yet answered, as
        long as the leaving allows (a script's --send waits for a person; inf, where there is no bound), and that
        alone when nothing else is waited for (--wait 3 is 3 s, not the messages' 10)."""
        if waits.unanswered and not (waits.messages or waits.paced or waits.moving):
            return self.answers_by
        deadline = max(self.by, waits.progress + FILE_STALL) if waits.moving else self.by
        return max(deadline, self.answers_by) if waits.unanswered else deadline

    def idle(self, waits):
        """Whether it is time to go because nothing is waited for any more (asked after every input)."""
        return self.waiting and not waits and self.move("idle")

    def tick(self, now, waits):
        """Whether it is time to go because the deadline passed; else the notice, when it is due."""
        if not self.waiting:
            return False
        if now >= self.deadline(waits):
            return self.move("due")
        if now >= self.notice_at:
            self.move("notice", now, waits)
        return False

    def next_wakeup(self, waits):
        if not self.waiting:
            return []
        times = [self.deadline(waits)] + ([self.notice_at] if self.state is Going.WAITING else [])
        return [t for t in times if t != math.inf]

    def _on_leave(self, _, old, now, wait, answers):
        self.by, self.notice_at = now + wait, now + LEAVING_NOTICE
        self.answers_by = math.inf if answers is None else now + answers

    def _on_notice(self, _, old, now, waits):
        self.out.show([f"leaving: {self.words(now, waits)}; Ctrl-C leaves now"], "notice")

    def words(self, now, waits):
        parts = []
        if waits.messages:
            n = waits.messages
            parts.append(f"up to {self.by - now:.0f} s for the peer to acknowledge {n} message{'s' if n != 1 else ''}")
        elif waits.paced:
            n = waits.paced
            parts.append(f"for {n} message{'s' if n != 1 else ''} to go, one every {waits.pace} s")
        if waits.moving:
            *rest, last = waits.moving
            moving = f"{', '.join(rest)} and {last}" if rest else last
            parts.append(f"for {moving} to arrive, while {'they move' if rest else 'it moves'}")
        elif waits.unanswered and self.answers_by == math.inf:
            parts.append("for the peer to answer the files offered")
        elif waits.files:
            parts.append(f"up to {self.deadline(waits) - now:.0f} s for the peer to take the files offered")
        return "waiting " + " and ".join(parts) if parts else "waiting"


class Role:
    """What differs between the two ends of a chat."""

    def __init__(self, name, opens_resume, reconnects, away, gave_up, redial):
        self.name, self.opens_resume, self.reconnects, self.away, self.gave_up = (
            name, opens_resume, reconnects, away, gave_up)
        self.redial = redial  # Redial's table: the client dials, the server holds


CLIENT = Role("client", opens_resume=True, reconnects=True, away="reconnecting",
              gave_up="connection lost: could not reconnect within {grace:.0f} s", redial=Redial.CLIENT)
SERVER = Role("server", opens_resume=False, reconnects=False, away="waiting for the client",
              gave_up="the client did not come back within {grace:.0f} s", redial=Redial.SERVER)


class _LinkState:
    def __init__(self, link, peer, how, now):
        self.link, self.peer, self.how, self.goodbye = link, peer, how, False
        self.resumed = False  # the Resume exchange finished on it: the conversation ran over it
        self.attached = now
        self.pings, self.ping_second = 0, now
        self.heard = self.pinged = now  # when the peer was last heard from, and we last pinged it

    def next_ping(self, keepalive):
        return max(self.heard, self.pinged) + keepalive

    def pinged_by_peer(self, now):
        """A ping from the peer: one every keepalive is the rule, more than MAX_PINGS in a second an attack."""
        if now - self.ping_second >= 1:
            self.pings, self.ping_second = 0, now
        self.pings += 1
        if self.pings > MAX_PINGS:
            raise RemoteProtocolError(f"more than {MAX_PINGS} pings in a second")


def size_text(size):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} byte{'s' if size != 1 else ''}"


def undelivered_text(messages, sent_below):
    """What a chat that ends left behind: messages sent but not acknowledged (they may have arrived: no receipt
    came back) and messages that never left (queued, or paced for legacy)."""
    parts = []
    for group, words in (([m for m in messages if m.id < sent_below], "sent but not acknowledged (they may not "
                                                                        "have arrived)"),
                         ([m for m in messages if m.id >= sent_below], "never sent")):
        if group:
            shown = ", ".join(first_words(m.text) for m in group[:5])
            more = f" and {len(group) - 5} more" if len(group) > 5 else ""
            n = len(group)
            words = words.replace("they may", "it may") if n == 1 else words
            parts.append(f"{n} message{'s' if n != 1 else ''} {words}: {shown}{more}")
    return "; ".join(parts)


def banner(peer, fmt, interactive, role=None):
    """The lines that open a chat, each within 80 columns (with an IPv4 peer), as (kind of Show, line)."""
    if fmt.acknowledges:
        lines = [f"Connected to {peer}: authenticated and encrypted ({fmt.name})."]
    else:
        lines = [f"Connected to {peer} in the legacy format: NOT SECURE.",
                 f"Here {VERIFIED} = verified and {FAILED} = failed, where the original scripts",
                 f"show {ORIGINAL_VERIFIED} = verified and {ORIGINAL_FAILED} = failed."]
    if interactive:
        glyphs = f"{VERIFIED} = verified, {FAILED} = failed; " if fmt.acknowledges else ""
        lines.append(f"{glyphs}/help lists the commands.")
        lines.append(f"quit() or Ctrl-D leaves{' and stops the server' if role is SERVER else ''}.")
    return [("notice", line) for line in lines] + [("keys", line) for line in KEYS if interactive]


# The keys of the terminal's editor: shown as kind "keys", which an interface without one (TERM=dumb) leaves out.
KEYS = ["Enter sends; Alt-Enter starts a new line; Tab completes.",
        "Ctrl-C clears the line; on an empty line it leaves."]
HELP = ["/help          this list; /quit (or quit(), or Ctrl-D) leaves",
        "/send PATH     offer a file or a folder; the peer accepts or declines it",
        "/accept        save the file the peer offers (/decline: do not)",
        "/reconnect     ask for the passphrase and connect again (when the server asks)",
        "//text         send a message that begins with /text"]
HELP_KEYS = ["Alt-Enter (or Esc, then Enter) starts a new line in a message.",
             "Tab completes a command, or the path after /send.",
             "Ctrl-C clears the line; on an empty line it leaves."]


def resumed_notice(role, first, again, took_over, peer):
    """What a Resume exchange tells the user, if anything: again is how many messages went again."""
    if first:
        return f"sent {again} message{'s' if again > 1 else ''} typed before the chat began" if again else None
    if took_over:
        resent = (f"; it is sent the {again} message{'s' if again != 1 else ''} the last one had not "
                  "acknowledged") if again else ""
        return f"a new client ({peer}) took the conversation over{resent}"
    who = "reconnected to" if role.opens_resume else "the client reconnected from"
    return f"{who} {peer}" + (f" ({again} sent again)" if again else "")


RECONNECT_NOT_NEEDED = ("/reconnect: not needed now (it is for when the server no longer knows this conversation; a "
                        "lost connection is retried by itself)")


def is_quit(line, interactive):
    """quit(), as the original scripts had it; /quit too, for a person."""
    return line.strip() == "quit()" or (interactive and line.strip() == "/quit")


COMMAND_NAMES = ("help", "quit", "send", "accept", "decline", "reconnect")


def command_of(text):
    """The name of the command a person typed (without its /), or None: the text is a message. A text of several
    lines (a paste) is never a command, nor one that begins with //."""
    if text.startswith("/") and not text.startswith("//") and "\n" not in text:
        return text[1:].partition(" ")[0]
    return None


def message_of(text):
    """What a person's typed text sends: //text sends /text; a text of several lines goes as it is."""
    return text[1:] if text.startswith("//") and "\n" not in text else text


class Messages:
    """The messages of a chat, both ways, without I/O: numbered, shown once each and acknowledged cumulatively (v2,
    through the Conversation), or paced one at a time for an original (legacy); what was typed and could not be
    sent; and what was not delivered when the chat ends. It sends through the Outbox, which holds them back until
    the conversation is live on a link."""

    def __init__(self, out, fmt, conversation, now, queued=()):
        self.out, self.fmt, self.conversation = out, fmt, conversation
        self._ack_due = None  # the highest message id shown and not yet acknowledged
        self._paced = collections.deque()  # legacy messages waiting for their turn on the wire
        self._next_paced = now
        self.sent = 0  # messages handed to the connection (legacy's only count)
        self.refused = 0  # lines typed that could not be sent at all (too long, too many waiting)
        for text, timestamp in queued:  # typed before the chat existed: they go first
            if fmt.acknowledges:
                self.conversation.new_message(text, timestamp)
            else:
                self._paced.append(Message(len(self._paced), text, timestamp))

    def typed(self, text, timestamp, now):
        if not self.fmt.acknowledges:
            return self._typed_legacy(text, timestamp, now)
        if len(self.conversation.unacked) >= MAX_QUEUED:
            return self._not_sent(f"{MAX_QUEUED} messages are waiting for the peer already")
        try:
            message = self.conversation.new_message(text, timestamp)
        except LocalProtocolError as e:
            return self._not_sent(e)
        if self.out.live:
            self.send(message)
            self.out.show(sent_lines(text, timestamp), "sent")
        else:
            self.out.show(sent_lines(text, timestamp, "Queued"))
            self.out.show(["(to be sent when the connection is back)"], "event")

    def _not_sent(self, why):
        self.refused += 1
        self.out.show([f"not sent: {why}"], "error")

    def _typed_legacy(self, text, timestamp, now):
        try:
            check_message_text(text)
        except LocalProtocolError as e:
            return self._not_sent(e)
        warnings = legacy_warnings(text)
        if warnings:  # before it goes, as promised
            self.out.show(["an original receiver will mangle this message: " + "; ".join(warnings)], "warning")
        self._paced.append(Message(self.sent + len(self._paced), text, timestamp))
        self.release(now)

    def send(self, message):
        if self.out.send(message):
            self.conversation.put_on_wire(message.id)

    def got(self, message, arrived, sender):
        if not self.fmt.acknowledges:
            return self.out.show(verify_and_display(message, arrived, sender))
        if self.conversation.accept(message):  # each id shown once, in order
            self.out.show(verify_and_display(message, arrived, sender))
        self._ack_due = self.conversation.expected_id - 1  # cumulative: everything shown so far

    def acknowledge(self):
        if self._ack_due is not None:
            self.out.send(Ack(self._ack_due))
            self._ack_due = None

    def link_dropped(self):
        self._ack_due = None  # the next link's Resume exchange says what arrived

    def release(self, now):
        """Legacy pacing: one message at a time, LEGACY_PACE apart, each in its own write."""
        if self._paced and self.out.live and now >= self._next_paced:
            message = self._paced.popleft()
            self.send(message)
            self.sent += 1
            self.out.show(sent_lines(message.text, message.timestamp), "sent")
            self._next_paced = now + self.fmt.pace

    def next_wakeup(self):
        return [self._next_paced] if self._paced and self.out.live else []

    def waiting(self):
        """(messages not acknowledged, legacy messages not yet sent): what leaving waits for."""
        return len(self.conversation.unacked) if self.fmt.acknowledges else 0, len(self._paced)

    def undelivered(self):
        if not self.fmt.acknowledges:
            return list(self._paced)
        return list(self.conversation.unacked.values())

    def ended(self):
        self._paced.clear()

    def left_behind(self, code, text, undelivered):
        """The last line with the messages left behind; any makes a normal end a failure (1)."""
        if undelivered:
            sent_below = self.conversation.sent if self.fmt.acknowledges else -1  # legacy: only the paced are left
            text, code = f"{text}; {undelivered_text(list(undelivered), sent_below)}", code or EXIT_NETWORK
        if self.refused:
            n = self.refused
            text, code = f"{text}; {n} line{'s' if n > 1 else ''} typed could not be sent", code or EXIT_NETWORK
        return code, text

    def status(self):
        if self.fmt.acknowledges:
            n = len(self.conversation.unacked)
            return [f"{n} undelivered", f"{n} pending"]
        return [f"{self.sent} sent, delivery unknown", f"{self.sent} sent, unconfirmed", f"{self.sent} sent"]


class Session:
    """Every rule of one chat, without I/O: step(input, now) returns the actions to carry out, in order.

    It coordinates small machines, each with a table of states, that share its Outbox (so actions keep their order)
    and hold no reference to it or to one another: Transfers (files, both ways), Redial (an outage: the client
    reconnecting, the server holding the conversation) and Leaving (the bounded wait when the user leaves). The
    Session keeps the phase (Phase), the link, the messages (Conversation) and legacy pacing. Client and server, v2
    and legacy, differ by the attributes of CLIENT/SERVER and V2/LEGACY.

    What may arrive on a link, by phase (RECORDS; a test holds this table to it). In any other phase a record is
    the peer's violation: an alert (v2), and the chat ends as a security failure (exit 3).

    | record           | phases          | rule                                                                   |
    |------------------|-----------------|------------------------------------------------------------------------|
    | Resume           | STARTING        | reply (server), send again what the peer lacks, LIVE; the banner, or   |
    |                  |                 | "reconnected", or "a new client took the conversation over"            |
    | Busy             | STARTING        | (client) never let in: a script waits its turn, a person is told; let  |
    |                  |                 | in before: another client won the conversation, the user is asked      |
    | Message          | LIVE            | show each id once, in order; acknowledge when Drained (cumulatively)   |
    | Ack              | LIVE            | forget the messages it covers                                          |
    | Offer,           | LIVE            | Transfers (v2 only)                                                    |
    | FolderOffer,     |                 |                                                                        |
    | Exec, Accept,    |                 |                                                                        |
    | FileAck, Chunk,  |                 |                                                                        |
    | Done, Refuse,    |                 |                                                                        |
    | Cancel           |                 |                                                                        |
    | Ping             | STARTING, LIVE  | answer Pong at once; more than MAX_PINGS in a second is a violation    |
    | Pong             | STARTING, LIVE  | nothing more: anything heard is a sign of life                         |
    | Goodbye          | STARTING, LIVE  | the close that follows is the peer leaving                             |
    | Alert            | STARTING, LIVE  | end 3: the peer found one of our records bad                           |
    | ConnectionClosed | STARTING, LIVE  | after a goodbye, end 0 (legacy: always); else lost: Redial, or end 1   |

    The other inputs: Typed (Messages, or a command on a terminal); Attached (the new link replaces the old; v2:
    STARTING, the client sends its Resume; legacy: LIVE at once); Drained (acknowledge what was shown); Failed (the
    network's: lost; a bad record: alert, end 3; else end 4); Tick (keepalive, the Resume deadline, Redial, Leaving,
    legacy pacing); Leave (Leaving); Interrupt (stop the files, goodbye, end now); DialFailed (Redial); File...
    (Transfers). Once ENDED, a link that arrives late is closed and nothing else happens.
    """

    def __init__(self, role, fmt, conversation, now, keepalive=KEEPALIVE, grace=RECONNECT_FOR,
                 interactive=False, queued=(), receive_files=False, max_file_size=MAX_FILE_SIZE, send=(),
                 chunk_size=CHUNK_SIZE, log=False):
        self.role, self.fmt, self.conversation = role, fmt, conversation
        self.keepalive, self.dead_after = keepalive, keepalive * DEAD_AFTER
        self.interactive, self.log = interactive, log  # log: messages dated, with the sender's address
        self.now = now
        self.out = Outbox()
        self.messages = Messages(self.out, fmt, conversation, now, queued)
        self.transfers = Transfers(self.out, interactive, receive_files, max_file_size, chunk_size)
        self.transfers.progress_at = now
        self.redial = Redial(self.out, role.redial, grace if fmt.resumes else 0.0, role.reconnects)
        self.leaving = Leaving(self.out)
        self.phase = Phase.STARTING
        self._link = None  # _LinkState of the current link
        self._last_peer, self._arrived = "", None  # _arrived: when the record being taken arrived (time.time())
        self._begun = False  # the chat has been LIVE once
        self._to_send = list(send)  # offered as soon as the chat begins

    # -- the interface

    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, phase):
        self._phase = phase
        self.out.live = phase is Phase.LIVE

    @property
    def link(self):
        return None if self._link is None else self._link.link

    @property
    def ended(self):
        return self.phase is Phase.ENDED

    def step(self, event, now):
        """Take one input; the actions it calls for, in order."""
        self.now = self.transfers.now = self.redial.now = now
        self.out.actions = []
        if self.phase is Phase.ENDED:
            if isinstance(event, Attached):
                self.out.do(Close(event.link, False))
            return self.out.take()
        try:
            self._INPUTS[type(event)](self, event)
            if self.leaving.waiting and not self.ended and self.leaving.idle(self._waits()):
                self._finish_leaving()
        except RemoteProtocolError as error:  # a record that passed its MAC but breaks a rule
            self._violation(error)
        return self.out.take()

    def crash(self, error):
        """The shell's last resort when a rule itself raised (a bug): end the chat, closing its link."""
        self.out.actions = []
        self._end(EXIT_INTERNAL, describe(error))
        return self.out.take()

    def next_wakeup(self):
        """When the next Tick is needed (monotonic seconds), or None."""
        if self.ended:
            return None
        times, link = [], self._link
        if link is not None and self.fmt.keepalive:
            times += [link.next_ping(self.keepalive), link.heard + self.dead_after]
        if link is not None and self.phase is Phase.STARTING:
            times.append(link.attached + RESUME_DEADLINE)
        times += self.redial.next_wakeup() + self.messages.next_wakeup()
        if self.leaving.waiting:
            times += self.leaving.next_wakeup(self._waits())
        return min(times) if times else None

    def status(self):
        """The status line's fields in the order shown, each in ever shorter forms, and the order in which they
        give way when the terminal is narrow (see fit_status)."""
        if self.phase is Phase.LIVE:
            state = [f"{self.fmt.name}, {self.fmt.security}", self.fmt.security]
        elif self.phase is Phase.AWAY:
            doing = "type /reconnect" if self.redial.state is Away.ASKING else self.role.away
            state = [f"connection lost, {doing}", f"lost, {doing}", "lost"]
        else:
            state = ["ended" if self.ended else "connecting"]
        files = self.transfers.status(self.now, self.phase is Phase.LIVE)
        return [[self._last_peer, ""], state, self.messages.status(), files, ["quit() to leave", ""]], (4, 0, 1, 2, 3)

    # -- what the user does

    def _typed(self, event):
        text = event.text
        if self.interactive and command_of(text) is not None:
            return self._command(text[1:])  # a person's commands; a script's lines are messages, as they are
        self.messages.typed(message_of(text) if self.interactive else text, event.timestamp, self.now)

    def _command(self, text):
        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name in ("send", "accept", "decline") and not self.fmt.files:
            return self.out.show([f"/{name}: --legacy has no files (the original scripts cannot receive them)"],
                                 "error")
        if name == "send":
            if not argument:
                return self.out.show(["/send PATH: say which file"], "error")
            return self.transfers.send(typed_path(argument))
        if name in ("accept", "decline"):
            return self.transfers.answer(name == "accept")
        if name == "help":
            for line in HELP + HELP_KEYS:
                self.out.show([line], "notice" if line in HELP else "keys")
        elif name == "reconnect":
            if self.redial.state is not Away.ASKING:
                return self.out.show([RECONNECT_NOT_NEEDED], "notice")
            self.redial.move("reconnect")
        else:
            name = visible(name if len(name) <= 40 else name[:40] + "…")
            self.out.show([f"unknown command /{name}: /help lists the commands (//text sends /text)"], "error")

    def _leave(self, event):
        self.leaving.move("leave", self.now, event.wait, event.answers)
        self.transfers.stop_incoming()  # what the peer is sending us is of no use once we go

    def _interrupt(self, event):
        self.transfers.stop_all()
        self._goodbye()
        self._end(event.code, "you left the chat (interrupted)", self.messages.undelivered())

    # -- what the links do

    def _attached(self, event):
        if self._link is not None:
            self._drop_link()  # replaced by the new, authenticated one
        self._link = _LinkState(event.link, event.peer, event.how, self.now)
        self.out.link, self._last_peer = event.link, event.peer
        self.redial.move("attached", self._begun)
        if not self.fmt.resumes:
            return self._live()
        self.phase = Phase.STARTING
        if self.role.opens_resume:
            self.out.send(self.conversation.resume_request())

    def _got(self, got):
        if self._link is None or got.link is not self._link.link:
            return  # from a link already replaced or closed
        self._link.heard, self._arrived = self.now, got.at
        event = got.event
        phases, rule = self.RECORDS.get(type(event), ((), None))
        if self.phase not in phases or (rule is Session._got_file and not self.fmt.files):
            raise RemoteProtocolError(f"an unexpected {type(event).__name__} (the chat is {self.phase.value})")
        rule(self, event)

    def _drained(self, event):
        if self._link is not None and event.link is self._link.link:
            self.messages.acknowledge()  # a lone message at once; what arrived together, with one acknowledgement

    def _failed(self, event):
        if self._link is None or event.link is not self._link.link:
            return
        error = event.error
        if isinstance(error, (TruncatedFrame, NetworkError, OSError)):
            if self._link.goodbye:  # it said goodbye, then its connection reset or broke: it left all the same
                return self._peer_left()
            self._lost(describe(error))
        elif isinstance(error, RemoteProtocolError):
            self._violation(error)
        else:
            self._end(EXIT_INTERNAL, describe(error))

    def _tick(self, event):
        now = self.now
        if self._link is not None and self.phase is Phase.STARTING and now >= self._link.attached + RESUME_DEADLINE:
            self._lost(f"the conversation did not resume within {RESUME_DEADLINE:.0f} s")
        if self._link is not None and self.fmt.keepalive:
            if now - self._link.heard >= self.dead_after:
                self._lost(f"no sign of the peer for {self.dead_after:.0f} s")
            elif now >= self._link.next_ping(self.keepalive):
                self._link.pinged = now
                self.out.send(Ping())
        if self.redial.expired(now):
            last = f" (the last attempt: {self.redial.last})" if self.redial.last else ""
            gave_up = self.role.gave_up.format(grace=self.redial.grace)
            self._end(EXIT_NETWORK, gave_up + last, self.messages.undelivered())
        elif self.redial.due(now):
            self.redial.move("due")
        if self.leaving.waiting and not self.ended and self.leaving.tick(now, self._waits()):
            return self._finish_leaving()
        self.messages.release(now)

    def _dial_failed(self, event):
        if self.phase is Phase.AWAY:
            self._away_unless(self.redial.failed(event.error, self._begun, self.interactive))

    # -- the records, by phase: RECORDS below

    def _got_message(self, event):
        self.messages.got(event, self._arrived, self._link.peer if self.log else None)

    def _got_ack(self, event):
        self.conversation.acknowledged(event.id)

    def _got_busy(self, event):
        if not self.role.opens_resume:
            raise RemoteProtocolError("a busy record from a client")
        self._drop_link()
        if not self._begun:
            return self._away_unless(self.redial.wait_turn(self.interactive))
        # Let in before: another client won the conversation the server held for us.
        self._away_unless(self.redial.refused(Refused("busy", REFUSALS[BUSY_REFUSAL]), self.interactive))

    def _got_file(self, event):
        self.transfers.record(event, self.now)

    def _got_ping(self, event):
        self._link.pinged_by_peer(self.now)
        self.out.send(Pong())

    def _got_pong(self, event):
        pass  # heard: that is all a pong says

    def _got_goodbye(self, event):
        self._link.goodbye = True

    def _got_alert(self, event):
        self._drop_link()
        self._end(EXIT_SECURITY, f"security failure: the peer says {ALERTS[event.reason]}; the chat is closed")

    def _got_closed(self, event):
        if self._link.goodbye:
            self._peer_left()
        elif not self.fmt.resumes:
            self._end(EXIT_OK, "the peer closed the connection", self.messages.undelivered())
        else:
            self._lost("the connection was closed without a goodbye")

    _BOTH = frozenset({Phase.STARTING, Phase.LIVE})  # a record comes only on the current link: never AWAY or ENDED
    RECORDS = {
        Resume: ({Phase.STARTING}, lambda self, event: self._got_resume(event)),
        Busy: ({Phase.STARTING}, _got_busy),
        Message: ({Phase.LIVE}, _got_message),
        Ack: ({Phase.LIVE}, _got_ack),
        **dict.fromkeys((Offer, FolderOffer, Exec, Accept, FileAck, Chunk, Done, Refuse, Cancel),
                        ({Phase.LIVE}, _got_file)),
        Ping: (_BOTH, _got_ping),
        Pong: (_BOTH, _got_pong),
        Goodbye: (_BOTH, _got_goodbye),
        Alert: (_BOTH, _got_alert),
        ConnectionClosed: (_BOTH, _got_closed),
    }

    _INPUTS = {Typed: _typed, Attached: _attached, Got: _got, Drained: _drained, Failed: _failed, Tick: _tick,
               Leave: _leave, Interrupt: _interrupt, DialFailed: _dial_failed,
               **{kind: lambda self, event, name=name: getattr(self.transfers, name)(event) for kind, name in (
                   (FileReady, "ready"), (FileOpened, "opened"), (FileSaved, "saved"), (FileFailed, "failed"),
                   (FileNote, "note"))}}

    # -- rules shared by several inputs

    def _drop_link(self):
        self.out.do(Close(self._link.link, False))
        self._link = self.out.link = None
        self.messages.link_dropped()

    def _live(self):
        first = not self._begun
        self.phase, self._begun = Phase.LIVE, True
        self._link.resumed = True
        self.redial.resumed()
        if first:
            self.out.do(Live())
            for kind, line in banner(self._link.peer, self.fmt, self.interactive, self.role):
                self.out.show([line], kind)
            for path in self._to_send:
                self.transfers.send(path)

    def _got_resume(self, peer):
        first = not self._begun
        if self.role.opens_resume and self._link.how == RESUME and not peer.resumed:
            raise RemoteProtocolError("the server proved it holds the conversation, then said it did not")
        reply, again, took_over = self.conversation.on_resume(peer, server=not self.role.opens_resume)
        if reply is not None:
            self.out.send(reply)
        self._live()
        for message in again:
            self.messages.send(message)
        restarted = self.role.opens_resume and not peer.resumed
        self.transfers.resumed("a new client took the conversation over" if took_over else  # numbering afresh
                               "the server no longer knew the conversation" if restarted else None)
        notice = resumed_notice(self.role, first, len(again), took_over, self._link.peer)
        if notice:
            self.out.show([notice], "notice")

    def _away_unless(self, ending):
        """Away while Redial goes on; or the end it gave."""
        if ending is None:
            self.phase = Phase.AWAY
        else:
            code, text, listed = ending
            self._end(code, text, self.messages.undelivered() if listed else ())

    def _lost(self, reason):
        resumed = self._link.resumed
        self._drop_link()
        if self.redial.grace <= 0:
            return self._end(EXIT_NETWORK, f"connection lost: {reason}", self.messages.undelivered())
        if not resumed and self.redial.since is not None:
            # A reconnection that authenticated but failed before the conversation resumed on it: still the same
            # outage, with the same deadline and the backoff going on, not a new loss to announce (a man in the
            # middle who cuts each one so could otherwise keep us reconnecting, and saying so, for ever).
            self.phase = Phase.AWAY
            return self.redial.move("cut", reason)
        if not self._begun:  # the first connection never got as far as the chat: nothing to resume
            return self._end(EXIT_NETWORK, f"connection lost before the chat began: {reason}",
                             self.messages.undelivered())
        self.phase = Phase.AWAY
        n = len(self.conversation.unacked)
        self.out.show([f"connection lost: {reason}; {self.role.away} ({n} undelivered)"], "notice")
        self.redial.move("lost")

    def _violation(self, error):
        if self._link is not None and self.fmt.signals:
            self.out.send(Alert("integrity" if isinstance(error, IntegrityError) else "protocol"))
        self._end(EXIT_SECURITY, f"{error}" if isinstance(error, NotAeschatPeer) else
                  f"security failure: {error}; the chat is closed")

    def _peer_left(self):
        undelivered = self.messages.undelivered()
        self._end(EXIT_NETWORK if undelivered else EXIT_OK, "the peer left the chat", undelivered)

    def _waits(self):
        if self.redial.state is Away.ASKING:  # no connection, and only the user could bring one: nothing will come
            return Waits(0, 0, self.fmt.pace, (), False, False, self.transfers.progress_at)
        moving = tuple(f"{t.kind} {visible(t.name)}" for t in self.transfers.moving)
        return Waits(*self.messages.waiting(), self.fmt.pace, moving, bool(self.transfers.unfinished),
                     self.transfers.unanswered, self.transfers.progress_at)

    def _goodbye(self):
        """The last word on a link: what we have shown is acknowledged first (its Drained may not have come)."""
        if self._link is not None and self.fmt.signals:
            self.messages.acknowledge()
            self.out.send(Goodbye())

    def _finish_leaving(self):
        self.transfers.stop_all()
        self._goodbye()
        undelivered = self.messages.undelivered()
        if self.fmt.acknowledges:
            return self._end(EXIT_NETWORK if undelivered else EXIT_OK, "you left the chat", undelivered)
        n = self.messages.sent
        self._end(EXIT_OK, f"you left the chat; sent {n} message{'s' if n != 1 else ''} "
                  "(the legacy format cannot confirm delivery)")

    def _end(self, code, text, undelivered=()):
        # The last line says what was left behind; anything left behind makes a normal end a failure (1).
        code, text = self.transfers.left_behind(*self.messages.left_behind(code, text, undelivered))
        self.transfers.abandon("the chat ended")
        if self._link is not None:
            self.out.do(Close(self._link.link, True))  # after what is queued: a goodbye, an alert
            self._link = self.out.link = None
        self.phase = Phase.ENDED
        self.messages.ended()
        self.out.do(End(code, text))



HANDSHAKE_DEADLINE = 5.0  # seconds an unauthenticated client has for each of its steps (hello, confirmation)
CLIENT_HANDSHAKE_DEADLINE = 30.0  # how long a client waits on us; a confirmation not checked by then is dropped
MAX_PENDING = 64  # connections handshaking at once; past it, the one that stands lowest is dropped
MAX_PENDING_PER_NETWORK = 8  # from one network: its ninth pushes out its own oldest, not someone else's
# SPAKE2 work (about 5 ms for each half on CPython): in all, this many a second, fewer while a chat is on so that
# it keeps its share of the CPU; and each network (a /24 or a /64) this many a second after a burst, so that one
# network cannot take it all (turns already go to the networks that knock seldom). A reconnection, and an address
# that gave the passphrase before, count only in all.
WORK_RATE, WORK_RATE_CHATTING, WORK_BURST = 50.0, 20.0, 8
NETWORK_WORK_RATE, NETWORK_WORK_BURST = 1.0, 8
# Passphrase checks for addresses that have not given the passphrase before (guesses, as far as the server can
# tell): each network 5, then one a minute; all networks together 30, then one a second. SECURITY.md has the
# arithmetic: a stranger with K networks gets at most min(K x 1,440, 86,400) a day, plus the bursts.
NETWORK_GUESS_RATE, NETWORK_GUESS_BURST = 1 / 60, 5
GUESS_RATE, GUESS_BURST = 1.0, 30
ARRIVALS_HALF_LIFE = 60.0  # a network's count of recent connections halves in this time
ABANDONED = 4  # what a connection that we answered and that went away without confirming counts as, in that count
CHECK_PATIENCE = 20.0  # a passphrase hello whose check could not come within this is told to come back later
GUESS_REPORT = 60.0  # the server's user hears of wrong passphrases at most once in this time
KEPT_NETWORKS = 4096  # networks and addresses remembered (the oldest are forgotten first)


class Bucket:
    """A token bucket: refills at `rate` a second (rate may be a function of nothing, read at each refill), holds at
    most `burst`."""

    def __init__(self, rate, burst, now=0.0):
        self.rate, self.burst = rate, burst
        self._tokens, self._at = float(burst), now

    def _rate(self):
        return self.rate() if callable(self.rate) else self.rate

    def level(self, now):
        return min(self.burst, self._tokens + max(0.0, now - self._at) * self._rate())

    def ready(self, now):
        return self.level(now) >= 1

    def take(self, now):
        self._tokens, self._at = self.level(now) - 1, now

    def give_back(self, now):
        self._tokens, self._at = min(self.burst, self.level(now) + 1), now

    def ready_at(self, now):
        """When the next token is there."""
        return now + max(0.0, 1 - self.level(now)) / self._rate()


class Write(Action):
    __slots__ = ("key", "data")


class Drop(Action):
    """Close the connection; log the line (None: silently)."""

    __slots__ = ("key", "line")


class Admit(Action):
    """The connection authenticated (or, legacy, needs no handshake): hand it to a chat."""

    __slots__ = ("key", "conn", "kind")


class Log(Action):
    """A line for the server's user. paced: the Gate already holds it to one a minute (guessing is told), so the
    door's own limit on lines, which a flood of junk connections uses up, must not swallow it."""

    __slots__ = ("line", "paced")

    def __init__(self, line, paced=False):
        super().__init__(line, paced)


def network_of(host):
    """The network an address belongs to, for budgets and turns: its /24 (IPv4) or /64 (IPv6), so that a stranger
    with a range of addresses counts once, not once per address."""
    import ipaddress

    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(ipaddress.ip_network(f"{address}/{24 if address.version == 4 else 64}", strict=False))


class _Network:
    """What the door remembers of a network: its budgets, and how often it knocked lately."""

    def __init__(self, now):
        self.work = Bucket(NETWORK_WORK_RATE, NETWORK_WORK_BURST, now)
        self.guesses = Bucket(NETWORK_GUESS_RATE, NETWORK_GUESS_BURST, now)
        self._arrivals, self._at = 0.0, now
        self.suspect = False  # a resumption from it failed: its resumptions wait their turn like hellos

    def arrivals(self, now):
        return self._arrivals * 0.5 ** ((now - self._at) / ARRIVALS_HALF_LIFE)

    def standing(self, now):
        """How much it knocked lately, in whole connections: fewer is better, and so are ties (no float order)."""
        return round(self.arrivals(now))

    def knocked(self, now, weight=1):
        """A connection came from it (or, weight ABANDONED, one it made us answer went away without confirming)."""
        self._arrivals, self._at = self.arrivals(now) + weight, now


class _Pending:
    __slots__ = ("key", "peer", "host", "network", "conn", "since", "stage", "heard", "derived")

    STAGES = ("hello", "queued", "confirm", "check")  # waiting for its hello, for a turn, for its confirmation, checks
    # What a connection at each stage is worth keeping when room is needed, lowest first: one idle (no hello a second
    # after it came, or no confirmation half a second after our hello: an honest client sends each a round trip and
    # a few milliseconds later), one waiting for the SPAKE2 budget, a confirmation waiting for a guess, one just
    # accepted (its hello is on its way), one answered (its client computes). The SPAKE2 budget bounds how many
    # can be answered in half a second (25, with its eager halves) well below MAX_PENDING: a stranger who answers
    # nothing cannot fill the door with connections worth more than a newcomer.
    PATIENCE, KEEP = {"hello": 1.0, "confirm": 0.5}, {"idle": 0, "queued": 1, "check": 2, "hello": 3, "confirm": 4}

    def worth(self, now):
        idle = self.stage in self.PATIENCE and now - self.since >= self.PATIENCE[self.stage]
        return self.KEEP["idle" if idle else self.stage]

    def __init__(self, key, peer, conn, now):
        self.key, self.peer, self.conn, self.since, self.stage, self.heard = key, peer, conn, now, "hello", False
        self.host = peer.rsplit(":", 1)[0].strip("[]")
        self.network = network_of(self.host)
        self.derived = False  # our half of SPAKE2 is finished


class Gate:
    """The server's door, without I/O: every connection that has not yet authenticated, and the rules for them.

    - A connection is greeted at once (OPEN or BUSY, so that a client learns "busy" before asking for a
      passphrase); nothing is computed for it until its hello arrives, and what is cheap is done at once: a
      passphrase hello during a chat with a connected client is refused as BUSY, a resumption of a conversation
      the server does not hold as UNKNOWN.
    - The rest costs SPAKE2 and is done one piece at a time (work()), between which the door reads its sockets, so
      a connection that closed meanwhile costs nothing. Each piece is taken in turn from what is eligible:
      reconnections first, then addresses that gave the passphrase before, then networks that knocked least lately.
      SPAKE2 work is budgeted in all and per network; passphrase checks of other addresses (guesses) in all and
      per network, a check that succeeds giving its tokens back. A resumption's confirmation is checked at once
      (its secret cannot be guessed), as is one from an address that gave the passphrase before (until it fails).
    - Each step of the client's (hello, confirmation) has HANDSHAKE_DEADLINE seconds; a confirmation waiting for
      its check, CLIENT_HANDSHAKE_DEADLINE. Past MAX_PENDING (or MAX_PENDING_PER_NETWORK from one network), or when
      the process runs out of descriptors, the connection that stands lowest is dropped: from the network that
      knocked most, one that never sent a hello, the oldest; a reconnection last.
    - Wrong passphrases are logged as they start, then summed up once a minute.

    host answers two questions about the chats: status() -> OPEN or BUSY, secret_for(resume id) -> secret or None.
    """

    def __init__(self, passphrase, host, handshakes=True, entropy=os.urandom, max_pending=MAX_PENDING,
                 deadline=HANDSHAKE_DEADLINE, now=0.0):
        self.passphrase, self.host, self.handshakes, self.entropy = passphrase, host, handshakes, entropy
        self.max_pending, self.deadline = max_pending, deadline
        self.pending = collections.OrderedDict()  # key -> _Pending, oldest first
        self._spare = None  # a SPAKE2 start for the passphrase, made while nothing else happens
        self._legacy = None  # the original scripts' cipher, made when one seems to knock
        self.work_budget = Bucket(lambda: WORK_RATE_CHATTING if self.host.status() == BUSY else WORK_RATE,
                                  WORK_BURST, now)
        self.guess_budget = Bucket(GUESS_RATE, GUESS_BURST, now)
        self._now = now  # the time of the last input: a drop without one of its own counts then
        self._networks = collections.OrderedDict()  # network -> _Network, least recently seen first
        self._known = collections.OrderedDict()  # addresses that gave the passphrase (and have not failed since)
        self._wrong, self._wrong_networks, self._report_at = 0, set(), None  # wrong passphrases not yet told

    # -- what the door tells it

    def accepted(self, key, peer, now):
        self._now = now
        if not self.handshakes:  # legacy: no handshake, nothing to wait for
            return [Admit(key, LegacyConnection(self.passphrase), None)]
        conn = ServerConnection(self.host.status(), entropy=self.entropy)
        pending = self.pending[key] = _Pending(key, peer, conn, now)
        self._network(pending.network, now).knocked(now)
        return [Write(key, conn.data_to_send())] + self._make_room(pending, now)

    def received(self, key, data, now):
        """Bytes from a pending connection (b"": it closed)."""
        self._now = now
        pending = self.pending.get(key)
        if pending is None:
            return []
        first, pending.heard = not pending.heard, pending.heard or bool(data)
        actions = []
        try:
            pending.conn.receive_data(data)
            while key in self.pending and (event := pending.conn.next_event()) is not None:
                actions += self._on(pending, event, now)
        except NotAeschatPeer as e:
            why = LEGACY_HINT if first and self._legacy_message(data) else e
            actions += self._drop(pending, f"{pending.peer} dropped: {why}")
        except RemoteProtocolError as e:
            actions += self._drop(pending, f"{pending.peer} dropped: {e}")
        return actions

    def _legacy_message(self, data):
        """Whether the first bytes a connection sent are an original script's message under our passphrase."""
        if len(data) < BLOCK:
            return False
        if self._legacy is None:
            self._legacy = pyaes.AES(legacy_key(self.passphrase))
        return bytes(self._legacy.decrypt(data[:BLOCK])).startswith(LEGACY_PREFIX)

    def failed(self, key, reason):
        """The connection failed (a reset): it goes, and the log says so."""
        pending = self.pending.get(key)
        return [] if pending is None else self._drop(pending, f"{pending.peer} dropped: {reason}")

    def tick(self, now):
        """Deadlines, and the minute's report of wrong passphrases."""
        self._now, actions = now, []
        for pending in list(self.pending.values()):
            waited = now - pending.since
            if pending.stage in ("hello", "confirm") and waited >= self.deadline:
                actions += self._drop(pending, f"{pending.peer} dropped: no aeschat handshake within "
                                               f"{self.deadline:.0f} s")
            elif waited >= CLIENT_HANDSHAKE_DEADLINE:  # waiting on us for longer than any client waits
                actions += self._drop(pending, f"{pending.peer} dropped: its turn did not come within "
                                               f"{CLIENT_HANDSHAKE_DEADLINE:.0f} s")
        if self._report_at is not None and now >= self._report_at:
            actions += self._report(now)
        return actions

    def overloaded(self, now):
        """The process is out of descriptors: make room, a quarter of the pending, those that stand lowest first."""
        count = max(1, len(self.pending) // 4)
        actions = [action for pending in self._lowest(now)[:count] for action in self._drop(pending, None)]
        if actions:
            actions.append(Log(f"out of file descriptors: dropped {len(actions)} pending connections to make room"))
        return actions

    def next_wakeup(self, now):
        times = [self._report_at] if self._report_at is not None else []
        for pending in self.pending.values():
            limit = self.deadline if pending.stage in ("hello", "confirm") else CLIENT_HANDSHAKE_DEADLINE
            times.append(pending.since + limit)
            network = self._network(pending.network, now)
            if pending.stage == "queued":
                times.append(max(self.work_budget.ready_at(now), network.work.ready_at(now)))
            elif pending.stage == "check":
                times.append(max(self.guess_budget.ready_at(now), network.guesses.ready_at(now)))
        return min(times) if times else None

    # -- the work, one piece at a time

    def has_work(self, now):
        return self._next_piece(now) is not None

    def work(self, now):
        """Do the next piece of SPAKE2 work that is eligible (one: the door reads its sockets in between)."""
        self._now, piece = now, self._next_piece(now)
        if piece is None:
            return []
        what, pending = piece
        if what == "answer":
            return self._answer(pending, now)
        if what == "check":
            return self._check(pending, now)
        self.work_budget.take(now)  # an eager derive: done while the client computes its own half
        return self._derive(pending)

    def _next_piece(self, now):
        checks = [p for p in self.pending.values() if p.stage == "check" and self._may_check(p, now)]
        if checks:  # in the order they came (a reconnection, a known address first): a confirmation taken is checked
            # before those that came after it, from whatever network (_check_too_far told the rest to come back later)
            return "check", min(checks, key=lambda p: (p.conn.kind != RESUME, p.host not in self._known, p.since))
        if not self.work_budget.ready(now):
            return None
        queued = [p for p in self.pending.values() if p.stage == "queued" and self._may_answer(p, now)]
        if queued:
            return "answer", min(queued, key=lambda p: self._turn(p, now))
        answered = [p for p in self.pending.values() if p.stage == "confirm" and not p.derived]
        return ("derive", answered[0]) if answered else None

    def _turn(self, pending, now):
        """The order of turns: reconnections, then addresses that gave the passphrase before, then the networks
        that knocked least lately, then the oldest."""
        return (pending.conn.kind != RESUME, pending.host not in self._known,
                self._network(pending.network, now).standing(now), pending.since)

    def _check_too_far(self, pending, now):
        """Whether a passphrase check for this hello could not come within CHECK_PATIENCE: its network's or all
        networks' guesses spent (confirmations are checked in turn; a client should not wait on a queue it cannot
        see)."""
        if pending.host in self._known:
            return False
        waiting = sum(p.stage == "check" and p.host not in self._known for p in self.pending.values())
        network = self._network(pending.network, now).guesses.ready_at(now)
        total = self.guess_budget.level(now) + GUESS_RATE * CHECK_PATIENCE
        return network - now > CHECK_PATIENCE or waiting + 1 > total

    def _may_answer(self, pending, now):
        network = self._network(pending.network, now)
        if pending.host in self._known or (pending.conn.kind == RESUME and not network.suspect):
            return True
        return network.work.ready(now)

    def _may_check(self, pending, now):
        if pending.conn.kind == RESUME or pending.host in self._known:
            return True
        return self.guess_budget.ready(now) and self._network(pending.network, now).guesses.ready(now)

    @property
    def wants_spare(self):
        return self.handshakes and self._spare is None

    def spare(self):
        """While the door is idle: start SPAKE2 for the next passphrase hello ahead of it (one at most, for no
        connection in particular: nothing is computed for a connection before its hello)."""
        if self.handshakes and self._spare is None:
            spake = spake2.SPAKE2_B(normalize_passphrase(self.passphrase), idA=ID_A, idB=ID_B, entropy_f=self.entropy)
            self._spare = (spake, spake.start())

    # -- inside

    def _on(self, pending, event, now):
        conn = pending.conn
        if isinstance(event, HelloReceived):
            if event.kind == PASSPHRASE and self.host.status() == BUSY:
                conn.refuse(BUSY_REFUSAL)
                return [Write(pending.key, conn.data_to_send())] + self._drop(
                    pending, f"{pending.peer} turned away: a chat with another client is on")
            if event.kind == RESUME and self.host.secret_for(event.resume_id) is None:
                conn.refuse(UNKNOWN)
                return [Write(pending.key, conn.data_to_send())] + self._drop(
                    pending, f"{pending.peer} asked to resume a conversation this server does not hold")
            if event.kind == PASSPHRASE and self._check_too_far(pending, now):
                conn.refuse(LATER)  # before the client gives its confirmation away to a wait it would not survive
                return [Write(pending.key, conn.data_to_send())] + self._drop(
                    pending, f"{pending.peer} told to come back later: passphrase checks are spent for now")
            pending.stage, pending.since = "queued", now
            return []
        if isinstance(event, ConfirmationReceived):
            pending.stage, pending.since = "check", now
            return []
        if isinstance(event, ConnectionClosed):
            if pending.stage == "confirm":
                return self._drop(pending, f"{pending.peer} dropped: it closed the connection after our hello, "
                                           "without a key confirmation")
            # One that sent nothing at all is a client reading the greeting before it asks for a passphrase, or
            # a port scan: nothing to tell. One that closed while it waited for its turn cost nothing.
            return self._drop(pending, f"{pending.peer} dropped: it closed the connection"
                                       if pending.heard and pending.stage != "queued" else None)
        raise RemoteProtocolError(f"an unexpected {type(event).__name__} during the handshake")

    def _answer(self, pending, now):
        conn = pending.conn
        secret = self.passphrase if conn.kind == PASSPHRASE else self.host.secret_for(conn.resume_id)
        if secret is None:  # the conversation ended while the hello waited
            conn.refuse(UNKNOWN)
            return [Write(pending.key, conn.data_to_send())] + self._drop(pending, None)
        self.work_budget.take(now)
        network = self._network(pending.network, now)
        if pending.host not in self._known and (conn.kind == PASSPHRASE or network.suspect):
            network.work.take(now)
        started, self._spare = (self._spare, None) if conn.kind == PASSPHRASE else (None, self._spare)
        conn.answer(secret, started)
        pending.stage, pending.since = "confirm", now
        return [Write(pending.key, conn.data_to_send())]

    def _derive(self, pending):
        try:
            pending.conn.derive()
        except RemoteProtocolError as e:
            return self._drop(pending, f"{pending.peer} dropped: {e}")
        pending.derived = True
        return []

    def _check(self, pending, now):
        conn = pending.conn
        counted = conn.kind == PASSPHRASE and pending.host not in self._known
        network = self._network(pending.network, now)
        if counted:
            self.guess_budget.take(now)
            network.guesses.take(now)
        try:
            ok = conn.check()
        except RemoteProtocolError as e:
            return self._drop(pending, f"{pending.peer} dropped: {e}")
        if ok:
            del self.pending[pending.key]
            if conn.kind == PASSPHRASE:
                self._remember(self._known, pending.host, now)
            if counted:  # no guess: the budgets are for those who do not know the passphrase
                self.guess_budget.give_back(now)
                network.guesses.give_back(now)
            return [Write(pending.key, conn.data_to_send()), Admit(pending.key, conn, conn.kind)]
        conn.refuse(DENIED)
        actions = [Write(pending.key, conn.data_to_send())]
        if conn.kind == RESUME:
            network.suspect = True
            return actions + self._drop(pending, f"failed resumption from {pending.peer}: someone may be interfering")
        self._known.pop(pending.host, None)  # it guessed: it waits its turn like any other from now on
        return actions + self._drop(pending, None) + self._wrong_passphrase(pending, now)

    def _wrong_passphrase(self, pending, now):
        """The first wrong passphrase after a quiet minute is told at once; the rest of the minute, in one line."""
        if self._report_at is None:
            self._report_at = now + GUESS_REPORT
            return [Log(f"failed passphrase attempt from {pending.peer} (further ones are counted and told once a "
                        "minute)", paced=True)]
        self._wrong += 1
        self._wrong_networks.add(pending.network)
        return []

    def _report(self, now):
        if not self._wrong:
            self._report_at = None
            return []
        n, k = self._wrong, len(self._wrong_networks)
        self._wrong, self._wrong_networks, self._report_at = 0, set(), now + GUESS_REPORT
        return [Log(f"{n} wrong passphrase{'s' if n != 1 else ''} from {k} network{'s' if k != 1 else ''} in the "
                    f"last minute", paced=True)]

    def _drop(self, pending, line):
        if self.pending.pop(pending.key, None) is not None and pending.stage == "confirm":
            # We answered it and it went away without confirming: what a flood does, never a client that computes.
            self._network(pending.network, self._now).knocked(self._now, ABANDONED)
        return [Drop(pending.key, line)]

    def _network(self, network, now):
        known = self._networks.get(network)
        if known is None:
            known = _Network(now)
        self._remember(self._networks, network, known)
        return known

    @staticmethod
    def _remember(table, key, value, most=KEPT_NETWORKS):
        """A bounded memory: the least recently seen entries go first."""
        table.pop(key, None)
        table[key] = value
        while len(table) > most:
            table.popitem(last=False)

    def _lowest(self, now):
        """The pending connections in the order they are dropped to make room: from the networks that knocked most
        lately, those worth least (_Pending.worth), the oldest; a reconnection and a known address last."""
        return sorted(self.pending.values(), key=lambda p: (
            p.conn.kind == RESUME, p.host in self._known, -self._network(p.network, now).standing(now),
            p.worth(now), p.since))

    def _make_room(self, newcomer, now):
        lowest = self._lowest(now)
        crowd = [p for p in lowest if p.network == newcomer.network]
        if len(crowd) > MAX_PENDING_PER_NETWORK:
            return self._shed(crowd[0], f"{crowd[0].peer} dropped to make room: too many connections from its "
                                        "network at once")
        if len(self.pending) > self.max_pending:
            return self._shed(lowest[0], f"{lowest[0].peer} dropped to make room: too many connections at once")
        return []

    def _shed(self, pending, line):
        """Drop a connection to make room; one whose hello waits for its answer is told to come back later (a client
        does, by itself: under a flood its next hello may be answered), not left to think we are no aeschat server."""
        if pending.stage != "queued" or pending.conn.kind != PASSPHRASE:  # (a reconnection tries again anyway)
            return self._drop(pending, line)
        pending.conn.refuse(LATER)
        return [Write(pending.key, pending.conn.data_to_send())] + self._drop(pending, line)


# ===================================================================================================
# 9. The shell: sockets and threads, nothing else. A Chat steps its Session under a lock and carries out the
# actions after releasing it, in order; a Link is one connection's reader and writer thread; the client dials,
# the server's Door runs one selector loop over every connection its Gate has not yet admitted. Every thread
# ends in guarded(), the one place where whatever escapes it becomes a single line, never a traceback.
#
# The threads, what each runs, and whether it steps a Session (always through Chat.step, under Chat.lock):
#
#   thread        runs                                   steps the session with          locks it takes
#   main          the input loop: run_chat, Server.serve Typed, Leave, Interrupt         Chat.lock; Server.lock
#                 (prompt_toolkit's event loop inside                                    (never while holding
#                 TerminalUI.read_line)                                                  Chat.lock)
#   clock         Chat._tick: sleeps until next_wakeup   Tick                            Chat.lock (its Condition)
#   reader        Link._read, one per connection: recv,  Got, Drained, Failed            Chat.lock; Link._closed
#                 open records; the last of reader and                                   (at its end)
#                 writer to end closes the socket
#   writer        Link._write, one per connection:       FileFailed (a chunk that cannot Link._closed (its latest-
#                 seal, sendall; reads a file's chunks   be read, through _post)         only records); Chat.lock
#   close timer   Link._shutdown after CLOSE_GRACE       nothing                         Link._closed
#   dial          Chat._redial: one reconnection         DialFailed, or Attached         Chat.lock
#                 attempt (the client's)
#   file          Chat._prepare and _save: hashing,      FileReady, FileSaved,           Chat.lock
#                 checking, renaming                     FileFailed
#   step          Chat._post: an input an action asked   FileOpened, FileFailed          Chat.lock
#                 for (an action never steps the session
#                 it came from, while its actions are carried out)
#   door          Door.run (the server's): one selector  Attached (Server.admit ->       Server.lock, then
#                 loop; the Gate decides                 Chat.attach)                    Chat.lock (Gate's
#                                                                                        questions to Server)
#   printer       PlainUI._print: writes what is shown   nothing                         none (a queue)
#   stdin         PlainUI._read_stdin: reads lines       nothing (a queue the main       none
#                                                        thread reads)
#
# Lock order: Server.lock, then Chat._acting, then Chat.lock, then Link._closed; never the other way. Chat._acting
# (one thread at a time carries out actions, in order) is taken after a step releases Chat.lock, and takes it only
# to pop the next action; an action that would step the session again goes through _post, to a thread of its own,
# since _acting is held. No lock is held while a socket is read, a file touched or a line printed, and only
# Chat._acting while an action is carried out (a Link's put and close never block).

DEFAULT_PORT = 5555
RECV_SIZE = 256 * 1024
CONNECT_TIMEOUT = 10.0


def guarded(target, on_error, name):
    """Start a daemon thread running target; anything that escapes it goes to on_error, and if even that fails,
    to one line on stderr."""

    def run():
        try:
            target()
        except BaseException as error:  # noqa: B036 -- SystemExit in a thread is a bug too
            try:
                on_error(error)
            except BaseException as again:  # noqa: B036
                with contextlib.suppress(Exception):
                    print(f"aeschat: {name} thread failed: {describe(error)}; then {describe(again)}",
                          file=sys.stderr, flush=True)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


_CLOSE = object()  # the writer's sentinel: write what came before, then close


class WriteQueue:
    """What a link's writer has yet to write: records in the order they were sent, except a file's chunks, which
    wait while anything else is queued, so that a message typed during a transfer waits for one chunk at most, not
    for the window. (Nothing is lost by the reordering: a receiver ignores chunks of a file it was told is
    cancelled, and a closing link drops the chunks still queued.)"""

    def __init__(self):
        self._urgent, self._bulk = collections.deque(), collections.deque()
        self._ready = threading.Condition()

    def put(self, item, bulk=False):
        with self._ready:
            (self._bulk if bulk else self._urgent).append(item)
            self._ready.notify()

    def get(self):
        with self._ready:
            self._ready.wait_for(lambda: self._urgent or self._bulk)
            return (self._urgent or self._bulk).popleft()

    def empty(self):
        return not (self._urgent or self._bulk)

    def qsize(self):
        return len(self._urgent) + len(self._bulk)


class Link:
    """One authenticated connection of a chat: a reader thread opens records and steps the chat; a writer
    thread seals what the chat sends and writes it, so that a peer that stops reading never freezes the rest."""

    CLOSE_GRACE = 2.0  # seconds a closing link has to write what was queued: a peer that reads nothing gets no more
    # Records of which only the latest counts (acknowledgements are cumulative; any pong answers every ping):
    # at most one of each waits for the writer, so a peer that sends and never reads cannot make us pile them up.
    LATEST_ONLY = (Pong, Ack, FileAck)
    # Other answers to the peer's records (to its offers: accepted, declined, where a transfer stands). A peer that
    # reads ours sees a few wait at most; past this many, it sends requests and does not read the answers, and the
    # link fails before it reads another (HTTP/2 servers close a connection whose control frames pile up so).
    REPLIES, MAX_REPLIES = (Accept, Done, Refuse), 1000

    def __init__(self, chat, sock, conn, peer, coalesce=True, linger=True):
        self.chat, self.sock, self.conn, self.peer, self.coalesce = chat, sock, conn, peer, coalesce
        self.linger = linger  # a closing link waits for the peer's end (within CLOSE_GRACE) before closing
        self._outbox = WriteQueue()
        self._latest = {}  # (type, file) -> the latest such record, whose place in the outbox is that key
        self._replies = 0  # REPLIES in the outbox
        self._closed = threading.Lock()
        self._is_closed = False
        self._users = 2  # the reader and the writer: the last of them to end closes the socket
        self.closing = False  # a close was asked for
        self._read_done = False  # the reader saw the peer's end, or failed
        self.written = threading.Event()  # the link is done: what was queued before a close is out, the socket shut

    def __repr__(self):
        return f"Link({self.peer})"

    def start(self):
        guarded(self._write, self._write_failed, "writer")
        guarded(self._read, self._read_failed, "reader")

    def put(self, event):
        if type(event) in self.REPLIES:
            with self._closed:
                self._replies += 1
        elif type(event) in self.LATEST_ONLY:
            key = (type(event), getattr(event, "file", None))
            with self._closed:
                waiting = key in self._latest
                self._latest[key] = event
            if waiting:
                return
            event = key
        self._outbox.put(event, bulk=type(event) is ChunkOf)

    def close(self, flush):
        """Close now, or (flush) once the writer has written what was queued before, within CLOSE_GRACE."""
        self.closing = True
        self._outbox.put(_CLOSE)
        if not flush:
            return self._shutdown()
        timer = threading.Timer(self.CLOSE_GRACE, self._shutdown)  # a blocked write is cut short, then
        timer.daemon = True
        timer.start()

    def _shutdown(self):
        """Shut the socket both ways: the reader and the writer wake, end, and the last of them closes it."""
        with self._closed:
            if self._is_closed:
                return
            self._is_closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.written.set()

    def _release(self):
        """The reader or the writer is done with the socket. Closed while the other could still be about to use it,
        its descriptor could go to the next connection's socket, to be read or written there."""
        with self._closed:
            self._users -= 1
            last = self._users == 0
        if last:
            self.sock.close()

    def _written(self):
        """All queued is written: a FIN follows it, and the socket stays open for the reader to take what the peer
        still sends until its end. (Closed with unread bytes, a socket resets, and the kernel throws away what it
        had not yet sent: the goodbye after a file's chunks was lost so.)"""
        if not self.linger:
            return self._shutdown()
        if self._read_done:
            return self._shutdown()
        with self._closed, contextlib.suppress(OSError):
            if not self._is_closed:
                self.sock.shutdown(socket.SHUT_WR)

    def _read_ended(self):
        self._read_done = True
        if self.closing:  # (else the close to come sees _read_done)
            self._shutdown()

    def _read_failed(self, error):
        self._read_ended()
        self._failed(error)

    def _failed(self, error):
        self.chat.step(Failed(self, error))

    def _write_failed(self, error):
        self.written.set()
        self._failed(error)

    def _read(self):
        try:
            self._reading()
        finally:
            self._release()

    def _reading(self):
        # Whole records already buffered (they came with the handshake) are taken before the next recv.
        conn, step = self.conn, self.chat.step
        while True:
            if self._replies > self.MAX_REPLIES:
                raise RemoteProtocolError(f"the peer sends requests and does not read the answers ({self._replies} "
                                          "wait for it)")
            event = conn.next_event()
            if event is None:
                step(Drained(self))
                conn.receive_data(self.sock.recv(RECV_SIZE))
                continue
            step(Got(self, event, time.time()))
            if isinstance(event, ConnectionClosed):
                return self._read_ended()

    FLUSH_AT = 16 * 1024  # small records queued together go out in one write; a file's chunk goes at once

    def _write(self):
        try:
            self._writing()
        finally:
            self._release()

    def _writing(self):
        seal, outbox, pending = self.conn.seal, self._outbox, bytearray()
        while True:
            event = outbox.get()
            if event is _CLOSE:
                if pending and not self._is_closed:
                    self.sock.sendall(pending)
                return self._written()
            if type(event) is tuple:
                with self._closed:
                    event = self._latest.pop(event)
            elif type(event) in self.REPLIES:
                with self._closed:
                    self._replies -= 1
            elif type(event) is ChunkOf:
                event = self.chat.read_chunk(event)
            if event is not None:
                pending += seal(event)
            if pending and (not self.coalesce or len(pending) >= self.FLUSH_AT or outbox.empty()):
                if not self._is_closed:
                    self.sock.sendall(pending)
                pending.clear()


# Flags that only some systems have: where one is missing (Windows has neither O_NONBLOCK nor O_NOFOLLOW; only
# Windows has O_BINARY, without which it would translate line endings), what it guards against cannot happen there.
_O_NONBLOCK, _O_NOFOLLOW, _O_BINARY = (getattr(os, name, 0) for name in ("O_NONBLOCK", "O_NOFOLLOW", "O_BINARY"))


def current_umask():
    """The process's umask: from /proc where the system shows it, else set and put back (at start-up, before any
    thread could create a file meanwhile)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


UMASK = current_umask()


def received_mode(bits):
    """A received file's permissions: the umask's for a new file, with the sender's execute bits (never setuid,
    setgid or sticky)."""
    return (0o666 | (bits & 0o111)) & ~UMASK


def sha256_of(handle, expected):
    """The SHA-256 of what is left to read of a binary file, and how many bytes that was. It is read in blocks no
    larger than the `expected` size needs: PyPy allocates and clears the whole length a read asks for, which, at
    1 MiB a read, made hashing a folder of small files 20 times slower there than on CPython."""
    digest, size, block = hashlib.sha256(), 0, min(1 << 20, expected + 1)
    while data := handle.read(block):
        digest.update(data)
        size += len(data)
    return digest, size


_TAKEN = collections.OrderedDict()  # digest of (folder, name) -> the number to try first: names taken are not tried
# again (a digest: the key of a folder deep in a received tree would hold its whole path, kilobytes, 4,096 times)


def _taken_key(folder, name):
    return hashlib.sha256(os.fsencode(folder) + b"\0" + os.fsencode(name)).digest()[:16]


def claim(folder, name, make):
    """Make name in folder (make(path) must fail with FileExistsError if it is taken), or name (1).ext, ... never
    over what is there; returns the path made and its number. The next number to try is remembered, so that a peer
    who sends one name again and again costs a try each time, not one for every file of that name already made."""
    key = _taken_key(folder, name)
    start = _TAKEN.pop(key, 0)
    numbers = range(start, 10_000)
    if start and not os.path.lexists(os.path.join(folder, name)):  # the user moved it away: the name is free again
        numbers = itertools.chain([0], numbers)
    for number in numbers:
        target = os.path.join(folder, numbered(name, number))
        try:
            make(target)
        except FileExistsError:
            continue
        _TAKEN[key] = max(number + 1, start)
        while len(_TAKEN) > KEPT_NETWORKS:
            _TAKEN.popitem(last=False)
        return target, number
    raise OSError(errno.EEXIST, "too many files of that name")


def unclaim(folder, name, number):
    """What claim made as name's `number` is gone again: that number is the first the next claim of name tries."""
    key = _taken_key(folder, name)
    _TAKEN[key] = min(_TAKEN.get(key, number), number)


_TEMPORARY = re.compile(r"\.aeschat-[0-9a-f]{16}\.part")  # a file being received, in its folder


class Incoming:
    """A file being received: a hidden temporary file in its folder, hashed as it is written, put in place under a
    name that takes nothing's place only once its SHA-256 matched."""

    def __init__(self, folder):
        self.folder, self.digest = folder, hashlib.sha256()
        self.temporary = os.path.join(folder, f".aeschat-{os.urandom(8).hex()}.part")  # (_TEMPORARY)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY
        self._descriptor = os.open(self.temporary, flags, 0o600)

    def write(self, data):
        self.digest.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._descriptor, view) :]

    def save(self, sha256, name):
        """Check the SHA-256 (hex or raw), then put the file in place as name, name (1).ext, ..."""
        self._close()
        try:
            expected = sha256 if isinstance(sha256, str) else sha256.hex()
            if not hmac.compare_digest(self.digest.hexdigest(), expected):
                raise ValueError("its SHA-256 did not match what the sender announced")
            return claim(self.folder, name, self._move)[0]
        except BaseException:
            self.discard()
            raise

    def _move(self, target):
        # A hard link takes only a name nothing has (not even a dangling link), then the temporary name goes. Claiming
        # the name with an empty file and renaming over it does the same where there are no hard links, but ext4 then
        # writes the file out at once (auto_da_alloc): a folder of small files took twice as long.
        try:
            os.link(self.temporary, target)
        except FileExistsError:
            raise
        except OSError:
            self._replace(target)
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.temporary)

    def _replace(self, target):
        # Claim the name (O_EXCL: never an existing file, nor a link), then move the file onto it.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600))
        try:
            os.replace(self.temporary, target)
        except OSError:
            os.unlink(target)
            raise

    def finish_mode(self, path, bits):
        with contextlib.suppress(OSError):  # a system without modes keeps its own
            os.chmod(path, received_mode(bits))

    def _close(self):
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def discard(self):
        self._close()
        with contextlib.suppress(OSError):
            os.unlink(self.temporary)


class FolderReader:
    """A folder to send: walked once (its regular files and empty folders, in order; links and anything else
    skipped and named, never followed), each file hashed, then its stream read at any offset (a file that cannot be
    read any more, or got shorter, goes as zeros: the receiver's check of its SHA-256 refuses it)."""

    def __init__(self, root):
        self.root, self.entries, self.starts, self.skipped, self.damaged = root, [], [], [], []
        self.unsendable = []  # paths too deep, too long or not valid Unicode: the receiver would refuse them
        self.unfinished = []  # aeschat's own temporary files: what a receiver killed half way left
        self.files = self.bytes = self.size = 0
        self.manifest = hashlib.sha256()
        self._open = (None, None)  # (index, handle) of the file being read
        self._walk()

    def _walk(self):
        for top, folders, names in os.walk(self.root, onerror=self._unreadable):
            folders.sort()
            relative = os.path.relpath(top, self.root)
            base = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            for folder in list(folders):
                if os.path.islink(os.path.join(top, folder)):
                    folders.remove(folder)  # never followed (os.walk does not, but says nothing either)
                    self.skipped.append(base + folder)
            if not folders and not names and base and self._sendable(base[:-1]):
                self._add(b"d", 0o755, 0, bytes(32), base[:-1], None)
            for name in sorted(names):
                if _TEMPORARY.fullmatch(name):
                    self.unfinished.append(base + name)
                elif self._sendable(base + name):
                    self._file(os.path.join(top, name), base + name)

    def _file(self, path, relative):
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                return self.skipped.append(relative)
            with open(path, "rb") as f:
                digest, size = sha256_of(f, info.st_size)
        except OSError as e:
            return self._unreadable(e, relative)
        self.files, self.bytes = self.files + 1, self.bytes + size
        self._add(b"f", info.st_mode, size, digest.digest(), relative, path)

    def _unreadable(self, error, relative=None):
        if relative is None:  # a folder os.walk could not list: named as its files are, from the folder sent
            where = getattr(error, "filename", None)
            relative = os.path.relpath(where, self.root).replace(os.sep, "/") if where else "?"
        self.damaged.append(f"{relative}: {describe(error)}")

    def _sendable(self, relative):
        """Whether the receiver would take this path; if not, it is named among those skipped."""
        try:
            return bool(folder_path(relative.encode("utf-8")))
        except (UnicodeEncodeError, RemoteProtocolError):
            self.unsendable.append(relative)
            return False

    def _add(self, kind, mode, size, sha256, relative, path):
        header = folder_header(kind, mode, size, sha256, relative)
        self.manifest.update(header)
        self.entries.append((self.size, header, path, size))
        self.starts.append(self.size)
        self.size += len(header) + size

    def read(self, offset, length):
        import bisect

        out, index = bytearray(), bisect.bisect_right(self.starts, offset) - 1
        while len(out) < length and 0 <= index < len(self.entries):
            start, header, path, size = self.entries[index]
            at = offset + len(out) - start
            if at < len(header):
                out += header[at : at + length - len(out)]
            else:
                out += self._content(index, at - len(header), min(length - len(out), size - (at - len(header))))
            if offset + len(out) >= start + len(header) + size:
                index += 1
        return bytes(out)

    def _content(self, index, at, length):
        held, handle = self._open
        try:
            if held != index:
                self.close()
                handle = open(self.entries[index][2], "rb")  # noqa: SIM115 -- read piece by piece until close()
                self._open = (index, handle)
            handle.seek(at)
            data = handle.read(length)
        except OSError as e:
            data = b""
            self._note(index, describe(e))
        if len(data) < length:
            self._note(index, "it got shorter while it was being sent")
        return data + bytes(length - len(data))

    def _note(self, index, why):
        note = f"{self.entries[index][1][ENTRY.size:].decode('utf-8', 'replace')}: {why}"
        if note not in self.damaged:
            self.damaged.append(note)

    def close(self):
        handle = self._open[1]
        if handle is not None:
            handle.close()
        self._open = (None, None)


class _Made:
    """A folder a FolderWriter made: its name (the root: its whole path), its parent, and those made inside it, by
    their names as sent."""

    __slots__ = ("parent", "name", "children")

    def __init__(self, parent, name):
        self.parent, self.name, self.children = parent, name, {}

    def path(self):
        names, node = [], self
        while node is not None:
            names.append(node.name)
            node = node.parent
        return os.path.join(*reversed(names))

    def paths(self, inner_first=False):
        """Its path and those of every folder inside it, each folder before those inside it (or after them), made one
        at a time: ten thousand paths of kilobytes each are never held at once."""
        stack = [(self, False)]
        while stack:
            node, seen = stack.pop()
            if seen or not inner_first:
                yield node.path()
            if not seen:
                if inner_first:
                    stack.append((node, True))
                stack.extend((child, False) for child in node.children.values())


class FolderWriter:
    """A folder being received: a new folder under the receiving one (a name that takes nothing's place), and each
    entry of its stream made inside it as it arrives: a folder at once, a file into a temporary file put in place
    once its SHA-256 matched. Nothing is written outside it: every part of every path is made safe as a file's name
    is, and every folder on the way is one this writer made (private to this user until the end)."""

    # Folders a stream may make (files are held to the offer's count). What the writer remembers of them is their
    # names, a few hundred bytes each: a peer that sends paths of 64 folders each, 4 KiB of names, again and again,
    # gets no more than this many held (the tree of names, not a path a folder), nor more lines of problems than
    # PROBLEMS_KEPT: its memory stays a few MiB whatever the stream.
    MAX_FOLDERS, PROBLEMS_KEPT = 10_000, 5

    def __init__(self, parent, name, size, files):
        self.parent, self.files_offered = parent, files
        self.parser = FolderParser(size)
        self._name = safe_name(name)
        self.root, self._number = claim(parent, self._name, lambda path: os.mkdir(path, 0o700))
        self._made = _Made(None, self.root)  # the folders made, a tree: each by its name as sent
        self._entry = self._file = None
        self.saved, self.saved_bytes, self._folders = 0, 0, 0
        self.problems, self.unsaved = [], 0  # the first files not saved (why), and how many in all

    def write(self, data):
        for item in self.parser.feed(data):
            if isinstance(item, FolderEntry):
                self._begin(item)
            elif item is None:
                self._end()
            elif self._file is not None:
                self._file.write(item)

    def _begin(self, entry):
        self._entry = entry
        if entry.kind == b"d":
            self._folder(entry.parts)
            return
        if self.saved + self.unsaved >= self.files_offered:
            raise RemoteProtocolError("a folder's stream holds more files than it was offered with")
        self._file = Incoming(self._folder(entry.parts[:-1]))

    def _end(self):
        entry, incoming, self._entry, self._file = self._entry, self._file, None, None
        if incoming is None:
            return
        shown = "/".join(entry.parts)
        try:
            path = incoming.save(entry.sha256, safe_name(entry.parts[-1]))
            incoming.finish_mode(path, entry.mode)
            self.saved, self.saved_bytes = self.saved + 1, self.saved_bytes + entry.size
        except ValueError:
            self._problem(f"{visible(shown)}: it changed or was damaged on the way (its SHA-256 did not match)")
        except OSError as e:
            self._problem(f"{visible(shown)}: {describe(e)}")

    def _problem(self, text):
        self.unsaved += 1
        if len(self.problems) < self.PROBLEMS_KEPT:
            self.problems.append(text)

    def _folder(self, parts):
        """The path of the folder made for these parts as sent (making it and those on the way as needed)."""
        node = self._made
        for part in parts:
            child = node.children.get(part)
            if child is None:
                self._folders += 1
                if self._folders > self.MAX_FOLDERS:
                    raise RemoteProtocolError(f"a folder's stream makes more than {self.MAX_FOLDERS:,} folders")
                if self._folders % 64 == 0:  # a folder takes a block of the disk, which its stream does not count
                    import shutil

                    if shutil.disk_usage(self.root).free < Files.SPARE:
                        raise OSError(errno.ENOSPC, "not enough free space")
                made = claim(node.path(), safe_name(part), lambda path: os.mkdir(path, 0o700))[0]
                child = node.children[part] = _Made(node, os.path.basename(made))
            node = child
        return node.path()

    def finish(self, sha256):
        """The stream is whole: check its headers against the offer; the folders get the umask's permissions."""
        if not hmac.compare_digest(self.parser.manifest.hexdigest(), sha256):
            self.problems.append("the folder's list of entries did not match what the sender announced")
        self._open_up()
        return self.root

    def _open_up(self):
        """The folders made, private while they were written, get the umask's permissions."""
        for folder in self._made.paths():
            with contextlib.suppress(OSError):
                os.chmod(folder, 0o777 & ~UMASK)

    def discard(self):
        """Given up: the file half-written goes; the folder stays only if something was saved in it, and then says
        so (a folder only partly there must not pass for one that arrived)."""
        if self._file is not None:
            self._file.discard()
            self._file = None
        for folder in self._made.paths(inner_first=True):  # each after those inside it
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only the empty ones go
        if not os.path.lexists(self.root):  # its name is free again for the next folder of that name
            unclaim(self.parent, self._name, self._number)
            return None
        self._open_up()
        return (f"an unfinished folder stays: {self.saved:,} of its {self.files_offered:,} files arrived whole, in "
                f"{visible(self.root)}")


class Files:
    """The files of a chat on disk, each by its number: what we send (a file, kept open so that a rename does not
    change what goes, or a FolderReader) and what we receive (an Incoming file, or a FolderWriter)."""

    SPARE = 16 * 2**20  # room left free on the disk beyond a file we accept

    def __init__(self, folder="."):
        self.folder = folder
        self._sending = {}  # file -> open file, or FolderReader
        self._receiving = {}  # file -> Incoming, or FolderWriter

    @staticmethod
    def unicode_name(name):
        """A name from the file system as valid Unicode: bytes that are not UTF-8 become U+FFFD."""
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

    def prepare(self, path):
        """What to offer for a path: (what to read, name, size, SHA-256, (files, bytes) of a folder or None,
        execute bits, notes to show)."""
        path = os.path.expanduser(path)
        name = self.unicode_name(os.path.basename(os.path.normpath(os.path.abspath(path))) or "file")
        if os.path.isdir(path) and not os.path.islink(path):
            reader = FolderReader(path)
            notes = [f"cannot read {visible(damaged)}" for damaged in reader.damaged]
            for skipped, why in ((reader.skipped, "being links or not files (never followed)"),
                                 (reader.unfinished, "being aeschat's unfinished downloads"),
                                 (reader.unsendable, f"their paths being deeper than {MAX_DEPTH} folders, longer "
                                                     f"than {MAX_PATH} bytes or not valid Unicode")):
                shown, more = briefly(skipped)
                if shown:
                    notes.append(f"skipped, {why}: {', '.join(visible(s) for s in shown)}"
                                 + (f" and {more} more" if more else ""))
            reader.damaged = []
            return reader, name, reader.size, reader.manifest.hexdigest(), (reader.files, reader.bytes), 0, notes
        handle, size, sha256, bits = self._prepare_file(path)
        return handle, name, size, sha256, None, bits, []

    def _prepare_file(self, path):
        try:  # without blocking: a named pipe would wait for a writer for ever
            descriptor = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_BINARY)
        except OSError as e:
            raise UsageError(describe(e)) from None
        handle = os.fdopen(descriptor, "rb")  # kept open for the transfer, closed by release()
        try:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UsageError("not a regular file or folder")
            digest, size = sha256_of(handle, info.st_size)
            return handle, size, digest.hexdigest(), info.st_mode & 0o111
        except (OSError, UsageError) as e:
            handle.close()
            raise UsageError(describe(e)) from None

    def keep(self, file, source):
        self._sending[file] = source

    def read(self, file, offset, length):
        """length bytes from offset of what file number `file` sends, and notes of what could not be read."""
        source = self._sending[file]
        if isinstance(source, FolderReader):
            data, notes, source.damaged = source.read(offset, length), source.damaged, []
            return data, notes
        if hasattr(os, "pread"):
            data = os.pread(source.fileno(), length, offset)
        else:  # Windows: no pread; one writer thread reads a file, so seeking first is safe
            source.seek(offset)
            data = source.read(length)
        if len(data) != length:
            raise OSError(errno.EIO, "the file became shorter while it was being sent")
        return data, []

    def release(self, file):
        source = self._sending.pop(file, None)
        if source is not None:
            source.close()

    def open(self, file, size, name, folder):
        """Where to receive: a temporary file, or (a folder of `folder` files) a new folder, once there is room."""
        import shutil

        if shutil.disk_usage(self.folder).free < size + self.SPARE:
            raise OSError(errno.ENOSPC, "not enough free space")
        self._receiving[file] = (FolderWriter(self.folder, name, size, folder) if folder is not None
                                 else Incoming(self.folder))

    def write(self, file, data):
        self._receiving[file].write(data)

    def save(self, file, sha256, name, bits):
        """Put what was received in place; returns (its path, what could not be saved in a folder (the first few), the
        (files, bytes) saved in a folder, and how many more could not be saved)."""
        target = self._receiving.pop(file)
        if isinstance(target, FolderWriter):
            unlisted = max(0, target.unsaved - target.PROBLEMS_KEPT)
            return target.finish(sha256), target.problems, (target.saved, target.saved_bytes), unlisted
        path = target.save(sha256, name)
        target.finish_mode(path, bits)
        return path, [], None, 0

    def forget(self, file):
        """A file or folder being received, given up: no longer written; the caller discards it."""
        return self._receiving.pop(file, None)

    def discard(self, file):
        target = self.forget(file)
        if target is not None:
            target.discard()

    def close(self):
        for file in list(self._receiving):
            self.discard(file)
        for file in list(self._sending):
            self.release(file)


class Chat:
    """One chat: its Session (the rules) under a lock, and the carrying out of what it asks, in order."""

    def __init__(self, ui, session, dial=None, files=None):
        self.ui, self.session, self._dial = ui, session, dial
        self.files = files or Files()
        self.lock = threading.Lock()
        self._clock = threading.Condition(self.lock)
        self._wake_at = None  # when the clock thread means to tick next
        self._todo = collections.deque()
        self._acting = threading.Lock()
        self.outcome = None  # (exit code, what to tell the user) once the chat is over
        self.begun = threading.Event()  # set once the chat is live, or over
        self.done = threading.Event()  # set once it is over
        self._links = []
        guarded(self._tick, self._crashed, "clock")

    @property
    def active(self):
        return self.outcome is None

    def connected(self):
        with self.lock:
            return self.session.link is not None and not self.session.ended

    def waiting_for_user(self):
        """Only the user may offer the passphrase now (/reconnect)."""
        with self.lock:
            return self.session.redial.state is Away.ASKING

    def new_passphrase(self, passphrase):
        self._dial.passphrase = passphrase

    def over(self):
        """The session has ended, though its End may not be carried out yet (the chat still active until then):
        a connection attached now would be closed without a word."""
        with self.lock:
            return self.session.ended

    def settle(self, timeout):
        """Give the writers of closing links time to write what was queued (a goodbye, an alert)."""
        end = time.monotonic() + timeout
        for link in self._links:
            if link.closing:
                link.written.wait(max(0.0, end - time.monotonic()))

    def step(self, event):
        """Step the session (under the lock), then carry out its actions (without it), in order."""
        with self.lock:
            try:
                actions = self.session.step(event, time.monotonic())
            except Exception as error:  # a rule raised: a bug, but it ends this chat only, in one line
                actions = self.session.crash(error)
            self._todo.extend(actions)
            status = self.session.status() if self.ui.interactive else None  # a pipe has no status line
            wake = self.session.next_wakeup()
            if wake is not None and (self._wake_at is None or wake < self._wake_at) or self.session.ended:
                self._clock.notify()
        if status is not None:
            self.ui.set_status(*status)
        self._carry_out()

    def typed(self, text):
        self.step(Typed(text, now_iso()))

    def attach(self, sock, conn, peer, how):
        """Run the chat over a new authenticated connection (the session decides what it replaces)."""
        link = Link(self, sock, conn, peer, coalesce=self.session.fmt.pace == 0, linger=self.session.fmt.signals)
        self._links.append(link)
        self.step(Attached(link, peer, how))
        link.start()

    def _carry_out(self):
        with self._acting:
            while True:
                with self.lock:
                    if not self._todo:
                        return
                    action = self._todo.popleft()
                self._do(action)

    def _do(self, action):
        kind = type(action)
        if kind is Send:
            action.link.put(action.event)
        elif kind is Show:
            self.ui.show(action.lines, action.kind)
        elif kind is Close:
            action.link.close(action.flush)
        elif kind is Dial:
            guarded(lambda: self._redial(action.kind), lambda e: self.step(DialFailed(e)), "dial")
        elif kind is Live:
            self.begun.set()
        elif kind is Progress:
            self.ui.progress(action)
        elif kind in self._FILE_ACTIONS:
            self._FILE_ACTIONS[kind](self, action)
        elif kind is End:
            self.outcome = (action.code, action.text)
            self.begun.set()
            self.done.set()
            self.ui.wake()

    # -- files: what may take a while (hashing, checking, renaming) runs in a thread that steps the session after

    def _prepare(self, action):
        def run():
            try:
                source, *ready = self.files.prepare(action.path)
            except (UsageError, OSError) as e:
                return self.step(FileFailed(action.file, True, "unreadable", describe(e)))
            self.files.keep(action.file, source)
            self.step(FileReady(action.file, *ready))

        guarded(run, self._crashed, "file")

    def _post(self, event):
        """Step the session with event from a thread of its own: an action never steps the session it came from."""
        guarded(lambda: self.step(event), self._crashed, "step")

    def _open(self, action):
        try:
            self.files.open(action.file, action.size, action.name, action.folder)
        except OSError as e:
            return self._post(FileFailed(action.file, False, "no space" if e.errno == errno.ENOSPC else "unwritable",
                                         describe(e)))
        self._post(FileOpened(action.file))

    def _discard(self, action):
        """(DiscardFile, or a file that cannot be written.) A file's temporary file goes at once; a folder's, in a
        thread of its own: removing what a stream of ten thousand folders made takes seconds, which the chat must
        not wait for."""
        target = self.files.forget(action.file)
        if isinstance(target, FolderWriter):
            guarded(lambda: self._discarded(target), self._crashed, "file")
        elif target is not None:
            target.discard()

    def _discarded(self, writer):
        unfinished = writer.discard()
        if unfinished:
            self.ui.show([unfinished], "notice")

    def _write_file(self, action):
        try:
            self.files.write(action.file, action.data)
        except (OSError, KeyError) as e:
            self._discard(action)
            self._post(FileFailed(action.file, False, "unwritable", describe(e)))
        except RemoteProtocolError as e:  # a folder's stream that is not one: refused, the chat goes on
            self._discard(action)
            self._post(FileFailed(action.file, False, "failed verification", f"{e}"))

    def _save(self, action):
        def run():
            try:
                path, problems, got, unlisted = self.files.save(action.file, action.sha256, action.name, action.bits)
            except ValueError as e:
                return self.step(FileFailed(action.file, False, "failed verification", f"{e}"))
            except (OSError, KeyError) as e:
                return self.step(FileFailed(action.file, False, "unwritable", describe(e)))
            self.step(FileSaved(action.file, path, problems, got, unlisted))

        guarded(run, self._crashed, "file")

    _FILE_ACTIONS = {PrepareFile: _prepare, OpenFile: _open, WriteFile: _write_file, SaveFile: _save,
                     DiscardFile: _discard,
                     ReleaseFile: lambda self, action: self.files.release(action.file)}

    def read_chunk(self, event):
        """The writer's way to a chunk's bytes: read from the file as it is sealed, never all at once."""
        try:
            data, notes = self.files.read(event.file, event.offset, event.length)
        except (OSError, KeyError) as e:
            self._post(FileFailed(event.file, True, "unreadable", describe(e)))
            return None
        if notes:  # a folder's file that could not be read any more: it goes as zeros, and the user is told
            self._post(FileNote(event.file, tuple(notes)))
        return Chunk(event.file, event.offset, data)

    def _redial(self, kind):
        try:
            sock, conn, peer = self._dial(kind)
        except Exception as error:
            self.step(DialFailed(error))
            return
        self.attach(sock, conn, peer, kind)

    def _tick(self):
        while True:
            with self.lock:
                if self.session.ended:
                    return
                self._wake_at = wake = self.session.next_wakeup()
                now = time.monotonic()
                if wake is None or wake > now:  # a step that needs an earlier tick notifies us
                    self._clock.wait(None if wake is None else wake - now)
                    continue
            self.step(Tick())

    def _crashed(self, error):
        with self.lock:
            self._todo.extend(self.session.crash(error))
        self._carry_out()

    def leave(self, wait=FLUSH_TIMEOUT, answers=FLUSH_TIMEOUT):
        self.step(Leave(wait, answers))

    def interrupt(self, code):
        self.step(Interrupt(code))

    def close(self):
        """The program is exiting: whatever the session still holds is closed."""
        if self.active:
            self.step(Interrupt(EXIT_INTERRUPTED))


def connect(host, port, proxy=None):
    """A TCP connection to host:port (through proxy, if given) with Nagle off (no message waits for the next)."""
    try:
        sock = through(proxy, host, port) if proxy else first_to_connect(host, port, CONNECT_TIMEOUT)
    except socket.gaierror as e:
        raise NetworkError(f"cannot find the host {host!r}: {e.strerror}") from None
    except UnicodeError:
        raise UsageError(f"{host!r} is not a valid host name") from None
    except ConnectionRefusedError as e:
        raise NotListening(f"cannot connect to {host} port {port}: {describe(e)}") from None
    except OSError as e:
        raise NetworkError(f"cannot connect to {host} port {port}: {describe(e)}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


ATTEMPT_DELAY = 0.25  # RFC 8305's Connection Attempt Delay: the next address is tried this long after the last
_IN_PROGRESS = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, 10035}  # 10035: Windows's WSAEWOULDBLOCK


def _host_bytes(host):
    """An ASCII host as bytes, checked as the IDNA codec checks it (no empty label, none over 63 characters): given a
    str, socket encodes it with that codec, 2 ms of imports at every start. Any other name as it is."""
    if not host.isascii():
        return host
    if ":" not in host and any(not 0 < len(label) <= 63 for label in host.rstrip(".").split(".")):
        raise UnicodeError(f"{host!r} has an empty label or one over 63 characters")
    return host.encode("ascii")


def first_to_connect(host, port, timeout):
    """Happy eyeballs (RFC 8305): the host's addresses, the two families taken in turn (the resolver's first
    first), each tried ATTEMPT_DELAY after the one before began, or at once when it failed; the first to connect
    wins and the others are closed. An IPv6 route that swallows packets costs a quarter of a second, not the
    whole timeout."""
    found = socket.getaddrinfo(_host_bytes(host), port, type=socket.SOCK_STREAM)
    families = [[info for info in found if info[0] == found[0][0]], [info for info in found if info[0] != found[0][0]]]
    return connect_first([info for pair in itertools.zip_longest(*families) for info in pair if info is not None],
                         timeout)


def connect_first(order, timeout):
    """The race of first_to_connect, over addresses (getaddrinfo's tuples) in the order to try them."""
    import selectors

    order, deadline, start_next = list(order), time.monotonic() + timeout, 0.0
    selector, errors = selectors.DefaultSelector(), []
    try:
        while order or selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                raise socket.timeout("timed out")
            if order and (now >= start_next or not selector.get_map()):
                if _attempt(order.pop(0), selector, errors):
                    start_next = now + ATTEMPT_DELAY
                continue
            for key, _ in selector.select(max(0.0, min(deadline, start_next if order else deadline) - now)):
                sock = key.fileobj
                selector.unregister(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if not error:
                    sock.setblocking(True)
                    return sock
                errors.append(OSError(error, os.strerror(error)))
                sock.close()
                start_next = 0.0  # a failure: the next address at once
        refused = [e for e in errors if e.errno == errno.ECONNREFUSED]
        raise ConnectionRefusedError(*refused[0].args) if refused else errors[-1]
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()


def _attempt(info, selector, errors):
    """Begin connecting to one address: registered with the selector, or its error noted at once."""
    import selectors

    family, kind, proto, _, where = info
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    error = sock.connect_ex(where)
    if error in _IN_PROGRESS or error == 0:
        selector.register(sock, selectors.EVENT_WRITE)
        return True
    errors.append(OSError(error, os.strerror(error)))
    sock.close()
    return False


Proxy = collections.namedtuple("Proxy", "scheme host port username password")


def proxy_argument(text):
    """--proxy socks5h://[USER:PASSWORD@]HOST[:PORT] (the proxy resolves names: Tor, ssh -D) or socks5:// (the
    client does); the port defaults to 1080."""
    from urllib.parse import unquote, urlsplit

    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if url.scheme not in ("socks5", "socks5h") or not url.hostname or url.path not in ("", "/") or url.query:
        raise argparse.ArgumentTypeError(f"{text!r} is not socks5h://HOST:PORT (or socks5://HOST:PORT)")
    return Proxy(url.scheme, url.hostname, port or 1080, unquote(url.username or "") or None,
                 unquote(url.password or "") or None)


def proxy_name(proxy):
    """A proxy as the user gave it, less any password."""
    return f"{proxy.scheme}://{address((proxy.host, proxy.port))}"


def through(proxy, host, port):
    """A connection to host:port through a SOCKS5 proxy (python-socks); its refusals as our errors."""
    from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
    from python_socks.sync import Proxy as Socks

    via = Socks(ProxyType.SOCKS5, proxy.host, proxy.port, proxy.username, proxy.password,
                rdns=proxy.scheme == "socks5h")
    try:
        return via.connect(host, port, timeout=CONNECT_TIMEOUT)
    except ProxyConnectionError as e:
        raise NetworkError(f"cannot reach the proxy {proxy_name(proxy)}: {describe(e.__cause__ or e)}") from None
    except ProxyTimeoutError:
        raise NetworkError(f"the proxy {proxy_name(proxy)} did not answer within {CONNECT_TIMEOUT:.0f} s") from None
    except ProxyError as e:
        if "SOCKS version" in str(e):  # what answered is something else (an aeschat server, a web server...)
            raise NetworkError(f"{proxy_name(proxy)} is not a SOCKS5 proxy (it answered as something else)") from None
        error = NotListening if getattr(e, "error_code", None) == 5 else NetworkError  # 5: connection refused
        raise error(f"the proxy {proxy_name(proxy)} could not connect to {host} port {port}: {e}") from None


def nothing_behind(proxy, host, port):
    """A proxy that took the connection and closed it before any greeting: most likely nothing listens behind it
    (some proxies say yes before they have connected), so it is waited for as a server not yet started is."""
    return NotListening(f"the proxy {proxy_name(proxy)} took the connection, then closed it: is an aeschat server "
                        f"listening at {host} port {port}?")


GREETING_DEADLINE = 5.0  # an aeschat server greets at once: silence means something else is listening
SLOW_CHECK = 1.0  # our key confirmation unanswered this long: say that the server is checking, not stuck


def handshake(sock, conn, deadline, slow=None):
    """The client's socket loop for a handshake: write what conn has, read until it is open, within deadline (the
    greeting, which an aeschat server sends at once, within GREETING_DEADLINE). Records that arrive with the last
    handshake frame stay buffered in conn for the link's reader. slow() is called once if the server takes more than
    SLOW_CHECK to answer our key confirmation (it checks passphrases one at a time after wrong guesses)."""
    started = confirmed = time.monotonic()
    try:
        while True:
            event = conn.next_event()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(event, HandshakeComplete):
                return
            if event is None:
                until = started + (GREETING_DEADLINE if conn.state is State.GREETING else deadline)
                waiting = slow is not None and getattr(conn, "confirmation_sent", False)
                if not waiting:
                    confirmed = time.monotonic()
                limit = min(until, confirmed + SLOW_CHECK) if waiting else until
                sock.settimeout(max(0.01, limit - time.monotonic()))
                try:
                    data = sock.recv(RECV_SIZE)
                except socket.timeout:
                    if not waiting or time.monotonic() >= until:
                        raise
                    slow()
                    slow = None
                    continue
                conn.receive_data(data)
    except OSError as e:  # socket.timeout included
        raise _handshake_failed(conn, e, deadline) from None
    finally:
        sock.settimeout(None)


def _handshake_failed(conn, error, deadline):
    """What a failed handshake is: after our key confirmation, an unfinished authentication; before, the network's."""
    if getattr(conn, "confirmation_sent", False):  # the peer has our confirmation, and went quiet or away
        return UnfinishedAuthentication(
            f"the server did not answer our key confirmation ({describe(error)}): someone may be interfering")
    if isinstance(error, socket.timeout):
        if conn.state is State.GREETING:
            return NetworkError(f"no greeting from the server within {GREETING_DEADLINE:.0f} s: is it an aeschat v2 "
                                "server? (--legacy talks to the original scripts)")
        return NetworkError(f"no aeschat handshake within {deadline:.0f} s (is the peer an aeschat v2 program? "
                            "--legacy talks to the original scripts)")
    return NetworkError(f"the connection failed during the handshake: {describe(error)}")


def greeting(host, port, proxy=None, deadline=GREETING_DEADLINE):
    """Connect only to read the server's greeting (OPEN or BUSY), before asking anyone for a passphrase."""
    sock = connect(host, port, proxy)
    decoder = FrameDecoder(max_size=HANDSHAKE_MAX_FRAME)
    try:
        sock.settimeout(deadline)
        while (body := decoder.next_frame()) is None:
            data = sock.recv(HANDSHAKE_MAX_FRAME)
            if not data and proxy is not None:
                raise nothing_behind(proxy, host, port)
            if not data:
                raise NetworkError("the server closed the connection before greeting us")
            decoder.feed(data)
    except socket.timeout:
        raise NetworkError(f"no greeting from the server within {deadline:.0f} s: is it an aeschat v2 server? "
                           "(--legacy talks to the original scripts)") from None
    except RemoteProtocolError:
        raise NotAeschatPeer("the peer is not an aeschat peer") from None
    except OSError as e:
        raise NetworkError(f"the connection failed: {describe(e)}") from None
    finally:
        sock.close()
    kind, status = parse_handshake_frame(body)
    if kind != GREETING or status not in (OPEN, BUSY):
        raise NotAeschatPeer("the server did not greet as an aeschat v2 server does")
    return status


class Dialer:
    """The client's connections: the first with the passphrase, reconnections with the resumption secret that
    the last passphrase handshake gave; never the passphrase on its own (the Session asks the user first)."""

    def __init__(self, host, port, passphrase, legacy, proxy=None):
        self.host, self.port, self.passphrase, self.legacy, self.proxy = host, port, passphrase, legacy, proxy
        self.resumption = None
        self.slow = None  # called if the server is slow to check our passphrase (see handshake)

    def __call__(self, kind=PASSPHRASE):
        sock = connect(self.host, self.port, self.proxy)
        try:
            peer = address(sock.getpeername()) if self.proxy is None else \
                f"{address((self.host, self.port))} through {proxy_name(self.proxy)}"
            if self.legacy:
                return sock, LegacyConnection(self.passphrase), peer
            if kind == RESUME:
                resume_id, secret = self.resumption
                conn = ClientConnection(secret, RESUME, resume_id)
            else:
                conn = ClientConnection(self.passphrase)
            try:
                handshake(sock, conn, CLIENT_HANDSHAKE_DEADLINE, self.slow if kind == PASSPHRASE else None)
            except NetworkError:
                if self.proxy is not None and conn.greeting is None:
                    raise nothing_behind(self.proxy, self.host, self.port) from None
                raise
            if conn.resumption is not None:
                self.resumption = conn.resumption
            return sock, conn, peer
        except BaseException:
            sock.close()
            raise


def address(sockaddr):
    """host:port, with brackets around an IPv6 host; an IPv4 peer of a dual-stack socket as IPv4."""
    host, port = sockaddr[:2]
    host = host[7:] if host.startswith("::ffff:") and "." in host else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Door:
    """The server's accept loop: one thread, one selector over the listener and every connection the Gate has not
    admitted yet. It moves bytes; the Gate decides. Nothing a connection does can end the loop."""

    PAUSE = 0.5  # seconds without accepting, when descriptors ran out and there was nothing to drop

    LOG_BURST, LOG_RATE = 10, 1 / 60  # lines the door may log at once, then one a minute: a flood is summed up

    def __init__(self, listener, gate, admit, log):
        import selectors  # the server's alone: kept off a client's start-up

        self.listener, self.gate, self.admit, self._log = listener, gate, admit, log
        self._log_tokens, self._log_at, self._unlogged = float(self.LOG_BURST), time.monotonic(), 0
        self._selector = selectors.DefaultSelector()
        self._read_events, self._write_events = selectors.EVENT_READ, selectors.EVENT_WRITE
        self._conns = {}  # socket -> [peer, bytes not yet written]
        self._paused_until = None

    def run(self):
        """Read every socket that is ready, then do one piece of the Gate's work (a SPAKE2 half, a check), and
        again: between two pieces the door always reads, so a flood of connections that close costs no SPAKE2."""
        self.listener.setblocking(False)
        self._selector.register(self.listener, self._read_events)
        while True:
            busy = self.gate.has_work(time.monotonic())
            ready = self._selector.select(0 if busy else self._timeout())
            if not ready and not busy:
                self.gate.spare()
            for key, mask in ready:
                self._ready(key.fileobj, mask)
            if self._paused_until is not None and time.monotonic() >= self._paused_until:
                self._paused_until = None
                self._selector.register(self.listener, self._read_events)
            self._apply(self.gate.tick(time.monotonic()))
            self._apply(self.gate.work(time.monotonic()))
            if self._unlogged:
                self.log(None)

    def _timeout(self):
        now = time.monotonic()
        wakes = [self.gate.next_wakeup(now), self._paused_until, self._log_at + 1 / self.LOG_RATE
                 if self._unlogged else None]
        wakes = [wake for wake in wakes if wake is not None]
        timeout = max(0.0, min(wakes) - now) if wakes else None
        if self.gate.wants_spare:  # then, if nothing happens meanwhile, a spare SPAKE2 start
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        return timeout

    def _ready(self, sock, mask):
        try:
            if sock is self.listener:
                self._accept()
            else:
                if mask & self._write_events:
                    self._flush(sock)
                if mask & self._read_events and sock in self._conns:
                    self._read(sock)
        except Exception as error:  # one connection's trouble, never the door's
            self.log(f"{self._conns.get(sock, ['?'])[0]} dropped: {describe(error)}")
            self._close(sock)

    def log(self, line):
        """Log a line, unless lines come faster than LOG_RATE a second: then count them, and say how many as soon
        as a line may be logged again (line None: only that)."""
        now = time.monotonic()
        self._log_tokens = min(self.LOG_BURST, self._log_tokens + (now - self._log_at) * self.LOG_RATE)
        self._log_at = now
        if self._log_tokens < 1:
            self._unlogged += line is not None
            return
        if self._unlogged:
            self._log_tokens -= 1
            self._log(f"({self._unlogged} more connections dropped: not each shown, too many at once)")
            self._unlogged = 0
        if line is not None:
            self._log_tokens = max(0.0, self._log_tokens - 1)
            self._log(line)

    def _accept(self):
        for _ in range(MAX_PENDING):  # a bounded batch, so that connections already here are served too
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in _OUT_OF_DESCRIPTORS:
                    continue  # a connection that died in the backlog, and the like
                actions = self.gate.overloaded(time.monotonic())
                self._apply(actions)
                if not actions:  # nothing of ours to drop: stop accepting for a moment
                    self.log(f"out of file descriptors: not accepting connections for {self.PAUSE} s")
                    self._selector.unregister(self.listener)
                    self._paused_until = time.monotonic() + self.PAUSE
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = address(addr)
            self._conns[sock] = [peer, bytearray()]
            self._selector.register(sock, self._read_events)
            self._apply(self.gate.accepted(sock, peer, time.monotonic()))
            if sock in self._conns:  # a real client's hello is usually here already: take it before more accepts
                self._read(sock)

    def _read(self, sock):
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # a reset: not the quiet close of a client that only read the greeting
            return self._apply(self.gate.failed(sock, describe(e)))
        self._apply(self.gate.received(sock, data, time.monotonic()))

    def _flush(self, sock):
        out = self._conns[sock][1]
        with contextlib.suppress(BlockingIOError):
            del out[: sock.send(out)]
        self._selector.modify(sock, self._read_events | (self._write_events if out else 0))

    def _close(self, sock):
        if self._conns.pop(sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()

    def _apply(self, actions):
        for action in actions:
            if isinstance(action, Log):
                (self._log if action.paced else self.log)(action.line)
                continue
            sock = action.key
            if sock not in self._conns:
                continue
            elif isinstance(action, Write):
                self._conns[sock][1] += action.data
                with contextlib.suppress(OSError):
                    self._flush(sock)
            elif isinstance(action, Drop):
                with contextlib.suppress(OSError):  # a refusal queued just before goes out if it can
                    sock.send(self._conns[sock][1])
                self._close(sock)
                if action.line:
                    self.log(action.line)
            elif isinstance(action, Admit):
                peer, out = self._conns.pop(sock)
                self._selector.unregister(sock)
                try:
                    sock.setblocking(True)
                    sock.sendall(out)
                    self.admit(sock, action.conn, action.kind, peer)
                except Exception as error:
                    self.log(f"{peer} dropped: {describe(error)}")
                    sock.close()


class Server:
    """The server's chats: one at a time, each started by a client that gave the passphrase, resumed by the same
    client's resumption secret; and the input loop that gives them what is typed."""

    def __init__(self, listener, passphrase, args, ui):
        self.listener, self.args, self.ui = listener, args, ui
        self.fmt = LEGACY if args.legacy else V2
        self.gate = Gate(passphrase, self, handshakes=not args.legacy)
        self.lock = threading.Lock()
        self.chat = None  # the chat on now, possibly holding its conversation for its client
        self._ended = collections.deque()  # chats that ended and gave way to a newer one before being reported
        self._resumption = None  # (id, secret) of that chat's conversation
        self.queued = []  # (text, timestamp) typed while no chat was on: the next chat sends them
        self._served = False  # a chat began (and offered the files of --send)
        self._user_left = False  # its user left a chat: the server stops once that chat is over
        self._door_failed = None
        self._idle_status()

    def _idle_status(self):
        queued = [f"{len(self.queued)} queued", f"{len(self.queued)} queued"] if self.queued else [""]
        self.ui.set_status([[f"listening on {address(self.listener.getsockname())}", "listening"],
                            ["waiting for a client", ""], queued], (1, 0, 2))

    # -- what the Gate asks, from the door's thread

    def status(self):
        chat = self.chat
        return BUSY if chat is not None and chat.active and chat.connected() else OPEN

    def _on(self):
        """The chat on now, if any: not one whose session has ended (under self.lock)."""
        return self.chat if self.chat is not None and not self.chat.over() else None

    def secret_for(self, resume_id):
        with self.lock:
            known = self._resumption if self._on() is not None else None
        if known is not None and hmac.compare_digest(known[0], resume_id):
            return known[1]
        return None

    def admit(self, sock, conn, kind, peer):
        """An authenticated connection (any connection, in legacy): start a chat, resume or take over the one on,
        or turn it away."""
        new = False
        with self.lock:
            chat = self._on()
            late = kind == RESUME and (chat is None or self._resumption is None)  # its conversation ended meanwhile
            busy = kind != RESUME and chat is not None and (chat.connected() or not self.fmt.resumes)
            if not (late or busy) and chat is None:
                args = self.args
                session = Session(SERVER, self.fmt, Conversation.new(), time.monotonic(), args.keepalive,
                                  args.reconnect_for, self.ui.interactive, self.queued,
                                  receive_files=args.receive_dir is not None, max_file_size=args.max_file_size,
                                  send=args.send, log=args.receive_only)
                if self.chat is not None:
                    self._ended.append(self.chat)  # over, but its end not yet told
                chat = self.chat = Chat(self.ui, session, files=Files(args.receive_dir or "."))
                self.queued, new, self._served = [], True, True
            if kind == PASSPHRASE and not (late or busy):
                self._resumption = conn.resumption
        if late:
            return sock.close()
        if busy:
            return self._turn_away(sock, conn, peer)  # lost the race to another client
        chat.attach(sock, conn, peer, kind)
        if new:
            self.ui.wake()  # the input loop takes the new chat up

    def _turn_away(self, sock, conn, peer):
        with contextlib.suppress(AeschatError, OSError):
            sock.sendall(conn.seal(Busy()))
        sock.close()
        self.ui.show([f"{peer} turned away: a chat with another client is on"], "notice")

    # -- the input loop

    def serve(self):
        """The input loop: lines go to the chat on (or wait for the next); it returns the exit code when the server
        stops: after one chat with --once, once its user leaves (quit(), /quit, Ctrl-D), or on a signal."""
        door = Door(self.listener, self.gate, self.admit, lambda line: self.ui.show([line], "notice"))
        guarded(door.run, self._door_crashed, "door")
        while True:
            code = self._reported()
            if code is not None and (self.args.once or self._user_left):
                return code
            if code is not None:
                continue
            line = self.ui.read_line()
            if line is WAKE:
                continue
            code = self._take(line)
            if code is not None:
                return code

    def _reported(self):
        """The exit code of a chat that ended and has now been told of, or None."""
        with self.lock:
            ended = self._ended.popleft() if self._ended else None
            chat = ended or self.chat
        if self._door_failed is not None:
            raise self._door_failed
        if ended is not None:
            ended.done.wait()  # it gave way as its session ended: its End is being carried out
        if ended is not None or chat is not None and not chat.active:
            return self._report(chat, last=self._user_left)
        return None

    def _take(self, line):
        """A line typed: to the chat on; or, with none, a command, or kept for the next. An exit code if the server
        stops now (its user left with no chat on)."""
        with self.lock:  # the chat the line goes to is the one on when it arrived (else it waits for the next)
            chat = self._on()
        interactive = self.ui.interactive
        if chat is not None:
            if line is None or is_quit(line, interactive):
                self._user_left = True  # the user leaves the chat, and the server with it (the peer leaving would not)
                chat.leave(answers=FLUSH_TIMEOUT if interactive else self.args.wait)
                chat.done.wait()
            elif line.strip():
                chat.typed(line)
        elif line is None or is_quit(line, interactive):
            self.ui.show(["the server stops" if interactive or line is not None else
                          "end of input: the server stops (--receive-only keeps it serving)"], "notice")
            return self._leave_idle()
        elif interactive and line.strip() == "/help":
            for help_line in HELP + HELP_KEYS:
                self.ui.show([help_line], "notice" if help_line in HELP else "keys")
        elif interactive and line.startswith("/") and not line.startswith("//"):
            self.ui.show(["that command works once a client is connected; quit() stops the server"], "error")
        elif line.strip():
            self._queue(line[1:] if interactive and line.startswith("//") else line)
        return None

    def _leave_idle(self):
        """The server stops while no one is connected: what was typed for the next client is never sent."""
        with self.lock:
            queued, self.queued = self.queued, []
        files = [] if self._served else self.args.send
        if not (queued or files):
            return EXIT_OK
        if queued:
            never = [Message(i, text, timestamp) for i, (text, timestamp) in enumerate(queued)]
            self.ui.show([undelivered_text(never, 0)], "error")
        if files:
            n = len(files)
            self.ui.show([f"{n} file{'s' if n > 1 else ''} never offered (no client came): "
                          f"{', '.join(visible(str(path)) for path in files)}"], "error")
        return EXIT_NETWORK

    def _queue(self, line):
        """A line typed while no one is connected: kept for the next chat, which sends it first."""
        try:
            check_message_text(line)
        except LocalProtocolError as e:
            return self.ui.show([f"not sent: {e}"], "error")
        if not self.fmt.acknowledges and legacy_warnings(line):
            self.ui.show(["an original receiver will mangle this message: " + "; ".join(legacy_warnings(line))],
                         "warning")
        timestamp = now_iso()
        with self.lock:
            self.queued.append((line, timestamp))
        self.ui.show(sent_lines(line, timestamp, "Queued"))
        self.ui.show(["(to be sent when a client connects)"], "event")
        self._idle_status()

    def interrupt(self, code):
        with self.lock:
            chat = self.chat
        if chat is not None and chat.active:
            chat.interrupt(code)
            chat.done.wait(2.0)
            self._report(chat, last=True)
        else:
            self._leave_idle()

    def _report(self, chat, last=False):
        with self.lock:
            if self.chat is chat:
                self.chat = self._resumption = None
        code = report(chat, going_on=not (self.args.once or last))
        if not (self.args.once or last):
            self.ui.show(["waiting for the next client"], "notice")
            self._idle_status()
        return code

    def _door_crashed(self, error):
        self._door_failed = error
        self.ui.wake()


def report(chat, going_on=False):
    """Tell the user how a chat ended (here, by the input loop's thread, so the line is never lost at exit). going_on:
    the server serves the next client: what went undelivered is told, but it is no error of the program's."""
    chat.settle(2.0)
    chat.files.close()  # no temporary file outlives its chat
    code, text = chat.outcome
    if text:
        fine = code in (EXIT_OK, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_HUNG_UP) or (going_on and code == EXIT_NETWORK)
        chat.ui.show([text], "notice" if fine else "error")
    return code


class Terminated(BaseException):
    """SIGTERM (or SIGHUP), raised in the main thread: leave as Ctrl-C does; code: the exit code it makes."""

    def __init__(self, code=EXIT_TERMINATED):
        super().__init__(code)
        self.code = code


def run_chat(chat, answers=None):
    """The client's input loop: once the chat has begun, every typed line goes to it; returns the exit code. In a
    pipe, leaving gives the peer `answers` seconds to answer the files offered (None: as long as it is connected)."""
    ui = chat.ui
    try:
        release_signals()  # Ctrl-C or SIGTERM while the chat was set up: here, where leaving says goodbye
        chat.begun.wait()
        while chat.active:
            line = ui.read_line()
            if line is WAKE:
                continue
            if line is None or is_quit(line, ui.interactive):
                chat.leave(answers=FLUSH_TIMEOUT if ui.interactive else answers)
                chat.done.wait()
            elif line.strip() == "/reconnect" and chat.waiting_for_user() and not passphrase_again(chat, ui):
                continue
            elif line.strip():
                chat.typed(line)
    except KeyboardInterrupt:
        chat.interrupt(EXIT_INTERRUPTED)
        chat.done.wait(2.0)
    except Terminated as e:
        chat.interrupt(e.code)
        chat.done.wait(2.0)
    except OutputFailed:
        chat.interrupt(EXIT_NETWORK)
        chat.done.wait(2.0)
        report(chat)
        raise
    return report(chat)


def passphrase_again(chat, ui):
    """/reconnect, when the server no longer knows the conversation or refused the passphrase: it may have started
    again with another, so the user is asked (Enter: the same as before). False: they changed their mind."""
    answer = ui.ask_passphrase("Passphrase (Enter: the same as before): ")
    if answer is None:
        ui.show(["/reconnect: not now"], "notice")
        return False
    if answer.strip():
        chat.new_passphrase(answer)
    return True


# ===================================================================================================
# 10. The user interface: plain lines for pipes and scripts, prompt_toolkit on a terminal.

WAKE = object()  # what read_line returns when something other than the user needs the input loop


class PlainUI:
    """Pipes and scripts: no escape codes at all. stdout carries the transcript (Received:, Sent:, Queued:);
    everything else goes to stderr, so a script can parse stdout."""

    def __init__(self, prog, read_input=True):
        self.prog = prog
        # A person types at a terminal even when the output goes to a pipe (client.py | tee log): commands are
        # theirs then, not text to send.
        self.interactive = read_input and sys.stdin.isatty()
        self._echoed = self.interactive and sys.stdout.isatty()  # a terminal with no editor of ours (TERM=dumb)
        for stream in (sys.stdin, sys.stdout, sys.stderr):
            stream.reconfigure(errors="replace" if stream is sys.stdin else "backslashreplace")
        self._width = os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
        self._inbox = queue.Queue()
        self._printing = queue.Queue()
        self._failed = None  # why our output could not be written
        self._bar = sys.stderr.isatty()  # a transfer's progress: a bar on a terminal, else a line per 10%
        self._bar_shown, self._tenths = "", {}
        self._printer = guarded(self._print, self._output_failed, "printer")
        if read_input:
            guarded(self._read_stdin, lambda error: self._inbox.put(None), "stdin")

    def _read_stdin(self):
        limit = MAX_MESSAGE + 1  # characters: a line longer than that is longer in bytes too
        while line := sys.stdin.readline(limit):
            if len(line) == limit and not line.endswith("\n"):  # too long: read to its end, never whole
                size = len(line.encode("utf-8"))
                while line and not line.endswith("\n"):
                    line = sys.stdin.readline(limit)
                    size += len(line.rstrip("\n").encode("utf-8"))
                line = Unsendable(f"the message is {size} bytes; the limit is {MAX_MESSAGE} bytes of UTF-8")
            self._inbox.put(line[: -2 if line.endswith("\r\n") else -1] if line.endswith("\n") else line)
        self._inbox.put(None)

    def _output_failed(self, error):
        why = "its reader went away" if isinstance(error, BrokenPipeError) else describe(error)
        self._failed = OutputFailed(f"cannot write the output: {why}")
        self._inbox.put(WAKE)

    def read_line(self):
        """The next typed line, None at end of input (and ever after), or WAKE; OutputFailed once the output
        cannot be written."""
        line = self._inbox.get()
        if self._failed is not None:
            raise self._failed
        if line is None:
            self._inbox.put(None)
        return line

    def wake(self):
        self._inbox.put(WAKE)

    def show(self, lines, kind="chat"):
        """Queue a block for the printer thread: a slow reader of our output stalls nothing else."""
        if (kind == "sent" and self._echoed) or kind == "keys":
            return  # the terminal shows the line as it was typed: once is enough; and it has no editor's keys
        self._printing.put((kind, layout(prefixed(self.prog, lines, kind), self._width, kind)))

    def set_status(self, fields, order):
        pass  # a pipe has no status line

    def ask_passphrase(self, prompt):
        """A terminal with no editor of ours (TERM=dumb, or output to a pipe): the next line typed is the passphrase,
        the terminal's echo off meanwhile (the stdin thread reads it, as it reads every line); None if the input
        ends or the chat needs the loop. Where echo cannot be turned off (no termios: Windows), the passphrase given
        at the start goes again."""
        saved = None
        with contextlib.suppress(ImportError):
            import termios

            descriptor = sys.stdin.fileno()
            with contextlib.suppress(termios.error, OSError, ValueError):
                saved = termios.tcgetattr(descriptor)
        if saved is None:
            self.show(["(this terminal cannot be asked for a passphrase unseen: the one given at the start goes "
                       "again)"], "notice")
            return ""
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(descriptor, termios.TCSADRAIN, quiet)
        try:
            sys.stderr.write(prompt)
            sys.stderr.flush()
            line = self._inbox.get()
            if line is None:
                self._inbox.put(None)
            return None if line is None or line is WAKE else line
        finally:
            termios.tcsetattr(descriptor, termios.TCSADRAIN, saved)
            sys.stderr.write("\n")
            sys.stderr.flush()

    def progress(self, action):
        if self._bar:
            self._printing.put(("bar", action))
        elif action.percent // 10 != self._tenths.get(action.what):  # a line every 10%
            self._tenths[action.what] = action.percent // 10
            self.show([progress_line(action)], "notice")

    def _print(self):
        """Print what is queued, all that waits at once in one write a stream, so that the lines of a burst cost
        one wake-up and one write, not one each."""
        while True:
            items = [self._printing.get()]
            while items[-1] is not None and not self._printing.empty():
                items.append(self._printing.get_nowait())
            runs = []  # (stream, rows): consecutive blocks for one stream go out together, in their order
            bar = None
            for item in items:
                if item is not None and item[0] == "bar":
                    bar = item[1]
                elif item is not None:
                    stream = sys.stdout if item[0] in TRANSCRIPT else sys.stderr
                    if runs and runs[-1][0] is stream:
                        runs[-1][1].extend(item[1])
                    else:
                        runs.append((stream, list(item[1])))
            for stream, rows in runs:
                self._clear_bar(stream)
                stream.write("\n".join(rows) + "\n")
                stream.flush()
            self._draw_bar(bar)
            if items[-1] is None:
                return

    def _clear_bar(self, stream):
        if self._bar_shown and (stream is sys.stderr or sys.stdout.isatty()):
            sys.stderr.write("\r" + " " * len(self._bar_shown) + "\r")

    def _draw_bar(self, action):
        """The bar of the last progress, where it was (after anything printed meanwhile); a finished one stays."""
        if action is None and not self._bar_shown:
            return
        if action is not None:
            self._bar_shown = progress_bar(action, os.get_terminal_size(sys.stderr.fileno()).columns)
        sys.stderr.write("\r" + self._bar_shown + ("\n" if action is not None and action.percent == 100 else ""))
        sys.stderr.flush()
        if action is not None and action.percent == 100:
            self._bar_shown = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._printing.put(None)
        self._printer.join(timeout=5)
        return False


def progress_line(action):
    """A transfer's progress in words: sending file x.bin (20.0 MiB): 30%, 6.0 MiB, 512.0 KiB/s."""
    rate = f", {size_text(int(action.rate))}/s" if action.rate else ""
    return f"{'sending' if action.outgoing else 'receiving'} {action.what}: {action.percent}%, " \
           f"{size_text(action.done)}{rate}"


def progress_bar(action, width):
    """The same as a bar within width columns: words, then [####----]."""
    words = progress_line(action)
    room = width - 1 - len(words) - 3
    if room < 10:
        return words[: max(width - 1, 0)]
    filled = room * action.percent // 100
    return f"{words} [{'#' * filled}{'-' * (room - filled)}]"


def prefixed(prog, lines, kind):
    """Errors and warnings say whose they are, in one style: `aeschat-client: error: ...`."""
    if kind in ("error", "warning"):
        return [f"{prog}: {kind}: {lines[0]}", *lines[1:]]
    return list(lines)


_MOUSE_REPORT = re.compile(r"\x1b\[(<\d+;\d+;\d+[mM]|\d+;\d+;\d+M|M...)\Z", re.S)


COMMANDS = tuple(f"/{name} " if name == "send" else f"/{name}" for name in COMMAND_NAMES)


class TerminalUI:
    """A terminal (prompt_toolkit): the typed line stays intact while messages print above it, with line editing,
    history, multi-line messages (a paste, or Alt-Enter), Tab completion of commands and of the paths after /send,
    and a status line. What the line holds is shown as the transcript shows it (escaped). Imported only here, to keep
    it off the pipe path."""

    interactive = True

    def __init__(self, prog):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        self.prog = prog
        self._held = None  # (why, text): a line kept in the editor, the user told why: Enter again sends it anyway
        self._pastes = []  # the folders of the texts sent as files: removed when the program ends
        self._session = PromptSession(history=None, key_bindings=self._keys(), erase_when_done=True,
                                      enable_suspend=True, completer=_completer(), complete_while_typing=False,
                                      input_processors=[_escaped_processor()])
        self._patch = patch_stdout(raw=True)
        self._woken = threading.Event()
        self._status = ([[""]], ())

    def _keys(self):
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.keys import Keys

        keys = KeyBindings()

        @keys.add("escape", "enter")  # Alt-Enter, or Esc then Enter: a new line inside the message
        def _(event):
            event.current_buffer.insert_text("\n")

        @keys.add(Keys.Vt100MouseEvent)
        def _(event):
            # prompt_toolkit takes any ESC [ digits m for a mouse report, and its own handler raises on what is not
            # one (Esc then "[31m" typed quickly). We never turn mouse reporting on, so it is typed text: keep it.
            if not _MOUSE_REPORT.match(event.data):
                event.current_buffer.insert_text(event.data[1:])

        @keys.add("c-c")  # a half-typed line is cleared; on an empty line, Ctrl-C leaves, as it always did
        def _(event):
            if event.current_buffer.text:
                event.current_buffer.reset()
            else:
                event.app.exit(exception=KeyboardInterrupt())

        @keys.add("enter")
        def _(event):
            self._enter(event.current_buffer)

        return keys

    def _enter(self, buffer):
        """Enter sends the line. An unknown command stays in the editor (Enter again: it goes as a message, the
        slash and all); so does a message over the limit (Enter again: it goes as a text file instead). The user is
        told on the status line: above a long text, a line would scroll away."""
        text = buffer.text
        name = command_of(text)
        if name in COMMAND_NAMES:
            self._held = None
            return buffer.validate_and_handle()
        if name is not None and self._held != ("command", text):
            return self._hold("command", text, buffer)
        message = text if name is not None else message_of(text)
        if len(message.encode("utf-8", "surrogatepass")) <= MAX_MESSAGE:
            self._held = None
            buffer.text = "/" + text if name is not None else text  # //text sends /text
            return buffer.validate_and_handle()
        if self._held != ("long", text):
            return self._hold("long", text, buffer)
        self._held = None
        path = paste_file(message)
        self._pastes.append(os.path.dirname(path))
        buffer.text = f"/send {shell_quoted(path)}"
        buffer.validate_and_handle()

    def _hold(self, why, text, buffer):
        self._held = (why, text)
        return buffer.app.invalidate() if hasattr(buffer, "app") else None

    def __enter__(self):
        self._patch.__enter__()
        _on_terminate.append(self._terminate)
        return self

    def __exit__(self, *exc):
        _on_terminate.remove(self._terminate)
        import shutil

        for folder in self._pastes:  # the chat is over: no copy of what was pasted outlives it
            shutil.rmtree(folder, ignore_errors=True)
        return self._patch.__exit__(*exc)

    def _terminate(self):
        """SIGTERM or SIGHUP: the prompt ends (or the next one never begins), and read_line raises Terminated."""
        self.wake()

    def _width(self):
        return self._session.output.get_size().columns

    def read_line(self):
        if _signalled:
            raise _signalled[0]
        if self._woken.is_set():
            self._woken.clear()
            return WAKE
        try:
            text = self._session.prompt("> ", bottom_toolbar=self._toolbar, refresh_interval=0.5,
                                        pre_run=self._exit_if_woken)
        except EOFError:
            return None
        if _signalled:
            raise _signalled[0]
        return text if text is WAKE else text.rstrip("\n")

    def ask_passphrase(self, prompt):
        """A passphrase typed unseen (a code's words complete with Tab), between two prompts of the chat's; None if
        the user gives up (Ctrl-C, Ctrl-D)."""
        try:
            return read_code(prompt)
        except (EOFError, KeyboardInterrupt):
            return None

    def _toolbar(self):
        text = self._session.default_buffer.text
        if self._held == ("long", text):
            size = len(message_of(text).encode("utf-8", "surrogatepass"))
            return fit_status([[f"this message is {size:,} bytes, over the limit of {MAX_MESSAGE:,}: Enter again "
                                "sends it as a text file instead; or edit it", f"{size:,} bytes: too long; Enter "
                                "again sends it as a file"]], (0,), self._width())
        if self._held == ("command", text):
            name = visible(command_of(text)[:20])
            return fit_status([[f"unknown command /{name}: Enter again sends it as a message; /help lists them",
                                "unknown command: Enter again sends it as a message"]], (0,), self._width())
        return fit_status(*self._status, self._width())

    def _exit_if_woken(self):
        app = self._session.app
        if self._woken.is_set() and app.is_running and not app.future.done():
            self._woken.clear()
            app.exit(result=WAKE)

    def wake(self):
        self._woken.set()
        app = self._session.app
        if app.is_running:
            app.loop.call_soon_threadsafe(self._exit_if_woken)

    def show(self, lines, kind="chat"):
        rows = layout(prefixed(self.prog, lines, kind), self._width(), kind)
        print("\n".join(rows), flush=True)

    def set_status(self, fields, order):
        self._status = (fields, order)

    def progress(self, action):
        pass  # the status line shows it


def paste_file(text):
    """A text too long for a message, in a file of its own to send instead (in a folder only this user reads)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="aeschat-"), time.strftime("paste-%Y%m%d-%H%M%S.txt"))
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    return path


def _completer():
    """Tab completes the commands, and the path after /send (~ included)."""
    from prompt_toolkit.completion import Completer, Completion, PathCompleter

    paths = PathCompleter(expanduser=True)

    class Commands(Completer):
        def get_completions(self, document, event):
            text = document.text_before_cursor
            if text.startswith("/send "):
                yield from _path_completions(text[len("/send ") :], paths, event)
            elif text.startswith("/") and " " not in text and "\n" not in text:
                for command in COMMANDS:
                    if command.startswith(text) and command != text:
                        yield Completion(command, start_position=-len(text))

    return Commands()


def _path_completions(rest, paths, event):
    """The path after /send, as /send will take it (quoted, or with escapes, as a shell would), completed in the
    style it was typed in: inside its quotes, with escapes, or as it is (with spaces, /send takes it whole); where
    that cannot hold what the name has, the path is written back whole, escaped. A folder gets its slash, so that
    Tab again goes inside it."""
    from prompt_toolkit.completion import Completion
    from prompt_toolkit.document import Document

    quote = rest[:1] if rest[:1] in ("'", '"') else ""
    typed = typed_path(rest)
    bare = not quote and re.search(r"(?<!\\)\s", rest) is not None  # spaces not escaped: taken as they are
    for completion in paths.get_completions(Document(typed, len(typed)), event):
        whole = typed[: len(typed) + completion.start_position] + completion.text
        if os.path.isdir(os.path.expanduser(whole)) and not whole.endswith("/"):
            whole += "/"
        suffix = whole[len(typed) :] if whole.startswith(typed) else None
        if suffix is not None and quote == "'":  # a quote in the name: closed, escaped, opened again
            yield Completion(suffix.replace("'", "'\\''"), 0, completion.display)
        elif suffix is not None and quote == '"':
            yield Completion(re.sub(r'(["\\])', r"\\\1", suffix), 0, completion.display)
        elif suffix is not None and bare and not re.search(r"""['"\\]""", suffix):
            yield Completion(suffix, 0, completion.display)
        elif suffix is not None and not quote and not bare:
            yield Completion(_escaped(suffix), 0, completion.display)
        else:
            yield Completion(_escaped(whole), -len(rest), completion.display)


def _escaped(path):
    """A path with what shlex (and so /send) would take otherwise, white space, quotes, backslashes, escaped."""
    return re.sub(r"""([\s'"\\])""", r"\\\1", path)


def _escaped_processor():
    """The typed line shown as the transcript shows text (visible()): a right-to-left override or a bell as \\u202e
    or \\x07, a letter that draws nothing as its code, never raw; the cursor moves over each as over one character."""
    from prompt_toolkit.layout.processors import Processor, Transformation
    from prompt_toolkit.layout.utils import explode_text_fragments

    class Escaped(Processor):
        def apply_transformation(self, ti):
            fragments, shown, starts = [], 0, []
            for style, text, *rest in explode_text_fragments(ti.fragments):
                starts.append(shown)
                display = visible(text) if text not in ("", "\n") else text
                fragments.append((style, display, *rest))
                shown += len(display)
            starts += [shown, shown + 1]  # the cursor may stand after the last character too

            def to_source(position):
                return max((i for i, start in enumerate(starts) if start <= position), default=0)

            return Transformation(fragments, source_to_display=lambda i: starts[min(i, len(starts) - 1)],
                                  display_to_source=to_source)

    return Escaped()


def dumb_terminal():
    """A terminal with no cursor to move (Emacs's shell, TERM=dumb): plain lines, and it shows what is typed."""
    return os.environ.get("TERM", "").lower() in ("dumb", "unknown")


def read_code(prompt):
    """A line typed unseen, as getpass reads it, unless it is a code: Tab completes the word being typed, and from
    the first Tab on, what is typed shows for as long as it can be a code (a passphrase never does)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.filters import Condition
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.layout.processors import ConditionalProcessor, Processor, Transformation

    asked = []  # a Tab was pressed: the person is typing a code

    class Words(Completer):
        def get_completions(self, document, complete_event):
            typed = re.split(r"[ \t-]+", document.text_before_cursor)[-1]
            for word in code_candidates(document.text_before_cursor) if asked and typed else ():
                yield Completion(word, start_position=-len(typed))

    keys = KeyBindings()

    @keys.add("tab")
    def _(event):
        buffer = event.current_buffer
        words = code_candidates(buffer.text)
        if not words or not buffer.text.strip():
            return
        asked.append(True)
        typed = re.split(r"[ \t-]+", buffer.text)[-1]
        if len(words) == 1:
            buffer.insert_text(words[0][len(typed):] + "-")
        else:
            buffer.insert_text(os.path.commonprefix(words)[len(typed):])
            buffer.start_completion(select_first=False)

    class Unseen(Processor):  # not even a star a character: the length is not shown either
        def apply_transformation(self, ti):
            return Transformation([], source_to_display=lambda i: 0, display_to_source=lambda i: 0)

    session = PromptSession(key_bindings=keys, completer=Words(), complete_while_typing=Condition(lambda: bool(asked)))
    hidden = Condition(lambda: not (asked and code_candidates(session.default_buffer.text)))
    return session.prompt(prompt, input_processors=[ConditionalProcessor(Unseen(), hidden)])


def make_ui(prog, receive_only=False):
    if sys.stdin.isatty() and sys.stdout.isatty() and not receive_only and not dumb_terminal():
        return TerminalUI(prog)
    return PlainUI(prog, read_input=not receive_only)


# ===================================================================================================
# 11. The command line.

LEGACY_WARNING = ("--legacy is NOT SECURE: AES-ECB under an unsalted key, no authentication; anyone on the "
                  "network can read, alter and replay messages. Use it only with the original scripts.")


def legacy_warning(prog):
    """The warning, in rows of 80 columns at most (a terminal would break its one long line mid-word)."""
    import textwrap

    return textwrap.fill(f"{prog}: warning: {LEGACY_WARNING}", 80, subsequent_indent="  ")


def read_key_file(path):
    """The passphrase in a key file: UTF-8 (a byte order mark is dropped), less one trailing newline."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read the key file {path}: {describe(e)}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"{program}: warning: the key file {path} can be read by other users (chmod 600 {path})",
              file=sys.stderr)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # say where, never which bytes: they are the secret
        raise UsageError(f"the key file {path} is not UTF-8 text") from None
    return _one_line(text[1:] if text.startswith("\ufeff") else text)


def _one_line(text):
    """A passphrase given as a line (a key file, AESCHAT_KEY, a paste at a prompt): less the line's end."""
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def passphrase_given(args):
    """--key-file, else AESCHAT_KEY; None when neither is given (then only a prompt can ask)."""
    if args.key_file:
        passphrase = read_key_file(args.key_file)
    elif os.environ.get("AESCHAT_KEY") is not None:
        passphrase = _one_line(os.environ["AESCHAT_KEY"])
    else:
        return None
    return checked_passphrase(passphrase)


def prompt_passphrase(prompt="Passphrase: ", empty_is_none=False, codes=False):
    """The passphrase typed at a prompt that does not show it; with codes, Tab completes a code's words (and shows
    the code from then on, as long as what is typed can be one). empty_is_none: Enter alone gives None."""
    if not sys.stdin.isatty():
        raise UsageError("no passphrase: give one with --key-file PATH or the AESCHAT_KEY environment variable")
    import getpass

    while True:
        try:
            text = read_code(prompt) if codes and not dumb_terminal() else getpass.getpass(prompt)
        except EOFError:  # Ctrl-D at the prompt
            print(file=sys.stderr)  # the error on a line of its own, not after the prompt
            raise UsageError("no passphrase: the input ended at the prompt") from None
        text = _one_line(text)  # a pasted line brings its newline along
        if text.strip() or empty_is_none:
            return checked_passphrase(text) if text.strip() else None
        tell(f"{program}: the passphrase is empty; type it (Ctrl-C or Ctrl-D stops)")  # Enter alone: asked again


YEAR = 365 * 24 * 3600.0


def _guesses(passphrase):
    """zxcvbn's estimate, its modules let go of afterwards: their word lists (8 MiB) are needed once."""
    import gc

    from zxcvbn import zxcvbn

    guesses = float(zxcvbn(passphrase[:100])["guesses"])
    for name in [name for name in sys.modules if name.split(".")[0] == "zxcvbn"]:
        del sys.modules[name]
    del zxcvbn
    gc.collect()
    return guesses


def warn_if_weak(passphrase, prog):
    """A chosen passphrase that the door's guessing budget (GUESS_RATE from all networks together) could exhaust
    within a year, by zxcvbn's estimate of the guesses it takes (a code: at most its words' combinations), is
    warned of."""
    guesses, code = _guesses(passphrase), as_code(passphrase)
    if code:  # words of the list: at most every combination of as many words
        guesses = min(guesses, 2.0 ** code_bits(code))
    budget = GUESS_BURST + GUESS_RATE * YEAR
    if guesses <= budget:
        tell(f"{prog}: warning: this passphrase could be guessed within a year (zxcvbn estimates 10^"
             f"{math.log10(max(guesses, 1)):.1f} guesses; anyone who reaches the port may try one a second): "
             f"--new-code makes a code of {code_bits(new_code()):.0f} bits")


def ask(prompt, what):
    """A line typed at a prompt, stripped; Ctrl-D there is a usage error naming what was asked for."""
    try:
        return input(prompt).strip()
    except EOFError:
        print(file=sys.stderr)
        raise UsageError(f"no {what}: the input ended at the prompt") from None


LATER_RETRY = 10.0  # seconds before a person's client asks again when the server said "later"


def first_connection(args, prog):
    """The client's first connection: (its Dialer, (socket, connection, peer)). On a terminal a person gets second
    chances: a server not yet listening is waited for, a busy one waited out if they wish, a wrong passphrase asked
    again (up to PASSPHRASE_TRIES). A script's client keeps its plain exits, but waits its turn at a busy server."""
    person = sys.stdin.isatty()
    passphrase, tries = passphrase_given(args), 1
    if person and not args.legacy:
        wait_for_server(args, prog)
    prompted = passphrase is None
    while True:
        if prompted:
            passphrase = prompt_passphrase("Passphrase: " if tries == 1 else
                                           f"Passphrase (try {tries} of {PASSPHRASE_TRIES}): ", codes=not args.legacy)
        dial = Dialer(args.host, args.port, passphrase, args.legacy, args.proxy)
        dial.slow = lambda: tell(f"{prog}: the server is checking the passphrase; after wrong guesses it checks "
                                 "one every few seconds")
        try:
            return dial, dial_when_free(dial, args.reconnect_for, prog)
        except AuthenticationError as e:
            if not (prompted and person and tries < PASSPHRASE_TRIES) or isinstance(e, UnfinishedAuthentication):
                raise
            tries += 1
            tell(f"{prog}: {e}; try again (every try is a guess the server counts)")
        except Refused as e:
            if not (person and e.reason in WAITED_OUT):
                raise
            if e.reason == "busy":
                wait_for_server(args, prog, refused=e)
            else:  # checks spent, or shed under a flood: a person's client comes back, as a script's does
                pause = LATER_RETRY if e.reason == "later" else LAST_RETRY
                tell(f"{prog}: {e}; trying again in {pause:.0f} s; Ctrl-C stops")
                time.sleep(pause)  # the server's pace: it said when


def dial_when_free(dial, patience, prog):
    """A script's client (not a person's) waits for a busy server, as it would for a network that is down: a sink
    serves one-shot clients one after another, and several may come at once."""
    until, delay = time.monotonic() + patience, FIRST_RETRY
    while True:
        try:
            return dial()
        except Refused as e:
            left = until - time.monotonic()
            if e.reason not in WAITED_OUT or sys.stdin.isatty() or left <= 0:
                raise
            if delay == FIRST_RETRY:
                tell(f"{prog}: {e}; trying again for up to {patience:.0f} s")
            time.sleep(min(delay, left))  # the last try at the end of the time said, not a back-off before it
            delay = min(delay * 2, LAST_RETRY)


def wait_for_server(args, prog, refused=None):
    """A person's client waits, backing off, for a server not yet listening, and (if they wish) for a busy one, up
    to --reconnect-for; Ctrl-C stops. Asked before the passphrase, so a busy server is said before it is typed."""
    until, delay, told = time.monotonic() + args.reconnect_for, FIRST_RETRY, set()
    while True:
        status, error = BUSY, refused
        if refused is None:
            try:
                status, error = greeting(args.host, args.port, args.proxy), None
            except NotListening as e:
                status, error = None, e
            if status == OPEN:
                return
        refused, busy = None, error or Refused("busy", REFUSALS[BUSY_REFUSAL])
        if status not in told:
            told.add(status)
            if status is None:
                tell(f"{prog}: waiting for {args.host}:{args.port} to start; Ctrl-C stops")
            elif not want_to_wait(busy):
                raise busy
        if time.monotonic() + delay > until:
            raise busy
        time.sleep(delay)  # the server's own pace: nothing of ours to wait on
        delay = min(delay * 2, LAST_RETRY)


def want_to_wait(refusal):
    answer = ask(f"{refusal}. Wait for your turn? [Y/n] ", "answer").lower()
    if answer not in ("", "y", "yes"):
        return False
    print("waiting for your turn; Ctrl-C stops", file=sys.stderr, flush=True)
    return True


def tell(text):
    """A line for the user before the chat (stderr): on a terminal, broken at spaces to fit it, the rest of it
    indented; whole for a script, which reads lines."""
    if sys.stderr.isatty():
        import textwrap

        try:
            width = min(os.get_terminal_size(sys.stderr.fileno()).columns, 100) - 1
        except OSError:  # a terminal that does not say its size
            width = 79
        text = textwrap.fill(text, width, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    print(text, file=sys.stderr, flush=True)


def checked_passphrase(passphrase):
    if not passphrase.strip():
        raise UsageError("the passphrase is empty")
    return passphrase


def seconds_argument(text):
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 10**8:  # three years: past that, the system's clocks overflow
        raise argparse.ArgumentTypeError(f"invalid time {text!r} (seconds, from 0 to 100000000)")
    return seconds


def size_argument(text):
    """A size in bytes: a whole number, with K, M, G or T for binary thousands (10M is 10 MiB)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (bytes, or a number with K, M, G or T)")
    return int(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " ")


def check_file_options(parser, args):
    """Files named on the command line are checked at once, so a script learns of a typo before it connects."""
    if args.legacy and (args.send or args.receive_dir):
        parser.error("--legacy has no files (the original scripts cannot receive them)")
    for path in args.send:
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
            parser.error(f"--send {path}: a folder we cannot read")
        elif not os.path.isdir(path) and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            parser.error(f"--send {path}: not a readable file or folder")
    folder = args.receive_dir
    if folder is not None and not os.path.exists(folder):
        parser.error(f"--receive-dir {folder}: no such folder (mkdir -p {shell_quoted(folder)} makes it)")
    if folder is not None and not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        parser.error(f"--receive-dir {folder}: " + ("a folder we cannot write in" if os.path.isdir(folder)
                                                     else "not a folder"))


def shell_quoted(text):
    import shlex

    return shlex.quote(text)


def port_number(text, lowest=1):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not lowest <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (a number from {lowest} to 65535)")
    return port


def split_host(text):
    """HOST:PORT or [IPv6]:PORT, as ssh and croc users type it: (host, port); anything else: (host, None). An IPv6
    address without brackets (two colons or more) is a host alone."""
    match = re.fullmatch(r"\[(?P<v6>[^\]]*)\]:(?P<v6port>\d+)|(?P<host>[^:\[\]]*):(?P<port>\d+)", text)
    if match is None:
        return text.strip("[]"), None
    host = match["v6"] if match["v6"] is not None else match["host"]
    return host, port_number(match["v6port"] or match["port"])


class ArgumentParser(argparse.ArgumentParser):
    def _get_formatter(self):
        """argparse's, told the terminal's width: left to find it, it imports shutil (and shutil its compression
        modules), 5 ms of every start-up, for a formatter each argument makes and throws away."""
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(sys.stdout.fileno()).columns
        except (ValueError, OSError):
            columns = 80
        return self.formatter_class(prog=self.prog, width=columns - 2)

    def error(self, message):
        """One line, not argparse's usage block: what is wrong and where to look."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def argument_parser(prog, description):
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--legacy", action="store_true",
                        help="speak the original scripts' format: NOT SECURE, only for a peer still running them")
    parser.add_argument("--key-file", metavar="PATH",
                        help="read the passphrase from PATH (else $AESCHAT_KEY, else a prompt)")
    reconnect = parser.add_mutually_exclusive_group()
    reconnect.add_argument("--reconnect-for", type=seconds_argument, default=RECONNECT_FOR, metavar="SECONDS",
                        help=f"when a connection drops, how long the client tries to reconnect and the server "
                             f"keeps the conversation for it (default {RECONNECT_FOR:.0f})")
    reconnect.add_argument("--no-reconnect", dest="reconnect_for", action="store_const", const=0.0,
                        help="end the chat when the connection drops")
    parser.add_argument("--send", action="append", default=[], metavar="PATH",
                        help="offer this file or folder as soon as the chat begins (may be given again); a client "
                             "in a pipe exits once the peer has answered every one")
    parser.add_argument("--wait", type=seconds_argument, metavar="SECONDS",
                        help="in a pipe, how long the peer has to answer the files of --send once input ends "
                             "(default: as long as it stays connected and each transfer moves)")
    parser.add_argument("--receive-dir", metavar="DIR",
                        help="accept every file offered, into DIR (without it: /accept on a terminal, declined in a "
                             "pipe)")
    parser.add_argument("--max-file-size", type=size_argument, default=MAX_FILE_SIZE, metavar="SIZE",
                        help=f"refuse offered files larger than SIZE bytes (K, M, G allowed; default "
                             f"{size_text(MAX_FILE_SIZE)})")
    parser.add_argument("--keepalive", type=float, default=KEEPALIVE, metavar="SECONDS", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


_on_terminate = []  # what a terminal interface does with SIGTERM instead of an exception mid-event-loop
_signalled = []  # the Terminated it raises where it is safe to
_held = None  # while a chat is set up (hold_signals): the first signal's exception, raised by release_signals


def hold_signals():
    """From the first connection to the input loop: a signal then would leave with no goodbye (the peer would wait
    for a reconnection), or land in the middle of the chat's setting up. It is kept for release_signals."""
    global _held
    _held = []


def release_signals():
    global _held
    held, _held = _held, None
    if held:
        raise held[0]


def _hold_or_raise(error):
    if _held is None:
        raise error
    if not _held:
        _held.append(error)


def _terminate(signum, frame):
    _leaving_anyway()
    if not _on_terminate:
        _hold_or_raise(Terminated(128 + signum))
        return
    # The terminal interface runs an event loop in this thread, between prompts too: raised into one of its
    # callbacks, Terminated would be caught there and shown as "Press ENTER to continue...", to a terminal
    # that may be gone (SIGHUP), forever. The interface ends its prompt and raises it itself.
    _signalled.append(Terminated(128 + signum))
    for handler in _on_terminate:
        handler()


def _interrupt(signum, frame):
    _leaving_anyway()
    _hold_or_raise(KeyboardInterrupt())


def _leaving_anyway():
    """Ctrl-C or a signal can land between two prompts, inside the terminal library's making of its event loop:
    what it left half-made is collected on the way out, and would print "Exception ignored" and a warning. The
    program is leaving: they are moot."""
    import warnings

    sys.unraisablehook = lambda unraisable: None
    warnings.simplefilter("ignore")


program = "aeschat"  # the name every error and warning begins with: the program's, whatever it was started as


def run(main, prog):
    """Run a program's main, mapping every error to one line and its exit code."""
    global program
    program = prog
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file holds the passphrase
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _interrupt)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, _terminate)
    try:
        code = main()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Terminated as e:
        print(f"{prog}: terminated", file=sys.stderr)
        code = e.code
    except AeschatError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = exit_code(e)
    except BrokenPipeError:
        code = EXIT_NETWORK
    except Exception as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        code = EXIT_INTERNAL
    try:
        sys.stdout.flush()
    except OSError:  # nowhere to write: let the interpreter's own last flush find /dev/null, not a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
