"""aeschat client: connect to an aeschat server and chat.

    python client.py [HOST] [PORT] [--legacy] [--key-file PATH]
"""

import socket
import sys

import common


def parse_args(argv=None):
    parser = common.argument_parser("aeschat-client", "Connect to an aeschat server and chat.")
    parser.add_argument("host", nargs="?", metavar="HOST", help="server name or address (asked for on a terminal)")
    parser.add_argument("port", nargs="?", type=common.port_number, metavar="PORT",
                        help=f"server port (default {common.DEFAULT_PORT})")
    args = parser.parse_args(argv)
    if args.host is None:
        if not sys.stdin.isatty():
            parser.error("HOST is missing (and there is no terminal to ask on)")
        args.host = input("Server address: ").strip()
        answer = input(f"Port [{common.DEFAULT_PORT}]: ").strip()
        try:
            args.port = common.port_number(answer) if answer else None
        except Exception as e:
            parser.error(str(e))
    args.host = args.host.strip("[]")  # [::1] as well as ::1
    if not args.host:
        parser.error("HOST is empty")
    if args.port is None:
        args.port = common.DEFAULT_PORT
    return args


def connect(host, port):
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except socket.gaierror as e:
        raise common.NetworkError(f"cannot find the host {host!r}: {e.strerror}") from None
    except UnicodeError:
        raise common.UsageError(f"{host!r} is not a valid host name") from None
    except OSError as e:
        raise common.NetworkError(f"cannot connect to {host} port {port}: {e.strerror or e}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no message waits on Nagle
    return sock


def _main():
    args = parse_args()
    passphrase = common.read_passphrase(args)
    if args.legacy:
        print(common.LEGACY_WARNING, file=sys.stderr)

    def open_link():
        """Connect and authenticate: at the start, and again for each reconnection (new keys each time)."""
        conn = common.LegacyConnection(passphrase) if args.legacy else common.ClientConnection(passphrase)
        sock = connect(args.host, args.port)
        try:
            if not args.legacy:
                common.handshake(sock, conn, common.CLIENT_HANDSHAKE_DEADLINE)
            return sock, conn, common.address(sock.getpeername())
        except BaseException:
            sock.close()
            raise

    sock, conn, peer = open_link()
    with common.make_ui() as ui:
        common.banner(ui, peer, args.legacy)
        chat = common.Chat(ui, common.Conversation.new(), legacy=args.legacy, keepalive=args.keepalive,
                           grace=args.reconnect_for, reconnect=open_link)
        chat.attach(sock, conn, peer)
        return common.run_chat(chat)


def main():
    common.run(_main)


if __name__ == "__main__":
    main()
