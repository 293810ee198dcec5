"""Smarthost credentials: the secrets file, which never holds anything but them.

Format (OpenSMTPD's ``table secrets``): one entry a line, ``LABEL USERNAME:PASSWORD``; ``#``
comments and blank lines are kept when an entry is replaced.  The label names the relay's
credentials (``smtp+tls://LABEL@smtp.example.org``); the user name may not contain ``:`` or
white space; the password is the rest of the line and may contain anything but CR, LF and NUL.

The file is written atomically with mode 0600 (root's in system mode, where the parent writes
it; the user's in user mode), and is never logged.  The tray app reads passwords from the
desktop keyring and hands them to the daemon over the control socket, since a system daemon
cannot reach a user's keyring.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

_LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")


class CredentialError(ValueError):
    pass


def check(label: str, username: str, password: str) -> None:
    if not _LABEL.fullmatch(label):
        raise CredentialError("label: 1-64 letters, digits, '.', '_' or '-'")
    if not username or len(username) > 256 or any(c in username for c in ":\r\n\0 \t"):
        raise CredentialError("user name: one word without ':'")
    if not password or len(password) > 1024 or any(c in password for c in "\r\n\0"):
        raise CredentialError("password: one line, not empty")


def read(path: str) -> dict[str, tuple[str, str]]:
    """label → (username, password)."""
    entries: dict[str, tuple[str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.rstrip("\n")
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            label, _, rest = text.strip().partition(" ")
            username, colon, password = rest.strip().partition(":")
            if colon:
                entries[label] = (username, password)
    return entries


def store(path: str, label: str, username: str, password: str) -> None:
    """Add or replace one entry, atomically, leaving the file 0600."""
    check(label, username, password)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        lines = ["# smarthost credentials: LABEL USERNAME:PASSWORD (written by homemail)\n"]
    entry = f"{label} {username}:{password}\n"
    for i, line in enumerate(lines):
        if line.strip().partition(" ")[0] == label and not line.lstrip().startswith("#"):
            lines[i] = entry
            break
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(entry)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".secrets-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
