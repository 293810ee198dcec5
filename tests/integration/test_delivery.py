"""Local delivery into a Maildir: the bytes a user finds are the bytes that were sent.

What the daemon adds is fixed (``Return-Path:``, ``Delivered-To:``, its ``Received:`` field);
everything after it must be the message as the client sent it, CRLF turned into LF.
"""

from __future__ import annotations

import re
import socket

import pytest

from .conftest import (
    LOCAL_RCPT,
    USER,
    Daemon,
    accepted_msgid,
    body_of,
    header_values,
    poll,
    send,
    split_trace,
    token,
)

CONFIG = """\
table aliases { postmaster = "@USER@", alice = "@USER@", bob = "@USER@", "josé" = "@USER@" }
listen on 127.0.0.1 port @PORT@
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for local action "local"
smtp max-message-size 35M
"""


@pytest.fixture(scope="module")
def mta(shared_daemons) -> Daemon:
    return shared_daemons("delivery").start(CONFIG)


def message(tok: str, body: bytes, extra_headers: bytes = b"") -> bytes:
    """A complete message (CRLF) with Message-ID and Date, so the daemon adds neither."""
    return (
        b"From: Alice <alice@example.org>\r\n"
        b"To: " + LOCAL_RCPT.encode() + b"\r\n"
        b"Subject: test " + tok.encode() + b"\r\n"
        b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
        b"Message-ID: <" + tok.encode() + b"@example.org>\r\n" + extra_headers + b"\r\n" + body
    )


def assert_stored_exactly(stored: bytes, sent: bytes, sender: str, rcpt: str) -> None:
    return_path, delivered_to, received, rest = split_trace(stored)
    assert return_path == f"Return-Path: <{sender}>".encode()
    assert delivered_to == f"Delivered-To: {rcpt}".encode()
    assert received.startswith(b"Received: ")
    assert rest == sent.replace(b"\r\n", b"\n"), "the message was altered in transit"


def test_plain_message_is_stored_byte_for_byte(mta: Daemon) -> None:
    tok = token()
    sent = message(tok, b"Hello,\r\n\r\nthis is a plain message.\r\n-- \r\nAlice\r\n")
    accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], sent))
    stored = mta.wait_for_message(tok)
    assert_stored_exactly(stored, sent, "alice@example.org", LOCAL_RCPT)


def test_maildir_file_name_and_layout(mta: Daemon) -> None:
    tok = token()
    accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], message(tok, b"x\r\n")))
    mta.wait_for_message(tok)
    for sub in ("tmp", "new", "cur"):
        assert (mta.maildir / sub).is_dir(), f"Maildir/{sub} missing"
    [path] = [p for p in mta.maildir_files() if tok.encode() in p.read_bytes()]
    assert path.parent.name == "new"
    assert re.fullmatch(r"\d+\.E[0-9a-f]{16}\..+", path.name), path.name
    leftovers = list((mta.maildir / "tmp").iterdir())
    assert leftovers == [], f"files left in Maildir/tmp: {leftovers}"


def test_dot_stuffed_lines_arrive_unstuffed(mta: Daemon) -> None:
    tok = token()
    body = (
        b".\r\n"
        b"..\r\n"
        b"...three\r\n"
        b".leading dot\r\n"
        b". space after dot\r\n"
        b"middle . dot\r\n"
        b"\r\n"
        b".\r\n"
        b"last line\r\n"
    )
    sent = message(tok, body)
    with mta.raw() as c:  # stuff by hand: the client's own stuffing is not under test here
        assert c.reply().code == 220
        c.send(b"EHLO client.test\r\n")
        assert c.reply().code == 250
        assert c.command(b"MAIL FROM:<alice@example.org>").code == 250
        assert c.command(f"RCPT TO:<{LOCAL_RCPT}>").code == 250
        assert c.command(b"DATA").code == 354
        stuffed = re.sub(rb"(?m)^\.", b"..", sent)
        c.send(stuffed + b".\r\n")
        reply = c.reply()
        assert reply.code == 250, str(reply)
        assert c.command(b"QUIT").code == 221
    stored = mta.wait_for_message(tok)
    assert_stored_exactly(stored, sent, "alice@example.org", LOCAL_RCPT)


def test_smtplib_dot_stuffing_round_trip(mta: Daemon) -> None:
    tok = token()
    sent = message(tok, b".\r\n..\r\n.x\r\nend\r\n.")  # no final CRLF: smtplib adds one
    accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], sent))
    stored = mta.wait_for_message(tok)
    assert_stored_exactly(stored, sent + b"\r\n", "alice@example.org", LOCAL_RCPT)


def test_8bit_body_is_kept_with_body_8bitmime(mta: Daemon) -> None:
    tok = token()
    body = (
        "Grüße aus Köln — ça va? 日本語\r\n".encode()
        + b"raw high bytes: \x80\x81\xfe\xff\r\n"
        + b"latin-1: caf\xe9\r\n"
    )
    sent = message(
        tok, body, b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], sent, ["BODY=8BITMIME"]))
    stored = mta.wait_for_message(tok)
    assert_stored_exactly(stored, sent, "alice@example.org", LOCAL_RCPT)


def test_lines_of_998_octets_are_accepted_intact(mta: Daemon) -> None:
    tok = token()
    long_line = (b"abcdefghij" * 100)[:998]
    body = long_line + b"\r\n" + b"." + long_line[:997] + b"\r\n" + b"short\r\n"
    sent = message(tok, body)
    accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], sent))
    stored = mta.wait_for_message(tok)
    assert_stored_exactly(stored, sent, "alice@example.org", LOCAL_RCPT)


