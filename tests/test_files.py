"""Files inside the chat, on real processes: delivered byte for byte, safely named, resumable, never blocking."""

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from mitm import C2S, S2C, Attacker, Proxy
from procs import PASSPHRASE, ROOT, connected

import common

pytestmark = pytest.mark.slow


@pytest.fixture
def folders(tmp_path):
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    outbox.mkdir()
    return inbox, outbox


def make_file(folder, name, size, seed=1):
    path = folder / name
    path.write_bytes(hashlib.shake_256(seed.to_bytes(4, "big")).digest(size) if size else b"")
    return path


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_delivered_byte_for_byte(spawn, folders):
    inbox, outbox = folders
    source = make_file(outbox, "report.bin", 300_000)
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, "--send", source)
    client.close_stdin()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    server.expect(rf"^received file report\.bin \(300,000 bytes, sha256 {digest[:12]}…\) → {inbox}/report\.bin$")
    client.expect(r"^delivered file report\.bin$")
    assert client.wait() == 0
    assert (inbox / "report.bin").read_bytes() == source.read_bytes()
    assert leftovers(inbox) == []


def test_the_same_name_twice_makes_two_files_and_overwrites_nothing(spawn, folders):
    inbox, outbox = folders
    (inbox / "same.txt").write_text("already here")
    first, second = make_file(outbox, "same.txt", 1000, 1), make_file(outbox / "..", "same.txt", 2000, 2)
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, "--send", first, "--send", second)
    client.close_stdin()
    assert client.wait() == 0
    server.expect(r"→ .*/same \(1\)\.txt$")
    server.expect(r"→ .*/same \(2\)\.txt$")
    assert (inbox / "same.txt").read_text() == "already here"
    assert {(inbox / "same (1).txt").read_bytes(), (inbox / "same (2).txt").read_bytes()} == {
        first.read_bytes(), second.read_bytes()}


@pytest.mark.parametrize("name, saved", [
    ("../../escape.txt", "escape.txt"),
    ("a/b/c.txt", "c.txt"),
    ("..", "file"),
    (".bashrc", "_bashrc"),
    (".aeschat-0123456789abcdef.part", "_aeschat-0123456789abcdef.part"),
    ("\x1b[31mred\x07.txt", "_[31mred_.txt"),
    ("ok\u202etxt.exe", "ok_txt.exe"),
    ("n" * 300, "n" * 255),
])
def test_a_hostile_name_is_saved_inside_the_folder_safely_named(spawn, folders, name, saved):
    inbox, _ = folders
    server, port = spawn("server", "--no-reconnect", "--receive-dir", inbox)
    attacker = Attacker(port, PASSPHRASE).open()
    data = b"harmless"
    offered = name if len(name.encode()) <= 255 else name[:255]
    attacker.send_raw(attacker.record(common.Offer(0, offered, len(data), hashlib.sha256(data).hexdigest())))
    assert attacker.next_event() == common.Accept(0, 0)
    attacker.send_raw(attacker.record(common.Chunk(0, 0, data)))
    assert attacker.next_event() == common.FileAck(0, len(data))
    assert attacker.next_event() == common.Done(0)
    attacker.close()
    server.expect("received file")
    assert [p.name for p in inbox.iterdir()] == [saved]
    assert (inbox / saved).read_bytes() == data
    assert "\x1b" not in server.output()[0] if server.proc.poll() is not None else True
    assert not any("\x1b" in line or "\u202e" in line for _, line in server.seen)


def test_a_pipe_receiver_without_a_folder_declines_and_the_sender_is_told(spawn, folders):
    _, outbox = folders
    source = make_file(outbox, "unwanted.bin", 5000)
    server, port = spawn("server", "--once")
    client = spawn("client", port, "--send", source)
    client.close_stdin()
    server.expect("declined file unwanted.bin .*: there is no --receive-dir to save it in")
    client.expect("file unwanted.bin not delivered: the peer declined it")
    assert client.wait() == 1
    assert "1 file declined by the peer: unwanted.bin" in client.output()[1]  # exit 1 all the same: a script


