"""End-to-end harness: the real daemon in a subprocess, driven over real sockets.

A :class:`Daemon` writes its configuration into a private directory, picks a free port, runs
``homemail run -f CFG --spool DIR --socket PATH --user-mode`` with ``HOME`` pointing into that
directory and its stderr captured to a file, and waits until the port accepts connections.
Configurations are written with placeholders that the harness fills in:

``@PORT@`` the listening port · ``@USER@`` the user running the tests (the only one the daemon
may deliver to in user mode) · ``@DIR@`` the daemon's private directory · ``@MAILDIR@`` and
``@MBOX@`` the default mailboxes inside it.

Nothing here sleeps to prove a point: every wait polls for a condition until a deadline and
fails with the daemon's log when the deadline passes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

USER = pwd.getpwuid(os.getuid()).pw_name
LOCAL_RCPT = f"{USER}@localhost"
START_TIMEOUT = 20.0
DELIVERY_TIMEOUT = 20.0

_SCRIPT = Path(sys.executable).with_name("homemail")
HOMEMAIL: list[str] = (
    [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "homemail.smtpd"]
)

DEFAULT_CONFIG = """\
# written by the integration tests
table aliases { postmaster = "@USER@", alice = "@USER@", bob = "@USER@", team = "alice, @USER@" }
listen on 127.0.0.1 port @PORT@
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for local action "local"
"""

#: The control tests' configuration: mail for flaky@localhost goes to a Maildir the tests can
#: make fail (``@DIR@/flaky``), the aliases come from ``@DIR@/aliases``.
FLAKY_CONFIG = """\
# control tests
table aliases file:@DIR@/aliases
table flakyrcpts { "flaky@localhost" }
listen on 127.0.0.1 port @PORT@
action "flaky" maildir "@DIR@/flaky" alias <aliases>
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for rcpt-to <flakyrcpts> action "flaky"
match from local for local action "local"
"""

#: An RFC 3463 enhanced status code right after the reply code.
ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?: |$)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def poll(condition: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Call ``condition`` until it returns something true or ``timeout`` passes; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def run_homemail(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HOMEMAIL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


class Daemon:
    """One homemail daemon with its own directory, spool, port, mailboxes and log."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.home = base / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.spool = base / "spool"
        self.maildir = base / "Maildir"
        self.mbox = base / "mbox"
        self.config_path = base / "smtpd.conf"
        self.log_path = base / "daemon.log"
        # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
        self._sockdir = Path(tempfile.mkdtemp(prefix="hm-"))
        self.socket = self._sockdir / "control.sock"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.template = DEFAULT_CONFIG
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),
            "XDG_RUNTIME_DIR": str(self._sockdir),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self.env.pop("JOURNAL_STREAM", None)

    # -- configuration -------------------------------------------------------------------------

    def render(self, template: str) -> str:
        return (
            template.replace("@PORT@", str(self.port))
            .replace("@USER@", USER)
            .replace("@MAILDIR@", str(self.maildir))
            .replace("@MBOX@", str(self.mbox))
            .replace("@DIR@", str(self.dir))
        )

    def write_config(self, template: str | None = None) -> Path:
        if template is not None:
            self.template = template
        self.config_path.write_text(self.render(self.template), encoding="utf-8")
        return self.config_path

    # -- process -------------------------------------------------------------------------------

    def command(self, *, user_mode: bool = True) -> list[str]:
        cmd = [
            *HOMEMAIL,
            "run",
            "-f",
            str(self.config_path),
            "--spool",
            str(self.spool),
            "--socket",
            str(self.socket),
        ]
        if user_mode:
            cmd.append("--user-mode")
        return cmd

    def run_refused(self, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run the daemon's command in the foreground and wait for its exit: for a start that
        must be refused (the caller checks the exit status and stderr)."""
        return subprocess.run(
            self.command(),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            stdin=subprocess.DEVNULL,
        )

    def start(self, template: str | None = None, *, write: bool = True) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        if write:
            self.write_config(template)
        with open(self.log_path, "ab") as log:
            log.write(f"==== harness: starting on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                cwd=self.home,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not port_open(self.port):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"homemail exited with {self.proc.returncode} during start-up:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"homemail did not accept connections on port {self.port} within "
                    f"{START_TIMEOUT:.0f} s:\n{self.log()}"
                )
            time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None, "daemon not running"
        self.proc.send_signal(sig)

    def hup(self) -> None:
        self.signal(signal.SIGHUP)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"homemail did not exit within {timeout:.0f} s of SIGTERM:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: the daemon gets no chance to clean up."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def restart(self, *, kill: bool = False) -> Daemon:
        if kill:
            self.kill()
        else:
            rc = self.stop()
            assert rc == 0, f"SIGTERM exit status {rc}:\n{self.log()}"
        return self.start(write=False)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    # -- log -----------------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """A position in the log; pass it as ``since`` to look only at what comes after."""
        return len(self.log())

    def wait_for_log(
        self, pattern: str, *, since: int = 0, count: int = 1, timeout: float = DELIVERY_TIMEOUT
    ) -> list[re.Match[str]]:
        regex = re.compile(pattern, re.MULTILINE)

        def found() -> list[re.Match[str]]:
            matches = list(regex.finditer(self.log()[since:]))
            return matches if len(matches) >= count else []

        matches = poll(found, timeout, 0.1)
        if not matches:
            pytest.fail(
                f"log never showed {count} x /{pattern}/ within {timeout:.0f} s:\n"
                f"{self.log()[since:]}"
            )
        return matches  # type: ignore[return-value]

    # -- mailboxes -----------------------------------------------------------------------------

    def wait_for_files(
        self, directory: Path, n: int, timeout: float = DELIVERY_TIMEOUT
    ) -> list[Path]:
        """Wait until ``directory`` holds at least ``n`` files; return them sorted by name."""

        def files() -> list[Path]:
            if not directory.is_dir():
                return []
            found = sorted(p for p in directory.iterdir() if p.is_file())
            return found if len(found) >= n else []

        found = poll(files, timeout, 0.05)
        if not found:
            have = sorted(directory.iterdir()) if directory.is_dir() else "no such directory"
            pytest.fail(
                f"{directory} did not get {n} files within {timeout:.0f} s "
                f"(has: {have}):\n{self.log()}"
            )
        return found  # type: ignore[return-value]

    def maildir_files(self, maildir: Path | None = None) -> list[Path]:
        root = maildir or self.maildir
        files: list[Path] = []
        for sub in ("new", "cur"):
            d = root / sub
            if d.is_dir():
                files.extend(p for p in d.iterdir() if p.is_file())
        return sorted(files)

    def maildir_messages(self, maildir: Path | None = None) -> list[bytes]:
        """The delivered messages (``new/`` and ``cur/``), as stored."""
        return [p.read_bytes() for p in self.maildir_files(maildir)]

    def wait_for_message(
        self, token: bytes | str, maildir: Path | None = None, timeout: float = DELIVERY_TIMEOUT
    ) -> bytes:
        """Wait for the one delivered message containing ``token``; fail if there are two."""
        if isinstance(token, str):
            token = token.encode()

        def matching() -> list[bytes]:
            return [m for m in self.maildir_messages(maildir) if token in m]

        found = poll(matching, timeout, 0.05)
        if not found:
            pytest.fail(
                f"no message containing {token!r} in {maildir or self.maildir} within "
                f"{timeout:.0f} s:\n{self.log()}"
            )
        assert len(found) == 1, f"{len(found)} copies of the message containing {token!r}"
        return found[0]  # type: ignore[index]

    # -- clients -------------------------------------------------------------------------------

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.test", timeout=timeout)

    def raw(self, timeout: float = 30.0) -> RawSmtp:
        return RawSmtp(self.port, timeout)


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        """The text of the last line (after the code)."""
        return self.lines[-1]

    @property
    def has_enhanced_code(self) -> bool:
        return all(ENHANCED.match(line) for line in self.lines)

    def __str__(self) -> str:
        return " / ".join(f"{self.code} {line}" for line in self.lines)


class RawSmtp:
    """An SMTP client that writes exactly the bytes it is given and parses replies strictly."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> Reply:
        """Read one (possibly multi-line) reply; fail on EOF or malformed lines."""
        code = None
        lines: list[str] = []
        while True:
            line = self._line()
            if line is None:
                raise ConnectionError(f"connection closed after {lines!r}")
            text = line.decode("utf-8", "replace")
            assert re.match(r"^\d{3}[ -]", text + " ") or re.match(r"^\d{3}$", text), (
                f"malformed reply line {text!r}"
            )
            if code is None:
                code = int(text[:3])
            assert int(text[:3]) == code, f"reply code changed inside a reply: {text!r}"
            lines.append(text[4:])
            if text[3:4] != "-":
                return Reply(code, lines)

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def replies_until_close(self) -> list[Reply]:
        out: list[Reply] = []
        while True:
            try:
                out.append(self.reply())
            except (ConnectionError, OSError):
                return out

    def command(self, line: str | bytes) -> Reply:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- message helpers -------------------------------------------------------------------------


def header_fields(message: bytes) -> list[tuple[str, bytes]]:
    """The header fields of a stored (LF) message: (lower-case name, whole field with folds)."""
    head = message.split(b"\n\n", 1)[0]
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\n" + line)
        else:
            fields.append((line.split(b":", 1)[0].strip().lower().decode("ascii", "replace"), line))
    return fields


def header_values(message: bytes, name: str) -> list[bytes]:
    return [raw.split(b":", 1)[1].strip() for n, raw in header_fields(message) if n == name]


def body_of(message: bytes) -> bytes:
    return message.split(b"\n\n", 1)[1] if b"\n\n" in message else b""


def split_trace(stored: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """Split a delivered message into (Return-Path line, Delivered-To line, Received field, rest).

    The daemon puts ``Return-Path:`` and ``Delivered-To:`` first, then its ``Received:`` field,
    then the message as the client sent it (with LF line endings).
    """
    lines = stored.split(b"\n")
    assert len(lines) > 3, stored[:200]
    return_path, delivered_to = lines[0], lines[1]
    assert lines[2].startswith(b"Received: "), f"third line is not Received: {lines[2]!r}"
    i = 3
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return return_path, delivered_to, b"\n".join(lines[2:i]), b"\n".join(lines[i:])


def send(
    daemon: Daemon,
    sender: str,
    rcpts: list[str],
    data: bytes,
    mail_options: list[str] | None = None,
) -> tuple[int, bytes]:
    """One transaction with smtplib; every RCPT must be accepted. Return the DATA reply."""
    with daemon.smtp() as s:
        code, msg = s.ehlo()
        assert code == 250, msg
        code, msg = s.mail(sender, mail_options or [])
        assert code == 250, f"MAIL FROM:<{sender}> refused: {code} {msg!r}"
        for rcpt in rcpts:
            code, msg = s.rcpt(rcpt)
            assert code == 250, f"RCPT TO:<{rcpt}> refused: {code} {msg!r}"
        reply = s.data(data)
        s.quit()
    return reply


def accepted_msgid(reply: tuple[int, bytes]) -> str:
    """The queue id from ``250 2.0.0 MSGID Message accepted for delivery``."""
    code, msg = reply
    assert code == 250, f"DATA refused: {code} {msg!r}"
    m = re.match(rb"^2\.0\.0 (\S+) Message accepted for delivery$", msg)
    assert m, f"unexpected DATA reply: {msg!r}"
    return m.group(1).decode()


def crlf(text: str | bytes) -> bytes:
    """A message from LF-separated text, as it goes on the wire (CRLF)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def token() -> str:
    return os.urandom(6).hex()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that is not started yet: call ``daemon.start(config_template)``."""
    d = Daemon(tmp_path / "daemon")
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def running(daemon: Daemon) -> Daemon:
    """A daemon started with :data:`DEFAULT_CONFIG`."""
    return daemon.start()


@pytest.fixture(scope="module")
def shared_daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Daemon]]:
    """Module-scoped: ``shared_daemons(name)`` makes a daemon torn down with the module."""
    made: list[Daemon] = []

    def make(name: str) -> Daemon:
        d = Daemon(tmp_path_factory.mktemp(name))
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()


