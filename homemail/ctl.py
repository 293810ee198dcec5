"""homemailctl, and the sendmail, mailq and newaliases it also answers to (one multi-call program).

This module owns the command line of the control client: parsing the smtpctl-style verbs, the
blocking :class:`ControlClient` for the control socket (protocol in
:mod:`homemail.control_protocol`), the text layouts of its answers, the exit codes, and the
sendmail compatibility interface (``sendmail``, ``mailq``, ``newaliases`` by ``argv[0]``, or
``homemailctl sendmail …``).  It also owns the password hash format of ``encrypt``, checked by
:func:`verify_password`.  It imports only the standard library and homemail's stdlib-only
modules, so it starts fast.

**Exit codes** (sysexits): 0 ok, 1 no such envelope/table/alias or a conflict with its state
(``schedule`` of a paused envelope), 64 usage, 65 bad data (or a 5xx from the daemon for
sendmail), 67 a recipient rejected, 69 the daemon is not running, 70 daemon internal error,
75 temporary failure, 76 protocol error, 77 permission denied, 78 invalid configuration on
``reload``.

**Sendmail.**  The message is read from stdin, given CRLF line endings and the ``From:``,
``Date:`` and ``Message-ID:`` headers it lacks, then submitted to the daemon as SMTP over the
control socket (verb ``smtp``).  When the daemon is not running, or answers 4xx, the message is
written to the offline spool (:mod:`homemail.offline`; the one that daemon recorded beside its
socket, see :func:`default_offline_dir`) and sendmail succeeds: the daemon picks it up when it
starts.  Bare local names (``root``) are qualified with this host's name.

**Password hashes** (``encrypt``): ``scrypt$N$r$p$SALT$HASH`` with N=16384, r=8, p=1, a random
16-byte salt and a 32-byte key, SALT and HASH in standard base64 with padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import pwd
import re
import secrets
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from homemail import control_protocol as proto
from homemail import offline
from homemail.address import AddressError, host_name, parse_mailbox
from homemail.control_protocol import Code, ProtocolError, Reply

if TYPE_CHECKING:
    import smtplib

EX_OK = 0
EX_NOTFOUND = 1
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78

SYSTEM_SOCKET = "/run/homemail/control.sock"
SYSTEM_OFFLINE = "/var/spool/homemail/offline"
CALL_TIMEOUT = 60.0
SMTP_TIMEOUT = 300.0
HEADER_EVERY = 20
MAX_INPUT = offline.MAX_SIZE - 64 * 1024

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_KEYLEN = 32

USAGE = """\
usage: homemailctl [--socket PATH] [--json] COMMAND

commands:
  show queue | show envelope ID | show message ID
  show stats | show status | show config
  schedule ID|all            remove ID|all
  pause envelope ID|all      resume envelope ID|all
  pause smtp|mda|mta         resume smtp|mda|mta
  reload                     update table NAME
  log verbose|brief          monitor [--counters]
  alias list | alias add NAME TARGET... | alias remove NAME
  encrypt [STRING]           secret set LABEL USERNAME   (password on stdin)
  sendmail [FLAGS] [RECIPIENT...] | mailq | newaliases

--json prints the daemon's result as JSON; for show queue, mailq and monitor, one object per
line.  encrypt, sendmail and show message have no JSON form and refuse it.
The socket defaults to $HOMEMAIL_SOCKET, else the daemon's usual place.
"""

SENDMAIL_USAGE = """\
usage: sendmail [-t] [-i|-oi] [-f|-r SENDER] [-F NAME] [-N DSN] [-R full|hdrs] [-V ENVID]
                [-bm|-bs|-bp|-bi|-q] [-v] [-U] [-oX] [-B TYPE] [-L TAG] [--] [RECIPIENT...]
"""


# -- errors -----------------------------------------------------------------------------------


class Exit(Exception):
    """Stop with *status*, printing *message* (if any) on stderr."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UsageError(Exit):
    def __init__(self, message: str) -> None:
        super().__init__(EX_USAGE, message)


class UntrustedSocket(Exit):
    """The socket is in a directory another user could have made or changed."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(EX_NOPERM, f"refusing the socket {clean(path)}: {reason}")
        self.path = path


class CtlError(Exception):
    """The daemon answered a request with an error reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


class DaemonDown(Exception):
    """Nothing listens on the control socket."""

    def __init__(self, path: str) -> None:
        super().__init__(f"the daemon is not running (no socket at {path})")
        self.path = path


class ConnectionClosed(Exception):
    """The daemon closed the connection before its reply."""


def status_for(code: int) -> int:
    """The exit status for an error reply of the daemon."""
    statuses: dict[int, int] = {
        Code.FORBIDDEN: EX_NOPERM,
        Code.NOT_FOUND: EX_NOTFOUND,
        Code.CONFLICT: EX_NOTFOUND,
        Code.UNAVAILABLE: EX_TEMPFAIL,
        Code.TOO_MANY: EX_TEMPFAIL,
        Code.BAD_REQUEST: EX_DATAERR,
        Code.TOO_LARGE: EX_DATAERR,
        Code.VERSION: EX_PROTOCOL,
        Code.INTERNAL: EX_SOFTWARE,
    }
    return statuses.get(code, EX_NOTFOUND)


# -- paths ------------------------------------------------------------------------------------


def default_socket() -> str:
    """$HOMEMAIL_SOCKET; else the user-mode daemon's socket, unless it has none and a system
    daemon runs (root always prefers the system daemon's)."""
    env = os.environ.get("HOMEMAIL_SOCKET")
    if env:
        return env
    # the same place as homemail.smtpd.user_paths(), which this module must not import
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/homemail-{os.getuid()}"
    mine = os.path.join(runtime, "homemail", "control.sock")
    if os.path.exists(SYSTEM_SOCKET) and (os.geteuid() == 0 or not os.path.lexists(mine)):
        return SYSTEM_SOCKET
    return mine


def default_offline_dir(sock_path: str | None = None) -> str:
    """Where sendmail leaves mail while the daemon is down.

    $HOMEMAIL_OFFLINE; else the offline spool the daemon of ``sock_path`` recorded beside its
    socket (``SOCKET.offline``, see :func:`recorded_offline_dir`); else the system daemon's
    (recorded beside the system socket, or the usual place) when we may write there; else the
    user-mode one.
    """
    env = os.environ.get("HOMEMAIL_OFFLINE")
    if env:
        return env
    if sock_path:
        recorded = recorded_offline_dir(sock_path)
        if recorded is not None:
            return recorded
    for system in (recorded_offline_dir(SYSTEM_SOCKET), SYSTEM_OFFLINE):
        if system and os.path.isdir(system) and os.access(system, os.W_OK | os.X_OK):
            return system
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "homemail", "spool", "offline")


