"""The control socket as an ordinary local user sees it (REFERENCE §6, §8: CVE-2025-62875).

The daemon runs as root (``--user-mode``) with its socket in a world-searchable directory; the
tests create an ordinary user and run homemailctl as that user: Debian's ``/usr/bin/python3`` on
a world-readable copy of the ``homemail`` package (the repository may live under ``/root``,
which other users cannot read; ctl and what it imports are stdlib-only).  Raw-socket attacks
run as that user too, from a small inline script.

Reads are allowed (and show only the user's own mail), writes are refused with 77, and garbage,
a 100 MB frame or 1,000 connections cost only that user's connections: root and SMTP clients
are served throughout.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import homemail

from .conftest import (
    FLAKY_CONFIG,
    Daemon,
    LineReader,
    accepted_msgid,
    poll,
    run_ctl,
    send,
    token,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a test user needs root"),
    pytest.mark.timeout(120),
]

PYTHON = "/usr/bin/python3"

CONFIG = FLAKY_CONFIG

ALIASES = """\
# aliases for the access tests
postmaster: @USER@
alice: @USER@
flaky: @USER@
"""


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    home: Path
    pkg: Path  # a world-readable copy of the homemail package's parent directory
    socket: Path

    def env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.home),
            "LOGNAME": self.name,
            "USER": self.name,
            "PYTHONPATH": str(self.pkg),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOMEMAIL_SOCKET": str(self.socket),
            "HOMEMAIL_OFFLINE": str(self.home / "offline"),
        }

    def run(
        self, argv: list[str], input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            input=input or "",
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=self.home,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
        )

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """homemailctl as this user."""
        return self.run([PYTHON, "-m", "homemail.ctl", *args], input)

    def script(self, code: str, *args: str, timeout: float = 90) -> Any:
        """Run an inline Python script as this user; it prints one JSON line, returned parsed."""
        result = self.run([PYTHON, "-c", textwrap.dedent(code), *args], timeout=timeout)
        assert result.returncode == 0, f"script failed ({result.returncode}):\n{result.stderr}"
        return json.loads(result.stdout.strip().splitlines()[-1])

    def popen(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [PYTHON, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
            cwd=self.home,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
        )


def _world_readable_copy() -> Path:
    top = Path(tempfile.mkdtemp(prefix="hm-pkg-"))
    source = Path(homemail.__file__).resolve().parent
    shutil.copytree(source, top / "homemail", ignore=shutil.ignore_patterns("__pycache__"))
    top.chmod(0o755)
    for root, dirs, files in os.walk(top):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return top


@dataclass
class Setup:
    daemon: Daemon
    user: Account
    mine: str  # the test user's deferred envelope (submitted with sendmail)
    mine_msgid: str
    mine_token: str
    roots: str  # an envelope submitted over SMTP, not the user's
    roots_msgid: str


def queue_ids(daemon: Daemon) -> dict[str, dict[str, Any]]:
    result = run_ctl(daemon, "--json", "show", "queue")
    assert result.returncode == 0, result
    return {e["id"]: e for e in map(json.loads, result.stdout.splitlines())}


def wait_deferred(daemon: Daemon, msgid: str) -> str:
    """The evpid of ``msgid`` once its first delivery attempt failed."""

    def check() -> str | None:
        for env in queue_ids(daemon).values():
            if env["msgid"] == msgid and env["retry"] >= 1:
                return str(env["id"])
        return None

    found = poll(check, 15, 0.1)
    if not found:
        pytest.fail(f"{msgid} never deferred:\n{daemon.log()}")
    return str(found)


@pytest.fixture(scope="module")
def setup(shared_daemons: Callable[[str], Daemon]) -> Iterator[Setup]:
    name = "hmt" + secrets.token_hex(4)
    home = Path(tempfile.mkdtemp(prefix="hm-user-"))
    home.rmdir()
    subprocess.run(
        ["useradd", "-m", "-d", str(home), "-s", "/bin/sh", "-U", name],
        check=True,
        capture_output=True,
    )
    pkg = _world_readable_copy()
    try:
        entry = pwd.getpwnam(name)
        daemon = shared_daemons("access")
        daemon.dir.mkdir(parents=True, exist_ok=True)
        (daemon.dir / "aliases").write_text(daemon.render(ALIASES), encoding="utf-8")
        flaky = daemon.dir / "flaky"
        for sub in ("new", "cur"):
            (flaky / sub).mkdir(parents=True)
        (flaky / "tmp").write_bytes(b"not a directory\n")
        daemon.socket.parent.chmod(0o755)  # the test user must reach the socket
        daemon.start(CONFIG)
        user = Account(name, entry.pw_uid, entry.pw_gid, home, pkg, daemon.socket)

        tok = token()
        sent = user.ctl("sendmail", "-oi", "flaky@localhost", input=f"Subject: mine {tok}\n\nx\n")
        assert sent.returncode == 0 and sent.stderr == "", sent
        roots_msgid = accepted_msgid(
            send(daemon, "root@example.org", ["flaky@localhost"], b"Subject: root's\r\n\r\nx\r\n")
        )

        def users_envelope() -> dict[str, Any] | None:
            for env in queue_ids(daemon).values():
                if env["sender"].startswith(f"{name}@"):
                    return env
            return None

        found = poll(users_envelope, 15, 0.1)
        assert found, f"the user's message never reached the queue:\n{daemon.log()}"
        mine_msgid = str(found["msgid"])  # type: ignore[index]
        mine = wait_deferred(daemon, mine_msgid)
        roots = wait_deferred(daemon, roots_msgid)
        yield Setup(daemon, user, mine, mine_msgid, tok, roots, roots_msgid)
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def assert_still_serving(s: Setup) -> None:
    """root's homemailctl and an SMTP delivery work."""
    status = run_ctl(s.daemon, "show", "status")
    assert status.returncode == 0 and "smtp: running" in status.stdout, status
    tok = token()
    accepted_msgid(
        send(
            s.daemon, "x@example.org", ["alice@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()
        )
    )
    s.daemon.wait_for_message(tok)
    assert s.daemon.running


# -- reads -----------------------------------------------------------------------------------


def test_reads_are_allowed_and_show_only_the_users_own_mail(setup: Setup) -> None:
    user = setup.user
    everything = queue_ids(setup.daemon)
    assert {setup.mine, setup.roots} <= set(everything)

    result = user.ctl("--json", "show", "queue")
    assert result.returncode == 0, result
    seen = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in seen] == [setup.mine], seen
    text = user.ctl("show", "queue")
    assert text.returncode == 0 and text.stdout.startswith(setup.mine + "|"), text
    assert setup.roots not in text.stdout

    mailq = user.ctl("mailq")
    assert mailq.returncode == 0, mailq
    assert setup.mine_msgid in mailq.stdout and setup.roots_msgid not in mailq.stdout
    assert "-- 1 message, 1 recipient" in mailq.stdout, mailq.stdout

    own = user.ctl("show", "envelope", setup.mine)
    assert own.returncode == 0 and f"evpid: {setup.mine}" in own.stdout, own
    message = user.ctl("show", "message", setup.mine_msgid)
    assert message.returncode == 0 and f"mine {setup.mine_token}" in message.stdout, message
    for args in (["show", "envelope", setup.roots], ["show", "message", setup.roots_msgid]):
        other = user.ctl(*args)
        assert other.returncode == 1 and "no envelope" in other.stderr, (args, other)
        assert "root's" not in other.stdout

    stats = user.ctl("show", "stats")
    assert stats.returncode == 0 and re.search(r"^queue\.size=\d+$", stats.stdout, re.M), stats
    status = user.ctl("--json", "show", "status")
    assert status.returncode == 0, status
    assert json.loads(status.stdout)["smtp"] == "running"


