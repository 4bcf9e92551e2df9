"""The benchmark: real server.py and client.py processes on 127.0.0.1, each figure beside its floor.

    python -m bench [--quick] [--json bench/results.json]
    pypy3 -m bench ...   (the same under PyPy, from a PyPy venv with the project installed)

Everything runs on the interpreter that runs the benchmark, floors included.
Latencies are measured with a client built from the protocol core (tests/mitm.py's Attacker) against a
real server process, so that the clock sits next to the socket; throughput, one-shot, memory and
reconnection use real client processes. Floors, measured in the same run: a plain Python TCP echo over
loopback (the network), the faster of pyaes's own AES-256-CTR and aeschat's counter cipher in one process (the
cipher), and `python -c "import pyaes, spake2"` (the start-up).
"""

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pyaes  # noqa: E402
from mitm import C2S, Attacker, Proxy  # noqa: E402
from procs import PASSPHRASE, start_client, start_server  # noqa: E402

import common  # noqa: E402

SIZES = {"100 B": 100, "1 KiB": 1024, "8 KiB": 8192, "64 KiB": 65536}


def percentiles(samples):
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


class PeakWatch:
    """The highest peak RSS of some processes, read every 50 ms until stop(): a process that exits the moment its
    work is done (a client in a pipe, on a fast runtime) leaves no figure to read afterwards."""

    def __init__(self, *pids):
        self.peak, self._pids, self._done = 0.0, pids, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._done.wait(0.05):
            for pid in self._pids:
                with contextlib.suppress(OSError, KeyError):
                    self.peak = max(self.peak, peak_rss_mib(pid)[0])

    def stop(self):
        self._done.set()
        self._thread.join()
        return self.peak


# ---------------------------------------------------------------------------------------------------
# Floors


def echo_server():
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 20):
                conn.sendall(data)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def network_floor(size, rounds):
    """Round trip of `size` bytes through a plain Python TCP echo on loopback."""
    sock = socket.create_connection(("127.0.0.1", echo_server()))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload, samples = os.urandom(size), []
    for _ in range(rounds):
        started = time.perf_counter()
        sock.sendall(payload)
        got = 0
        while got < size:
            got += len(sock.recv(1 << 20))
        samples.append(time.perf_counter() - started)
    sock.close()
    return percentiles(samples)[0]


def cipher_floor(size):
    """Seconds to encrypt `size` bytes one way, key set-up included: the faster of pyaes's own AES-256-CTR and
    aeschat's counter cipher (pyaes's block function, whole records at once), best of three, so that no ratio
    is flattered by a slow floor."""
    data, best = os.urandom(size), float("inf")
    for _ in range(3):
        started = time.perf_counter()
        pyaes.AESModeOfOperationCTR(os.urandom(32)).encrypt(data)
        best = min(best, time.perf_counter() - started)
        started = time.perf_counter()
        common.CounterCipher(os.urandom(32)).apply(1 << 64, data)
        best = min(best, time.perf_counter() - started)
    return best


# One process of a pair: the cipher over `size` random bytes each time a line arrives, its seconds printed back.
_CIPHER_WORKER = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
import common
data, cipher = os.urandom(int(sys.argv[1])), common.CounterCipher(os.urandom(32))
print("ready", flush=True)
for _ in sys.stdin:
    started = time.perf_counter()
    cipher.apply(1 << 64, data)
    print(time.perf_counter() - started, flush=True)
