"""System mode, end to end: started as root, the daemon splits into a root parent and an
unprivileged worker; deliveries run as each recipient.

These tests need root (to create users and to start system mode), as CI has.  Everything the
worker must reach lives under a world-traversable temporary directory.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from homemail.aliases import LocalUser
from homemail.config import Action, Location, parse_string
from homemail.parent import (
    Parent,
    channel_pair,
    delivers_to_mail_spool,
    in_mail_spool,
    recv_record,
    send_record,
)

from .conftest import HOMEMAIL, free_port, poll, port_open

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="system mode and test users need root")

WORKER_USER = "_hmtestworker"
USERS = ("hmsys1", "hmsys2")

CONFIG = """\
table aliases {{ postmaster = "hmsys1", team = "hmsys1, hmsys2" }}
listen on 127.0.0.1 port {port}
action "local" maildir alias <aliases>
match from local for local action "local"
"""


def _useradd(name: str, home: Path | None, system: bool = False) -> None:
    if subprocess.run(["id", name], capture_output=True).returncode == 0:
        subprocess.run(["userdel", "-r", name], capture_output=True)
    cmd = ["useradd", "--shell", "/usr/sbin/nologin"]
    cmd += (
        ["--system", "--no-create-home"] if system else ["--create-home", "--home-dir", str(home)]
    )
    subprocess.run([*cmd, name], check=True, capture_output=True)


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="hm-sys-"))
    base.chmod(0o755)
    (base / "home").mkdir(mode=0o755)
    _useradd(WORKER_USER, None, system=True)
    for user in USERS:
        _useradd(user, base / "home" / user)
    try:
        yield base
    finally:
        for user in (*USERS, WORKER_USER):
            subprocess.run(["userdel", "-r", user], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


class SystemDaemon:
    def __init__(self, base: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.config = self.dir / "smtpd.conf"
        self.write_config(CONFIG)
        self.socket = self.dir / "control.sock"
        self.notify_path = self.dir / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.notes: list[str] = []
        self.log_path = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, template: str, **values: object) -> None:
        text = template.format(port=self.port, dir=self.dir, **values)
        self.config.write_text(text)
        self.config.chmod(0o644)

    def start(self, *extra: str) -> SystemDaemon:
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *HOMEMAIL,
                    "run",
                    "-f",
                    str(self.config),
                    "--spool",
                    str(self.dir / "spool"),
                    "--socket",
                    str(self.socket),
                    "--user",
                    WORKER_USER,
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        assert poll(lambda: "smtpd ready" in self.log() or self.proc.poll() is not None, 20)
        assert self.proc.poll() is None, self.log()
        assert port_open(self.port), self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def read_notes(self, until: str, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.notes.append(self.notify.recv(4096).decode())
            except TimeoutError:
                continue
            if until in self.notes[-1].split("\n"):
                return self.notes
        pytest.fail(f"no {until!r} notification; got {self.notes}\n{self.log()}")

    def worker_pid(self) -> int:
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and "homemail" in (entry / "cmdline").read_text():
                return int(entry.name)
        pytest.fail("no worker process found")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.notify.close()


@pytest.fixture
def system(world: Path) -> Iterator[SystemDaemon]:
    daemon = SystemDaemon(world)
    try:
        yield daemon
    finally:
        daemon.cleanup()


def _status_ids(pid: int) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(x) for x in value.split()]
    return ids


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _listening_inodes() -> set[int]:
    listening = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening.add(int(fields[9]))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening socket
            listening.add(int(fields[6]))
    return listening


def test_worker_runs_without_any_root_id(system: SystemDaemon) -> None:
    system.start()
    ids = _status_ids(system.worker_pid())
    worker = pwd.getpwnam(WORKER_USER)
    assert ids["Uid"] == [worker.pw_uid] * 4, ids
    assert ids["Gid"] == [worker.pw_gid] * 4, ids
    assert 0 not in ids["Groups"], ids
    assert "uid=0" not in system.log().split("smtpd ready", 1)[1].splitlines()[0]


def test_only_the_worker_holds_listening_sockets(system: SystemDaemon) -> None:
    system.start()
    assert system.proc is not None
    listening = _listening_inodes()
    parent = _socket_inodes(system.proc.pid) & listening
    worker = _socket_inodes(system.worker_pid()) & listening
    assert parent == set(), f"the parent holds listening sockets {parent}"
    assert len(worker) >= 2, "the worker should hold the SMTP listener and the control socket"


def test_deliveries_land_owned_by_each_recipient(system: SystemDaemon, world: Path) -> None:
    system.start()
    with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as client:
        refused = client.sendmail(
            "alice@example.org", ["team@localhost"], b"Subject: for the team\r\n\r\nhello both\r\n"
        )
    assert refused == {}
    for name in USERS:
        entry = pwd.getpwnam(name)
        new = Path(entry.pw_dir) / "Maildir" / "new"
        assert poll(lambda new=new: new.is_dir() and list(new.iterdir()), 20), system.log()
        files = list(new.iterdir())
        assert len(files) == 1
        st = files[0].stat()
        assert (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid)
        assert new.stat().st_uid == entry.pw_uid
        assert b"hello both" in files[0].read_bytes()
        assert f"Delivered-To: {name}@localhost".encode() in files[0].read_bytes()


SOURCES = """\
table aliases {{ postmaster = "hmsys1" }}
table trusted {{ 127.0.0.1 }}
table srcdom {{ src.test }}
table tagdom {{ tag.test }}
listen on 127.0.0.1 port {port}
listen on 127.0.0.1 port {second} tag TAGGED
action "local" maildir alias <aliases>
match from src <trusted> for domain <srcdom> action "local"
match from any tag TAGGED for domain <tagdom> action "local"
match from local for local action "local"
"""


def test_rules_on_the_client_address_and_the_listener_tag_deliver(system: SystemDaemon) -> None:
    """The parent checks a delivery against the rules with the mail's own source: a rule on
    the client's address or on the listener's tag must not leave it refused at every retry."""
    second = free_port()
    system.write_config(SOURCES, second=second)
    system.start()
    before = _maildir_count("hmsys1")
    for port, rcpt in ((system.port, "hmsys1@src.test"), (second, "hmsys1@tag.test")):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.sendmail("a@example.org", [rcpt], b"Subject: s\r\n\r\nx\r\n") == {}
    assert poll(lambda: _maildir_count("hmsys1") == before + 2, 20), system.log()
    assert "refused by the parent" not in system.log()


def test_an_alias_changed_after_rcpt_still_delivers_to_whom_it_named(system: SystemDaemon) -> None:
    aliases = system.dir / "aliases"
    aliases.write_text("postmaster: hmsys1\nhelpdesk: hmsys2\n")
    aliases.chmod(0o644)
    system.write_config(FILE_ALIASES)
    system.start()
    assert _ctl(system, "pause", "mda").returncode == 0
    before = _maildir_count("hmsys2")
    with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as client:
        message = b"Subject: h\r\n\r\nx\r\n"
        assert client.sendmail("a@example.org", ["helpdesk@localhost"], message) == {}
    assert _ctl(system, "alias", "remove", "helpdesk").returncode == 0
    system.stop()  # the parent reads its tables afresh at the next start
    system.log_path.write_text("")  # start() waits for this run's "smtpd ready"
    system.start()
    assert poll(lambda: _maildir_count("hmsys2") == before + 1, 20), system.log()


def test_mail_for_root_is_refused(system: SystemDaemon) -> None:
    system.start()
    with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@example.org")
        code, reply = client.rcpt("root@localhost")
    assert code == 550, reply
    assert reply.startswith(b"5.1.1") and b"alias root" in reply  # says what to do


def test_accounts_that_cannot_receive_mail_are_refused_at_rcpt(system: SystemDaemon) -> None:
    """nobody's home is /nonexistent, and the daemon's own user gets no mail: 550 at RCPT,
    not a 250 and then four days of failing deliveries."""
    system.write_config(CONFIG.replace('"hmsys1, hmsys2"', '"hmsys1, nobody"'))
    system.start("--user", "hmsys2")  # the worker runs as hmsys2, who has a home
    assert pwd.getpwnam("nobody").pw_dir == "/nonexistent"
    replies = {}
    for rcpt in ("nobody@localhost", "hmsys2@localhost", "team@localhost", "hmsys1@localhost"):
        with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as client:
            client.ehlo()
            client.mail("alice@example.org")
            code, reply = client.rcpt(rcpt)
        replies[rcpt] = (code, reply[:5])
    refused = (550, b"5.1.1")
    assert replies == {
        "nobody@localhost": refused,
        "hmsys2@localhost": refused,
        "team@localhost": refused,
        "hmsys1@localhost": (250, b"2.1.5"),
    }


def test_a_second_system_daemon_on_the_same_spool_is_refused_before_binding(
    system: SystemDaemon,
) -> None:
    system.start()
    port, sock = free_port(), system.dir / "second.sock"
    second = system.dir / "second.conf"
    second.write_text(CONFIG.format(port=port))
    second.chmod(0o644)
    result = subprocess.run(
        [*HOMEMAIL, "run", "-f", str(second), "--spool", str(system.dir / "spool"),
         "--socket", str(sock), "--user", WORKER_USER],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0 and "in use by another homemail" in result.stderr, result
    assert "worker" not in result.stderr  # refused by the parent, before any fork
    assert not port_open(port)
    assert not sock.exists() and not Path(f"{sock}.offline").exists()
    assert _rcpt(system.port, "team@localhost") == 250  # the first one is untouched


def test_sd_notify_ready_reloading_stopping_in_order(system: SystemDaemon) -> None:
    system.start()
    system.read_notes("READY=1")
    assert system.proc is not None
    assert f"MAINPID={system.proc.pid}" in system.notes[0]
    system.proc.send_signal(signal.SIGHUP)
    system.read_notes("RELOADING=1")
    system.read_notes("READY=1")
    assert system.stop() == 0, system.log()
    notes = system.read_notes("STOPPING=1")
    firsts = [n.split("\n")[0] for n in notes if not n.startswith("STATUS=")]
    assert firsts == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], notes


def test_sigterm_stops_parent_and_worker(system: SystemDaemon) -> None:
    system.start()
    worker = system.worker_pid()
    assert system.stop() == 0, system.log()
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text()
    assert not system.socket.exists()


def test_credentials_from_the_control_socket_land_in_a_root_only_file(
    system: SystemDaemon,
) -> None:
    system.start()
    ctl = [sys.executable, "-m", "homemail.ctl"]
    password = "s3cret:with spaces#and-more"
    result = subprocess.run(
        [*ctl, "--socket", str(system.socket), "secret", "set", "isp", "me@example.org"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    secrets = system.config.parent / "secrets"
    st = secrets.stat()
    assert (st.st_uid, stat_mode(st)) == (0, 0o600)
    assert f"isp me@example.org:{password}\n" in secrets.read_text()
    assert password not in system.log()


def stat_mode(st: os.stat_result) -> int:
    return st.st_mode & 0o7777


def _ctl(system: SystemDaemon, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "homemail.ctl", "--socket", str(system.socket), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _rcpt(port: int, rcpt: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        client.mail("alice@example.org")
        return client.rcpt(rcpt)[0]


FILE_ALIASES = """\
table aliases file:{dir}/aliases
listen on 127.0.0.1 port {port}
action "local" maildir alias <aliases>
match from local for local action "local"
"""


def test_alias_edits_go_through_the_parent_to_a_root_owned_file(system: SystemDaemon) -> None:
    aliases = system.dir / "aliases"
    aliases.write_text("# keep this comment\npostmaster: hmsys1\n")
    aliases.chmod(0o644)  # root's, readable by the worker, writable only by root
    system.write_config(FILE_ALIASES)
    system.start()
    assert _rcpt(system.port, "helpdesk@localhost") == 550
    added = _ctl(system, "alias", "add", "helpdesk", "hmsys2")
    assert added.returncode == 0, added.stderr
    assert _rcpt(system.port, "helpdesk@localhost") == 250
    text = aliases.read_text()
    assert text.startswith("# keep this comment\npostmaster: hmsys1\n")
    assert "helpdesk: hmsys2" in text
    assert aliases.stat().st_uid == 0
    removed = _ctl(system, "alias", "remove", "helpdesk")
    assert removed.returncode == 0, removed.stderr
    assert _rcpt(system.port, "helpdesk@localhost") == 550
    missing = _ctl(system, "alias", "remove", "helpdesk")
    assert missing.returncode != 0
    assert "no alias" in missing.stderr

    before = aliases.read_bytes()  # what the parent would write is expanded by its rules first
    for target, why in (("friend@example.com", "relaying"), ("root", "no such user")):
        refused = _ctl(system, "alias", "add", "helpdesk", "hmsys2", target)
        assert refused.returncode == 65, refused
        assert "alias 'helpdesk' not added" in refused.stderr and why in refused.stderr
        assert aliases.read_bytes() == before
    assert _rcpt(system.port, "helpdesk@localhost") == 550


TWO_PORTS = """\
table aliases {{ postmaster = "hmsys1" }}
listen on 127.0.0.1 port {port}
listen on 127.0.0.1 port {second}
action "local" maildir alias <aliases>
match from local for local action "local"
"""


def test_reload_binds_new_listeners_and_closes_removed_ones(system: SystemDaemon) -> None:
    system.start()
    second = free_port()
    assert not port_open(second)
    system.write_config(TWO_PORTS, second=second)
    reloaded = _ctl(system, "reload")
    assert reloaded.returncode == 0, reloaded.stderr + system.log()
    assert poll(lambda: port_open(second), 10), system.log()
    assert _rcpt(second, "postmaster@localhost") == 250
    system.write_config(CONFIG.replace("port {port}", "port {second}"), second=second)
    assert system.proc is not None
    system.proc.send_signal(signal.SIGHUP)
    assert poll(lambda: not port_open(system.port), 10), system.log()
    assert port_open(second)
    assert _socket_inodes(system.proc.pid) & _listening_inodes() == set()


def test_a_reload_to_a_port_in_use_keeps_the_running_configuration(system: SystemDaemon) -> None:
    system.start()
    second = free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", second))
    blocker.listen(1)
    try:
        system.write_config(CONFIG.replace("port {port}", "port {second}"), second=second)
        result = _ctl(system, "reload")
        assert result.returncode != 0 and "cannot listen" in result.stderr, result
        assert _rcpt(system.port, "team@localhost") == 250  # still where it was
    finally:
        blocker.close()
    reloaded = _ctl(system, "reload")  # tried again, not taken as already done
    assert reloaded.returncode == 0, reloaded.stderr + system.log()
    assert poll(lambda: port_open(second) and not port_open(system.port), 10), system.log()


def test_a_listener_whose_settings_change_keeps_listening(system: SystemDaemon) -> None:
    system.start()
    renamed = CONFIG.replace("port {port}", "port {port} hostname renamed.test")
    system.write_config(renamed)
    reloaded = _ctl(system, "reload")
    assert reloaded.returncode == 0, reloaded.stderr + system.log()
    with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as client:  # the same socket...
        code, text = client.docmd("HELO", "client.test")
        assert (code, text) == (250, b"2.0.0 renamed.test Hello client.test")  # ...renamed
    assert _rcpt(system.port, "team@localhost") == 250
    second = free_port()  # and it is closed when it goes, under its new name
    system.write_config(CONFIG.replace("port {port}", "port {second}"), second=second)
    assert _ctl(system, "reload").returncode == 0, system.log()
    assert poll(lambda: port_open(second) and not port_open(system.port), 10), system.log()


def test_invalid_reload_keeps_the_running_configuration(system: SystemDaemon) -> None:
    system.start()
    system.write_config(CONFIG + "frobnicate yes\n")
    result = _ctl(system, "reload")
    assert result.returncode == 78
    assert "frobnicate" in result.stderr
    assert _rcpt(system.port, "team@localhost") == 250


# -- the channel, spoken directly: what a compromised worker could ask -----------------------


@pytest.fixture
def parent(world: Path) -> Iterator[tuple[Parent, socket.socket]]:
    cfg = parse_string(CONFIG.format(port=free_port()), "<test>")
    mine, theirs = channel_pair()
    p = Parent(cfg, mine, worker_pid=-1, spool=str(world), hostname="localhost", config_path=None)
    theirs.settimeout(5)
    try:
        yield p, theirs
    finally:
        mine.close()
        theirs.close()


def _message_fd(data: bytes) -> int:
    fd = os.memfd_create("test-message")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _ask(
    p: Parent, worker: socket.socket, record: dict[str, object], *, with_fd: bool = True
) -> dict[str, object]:
    fd = _message_fd(b"Subject: forged\r\n\r\nx\r\n")
    try:
        send_record(worker, record, [fd] if with_fd else None)
    finally:
        os.close(fd)
    assert p.on_channel() is True
    got = recv_record(worker)
    assert got is not None
    reply, fds = got
    assert fds == []
    return reply


GOOD = {
    "type": "deliver",
    "id": 1,
    "action": "local",
    "user": "hmsys1",
    "sender": "a@b.c",
    "rcpt": "hmsys1@localhost",
    "dest": "hmsys1@localhost",
    "evpid": 1 << 40,
    "ctime": 1,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"user": "root", "rcpt": "root@localhost", "dest": "root@localhost"}, "root"),
        ({"user": "hmsys2"}, "does not deliver this recipient to this user"),
        ({"action": "other"}, "no local delivery action"),
        ({"user": "no-such-user-hm"}, "no user"),
        ({"user": "nobody", "rcpt": "nobody@localhost", "dest": "nobody@localhost"}, "cannot"),
        ({"rcpt": "x@evil.example", "dest": "hmsys1@localhost"}, "does not deliver"),
        ({"dest": "hmsys2@localhost"}, "does not deliver"),
        ({"rcpt": "hmsys1@localhost\r\nX: y"}, "control character"),
        ({"sender": 5}, "bad field"),
    ],
)
def test_forged_delivery_requests_are_refused(
    parent: tuple[Parent, socket.socket], change: dict[str, object], reason: str
) -> None:
    p, worker = parent
    before = {name: _maildir_count(name) for name in (*USERS, "root")}
    reply = _ask(p, worker, {**GOOD, **change})
    assert reply["type"] == "result" and reply["id"] == 1
    assert reply["ok"] is False and reply["status"] == "4.3.0"
    assert reason in str(reply["text"]), reply
    assert p.children == {}, "a refused request must not fork a delivery"
    assert {name: _maildir_count(name) for name in before} == before


def test_delivery_as_the_workers_own_user_is_refused(world: Path) -> None:
    cfg = parse_string(CONFIG.format(port=free_port()), "<test>")
    mine, worker = channel_pair()
    worker.settimeout(5)
    uid = pwd.getpwnam("hmsys1").pw_uid
    p = Parent(
        cfg,
        mine,
        worker_pid=-1,
        spool=str(world),
        hostname="localhost",
        config_path=None,
        worker_uid=uid,
    )
    try:
        reply = _ask(p, worker, GOOD)
        assert reply["ok"] is False and "cannot receive mail" in str(reply["text"]), reply
        assert p.children == {}
    finally:
        mine.close()
        worker.close()


def test_request_without_message_fd_is_refused(parent: tuple[Parent, socket.socket]) -> None:
    p, worker = parent
    reply = _ask(p, worker, GOOD, with_fd=False)
    assert reply["ok"] is False and "fd" in str(reply["text"])


def test_garbage_records_do_not_stop_the_parent(parent: tuple[Parent, socket.socket]) -> None:
    p, worker = parent
    for junk in (
        b"not json",
        b"[]",
        json.dumps({"v": 2, "type": "deliver"}).encode(),
        json.dumps({"v": 1}).encode(),
        b"{" * 5000,
    ):
        worker.send(junk)
        assert p.on_channel() is True
    reply = _ask(p, worker, {**GOOD, "user": "root"})
    assert reply["ok"] is False  # still answering, still refusing


def test_a_valid_request_is_delivered_as_the_user(parent: tuple[Parent, socket.socket]) -> None:
    p, worker = parent
    before = _maildir_count("hmsys1")
    fd = _message_fd(b"Subject: through the channel\r\n\r\nok\r\n")
    send_record(worker, {**GOOD, "evpid": (7 << 32) | 9}, [fd])
    os.close(fd)
    assert p.on_channel() is True
    assert len(p.children) == 1
    pipe = next(iter(p.children))
    deadline = time.monotonic() + 20
    while pipe in p.children and time.monotonic() < deadline:
        p.on_child_output(pipe)
    got = recv_record(worker)
    assert got is not None
    reply, _ = got
    assert reply["ok"] is True, reply
    assert _maildir_count("hmsys1") == before + 1
    newest = max(
        (Path(pwd.getpwnam("hmsys1").pw_dir) / "Maildir" / "new").iterdir(),
        key=lambda f: f.stat().st_mtime,
    )
    assert newest.stat().st_uid == pwd.getpwnam("hmsys1").pw_uid


MBOX_CONFIG = """\
listen on 127.0.0.1 port {port}
action "box" mbox "{dir}/mail/%{{user.username}}"
match from local for local action "box"
"""


@pytest.fixture
def stuck(world: Path) -> Iterator[tuple[Parent, socket.socket, Path]]:
    """A parent whose mbox deliveries wait on a dotlock the test holds (a stuck delivery)."""
    mail = world / "mail"
    mail.mkdir(exist_ok=True)
    mail.chmod(0o1777)
    for user in USERS:
        (mail / f"{user}.lock").write_text("held by the test\n")
    cfg = parse_string(MBOX_CONFIG.format(port=free_port(), dir=world), "<test>")
    mine, theirs = channel_pair()
    p = Parent(cfg, mine, worker_pid=-1, spool=str(world), hostname="localhost", config_path=None)
    theirs.settimeout(5)
    try:
        yield p, theirs, mail
    finally:
        for child in p.children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        p.finish()
        mine.close()
        theirs.close()


def _request(p: Parent, worker: socket.socket, user: str, evpid: int) -> None:
    fd = _message_fd(b"Subject: stuck\r\n\r\nx\r\n")
    rcpt = f"{user}@localhost"
    record = {**GOOD, "action": "box", "user": user, "rcpt": rcpt, "dest": rcpt}
    send_record(worker, {**record, "id": evpid, "evpid": evpid}, [fd])
    os.close(fd)
    assert p.on_channel() is True


def test_one_recipients_stuck_deliveries_leave_slots_for_the_others(
    stuck: tuple[Parent, socket.socket, Path],
) -> None:
    from homemail.parent import MAX_CHILDREN_PER_USER

    p, worker, _ = stuck
    for n in range(MAX_CHILDREN_PER_USER + 2):
        _request(p, worker, "hmsys1", 100 + n)
    assert [c.user for c in p.children.values()] == ["hmsys1"] * MAX_CHILDREN_PER_USER
    assert len(p.waiting) == 2
    _request(p, worker, "hmsys2", 200)  # still a slot for somebody else
    assert sorted(c.user for c in p.children.values()).count("hmsys2") == 1


def test_a_delivery_over_its_time_limit_is_killed_and_retried_later(
    stuck: tuple[Parent, socket.socket, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("homemail.parent.DELIVERY_SECONDS", 0.5)
    p, worker, _ = stuck
    _request(p, worker, "hmsys1", 300)
    [child] = p.children.values()
    time.sleep(0.6)
    p.kill_overdue()
    deadline = time.monotonic() + 10
    while p.children and time.monotonic() < deadline:
        for pipe in list(p.children):
            p.on_child_output(pipe)
    got = recv_record(worker)
    assert got is not None
    reply, _ = got
    assert (reply["ok"], reply["status"]) == (False, "4.3.0")
    assert reply["text"] == "delivery took too long"

    def gone() -> bool:
        p.reap()  # as SIGCHLD has the parent do
        return not Path(f"/proc/{child.pid}").exists()

    assert poll(gone, 5), "the stuck delivery is still there"


def test_stopping_waits_for_deliveries_only_so_long(
    stuck: tuple[Parent, socket.socket, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("homemail.parent.FINISH_SECONDS", 0.5)
    p, worker, _ = stuck
    _request(p, worker, "hmsys1", 400)
    started = time.monotonic()
    p.finish()
    assert time.monotonic() - started < 5  # the child waits 30 s on the lock
    [child] = p.children.values()
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)


def _maildir_count(user: str) -> int:
    new = Path(pwd.getpwnam(user).pw_dir) / "Maildir" / "new"
    try:
        return len(list(new.iterdir()))
    except OSError:
        return 0


def test_offline_mail_over_the_size_limit_is_bounced_to_its_sender(system: SystemDaemon) -> None:
    """The root parent reads the spool; what the size limit refuses is bounced, not dropped."""
    from homemail import offline

    system.write_config(CONFIG + "smtp max-message-size 16K\n")
    spool = system.dir / "spool" / "offline"
    offline.prepare_dir(str(spool))
    tag = f"big{os.getpid()}x{time.monotonic_ns()}"
    message = f"Subject: {tag}\r\n\r\n".encode() + (b"z" * 78 + b"\r\n") * 400
    offline.write(str(spool), "hmsys1@localhost", ["hmsys2@localhost"], message, {})
    before = _maildir_count("hmsys2")
    system.start()

    def notice() -> list[Path]:
        new = Path(pwd.getpwnam("hmsys1").pw_dir) / "Maildir" / "new"
        return [p for p in new.iterdir() if tag.encode() in p.read_bytes()] if new.is_dir() else []

    found = poll(notice, 20)
    assert found, system.log()
    dsn = found[0].read_bytes()
    assert b"Final-Recipient: rfc822; hmsys2@localhost" in dsn and b"Status: 5.3.4" in dsn
    assert b"zzzz" not in dsn
    assert found[0].stat().st_uid == pwd.getpwnam("hmsys1").pw_uid
    assert poll(lambda: not any(spool.iterdir()), 10)
    assert "offline offline refused" in system.log()
    assert "offline smtp message" not in system.log()  # the message itself was never queued
    assert _maildir_count("hmsys2") == before


def test_sendmail_while_down_finds_the_spool_the_parent_recorded(system: SystemDaemon) -> None:
    """The parent records SPOOL/offline beside the control socket; with the daemon stopped,
    sendmail that knows only the socket leaves the message there, and the next start takes it."""
    system.start()
    link = Path(f"{system.socket}.offline")
    spool = system.dir / "spool" / "offline"
    assert os.readlink(link) == str(spool) and link.lstat().st_uid == 0
    assert system.stop() == 0
    assert link.is_symlink()

    tag = f"down{os.getpid()}x{time.monotonic_ns()}"
    home = system.dir / "roothome"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "HOMEMAIL_SOCKET": str(system.socket)}
    env.pop("HOMEMAIL_OFFLINE", None)
    env.pop("XDG_STATE_HOME", None)
    result = subprocess.run(
        [sys.executable, "-m", "homemail.ctl", "sendmail", "-oi", "hmsys2@localhost"],
        input=f"Subject: {tag}\n\nwhile down\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 0 and result.stderr == "", result
    assert len(list(spool.iterdir())) == 1
    assert not (home / ".local").exists()

    before = _maildir_count("hmsys2")
    system.log_path.rename(system.dir / "first-run.log")  # start() waits for "smtpd ready"
    system.start()
    assert poll(lambda: _maildir_count("hmsys2") > before, 20), system.log()
    assert poll(lambda: not any(spool.iterdir()), 10)


def test_offline_mail_with_more_recipients_than_a_channel_record_holds(
    system: SystemDaemon,
) -> None:
    """4,000 recipients are 100 KB of header, more than a 64 KiB channel record: the root parent
    passes the file to the worker in a descriptor, so it is not retried forever."""
    from homemail import offline

    spool = system.dir / "spool" / "offline"
    offline.prepare_dir(str(spool))
    tag = f"many{os.getpid()}x{time.monotonic_ns()}"
    rcpts = ["hmsys2@localhost"] + [f"nobody{i:05d}@localhost" for i in range(4000)]
    message = f"Subject: {tag}\r\n\r\nto many\r\n".encode()
    offline.write(str(spool), "hmsys1@localhost", rcpts, message, {})
    system.start()

    def with_tag(user: str) -> list[bytes]:
        new = Path(pwd.getpwnam(user).pw_dir) / "Maildir" / "new"
        found = [p.read_bytes() for p in new.iterdir()] if new.is_dir() else []
        return [m for m in found if tag.encode() in m]

    assert poll(lambda: with_tag("hmsys2"), 20), system.log()
    notices = poll(lambda: with_tag("hmsys1"), 20)
    assert notices, system.log()
    assert b"Final-Recipient: rfc822; nobody03999@localhost" in notices[0]
    assert poll(lambda: not any(spool.iterdir()), 10)
    assert "record too large" not in system.log()
    assert len(with_tag("hmsys2")) == 1


def test_a_symlink_planted_in_the_spool_is_refused_not_followed(system: SystemDaemon) -> None:
    """The worker owns journal/: had it swapped it for a link, root must not chown the target."""
    spool = system.dir / "spool"
    target = system.dir / "precious"
    target.mkdir(mode=0o700)
    spool.mkdir(mode=0o711)
    (spool / "journal").symlink_to(target)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            *HOMEMAIL,
            "run",
            "-f",
            str(system.config),
            "--spool",
            str(spool),
            "--socket",
            str(system.socket),
            "--user",
            WORKER_USER,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "cannot start" in result.stderr
    st = target.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    assert not port_open(system.port)


# -- the group mail: only for an mbox right in the system spool -------------------------------


@pytest.mark.parametrize(
    ("path", "spool"),
    [
        ("/var/mail/bob", True),
        ("/var/spool/mail/bob", True),
        ("/var/mail//bob", True),
        ("/home/bob/mbx/inbox", False),  # even when ~/mbx is the user's link to /var/mail
        ("/var/mail/bob/inbox", False),
        ("/var/mail/../tmp/bob", False),
        ("/var/mail/./bob", False),
        ("/var/mail", False),
        ("var/mail/bob", False),
        ("/var/mailx/bob", False),
    ],
)
def test_only_a_file_right_in_a_mail_spool_is_in_it(path: str, spool: bool) -> None:
    assert in_mail_spool(path) is spool


@pytest.mark.parametrize(
    ("method", "template", "rcpt", "spool"),
    [
        ("mbox", None, "bob@localhost", True),  # the default, /var/mail/USER
        ("mbox", "/var/spool/mail/%{user.username}", "bob@localhost", True),
        ("mbox", "/var/mail/%{rcpt.user}", "bob@localhost", True),
        ("mbox", "~/mbx/inbox", "bob@localhost", False),
        ("mbox", "mbx/inbox", "bob@localhost", False),
        ("mbox", "/var/mail/%{rcpt.user}/inbox", "bob@localhost", False),
        ("mbox", "/var/mail/%{rcpt.user}", "..@localhost", False),  # refused by the expansion
        ("maildir", "/var/mail/%{user.username}", "bob@localhost", False),
    ],
)
def test_the_delivery_gets_the_mail_group_only_for_the_spool(
    method: str, template: str | None, rcpt: str, spool: bool
) -> None:
    action = Action("a", method, template, None, None, Location("<test>", 1, 1))  # type: ignore[arg-type]
    user = LocalUser("bob", 1000, 1000, "/home/bob")
    record = {**GOOD, "user": "bob", "rcpt": rcpt, "dest": "bob@localhost"}
    assert delivers_to_mail_spool(action, user, record) is spool


HOME_MBOX = """\
listen on 127.0.0.1 port {port}
action "home" mbox "~/mbx/inbox"
match from local for local action "home"
"""


def test_an_mbox_through_a_users_link_to_a_mail_spool_cannot_create_names_there(
    system: SystemDaemon, world: Path
) -> None:
    """~/mbx is the user's link to a spool like /var/mail (root:mail 2775): the delivery runs
    with the user's own groups, so it cannot create a file there; into a directory of the
    user's own it is delivered, the file the user's and of the user's own group."""
    try:
        mail_gid = grp.getgrnam("mail").gr_gid
    except KeyError:
        pytest.skip("no group mail")
    entry = pwd.getpwnam("hmsys1")
    assert mail_gid not in os.getgrouplist(entry.pw_name, entry.pw_gid)
    spool = system.dir / "varmail"
    spool.mkdir()
    os.chown(spool, 0, mail_gid)
    spool.chmod(0o2775)
    mbx = Path(entry.pw_dir) / "mbx"
    mbx.symlink_to(spool)
    os.lchown(mbx, entry.pw_uid, entry.pw_gid)
    try:
        system.write_config(HOME_MBOX)
        system.start()
        with smtplib.SMTP("127.0.0.1", system.port, timeout=10) as client:
            client.sendmail("alice@example.org", ["hmsys1@localhost"], b"Subject: s\r\n\r\nx\r\n")
        assert poll(lambda: "mda delivery" in system.log(), 20), system.log()
        assert "result=TempFail" in system.log(), system.log()
        assert sorted(os.listdir(spool)) == []

        mbx.unlink()
        mbx.mkdir(mode=0o700)
        os.chown(mbx, entry.pw_uid, entry.pw_gid)
        assert _ctl(system, "schedule", "all").returncode == 0
        inbox = mbx / "inbox"
        assert poll(lambda: inbox.exists() and b"\nx\n" in inbox.read_bytes(), 20), system.log()
        st = inbox.stat()
        assert (st.st_uid, st.st_gid) == (entry.pw_uid, entry.pw_gid)
    finally:
        if mbx.is_symlink():
            mbx.unlink()
        else:
            shutil.rmtree(mbx, ignore_errors=True)