# -- writes ----------------------------------------------------------------------------------


def test_writes_are_refused_with_77(setup: Setup) -> None:
    user, daemon = setup.user, setup.daemon
    aliases = (daemon.dir / "aliases").read_bytes()
    before = queue_ids(daemon)
    attempts = [
        ["schedule", "all"],
        ["schedule", setup.mine],
        ["remove", setup.mine],
        ["remove", "all"],
        ["pause", "envelope", setup.mine],
        ["resume", "envelope", "all"],
        ["pause", "smtp"],
        ["resume", "smtp"],
        ["pause", "mda"],
        ["pause", "mta"],
        ["reload"],
        ["update", "table", "aliases"],
        ["alias", "add", "mallory", user.name],
        ["alias", "remove", "alice"],
        ["log", "verbose"],
        ["newaliases"],
        ["sendmail", "-q"],
    ]
    for args in attempts:
        result = user.ctl(*args)
        assert result.returncode == 77, (args, result)
        assert "permission denied" in result.stderr, (args, result.stderr)

    # nothing changed
    after = queue_ids(daemon)
    assert set(after) == set(before)
    assert all(e["state"] == "pending" for e in after.values()), after
    status = json.loads(run_ctl(daemon, "--json", "show", "status").stdout)
    assert (status["smtp"], status["mda"], status["mta"]) == ("running",) * 3, status
    assert (daemon.dir / "aliases").read_bytes() == aliases
    assert "mallory" not in run_ctl(daemon, "alias", "list").stdout
    # root may do what the user may not
    assert run_ctl(daemon, "schedule", setup.mine).returncode == 0