def recorded_offline_dir(sock_path: str) -> str | None:
    """The offline spool the daemon of ``sock_path`` recorded beside it, or None.

    It is trusted as far as the socket would be: the link ``SOCKET.offline`` must be in a
    directory :func:`untrusted_directory` accepts and belong to root or us, and lead to a
    directory of root's or ours that is reached through such directories only.
    """
    link = os.path.abspath(sock_path) + offline.LOCATION_SUFFIX
    try:
        if not stat.S_ISLNK(os.lstat(link).st_mode):
            return None
        target = os.path.realpath(link)
        if not stat.S_ISDIR(os.stat(target).st_mode):
            return None
    except (OSError, ValueError):
        return None
    # the walk follows the link: it, where it leads and every directory on the way are checked
    if untrusted_directory(link) is not None:
        return None
    return target


def untrusted_directory(path: str, *, shared_ok: bool = False) -> str | None:
    """Why another user could have made or changed the directory ``path``, or None.

    The path is walked one name at a time from ``/``, following each symbolic link where it
    is met, and every directory and link on the way must belong to root or to us: a link or a
    directory another user made (``/tmp/homemail-UID`` made before us, with ``homemail`` a link
    to ``/tmp``; a link of ours to one of theirs) would let them put their socket there.
    Unless ``shared_ok`` (a socket path the user chose), only a sticky directory (``/tmp``) may
    also be writable by anyone.
    """
    uid = os.geteuid()
    pending = os.path.abspath(path).split("/")
    current = "/"
    links = 0
    while True:
        try:
            st = os.lstat(current)
        except OSError:
            return None  # missing or unreachable: connecting will say so
        if st.st_uid not in (0, uid):
            return f"{clean(current)} belongs to uid {st.st_uid}, not to root or you"
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 40:
                return f"too many links on the way to {clean(path)}"
            target = os.readlink(current)
            pending = target.split("/") + pending
            current = "/" if target.startswith("/") else os.path.dirname(current)
        elif not shared_ok and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            return f"anyone may write in {clean(current)}"
        while pending and pending[0] in ("", "."):
            pending.pop(0)
        if not pending:
            return None
        name = pending.pop(0)
        current = os.path.dirname(current) if name == ".." else os.path.join(current, name)


# -- the client -------------------------------------------------------------------------------


class ControlClient:
    """A blocking connection to the daemon's control socket; one request at a time."""

    def __init__(self, path: str, *, timeout: float | None = CALL_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._buf = bytearray()
        self._next_id = 1

    def connect(self) -> None:
        self._check_socket_dir()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            raise DaemonDown(self.path) from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def _check_socket_dir(self) -> None:
        """Only a socket in a directory of root's or ours: one planted by another user (the
        predictable /tmp fallback) must not receive our mail.  Raises UntrustedSocket."""
        # the whole path: a link as its last name is followed too (to whose socket?)
        reason = untrusted_directory(os.path.abspath(self.path), shared_ok=True)
        if reason is not None:
            raise UntrustedSocket(self.path, reason)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> ControlClient:
        if self.sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self) -> socket.socket:
        if self.sock is None:
            self.connect()
        assert self.sock is not None
        return self.sock

    def wait_long(self) -> None:
        """Connect (within the usual limit), then wait for replies however long they take."""
        self._conn().settimeout(None)

    def _send(self, verb: str, args: dict[str, Any]) -> int:
        ident = self._next_id
        self._next_id += 1
        try:
            frame = proto.request(ident, verb, **args)
        except ProtocolError as exc:
            raise Exit(EX_DATAERR, exc.message) from None
        try:
            self._conn().sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            # the daemon may have refused the connection (too many) before reading a byte:
            # its reply is what to report
            reply = proto.decode_reply(self._read_line())
            if not reply.ok:
                raise CtlError(reply.code, reply.message) from None
            raise ConnectionClosed() from None
        return ident

    def _read_line(self) -> bytes:
        sock = self._conn()
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[: end + 1])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > proto.MAX_FRAME:
                raise ProtocolError(Code.TOO_LARGE, "reply frame too large")
            data = sock.recv(65536)
            if not data:
                raise ConnectionClosed()
            self._buf += data

    def _read_line_exact(self) -> bytes:
        """Read one line without consuming a byte past it (what follows is SMTP)."""
        if self._buf:
            raise ProtocolError(Code.BAD_REQUEST, "unexpected data before the smtp reply")
        sock = self._conn()
        line = bytearray()
        while not line.endswith(b"\n"):
            peek = sock.recv(65536, socket.MSG_PEEK)
            if not peek:
                raise ConnectionClosed()
            end = peek.find(b"\n")
            line += sock.recv(end + 1 if end >= 0 else len(peek))
            if len(line) > proto.MAX_FRAME:
                raise ProtocolError(Code.TOO_LARGE, "reply frame too large")
        return bytes(line)

    def _decode(self, line: bytes, ident: int) -> Reply:
        reply = proto.decode_reply(line)
        if reply.event is None and not reply.ok and reply.id in (ident, 0):
            raise CtlError(reply.code, reply.message)
        if reply.id != ident:
            raise ProtocolError(Code.BAD_REQUEST, f"reply to request {reply.id}, not {ident}")
        return reply

    def call(self, verb: str, /, **args: Any) -> Any:
        """Send one request and return its result; raises CtlError for an error reply."""
        ident = self._send(verb, args)
        while True:
            reply = self._decode(self._read_line(), ident)
            if reply.event is None:
                return reply.result

    def stream(self, verb: str, /, **args: Any) -> Iterator[Reply]:
        """Yield the event frames of a request, then its final ok reply (``event`` None)."""
        ident = self._send(verb, args)
        while True:
            reply = self._decode(self._read_line(), ident)
            yield reply
            if reply.event is None:
                return

    def subscribe(self, verb: str, /, **args: Any) -> Iterator[Reply]:
        """For ``monitor``: check the ok reply, then yield events until the daemon hangs up."""
        ident = self._send(verb, args)
        # no end to the wait, but a wakeup every second: a ^C that lands just before a
        # blocking recv() would otherwise be seen only when the next event comes
        self._conn().settimeout(1.0)
        accepted = False
        while True:
            try:
                line = self._read_line()
            except TimeoutError:  # what was read is kept in the buffer
                continue
            except ConnectionClosed:
                if accepted:
                    return
                raise
            reply = self._decode(line, ident)
            if reply.event is None:
                accepted = True
                continue
            yield reply

    def start_smtp(self) -> socket.socket:
        """Ask for an SMTP session; return the socket, which now speaks SMTP (banner next)."""
        ident = self._send("smtp", {})
        reply = self._decode(self._read_line_exact(), ident)
        if reply.event is not None:
            raise ProtocolError(Code.BAD_REQUEST, "event frame in reply to smtp")
        sock = self._conn()
        self.sock = None
        return sock


