"""A stand-in for the original Client.py/Server.py, rebuilt from ../shared/legacy-wire-format.md, bugs included.

    python tests/original_peer.py server [PORT] [--spaced] [--echo-sent]
    python tests/original_peer.py client [--spaced]

Like the originals it asks on stdin: the server for the key (after its one connection arrived), the client for
the IP, the port, then the key. Each typed line goes out in one write; `quit()` closes. It reads at most 1024
bytes per recv and takes each read as exactly one message: it decrypts every 16-byte block on its own, deletes
every `~`, and shows a message only if `Received: ` + message is shorter than 79 columns, as
`Received: MESSAGE<spaces to column 79>TAG  HH:MM:SS` with TAG ☑ when the hash matches and ☒ when not. Anything
it cannot read is "Unrecognised Data". `--spaced` is the public copy that prints `Received : ` (so a message of
68 characters already vanishes); `--echo-sent` the copy of the server that also prints `Sent: TEXT`.

When the peer closes, recv returns b"" for ever and the originals spin without a word; this one spins too,
silently, but sleeps a millisecond a turn so as not to take a core from the tests. End of input is an EOFError
traceback, as in the originals; so is writing to a peer that has gone (BrokenPipeError).
"""

import datetime
import hashlib
import json
import socket
import sys
import threading
import time

import pyaes


def process_bytes(data):
    return [data[i : i + 16] for i in range(0, len(data), 16)]


def process_text(text):
    text += "~" * (-len(text) % 16)
    return [[ord(ch) for ch in text[i : i + 16]] for i in range(0, len(text), 16)]


def verify_and_display(data, prefix):
    message = data["message"]
    tag = "☑" if hashlib.sha256(message.encode()).hexdigest() == data["hash"] else "☒"
    line = prefix + message
    if len(line) < 79:
        print(line + " " * (79 - len(line)) + tag + "  " + data["timestamp"], flush=True)


class Listener(threading.Thread):
    def __init__(self, sock, aes, prefix):
        super().__init__(daemon=True)
        self.sock, self.aes, self.prefix = sock, aes, prefix

    def run(self):
        while True:
            data = self.sock.recv(1024)
            if not data:
                time.sleep(0.001)  # the originals spin here at full speed, saying nothing
                continue
            try:
                text = "".join("".join(chr(b) for b in self.aes.decrypt(list(block))) for block in process_bytes(data))
                verify_and_display(json.loads(text.replace("~", "")), self.prefix)
            except Exception:
                print("Unrecognised Data", flush=True)


def main():
    role, args = sys.argv[1], sys.argv[2:]
    spaced, echo_sent = "--spaced" in args, "--echo-sent" in args
    args = [a for a in args if not a.startswith("--")]
    if role == "server":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(args[0]) if args else 5555))
        listener.listen(1)
        print(f"Listening on port {listener.getsockname()[1]}", flush=True)
        sock, address = listener.accept()
        print(f"Connection from {address}", flush=True)
        key = input("Enter the AES pre-shared key: ")
    else:
        host = input("Server IP: ")
        port = int(input("Port: "))
        sock = socket.create_connection((host, port))
        print("Connected", flush=True)
        key = input("Enter the AES pre-shared key: ")
    aes = pyaes.AES(hashlib.sha256(key.encode()).digest())
    Listener(sock, aes, "Received : " if spaced else "Received: ").start()
    while True:
        text = input()
        if text == "quit()":
            sock.close()
            return
        now = datetime.datetime.now().strftime("%H:%M:%S")
        plain = json.dumps({"timestamp": now, "message": text, "hash": hashlib.sha256(text.encode()).hexdigest()})
        sock.send(b"".join(bytes(aes.encrypt(block)) for block in process_text(plain)))
        if echo_sent:
            print(f"Sent: {text}", flush=True)


if __name__ == "__main__":
    main()