def test_a_file_over_the_limit_is_refused_on_both_sides(spawn, folders):
    inbox, outbox = folders
    source = make_file(outbox, "big.bin", 5000)
    server, port = spawn("server", "--once", "--receive-dir", inbox, "--max-file-size", "4K")
    client = spawn("client", port, "--send", source)
    client.close_stdin()
    server.expect(r"refused file big\.bin \(4\.9 KiB\): it is over --max-file-size \(4\.0 KiB\)")
    client.expect("file big.bin not delivered: the peer refused it as too large")
    assert client.wait() == 1
    assert list(inbox.iterdir()) == []


def test_a_connection_cut_mid_transfer_resumes_and_the_file_arrives_once(spawn, folders):
    """The first connection is cut as the receiver's first acknowledgement reaches the sender, with more of the file
    in flight: the second goes on from what was acknowledged, not from zero. (Cut after a count of bytes instead, a
    receiver that had not yet read what was in flight acknowledged nothing, on PyPy, and the file went again.)"""
    inbox, outbox = folders
    size = 2 * common.WINDOW_CHUNKS * common.CHUNK_SIZE  # chunks are this runtime's size, as the processes use
    source = make_file(outbox, "resumed.bin", size)
    server, port = spawn("server", "--once", "--receive-dir", inbox)

    def hook(relay, direction, index, frame):
        if relay is proxy.relays[0] and direction == S2C and any(is_chunk(f) for f in relay.frames[C2S]):
            relay.cut_after[S2C] = relay.forwarded[S2C] + len(frame)  # this acknowledgement goes, then the cut
        return [frame]

    proxy = Proxy(port, hook)
    try:
        client = spawn("client", proxy.port, "--send", source)
        client.close_stdin()
        client.expect("connection lost")
        client.expect("reconnected to")
        server.expect(r"received file resumed\.bin")
        assert client.wait() == 0
    finally:
        proxy.close()
    assert [p.name for p in inbox.iterdir()] == ["resumed.bin"]
    assert (inbox / "resumed.bin").read_bytes() == source.read_bytes()
    assert len(proxy.relays) == 2
    assert proxy.relays[1].forwarded[C2S] < size - common.CHUNK_SIZE + 4096  # at least a chunk was not sent again


def is_chunk(frame):
    """Whether a frame seen by the proxy carries a whole chunk of a file (only those are so long)."""
    return len(frame) > common.CHUNK_SIZE


def test_a_file_whose_last_answers_were_lost_in_a_cut_is_delivered_once(spawn, folders):
    """A man in the middle lets the whole file through, withholds the receiver's last acknowledgements and its
    done, and cuts: offered again, the file is reported delivered, and saved once. (Both sides ended as a security
    failure; with only the done withheld, the file was listed undelivered.)"""
    inbox, outbox = folders
    source = make_file(outbox, "payload.bin", 4 * common.CHUNK_SIZE)
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    withheld = threading.Event()

    def hook(relay, direction, index, frame):
        if relay is proxy.relays[0]:
            if direction == C2S and sum(map(is_chunk, relay.frames[C2S])) == 4:
                withheld.set()  # the last chunk is through: nothing goes back from now on
            if direction == S2C and withheld.is_set():
                return []
        return [frame]

    proxy = Proxy(port, hook)
    try:
        client = spawn("client", proxy.port, "--send", source)
        client.close_stdin()
        server.expect(r"received file payload\.bin")
        proxy.relays[0].close()
        client.expect("reconnected to")
        client.expect(r"^delivered file payload\.bin$")
        assert client.wait() == 0
        assert server.wait() == 0
    finally:
        proxy.close()
    assert [p.name for p in inbox.iterdir()] == ["payload.bin"]


def test_the_sender_leaving_mid_transfer_leaves_no_temporary_file(spawn, folders):
    inbox, outbox = folders
    source = make_file(outbox, "abandoned.bin", 2_000_000)
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, "--send", source)
    server.expect("receiving file abandoned.bin")
    [part] = inbox.iterdir()  # its temporary file
    deadline = time.monotonic() + 20
    while part.stat().st_size < 500_000:  # well under way: acknowledgements keep coming back to the sender
        assert time.monotonic() < deadline, "the transfer did not move"
        time.sleep(0.05)
    client.proc.send_signal(signal.SIGINT)  # its goodbye goes after chunks, and must not be lost to a reset
    server.expect("transfer of file abandoned.bin abandoned: the peer left")
    assert client.wait() == 130
    server.expect("the peer left the chat")
    assert list(inbox.iterdir()) == []