# -- hostile clients -------------------------------------------------------------------------

GARBAGE = r"""
import json, socket, sys

path = sys.argv[1]
cases = [
    ("binary", [b"\x00\xff\xfe\x80 garbage\n"]),
    ("text", [b"not json at all\n"]),
    ("array", [b"[1, 2, 3]\n"]),
    ("version", [b'{"v": 99, "id": 1, "verb": "show status"}\n']),
    ("verb", [b'{"v": 1, "id": 1, "verb": "rm -rf /"}\n']),
    ("id", [b'{"v": 1, "id": -5, "verb": "show status"}\n']),
    ("args", [b'{"v": 1, "id": 1, "verb": "show status", "args": [1]}\n']),
    ("nested", [b'{"a":' * 10000 + b"1" + b"}" * 10000 + b"\n"]),
    ("utf8", [b'{"v": 1, "id": 1, "verb": "show \xc3\x28status"}\n']),
    ("nul-arg", [b'{"v": 1, "id": 1, "verb": "show envelope", "args": {"id": "\\u0000"}}\n',
                 b"garbage after it\n"]),
    ("valid-then-garbage", [b'{"v": 1, "id": 7, "verb": "show status"}\n', b"}{\n"]),
    ("truncated", [b'{"v": 1, "id": 1, "verb": "show st']),
    ("many-lines", [b"x\n" * 5000]),
]
out = {}
for name, chunks in cases:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    for chunk in chunks:
        try:
            s.sendall(chunk)
        except OSError:
            break
    if name == "truncated":
        s.shutdown(socket.SHUT_WR)
    data = b""
    closed = False
    try:
        while True:
            got = s.recv(65536)
            if not got:
                closed = True
                break
            data += got
    except socket.timeout:
        pass
    except OSError:
        closed = True
    s.close()
    replies = []
    for line in data.splitlines():
        try:
            replies.append(json.loads(line))
        except ValueError:
            replies.append({"unparsable": line.decode("latin-1")})
    out[name] = {"closed": closed, "replies": replies}
print(json.dumps(out))
"""


def test_garbage_frames_drop_only_that_client(setup: Setup) -> None:
    result = setup.user.script(GARBAGE, str(setup.user.socket))

    def codes(name: str) -> list[int]:
        return [r.get("error", {}).get("code", 0) for r in result[name]["replies"]]

    for name, case in result.items():
        assert case["closed"], f"{name}: the daemon kept the connection open: {case}"
        for reply in case["replies"]:
            assert "unparsable" not in reply, (name, reply)
            assert reply.get("v") == 1, (name, reply)
    for name in ("binary", "text", "array", "verb", "id", "args", "nested", "utf8"):
        assert codes(name) == [400], (name, result[name])
    assert codes("version") == [426], result["version"]
    # an argument error answers that request; the garbage after it ends the connection
    assert codes("nul-arg") == [400, 400], result["nul-arg"]
    valid = result["valid-then-garbage"]["replies"]
    assert valid[0]["id"] == 7 and valid[0]["ok"] is True, valid
    assert valid[0]["result"]["smtp"] == "running"
    assert [r["error"]["code"] for r in valid[1:]] == [400], valid
    assert result["truncated"]["replies"] == [], result["truncated"]
    # a flood of frames without reading the replies: dropped, with a 400 at most
    assert set(codes("many-lines")) <= {400}, result["many-lines"]

    assert_still_serving(setup)
    assert setup.user.ctl("show", "status").returncode == 0


HUGE = r"""
import json, socket, sys

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sys.argv[1])
chunk = b"a" * 65536
total = 100 * 1024 * 1024
sent = 0
error = None
try:
    while sent < total:
        sent += s.send(chunk)
except OSError as exc:
    error = type(exc).__name__
data = b""
try:
    while True:
        got = s.recv(65536)
        if not got:
            break
        data += got
except OSError as exc:
    error = error or type(exc).__name__
print(json.dumps({"sent": sent, "error": error, "reply": data.decode("latin-1")}))
"""


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def test_a_100_mb_frame_is_cut_after_64_kib(setup: Setup) -> None:
    pid = json.loads(run_ctl(setup.daemon, "--json", "show", "status").stdout)["pid"]
    peak_before = vm_kib(pid, "VmHWM")
    result = setup.user.script(HUGE, str(setup.user.socket))
    assert result["error"] is not None, (
        f"100 MB went through without the daemon objecting: {result}"
    )
    assert result["sent"] < 8 * 1024 * 1024, f"the daemon read {result['sent']} bytes of one frame"
    replies = [json.loads(line) for line in result["reply"].splitlines()]
    assert [r["error"]["code"] for r in replies] == [413], result["reply"]
    growth = vm_kib(pid, "VmHWM") - peak_before
    assert growth < 32 * 1024, f"the daemon's peak memory grew by {growth} KiB"
    assert_still_serving(setup)


