"""aeschat server: wait for a client and chat; then wait for the next one.

    python server.py [PORT] [--host ADDR] [--once] [--legacy] [--key-file PATH]
"""

import collections
import contextlib
import ipaddress
import socket
import threading
import time

import common

# Unauthenticated connections handshaking at once. Past it, the oldest is dropped to make room, so that a
# flood of silent connections delays a real client by nothing: the newest always gets its chance.
MAX_PENDING = 64


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
        self._pending = collections.OrderedDict()  # socket -> None, oldest first
        self._chat = None  # the conversation on now (possibly waiting for its client to come back)
        self._ready = None  # a new chat for the input loop to take up
        self._typed = []  # lines read as that chat was starting, for it
        self.idle_status = f" listening on {common.address(listener.getsockname())} | waiting for a client "
        ui.status = self.idle_status

    def serve(self):
        """The input loop: lines go to the chat when there is one; quit() or end of input when idle stops."""
        threading.Thread(target=self._accept, name="accept", daemon=True).start()
        while True:
            with self._lock:
                chat, self._ready = self._ready, None
            typed, self._typed = self._typed, []
            if chat is not None:
                # Announced here, not by the thread that admitted the client: every line typed after the
                # banner goes to the chat.
                self.ui.show(f"{chat.peer} connected")
                common.banner(self.ui, chat.peer, self.args.legacy)
                try:
                    code = common.run_chat(chat, typed)
                finally:
                    with self._lock:
                        if self._chat is chat:  # a new chat may have started as this one ended
                            self._chat = None
                if self.args.once:
                    return code
                self.ui.show("waiting for the next client")
                self.ui.status = self.idle_status
                continue
            line = self.ui.read_line()
            with self._lock:
                starting = self._ready is not None
            if starting and line is not common.WAKE:
                self._typed.append(line)  # typed as a chat began: it belongs to that chat
                continue
            if line is None or (line is not common.WAKE and line.strip() == "quit()"):
                return common.EXIT_OK
            if line is not common.WAKE and line.strip():
                self.ui.error("no one is connected yet (quit() stops the server)")

    def _accept(self):
        while True:
            sock, addr = self.listener.accept()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pending[sock] = None
                oldest = self._pending.popitem(last=False)[0] if len(self._pending) > MAX_PENDING else None
            if oldest is not None:
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # wakes its handshake, which then reports it dropped
            threading.Thread(target=self._admit, args=(sock, common.address(addr)), daemon=True).start()

    def _admit(self, sock, peer):
        """Authenticate one new connection; then it starts a chat, resumes the one on, or is turned away."""
        try:
            conn, resume = self._authenticate(sock, peer)
        except (common.AeschatError, OSError) as e:
            self.ui.error(f"{peer} dropped: {e}")
            sock.close()
            return
        finally:
            with self._lock:
                self._pending.pop(sock, None)
        if conn is None:
            return
        with self._lock:
            chat = self._chat if self._chat is not None and self._chat.active else None
            new = chat is None
            if new:
                chat = self._chat = common.Chat(self.ui, common.Conversation.new(), legacy=self.args.legacy,
                                                keepalive=self.args.keepalive, grace=self.args.reconnect_for)
            elif self.args.legacy or (chat.link is not None and chat.conversation.id != resume.conv):
                chat = None  # a chat with another client is on
        if chat is None:
            self._turn_away(sock, conn, peer)
            return
        if chat.attach(sock, conn, peer, peer_resume=resume) and new:
            with self._lock:
                self._ready = chat
            self.ui.wake()

    def _authenticate(self, sock, peer):
        """(connection, the client's Resume), or (None, None) if the passphrase was wrong."""
        if self.args.legacy:
            return common.LegacyConnection(self.passphrase), None  # the legacy format has no handshake
        conn = common.ServerConnection(self.passphrase)
        with self._lock:
            wait = self._limiter.reserve()
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
            return None, None
        with self._lock:
            self._limiter.succeeded()
        resume = common.first_event(sock, conn, common.HANDSHAKE_DEADLINE)
        if not isinstance(resume, common.Resume):
            raise common.RemoteProtocolError("the client did not start with a Resume")
        return conn, resume

    def _turn_away(self, sock, conn, peer):
        """Tell a client plainly that a chat with someone else is on."""
        with contextlib.suppress(common.AeschatError, OSError):
            conn.send(common.Busy())
            sock.sendall(conn.data_to_send())
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
