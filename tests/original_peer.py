"""A stand-in for the original scripts, written from ../shared/legacy-wire-format.md, bugs included.

It connects (`client HOST PORT`) or listens (`server PORT`), takes the passphrase from AESCHAT_KEY,
sends each stdin line in one write, reads at most 1024 bytes per recv and takes each read as exactly
one message, deletes every `~`, and prints only messages shorter than 79 columns with their prefix.
The tests use it to show that --legacy talks to a peer that still runs the old code.
"""

import datetime
import hashlib
import json
import os
import socket
import sys
import threading

import pyaes


def main():
    key = hashlib.sha256(os.environ["AESCHAT_KEY"].encode("utf-8")).digest()
    aes = pyaes.AES(key)
    if sys.argv[1] == "server":
        listener = socket.create_server(("127.0.0.1", int(sys.argv[2])))
        print(f"listening on {listener.getsockname()[1]}", flush=True)
        sock, _ = listener.accept()
    else:
        sock = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    print("connected", flush=True)

    def listen():
        while True:
            data = sock.recv(1024)
            if not data:
                print("closed", flush=True)
                return
            try:
                blocks = [data[i : i + 16] for i in range(0, len(data), 16)]
                text = "".join(bytes(aes.decrypt(b)).decode("utf-8") for b in blocks).replace("~", "")
                obj = json.loads(text)
                tag = "☒" if hashlib.sha256(obj["message"].encode()).hexdigest() == obj["hash"] else "☐"
                line = "Received: " + obj["message"]
                if len(line) < 79:
                    print(f"{line:<79}{tag}  {obj['timestamp']}", flush=True)
            except Exception:
                print("Unrecognised Data", flush=True)

    threading.Thread(target=listen, daemon=True).start()
    for line in sys.stdin:
        text = line.rstrip("\n")
        plain = json.dumps({"timestamp": datetime.datetime.now().strftime("%H:%M:%S"), "message": text,
                            "hash": hashlib.sha256(text.encode()).hexdigest()})
        plain += "~" * (-len(plain) % 16)
        sock.sendall(b"".join(bytes(aes.encrypt(plain[i : i + 16].encode())) for i in range(0, len(plain), 16)))
    sock.close()


if __name__ == "__main__":
    main()
