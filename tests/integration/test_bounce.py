"""Failed deliveries: a permanent failure bounces to the sender, a temporary one is retried.

Failures are made with things that fail for root too (the suite runs as root in CI): a maildir
path that is a plain file (permanent), a maildir whose ``tmp`` is a plain file (temporary, fixed
by the test), and a ``Delivered-To:`` header naming the destination (loop, permanent).
"""

from __future__ import annotations

import email
import email.message
import email.policy
import re
from datetime import datetime
from pathlib import Path

import pytest

from .conftest import LOCAL_RCPT, USER, Daemon, accepted_msgid, header_values, poll, send, token

CONFIG = """\
table aliases { postmaster = "@USER@", alice = "@USER@", broken = "@USER@", flaky = "@USER@" }
table brokenrcpts { "broken@localhost" }
table flakyrcpts { "flaky@localhost" }
listen on 127.0.0.1 port @PORT@
action "broken" maildir "@DIR@/notadir" alias <aliases>
action "flaky" maildir "@DIR@/flaky" alias <aliases>
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for rcpt-to <brokenrcpts> action "broken"
match from local for rcpt-to <flakyrcpts> action "flaky"
match from local for local action "local"
"""


def dsns(daemon: Daemon, kind: str = "") -> list[bytes]:
    subject = f"Delivery Status Notification ({kind}" if kind else "Delivery Status Notification"
    return [
        m
        for m in daemon.maildir_messages()
        if any(subject.encode() in v for v in header_values(m, "subject"))
    ]


def wait_for_dsn(daemon: Daemon, kind: str, token_: str, timeout: float = 30) -> bytes:
    found = poll(lambda: [m for m in dsns(daemon, kind) if token_.encode() in m], timeout, 0.1)
    if not found:
        pytest.fail(f"no {kind} DSN mentioning {token_} within {timeout} s:\n{daemon.log()}")
    assert len(found) == 1, f"{len(found)} {kind} DSNs for one message"
    return found[0]  # type: ignore[index]


def report(stored: bytes) -> tuple[email.message.Message, list[dict[str, str]], list[str]]:
    """Parse a DSN: (the message, the delivery-status blocks as dicts, content types in order)."""
    msg = email.message_from_bytes(stored, policy=email.policy.compat32)
    types = [part.get_content_type() for part in msg.walk()]
    blocks: list[dict[str, str]] = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        if isinstance(payload, list):
            for block in payload:
                blocks.append({k.lower(): " ".join(str(v).split()) for k, v in block.items()})
        else:
            for chunk in re.split(r"\n\s*\n", payload.strip()):
                fields = email.message_from_string(chunk + "\n\n")
                blocks.append({k.lower(): " ".join(str(v).split()) for k, v in fields.items()})
    return msg, blocks, types


def recipient_blocks(blocks: list[dict[str, str]]) -> list[dict[str, str]]:
    return [b for b in blocks if "final-recipient" in b]


def assert_failure_dsn(stored: bytes, sender: str, finals: tuple[str, ...]) -> dict[str, str]:
    """Check the shape of a failure DSN for one recipient; return its per-recipient block."""
    msg, blocks, types = report(stored)
    assert stored.startswith(b"Return-Path: <>\n"), stored[:200]
    assert msg["Subject"] == "Delivery Status Notification (Failure)"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert sender in msg["To"], msg["To"]
    assert msg["Date"] and msg["Message-ID"]
    assert types[1] == "text/plain", types  # the human-readable part comes first
    assert "message/delivery-status" in types
    assert any(t in ("text/rfc822-headers", "message/rfc822") for t in types), types
    assert "reporting-mta" in blocks[0], blocks
    [rcpt] = recipient_blocks(blocks)
    final = rcpt["final-recipient"].lower().replace(" ", "")
    assert final in {f"rfc822;{f}".lower() for f in finals}, rcpt
    assert rcpt["action"].lower() == "failed", rcpt
    return rcpt


def log_time(line: str) -> datetime:
    return datetime.fromisoformat(line.split()[0])