"""


def cipher_floor_both_sides(size):
    """Seconds until two processes have each run aeschat's counter cipher over `size` bytes, started together: what a
    transfer between two programs on one machine asks of it (the sender encrypts while the receiver decrypts).
    On a machine whose two cores slow each other down, this is more than the one-way floor. Best of three on PyPy
    (its first round warms the JIT up), one round on CPython (no JIT, and a round of 4 MiB takes ten seconds)."""
    pair = [subprocess.Popen([sys.executable, "-c", _CIPHER_WORKER, str(size), str(ROOT)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for worker in pair:
            assert worker.stdout.readline() == "ready\n"
        best = float("inf")
        for _ in range(3 if PYPY else 1):
            for worker in pair:
                worker.stdin.write("go\n")
                worker.stdin.flush()
            best = min(best, max(float(worker.stdout.readline()) for worker in pair))
        return best
    finally:
        for worker in pair:
            worker.kill()
            worker.wait()


# Start-up is measured as a user runs the programs: with their bytecode cached (this machine sets
# PYTHONDONTWRITEBYTECODE, which would make every run compile common.py afresh), after one warm-up run.
CACHED = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def process_time(args, stdin=b""):
    started = time.perf_counter()
    subprocess.run(args, input=stdin, cwd=ROOT, check=True, capture_output=True,
                   env={**CACHED, "AESCHAT_KEY": PASSPHRASE})
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------
# aeschat


def hang_up(attacker, server):
    """Close, and wait until the server has seen it: a client that came at once could find it still busy."""
    attacker.close()
    server.expect("connection lost")


def handshakes(server, port, count):
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        attacker = Attacker(port, PASSPHRASE).open()  # until the server's Resume: both sides ready
        samples.append(time.perf_counter() - started)
        hang_up(attacker, server)
    return percentiles(samples)


def round_trips(server, port, size, rounds):
    """(first message after the handshake, median, p99): a message until its acknowledgement returns."""
    attacker = Attacker(port, PASSPHRASE).open()
    attacker.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    text, samples = "x" * size, []
    for _ in range(rounds):
        started = time.perf_counter()
        attacker.send_raw(attacker.message(text))
        event = None
        while not isinstance(event, common.Ack):
            event = attacker.conn.next_event()
            if event is None:
                attacker.conn.receive_data(attacker.sock.recv(1 << 20))
        samples.append(time.perf_counter() - started)
    hang_up(attacker, server)
    return (samples[0], *percentiles(samples[1:] or samples))


def pipelined(server, port, size, count):
    """Seconds per message when `count` messages of `size` go back to back and all are acknowledged."""
    attacker = Attacker(port, PASSPHRASE).open()
    text = "y" * size
    started = time.perf_counter()
    acked = 0

    def read_acks():
        nonlocal acked
        while acked < count:
            event = attacker.conn.next_event()
            if event is None:
                attacker.conn.receive_data(attacker.sock.recv(1 << 20))
            elif isinstance(event, common.Ack):
                acked = event.id + 1  # acknowledgements are cumulative

    reader = threading.Thread(target=read_acks)
    reader.start()
    for _ in range(count):
        attacker.send_raw(attacker.message(text))
    reader.join()
    elapsed = time.perf_counter() - started
    hang_up(attacker, server)
    return elapsed / count


def watch_rss(pids, stop):
    peaks = dict.fromkeys(pids, 0.0)
    while not stop.is_set():
        for pid in pids:
            with contextlib.suppress(OSError, KeyError):
                peaks[pid] = max(peaks[pid], peak_rss_mib(pid)[1])
        stop.wait(0.05)
    return peaks


def throughput(count):
    """1 KiB messages from a real client process, as fast as it goes; every one acknowledged before it exits."""
    server, port = start_server("--once")
    client = start_client(port)
    client.expect("Connected to")
    server.expect("Connected to")
    idle = {"server": peak_rss_mib(server.proc.pid)[1], "client": peak_rss_mib(client.proc.pid)[1]}
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=lambda: peaks.update(watch_rss([server.proc.pid, client.proc.pid], stop)))
    watcher.start()
    line = "z" * 1024
    started = time.perf_counter()
    client.send((line + "\n") * count)
    client.close_stdin()
    code = client.wait(timeout=300)  # a client exits 0 only once every message is acknowledged
    elapsed = time.perf_counter() - started
    stop.set()
    watcher.join()
    server.wait(timeout=30)
    assert code == 0, client.output()
    assert server.output()[0].count("Received: " + line) == count
    return {"messages/s": count / elapsed, "KB/s": count * 1024 / elapsed / 1000,
            "rss idle MiB": idle, "rss load MiB": {"server": peaks[server.proc.pid], "client": peaks[client.proc.pid]}}


def legacy_burst(count):
    """A burst piped into a legacy client: until the server shows the last one (paced for the originals)."""
    server, port = start_server("--once", "--legacy")
    client = start_client(port, "--legacy")
    client.expect("legacy format")
    started = time.perf_counter()
    client.send("".join(f"burst {i}\n" for i in range(count)))
    server.expect(rf"Received: burst {count - 1}  ☒", timeout=120)
    elapsed = time.perf_counter() - started
    client.kill()
    server.kill()
    return elapsed


def file_transfer(size, folder, cut=False):
    """A file of `size` bytes from a client in a pipe (--send) to a server (--receive-dir): seconds from the
    sender's offer to its "delivered", the bytes the sender wrote through a connection cut half way (when `cut`;
    else None), and peak RSS of both."""
    source = os.path.join(folder, "payload.bin")
    with open(source, "wb") as f:
        f.write(os.urandom(size))
    inbox = tempfile.mkdtemp(dir=folder)
    took, sent, rss = transfer(source, inbox, cut and size // 2)
    with open(source, "rb") as a, open(os.path.join(inbox, "payload.bin"), "rb") as b:
        assert a.read() == b.read()
    return took, sent, rss


def folder_transfer(count, size, folder):
    """A folder of `count` files of `size` bytes, then one file of their total size, sent as file_transfer sends:
    seconds from offer to "delivered" for each."""
    source = os.path.join(folder, "small")
    os.mkdir(source)
    for i in range(count):
        with open(os.path.join(source, f"{i:05}.txt"), "wb") as f:
            f.write(os.urandom(size))
    one = os.path.join(folder, "one.bin")
    with open(one, "wb") as f:
        f.write(os.urandom(count * size))
    inbox = tempfile.mkdtemp(dir=folder)
    many = transfer(source, inbox)[0]
    assert len(os.listdir(os.path.join(inbox, "small"))) == count
    return many, transfer(one, inbox)[0]


def transfer(source, inbox, cut=0):
    """Seconds from offer to "delivered" of what --send sends of source, the bytes the sender wrote when its first
    connection goes through a relay that cuts it after `cut` bytes (None with no cut: then the client connects
    straight to the server), and the peak RSS of either side."""
    server, port = start_server("--once", "--receive-dir", inbox)
    proxy = Proxy(port) if cut else None  # (a relay in this process would take CPU from the two it measures)
    if cut:
        proxy.cut_after = {C2S: cut}
    client = start_client(proxy.port if cut else port, "--send", source)
    client.close_stdin()
    watch = PeakWatch(server.proc.pid, client.proc.pid)
    try:
        client.expect("offering ")
        started = time.perf_counter()
        if cut:
            client.expect("connection lost", timeout=300)
            proxy.cut_after = {}
        client.expect("^delivered ", timeout=300)
        elapsed = time.perf_counter() - started
        rss = watch.stop()
        assert client.wait(timeout=60) == 0
        sent = sum(relay.forwarded[C2S] for relay in proxy.relays) if cut else None
    finally:
        watch.stop()
        client.kill()
        server.kill()
        if cut:
            proxy.close()
    return elapsed, sent, rss


def message_during_transfer(folder, rounds):
    """Seconds from a line typed during a 4 MiB transfer to its being shown on the other side."""
    source = os.path.join(folder, "long.bin")
    with open(source, "wb") as f:
        f.write(os.urandom(4 * 2**20))
    server, port = start_server("--once", "--receive-dir", tempfile.mkdtemp(dir=folder))
    client = start_client(port, "--send", source)
    samples = []
    try:
        server.expect("receiving file")
        for i in range(rounds):
            started = time.perf_counter()
            client.send(f"meanwhile {i}\n")
            server.expect(f"Received: meanwhile {i}  ☒")
            samples.append(time.perf_counter() - started)
            time.sleep(0.5)  # spread the samples over the transfer
    finally:
        client.kill()
        server.kill()
    return percentiles(samples)


def round_trips_under_hellos(server, port, rate, seconds):
    """The 100 B round trip of a live chat while strangers open connections and send hellos at `rate` a second
    (each refused as busy: what a flood costs the server now, beside the quiet figure from the same run)."""
    stop = threading.Event()
    hello = common.ClientConnection(PASSPHRASE).data_to_send()
    opened = 0

    def flood():
        nonlocal opened
        while not stop.is_set():
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(hello)
                opened += 1
            stop.wait(1 / rate)

    attacker = Attacker(port, PASSPHRASE).open()
    attacker.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    thread = threading.Thread(target=flood)
    thread.start()
    started, samples = time.perf_counter(), []
    try:
        while time.perf_counter() - started < seconds:
            begun = time.perf_counter()
            attacker.send_raw(attacker.message("x" * 100))
            while not isinstance(attacker.next_event(), common.Ack):
                pass
            samples.append(time.perf_counter() - begun)
    finally:
        stop.set()
        thread.join()
        hang_up(attacker, server)
    return (*percentiles(samples), opened / (time.perf_counter() - started))


def reconnect_time(rounds):
    """From the network coming back to the conversation resumed (the client says "reconnected")."""
    samples = []
    server, port = start_server("--keepalive", "0.3")
    proxy = Proxy(port)
    client = start_client(proxy.port, "--keepalive", "0.3")
    client.expect("authenticated and encrypted")
    try:
        for i in range(rounds):
            relay = proxy.relay(i)
            proxy.down = True  # the network goes: the connection is cut, new ones refused
            relay.close(reset=True)
            client.expect("connection lost")
            time.sleep(1)  # the outage itself lasts a second
            back = time.perf_counter()
            proxy.down = False
            client.expect("reconnected to")
            samples.append(time.perf_counter() - back)
    finally:
        client.kill()
        server.kill()
        proxy.close()
    return percentiles(samples)


# ---------------------------------------------------------------------------------------------------


PYPY = sys.implementation.name == "pypy"


def bare_rss():
    """RSS of the interpreter that does nothing: what any process of it costs before aeschat's first line."""
    out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"], capture_output=True,
                         text=True, check=True).stdout
    return int(dict(line.split(":", 1) for line in out.splitlines() if ":" in line)["VmRSS"].split()[0]) / 1024