@pytest.mark.timeout(120)
def test_ten_megabyte_message(mta: Daemon) -> None:
    tok = token()
    line = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/0123456789AB\r\n"
    lines = []
    size = 0
    n = 0
    while size < 10 * 1024 * 1024:
        numbered = b"%08d " % n + line
        lines.append(numbered)
        size += len(numbered)
        n += 1
    sent = message(tok, b"".join(lines))
    accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], sent))
    stored = mta.wait_for_message(tok, timeout=60)
    assert len(stored) > 10_000_000  # CRLF became LF: ~120k lines shorter by one byte
    assert_stored_exactly(stored, sent, "alice@example.org", LOCAL_RCPT)


def test_utf8_recipient_with_smtputf8(mta: Daemon) -> None:
    tok = token()
    sent = message(tok, "Olá José, a message for you.\r\n".encode())
    msgid = accepted_msgid(
        send(mta, "alice@example.org", ["josé@localhost"], sent, ["SMTPUTF8", "BODY=8BITMIME"])
    )
    stored = mta.wait_for_message(tok)
    _, _, received, rest = split_trace(stored)
    assert rest == sent.replace(b"\r\n", b"\n")
    assert "for <josé@localhost>".encode() in received
    assert msgid.encode() in received


def test_utf8_sender_with_smtputf8(mta: Daemon) -> None:
    tok = token()
    sent = message(tok, b"from a UTF-8 sender\r\n")
    accepted_msgid(send(mta, "rené@exämple.org", [LOCAL_RCPT], sent, ["SMTPUTF8"]))
    stored = mta.wait_for_message(tok)
    assert stored.startswith("Return-Path: <rené@exämple.org>\n".encode())


@pytest.mark.parametrize(
    "rcpt",
    [
        "alice@localhost",
        "Alice@LOCALHOST",
        "postmaster@localhost",
        f"{USER}@[127.0.0.1]",
        "postmaster",
    ],
)
def test_local_recipients_are_delivered(mta: Daemon, rcpt: str) -> None:
    tok = token()
    accepted_msgid(send(mta, "carol@example.org", [rcpt], message(tok, b"hi\r\n")))
    stored = mta.wait_for_message(tok)
    assert header_values(stored, "return-path") == [b"<carol@example.org>"]


def test_the_server_name_is_a_local_domain(mta: Daemon) -> None:
    with mta.raw() as c:
        banner = c.reply()
    assert banner.code == 220
    name = banner.text.split()[0]
    tok = token()
    accepted_msgid(send(mta, "carol@example.org", [f"{USER}@{name}"], message(tok, b"hi\r\n")))
    mta.wait_for_message(tok)


def test_null_sender_is_accepted_and_recorded(mta: Daemon) -> None:
    tok = token()
    sent = message(tok, b"a notification\r\n")
    accepted_msgid(send(mta, "", [LOCAL_RCPT], sent))
    stored = mta.wait_for_message(tok)
    assert_stored_exactly(stored, sent, "", LOCAL_RCPT)


def test_two_aliases_of_the_user_in_one_transaction(mta: Daemon) -> None:
    """alice and bob both alias the user: the mail arrives, intact, at most once per address."""
    tok = token()
    accepted_msgid(
        send(
            mta,
            "carol@example.org",
            ["alice@localhost", "bob@localhost"],
            message(tok, b"to two aliases\r\n"),
        )
    )
    copies = poll(lambda: [m for m in mta.maildir_messages() if tok.encode() in m], 20)
    assert copies, mta.log()
    assert len(copies) <= 2
    for m in copies:
        assert body_of(m) == b"to two aliases\n"


def test_log_records_the_delivery(mta: Daemon) -> None:
    tok = token()
    mark = mta.log_mark()
    msgid = accepted_msgid(send(mta, "alice@example.org", [LOCAL_RCPT], message(tok, b"x\r\n")))
    mta.wait_for_message(tok)
    mta.wait_for_log(rf"smtp message msgid={msgid}\b", since=mark)
    mta.wait_for_log(rf"mda delivery evpid={msgid}[0-9a-f]{{8}}\b.*result=Ok", since=mark)


def test_hostname_of_the_banner_matches_the_machine(mta: Daemon) -> None:
    with mta.raw() as c:
        banner = c.reply()
    assert banner.code == 220
    assert banner.text.endswith("ESMTP homemail"), banner.text
    name = banner.text.split()[0]
    assert name in {socket.getfqdn(), socket.gethostname()} or name.startswith(
        socket.gethostname()
    ), name


def test_maildir_path_with_format_specifiers(daemon: Daemon) -> None:
    daemon.start(
        'table aliases { alice = "@USER@" }\n'
        "listen on 127.0.0.1 port @PORT@\n"
        'action "local" maildir "@DIR@/boxes/%{user.username}/%{rcpt.user:lowercase}" '
        "alias <aliases>\n"
        'match from local for local action "local"\n'
    )
    tok = token()
    accepted_msgid(send(daemon, "x@example.org", ["Alice@localhost"], message(tok, b"fmt\r\n")))
    box = daemon.dir / "boxes" / USER / "alice"
    [path] = daemon.wait_for_files(box / "new", 1)
    assert tok.encode() in path.read_bytes()
    assert not daemon.maildir.exists()
