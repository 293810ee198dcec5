"""Delivery status notifications: the bounces, delay warnings and success reports homemail sends.

This module owns the format of every DSN (RFC 3464, RFC 6522): one function, :func:`make_dsn`,
turns the outcome of deliveries into a complete RFC 5322 message with CRLF line endings, ready to
be queued from the null sender to the original sender. It does no I/O.

The message is ``multipart/report; report-type=delivery-status`` with three parts:

1. ``text/plain``: what happened, written for a person;
2. ``message/delivery-status``: ``Reporting-MTA``, ``Original-Envelope-Id``, ``Arrival-Date``,
   then one block per recipient with ``Final-Recipient``, ``Original-Recipient``, ``Action``,
   ``Status``, ``Remote-MTA``, ``Diagnostic-Code``, ``Last-Attempt-Date`` and
   ``Will-Retry-Until``;
3. the original's header section as ``text/rfc822-headers``, or for RET=FULL (failure and success
   reports only) the whole original as ``message/rfc822``.

Every value that comes from outside (addresses, remote replies, the envelope id) is made a single
line before use, so that nothing can add a header field or a MIME part. The original's line
endings are normalised to CRLF. When the original cannot travel as ``message/rfc822`` (a line over
998 octets, a NUL byte, or more than :data:`MAX_RETURN_SIZE` octets) only its headers are returned.
"""

from __future__ import annotations

import email.utils
import quopri
import re
import secrets
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

__all__ = ["MAX_RETURN_SIZE", "RecipientStatus", "dsn_subject", "make_dsn"]

DsnKind = Literal["failure", "delay", "success"]

#: Largest original returned whole for RET=FULL; a larger one is returned as headers only.
MAX_RETURN_SIZE = 10 * 1024 * 1024

_SUBJECTS: dict[str, str] = {"failure": "Failure", "delay": "Delay", "success": "Success"}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_DIAGNOSTIC_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*[ \t]*;")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEADER_END = re.compile(rb"\r\n\r\n")
_MAX_LINE = 998


@dataclass(frozen=True)
class RecipientStatus:
    """The outcome for one recipient, as reported in the per-recipient block of a DSN."""

    final_recipient: str
    original_recipient: str | None
    action: Literal["failed", "delayed", "delivered"]
    status: str
    diagnostic: str | None
    remote_mta: str | None
    last_attempt: float | None
    will_retry_until: float | None


def dsn_subject(kind: DsnKind) -> str:
    """The Subject of a DSN of this kind, e.g. ``Delivery Status Notification (Failure)``."""
    return f"Delivery Status Notification ({_SUBJECTS[kind]})"


