"""aeschat server: wait for a client and chat; then wait for the next one.

    python server.py [PORT] [--host ADDR] [--once] [--legacy] [--key-file PATH]
"""

import ipaddress
import socket
import threading
import time

import common

MAX_PENDING = 64  # unauthenticated connections handshaking at once; more are closed at once


def parse_args(argv=None):
    parser = common.argument_parser("aeschat-server", "Wait for an aeschat client and chat.")
    parser.add_argument("port", nargs="?", type=lambda text: common.port_number(text, lowest=0),
                        default=common.DEFAULT_PORT, metavar="PORT",
                        help=f"port to listen on (default {common.DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--host", default="0.0.0.0", metavar="ADDR",
                        help="address to listen on (default 0.0.0.0; :: for IPv6, dual-stack where possible)")
    parser.add_argument("--once", action="store_true", help="exit after one chat instead of waiting for the next")
    return parser.parse_args(argv)


def listen(host, port):
    try:
        family, _, _, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise common.UsageError(f"cannot listen on {host!r}: {e.strerror}") from None
    dual = family == socket.AF_INET6 and socket.has_dualstack_ipv6() and ipaddress.ip_address(addr[0]).is_unspecified
    try:
        return socket.create_server(addr, family=family, dualstack_ipv6=dual)
    except OSError as e:
        raise common.NetworkError(f"cannot listen on {host} port {port}: {e.strerror or e}") from None


class Server:
    def __init__(self, listener, passphrase, args, ui):
        self.listener, self.passphrase, self.args, self.ui = listener, passphrase, args, ui
        self._lock = threading.Lock()
        self._limiter = common.GuessLimiter(time.monotonic)
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._busy = False  # an authenticated chat is on (or about to start)
        self._ready = None  # (socket, connection, peer) of the chat about to start
        self.idle_status = f" listening on {common.address(listener.getsockname())} | waiting for a client "
        ui.status = self.idle_status

    def serve(self):
        """The input loop: lines go to the chat when there is one; quit() or end of input when idle stops."""
        threading.Thread(target=self._accept, name="accept", daemon=True).start()
        while True:
            with self._lock:
                ready, self._ready = self._ready, None
            if ready is not None:
                code = self._chat(*ready)
                if self.args.once:
                    return code
                self.ui.show("waiting for the next client")
                self.ui.status = self.idle_status
                continue
            line = self.ui.read_line()
            if line is None or (line is not common.WAKE and line.strip() == "quit()"):
                return common.EXIT_OK
            if line is not common.WAKE and line.strip():
                self.ui.error("no one is connected yet (quit() stops the server)")

    def _chat(self, sock, conn, peer):
        self.ui.show(f"{peer} connected")
        common.banner(self.ui, peer, self.args.legacy)
        try:
            return common.chat(common.Session(sock, conn, self.ui, peer, keepalive=self.args.keepalive))
        finally:
            with self._lock:
                self._busy = False

    def _accept(self):
        while True:
            sock, addr = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._pending.acquire(blocking=False):
                sock.close()
                continue
            threading.Thread(target=self._admit, args=(sock, common.address(addr)), daemon=True).start()

    def _admit(self, sock, peer):
        """Handshake with one new connection; if it authenticates and no chat is on, it becomes the chat."""
        try:
            conn = self._authenticate(sock, peer)
        except (common.AeschatError, OSError) as e:
            self.ui.error(f"{peer} dropped: {e}")
            sock.close()
            return
        finally:
            self._pending.release()
        if conn is None:
            return
        with self._lock:
            busy, self._busy = self._busy, True
            if not busy:
                self._ready = (sock, conn, peer)
        if busy:
            self._refuse_busy(sock, conn, peer)
        else:
            self.ui.wake()

    def _authenticate(self, sock, peer):
        if self.args.legacy:
            return common.LegacyConnection(self.passphrase)  # the legacy format has no handshake
        conn = common.ServerConnection(self.passphrase)
        with self._lock:
            busy = self._busy
            wait = 0 if busy else self._limiter.reserve()
        if busy:
            self._refuse_busy(sock, conn, peer)
            return None
        time.sleep(wait)  # the guessing limit: one passphrase check per interval after a failure
        try:
            common.handshake(sock, conn, common.HANDSHAKE_DEADLINE)
        except common.AuthenticationError:
            with self._lock:
                self._limiter.failed()
                failures, interval = self._limiter.failures, self._limiter.interval()
            self.ui.error(f"failed passphrase attempt from {peer} ({failures} in a row; "
                          f"the next check waits {interval} s)")
            conn.refuse(common.DENIED)
            sock.sendall(conn.data_to_send())
            sock.close()
            return None
        with self._lock:
            self._limiter.succeeded()
        return conn

    def _refuse_busy(self, sock, conn, peer):
        """Tell a client plainly that a chat is on: before its handshake a refusal, after it a Busy record."""
        try:
            if conn.state is common.State.OPEN:
                conn.send(common.Busy())
            else:
                conn.refuse(common.BUSY)
            sock.sendall(conn.data_to_send())
        except OSError:
            pass
        sock.close()
        self.ui.error(f"{peer} turned away: a chat is on")


def _main():
    args = parse_args()
    passphrase = common.read_passphrase(args)
    listener = listen(args.host, args.port)
    with common.make_ui() as ui:
        host, port = listener.getsockname()[:2]
        if args.legacy:
            ui.error(common.LEGACY_WARNING)
        ui.show(f"listening on {common.address((host, port))}")
        return Server(listener, passphrase, args, ui).serve()


def main():
    common.run(_main)


if __name__ == "__main__":
    main()