def test_a_message_typed_during_a_transfer_does_not_wait_for_the_file(spawn, folders):
    inbox, outbox = folders
    source = make_file(outbox, "long.bin", 4 * 2**20)
    server, client, _ = connected(spawn, "--once", "--receive-dir", inbox, client_args=("--send", source))
    server.expect("receiving file long.bin")
    client.send("meanwhile, a message\n")
    server.expect("Received: meanwhile, a message  ☒")
    assert not (inbox / "long.bin").exists()  # it came while the file was still on its way
    client.send("quit()\n")


def test_a_tampered_chunk_is_a_security_failure_and_nothing_is_put_in_place(spawn, folders):
    inbox, outbox = folders
    source = make_file(outbox, "target.bin", 100_000)

    def flip(relay, direction, index, frame):
        if direction == C2S and len(frame) > 16_000 and not getattr(relay, "flipped", False):
            relay.flipped = True
            return [frame[:100] + bytes([frame[100] ^ 1]) + frame[101:]]
        return [frame]

    server, port = spawn("server", "--once", "--receive-dir", inbox)
    proxy = Proxy(port, flip)
    try:
        client = spawn("client", proxy.port, "--send", source)
        client.close_stdin()
        server.expect("security failure: a record failed its integrity check")
        client.expect("security failure: the peer says a record it received failed its integrity check")
        assert client.wait() == 3
    finally:
        proxy.close()
    assert list(inbox.iterdir()) == []


def test_legacy_refuses_files_on_the_command_line():
    result = subprocess.run([sys.executable, "client.py", "127.0.0.1", "1", "--legacy", "--send", "client.py"],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "AESCHAT_KEY": PASSPHRASE})
    assert result.returncode == 2 and "--legacy has no files" in result.stderr


def test_send_of_a_missing_file_is_a_usage_error():
    result = subprocess.run([sys.executable, "client.py", "127.0.0.1", "1", "--send", "/nonexistent/x"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "AESCHAT_KEY": PASSPHRASE})
    assert result.returncode == 2
    assert result.stderr == "aeschat-client: error: --send /nonexistent/x: not a readable file or folder (see --help)\n"


def received(files, file, data, name):
    """Receive data as file through files (a real folder), and put it in place as name."""
    files.open(file, len(data), name, None)
    files.write(file, data)
    path, problems, *_ = files.save(file, hashlib.sha256(data).hexdigest(), name, 0)
    assert problems == []
    return path


def test_a_name_of_255_bytes_twice_is_numbered_within_255_bytes(tmp_path):
    files, name = common.Files(str(tmp_path)), "n" * 251 + ".txt"
    assert received(files, 0, b"first", name) == str(tmp_path / name)
    second = received(files, 1, b"second", name)
    assert os.path.basename(second) == "n" * 247 + " (1).txt"
    assert (tmp_path / name).read_bytes() == b"first" and (tmp_path / second).read_bytes() == b"second"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name, why", [("no such folder/x", "cannot be put in place"), ("x", "bad SHA-256")])
def test_a_file_that_is_not_saved_leaves_no_temporary_file(tmp_path, name, why):
    files = common.Files(str(tmp_path))
    files.open(0, 4, name, None)
    files.write(0, b"data")
    with pytest.raises(OSError if why == "cannot be put in place" else ValueError):
        files.save(0, hashlib.sha256(b"other" if why == "bad SHA-256" else b"data").hexdigest(), name, 0)
    assert list(tmp_path.iterdir()) == []


def test_more_files_than_go_at_once_all_arrive(spawn, folders):
    """40 files: 32 offered at once, the rest as those finish; four written at a time."""
    inbox, outbox = folders
    sources = [make_file(outbox, f"f{i}.bin", 3000 + i, seed=i) for i in range(40)]
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, *[arg for source in sources for arg in ("--send", source)])
    client.close_stdin()
    assert client.wait() == 0
    assert sorted(p.name for p in inbox.iterdir()) == sorted(s.name for s in sources)
    assert all((inbox / s.name).read_bytes() == s.read_bytes() for s in sources)


def test_a_path_with_a_tilde_is_the_home_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_file(tmp_path, "notes.txt", 10)
    handle, name, size, *_ = common.Files().prepare("~/notes.txt")
    handle.close()
    assert (name, size) == ("notes.txt", 10)


