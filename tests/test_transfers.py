"""Transfers, the machine of files both ways, driven directly: inputs in, the exact actions its Outbox records out.

Its two tables are tested whole: every state is reachable through the machine's own inputs, and every (state, input)
pair either moves as its cell says, does nothing, or is the peer's violation; no pair is left to chance.
"""

import pytest

import common
from common import (
    Accept,
    Cancel,
    Chunk,
    ChunkOf,
    DiscardFile,
    Done,
    FileAck,
    FileFailed,
    FileOpened,
    FileReady,
    FileSaved,
    In,
    Offer,
    OpenFile,
    Out,
    Outbox,
    PrepareFile,
    Refuse,
    ReleaseFile,
    RemoteProtocolError,
    SaveFile,
    Send,
    Show,
    Transfers,
)

SHA = "ab" * 32
LINK = "link1"


def machine(live=True, **kwargs):
    out = Outbox()
    out.link, out.live = LINK, live
    return Transfers(out, chunk_size=16384, **kwargs)  # CPython's: the same figures on every runtime


def take(transfers):
    return transfers.out.take()


def sends(actions):
    return [a.event for a in actions if isinstance(a, Send)]


def shown(actions):
    return [line for a in actions if isinstance(a, Show) for line in a.lines]


# ---------------------------------------------------------------------------------------------------
# The tables, whole


def test_every_cell_of_both_tables_is_filled_and_names_a_state_a_rule_or_nothing():
    for table, states in ((Transfers.OUTGOING, Out), (Transfers.INCOMING, In)):
        assert set(table.rows) == set(states)
        for state in states:
            for name in table.inputs:
                cell = table.cells[state, name]
                if isinstance(cell, str) and cell not in (common.STAY, common.VIOLATION):
                    side = common.Sending if table is Transfers.OUTGOING else common.Receiving
                    assert callable(getattr(side, f"_{cell}")), f"no rule _{cell}"


def reachable(table, start):
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for name in table.inputs:
            cell = table.cells[state, name]
            if isinstance(cell, type(start)) and cell not in seen:
                seen.add(cell)
                todo.append(cell)
    return seen


def test_every_state_is_reachable_in_the_tables():
    assert reachable(Transfers.OUTGOING, Out.PREPARING) == set(Out)
    assert reachable(Transfers.INCOMING, In.ASKED) == set(In)


# How each input reaches a file in each state when a table is driven directly: the arguments its rule takes.
OUT_ARGS = {"ready": (FileReady(0, "f.bin", 2, SHA),), "unreadable": ("it is gone",), "offer": (), "accept": (0,),
            "fack": (0,), "done": (), "refuse": ("declined",), "stop": (), "again": (), "abandon": ("the chat ended",)}
IN_ARGS = {"offer": (), "accept": (), "decline": ("declined",), "open": (), "opened": (),
           "chunk": (Chunk(0, 0, b"x"),), "whole": (), "saved": ("/in/f.bin", (), None),
           "failed": ("unwritable", "disk full"), "cancel": ("left",), "stop": (), "abandon": ("the chat ended",)}


@pytest.mark.parametrize("state", list(Out))
@pytest.mark.parametrize("name", Transfers.OUTGOING.inputs)
def test_every_pair_of_our_files_moves_as_its_cell_says(state, name):
    check_cell(Transfers.OUTGOING, True, state, name, OUT_ARGS[name])


@pytest.mark.parametrize("state", list(In))
@pytest.mark.parametrize("name", Transfers.INCOMING.inputs)
def test_every_pair_of_the_peers_files_moves_as_its_cell_says(state, name):
    check_cell(Transfers.INCOMING, False, state, name, IN_ARGS[name])


def check_cell(table, outgoing, state, name, args):
    transfers = machine()
    t = common._Transfer(0, outgoing, state, "f.bin", 2, SHA)
    (transfers.outgoing if outgoing else transfers.incoming)[0] = t
    side = transfers.sending if outgoing else transfers.receiving
    cell = table.cells[state, name]
    if cell == common.VIOLATION:
        with pytest.raises(RemoteProtocolError):
            table.move(side, t, name, *args)
        return
    moved = table.move(side, t, name, *args)
    actions = take(transfers)
    if cell == common.STAY:
        assert not moved and actions == [] and t.state is state
    elif isinstance(cell, str):
        assert moved and t.state is state  # a rule that runs in place
    else:
        assert moved and t.state is cell
    if t.state in common.FINAL and state not in common.FINAL:  # what ends a file lets go of what it holds, once
        held = (Out.READY, Out.OFFERED, Out.SENDING) if outgoing else tuple(common.HOLDING)
        lets_go = [a for a in actions if isinstance(a, (ReleaseFile, DiscardFile))]
        assert len(lets_go) == (state in held and t.state is not In.DONE), (state, name, actions)  # saved: kept


