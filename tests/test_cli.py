"""The command line: arguments, passphrase sources, and exit codes, on real processes."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from procs import PASSPHRASE, ROOT, TIMEOUT, Proc, start_server

import common

pytestmark = pytest.mark.slow


def run(args, passphrase=PASSPHRASE, stdin_text=""):
    proc = Proc(args, passphrase=passphrase)
    proc.send(stdin_text)
    proc.close_stdin()
    code = proc.wait()
    out, err = proc.output()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("program", ["client.py", "server.py"])
def test_help_and_version(program):
    code, out, _ = run([program, "--help"])
    assert code == 0 and "--key-file" in out and "--legacy" in out
    code, out, _ = run([program, "--version"])
    assert code == 0 and "2.0.0" in out


@pytest.mark.parametrize("args, message", [
    (["client.py", "127.0.0.1", "abc"], "invalid port 'abc'"),
    (["client.py", "127.0.0.1", "0"], "invalid port '0'"),
    (["client.py", "127.0.0.1", "70000"], "invalid port '70000'"),
    (["client.py"], "HOST is missing"),
    (["client.py", "bad..host", "5555"], "not a valid host name"),
    (["server.py", "-5"], "invalid port"),
    (["client.py", "127.0.0.1", "--bogus"], "unrecognized arguments"),
    (["server.py", "--no-reconnect", "--reconnect-for", "5"], "not allowed with argument --no-reconnect"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    code, out, err = run(args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("program", [["client.py", "127.0.0.1", "1"], ["server.py", "0"]])
def test_no_passphrase_and_no_terminal_says_how_to_give_one(program):
    code, _, err = run(program, passphrase=None)
    assert code == 2 and "--key-file" in err and "AESCHAT_KEY" in err


@pytest.mark.parametrize("program", [["client.py", "127.0.0.1", "1"], ["server.py", "0"]])
def test_empty_passphrase_exits_2(program):
    code, _, err = run(program, passphrase="")
    assert code == 2 and "empty" in err


def test_missing_key_file_exits_2(tmp_path):
    code, _, err = run(["client.py", "127.0.0.1", "1", "--key-file", tmp_path / "nope"], passphrase=None)
    assert code == 2 and "cannot read the key file" in err


def test_key_file_loses_one_trailing_newline_only(tmp_path):
    key = tmp_path / "k"
    key.write_text("two words\n\n")  # the passphrase is "two words\n"
    (tmp_path / "one").write_text("two words\n")  # "two words": another
    server, port = start_server("--once", "--key-file", key, passphrase=None)
    try:
        code, _, err = run(["client.py", "127.0.0.1", port, "--key-file", tmp_path / "one"], passphrase=None)
        assert code == 3 and "passphrases differ" in err
        code, _, err = run(["client.py", "127.0.0.1", port, "--key-file", key], passphrase=None, stdin_text="hi\n")
        assert code == 0 and "authenticated" in err
    finally:
        server.kill()


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cannot_connect_exits_1():
    code, _, err = run(["client.py", "127.0.0.1", closed_port()])
    assert code == 1 and "cannot connect to 127.0.0.1" in err


def test_port_in_use_exits_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        code, _, err = run(["server.py", taken.getsockname()[1], "--host", "127.0.0.1"])
    assert code == 1 and "cannot listen" in err


def junk_server(reply):
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        conn.sendall(reply)
        conn.recv(100)
        conn.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_client_to_something_else_is_not_an_aeschat_peer():
    port = junk_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    code, _, err = run(["client.py", "127.0.0.1", port])
    assert code == 3 and "not an aeschat peer" in err


@pytest.mark.parametrize("stdin_text", ["quit()\n", ""])
def test_idle_server_ends_on_quit_or_end_of_input(stdin_text):
    server, _ = start_server()
    server.send(stdin_text)
    server.close_stdin()
    assert server.wait() == 0


def test_a_server_that_stops_before_anyone_came_says_its_files_were_never_offered(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"x")
    server, _ = start_server("--send", tmp_path / "report.pdf")
    server.close_stdin()
    assert server.wait() == 1
    assert "1 file never offered (no client came): " in server.output()[1]


@pytest.mark.parametrize("seconds", ["1e10", "inf", "-1"])
def test_a_time_past_three_years_is_a_usage_error(seconds):
    code, _, err = run(["client.py", "127.0.0.1", "1", "--reconnect-for", seconds])
    assert code == 2 and "from 0 to 100000000" in err


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    server = Proc(["server.py", "0", "--host", "::1", "--once"])
    try:
        port = server.expect(r"listening on \[::1\]:(\d+)").group(1)
        code, out, _ = run(["client.py", "::1", port], stdin_text="over six\n")
        assert code == 0
        server.expect("Received: over six  ☒")
    finally:
        server.kill()


def test_a_server_on_every_address_says_where_to_reach_it_and_takes_ipv4_and_ipv6_alike():
    import ifaddr

    server = Proc(["server.py", "0", "--once"])
    try:
        port = server.expect(r"the other person connects to port (\d+) at one of:").group(1)
        listed = []
        while not listed or "(this machine only)" not in listed[-1]:
            listed.append(server.expect(r"^  \S.*", stream="err").group(0))
        ours = {ip.ip[0] if ip.is_IPv6 else ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips}
        for line in listed:
            assert set(line.strip().split("  (")[0].split(", ")) <= ours, line
        assert listed[-1].startswith("  127.0.0.1") and not any("fe80:" in line for line in listed)
        code, _, _ = run(["client.py", "127.0.0.1", port], stdin_text="over four\n")
        assert code == 0
        server.expect(r"^Received: over four  ☒")
        assert "::ffff:" not in "".join(line for _, line in server.seen)  # an IPv4 peer shown as one
    finally:
        server.kill()


def test_host_and_port_may_be_given_as_host_colon_port(spawn):
    """Anyone used to ssh or croc types 127.0.0.1:5555: it was "cannot find the host '127.0.0.1:5555'"."""
    server, port = spawn("server", "--once")
    code, _, err = run(["client.py", f"127.0.0.1:{port}"], stdin_text="by host and port\n")
    assert code == 0, err
    server.expect(r"^Received: by host and port  ☒")
    code, _, err = run(["client.py", f"127.0.0.1:{port}", "1"])
    assert code == 2 and f"two ports: {port} in HOST and 1" in err
    code, _, err = run(["client.py", "127.0.0.1:70000"])
    assert code == 2 and "invalid port '70000'" in err


def test_a_passphrase_given_as_a_line_is_the_same_without_its_end(spawn):
    """A pasted code brought its newline along: "the passphrases differ", each try a guess the server counts."""
    server, port = spawn("server", "--once", passphrase="plain words here")
    code, _, err = run(["client.py", "127.0.0.1", port], passphrase="plain words here\n", stdin_text="one line\n")
    assert code == 0, err
    server.expect(r"^Received: one line  ☒")


@pytest.mark.parametrize("blank", ["   ", "\t \n"])
def test_a_passphrase_of_white_space_is_empty(blank):
    code, _, err = run(["client.py", "127.0.0.1", "1"], passphrase=blank)
    assert code == 2 and "aeschat-client: error: the passphrase is empty" in err


def test_a_key_file_with_a_byte_order_mark_works_and_one_readable_by_others_is_warned_of(tmp_path):
    key = tmp_path / "k"
    key.write_bytes("\ufeff".encode() + PASSPHRASE.encode() + b"\r\n")
    key.chmod(0o644)
    server, port = start_server("--once")
    try:
        code, _, err = run(["client.py", "127.0.0.1", port, "--key-file", key], passphrase=None, stdin_text="hi\n")
        assert code == 0 and "authenticated" in err
        assert f"aeschat-client: warning: the key file {key} can be read by other users (chmod 600 {key})" in err
        server.expect("Received: hi  ☒")
    finally:
        server.kill()
    key.chmod(0o600)
    code, _, err = run(["client.py", "127.0.0.1", closed_port(), "--key-file", key], passphrase=None)
    assert "warning" not in err


def test_a_key_file_that_is_not_text_is_refused_without_showing_its_bytes(tmp_path):
    key = tmp_path / "k"
    key.write_bytes(b"secret\xff\xfe\x80bytes")
    key.chmod(0o600)
    code, _, err = run(["client.py", "127.0.0.1", "1", "--key-file", key], passphrase=None)
    assert code == 2 and "is not UTF-8 text" in err
    assert "0xff" not in err and "\\xff" not in err and "secret" not in err


def test_core_dumps_are_off(tmp_path):
    server, _ = start_server()
    try:
        with open(f"/proc/{server.proc.pid}/limits") as f:
            core = next(line for line in f if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]
    finally:
        server.kill()


def test_a_server_whose_output_cannot_be_written_stops_with_one_line():
    """A sink on a full disk: it went on taking (and acknowledging) messages it could not write, without a word."""
    env = {**os.environ, "AESCHAT_KEY": PASSPHRASE}
    with open("/dev/full", "w") as full:
        server = subprocess.Popen([sys.executable, "server.py", "0", "--host", "127.0.0.1", "--receive-only"],
                                  cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE,
                                  text=True)
    try:
        port = re.match(r"listening on 127\.0\.0\.1:(\d+)", server.stderr.readline()).group(1)
        run(["client.py", "127.0.0.1", port], stdin_text="into the void\n")
        assert server.wait(timeout=TIMEOUT) == 1
        err = server.stderr.read()
        assert "aeschat-server: error: cannot write the output: no space left on device" in err
        assert "Traceback" not in err
    finally:
        server.kill()
        server.stderr.close()


def test_a_signal_while_the_chat_is_set_up_is_kept_for_the_input_loop(monkeypatch):
    """Ctrl-C between "Connected" and the input loop left with no goodbye: the peer waited for a reconnection. From the
    first connection on, a signal is kept, and raised where leaving says goodbye."""
    monkeypatch.setattr(common, "_leaving_anyway", lambda: None)  # (it quiets this process's warnings for good)
    common.hold_signals()
    common._interrupt(signal.SIGINT, None)
    common._terminate(signal.SIGTERM, None)  # the first one counts
    with pytest.raises(KeyboardInterrupt):
        common.release_signals()
    common.release_signals()  # nothing more kept
    with pytest.raises(common.Terminated):
        common._terminate(signal.SIGTERM, None)  # and from then on, at once
