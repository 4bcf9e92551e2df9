"""The session machine and the server's Gate, tested directly: inputs in, actions out, a clock moved by hand.

In the manner of magic-wormhole's test_machines: each test builds a machine, feeds it inputs state by state, and
checks the exact actions. No sockets, threads or sleeps.
"""

import datetime
import time
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import common
from common import (
    CLIENT,
    EXIT_INTERNAL,
    EXIT_NETWORK,
    EXIT_OK,
    EXIT_SECURITY,
    LEGACY,
    LEGACY_PACE,
    PASSPHRASE,
    RESUME,
    SERVER,
    V2,
    Ack,
    Alert,
    Attached,
    Close,
    ConnectionClosed,
    Conversation,
    Dial,
    DialFailed,
    Drained,
    End,
    Failed,
    Goodbye,
    Got,
    Interrupt,
    Leave,
    Live,
    Message,
    Ping,
    Resume,
    Send,
    Session,
    Show,
    Tick,
    Typed,
)

TS = "2026-11-27T12:34:56+00:00"
CONV = "ab" * 16


class Run:
    """A Session and a clock moved by hand; each call steps it and returns the actions."""

    def __init__(self, role=CLIENT, fmt=V2, conv=CONV, **kwargs):
        self.now = 1000.0
        kwargs.setdefault("chunk_size", 16384)  # CPython's: the same figures on every runtime
        self.session = Session(role, fmt, Conversation(conv), self.now, **kwargs)
        self.links = 0

    def __call__(self, event, after=0.0):
        self.now += after
        return self.session.step(event, self.now)

    def link(self):
        self.links += 1
        return f"link{self.links}"

    def live(self, peer_conv=CONV, resumed=True):
        """Attach a link and finish the Resume exchange; returns the link."""
        link = self.link()
        self(Attached(link, "192.0.2.7:5555", PASSPHRASE))
        if self.session.role is CLIENT:
            self(Got(link, Resume(peer_conv, 0, 0, resumed)))
        else:
            self(Got(link, Resume(peer_conv, 0, 0, False)))
        assert self.session.phase == common.Phase.LIVE
        return link


def sends(actions):
    return [a.event for a in actions if isinstance(a, Send)]


def shown(actions, kind=None):
    return [line for a in actions if isinstance(a, Show) and (kind is None or a.kind == kind) for line in a.lines]


def ended(actions):
    ends = [a for a in actions if isinstance(a, End)]
    return (ends[0].code, ends[0].text) if ends else None


# ---------------------------------------------------------------------------------------------------
# Starting: nothing is announced, and nothing shown as sent, until the peer has accepted us into the chat


def test_a_client_sends_its_resume_first_and_announces_only_the_servers_answer():
    run = Run()
    link = run.link()
    actions = run(Attached(link, "192.0.2.7:5555", PASSPHRASE))
    assert actions == [Send(link, Resume(CONV, 0, 0, False))]
    actions = run(Got(link, Resume(CONV, 0, 0, True)))
    assert actions[0] == Live()
    assert "Connected to 192.0.2.7:5555: authenticated and encrypted" in shown(actions, "notice")[0]


def test_a_server_waits_for_the_clients_resume_and_answers_it():
    run = Run(SERVER)
    link = run.link()
    assert run(Attached(link, "192.0.2.9:4000", PASSPHRASE)) == []
    actions = run(Got(link, Resume(CONV, 0, 0, False)))
    assert sends(actions) == [Resume(CONV, 0, 0, True)]
    assert Live() in actions and shown(actions, "notice")[0].startswith("Connected to 192.0.2.9:4000")


def test_the_banner_comes_before_any_message_that_arrived_with_the_connection():
    run = Run(SERVER)
    link = run.link()
    run(Attached(link, "192.0.2.9:4000", PASSPHRASE))
    actions = run(Got(link, Resume(CONV, 0, 0, False))) + run(Got(link, Message(0, "first!", TS)))
    lines = shown(actions)
    assert lines[0].startswith("Connected to") and lines[-1].startswith("Received: first!")


def test_busy_before_the_resume_ends_the_client_without_announcing_anything():
    run = Run(interactive=True)
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", PASSPHRASE))
    actions = run(Got(link, common.Busy()))
    assert ended(actions) == (EXIT_NETWORK, "the server is busy with another chat")
    assert not any("Connected" in line or "Sent" in line for line in shown(actions))


def test_a_script_turned_away_as_busy_waits_its_turn():
    """A sink serves one-shot clients one after another; those that come together were all turned away but one."""
    run = Run()
    run(Typed("build done", TS))
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", PASSPHRASE))
    actions = run(Got(link, common.Busy()))
    assert ended(actions) is None and shown(actions, "notice") == [
        "the server is busy with another chat; trying again for up to 300 s"]
    assert Dial(PASSPHRASE) in run(Tick(), after=common.FIRST_RETRY)
    assert ended(run(common.DialFailed(common.Refused("busy", "the server is busy with another chat")))) is None
    assert Dial(PASSPHRASE) in run(Tick(), after=2 * common.FIRST_RETRY)  # backing off
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", PASSPHRASE))
    actions = run(Got(link, Resume(CONV, 0, 0, False)))
    assert Message(0, "build done", TS) in sends(actions) and "Connected to" in shown(actions, "notice")[0]


def test_a_script_waiting_its_turn_gives_a_man_in_the_middle_one_passphrase_attempt_not_two():
    """The outside round: a man in the middle held a script's confirmation until another client came, so the server
    turned it away as busy; it dialled again with the passphrase by itself, to him, twice: two offline guesses."""
    run = Run()
    run(Typed("build done", TS))
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", PASSPHRASE))
    run(Got(link, common.Busy()))
    assert Dial(PASSPHRASE) in run(Tick(), after=common.FIRST_RETRY)
    code, text = ended(run(common.DialFailed(common.UnfinishedAuthentication("the server closed the connection "
                                                                           "after our key confirmation"))))
    assert code == EXIT_SECURITY and "a connection with the passphrase failed to authenticate" in text
    assert not any(isinstance(a, Dial) for a in run(Tick(), after=60))


def test_a_message_before_the_resume_is_a_security_failure_with_an_alert():
    run = Run(SERVER)
    link = run.link()
    run(Attached(link, "192.0.2.9:4000", PASSPHRASE))
    actions = run(Got(link, Message(0, "too early", TS)))
    assert sends(actions) == [Alert("protocol")]
    assert ended(actions)[0] == EXIT_SECURITY and Close(link, True) in actions


@pytest.mark.parametrize("interactive", [False, True])
def test_the_banner_fits_80_columns_and_tells_the_glyphs(interactive):
    def text(fmt, kinds=("notice", "keys")):
        return " ".join(line for kind, line in common.banner("x", fmt, interactive) if kind in kinds)

    for fmt in (V2, LEGACY):
        lines = common.banner("255.255.255.255:65535", fmt, interactive)
        assert all(sum(common.cells(ch) for ch in line) <= 80 for _, line in lines)
    assert "☑ = verified" in text(LEGACY) and "☒ = verified" in text(LEGACY)  # both conventions, so screens compare
    assert ("quit()" in text(V2)) == interactive  # help only on a terminal
    assert ("Alt-Enter" in text(V2, ["keys"])) == interactive and "Alt-Enter" not in text(V2, ["notice"])


# ---------------------------------------------------------------------------------------------------
# Live: messages


def test_typed_lines_are_sent_and_shown_as_sent():
    run = Run()
    run.live()
    actions = run(Typed("hello", TS))
    assert sends(actions) == [Message(0, "hello", TS)]
    assert shown(actions) == ["Sent: hello  " + common.local_time(TS)]