# -- text output ------------------------------------------------------------------------------


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def clean(value: object) -> str:
    """One line fit for a terminal: controls, surrogates and bidi marks escaped."""
    text = value if isinstance(value, str) else str(value)
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def clean_text(text: str) -> str:
    return "\n".join(clean(line).replace("\\x09", "\t") for line in text.split("\n"))


def format_duration(seconds: float) -> str:
    """``2m13s``, ``3d4h``, ``45s``, ``0s``: the two most significant units."""
    sign = "-" if seconds < 0 else ""
    rest = round(abs(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (name, size) in enumerate(units):
        if rest >= size or size == 1:
            high, rest = divmod(rest, size)
            text = f"{high}{name}"
            if index + 1 < len(units):
                low_name, low_size = units[index + 1]
                low = rest // low_size
                if low:
                    text += f"{low}{low_name}"
            return sign + text
    return "0s"  # pragma: no cover - the loop always returns


def _number(env: dict[str, Any], key: str) -> float | None:
    value = env.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def format_queue_line(env: dict[str, Any], now: float) -> str:
    """``ID|TYPE|SENDER|RCPT|DEST|AGE|EXPIRES-IN|RETRIES|STATE|LAST-ERROR``."""
    ctime, expire = _number(env, "ctime"), _number(env, "expire")
    sender = env.get("sender", "")
    fields = [
        env.get("id", "?"),
        env.get("type", "?"),
        sender if sender else "<>",
        env.get("rcpt", ""),
        env.get("dest", ""),
        format_duration(now - ctime) if ctime is not None else "-",
        format_duration(expire - now) if expire is not None else "-",
        env.get("retry", 0),
        env.get("state", "?"),
        env.get("last_error", ""),
    ]
    return "|".join(clean(f) for f in fields)


def format_mailq(envelopes: list[dict[str, Any]]) -> str:
    """A sendmail/Postfix-style listing, one block per message."""
    if not envelopes:
        return "Mail queue is empty\n"
    messages: dict[str, list[dict[str, Any]]] = {}
    for env in envelopes:
        messages.setdefault(str(env.get("msgid", env.get("id", "?"))), []).append(env)
    lines = ["-Queue ID- ----Arrival Time---- -Sender/Recipient-------"]
    indent = " " * 32
    for msgid, envs in messages.items():
        states = {env.get("state") for env in envs}
        mark = "*" if "running" in states else "!" if states == {"paused"} else " "
        ctimes = [t for t in (_number(e, "ctime") for e in envs) if t is not None]
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(min(ctimes))) if ctimes else "-"
        sender = envs[0].get("sender") or "<>"
        lines.append(f"{clean(msgid) + mark:<10} {arrival:<20} {clean(sender)}")
        for env in envs:
            if env.get("last_error"):
                lines.append(f"{indent}({clean(env['last_error'])})")
            lines.append(f"{indent}{clean(env.get('rcpt', ''))}")
        lines.append("")
    count = len(envelopes)
    lines.append(
        f"-- {len(messages)} message{'s' if len(messages) != 1 else ''}, "
        f"{count} recipient{'s' if count != 1 else ''}"
    )
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, str):
        return clean(value)
    return clean(json.dumps(value))


def format_event(name: str, data: dict[str, Any]) -> str:
    """``NAME key=value …`` with values quoted when they hold spaces, quotes or ``=``."""
    parts = [clean(name)]
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{clean(key)}={clean(text)}")
    return " ".join(parts)


