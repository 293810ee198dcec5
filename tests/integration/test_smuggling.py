"""SMTP smuggling (REFERENCE §8): only CR LF . CR LF ends DATA.

Each case sends, in one write after the 354, a message whose body contains a fake end of data
followed by a complete second transaction, then the real end and QUIT. The daemon must answer
that write with exactly one DATA reply and the QUIT reply: either 250 (then the one delivered
message contains the smuggled text) or a 5xx (then nothing is delivered). A second message,
from the smuggled MAIL FROM, must never exist.
"""

from __future__ import annotations

import pytest

from .conftest import LOCAL_RCPT, Daemon, accepted_msgid, send, token


@pytest.fixture(scope="module")
def mta(shared_daemons) -> Daemon:
    return shared_daemons("smuggling").start()


FAKE_ENDS = {
    "lf.lf": b"\n.\n",
    "lf.crlf": b"\n.\r\n",
    "crlf.lf": b"\r\n.\n",
    "cr.cr": b"\r.\r",
    "crlf.nul.crlf": b"\r\n.\x00\r\n",
    "cr.crlf": b"\r.\r\n",
    "crlf.cr": b"\r\n.\r",
    "lf.cr": b"\n.\r",
    "cr.lf": b"\r.\n",
    "crlf.space.crlf": b"\r\n. \r\n",
}


def smuggled_transaction(tok: str) -> bytes:
    return (
        b"MAIL FROM:<smuggler-" + tok.encode() + b"@evil.example>\r\n"
        b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\n"
        b"DATA\r\n"
        b"From: admin@bank.example\r\n"
        b"Subject: SMUGGLED " + tok.encode() + b"\r\n"
        b"\r\n"
        b"smuggled body " + tok.encode() + b"\r\n"
    )


@pytest.mark.parametrize("fake_end", list(FAKE_ENDS.values()), ids=list(FAKE_ENDS))
def test_fake_end_of_data_is_not_an_end(mta: Daemon, fake_end: bytes) -> None:
    tok = token()
    mark = mta.log_mark()
    with mta.raw() as c:
        assert c.reply().code == 220
        c.send(
            b"EHLO client.test\r\nMAIL FROM:<honest-" + tok.encode() + b"@example.org>\r\n"
            b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\nDATA\r\n"
        )
        assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
        c.send(
            b"From: honest@example.org\r\n"
            b"Subject: carrier " + tok.encode() + b"\r\n"
            b"\r\n"
            b"first part" + fake_end + smuggled_transaction(tok) + b"\r\n.\r\nQUIT\r\n"
        )
        replies = c.replies_until_close()
    codes = [r.code for r in replies]
    assert len(replies) == 2 and codes[1] == 221, (
        f"expected one DATA reply and 221, got {[str(r) for r in replies]}"
    )
    data_reply = replies[0]
    assert data_reply.code == 250 or 500 <= data_reply.code < 600, str(data_reply)
    assert data_reply.has_enhanced_code, str(data_reply)

    if data_reply.code == 250:
        stored = mta.wait_for_message(f"carrier {tok}")
        assert f"smuggled body {tok}".encode() in stored
        assert f"MAIL FROM:<smuggler-{tok}@evil.example>".encode() in stored
        assert stored.startswith(f"Return-Path: <honest-{tok}@example.org>\n".encode())
    else:
        marker = token()
        accepted_msgid(
            send(
                mta,
                "marker@example.org",
                [LOCAL_RCPT],
                f"Subject: marker {marker}\r\n\r\nm\r\n".encode(),
            )
        )
        mta.wait_for_message(marker)
        assert not [m for m in mta.maildir_messages() if tok.encode() in m]

    # never a second message: no delivered copy starts as the smuggled one, and the smuggled
    # MAIL FROM never became an envelope
    assert not [m for m in mta.maildir_messages() if f"Return-Path: <smuggler-{tok}".encode() in m]
    assert f"from=<smuggler-{tok}" not in mta.log()[mark:], "the smuggled MAIL FROM was run"


def test_bare_lf_line_endings_in_a_whole_message(mta: Daemon) -> None:
    """A client that sends bare LF everywhere, then the real end: one message or a 5xx."""
    tok = token()
    with mta.raw() as c:
        assert c.reply().code == 220
        c.send(
            b"EHLO client.test\r\nMAIL FROM:<lf@example.org>\r\n"
            b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\nDATA\r\n"
        )
        assert [r.code for r in c.replies(4)] == [250, 250, 250, 354]
        c.send(
            f"Subject: lf {tok}\nX: y\n\nline one\n.\nline three\n".encode() + b"\r\n.\r\nQUIT\r\n"
        )
        replies = c.replies_until_close()
    assert len(replies) == 2 and replies[1].code == 221, [str(r) for r in replies]
    if replies[0].code == 250:
        stored = mta.wait_for_message(f"lf {tok}")
        assert b"line three" in stored


def test_smuggling_with_pipelined_commands_before_data(mta: Daemon) -> None:
    """Everything in a single write: commands, body with a fake end, real end, QUIT."""
    tok = token()
    with mta.raw() as c:
        assert c.reply().code == 220
        c.send(
            b"EHLO client.test\r\nMAIL FROM:<honest-" + tok.encode() + b"@example.org>\r\n"
            b"RCPT TO:<" + LOCAL_RCPT.encode() + b">\r\nDATA\r\n"
            b"Subject: carrier "
            + tok.encode()
            + b"\r\n\r\nfirst\n.\n"
            + smuggled_transaction(tok)
            + b"\r\n.\r\nQUIT\r\n"
        )
        replies = c.replies_until_close()
    codes = [r.code for r in replies]
    # EHLO, MAIL, RCPT, 354, one DATA reply, QUIT: nothing for the smuggled commands
    assert len(codes) == 6 and codes[:4] == [250, 250, 250, 354] and codes[5] == 221, [
        str(r) for r in replies
    ]
    if codes[4] == 250:
        stored = mta.wait_for_message(f"carrier {tok}")
        assert f"smuggled body {tok}".encode() in stored
    assert not [m for m in mta.maildir_messages() if f"Return-Path: <smuggler-{tok}".encode() in m]
