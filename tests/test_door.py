"""The server's door (Gate), tested directly: connections knock, bytes are handed over by hand, the clock is moved
by hand, and the gate works a piece at a time as the door's loop lets it. No sockets, threads or sleeps.

The attacks of the outside round are replayed here in full, minutes of them, in simulated time: guesses from a new
network every 2 s for 5 minutes, a flood of hellos from hundreds of networks; a real client's first login and a
reconnection must still go through in time.
"""

import os

import pytest

import common
from common import PASSPHRASE, RESUME

HELLO = common.ClientConnection("pw").data_to_send()  # a valid hello, made once: what a flood sends again and again


class Host:
    def __init__(self, status=common.OPEN, secrets=None):
        self.state, self.secrets = status, secrets or {}

    def status(self):
        return self.state

    def secret_for(self, resume_id):
        return self.secrets.get(resume_id)


class Door:
    """A Gate and the client connections knocking at it, each side's bytes delivered by hand."""

    def __init__(self, passphrase="pw", host=None, **kwargs):
        self.now = 5000.0
        self.gate = common.Gate(passphrase, host or Host(), now=self.now, **kwargs)
        self.clients, self.log, self.admitted, self.dropped, self.answered, self.denied = {}, [], [], [], [], []

    def knock(self, key, passphrase="pw", peer=None, kind=PASSPHRASE, resume_id=b"", hello=True):
        client = common.ClientConnection(passphrase, kind, resume_id)
        self.clients[key] = client
        self.apply(self.gate.accepted(key, peer or f"192.0.2.1:{1000 + len(self.clients)}", self.now))
        if hello:
            self.apply(self.gate.received(key, client.data_to_send(), self.now))
        return client

    def guess(self, key, peer):
        """A stranger's guess that costs him nothing: a hello made once, then 32 random bytes as a confirmation, as
        soon as the gate answers (the clock moves while its hello waits for the budget)."""
        self.clients[key] = None
        self.apply(self.gate.accepted(key, peer, self.now))
        self.apply(self.gate.received(key, HELLO, self.now))
        self.until(lambda: self.stage(key) != "queued", common.HANDSHAKE_DEADLINE, step=0.01)
        if self.stage(key) == "confirm":
            self.apply(self.gate.received(key, common.frame(os.urandom(32)), self.now))

    def stage(self, key):
        pending = self.gate.pending.get(key)
        return None if pending is None else pending.stage

    def confirm(self, key):
        """The client answers what the gate sent it (its hello) with its confirmation."""
        client = self.clients[key]
        assert client.next_event() is None
        data = client.data_to_send()
        assert data, "the client has nothing to confirm yet"
        self.apply(self.gate.received(key, data, self.now))

    def tick(self, after=0.0):
        self.now += after
        self.apply(self.gate.tick(self.now))

    def until(self, done, limit, step=0.05):
        """Move the clock a step at a time until done() or limit seconds passed; returns the seconds it took."""
        start = self.now
        while not done() and self.now - start < limit:
            self.tick(step)
        return self.now - start

    def apply(self, actions):
        """Carry out the gate's actions, then let it work as the door would, a piece at a time."""
        self._apply(actions)
        while self.gate.has_work(self.now):
            self._apply(self.gate.work(self.now))

    def _apply(self, actions):
        for action in actions:
            if isinstance(action, common.Write):
                if action.data[4 + len(common.PREFIX):][:1] in (PASSPHRASE, RESUME):  # a server hello
                    self.answered.append(action.key)
                if action.data.endswith(common.REFUSAL + common.DENIED):  # a confirmation checked, and wrong
                    self.denied.append(action.key)
                if self.clients.get(action.key) is not None:
                    self.clients[action.key].receive_data(action.data)
            elif isinstance(action, common.Drop):
                self.dropped.append(action.key)
                if action.line:
                    self.log.append(action.line)
            elif isinstance(action, common.Admit):
                self.admitted.append(action.key)
            elif isinstance(action, common.Log):
                self.log.append(action.line)

    def outcome(self, key):
        """What the client made of the gate's answer to its confirmation."""
        try:
            return self.clients[key].next_event()
        except common.AeschatError as e:
            return type(e).__name__

    def login(self, key, peer, limit=30.0, kind=PASSPHRASE, secret="pw", resume_id=b""):
        """A real client's whole handshake, the clock moving while it waits; returns how long it took."""
        start = self.now
        self.knock(key, peer=peer, kind=kind, passphrase=secret, resume_id=resume_id)
        self.until(lambda: self.stage(key) != "queued", limit, step=0.01)
        if self.stage(key) == "confirm":
            self.confirm(key)
        self.until(lambda: key in self.admitted or key not in self.gate.pending, limit - (self.now - start), 0.01)
        return self.now - start


