"""The header fields the daemon adds, keeps and removes on the way to the mailbox."""

from __future__ import annotations

import email.utils
import re

import pytest

from .conftest import (
    LOCAL_RCPT,
    Daemon,
    accepted_msgid,
    body_of,
    header_fields,
    header_values,
    poll,
    send,
    split_trace,
    token,
)


@pytest.fixture(scope="module")
def mta(shared_daemons) -> Daemon:
    return shared_daemons("headers").start()


def test_trace_fields_come_first(mta: Daemon) -> None:
    tok = token()
    sent = (
        f"From: a@example.org\r\nSubject: {tok}\r\nMessage-ID: <{tok}@example.org>\r\n"
        f"Date: Tue, 03 Mar 2026 08:00:00 +0100\r\n\r\nbody\r\n"
    ).encode()
    msgid = accepted_msgid(send(mta, "sender@example.org", [LOCAL_RCPT], sent))
    stored = mta.wait_for_message(tok)
    names = [name for name, _ in header_fields(stored)]
    assert names[:3] == ["return-path", "delivered-to", "received"], names
    assert header_values(stored, "return-path") == [b"<sender@example.org>"]
    assert header_values(stored, "delivered-to") == [LOCAL_RCPT.encode()]
    [received] = header_values(stored, "received")
    text = b" ".join(received.split()).decode()
    assert text.startswith("from client.test ("), text
    assert "[127.0.0.1]" in text
    assert "(homemail)" in text
    assert re.search(r"\bwith E?SMTP\b", text), text
    assert f"id {msgid}" in text
    assert f"for <{LOCAL_RCPT}>;" in text
    date = text.rsplit(";", 1)[1].strip()
    assert email.utils.parsedate_to_datetime(date) is not None, date


def test_received_has_no_for_clause_with_two_recipients(mta: Daemon) -> None:
    tok = token()
    date = email.utils.formatdate()
    sent = f"Subject: {tok}\r\nMessage-ID: <{tok}@x>\r\nDate: {date}\r\n\r\nb\r\n"
    accepted_msgid(send(mta, "sender@example.org", [LOCAL_RCPT, "alice@localhost"], sent.encode()))
    copies = poll(lambda: [m for m in mta.maildir_messages() if tok.encode() in m], 20)
    assert copies, mta.log()
    for stored in copies:
        _, _, received, _ = split_trace(stored)
        assert b" for <" not in b" ".join(received.split()), received


def test_message_id_and_date_are_added_when_missing(mta: Daemon) -> None:
    tok = token()
    sent = f"From: a@example.org\r\nSubject: {tok}\r\n\r\nno id, no date\r\n".encode()
    send(mta, "a@example.org", [LOCAL_RCPT], sent)
    stored = mta.wait_for_message(tok)
    ids = header_values(stored, "message-id")
    dates = header_values(stored, "date")
    assert len(ids) == 1, ids
    assert re.fullmatch(rb"<[^<>@\s]+@[^<>@\s]+>", ids[0]), ids
    assert len(dates) == 1, dates
    assert email.utils.parsedate_to_datetime(dates[0].decode()) is not None
    assert body_of(stored) == b"no id, no date\n"


def test_message_id_and_date_are_kept_when_present(mta: Daemon) -> None:
    tok = token()
    date = "Wed, 04 Mar 2026 12:34:56 -0500"
    sent = (
        f"Date: {date}\r\nMessage-ID: <{tok}@sender.example>\r\nSubject: {tok}\r\n\r\nbody\r\n"
    ).encode()
    send(mta, "a@example.org", [LOCAL_RCPT], sent)
    stored = mta.wait_for_message(tok)
    assert header_values(stored, "message-id") == [f"<{tok}@sender.example>".encode()]
    assert header_values(stored, "date") == [date.encode()]