def make_flaky(daemon: Daemon) -> Path:
    flaky = daemon.dir / "flaky"
    for sub in ("new", "cur"):
        (flaky / sub).mkdir(parents=True)
    (flaky / "tmp").write_bytes(b"not a directory\n")
    return flaky


def repair(flaky: Path) -> None:
    (flaky / "tmp").unlink()
    (flaky / "tmp").mkdir()


@pytest.fixture
def mta(daemon: Daemon) -> Daemon:
    daemon.dir.mkdir(parents=True, exist_ok=True)
    (daemon.dir / "notadir").write_bytes(b"a plain file where a maildir should be\n")
    return daemon


def test_maildir_that_is_a_plain_file_is_kept_queued_not_bounced(mta: Daemon) -> None:
    """A broken mailbox is the admin's to fix: the message waits in the queue, unharmed."""
    mta.start(CONFIG)
    tok = token()
    mark = mta.log_mark()
    accepted_msgid(
        send(mta, "alice@localhost", ["broken@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode())
    )
    mta.wait_for_log(
        r"mda delivery .*to=<[^>]*> rcpt=<broken@localhost>.*result=TempFail", since=mark
    )
    assert (mta.dir / "notadir").read_bytes() == b"a plain file where a maildir should be\n"
    assert not [m for m in mta.maildir_messages() if tok.encode() in m]
    assert "PermFail" not in mta.log()[mark:]


def test_delivered_to_loop_is_a_permanent_failure_with_5_4_6(mta: Daemon) -> None:
    mta.start(CONFIG)
    tok = token()
    looping = (
        f"Delivered-To: {LOCAL_RCPT}\r\nFrom: alice@localhost\r\n"
        f"Subject: looping {tok}\r\n\r\nround and round\r\n"
    ).encode()
    mark = mta.log_mark()
    accepted_msgid(send(mta, "alice@localhost", [LOCAL_RCPT], looping))
    mta.wait_for_log(r"mda delivery .*result=PermFail", since=mark)
    stored = wait_for_dsn(mta, "Failure", tok)
    rcpt = assert_failure_dsn(stored, "alice@localhost", (LOCAL_RCPT,))
    assert rcpt["status"] == "5.4.6", rcpt
    assert f"Subject: looping {tok}".encode() in stored
    # the looping message itself is not in the mailbox: only its bounce mentions it
    assert [m for m in mta.maildir_messages() if tok.encode() in m] == [stored]


def test_bounce_is_not_sent_for_the_null_sender(mta: Daemon) -> None:
    """A failed message from <> (itself a bounce) is dropped, never bounced again."""
    mta.start(CONFIG)
    tok = token()
    mark = mta.log_mark()
    looping = f"Delivered-To: {LOCAL_RCPT}\r\nSubject: bounce of bounce {tok}\r\n\r\nx\r\n"
    accepted_msgid(send(mta, "", [LOCAL_RCPT], looping.encode()))
    mta.wait_for_log(r"mda delivery .*result=PermFail", since=mark)
    marker = token()
    accepted_msgid(
        send(mta, "alice@localhost", [LOCAL_RCPT], f"Subject: {marker}\r\n\r\nm\r\n".encode())
    )
    mta.wait_for_message(marker)
    assert not [m for m in mta.maildir_messages() if tok.encode() in m]
    assert mta.running


@pytest.mark.timeout(90)
def test_temporary_failure_is_retried_until_delivered(mta: Daemon) -> None:
    flaky = make_flaky(mta)
    mta.start(CONFIG)
    tok = token()
    mark = mta.log_mark()
    accepted_msgid(
        send(
            mta,
            "alice@localhost",
            ["flaky@localhost"],
            f"Subject: flaky {tok}\r\n\r\neventually\r\n".encode(),
        )
    )
    [first] = mta.wait_for_log(r"^.*mda delivery .*result=TempFail.*$", since=mark)
    assert list((flaky / "new").iterdir()) == []
    repair(flaky)

    [delivered] = mta.wait_for_files(flaky / "new", 1, timeout=40)
    assert delivered.read_bytes().endswith(b"\n\neventually\n")
    [ok] = mta.wait_for_log(r"^.*mda delivery .*result=Ok.*$", since=mark)
    delay = (log_time(ok.group(0)) - log_time(first.group(0))).total_seconds()
    assert 8.0 <= delay <= 30.0, f"retried after {delay:.1f} s, expected about 10 s"
    evpid = re.search(r"evpid=(\w+)", first.group(0)).group(1)  # type: ignore[union-attr]
    assert f"evpid={evpid}" in ok.group(0)
    assert dsns(mta) == [], "a temporary failure must not bounce"


@pytest.mark.timeout(90)
def test_delay_warning_then_delivery(mta: Daemon) -> None:
    flaky = make_flaky(mta)
    mta.start(CONFIG + "bounce warn-interval 2s\n")
    tok = token()
    mark = mta.log_mark()
    accepted_msgid(
        send(
            mta,
            "alice@localhost",
            ["flaky@localhost"],
            f"Subject: slow {tok}\r\n\r\nlate but here\r\n".encode(),
        )
    )
    mta.wait_for_log(r"mda delivery .*result=TempFail", since=mark)
    stored = wait_for_dsn(mta, "Delay", tok, timeout=40)
    msg, blocks, _ = report(stored)
    assert msg.get_content_type() == "multipart/report"
    [rcpt] = recipient_blocks(blocks)
    assert rcpt["action"].lower() == "delayed", rcpt
    assert re.fullmatch(r"4\.\d{1,3}\.\d{1,3}", rcpt["status"]), rcpt
    repair(flaky)
    [delivered] = mta.wait_for_files(flaky / "new", 1, timeout=60)
    assert delivered.read_bytes().endswith(b"\n\nlate but here\n")
    assert dsns(mta, "Failure") == []


@pytest.mark.timeout(90)
def test_expiry_after_queue_ttl_bounces(mta: Daemon) -> None:
    make_flaky(mta)
    mta.start(CONFIG + "queue ttl 3s\n")
    tok = token()
    mark = mta.log_mark()
    accepted_msgid(
        send(
            mta,
            "alice@localhost",
            ["flaky@localhost"],
            f"Subject: expiring {tok}\r\n\r\nnever\r\n".encode(),
        )
    )
    mta.wait_for_log(r"mda delivery .*result=TempFail", since=mark)
    stored = wait_for_dsn(mta, "Failure", tok, timeout=45)
    _, blocks, _ = report(stored)
    [rcpt] = recipient_blocks(blocks)
    assert rcpt["action"].lower() == "failed", rcpt
    assert re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", rcpt["status"]), rcpt


@pytest.mark.timeout(90)
def test_expiry_after_the_actions_own_ttl_bounces(mta: Daemon) -> None:
    """An action's ttl, not queue ttl (4 days here), is when its envelopes expire."""
    make_flaky(mta)
    mta.start(
        CONFIG.replace('"@DIR@/flaky" alias <aliases>', '"@DIR@/flaky" alias <aliases> ttl 3s')
    )
    tok = token()
    mark = mta.log_mark()
    accepted_msgid(
        send(
            mta,
            "alice@localhost",
            ["flaky@localhost"],
            f"Subject: brief {tok}\r\n\r\nnever\r\n".encode(),
        )
    )
    mta.wait_for_log(r"mda delivery .*result=TempFail", since=mark)
    stored = wait_for_dsn(mta, "Failure", tok, timeout=45)
    _, blocks, _ = report(stored)
    [rcpt] = recipient_blocks(blocks)
    assert rcpt["action"].lower() == "failed", rcpt


def test_user_of_the_daemon_is_named_in_the_log(mta: Daemon) -> None:
    mta.start(CONFIG)
    tok = token()
    mark = mta.log_mark()
    accepted_msgid(
        send(mta, "alice@localhost", [LOCAL_RCPT], f"Subject: {tok}\r\n\r\nx\r\n".encode())
    )
    mta.wait_for_message(tok)
    [line] = mta.wait_for_log(r"^.*mda delivery .*result=Ok.*$", since=mark)
    assert f"user={USER}" in line.group(0)
    assert "from=<alice@localhost>" in line.group(0)