MANY = r"""
import json, resource, select, socket, sys, time

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
path, count = sys.argv[1], int(sys.argv[2])
socks, failed = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)  # blocking: waits while the backlog is full
    except OSError:
        failed += 1
        s.close()
        continue
    socks.append(s)
# the refused ones get a reply and EOF; wait until that settles
poller = select.poll()
for s in socks:
    poller.register(s, select.POLLIN)
ready = set()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    events = poller.poll(500)
    before = len(ready)
    ready.update(fd for fd, _ in events)
    for fd, _ in events:
        poller.unregister(fd)
    if not events and len(ready) == before and len(ready) >= len(socks) - 256:
        break
refused, replies = 0, set()
for s in socks:
    if s.fileno() in ready:
        s.settimeout(5)
        data = b""
        try:
            while True:
                got = s.recv(4096)
                if not got:
                    break
                data += got
        except OSError:
            pass
        refused += 1
        replies.add(data.decode("latin-1"))
print(json.dumps({"opened": len(socks), "failed": failed, "refused": refused,
                  "held": len(socks) - refused, "replies": sorted(replies)}), flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print(json.dumps({"closed": True}), flush=True)
"""


def test_a_thousand_connections_from_one_user(setup: Setup) -> None:
    user = setup.user
    proc = user.popen(MANY, str(user.socket), "1000")
    reader = LineReader(proc)
    try:
        summary = json.loads(reader.expect(r"^\{", timeout=60).string)
        assert summary["opened"] + summary["failed"] == 1000, summary
        assert summary["opened"] >= 900, summary
        assert 0 < summary["held"] <= 256, f"no bound on one user's connections: {summary}"
        assert summary["refused"] >= summary["opened"] - 256, summary
        for reply in summary["replies"]:
            assert json.loads(reply)["error"]["code"] == 429, summary["replies"]

        # during: root and SMTP clients are served; the user's next connection is refused
        assert_still_serving(setup)
        # the refusal must arrive however the client's write races the daemon's close
        refusals = [user.ctl("show", "status") for _ in range(5)]

        assert proc.stdin is not None
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        reader.expect(r'"closed": true', timeout=30)
        assert proc.wait(30) == 0
    finally:
        reader.stop()

    # after: everyone, the user included, is served again
    assert_still_serving(setup)
    assert poll(lambda: user.ctl("show", "status").returncode == 0, 10), "user still locked out"
    # while it held its share, the user's own next connections were refused, and told so
    for mine in refusals:
        assert mine.returncode == 75 and "too many connections" in mine.stderr, mine


@pytest.mark.parametrize("how", ["their directory", "their link to /tmp"])
def test_a_socket_in_another_users_directory_is_not_trusted(tmp_path: Path, how: str) -> None:
    """A local user who plants a control socket where root's sendmail would look (the /tmp
    fallback) must not receive root's mail: the client refuses a directory it cannot trust,
    even behind a link to a directory root owns, and sendmail keeps the message offline."""
    theirs = tmp_path / "homemail-0"
    theirs.mkdir()
    if how == "their directory":
        listen_dir = client_dir = theirs
        os.chown(theirs, 65534, 65534)
    else:  # root's sticky directory, as /tmp: only the link in it is theirs
        theirs.chmod(0o1777)
        listen_dir = tmp_path / "tmp"
        listen_dir.mkdir()
        listen_dir.chmod(0o1777)
        client_dir = theirs / "homemail"
        client_dir.symlink_to(listen_dir)
        os.lchown(client_dir, 65534, 65534)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(listen_dir / "control.sock"))
    server.listen(1)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "homemail.ctl",
                "--socket",
                str(client_dir / "control.sock"),
                "sendmail",
                "root@localhost",
            ],
            input="Subject: secret\n\nfor root only\n",
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "HOMEMAIL_OFFLINE": str(tmp_path / "offline")},
        )
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert "refusing the socket" in result.stderr
    assert result.returncode == 0, result.stderr  # not lost: it waits for the real daemon
    [spooled] = list((tmp_path / "offline").iterdir())
    assert b"for root only" in spooled.read_bytes()
