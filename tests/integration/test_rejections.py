"""Every refusal a client can meet, with its reply code and enhanced status code.

A refused message must not be delivered: where the refusal comes after DATA, the test then sends
a marker message and, once the marker is in the mailbox, checks that the refused one is not.
"""

from __future__ import annotations

import os
import pwd
import re
import smtplib

import pytest

from .conftest import (
    DEFAULT_CONFIG,
    ENHANCED,
    LOCAL_RCPT,
    USER,
    Daemon,
    accepted_msgid,
    send,
    token,
)

CONFIG = """\
table aliases { postmaster = "@USER@", alice = "@USER@", ghost = "no-such-user-qq",
    typo = "@USER@, no-such-user-qq", friend = "@USER@, friend@example.com",
    archive = "@USER@, /tmp/archive.mbox", pipe = "@USER@, |/bin/cat" }
listen on 127.0.0.1 port @PORT@
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for local action "local"
smtp max-message-size 1M
smtp limit max-mails 3 max-rcpt 5
"""


@pytest.fixture(scope="module")
def mta(shared_daemons) -> Daemon:
    return shared_daemons("rejections").start(CONFIG)


@pytest.fixture
def session(mta: Daemon):
    with mta.smtp() as s:
        code, _ = s.ehlo()
        assert code == 250
        yield s


def expect(reply: tuple[int, bytes], code: int, enhanced: str) -> None:
    got, text = reply
    assert got == code, f"expected {code} {enhanced}, got {got} {text!r}"
    assert text.decode("utf-8", "replace").startswith(enhanced + " "), (
        f"expected {code} {enhanced}, got {got} {text!r}"
    )


def mail_ok(s: smtplib.SMTP, sender: str = "alice@example.org") -> None:
    expect(s.docmd("MAIL", f"FROM:<{sender}>"), 250, "2.1.0")


def assert_not_delivered(mta: Daemon, tok: str) -> None:
    """Send a marker message; once it has arrived, the refused message must be absent."""
    marker = token()
    accepted_msgid(
        send(
            mta,
            "marker@example.org",
            [LOCAL_RCPT],
            f"Subject: marker {marker}\r\n\r\nmarker\r\n".encode(),
        )
    )
    mta.wait_for_message(marker)
    leaked = [m[:300] for m in mta.maildir_messages() if tok.encode() in m]
    assert not leaked, f"a refused message was delivered: {leaked}"


def limit_of(s: smtplib.SMTP) -> int:
    size = s.esmtp_features.get("size", "")
    assert size.isdigit(), f"EHLO advertises SIZE {size!r}"
    return int(size)


# -- MAIL FROM -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender",
    [
        ";sleep 66;",  # CVE-2020-7247: no domain, shell metacharacters
        "root;sleep 66;",
        "a b@c.example",  # space in the local part
        "nodomain",  # no domain at all
        "user@",  # empty domain
        "@example.org",  # empty local part
        "user@@example.org",
        "user@exa mple.org",
        "us\x00er@example.org",
        "user@-bad-.example",
        "..@example.org",
    ],
)
def test_malformed_sender_gets_553(session: smtplib.SMTP, sender: str) -> None:
    expect(session.docmd("MAIL", f"FROM:<{sender}>"), 553, "5.1.7")


def test_non_ascii_sender_without_smtputf8_is_refused(session: smtplib.SMTP) -> None:
    session.command_encoding = "utf-8"
    code, text = session.docmd("MAIL", "FROM:<rené@example.org>")
    assert 550 <= code <= 553, (code, text)
    assert ENHANCED.match(text.decode("utf-8", "replace")), text


def test_unknown_mail_parameter_gets_555(session: smtplib.SMTP) -> None:
    expect(session.docmd("MAIL", "FROM:<alice@example.org> FROBNICATE=yes"), 555, "5.5.4")


def test_unknown_rcpt_parameter_gets_555(session: smtplib.SMTP) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}> XFORWARD=1"), 555, "5.5.4")
    # the transaction is still open: a good recipient is still accepted
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")


