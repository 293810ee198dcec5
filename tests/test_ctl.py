"""homemailctl, sendmail, mailq and newaliases: parsing, text layouts, exit codes, and the client
side of the control socket against a small fake daemon (a real Unix socket in tmp_path)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from homemail import control_protocol as proto
from homemail import ctl, offline
from homemail.control_protocol import Code, Request
from homemail.ctl import Command, Exit, UsageError

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent
HOMEMAILCTL = str(BIN / "homemailctl")
NOW = 1_700_000_000.0


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOMEMAIL_SOCKET=str(tmp_path / "no-daemon.sock"),
        HOMEMAIL_OFFLINE=str(tmp_path / "offline"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
    )
    env.update(extra)
    return env


def run_cli(
    tmp_path: Path, *args: str, prog: str = HOMEMAILCTL, stdin: bytes = b"", **env: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [prog, *args], input=stdin, capture_output=True, env=env_for(tmp_path, **env), timeout=30
    )


def linked(tmp_path: Path, name: str) -> str:
    """The console script under another name, as /usr/sbin/sendmail would be."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        path.symlink_to(HOMEMAILCTL)
    return str(path)


def envelope(**changes: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "id": "0123456789abcdef",
        "msgid": "01234567",
        "type": "mda",
        "sender": "alice@example.org",
        "rcpt": "bob@example.org",
        "dest": "bob@example.org",
        "user": "bob",
        "ctime": NOW - 133,
        "expire": NOW + 4 * 86400 + 3 * 3600 + 5,
        "next_try": NOW + 60,
        "last_try": NOW - 10,
        "retry": 2,
        "state": "pending",
        "last_error": "421 4.3.0 try later",
    }
    env.update(changes)
    return env


# --- the fake daemon ------------------------------------------------------------------------------

Handler = Callable[["FakeDaemon", socket.socket, Request], None]


class FakeDaemon:
    """Answers control requests from a table of handlers; records every request frame."""

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.requests: list[Request] = []
        self.frames: list[bytes] = []
        self.smtp_lines: list[bytes] = []
        self.events: dict[str, threading.Event] = {}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def event(self, name: str) -> threading.Event:
        return self.events.setdefault(name, threading.Event())

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            for line in reader:
                self.frames.append(line)
                req = proto.decode_request(line)
                self.requests.append(req)
                handler = self.handlers.get(req.verb)
                if handler is None:
                    conn.sendall(proto.reply_error(req.id, Code.INTERNAL, "no handler in test"))
                    continue
                try:
                    handler(self, conn, req)
                except OSError:
                    return
                if req.verb == "smtp":
                    return

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[dict[str, Handler]], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(handlers: dict[str, Handler]) -> FakeDaemon:
        fake = FakeDaemon(str(tmp_path / "control.sock"), handlers)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