# ---------------------------------------------------------------------------------------------------
# Every state reached through the machine's own inputs, as the session feeds them


def sent_to(state):
    """A Transfers with our file 0 (100,000 bytes) in `state`, reached by the session's inputs."""
    transfers = machine()
    transfers.send("/tmp/report.pdf")
    steps = {Out.READY: [], Out.OFFERED: [], Out.SENDING: [Accept(0, 0)], Out.DONE: [Accept(0, 0)],
             Out.REFUSED: [Refuse(0, "declined")], Out.CANCELLED: []}
    if state is Out.CANCELLED:
        transfers.failed(FileFailed(0, True, "unreadable", "gone"))
    elif state is not Out.PREPARING:
        transfers.out.live = state is not Out.READY
        transfers.ready(FileReady(0, "report.pdf", 100_000, SHA))
        for record in steps[state]:
            transfers.record(record, 1.0)
        if state is Out.DONE:
            for offset in range(0, 100_000, 16384):
                transfers.record(FileAck(0, min(offset + 16384, 100_000)), 1.0)
            transfers.record(Done(0), 1.0)
    take(transfers)
    return transfers


def received_to(state):
    """A Transfers with the peer's file 0 (20,000 bytes) in `state`, reached by the session's inputs."""
    transfers = machine(interactive=True)
    for file in range(common.MAX_OPEN_FILES if state is In.WAITING else 0):  # files that take every slot
        transfers.record(Offer(10 + file, "other", 20_000, SHA), 1.0)
        transfers.answer(True)
    transfers.record(Offer(0, "x.bin", 20_000, SHA), 1.0)
    if state is In.REFUSED:
        transfers.answer(False)
    elif state is In.CANCELLED:
        transfers.record(Cancel(0, "cancelled"), 1.0)
    elif state is not In.ASKED:
        transfers.answer(True)
    if state in (In.RECEIVING, In.VERIFYING, In.DONE):
        transfers.opened(FileOpened(0))
    if state in (In.VERIFYING, In.DONE):
        transfers.record(Chunk(0, 0, bytes(16384)), 1.0)
        transfers.record(Chunk(0, 16384, bytes(3616)), 1.0)
    if state is In.DONE:
        transfers.saved(FileSaved(0, "/in/x.bin"))
    take(transfers)
    return transfers


@pytest.mark.parametrize("state", list(Out))
def test_every_state_of_our_files_is_reached_by_the_machines_inputs(state):
    assert sent_to(state).outgoing[0].state is state


@pytest.mark.parametrize("state", list(In))
def test_every_state_of_the_peers_files_is_reached_by_the_machines_inputs(state):
    assert received_to(state).incoming[0].state is state


# ---------------------------------------------------------------------------------------------------
# Exact outputs


def test_a_file_goes_out_offered_accepted_in_a_window_of_chunks_and_delivered():
    transfers = machine()
    transfers.send("/tmp/report.pdf")
    assert take(transfers) == [PrepareFile(0, "/tmp/report.pdf")]
    transfers.ready(FileReady(0, "report.pdf", 40_000, SHA))
    actions = take(transfers)
    assert sends(actions) == [Offer(0, "report.pdf", 40_000, SHA)]
    assert shown(actions) == ["offering file report.pdf (39.1 KiB)"]
    transfers.record(Accept(0, 0), 1.0)
    assert sends(take(transfers)) == [ChunkOf(0, 0, 16384), ChunkOf(0, 16384, 16384), ChunkOf(0, 32768, 7232)]
    transfers.record(FileAck(0, 40_000), 1.0)
    assert take(transfers) == [common.Progress("file report.pdf (39.1 KiB)", True, 100, 40_000, 40_000, None)]
    transfers.record(Done(0), 2.0)
    assert take(transfers) == [ReleaseFile(0), Show(["delivered file report.pdf"], "event")]


def test_a_file_received_is_written_acknowledged_checked_and_saved():
    transfers = machine(receive_files=True)
    transfers.record(Offer(0, "../x.bin", 20_000, SHA), 1.0)
    assert take(transfers) == [OpenFile(0, "x.bin", 20_000)]
    transfers.opened(FileOpened(0))
    actions = take(transfers)
    assert sends(actions) == [Accept(0, 0)] and shown(actions) == ["receiving file x.bin (19.5 KiB)"]
    transfers.record(Chunk(0, 0, bytes(16384)), 1.0)
    assert take(transfers) == [common.WriteFile(0, bytes(16384)),
                               common.Progress("file x.bin (19.5 KiB)", False, 81, 16384, 20_000, None),
                               Send(LINK, FileAck(0, 16384))]
    transfers.record(Chunk(0, 16384, bytes(3616)), 1.0)
    assert take(transfers)[-1] == SaveFile(0, SHA, "x.bin")
    transfers.saved(FileSaved(0, "/in/x.bin"))
    actions = take(transfers)
    assert sends(actions) == [Done(0)] and shown(actions)[0].startswith("received file x.bin (20,000 bytes")


