"""Logging: one line per event, ``ID SUBSYSTEM EVENT key=value …`` (REFERENCE §7).

Values are quoted when they hold spaces, quotes or ``=``, and every control character is escaped,
so nothing a client sends can forge a log line.  Lines go to stderr in whole write(2) calls (the
lines of one event-loop iteration together, so nothing waits in a buffer longer than that, and
processes never interleave within a line); a timestamp is added
unless systemd's journal is on the other end (it stamps lines itself).  The hot path avoids
the logging module's machinery, which cost more per message than the SMTP dialogue.
Credentials are never passed here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

logger = logging.getLogger("homemail")
_state = {"fd": 2, "stamp": True, "level": logging.INFO}
_stamp_cache: list[object] = [0, ""]


def quote(value: object) -> str:
    text = str(value)
    if (
        text
        and text.isprintable()
        and " " not in text
        and '"' not in text
        and "=" not in text
        and "\\" not in text
    ):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


def sanitize(text: str, limit: int = 512) -> str:
    """One printable line: for reply texts and errors kept in envelopes or logs."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean[:limit]


def _stamp() -> str:
    now = time.time()
    second = int(now)
    if _stamp_cache[0] != second:
        _stamp_cache[0] = second
        _stamp_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
    return f"{_stamp_cache[1]}.{int((now - second) * 1000):03d} "


_pending: list[str] = []


def _write(line: str) -> None:
    text = (_stamp() if _state["stamp"] else "") + line + "\n"
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _flush_text(text)  # no event loop here (the parent, a thread): write at once
        return
    if not _pending:
        loop.call_soon(flush)  # the lines of one loop iteration go out in one write
    _pending.append(text)


def flush() -> None:
    if _pending:
        text = "".join(_pending)
        _pending.clear()
        _flush_text(text)


def _flush_text(text: str) -> None:
    data = text.encode("utf-8", "replace")
    fd = int(_state["fd"])
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # a closed stderr must not take the daemon down


def event(
    ident: str, subsystem: str, name: str, /, *, level: int = logging.INFO, **fields: object
) -> None:
    if level < int(_state["level"]):
        return
    parts = [ident, subsystem, name]
    parts.extend(f"{k.rstrip('_').replace('_', '-')}={quote(v)}" for k, v in fields.items())
    _write(" ".join(parts))


def setup(verbose: bool = False) -> None:
    _state["fd"] = 2
    _state["stamp"] = not os.environ.get("JOURNAL_STREAM")
    set_verbose(verbose)


def set_verbose(verbose: bool) -> None:
    _state["level"] = logging.DEBUG if verbose else logging.INFO
    logger.setLevel(int(_state["level"]))
    # aiosmtpd logs every command line it reads; we log events ourselves
    wire = logging.getLogger("mail.log")
    wire.propagate = False
    if verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s wire %(message)s"))
        wire.handlers[:] = [handler]
        wire.setLevel(logging.DEBUG)
    else:
        wire.handlers[:] = []
        wire.setLevel(logging.CRITICAL)


def info(message: str) -> None:
    _write(message)


def warning(message: str) -> None:
    _write(f"warning: {message}")


def error(message: str) -> None:
    _write(f"error: {message}")
