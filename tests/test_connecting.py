"""Getting two people connected: codes, the strength of a chosen passphrase, proxies, and happy eyeballs."""

import select
import socket
import subprocess

import pytest
from procs import PASSPHRASE, Proc, start_server

import common

# ---------------------------------------------------------------------------------------------------
# Codes, directly


def test_a_code_is_the_same_typed_with_spaces_or_hyphens_in_any_case():
    assert common.as_code(" Abandon  ability-ABLE\tabout ") == "abandon-ability-able-about"
    assert common.normalize_passphrase("ABANDON ABILITY able about") == b"abandon-ability-able-about"
    assert common.as_code("abandon-ability-able-about-") == "abandon-ability-able-about"  # as Tab leaves it
    assert common.as_code("abandon-ability-able-about\r\n") == "abandon-ability-able-about"  # as a paste brings it
    for not_a_code in ("abandon", "abandon ability!", "abandon notaword", "abandon\nability", "élan vital"):
        assert common.as_code(not_a_code) is None
    # The vectors' passphrase has a word outside the list: it stays as it is, and PROTOCOL.md's vectors hold.
    assert common.normalize_passphrase("correct horse battery staple") == b"correct horse battery staple"


def test_a_new_code_is_four_words_of_the_list_and_44_bits():
    words = common.code_words()
    assert len(words) == 2048 and len({word[:4] for word in words}) == 2048  # told apart by four letters
    codes = {common.new_code() for _ in range(100)}
    assert len(codes) == 100
    for code in codes:
        assert len(code.split("-")) == 4 and set(code.split("-")) <= set(words) and common.as_code(code) == code
    assert common.code_bits(codes.pop()) == 44.0


def test_tab_offers_words_only_for_what_can_still_be_a_code():
    assert common.code_candidates("abandon abil") == ["ability"]
    assert common.code_candidates("ABANDON-zo") == ["zone", "zoo"]
    assert len(common.code_candidates("abandon-")) == 2048
    for passphrase in ("hunter2", "notaword abil", "abandon ability!"):
        assert common.code_candidates(passphrase) == []


# ---------------------------------------------------------------------------------------------------
# Proxy URLs, directly


def test_proxy_urls_are_socks5_or_socks5h_with_a_host():
    parse = common.proxy_argument
    assert parse("socks5h://127.0.0.1:9050") == common.Proxy("socks5h", "127.0.0.1", 9050, None, None)
    assert parse("socks5://[::1]") == common.Proxy("socks5", "::1", 1080, None, None)
    secret = parse("socks5h://me:p%40ss@localhost:1080")
    assert (secret.username, secret.password) == ("me", "p@ss")
    assert common.proxy_name(secret) == "socks5h://localhost:1080"  # never the password
    for bad in ("http://127.0.0.1:8080", "socks5h://", "socks5h://h:99999", "socks5h://h:1/path", "127.0.0.1:9050"):
        with pytest.raises(common.argparse.ArgumentTypeError):
            parse(bad)


# ---------------------------------------------------------------------------------------------------
# Happy eyeballs, on real sockets


def _listener(family, host, backlog=8):
    sock = socket.socket(family)
    sock.bind((host, 0))
    sock.listen(backlog)
    return sock


def _black_hole():
    """[::1]:PORT where connections hang: its queue is full, so the system drops every new SYN."""
    hole = _listener(socket.AF_INET6, "::1", 0)
    fillers = []
    while True:
        filler = socket.socket(socket.AF_INET6)
        filler.setblocking(False)
        filler.connect_ex(hole.getsockname()[:2])
        fillers.append(filler)
        if not select.select([], [filler], [], 0.5)[1]:  # this one hangs: so will ours
            return hole, fillers


def _info(sock):
    family = sock.family
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sock.getsockname())


@pytest.fixture
def ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        _listener(socket.AF_INET6, "::1").close()
    except OSError:
        pytest.skip("no IPv6 loopback here")


def test_an_address_that_swallows_connections_costs_a_moment_not_the_timeout(ipv6):
    hole, fillers = _black_hole()
    good = _listener(socket.AF_INET, "127.0.0.1")
    with common.connect_first([_info(hole), _info(good)], timeout=3) as sock:
        # Tried one at a time, the first would have taken the whole timeout (3 s for all); raced, the second wins.
        assert sock.getpeername() == good.getsockname() and sock.getblocking()
    for sock in (hole, good, *fillers):
        sock.close()


def test_a_refused_address_hands_over_at_once_and_all_refused_is_not_listening(ipv6):
    free = _listener(socket.AF_INET6, "::1")
    refused = _info(free)
    free.close()  # nothing listens there now: refused
    good = _listener(socket.AF_INET, "127.0.0.1")
    with common.connect_first([refused, _info(good)], timeout=60) as sock:
        assert sock.getpeername() == good.getsockname()
    gone = _info(good)
    good.close()
    with pytest.raises(ConnectionRefusedError):
        common.connect_first([refused, gone], timeout=60)
    hole, fillers = _black_hole()
    with pytest.raises(socket.timeout):
        common.connect_first([_info(hole)], timeout=0.5)
    for sock in (hole, *fillers):
        sock.close()