# ---------------------------------------------------------------------------------------------------
# The handshake at the door


def test_the_gate_greets_at_once_and_computes_nothing_before_a_hello():
    door = Door()
    door.knock("a", hello=False)
    pending = door.gate.pending["a"]
    assert pending.stage == "hello" and not hasattr(pending.conn, "_mine")
    assert door.clients["a"].next_event() is None and door.clients["a"].greeting == common.OPEN


def test_a_right_passphrase_is_admitted():
    door = Door()
    door.knock("a")
    door.confirm("a")
    assert door.admitted == ["a"] and door.outcome("a") == common.HandshakeComplete()


def test_a_wrong_passphrase_is_refused_and_logged():
    door = Door()
    door.knock("a", passphrase="nope", peer="192.0.2.66:4444")
    door.confirm("a")
    assert door.dropped == ["a"] and door.outcome("a") == "AuthenticationError"
    assert door.log == ["failed passphrase attempt from 192.0.2.66:4444 (further ones are counted and told once a "
                        "minute)"]


def test_a_passphrase_hello_during_a_live_chat_is_refused_busy_without_spake2():
    door = Door(host=Host(status=common.BUSY))  # the greeting's status: a client is connected
    door.knock("a")
    assert door.dropped == ["a"] and door.outcome("a") == "Refused" and door.answered == []
    assert "turned away" in door.log[0]


def test_a_resumption_naming_an_unknown_conversation_is_refused_unknown():
    door = Door()
    door.knock("a", kind=RESUME, resume_id=os.urandom(16), passphrase=os.urandom(32))
    assert door.outcome("a") == "Refused" and "does not hold" in door.log[0] and door.answered == []


def test_a_wrong_resumption_secret_is_logged_as_interference():
    resume_id = os.urandom(16)
    door = Door(host=Host(secrets={resume_id: os.urandom(32)}))
    door.knock("a", kind=RESUME, resume_id=resume_id, passphrase=os.urandom(32), peer="192.0.2.8:8")
    door.confirm("a")
    assert door.log == ["failed resumption from 192.0.2.8:8: someone may be interfering"]


def test_each_step_of_a_handshake_has_its_deadline():
    door = Door()
    door.knock("silent", hello=False)
    door.knock("no confirmation")
    door.tick(after=common.HANDSHAKE_DEADLINE)
    assert set(door.dropped) == {"silent", "no confirmation"}
    assert all("no aeschat handshake within 5 s" in line for line in door.log)


def test_a_client_that_closes_after_our_hello_is_logged():
    door = Door()
    door.knock("a", peer="192.0.2.8:8")
    door.apply(door.gate.received("a", b"", door.now))
    assert door.log == ["192.0.2.8:8 dropped: it closed the connection after our hello, without a key confirmation"]


def test_a_reset_is_logged_a_quiet_close_of_a_greeting_reader_is_not():
    door = Door()
    door.knock("probe", hello=False)
    door.apply(door.gate.received("probe", b"", door.now))  # read the greeting, closed: a client's probe
    door.knock("reset", hello=False, peer="192.0.2.9:9")
    door.apply(door.gate.failed("reset", "connection reset"))
    assert door.dropped == ["probe", "reset"] and door.log == ["192.0.2.9:9 dropped: connection reset"]