def run(quick):
    n = 10 if quick else 50
    results, rows = {}, []
    server, port = start_server()
    try:
        hs = handshakes(server, port, n)
        results["handshake"] = {"median ms": hs[0] * 1e3, "p99 ms": hs[1] * 1e3}
        rows.append(("handshake (connect to both ready)", f"{hs[0] * 1e3:.1f} ms median, {hs[1] * 1e3:.1f} ms p99",
                     "SPAKE2 both sides", ""))
        for label, size in (("100 B", 100), ("1 KiB", 1024), ("64 KiB", 65536)):
            rounds = (5 if quick else 20) if size > 8192 else (20 if quick else 100)
            first, median, p99 = round_trips(server, port, size, rounds)
            net = network_floor(size, 50)
            # The cipher's own time: what the round trip must encrypt and decrypt once each, the message's
            # record (text, timestamp, hash, padding) and the acknowledgement's.
            record_bytes = [len(common.encode_payload(common.Message(0, "x" * size, common.now_iso()))),
                            len(common.encode_payload(common.Ack(0)))]
            cipher = 2 * sum(cipher_floor(n) for n in record_bytes)
            results[f"round trip {label}"] = {"first ms": first * 1e3, "median ms": median * 1e3, "p99 ms": p99 * 1e3,
                                              "network floor ms": net * 1e3, "cipher floor ms": cipher * 1e3}
            rows.append((f"round trip {label} (to its ack)",
                         f"{median * 1e3:.2f} ms median, {p99 * 1e3:.2f} p99, first {first * 1e3:.2f}",
                         f"network {net * 1e3:.3f} ms + cipher {cipher * 1e3:.2f} ms (records both ways)",
                         f"{(median - net - cipher) * 1e3:+.2f} ms over floors"))
        quiet = results["round trip 100 B"]["median ms"]
        flood = round_trips_under_hellos(server, port, 70, 3 if quick else 10)
        results["round trip 100 B under hellos"] = {"median ms": flood[0] * 1e3, "p99 ms": flood[1] * 1e3,
                                                    "hellos/s": flood[2]}
        rows.append(("round trip 100 B, strangers' hellos arriving", f"{flood[0] * 1e3:.2f} ms median, "
                     f"{flood[1] * 1e3:.2f} p99, {flood[2]:.0f} hellos/s", f"quiet {quiet:.2f} ms (same run)",
                     f"{flood[0] * 1e3 / quiet:.2f}× quiet"))
        per_byte = {}
        for label in ("1 KiB", "8 KiB", "64 KiB"):
            size = SIZES[label]
            count = max(12, (800_000 if not quick else 200_000) // size)  # enough that filling the pipeline is noise
            per_byte[label] = pipelined(server, port, size, count) / size * 1e6
        results["scaling us/byte"] = per_byte
        floor_per_byte = cipher_floor(65536) / 65536 * 1e6
        rows.append(("cost per byte, 1 / 8 / 64 KiB", " / ".join(f"{v:.2f}" for v in per_byte.values()) + " µs",
                     f"cipher {floor_per_byte:.2f} µs/byte one way",
                     f"64 KiB ÷ 1 KiB = {per_byte['64 KiB'] / per_byte['1 KiB']:.2f}"))
    finally:
        server.kill()

    count = 200 if quick else 1000
    tp = throughput(count)
    results["throughput v2"] = tp
    floor_s = cipher_floor(1024 * count) if quick else cipher_floor(1024 * 256) * count / 256
    floor_kbs = 1024 * count / floor_s / 1000
    rows.append(("throughput, 1 KiB messages", f"{tp['messages/s']:.0f} msg/s, {tp['KB/s']:.0f} KB/s",
                 f"cipher {floor_kbs:.0f} KB/s one way", f"{floor_kbs / tp['KB/s']:.2f}× the cipher floor"))
    rows.append(("peak RSS (idle → load)",
                 f"server {tp['rss idle MiB']['server']:.1f} → {tp['rss load MiB']['server']:.1f} MiB, "
                 f"client {tp['rss idle MiB']['client']:.1f} → {tp['rss load MiB']['client']:.1f} MiB",
                 f"the interpreter alone: {bare_rss():.1f} MiB", ""))
    burst = legacy_burst(20)
    results["legacy burst"] = {"20 messages s": burst}
    rows.append(("legacy: 20 lines piped, until the last is shown", f"{burst:.2f} s",
                 f"pace {19 * common.LEGACY_PACE:.2f} s (one message a {common.LEGACY_PACE} s, for the originals)",
                 f"+{burst - 19 * common.LEGACY_PACE:.2f} s"))

    with tempfile.TemporaryDirectory() as folder:
        mib = 1 if quick else 16 if PYPY else 4  # PyPy is for files: a size where its JIT has warmed up
        size, label = mib * 2**20, f"{mib} MiB"
        took, sent, rss = file_transfer(size, folder)
        floor, both = cipher_floor(size), cipher_floor_both_sides(size)
        results["file"] = {"size": size, "s": took, "cipher floor s": floor, "both sides at once s": both,
                           "peak rss MiB": rss}
        rows.append((f"file of {label}, offer to delivered",
                     f"{took:.2f} s, {size / took / 1000:.0f} KB/s, peak RSS {rss:.1f} MiB",
                     f"cipher {floor:.2f} s one way, {both:.2f} s both sides at once",
                     f"{took / floor:.2f}× the cipher floor, {took / both:.2f}× both sides"))
        took, sent, _ = file_transfer(size, folder, cut=True)
        results["file cut half way"] = {"size": size, "s": took, "bytes sent": sent}
        rows.append((f"file of {label}, connection cut half way", f"{sent / 2**20:.2f} MiB sent, {took:.2f} s",
                     f"the file: {size / 2**20:.2f} MiB", f"{sent / size:.2f}× its size"))
        count = 200 if quick else 2000
        many, one = folder_transfer(count, 2048, folder)
        results["folder of small files"] = {"files": count, "s": many, "one file s": one}
        rows.append((f"folder of {count:,} files of 2 KiB, offer to delivered", f"{many:.2f} s",
                     f"one file of their size {one:.2f} s", f"{many / one:.2f}× one file"))
        latency = message_during_transfer(folder, 4 if quick else 10)
        results["message during a transfer"] = {"median s": latency[0], "p99 s": latency[1]}
        rows.append(("a message typed during a 4 MiB transfer", f"{latency[0] * 1e3:.0f} ms median, "
                     f"{latency[1] * 1e3:.0f} ms worst", "goal 500 ms", ""))

    startup = statistics.median(process_time([sys.executable, "-c", "import pyaes, spake2"]) for _ in range(5))
    for legacy in (False, True):
        name = "legacy" if legacy else "v2"
        server, port = start_server(*(["--legacy"] if legacy else []))
        try:
            args = [sys.executable, "client.py", "127.0.0.1", str(port), *(["--legacy"] if legacy else [])]
            process_time(args, b"x\n")  # warm-up: the bytecode is written once, as on a user's machine
            shot = statistics.median(process_time(args, b"x\n") for _ in range(3 if quick else 7))
        finally:
            server.kill()
        results[f"one-shot {name}"] = {"median s": shot, "start-up floor s": startup}
        rows.append((f"one-shot {name}: printf 'x\\n' \\| client.py", f"{shot * 1e3:.0f} ms",
                     f"start-up {startup * 1e3:.0f} ms", f"{shot / startup:.2f}× the start-up floor"))

    rc = reconnect_time(3 if quick else 5)
    results["reconnect"] = {"median s": rc[0], "p99 s": rc[1]}
    rows.append(("network back → conversation resumed", f"{rc[0] * 1e3:.0f} ms median, {rc[1] * 1e3:.0f} ms worst",
                 "backoff capped at 2 s", ""))
    return results, rows


def main():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run, not figures to quote")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results.json"), help="where to write the results")
    args = parser.parse_args()
    runtime = f"{sys.implementation.name} {sys.version.split()[0]}"
    if PYPY:
        runtime += " (PyPy {}.{}.{})".format(*sys.pypy_version_info[:3])
    print(f"runtime: {runtime}\n")
    results, rows = run(args.quick)
    results["runtime"] = runtime
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    header = ("measure", "aeschat", "floor (same run)", "ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
    Path(args.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"\n(written to {args.json})")


if __name__ == "__main__":
    main()