def test_a_folder_received_is_shown_with_what_arrived_not_what_its_offer_claimed_and_problems_in_brief():
    transfers = machine(receive_files=True)
    transfers.record(common.FolderOffer(0, "huge", 2**63 - 1, 2**62, 200, SHA), 1.0)
    take(transfers)
    transfers.opened(FileOpened(0))
    transfers.record(Chunk(0, 0, bytes(200)), 1.0)
    take(transfers)
    problems = [f"f{i}: it changed or was damaged on the way" for i in range(8)]
    transfers.saved(FileSaved(0, "/in/huge", problems, (1, 100)))
    lines = shown(take(transfers))
    assert lines[0] == "received folder huge (1 file, 100 bytes) → /in/huge"
    assert lines[1:] == [f"not saved from folder huge: {p}" for p in problems[:5]] + [
        "not saved from folder huge: 3 more files"]


def test_leaving_with_a_file_mid_send_releases_it_once_and_says_nothing_more_at_the_end():
    """The defect of the last round: a stopped file counted as still on its way, so the end released it a second
    time and said "abandoned: the chat ended" right before "1 file not delivered"."""
    transfers = sent_to(Out.SENDING)
    transfers.stop_all()
    assert take(transfers) == [ReleaseFile(0), Send(LINK, Cancel(0, "left"))]
    transfers.abandon("the chat ended")
    assert take(transfers) == []
    assert transfers.left_behind(0, "you left the chat") == (1, "you left the chat; 1 file not delivered: report.pdf")


def test_a_file_the_peer_declined_is_released_once_and_listed_as_not_delivered():
    transfers = sent_to(Out.OFFERED)
    transfers.record(Refuse(0, "declined"), 1.0)
    assert take(transfers) == [ReleaseFile(0), Show(["file report.pdf not delivered: the peer declined it"],
                                                    "notice")]
    transfers.stop_all()
    transfers.abandon("the chat ended")
    assert take(transfers) == []


@pytest.mark.parametrize("record", [Accept(0, 0), FileAck(0, 0), Done(0), Refuse(0, "declined")])
def test_an_answer_to_a_file_never_offered_is_the_peers_violation(record):
    for state in (Out.PREPARING, Out.READY):
        with pytest.raises(RemoteProtocolError):
            sent_to(state).record(record, 1.0)


def test_a_late_temporary_file_is_discarded():
    transfers = received_to(In.OPENING)
    transfers.stop_incoming()
    assert take(transfers) == [DiscardFile(0), Send(LINK, Refuse(0, "cancelled"))]
    transfers.opened(FileOpened(0))  # the shell finished making it after we stopped
    assert take(transfers) == [DiscardFile(0)]


def test_a_chunk_out_of_place_is_a_violation_and_one_for_a_refused_file_is_ignored():
    with pytest.raises(RemoteProtocolError):
        received_to(In.RECEIVING).record(Chunk(0, 5, b"x"), 1.0)
    with pytest.raises(RemoteProtocolError):
        received_to(In.RECEIVING).record(Chunk(0, 0, bytes(20_001)), 1.0)
    transfers = received_to(In.REFUSED)
    transfers.record(Chunk(0, 0, b"x"), 1.0)
    assert take(transfers) == []


def test_offered_again_each_state_says_where_it_stands():
    answers = {In.RECEIVING: [Accept(0, 0)], In.DONE: [Done(0)], In.REFUSED: [Refuse(0, "declined")],
               In.CANCELLED: [Refuse(0, "cancelled")], In.ASKED: [], In.OPENING: []}
    for state, answer in answers.items():
        transfers = received_to(state)
        transfers.record(Offer(0, "x.bin", 20_000, SHA), 1.0)
        assert sends(take(transfers)) == answer, state


def test_a_file_not_yet_offered_is_offered_only_once_the_chat_is_live():
    transfers = sent_to(Out.READY)
    transfers.sending.offer_ready()
    assert take(transfers) == []
    transfers.out.live = True
    transfers.sending.offer_ready()
    assert sends(take(transfers)) == [Offer(0, "report.pdf", 100_000, SHA)]


def test_after_a_reconnection_a_file_on_its_way_is_offered_again_from_what_the_receiver_has():
    transfers = sent_to(Out.SENDING)
    transfers.record(FileAck(0, 16384), 1.0)
    take(transfers)
    transfers.resumed(None)
    assert sends(take(transfers)) == [Offer(0, "report.pdf", 100_000, SHA)]  # told once: no second "offering"
    transfers.record(Accept(0, 32768), 2.0)
    assert sends(take(transfers))[0] == ChunkOf(0, 32768, 16384)


