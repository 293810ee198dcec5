"""PIPELINING (RFC 2920) over a raw socket: commands sent in one write, replies read in order."""

from __future__ import annotations

import pytest

from .conftest import LOCAL_RCPT, Daemon, header_values, split_trace, token


@pytest.fixture(scope="module")
def mta(shared_daemons) -> Daemon:
    return shared_daemons("pipelining").start()


def test_pipelined_transaction(mta: Daemon) -> None:
    tok = token()
    with mta.raw() as c:
        assert c.reply().code == 220
        c.send(
            b"EHLO client.test\r\n"
            b"MAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\n"
            b"RCPT TO:<alice@localhost>\r\n"
            b"DATA\r\n"
        )
        ehlo, mail, rcpt1, rcpt2, data = c.replies(5)
        assert ehlo.code == 250 and "PIPELINING" in ehlo.lines, str(ehlo)
        assert (mail.code, rcpt1.code, rcpt2.code, data.code) == (250, 250, 250, 354), [
            str(r) for r in (mail, rcpt1, rcpt2, data)
        ]
        assert mail.text.startswith("2.1.0") and rcpt1.text.startswith("2.1.5")
        c.send(
            f"Subject: {tok}\r\nMessage-ID: <{tok}@x>\r\n\r\npipelined body\r\n.\r\n"
            "QUIT\r\n".encode()
        )
        done, bye = c.replies(2)
        assert done.code == 250 and done.text.startswith("2.0.0 "), str(done)
        assert done.text.endswith("Message accepted for delivery")
        assert bye.code == 221 and bye.has_enhanced_code, str(bye)
        assert c.replies_until_close() == []
    stored = mta.wait_for_message(tok)
    assert stored.endswith(b"\n\npipelined body\n")


def test_pipelined_refusals_keep_their_place(mta: Daemon) -> None:
    """Refused recipients in the middle of a pipeline get their own replies, in order."""
    tok = token()
    with mta.raw() as c:
        assert c.reply().code == 220
        c.send(
            b"EHLO client.test\r\n"
            b"MAIL FROM:<alice@example.org>\r\n"
            b"RCPT TO:<nobody-here@localhost>\r\n"
            b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\n"
            b"RCPT TO:<someone@example.com>\r\n"
            b"RCPT TO:<bad address@localhost>\r\n"
            b"NOOP\r\n"
            b"DATA\r\n"
        )
        replies = c.replies(8)
        codes = [r.code for r in replies]
        assert codes == [250, 250, 550, 250, 550, 553, 250, 354], [str(r) for r in replies]
        assert replies[2].text.startswith("5.1.1")
        assert replies[4].text.startswith("5.7.1")
        assert replies[5].text.startswith("5.1.3")
        c.send(f"Subject: {tok}\r\n\r\nonly one good recipient\r\n.\r\nQUIT\r\n".encode())
        done, bye = c.replies(2)
        assert done.code == 250, str(done)
        assert bye.code == 221
    stored = mta.wait_for_message(tok)
    _, _, received, _ = split_trace(stored)
    assert f"for <{LOCAL_RCPT}>".encode() in received  # exactly one accepted recipient


def test_two_transactions_pipelined_after_rset(mta: Daemon) -> None:
    toks = [token(), token()]
    with mta.raw() as c:
        assert c.reply().code == 220
        c.send(
            b"EHLO client.test\r\nRSET\r\nMAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\nDATA\r\n"
        )
        assert [r.code for r in c.replies(5)] == [250, 250, 250, 250, 354]
        c.send(
            f"Subject: {toks[0]}\r\n\r\none\r\n.\r\n".encode()
            + b"MAIL FROM:<b@example.org>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
        )
        assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
        c.send(f"Subject: {toks[1]}\r\n\r\ntwo\r\n.\r\nQUIT\r\n".encode())
        assert [r.code for r in c.replies(2)] == [250, 221]
    first = mta.wait_for_message(toks[0])
    second = mta.wait_for_message(toks[1])
    assert header_values(first, "return-path") == [b"<a@example.org>"]
    assert header_values(second, "return-path") == [b"<b@example.org>"]


def test_commands_split_across_writes(mta: Daemon) -> None:
    """A command arriving byte by byte is the same command."""
    tok = token()
    with mta.raw() as c:
        assert c.reply().code == 220
        wire = (
            b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<"
            + LOCAL_RCPT.encode()
            + b">\r\nDATA\r\n"
        )
        for i in range(len(wire)):
            c.send(wire[i : i + 1])
        assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
        body = f"Subject: {tok}\r\n\r\nslow\r\n.\r\n".encode()
        for i in range(0, len(body), 3):
            c.send(body[i : i + 3])
        assert c.reply().code == 250
    mta.wait_for_message(tok)