# -- homemailctl and the control socket ------------------------------------------------------

CTL_SCRIPT = Path(sys.executable).with_name("homemailctl")
HOMEMAILCTL: list[str] = (
    [str(CTL_SCRIPT)] if CTL_SCRIPT.exists() else [sys.executable, "-m", "homemail.ctl"]
)


def ctl_env(daemon: Daemon, **extra: str) -> dict[str, str]:
    """The daemon's environment with ``HOMEMAIL_SOCKET`` and ``HOMEMAIL_OFFLINE`` pointing at it."""
    env = {
        **daemon.env,
        "HOMEMAIL_SOCKET": str(daemon.socket),
        "HOMEMAIL_OFFLINE": str(daemon.spool / "offline"),
    }
    env.update(extra)
    return env


def run_ctl(
    daemon: Daemon,
    *args: str,
    input: str | bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """``homemailctl --socket SOCKET ARGS…`` as a subprocess; stdout and stderr as text."""
    return subprocess.run(
        [*HOMEMAILCTL, "--socket", str(daemon.socket), *args],
        input=input.decode() if isinstance(input, bytes) else (input or ""),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or ctl_env(daemon),
    )


class LineReader:
    """The stdout of a running subprocess, line by line, read by a thread; wait with deadlines."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import queue
        import threading

        assert proc.stdout is not None
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self._queue.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._queue.put(None)

    def _drain(self, timeout: float) -> bool:
        """Move what arrived into ``lines``, waiting up to ``timeout`` for a line; False at EOF."""
        import queue

        try:
            item = self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return True
        while item is not None:
            self.lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
        self._queue.put(None)  # EOF stays visible to the next call
        return False

    def mark(self) -> int:
        """A position in ``lines``; pass it as ``since`` to look only at what comes after."""
        self._drain(0)
        return len(self.lines)

    def expect(
        self, pattern: str, *, since: int = 0, timeout: float = DELIVERY_TIMEOUT
    ) -> re.Match[str]:
        """The first line at index ``since`` or later matching ``pattern``; fail at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        checked = since
        while True:
            for line in self.lines[checked:]:
                m = regex.search(line)
                if m:
                    return m
            checked = max(checked, len(self.lines))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self._drain(min(left, 0.2)) and len(self.lines) == checked:
                break  # EOF and nothing new
        pytest.fail(
            f"no line /{pattern}/ within {timeout:.0f} s (exit status {self.proc.poll()}); got:\n"
            + "\n".join(self.lines[since:])
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
