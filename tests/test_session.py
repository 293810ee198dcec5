"""Session on a real socket: the idle timeout, and the command tables every session gets; the
envelopes a transaction makes."""

from __future__ import annotations

import asyncio
import gc
import os
import pwd
import socket
import struct
import time
import types
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from test_enqueue import daemon as fake_daemon

from homemail import log
from homemail.address import parse_mailbox
from homemail.aliases import UserDb
from homemail.config import Listener, Location, parse_string
from homemail.queue import QueueError
from homemail.ruleset import LOCAL_SOURCE, Ruleset
from homemail.smtp import Recipient, ServerContext, Session, Transaction, make_envelopes
from homemail.smtpd import Daemon

TIMEOUT = 0.5


async def _server(
    sessions: list[Session] | None = None,
    timeout: float = TIMEOUT,
    failure: QueueError | None = None,
    commit: Callable[..., Awaitable[None]] | None = None,
) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    """A server of real sessions whose queue is a list (``received``), or ``commit`` (the
    context's ``enqueue``) when given."""
    received: list[bytes] = []

    async def enqueue(message: bytes, envelopes: object, landed: Callable[[], None]) -> None:
        if failure is not None:
            raise failure
        received.append(message)

    cfg = parse_string(
        f'table aliases {{ postmaster = "{pwd.getpwuid(os.getuid()).pw_name}" }}\n'
        'action "l" maildir alias <aliases>\n'
        'match from any for local action "l"\n'
    )
    ctx = ServerContext(
        hostname="mx.test",
        ruleset=Ruleset(cfg, UserDb(user_mode=True), "mx.test"),
        max_message_size=1 << 20,
        max_mails=100,
        max_rcpt=100,
        queue_ttl=3600,
        enqueue=commit or enqueue,
    )
    listener = Listener("127.0.0.1", 0, None, None, False, Location("<test>", 1, 1))

    def session() -> Session:
        made = Session(ctx, listener, timeout=timeout)
        if sessions is not None:
            sessions.append(made)
        return made

    server = await asyncio.get_running_loop().create_server(session, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], received


async def _reply(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 5)


async def test_commands_keep_the_session_open_past_the_timeout_and_silence_closes_it() -> None:
    server, port, _ = await _server()
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        start = time.monotonic()
        while time.monotonic() - start < TIMEOUT * 3:  # well past one timeout, never idle for it
            writer.write(b"NOOP\r\n")
            assert (await _reply(reader)).startswith(b"250 ")
            last = time.monotonic()  # the server read that NOOP before answering it
            await asyncio.sleep(TIMEOUT / 5)
        said = await asyncio.wait_for(reader.read(), 5)  # then closed by the server
        assert said.startswith(b"421 4.4.2 ") and said.endswith(b"\r\n"), said
        waited = time.monotonic() - last
        assert TIMEOUT * 0.8 <= waited < TIMEOUT * 4
        writer.close()


async def test_a_shorter_timeout_set_later_takes_effect() -> None:
    # aiosmtpd sets a shorter timeout right after the session's own (its PROXY header wait)
    sessions: list[Session] = []
    server, port, _ = await _server(sessions, timeout=60.0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")  # its timer is armed for 60 s
        start = time.monotonic()
        sessions[0]._reset_timeout(TIMEOUT)
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"421 4.4.2 ")
        assert time.monotonic() - start < TIMEOUT * 4
        writer.close()


async def test_a_message_sent_slowly_is_not_cut_off() -> None:
    server, port, received = await _server()
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await _reply(reader)).startswith(b"220 ")
        for command in (b"HELO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<postmaster>"):
            writer.write(command + b"\r\n")
            assert (await _reply(reader)).startswith(b"250 ")
        writer.write(b"DATA\r\n")
        assert (await _reply(reader)).startswith(b"354 ")
        writer.write(b"Subject: slow\r\n\r\n")
        body = b""
        start = time.monotonic()
        while time.monotonic() - start < TIMEOUT * 3:  # the body takes three timeouts to arrive
            line = b"line %d\r\n" % len(body)
            writer.write(line)
            body += line
            await asyncio.sleep(TIMEOUT / 5)
        writer.write(b".\r\n")
        assert (await _reply(reader)).startswith(b"250 ")
        assert len(received) == 1 and received[0].endswith(b"\r\n\r\n" + body)
        writer.write(b"QUIT\r\n")
        assert (await _reply(reader)).startswith(b"221 ")
        writer.close()