def test_a_spare_start_made_while_idle_serves_the_next_passphrase_hello():
    door = Door()
    assert door.gate.wants_spare
    door.gate.spare()
    spare = door.gate._spare
    door.knock("a", hello=False)
    assert door.gate._spare is spare  # nothing computed for a connection before its hello
    door.apply(door.gate.received("a", door.clients["a"].data_to_send(), door.now))
    assert door.gate._spare is None and door.gate.wants_spare
    door.confirm("a")
    assert door.admitted == ["a"] and door.outcome("a") == common.HandshakeComplete()


def test_the_frame_limit_stays_at_64_bytes_until_the_confirmation_is_checked():
    """Once, answering a hello raised it to 512 KiB: 64 pending handshakes could hold 32 MiB of a stranger's bytes."""
    door = Door()
    door.knock("a")
    pending = door.gate.pending["a"]
    assert pending.stage == "confirm" and pending.conn._frames.max_size == common.HANDSHAKE_MAX_FRAME
    door.apply(door.gate.received("a", common.LENGTH.pack(65), door.now))  # a frame of 65 bytes announced
    assert door.dropped == ["a"] and "frame of 65 bytes is over the limit of 64" in door.log[0]
    door.knock("b")
    door.confirm("b")
    assert door.admitted == ["b"] and door.gate.pending == {}
    client = door.clients["b"]
    assert client._frames.max_size == common.HANDSHAKE_MAX_FRAME  # the client's, only once the server proved it
    assert door.outcome("b") == common.HandshakeComplete() and client._frames.max_size == common.MAX_FRAME


# ---------------------------------------------------------------------------------------------------
# Guesses: budgeted per network and in all; a real client's first login is never starved


def test_a_network_gets_five_guesses_then_one_a_minute():
    door = Door()
    for i in range(8):
        door.guess(f"g{i}", peer=f"203.0.113.{i}:4000")
    assert door.denied == [f"g{i}" for i in range(common.NETWORK_GUESS_BURST)]
    door.tick(after=common.CLIENT_HANDSHAKE_DEADLINE)  # the other three were never checked: their clients gave up
    assert door.denied == [f"g{i}" for i in range(5)] and door.gate.pending == {}
    door.tick(after=60 - common.CLIENT_HANDSHAKE_DEADLINE)
    door.guess("next", peer="203.0.113.99:4000")
    door.guess("too soon", peer="203.0.113.98:4000")
    assert door.denied[5:] == ["next"]
    assert sum("failed passphrase" in line for line in door.log) == 1  # the rest are summed up


def test_all_networks_together_get_thirty_guesses_then_one_a_second():
    door = Door()
    for i in range(40):  # forty networks, one guess each
        door.guess(f"g{i}", peer=f"198.{i}.100.7:4000")
    assert len(door.denied) == common.GUESS_BURST + int(door.now - 5000.0)  # and one for each second that passed
    before = len(door.denied)
    door.tick(after=1.0)
    assert len(door.denied) == before + 1


def test_a_right_passphrase_costs_no_guess():
    door = Door()
    for i in range(common.NETWORK_GUESS_BURST - 1):
        door.guess(f"g{i}", peer=f"203.0.113.{i}:4000")
    for i in range(3):  # a real user, in and out: the network's last guess is still there for whoever needs it
        door.login(f"real{i}", peer="203.0.113.200:5000")
    door.guess("last", peer="203.0.113.99:4000")
    assert "last" in door.denied and door.admitted == ["real0", "real1", "real2"]


@pytest.mark.slow  # minutes of attack, simulated: seconds of SPAKE2
def test_fresh_network_guesses_every_two_seconds_for_five_minutes_never_hold_back_a_first_login():
    """The outside round: one wrong guess every 2 s, each from a network never seen before; the real client, a first
    login from 127.0.0.1, waited 30 s twice and gave up: guesses queued ahead of it were checked one per 8 s."""
    door = Door()
    waits = []
    for i in range(150):
        door.guess(f"g{i}", peer=f"127.{1 + i // 250}.{i % 250}.2:4000")
        if i % 30 == 29:  # a real client arrives now and then, each a first login from a network of its own
            waits.append(door.login(f"real{i}", peer=f"10.{i}.0.1:5000"))
        door.tick(after=2.0)
    assert all(f"real{i}" in door.admitted for i in range(29, 150, 30))
    assert max(waits) <= 10.0
    assert sum(1 for line in door.log if "wrong passphrase" in line) <= 6  # about one line a minute


