"""Clients nobody here wrote: swaks and Python's smtplib/email, as users would run them."""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import re
import shutil
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from .conftest import LOCAL_RCPT, Daemon, body_of, header_values, poll, split_trace, token


@pytest.fixture(scope="module")
def mta(shared_daemons) -> Daemon:
    return shared_daemons("clients").start()


@pytest.fixture(scope="module")
def swaks_bin() -> str:
    path = shutil.which("swaks") or ("/usr/bin/swaks" if os.path.exists("/usr/bin/swaks") else None)
    if path is None:
        pytest.fail(
            "swaks is not installed; these tests need it (Debian/Ubuntu: apt-get install -y swaks)"
        )
    return path


def swaks(swaks_bin: str, mta: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [
            swaks_bin,
            "--server",
            "127.0.0.1",
            "--port",
            str(mta.port),
            "--helo",
            "swaks.test",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        f"swaks failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n{mta.log()}"
    )
    return result


def parsed(stored: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(stored, policy=email.policy.default)  # type: ignore[return-value]


# -- swaks -----------------------------------------------------------------------------------


def test_swaks_plain_delivery(swaks_bin: str, mta: Daemon) -> None:
    tok = token()
    out = swaks(
        swaks_bin,
        mta,
        "--to",
        LOCAL_RCPT,
        "--from",
        "swaks@example.org",
        "--header",
        f"Subject: swaks plain {tok}",
        "--body",
        f"hello from swaks {tok}",
    )
    assert "Message accepted for delivery" in out.stdout
    stored = mta.wait_for_message(f"swaks plain {tok}")
    msg = parsed(stored)
    assert msg["Subject"] == f"swaks plain {tok}"
    assert header_values(stored, "return-path") == [b"<swaks@example.org>"]
    assert f"hello from swaks {tok}" in msg.get_content()


def test_swaks_pipeline(swaks_bin: str, mta: Daemon) -> None:
    tok = token()
    out = swaks(
        swaks_bin,
        mta,
        "--pipeline",
        "--to",
        f"{LOCAL_RCPT},alice@localhost",
        "--from",
        "swaks@example.org",
        "--header",
        f"Subject: swaks pipe {tok}",
        "--body",
        "pipelined by swaks",
    )
    # swaks shows the pipelined commands as one block, and every reply was positive
    assert "PIPELINING" in out.stdout
    assert "Message accepted for delivery" in out.stdout
    assert "\n<** " not in out.stdout, out.stdout  # swaks marks failed replies with <**
    stored = mta.wait_for_message(f"swaks pipe {tok}")
    assert "pipelined by swaks" in parsed(stored).get_content()


def test_swaks_pipeline_with_a_refused_recipient(swaks_bin: str, mta: Daemon) -> None:
    tok = token()
    result = subprocess.run(
        [
            swaks_bin,
            "--server",
            "127.0.0.1",
            "--port",
            str(mta.port),
            "--pipeline",
            "--to",
            f"nobody-{tok}@localhost,{LOCAL_RCPT}",
            "--from",
            "swaks@example.org",
            "--header",
            f"Subject: swaks partial {tok}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "550 5.1.1" in result.stdout, result.stdout
    stored = mta.wait_for_message(f"swaks partial {tok}")
    _, _, received, _ = split_trace(stored)
    assert f"for <{LOCAL_RCPT}>".encode() in received


def test_swaks_data_with_8bit_body(swaks_bin: str, mta: Daemon, tmp_path: Path) -> None:
    tok = token()
    data = (
        f"From: swaks@example.org\r\nTo: {LOCAL_RCPT}\r\nSubject: swaks 8bit {tok}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "Příliš žluťoučký kůň úpěl ďábelské ódy.\r\n"
        "Ἐν ἀρχῇ ἦν ὁ λόγος — 🐍\r\n"
        ".a line with a leading dot"  # swaks ends the data with CRLF . CRLF itself
    ).encode()
    path = tmp_path / "message.eml"
    path.write_bytes(data)
    swaks(swaks_bin, mta, "--to", LOCAL_RCPT, "--from", "swaks@example.org", "--data", f"@{path}")
    stored = mta.wait_for_message(f"swaks 8bit {tok}")
    assert body_of(stored) == body_of(data.replace(b"\r\n", b"\n")) + b"\n"
    assert parsed(stored).get_content().startswith("Příliš žluťoučký kůň")


def test_swaks_attachment(swaks_bin: str, mta: Daemon, tmp_path: Path) -> None:
    tok = token()
    blob = os.urandom(200_000) + b"\x00\r\n.\r\n\xff" * 10
    attachment = tmp_path / "payload.bin"
    attachment.write_bytes(blob)
    sent = swaks(
        swaks_bin,
        mta,
        "--to",
        LOCAL_RCPT,
        "--from",
        "swaks@example.org",
        "--header",
        f"Subject: swaks attach {tok}",
        "--body",
        "see attachment",
        "--attach-type",
        "application/octet-stream",
        "--attach",
        f"@{attachment}",
        "--suppress-data",
    )
    stored = mta.wait_for_message(f"swaks attach {tok}")
    msg = parsed(stored)
    parts = [p for p in msg.iter_attachments()]
    assert len(parts) == 1, [p.get_content_type() for p in msg.walk()]
    got = parts[0].get_content()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest(), (
        f"attachment of {len(got)} bytes, stored message of {len(stored)}; its start and end:\n"
        f"{stored[:1500]!r}\n…\n{stored[-600:]!r}\nswaks: {sent.stdout[-1500:]}\n"
        f"{mta.log()[-3000:]}"
    )  # seen once with an empty attachment and not reproduced: say what was stored
    assert parts[0].get_filename() == "payload.bin"


# -- smtplib and the email package -----------------------------------------------------------


def test_smtplib_send_message_with_attachment_and_utf8_headers(mta: Daemon) -> None:
    tok = token()
    msg = EmailMessage()
    msg["From"] = "Zoë Ångström <zoe@example.org>"
    msg["To"] = LOCAL_RCPT
    msg["Subject"] = f"Résumé ✓ {tok}"
    msg.set_content("Bonjour,\n\nvoici le fichier — merci.\n")
    pdf = b"%PDF-1.4\n" + os.urandom(50_000)
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="cv.pdf")
    with mta.smtp() as s:
        refused = s.send_message(msg)
    assert refused == {}
    stored = poll_subject(mta, f"Résumé ✓ {tok}")
    got = parsed(stored)
    assert str(got["From"]) == "Zoë Ångström <zoe@example.org>"
    [att] = list(got.iter_attachments())
    assert att.get_filename() == "cv.pdf"
    assert att.get_content() == pdf
    assert got.get_body(("plain",)).get_content() == "Bonjour,\n\nvoici le fichier — merci.\n"


def test_smtplib_sendmail_to_several_recipients_reports_refusals(mta: Daemon) -> None:
    tok = token()
    with mta.smtp() as s:
        refused = s.sendmail(
            "me@example.org",
            [LOCAL_RCPT, "stranger@example.com", f"ghost-{tok}@localhost"],
            f"Subject: partial {tok}\r\n\r\nsome get it\r\n",
        )
    assert set(refused) == {"stranger@example.com", f"ghost-{tok}@localhost"}
    assert refused["stranger@example.com"][0] == 550
    assert refused[f"ghost-{tok}@localhost"][0] == 550
    mta.wait_for_message(f"partial {tok}")


def test_smtplib_send_message_smtputf8(mta: Daemon) -> None:
    tok = token()
    msg = EmailMessage()
    msg["From"] = "jürgen@bücher.example"
    msg["To"] = LOCAL_RCPT
    msg["Subject"] = f"utf8 {tok}"
    msg.set_content("über\n")
    with mta.smtp() as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        s.send_message(msg)  # smtplib adds SMTPUTF8 and BODY=8BITMIME itself
    stored = mta.wait_for_message(f"utf8 {tok}")
    assert stored.startswith("Return-Path: <jürgen@bücher.example>\n".encode())
    assert re.search(rb"Received: [^\n]*(\n\t[^\n]*)* with UTF8SMTP id ", stored), stored[:600]


def test_smtplib_helo_only_client(mta: Daemon) -> None:
    """An old client that says HELO (no ESMTP) can still send."""
    tok = token()
    with mta.smtp() as s:
        code, _ = s.helo("old.client")
        assert code == 250
        assert s.mail("old@example.org")[0] == 250
        assert s.rcpt(LOCAL_RCPT)[0] == 250
        assert s.data(f"Subject: helo {tok}\r\n\r\nplain old SMTP\r\n")[0] == 250
    stored = mta.wait_for_message(f"helo {tok}")
    _, _, received, _ = split_trace(stored)
    assert b"from old.client" in received
    assert b"with SMTP" in received


def poll_subject(mta: Daemon, subject: str) -> bytes:
    def find() -> list[bytes]:
        return [m for m in mta.maildir_messages() if str(parsed(m)["Subject"]) == subject]

    found = poll(find, 20, 0.1)
    assert found, f"no message with subject {subject!r}:\n{mta.log()}"
    assert len(found) == 1  # type: ignore[arg-type]
    return found[0]  # type: ignore[index]
