"""Delivery to an mbox file: concurrent deliveries must leave a mailbox that parses intact."""

from __future__ import annotations

import mailbox
import re
import threading

import pytest

from .conftest import LOCAL_RCPT, Daemon, accepted_msgid, poll, send, token

CONFIG = """\
table boxrcpts { "@USER@@localhost" }
table aliases { postmaster = "@USER@" }
listen on 127.0.0.1 port @PORT@
action "box" mbox "@MBOX@"
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for rcpt-to <boxrcpts> action "box"
match from local for local action "local"
"""


def mboxrd_unquote(body: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", body)


def body_for(tok: str, client: int, i: int) -> bytes:
    return (
        f"message {i} from client {client} ({tok})\r\n"
        "From the beginning: a line that starts with From\r\n"
        ">From an already quoted line\r\n"
        "\r\n"
        "From \r\n"
        ".\r\n"
        "Ünïcödé 8-bit line\r\n"
        "last line\r\n"
    ).encode()


def parse(path) -> dict[str, tuple[str, bytes]]:
    """Subject -> (From_ line, raw message bytes) for each message in the mbox."""
    box = mailbox.mbox(str(path), create=False)
    try:
        out = {}
        for key, msg in box.iteritems():
            out[str(msg["Subject"])] = (msg.get_from(), box.get_bytes(key))
        return out
    finally:
        box.close()


@pytest.mark.timeout(120)
def test_two_concurrent_clients_twenty_messages_each(daemon: Daemon) -> None:
    daemon.start(CONFIG)
    tok = token()
    errors: list[BaseException] = []
    go = threading.Barrier(2)

    def client(n: int) -> None:
        try:
            with daemon.smtp() as s:
                s.ehlo()
                go.wait(10)
                for i in range(20):
                    s.mail(f"client{n}@example.org", ["BODY=8BITMIME"])
                    code, msg = s.rcpt(LOCAL_RCPT)
                    assert code == 250, msg
                    msg = f"From: client{n}@example.org\r\nSubject: {tok} {n}-{i}\r\n\r\n".encode()
                    accepted_msgid(s.data(msg + body_for(tok, n, i)))
                s.quit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors

    expected = {f"{tok} {n}-{i}" for n in (1, 2) for i in range(20)}

    def complete():
        if not daemon.mbox.exists():
            return None
        found = parse(daemon.mbox)
        return found if set(found) >= expected else None

    found = poll(complete, 60, 0.2)
    assert found, f"mbox incomplete:\n{daemon.mbox.read_bytes()[-2000:]!r}\n{daemon.log()}"
    assert len(found) == 40 and set(found) == expected, sorted(found)
    for n in (1, 2):
        for i in range(20):
            from_line, raw = found[f"{tok} {n}-{i}"]
            assert from_line.startswith(f"client{n}@example.org "), from_line
            head, body = raw.split(b"\n\n", 1)
            assert head.startswith(b"Return-Path: <" + f"client{n}@example.org".encode())
            assert mboxrd_unquote(body) == body_for(tok, n, i).replace(b"\r\n", b"\n"), raw
    assert not (daemon.mbox.parent / (daemon.mbox.name + ".lock")).exists(), (
        "a dotlock was left behind"
    )
    daemon.wait_for_log(r"mda delivery .*result=Ok", count=40)
    assert "result=TempFail" not in daemon.log() and "result=PermFail" not in daemon.log()


def test_mbox_delivery_byte_exact_and_separated(daemon: Daemon) -> None:
    daemon.start(CONFIG)
    tok = token()
    sent = [
        f"Subject: {tok} a\r\n\r\nno final newline".encode(),
        f"Subject: {tok} b\r\n\r\nFrom me\r\n>From you\r\n>>From them\r\n".encode(),
    ]
    for msg in sent:
        accepted_msgid(send(daemon, "", [LOCAL_RCPT], msg))

    def both():
        if not daemon.mbox.exists():
            return None
        found = parse(daemon.mbox)
        return found if len(found) >= 2 else None

    found = poll(both, 20, 0.1)
    assert found, daemon.log()
    assert set(found) == {f"{tok} a", f"{tok} b"}
    from_line, raw = found[f"{tok} a"]
    assert from_line.startswith("MAILER-DAEMON "), from_line
    assert raw.split(b"\n\n", 1)[1].rstrip(b"\n") == b"no final newline"
    _, raw = found[f"{tok} b"]
    assert mboxrd_unquote(raw.split(b"\n\n", 1)[1]) == b"From me\n>From you\n>>From them\n"
    text = daemon.mbox.read_bytes()
    assert text.startswith(b"From MAILER-DAEMON ")
    # every separator line is preceded by an empty line, and only "From " at line start counts
    assert text.count(b"\nFrom ") == 1, text


HOME_PATHS = """\
table aliases { tilde = "@USER@", relbox = "@USER@", tildebox = "@USER@" }
table tildercpts { "tilde@localhost" }
table relrcpts { "relbox@localhost" }
table tildeboxrcpts { "tildebox@localhost" }
listen on 127.0.0.1 port @PORT@
action "tilde" maildir "~/TildeMaildir" alias <aliases>
action "relbox" mbox "relmbox" alias <aliases>
action "tildebox" mbox "~/tilde.mbox" alias <aliases>
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for rcpt-to <tildercpts> action "tilde"
match from local for rcpt-to <relrcpts> action "relbox"
match from local for rcpt-to <tildeboxrcpts> action "tildebox"
match from local for local action "local"
"""


def test_tilde_and_relative_paths_lead_to_the_recipients_home(daemon: Daemon) -> None:
    home = daemon.dir / "user-home"  # not the daemon's working directory (daemon.home)
    home.mkdir(parents=True)
    daemon.env["HOME"] = str(home)
    daemon.start(HOME_PATHS)
    tok = token()
    accepted_msgid(
        send(
            daemon,
            "alice@localhost",
            ["tilde@localhost", "relbox@localhost", "tildebox@localhost"],
            f"Subject: {tok}\r\n\r\nhome paths\r\n".encode(),
        )
    )
    daemon.wait_for_message(tok, home / "TildeMaildir")
    for name in ("relmbox", "tilde.mbox"):
        box = home / name
        assert poll(lambda box=box: box.exists() and tok.encode() in box.read_bytes(), 20), (
            daemon.log()
        )
    assert not (home / "~").exists()
    assert not (daemon.home / "relmbox").exists()
