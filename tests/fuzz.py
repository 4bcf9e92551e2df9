"""Coverage-guided fuzzing of every decoder with atheris: only the project's remote-protocol error may
escape. Ten minutes:

    python tests/fuzz.py -max_total_time=600

The first byte of each input picks the decoder; the rest is what the peer sent. A crash prints the input
and saves it as crash-*; `python tests/fuzz.py crash-...` replays it.
"""

import contextlib
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # common.py, from the checkout

with atheris.instrument_imports():
    import pyaes

    import common

LEGACY_CIPHER = pyaes.AES(common.legacy_key("pw"))


def drain(next_item):
    while next_item() not in (None, common.ConnectionClosed()):
        pass


def frames(data):
    decoder = common.FrameDecoder()
    decoder.feed(data)
    decoder.feed(b"")
    drain(decoder.next_frame)


def record(data):
    common.decode_payload(common.RecordLayer(bytes(32), bytes(32)).open(data))


def legacy(data):
    decoder = common.LegacyDecoder(LEGACY_CIPHER)
    decoder.feed(data)
    decoder.feed(b"")
    drain(decoder.next_message)


def handshake(data):
    server = common.ServerConnection(entropy=lambda n: bytes(range(n)))
    server.receive_data(data)
    server.receive_data(b"")
    while (event := server.next_event()) not in (None, common.ConnectionClosed()):
        if isinstance(event, common.HelloReceived):
            server.answer("pw")
            server.derive()
        elif isinstance(event, common.ConfirmationReceived):
            server.check()


TARGETS = [frames, record, common.decode_payload, legacy, handshake]


def one_input(data):
    if not data:
        return
    with contextlib.suppress(common.RemoteProtocolError):  # the one error a peer may cause
        TARGETS[data[0] % len(TARGETS)](data[1:])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
