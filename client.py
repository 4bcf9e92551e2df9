"""aeschat client: connect to an aeschat server and chat.

    python client.py [HOST] [PORT] [--key-file PATH] [--send PATH] [--receive-dir DIR] [--legacy] ...
"""

import argparse
import sys
import time

if __package__:  # installed: aeschat.client and aeschat.server beside aeschat.common
    from . import common
else:  # python client.py (or server.py) from a checkout: common.py beside it
    import common

PROG = "aeschat-client"


def parse_args(argv=None):
    parser = common.argument_parser(PROG, "Connect to an aeschat server and chat.")
    parser.add_argument("host", nargs="?", metavar="HOST",
                        help="server name or address, or HOST:PORT (asked for on a terminal)")
    parser.add_argument("port", nargs="?", type=common.port_number, metavar="PORT",
                        help=f"server port (default {common.DEFAULT_PORT})")
    parser.add_argument("--proxy", type=common.proxy_argument, metavar="URL",
                        help="connect through a SOCKS5 proxy: socks5h://HOST:PORT resolves HOST at the proxy (Tor's "
                             "127.0.0.1:9050 for an onion address, ssh -D), socks5://HOST:PORT here")
    args = parser.parse_args(argv)
    if args.host is None:
        if not sys.stdin.isatty():
            parser.error("HOST is missing (and there is no terminal to ask on)")
        args.host = common.ask("Server address: ", "HOST").strip("[]")
        if not args.host:
            parser.error("HOST is empty")
        while args.port is None:
            answer = common.ask(f"Port [{common.DEFAULT_PORT}]: ", "PORT")
            if not answer:
                break
            try:
                args.port = common.port_number(answer)
            except argparse.ArgumentTypeError as e:
                print(f"{PROG}: {e}; try again", file=sys.stderr)
    try:  # [::1] as well as ::1; and HOST:PORT, as ssh and croc users type it
        args.host, port = common.split_host(args.host)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if port is not None and args.port is not None and port != args.port:
        parser.error(f"two ports: {port} in HOST and {args.port}")
    args.port = args.port if port is None else port
    if not args.host:
        parser.error("HOST is empty")
    if args.port is None:
        args.port = common.DEFAULT_PORT
    common.check_file_options(parser, args)
    return args


def _main():
    args = parse_args()
    if args.legacy:
        print(common.legacy_warning(PROG), file=sys.stderr)
    dial, (sock, conn, peer) = common.first_connection(args, PROG)
    common.hold_signals()  # until the input loop, which leaves with a goodbye
    dial.slow = None  # the chat's own interface tells of what comes later
    with common.make_ui(PROG) as ui:
        session = common.Session(common.CLIENT, common.LEGACY if args.legacy else common.V2,
                                 common.Conversation.new(), time.monotonic(), args.keepalive, args.reconnect_for,
                                 ui.interactive, receive_files=args.receive_dir is not None,
                                 max_file_size=args.max_file_size, send=args.send)
        chat = common.Chat(ui, session, dial, common.Files(args.receive_dir or "."))
        chat.attach(sock, conn, peer, common.PASSPHRASE)
        return common.run_chat(chat, args.wait)


def main():
    common.run(_main, PROG)


if __name__ == "__main__":
    main()