def test_wrong_passphrases_are_summed_up_at_most_once_a_minute():
    door = Door()
    for i in range(14):
        door.guess(f"g{i}", peer=f"203.0.{i % 9}.1:4000")
    door.tick(after=common.GUESS_REPORT)
    assert door.log == ["failed passphrase attempt from 203.0.0.1:4000 (further ones are counted and told once a "
                        "minute)", "13 wrong passphrases from 9 networks in the last minute"]
    door.tick(after=common.GUESS_REPORT)
    door.guess("later", peer="203.0.0.1:4000")
    assert door.log[-1].startswith("failed passphrase attempt from 203.0.0.1:4000")  # a quiet minute: at once again


def test_an_address_that_gave_the_passphrase_before_goes_first_until_it_guesses():
    door = Door()
    door.login("before", peer="198.51.100.5:1000")  # a real user, once
    for i in range(40):  # the budgets spent by guesses from forty networks
        door.guess(f"g{i}", peer=f"203.0.{i}.1:4000")
    assert not door.gate.guess_budget.ready(door.now)
    assert door.login("back", peer="198.51.100.5:2000") < 0.1 and door.admitted == ["before", "back"]
    door.login("guessing", peer="198.51.100.5:3000", secret="wrong")  # now it guessed: it waits its turn like any
    assert door.denied[-1] == "guessing"
    door.knock("again", peer="198.51.100.5:4000")
    assert door.stage("again") == "queued"


# ---------------------------------------------------------------------------------------------------
# SPAKE2 work: budgeted per network and in all; a flood costs nothing once its connections close


def test_hellos_from_connections_that_closed_before_their_turn_cost_no_spake2():
    door = Door(host=Host(status=common.OPEN))
    flood = [f"f{i}" for i in range(300)]
    door.gate.work_budget = common.Bucket(0.001, 0, door.now)  # no budget for now: every hello waits its turn
    for i, key in enumerate(flood):
        door.clients[key] = None
        door.apply(door.gate.accepted(key, f"127.1.{i % 256}.{1 + i // 256}:4000", door.now))
        door.apply(door.gate.received(key, HELLO, door.now))
        door.apply(door.gate.received(key, b"", door.now))  # and gone
    assert door.answered == [] and door.gate.pending == {} and door.log == []


@pytest.mark.slow  # minutes of attack, simulated: seconds of SPAKE2
def test_a_first_login_goes_first_past_a_flood_of_hellos_kept_open():
    """The outside round: ~148 hellos a second from 127.1.K.x, the server spending all its CPU on SPAKE2, the real
    client not served in 35 s. A network that knocks seldom now goes before those that flood."""
    door = Door(host=Host(status=common.OPEN))
    for second in range(20):
        for i in range(150):
            key = f"f{second}.{i}"
            door.clients[key] = None
            door.apply(door.gate.accepted(key, f"127.1.{(second * 150 + i) % 256}.{1 + i % 200}:4000", door.now))
            door.apply(door.gate.received(key, HELLO, door.now))
        door.tick(after=1.0)
    assert len(door.gate.pending) <= common.MAX_PENDING
    answers_per_second = len(door.answered) / 20
    took = door.login("real", peer="127.0.0.1:5000", limit=10)
    assert "real" in door.admitted and took <= 1.0
    assert answers_per_second <= common.NETWORK_WORK_RATE * 256 + common.NETWORK_WORK_BURST * 256 / 20