def ok(result: Any) -> Handler:
    def handler(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(proto.reply_ok(req.id, result))

    return handler


def error(code: Code, message: str) -> Handler:
    def handler(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(proto.reply_error(req.id, code, message))

    return handler


def frames(*make: Callable[[int], bytes]) -> Handler:
    def handler(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(b"".join(m(req.id) for m in make))

    return handler


def cli(path: str, *args: str) -> int:
    return ctl.main(["--socket", path, *args])


# --- command line parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "verb", "args"),
    [
        ("show queue", "show queue", {}),
        ("show envelope 0123456789ABCDEF", "show envelope", {"id": "0123456789abcdef"}),
        ("show message 01234567", "show message", {"id": "01234567"}),
        ("show stats", "show stats", {}),
        ("show status", "show status", {}),
        ("show config", "show config", {}),
        ("schedule all", "schedule", {"id": "all"}),
        ("schedule 0123456789abcdef", "schedule", {"id": "0123456789abcdef"}),
        ("remove all", "remove", {"id": "all"}),
        ("remove 01234567", "remove", {"id": "01234567"}),
        ("pause envelope all", "pause envelope", {"id": "all"}),
        ("resume envelope 0123456789abcdef", "resume envelope", {"id": "0123456789abcdef"}),
        ("pause smtp", "pause smtp", {}),
        ("pause mda", "pause mda", {}),
        ("pause mta", "pause mta", {}),
        ("resume smtp", "resume smtp", {}),
        ("resume mda", "resume mda", {}),
        ("resume mta", "resume mta", {}),
        ("reload", "reload", {}),
        ("update table aliases", "update table", {"name": "aliases"}),
        ("log verbose", "log verbose", {}),
        ("log brief", "log brief", {}),
        ("alias list", "alias list", {}),
        (
            "alias add staff bob carol@example.org",
            "alias add",
            {"name": "staff", "targets": ["bob", "carol@example.org"]},
        ),
        ("alias remove staff", "alias remove", {"name": "staff"}),
        ("monitor", "monitor", {}),
        ("monitor --counters", "monitor", {"counters": True}),
        ("encrypt", "encrypt", {}),
        ("encrypt s3cret", "encrypt", {"string": "s3cret"}),
        ("mailq", "mailq", {}),
        ("newaliases", "newaliases", {}),
        ("help", "help", {}),
    ],
)
def test_parse_command(words: str, verb: str, args: dict[str, Any]) -> None:
    assert ctl.parse_command(words.split()) == Command(verb, args)


def test_every_daemon_verb_but_smtp_is_reachable_from_the_command_line() -> None:
    samples = {
        "show envelope": "show envelope 01234567",
        "show message": "show message 01234567",
        "schedule": "schedule all",
        "remove": "remove all",
        "pause envelope": "pause envelope all",
        "resume envelope": "resume envelope all",
        "update table": "update table x",
        "alias add": "alias add a b",
        "alias remove": "alias remove a",
        "secret set": "secret set isp me@example.org",
    }
    for verb in proto.VERBS:
        if verb == "smtp":
            continue
        assert ctl.parse_command(samples.get(verb, verb).split()).verb == verb


def test_parse_sendmail_subcommand_keeps_its_arguments() -> None:
    cmd = ctl.parse_command(["sendmail", "-t", "--socket", "x"])
    assert cmd == Command("sendmail", argv=["-t", "--socket", "x"])


@pytest.mark.parametrize(
    "words",
    [
        "",
        "show",
        "show queues",
        "show envelope",
        "show envelope all",
        "show envelope xyz",
        "show envelope 0123456789abcdef0",
        "show message all",
        "show stats extra",
        "schedule",
        "schedule everything",
        "schedule 1 2",
        "remove -1",
        "pause",
        "pause envelope",
        "pause lka",
        "resume smtp now",
        "reload now",
        "update table",
        "update aliases",
        "log debug",
        "alias",
        "alias add staff",
        "alias remove",
        "alias rename a b",
        "monitor --fast",
        "encrypt a b",
        "mailq -v",
        "stop",
        "SHOW QUEUE",
    ],
)
def test_parse_command_usage_errors(words: str) -> None:
    with pytest.raises(UsageError):
        ctl.parse_command(words.split())


@pytest.mark.parametrize(
    "words",
    [["update", "table", "a\nb"], ["alias", "add", "x", "y\r\nz"], ["alias", "remove", "a\x00"]],
)
def test_multi_line_arguments_are_bad_data(words: list[str]) -> None:
    with pytest.raises(Exit) as info:
        ctl.parse_command(words)
    assert info.value.status == ctl.EX_DATAERR


def test_parse_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMEMAIL_SOCKET", "/env.sock")
    assert ctl.parse_options(["show", "queue"]) == (
        ctl.Options("/env.sock", False),
        ["show", "queue"],
    )
    assert ctl.parse_options(["--socket", "/s", "--json", "show", "stats"]) == (
        ctl.Options("/s", True),
        ["show", "stats"],
    )
    assert ctl.parse_options(["--socket=/t", "reload"])[0].socket == "/t"
    assert ctl.parse_options(["--", "show", "stats"])[1] == ["show", "stats"]
    assert ctl.parse_options(["--help"])[1] == ["help"]
    for bad in (["--socket"], ["--socket="], ["--verbose", "show"], ["-x"]):
        with pytest.raises(UsageError):
            ctl.parse_options(bad)


# --- default paths --------------------------------------------------------------------------------


def test_default_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOMEMAIL_SOCKET", "/from/env.sock")
    assert ctl.default_socket() == "/from/env.sock"
    monkeypatch.delenv("HOMEMAIL_SOCKET")
    monkeypatch.setattr(ctl, "SYSTEM_SOCKET", str(tmp_path / "system.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert ctl.default_socket() == "/run/user/1000/homemail/control.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert ctl.default_socket() == f"/tmp/homemail-{os.getuid()}/homemail/control.sock"
    (tmp_path / "system.sock").touch()
    monkeypatch.setattr("homemail.ctl.os.geteuid", lambda: 0)
    assert ctl.default_socket() == str(tmp_path / "system.sock")
    monkeypatch.setattr("homemail.ctl.os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    mine = tmp_path / "run" / "homemail" / "control.sock"
    assert ctl.default_socket() == str(tmp_path / "system.sock")  # no daemon of our own
    mine.parent.mkdir(parents=True)
    mine.touch()
    assert ctl.default_socket() == str(mine)
    (tmp_path / "system.sock").unlink()
    mine.unlink()
    assert ctl.default_socket() == str(mine)  # neither: "not running" names our own


def test_socket_directories_another_user_could_have_made_are_not_trusted(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    assert ctl.untrusted_directory(str(mine)) is None
    assert ctl.untrusted_directory(str(mine / "not" / "there")) is None
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert ctl.untrusted_directory(str(sticky)) is None
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "anyone may write in" in (ctl.untrusted_directory(str(shared / "x")) or "")
    link = mine / "link"
    link.symlink_to(shared)  # our link, to a place anyone can fill
    assert "anyone may write in" in (ctl.untrusted_directory(str(link)) or "")
    assert ctl.untrusted_directory(str(link), shared_ok=True) is None  # a place the user chose
    ctl.ControlClient(str(shared / "control.sock"))._check_socket_dir()  # --socket there works
    if os.geteuid() == 0:  # another user's directory, link, and link in the middle of a chain
        theirs = sticky / "homemail-1006"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        assert "belongs to uid 65534" in (ctl.untrusted_directory(str(theirs / "x")) or "")
        their_link = sticky / "homemail"  # in root's sticky directory: only the link is theirs
        their_link.symlink_to(mine)
        os.lchown(their_link, 65534, 65534)
        assert "belongs to uid 65534" in (ctl.untrusted_directory(str(their_link)) or "")
        our_link = mine / "via"  # ours, to theirs, to ours: the middle of the chain counts
        our_link.symlink_to(their_link)
        assert "belongs to uid 65534" in (ctl.untrusted_directory(str(our_link / "x")) or "")
        foreign_socket_dir = sticky / "their-run"
        foreign_socket_dir.mkdir()
        os.chown(foreign_socket_dir, 65534, 65534)
        (mine / "hm.sock").symlink_to(foreign_socket_dir / "control.sock")  # ours, to theirs
        with pytest.raises(ctl.UntrustedSocket, match="belongs to uid 65534"):
            ctl.ControlClient(str(mine / "hm.sock"))._check_socket_dir()
        relative = mine / "rel"
        relative.symlink_to("../mine/.")  # relative links and dots are walked as well
        assert ctl.untrusted_directory(str(relative / "x")) is None


def test_the_private_socket_directories_are_made_or_closed_0700(tmp_path: Path) -> None:
    """/tmp/homemail-UID/homemail (no XDG_RUNTIME_DIR): made 0700, both levels; one of ours
    nobody else could write in is closed to 0700; one others could write in is refused."""
    from homemail.control import bind_control_socket

    fresh = tmp_path / "homemail-fresh" / "homemail" / "control.sock"
    bind_control_socket(str(fresh), private_dir=True).close()
    assert [oct(p.stat().st_mode & 0o777) for p in (fresh.parent, fresh.parent.parent)] == [
        "0o700",
        "0o700",
    ]
    older = tmp_path / "homemail-older" / "homemail" / "control.sock"
    older.parent.mkdir(parents=True)
    older.parent.parent.chmod(0o755)
    bind_control_socket(str(older), private_dir=True).close()
    assert oct(older.parent.parent.stat().st_mode & 0o777) == "0o700"
    shared = tmp_path / "homemail-shared" / "homemail" / "control.sock"
    shared.parent.mkdir(parents=True)
    shared.parent.parent.chmod(0o775)
    with pytest.raises(OSError, match="must be a directory of yours with mode 0700"):
        bind_control_socket(str(shared), private_dir=True)


def test_default_socket_matches_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    from homemail.smtpd import user_paths

    monkeypatch.delenv("HOMEMAIL_SOCKET", raising=False)
    monkeypatch.setattr("homemail.ctl.os.geteuid", lambda: 1000)
    for runtime in ("/run/user/1000", None):
        if runtime:
            monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        else:
            monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        assert ctl.default_socket() == user_paths().socket


def test_default_offline_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from homemail.smtpd import user_paths

    monkeypatch.setenv("HOMEMAIL_OFFLINE", "/from/env")
    assert ctl.default_offline_dir() == "/from/env"
    monkeypatch.delenv("HOMEMAIL_OFFLINE")
    system = tmp_path / "var-spool-offline"
    monkeypatch.setattr(ctl, "SYSTEM_OFFLINE", str(system))
    monkeypatch.setattr(ctl, "SYSTEM_SOCKET", str(tmp_path / "run-homemail" / "control.sock"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert ctl.default_offline_dir() == str(tmp_path / "state/homemail/spool/offline")
    assert ctl.default_offline_dir() == os.path.join(user_paths().spool, "offline")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert ctl.default_offline_dir() == os.path.expanduser("~/.local/state/homemail/spool/offline")
    system.mkdir()
    assert ctl.default_offline_dir() == str(system)


def test_the_offline_spool_recorded_beside_the_socket_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A daemon started with --spool records SPOOL/offline beside its socket: sendmail, knowing
    only the socket, writes there while that daemon is down; $HOMEMAIL_OFFLINE still wins."""
    monkeypatch.delenv("HOMEMAIL_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(ctl, "SYSTEM_OFFLINE", str(tmp_path / "no-system-spool"))
    monkeypatch.setattr(ctl, "SYSTEM_SOCKET", str(tmp_path / "no-system" / "control.sock"))
    fallback = str(tmp_path / "state/homemail/spool/offline")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = str(run / "ctl.sock")
    spool = tmp_path / "spool" / "offline"
    assert ctl.default_offline_dir(sock) == fallback  # no daemon ever recorded one
    offline.record_location(sock, str(spool))
    assert ctl.recorded_offline_dir(sock) is None  # the spool is not made yet
    assert ctl.default_offline_dir(sock) == fallback
    spool.mkdir(parents=True, mode=0o700)
    assert ctl.recorded_offline_dir(sock) == str(spool)
    assert ctl.default_offline_dir(sock) == str(spool)
    assert ctl.default_offline_dir() == fallback  # another socket's daemon: not this one
    monkeypatch.setenv("HOMEMAIL_OFFLINE", "/from/env")
    assert ctl.default_offline_dir(sock) == "/from/env"
    monkeypatch.delenv("HOMEMAIL_OFFLINE")

    # the system daemon's record is the fallback's system spool, when we may write there
    system_sock = tmp_path / "no-system" / "control.sock"
    system_sock.parent.mkdir()
    system_spool = tmp_path / "system-spool" / "offline"
    system_spool.mkdir(parents=True)
    offline.record_location(str(system_sock), str(system_spool))
    assert ctl.default_offline_dir(str(tmp_path / "nothing-here.sock")) == str(system_spool)
    assert ctl.default_offline_dir(sock) == str(spool)


def test_an_offline_record_another_user_could_have_made_is_ignored(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    shared = tmp_path / "shared"  # anyone may write in it, and it is not sticky
    shared.mkdir()
    shared.chmod(0o777)
    offline.record_location(str(shared / "ctl.sock"), str(spool))
    assert ctl.recorded_offline_dir(str(shared / "ctl.sock")) is None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    offline.record_location(str(private / "ctl.sock"), str(shared))  # into a shared directory
    assert ctl.recorded_offline_dir(str(private / "ctl.sock")) is None
    (private / "file").write_text("x")
    offline.record_location(str(private / "ctl.sock"), str(private / "file"))  # not a directory
    assert ctl.recorded_offline_dir(str(private / "ctl.sock")) is None
    os.unlink(private / "ctl.sock.offline")
    (private / "ctl.sock.offline").mkdir()  # not a link
    assert ctl.recorded_offline_dir(str(private / "ctl.sock")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_an_offline_record_of_another_users_is_ignored(tmp_path: Path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sock = str(run / "ctl.sock")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    offline.record_location(sock, str(spool))
    assert ctl.recorded_offline_dir(sock) == str(spool)
    os.chown(spool, nobody, -1)  # their spool, not ours
    assert ctl.recorded_offline_dir(sock) is None
    os.chown(spool, 0, -1)
    os.lchown(run / "ctl.sock.offline", nobody, -1)  # their link
    assert ctl.recorded_offline_dir(sock) is None


# --- text layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.4, "0s"),
        (1, "1s"),
        (59, "59s"),
        (60, "1m"),
        (133, "2m13s"),
        (3600, "1h"),
        (3661, "1h1m"),
        (86399, "23h59m"),
        (86400, "1d"),
        (4 * 86400 + 4 * 3600 + 59, "4d4h"),
        (3 * 86400 + 30, "3d"),
        (-133, "-2m13s"),
        (400 * 86400, "400d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert ctl.format_duration(seconds) == text


def test_format_queue_line() -> None:
    line = ctl.format_queue_line(envelope(), NOW)
    assert line == (
        "0123456789abcdef|mda|alice@example.org|bob@example.org|bob@example.org"
        "|2m13s|4d3h|2|pending|421 4.3.0 try later"
    )


def test_format_queue_line_null_sender_missing_and_hostile_fields() -> None:
    env = envelope(sender="", last_error="evil\r\n\x1b[31mred\u202e", state="paused")
    del env["ctime"]
    fields = ctl.format_queue_line(env, NOW).split("|")
    assert fields[2] == "<>"
    assert fields[5] == "-"
    assert fields[8] == "paused"
    assert fields[9] == "evil\\x0d\\x0a\\x1b[31mred\\u202e"
    assert "\n" not in ctl.format_queue_line(env, NOW)


def test_format_mailq() -> None:
    envs = [
        envelope(),
        envelope(id="0123456700000002", rcpt="carol@example.org", last_error="", state="running"),
        envelope(
            id="89abcdef00000001",
            msgid="89abcdef",
            sender="",
            rcpt="dave@example.net",
            last_error="",
            state="paused",
        ),
    ]
    text = ctl.format_mailq(envs)
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[1].startswith("01234567*")
    assert lines[1].endswith("alice@example.org")
    assert lines[2].strip() == "(421 4.3.0 try later)"
    assert lines[3].strip() == "bob@example.org"
    assert lines[4].strip() == "carol@example.org"
    assert lines[6].startswith("89abcdef!") and lines[6].endswith("<>")
    assert lines[-1] == "-- 2 messages, 3 recipients"
    assert time.strftime("%a %b %d %H:%M:%S", time.localtime(NOW - 133)) in lines[1]


def test_format_mailq_empty() -> None:
    assert ctl.format_mailq([]) == "Mail queue is empty\n"


def test_format_event() -> None:
    assert (
        ctl.format_event("delivery", {"evpid": "ab", "result": "ok"})
        == "delivery evpid=ab result=ok"
    )
    assert (
        ctl.format_event("x", {"text": 'a "b"', "n": 3, "l": [1], "e": "", "nl": "a\nb"})
        == 'x text="a \\"b\\"" n=3 l=[1] e="" nl="a\\nb"'
    )


def test_counter_table_repeats_its_header_every_20_rows() -> None:
    table = ctl.CounterTable()
    out: list[str] = []
    for i in range(45):
        out += table.lines({"smtp.session": i, "queue.commit": 0, "load": 0.5})
    headers = [n for n, line in enumerate(out) if "smtp.session" in line]
    assert headers == [0, 21, 42]
    assert len(out) == 45 + 3
    assert out[1].split() == ["0", "0", "0.5"]
    assert len({len(line) for line in out}) == 1
    assert table.lines({"other": 1})[0].split() == ["other"]  # new keys: a new header


@pytest.mark.parametrize(
    ("words", "result", "text"),
    [
        ("show stats", {"b.x": 2, "a.y": 1}, "a.y=1\nb.x=2"),
        ("show status", {"smtp": "running", "mda": "paused"}, "smtp: running\nmda: paused"),
        ("show envelope 01234567", {"z": 1, "a": "x", "l": ["s"]}, 'a: x\nl: ["s"]\nz: 1'),
        ("show config", {"text": "listen on localhost\n"}, "listen on localhost"),
        ("schedule all", {"count": 3}, "3 envelopes scheduled"),
        ("schedule 01234567", {"count": 1}, "1 envelope scheduled"),
        ("remove all", {"count": 0}, "0 envelopes removed"),
        ("pause envelope all", {"count": 2}, "2 envelopes paused"),
        ("resume envelope all", {"count": 2}, "2 envelopes resumed"),
        ("pause smtp", {}, "smtp paused"),
        ("resume mta", {}, "mta resumed"),
        ("update table aliases", {"table": "aliases"}, "table aliases updated"),
        ("log verbose", {}, "logging verbose"),
        ("alias add staff a b", {"file": "/etc/aliases"}, "alias staff added"),
        ("alias remove staff", {"file": "/etc/aliases"}, "alias staff removed"),
        (
            "alias list",
            {
                "file": "/f",
                "aliases": [
                    {"name": "a", "targets": ["b", "c@x"]},
                    {"name": "d", "targets": ["e"]},
                ],
            },
            "a: b, c@x\nd: e",
        ),
        ("alias list", {"file": "/f", "aliases": []}, "no aliases in /f"),
    ],
)
def test_describe(words: str, result: Any, text: str) -> None:
    assert ctl.describe(ctl.parse_command(words.split()), result) == text


# --- passwords ----------------------------------------------------------------------------------


def test_hash_and_verify() -> None:
    hashed = ctl.hash_password("correct horse")
    scheme, n, r, p, salt, digest = hashed.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert ctl.verify_password("correct horse", hashed)
    assert not ctl.verify_password("correct horse ", hashed)
    assert not ctl.verify_password("", hashed)
    assert ctl.hash_password("correct horse") != hashed  # salted


def test_verify_unicode_password() -> None:
    assert ctl.verify_password("pässwörd", ctl.hash_password("pässwörd"))


@pytest.mark.parametrize(
    "hashed",
    [
        "",
        "scrypt",
        "$7$abc",
        "scrypt$16384$8$1$AAAA$AAAA",  # salt and key too short
        "scrypt$16385$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # N not a power of two
        "scrypt$1048576$64$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # too much memory
        "scrypt$16384$8$1$not base64!$" + "A" * 44,
        "scrypt$-1$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "scrypt$١٦٣٨٤$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
        "bcrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,
    ],
)
def test_verify_refuses_malformed_hashes(hashed: str) -> None:
    assert ctl.verify_password("x", hashed) is False


def test_passwords_with_line_breaks_are_refused() -> None:
    hashed = ctl.hash_password("a")
    assert not ctl.verify_password("a\n", hashed)
    assert not ctl.verify_password("a\udcff", hashed)
    for bad in ("", "a\nb", "a\rb", "a\x00"):
        with pytest.raises(Exit) as info:
            ctl.hash_password(bad)
        assert info.value.status == ctl.EX_DATAERR


def test_encrypt_from_the_command_line_and_stdin(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "encrypt", "hunter2")
    assert done.returncode == 0
    assert ctl.verify_password("hunter2", done.stdout.decode().strip())
    done = run_cli(tmp_path, "encrypt", stdin=b"from stdin\n")
    assert done.returncode == 0
    assert ctl.verify_password("from stdin", done.stdout.decode().strip())
    assert run_cli(tmp_path, "encrypt", stdin=b"").returncode == ctl.EX_DATAERR


# --- sendmail: flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["bob@example.org"], {"recipients": ["bob@example.org"]}),
        (["-t"], {"extract": True}),
        (["-i"], {"ignore_dots": True}),
        (["-oi"], {"ignore_dots": True}),
        (["-ti"], {"extract": True, "ignore_dots": True}),
        (
            ["-t", "-oi", "-oem", "-odi", "-odb", "-oQ/var/spool"],
            {"extract": True, "ignore_dots": True},
        ),
        (["-f", "me@example.org"], {"sender": "me@example.org"}),
        (["-fme@example.org"], {"sender": "me@example.org"}),
        (["-r", "<>"], {"sender": "<>"}),
        (["-F", "Cron  Daemon"], {"fullname": "Cron Daemon"}),
        (["-FCron\nDaemon"], {"fullname": "Cron Daemon"}),
        (["-N", "never"], {"notify": "NEVER"}),
        (["-N", "success,Failure,delay"], {"notify": "SUCCESS,FAILURE,DELAY"}),
        (["-Nfailure"], {"notify": "FAILURE"}),
        (["-R", "hdrs"], {"ret": "HDRS"}),
        (["-RFULL"], {"ret": "FULL"}),
        (["-V", "abc+=x"], {"envid": "abc+=x"}),
        (["-bm", "a@x.org"], {"recipients": ["a@x.org"]}),
        (["-bs"], {"mode": "smtp"}),
        (["-bp"], {"mode": "mailq"}),
        (["-bi"], {"mode": "newaliases"}),
        (["-q"], {"mode": "queue"}),
        (["-v", "-B", "8BITMIME", "-L", "cron", "-B7BIT"], {}),
        (
            ["-i", "--", "-odd@example.org"],
            {"ignore_dots": True, "recipients": ["-odd@example.org"]},
        ),
        (["a@x.org", "-t"], {"recipients": ["a@x.org", "-t"]}),
        (
            ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
            {"fullname": "CronDaemon", "ignore_dots": True, "recipients": ["root"]},
        ),
        # clustered flags and attached values, as Sendmail's getopt takes them
        (["-U"], {}),
        (["-Uti"], {"extract": True, "ignore_dots": True}),
        (["-it"], {"extract": True, "ignore_dots": True}),
        (["-tf", "me@example.org"], {"extract": True, "sender": "me@example.org"}),
        (["-tfme@example.org"], {"extract": True, "sender": "me@example.org"}),
        (["-fuser", "bob"], {"sender": "user", "recipients": ["bob"]}),
        (["-Uoi", "bob"], {"ignore_dots": True, "recipients": ["bob"]}),
        (["-o", "i"], {"ignore_dots": True}),
        (["-toem"], {"extract": True}),
        (["-b", "s"], {"mode": "smtp"}),
        (["-vbs"], {"mode": "smtp"}),
        (["-Uq"], {"mode": "queue"}),
        (
            ["-tNnever", "-UR", "hdrs", "a@x.org"],
            {"extract": True, "notify": "NEVER", "ret": "HDRS", "recipients": ["a@x.org"]},
        ),
        (
            ["-tF", "Cron Daemon", "-iV", "id1"],
            {"extract": True, "fullname": "Cron Daemon", "ignore_dots": True, "envid": "id1"},
        ),
        (["-tB", "8BITMIME", "-vL", "cron"], {"extract": True}),
    ],
)
def test_parse_sendmail(argv: list[str], expected: dict[str, Any]) -> None:
    assert ctl.parse_sendmail(argv) == ctl.SendmailArgs(**expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["-x"],
        ["-f"],
        ["-t", "-F"],
        ["-o"],
        ["-bd"],
        ["-bt"],
        ["-b"],
        ["-N", "sometimes"],
        ["-N", "never,success"],
        ["-N", ""],
        ["-R", "body"],
        ["-V", "has space"],
        ["-V", "x" * 101],
        ["-qR"],
        ["-tx"],
        ["-bp", "bob@example.org"],
        ["-q", "bob@example.org"],
        ["-Ux"],
        ["-tf"],
        ["-tqR"],
        ["-ib"],
        ["-tbz"],
        ["-tN", "sometimes"],
    ],
)
def test_parse_sendmail_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        ctl.parse_sendmail(argv)


def test_xtext() -> None:
    assert ctl.xtext("abc+=x") == "abc+2B+3Dx"
    assert ctl.xtext("a b") == "a+20b"


# --- sendmail: the message ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "ignore_dots", "expected"),
    [
        (b"a\n.\nb\n", False, b"a\n"),
        (b"a\r\n.\r\nb\r\n", False, b"a\r\n"),
        (b"a\n.", False, b"a\n"),
        (b"a\n..\nb\n", False, b"a\n..\nb\n"),
        (b"a\n. \nb\n", False, b"a\n. \nb\n"),
        (b"a\n.\nb\n", True, b"a\n.\nb\n"),
        (b"x" * 70000 + b".\nmore\n", False, b"x" * 70000 + b".\nmore\n"),
    ],
)
def test_read_input_dot_handling(data: bytes, ignore_dots: bool, expected: bytes) -> None:
    assert ctl.read_input(io.BytesIO(data), ignore_dots=ignore_dots) == expected


@pytest.mark.parametrize("ignore_dots", [True, False])
def test_read_input_limit(ignore_dots: bool) -> None:
    with pytest.raises(Exit) as info:
        ctl.read_input(io.BytesIO(b"line\n" * 100), ignore_dots=ignore_dots, limit=50)
    assert info.value.status == ctl.EX_DATAERR


def test_to_crlf() -> None:
    assert ctl.to_crlf(b"a\nb\r\nc\rd\n\ne") == b"a\r\nb\r\nc\r\nd\r\n\r\ne"


def test_split_message_and_header_recipients() -> None:
    raw = ctl.to_crlf(
        b"From alice Mon Jan  1 00:00:00 2024\n"
        b"To: Bob <bob@example.org>,\n carol@example.org\n"
        b'Cc: "Doe, Dan" <dan@example.org> (the boss)\n'
        b"Bcc: secret@example.org\n"
        b"Subject: hi\n"
        b"\n"
        b"To: not-a-header@example.org\n"
    )
    parsed = ctl.split_message(raw)
    assert [name for name, _ in parsed.fields] == ["to", "cc", "bcc", "subject"]
    assert parsed.body == b"To: not-a-header@example.org\r\n"
    assert ctl.header_recipients(parsed) == [
        "bob@example.org",
        "carol@example.org",
        "dan@example.org",
        "secret@example.org",
    ]


def test_split_message_without_headers() -> None:
    parsed = ctl.split_message(b"just a body\r\nline two\r\n")
    assert parsed.fields == []
    assert parsed.body == b"just a body\r\nline two\r\n"


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        ("bob@example.org", ["bob@example.org"]),
        ("root", ["root"]),
        ("a@x.org, b@y.org;c@z.org", ["a@x.org", "b@y.org", "c@z.org"]),
        ("undisclosed-recipients:;", []),
        ("Team: a@x.org, Bob <b@y.org>;, c@z.org", ["a@x.org", "b@y.org", "c@z.org"]),
        ('"Smith, J" <j@x.org>, "a<b" <k@x.org>', ["j@x.org", "k@x.org"]),
        ("j@x.org (Smith, J), k@x.org", ["j@x.org", "k@x.org"]),
        ("<@relay.example:j@x.org>", ["j@x.org"]),
        ("user@[IPv6:2001:db8::1]", ["user@[IPv6:2001:db8::1]"]),
        ("a@x.org,,", ["a@x.org"]),
        ("", []),
        (";sleep 66;", ["sleep 66"]),
    ],
)
def test_split_addresses(value: str, addresses: list[str]) -> None:
    assert ctl.split_addresses(value) == addresses


def test_normalize_recipient() -> None:
    assert ctl.normalize_recipient("root", "host.example") == "root@host.example"
    assert ctl.normalize_recipient("Bob@Example.ORG", "h") == "Bob@example.org"
    for bad in (";sleep 66;", "a b@x.org", "a@", "@x.org", "a@x..org", "a\n@x.org", "`id`@x.org "):
        with pytest.raises(Exit) as info:
            ctl.normalize_recipient(bad, "host.example")
        assert info.value.status == ctl.EX_DATAERR


def test_normalize_sender() -> None:
    assert ctl.normalize_sender("<>", "h.example") == ""
    assert ctl.normalize_sender("", "h.example") == ""
    assert ctl.normalize_sender("<me@x.org>", "h.example") == "me@x.org"
    assert ctl.normalize_sender("me", "h.example") == "me@h.example"
    with pytest.raises(Exit):
        ctl.normalize_sender(";sleep 66;", "h.example")


def build(raw: bytes, *, remove_bcc: bool = True, fullname: str = "") -> bytes:
    return ctl.build_message(
        ctl.split_message(ctl.to_crlf(raw)),
        remove_bcc=remove_bcc,
        from_address="alice@host.example",
        fullname=fullname,
        domain="host.example",
        now=NOW,
    )


def test_build_message_adds_missing_headers() -> None:
    msg = build(b"Subject: x\n\nhi\n", fullname="Alice Q. User")
    head, _, body = msg.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"Subject: x"
    assert lines[1] == b'From: "Alice Q. User" <alice@host.example>'
    assert lines[2].startswith(b"Date: ")
    assert lines[3].startswith(b"Message-ID: <") and lines[3].endswith(b"@host.example>")
    assert body == b"hi\r\n"
    assert b"\n" not in msg.replace(b"\r\n", b"")


def test_build_message_keeps_existing_headers() -> None:
    raw = b"From: x@y.org\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <a@b>\n\nhi"
    assert build(raw) == ctl.to_crlf(raw) + b"\r\n"


def test_build_message_encodes_a_unicode_full_name() -> None:
    msg = build(b"\nhi\n", fullname="Jörg")
    assert b"From: =?utf-8?" in msg
    assert msg.isascii()


def test_build_message_removes_bcc_with_its_continuation_lines() -> None:
    raw = b"To: a@x.org\nBcc: s1@x.org,\n s2@x.org\nBCC: s3@x.org\nSubject: s\n\nBcc: body@x.org\n"
    msg = build(raw)
    assert b"s1@" not in msg and b"s2@" not in msg and b"s3@" not in msg
    assert b"Bcc: body@x.org" in msg
    assert b"Subject: s" in msg
    kept = build(raw, remove_bcc=False)
    assert b"Bcc: s1@x.org,\r\n s2@x.org" in kept


def test_build_message_body_without_header_section() -> None:
    msg = build(b"no headers here\n")
    assert msg.endswith(b"\r\n\r\nno headers here\r\n")
    assert msg.startswith(b"From: alice@host.example\r\n")


# --- against a real socket with nobody listening --------------------------------------------------


def test_daemon_not_running(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--socket", "/nonexistent", "show", "stats")
    assert done.returncode == ctl.EX_UNAVAILABLE
    assert done.stderr.decode() == (
        "homemailctl: the daemon is not running (no socket at /nonexistent)\n"
    )
    assert done.stdout == b""


def test_connection_refused_is_daemon_not_running(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # a socket file nobody listens on: ECONNREFUSED
    done = run_cli(tmp_path, "--socket", str(path), "show", "queue")
    assert done.returncode == ctl.EX_UNAVAILABLE
    assert b"not running" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["schedule", "all"],
        ["show", "queue"],
        ["monitor"],
        ["reload"],
        ["mailq"],
        ["newaliases"],
        ["sendmail", "-bp"],
        ["sendmail", "-q"],
        ["sendmail", "-bs"],
    ],
)
def test_every_daemon_command_says_not_running(tmp_path: Path, args: list[str]) -> None:
    done = run_cli(tmp_path, "--socket", "/nonexistent", *args)
    assert done.returncode == ctl.EX_UNAVAILABLE, done.stderr
    assert b"the daemon is not running" in done.stderr


@pytest.mark.parametrize(
    "args", [[], ["bogus"], ["show"], ["--bogus", "show", "stats"], ["schedule", "xyz"]]
)
def test_usage_errors_exit_64(tmp_path: Path, args: list[str]) -> None:
    done = run_cli(tmp_path, "--socket", "/nonexistent", *args)
    assert done.returncode == ctl.EX_USAGE
    assert b"usage: homemailctl" in done.stderr
    assert done.stdout == b""


def test_undecodable_argument_is_bad_data(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], tmp_path: Path
) -> None:
    fake = daemon({"update table": ok({"table": "x"})})
    done = run_cli(tmp_path, "--socket", fake.path, "update", "table", os.fsdecode(b"\xff"))
    assert done.returncode == ctl.EX_DATAERR
    assert fake.frames == []
    done = run_cli(
        tmp_path, os.fsdecode(b"b\xffb@example.org"), prog=linked(tmp_path, "sendmail"), stdin=b"x"
    )
    assert done.returncode == ctl.EX_DATAERR
    assert b"\\udcff" in done.stderr


def test_help(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--help")
    assert done.returncode == 0
    assert b"show queue" in done.stdout


def test_mailq_and_newaliases_by_name_with_the_daemon_down(tmp_path: Path) -> None:
    for name in ("mailq", "newaliases"):
        done = run_cli(tmp_path, prog=linked(tmp_path, name))
        assert done.returncode == ctl.EX_UNAVAILABLE
        assert done.stderr.decode().startswith(f"{name}: the daemon is not running (no socket at ")
    assert run_cli(tmp_path, "-x", prog=linked(tmp_path, "mailq")).returncode == ctl.EX_USAGE
    assert run_cli(tmp_path, "x", prog=linked(tmp_path, "newaliases")).returncode == ctl.EX_USAGE


def test_cli_does_not_import_aiosmtpd() -> None:
    code = (
        "import sys, homemail.ctl; sys.exit('aiosmtpd' in sys.modules or 'asyncio' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


# --- sendmail with the daemon down: the offline spool ---------------------------------------------


def spooled(tmp_path: Path) -> list[offline.OfflineMessage]:
    d = str(tmp_path / "offline")
    return [offline.read(d, name, expected_uid=os.getuid()) for name in offline.pending(d)]


def test_sendmail_t_oi_spools_offline(tmp_path: Path) -> None:
    message = (
        b"To: Bob <bob@example.org>\nCc: carol@example.org\nBcc: secret@example.org\n"
        b"Subject: x\n\nhi\n.\nstill here\n"
    )
    done = run_cli(tmp_path, "-t", "-oi", prog=linked(tmp_path, "sendmail"), stdin=message)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"" and done.stderr == b""
    [item] = spooled(tmp_path)
    assert item.rcpts == ["bob@example.org", "carol@example.org", "secret@example.org"]
    assert item.uid == os.getuid()
    assert item.sender.endswith("@" + ctl.local_domain())
    assert b"secret@example.org" not in item.message
    assert b"Bcc" not in item.message
    assert b"Subject: x\r\n" in item.message
    assert b"\r\n\r\nhi\r\n.\r\nstill here\r\n" in item.message
    assert b"\nFrom: " in item.message and b"\nDate: " in item.message
    assert b"\nMessage-ID: <" in item.message
    assert b"\n" not in item.message.replace(b"\r\n", b"")


def test_sendmail_without_i_stops_at_a_lone_dot(tmp_path: Path) -> None:
    done = run_cli(
        tmp_path,
        "bob@example.org",
        prog=linked(tmp_path, "sendmail"),
        stdin=b"Subject: x\n\nhi\n.\nlost\n",
    )
    assert done.returncode == 0, done.stderr
    [item] = spooled(tmp_path)
    assert item.message.endswith(b"\r\n\r\nhi\r\n")


def test_sendmail_subcommand_with_options_spools_offline(tmp_path: Path) -> None:
    done = run_cli(
        tmp_path,
        "--socket",
        str(tmp_path / "none.sock"),
        "sendmail",
        "-f",
        "<>",
        "-F",
        "Ignored",
        "-N",
        "failure,delay",
        "-R",
        "hdrs",
        "-V",
        "env-1",
        "--",
        "root",
        "Bob <bob@example.org>",
        stdin=b"Subject: ol\xc3\xa9\n\nb\xc3\xb6dy\n",
    )
    assert done.returncode == 0, done.stderr
    [item] = spooled(tmp_path)
    assert item.sender == ""
    assert item.rcpts == [f"root@{ctl.local_domain()}", "bob@example.org"]
    assert item.options == {
        "notify": "FAILURE,DELAY",
        "ret": "HDRS",
        "envid": "env-1",
        "body": "8BITMIME",
        "smtputf8": "1",
    }
    assert b"Ignored" in item.message  # -F names the added From: even with a null sender


def test_sendmail_bad_recipient_is_65(tmp_path: Path) -> None:
    done = run_cli(tmp_path, ";sleep 66;", prog=linked(tmp_path, "sendmail"), stdin=b"x\n")
    assert done.returncode == ctl.EX_DATAERR
    assert b"invalid recipient" in done.stderr
    assert spooled(tmp_path) == []


def test_sendmail_bad_header_recipient_is_65(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "-t", prog=linked(tmp_path, "sendmail"), stdin=b"To: a b c@x\n\nx\n")
    assert done.returncode == ctl.EX_DATAERR
    assert spooled(tmp_path) == []


def test_sendmail_sends_to_the_good_recipients_despite_a_malformed_one(tmp_path: Path) -> None:
    done = run_cli(
        tmp_path,
        "-t",
        "carol@example.org",
        "not an address@@",
        prog=linked(tmp_path, "sendmail"),
        stdin=b"To: bob@example.org, bad address@@x\nSubject: s\n\nx\n",
    )
    assert done.returncode == ctl.EX_DATAERR  # told, as for a refused recipient
    assert done.stderr.count(b"invalid recipient") == 2, done.stderr
    [item] = spooled(tmp_path)
    assert item.rcpts == ["carol@example.org", "bob@example.org"]


@pytest.mark.parametrize("args", [[], ["-t"], ["-oi"]])
def test_sendmail_without_recipients_is_64(tmp_path: Path, args: list[str]) -> None:
    done = run_cli(tmp_path, *args, prog=linked(tmp_path, "sendmail"), stdin=b"Subject: x\n\nhi\n")
    assert done.returncode == ctl.EX_USAGE
    assert b"no recipients" in done.stderr
    assert spooled(tmp_path) == []


def test_sendmail_unknown_flag_is_64(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "-X", "/tmp/log", "bob@example.org", prog=linked(tmp_path, "sendmail"))
    assert done.returncode == ctl.EX_USAGE
    assert b"usage: sendmail" in done.stderr


def test_sendmail_offline_spool_unwritable_is_tempfail(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done = run_cli(
        tmp_path,
        "bob@example.org",
        prog=linked(tmp_path, "sendmail"),
        stdin=b"x\n",
        HOMEMAIL_OFFLINE=str(tmp_path / "file" / "offline"),
    )
    assert done.returncode == ctl.EX_TEMPFAIL
    assert b"offline spool" in done.stderr


# --- against the fake daemon ----------------------------------------------------------------------


def test_show_stats_request_frame_and_output(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"show stats": ok({"smtp.session": 4, "queue.commit": 2, "uptime": 60})})
    assert cli(fake.path, "show", "stats") == 0
    assert capsys.readouterr().out == "queue.commit=2\nsmtp.session=4\nuptime=60\n"
    assert json.loads(fake.frames[0]) == {"v": 1, "id": 1, "verb": "show stats", "args": {}}


def test_json_output(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"show status": ok({"smtp": "running", "queue": 3})})
    assert cli(fake.path, "--json", "show", "status") == 0
    assert json.loads(capsys.readouterr().out) == {"smtp": "running", "queue": 3}


@pytest.mark.parametrize(
    ("words", "verb", "args"),
    [
        ("schedule all", "schedule", {"id": "all"}),
        ("remove 0123456789abcdef", "remove", {"id": "0123456789abcdef"}),
        ("pause envelope all", "pause envelope", {"id": "all"}),
        ("resume envelope 01234567", "resume envelope", {"id": "01234567"}),
        ("pause smtp", "pause smtp", {}),
        ("resume mda", "resume mda", {}),
        ("update table users", "update table", {"name": "users"}),
        ("log brief", "log brief", {}),
        ("alias add staff bob carol", "alias add", {"name": "staff", "targets": ["bob", "carol"]}),
        ("alias remove staff", "alias remove", {"name": "staff"}),
        ("show envelope 0123456789abcdef", "show envelope", {"id": "0123456789abcdef"}),
    ],
)
def test_request_frames(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    capsys: pytest.CaptureFixture[str],
    words: str,
    verb: str,
    args: dict[str, Any],
) -> None:
    fake = daemon({verb: ok({"count": 1})})
    assert cli(fake.path, *words.split()) == 0
    [frame] = fake.frames
    assert frame.endswith(b"\n")
    assert json.loads(frame) == {"v": 1, "id": 1, "verb": verb, "args": args}
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (Code.FORBIDDEN, 77),
        (Code.NOT_FOUND, 1),
        (Code.UNAVAILABLE, 75),
        (Code.TOO_MANY, 75),
        (Code.BAD_REQUEST, 65),
        (Code.INTERNAL, 70),
        (Code.VERSION, 76),
        (Code.CONFLICT, 1),
    ],
)
def test_error_replies_map_to_exit_codes(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    capsys: pytest.CaptureFixture[str],
    code: Code,
    status: int,
) -> None:
    fake = daemon({"schedule": error(code, "schedule: some reason")})
    assert cli(fake.path, "schedule", "all") == status
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "homemailctl: schedule: some reason\n"


def test_forbidden_from_a_subprocess(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], tmp_path: Path
) -> None:
    fake = daemon({"remove": error(Code.FORBIDDEN, "remove: permission denied")})
    done = run_cli(tmp_path, "--socket", fake.path, "remove", "all")
    assert done.returncode == ctl.EX_NOPERM
    assert done.stderr == b"homemailctl: remove: permission denied\n"


def test_error_with_id_0_is_the_answer(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon answers a connection over the per-uid limit with id 0."""
    fake = daemon(
        {
            "show stats": frames(
                lambda i: proto.reply_error(0, Code.TOO_MANY, "too many connections")
            )
        }
    )
    assert cli(fake.path, "show", "stats") == ctl.EX_TEMPFAIL
    assert "too many connections" in capsys.readouterr().err


def test_reload_conflict_prints_the_config_error_and_exits_78(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"reload": error(Code.CONFLICT, "smtpd.conf:3:1: unknown keyword\n  lisen on")})
    assert cli(fake.path, "reload") == ctl.EX_CONFIG
    assert capsys.readouterr().err == "homemailctl: smtpd.conf:3:1: unknown keyword\n  lisen on\n"
    fake.handlers["reload"] = ok({"reloaded": True})
    assert cli(fake.path, "reload") == 0
    assert capsys.readouterr().out == "configuration reloaded\n"


def test_garbage_from_the_daemon_is_a_protocol_error(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"show stats": frames(lambda i: b"HTTP/1.1 400 Bad Request\r\n\r\n")})
    assert cli(fake.path, "show", "stats") == ctl.EX_PROTOCOL
    fake.handlers["show stats"] = frames(lambda i: proto.reply_ok(i + 5, {}))
    assert cli(fake.path, "show", "stats") == ctl.EX_PROTOCOL
    fake.handlers["show stats"] = frames(lambda i: b"[" * 30000 + b"\n")
    assert cli(fake.path, "show", "stats") == ctl.EX_PROTOCOL
    fake.handlers["show stats"] = frames(lambda i: b"x" * (proto.MAX_FRAME + 10))
    assert cli(fake.path, "show", "stats") == ctl.EX_PROTOCOL
    assert "protocol error" in capsys.readouterr().err


def test_daemon_hanging_up_is_tempfail(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    def hang_up(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.shutdown(socket.SHUT_RDWR)

    fake = daemon({"show stats": hang_up})
    assert cli(fake.path, "show", "stats") == ctl.EX_TEMPFAIL
    assert "closed the connection" in capsys.readouterr().err


def test_show_queue_streams(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], tmp_path: Path
) -> None:
    """The first chunk is printed while the daemon still holds back the rest."""

    def show_queue(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(
            proto.event(req.id, "items", {"items": [envelope(), envelope(id="0123456700000002")]})
        )
        if d.event("first-line-read").wait(10):
            d.event("streamed").set()
        conn.sendall(
            proto.event(req.id, "items", {"items": [envelope(id="89abcdef00000001", sender="")]})
        )
        conn.sendall(proto.reply_ok(req.id, {"count": 3}))

    fake = daemon({"show queue": show_queue})
    proc = subprocess.Popen(
        [HOMEMAILCTL, "--socket", fake.path, "show", "queue"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(tmp_path),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    fake.event("first-line-read").set()
    rest = proc.stdout.read()
    assert proc.wait(10) == 0
    assert fake.event("streamed").is_set()
    lines = (first + rest).decode().splitlines()
    assert [line.split("|")[0] for line in lines] == [
        "0123456789abcdef",
        "0123456700000002",
        "89abcdef00000001",
    ]
    assert all(len(line.split("|")) == 10 for line in lines)
    assert lines[2].split("|")[2] == "<>"
    assert json.loads(fake.frames[0])["verb"] == "show queue"


def test_show_queue_json_is_one_object_per_line(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    items = [envelope(), envelope(id="0123456700000002")]
    fake = daemon(
        {
            "show queue": frames(
                lambda i: proto.event(i, "items", {"items": items}),
                lambda i: proto.reply_ok(i, {"count": 2}),
            )
        }
    )
    assert cli(fake.path, "--json", "show", "queue") == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == items


def test_show_queue_empty(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"show queue": ok({"count": 0})})
    assert cli(fake.path, "show", "queue") == 0
    assert capsys.readouterr().out == ""


def test_mailq(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon(
        {
            "show queue": frames(
                lambda i: proto.event(i, "items", {"items": [envelope()]}),
                lambda i: proto.event(
                    i, "items", {"items": [envelope(id="0123456700000002", rcpt="c@x.org")]}
                ),
                lambda i: proto.reply_ok(i, {"count": 2}),
            )
        }
    )
    assert cli(fake.path, "mailq") == 0
    out = capsys.readouterr().out
    assert "-- 1 message, 2 recipients" in out
    assert "c@x.org" in out
    fake.handlers["show queue"] = ok({"count": 0})
    assert cli(fake.path, "sendmail", "-bp") == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"


def test_newaliases_and_q(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"update table": ok({"tables": ["aliases"]}), "schedule": ok({"count": 2})})
    assert cli(fake.path, "newaliases") == 0
    assert capsys.readouterr().out == "aliases: table updated\n"
    assert cli(fake.path, "sendmail", "-bi") == 0
    assert cli(fake.path, "sendmail", "-q") == 0
    assert capsys.readouterr().out == "aliases: table updated\n2 envelopes scheduled\n"
    assert [r.verb for r in fake.requests] == ["update table", "update table", "schedule"]
    assert [r.args for r in fake.requests] == [  # the daemon knows which tables hold aliases
        {"aliases": True},
        {"aliases": True},
        {"id": "all"},
    ]
    fake.handlers["update table"] = ok({"tables": ["myal", "staff"]})
    assert cli(fake.path, "newaliases") == 0
    assert capsys.readouterr().out == "myal: table updated\nstaff: table updated\n"
    fake.handlers["update table"] = ok({"tables": []})
    assert cli(fake.path, "newaliases") == 0
    assert capsys.readouterr().out == "no aliases file in the configuration: nothing to re-read\n"
    fake.handlers["update table"] = error(Code.CONFLICT, "aliases:3: bad line")
    assert cli(fake.path, "newaliases") == ctl.EX_NOTFOUND


def test_show_message_writes_the_decoded_bytes(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    data = bytes(range(256)) * 300
    chunks = [data[i : i + 32768] for i in range(0, len(data), 32768)]

    def show_message(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        for chunk in chunks:
            conn.sendall(proto.event(req.id, "chunk", {"b64": base64.b64encode(chunk).decode()}))
        conn.sendall(proto.reply_ok(req.id, {"size": len(data)}))

    fake = daemon({"show message": show_message})
    assert cli(fake.path, "show", "message", "01234567") == 0
    assert capsysbinary.readouterr().out == data
    assert fake.requests[0].args == {"id": "01234567"}


def test_show_envelope_and_config(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon(
        {
            "show envelope": ok(envelope(dsn_notify=["FAILURE"])),
            "show config": ok({"text": 'listen on localhost\naction "local" mbox\n'}),
            "alias list": ok(
                {"file": "/etc/aliases", "aliases": [{"name": "root", "targets": ["bob"]}]}
            ),
        }
    )
    assert cli(fake.path, "show", "envelope", "0123456789abcdef") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == sorted(lines)
    assert 'dsn_notify: ["FAILURE"]' in lines and "sender: alice@example.org" in lines
    assert cli(fake.path, "show", "config") == 0
    assert capsys.readouterr().out == 'listen on localhost\naction "local" mbox\n'
    assert cli(fake.path, "alias", "list") == 0
    assert capsys.readouterr().out == "root: bob\n"


def monitor_handler(events: list[tuple[str, dict[str, Any]]], *, hold: bool) -> Handler:
    def handler(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(proto.reply_ok(req.id, {"counters": bool(req.args.get("counters"))}))
        for name, data in events:
            conn.sendall(proto.event(req.id, name, data))
        if hold:
            d.event("stop").wait(20)
        else:
            conn.shutdown(socket.SHUT_RDWR)

    return handler


def test_monitor_prints_events_until_interrupted(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], tmp_path: Path
) -> None:
    events = [("delivery", {"evpid": "ab", "result": "ok"}), ("paused", {"subsystem": "smtp"})]
    fake = daemon({"monitor": monitor_handler(events, hold=True)})
    proc = subprocess.Popen(
        [HOMEMAILCTL, "--socket", fake.path, "monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(tmp_path),
        # ^C as at a terminal: a suite started in the background (`… &` from a script) has
        # SIGINT ignored, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"delivery evpid=ab result=ok\n"
    assert proc.stdout.readline() == b"paused subsystem=smtp\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    fake.event("stop").set()
    assert fake.requests[0].args == {}


def test_monitor_waits_through_quiet_spells(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    # monitor wakes up every second (to see a ^C that came just before it blocked): a quiet
    # spell longer than that neither ends it nor loses what comes after
    def handler(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(proto.reply_ok(req.id, {"counters": False}))
        conn.sendall(proto.event(req.id, "delivery", {"evpid": "ab"}))
        time.sleep(2.5)
        frame = proto.event(req.id, "paused", {"subsystem": "smtp"})
        conn.sendall(frame[:7])  # a frame cut across a wakeup
        time.sleep(1.5)
        conn.sendall(frame[7:])
        conn.shutdown(socket.SHUT_RDWR)

    fake = daemon({"monitor": handler})
    assert cli(fake.path, "monitor") == ctl.EX_TEMPFAIL  # the daemon went away, at the end
    assert capsys.readouterr().out == "delivery evpid=ab\npaused subsystem=smtp\n"


def test_monitor_counters(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("counters", {"smtp.session": i, "queue.size": 3}) for i in range(25)
    ]
    events.insert(3, ("delivery", {"evpid": "ab"}))  # not a counters row
    fake = daemon({"monitor": monitor_handler(events, hold=False)})
    assert cli(fake.path, "monitor", "--counters") == ctl.EX_TEMPFAIL  # the daemon went away
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 25 + 2
    assert lines[0].split() == ["smtp.session", "queue.size"]
    assert lines[21].split() == ["smtp.session", "queue.size"]
    assert lines[1].split() == ["0", "3"]
    assert "closed the connection" in out.err
    assert fake.requests[0].args == {"counters": True}


def test_monitor_refused(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], capsys: pytest.CaptureFixture[str]
) -> None:
    fake = daemon({"monitor": error(Code.TOO_MANY, "too many connections")})
    assert cli(fake.path, "monitor") == ctl.EX_TEMPFAIL


# --- sendmail against the fake daemon's SMTP ------------------------------------------------------


class FakeSMTP:
    """A scripted SMTP server on the switched control connection."""

    def __init__(
        self,
        *,
        banner: bytes = b"220 fake ESMTP",
        mail: bytes = b"250 ok",
        data: bytes = b"250 queued",
        refuse: dict[str, bytes] | None = None,
    ) -> None:
        self.banner, self.mail, self.data = banner, mail, data
        self.refuse = refuse or {}
        self.lines: list[bytes] = []
        self.message = b""

    def __call__(self, d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        # the ok reply and the banner in one write: the client must not swallow the banner
        conn.sendall(proto.reply_ok(req.id, {}) + self.banner + b"\r\n")
        f = conn.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return
            self.lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(
                    b"250-fake\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 SIZE 1000000\r\n"
                )
            elif verb == b"MAIL":
                conn.sendall(self.mail + b"\r\n")
            elif verb == b"RCPT":
                addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                conn.sendall(self.refuse.get(addr, b"250 ok") + b"\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while (chunk := f.readline()) != b".\r\n":
                    if not chunk:
                        return
                    self.message += chunk
                conn.sendall(self.data + b"\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")


def sendmail_in_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: str, args: list[str], stdin: bytes
) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    monkeypatch.setenv("HOMEMAIL_OFFLINE", str(tmp_path / "offline"))
    monkeypatch.setattr(ctl, "local_domain", lambda: "host.example")
    return cli(path, "sendmail", *args)


def test_sendmail_submits_over_the_control_socket(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    smtp = FakeSMTP()
    fake = daemon({"smtp": smtp})
    body = b"To: bob@example.org\nBcc: hidden@example.org\nSubject: x\n\n.leading dot\nhi\n"
    status = sendmail_in_process(
        monkeypatch,
        tmp_path,
        fake.path,
        ["-t", "-i", "-f", "me@example.org", "-N", "failure", "-R", "hdrs", "-V", "id+1"],
        body,
    )
    assert status == 0
    assert json.loads(fake.frames[0]) == {"v": 1, "id": 1, "verb": "smtp", "args": {}}
    commands = [line.decode()[:4].upper() + line.decode()[4:].rstrip() for line in smtp.lines]
    assert commands[0] == "EHLO host.example"
    assert commands[1].startswith("MAIL FROM:<me@example.org> ")
    assert "RET=HDRS" in commands[1] and "ENVID=id+2B1" in commands[1] and "SIZE=" in commands[1]
    assert "SMTPUTF8" not in commands[1]
    assert commands[2:4] == [
        "RCPT TO:<bob@example.org> NOTIFY=FAILURE",
        "RCPT TO:<hidden@example.org> NOTIFY=FAILURE",
    ]
    assert commands[4] == "DATA"
    assert commands[-1] == "QUIT"
    assert b"hidden" not in smtp.message
    assert b"\r\n..leading dot\r\nhi\r\n" in smtp.message  # dot-stuffed by smtplib
    assert offline.pending(str(tmp_path / "offline")) == []


def test_sendmail_utf8(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    smtp = FakeSMTP()
    fake = daemon({"smtp": smtp})
    status = sendmail_in_process(
        monkeypatch, tmp_path, fake.path, ["jörg@bücher.example"], "Subject: é\n\nü\n".encode()
    )
    assert status == 0
    mail = smtp.lines[1].decode()
    assert "SMTPUTF8" in mail and "BODY=8BITMIME" in mail
    assert smtp.lines[2].decode("utf-8").strip() == "RCPT TO:<jörg@bücher.example>"


def test_sendmail_rejected_recipient_is_67_and_others_are_sent(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    smtp = FakeSMTP(refuse={"nobody@host.example": b"550 5.1.1 no such user"})
    fake = daemon({"smtp": smtp})
    status = sendmail_in_process(
        monkeypatch, tmp_path, fake.path, ["nobody", "bob@example.org"], b"hi\n"
    )
    assert status == ctl.EX_NOUSER
    assert "nobody@host.example: 550 5.1.1 no such user" in capsys.readouterr().err
    assert b"hi\r\n" in smtp.message


def test_sendmail_all_rejected_is_67(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    smtp = FakeSMTP(refuse={"a@x.org": b"550 no"})
    fake = daemon({"smtp": smtp})
    assert (
        sendmail_in_process(monkeypatch, tmp_path, fake.path, ["a@x.org"], b"hi\n") == ctl.EX_NOUSER
    )
    assert smtp.message == b""


@pytest.mark.parametrize(
    "smtp",
    [
        FakeSMTP(mail=b"553 5.1.7 sender rejected"),
        FakeSMTP(data=b"552 5.3.4 too big"),
        FakeSMTP(banner=b"554 go away"),
    ],
)
def test_sendmail_5xx_is_65(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    smtp: FakeSMTP,
) -> None:
    fake = daemon({"smtp": smtp})
    assert (
        sendmail_in_process(monkeypatch, tmp_path, fake.path, ["a@x.org"], b"hi\n")
        == ctl.EX_DATAERR
    )
    assert "message refused: 5" in capsys.readouterr().err
    assert offline.pending(str(tmp_path / "offline")) == []


@pytest.mark.parametrize(
    "handler",
    [
        FakeSMTP(mail=b"451 4.3.0 try later"),
        FakeSMTP(data=b"452 4.3.1 disk full"),
        FakeSMTP(banner=b"421 shutting down"),
        error(Code.UNAVAILABLE, "smtp is paused"),
        error(Code.TOO_MANY, "too many connections"),
    ],
)
def test_sendmail_tempfail_spools_offline(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    handler: Handler,
) -> None:
    fake = daemon({"smtp": handler})
    assert (
        sendmail_in_process(monkeypatch, tmp_path, fake.path, ["a@x.org", "b@y.org"], b"hi\n") == 0
    )
    [item] = spooled(tmp_path)
    assert item.rcpts == ["a@x.org", "b@y.org"]
    assert item.message.endswith(b"\r\n\r\nhi\r\n")


def test_sendmail_tempfailed_recipient_alone_goes_offline(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    smtp = FakeSMTP(refuse={"b@y.org": b"452 4.5.3 too many recipients"})
    fake = daemon({"smtp": smtp})
    assert (
        sendmail_in_process(monkeypatch, tmp_path, fake.path, ["a@x.org", "b@y.org"], b"hi\n") == 0
    )
    [item] = spooled(tmp_path)
    assert item.rcpts == ["b@y.org"]
    assert smtp.message


def test_sendmail_forbidden_is_77(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fake = daemon({"smtp": error(Code.FORBIDDEN, "no")})
    assert (
        sendmail_in_process(monkeypatch, tmp_path, fake.path, ["a@x.org"], b"hi\n") == ctl.EX_NOPERM
    )
    assert spooled(tmp_path) == []


def test_sendmail_daemon_dying_mid_session_spools_offline(
    daemon: Callable[[dict[str, Handler]], FakeDaemon],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    def die(d: FakeDaemon, conn: socket.socket, req: Request) -> None:
        conn.sendall(proto.reply_ok(req.id, {}) + b"220 hi\r\n")
        conn.recv(100)
        conn.shutdown(socket.SHUT_RDWR)

    fake = daemon({"smtp": die})
    assert sendmail_in_process(monkeypatch, tmp_path, fake.path, ["a@x.org"], b"hi\n") == 0
    assert len(spooled(tmp_path)) == 1


def test_sendmail_bs_relays_both_ways(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], tmp_path: Path
) -> None:
    smtp = FakeSMTP()
    fake = daemon({"smtp": smtp})
    done = subprocess.run(
        [linked(tmp_path, "sendmail"), "-bs"],
        input=b"EHLO me\r\nNOOP\r\nQUIT\r\n",
        capture_output=True,
        env=env_for(tmp_path, HOMEMAIL_SOCKET=fake.path),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"220 fake ESMTP\r\n250-fake\r\n")
    assert done.stdout.endswith(b"250 ok\r\n221 bye\r\n")
    assert smtp.lines == [b"EHLO me\r\n", b"NOOP\r\n", b"QUIT\r\n"]


def test_sendmail_bs_without_a_daemon_says_421_and_exits_69(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "-bs", prog=linked(tmp_path, "sendmail"), stdin=b"EHLO a\nQUIT\n",
                   HOMEMAIL_SOCKET=str(tmp_path / "nothing.sock"))
    assert done.returncode == ctl.EX_UNAVAILABLE, done  # as every command without a daemon
    assert done.stdout.startswith(b"421 4.3.2 "), done.stdout


def test_sendmail_t_takes_the_resent_recipients_of_a_message_being_resent(tmp_path: Path) -> None:
    message = (b"To: old@example.org\nResent-To: new@example.org\nResent-Bcc: hid@example.org\n"
               b"Subject: s\n\nx\n")
    done = run_cli(tmp_path, "-t", prog=linked(tmp_path, "sendmail"), stdin=message)
    assert done.returncode == 0, done.stderr
    [item] = spooled(tmp_path)
    assert item.rcpts == ["new@example.org", "hid@example.org"]
    assert b"Resent-Bcc" not in item.message and b"To: old@example.org" in item.message


def test_sendmail_bs_takes_lf_line_endings(
    daemon: Callable[[dict[str, Handler]], FakeDaemon], tmp_path: Path
) -> None:
    smtp = FakeSMTP()
    fake = daemon({"smtp": smtp})
    done = subprocess.run(
        [linked(tmp_path, "sendmail"), "-bs"],
        input=b"EHLO me\nMAIL FROM:<u@x.org>\nRCPT TO:<v@x.org>\nDATA\nSubject: x\n\nhi\n.\nQUIT\n",
        capture_output=True,
        env=env_for(tmp_path, HOMEMAIL_SOCKET=fake.path),
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"354 go ahead\r\n250 queued\r\n221 bye\r\n"), done.stdout
    assert smtp.message == b"Subject: x\r\n\r\nhi\r\n"
    assert smtp.lines[-1] == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("data", "after_cr", "expected"),
    [
        (b"EHLO me\nQUIT\n", False, b"EHLO me\r\nQUIT\r\n"),
        (b"EHLO me\r\nQUIT\r\n", False, b"EHLO me\r\nQUIT\r\n"),
        (b"\nQUIT\n", True, b"\nQUIT\r\n"),  # the CR came in the previous read
        (b"\nQUIT\n", False, b"\r\nQUIT\r\n"),
        (b"\n\n", True, b"\n\r\n"),
        (b"a\rb\r", False, b"a\rb\r"),  # a lone CR is left as it is
        (b"", True, b""),
    ],
)
def test_bare_lf_to_crlf(data: bytes, after_cr: bool, expected: bytes) -> None:
    assert ctl.bare_lf_to_crlf(data, after_cr) == expected


def test_bare_lf_to_crlf_does_not_depend_on_where_reads_end() -> None:
    data = b"EHLO me\nMAIL FROM:<a@b>\r\n\r\nDATA\n\nx\r\r\n.\nQUIT\r\n"
    whole = ctl.bare_lf_to_crlf(data, False)
    assert whole == b"EHLO me\r\nMAIL FROM:<a@b>\r\n\r\nDATA\r\n\r\nx\r\r\n.\r\nQUIT\r\n"
    for cut in range(len(data) + 1):
        first, second = data[:cut], data[cut:]
        out = ctl.bare_lf_to_crlf(first, False)
        out += ctl.bare_lf_to_crlf(second, first.endswith(b"\r"))
        assert out == whole, cut


def test_relay_turns_bare_lf_into_crlf_across_reads() -> None:
    """-bs: a CR at the end of one read and its LF at the start of the next stay one CR LF."""
    ours, theirs = socket.socketpair()
    infd, feed = os.pipe()
    outfd, out = os.pipe()
    relay = threading.Thread(target=ctl.relay, args=(ours, infd, out), daemon=True)
    relay.start()
    got = bytearray()

    def receive_until(end: bytes) -> None:
        theirs.settimeout(10)
        while not got.endswith(end):
            chunk = theirs.recv(65536)
            assert chunk, bytes(got)
            got.extend(chunk)

    try:
        os.write(feed, b"EHLO me\r")
        receive_until(b"EHLO me\r")  # read and sent on its own: the LF comes in another read
        os.write(feed, b"\nMAIL FROM:<u@localhost>\nDATA\n")
        receive_until(b"DATA\r\n")
        os.write(feed, b"\n")
        receive_until(b"DATA\r\n\r\n")
        os.close(feed)
        feed = -1
        assert theirs.recv(65536) == b""  # stdin's end: the session's sending side is shut
        assert bytes(got) == b"EHLO me\r\nMAIL FROM:<u@localhost>\r\nDATA\r\n\r\n"
        theirs.sendall(b"221 bye\r\n")
        theirs.close()
        relay.join(10)
        assert not relay.is_alive()
        assert os.read(outfd, 65536) == b"221 bye\r\n"
    finally:
        for fd in (infd, outfd, out, feed):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        ours.close()
        theirs.close()
