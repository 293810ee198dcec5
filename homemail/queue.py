"""The queue: envelopes, identifiers, and the interface its backends implement.

A message is stored once; each recipient of it has an envelope (JSON, never ``key: value``
lines — CVE-2020-8794).  Identifiers follow OpenSMTPD: a msgid is 32 random bits, an evpid is
``msgid << 32 | 32 random bits``, both printed in hex.

:class:`Queue` is the contract: ``commit`` returns only once the message and its envelopes are
durable, which is what allows the SMTP session to answer 250.  ``queue_fs`` is the daemon's
backend, ``queue_ram`` the in-memory one for unit tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

_random = random.Random(os.urandom(32))  # ids need to be unique, not secret: no syscall each
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(32)))


def random_bits(bits: int) -> int:
    return _random.getrandbits(bits)


def new_msgid() -> int:
    while True:
        msgid = _random.getrandbits(32)
        if msgid:
            return msgid


def new_evpid(msgid: int) -> int:
    while True:
        low = _random.getrandbits(32)
        if low:
            return (msgid << 32) | low


def msgid_of(evpid: int) -> int:
    return evpid >> 32


def format_id(ident: int) -> str:
    return f"{ident:016x}" if ident > 0xFFFFFFFF else f"{ident:08x}"


def parse_id(text: str) -> int:
    """Parse a msgid or evpid as printed; raises ValueError."""
    if not text or len(text) > 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"not a message or envelope id: {text!r}")
    return int(text, 16)


@dataclass
class Envelope:
    """One recipient of one message, as stored in the queue."""

    evpid: int
    sender: str  # "" is the null sender
    rcpt: str  # the recipient as the client gave it
    dest: str  # the final address after alias expansion
    user: str  # local user the delivery runs as
    action: str  # name of the action in the configuration
    ctime: float
    expire: float
    type: str = "mda"
    retry: int = 0
    next_try: float = 0.0
    last_try: float = 0.0
    last_error: str = ""
    warned: int = 0  # delay warnings already sent
    paused: bool = False
    bounce: bool = False  # this message is itself a DSN: never bounce it
    smtputf8: bool = False
    body: str = "7BIT"
    dsn_notify: list[str] = field(default_factory=list)
    dsn_orcpt: str = ""
    dsn_ret: str = ""
    dsn_envid: str = ""
    uid: int = -1  # local submitter (sendmail), or -1 for mail that came over the network
    src: str = ""  # where the message came from, for logs
    offline: str = ""  # name of the offline spool file it was picked up from
    helo: str = ""
    recovered: bool = False  # loaded from disk at start; not stored

    @property
    def msgid(self) -> int:
        return msgid_of(self.evpid)

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _STORED}
        data["dsn_notify"] = list(self.dsn_notify)
        return data

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        return cls(**{k: v for k, v in data.items() if k in _NAMES})


_STORED = tuple(f.name for f in dataclasses.fields(Envelope) if f.name != "recovered")
_NAMES = frozenset(f.name for f in dataclasses.fields(Envelope))


class QueueError(Exception):
    """The queue could not store or read something; callers treat it as a temporary failure.
    ``full``: for want of room on the disk (or in the quota)."""

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class Queue(ABC):
    """Where accepted mail lives until every envelope is delivered, bounced or removed."""

    walk_reads = 0  # after scan(): the messages it had to read from disk (see queue_fs)

    @abstractmethod
    def commit(
        self, message: bytes, envelopes: list[Envelope], *, alone: bool = False
    ) -> Awaitable[None]:
        """Store a message and its envelopes durably; raise QueueError if that failed.

        ``alone``: no other commit is likely to come while this one is synced (a single SMTP
        client), so the backend may sync it on the caller's thread instead of its writer's.
        A backend that does so returns a future already done (awaiting it does not yield).
        QueueError may come from the call itself (a commit refused outright) or from the
        awaitable (a failed write).
        """

    @abstractmethod
    async def update(self, envelope: Envelope) -> None:
        """Record an envelope's new scheduling state (retry count, last error, …)."""

    @abstractmethod
    async def remove(self, envelope: Envelope) -> None:
        """Forget an envelope that is done; the message goes with its last envelope."""

    @abstractmethod
    def read_message(self, msgid: int) -> bytes:
        """The message bytes as received (CRLF line endings); may block on disk."""

    def cached_message(self, msgid: int) -> bytes | None:
        """The message if it can be had without touching the disk, else None."""
        return None

    @abstractmethod
    def contains(self, msgid: int) -> bool:
        """Whether a message with this id is queued (ids must stay unique)."""

    def new_msgid(self) -> int:
        """A msgid no queued message has."""
        while True:
            msgid = new_msgid()
            if not self.contains(msgid):
                return msgid

    @abstractmethod
    def load(self) -> list[Envelope]:
        """Recover every envelope still to deliver (called once, at start)."""

    def start(self) -> list[Envelope]:
        """Like :meth:`load`, but may leave the slow part to :meth:`scan` (use one or the other)."""
        return self.load()

    def complete(self) -> bool:
        """Whether :meth:`start` returned every envelope (nothing is left to :meth:`scan`)."""
        return True

    def scan(self) -> Iterator[list[Envelope]]:
        """After :meth:`start`: the remaining envelopes, in batches (may block on disk)."""
        return iter(())

    async def close(self, *, release: bool = True) -> None:  # noqa: B027 - optional hook
        """Flush and release resources.  ``release=False``: whatever marks the queue's storage
        as owned (the spool's lock) stays held until the process exits."""