def test_received_messages_are_shown_once_and_acknowledged_cumulatively_when_drained():
    run = Run()
    link = run.live()
    shown_lines = []
    for i in range(3):
        actions = run(Got(link, Message(i, f"m{i}", TS)))
        assert sends(actions) == []  # not one acknowledgement per message
        shown_lines += shown(actions)
    assert [line.split("  ")[0] for line in shown_lines] == ["Received: m0", "Received: m1", "Received: m2"]
    assert sends(run(Drained(link))) == [Ack(2)]
    assert sends(run(Drained(link))) == []  # nothing new
    again = run(Got(link, Message(1, "m1", TS)))  # sent again after a resume: acknowledged, not shown
    assert shown(again) == [] and sends(run(Drained(link))) == [Ack(2)]


def test_a_message_shown_late_says_when_it_arrived_and_a_log_says_who_sent_it(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    sent_at = datetime.datetime.fromisoformat(TS).timestamp()
    run = Run()
    link = run.live()
    assert "(arrived " not in shown(run(Got(link, Message(0, "prompt", TS), sent_at + 1)))[0]
    assert shown(run(Got(link, Message(1, "late", TS), sent_at + 3000)))[0].endswith("12:34:56 (arrived 13:24:56)")
    log = Run(SERVER, log=True)
    link = log.live()
    line = shown(log(Got(link, Message(0, "build done", TS), sent_at)))[0]
    assert line == "Received: build done  ☒  2026-11-27 12:34:56  from 192.0.2.7:5555"
    monkeypatch.delenv("TZ")
    time.tzset()


def test_a_lone_message_is_acknowledged_at_once():
    run = Run()
    link = run.live()
    run(Got(link, Message(0, "alone", TS)))
    assert sends(run(Drained(link))) == [Ack(0)]


def test_a_gap_in_message_ids_is_a_security_failure():
    run = Run()
    link = run.live()
    actions = run(Got(link, Message(1, "skipped one", TS)))
    assert sends(actions) == [Alert("protocol")] and ended(actions)[0] == EXIT_SECURITY


def test_an_ack_for_a_message_never_sent_is_a_security_failure():
    run = Run()
    link = run.live()
    assert ended(run(Got(link, Ack(5))))[0] == EXIT_SECURITY


def test_a_resume_in_the_middle_of_a_chat_is_a_security_failure():
    run = Run()
    link = run.live()
    assert ended(run(Got(link, Resume(CONV, 0, 0, True))))[0] == EXIT_SECURITY


def test_a_multi_line_message_is_one_block():
    run = Run()
    link = run.live()
    actions = run(Got(link, Message(0, "one\ntwo\nthree", TS)))
    [block] = [a for a in actions if isinstance(a, Show)]
    assert block.lines[0].startswith("Received: one  ☒") and block.lines[1:] == ("two", "three")


def test_a_message_too_large_is_refused_before_anything_is_sent():
    run = Run()
    run.live()
    actions = run(Typed("x" * (common.MAX_MESSAGE + 1), TS))
    assert sends(actions) == [] and "not sent" in shown(actions, "error")[0]


def test_the_worst_honest_message_fits_a_record():
    """44,000 control characters once made a record over MAX_FRAME: the receiver ended the chat."""
    worst = Message(0, "\x01" * common.MAX_MESSAGE, TS)
    assert len(common.encode_payload(worst)) + common.TAG_SIZE + 4 <= common.MAX_FRAME


# ---------------------------------------------------------------------------------------------------
# Commands


def test_in_a_pipe_every_line_is_a_message_as_it_is():
    run = Run()
    run.live()
    assert sends(run(Typed("/var/log is full", TS))) == [Message(0, "/var/log is full", TS)]
    assert sends(run(Typed("//x", TS))) == [Message(1, "//x", TS)]


def test_a_line_that_cannot_be_sent_makes_the_end_a_failure():
    run = Run()
    run.live()
    run(Typed("x" * (common.MAX_MESSAGE + 1), TS))
    code, text = ended(run(Leave(10)))
    assert code == EXIT_NETWORK and text == "you left the chat; 1 line typed could not be sent"


def test_commands_are_not_sent_and_a_double_slash_sends_a_slash():
    run = Run(interactive=True)
    run.live()
    assert sends(run(Typed("/nonsense here", TS))) == []
    assert "unknown command /nonsense" in shown(run(Typed("/nonsense", TS)), "error")[0]
    assert any("/help" in line for line in shown(run(Typed("/help", TS))))
    assert sends(run(Typed("//etc/hosts is a path", TS))) == [Message(0, "/etc/hosts is a path", TS)]
    assert "/reconnect: not needed now" in shown(run(Typed("/reconnect", TS)), "notice")[0]


def test_a_text_of_several_lines_is_a_message_as_it_is_even_with_a_slash_in_front():
    """Once, a paste that began with a path was taken for an unknown command, thrown away, and the error repeated
    its whole first word (70 KB of it, on 934 rows)."""
    run = Run(interactive=True)
    run.live()
    assert sends(run(Typed("/var/log/syslog says:\nerror at line 3", TS))) == [
        Message(0, "/var/log/syslog says:\nerror at line 3", TS)]
    assert sends(run(Typed("// a comment\ncode()", TS))) == [Message(1, "// a comment\ncode()", TS)]
    [error] = shown(run(Typed("/" + "y" * 70_000, TS)), "error")
    assert len(error) < 120 and "unknown command /" + "y" * 40 + "…:" in error


# ---------------------------------------------------------------------------------------------------
# Losing the connection


def test_a_close_after_a_goodbye_is_the_peer_leaving_and_its_link_is_closed():
    run = Run()
    link = run.live()
    run(Got(link, Goodbye()))
    actions = run(Got(link, ConnectionClosed()))
    assert ended(actions) == (EXIT_OK, "the peer left the chat") and Close(link, True) in actions


def test_a_reset_after_a_goodbye_is_the_peer_leaving():
    run = Run()
    link = run.live()
    run(Got(link, Goodbye()))
    assert ended(run(Failed(link, ConnectionResetError(104, "Connection reset by peer")))) == (
        EXIT_OK, "the peer left the chat")


def test_a_close_without_a_goodbye_is_a_lost_connection_worded_as_the_network():
    run = Run()
    link = run.live()
    actions = run(Got(link, ConnectionClosed()))
    assert Close(link, False) in actions and Dial(RESUME) in actions
    assert shown(actions, "notice") == [
        "connection lost: the connection was closed without a goodbye; reconnecting (0 undelivered)"]


def test_a_reset_is_worded_as_the_network():
    run = Run()
    link = run.live()
    actions = run(Failed(link, ConnectionResetError(104, "Connection reset by peer")))
    assert shown(actions, "notice")[0].startswith("connection lost: connection reset;")


def test_without_a_grace_period_a_lost_connection_ends_the_chat_listing_what_was_not_delivered():
    run = Run(grace=0)
    link = run.live()
    run(Typed("are you there", TS))
    code, text = ended(run(Failed(link, common.NetworkError("reset"))))
    assert code == EXIT_NETWORK and text == ("connection lost: reset; 1 message sent but not acknowledged (it may "
                                             "not have arrived): “are you there”")


def test_a_bad_record_sends_an_alert_and_ends_with_a_security_failure():
    run = Run()
    link = run.live()
    actions = run(Failed(link, common.IntegrityError("a record failed its integrity check")))
    assert actions[:2] == [Send(link, Alert("integrity")), Close(link, True)]
    assert ended(actions) == (EXIT_SECURITY,
                              "security failure: a record failed its integrity check; the chat is closed")


def test_an_alert_from_the_peer_ends_the_chat_on_this_side_too():
    run = Run()
    link = run.live()
    code, text = ended(run(Got(link, Alert("integrity"))))
    assert code == EXIT_SECURITY and "a record it received failed its integrity check" in text


def test_an_unexpected_error_in_a_link_ends_the_chat_as_a_bug_in_one_line():
    run = Run()
    link = run.live()
    code, text = ended(run(Failed(link, ZeroDivisionError("oops"))))
    assert code == EXIT_INTERNAL and "internal error (ZeroDivisionError: oops)" in text


def test_events_from_a_replaced_link_are_ignored():
    run = Run()
    old = run.live()
    run(Got(old, ConnectionClosed()))
    new = run.link()
    run(Attached(new, "192.0.2.7:5555", RESUME))
    assert run(Got(old, Message(0, "stale", TS))) == []
    assert run(Failed(old, common.IntegrityError("stale"))) == []


# ---------------------------------------------------------------------------------------------------
# Keepalive and silence


def test_a_silent_peer_is_pinged_and_then_given_up():
    run = Run(keepalive=15)
    run.live()
    assert run.session.next_wakeup() == run.now + 15
    assert sends(run(Tick(), after=15)) == [Ping()]
    assert sends(run(Tick(), after=15)) == [Ping()]
    actions = run(Tick(), after=15)  # 45 s without a word from the peer
    assert shown(actions, "notice")[0].startswith("connection lost: no sign of the peer for 45 s")


def test_a_ping_is_answered_at_once_so_silence_is_judged_by_each_sides_own_clock():
    run = Run(keepalive=0.3)
    link = run.live()
    assert sends(run(Got(link, Ping()))) == [common.Pong()]
    run(Tick(), after=0.3)  # we ping; the peer (whatever its own keepalive) answers
    run(Got(link, common.Pong()), after=0.01)
    assert run.session.phase == common.Phase.LIVE and ended(run(Tick(), after=0.3)) is None


def test_anything_from_the_peer_counts_as_a_sign_of_life():
    run = Run(keepalive=15)
    link = run.live()
    run(Tick(), after=40)
    run(Got(link, Ping()))
    assert run.session.phase == common.Phase.LIVE
    assert "connection lost" not in " ".join(shown(run(Tick(), after=40)))


def test_a_legacy_chat_survives_an_hour_of_silence():
    run = Run(fmt=LEGACY)
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", None))
    for _ in range(60):
        assert run(Tick(), after=60) == []  # no pings, no silence limit: an original user may be quiet
    assert run.session.phase == common.Phase.LIVE
    assert run.session.next_wakeup() is None


# ---------------------------------------------------------------------------------------------------
# Reconnecting (client) and holding (server)


def away_client(**kwargs):
    run = Run(**kwargs)
    link = run.live()
    actions = run(Got(link, ConnectionClosed()))
    assert Dial(RESUME) in actions
    return run


def test_reconnection_backs_off_to_two_seconds_and_gives_up_after_the_grace_period():
    run = away_client(grace=10)
    delays = []
    for _ in range(6):
        run(DialFailed(common.NetworkError("refused")))
        delays.append(round(run.session.next_wakeup() - run.now, 3))
        assert Dial(RESUME) in run(Tick(), after=delays[-1])
    assert delays == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    run(DialFailed(common.NetworkError("refused")))
    code, text = ended(run(Tick(), after=10))
    assert code == EXIT_NETWORK and "could not reconnect within 10 s" in text


def test_a_reconnection_resumes_the_conversation_and_says_so():
    run = away_client()
    run(Typed("typed in the dark", TS))
    link = run.link()
    actions = run(Attached(link, "192.0.2.7:5555", RESUME))
    assert sends(actions) == [Resume(CONV, 0, 0, False)]
    actions = run(Got(link, Resume(CONV, 0, 0, True)))
    assert sends(actions) == [Message(0, "typed in the dark", TS)]
    assert shown(actions, "notice") == ["reconnected to 192.0.2.7:5555 (1 sent again)"]


def test_a_message_typed_while_disconnected_shows_as_queued_not_sent():
    run = away_client()
    actions = run(Typed("later", TS))
    assert sends(actions) == [] and shown(actions, "chat") == ["Queued: later  " + common.local_time(TS)]
    # The note is ours: on a row of its own, not one that begins with the mark of a message's rows (outside round 3).
    assert shown(actions, "event") == ["(to be sent when the connection is back)"]


def test_a_pipe_client_that_the_server_no_longer_knows_stops_without_offering_the_passphrase():
    run = away_client()
    run(Typed("pending", TS))
    actions = run(DialFailed(common.Refused("unknown", common.REFUSALS[common.UNKNOWN])))
    code, text = ended(actions)
    assert code == EXIT_NETWORK and "no longer knows this conversation" in text and "not offering" in text
    assert "“pending”" in text
    assert not any(isinstance(a, Dial) for a in actions)


def test_a_terminal_client_asks_before_offering_the_passphrase_once_per_request():
    run = away_client(interactive=True)
    actions = run(DialFailed(common.Refused("unknown", common.REFUSALS[common.UNKNOWN])))
    assert any("/reconnect" in line for line in shown(actions, "notice"))
    assert run.session.next_wakeup() is None or not any(isinstance(a, Dial) for a in run(Tick(), after=60))
    assert run(Typed("/reconnect", TS)) == [Dial(PASSPHRASE)]
    actions = run(DialFailed(common.NetworkError("refused")))  # that one attempt failed: ask again, never retry
    assert any("/reconnect tries again" in line for line in shown(actions))
    assert not any(isinstance(a, Dial) for a in run(Tick(), after=60))
    assert run(Typed("/reconnect", TS)) == [Dial(PASSPHRASE)]


def test_a_reconnect_asked_for_makes_one_passphrase_attempt_and_never_another_on_its_own():
    """The outside round: after /reconnect, a passphrase handshake that authenticated and was cut before the Resume
    made the client dial with the passphrase again 0.5 s later, by itself: one more guess for a man in the middle."""
    run = away_client(interactive=True)
    run(DialFailed(common.Refused("unknown", common.REFUSALS[common.UNKNOWN])))
    assert run(Typed("/reconnect", TS)) == [Dial(PASSPHRASE)]
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", PASSPHRASE))  # it authenticated: the handshake gave a new secret
    run(Got(link, ConnectionClosed()))  # cut before the Resume
    dials = [a for _ in range(20) for a in run(Tick(), after=1) if isinstance(a, Dial)]
    assert dials and all(dial == Dial(RESUME) for dial in dials)
    actions = run(DialFailed(common.Refused("unknown", common.REFUSALS[common.UNKNOWN])))
    assert any("/reconnect" in line for line in shown(actions, "notice"))  # the server forgot it: ask the user
    assert not any(isinstance(a, Dial) for a in run(Tick(), after=60))


def test_a_passphrase_the_server_refuses_after_reconnect_is_the_users_to_type_again_said_once():
    """Once, a server started again with a new code refused every /reconnect (the passphrase the client began with),
    each said twice, and two of them ended the chat as interference."""
    run = away_client(interactive=True)
    run(DialFailed(common.Refused("unknown", common.REFUSALS[common.UNKNOWN])))
    for _ in range(common.PASSPHRASE_TRIES - 1):
        assert run(Typed("/reconnect", TS)) == [Dial(PASSPHRASE)]
        actions = run(DialFailed(common.AuthenticationError(common.REFUSALS[common.DENIED])))
        assert ended(actions) is None and not shown(actions, "warning")
        assert [line for line in shown(actions) if "passphrases differ" in line] == [
            "the reconnection failed: the server says the passphrases differ (or someone interfered with the "
            "connection). /reconnect asks for the passphrase again."]
        assert not any(isinstance(a, Dial) for a in run(Tick(), after=60))
    # The third in a row stops it, as at the first prompt: a man in the middle who forges "unknown" and refuses
    # every passphrase got a guess from each /reconnect, for as long as the user went on.
    assert run(Typed("/reconnect", TS)) == [Dial(PASSPHRASE)]
    code, text = ended(run(DialFailed(common.AuthenticationError(common.REFUSALS[common.DENIED]))))
    assert code == EXIT_SECURITY and text.startswith("stopped: 3 passphrases in a row were refused")


def test_leaving_while_only_the_user_could_reconnect_waits_for_nothing():
    """Once, quit() while the client waited for /reconnect waited 10 s for acknowledgements that could not come."""
    run = away_client(interactive=True)
    run(Typed("pending msg", TS))
    run(DialFailed(common.Refused("unknown", common.REFUSALS[common.UNKNOWN])))
    code, text = ended(run(Leave(10)))
    assert code == EXIT_NETWORK and "1 message never sent" in text and "“pending msg”" in text


def test_a_reconnection_the_server_shed_under_a_flood_is_tried_again_as_if_lost():
    run = away_client()
    actions = run(DialFailed(common.Refused(common.SHED, "the server closed the connection before answering")))
    assert ended(actions) is None and Dial(RESUME) in run(Tick(), after=1)


def test_failed_authentication_while_reconnecting_is_told_and_twice_in_a_row_stops():
    run = away_client()
    unfinished = common.UnfinishedAuthentication("the server closed the connection after our key confirmation")
    actions = run(DialFailed(unfinished))
    assert "someone may be interfering" in shown(actions, "warning")[0]
    assert Dial(RESUME) in run(Tick(), after=1)
    code, text = ended(run(DialFailed(unfinished)))
    assert code == EXIT_SECURITY and "stopped reconnecting" in text


def test_a_successful_resumption_resets_the_count_of_failed_authentications():
    run = away_client()
    run(DialFailed(common.UnfinishedAuthentication("x")))
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", RESUME))
    run(Got(link, Resume(CONV, 0, 0, True)))
    run(Got(link, ConnectionClosed()))
    assert ended(run(DialFailed(common.UnfinishedAuthentication("x")))) is None


def test_a_server_holds_the_conversation_then_gives_up():
    run = Run(SERVER, grace=30)
    link = run.live()
    actions = run(Got(link, ConnectionClosed()))
    assert shown(actions, "notice")[0].endswith("waiting for the client (0 undelivered)")
    assert not any(isinstance(a, Dial) for a in actions)
    assert ended(run(Tick(), after=30)) == (EXIT_NETWORK, "the client did not come back within 30 s")


def test_the_server_tells_a_reconnection_from_a_new_client_taking_over():
    run = Run(SERVER)
    link = run.live()
    run(Typed("for whoever is there", TS))
    run(Got(link, ConnectionClosed()))
    same = run.link()
    run(Attached(same, "192.0.2.9:4001", RESUME))
    assert shown(run(Got(same, Resume(CONV, 0, 0, False))), "notice") == [
        "the client reconnected from 192.0.2.9:4001 (1 sent again)"]
    run(Got(same, ConnectionClosed()))
    newcomer = run.link()
    run(Attached(newcomer, "192.0.2.50:7000", PASSPHRASE))
    actions = run(Got(newcomer, Resume("cd" * 16, 0, 0, False)))
    assert "a new client (192.0.2.50:7000) took the conversation over" in shown(actions, "notice")[0]
    assert sends(actions) == [Resume("cd" * 16, 0, 0, False), Message(0, "for whoever is there", TS)]


def test_a_newer_connection_replaces_the_one_the_server_still_trusts():
    run = Run(SERVER)
    old = run.live()
    new = run.link()
    actions = run(Attached(new, "192.0.2.9:4001", RESUME))
    assert Close(old, False) in actions and run.session.link == new


def test_an_acknowledgement_due_when_a_link_is_replaced_waits_for_the_resume_exchange():
    """A message arrives, then the client reconnects before its old link drained: the new link's Resume says
    what arrived. (An Ack sent first broke the client's rule, Resume first, and ended both sides as a security
    failure: a man in the middle who only cut connections could do it.)"""
    run = Run(SERVER)
    old = run.live()
    run(Got(old, Message(0, "hello", TS)))
    new = run.link()
    run(Attached(new, "192.0.2.9:4001", RESUME))
    assert sends(run(Drained(new))) == []
    assert sends(run(Got(new, Resume(CONV, 0, 0, False)))) == [Resume(CONV, 1, 0, True)]


def test_lines_typed_on_the_server_before_anyone_came_are_sent_when_the_chat_begins():
    run = Run(SERVER, queued=[("early one", TS), ("early two", TS)])
    link = run.link()
    run(Attached(link, "192.0.2.9:4000", PASSPHRASE))
    actions = run(Got(link, Resume(CONV, 0, 0, False)))
    assert [m.text for m in sends(actions) if isinstance(m, Message)] == ["early one", "early two"]
    assert "sent 2 messages typed before the chat began" in shown(actions, "notice")


# ---------------------------------------------------------------------------------------------------
# Leaving


def test_leaving_with_nothing_pending_says_goodbye_and_you_left():
    run = Run()
    link = run.live()
    actions = run(Leave(10))
    assert actions[:2] == [Send(link, Goodbye()), Close(link, True)]
    assert ended(actions) == (EXIT_OK, "you left the chat")


def test_leaving_waits_for_acknowledgements_then_leaves():
    run = Run()
    link = run.live()
    run(Typed("one", TS))
    assert ended(run(Leave(10))) is None
    assert ended(run(Got(link, Ack(0)))) == (EXIT_OK, "you left the chat")


@pytest.mark.parametrize("leave", [Leave(10), common.Interrupt(130)])
def test_leaving_acknowledges_what_was_shown_before_the_goodbye(leave):
    """The user quits right after a message is shown, before its link drained: the peer must not be left thinking
    it was not delivered."""
    run = Run()
    link = run.live()
    run(Got(link, Message(0, "last words", TS)))
    assert sends(run(leave)) == [Ack(0), Goodbye()]


def test_leaving_that_takes_more_than_a_moment_says_what_it_waits_for():
    run = Run()
    link = run.live()
    run(Typed("one", TS))
    run(Leave(10))
    assert run.session.next_wakeup() == run.now + common.LEAVING_NOTICE
    assert shown(run(Tick(), after=common.LEAVING_NOTICE), "notice") == [
        "leaving: waiting up to 9 s for the peer to acknowledge 1 message; Ctrl-C leaves now"]
    assert shown(run(Tick(), after=1), "notice") == []  # once
    assert ended(run(Got(link, Ack(0))))[0] == EXIT_OK


def test_leaving_with_a_file_offered_and_not_taken_waits_as_for_messages():
    run, link = sender()
    run(Leave(10))
    assert shown(run(Tick(), after=1), "notice") == [
        "leaving: waiting up to 9 s for the peer to take the files offered; Ctrl-C leaves now"]
    code, text = ended(run(Tick(), after=9))
    assert code == EXIT_NETWORK and text.endswith("1 file not delivered: report.pdf")


def test_leaving_lists_what_was_not_delivered_by_its_first_words():
    run = Run()
    run.live()
    for text in ["the build is done", "and the tests passed on every machine we have", "bye"]:
        run(Typed(text, TS))
    run(Leave(10))
    code, text = ended(run(Tick(), after=10))
    assert code == EXIT_NETWORK
    assert text == ("you left the chat; 3 messages sent but not acknowledged (they may not have arrived): "
                    "“the build is done”, “and the tests passed on…”, “bye”")


def test_ctrl_c_leaves_at_once_with_a_goodbye():
    run = Run()
    run.live()
    actions = run(Interrupt(130))
    assert sends(actions) == [Goodbye()] and ended(actions) == (130, "you left the chat (interrupted)")


def test_a_link_that_arrives_after_the_end_is_closed():
    run = Run()
    run.live()
    run(Interrupt(130))
    late = run.link()
    assert run(Attached(late, "x", RESUME)) == [Close(late, False)]
    assert run(Typed("too late", TS)) == []


# ---------------------------------------------------------------------------------------------------
# Legacy


def legacy_live():
    run = Run(fmt=LEGACY)
    link = run.link()
    actions = run(Attached(link, "192.0.2.7:5555", None))
    assert Live() in actions
    return run, link


def test_a_legacy_burst_goes_one_message_at_a_time_paced():
    run, link = legacy_live()
    first = run(Typed("line 0", TS))
    assert sends(first) == [Message(0, "line 0", TS)] and shown(first)[0].startswith("Sent: line 0")
    for i in range(1, 20):
        assert sends(run(Typed(f"line {i}", TS))) == []  # queued behind the pace
    times = []
    while run.session.next_wakeup() is not None:
        wake = run.session.next_wakeup()
        actions = run(Tick(), after=wake - run.now)
        assert len(sends(actions)) == 1
        times.append(run.now)
    assert len(times) == 19
    assert all(abs((b - a) - LEGACY_PACE) < 1e-9 for a, b in zip(times, times[1:]))


def test_legacy_warns_before_it_sends():
    run, link = legacy_live()
    actions = run(Typed("a~b", TS))
    kinds = [type(a).__name__ + (":" + a.kind if isinstance(a, Show) else "") for a in actions]
    assert kinds.index("Show:warning") < kinds.index("Send")
    assert "'~'" in shown(actions, "warning")[0]


def test_legacy_never_claims_delivery():
    run, link = legacy_live()
    run(Typed("hello", TS))
    fields, _ = run.session.status()
    assert "delivery unknown" in " ".join(form[0] for form in fields)
    assert not any("undelivered" in form[0] for form in fields)
    code, text = ended(run(Leave(10)))
    assert code == EXIT_OK and text == "you left the chat; sent 1 message (the legacy format cannot confirm delivery)"


def test_legacy_received_messages_are_not_acknowledged_and_a_close_ends_the_chat():
    run, link = legacy_live()
    actions = run(Got(link, Message(0, "from the past", "12:00:00")))
    assert shown(actions)[0].startswith("Received: from the past") and sends(run(Drained(link))) == []
    assert ended(run(Got(link, ConnectionClosed()))) == (EXIT_OK, "the peer closed the connection")


def test_a_legacy_peer_closing_lists_the_messages_still_waiting_their_turn():
    run, link = legacy_live()
    for text in ("one", "two", "three"):
        run(Typed(text, TS))
    code, text = ended(run(Got(link, ConnectionClosed())))
    assert code == EXIT_NETWORK and "“two”, “three”" in text and "never sent" in text


def test_legacy_leaving_waits_for_the_paced_messages():
    run, link = legacy_live()
    run(Typed("one", TS))
    run(Typed("two", TS))
    assert ended(run(Leave(10))) is None
    assert ended(run(Tick(), after=LEGACY_PACE))[0] == EXIT_OK


def test_a_legacy_peer_with_another_passphrase_is_a_security_failure_without_an_alert():
    run, link = legacy_live()
    actions = run(Failed(link, common.RemoteProtocolError("cannot decrypt the peer's data")))
    assert sends(actions) == [] and ended(actions)[0] == EXIT_SECURITY


# ---------------------------------------------------------------------------------------------------
# Any sequence of inputs: no exception escapes, the clock never spins, nothing goes to a stale link


def _inputs():
    links = st.sampled_from(["link1", "link2", "link3"])
    peer_events = st.one_of(
        st.builds(Message, st.integers(0, 4), st.sampled_from(["a", "b\nc", ""]), st.just(TS)),
        st.builds(Ack, st.integers(0, 4)),
        st.builds(Resume, st.sampled_from([CONV, "cd" * 16]), st.integers(0, 3), st.integers(0, 3), st.booleans()),
        st.sampled_from([Ping(), common.Pong(), Goodbye(), common.Busy(), ConnectionClosed(), Alert("integrity")]))
    errors = st.sampled_from([common.NetworkError("x"), common.IntegrityError("x"), common.TruncatedFrame("x"),
                              common.RemoteProtocolError("x"), KeyError("bug")])
    dial_errors = st.sampled_from([common.NetworkError("x"), common.UnfinishedAuthentication("x"),
                                   common.Refused("unknown", "gone"), common.NotAeschatPeer("x")])
    files, offsets = st.integers(0, 2), st.sampled_from([0, 16384, 20_000, 32768])
    peer_events = st.one_of(peer_events, st.one_of(
        st.builds(common.Offer, files, st.just("x.bin"), st.sampled_from([0, 20_000]), st.just("ab" * 32)),
        st.builds(common.Accept, files, offsets),
        st.builds(common.FileAck, files, offsets),
        st.builds(common.Chunk, files, offsets, st.sampled_from([bytes(16384), bytes(3616)])),
        st.builds(common.Done, files),
        st.builds(common.Refuse, files, st.just("declined")),
        st.builds(common.Cancel, files, st.just("left"))))
    return st.one_of(
        st.builds(Typed, st.sampled_from(["hi", "/reconnect", "/help", "//x", "a~b", "/send f", "/accept",
                                          "/decline"]), st.just(TS)),
        st.builds(common.FileReady, files, st.just("f"), st.sampled_from([0, 20_000]), st.just("ab" * 32)),
        st.builds(common.FileOpened, files),
        st.builds(common.FileSaved, files, st.just("/in/x.bin")),
        st.builds(common.FileFailed, files, st.booleans(), st.just("unwritable"), st.just("full")),
        st.builds(Attached, links, st.just("192.0.2.7:5555"), st.sampled_from([PASSPHRASE, RESUME])),
        st.builds(Got, links, peer_events),
        st.builds(Drained, links),
        st.builds(Failed, links, errors),
        st.just(Tick()),
        st.builds(Leave, st.sampled_from([0.0, 10.0])),
        st.just(Interrupt(130)),
        st.builds(DialFailed, dial_errors),
    )


@settings(max_examples=min(300, settings.default.max_examples))
@given(st.sampled_from([CLIENT, SERVER]), st.sampled_from([V2, LEGACY]), st.booleans(),
       st.lists(st.tuples(_inputs(), st.floats(0, 20)), max_size=40))
def test_any_sequence_of_inputs_keeps_the_rules(role, fmt, interactive, inputs):
    run = Run(role, fmt, interactive=interactive)
    resumed = set()  # the links this side has sent its Resume on
    for event, after in inputs:
        allowed = {run.session.link, event.link if isinstance(event, Attached) else None} - {None}
        for action in run(event, after):
            if isinstance(action, Send):
                assert action.link in allowed, "a send to a link that is not the current one"
                if isinstance(action.event, Resume):
                    resumed.add(action.link)
                elif not isinstance(action.event, common.Outbox.BEFORE_RESUME) and fmt is V2:
                    assert action.link in resumed, "the conversation's records before the Resume exchange"
        wake = run.session.next_wakeup()
        assert wake is None or wake > run.now or run(Tick()) != [] or run.session.next_wakeup() != wake, \
            "a tick is due and does nothing: the clock would spin"
        if run.session.ended:
            assert all(isinstance(a, Close) for a in run(Tick(), 1))


# ---------------------------------------------------------------------------------------------------
# Files


SHA = "ab" * 32


def sender():
    run = Run(interactive=True)
    link = run.live()
    actions = run(Typed("/send /tmp/report.pdf", TS))
    assert actions == [common.PrepareFile(0, "/tmp/report.pdf")]
    actions = run(common.FileReady(0, "report.pdf", 100_000, SHA))
    assert sends(actions) == [common.Offer(0, "report.pdf", 100_000, SHA)]
    assert shown(actions, "notice") == ["offering file report.pdf (97.7 KiB)"]
    return run, link


def receiver(**kwargs):
    run = Run(SERVER, **kwargs)
    return run, run.live()


def test_a_sender_keeps_a_window_of_chunks_in_flight_and_goes_on_as_they_are_acknowledged():
    run, link = sender()
    chunks = sends(run(Got(link, common.Accept(0, 0))))
    assert chunks == [common.ChunkOf(0, offset, 16384) for offset in range(0, common.WINDOW_CHUNKS * 16384, 16384)]
    assert sends(run(Got(link, common.FileAck(0, 16384)))) == [common.ChunkOf(0, 65536, 16384)]
    rest = sends(run(Got(link, common.FileAck(0, 65536))))
    assert rest == [common.ChunkOf(0, 81920, 16384), common.ChunkOf(0, 98304, 100_000 - 98304)]  # the last, short
    assert ended(run(Got(link, common.FileAck(0, 100_001)))) is not None  # past what was sent: a violation
    run, link = sender()
    run(Got(link, common.Accept(0, 0)))
    for offset in (16384, 32768, 49152, 65536, 81920, 98304, 100_000):
        run(Got(link, common.FileAck(0, offset)))
    actions = run(Got(link, common.Done(0)))
    assert shown(actions) == ["delivered file report.pdf"] and common.ReleaseFile(0) in actions


def test_a_receiver_with_a_folder_accepts_writes_acknowledges_and_saves():
    run, link = receiver(receive_files=True)
    actions = run(Got(link, common.Offer(0, "../x.bin", 20_000, SHA)))
    assert actions == [common.OpenFile(0, "x.bin", 20_000)]  # the name made safe before anything
    actions = run(common.FileOpened(0))
    assert sends(actions) == [common.Accept(0, 0)] and "receiving file x.bin" in shown(actions, "notice")[0]
    actions = run(Got(link, common.Chunk(0, 0, bytes(16384))))
    assert common.WriteFile(0, bytes(16384)) in actions and sends(actions) == [common.FileAck(0, 16384)]
    actions = run(Got(link, common.Chunk(0, 16384, bytes(3616))))
    assert common.SaveFile(0, SHA, "x.bin") in actions
    actions = run(common.FileSaved(0, "/in/x.bin"))
    assert sends(actions) == [common.Done(0)]
    assert shown(actions) == [f"received file x.bin (20,000 bytes, sha256 {SHA[:12]}…) → /in/x.bin"]


@pytest.mark.parametrize("chunk", [common.Chunk(0, 5, b"x"), common.Chunk(0, 0, bytes(20_001)),
                                   common.Chunk(7, 0, b"x")])
def test_a_chunk_out_of_place_is_a_security_failure(chunk):
    run, link = receiver(receive_files=True)
    run(Got(link, common.Offer(0, "x.bin", 20_000, SHA)))
    run(common.FileOpened(0))
    actions = run(Got(link, chunk))
    assert ended(actions)[0] == EXIT_SECURITY and common.DiscardFile(0) in actions


def test_a_pipe_without_a_folder_declines_and_a_terminal_asks():
    run, link = receiver()
    actions = run(Got(link, common.Offer(0, "x.bin", 10, SHA)))
    assert sends(actions) == [common.Refuse(0, "declined")]
    run, link = receiver(interactive=True)
    actions = run(Got(link, common.Offer(0, "x.bin", 10, SHA)))
    assert sends(actions) == [] and "/accept" in shown(actions, "notice")[0]
    assert run(Typed("/accept", TS)) == [common.OpenFile(0, "x.bin", 10)]
    run(Got(link, common.Offer(1, "y.bin", 10, SHA)))
    assert sends(run(Typed("/decline", TS))) == [common.Refuse(1, "declined")]
    assert "no file is offered" in shown(run(Typed("/decline", TS)), "error")[0]


def test_a_sender_has_at_most_max_offered_files_on_their_way_and_offers_the_next_as_one_is_done():
    run = Run(interactive=True)
    link = run.live()
    n = common.MAX_OFFERED + 3
    for file in range(n):
        run(Typed(f"/send /tmp/{file}", TS))
    offers = [e for file in range(n) for e in sends(run(common.FileReady(file, f"{file}", 10, SHA)))]
    assert offers == [common.Offer(file, f"{file}", 10, SHA) for file in range(common.MAX_OFFERED)]
    run(Got(link, common.Accept(0, 0)))
    assert sends(run(Got(link, common.Done(0)))) == [common.Offer(common.MAX_OFFERED, f"{common.MAX_OFFERED}", 10, SHA)]
    assert sends(run(Got(link, common.Refuse(1, "declined")))) == [
        common.Offer(common.MAX_OFFERED + 1, f"{common.MAX_OFFERED + 1}", 10, SHA)]
    actions = run(Interrupt(130))  # the one never offered is not cancelled: the peer never heard of it
    cancelled = [c.file for c in sends(actions) if isinstance(c, common.Cancel)]
    assert cancelled == list(range(2, common.MAX_OFFERED + 2))


def test_a_peer_with_more_than_max_offered_files_on_their_way_is_a_security_failure():
    run, link = receiver(interactive=True)
    for file in range(common.MAX_OFFERED):
        assert ended(run(Got(link, common.Offer(file, "x", 10, SHA)))) is None
    assert ended(run(Got(link, common.Offer(common.MAX_OFFERED, "x", 10, SHA))))[0] == EXIT_SECURITY


def test_files_are_received_a_few_at_a_time_and_the_next_opens_as_one_is_saved():
    run, link = receiver(receive_files=True)
    opened = [a.file for file in range(common.MAX_OPEN_FILES + 1)
              for a in run(Got(link, common.Offer(file, f"{file}", 10, SHA))) if isinstance(a, common.OpenFile)]
    assert opened == list(range(common.MAX_OPEN_FILES))  # the last waits: no temporary file yet
    run(common.FileOpened(0))
    run(Got(link, common.Chunk(0, 0, bytes(10))))
    actions = run(common.FileSaved(0, "/in/0"))
    assert common.OpenFile(common.MAX_OPEN_FILES, f"{common.MAX_OPEN_FILES}", 10) in actions


def test_a_receiver_remembers_only_the_latest_finished_files():
    run, link = receiver()  # a pipe: every offer declined
    for file in range(3 * common.KEPT_FINISHED):
        assert sends(run(Got(link, common.Offer(file, "x", 10, SHA)))) == [common.Refuse(file, "declined")]
    assert len(run.session.transfers.incoming) <= common.KEPT_FINISHED


def test_a_file_over_the_limit_is_refused_before_anything_is_written():
    run, link = receiver(receive_files=True, max_file_size=1000)
    actions = run(Got(link, common.Offer(0, "big.bin", 1001, SHA)))
    assert sends(actions) == [common.Refuse(0, "too large")] and not any(isinstance(a, common.OpenFile)
                                                                          for a in actions)


def test_after_a_reconnection_the_sender_offers_again_and_goes_on_from_what_the_receiver_has():
    run, link = sender()
    run(Got(link, common.Accept(0, 0)))
    run(Got(link, common.FileAck(0, 16384)))
    run(Got(link, ConnectionClosed()))
    new = run.link()
    run(Attached(new, "192.0.2.7:5555", RESUME))
    actions = run(Got(new, Resume(CONV, 0, 0, True)))
    assert common.Offer(0, "report.pdf", 100_000, SHA) in sends(actions)
    assert "offering" not in " ".join(shown(actions))  # told once
    chunks = sends(run(Got(new, common.Accept(0, 32768))))  # the receiver had more than it had acknowledged
    assert chunks[0] == common.ChunkOf(0, 32768, 16384)


@pytest.mark.parametrize("acknowledged", [32768, 40_000])
def test_a_file_that_arrived_while_the_connection_dropped_is_delivered_when_offered_again(acknowledged):
    """The receiver's last acknowledgement (or only its Done) was lost in the cut: offered again, the receiver
    answers Done, and that is delivery. (It was taken as a violation, or ignored and the file listed undelivered.)"""
    run = Run(interactive=True)
    link = run.live()
    run(Typed("/send /tmp/report.pdf", TS))
    run(common.FileReady(0, "report.pdf", 40_000, SHA))
    run(Got(link, common.Accept(0, 0)))
    run(Got(link, common.FileAck(0, acknowledged)))
    run(Got(link, ConnectionClosed()))
    new = run.link()
    run(Attached(new, "192.0.2.7:5555", RESUME))
    assert common.Offer(0, "report.pdf", 40_000, SHA) in sends(run(Got(new, Resume(CONV, 0, 0, True))))
    actions = run(Got(new, common.Done(0)))
    assert ended(actions) is None and shown(actions) == ["delivered file report.pdf"]
    assert ended(run(Leave(10)))[0] == EXIT_OK


@pytest.mark.parametrize("act", [Typed("/decline", TS), Leave(10), common.FileSaved(0, "/in/x.bin")])
def test_nothing_of_the_conversation_goes_before_the_resume_exchange(act):
    """The client is back and its Resume not yet in (a man in the middle may hold it 10 s): what the server's user
    does meanwhile waits for the exchange, which says it again (the file offered again, the receiver restating)."""
    run = Run(SERVER, interactive=True, receive_files=isinstance(act, common.FileSaved))
    link = run.live()
    run(Got(link, common.Offer(0, "x.bin", 10, SHA)))
    if isinstance(act, common.FileSaved):
        run(common.FileOpened(0))
        run(Got(link, common.Chunk(0, 0, bytes(10))))
    run(Got(link, ConnectionClosed()))
    new = run.link()
    run(Attached(new, "192.0.2.7:5555", RESUME))
    assert [e for e in sends(run(act)) if not isinstance(e, (Goodbye, Resume))] == []


def test_a_receiver_offered_a_file_again_says_where_it_stands():
    run, link = receiver(receive_files=True)
    run(Got(link, common.Offer(0, "x.bin", 40_000, SHA)))
    run(common.FileOpened(0))
    run(Got(link, common.Chunk(0, 0, bytes(16384))))
    assert sends(run(Got(link, common.Offer(0, "x.bin", 40_000, SHA)))) == [common.Accept(0, 16384)]


def test_the_sender_leaving_cancels_and_the_receiver_discards():
    run, link = receiver(receive_files=True)
    run(Got(link, common.Offer(0, "x.bin", 40_000, SHA)))
    run(common.FileOpened(0))
    actions = run(Got(link, common.Cancel(0, "left")))
    assert common.DiscardFile(0) in actions
    assert shown(actions, "notice") == ["transfer of file x.bin abandoned: the peer left"]


def test_a_chat_that_ends_mid_transfer_discards_the_temporary_file():
    run, link = receiver(receive_files=True)
    run(Got(link, common.Offer(0, "x.bin", 40_000, SHA)))
    run(common.FileOpened(0))
    actions = run(Failed(link, common.IntegrityError("bad")))
    assert common.DiscardFile(0) in actions and ended(actions)[0] == EXIT_SECURITY


def test_leaving_waits_for_a_file_while_it_moves_then_gives_it_up():
    run, link = sender()
    run(Got(link, common.Accept(0, 0)))
    assert ended(run(Leave(10))) is None
    assert ended(run(Tick(), after=20)) is None  # past the messages' 10 s: the file still counts
    run(Got(link, common.FileAck(0, 16384)), after=1)
    actions = run(Tick(), after=common.FILE_STALL)
    code, text = ended(actions)
    assert code == EXIT_NETWORK and text.endswith("1 file not delivered: report.pdf")
    assert common.Cancel(0, "left") in sends(actions)


def test_ctrl_c_lists_the_files_not_delivered():
    run, link = sender()
    code, text = ended(run(common.Interrupt(130)))
    assert code == 130 and text == "you left the chat (interrupted); 1 file not delivered: report.pdf"


def test_a_receiver_that_starts_over_from_before_what_it_acknowledged_breaks_the_protocol():
    """Once, a receiver that accepted from zero again and again held the sender's leaving for ever; then, across
    resumptions, had the file sent again each time. It has what it acknowledged: asking again is a violation."""
    run, link = sender()
    run(Got(link, common.Accept(0, 0)))
    run(Got(link, common.FileAck(0, 16384)))
    run(Leave(10))
    code, text = ended(run(Got(link, common.Accept(0, 0)), after=5))
    assert code == common.EXIT_SECURITY and "from before what the peer acknowledged" in text


def test_a_new_client_taking_over_abandons_the_files_of_the_last():
    run, link = receiver(receive_files=True)
    run(Got(link, common.Offer(0, "x.bin", 40_000, SHA)))
    run(common.FileOpened(0))
    run(Got(link, ConnectionClosed()))
    newcomer = run.link()
    run(Attached(newcomer, "192.0.2.50:7000", PASSPHRASE))
    actions = run(Got(newcomer, Resume("cd" * 16, 0, 0, False)))
    assert common.DiscardFile(0) in actions
    assert "transfer of file x.bin abandoned: a new client took the conversation over" in shown(actions, "notice")


def test_a_file_record_from_a_legacy_peer_or_before_the_resume_is_refused():
    run = Run(SERVER)
    link = run.link()
    run(Attached(link, "192.0.2.9:4000", PASSPHRASE))
    assert ended(run(Got(link, common.Offer(0, "x", 1, SHA))))[0] == EXIT_SECURITY


def test_the_status_line_shows_a_transfer_with_its_rate_and_time_left():
    run, link = sender()
    run(Got(link, common.Accept(0, 0)))
    run(Got(link, common.FileAck(0, 32768)), after=1.0)
    fields, order = run.session.status()
    line = common.fit_status(fields, order, 120)
    assert "sending report.pdf 32%, 32.0 KiB/s, 2 s left" in line
    assert "sending 32%" in common.fit_status(fields, order, 50)
    run(Got(link, ConnectionClosed()))
    fields, order = run.session.status()
    assert "sending report.pdf 32%, paused" in common.fit_status(fields, order, 120)  # no rate that is not so


def test_a_reconnection_cut_before_it_resumed_is_not_a_new_outage():
    """A man in the middle let each resumption handshake through and cut it before the Resume: 824 reconnections
    in 60 s, each announced, the 10 s limit reset every time. Now the outage keeps its deadline and backoff."""
    run = away_client(grace=10)
    lost_at, announced, attempts = run.now, [], 0
    while not run.session.ended:
        link = run.link()
        run(Attached(link, "192.0.2.7:5555", RESUME))
        announced += shown(run(Got(link, ConnectionClosed()), after=0.01))
        attempts += 1
        run(Tick(), after=run.session.next_wakeup() - run.now)  # the next attempt, or the deadline
    assert announced == [] and attempts <= 10
    assert run.now - lost_at <= 10.1


def test_a_server_whose_client_never_resumed_ends_that_chat_quietly():
    run = Run(SERVER)
    link = run.link()
    run(Attached(link, "192.0.2.9:4000", PASSPHRASE))
    code, text = ended(run(Got(link, ConnectionClosed())))
    assert code == EXIT_NETWORK and text.startswith("connection lost before the chat began")


def test_a_peer_that_authenticates_and_never_resumes_is_given_up_on():
    """An evil server that answered pings and never sent its Resume kept a client waiting, silent, for ever; an evil
    client so kept the server busy for everyone else."""
    for role in (CLIENT, SERVER):
        run = Run(role)
        link = run.link()
        run(Attached(link, "192.0.2.7:5555", PASSPHRASE))
        assert run.session.next_wakeup() <= run.now + common.RESUME_DEADLINE
        run(Got(link, Ping()), after=5)
        code, text = ended(run(Tick(), after=common.RESUME_DEADLINE - 5))
        assert code == EXIT_NETWORK and "did not resume within 10 s" in text


def test_acknowledgements_only_for_what_was_sent_and_only_once_resumed():
    run = Run(SERVER, queued=[("secret plan", TS)])
    link = run.link()
    run(Attached(link, "192.0.2.9:4000", PASSPHRASE))
    assert ended(run(Got(link, Ack(0))))[0] == EXIT_SECURITY  # before the Resume: the queued message is safe
    run = Run()
    run.live()
    run(common.Typed("x", TS))
    assert run.session.conversation.sent == 1
    run = away_client()
    run(Typed("queued while away", TS))
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", RESUME))
    assert ended(run(Got(link, Resume(CONV, 1, 0, True))))[0] == EXIT_SECURITY  # "shown" what was never sent


def test_a_resumption_link_that_says_it_did_not_resume_is_refused():
    """It would let the server show the client again what it had shown (numbering taken afresh)."""
    run = away_client()
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", RESUME))
    assert ended(run(Got(link, Resume(CONV, 0, 0, False))))[0] == EXIT_SECURITY


def test_a_ping_storm_is_a_security_failure():
    run = Run()
    link = run.live()
    for _ in range(common.MAX_PINGS):
        assert sends(run(Got(link, Ping()), after=0.001)) == [common.Pong()]
    assert ended(run(Got(link, Ping())))[0] == EXIT_SECURITY


def test_legacy_has_no_files():
    run = Run(fmt=LEGACY, interactive=True)
    link = run.link()
    run(Attached(link, "192.0.2.7:5555", None))
    actions = run(Typed("/send /etc/hostname", TS))
    assert sends(actions) == [] and "--legacy has no files" in shown(actions, "error")[0]


# ---------------------------------------------------------------------------------------------------
# The small machines' tables, whole; the records table against the Session's docstring


@pytest.mark.parametrize("table, start", [(common.Redial.CLIENT, common.Away.UP),
                                          (common.Redial.SERVER, common.Away.UP),
                                          (common.Leaving.TABLE, common.Going.STAYING)])
def test_every_state_of_redial_and_leaving_is_reachable_and_every_pair_has_a_cell(table, start):
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for name in table.inputs:
            cell = table.cells[state, name]  # a KeyError here is a pair with no answer
            assert cell != common.VIOLATION, "the peer cannot reach these machines: no cell may blame it"
            if isinstance(cell, type(start)) and cell not in seen:
                seen.add(cell)
                todo.append(cell)
    assert seen == set(table.rows)


REDIAL_ARGS = {"lost": (), "cut": ("reset",), "due": (), "retry": (), "ask": (), "reconnect": (), "attached": (True,)}


@pytest.mark.parametrize("role", [CLIENT, SERVER])
def test_every_pair_of_redial_moves_as_its_cell_says(role):
    for state in role.redial.rows:
        for name in role.redial.inputs:
            out = common.Outbox()
            redial = common.Redial(out, role.redial, 300.0, role.reconnects)
            redial.state, redial.since, redial.next_at = state, 10.0, 10.0
            cell = role.redial.cells[state, name]
            moved = redial.move(name, *REDIAL_ARGS[name])
            dials = [a for a in out.take() if isinstance(a, Dial)]
            assert moved == (cell != common.STAY)
            assert redial.state is (state if cell == common.STAY else cell)
            assert len(dials) == (redial.state is common.Away.DIALING and state is not common.Away.DIALING)


def test_leaving_moves_as_its_table_says_and_tells_once():
    out = common.Outbox()
    leaving = common.Leaving(out)
    waits = common.Waits(1, 0, 0.0, (), False, False, 0.0)
    assert not leaving.tick(100.0, waits) and leaving.state is common.Going.STAYING
    leaving.move("leave", 100.0, 10.0, 10.0)
    assert not leaving.tick(100.5, waits) and out.take() == []
    assert not leaving.tick(101.0, waits) and leaving.state is common.Going.TOLD
    assert shown(out.take(), "notice") == ["leaving: waiting up to 9 s for the peer to acknowledge 1 message; "
                                           "Ctrl-C leaves now"]
    assert not leaving.tick(105.0, waits) and out.take() == []
    assert leaving.tick(110.0, waits) and leaving.state is common.Going.GONE
    assert not leaving.tick(120.0, waits) and not leaving.idle(common.Waits(0, 0, 0.0, (), False, False, 0.0))


def test_the_records_table_in_the_docstring_is_the_one_the_code_keeps():
    entries = []  # [names, phases]: a row with phases starts one, a row without goes on with its first cell
    for line in Session.__doc__.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.strip().startswith("|") or len(cells) != 3 or cells[0] == "record" or cells[0].startswith("-"):
            continue
        names = [name.strip() for name in cells[0].split(",") if name.strip()]
        if cells[1]:
            entries.append([names, {common.Phase[p.strip()] for p in cells[1].split(",")}])
        else:
            entries[-1][0] += names
    documented = {getattr(common, name): phases for names, phases in entries for name in names}
    assert documented == {kind: set(phases) for kind, (phases, _) in Session.RECORDS.items()}


@pytest.mark.parametrize("leave", [Leave(10), common.Interrupt(130)])
def test_leaving_with_a_file_mid_send_releases_it_once_and_lists_it_once(leave):
    """The defect the small machines fixed: a stopped file still counted as on its way, so the end released it a
    second time and said "transfer of file X abandoned: the chat ended" before "1 file not delivered"."""
    run, link = sender()
    run(Got(link, common.Accept(0, 0)))
    actions = run(leave)
    if not ended(actions):
        actions = run(Tick(), after=common.FILE_STALL + 1)
    assert [a for a in actions if isinstance(a, common.ReleaseFile)] == [common.ReleaseFile(0)]
    assert not any("abandoned" in line for line in shown(actions))
    assert ended(actions)[1].endswith("1 file not delivered: report.pdf")


# ---------------------------------------------------------------------------------------------------
# Leaving tells the truth: declined is the peer's choice; a script's --send waits for a person


@pytest.mark.parametrize("interactive, code", [(True, EXIT_OK), (False, EXIT_NETWORK)])
def test_a_declined_file_is_listed_as_declined_an_error_only_for_a_script(interactive, code):
    run = Run(interactive=interactive)
    link = run.live()
    for file in range(2):  # the same name twice
        run.session.transfers.send("/tmp/my notes.txt")
        run(common.FileReady(file, "my notes.txt", 10, SHA))
        run(Got(link, common.Refuse(file, "declined")))
    assert ended(run(Leave(10))) == (code, "you left the chat; 2 files declined by the peer: my notes.txt (2x)")


def test_a_scripts_send_waits_for_a_person_as_long_as_the_peer_is_connected():
    """The outside round: a script's --send gave the person 9 s to notice and type /accept, then gave up, exit 1."""
    run = Run()
    link = run.live()
    run.session.transfers.send("/tmp/build.tar.gz")
    run(common.FileReady(0, "build.tar.gz", 10, SHA))
    told = shown(run(Leave(10, answers=None))) + shown(run(Tick(), after=common.LEAVING_NOTICE))
    assert told == ["leaving: waiting for the peer to answer the files offered; Ctrl-C leaves now"]
    for _ in range(30):  # five minutes
        assert ended(run(Tick(), after=10)) is None
        run(Got(link, Ping()))  # the peer is there
    run(Got(link, common.Accept(0, 0)))
    run(Got(link, common.FileAck(0, 10)))
    assert ended(run(Got(link, common.Done(0)))) == (EXIT_OK, "you left the chat")


@pytest.mark.parametrize("bound", [60, 3])
def test_a_bounded_wait_for_an_answer_gives_up_at_its_bound(bound):
    """Below the messages' 10 s too: --wait 3 once waited 10 s for nothing but an answer (outside round three)."""
    run = Run()
    run.live()
    run.session.transfers.send("/tmp/build.tar.gz")
    run(common.FileReady(0, "build.tar.gz", 10, SHA))
    run(Leave(10, answers=bound))
    told = shown(run(Tick(), after=common.LEAVING_NOTICE))
    assert told == [f"leaving: waiting up to {bound - 1} s for the peer to take the files offered; Ctrl-C leaves now"]
    assert ended(run(Tick(), after=bound - 1.5)) is None
    code, text = ended(run(Tick(), after=0.5))
    assert code == EXIT_NETWORK and text.endswith("1 file not delivered: build.tar.gz")


def test_files_and_folders_left_behind_are_counted_each_by_its_kind():
    """Outside round three: "2 file or folders not delivered"."""
    transfers = [types.SimpleNamespace(kind=kind, name=name) for kind, name in
                 [("file", "a.txt"), ("folder", "tree"), ("file", "a.txt")]]
    assert common.listed(transfers, "not delivered") == "2 files and 1 folder not delivered: a.txt (2x), tree"