async def _dialogue(port: int, commands: list[bytes]) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await _reply(reader)]
    for command in commands:
        writer.write(command + b"\r\n")
        reply = b""
        while True:
            line = await _reply(reader)
            reply += line
            if line[3:4] != b"-":
                break
        replies.append(reply)
    writer.close()
    return replies


@pytest.mark.parametrize(
    ("failure", "reply"),
    [
        (QueueError("cannot write the queue: No space left on device", full=True), b"452 4.3.1 "),
        (QueueError("cannot write the queue: Input/output error"), b"451 4.3.0 "),
    ],
)
async def test_a_message_the_queue_cannot_store_gets_a_temporary_failure(
    failure: QueueError, reply: bytes
) -> None:
    server, port, received = await _server(failure=failure)
    async with server:
        replies = await _dialogue(
            port,
            [b"HELO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<postmaster>", b"DATA",
             b"Subject: x\r\n\r\nbody\r\n.", b"QUIT"],
        )
    assert replies[5].startswith(reply), replies[5]
    assert replies[6].startswith(b"221 ")
    assert received == []


async def test_later_sessions_know_the_same_commands_as_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Session, "_tables", None)  # the next session reflects and records
    tables: list[tuple[dict[str, Any], dict[str, Any]]] = []

    class Made(list[Session]):  # each session's tables as made (an ended session drops them)
        def append(self, session: Session) -> None:
            super().append(session)
            tables.append((session._smtp_methods, session._auth_methods))

    sessions = Made()
    server, port, _ = await _server(sessions)
    commands = [b"HELP", b"HELP MAIL", b"EHLO client.test", b"AUTH PLAIN", b"NOSUCH"]
    commands += [b"VRFY a", b"EXPN a", b"RSET", b"NOOP", b"STARTTLS", b"DATA", b"QUIT"]
    async with server:
        first = await _dialogue(port, commands)
        later = [await _dialogue(port, commands) for _ in range(3)]
    assert first[1].startswith(b"250 ") and b"EHLO" in first[1] and b"MAIL" in first[1]
    assert first[2].startswith(b"250 ") and b"MAIL FROM" in first[2]
    assert first[4].startswith(b"502 5.5.1 ")  # AUTH is not offered
    assert b"AUTH" not in first[0]
    assert first[5].startswith(b"500 ")
    assert all(replies == first for replies in later)
    names = [(sorted(smtp), sorted(auth)) for smtp, auth in tables]
    assert names[0][0] == [n[5:] for n in dir(sessions[0]) if n.startswith("smtp_")]
    assert all(n == names[0] for n in names)
    for session, (smtp, auth) in zip(sessions, tables, strict=True):  # bound to their own session
        assert all(method.__self__ is session for method in smtp.values())
        assert all(m.method.__self__ is session for m in auth.values() if m.is_builtin)


def test_an_actions_ttl_is_its_envelopes_expiry() -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    cfg = parse_string(
        f'table aliases {{ brief = "{user}" }}\n'
        f'table briefrcpts {{ "brief@localhost" }}\n'
        'action "brief" maildir alias <aliases> ttl 30s\n'
        'action "l" maildir alias <aliases>\n'
        'match for rcpt-to <briefrcpts> action "brief"\n'
        'match for local action "l"\n'
    )
    ruleset = Ruleset(cfg, UserDb(user_mode=True), "mx.test")
    txn = Transaction(sender="a@example.org")
    for rcpt in ("brief@localhost", f"{user}@localhost"):
        address = parse_mailbox(rcpt)
        txn.recipients.append(Recipient(rcpt, ruleset.route(LOCAL_SOURCE, address)))
    envelopes = make_envelopes(txn, 7, now=1000.0, ttl=3600, uid=-1, src="local", helo="")
    assert {(e.action, e.expire) for e in envelopes} == {("brief", 1030.0), ("l", 4600.0)}


@pytest.mark.parametrize(
    ("home", "receives"),
    [("/nonexistent", False), ("/nonexistent/", False), ("/dev/null", False), ("", False),
     ("relative", False), ("/", True), ("/home/someone-without-a-home-yet", True)],
)
def test_only_a_home_that_says_none_keeps_an_account_from_mail(home: str, receives: bool) -> None:
    from homemail.aliases import _has_home

    assert _has_home(home) is receives