def test_bcc_is_removed_and_everything_else_kept(mta: Daemon) -> None:
    tok = token()
    sent = (
        f"From: a@example.org\r\n"
        f"To: {LOCAL_RCPT}\r\n"
        f"Bcc: hidden@example.org,\r\n"
        f"\tsecret-{tok}@example.org\r\n"
        f"Subject: {tok}\r\n"
        f"BCC: shouting-{tok}@example.org\r\n"
        f"Message-ID: <{tok}@x>\r\n"
        f"Date: Thu, 05 Mar 2026 09:00:00 +0000\r\n"
        f"\r\n"
        f"Bcc: this line is in the body and stays\r\n"
    ).encode()
    send(mta, "a@example.org", [LOCAL_RCPT, "alice@localhost"], sent)
    copies = poll(
        lambda: [m for m in mta.maildir_messages() if f"Subject: {tok}".encode() in m], 20
    )
    assert copies, mta.log()
    for stored in copies:
        names = [n for n, _ in header_fields(stored)]
        assert "bcc" not in names, stored
        assert f"secret-{tok}".encode() not in stored
        assert f"shouting-{tok}".encode() not in stored
        assert header_values(stored, "to") == [LOCAL_RCPT.encode()]
        assert body_of(stored) == b"Bcc: this line is in the body and stays\n"
        _, _, _, rest = split_trace(stored)
        expected = (
            f"From: a@example.org\nTo: {LOCAL_RCPT}\nSubject: {tok}\nMessage-ID: <{tok}@x>\n"
            "Date: Thu, 05 Mar 2026 09:00:00 +0000\n"
            "\n"
            "Bcc: this line is in the body and stays\n"
        )
        assert rest == expected.encode()


def test_message_without_header_section(mta: Daemon) -> None:
    """A message that is only a body still arrives, with the trace fields above it."""
    tok = token()
    sent = f"\r\njust a body {tok}\r\n".encode()
    send(mta, "a@example.org", [LOCAL_RCPT], sent)
    stored = mta.wait_for_message(tok)
    assert stored.startswith(b"Return-Path: <a@example.org>\n")
    assert stored.endswith(f"\n\njust a body {tok}\n".encode())


def test_fields_are_added_above_a_body_that_has_no_header_section(mta: Daemon) -> None:
    """No empty line and no field at the start: all of it is body, and the fields we add go
    above it with the empty line between, not into it."""
    tok = token()
    sent = f"hello {tok}, no headers here\r\nsecond line: with a colon\r\n".encode()
    send(mta, "a@example.org", [LOCAL_RCPT], sent)
    stored = mta.wait_for_message(tok)
    names = [n for n, _ in header_fields(stored)]
    assert "message-id" in names and "date" in names, stored
    assert body_of(stored) == f"hello {tok}, no headers here\nsecond line: with a colon\n".encode()


def test_a_return_path_and_a_resent_bcc_from_the_client_are_dropped(mta: Daemon) -> None:
    tok = token()
    sent = (
        f"Return-Path: <forged-{tok}@example.org>\r\nSubject: {tok}\r\n"
        f"Resent-Bcc: hidden-{tok}@example.org\r\n\r\nbody\r\n"
    ).encode()
    send(mta, "a@example.org", [LOCAL_RCPT], sent)
    stored = mta.wait_for_message(tok)
    assert header_values(stored, "return-path") == [b"<a@example.org>"], stored
    assert f"forged-{tok}".encode() not in stored and f"hidden-{tok}".encode() not in stored


def test_a_bcc_between_bare_line_feeds_is_removed(mta: Daemon) -> None:
    tok = token()
    sent = f"Subject: {tok}\nBcc: secret-{tok}@example.org\n\nbody line\r\n".encode()
    send(mta, "a@example.org", [LOCAL_RCPT], sent)
    stored = mta.wait_for_message(tok)
    assert f"secret-{tok}".encode() not in stored, stored
    assert header_values(stored, "subject") == [tok.encode()]
    assert "message-id" in [n for n, _ in header_fields(stored)]
    assert body_of(stored) == b"body line\n"


@pytest.mark.parametrize(
    "helo", [b"evil\rX-Injected: yes", b"evil\x0bX-Injected:\x00yes", b"evil\x1b[31m(red)"]
)
def test_helo_name_cannot_inject_header_fields(mta: Daemon, helo: bytes) -> None:
    tok = token()
    with mta.raw() as c:
        assert c.reply().code == 220
        reply = c.command(b"EHLO " + helo)
        if reply.code != 250:  # refusing such a name is fine too; then say HELO properly
            assert reply.code in (500, 501), str(reply)
            assert c.command(b"EHLO client.test").code == 250
        assert c.command(b"MAIL FROM:<a@example.org>").code == 250
        assert c.command(f"RCPT TO:<{LOCAL_RCPT}>").code == 250
        assert c.command(b"DATA").code == 354
        assert c.command(f"Subject: {tok}\r\n\r\nx\r\n.".encode()).code == 250
    stored = mta.wait_for_message(tok)
    head = stored.split(b"\n\n", 1)[0]
    assert "x-injected" not in [n for n, _ in header_fields(stored)]
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", head), head
