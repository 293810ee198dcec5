"""Local delivery: the mail delivery agent's Maildir and mbox writers.

This module owns what happens to a message once the scheduler has decided it goes to a local
mailbox: the loop check against ``Delivered-To:``, the ``Return-Path:``/``Delivered-To:`` lines
prepended to every delivered copy, the conversion from the queue's CRLF line endings to the LF
endings local mailboxes use, and the two on-disk formats.

Maildir (https://cr.yp.to/proto/maildir.html): ``tmp/``, ``new/`` and ``cur/`` under the maildir.
A message is written to ``tmp/NAME``, fsynced, linked (or renamed) to ``new/NAME`` and the ``new``
directory is fsynced. ``NAME`` is derived from the envelope, ``CTIME.EEVPID.HOST`` with the
envelope id as 16 hex digits and ``/`` and ``:`` in the host name written as ``\\057`` and
``\\072``, so that a delivery retried after a crash finds its earlier copy (in ``new/``, or in
``cur/`` as ``NAME`` or ``NAME:2,FLAGS`` once a mail reader has seen it) instead of writing a
second one.

mbox (mboxrd flavour): each message is preceded by ``From SENDER DATE`` (``MAILER-DAEMON`` for
the null sender, the date in asctime format, UTC), every body line matching ``^>*From `` gets one
more ``>``, and each message ends with an empty line. The mailbox is locked with both a
``PATH.lock`` dotlock and an fcntl lock, and it is refused (never written) when it is a symbolic
link, has more than one hard link or is not a regular file. A failed write is truncated away.

:func:`deliver_local` is the dispatch: it expands the action's path template (``%{user.directory}``
and friends; a leading ``~/`` and any relative path are the recipient's home's) and calls the
right writer.

Everything here is blocking and keeps no global state but caches: the directory-sync
coordinator (which only lets concurrent deliveries share an fsync), the maildirs known to have
their subdirectories, and the envelope ids that have a copy in a maildir (for deliveries
recovered after a restart).  The daemon runs these functions in worker
threads or in a child process running as the recipient. Failures are reported only by raising
:class:`DeliveryError`, which tells the caller whether to retry; nothing is logged here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from homemail.aliases import LocalUser
    from homemail.config import Action
    from homemail.queue import Envelope

__all__ = [
    "FORMAT_KEYS",
    "FORMAT_MODIFIERS",
    "Delivery",
    "DeliveryError",
    "FormatError",
    "FormatSpec",
    "check_format",
    "deliver_local",
    "deliver_maildir",
    "deliver_mbox",
    "expand_format",
    "mailbox_of",
    "mailbox_path",
    "maildir_name",
    "parse_format",
    "prepare",
]

#: How long deliver_mbox waits for the dotlock and the fcntl lock before giving up (seconds).
LOCK_TIMEOUT = 30.0
#: A dotlock older than this is considered left behind by a crashed process and removed (seconds).
STALE_LOCK_AGE = 300.0

_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
_NO_HARDLINK_ERRNOS = frozenset(
    e
    for e in (errno.EPERM, errno.EMLINK, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", None))
    if e is not None
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MBOX_FROM = re.compile(rb"^(>*From )", re.MULTILINE)
_BLANK_LINE = re.compile(rb"\n\r?\n")


class DeliveryError(Exception):
    """A delivery that did not happen.

    ``permanent`` tells the caller whether retrying can help; ``status`` is the RFC 3463
    enhanced status code to report. ``text`` is always a single line.
    """

    def __init__(self, text: str, *, permanent: bool, status: str) -> None:
        self.text = _one_line(text)
        self.permanent = permanent
        self.status = status
        super().__init__(self.text)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Delivery:
    """What the delivery agent needs to know about one envelope."""

    evpid: int
    ctime: int
    sender: str
    rcpt: str
    dest: str
    user: str
    hostname: str
    recovered: bool = False


def prepare(message: bytes, d: Delivery) -> bytes:
    """Return the bytes to store: loop check, trace lines prepended, CRLF turned into LF.

    Raises a permanent :class:`DeliveryError` (5.4.6) when the header section already has a
    ``Delivered-To:`` naming ``d.dest``. Bare CR, bare LF and 8-bit bytes are kept as they are.
    """
    dest = _strip_brackets(d.dest).lower()
    for value in _header_values(message, b"delivered-to"):
        if _strip_brackets(_address_part(value)).lower() == dest:
            raise DeliveryError(
                f"mail loop: already delivered to {d.dest}", permanent=True, status="5.4.6"
            )
    trace = (
        b"Return-Path: <" + _header_bytes(d.sender) + b">\n"
        b"Delivered-To: " + _header_bytes(_strip_brackets(d.dest)) + b"\n"
    )
    return trace + message.replace(b"\r\n", b"\n")


# --- Maildir -------------------------------------------------------------------------------------


def maildir_name(d: Delivery) -> str:
    """The file name a delivery of ``d`` gets in ``tmp/`` and ``new/``."""
    host = d.hostname.replace("/", "\\057").replace(":", "\\072").replace("\x00", "\\000")
    return f"{d.ctime}.E{d.evpid:016x}.{host}"


def deliver_maildir(maildir: str, message: bytes, d: Delivery) -> str:
    """Deliver ``message`` into ``maildir`` exactly once; return the path of the delivered file.

    When the file for this envelope is already in ``new/`` (or, for a recovered envelope, in
    ``cur/``), nothing is written and that file's path is returned.
    """
    data = prepare(message, d)
    name = maildir_name(d)
    try:
        try:
            return _deliver_maildir(maildir, data, name, d.recovered)
        except FileNotFoundError:
            if maildir not in _ready_maildirs:
                raise
            _ready_maildirs.discard(maildir)  # removed since we last made sure of it
            return _deliver_maildir(maildir, data, name, d.recovered)
    except OSError as e:
        raise _os_failure("maildir", e) from e
    except ValueError as e:  # a NUL byte in a configured path
        raise DeliveryError(f"maildir: invalid path: {e}", permanent=False, status="4.2.0") from e


def _deliver_maildir(maildir: str, data: bytes, name: str, recovered: bool) -> str:
    if maildir in _ready_maildirs:
        tmp_dir, new_dir, cur_dir = (os.path.join(maildir, sub) for sub in ("tmp", "new", "cur"))
    else:
        tmp_dir, new_dir, cur_dir = _maildir_dirs(maildir)
        if len(_ready_maildirs) > 4096:
            _ready_maildirs.clear()
        _ready_maildirs.add(maildir)
    tmp_path = os.path.join(tmp_dir, name)
    new_path = os.path.join(new_dir, name)
    done = _already_delivered(new_dir, cur_dir, name, recovered)
    if done is not None:
        if done == new_path:
            _fsync_dir(new_dir)
        return done
    _write_new(tmp_path, data)
    try:
        _publish(tmp_path, new_path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
    _delivered_to(new_dir, name)
    _fsync_dir(new_dir)
    return new_path


# Maildirs whose tmp/, new/ and cur/ were found or made: not checked again (a delivery that
# finds one gone forgets it and makes sure of it once more)
_ready_maildirs: set[str] = set()


def _maildir_dirs(maildir: str) -> tuple[str, str, str]:
    os.makedirs(maildir, mode=0o700, exist_ok=True)
    paths = []
    for sub in ("tmp", "new", "cur"):
        path = os.path.join(maildir, sub)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(path).st_mode):
                raise DeliveryError(
                    f"maildir: {sub} is not a directory", permanent=False, status="4.2.0"
                ) from None
        paths.append(path)
    return paths[0], paths[1], paths[2]


def _already_delivered(new_dir: str, cur_dir: str, name: str, recovered: bool) -> str | None:
    new_path = os.path.join(new_dir, name)
    if os.path.lexists(new_path):
        return new_path
    if recovered:
        # by envelope id alone: the host name in the file name may have changed since
        ident = name.split(".", 2)[1]
        if ident in _envelope_ids(new_dir, cur_dir):
            return _find_copy(new_dir, cur_dir, ident) or os.path.join(cur_dir, name)
    return None


def _find_copy(new_dir: str, cur_dir: str, ident: str) -> str | None:
    # new/ first, then cur/: a reader moving the file between the two looks cannot hide it
    marker = f".{ident}."
    for directory in (new_dir, cur_dir):
        with os.scandir(directory) as entries:
            for entry in entries:
                if marker in entry.name:
                    return entry.path
    return None


# The envelope ids that have a copy in a maildir (the second field of our file names), for the
# deliveries of envelopes recovered at a start: listing new/ and cur/ for each of them made the
# recovery of a big queue into a big mailbox quadratic (44 ms a delivery with 50,000 files).
# Read once per maildir and process (a long-lived one: the user-mode delivery process; system
# mode forks a child per delivery, which reads them once for its one delivery), kept up to date
# with what this process delivers there, read again after RECOVERED_IDS_SECONDS.  Keyed by the
# identity of new/, however the path to it is spelt.  A copy delivered before the start is in
# it (or was removed by its reader: delivered all the same), so an id not in it has no copy.
RECOVERED_IDS_SECONDS = 300.0
_recovered_ids: dict[tuple[int, int], tuple[float, set[str]]] = {}
_recovered_lock = threading.Lock()


def _envelope_ids(new_dir: str, cur_dir: str) -> set[str]:
    st = os.stat(new_dir)
    maildir = (st.st_dev, st.st_ino)
    with _recovered_lock:
        known = _recovered_ids.get(maildir)
        if known is not None and time.monotonic() - known[0] < RECOVERED_IDS_SECONDS:
            return known[1]
        ids = set()
        for directory in (new_dir, cur_dir):  # new/ first: a reader moves files the other way
            for entry in os.listdir(directory):
                parts = entry.split(".", 2)
                if len(parts) > 2 and parts[1][:1] == "E":
                    ids.add(parts[1])
        if len(_recovered_ids) > 64:
            _recovered_ids.clear()
        _recovered_ids[maildir] = (time.monotonic(), ids)
        return ids


def _delivered_to(new_dir: str, name: str) -> None:
    """A copy written here: the recovered deliveries' ids of that maildir get it too.  Ids
    read longer than RECOVERED_IDS_SECONDS ago are let go (read again if needed)."""
    if not _recovered_ids:  # (no stat on the way of every delivery, once recovery is over)
        return
    st = os.stat(new_dir)
    now = time.monotonic()
    with _recovered_lock:
        for key, (read_at, ids) in list(_recovered_ids.items()):
            if now - read_at >= RECOVERED_IDS_SECONDS:
                del _recovered_ids[key]
            elif key == (st.st_dev, st.st_ino):
                ids.add(name.split(".", 2)[1])


def _write_new(tmp_path: str, data: bytes) -> None:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp_path, flags, 0o600)
    except FileExistsError:  # left behind by a crashed attempt
        os.unlink(tmp_path)
        fd = os.open(tmp_path, flags, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    os.close(fd)


def _publish(tmp_path: str, new_path: str) -> None:
    try:
        os.link(tmp_path, new_path)
    except FileExistsError:
        return  # an identical copy of this envelope's message is already there
    except OSError as e:
        if e.errno not in _NO_HARDLINK_ERRNOS:
            raise
        os.rename(tmp_path, new_path)  # a file system without hard links


# --- mbox ----------------------------------------------------------------------------------------


def deliver_mbox(
    path: str,
    message: bytes,
    d: Delivery,
    *,
    lock_timeout: float = LOCK_TIMEOUT,
    stale_lock_age: float = STALE_LOCK_AGE,
) -> None:
    """Append ``message`` to the mbox at ``path`` (created, mode 0600, when missing)."""
    body = _MBOX_FROM.sub(rb">\1", prepare(message, d))
    if not body.endswith(b"\n"):
        body += b"\n"
    sender = _one_line(d.sender).replace(" ", "_").replace("\t", "_") or "MAILER-DAEMON"
    date = time.asctime(time.gmtime(time.time()))
    data = b"From " + _header_bytes(sender) + b" " + date.encode("ascii") + b"\n" + body + b"\n"
    deadline = time.monotonic() + lock_timeout
    try:
        _check_mailbox(os.lstat(path))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _os_failure("mbox", e) from e
    except ValueError as e:
        raise DeliveryError(f"mbox: invalid path: {e}", permanent=False, status="4.2.0") from e
    try:
        with _dotlock(path + ".lock", deadline, stale_lock_age), _open_mailbox(path) as fd:
            _lockf(fd, deadline)
            try:
                st = os.fstat(fd)
                _check_mailbox(st)
                try:
                    now = os.lstat(path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise DeliveryError(
                        "mbox: mailbox was replaced while locking", permanent=False, status="4.2.0"
                    )
                _append(fd, data, st.st_size)
            finally:
                with contextlib.suppress(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_UN)
    except OSError as e:
        raise _os_failure("mbox", e) from e


def _check_mailbox(st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = "has more than one hard link"
    elif st.st_uid != os.geteuid():  # deliveries run as the recipient: it must be theirs
        problem = "belongs to someone else"
    else:
        return
    raise DeliveryError(f"mbox: mailbox {problem}", permanent=False, status="4.2.0")


@contextlib.contextmanager
def _open_mailbox(path: str) -> Iterator[int]:
    # O_NONBLOCK: a FIFO swapped in after the lstat fails with ENXIO instead of hanging us.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DeliveryError(
                "mbox: mailbox is a symbolic link", permanent=False, status="4.2.0"
            ) from None
        raise
    try:
        _check_mailbox(os.fstat(fd))
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def _append(fd: int, data: bytes, size: int) -> None:
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
            os.fsync(fd)
        raise


def _holder_is_gone(lock_path: str) -> bool:
    """Whether the dotlock names a process (its pid, as we and most MUAs write it) that no
    longer exists here: one killed while it held the lock, which would otherwise block the
    mailbox until the lock is old enough to be called stale."""
    try:
        with open(lock_path, "rb") as f:
            text = f.read(32).strip()
        pid = int(text)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, somebody else's
        return False
    return False


@contextlib.contextmanager
def _dotlock(lock_path: str, deadline: float, stale_age: float) -> Iterator[None]:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    pause = 0.005
    while True:
        try:
            fd = os.open(lock_path, flags, 0o600)
            break
        except FileExistsError:
            pass
        try:
            age = time.time() - os.lstat(lock_path).st_mtime
            if age > stale_age or (age > 1.0 and _holder_is_gone(lock_path)):
                os.unlink(lock_path)
                continue
        except FileNotFoundError:
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeliveryError("mbox: mailbox is locked", permanent=False, status="4.2.0")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.1)
    try:
        st = os.fstat(fd)
        with contextlib.suppress(OSError):
            _write_all(fd, f"{os.getpid()}\n".encode("ascii"))
    finally:
        os.close(fd)
    try:
        yield
    finally:
        # Remove the lock only if it is still ours (not broken as stale and taken by another).
        with contextlib.suppress(OSError):
            now = os.lstat(lock_path)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(lock_path)


def _lockf(fd: int, deadline: float) -> None:
    pause = 0.005
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeliveryError("mbox: mailbox is locked", permanent=False, status="4.2.0")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.1)


# --- helpers -------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _DirSync:
    """Group commit for directory fsyncs: deliveries into the same ``new/`` share one.

    A delivery takes a ticket after its link; a sync that starts after that covers it.  While one
    thread syncs a directory, the others that linked meanwhile wait and one of them runs the next
    sync for all of them, so N concurrent deliveries cost far fewer than N directory syncs.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tickets: dict[str, int] = {}
        self.covered: dict[str, int] = {}
        self.running: set[str] = set()

    def sync(self, path: str) -> None:
        with self.cond:
            ticket = self.tickets[path] = self.tickets.get(path, 0) + 1
            while True:
                if self.covered.get(path, 0) >= ticket:
                    return
                if path not in self.running:
                    self.running.add(path)
                    target = self.tickets[path]
                    break
                self.cond.wait()
        synced = False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
                synced = True
            finally:
                os.close(fd)
        finally:
            with self.cond:
                self.running.discard(path)
                if synced:
                    self.covered[path] = max(self.covered.get(path, 0), target)
                if len(self.covered) > 4096:  # forget idle directories
                    for key in [k for k in self.covered if k not in self.running]:
                        if self.covered[key] >= self.tickets.get(key, 0):
                            del self.covered[key], self.tickets[key]
                self.cond.notify_all()