def test_what_a_folders_walk_cannot_read_is_named_from_the_folder_sent(tmp_path, monkeypatch):
    """Once, a file that could not be read was named from the folder sent, and a folder that could not be listed by
    its absolute path. (This suite runs as root, for whom modes deny nothing: the system says no here instead.)"""
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    make_file(tmp_path / "proj", "ok.txt", 3)
    make_file(tmp_path / "proj", "secret.txt", 3)
    scandir, real_open = os.scandir, open

    def refusing_scandir(path="."):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    def refusing_open(path, *args, **kwargs):
        if os.fspath(path).endswith("secret.txt"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    monkeypatch.setattr("builtins.open", refusing_open)
    reader, name, size, sha256, folder, bits, notes = common.Files().prepare(str(tmp_path / "proj"))
    assert notes == ["cannot read secret.txt: permission denied", "cannot read sub: permission denied"]
    assert folder == (1, 3)


def test_a_named_pipe_is_not_a_file_to_send(tmp_path):
    """Opening it waited for a writer for ever, and the offer never came."""
    os.mkfifo(tmp_path / "pipe")
    outcome = []

    def prepare():
        try:
            common.Files().prepare(str(tmp_path / "pipe"))
        except common.UsageError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=prepare, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # free it: a writer comes, then goes
        os.close(os.open(tmp_path / "pipe", os.O_WRONLY))
    assert outcome == ["not a regular file or folder"]


# ---------------------------------------------------------------------------------------------------
# Folders


def make_tree(root):
    """A folder to send: nested files, an empty folder, an executable, a link (never followed) and a hidden file."""
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "empty").mkdir()
    make_file(root, "top.txt", 1000, 1)
    make_file(root / "docs", "a.bin", 70_000, 2)
    make_file(root / "docs" / "deep", "b.bin", 0)
    make_file(root, ".hidden", 10, 3)
    make_file(root, ".aeschat-0123456789abcdef.part", 10, 5)  # a download a killed receiver left: not sent
    run = make_file(root, "run.sh", 50, 4)
    run.chmod(0o755)
    (root / "link").symlink_to("/etc/passwd")
    return root


def test_a_folder_is_delivered_whole_as_it_was_and_links_are_skipped(spawn, folders):
    inbox, outbox = folders
    tree = make_tree(outbox / "project")
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, "--send", tree)
    client.close_stdin()
    client.expect(r"^folder project: skipped, being links or not files \(never followed\): link$")
    client.expect(r"^folder project: skipped, being aeschat's unfinished downloads: \.aeschat-0123456789abcdef\.part$")
    client.expect(r"^offering folder project \(5 files, 69\.4 KiB\)$")
    server.expect(rf"^received folder project \(5 files, 69\.4 KiB\) → {inbox}/project$")
    client.expect(r"^delivered folder project$")
    assert client.wait() == 0
    got = inbox / "project"
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*")) == [
        "_hidden", "docs", "docs/a.bin", "docs/deep", "docs/deep/b.bin", "empty", "run.sh", "top.txt"]
    for name in ("top.txt", "docs/a.bin", "run.sh"):
        assert (got / name).read_bytes() == (tree / name).read_bytes()
    assert (got / "run.sh").stat().st_mode & 0o111 and not (got / "top.txt").stat().st_mode & 0o111
    assert leftovers(got) == [] and leftovers(got / "docs") == []


def test_names_a_receiver_would_refuse_are_skipped_and_named_and_the_rest_goes(spawn, folders):
    """A name that is not UTF-8 once ended the sender's chat (exit 4); a folder deeper than the receiver takes was
    sent whole, then refused as damaged."""
    inbox, outbox = folders
    tree = outbox / "odd"
    tree.mkdir()
    make_file(tree, "fine.txt", 100, 1)
    bad = os.fsdecode(b"bad\xffname.txt")
    make_file(tree, bad, 10, 2)
    deep = tree.joinpath(*["d"] * 70)
    deep.mkdir(parents=True)
    make_file(deep, "far.txt", 10, 3)
    lone = outbox / os.fsdecode(b"lone\xfe.txt")
    make_file(outbox, lone.name, 20, 4)
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, "--send", tree, "--send", lone)
    client.close_stdin()
    client.expect(r"^folder odd: skipped, their paths being deeper than 64 folders, longer than 4096 bytes or not "
                  r"valid Unicode: bad\\udcffname\.txt, d/d/d/d/d/d/d/d/d/d/d/d")
    received = sorted(server.expect(r"^(received (?:folder odd \(1 file, 100 bytes\)|file lone\ufffd\.txt \(20 bytes))",
                                    stream="out").group(1) for _ in range(2))
    assert received == ["received file lone\ufffd.txt (20 bytes", "received folder odd (1 file, 100 bytes)"]
    assert client.wait() == 0
    assert (inbox / "odd" / "fine.txt").read_bytes() == (tree / "fine.txt").read_bytes()
    assert (inbox / "lone\ufffd.txt").read_bytes() == lone.read_bytes()