@pytest.mark.parametrize("attack", ["guesses", "flood"])
def test_a_reconnection_goes_through_at_once_during_either_attack(attack):
    resume_id, secret = os.urandom(16), os.urandom(32)
    door = Door(host=Host(status=common.OPEN, secrets={resume_id: secret}))
    for i in range(80):
        if attack == "guesses":
            door.guess(f"a{i}", peer=f"127.{1 + i // 200}.{i % 200}.2:4000")
        else:
            door.clients[f"a{i}"] = None
            door.apply(door.gate.accepted(f"a{i}", f"127.1.{i % 256}.9:4000", door.now))
            door.apply(door.gate.received(f"a{i}", HELLO, door.now))
    took = door.login("back", peer="127.0.0.1:6000", kind=RESUME, secret=secret, resume_id=resume_id)
    assert "back" in door.admitted and took <= 0.5


def test_spake2_work_is_budgeted_while_a_client_is_connected_and_resumptions_go_first():
    resume_id, secret = os.urandom(16), os.urandom(32)
    door = Door(host=Host(status=common.BUSY, secrets={resume_id: secret}))
    door.gate.work_budget = common.Bucket(10, 2, door.now)
    for i in range(6):  # hellos that arrived together, before the door worked
        door.clients[f"h{i}"] = common.ClientConnection(secret, RESUME, resume_id)
        door._apply(door.gate.accepted(f"h{i}", "192.0.2.1:4000", door.now))
        door.gate.received(f"h{i}", door.clients[f"h{i}"].data_to_send(), door.now)
    door.clients["guess"] = None
    door.gate.accepted("guess", "203.0.113.1:4000", door.now)
    door.gate.received("guess", HELLO, door.now)
    door.apply([])
    assert door.answered == ["h0", "h1"]  # the burst; the rest wait for the budget, the guess last
    door.tick(after=0.1)  # one more token
    assert door.answered == ["h0", "h1", "h2"]


# ---------------------------------------------------------------------------------------------------
# Room: who is dropped when too many knock at once


def test_room_is_made_by_dropping_from_the_network_that_knocked_most_then_idle_connections():
    door = Door(max_pending=4)
    door.knock("real", peer="198.51.100.7:1000")  # mid-handshake: hello answered
    for i in range(3):
        door.knock(f"idle{i}", hello=False, peer=f"203.0.113.{i}:4000")
    door.tick(after=common._Pending.PATIENCE["hello"])
    door.knock("newest", hello=False, peer="203.0.113.9:4000")
    assert door.dropped == ["idle0"] and "real" in door.gate.pending


def test_a_network_crowding_the_door_pushes_out_its_own_not_someone_elses():
    door = Door()
    door.knock("real", peer="203.0.113.1:1000")
    for i in range(12):  # a neighbour floods: its connections push out one another, not the real client
        door.knock(f"idle{i}", hello=False, peer=f"203.0.113.{10 + i}:4000")
    assert "real" in door.gate.pending
    assert door.dropped == [f"idle{i}" for i in range(12 + 1 - common.MAX_PENDING_PER_NETWORK)]


def test_a_reconnection_is_dropped_last_to_make_room():
    """A stranger fills the door with wrong guesses waiting their turn, then knocks once more while a client's
    reconnection waits for its confirmation: a guess goes, not the client."""
    resume_id, secret = os.urandom(16), os.urandom(32)
    door = Door(host=Host(secrets={resume_id: secret}), max_pending=8)
    for i in range(8):  # one network: five are checked at once, three wait
        door.guess(f"guess{i}", peer=f"198.51.100.{i}:4000")
    for i in range(5):
        door.knock(f"idle{i}", hello=False, peer=f"198.51.{i}.1:4000")
    door.knock("client", kind=RESUME, resume_id=resume_id, passphrase=secret, peer="192.0.2.7:5000")
    door.knock("bare", hello=False, peer="198.51.100.200:4000")
    assert "client" in door.gate.pending and "client" not in door.dropped
    assert door.until(lambda: door.stage("client") == "confirm", 1.0) < 0.5  # the SPAKE2 budget's next token
    door.confirm("client")
    assert "client" in door.admitted


