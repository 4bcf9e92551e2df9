"""aeschat server: wait for a client and chat; then wait for the next one.

    python server.py [PORT] [--host ADDR] [--once] [--receive-only] [--new-code | --key-file PATH] [--legacy]
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
    parser.add_argument("--host", metavar="ADDR",
                        help="address to listen on (default: every address, IPv6 and IPv4; 0.0.0.0 for IPv4's only)")
    parser.add_argument("--once", action="store_true", help="exit after one chat instead of waiting for the next")
    parser.add_argument("--receive-only", action="store_true",
                        help="never read input: serve one client after another and print what arrives, until a "
                             "signal stops the server (for scripts that send one message)")
    parser.add_argument("--new-code", action="store_true",
                        help=f"make a fresh code of {common.CODE_WORDS} words and use it as the passphrase (say it to "
                             "the other person; their client takes it with spaces or hyphens, in any case)")
    args = parser.parse_args(argv)
    common.check_file_options(parser, args)
    if args.new_code and (args.key_file or args.legacy):
        parser.error(f"--new-code and {'--key-file' if args.key_file else '--legacy'}: " +
                     ("one passphrase at a time" if args.key_file else "the original scripts take no codes"))
    return args


def listen(host, port):
    if host is None:  # every address: IPv6 and IPv4 on one socket where the system can, else IPv4's
        try:
            return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
        except (OSError, ValueError):  # no IPv6 here (ValueError: no dual-stack sockets)
            host = "0.0.0.0"
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


def where_to_connect(listener):
    """The addresses to give the other person, from this machine's interfaces: loopback last, link-local ones left
    out (they work only with an interface named)."""
    import ifaddr  # only here: a server on one address needs no list

    ipv6 = listener.family == socket.AF_INET6
    found = set()
    try:
        adapters = ifaddr.get_adapters()
    except OSError:
        adapters = []
    for adapter in adapters:
        for ip in adapter.ips:
            host = ipaddress.ip_address(ip.ip[0] if ip.is_IPv6 else ip.ip)
            if not host.is_link_local and (ipv6 or host.version == 4):
                found.add((host.is_loopback, host.version, host, adapter.nice_name))
    port = listener.getsockname()[1]
    lines = [f"  {host}  ({name})" for loopback, _, host, name in sorted(found) if not loopback]
    local = ", ".join(str(host) for loopback, _, host, _ in sorted(found) if loopback)
    lines.append(f"  {local or '127.0.0.1'}  (this machine only)")
    return f"the other person connects to port {port} at one of:\n" + "\n".join(lines)


def _main():
    args = parse_args()
    passphrase = None if args.new_code else common.passphrase_given(args)
    listener = listen(args.host, args.port)
    print(f"listening on {common.address(listener.getsockname())}", file=sys.stderr, flush=True)
    if ipaddress.ip_address(listener.getsockname()[0]).is_unspecified:
        print(where_to_connect(listener), file=sys.stderr, flush=True)
    if args.legacy:
        print(common.legacy_warning(PROG), file=sys.stderr, flush=True)
    if passphrase is None and not args.new_code:
        passphrase = common.prompt_passphrase("Passphrase (Enter for a new code): " if not args.legacy else
                                              "Passphrase: ", empty_is_none=not args.legacy)
    if passphrase is None:
        passphrase = common.new_code()
        print(f"code: {passphrase}", file=sys.stderr, flush=True)
        common.tell(f"({common.code_bits(passphrase):.0f} bits; the other person types it at their client's "
                    "passphrase prompt, with spaces or hyphens, in any case)")
    elif not args.legacy:
        common.warn_if_weak(passphrase, PROG)
    with common.make_ui(PROG, args.receive_only) as ui:
        server = common.Server(listener, passphrase, args, ui)
        try:
            return server.serve()
        except KeyboardInterrupt:
            server.interrupt(common.EXIT_INTERRUPTED)
            return common.EXIT_INTERRUPTED
        except common.Terminated as e:
            server.interrupt(e.code)
            return e.code
        except common.OutputFailed:
            server.interrupt(common.EXIT_NETWORK)
            raise


def main():
    common.run(_main, PROG)


if __name__ == "__main__":
    main()