def test_a_folder_whose_name_is_taken_gets_a_number(spawn, folders):
    inbox, outbox = folders
    (inbox / "project").mkdir()
    (outbox / "project").mkdir()
    make_file(outbox / "project", "x.txt", 10)
    server, port = spawn("server", "--once", "--receive-dir", inbox)
    client = spawn("client", port, "--send", outbox / "project")
    client.close_stdin()
    server.expect(r"→ .*/project \(1\)$")
    assert client.wait() == 0 and (inbox / "project (1)" / "x.txt").exists()


def test_a_folder_cut_half_way_resumes_and_arrives_once(spawn, folders):
    inbox, outbox = folders
    (outbox / "many").mkdir()
    for i in range(6):
        make_file(outbox / "many", f"f{i}.bin", 40_000, i)
    server, port = spawn("server", "--receive-dir", inbox)
    proxy = Proxy(port)
    proxy.cut_after = {C2S: 120_000}
    client = spawn("client", proxy.port, "--send", outbox / "many")
    client.expect("connection lost")
    proxy.cut_after = {}
    client.expect("reconnected to")
    client.close_stdin()
    assert client.wait() == 0
    assert sorted(p.name for p in (inbox / "many").iterdir()) == [f"f{i}.bin" for i in range(6)]
    assert all((inbox / "many" / f"f{i}.bin").read_bytes() == (outbox / "many" / f"f{i}.bin").read_bytes()
               for i in range(6))
    proxy.close()


def stream_of(entries):
    """A folder's stream from (kind, path, content) entries, as a sender would make it."""
    out = b""
    for kind, path, content in entries:
        out += common.folder_header(kind, 0o644, len(content), hashlib.sha256(content).digest(), path) + content
    return out


@pytest.mark.parametrize("path", ["../escape", "a/../../b", "/etc/passwd", "a//b", "", "x/./y"])
def test_a_folder_entry_that_would_leave_the_folder_is_refused_before_anything_is_written(tmp_path, path):
    stream = stream_of([(b"f", path, b"pwned")])
    writer = common.FolderWriter(str(tmp_path), "f", len(stream), 1)
    with pytest.raises(common.RemoteProtocolError):
        writer.write(stream)
    writer.discard()
    assert list(tmp_path.rglob("*")) == []


def test_folder_entries_are_named_safely_inside_the_new_folder(tmp_path):
    stream = stream_of([(b"f", ".bashrc", b"1"), (b"f", "sub/\x1b[31mred", b"2"), (b"d", ".git", b""),
                        (b"f", "sub\\x", b"3"), (b"f", "sub\\x", b"4")])
    writer = common.FolderWriter(str(tmp_path), "..", len(stream), 4)
    writer.write(stream)
    root = writer.finish(writer.parser.manifest.hexdigest())
    assert root == str(tmp_path / "file") and writer.problems == []
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "file", "file/_bashrc", "file/_git", "file/sub", "file/sub/_[31mred", "file/x", "file/x (1)"]


def test_a_damaged_file_in_a_folder_is_not_saved_and_the_rest_is(tmp_path):
    entries = [(b"f", "good", b"fine"), (b"f", "bad", b"original")]
    stream = stream_of(entries).replace(b"original", b"ORIGINAL")  # changed on the way, its header kept
    writer = common.FolderWriter(str(tmp_path), "f", len(stream), 2)
    writer.write(stream)
    writer.finish("0" * 64)
    assert (tmp_path / "f" / "good").read_bytes() == b"fine" and not (tmp_path / "f" / "bad").exists()
    assert [p.split(":")[0] for p in writer.problems] == ["bad", "the folder's list of entries did not match what "
                                                                 "the sender announced"]


