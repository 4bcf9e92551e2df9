"""A man in the middle on 127.0.0.1, for the fault and attack tests.

Proxy(port) listens on a free port and relays each connection to 127.0.0.1:port. It understands v1
frames: every frame in each direction is recorded, and a hook may drop, change, duplicate, hold back,
inject or reflect frames. It can also stall a connection (a black hole), reset it, or close it after a
number of bytes, and relay byte by byte.
"""

import contextlib
import socket
import struct
import threading

import common

C2S, S2C = "client->server", "server->client"


class Relay:
    """One proxied connection: the client's socket, the server's, and a pump each way."""

    def __init__(self, proxy, client, server):
        self.proxy, self.sockets = proxy, {C2S: (client, server), S2C: (server, client)}
        self.frames = {C2S: [], S2C: []}  # every whole frame seen, as it came
        self.forwarded = {C2S: 0, S2C: 0}  # bytes sent on
        self.cut_after = dict(proxy.cut_after)  # direction -> bytes after which this connection is closed
        self.stalled = threading.Event()
        self._flowing = {C2S: threading.Event(), S2C: threading.Event()}
        for event in self._flowing.values():
            event.set()
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def start(self):
        for direction in (C2S, S2C):
            threading.Thread(target=self._pump, args=(direction,), daemon=True).start()

    def send(self, direction, data):
        """Write data to the receiving end of direction (used to inject and reflect)."""
        with self._lock, contextlib.suppress(OSError):
            self.sockets[direction][1].sendall(data)

    def _pump(self, direction):
        src, _ = self.sockets[direction]
        buffer = bytearray()
        while not self.closed.is_set():
            self._flowing[direction].wait()
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self.stalled.is_set():
                continue  # a black hole: swallow everything
            buffer += data
            while len(buffer) >= 4:
                size = struct.unpack_from("!I", buffer)[0]
                if len(buffer) < 4 + size:
                    break
                frame = bytes(buffer[: 4 + size])
                del buffer[: 4 + size]
                index = len(self.frames[direction])
                self.frames[direction].append(frame)
                for out in self.proxy.hook(self, direction, index, frame):
                    self._forward(direction, out)
        if not self.stalled.is_set():
            self.close()

    def _forward(self, direction, data):
        limit = self.cut_after.get(direction)
        if limit is not None and self.forwarded[direction] + len(data) >= limit:
            self.send(direction, data[: limit - self.forwarded[direction]])
            self.forwarded[direction] = limit
            self.close()
            return
        if self.proxy.byte_by_byte:
            for i in range(len(data)):
                self.send(direction, data[i : i + 1])
        else:
            self.send(direction, data)
        self.forwarded[direction] += len(data)

    def stall(self):
        self.stalled.set()

    def freeze(self, direction):
        """Stop reading what the sender of direction writes, so that its buffers fill up."""
        self._flowing[direction].clear()

    def thaw(self, direction):
        self._flowing[direction].set()

    def close(self, reset=False):
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.sockets[C2S][0], self.sockets[S2C][0]):
            with contextlib.suppress(OSError):
                if reset:  # RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:  # a FIN now, though a pump may be blocked reading this socket
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class Proxy:
    def __init__(self, target_port, hook=None):
        self.target_port = target_port
        self.hook = hook or (lambda relay, direction, index, frame: [frame])
        self.byte_by_byte = False
        self.down = False  # the network is out: new connections are closed at once
        self.cut_after = {}  # direction -> bytes after which each new connection is closed
        self.relays = []
        self.new_relay = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relay = Relay(self, client, server)
            with self.new_relay:
                self.relays.append(relay)
                self.new_relay.notify_all()
            relay.start()

    def relay(self, index, timeout=20):
        """The index-th connection made through the proxy, once it exists."""
        with self.new_relay:
            if not self.new_relay.wait_for(lambda: len(self.relays) > index, timeout=timeout):
                raise AssertionError(f"no connection {index} through the proxy")
            return self.relays[index]

    def close(self):
        self.listener.close()
        for relay in self.relays:
            relay.close()


class Attacker:
    """A v1 client built from the protocol core, every byte of which the test controls."""

    def __init__(self, port, passphrase):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.conn = common.ClientConnection(passphrase)
        self.conversation = common.Conversation.new()

    def open(self, deadline=10):
        """Handshake and resume exchange: from here on, records may be sent."""
        common.handshake(self.sock, self.conn, deadline)
        self.send_raw(self.record(self.conversation.resume_request()))
        resume = common.first_event(self.sock, self.conn, deadline)
        assert isinstance(resume, common.Resume), resume
        return self

    def record(self, event):
        """The frame that carries event (the sequence number advances as if it were sent)."""
        self.conn.send(event)
        return self.conn.data_to_send()

    def message(self, text):
        return self.record(self.conversation.new_message(text, common.now_iso()))

    def send_raw(self, data):
        self.sock.sendall(data)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()