# ---------------------------------------------------------------------------------------------------
# On real processes


def _code_of(server):
    return server.expect(r"^code: ([a-z]+(?:-[a-z]+){3})$", stream="err").group(1)


@pytest.mark.slow
def test_a_server_with_a_new_code_is_reached_with_the_code_typed_any_way(spawn):
    server = spawn("proc", ["server.py", "0", "--host", "127.0.0.1", "--new-code", "--once"], passphrase="ignored")
    port = server.expect(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    code = _code_of(server)
    server.expect(r"^\(44 bits; the other person types it")
    typed = code.replace("-", "  ").upper()
    client = spawn("client", port, passphrase=typed)
    client.expect("authenticated and encrypted")
    client.send("by code\n")
    client.close_stdin()
    assert client.wait() == 0
    server.expect("Received: by code  ☒")


@pytest.mark.slow
@pytest.mark.parametrize("args, error", [
    (["--new-code", "--key-file", "k"], "--new-code and --key-file: one passphrase at a time"),
    (["--new-code", "--legacy"], "--new-code and --legacy: the original scripts take no codes"),
])
def test_a_new_code_with_another_passphrase_is_a_usage_error(args, error):
    server = Proc(["server.py", "0", *args])
    assert server.wait() == 2
    assert error in server.output()[1]


@pytest.mark.slow
@pytest.mark.parametrize("passphrase, warned", [("hunter2", True), ("Summer2024!", True), ("summer love", True),
                                                 ("abandon ability able about", False), (PASSPHRASE, False)])
def test_a_chosen_passphrase_the_door_could_give_away_within_a_year_is_warned_of(passphrase, warned):
    server = Proc(["server.py", "0", "--host", "127.0.0.1"], passphrase=passphrase, stdin=subprocess.DEVNULL)
    assert server.wait() == 0
    err = server.output()[1]
    assert ("could be guessed within a year" in err) == warned, err
    if warned:
        assert "--new-code makes a code of 44 bits" in err


@pytest.fixture
def socks(tmp_path):
    """A SOCKS5 server the project does not write (pproxy, from the test extras), on 127.0.0.1."""
    probe = _listener(socket.AF_INET, "127.0.0.1")
    port = probe.getsockname()[1]
    probe.close()
    proxy = Proc(["-m", "pproxy", "-l", f"socks5://127.0.0.1:{port}", "-v"])
    proxy.expect(f"Serving on .*127.0.0.1:{port}")
    yield proxy, port
    proxy.kill()


@pytest.mark.slow
@pytest.mark.parametrize("scheme, seen", [("socks5h", "localhost"), ("socks5", "127.0.0.1")])
def test_a_client_through_a_socks5_proxy_chats_and_the_name_is_resolved_where_it_says(spawn, socks, scheme, seen):
    proxy, proxy_port = socks
    server, port = spawn("server", "--once")
    client = spawn("client", port, "--proxy", f"{scheme}://127.0.0.1:{proxy_port}", host="localhost")
    client.expect(f"Connected to localhost:{port} through {scheme}://127.0.0.1:{proxy_port}: authenticated")
    proxy.expect(f"-> {seen}:{port}")  # socks5h: the proxy resolved the name; socks5: the client did
    client.send("through the proxy\n")
    client.close_stdin()
    assert client.wait() == 0
    server.expect("Received: through the proxy  ☒")


@pytest.mark.slow
def test_a_proxy_that_is_not_there_or_finds_no_server_is_one_line_and_exit_1(socks):
    _, proxy_port = socks
    other, other_port = start_server()  # an aeschat server is no proxy: once, "Unexpected SOCKS version number: 0"
    server, port = start_server()
    server.kill()  # nothing listens at port now
    for proxy, error in ((f"socks5h://127.0.0.1:{port}", f"cannot reach the proxy socks5h://127.0.0.1:{port}: "
                                                         "connection refused"),
                         (f"socks5h://127.0.0.1:{other_port}", f"socks5h://127.0.0.1:{other_port} is not a SOCKS5 "
                                                               "proxy (it answered as something else)"),
                         (f"socks5h://127.0.0.1:{proxy_port}", f"the proxy socks5h://127.0.0.1:{proxy_port} took the "
                                                               f"connection, then closed it: is an aeschat server "
                                                               f"listening at 127.0.0.1 port {port}?")):
        client = Proc(["client.py", "127.0.0.1", port, "--proxy", proxy])
        client.close_stdin()
        assert client.wait() == 1
        err = client.output()[1]
        assert f"aeschat-client: error: {error}" in err and "Traceback" not in err and err.count("\n") == 1
    other.kill()


@pytest.mark.slow
def test_a_bad_proxy_url_is_a_usage_error():
    client = Proc(["client.py", "127.0.0.1", "--proxy", "http://127.0.0.1:8080"])
    assert client.wait() == 2
    assert "argument --proxy: 'http://127.0.0.1:8080' is not socks5h://HOST:PORT" in client.output()[1]