class CounterTable:
    """``monitor --counters``: a header every :data:`HEADER_EVERY` rows, then a row a second."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.widths: list[int] = []
        self.rows = 0

    def lines(self, data: dict[str, Any]) -> list[str]:
        out: list[str] = []
        keys = list(data)
        if keys != self.keys or self.rows % HEADER_EVERY == 0:
            if keys != self.keys:
                self.keys = keys
                self.widths = [max(len(k), 6) for k in keys]
                self.rows = 0
            out.append(" ".join(clean(k).rjust(w) for k, w in zip(keys, self.widths, strict=True)))
        cells = []
        for key, width in zip(keys, self.widths, strict=True):
            value = data[key]
            text = f"{value:g}" if isinstance(value, float) else clean(value)
            cells.append(text.rjust(width))
        out.append(" ".join(cells))
        self.rows += 1
        return out


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _plural(count: object, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# -- password hashes --------------------------------------------------------------------------


def _check_password(password: str) -> None:
    if not password:
        raise Exit(EX_DATAERR, "empty password")
    if any(c in password for c in "\r\n\x00"):
        raise Exit(EX_DATAERR, "a password must not contain CR, LF or NUL")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, keylen: int) -> bytes:
    maxmem = 129 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=keylen, maxmem=maxmem)


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$SALT$HASH`` for a credentials table (see the module docstring)."""
    _check_password(password)
    try:
        raw = password.encode("utf-8")
    except UnicodeEncodeError:
        raise Exit(EX_DATAERR, "the password is not valid UTF-8") from None
    salt = secrets.token_bytes(16)
    digest = _scrypt(raw, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_KEYLEN)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether *password* matches a hash made by :func:`hash_password`; False if malformed."""
    parts = hashed.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    if not all(p.isascii() and p.isdigit() and len(p) <= 8 for p in parts[1:4]):
        return False
    n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        return False
    if n * r > 2**21:  # more than 256 MiB of memory: not ours
        return False
    try:
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
        raw = password.encode("utf-8")
    except (binascii.Error, ValueError):
        return False
    if not 8 <= len(salt) <= 64 or not 16 <= len(expected) <= 64:
        return False
    if not password or any(c in password for c in "\r\n\x00"):
        return False
    return hmac.compare_digest(_scrypt(raw, salt, n, r, p, len(expected)), expected)


def _read_password() -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("password: ")
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def do_encrypt(args: dict[str, Any]) -> int:
    password = args.get("string")
    if not isinstance(password, str):
        password = _read_password()
        if password.endswith("\r"):
            password = password[:-1]
    print(hash_password(password))
    return EX_OK


# -- homemailctl command line -----------------------------------------------------------------


@dataclass
class Options:
    socket: str
    json: bool = False


@dataclass
class Command:
    """What to do: a control verb with its args, or a local action (encrypt, sendmail, …)."""

    verb: str
    args: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)  # sendmail's own arguments


_ID = re.compile(r"^[0-9a-fA-F]{1,16}$")


def _check_id(text: str, *, allow_all: bool) -> str:
    if allow_all and text == "all":
        return text
    if not _ID.match(text):
        raise UsageError(f"not an envelope or message id: {clean(text)}")
    return text.lower()


def _one_line(text: str, what: str) -> str:
    if not text or any(c in text for c in "\r\n\x00"):
        raise Exit(EX_DATAERR, f"{what} must be one non-empty line")
    return text


def parse_options(argv: Sequence[str]) -> tuple[Options, list[str]]:
    """The global options before the command; returns them and the command words."""
    sock: str | None = None
    as_json = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg == "--json":
            as_json = True
        elif arg == "--socket":
            if i + 1 >= len(argv) or not argv[i + 1]:
                raise UsageError("--socket needs a path")
            i += 1
            sock = argv[i]
        elif arg.startswith("--socket="):
            sock = arg.partition("=")[2]
            if not sock:
                raise UsageError("--socket needs a path")
        elif arg in ("-h", "--help"):
            return Options(sock or "", as_json), ["help"]
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown option {clean(arg)}")
        else:
            break
        i += 1
    return Options(sock or default_socket(), as_json), list(argv[i:])


def parse_command(words: Sequence[str]) -> Command:
    """The command words (``show queue``, ``pause envelope ID`` …); raises UsageError."""
    if not words:
        raise UsageError("no command given")
    head, rest = words[0], list(words[1:])
    n = len(rest)
    if head == "sendmail":
        return Command("sendmail", argv=rest)
    if head in ("mailq", "newaliases", "reload", "help") and n == 0:
        return Command(head)
    if head == "show" and n >= 1:
        what = rest[0]
        if what in ("queue", "stats", "status", "config") and n == 1:
            return Command(f"show {what}")
        if what in ("envelope", "message") and n == 2:
            return Command(f"show {what}", {"id": _check_id(rest[1], allow_all=False)})
    if head in ("schedule", "remove") and n == 1:
        return Command(head, {"id": _check_id(rest[0], allow_all=True)})
    if head in ("pause", "resume") and n >= 1:
        if rest[0] == "envelope" and n == 2:
            return Command(f"{head} envelope", {"id": _check_id(rest[1], allow_all=True)})
        if rest[0] in ("smtp", "mda", "mta") and n == 1:
            return Command(f"{head} {rest[0]}")
    if head == "update" and n == 2 and rest[0] == "table":
        return Command("update table", {"name": _one_line(rest[1], "a table name")})
    if head == "log" and n == 1 and rest[0] in ("verbose", "brief"):
        return Command(f"log {rest[0]}")
    if head == "alias" and n >= 1:
        if rest[0] == "list" and n == 1:
            return Command("alias list")
        if rest[0] == "add" and n >= 3:
            name = _one_line(rest[1], "an alias name")
            targets = [_one_line(t, "a target") for t in rest[2:]]
            return Command("alias add", {"name": name, "targets": targets})
        if rest[0] == "remove" and n == 2:
            return Command("alias remove", {"name": _one_line(rest[1], "an alias name")})
    if head == "monitor" and rest in ([], ["--counters"]):
        return Command("monitor", {"counters": True} if rest else {})
    if head == "secret" and n == 3 and rest[0] == "set":
        return Command(
            "secret set",
            {"label": _one_line(rest[1], "a label"), "username": _one_line(rest[2], "a user name")},
        )
    if head == "encrypt" and n <= 1:
        return Command("encrypt", {"string": rest[0]} if rest else {})
    raise UsageError(f"unknown or incomplete command: {clean(' '.join(words))}")


#: the commands whose output has no JSON form, and why: --json is refused, not ignored
NO_JSON = {
    "encrypt": "it prints the hash alone",
    "sendmail": "it speaks sendmail's interface (use --json mailq for the queue)",
    "show message": "it prints the message as it is stored",
}


def _print_result(opts: Options, result: Any, text: str) -> None:
    _write((json.dumps(result) if opts.json else text) + "\n")


def run(opts: Options, cmd: Command) -> int:
    """Carry out one parsed command; returns the exit status (raises Exit and friends)."""
    verb = cmd.verb
    if verb == "help":
        _write(USAGE)
        return EX_OK
    if opts.json and verb in NO_JSON:
        raise Exit(EX_USAGE, f"--json does not apply to {verb}: {NO_JSON[verb]}")
    if verb == "encrypt":
        return do_encrypt(cmd.args)
    if verb == "sendmail":
        return sendmail(cmd.argv, opts.socket)
    if verb == "mailq":
        return mailq(opts.socket, as_json=opts.json)
    if verb == "newaliases":
        return newaliases(opts.socket, as_json=opts.json)
    with ControlClient(opts.socket) as client:
        if verb in ("remove", "pause envelope", "resume envelope"):
            # a disk sync an envelope in queue/: "all" on a big queue outlasts the usual limit
            # (the daemon answers when it is done; ^C stops the waiting, not the work)
            client.wait_long()
        if verb == "show queue":
            return show_queue(client, as_json=opts.json)
        if verb == "show message":
            return show_message(client, cmd.args)
        if verb == "monitor":
            return monitor(client, opts, bool(cmd.args.get("counters")))
        if verb == "secret set":
            password = _read_password()
            if password.endswith("\r"):
                password = password[:-1]
            client.call(verb, **cmd.args, password=_one_line(password, "the password"))
            _print_result(
                opts,
                {"label": cmd.args["label"]},
                f"credentials for {clean(cmd.args['label'])} stored",
            )
            return EX_OK
        if verb == "reload":
            try:
                result = client.call("reload")
            except CtlError as exc:
                if exc.code != Code.CONFLICT:
                    raise
                raise Exit(EX_CONFIG, clean_text(exc.message)) from None
            _print_result(opts, result, "configuration reloaded")
            return EX_OK
        result = client.call(verb, **cmd.args)
    _print_result(opts, result, describe(cmd, result))
    return EX_OK


def describe(cmd: Command, result: Any) -> str:
    """The text a verb prints for its result."""
    verb, args = cmd.verb, cmd.args
    res: dict[str, Any] = result if isinstance(result, dict) else {}
    if verb == "show stats":
        return "\n".join(f"{clean(k)}={_value(res[k])}" for k in sorted(res))
    if verb == "show status":
        return "\n".join(f"{clean(k)}: {_value(v)}" for k, v in res.items())
    if verb == "show envelope":
        return "\n".join(f"{clean(k)}: {_value(res[k])}" for k in sorted(res))
    if verb == "show config":
        return clean_text(str(res.get("text", ""))).rstrip("\n")
    if verb in ("schedule", "remove", "pause envelope", "resume envelope"):
        done = {"schedule": "scheduled", "remove": "removed"}.get(verb, verb.split()[0] + "d")
        return f"{_plural(res.get('count', 0), 'envelope')} {done}"
    if verb.startswith(("pause ", "resume ")):
        action, subsystem = verb.split()
        return f"{subsystem} {action}d"
    if verb == "update table":
        return f"table {clean(args['name'])} updated"
    if verb.startswith("log "):
        return f"logging {verb.split()[1]}"
    if verb == "alias list":
        aliases = res.get("aliases", [])
        lines = []
        for entry in aliases if isinstance(aliases, list) else []:
            if isinstance(entry, dict):
                targets = entry.get("targets", [])
                joined = ", ".join(clean(t) for t in targets) if isinstance(targets, list) else ""
                lines.append(f"{clean(entry.get('name', '?'))}: {joined}")
        return "\n".join(lines) if lines else f"no aliases in {clean(res.get('file', '?'))}"
    if verb == "alias add":
        return f"alias {clean(args['name'])} added"
    if verb == "alias remove":
        return f"alias {clean(args['name'])} removed"
    return clean(json.dumps(result))


def _items(reply: Reply) -> list[dict[str, Any]]:
    items = (reply.data or {}).get("items")
    if not isinstance(items, list):
        return []
    return [env for env in items if isinstance(env, dict)]


def show_queue(client: ControlClient, *, as_json: bool) -> int:
    now = time.time()
    for reply in client.stream("show queue"):
        if reply.event != "items":
            continue
        envs = _items(reply)
        if envs:
            render = json.dumps if as_json else (lambda env: format_queue_line(env, now))
            _write("".join(render(env) + "\n" for env in envs))
    return EX_OK


def show_message(client: ControlClient, args: dict[str, Any]) -> int:
    out = sys.stdout.buffer
    for reply in client.stream("show message", **args):
        if reply.event != "chunk":
            continue
        chunk = (reply.data or {}).get("b64")
        if not isinstance(chunk, str):
            raise ProtocolError(Code.BAD_REQUEST, "chunk without data")
        try:
            out.write(base64.b64decode(chunk, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError(Code.BAD_REQUEST, "chunk is not base64") from None
        out.flush()
    return EX_OK


def monitor(client: ControlClient, opts: Options, counters: bool) -> int:
    table = CounterTable()
    try:
        for reply in client.subscribe("monitor", **({"counters": True} if counters else {})):
            name, data = reply.event or "", reply.data or {}
            if opts.json:
                _write(json.dumps({"event": name, "data": data}) + "\n")
            elif counters:
                if name == "counters":
                    _write("".join(line + "\n" for line in table.lines(data)))
            else:
                _write(format_event(name, data) + "\n")
    except KeyboardInterrupt:
        return EX_OK
    raise ConnectionClosed()


def mailq(sock_path: str, *, as_json: bool = False) -> int:
    """Sendmail's queue listing; with ``as_json`` the lines of ``--json show queue``."""
    envs: list[dict[str, Any]] = []
    with ControlClient(sock_path) as client:
        if as_json:
            return show_queue(client, as_json=True)
        for reply in client.stream("show queue"):
            if reply.event == "items":
                envs.extend(_items(reply))
    _write(format_mailq(envs))
    return EX_OK


