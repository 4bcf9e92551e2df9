"""aeschat server: wait for a client and chat; then wait for the next one.

    python server.py [PORT] [--host ADDR] [--once] [--receive-only] [--key-file PATH] [--legacy]
"""

import ipaddress
import socket
import sys

if __package__:  # installed: aeschat.client and aeschat.server beside aeschat.common
    from . import common
else:  # python client.py (or server.py) from a checkout: common.py beside it
    import common

PROG = "aeschat-server"


def parse_args(argv=None):
    parser = common.argument_parser(PROG, "Wait for an aeschat client and chat.")
    parser.add_argument("port", nargs="?", type=lambda text: common.port_number(text, lowest=0),
                        default=common.DEFAULT_PORT, metavar="PORT",
                        help=f"port to listen on (default {common.DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--host", default="0.0.0.0", metavar="ADDR",
                        help="address to listen on (default 0.0.0.0; :: for IPv6, dual-stack where possible)")
    parser.add_argument("--once", action="store_true", help="exit after one chat instead of waiting for the next")
    parser.add_argument("--receive-only", action="store_true",
                        help="never read input: serve one client after another and print what arrives, until a "
                             "signal stops the server (for scripts that send one message)")
    args = parser.parse_args(argv)
    common.check_file_options(parser, args)
    return args


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
        raise common.NetworkError(f"cannot listen on {host} port {port}: {common.describe(e)}") from None


def _main():
    args = parse_args()
    passphrase = common.passphrase_given(args)
    listener = listen(args.host, args.port)
    print(f"listening on {common.address(listener.getsockname())}", file=sys.stderr, flush=True)
    if args.legacy:
        print(common.legacy_warning(PROG), file=sys.stderr, flush=True)
    if passphrase is None:
        passphrase = common.prompt_passphrase()
    with common.make_ui(PROG, args.receive_only) as ui:
        server = common.Server(listener, passphrase, args, ui)
        try:
            return server.serve()
        except KeyboardInterrupt:
            server.interrupt(common.EXIT_INTERRUPTED)
            return common.EXIT_INTERRUPTED
        except common.Terminated:
            server.interrupt(common.EXIT_TERMINATED)
            return common.EXIT_TERMINATED
        except common.OutputFailed:
            server.interrupt(common.EXIT_NETWORK)
            raise


def main():
    common.run(_main, PROG)


if __name__ == "__main__":
    main()
