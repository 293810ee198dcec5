"""Inbound SMTP: the session state machine on top of aiosmtpd, and the listeners.

aiosmtpd owns the wire: reading commands, timeouts, and later STARTTLS.  This module owns what a
mail server decides: the EHLO set, parsing MAIL and RCPT with their ESMTP parameters, address
validation, rule matching, limits, the headers we add or drop, and handing the message to the
queue.  A 250 after DATA means the queue has it on disk.  DATA is read here too, in large chunks
rather than aiosmtpd's line by line: only CR LF . CR LF ends it (a bare LF or CR never does, so
SMTP smuggling fails), and bytes pipelined after it go back to the command reader.

Every reply carries an enhanced status code (RFC 3463): replies written here have one, and
:meth:`Session.push` adds the right one to aiosmtpd's own replies.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, ClassVar, cast

from aiosmtpd.smtp import SMTP, syntax

from homemail import log
from homemail.address import AddressError, check_domain, parse_path
from homemail.config import Listener, listen_hosts
from homemail.queue import Envelope, QueueError, format_id, new_evpid, new_msgid, random_bits
from homemail.ruleset import Rejected, Ruleset, Source, Target, source_for

IDENT = "ESMTP homemail"
MAX_RECEIVED = 100
LISTEN_BACKLOG = 1024  # OpenSMTPD's 5 makes simultaneous clients wait on SYN retransmits
SESSION_TIMEOUT = 300.0  # seconds without a command or data before the connection is closed
MAX_LINE = 1000  # octets, CR LF included (RFC 5321 4.5.3.1.6)
_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_STATUS = {
    "211": "2.0.0",
    "214": "2.0.0",
    "221": "2.0.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "534": "5.7.9",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.1.1",
    "551": "5.1.6",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.3.0",
    "555": "5.5.4",
}
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")


def with_enhanced_code(reply: str) -> str:
    """Give a single-line reply an RFC 3463 code if it lacks one (not 220/354 or multi-line)."""
    code = reply[:3]
    if len(reply) < 3 or reply[3:4] == "-" or _ENHANCED.match(reply) or code in ("220", "354"):
        return reply
    status = _DEFAULT_STATUS.get(code)
    if status is None:
        status = f"{code[0]}.0.0" if code[0] in "245" else ""
    if not status:
        return reply
    text = reply[4:] if len(reply) > 3 else ""
    return f"{code} {status} {text}".rstrip()


def xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


@dataclass
class Recipient:
    rcpt: str
    targets: list[Target]
    notify: list[str] = field(default_factory=list)
    orcpt: str = ""


@dataclass
class Transaction:
    sender: str = ""
    smtputf8: bool = False
    body: str = "7BIT"
    ret: str = ""
    envid: str = ""
    recipients: list[Recipient] = field(default_factory=list)


class ServerContext:
    """What every session of the daemon shares: set by the daemon, replaced on reload."""

    def __init__(
        self,
        *,
        hostname: str,
        ruleset: Ruleset,
        max_message_size: int,
        max_mails: int,
        max_rcpt: int,
        queue_ttl: int,
        enqueue: Callable[[bytes, list[Envelope], Callable[[], None]], Awaitable[None]],
    ) -> None:
        self.hostname = hostname
        self.ruleset = ruleset
        self.max_message_size = max_message_size
        self.max_mails = max_mails
        self.max_rcpt = max_rcpt
        self.queue_ttl = queue_ttl
        self.enqueue = enqueue
        self.paused = False
        self.open: set[Session] = set()  # the connected sessions (a shutdown tells them 421)
        self.total_sessions = 0
        self.notify: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self.new_msgid: Callable[[], int] = new_msgid  # the daemon's checks the queue
        # whether the spool's disk has too little room to take a message (the daemon's looks)
        self.spool_short: Callable[[], bool] = lambda: False

    @property
    def sessions(self) -> int:
        return len(self.open)


class Session(SMTP):
    """One SMTP connection."""

    # aiosmtpd builds its tables of smtp_* and auth_* methods by reflection on every new
    # connection, a third of the cost of accepting one.  The first session of each class lets it
    # (seeing only those names, through __dir__) and the tables are recorded, by method name;
    # later sessions hide their names from it and bind the same methods from that record.
    _dir_names: ClassVar[list[str] | None] = None
    _tables: ClassVar[tuple[list[tuple[str, str]], list[tuple[str, str, bool, Any]]] | None]
    _tables = None

    def __dir__(self) -> list[str]:
        if self.__dict__.get("_hide_names"):
            return []
        cls = type(self)
        names: list[str] | None = cls.__dict__.get("_dir_names")
        if names is None:
            names = sorted(
                {n for k in cls.__mro__ for n in vars(k) if n.startswith(("smtp_", "auth_"))}
            )
            cls._dir_names = names
        return names

    def __init__(
        self,
        ctx: ServerContext,
        listener: Listener,
        *,
        source: Source | None = None,
        uid: int = -1,
        timeout: float = SESSION_TIMEOUT,
    ) -> None:
        self.ctx = ctx
        self.listener = listener
        self.sid = f"{random_bits(64):016x}"
        self.txn: Transaction | None = None
        self.mails = 0
        self.fixed_source = source
        self.source = source or Source("remote", "")
        self.uid = uid
        self.lost = False
        self._reason: str | None = None  # why the session ended, for the log
        self._accepted: Callable[[], None] | None = None  # logs the message just accepted
        self._deadline = self._armed_for = 0.0
        cls = type(self)
        tables: tuple[list[tuple[str, str]], list[tuple[str, str, bool, Any]]] | None
        tables = cls.__dict__.get("_tables")  # this class's own, not a parent's
        self._hide_names = tables is not None
        super().__init__(
            _Hooks(self),
            data_size_limit=ctx.max_message_size,
            enable_SMTPUTF8=True,
            hostname=listener.hostname or ctx.hostname,
            ident=IDENT,
            timeout=timeout,
            command_call_limit=None,
            loop=asyncio.get_running_loop(),
        )
        if tables is None:  # names only: a bound method here would keep this session alive
            cls._tables = (
                [(command, method.__name__) for command, method in self._smtp_methods.items()],
                [
                    (name, m.method.__name__, m.is_builtin, type(m))
                    for name, m in self._auth_methods.items()
                ],
            )
        else:
            self._hide_names = False
            smtp, auth = tables
            self._smtp_methods = {command: getattr(self, attr) for command, attr in smtp}
            handler = self.event_handler
            self._auth_methods = {
                name: kind(getattr(self if builtin else handler, attr), builtin)
                for name, attr, builtin, kind in auth
            }

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            assert self._handler_coroutine is not None
            self._handler_coroutine.add_done_callback(self._handler_done)
            if self.fixed_source is None:
                peer = transport.get_extra_info("peername")
                address = peer[0] if isinstance(peer, tuple) else ""
                self.source = source_for(address, self.listener.tag)
            self.ctx.total_sessions += 1
            self.ctx.open.add(self)
            log.event(
                self.sid,
                "smtp",
                "connected",
                # a client that reset its connection at once leaves no peer name: not "local"
                address=self.source.address
                or ("local" if self.fixed_source is not None else "unknown"),
                listener=self.listener.address,
                **({"uid": self.uid} if self.uid >= 0 else {}),
            )

    def connection_lost(self, error: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.ctx.open.discard(self)
            self._log_accepted()  # gone before its 250 was written: logged all the same
            reason = self._reason or ("error" if error is not None else "disconnected")
            log.event(self.sid, "smtp", "disconnected", reason=reason)
        super().connection_lost(error)
        if self._handler_coroutine is not None and self._handler_coroutine.done():
            self._release()  # the command loop ended first (else _handler_done does it)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        if self.lost:
            self._release()

    def _release(self) -> None:
        """Drop the references that make a session a cycle, once it is over (the connection
        lost, its command loop ended): it is then freed at once rather than by the cyclic
        collector, which under load let thousands of ended sessions pile up first."""
        self._smtp_methods = {}
        self._auth_methods = {}
        self._handle_hooks = {}
        self._handler_coroutine = None
        self._timeout_handle = None
        self._client_connected_cb = None  # (asyncio's: a method of ours)
        self._writer = None  # type: ignore[assignment]  # (it points back at us)
        self.event_handler = None  # our _Hooks, which point back at us

    def _log_accepted(self) -> None:
        """Log the message just accepted, if not yet logged (its 250 written, or the
        connection gone first)."""
        accepted, self._accepted = self._accepted, None
        if accepted is not None:
            accepted()

    def close_with(self, status: str, text: str, reason: str) -> None:
        """Send a 421 and close (RFC 5321 3.8): a timeout, a shutdown, SMTP paused."""
        self._reason = self._reason or reason
        transport = cast(asyncio.Transport | None, self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"421 {status} {self.hostname} {text}\r\n".encode())
            transport.close()

    def _timeout_cb(self) -> None:
        self.close_with("4.4.2", "Timeout, closing connection", "timeout")

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session when the client closes its side, dropping the commands
        # it pipelined before doing so (printf … | nc -N, sendmail -bs fed from a file).
        # Instead the reader sees the end: what was received is answered, then we close.
        if self.session is not None and self.session.ssl is not None:
            return super().eof_received()
        self._reader.feed_eof()
        return True

    def end_of_input(self) -> None:
        """The client closed its side and every command it sent has been answered."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-arms a timer for every command (and _read_data calls this for
        # every chunk of DATA).  One timer per session is enough: activity moves a deadline,
        # checked when the timer fires; only a deadline earlier than the armed one re-arms it.
        # None is armed once the connection is gone (it would keep the session for minutes).
        if self.lost:
            return
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or self._deadline < self._armed_for:
            if handle is not None:
                handle.cancel()
            self._arm_timeout()

    def _arm_timeout(self) -> None:
        self._armed_for = self._deadline
        self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:
            self._arm_timeout()
        else:
            self._timeout_cb()

    async def _refuse(self, command: str, reply: str) -> None:
        log.event(self.sid, "smtp", "failed-command", command=command, result=reply)
        await self.push(reply)

    async def push(self, status: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost end the session's command loop
            return
        if isinstance(status, str):
            status = with_enhanced_code(status)
        await super().push(status)

    async def reply_lines(self, lines: list[str]) -> None:
        """A multi-line reply in one write."""
        self._writer.write("".join(f"{line}\r\n" for line in lines).encode("utf-8"))
        await self._writer.drain()

    # -- commands ----------------------------------------------------------------------------

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        if not _valid_helo(hostname):
            await self.push("501 5.5.4 Invalid domain name")
            return
        assert self.session is not None
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.txn = None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        self.command_size_limits["MAIL"] = 512 + 26 + 10 + 20 + 300
        self.command_size_limits["RCPT"] = 512 + 200
        lines = [
            self.hostname + " greets " + hostname,
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            f"SIZE {self.ctx.max_message_size}",
            "DSN",
            "PIPELINING",
            "SMTPUTF8",
            "HELP",
        ]
        await self.reply_lines([f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"])

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        if not _valid_helo(hostname):
            await self.push("501 5.5.4 Invalid domain name")
            return
        assert self.session is not None
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.txn = None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname} Hello {hostname}")

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.txn = None
        await self.push("250 2.0.0 Reset state")

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    @syntax("QUIT")
    async def smtp_QUIT(self, arg: str) -> None:
        if not arg:
            self._reason = "quit"
        await super().smtp_QUIT(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN not supported")

    async def smtp_AUTH(self, arg: str) -> None:  # no @syntax: HELP does not list it
        # EHLO does not offer AUTH yet; aiosmtpd's own handler would answer "538 encryption
        # required", as if it were on offer
        await self.push("502 5.5.1 AUTH not supported")

    def _params(self, words: list[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        for word in words:
            key, eq, value = word.partition("=")
            key = key.upper()
            if not key.isalnum() or not key.isascii() or (eq and not value) or key in params:
                return None
            params[key] = value if eq else ""
        return params

    @staticmethod
    def _split_path(arg: str, keyword: str) -> tuple[str, list[str]] | None:
        if arg[: len(keyword)].upper() != keyword:
            return None
        rest = arg[len(keyword) :].lstrip()
        if not rest.startswith("<"):
            return None
        end = rest.find(">")
        if end < 0:
            return None
        return rest[: end + 1], rest[end + 1 :].split()

    async def _path_and_params(
        self, arg: str | None, keyword: str, verb: str
    ) -> tuple[str, dict[str, str]] | None:
        """``FROM:<path> params`` / ``TO:<path> params``; replies and returns None if bad."""
        assert self.session is not None
        parsed = self._split_path(arg or "", keyword)
        if parsed is None:
            await self.push(f"501 5.5.4 Syntax: {verb} {keyword}<address> [parameters]")
            return None
        path, words = parsed
        if words and not self.session.extended_smtp:
            await self.push("501 5.5.4 Parameters need EHLO")
            return None
        params = self._params(words)
        if params is None:
            await self.push(f"501 5.5.4 Malformed {verb} parameters")
            return None
        return path, params

    @syntax("MAIL FROM:<address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None
        if self.txn is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if self.ctx.paused:
            self.close_with("4.3.2", "Service paused, closing connection", "paused")
            return
        if self.mails >= self.ctx.max_mails:
            await self.push("452 4.5.3 Too many messages for this session")
            return
        parsed = await self._path_and_params(arg, "FROM:", "MAIL")
        if parsed is None:
            return
        path, params = parsed
        txn = Transaction()
        for key, value in params.items():
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()) or len(value) > 20:
                    await self.push("501 5.5.4 Malformed SIZE parameter")
                    return
                if int(value) > self.ctx.max_message_size:
                    too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
                    await self._refuse("MAIL", too_big)
                    return
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    await self.push("501 5.5.4 BODY must be 7BIT or 8BITMIME")
                    return
                txn.body = value.upper()
            elif key == "SMTPUTF8":
                if value:
                    await self.push("501 5.5.4 SMTPUTF8 takes no value")
                    return
                txn.smtputf8 = True
            elif key == "RET":
                if value.upper() not in ("FULL", "HDRS"):
                    await self.push("501 5.5.4 RET must be FULL or HDRS")
                    return
                txn.ret = value.upper()
            elif key == "ENVID":
                if not _XTEXT.match(value) or len(value) > 100:
                    await self.push("501 5.5.4 Malformed ENVID parameter")
                    return
                txn.envid = xtext_decode(value)
            elif key == "AUTH":
                continue  # RFC 4954: accepted and ignored from an unauthenticated client
            else:
                await self.push(f"555 5.5.4 Unsupported MAIL parameter {key}")
                return
        if self.ctx.spool_short():
            await self._refuse("MAIL", "452 4.3.1 Insufficient system storage")
            return
        try:
            sender = parse_path(path, null_ok=True, utf8=True)
        except AddressError as exc:
            await self._refuse("MAIL", f"553 5.1.7 Sender address rejected: {exc}")
            return
        if sender is not None and not sender.is_ascii and not txn.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address requires SMTPUTF8")
            return
        txn.sender = str(sender) if sender is not None else ""
        self.txn = txn
        assert self.envelope is not None
        self.envelope.mail_from = txn.sender or "<>"
        await self.push("250 2.1.0 Ok")

    @syntax("RCPT TO:<address>", extended=" [SP <rcpt-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        txn = self.txn
        if txn is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        parsed = await self._path_and_params(arg, "TO:", "RCPT")
        if parsed is None:
            return
        path, params = parsed
        rcpt = Recipient(rcpt="", targets=[])
        for key, value in params.items():
            if key == "NOTIFY":
                items = value.upper().split(",")
                valid = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
                if not value or not set(items) <= valid or ("NEVER" in items and len(items) > 1):
                    await self.push("501 5.5.4 Malformed NOTIFY parameter")
                    return
                rcpt.notify = items
            elif key == "ORCPT":
                kind, semi, addr = value.partition(";")
                if not semi or not kind or not _XTEXT.match(addr or "-") or len(value) > 500:
                    await self.push("501 5.5.4 Malformed ORCPT parameter")
                    return
                rcpt.orcpt = f"{kind.lower()};{xtext_decode(addr)}"
            else:
                await self.push(f"555 5.5.4 Unsupported RCPT parameter {key}")
                return
        if len(txn.recipients) >= self.ctx.max_rcpt:
            await self.push("452 4.5.3 Too many recipients")
            return
        try:
            address = parse_path(path, null_ok=False, utf8=True, allow_bare_postmaster=True)
        except AddressError as exc:
            await self._refuse("RCPT", f"553 5.1.3 Recipient address rejected: {exc}")
            return
        assert address is not None
        if not address.is_ascii and not txn.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address requires SMTPUTF8")
            return
        try:
            rcpt.targets = self.ctx.ruleset.route(self.source, address)
        except Rejected as exc:
            log.event(
                self.sid,
                "smtp",
                "failed-command",
                command="RCPT",
                rcpt=f"<{address}>",
                result=exc.reply,
                **({"detail": exc.detail} if exc.detail else {}),  # type: ignore[arg-type]
            )
            await self.push(exc.reply)
            return
        rcpt.rcpt = str(address)
        txn.recipients.append(rcpt)
        self.envelope.rcpt_tos.append(rcpt.rcpt)
        await self.push("250 2.1.5 Recipient ok")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if self.txn is not None and not self.txn.recipients:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if self.txn is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await self._read_data()
        except _TooLarge:
            self.txn = None
            status = "552 5.3.4 Message size exceeds fixed maximum message size"
            log.event(self.sid, "smtp", "message-refused", reason="too large")
        else:
            if content is None:  # the client went away
                return
            status = await self.accept(content)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        try:
            await self.push(status)
        finally:
            self._log_accepted()  # once the 250 is on its way, not before

    async def _read_data(self) -> bytes | None:
        """The message up to CR LF . CR LF, dot-unstuffed; None if the connection closed.

        Reads in large chunks instead of line by line.  Only CR LF . CR LF ends the data (a
        bare LF or CR never does: no SMTP smuggling).  Past the size limit the data is
        discarded as it arrives and only the terminator is looked for; the caller sees a
        content longer than the limit.  Bytes after the terminator (pipelined commands) are
        handed back to the command reader.  Raises _TooLarge once the whole over-sized message
        has been read.
        """
        reader = self._reader
        limit = self.ctx.max_message_size
        buf = bytearray(b"\r\n")  # the data starts at a line start
        searched = 0
        dropped = 0
        dots = counted = 0  # stuffed dots in buf[:counted], counted once near the limit
        while True:
            end = buf.find(b"\r\n.\r\n", max(0, searched - 4))
            if end >= 0:
                break
            searched = len(buf)
            if len(buf) + dropped > limit + 2 and len(buf) > 8:
                if not dropped:  # the size is the unstuffed one (RFC 1870)
                    dots += buf.count(b"\r\n.", max(0, counted - 2))
                    counted = len(buf)
                # slack for a terminator cut in two (".\r" counted as a stuffed dot): the
                # exact check is made on the unstuffed message below
                if dropped or len(buf) - dots > limit + 8:
                    dropped += len(buf) - 4
                    del buf[:-4]  # keep only what a terminator could start in
                    searched = 0
            chunk = await reader.read(1 << 40)  # everything buffered, so pushing back is safe
            if not chunk:
                return None
            self._reset_timeout()
            buf += chunk
        leftover = bytes(buf[end + 5 :])
        if leftover:
            # back in front of the reader's (empty) buffer, even after the client's EOF; the
            # buffer is private API, which aiosmtpd itself relies on for STARTTLS
            reader._buffer[:0] = leftover  # type: ignore[attr-defined]
        if dropped:
            raise _TooLarge
        del buf[end + 2 :]
        if buf.find(b"\r\n.") >= 0:  # dot-stuffed lines: rarer than not
            buf = buf.replace(b"\r\n.", b"\r\n")
        if len(buf) - 2 > limit:
            raise _TooLarge
        return bytes(memoryview(buf)[2:])

    # -- the message -------------------------------------------------------------------------

    async def accept(self, content: bytes) -> str:
        txn = self.txn
        self.txn = None
        assert txn is not None and self.session is not None
        msgid = self.ctx.new_msgid()
        now = time.time()
        proto = "ESMTP" if self.session.extended_smtp else "SMTP"
        if self.source.kind == "socket":
            origin = f"local (uid {self.uid})"
        elif self.listener.mask_src:
            origin = None
        else:
            helo = log.sanitize(self.session.host_name or "unknown", 255).replace(" ", "")
            addr = self.source.address or "local"
            origin = f"{helo} ([{'IPv6:' + addr if ':' in addr else addr}])"
        try:
            message = build_message(
                content,
                origin=origin,
                hostname=self.hostname,
                proto="UTF8SMTP" if txn.smtputf8 else proto,  # RFC 6531 3.7.3
                msgid=msgid,
                now=now,
                single_rcpt=txn.recipients[0].rcpt if len(txn.recipients) == 1 else None,
                add_ids=self.source.kind in ("local", "socket"),
                long_lines=self.source.kind == "socket",
            )
        except MessageRefused as exc:
            log.event(self.sid, "smtp", "message-refused", reason=exc.reason)
            return exc.reply
        envelopes = make_envelopes(
            txn,
            msgid,
            now=now,
            ttl=self.ctx.queue_ttl,
            uid=self.uid,
            src=self.source.address or "local",
            helo=self.session.host_name or "",
        )
        accepted = functools.partial(
            log_accepted, self.ctx, self.sid, msgid, message, txn, envelopes, proto, self.uid
        )
        try:
            # a commit that lands after the client vanished is logged by the queue's side
            await self.ctx.enqueue(message, envelopes, accepted)
        except QueueError as exc:
            log.event(self.sid, "smtp", "message-failed", msgid=format_id(msgid), error=str(exc))
            if exc.full:
                return "452 4.3.1 Insufficient system storage: the queue is full"
            return "451 4.3.0 Temporary failure: the queue could not store the message"
        self.mails += 1
        self._accepted = accepted
        return f"250 2.0.0 {format_id(msgid)} Message accepted for delivery"


class MessageRefused(Exception):
    def __init__(self, reply: str, reason: str) -> None:
        super().__init__(reply)
        self.reply, self.reason = reply, reason


def build_message(
    content: bytes,
    *,
    origin: str | None,
    hostname: str,
    proto: str,
    msgid: int,
    now: float,
    single_rcpt: str | None,
    add_ids: bool,
    long_lines: bool = False,
) -> bytes:
    """Check a received message and add our headers; raises MessageRefused.

    Refuses lines over 1000 octets (unless ``long_lines``: local enqueue, where ``sendmail``
    takes what scripts write, as Postfix's does) and 100 or more ``Received:`` headers; drops
    ``Bcc:``, ``Resent-Bcc:`` and ``Return-Path:`` (the final delivery adds its own); adds
    ``Message-ID:`` and ``Date:`` when missing on local submissions; prepends ``Received:``.
    """
    if not long_lines and len(content) > MAX_LINE and _has_long_line(content):
        raise MessageRefused(
            "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6 allows 1000 octets)", "line too long"
        )
    headers, body = split_header(content)
    fields = [(_name_of(f), f) for f in _header_lines(headers)]  # read once, used thrice
    if sum(name == b"received" for name, _ in fields) >= MAX_RECEIVED:
        raise MessageRefused("554 5.4.6 Too many hops, routing loop detected", "routing loop")
    kept = [(name, f) for name, f in fields if name not in _DROPPED]
    if len(kept) < len(fields):
        headers = b"".join(f for _, f in kept)
    added = []
    if add_ids:
        names = {name for name, _ in kept}
        if b"message-id" not in names:
            token = f"{random_bits(64):016x}"
            added.append(f"Message-ID: <{token}.{format_id(msgid)}@{hostname}>\r\n")
        if b"date" not in names:
            added.append(f"Date: {_rfc5322_date(int(now))}\r\n")
    parts = ["Received: "]
    if origin is not None:
        parts.append(f"from {origin}\r\n\t")
    parts.append(f"by {hostname} (homemail) with {proto} id {format_id(msgid)}")
    if single_rcpt is not None:
        parts.append(f"\r\n\tfor <{single_rcpt}>")
    parts.append(f";\r\n\t{_rfc5322_date(int(now))}\r\n")
    received = "".join(parts).encode("utf-8", "surrogateescape")
    return received + headers + "".join(added).encode() + body


@functools.lru_cache(maxsize=2)
def _rfc5322_date(second: int) -> str:
    """The local date and time of a second, formatted once for all the messages in it."""
    return formatdate(second, localtime=True)


def make_envelopes(
    txn: Transaction, msgid: int, *, now: float, ttl: int, uid: int, src: str, helo: str
) -> list[Envelope]:
    """One envelope per distinct (action, destination) among the transaction's recipients.

    An envelope expires ``ttl`` seconds from ``now`` (``queue ttl``), or its action's own ttl.
    """
    seen: set[tuple[str, str]] = set()
    envelopes = []
    for rcpt in txn.recipients:
        for target in rcpt.targets:
            if (target.action, target.dest) in seen:
                continue
            seen.add((target.action, target.dest))
            envelopes.append(
                Envelope(
                    evpid=new_evpid(msgid),
                    sender=txn.sender,
                    rcpt=rcpt.rcpt,
                    dest=target.dest,
                    user=target.user,
                    action=target.action,
                    ctime=now,
                    expire=now + (target.ttl or ttl),
                    next_try=now,
                    smtputf8=txn.smtputf8,
                    body=txn.body,
                    dsn_notify=rcpt.notify,
                    dsn_orcpt=rcpt.orcpt,
                    dsn_ret=txn.ret,
                    dsn_envid=txn.envid,
                    uid=uid,
                    src=src,
                    helo=helo,
                )
            )
    return envelopes


def log_accepted(
    ctx: ServerContext,
    sid: str,
    msgid: int,
    message: bytes,
    txn: Transaction,
    envelopes: list[Envelope],
    proto: str,
    uid: int,
) -> None:
    log.event(
        sid,
        "smtp",
        "message",
        msgid=format_id(msgid),
        size=len(message),
        nrcpt=len(txn.recipients),
        proto=proto,
    )
    for env in envelopes:
        log.event(
            sid,
            "smtp",
            "envelope",
            evpid=format_id(env.evpid),
            from_=f"<{env.sender}>",
            to=f"<{env.rcpt}>",
            dest=env.dest,
        )
    event: dict[str, Any] = {
        "msgid": format_id(msgid),
        "sender": txn.sender,
        "size": len(message),
        "nrcpt": len(txn.recipients),
        "users": sorted({env.user for env in envelopes}),
    }
    if uid >= 0:
        event["uid"] = uid
    ctx.notify("received", event)


class _TooLarge(Exception):
    """DATA went over the size limit (the data itself was discarded)."""


class _Hooks:
    """The aiosmtpd handler: DATA is read and answered by Session itself."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def __dir__(self) -> list[str]:  # see Session.__dir__
        return ["handle_exception"]

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, asyncio.IncompleteReadError):
            self.session.end_of_input()
            return ""
        log.event(self.session.sid, "smtp", "error", error=f"{type(error).__name__}: {error}")
        return "451 4.3.0 Internal error, try again later"


def _valid_helo(name: str) -> bool:
    """A domain or an address literal (RFC 5321 4.1.1.1), as OpenSMTPD checks it; the
    underscores of many a Windows host name pass, the spaces, semicolons and bytes that would
    garble the Received: field do not."""
    try:
        check_domain(name.replace("_", "x"))
    except AddressError:
        return False
    return True


def _has_long_line(content: bytes) -> bool:
    """Whether a line, CRLF included, is longer than MAX_LINE (the last one counts its CRLF).

    Jumps from a line start to the last line start within MAX_LINE octets of it: every line in
    between fits, so a 100 KiB message takes a hundred searches, not a split into its lines.
    """
    start, size = 0, len(content)
    while size - start + 2 > MAX_LINE:
        crlf = content.rfind(b"\r\n", start, start + MAX_LINE)
        if crlf < 0:
            return True
        start = crlf + 2
    return False


_LINE = re.compile(rb"[^\n]*\n|[^\n]+")  # a line and its end (LF, or CR LF)
# a header field's name and colon (RFC 5322 3.6.8), and lines of fields; names are bounded, so
# that a huge line with no colon (local enqueue takes long lines) costs no backtracking
_FIELD = re.compile(rb"[!-9;-~]{1,998}[ \t]*:")
_FIELDS = re.compile(rb"(?:[!-9;-~]{1,998}[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*)+")


def split_header(content: bytes) -> tuple[bytes, bytes]:
    """The header section and the rest, which starts with the empty line between them.

    The header section is the run of fields (and their continuation lines) at the start; it
    ends at an empty line or at the first line that is not a field, which is then the first
    line of the body (a message with no header section at all has such a first line).  An
    empty line is added in that case, so that the fields we add never end up in the body.
    A bare LF ends a line here as it will in the mailbox, so that no ``Bcc:`` hides behind
    one.
    """
    end = content.find(b"\r\n\r\n")
    if end >= 0 and _FIELDS.fullmatch(content, 0, end + 2):  # the usual message, at one go
        return content[: end + 2], content[end + 2 :]
    pos, size = 0, len(content)
    while pos < size:  # line by line, and only as far as the header section goes
        end = content.find(b"\n", pos)
        end = size if end < 0 else end + 1
        text = content[pos:end].rstrip(b"\r\n")
        if not text:
            return content[:pos], content[pos:]
        if not (text[:1] in (b" ", b"\t") and pos) and not _FIELD.match(text):
            break
        pos = end
    headers, body = content[:pos], content[pos:]
    if headers and not headers.endswith(b"\n"):
        headers += b"\r\n"
    return headers, (b"\r\n" + body) if body else body


def _header_lines(headers: bytes) -> list[bytes]:
    """Split a header section into fields, each with its continuation lines and line ends."""
    fields: list[bytes] = []
    for line in _LINE.findall(headers):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name_of(field_: bytes) -> bytes:
    name, colon, _ = field_.partition(b":")
    return name.strip().lower() if colon else b""


_DROPPED = frozenset((b"bcc", b"resent-bcc", b"return-path"))  # Postfix's drop_headers, too


ListenerKey = tuple[str, int, str, str, bool]


def listener_key(listener: Listener, port: int) -> ListenerKey:
    return (listener.address, port, listener.hostname or "", listener.tag or "", listener.mask_src)


def bind_listener(address: str, port: int) -> list[socket.socket]:
    """Bind (not yet serve) the sockets of one listener, with a backlog of 1024.

    The privileged parent binds port 25 this way and hands the sockets to the worker.
    """
    try:
        hosts = listen_hosts(address)  # as the configuration check resolved it
    except ValueError as exc:
        raise OSError(f"cannot listen on {address} port {port}: {exc}") from None
    socks: list[socket.socket] = []
    try:
        for host in hosts:
            infos = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST
            )
            family, kind, _, _, addr = infos[0]
            sock = socket.socket(family, kind)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except (OSError, socket.gaierror) as exc:
        for sock in socks:
            sock.close()
        raise OSError(f"cannot listen on {address} port {port}: {exc}") from exc
    return socks


class SmtpServer:
    """The listening sockets, by listener."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.servers: dict[ListenerKey, list[asyncio.AbstractServer]] = {}
        # each key's listener, in a box its sessions are made from: rekey() changes it in place
        self.listeners: dict[ListenerKey, list[Listener]] = {}

    async def serve(self, key: ListenerKey, listener: Listener, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        servers = self.servers.setdefault(key, [])
        box = self.listeners.setdefault(key, [listener])
        box[0] = listener
        for sock in socks:
            # asyncio calls listen() again on a socket it is given: keep our backlog
            servers.append(
                await loop.create_server(
                    lambda: Session(self.ctx, box[0]), sock=sock, backlog=LISTEN_BACKLOG
                )
            )

    def rekey(self, was: ListenerKey, now: ListenerKey, listener: Listener) -> None:
        """The same sockets under a listener's new key; new sessions get its new settings."""
        if was in self.servers:
            self.servers[now] = self.servers.pop(was)
            box = self.listeners.pop(was)
            box[0] = listener
            self.listeners[now] = box

    def close_key(self, key: ListenerKey) -> None:
        # close() closes the listening sockets at once (asyncio and uvloop alike), so the
        # address can be bound again; sessions already open on them carry on.  wait_closed() is
        # not awaited: from Python 3.12 asyncio's waits for every one of those sessions to end.
        self.listeners.pop(key, None)
        for server in self.servers.pop(key, []):
            server.close()

    def close(self) -> None:
        for servers in self.servers.values():
            for server in servers:
                server.close()