def newaliases(sock_path: str, *, as_json: bool = False) -> int:
    """Have the daemon re-read the aliases files its configuration uses, whatever their names.
    With ``as_json``, print the daemon's result: ``{"tables": [NAME, …]}``."""
    with ControlClient(sock_path) as client:
        result = client.call("update table", aliases=True)
    if as_json:
        _write(json.dumps(result) + "\n")
        return EX_OK
    tables = result.get("tables") if isinstance(result, dict) else None
    names = [t for t in tables if isinstance(t, str)] if isinstance(tables, list) else []
    if not names:  # not an error: package scripts run newaliases after any change
        _write("no aliases file in the configuration: nothing to re-read\n")
    _write("".join(f"{clean(name)}: table updated\n" for name in names))
    return EX_OK


# -- sendmail ---------------------------------------------------------------------------------


@dataclass
class SendmailArgs:
    mode: str = "deliver"  # deliver (-bm), smtp (-bs), mailq (-bp), newaliases (-bi), queue (-q)
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f / -r: None = the user, "" = the null sender
    fullname: str | None = None  # -F
    notify: str | None = None  # -N, as RCPT NOTIFY= wants it
    ret: str | None = None  # -R: FULL or HDRS
    envid: str | None = None  # -V
    recipients: list[str] = field(default_factory=list)


_FLAGS = "tivU"  # -t, -i; -v (verbose) and -U (initial user submission) are accepted
_WITH_VALUE = "frFNRVBLob"
_MODES = {"m": "deliver", "s": "smtp", "p": "mailq", "i": "newaliases"}


def parse_sendmail(argv: Sequence[str]) -> SendmailArgs:
    """sendmail's flags, as Sendmail's getopt takes them: flags may be clustered (``-ti``), a
    value attached (``-fuser``, ``-oi``, ``-bs``) or in the next argument (``-tf user``);
    parsing stops at the first recipient or ``--``."""
    args = SendmailArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        for at in range(1, len(arg)):
            flag = arg[at]
            if flag in _FLAGS:
                if flag == "t":
                    args.extract = True
                elif flag == "i":
                    args.ignore_dots = True
                continue
            if flag == "q":
                if arg[at + 1 :]:
                    raise UsageError(f"unsupported option -q{clean(arg[at + 1 :])}")
                args.mode = "queue"
                break
            if flag not in _WITH_VALUE:
                raise UsageError(f"unknown option -{clean(flag)} in {clean(arg)}")
            value = arg[at + 1 :]
            if not value:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option -{flag} needs a value")
                value = argv[i]
            _sendmail_value(args, flag, value)
            break
        i += 1
    args.recipients = list(argv[i:])
    if args.mode not in ("deliver",) and args.recipients:
        raise UsageError("recipients given with a mode that takes none")
    return args


