"""A man in the middle on 127.0.0.1, for the fault and attack tests.

Proxy(port) listens on a free port and relays each connection to 127.0.0.1:port. It understands v1
frames: every frame in each direction is recorded, and a hook may drop, change, duplicate, hold back,
inject or reflect frames. It can also stall a connection (a black hole), reset it, or close it after a
number of bytes, and relay byte by byte.
"""

import contextlib
import os
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
        self._pumps = 2  # the last pump to end closes the sockets

    def start(self):
        for direction in (C2S, S2C):
            threading.Thread(target=self._pump, args=(direction,), daemon=True).start()

    def send(self, direction, data):
        """Write data to the receiving end of direction (used to inject and reflect); nothing once closed."""
        with self._lock, contextlib.suppress(OSError):
            if not self.closed.is_set():
                self.sockets[direction][1].sendall(data)

    def _pump(self, direction):
        try:
            self._pumping(direction)
        finally:
            with self._lock:
                self._pumps -= 1
                last = self._pumps == 0
            if last:
                for sock in (self.sockets[C2S][0], self.sockets[S2C][0]):
                    sock.close()

    def _pumping(self, direction):
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
        """Cut the connection: a FIN each way, or (reset) a RST. The sockets are only shut here: the pumps wake, end,
        and the last closes them. (Closed here, while a pump was about to recv or send, a socket's descriptor could
        go to the next connection the proxy made, and the pump read or wrote that one: a chat after a reconnection
        then failed its integrity check, once in a few dozen runs under load.)"""
        if self.closed.is_set():
            return
        self.closed.set()
        for event in self._flowing.values():  # a frozen pump wakes, and ends
            event.set()
        for sock in (self.sockets[C2S][0], self.sockets[S2C][0]):
            with contextlib.suppress(OSError):
                if reset:  # RST instead of FIN, when the last pump closes it; SHUT_RD wakes a pump blocked reading it
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
                else:  # a FIN now, though a pump may be blocked reading this socket
                    sock.shutdown(socket.SHUT_RDWR)


class Proxy:
    def __init__(self, target_port, hook=None, source="127.0.0.1"):
        """source: the address the proxy connects to the server from (another network, across 127.0.0.0/8)."""
        self.target_port, self.source = target_port, source
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
            self._connect(client)

    def _connect(self, client):
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), source_address=(self.source, 0))
        except OSError:
            client.close()
            return
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
    """A v2 client built from the protocol core, every byte of which the test controls."""

    def __init__(self, port, passphrase, source="127.0.0.1"):
        """source: the address to connect from; across 127.0.0.0/8 it stands for another machine and network."""
        self.sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
        self.conn = common.ClientConnection(passphrase)
        self.conversation = common.Conversation.new()

    def open(self, deadline=10):
        """Handshake and resume exchange: from here on, records may be sent."""
        common.handshake(self.sock, self.conn, deadline)
        self.send_raw(self.record(self.conversation.resume_request()))
        resume = self.next_event(deadline)
        assert isinstance(resume, common.Resume), resume
        return self

    def next_event(self, deadline=10):
        """The next event from the server, reading as needed."""
        self.sock.settimeout(deadline)
        try:
            while (event := self.conn.next_event()) is None:
                self.conn.receive_data(self.sock.recv(1 << 20))
            return event
        finally:
            self.sock.settimeout(None)

    def record(self, event):
        """The frame that carries event (the sequence number advances as if it were sent)."""
        return self.conn.seal(event)

    def message(self, text):
        return self.record(self.conversation.new_message(text, common.now_iso()))

    def send_raw(self, data):
        self.sock.sendall(data)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


class GuessingServer(Proxy):
    """A man in the middle who relays a client's first connection to the real server, and answers every later
    one himself, as a server would: with a SPAKE2 hello for a guess (answer "guess"), or a forged refusal (answer
    common.UNKNOWN or common.BUSY_REFUSAL). For each key confirmation the client then sends him, he checks his guess
    offline, exactly as he would with a dictionary; then he hangs up.

    checked: the passphrase guesses he could check; resumptions: confirmations that only prove a resumption
    secret (256 random bits: nothing to guess)."""

    def __init__(self, target_port, answer="guess"):
        self.answer, self.checked, self.resumptions = answer, [], 0
        self._guesses = (f"guess number {i}" for i in range(10**6))
        super().__init__(target_port)

    def _connect(self, client):
        if not self.relays:
            return super()._connect(client)
        threading.Thread(target=self._impersonate, args=(client,), daemon=True).start()

    def _impersonate(self, sock):
        with contextlib.suppress(OSError, common.AeschatError), sock:
            sock.settimeout(10)
            conn = common.ServerConnection()
            sock.sendall(conn.data_to_send())
            event = self._until(conn, sock, common.HelloReceived)
            if self.answer != "guess":
                conn.refuse(self.answer)
                sock.sendall(conn.data_to_send())
                return
            guess = next(self._guesses) if event.kind == common.PASSPHRASE else os.urandom(32)
            conn.answer(guess)
            sock.sendall(conn.data_to_send())
            self._until(conn, sock, common.ConfirmationReceived)
            right = conn.check()  # the offline check: does the client's confirmation match this guess?
            if event.kind == common.PASSPHRASE:
                self.checked.append((guess, right))
            else:
                self.resumptions += 1

    @staticmethod
    def _until(conn, sock, kind):
        while not isinstance(event := conn.next_event(), kind):
            data = sock.recv(4096)
            if not data:
                raise OSError("the client went away")
            conn.receive_data(data)
        return event