def test_known_parameters_are_accepted(session: smtplib.SMTP) -> None:
    expect(
        session.docmd(
            "MAIL", "FROM:<alice@example.org> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=abc123"
        ),
        250,
        "2.1.0",
    )
    expect(
        session.docmd("RCPT", f"TO:<{LOCAL_RCPT}> NOTIFY=FAILURE,DELAY ORCPT=rfc822;{LOCAL_RCPT}"),
        250,
        "2.1.5",
    )


# -- RCPT TO ---------------------------------------------------------------------------------


def test_unknown_local_user_gets_550_511(session: smtplib.SMTP) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", "TO:<no-such-user-xyz@localhost>"), 550, "5.1.1")


def test_alias_to_a_missing_user_is_refused_at_rcpt(session: smtplib.SMTP) -> None:
    """Refuse at RCPT time rather than accept and bounce later."""
    mail_ok(session)
    expect(session.docmd("RCPT", "TO:<ghost@localhost>"), 550, "5.1.1")


@pytest.mark.parametrize(
    ("alias", "why"),
    [
        ("typo", "no such user or alias"),
        ("friend", "relaying"),
        ("archive", "not supported yet"),
        ("pipe", "not supported yet"),
    ],
)
def test_an_alias_is_refused_when_part_of_it_cannot_be_delivered(
    mta: Daemon, session: smtplib.SMTP, alias: str, why: str
) -> None:
    """Never deliver to part of an alias and silently drop the rest; the log says why, the
    client is not told what the alias holds."""
    mail_ok(session)
    mark = mta.log_mark()
    code, text = session.docmd("RCPT", f"TO:<{alias}@localhost>")
    assert (code, text) == (550, b"5.1.1 Recipient address rejected"), (code, text)
    line = mta.wait_for_log(rf"failed-command command=RCPT rcpt=<{alias}@localhost> .*", since=mark)
    assert why in line[0].group(0), line[0].group(0)


def test_other_system_user_is_refused_in_user_mode(session: smtplib.SMTP) -> None:
    """User mode delivers only to the user running the daemon; refuse the others at RCPT."""
    other = next(p.pw_name for p in pwd.getpwall() if p.pw_name != USER)
    mail_ok(session)
    code, text = session.docmd("RCPT", f"TO:<{other}@localhost>")
    assert code == 550, (other, code, text)
    assert ENHANCED.match(text.decode()), text


@pytest.mark.parametrize(
    "rcpt",
    [
        "someone@example.com",
        f"{USER}@example.com",
        "postmaster@gmail.com",
        f"{USER}@localhost.example.net",
    ],
)
def test_non_local_domain_gets_550_571(session: smtplib.SMTP, rcpt: str) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{rcpt}>"), 550, "5.7.1")


@pytest.mark.parametrize(
    "rcpt",
    [
        "a b@localhost",
        "@localhost",
        f"{USER}@",
        f"{USER}@@localhost",
        f"{USER}@local host",
        "",
        ";sleep 66;@localhost",
        f"{USER}@localhost;id",
    ],
)
def test_malformed_recipient_gets_553_513(session: smtplib.SMTP, rcpt: str) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{rcpt}>"), 553, "5.1.3")


@pytest.mark.parametrize("rcpt", ["postmaster", "Postmaster", "POSTMASTER"])
def test_bare_postmaster_is_accepted(session: smtplib.SMTP, rcpt: str) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{rcpt}>"), 250, "2.1.5")


def test_too_many_recipients_gets_452(session: smtplib.SMTP) -> None:
    mail_ok(session)
    for _ in range(5):
        expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 452, "4.5.3")
    expect(session.docmd("RCPT", "TO:<alice@localhost>"), 452, "4.5.3")
    # the five accepted recipients still make a message
    code, _ = session.docmd("DATA")
    assert code == 354
    tok = token()
    expect(_finish_data(session, f"Subject: {tok}\r\n\r\nfive recipients\r\n"), 250, "2.0.0")