def _sendmail_value(args: SendmailArgs, flag: str, value: str) -> None:
    if flag == "b":
        if value not in _MODES:
            raise UsageError(f"unsupported mode -b{clean(value)}")
        args.mode = _MODES[value]
    elif flag == "o":
        if value == "i":
            args.ignore_dots = True
        # other -oX options (-oem, -odi, -odb, …) are accepted and ignored
    elif flag in "fr":
        args.sender = value
    elif flag == "F":
        args.fullname = " ".join(value.split())
    elif flag == "N":
        items = [item.strip().lower() for item in value.split(",")]
        if items == ["never"]:
            args.notify = "NEVER"
        elif items and all(item in ("success", "failure", "delay") for item in items):
            args.notify = ",".join(dict.fromkeys(item.upper() for item in items))
        else:
            raise UsageError("-N takes never, or a list of success, failure and delay")
    elif flag == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError("-R takes full or hdrs")
        args.ret = value.upper()
    elif flag == "V":
        if not value or not all("!" <= c <= "~" for c in value) or len(xtext(value)) > 100:
            raise UsageError("-V takes a printable ASCII envelope id of at most 100 characters")
        args.envid = value
    # -B (body type, detected from the message) and -L (syslog tag) are ignored


def xtext(value: str) -> str:
    """RFC 3461 xtext: ``+``, ``=`` and anything outside ``!``..``~`` as ``+XX``."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)


def local_domain() -> str:
    """This host's name for unqualified addresses (``root`` → ``root@HOST``)."""
    return host_name().lower()


def login_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or f"uid{os.getuid()}"


def _gecos_name() -> str:
    try:
        gecos = pwd.getpwuid(os.getuid()).pw_gecos
    except KeyError:
        return ""
    return " ".join(gecos.split(",")[0].split())


def split_addresses(value: str) -> list[str]:
    """The addresses of an address list (``Bob <bob@x>, carol@y, team: d@z;``).

    Display names, comments and group names are dropped; what is left is returned unchecked.
    """
    items: list[str] = []
    cur: list[str] = []
    quoted = angle = bracket = False
    depth = 0
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            cur.append(ch)
            if ch == "\\" and i + 1 < len(value):
                i += 1
                cur.append(value[i])
            elif ch == '"':
                quoted = False
        elif depth:
            if ch == "\\":
                i += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == '"':
            quoted = True
            cur.append(ch)
        elif ch == "(":
            depth = 1
        elif ch == "[":
            bracket = True
            cur.append(ch)
        elif ch == "]":
            bracket = False
            cur.append(ch)
        elif ch == "<":
            angle = True
            cur.append(ch)
        elif ch == ">":
            angle = False
            cur.append(ch)
        elif ch in ",;" and not angle and not bracket:
            items.append("".join(cur))
            cur = []
        elif ch == ":" and not angle and not bracket:
            cur = []  # a group's display name
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    out: list[str] = []
    for item in (x.strip() for x in items):
        if "<" in item:
            match = re.search(r"<([^<>]*)>\s*$", item)
            item = match.group(1).strip() if match else item
            if item.startswith("@") and ":" in item:  # a source route
                item = item.partition(":")[2]
        if item:
            out.append(item)
    return out


def normalize_recipient(text: str, domain: str) -> str:
    """A recipient as given, qualified and checked; raises Exit(EX_DATAERR)."""
    address = text if "@" in text else f"{text}@{domain}"
    try:
        return str(parse_mailbox(address, utf8=True))
    except AddressError as exc:
        raise Exit(EX_DATAERR, f"{clean(text)}: invalid recipient: {exc}") from None