def test_out_of_descriptors_drops_a_quarter_of_the_pending_idle_first():
    door = Door()
    for i in range(11):
        door.knock(f"idle{i}", hello=False, peer=f"203.0.{i}.1:4000")
    door.tick(after=common._Pending.PATIENCE["hello"])
    door.knock("real", peer="198.51.100.1:1000")  # answered a moment ago: its client computes
    door.apply(door.gate.overloaded(door.now))
    assert door.dropped == ["idle0", "idle1", "idle2"]
    assert door.log == ["out of file descriptors: dropped 3 pending connections to make room"]


def test_networks_are_slash_24_and_slash_64():
    assert common.network_of("192.0.2.77") == common.network_of("192.0.2.1") == "192.0.2.0/24"
    assert common.network_of("2001:db8:1:2::7") == common.network_of("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert common.network_of("::ffff:192.0.2.5") == "192.0.2.0/24"  # a dual-stack listener's IPv4 client


# ---------------------------------------------------------------------------------------------------
# The second outside round: holding the door with answered connections; spending the guessing budget


@pytest.mark.slow  # seconds of simulated attack, each a SPAKE2 half
def test_answered_connections_that_never_confirm_cannot_hold_the_door_against_first_logins():
    """Outside round two: 30 connections a second, each from a new network, each a precomputed hello and then
    silence, kept every real first login out (the answered ones outranked a newcomer when room was needed)."""
    door = Door()
    logins, admitted_after, confirmed = {}, {}, set()
    for step in range(20 * 30):  # 20 s, a stranger's connection every 1/30 s
        door.clients[f"s{step}"] = None
        door.apply(door.gate.accepted(f"s{step}", f"127.{60 + step // 250}.{step % 250}.2:4000", door.now))
        door.apply(door.gate.received(f"s{step}", HELLO, door.now))
        if step % 60 == 30:  # every 2 s, a real client's first login from a network of its own
            key = f"real{step}"
            logins[key] = door.now
            door.knock(key, peer=f"10.{step // 60}.0.1:5000")
        for key in logins:
            if door.stage(key) == "confirm" and key not in confirmed:
                confirmed.add(key)
                door.confirm(key)  # its client has computed: the confirmation comes back
            if key in door.admitted and key not in admitted_after:
                admitted_after[key] = door.now - logins[key]
        door.tick(1 / 30)
    assert len(logins) == 10 and set(admitted_after) == set(logins)
    assert max(admitted_after.values()) < 1.0


@pytest.mark.slow  # seconds of simulated attack, each a SPAKE2 half
def test_a_first_login_while_the_guessing_budget_is_spent_is_told_to_come_back_not_held_for_30_s():
    """Outside round two: guesses five a second from new networks spent the budget; a real client queued behind
    them waited 30 s and was told "someone may be interfering". Now it is told at once to come back later (and a
    pipe client does, by itself), and once the guesses stop it is served within seconds."""
    door = Door()
    for i in range(100):  # 20 s of guesses, five a second
        door.guess(f"g{i}", peer=f"127.{1 + i // 200}.{i % 200}.2:4000")
        door.tick(0.2)
    door.knock("real", peer="10.0.0.1:5000")
    assert door.outcome("real") == "Refused" and "told to come back later" in door.log[-1]
    served = None
    for attempt in range(10):  # the stranger stops; the client tries again every 2 s, as a pipe client does
        door.tick(2.0)
        key = f"again{attempt}"
        took = door.login(key, peer="10.0.0.1:5000", limit=5.0)
        if key in door.admitted:
            served = attempt * 2.0 + took
            break
    assert served is not None and served <= 10.0


def test_many_lines_from_a_flood_become_a_few_and_then_one_a_minute():
    lines = []
    door = common.Door(None, None, None, lines.append)
    for i in range(500):
        door.log(f"connection {i} dropped")
    assert len(lines) == common.Door.LOG_BURST
    door._log_at -= 1 / common.Door.LOG_RATE  # a minute on
    door.log(None)
    assert lines[-1] == f"({500 - common.Door.LOG_BURST} more connections dropped: not each shown, too many at once)"


def test_the_guessing_summary_is_never_swallowed_by_a_flood_of_other_lines():
    """The outside round: twelve junk connections used up the door's lines, then 52 wrong passphrases from 52 networks
    in two minutes were never told: the door's "(N more connections dropped ...)" took each minute's one line."""
    lines = []
    door = common.Door(None, None, None, lines.append)
    for i in range(500):
        door.log(f"connection {i} dropped")
    door._apply([common.Log("52 wrong passphrases from 52 networks in the last minute", paced=True)])
    assert lines[-1] == "52 wrong passphrases from 52 networks in the last minute"
    door._apply([common.Log("connection 501 dropped")])  # the rest still waits for its minute
    assert lines[-1] == "52 wrong passphrases from 52 networks in the last minute"


def test_a_first_login_that_gave_its_confirmation_is_checked_before_newer_guesses_never_dropped():
    """The outside round: guesses five a second, each from a new network, all at once; a real first login that came
    ten seconds in was let give its confirmation, then every newer guess was checked before it, for 30 s, and it was
    dropped unchecked: "someone may be interfering", exit 3. Once its confirmation is taken, its check comes in
    turn, whatever its network's standing: it is served, or told to come back later before it gives its confirmation
    away. (A person's client, which reads the greeting first and comes back after "later", stood behind every fresh
    network's newer guess.)"""
    door, confirmed = Door(), set()
    for step in range(50 * 5):  # 50 s, a stranger's hello every 0.2 s, confirmed as soon as it is answered
        door.clients[f"g{step}"] = None
        door.apply(door.gate.accepted(f"g{step}", f"127.{1 + step // 200}.{step % 200}.2:4000", door.now))
        door.apply(door.gate.received(f"g{step}", HELLO, door.now))
        if step == 50:  # a person's client: it read the greeting first, and came back twice, told "later"
            for probe in ("probe1", "probe2", "probe3"):
                door.clients[probe] = None
                door.apply(door.gate.accepted(probe, "10.0.0.1:4999", door.now))
                door.apply(door.gate.received(probe, b"", door.now))
            door.knock("real", peer="10.0.0.1:5000")
        for key in [key for key, pending in door.gate.pending.items() if pending.stage == "confirm"]:
            if key == "real":
                door.confirm(key)
            elif key not in confirmed:
                confirmed.add(key)
                door.apply(door.gate.received(key, common.frame(os.urandom(32)), door.now))
        door.tick(0.2)
    assert "real" in door.admitted or door.outcome("real") == "Refused", door.log[-3:]


def test_a_hello_shed_by_a_flood_of_silent_hellos_is_told_to_come_back_later_not_left_guessing():
    """The outside round: 150 connections a second, each from a new network, each a precomputed hello then silence:
    a real client's hello, waiting for its answer, was dropped to make room three times faster than hellos were
    answered, unanswered ("is the peer an aeschat v2 program?"), and a script's client gave up at once. A hello shed
    so is told to come back later, which a client does by itself, backing off as for a busy server. (The door takes
    what arrived together in one batch: here 30 connections every 0.2 s.)"""
    door = Door()
    for batch in range(5 * 5):  # 5 s of it
        for i in range(30):
            key, step = f"s{batch}.{i}", batch * 30 + i
            door.clients[key] = None
            door._apply(door.gate.accepted(key, f"127.{60 + step // 250}.{step % 250}.2:4000", door.now))
            door._apply(door.gate.received(key, HELLO, door.now))
            if (batch, i) == (15, 0):  # three seconds in, the real client comes among them
                door.clients["real"] = common.ClientConnection("pw")
                door._apply(door.gate.accepted("real", "10.0.0.1:5000", door.now))
                door._apply(door.gate.received("real", door.clients["real"].data_to_send(), door.now))
        door.apply([])
        if door.stage("real") == "confirm":
            door.confirm("real")
        door.tick(0.2)
    assert "real" in door.admitted or door.outcome("real") == "Refused"
    assert "real" in door.admitted or "dropped to make room" in [line for line in door.log if "10.0.0.1" in line][0]