def make_dsn(
    *,
    kind: DsnKind,
    reporting_mta: str,
    sender: str,
    original: bytes,
    recipients: list[RecipientStatus],
    arrival_date: float,
    ret: Literal["FULL", "HDRS"] = "HDRS",
    envid: str | None = None,
    now: float | None = None,
    msgid_domain: str | None = None,
) -> bytes:
    """Build the DSN for ``sender`` about ``original``; see the module docstring for its layout.

    Raises ValueError for the null sender (a bounce is never bounced) or an empty recipient list.
    """
    sender = _clean(sender)
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    if not sender:
        raise ValueError("no DSN is sent to the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    now = time.time() if now is None else now
    mta = _clean(reporting_mta) or "localhost"
    original = _LINE_END.sub(b"\r\n", original)
    full = ret == "FULL" and kind != "delay" and _returnable(original)

    parts = [
        _text_part(kind, mta, recipients, full),
        _status_part(mta, recipients, arrival_date, envid),
        _original_part(original, full),
    ]
    boundary = _boundary(parts)
    domain = _clean(msgid_domain or "") or mta
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        f"Subject: {dsn_subject(kind)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{domain}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    out = [_to_bytes(_fold(h)) + b"\r\n" for h in headers]
    out.append(b"\r\nThis is a MIME-encapsulated message.\r\n")
    for part in parts:
        out.append(b"\r\n--" + boundary.encode("ascii") + b"\r\n" + part)
    out.append(b"\r\n--" + boundary.encode("ascii") + b"--\r\n")
    return b"".join(out)


# --- parts ---------------------------------------------------------------------------------------


def _text_part(kind: DsnKind, mta: str, recipients: list[RecipientStatus], full: bool) -> bytes:
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    delivered = [r for r in recipients if r.action == "delivered"]
    lines = [f"This is the mail delivery system at {mta}."]
    if failed:
        lines.append("")
        lines.append(
            "Your message could not be delivered to the following recipients. "
            "The mail system has given up; it will not try again."
        )
        lines.extend(_recipient_lines(failed))
    if delayed:
        until = [r.will_retry_until for r in delayed if r.will_retry_until is not None]
        keep_trying = (
            f"It will keep trying until {_date(max(until))}."
            if until
            else "It will keep trying for a while."
        )
        lines.append("")
        lines.append(
            "Your message has not yet been delivered to the following recipients. "
            f"The mail system is still trying. {keep_trying} "
            "You do not need to send the message again; you will be told if it fails for good."
        )
        lines.extend(_recipient_lines(delayed))
    if delivered:
        lines.append("")
        lines.append("Your message was delivered to the following recipients.")
        lines.extend(_recipient_lines(delivered))
    lines.append("")
    if full:
        lines.append("Your message is attached below, after the technical report.")
    else:
        lines.append("The headers of your message are attached below, after the technical report.")
    text = "\n".join(_wrap(lines)) + "\n"
    return _text_entity("text/plain", _to_bytes(text), "Notification")


def _recipient_lines(recipients: Iterable[RecipientStatus]) -> list[str]:
    lines = [""]
    for r in recipients:
        lines.append(f"  <{_clean(r.final_recipient)}>")
        original = _clean(r.original_recipient or "")
        if original and original.lower() != _clean(r.final_recipient).lower():
            lines.append(f"    (originally addressed to <{original}>)")
        reason = _reason(r)
        if reason:
            lines.append(f"    {reason}")
    return lines


def _reason(r: RecipientStatus) -> str:
    diagnostic = _clean(r.diagnostic or "")
    match = _DIAGNOSTIC_TYPE.match(diagnostic)
    if match:
        diagnostic = diagnostic[match.end() :].strip()
    remote = _clean(r.remote_mta or "")
    if diagnostic and remote:
        return f"{remote} said: {diagnostic}"
    if diagnostic:
        return diagnostic
    if r.action == "delivered":
        return ""
    return f"status {_status(r)}"


def _wrap(lines: list[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        indent = line[: len(line) - len(line.lstrip(" "))]
        wrapped = textwrap.wrap(
            line,
            width=76,
            subsequent_indent=indent + ("  " if indent else ""),
            break_long_words=False,
            break_on_hyphens=False,
        )
        out.extend(wrapped or [""])
    return out


def _status_part(
    mta: str, recipients: list[RecipientStatus], arrival_date: float, envid: str | None
) -> bytes:
    blocks = [[f"Reporting-MTA: dns; {_ascii(mta)}"]]
    if envid is not None and _clean(envid):
        blocks[0].append(f"Original-Envelope-Id: {_ascii(_clean(envid))}")
    blocks[0].append(f"Arrival-Date: {_date(arrival_date)}")
    for r in recipients:
        block = [f"Final-Recipient: {_address_field(r.final_recipient)}"]
        if r.original_recipient is not None and _clean(r.original_recipient):
            block.append(f"Original-Recipient: {_address_field(r.original_recipient)}")
        block.append(f"Action: {r.action}")
        block.append(f"Status: {_status(r)}")
        if r.remote_mta is not None and _clean(r.remote_mta):
            block.append(f"Remote-MTA: dns; {_ascii(_clean(r.remote_mta))}")
        if r.diagnostic is not None and _clean(r.diagnostic):
            block.append(f"Diagnostic-Code: {_diagnostic(r.diagnostic)}")
        if r.last_attempt is not None:
            block.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if r.action == "delayed" and r.will_retry_until is not None:
            block.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")
        blocks.append(block)
    body = "\r\n\r\n".join("\r\n".join(_fold(f) for f in block) for block in blocks) + "\r\n"
    head = (
        "Content-Type: message/delivery-status\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    )
    return (head + body).encode("ascii")


def _original_part(original: bytes, full: bool) -> bytes:
    if full:
        cte = "7bit" if original.isascii() else "8bit"
        if original and not original.endswith(b"\r\n"):
            original += b"\r\n"
        head = (
            "Content-Type: message/rfc822\r\n"
            "Content-Description: Undelivered message\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n"
            "\r\n"
        )
        return head.encode("ascii") + original
    return _text_entity("text/rfc822-headers", _header_section(original), "Message headers")


def _text_entity(content_type: str, data: bytes, description: str) -> bytes:
    """A text/* entity: 7bit when it can be, quoted-printable (still exact once decoded) if not."""
    if data.isascii() and not _has_long_line(data) and b"\x00" not in data:
        charset = "; charset=us-ascii" if content_type == "text/plain" else ""
        cte = "7bit"
        body = _LINE_END.sub(b"\r\n", data)
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            charset = ""  # not UTF-8 and of unknown charset: leave it undeclared
        else:
            charset = "; charset=utf-8"
        cte = "quoted-printable"
        body = _LINE_END.sub(b"\r\n", quopri.encodestring(_LINE_END.sub(b"\n", data)))
    head = (
        f"Content-Type: {content_type}{charset}\r\n"
        f"Content-Description: {description}\r\n"
        f"Content-Transfer-Encoding: {cte}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


def _header_section(message: bytes) -> bytes:
    """The header section of a CRLF message, each line ending in CRLF, without the empty line."""
    if message.startswith(b"\r\n"):
        return b""
    end = _HEADER_END.search(message)
    if end is None:
        return message if message.endswith(b"\r\n") or not message else message + b"\r\n"
    return message[: end.start() + 2]


def _returnable(original: bytes) -> bool:
    return (
        len(original) <= MAX_RETURN_SIZE
        and b"\x00" not in original
        and not _has_long_line(original)
    )


def _has_long_line(data: bytes) -> bool:
    return any(len(line) > _MAX_LINE for line in _LINE_END.split(data))


def _boundary(parts: list[bytes]) -> str:
    while True:
        boundary = f"=_homemail_{secrets.token_hex(12)}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in parts):
            return boundary


# --- field values --------------------------------------------------------------------------------


def _clean(value: str) -> str:
    """One line: CR, LF, NUL and other control characters become a space, runs collapsed."""
    return _CONTROL.sub(" ", value).strip()


def _ascii(value: str) -> str:
    return value.encode("ascii", "backslashreplace").decode("ascii")


def _status(r: RecipientStatus) -> str:
    status = _clean(r.status)
    if _STATUS.fullmatch(status):
        return status
    return {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0"}[r.action]


def _diagnostic(value: str) -> str:
    value = _ascii(_clean(value))
    if not _DIAGNOSTIC_TYPE.match(value):
        value = "x-local; " + value
    return value


def _address_field(address: str) -> str:
    """``rfc822; addr``, or for an address that is not ASCII ``utf-8; `` with RFC 6533 xtext."""
    address = _clean(address)
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address.isascii():
        return f"rfc822; {address}"
    out = []
    for ch in address:
        if ch in "+=\\":
            out.append(f"\\x{{{ord(ch):02X}}}")
        elif ord(ch) > 0x7E:
            out.append(f"\\x{{{ord(ch):X}}}")
        else:
            out.append(ch)
    return "utf-8; " + "".join(out)


def _date(timestamp: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(int(timestamp), UTC))


def _fold(field: str) -> str:
    """Fold a header field at spaces so lines stay near 78 and always under 998 octets."""
    if len(field) <= 78:
        return field
    lines: list[str] = []
    current = ""
    for word in field.split(" "):
        while len(word) > 900:  # cannot be folded without changing it; keep the lines legal
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:900])
            word = word[900:]
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= 78:
            current += " " + word
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return "\r\n ".join(line for line in lines if line)


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")