async def _up_to_the_final_dot(port: int, subject: str) -> asyncio.StreamWriter:
    """A client that sends one message, up to and with its final dot, and reads no further."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    for command in (b"HELO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:<postmaster>"):
        writer.write(command + b"\r\n")
        assert (await _reply(reader)).startswith(b"250 ")
    writer.write(b"DATA\r\n")
    assert (await _reply(reader)).startswith(b"354 ")
    writer.write(f"Subject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
    await writer.drain()
    return writer


async def test_a_message_is_logged_before_its_session_ends_when_the_client_resets_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The accepted message is logged once its 250 is written; a client that resets the
    connection right behind the final dot can end the session first, and the message's lines
    still come before its ``disconnected``, as a reader of the log groups them."""
    seen: list[tuple[str, str]] = []
    real = log.event

    def spy(ident: str, subsystem: str, name: str, /, **fields: object) -> None:
        if subsystem == "smtp" and name in ("message", "envelope", "disconnected"):
            seen.append((ident, name))
        real(ident, subsystem, name, **fields)

    monkeypatch.setattr(log, "event", spy)
    server, port, received = await _server()
    async with server:
        for attempt in range(10):
            writer = await _up_to_the_final_dot(port, str(attempt))
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # a reset right behind the final dot
            deadline = time.monotonic() + 5
            while sum(name == "disconnected" for _, name in seen) <= attempt:
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
    assert received  # (some were accepted before their reset was seen)
    for ident in {i for i, _ in seen}:
        names = [name for i, name in seen if i == ident]
        assert names[-1] == "disconnected", names
        assert names.count("message") == (1 if "envelope" in names else 0), names


async def test_a_message_committed_after_its_client_vanished_is_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client goes away while its message's commit is in flight: the session ends (no 250
    is written), the commit lands later, and the message and its envelope are logged then, under
    the session's id, as for any message that is queued and will be delivered."""
    seen: list[tuple[str, str, dict[str, object]]] = []
    real = log.event

    def spy(ident: str, subsystem: str, name: str, /, **fields: object) -> None:
        if subsystem == "smtp":
            seen.append((ident, name, fields))
        real(ident, subsystem, name, **fields)

    monkeypatch.setattr(log, "event", spy)
    daemon = fake_daemon([])  # Daemon.enqueue itself, over a queue whose commit waits
    server, port, _ = await _server(commit=types.MethodType(Daemon.enqueue, daemon))
    async with server:
        writer = await _up_to_the_final_dot(port, "gone")
        deadline = time.monotonic() + 5
        while not daemon.queue.alone:  # the commit has started
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        writer.close()
        while not any(name == "disconnected" for _, name, _ in seen):
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.01)
        assert [name for _, name, _ in seen if name in ("message", "envelope")] == []
        daemon.queue.release.set()  # the commit lands, its session gone
        while not daemon.scheduler.scheduled:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    sid = seen[0][0]
    lines = [(ident, name) for ident, name, _ in seen]
    assert lines[-2:] == [(sid, "message"), (sid, "envelope")], lines
    message = next(fields for _, name, fields in seen if name == "message")
    assert message["nrcpt"] == 1
    envelope = next(fields for _, name, fields in seen if name == "envelope")
    assert envelope["to"] == "<postmaster>"


async def test_an_ended_session_is_freed_at_once_not_left_to_the_cycle_collector() -> None:
    """Once its connection is gone and its command loop has ended, nothing of a session points
    back at it: it is freed by reference counting alone.  (Left to the cyclic collector, ended
    sessions piled up under load, and the memory they took stayed with the daemon after it.)"""
    made: list[weakref.ref[Session]] = []

    class Made(list[Session]):
        def append(self, session: Session) -> None:
            made.append(weakref.ref(session))

    server, port, _ = await _server(Made())
    gc.collect()
    gc.disable()
    try:
        async with server:
            # a whole message then QUIT; a client that goes away mid-transaction; one that is
            # timed out after a command
            await _dialogue(
                port,
                [b"EHLO c.test", b"MAIL FROM:<a@c.test>", b"RCPT TO:<postmaster>", b"DATA",
                 b"Subject: x\r\n\r\nbody\r\n.", b"QUIT"],
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _reply(reader)
            writer.write(b"HELO c.test\r\nMAIL FROM:<a@c.test>\r\n")
            await _reply(reader)
            await _reply(reader)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await _reply(reader)
            writer.write(b"NOOP\r\n")
            await _reply(reader)
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"421 ")  # timed out
            writer.close()
            deadline = time.monotonic() + 5
            while any(ref() is not None for ref in made):
                assert time.monotonic() < deadline, "an ended session is still alive"
                await asyncio.sleep(0.01)
    finally:
        gc.enable()
    assert len(made) == 3