def normalize_sender(text: str, domain: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if not text:
        return ""
    address = text if "@" in text else f"{text}@{domain}"
    try:
        return str(parse_mailbox(address, utf8=True))
    except AddressError as exc:
        raise Exit(EX_DATAERR, f"{clean(text)}: invalid sender: {exc}") from None


def read_input(stream: Any, *, ignore_dots: bool, limit: int = MAX_INPUT) -> bytes:
    """The message from stdin; without -i a line holding only ``.`` ends it."""
    if ignore_dots:
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise Exit(EX_DATAERR, "message too large")
        return bytes(data)
    chunks: list[bytes] = []
    size = 0
    at_line_start = True
    while True:
        line = stream.readline(65536)
        if not line or (at_line_start and line in (b".\n", b".\r\n", b".")):
            break
        at_line_start = line.endswith(b"\n")
        chunks.append(line)
        size += len(line)
        if size > limit:
            raise Exit(EX_DATAERR, "message too large")
    return b"".join(chunks)


_EOL = re.compile(rb"\r\n|\n|\r")
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def to_crlf(data: bytes) -> bytes:
    return _EOL.sub(b"\r\n", data)


@dataclass
class Parsed:
    fields: list[tuple[str, bytes]]  # (lowercase name, the whole field with its CRLFs)
    body: bytes


def split_message(data: bytes) -> Parsed:
    """Header fields and body of a CRLF message; a non-header line starts the body."""
    lines = data.splitlines(keepends=True)
    fields: list[tuple[str, bytes]] = []
    i = 0
    if lines and lines[0].startswith(b"From "):  # an mbox separator line
        i = 1
    while i < len(lines):
        line = lines[i]
        if line in (b"\r\n", b"\n"):
            i += 1
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, text = fields[-1]
            fields[-1] = (name, text + _terminated(line))
        else:
            match = _FIELD.match(line)
            if match is None:
                break
            fields.append((match.group(1).decode("ascii").lower(), _terminated(line)))
        i += 1
    return Parsed(fields, b"".join(lines[i:]))


def _terminated(line: bytes) -> bytes:
    return line if line.endswith(b"\r\n") else line.rstrip(b"\r\n") + b"\r\n"


def field_value(raw: bytes) -> str:
    """The unfolded value of a field, decoded."""
    value = raw.partition(b":")[2].replace(b"\r\n", b"")
    return value.decode("utf-8", "replace").strip()


def header_recipients(parsed: Parsed) -> list[str]:
    """The addresses in To, Cc and Bcc (for -t), unchecked; those of Resent-To, Resent-Cc
    and Resent-Bcc instead when there are any (a message being re-sent), as Sendmail does."""
    names = ("to", "cc", "bcc")
    if any(name in ("resent-to", "resent-cc", "resent-bcc") for name, _ in parsed.fields):
        names = ("resent-to", "resent-cc", "resent-bcc")
    found: list[str] = []
    for name, raw in parsed.fields:
        if name in names:
            found.extend(split_addresses(field_value(raw)))
    return found


def build_message(
    parsed: Parsed,
    *,
    remove_bcc: bool,
    from_address: str,
    fullname: str,
    domain: str,
    now: float,
) -> bytes:
    """The message to submit: Bcc removed (with -t), missing From, Date, Message-ID added."""
    from email.utils import formataddr, formatdate

    names = {name for name, _ in parsed.fields}
    out = [raw for name, raw in parsed.fields if not (remove_bcc and name in ("bcc", "resent-bcc"))]
    if "from" not in names:
        value = formataddr((fullname, from_address), charset="utf-8") if fullname else from_address
        out.append(f"From: {value}\r\n".encode())
    if "date" not in names:
        out.append(f"Date: {formatdate(now, localtime=True)}\r\n".encode())
    if "message-id" not in names:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        out.append(f"Message-ID: <{stamp}.{secrets.token_hex(8)}@{domain}>\r\n".encode())
    body = parsed.body
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return b"".join(out) + b"\r\n" + body


@dataclass
class Submission:
    """How the daemon answered: what to spool for later, what it refused."""

    temp: list[str] = field(default_factory=list)  # recipients to put in the offline spool
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (recipient, 5xx reply)
    fatal: str = ""  # a 5xx for the whole message


def _smtp_over(sock: socket.socket, local_hostname: str) -> smtplib.SMTP:
    import smtplib

    class SocketSMTP(smtplib.SMTP):
        """smtplib on a socket that is already connected (the switched control socket)."""

        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            return sock

    return SocketSMTP(local_hostname=local_hostname, timeout=SMTP_TIMEOUT)


def _reply(code: int, text: bytes | str) -> str:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return clean(f"{code} {' '.join(message.split())}")


def submit(
    sock_path: str,
    sender: str,
    rcpts: list[str],
    message: bytes,
    args: SendmailArgs,
    domain: str,
) -> Submission:
    """Submit over the control socket; raises DaemonDown, or CtlError for FORBIDDEN."""
    import smtplib

    client = ControlClient(sock_path, timeout=SMTP_TIMEOUT)
    client.connect()
    try:
        sock = client.start_smtp()
    except CtlError as exc:
        client.close()
        if exc.code == Code.FORBIDDEN:
            raise
        return Submission(temp=list(rcpts))
    except (OSError, ConnectionClosed, ProtocolError):
        client.close()
        return Submission(temp=list(rcpts))
    smtp = _smtp_over(sock, domain)
    accepted: list[str] = []
    result = Submission()
    done = False
    try:
        code, text = smtp.connect("localhost", 25)
        if code != 220:
            return _whole(code, text, rcpts)
        code, text = smtp.ehlo()
        if code != 250:
            return _whole(code, text, rcpts)
        utf8 = not all(a.isascii() for a in [sender, *rcpts]) or not _headers_ascii(message)
        mail_options = []
        if utf8:
            if not smtp.has_extn("smtputf8"):
                return Submission(fatal="the daemon does not accept UTF-8 (no SMTPUTF8)")
            smtp.command_encoding = "utf-8"
            mail_options.append("SMTPUTF8")
        if not message.isascii() and smtp.has_extn("8bitmime"):
            mail_options.append("BODY=8BITMIME")
        if smtp.has_extn("size"):
            mail_options.append(f"SIZE={len(message)}")
        rcpt_options = []
        if smtp.has_extn("dsn"):
            if args.ret:
                mail_options.append(f"RET={args.ret}")
            if args.envid:
                mail_options.append(f"ENVID={xtext(args.envid)}")
            if args.notify:
                rcpt_options.append(f"NOTIFY={args.notify}")
        code, text = smtp.docmd("MAIL", f"FROM:<{sender}>" + "".join(" " + o for o in mail_options))
        if code != 250:
            return _whole(code, text, rcpts)
        for rcpt in rcpts:
            code, text = smtp.docmd("RCPT", f"TO:<{rcpt}>" + "".join(" " + o for o in rcpt_options))
            if 200 <= code < 300:
                accepted.append(rcpt)
            elif 400 <= code < 500:
                result.temp.append(rcpt)
            else:
                result.rejected.append((rcpt, _reply(code, text)))
        if not accepted:
            smtp.rset()
            done = True
            return result
        data_reply: tuple[int, bytes | str]
        try:
            data_reply = smtp.data(message)
        except smtplib.SMTPDataError as exc:
            data_reply = exc.smtp_code, exc.smtp_error
        code = data_reply[0]
        done = True
        if 400 <= code < 500:
            result.temp.extend(accepted)
        elif code >= 300 or code < 200:
            result.fatal = _reply(code, data_reply[1])
        return result
    except (OSError, smtplib.SMTPException, ValueError, UnicodeError):
        if done:
            return result
        refused = {r for r, _ in result.rejected}
        return Submission(temp=[r for r in rcpts if r not in refused], rejected=result.rejected)
    finally:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass
        smtp.close()
        sock.close()


def _whole(code: int, text: bytes, rcpts: list[str]) -> Submission:
    if 400 <= code < 500:
        return Submission(temp=list(rcpts))
    return Submission(fatal=_reply(code, text))


def _headers_ascii(message: bytes) -> bool:
    end = message.find(b"\r\n\r\n")
    return (message if end < 0 else message[:end]).isascii()


_BARE_LF = re.compile(rb"(?<!\r)\n")


def bare_lf_to_crlf(data: bytes, after_cr: bool) -> bytes:
    """``data`` with each LF not preceded by CR made CR LF; ``after_cr``: the bytes before
    ``data`` ended with CR (so a LF at its start ends that line as it is)."""
    if after_cr and data.startswith(b"\n"):
        return b"\n" + _BARE_LF.sub(b"\r\n", data[1:])
    return _BARE_LF.sub(b"\r\n", data)


def relay(sock: socket.socket, infd: int, outfd: int) -> None:
    """-bs: copy stdin to the SMTP session and its answers to stdout until it hangs up.

    Lines may end with LF alone on stdin, as Sendmail allows: they reach the daemon as CR LF.
    """
    sock.settimeout(None)

    def pump() -> None:
        after_cr = False
        try:
            while True:
                data = os.read(infd, 65536)
                if not data:
                    break
                sock.sendall(bare_lf_to_crlf(data, after_cr))
                after_cr = data.endswith(b"\r")
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    threading.Thread(target=pump, daemon=True).start()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(outfd, view) :]