_dir_sync = _DirSync()


def _fsync_dir(path: str) -> None:
    _dir_sync.sync(path)


def _os_failure(what: str, e: OSError) -> DeliveryError:
    # strerror only: the file name would reveal local paths to whoever reads the bounce.
    reason = e.strerror or type(e).__name__
    if e.errno in _FULL_ERRNOS:
        return DeliveryError(f"{what}: mailbox full: {reason}", permanent=False, status="4.2.2")
    return DeliveryError(f"{what}: {reason}", permanent=False, status="4.2.0")


def _one_line(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _header_bytes(text: str) -> bytes:
    text = _one_line(text)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _strip_brackets(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


def _address_part(value: str) -> str:
    # "Name <addr>" -> "<addr>"; a bare address is returned as it is.
    start, end = value.rfind("<"), value.rfind(">")
    if 0 <= start < end:
        return value[start : end + 1]
    return value


def _header_values(message: bytes, name: bytes) -> Iterator[str]:
    """Yield the unfolded values of the header fields called ``name`` (lower case)."""
    blank = _BLANK_LINE.search(message)  # the header section only: the body is not split
    fields: list[bytes] = []
    for line in (message if blank is None else message[: blank.start()]).split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    for field in fields:
        key, sep, value = field.partition(b":")
        if sep and key.rstrip().lower() == name:
            yield value.decode("utf-8", "surrogateescape").strip()


# -- dispatch: from an envelope and its action to one of the deliveries above -----------------

_FORMAT = re.compile(r"%\{([^}]*)\}")
_SLICE = re.compile(r"\[(-?[0-9]{1,9})?:(-?[0-9]{1,9})?\]")
_NETWORK_KEYS = {"sender", "sender.user", "sender.domain", "rcpt", "rcpt.user", "rcpt.domain",
                 "dest", "dest.user", "dest.domain", "mbox.from"}
#: The names ``%{…}`` may use in a delivery path.
FORMAT_KEYS = frozenset({*_NETWORK_KEYS, "user.username", "user.directory"})
#: What may follow a name (and its slice) after ``:``, several joined by ``|``.
FORMAT_MODIFIERS = ("lowercase", "uppercase", "strip")


class FormatError(ValueError):
    """A ``%{…}`` that cannot be expanded: ``word`` is the culprit, ``choices`` what would do."""

    def __init__(self, message: str, word: str, choices: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.word = word
        self.choices = choices


@dataclass(frozen=True)
class FormatSpec:
    """One ``%{key[start:end]:mod|mod}``, as :func:`parse_format` reads it."""

    key: str
    start: int | None
    end: int | None
    sliced: bool
    modifiers: tuple[str, ...]


def parse_format(spec: str) -> FormatSpec:
    """Read what is between ``%{`` and ``}``; raises FormatError for anything not understood."""
    key = re.split(r"[\[:]", spec, maxsplit=1)[0]
    if key not in FORMAT_KEYS:
        raise FormatError(f"unknown format specifier '%{{{key}}}'", key, tuple(sorted(FORMAT_KEYS)))
    rest = spec[len(key) :]
    start = end = None
    sliced = rest.startswith("[")
    if sliced:
        m = _SLICE.match(rest)
        if m is None:
            bad = rest[: rest.find("]") + 1] if "]" in rest else rest
            raise FormatError(f"invalid slice '{bad}' of '%{{{key}}}'", bad)
        start = int(m.group(1)) if m.group(1) else None
        end = int(m.group(2)) if m.group(2) else None
        rest = rest[m.end() :]
    modifiers: tuple[str, ...] = ()
    if rest:
        if not rest.startswith(":"):
            raise FormatError(f"unexpected '{rest}' after '%{{{spec[: -len(rest)]}'", rest)
        modifiers = tuple(rest[1:].split("|"))
        for mod in modifiers:
            if mod not in FORMAT_MODIFIERS:
                raise FormatError(f"unknown format modifier ':{mod}'", mod, FORMAT_MODIFIERS)
    return FormatSpec(key, start, end, sliced, modifiers)


def check_format(template: str) -> None:
    """Check every ``%{…}`` of a path template, as :func:`expand_format` will read it."""
    if "%{" in _FORMAT.sub("", template):
        raise FormatError("unterminated '%{'", "%{")
    for spec in _FORMAT.findall(template):
        parse_format(spec)


def expand_format(template: str, values: dict[str, str]) -> str:
    """Expand ``%{key}``, ``%{key[a:b]}`` and ``%{key:lowercase|uppercase|strip}``.

    Values that came from the network may not turn a path into another path: one holding ``/``
    or equal to ``.``/``..`` is refused.
    """

    def one(m: re.Match[str]) -> str:
        try:
            spec = parse_format(m.group(1))
        except FormatError as exc:
            raise DeliveryError(str(exc), permanent=True, status="5.3.5") from None
        value = values[spec.key]
        for mod in spec.modifiers:
            if mod == "lowercase":
                value = value.lower()
            elif mod == "uppercase":
                value = value.upper()
            else:  # strip
                value = value.split("+", 1)[0]
        if spec.sliced:
            value = value[spec.start : spec.end]
        if spec.key in _NETWORK_KEYS and ("/" in value or value in (".", "..") or "\0" in value):
            raise DeliveryError("unsafe value in a delivery path", permanent=True, status="5.3.5")
        return value

    return _FORMAT.sub(one, template)


def format_values(sender: str, rcpt: str, dest: str, user: str, home: str) -> dict[str, str]:
    values = {"user.username": user, "user.directory": home, "mbox.from": sender or "MAILER-DAEMON"}
    for name, address in (("sender", sender), ("rcpt", rcpt), ("dest", dest)):
        local, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
        values[name] = address
        values[f"{name}.user"] = local
        values[f"{name}.domain"] = domain
    return values


def mailbox_path(template: str, values: dict[str, str], home: str) -> str:
    """The mailbox a path template names, for a recipient whose home is ``home``.

    A leading ``~/`` (or ``~`` alone) is the home; a path that is still relative once expanded
    is taken from the home too (never from the daemon's working directory).
    """
    if template == "~":
        return home
    if template.startswith("~/"):
        return home.rstrip("/") + "/" + expand_format(template[2:], values)
    path = expand_format(template, values)
    return path if os.path.isabs(path) else os.path.join(home, path)


def mailbox_of(action: Action, user: LocalUser, env: Envelope) -> str:
    """The Maildir or mbox ``action`` delivers ``env`` to; raises DeliveryError."""
    values = format_values(env.sender, env.rcpt, env.dest, user.name, user.home)
    default = "~/Maildir" if action.method == "maildir" else "/var/mail/%{user.username}"
    return mailbox_path(action.path or default, values, user.home)


def deliver_local(action: Action, user: LocalUser, env: Envelope, message: bytes,
                  hostname: str) -> None:
    """Deliver one envelope with its configured action; raises DeliveryError."""
    d = Delivery(evpid=env.evpid, ctime=int(env.ctime), sender=env.sender, rcpt=env.rcpt,
                 dest=env.dest, user=user.name, hostname=hostname, recovered=env.recovered)
    if action.method == "maildir":
        deliver_maildir(mailbox_of(action, user, env), message, d)
    elif action.method == "mbox":
        deliver_mbox(mailbox_of(action, user, env), message, d)
    else:
        raise DeliveryError(f"delivery method {action.method!r} is not supported",
                            permanent=False, status="4.3.5")
