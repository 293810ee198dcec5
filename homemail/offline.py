"""The offline spool: where ``sendmail`` leaves mail while the daemon is not running.

Stdlib only: ``sendmail`` writes here, the daemon reads and enqueues at start (and while running).

**Directory.**  One flat directory (``/var/spool/homemail/offline`` for the system daemon, the
user-mode spool's ``offline/`` otherwise).  :func:`write` creates it mode 0700 when missing and
refuses it when it is a symlink.  Every file in it is one message.

**File format.**  A file is named by 32 lowercase hex digits (16 random bytes).  It holds one
line of JSON (ASCII only, ``\\n``-terminated), then the message bytes exactly as submitted
(CRLF line endings, no dot-stuffing)::

    {"v": 1, "sender": "bob@example.org", "rcpts": ["alice@example.org"],
     "options": {"notify": "SUCCESS,FAILURE"}, "uid": 1000, "time": 1712345678.25}
    From: Bob <bob@example.org>\\r\\n...

``sender`` is ``""`` for the null sender.  ``uid`` is the real uid of the submitter; the file
must be owned by that uid.  ``time`` is the submission time (Unix seconds).  ``options`` maps
names to strings; the ones written by ``sendmail`` are ``notify`` (the RCPT ``NOTIFY=`` value,
e.g. ``NEVER`` or ``SUCCESS,DELAY``), ``ret`` (``FULL`` or ``HDRS``), ``envid`` (the ENVID, not
xtext-encoded), ``body`` (``8BITMIME`` when the message has 8-bit bytes) and ``smtputf8``
(``"1"`` when an address or header is UTF-8).  Readers ignore options they do not know.

**Writing.**  A writer creates ``.tmp-NAME`` with ``O_CREAT|O_EXCL|O_NOFOLLOW`` mode 0600,
writes and fsyncs it, renames it to ``NAME`` and fsyncs the directory, so a file without a dot
is always complete.  Names starting with a dot are never read; :func:`cleanup_stale` removes
``.tmp-*`` files left by a writer that died.

**Reading.**  The directory may be writable by users the daemon does not trust (the 2015
OpenSMTPD audit found hard links, symlinks and FIFOs planted there), so :func:`read` refuses a
symlink, anything but a regular file, a file with more than one link, a file whose owner is
not the uid in its header (or not ``expected_uid``), and a header that is not exactly the shape
above.  It opens with ``O_NOFOLLOW|O_NONBLOCK`` and checks that the opened file is the one it
inspected.  A message over the size limit passes the same checks and comes back ``refused``
(552 5.3.4) with only its start, which the daemon returns to the sender in a failure notice
rather than dropping mail that ``sendmail`` accepted; of a file far over the limit only that
start is read.  No more than :data:`MAX_SIZE` is ever read, whatever the limit.

**Passing on.**  In system mode the root parent reads and checks the files, and hands each to
the unprivileged worker in this same format (:func:`encode`, :func:`decode`), in a descriptor.

**Where it is.**  At start the daemon records its offline spool beside its control socket: a
symbolic link ``SOCKET.offline`` whose target is the directory's absolute path
(:func:`record_location`; a new link renamed over the old one, left in place at stop).  So
``sendmail``, which knows only the socket, finds the spool of a daemon started with ``--spool``
while that daemon is down.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAX_SIZE = 128 * 1024 * 1024  # the most read of any file (sendmail takes less as input)
MAX_HEADER = 256 * 1024
#: Of a message over the size limit, this much of its start is read, for its header section
#: (returned in the bounce).
KEPT_OF_REFUSED = 64 * 1024
TMP_PREFIX = ".tmp-"
LOCATION_SUFFIX = ".offline"  # SOCKET.offline: the link to the spool of SOCKET's daemon


class OfflineError(Exception):
    """A file that cannot be accepted from the offline spool; ``str()`` says why."""


@dataclass
class OfflineMessage:
    sender: str  # "" is the null sender
    rcpts: list[str]
    message: bytes
    uid: int  # the submitter, checked against the file's owner
    name: str = ""
    time: float = 0.0
    options: dict[str, str] = field(default_factory=dict)
    #: An SMTP reply refusing the whole message (it is too large); then ``message`` holds only
    #: its start, and the daemon bounces it instead of queueing it.
    refused: str = ""


def _one_line(value: str) -> bool:
    return not any(c in value for c in "\r\n\x00")


def _check_fields(sender: object, rcpts: object, options: object) -> None:
    if not isinstance(sender, str) or not _one_line(sender):
        raise OfflineError("sender must be a string without CR, LF or NUL")
    if not isinstance(rcpts, list) or not rcpts:
        raise OfflineError("rcpts must be a non-empty list")
    for rcpt in rcpts:
        if not isinstance(rcpt, str) or not rcpt or not _one_line(rcpt):
            raise OfflineError("each recipient must be a non-empty string without CR, LF or NUL")
    if not isinstance(options, dict):
        raise OfflineError("options must be an object")
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise OfflineError("options must map strings to strings")
        if not _one_line(key) or not _one_line(value):
            raise OfflineError("options must not contain CR, LF or NUL")


def _open_dir(directory: str) -> int:
    """Open the spool directory itself; a symlink in its place fails with ELOOP (an OSError)."""
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def prepare_dir(directory: str) -> None:
    """Create *directory* mode 0700 (and its parents) when missing; refuse a symlink.

    Raises OfflineError for a symlink or a non-directory, OSError when creation fails.
    """
    if os.path.islink(directory):
        raise OfflineError(f"{directory} is a symlink")
    if not os.path.lexists(directory):
        parent = os.path.dirname(os.path.abspath(directory))
        os.makedirs(parent, mode=0o700, exist_ok=True)
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise OfflineError(f"{directory} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise OfflineError(f"{directory} is not a directory")


def record_location(socket_path: str, directory: str) -> None:
    """Point ``SOCKET.offline`` at *directory*, atomically; raises OSError."""
    link = socket_path + LOCATION_SUFFIX
    target = os.path.abspath(directory)
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass
    tmp = f"{link}.{secrets.token_hex(8)}"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or not name.isprintable():
        raise OfflineError(f"invalid file name {name!r}")


def write(
    directory: str,
    sender: str,
    rcpts: list[str],
    message: bytes,
    options: dict[str, str],
) -> str:
    """Store one message durably in *directory*; return its file name.

    Raises OfflineError for invalid fields or a symlinked directory, OSError for I/O failures.
    """
    _check_fields(sender, rcpts, options)
    prepare_dir(directory)
    data = _header_line(sender, rcpts, options, os.getuid(), time.time())
    dfd = _open_dir(directory)
    try:
        name = secrets.token_hex(16)
        tmp = TMP_PREFIX + name
        flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            try:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    out.write(data + b"\n")
                    out.write(message)
                    out.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.fsync(dfd)
        return name
    finally:
        os.close(dfd)


def _header_line(
    sender: str, rcpts: list[str], options: dict[str, str], uid: int, when: float
) -> bytes:
    header = {
        "v": VERSION,
        "sender": sender,
        "rcpts": list(rcpts),
        "options": dict(options),
        "uid": uid,
        "time": when,
    }
    return json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def encode(item: OfflineMessage) -> tuple[bytes, bytes]:
    """``item`` in the file format: its header line (with its newline), and its message.

    System mode's root parent reads and checks a file, then hands it to the worker this way:
    in a descriptor, since a header may hold more recipients than a channel record.
    """
    line = _header_line(item.sender, item.rcpts, item.options, item.uid, item.time)
    return line + b"\n", item.message


def decode(data: bytes, *, name: str, refused: str = "") -> OfflineMessage:
    """The reverse of :func:`encode`; raises OfflineError for a header of the wrong shape.

    The header line is not held to MAX_HEADER here: written again, a header that just fit (in
    a file) may come out a little longer (``1e15`` is ``1000000000000000.0``).
    """
    header, message = _split(data, name)
    return _item(header, message, name, refused)


def _split(data: bytes, name: str, within: int | None = None) -> tuple[dict[str, Any], bytes]:
    """The checked header line (looked for in the first ``within`` bytes) and the message."""
    end = data.find(b"\n", 0, within)
    if end < 0:
        raise OfflineError(f"{name}: no header line")
    try:
        return _parse_header(data[:end]), data[end + 1 :]
    except OfflineError as exc:
        raise OfflineError(f"{name}: {exc}") from None


def _item(header: dict[str, Any], message: bytes, name: str, refused: str) -> OfflineMessage:
    return OfflineMessage(
        sender=header["sender"],
        rcpts=list(header["rcpts"]),
        message=message,
        uid=header["uid"],
        name=name,
        time=float(header["time"]),
        options=dict(header.get("options", {})),
        refused=refused,
    )


def _parse_header(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise OfflineError("header is not ASCII JSON") from None
    if not isinstance(obj, dict):
        raise OfflineError("header is not a JSON object")
    if obj.get("v") != VERSION or isinstance(obj.get("v"), bool):
        raise OfflineError(f"header version must be {VERSION}")
    _check_fields(obj.get("sender"), obj.get("rcpts"), obj.get("options", {}))
    uid = obj.get("uid")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise OfflineError("header uid must be a non-negative integer")
    stamp = obj.get("time")
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        raise OfflineError("header time must be a number")
    try:
        finite = math.isfinite(stamp)
    except OverflowError:  # an integer too large for a float (10**400)
        finite = False
    if not finite:  # 1e999, NaN: not a time either
        raise OfflineError("header time must be a finite number")
    return obj


def read(
    directory: str,
    name: str,
    *,
    expected_uid: int | None,
    max_message: int = MAX_SIZE - MAX_HEADER - 1,
) -> OfflineMessage:
    """Read and check one spool file; raise OfflineError with the reason when it is refused.

    A message (the part after the header line) over ``max_message`` bytes comes back with
    ``refused`` set and only its start in ``message``.
    """
    _check_name(name)
    try:
        dfd = _open_dir(directory)
    except OSError as exc:
        raise OfflineError(f"{directory}: cannot open: {exc.strerror}") from None
    try:
        try:
            st = os.lstat(name, dir_fd=dfd)
        except OSError as exc:
            raise OfflineError(f"{name}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise OfflineError(f"{name}: is a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise OfflineError(f"{name}: not a regular file")
        if st.st_nlink != 1:
            raise OfflineError(f"{name}: has {st.st_nlink} links")
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
            )
        except OSError as exc:
            raise OfflineError(f"{name}: cannot open: {exc.strerror}") from None
    finally:
        os.close(dfd)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise OfflineError(f"{name}: replaced while being read")
        if not stat.S_ISREG(fst.st_mode) or fst.st_nlink != 1:
            raise OfflineError(f"{name}: not a regular file with one link")
        if expected_uid is not None and fst.st_uid != expected_uid:
            raise OfflineError(f"{name}: owned by uid {fst.st_uid}, expected {expected_uid}")
        max_message = min(max_message, MAX_SIZE - MAX_HEADER - 1)
        max_file = max_message + MAX_HEADER + 1
        too_large = fst.st_size > max_file
        data, more = _read_upto(fd, MAX_HEADER + KEPT_OF_REFUSED if too_large else max_file, name)
    finally:
        os.close(fd)
    header, message = _split(data, name, MAX_HEADER)
    if header["uid"] != fst.st_uid:
        raise OfflineError(f"{name}: owned by uid {fst.st_uid} but written for uid {header['uid']}")
    refused = ""
    if more or len(message) > max_message:  # also true when too_large
        size = max(fst.st_size, len(data)) - (len(data) - len(message))
        refused = f"552 5.3.4 Message too big for system: {size} bytes, the limit is {max_message}"
        kept = message[: min(KEPT_OF_REFUSED, max_message)]
        message = kept[: kept.rfind(b"\n") + 1]  # whole lines only: the bounce returns them
    return _item(header, message, name, refused)


def _read_upto(fd: int, limit: int, name: str) -> tuple[bytes, bool]:
    """At most ``limit`` bytes from ``fd``, and whether there was more."""
    chunks: list[bytes] = []
    total = 0
    while total <= limit:
        try:
            chunk = os.read(fd, min(1024 * 1024, limit + 1 - total))
        except OSError as exc:
            raise OfflineError(f"{name}: read failed: {exc.strerror}") from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    data = b"".join(chunks)
    return data[:limit], total > limit


def discard(directory: str, name: str) -> bool:
    """Remove a file that was taken or refused; never raises.  Returns whether it is gone.

    Something that cannot be unlinked (a directory planted in the spool) is renamed to a dotfile,
    which :func:`pending` skips, so one bad entry cannot stop the daemon or be retried forever.
    """
    if not name or name.startswith(".") or "/" in name or "\x00" in name:
        return False
    try:
        dfd = _open_dir(directory)
    except OSError:
        return False
    try:
        try:
            os.unlink(name, dir_fd=dfd)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        try:
            os.rmdir(name, dir_fd=dfd)
            return True
        except OSError:
            pass
        try:
            os.rename(name, f".refused-{name}", src_dir_fd=dfd, dst_dir_fd=dfd)
            return True
        except OSError:
            return False
    finally:
        os.close(dfd)


def pending(directory: str) -> list[str]:
    """Names of the complete messages in *directory* (dotfiles skipped), sorted; [] if absent."""
    try:
        dfd = _open_dir(directory)
    except FileNotFoundError:
        return []
    try:
        return sorted(name for name in os.listdir(dfd) if not name.startswith("."))
    finally:
        os.close(dfd)


def cleanup_stale(directory: str, max_age: float) -> int:
    """Remove ``.tmp-*`` files older than *max_age* seconds; return how many were removed."""
    try:
        dfd = _open_dir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    now = time.time()
    try:
        for name in os.listdir(dfd):
            if not name.startswith(TMP_PREFIX):
                continue
            try:
                st = os.lstat(name, dir_fd=dfd)
                if now - st.st_mtime > max_age and not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
            except FileNotFoundError:
                continue
    finally:
        os.close(dfd)
    return removed
