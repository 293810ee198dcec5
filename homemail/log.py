"""Logging: one line per event, ``ID SUBSYSTEM EVENT key=value …`` (REFERENCE §7).

Values are quoted when they hold spaces, quotes or ``=``, and every control character is escaped,
so nothing a client sends can forge a log line.  Logs go to stderr; a timestamp is added unless
systemd's journal is on the other end (it stamps lines itself).  Credentials are never passed
here.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("homemail")


def quote(value: object) -> str:
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
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


def event(
    ident: str, subsystem: str, name: str, /, *, level: int = logging.INFO, **fields: object
) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [ident, subsystem, name]
    parts.extend(f"{k.rstrip('_').replace('_', '-')}={quote(v)}" for k, v in fields.items())
    logger.log(level, " ".join(parts))


def setup(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%Y-%m-%dT%H:%M:%S")
        )
    logger.handlers[:] = [handler]
    logger.propagate = False
    set_verbose(verbose)


def set_verbose(verbose: bool) -> None:
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # aiosmtpd logs every command line it reads; we log events ourselves
    wire = logging.getLogger("mail.log")
    wire.handlers[:] = [logger.handlers[0]] if verbose and logger.handlers else []
    wire.propagate = False
    wire.setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def info(message: str) -> None:
    logger.info(message)


def warning(message: str) -> None:
    logger.warning("warning: %s", message)


def error(message: str) -> None:
    logger.error("error: %s", message)
