"""Durability: a 250 after DATA is a promise that survives kill -9.

Several smtplib clients (or one, the case in which the daemon may sync a commit on its event
loop rather than the journal's writer thread: which one did is not visible from here) stream
messages while the daemon is killed with SIGKILL and restarted on the same spool, four times.
Afterwards every message that got a 250 is in the Maildir
exactly once, intact; messages that did not get a 250 may or may not be there, but never twice.
"""

from __future__ import annotations

import smtplib
import socket
import struct
import threading
from collections import Counter

import pytest

from .conftest import LOCAL_RCPT, Daemon, accepted_msgid, body_of, header_values, poll, send, token

CLIENTS = 4
CYCLES = 4
PER_CYCLE = 25  # acknowledged messages between two kills


def body_for(i: int) -> bytes:
    return b"".join(b"line %d of message %d\r\n" % (n, i) for n in range(1 + i % 7))


class Stream:
    """Clients that send until told to stop, reconnecting whenever the daemon is down."""

    def __init__(self, daemon: Daemon, run: str, clients: int = CLIENTS) -> None:
        self.daemon = daemon
        self.run = run
        self.lock = threading.Lock()
        self.next = 0
        self.accepted: dict[str, int] = {}  # Message-ID -> message number
        self.attempted: dict[str, int] = {}
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)

    def message(self) -> tuple[str, int, bytes]:
        with self.lock:
            i = self.next
            self.next += 1
        mid = f"<{self.run}.{i}@durability.test>"
        with self.lock:
            self.attempted[mid] = i
        data = (
            f"From: stream@example.org\r\nTo: {LOCAL_RCPT}\r\nSubject: durability {i}\r\n"
            f"Message-ID: {mid}\r\nDate: Fri, 06 Mar 2026 10:00:00 +0000\r\n\r\n"
        ).encode()
        return mid, i, data + body_for(i)

    def client(self) -> None:
        s: smtplib.SMTP | None = None
        sent_in_session = 0
        try:
            while not self.stop.is_set():
                try:
                    if s is None:
                        s = self.daemon.smtp(timeout=15)
                        s.ehlo()
                        sent_in_session = 0
                    mid, i, data = self.message()
                    code, _ = s.mail("stream@example.org")
                    if code != 250:
                        raise smtplib.SMTPException(f"MAIL {code}")
                    code, _ = s.rcpt(LOCAL_RCPT)
                    if code != 250:
                        raise smtplib.SMTPException(f"RCPT {code}")
                    code, _ = s.data(data)
                    if code == 250:
                        with self.lock:
                            self.accepted[mid] = i
                    sent_in_session += 1
                    if code != 250 or sent_in_session >= 20:
                        s.quit()
                        s = None
                except (OSError, smtplib.SMTPException):
                    if s is not None:
                        s.close()
                    s = None
                    # the daemon is down or was just killed: pace the reconnection attempts
                    self.stop.wait(0.05)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            if s is not None:
                s.close()


def settle(daemon: Daemon) -> None:
    """Let the queue drain: a graceful restart says how much is still queued; wait for it."""
    assert daemon.stop() == 0, daemon.log()
    mark = daemon.log_mark()
    daemon.start(write=False)
    [ready] = daemon.wait_for_log(r"smtpd ready .*queued=(\d+)", since=mark)
    queued = int(ready.group(1))
    if queued:
        daemon.wait_for_log(r"mda delivery .*result=", since=mark, count=queued, timeout=60)


def delivered(daemon: Daemon) -> Counter[str]:
    ids: Counter[str] = Counter()
    for m in daemon.maildir_messages():
        for value in header_values(m, "message-id"):
            ids[value.decode()] += 1
    return ids


