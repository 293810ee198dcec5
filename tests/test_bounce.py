"""Tests for homemail.bounce: DSNs parse back into the structure RFC 3464 and RFC 6522 describe."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homemail.bounce import MAX_RETURN_SIZE, RecipientStatus, dsn_subject, make_dsn

NOW = 1_795_643_749.0  # Wed, 25 Nov 2026 21:55:49 +0000
ARRIVAL = NOW - 3600

ORIGINAL = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"8-bit: caf\xc3\xa9 and not UTF-8: \xff\xfe\r\n"
    b"--not-a-boundary\r\n"
)


def failed(addr: str = "bob@example.net", **kw: object) -> RecipientStatus:
    fields: dict[str, object] = {
        "final_recipient": addr,
        "original_recipient": None,
        "action": "failed",
        "status": "5.1.1",
        "diagnostic": "smtp; 550 5.1.1 <bob@example.net>: no such user",
        "remote_mta": "mx.example.net",
        "last_attempt": NOW - 60,
        "will_retry_until": None,
    }
    fields.update(kw)
    return RecipientStatus(**fields)  # type: ignore[arg-type]


def delayed(addr: str = "carol@example.com", **kw: object) -> RecipientStatus:
    fields: dict[str, object] = {
        "action": "delayed",
        "status": "4.4.1",
        "diagnostic": "smtp; 421 4.4.1 try again later",
        "remote_mta": "mx.example.com",
        "will_retry_until": NOW + 3 * 86400,
    }
    fields.update(kw)
    return failed(addr, **fields)


def build(**kw: object) -> bytes:
    args: dict[str, object] = {
        "kind": "failure",
        "reporting_mta": "mail.example.org",
        "sender": "alice@example.org",
        "original": ORIGINAL,
        "recipients": [failed()],
        "arrival_date": ARRIVAL,
        "now": NOW,
    }
    args.update(kw)
    return make_dsn(**args)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def report_parts(msg: EmailMessage) -> tuple[EmailMessage, EmailMessage, EmailMessage]:
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    payload = msg.get_payload()
    assert isinstance(payload, list) and len(payload) == 3
    parts = [p for p in payload if isinstance(p, EmailMessage)]
    assert len(parts) == 3
    for part in parts:
        assert not part.defects, part.defects
    return parts[0], parts[1], parts[2]


def status_blocks(part: Message) -> list[Message]:
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def lines_ok(raw: bytes) -> None:
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\x00" not in raw


# --- structure -----------------------------------------------------------------------------------


def test_subjects() -> None:
    assert dsn_subject("failure") == "Delivery Status Notification (Failure)"
    assert dsn_subject("delay") == "Delivery Status Notification (Delay)"
    assert dsn_subject("success") == "Delivery Status Notification (Success)"


def test_failure_headers() -> None:
    raw = build(msgid_domain="example.org")
    lines_ok(raw)
    msg = parse(raw)
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.org>"
    assert msg["To"] == "alice@example.org"
    assert raw.count(b"\r\nTo: <alice@example.org>\r\n") == 1
    assert msg["Subject"] == "Delivery Status Notification (Failure)"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Date"].endswith("+0000")
    assert re.fullmatch(r"<[^<>@\s]+@example\.org>", msg["Message-ID"])
    assert raw.startswith(b"From: Mail Delivery System <MAILER-DAEMON@mail.example.org>\r\n")


def test_message_id_defaults_to_reporting_mta_and_is_unique() -> None:
    a, b = parse(build()), parse(build())
    assert a["Message-ID"].endswith("@mail.example.org>")
    assert a["Message-ID"] != b["Message-ID"]


def test_failure_structure_headers_only() -> None:
    msg = parse(build())
    text, _, original = report_parts(msg)
    assert text.get_content_type() == "text/plain"
    assert original.get_content_type() == "text/rfc822-headers"
    headers = original.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert headers == ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert b"Hello Bob" not in headers


def test_delivery_status_fields() -> None:
    msg = parse(build(envid="QQ314159"))
    _, status, _ = report_parts(msg)
    per_message, per_rcpt = status_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Original-Recipient"] is None
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.net>: no such user"
    last = email.utils.parsedate_to_datetime(per_rcpt["Last-Attempt-Date"])
    assert last.timestamp() == NOW - 60
    assert per_rcpt["Will-Retry-Until"] is None


def test_optional_fields_absent() -> None:
    r = failed(diagnostic=None, remote_mta=None, last_attempt=None)
    _, status, _ = report_parts(parse(build(recipients=[r])))
    per_message, per_rcpt = status_blocks(status)
    assert per_message["Original-Envelope-Id"] is None
    for name in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date", "Original-Recipient"):
        assert per_rcpt[name] is None


def test_several_recipients_with_original_recipient() -> None:
    recipients = [
        failed(original_recipient="Bob.Alias@example.net"),
        failed("dave@example.net", status="5.2.2", diagnostic="x-local; mailbox full"),
    ]
    msg = parse(build(recipients=recipients))
    text, status, _ = report_parts(msg)
    _, first, second = status_blocks(status)
    assert first["Original-Recipient"] == "rfc822; Bob.Alias@example.net"
    assert second["Final-Recipient"] == "rfc822; dave@example.net"
    assert second["Status"] == "5.2.2"
    assert second["Diagnostic-Code"] == "x-local; mailbox full"
    body = text.get_content()
    assert "<bob@example.net>" in body and "<dave@example.net>" in body
    assert "mailbox full" in body
    assert "Bob.Alias@example.net" in body


def test_human_text_for_failure() -> None:
    text, _, _ = report_parts(parse(build()))
    body = text.get_content()
    assert "could not be delivered" in body
    assert "<bob@example.net>" in body
    assert "mx.example.net said: 550 5.1.1 <bob@example.net>: no such user" in body
    assert "headers of your message" in body


def test_delay() -> None:
    raw = build(kind="delay", recipients=[delayed()], ret="FULL")
    lines_ok(raw)
    msg = parse(raw)
    assert msg["Subject"] == "Delivery Status Notification (Delay)"
    text, status, original = report_parts(msg)
    # Delay warnings always carry only the headers, whatever RET says.
    assert original.get_content_type() == "text/rfc822-headers"
    body = " ".join(text.get_content().split())
    assert "not yet been delivered" in body
    assert "keep trying until Sat, 28 Nov 2026 21:55:49 +0000" in body
    _, per_rcpt = status_blocks(status)
    assert per_rcpt["Action"] == "delayed"
    assert per_rcpt["Status"] == "4.4.1"
    until = email.utils.parsedate_to_datetime(per_rcpt["Will-Retry-Until"])
    assert until.timestamp() == NOW + 3 * 86400


def test_success() -> None:
    r = failed(action="delivered", status="2.0.0", diagnostic=None, remote_mta=None)
    msg = parse(build(kind="success", recipients=[r]))
    assert msg["Subject"] == "Delivery Status Notification (Success)"
    text, status, _ = report_parts(msg)
    assert "was delivered" in text.get_content()
    _, per_rcpt = status_blocks(status)
    assert per_rcpt["Action"] == "delivered"
    assert per_rcpt["Status"] == "2.0.0"


@pytest.mark.parametrize("kind", ["failure", "success"])
def test_ret_full_returns_message_rfc822(kind: str) -> None:
    r = failed() if kind == "failure" else failed(action="delivered", status="2.0.0")
    raw = build(kind=kind, recipients=[r], ret="FULL")
    lines_ok(raw)
    msg = parse(raw)
    text, _, original = report_parts(msg)
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] == "8bit"
    payload = original.get_payload()
    assert isinstance(payload, list) and len(payload) == 1
    inner = payload[0]
    assert isinstance(inner, Message)
    assert inner["Message-ID"] == "<m1@example.org>"
    assert inner["Subject"] == "café"
    assert ORIGINAL in raw  # byte for byte, 8-bit and non-UTF-8 bytes included
    assert "is attached below" in text.get_content()


def test_ret_full_normalises_line_endings() -> None:
    original = b"Subject: x\r\n\r\nbare\rcr\nbare lf\r\n"
    raw = build(original=original, ret="FULL")
    lines_ok(raw)
    assert b"\r\n\r\nbare\r\ncr\r\nbare lf\r\n" in raw


@pytest.mark.parametrize(
    "original",
    [
        b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n",
        b"Subject: nul\r\n\r\nnul \x00 byte\r\n",
        b"Subject: huge\r\n\r\n" + (b"y" * 98 + b"\r\n") * (MAX_RETURN_SIZE // 100 + 1),
    ],
    ids=["long-line", "nul", "too-big"],
)
def test_ret_full_falls_back_to_headers(original: bytes) -> None:
    raw = build(original=original, ret="FULL")
    lines_ok(raw)
    _, _, part = report_parts(parse(raw))
    assert part.get_content_type() == "text/rfc822-headers"
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes) and payload.startswith(b"Subject: ")


def test_headers_part_8bit_is_quoted_printable_and_exact() -> None:
    original = b"Subject: caf\xc3\xa9\r\nX-Raw: \xff\xfe\r\n\r\nbody\r\n"
    raw = build(original=original)
    lines_ok(raw)
    assert raw.isascii()  # RET=HDRS: the whole DSN is 7-bit and can go anywhere
    _, _, part = report_parts(parse(raw))
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_payload(decode=True) == b"Subject: caf\xc3\xa9\r\nX-Raw: \xff\xfe\r\n"


def test_headers_part_utf8_declares_charset() -> None:
    original = "Subject: café\r\n\r\nbody\r\n".encode()
    _, _, part = report_parts(parse(build(original=original)))
    assert part.get_content_charset() == "utf-8"
    assert part.get_content() == "Subject: café\r\n"


@pytest.mark.parametrize(
    ("original", "headers"),
    [
        (b"Subject: only headers\r\nX: y\r\n", b"Subject: only headers\r\nX: y\r\n"),
        (b"Subject: no final newline", b"Subject: no final newline\r\n"),
        (b"\r\nbody without headers\r\n", b""),
        (b"", b""),
        (b"Subject: lf only\n\nbody\n", b"Subject: lf only\r\n"),
    ],
)
def test_headers_part_edge_cases(original: bytes, headers: bytes) -> None:
    raw = build(original=original)
    lines_ok(raw)
    _, _, part = report_parts(parse(raw))
    assert part.get_payload(decode=True) == headers


def test_boundary_not_in_content() -> None:
    msg = parse(build(ret="FULL"))
    boundary = msg.get_boundary()
    assert boundary is not None
    assert boundary.encode() not in ORIGINAL


# --- outside data cannot inject ------------------------------------------------------------------


def test_crlf_in_diagnostic_cannot_add_header() -> None:
    r = failed(
        diagnostic="smtp; 550 no\r\nX-Injected: yes\r\n\r\nFinal-Recipient: rfc822; evil@x",
        remote_mta="mx\r\nX-Injected: yes",
        status="5.1.1\r\nX-Injected: yes",
    )
    raw = build(recipients=[r], sender="alice@example.org\r\nX-Injected: yes", envid="e\r\nX-I: 1")
    lines_ok(raw)
    assert not re.search(rb"^X-Injected", raw, re.MULTILINE)
    assert not re.search(rb"^X-I:", raw, re.MULTILINE)
    msg = parse(raw)
    assert msg["X-Injected"] is None
    _, status, _ = report_parts(msg)
    blocks = status_blocks(status)
    assert len(blocks) == 2
    per_message, per_rcpt = blocks
    assert per_message["X-I"] is None
    assert per_rcpt["X-Injected"] is None
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 550 no X-Injected: yes")
    assert per_rcpt["Status"] == "5.0.0"  # not a valid status once cleaned: the class default
    assert "\r" not in msg["To"] and "\n" not in msg["To"]


def test_nul_and_crlf_in_addresses_removed() -> None:
    r = failed("bob@exa\x00mple.net\r\n", original_recipient="x\r\ny@z")
    raw = build(recipients=[r])
    lines_ok(raw)
    _, status, _ = report_parts(parse(raw))
    _, per_rcpt = status_blocks(status)
    assert "\x00" not in per_rcpt["Final-Recipient"]
    assert per_rcpt["Original-Recipient"] == "rfc822; x y@z"


def test_diagnostic_without_type_gets_one() -> None:
    _, status, _ = report_parts(parse(build(recipients=[failed(diagnostic="disk on fire")])))
    assert status_blocks(status)[1]["Diagnostic-Code"] == "x-local; disk on fire"


def test_long_diagnostic_is_folded() -> None:
    words = " ".join(f"word{i}" for i in range(400)) + " " + "z" * 1500
    raw = build(recipients=[failed(diagnostic="smtp; 550 " + words)])
    lines_ok(raw)
    _, status, _ = report_parts(parse(raw))
    assert status_blocks(status)[1]["Diagnostic-Code"].startswith("smtp; 550 word0 word1")


def test_utf8_addresses() -> None:
    r = failed("jösé@exämple.net", original_recipient="a+b=c@x")
    raw = build(recipients=[r], sender="ålice@example.org")
    lines_ok(raw)
    msg = parse(raw)
    assert msg["To"] == "ålice@example.org"
    text, status, _ = report_parts(msg)
    assert "jösé@exämple.net" in text.get_content()
    _, per_rcpt = status_blocks(status)
    assert per_rcpt["Final-Recipient"] == "utf-8; j\\x{F6}s\\x{E9}@ex\\x{E4}mple.net"
    assert per_rcpt["Original-Recipient"] == "rfc822; a+b=c@x"


@pytest.mark.parametrize("sender", ["", "<>", " \r\n"])
def test_null_sender_refused(sender: str) -> None:
    with pytest.raises(ValueError):
        build(sender=sender)


def test_sender_with_brackets() -> None:
    assert parse(build(sender="<alice@example.org>"))["To"] == "alice@example.org"


def test_no_recipients_refused() -> None:
    with pytest.raises(ValueError):
        build(recipients=[])


_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=200)


@settings(max_examples=200, deadline=None)
@given(
    diagnostic=_text,
    addr=_text,
    remote=_text,
    envid=_text,
    original=st.binary(max_size=600),
    ret=st.sampled_from(["FULL", "HDRS"]),
)
def test_property_always_parses(
    diagnostic: str, addr: str, remote: str, envid: str, original: bytes, ret: str
) -> None:
    r = failed(addr or "x@y", diagnostic=diagnostic, remote_mta=remote)
    raw = build(recipients=[r], original=original, ret=ret, envid=envid, sender="s@t" + addr)
    lines_ok(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Delivery Status Notification (Failure)"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert isinstance(msg, EmailMessage)
    _, status, _ = report_parts(msg)
    blocks = status_blocks(status)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert set(blocks[1].keys()) <= {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }
    assert set(msg.keys()) == {
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
    }