def test_an_accept_repeated_while_sending_makes_us_send_nothing_again():
    """The outside round: 300 accepts of file 0 from offset 0 made the sender seal 900 chunks, 570 times what it
    received, and a message typed next waited 23 s behind them."""
    transfers = sent_to(Out.SENDING)
    for _ in range(300):
        transfers.record(Accept(0, 0), 2.0)
    assert take(transfers) == []
    transfers.record(FileAck(0, 16384), 2.0)
    assert sends(take(transfers)) == [ChunkOf(0, 65536, 16384)]  # only what the window lets go next


def test_an_accept_from_before_what_the_peer_acknowledged_is_its_violation():
    """The outside round: a receiver that acknowledged all but the last chunk, resumed and accepted from 0 again,
    round after round, had a 1 MiB file sent 14 times in 30 s, for as long as it liked."""
    transfers = sent_to(Out.SENDING)
    transfers.record(FileAck(0, 16384), 2.0)
    take(transfers)
    transfers.resumed(None)  # a reconnection: offered again
    take(transfers)
    transfers.record(Accept(0, 16384), 2.0)  # from what it has: fine
    assert sends(take(transfers))[0] == ChunkOf(0, 16384, 16384)
    with pytest.raises(RemoteProtocolError, match="from before what the peer acknowledged"):
        transfers.record(Accept(0, 0), 2.0)


def test_an_offer_made_again_is_answered_once_on_each_link():
    transfers = received_to(In.RECEIVING)
    for _ in range(100):
        transfers.record(Offer(0, "x.bin", 20_000, SHA), 1.0)
    assert sends(take(transfers)) == [Accept(0, 0)]
    transfers.resumed(None)  # a new link: the sender offers again, and is answered again, once
    transfers.record(Offer(0, "x.bin", 20_000, SHA), 1.0)
    transfers.record(Offer(0, "x.bin", 20_000, SHA), 1.0)
    assert sends(take(transfers)) == [Accept(0, 0)]


@pytest.mark.parametrize("strict", [False, True])
def test_a_folder_delivered_without_what_could_not_be_read_says_so_and_fails_only_a_script(strict):
    """Once, a folder whose files could not all be read was "delivered", exit 0: the README promises a script exit 1
    unless every file was saved. And its progress counted the stream's headers: "100%, 354 bytes" of 32."""
    transfers = machine(interactive=not strict)
    transfers.send("/tmp/proj")
    take(transfers)
    notes = ["cannot read secret.txt: permission denied", "skipped, being links or not files (never followed): fifo"]
    transfers.ready(FileReady(0, "proj", 354, SHA, (1, 32), 0, notes))
    assert [(list(a.lines), a.kind) for a in take(transfers) if isinstance(a, Show)][:2] == [
        (["folder proj: cannot read secret.txt: permission denied"], "error"),
        (["folder proj: skipped, being links or not files (never followed): fifo"], "notice")]
    transfers.record(Accept(0, 0), 1.0)
    take(transfers)
    transfers.record(FileAck(0, 354), 1.0)
    assert take(transfers) == [common.Progress("folder proj (1 file, 32 bytes)", True, 100, 32, 32, None)]
    transfers.record(Done(0), 1.0)
    assert shown(take(transfers)) == ["delivered folder proj, without 1 file that could not be read"]
    assert transfers.left_behind(0, "you left the chat") == (
        int(strict), "you left the chat; 1 folder delivered without the files that could not be read: proj")


def test_a_file_we_leave_while_it_arrives_is_listed_at_the_end_and_one_never_answered_is_not():
    """Once, leaving half way through a download said only "you left the chat"."""
    transfers = received_to(In.RECEIVING)
    transfers.record(Offer(1, "unanswered.txt", 10, SHA), 1.0)
    take(transfers)
    transfers.stop_incoming()
    assert sends(take(transfers)) == [Refuse(0, "cancelled"), Refuse(1, "cancelled")]
    assert transfers.left_behind(0, "you left the chat") == (0, "you left the chat; 1 file left unfinished: x.bin")


def test_files_are_offered_in_the_order_they_were_asked_for_whichever_is_hashed_first():
    """Once, `--send big --send small` offered small first: it was hashed first."""
    transfers = machine()
    transfers.send("/tmp/big.iso")
    transfers.send("/tmp/small.txt")
    take(transfers)
    transfers.ready(FileReady(1, "small.txt", 10, SHA))
    assert sends(take(transfers)) == []
    transfers.ready(FileReady(0, "big.iso", 100_000, SHA))
    assert sends(take(transfers)) == [Offer(0, "big.iso", 100_000, SHA), Offer(1, "small.txt", 10, SHA)]