@pytest.mark.timeout(150)
@pytest.mark.parametrize("clients", [CLIENTS, 1])
def test_kill_9_loses_no_acknowledged_message(daemon: Daemon, clients: int) -> None:
    daemon.start()
    stream = Stream(daemon, token(), clients)
    stream.start()
    try:
        for cycle in range(CYCLES):
            target = stream.count() + PER_CYCLE
            if not poll(lambda t=target: stream.count() >= t or stream.errors, 40, 0.01):
                pytest.fail(
                    f"cycle {cycle}: only {stream.count()} messages accepted:\n{daemon.log()}"
                )
            assert not stream.errors, stream.errors
            daemon.kill()
            daemon.start(write=False)
        target = stream.count() + 5
        assert poll(lambda t=target: stream.count() >= t, 40, 0.01), daemon.log()
    finally:
        stream.join()
    assert not stream.errors, stream.errors
    accepted = dict(stream.accepted)
    assert len(accepted) >= CYCLES * PER_CYCLE + 5

    # every acknowledged message arrives
    def all_there() -> bool:
        return set(accepted) <= set(delivered(daemon))

    if not poll(all_there, 60, 0.2):
        missing = sorted(set(accepted) - set(delivered(daemon)))
        pytest.fail(f"{len(missing)} acknowledged messages lost: {missing[:10]}\n{daemon.log()}")

    settle(daemon)

    counts = delivered(daemon)
    twice = {mid: n for mid, n in counts.items() if n > 1}
    assert not twice, f"messages delivered more than once: {twice}"
    stray = set(counts) - set(stream.attempted)
    assert not stray, f"messages nobody sent: {stray}"
    for m in daemon.maildir_messages():
        [mid] = header_values(m, "message-id")
        i = stream.attempted[mid.decode()]
        assert body_of(m) == body_for(i).replace(b"\r\n", b"\n"), f"message {i} damaged"
    assert "result=PermFail" not in daemon.log()


@pytest.mark.timeout(60)
def test_queued_mail_survives_a_restart_and_is_delivered(daemon: Daemon) -> None:
    """Mail that cannot be delivered yet stays queued across kill -9 and goes out afterwards."""
    flaky = daemon.dir / "flaky"
    for sub in ("new", "cur"):
        (flaky / sub).mkdir(parents=True)
    (flaky / "tmp").write_bytes(b"in the way\n")
    config = (
        'table aliases { flaky = "@USER@" }\n'
        "listen on 127.0.0.1 port @PORT@\n"
        'action "flaky" maildir "@DIR@/flaky" alias <aliases>\n'
        'match from local for local action "flaky"\n'
    )
    daemon.start(config)
    toks = [token() for _ in range(3)]
    for tok in toks:
        accepted_msgid(
            send(
                daemon,
                "x@example.org",
                ["flaky@localhost"],
                f"Subject: {tok}\r\n\r\nqueued {tok}\r\n".encode(),
            )
        )
    daemon.wait_for_log(r"mda delivery .*result=TempFail", count=3)
    daemon.kill()
    (flaky / "tmp").unlink()
    (flaky / "tmp").mkdir()
    mark = daemon.log_mark()
    daemon.start(write=False)
    ready = daemon.wait_for_log(r"smtpd ready", since=mark)
    assert ready
    files = daemon.wait_for_files(flaky / "new", 3, timeout=30)
    contents = sorted(p.read_bytes() for p in files)
    for tok in toks:
        assert sum(tok.encode() in c for c in contents) == 1
    assert len(files) == 3


def test_sigterm_then_start_keeps_accepted_mail(daemon: Daemon) -> None:
    """Stopping between the 250 and the delivery loses nothing and duplicates nothing."""
    daemon.start()
    toks = []
    for _ in range(10):
        tok = token()
        toks.append(tok)
        accepted_msgid(
            send(daemon, "x@example.org", [LOCAL_RCPT], f"Subject: {tok}\r\n\r\n{tok}\r\n".encode())
        )
    assert daemon.stop() == 0
    daemon.start(write=False)
    for tok in toks:
        daemon.wait_for_message(tok)
    settle(daemon)
    assert len(daemon.maildir_messages()) == 10
    assert "Traceback" not in daemon.log()


def test_a_client_that_vanishes_after_the_final_dot_still_gets_its_mail_delivered(
    running: Daemon,
) -> None:
    """The session ends (a reset) while its message is being committed: the commit stands and
    the message is delivered, as it would have been after the 250 the client never read."""
    tokens = [token() for _ in range(20)]
    for tok in tokens:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.recv(1024)  # the banner
        # pipelined, so the dot arrives with the commands and the reset right after it
        sock.sendall(
            f"HELO client.test\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<{LOCAL_RCPT}>\r\n".encode()
        )
        replies = b""
        while replies.count(b"\r\n") < 3:
            replies += sock.recv(1024)
        sock.sendall(b"DATA\r\n")
        assert sock.recv(1024).startswith(b"354")
        sock.sendall(f"Subject: {tok}\r\n\r\ngone before the reply\r\n.\r\n".encode())
        sock.close()  # SO_LINGER 0: a reset, not a FIN
    for tok in tokens:
        running.wait_for_message(tok)