def test_many_small_files_go_as_one_stream_with_no_record_or_round_trip_of_their_own(spawn, folders):
    """What makes 200 files go about as fast as one file of their size: the folder is one stream of chunks, so the
    records each way are those of the one file (a chunk more for the headers), none for each file. (The time itself
    is the benchmark's to measure: on PyPy it is the file system's, creating files, that shows.)"""
    inbox, outbox = folders
    (outbox / "small").mkdir()
    for i in range(200):
        make_file(outbox / "small", f"{i:04}.txt", 2048, i)
    make_file(outbox, "one.bin", 200 * 2048, 9)

    def records(source):
        server, port = spawn("server", "--once", "--receive-dir", inbox)
        proxy = Proxy(port)
        try:
            client = spawn("client", proxy.port, "--send", source)
            client.close_stdin()
            client.expect("^delivered")
            assert client.wait() == 0
        finally:
            proxy.close()
        return len(proxy.relays[0].frames[C2S]), len(proxy.relays[0].frames[S2C])

    one, many = records(outbox / "one.bin"), records(outbox / "small")
    assert len(list((inbox / "small").iterdir())) == 200
    headers = 200 * (common.ENTRY.size + len("0000.txt"))
    chunks = -(-headers // common.CHUNK_SIZE) + 1  # what the headers add, and where a chunk's end falls
    assert one[0] <= many[0] <= one[0] + chunks and one[1] <= many[1] <= one[1] + chunks, (one, many)


def test_a_file_is_put_in_place_under_a_free_name_with_or_without_hard_links(tmp_path, monkeypatch):
    """A received file takes only a name nothing has, not even a dangling link's; where the file system has no hard
    links (the fast way, which ext4 does not write out at once), an empty file claims the name and is replaced."""
    (tmp_path / "x").symlink_to(tmp_path / "nowhere")
    (tmp_path / "x (1).txt").write_bytes(b"theirs")

    def save(data):
        incoming = common.Incoming(str(tmp_path))
        incoming.write(data)
        return os.path.basename(incoming.save(hashlib.sha256(data).digest(), "x"))

    assert save(b"one") == "x (1)"
    common._TAKEN.clear()

    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert save(b"two") == "x (2)"
    assert (tmp_path / "x (1)").read_bytes() == b"one" and (tmp_path / "x (2)").read_bytes() == b"two"
    assert (tmp_path / "x (1).txt").read_bytes() == b"theirs" and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x (1)", "x (1).txt", "x (2)"]  # no temporary left


def test_a_name_sent_again_and_again_costs_one_try_each_time(tmp_path):
    """Outside round two: each save of another file called x tried x, x (1), x (2)... from the start: 3,000 offers
    of one name took 42 s of the server's CPU, and past 10,000 each offer cost 10,000 system calls."""
    tries = []

    def make(path):
        tries.append(path)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))

    for _ in range(300):
        common.claim(str(tmp_path), "x", make)
    assert len(tries) == 300 and len(list(tmp_path.iterdir())) == 300
    # Once, a name the user had since moved away still came numbered: "small (1).bin" beside no small.bin.
    (tmp_path / "x").unlink()
    assert common.claim(str(tmp_path), "x", make) == (str(tmp_path / "x"), 0)
    assert common.claim(str(tmp_path), "x", make) == (str(tmp_path / "x (300)"), 300) and len(tries) == 302


def test_a_folder_given_up_with_nothing_in_it_frees_its_name_and_costs_one_try_again(tmp_path, monkeypatch):
    """Outside round two on this work: a folder given up (nothing saved in it) left its name taken in memory, so the
    next folder of that name came as "NAME (1)" beside no NAME. A peer that offers and gives up one name again and
    again still costs a try each time."""
    (tmp_path / "f").mkdir()  # the user's own
    tries = []
    real_mkdir = os.mkdir

    def counted(path, mode=0o777):
        tries.append(path)
        real_mkdir(path, mode)

    stream = stream_of([(b"f", "a", b"content")])
    for _ in range(3):
        common.FolderWriter(str(tmp_path), "f", len(stream), 1).discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    writer = common.FolderWriter(str(tmp_path), "f", len(stream), 1)
    writer.write(stream)
    assert writer.finish(hashlib.sha256(stream[: common.ENTRY.size + 1]).hexdigest()) == str(tmp_path / "f (1)")
    assert (tmp_path / "f (1)" / "a").read_bytes() == b"content"
    monkeypatch.setattr(os, "mkdir", counted)
    for _ in range(50):
        common.FolderWriter(str(tmp_path), "f", len(stream), 1).discard()
    assert len(tries) == 50 and all(path.endswith("f (2)") for path in tries)