def _finish_data(s: smtplib.SMTP, text: str) -> tuple[int, bytes]:
    s.send(text.encode() + b".\r\n")
    return s.getreply()


def test_too_many_messages_in_a_session_gets_452(mta: Daemon) -> None:
    toks = []
    with mta.smtp() as s:
        s.ehlo()
        for _ in range(3):
            tok = token()
            toks.append(tok)
            mail_ok(s)
            expect(s.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
            expect(s.data(f"Subject: {tok}\r\n\r\nbody\r\n".encode()), 250, "2.0.0")
        expect(s.docmd("MAIL", "FROM:<alice@example.org>"), 452, "4.5.3")
    for tok in toks:
        mta.wait_for_message(tok)
    # a new session starts afresh
    with mta.smtp() as s:
        s.ehlo()
        mail_ok(s)


@pytest.mark.parametrize(
    "name",
    [b"two words", b"a;b(c)d", b"evil\rX-Injected: yes", b"\xff", b"\xc0x", b"x..y", b"[1.2.3]"],
)
@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_a_greeting_that_is_no_domain_is_refused(mta: Daemon, verb: bytes, name: bytes) -> None:
    """RFC 5321 4.1.1.1: a domain or an address literal; refused, the session is not greeted."""
    with mta.raw() as c:
        assert c.reply().code == 220
        reply = c.command(verb + b" " + name)
        assert (reply.code, reply.text[:6]) == (501, "5.5.4 "), str(reply)
        assert c.command(b"MAIL FROM:<a@example.org>").code == 503


@pytest.mark.parametrize("name", ["client.test", "[127.0.0.1]", "[IPv6:::1]", "my_pc.lan", "x."])
def test_a_greeting_with_a_domain_or_a_literal_is_taken(mta: Daemon, name: str) -> None:
    with mta.raw() as c:
        assert c.reply().code == 220
        assert c.command(f"EHLO {name}").code == 250
        assert c.command(b"MAIL FROM:<a@example.org>").code == 250


# -- SIZE ------------------------------------------------------------------------------------


def test_size_over_the_limit_is_refused_at_mail(session: smtplib.SMTP) -> None:
    limit = limit_of(session)
    assert 1_000_000 <= limit <= 1_048_576, limit  # "smtp max-message-size 1M"
    expect(session.docmd("MAIL", f"FROM:<alice@example.org> SIZE={limit + 1}"), 552, "5.3.4")
    expect(session.docmd("MAIL", f"FROM:<alice@example.org> SIZE={limit}"), 250, "2.1.0")


@pytest.mark.parametrize("size", ["\u00b2", "\u0661\u0662", "12a", "-1"])
def test_size_must_be_ascii_digits(session: smtplib.SMTP, size: str) -> None:
    session.command_encoding = "utf-8"
    expect(session.docmd("MAIL", f"FROM:<alice@example.org> SIZE={size}"), 501, "5.5.4")
    expect(session.docmd("MAIL", "FROM:<alice@example.org> SIZE=12"), 250, "2.1.0")


def test_a_local_domain_written_with_its_trailing_dot_is_local(session: smtplib.SMTP) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}.>"), 250, "2.1.5")


def test_refused_commands_are_logged(mta: Daemon, session: smtplib.SMTP) -> None:
    limit = limit_of(session)
    mark = mta.log_mark()
    expect(session.docmd("MAIL", f"FROM:<alice@example.org> SIZE={limit + 1}"), 552, "5.3.4")
    expect(session.docmd("MAIL", "FROM:<;sleep 66;>"), 553, "5.1.7")
    mail_ok(session)
    expect(session.docmd("RCPT", "TO:<a b@localhost>"), 553, "5.1.3")
    mta.wait_for_log(r"failed-command command=MAIL result=\"552 5\.3\.4 ", since=mark)
    mta.wait_for_log(r"failed-command command=MAIL result=\"553 5\.1\.7 ", since=mark)
    mta.wait_for_log(r"failed-command command=RCPT result=\"553 5\.1\.3 ", since=mark)