def sendmail(argv: Sequence[str], sock_path: str) -> int:
    args = parse_sendmail(argv)
    if args.mode == "mailq":
        return mailq(sock_path)
    if args.mode == "newaliases":
        return newaliases(sock_path)
    if args.mode == "queue":
        with ControlClient(sock_path) as client:
            result = client.call("schedule", id="all")
        count = result.get("count", 0) if isinstance(result, dict) else 0
        _write(f"{_plural(count, 'envelope')} scheduled\n")
        return EX_OK
    if args.mode == "smtp":
        client = ControlClient(sock_path, timeout=SMTP_TIMEOUT)
        try:
            client.connect()
        except (DaemonDown, UntrustedSocket, OSError) as exc:  # the client on stdin is told
            _write("421 4.3.2 homemail is not running here; try again later\r\n")
            raise Exit(EX_UNAVAILABLE, str(getattr(exc, "message", "") or exc)) from None
        sock = client.start_smtp()
        try:
            relay(sock, sys.stdin.fileno(), sys.stdout.fileno())
        finally:
            sock.close()
        return EX_OK

    if not args.recipients and not args.extract:
        raise UsageError("no recipients")
    domain = local_domain()
    user = f"{login_name()}@{domain}"
    sender = normalize_sender(user if args.sender is None else args.sender, domain)
    rcpts = [r for arg in args.recipients for r in split_addresses(arg) or [arg]]
    raw = to_crlf(read_input(sys.stdin.buffer, ignore_dots=args.ignore_dots))
    parsed = split_message(raw)
    if args.extract:
        rcpts += header_recipients(parsed)
    valid: list[str] = []
    malformed: list[str] = []
    for rcpt in rcpts:  # one malformed address must not keep the message from the others
        try:
            valid.append(normalize_recipient(rcpt, domain))
        except Exit as exc:
            malformed.append(exc.message)
    rcpts = list(dict.fromkeys(valid))
    for problem in malformed:
        print(f"sendmail: {problem}", file=sys.stderr)
    if not rcpts:
        if malformed:
            raise Exit(EX_DATAERR, "no valid recipient: nothing sent")
        raise UsageError("no recipients")
    fullname = args.fullname if args.fullname is not None else _gecos_name()
    message = build_message(
        parsed,
        remove_bcc=args.extract,
        from_address=sender or normalize_sender(user, domain),
        fullname=fullname,
        domain=domain,
        now=time.time(),
    )
    try:
        result = submit(sock_path, sender, rcpts, message, args, domain)
    except UntrustedSocket as exc:  # planted by another user: never theirs, nor lost
        print(f"sendmail: {exc.message}; the message waits in the offline spool", file=sys.stderr)
        result = Submission(temp=rcpts)
    except (DaemonDown, OSError):  # not running, or not reachable: the daemon picks it up later
        result = Submission(temp=rcpts)
    status = EX_DATAERR if malformed else EX_OK
    for rcpt, reply in result.rejected:
        print(f"sendmail: {clean(rcpt)}: {reply}", file=sys.stderr)
        status = EX_NOUSER
    if result.fatal:
        raise Exit(EX_DATAERR, f"message refused: {result.fatal}")
    if result.temp:
        spool(sender, result.temp, message, args, sock_path)
    return status


def offline_options(
    args: SendmailArgs, sender: str, rcpts: list[str], message: bytes
) -> dict[str, str]:
    options: dict[str, str] = {}
    if args.notify:
        options["notify"] = args.notify
    if args.ret:
        options["ret"] = args.ret
    if args.envid:
        options["envid"] = args.envid
    if not message.isascii():
        options["body"] = "8BITMIME"
    if not all(a.isascii() for a in [sender, *rcpts]) or not _headers_ascii(message):
        options["smtputf8"] = "1"
    return options


def spool(sender: str, rcpts: list[str], message: bytes, args: SendmailArgs, sock_path: str) -> str:
    """Leave the message in the offline spool of the daemon of ``sock_path``; raises
    Exit(EX_TEMPFAIL)."""
    directory = default_offline_dir(sock_path)
    options = offline_options(args, sender, rcpts, message)
    try:
        return offline.write(directory, sender, rcpts, message, options)
    except (OSError, offline.OfflineError) as exc:
        raise Exit(EX_TEMPFAIL, f"cannot write to the offline spool {directory}: {exc}") from None


# -- entry point ------------------------------------------------------------------------------


def _dispatch(name: str, argv: list[str]) -> int:
    if name == "sendmail":
        return sendmail(argv, default_socket())
    if name == "mailq":
        if any(arg not in ("-v", "--json") for arg in argv):
            raise UsageError("usage: mailq [--json]")
        return mailq(default_socket(), as_json="--json" in argv)
    if name == "newaliases":
        if any(arg != "--json" for arg in argv):
            raise UsageError("usage: newaliases [--json]")
        return newaliases(default_socket(), as_json="--json" in argv)
    opts, words = parse_options(argv)
    return run(opts, parse_command(words))


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """The console script; the program's name (``argv[0]``) picks sendmail, mailq, newaliases."""
    if argv is None:
        argv = sys.argv[1:]
        prog = prog or sys.argv[0]
    name = os.path.basename(prog or "homemailctl")
    if name not in ("sendmail", "mailq", "newaliases"):
        name = "homemailctl"
    try:
        return _dispatch(name, list(argv))
    except UsageError as exc:
        print(f"{name}: {clean_text(exc.message)}", file=sys.stderr)
        print(SENDMAIL_USAGE if name == "sendmail" else USAGE, file=sys.stderr, end="")
        return exc.status
    except Exit as exc:
        if exc.message:
            print(f"{name}: {clean_text(exc.message)}", file=sys.stderr)
        return exc.status
    except DaemonDown as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except CtlError as exc:
        print(f"{name}: {clean(exc.message)}", file=sys.stderr)
        return status_for(exc.code)
    except ConnectionClosed:
        print(f"{name}: the daemon closed the connection", file=sys.stderr)
        return EX_TEMPFAIL
    except TimeoutError:
        print(f"{name}: no answer from the daemon", file=sys.stderr)
        return EX_TEMPFAIL
    except ProtocolError as exc:
        print(f"{name}: protocol error: {clean(exc.message)}", file=sys.stderr)
        return EX_PROTOCOL
    except PermissionError as exc:
        print(f"{name}: {clean(exc)}", file=sys.stderr)
        return EX_NOPERM
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_IOERR
    except OSError as exc:
        print(f"{name}: {clean(exc)}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