def test_a_folder_given_up_half_way_says_what_of_it_stays(tmp_path):
    """Once, a folder whose sender left half way stayed, a third of it, with nothing to tell it from one that had
    arrived whole."""
    stream = stream_of([(b"f", "a", b"first"), (b"f", "b", b"second")])
    writer = common.FolderWriter(str(tmp_path), "photos", len(stream), 2)
    writer.write(stream[:-3])
    assert writer.discard() == f"an unfinished folder stays: 1 of its 2 files arrived whole, in {tmp_path}/photos"
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a"]
    assert (tmp_path / "photos").stat().st_mode & 0o777 == 0o777 & ~common.UMASK  # no longer private: it stays
    assert common.FolderWriter(str(tmp_path), "empty", len(stream), 2).discard() is None


def peak_bytes(work):
    """The most memory Python allocated while work() ran (tracemalloc), or None where it cannot be told (PyPy)."""
    try:
        import tracemalloc
    except ImportError:
        work()
        return None
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_stream_of_deep_folders_and_bad_files_holds_little_memory(tmp_path):
    """The outside round: 1,000 empty folders 64 deep (3.9 KB of names each) took a receiver from 44 to 192 MiB, and
    2,500 damaged files with 4 KB names to 84 MiB: the writer held every folder's whole path and every problem.
    (Measured where tracemalloc exists: not on PyPy, where what is held is still checked.)"""
    deep = ["/".join(f"{i:04}-" + "d" * 55 for _ in range(64)) for i in range(300)]
    stream = stream_of([(b"d", path, b"") for path in deep])

    def bomb():
        writer = common.FolderWriter(str(tmp_path), "bomb", len(stream), 0)
        with pytest.raises(common.RemoteProtocolError, match="more than 10,000 folders"):
            writer.write(stream)
        writer.discard()  # once, it made the paths of all 10,000 folders at once: 24 MiB, four at a time

    folders_peak = peak_bytes(bomb)
    assert folders_peak is None or folders_peak < 8 * 2**20, folders_peak
    assert list(tmp_path.iterdir()) == []

    bad = [(b"f", "\x01" * 1000 + f"{i}", b"x") for i in range(300)]
    stream = b"".join(common.folder_header(k, 0o644, 1, bytes(32), p) + c for k, p, c in bad)
    writer = common.FolderWriter(str(tmp_path), "bad", len(stream), len(bad))
    problems_peak = peak_bytes(lambda: writer.write(stream))
    assert (len(writer.problems), writer.unsaved) == (5, 300)
    assert problems_peak is None or problems_peak < 2 * 2**20


def test_a_server_that_goes_on_tells_of_what_was_not_delivered_without_calling_it_an_error(spawn, folders):
    """Once, a server whose peer left with a file of its undelivered said "error: the peer left the chat; 1 file not
    delivered", and went on waiting for the next client: nothing had gone wrong with it."""
    _, outbox = folders
    source = make_file(outbox, "unwanted.bin", 5000)
    server, port = spawn("server", "--send", source)
    client = spawn("client", port)  # in a pipe with no --receive-dir: it declines
    client.close_stdin()
    assert client.wait() == 0
    line = server.expect(r"the peer left the chat; 1 file (declined by the peer|not delivered): unwanted\.bin").string
    assert line.startswith("the peer left the chat")  # a notice, not "aeschat-server: error: ..."
    server.expect("waiting for the next client")


def test_a_folders_stream_stops_when_its_folders_leave_the_disk_no_room(tmp_path, monkeypatch):
    """The outside round: five folders, 136 kB of stream, left 195 MiB and 49,926 folders on the disk: the free space
    is checked against the stream's size, which counts nothing for a folder."""
    import collections
    import shutil

    stream = stream_of([(b"d", f"f{i}", b"") for i in range(100)])
    writer = common.FolderWriter(str(tmp_path), "many", len(stream), 0)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB left
    with pytest.raises(OSError, match="not enough free space"):
        writer.write(stream)
    assert len(list((tmp_path / "many").iterdir())) == 63