def test_body_over_the_limit_is_refused_after_data(mta: Daemon, session: smtplib.SMTP) -> None:
    limit = limit_of(session)
    tok = token()
    line = b"x" * 998 + b"\r\n"
    big = f"Subject: {tok}\r\n\r\n".encode() + line * (limit // len(line) + 100)
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    mark = mta.log_mark()
    expect(session.data(big), 552, "5.3.4")
    expect(session.noop(), 250, "2.0.0")
    assert_not_delivered(mta, tok)
    mta.wait_for_log(r"smtp message-refused reason=\"too large\"", since=mark)


def test_body_just_under_the_limit_is_accepted(mta: Daemon, session: smtplib.SMTP) -> None:
    limit = limit_of(session)
    tok = token()
    head = f"Subject: {tok}\r\n\r\n".encode()
    line = b"y" * 98 + b"\r\n"
    room = limit - len(head) - 2000  # the daemon's own Received: line counts or not: keep margin
    msg = head + line * (room // len(line))
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    expect(session.data(msg), 250, "2.0.0")
    stored = mta.wait_for_message(tok)
    assert stored.endswith(line.replace(b"\r\n", b"\n") * 3)


# -- the content -----------------------------------------------------------------------------


def test_100_received_headers_is_a_loop(mta: Daemon, session: smtplib.SMTP) -> None:
    tok = token()
    hops = "".join(
        f"Received: from hop{i}.example by hop{i + 1}.example; Thu, 5 Mar 2026 10:00:00 +0000\r\n"
        for i in range(100)
    )
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    expect(session.data(f"{hops}Subject: {tok}\r\n\r\nloop\r\n".encode()), 554, "5.4.6")
    assert_not_delivered(mta, tok)


def test_99_received_headers_is_not_a_loop(mta: Daemon, session: smtplib.SMTP) -> None:
    tok = token()
    hops = "".join(
        f"Received: from hop{i}.example by hop{i + 1}.example; Thu, 5 Mar 2026 10:00:00 +0000\r\n"
        for i in range(99)
    )
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    expect(session.data(f"{hops}Subject: {tok}\r\n\r\nnot a loop\r\n".encode()), 250, "2.0.0")
    stored = mta.wait_for_message(tok)
    assert stored.count(b"\nReceived: ") == 100  # the 99 plus ours


@pytest.mark.parametrize("length", [999, 1000, 5000, 70000])
def test_line_over_1000_octets_gets_500_552(
    mta: Daemon, session: smtplib.SMTP, length: int
) -> None:
    tok = token()
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    body = b"ok line\r\n" + b"z" * length + b"\r\nafter\r\n"
    expect(session.data(f"Subject: {tok}\r\n\r\n".encode() + body), 500, "5.5.2")
    assert_not_delivered(mta, tok)


def test_long_line_in_the_header_section(mta: Daemon, session: smtplib.SMTP) -> None:
    tok = token()
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    msg = f"Subject: {tok}\r\nX-Long: {'h' * 1200}\r\n\r\nbody\r\n".encode()
    expect(session.data(msg), 500, "5.5.2")
    assert_not_delivered(mta, tok)


# -- the dialogue ----------------------------------------------------------------------------


def test_banner(mta: Daemon) -> None:
    with mta.raw() as c:
        banner = c.reply()
    assert banner.code == 220
    assert re.fullmatch(r"\S+ ESMTP homemail", banner.text), banner.text


def test_ehlo_advertises_the_extensions(session: smtplib.SMTP) -> None:
    features = session.esmtp_features
    for ext in ("8bitmime", "enhancedstatuscodes", "size", "dsn", "pipelining", "smtputf8"):
        assert ext in features, f"EHLO does not advertise {ext.upper()}: {features}"
    assert "starttls" not in features  # no tls on this listener
    assert "auth" not in features  # AUTH only after TLS


def test_auth_is_neither_listed_nor_accepted(session: smtplib.SMTP) -> None:
    code, text = session.docmd("HELP")
    assert code == 250 and b"MAIL" in text and b"AUTH" not in text.split(), text
    code, text = session.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")
    assert (code, text[:6]) == (502, b"5.5.1 "), (code, text)
    assert session.docmd("NOOP")[0] == 250  # the session goes on


def test_every_reply_carries_an_enhanced_status_code(mta: Daemon) -> None:
    commands = [
        b"NOOP",
        b"HELO client.test",
        b"EHLO",  # missing argument
        b"RCPT TO:<" + LOCAL_RCPT.encode() + b">",  # before MAIL
        b"DATA",  # before MAIL
        b"MAIL FROM:<alice@example.org>",
        b"MAIL FROM:<alice@example.org>",  # nested
        b"DATA",  # before RCPT
        b"RCPT TO:<" + LOCAL_RCPT.encode() + b">",
        b"RSET",
        b"VRFY alice",
        b"EXPN alice",
        b"HELP",
        b"FOOBAR",
        b"MAIL FROM alice@example.org",  # syntax
        b"RCPT TO:<x@localhost>",  # no transaction after RSET
        b"NOOP",
        b"QUIT",
    ]
    with mta.raw() as c:
        assert c.reply().code == 220
        for cmd in commands:
            reply = c.command(cmd)
            assert reply.code != 354
            assert reply.has_enhanced_code, f"{cmd!r} -> {reply} has no enhanced status code"
        assert reply.code == 221


def test_data_without_valid_recipient_is_refused(session: smtplib.SMTP) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", "TO:<someone@example.com>"), 550, "5.7.1")
    code, text = session.docmd("DATA")
    assert code in (503, 554), (code, text)
    assert ENHANCED.match(text.decode()), text


def test_rset_clears_the_transaction(session: smtplib.SMTP) -> None:
    mail_ok(session)
    expect(session.docmd("RCPT", f"TO:<{LOCAL_RCPT}>"), 250, "2.1.5")
    expect(session.rset(), 250, "2.0.0")
    code, text = session.docmd("DATA")
    assert code == 503, (code, text)
    mail_ok(session)


# -- room on the disk -----------------------------------------------------------------------------


def test_mail_is_refused_with_452_when_the_spool_has_no_room_for_a_message(daemon: Daemon) -> None:
    """Postfix's rule: less room on the spool's file system than 1.5 times the largest message
    allowed (so no message is taken that could not be stored)."""
    daemon.spool.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(daemon.spool)
    room = st.f_bavail * st.f_frsize
    limit_g = room // (1 << 30) + 1  # a largest message bigger than all the room there is
    assert limit_g <= 1024, f"more room than the largest size allowed (1024G): {room} bytes"
    daemon.start(DEFAULT_CONFIG + f"smtp max-message-size {limit_g}G\n")
    # said at the start already, before any client tries
    daemon.wait_for_log(r"error: the spool's file system has \d+ bytes free, less than 1\.5 times")
    with daemon.smtp() as s:
        s.ehlo()
        expect(s.docmd("MAIL", "FROM:<alice@example.org>"), 452, "4.3.1")
        expect(s.docmd("MAIL", "FROM:<alice@example.org> SIZE=100"), 452, "4.3.1")
    daemon.wait_for_log(r"smtp failed-command command=MAIL result=\"?452 4\.3\.1")
    daemon.write_config(DEFAULT_CONFIG)  # with room for the largest message: taken again
    daemon.hup()
    daemon.wait_for_log(r"smtpd reloaded")
    with daemon.smtp() as s:
        s.ehlo()
        expect(s.docmd("MAIL", "FROM:<alice@example.org>"), 250, "2.1.0")
    daemon.wait_for_log(r"smtpd spool-room free=\d+ needed=\d+")
