"""The control socket end to end: the real daemon, ``homemailctl`` as a subprocess, every verb.

The queue holds deferred mail made the way ``test_bounce`` makes it: recipients routed to a
maildir whose ``tmp`` is a plain file fail temporarily (retried at 10 s × n²), and the test
repairs the maildir when it wants them delivered.  Each verb's effect is checked on the daemon
itself (the queue, the mailboxes, SMTP replies), not only on homemailctl's output.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from homemail.ctl import ControlClient, verify_password

from .conftest import (
    FLAKY_CONFIG,
    HOMEMAILCTL,
    LOCAL_RCPT,
    USER,
    Daemon,
    LineReader,
    accepted_msgid,
    ctl_env,
    poll,
    run_ctl,
    send,
    token,
)

pytestmark = pytest.mark.timeout(120)

CONFIG = FLAKY_CONFIG

ALIASES = """\
# aliases for the control tests: this comment must survive every edit
postmaster: @USER@

# flaky mail goes to a maildir that fails temporarily
flaky: @USER@
alice: @USER@
bob: @USER@
"""

SENDER = "sender@example.org"
TEMPFAIL = "4.2.0 maildir: tmp is not a directory"


@dataclass
class Deferred:
    msgid: str
    evpid: str
    token: str


# -- helpers ---------------------------------------------------------------------------------


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def ctl_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(ok(run_ctl(daemon, "--json", *args)))


def queue_json(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """``show queue --json`` by homemailctl: envelope id -> envelope."""
    lines = ok(run_ctl(daemon, "--json", "show", "queue")).splitlines()
    return {env["id"]: env for env in map(json.loads, lines)}


def queue_now(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """The queue, asked in-process (cheap enough to poll)."""
    with ControlClient(str(daemon.socket)) as client:
        out: dict[str, dict[str, Any]] = {}
        for reply in client.stream("show queue"):
            for env in (reply.data or {}).get("items", []):
                out[env["id"]] = env
        return out


def wait_queue(daemon: Daemon, what: str, condition: Any, timeout: float = 15.0) -> dict:
    """Poll the queue until ``condition(queue)`` holds; return that queue."""
    seen: list[dict[str, dict[str, Any]]] = []

    def check() -> bool:
        q = queue_now(daemon)
        if condition(q):
            seen.append(q)
            return True
        return False

    if not poll(check, timeout, 0.05):
        pytest.fail(f"queue never {what} within {timeout} s: {queue_now(daemon)}\n{daemon.log()}")
    return seen[-1]


def flaky_dir(daemon: Daemon) -> Path:
    return daemon.dir / "flaky"


def break_flaky(daemon: Daemon) -> None:
    flaky = flaky_dir(daemon)
    for sub in ("new", "cur"):
        (flaky / sub).mkdir(parents=True, exist_ok=True)
    if (flaky / "tmp").is_dir():
        (flaky / "tmp").rmdir()
    (flaky / "tmp").write_bytes(b"not a directory\n")


def repair_flaky(daemon: Daemon) -> None:
    tmp = flaky_dir(daemon) / "tmp"
    tmp.unlink()
    tmp.mkdir()


def delivered(daemon: Daemon, tok: str, maildir: Path | None = None) -> int:
    return sum(1 for m in daemon.maildir_messages(maildir) if tok.encode() in m)


def defer(daemon: Daemon, n: int) -> list[Deferred]:
    """Queue ``n`` messages for flaky@localhost and wait until each failed once (TempFail)."""
    items: list[tuple[str, str]] = []
    with daemon.smtp() as s:
        s.ehlo()
        for _ in range(n):
            tok = token()
            code, msg = s.mail(SENDER)
            assert code == 250, msg
            code, msg = s.rcpt("flaky@localhost")
            assert code == 250, msg
            reply = s.data(f"Subject: deferred {tok}\r\n\r\nbody {tok}\r\n".encode())
            items.append((accepted_msgid(reply), tok))
    msgids = {m for m, _ in items}

    def all_failed(q: dict[str, dict[str, Any]]) -> bool:
        mine = [e for e in q.values() if e["msgid"] in msgids]
        return len(mine) == n and all(e["retry"] >= 1 for e in mine)

    q = wait_queue(daemon, f"held {n} deferred envelopes", all_failed)
    by_msgid = {e["msgid"]: e["id"] for e in q.values() if e["msgid"] in msgids}
    return [Deferred(m, by_msgid[m], tok) for m, tok in items]


def rcpt_code(daemon: Daemon, rcpt: str) -> int:
    with daemon.smtp() as s:
        s.ehlo()
        code, msg = s.mail(SENDER)
        assert code == 250, msg
        code, _ = s.rcpt(rcpt)
        s.quit()
        return code


def ehlo_size(daemon: Daemon) -> int:
    with daemon.smtp() as s:
        s.ehlo()
        size = s.esmtp_features["size"]
        s.quit()
    return int(size)


def start_monitor(daemon: Daemon, *args: str) -> LineReader:
    proc = subprocess.Popen(
        [*HOMEMAILCTL, "--socket", str(daemon.socket), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ctl_env(daemon),
    )
    return LineReader(proc)


def seen(reader: LineReader, pattern: str, since: int) -> bool:
    reader.mark()
    return any(re.search(pattern, line) for line in reader.lines[since:])


def subscribed(daemon: Daemon, reader: LineReader, pattern: str) -> None:
    """Toggle ``pause mta`` until the monitor shows it: from then on it surely is subscribed."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        since = reader.mark()
        ok(run_ctl(daemon, "pause", "mta"))
        ok(run_ctl(daemon, "resume", "mta"))
        if poll(lambda since=since: seen(reader, pattern, since), 0.5):
            return
    pytest.fail("the monitor never showed an event:\n" + "\n".join(reader.lines))


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def ctld(daemon: Daemon) -> Daemon:
    """The daemon with CONFIG, a file aliases table and a flaky maildir that fails temporarily."""
    daemon.dir.mkdir(parents=True, exist_ok=True)
    (daemon.dir / "aliases").write_text(daemon.render(ALIASES), encoding="utf-8")
    break_flaky(daemon)
    return daemon.start(CONFIG)


# -- show ------------------------------------------------------------------------------------


def test_show_queue_lists_the_deferred_envelopes(ctld: Daemon) -> None:
    deferred = defer(ctld, 3)
    tok = token()
    accepted_msgid(send(ctld, SENDER, ["alice@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()))
    ctld.wait_for_message(tok)  # delivered mail is not in the queue

    lines = ok(run_ctl(ctld, "show", "queue")).splitlines()
    assert len(lines) == 3, lines
    by_id = {line.split("|")[0]: line.split("|") for line in lines}
    assert set(by_id) == {d.evpid for d in deferred}
    for fields in by_id.values():
        assert len(fields) == 10, fields
        _id, kind, sender, rcpt, dest, age, expires, retries, state, error = fields
        assert (kind, sender, rcpt, dest) == ("mda", SENDER, "flaky@localhost", LOCAL_RCPT)
        assert re.fullmatch(r"\d+s", age), age
        assert re.fullmatch(r"3d23h|4d", expires), expires
        assert int(retries) >= 1 and state == "pending", fields
        assert error == TEMPFAIL, fields

    envs = queue_json(ctld)
    assert set(envs) == {d.evpid for d in deferred}
    for d in deferred:
        env = envs[d.evpid]
        assert env["msgid"] == d.msgid and d.evpid.startswith(d.msgid)
        assert env["sender"] == SENDER and env["rcpt"] == "flaky@localhost"
        assert env["state"] == "pending" and env["retry"] >= 1
        assert env["last_error"] == TEMPFAIL
        assert env["next_try"] > env["last_try"] >= env["ctime"]


def test_show_envelope_and_show_message(ctld: Daemon) -> None:
    [d] = defer(ctld, 1)
    text = ok(run_ctl(ctld, "show", "envelope", d.evpid))
    fields = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert fields["evpid"] == d.evpid and fields["msgid"] == d.msgid
    assert fields["rcpt"] == "flaky@localhost" and fields["action"] == "flaky"
    assert fields["sender"] == SENDER and fields["state"] == "pending"
    assert fields["last_error"] == TEMPFAIL

    env = ctl_json(ctld, "show", "envelope", d.evpid.upper())
    assert env["evpid"] == d.evpid and env["retry"] >= 1 and env["action"] == "flaky"

    by_evpid = subprocess.run(
        [*HOMEMAILCTL, "--socket", str(ctld.socket), "show", "message", d.evpid],
        capture_output=True,
        env=ctl_env(ctld),
        timeout=30,
    )
    assert by_evpid.returncode == 0, by_evpid.stderr
    message = by_evpid.stdout
    assert f"Subject: deferred {d.token}".encode() in message
    assert message.endswith(f"body {d.token}\r\n".encode()) or message.endswith(
        f"body {d.token}\n".encode()
    ), message[-80:]
    by_msgid = subprocess.run(
        [*HOMEMAILCTL, "--socket", str(ctld.socket), "show", "message", d.msgid],
        capture_output=True,
        env=ctl_env(ctld),
        timeout=30,
    )
    assert by_msgid.returncode == 0 and by_msgid.stdout == message

    missing = run_ctl(ctld, "show", "envelope", "0123456789abcdef")
    assert missing.returncode == 1 and "no envelope" in missing.stderr, missing
    missing = run_ctl(ctld, "show", "message", "01234567")
    assert missing.returncode == 1 and "no envelope" in missing.stderr, missing
    bad = run_ctl(ctld, "show", "envelope", "not-an-id")
    assert bad.returncode == 64 and "not an envelope or message id" in bad.stderr, bad


def test_show_stats_and_status(ctld: Daemon) -> None:
    defer(ctld, 2)
    tok = token()
    accepted_msgid(send(ctld, SENDER, ["bob@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()))
    ctld.wait_for_message(tok)

    text = ok(run_ctl(ctld, "show", "stats"))
    stats = {k: int(v) for k, v in (line.split("=", 1) for line in text.splitlines())}
    assert stats["queue.size"] == 2, stats
    assert stats["scheduler.delivery.tempfail"] >= 2, stats
    assert stats["scheduler.delivery.ok"] >= 1, stats
    assert stats["queue.commit"] == 3, stats
    assert stats["smtp.session"] >= 2, stats
    # every session has ended: the active count comes back to 0 (the last QUIT may still be
    # settling when the first answer is given)
    assert poll(lambda: ctl_json(ctld, "show", "stats")["smtp.session.active"] == 0, 5), stats
    assert stats["uptime"] >= 0
    as_json = ctl_json(ctld, "show", "stats")
    assert as_json["queue.size"] == 2 and as_json["queue.commit"] == 3, as_json

    status = dict(line.split(": ", 1) for line in ok(run_ctl(ctld, "show", "status")).splitlines())
    assert (status["smtp"], status["mda"], status["mta"]) == ("running",) * 3, status
    assert status["queue"] == "2", status
    as_json = ctl_json(ctld, "show", "status")
    assert as_json["queue"] == 2 and as_json["smtp"] == "running" and as_json["pid"] > 0


def test_show_config_prints_the_running_configuration(ctld: Daemon) -> None:
    text = ok(run_ctl(ctld, "show", "config"))
    assert f"table aliases file:{ctld.dir}/aliases" in text, text
    assert f"listen on 127.0.0.1 port {ctld.port}" in text, text
    assert "match from local for rcpt-to <flakyrcpts> action flaky" in text.replace('"', ""), text
    assert ctl_json(ctld, "show", "config")["text"].rstrip("\n") == text.rstrip("\n")


# -- schedule, remove, pause -----------------------------------------------------------------


def test_schedule_one_envelope_then_all(ctld: Daemon) -> None:
    first, second = defer(ctld, 2)
    out = ok(run_ctl(ctld, "schedule", first.evpid))
    assert out.strip() == "1 envelope scheduled"
    q = wait_queue(ctld, "retried the first envelope", lambda q: q[first.evpid]["retry"] >= 2)
    assert q[second.evpid]["retry"] == 1, "schedule ID retried another envelope too"

    repair_flaky(ctld)
    assert ctl_json(ctld, "schedule", "all") == {"count": 2}
    ctld.wait_for_message(first.token, flaky_dir(ctld))
    ctld.wait_for_message(second.token, flaky_dir(ctld))
    wait_queue(ctld, "emptied", lambda q: not q)
    assert ok(run_ctl(ctld, "show", "queue")) == ""


def test_remove_envelope_is_never_delivered(ctld: Daemon) -> None:
    gone, kept1, kept2 = defer(ctld, 3)
    assert ok(run_ctl(ctld, "remove", gone.evpid)).strip() == "1 envelope removed"
    envs = queue_json(ctld)
    assert set(envs) == {kept1.evpid, kept2.evpid}

    repair_flaky(ctld)  # the cause is fixed: what is left goes, the removed one does not
    assert ok(run_ctl(ctld, "schedule", "all")).strip() == "2 envelopes scheduled"
    ctld.wait_for_message(kept1.token, flaky_dir(ctld))
    ctld.wait_for_message(kept2.token, flaky_dir(ctld))
    wait_queue(ctld, "emptied", lambda q: not q)
    assert delivered(ctld, gone.token, flaky_dir(ctld)) == 0

    ctld.restart()  # nothing of it is left on disk either
    barrier = token()
    accepted_msgid(
        send(ctld, SENDER, ["flaky@localhost"], f"Subject: {barrier}\r\n\r\nx\r\n".encode())
    )
    ctld.wait_for_message(barrier, flaky_dir(ctld))
    assert delivered(ctld, gone.token, flaky_dir(ctld)) == 0
    assert queue_json(ctld) == {}

    missing = run_ctl(ctld, "remove", gone.evpid)
    assert missing.returncode == 1 and "no envelope" in missing.stderr


def test_remove_all_empties_the_queue(ctld: Daemon) -> None:
    deferred = defer(ctld, 3)
    assert ctl_json(ctld, "remove", "all") == {"count": 3}
    assert queue_json(ctld) == {}
    repair_flaky(ctld)
    assert ok(run_ctl(ctld, "schedule", "all")).strip() == "0 envelopes scheduled"
    barrier = token()
    accepted_msgid(
        send(ctld, SENDER, ["flaky@localhost"], f"Subject: {barrier}\r\n\r\nx\r\n".encode())
    )
    ctld.wait_for_message(barrier, flaky_dir(ctld))
    assert all(delivered(ctld, d.token, flaky_dir(ctld)) == 0 for d in deferred)
    stats = ctl_json(ctld, "show", "stats")
    assert stats["queue.size"] == 0, stats


def test_pause_envelope_stays_queued_through_schedule_all(ctld: Daemon) -> None:
    held, other = defer(ctld, 2)
    assert ok(run_ctl(ctld, "pause", "envelope", "all")).strip() == "2 envelopes paused"
    assert {e["state"] for e in queue_json(ctld).values()} == {"paused"}
    assert ctl_json(ctld, "resume", "envelope", "all") == {"count": 2}
    # resuming schedules them at once: both are tried again (and fail again)
    wait_queue(
        ctld,
        "retried both resumed envelopes",
        lambda q: all(e["retry"] >= 2 and e["state"] == "pending" for e in q.values()),
    )

    assert ok(run_ctl(ctld, "pause", "envelope", held.evpid)).strip() == "1 envelope paused"
    repair_flaky(ctld)
    ok(run_ctl(ctld, "schedule", "all"))
    ctld.wait_for_message(other.token, flaky_dir(ctld))
    envs = queue_json(ctld)
    assert list(envs) == [held.evpid], envs
    assert envs[held.evpid]["state"] == "paused"
    assert envs[held.evpid]["retry"] == 2, "a paused envelope was tried"
    assert delivered(ctld, held.token, flaky_dir(ctld)) == 0

    ctld.restart()  # the pause is on disk
    barrier = token()
    accepted_msgid(
        send(ctld, SENDER, ["flaky@localhost"], f"Subject: {barrier}\r\n\r\nx\r\n".encode())
    )
    ctld.wait_for_message(barrier, flaky_dir(ctld))
    assert queue_json(ctld)[held.evpid]["state"] == "paused"
    assert delivered(ctld, held.token, flaky_dir(ctld)) == 0

    assert ok(run_ctl(ctld, "resume", "envelope", held.evpid)).strip() == "1 envelope resumed"
    ctld.wait_for_message(held.token, flaky_dir(ctld))
    wait_queue(ctld, "emptied", lambda q: not q)


def test_schedule_leaves_a_paused_envelope_alone_and_says_so(ctld: Daemon) -> None:
    held, other = defer(ctld, 2)
    assert ok(run_ctl(ctld, "pause", "envelope", held.evpid)).strip() == "1 envelope paused"
    for ident in (held.evpid, held.msgid):
        refused = run_ctl(ctld, "schedule", ident)
        assert refused.returncode == 1, refused
        assert refused.stdout == ""
        assert f"{ident} is paused: resume it first" in refused.stderr, refused.stderr

    repair_flaky(ctld)
    assert ok(run_ctl(ctld, "schedule", "all")).strip() == "1 envelope scheduled"
    ctld.wait_for_message(other.token, flaky_dir(ctld))
    envs = queue_json(ctld)
    assert list(envs) == [held.evpid], envs
    assert envs[held.evpid]["state"] == "paused"
    assert envs[held.evpid]["retry"] == 1, "a paused envelope was tried"
    assert ctl_json(ctld, "schedule", "all") == {"count": 0}
    assert delivered(ctld, held.token, flaky_dir(ctld)) == 0

    assert ok(run_ctl(ctld, "resume", "envelope", held.evpid)).strip() == "1 envelope resumed"
    ctld.wait_for_message(held.token, flaky_dir(ctld))
    wait_queue(ctld, "emptied", lambda q: not q)


def test_pause_mda_holds_new_mail_until_resume(ctld: Daemon) -> None:
    assert ok(run_ctl(ctld, "pause", "mda")).strip() == "mda paused"
    assert ctl_json(ctld, "show", "status")["mda"] == "paused"
    tok = token()
    msgid = accepted_msgid(
        send(ctld, SENDER, ["alice@localhost"], f"Subject: {tok}\r\n\r\nheld\r\n".encode())
    )
    ok(run_ctl(ctld, "schedule", "all"))  # even when asked to, a paused mda delivers nothing
    assert not poll(lambda: delivered(ctld, tok), 1.5), "delivered while the mda was paused"
    [env] = [e for e in queue_json(ctld).values() if e["msgid"] == msgid]
    assert env["retry"] == 0 and env["last_try"] == 0, env

    assert ctl_json(ctld, "resume", "mda") == {}
    ctld.wait_for_message(tok)
    assert "mda: running" in ok(run_ctl(ctld, "show", "status")).splitlines()
    wait_queue(ctld, "emptied", lambda q: not q)


def test_pause_smtp_answers_421_to_mail_from_until_resume(ctld: Daemon) -> None:
    assert ok(run_ctl(ctld, "pause", "smtp")).strip() == "smtp paused"
    assert ctl_json(ctld, "show", "status")["smtp"] == "paused"
    with ctld.raw() as raw:
        assert raw.reply().code == 220
        assert raw.command("EHLO client.test").code == 250
        reply = raw.command("MAIL FROM:<sender@example.org>")
        assert reply.code == 421 and reply.has_enhanced_code, reply
        assert raw.replies_until_close() == []  # 421 means closing (RFC 5321 3.8)
    ctld.wait_for_log(r"smtp disconnected reason=paused")

    assert ok(run_ctl(ctld, "resume", "smtp")).strip() == "smtp resumed"
    assert ctl_json(ctld, "show", "status")["smtp"] == "running"
    tok = token()
    accepted_msgid(send(ctld, SENDER, ["alice@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()))
    ctld.wait_for_message(tok)


def test_pause_and_resume_mta(ctld: Daemon) -> None:
    assert ok(run_ctl(ctld, "pause", "mta")).strip() == "mta paused"
    status = ctl_json(ctld, "show", "status")
    assert (status["mta"], status["mda"], status["smtp"]) == ("paused", "running", "running")
    assert ok(run_ctl(ctld, "resume", "mta")).strip() == "mta resumed"
    assert ctl_json(ctld, "show", "status")["mta"] == "running"


# -- reload, tables, aliases -----------------------------------------------------------------


def test_reload_applies_a_new_config_and_keeps_the_old_on_error(ctld: Daemon) -> None:
    assert ehlo_size(ctld) == 35 * 1024 * 1024
    ctld.write_config(CONFIG + "smtp max-message-size 1M\n")
    assert ok(run_ctl(ctld, "reload")).strip() == "configuration reloaded"
    assert ehlo_size(ctld) == 1024 * 1024
    shown = ok(run_ctl(ctld, "show", "config"))
    assert "smtp max-message-size 1M" in shown

    good = ctld.config_path.read_text()
    ctld.config_path.write_text(good + "this is not a directive\n")
    bad_line = len(good.splitlines()) + 1
    result = run_ctl(ctld, "reload")
    assert result.returncode == 78, result
    assert f"{ctld.config_path}:{bad_line}:" in result.stderr, result.stderr
    assert "error" in result.stderr
    # the running configuration is the previous one, and it still works
    assert ehlo_size(ctld) == 1024 * 1024
    assert ok(run_ctl(ctld, "show", "config")) == shown
    assert ctl_json(ctld, "show", "status")["smtp"] == "running"
    tok = token()
    accepted_msgid(send(ctld, SENDER, ["alice@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()))
    ctld.wait_for_message(tok)

    ctld.config_path.write_text(good.replace("max-message-size 1M", "max-message-size 2M"))
    assert ctl_json(ctld, "reload") == {"reloaded": True}
    assert ehlo_size(ctld) == 2 * 1024 * 1024


def test_update_table_rereads_the_aliases_file(ctld: Daemon) -> None:
    assert rcpt_code(ctld, "carol@localhost") == 550
    aliases = ctld.dir / "aliases"
    aliases.write_text(aliases.read_text() + f"carol: {USER}\n")
    assert rcpt_code(ctld, "carol@localhost") == 550, "the file was read before update table"
    assert ok(run_ctl(ctld, "update", "table", "aliases")).strip() == "table aliases updated"
    assert rcpt_code(ctld, "carol@localhost") == 250
    tok = token()
    accepted_msgid(send(ctld, SENDER, ["carol@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()))
    ctld.wait_for_message(tok)

    assert ctl_json(ctld, "update", "table", "aliases") == {"table": "aliases"}
    missing = run_ctl(ctld, "update", "table", "nosuchtable")
    assert missing.returncode == 1 and "no table" in missing.stderr, missing


def test_alias_list_add_remove_edit_the_file_in_place(ctld: Daemon) -> None:
    aliases = ctld.dir / "aliases"
    original = aliases.read_text()
    listed = ok(run_ctl(ctld, "alias", "list")).splitlines()
    assert listed == [f"{n}: {USER}" for n in ("postmaster", "flaky", "alice", "bob")], listed
    as_json = ctl_json(ctld, "alias", "list")
    assert as_json["file"] == str(aliases)
    assert as_json["aliases"][2] == {"name": "alice", "targets": [USER]}

    assert rcpt_code(ctld, "carol@localhost") == 550
    inode = aliases.stat().st_ino
    assert ok(run_ctl(ctld, "alias", "add", "carol", USER)).strip() == "alias carol added"
    # accepted over SMTP right after, and delivered
    assert rcpt_code(ctld, "carol@localhost") == 250
    tok = token()
    accepted_msgid(send(ctld, SENDER, ["carol@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode()))
    ctld.wait_for_message(tok)
    text = aliases.read_text()
    assert text == original + f"carol: {USER}\n", text  # comments, blank lines, order kept
    assert aliases.stat().st_ino != inode, "the file was rewritten in place, not renamed over"
    assert sorted(p.name for p in ctld.dir.iterdir() if p.name.startswith(".")) == []

    assert ctl_json(ctld, "alias", "add", "carol", "bob", f"{USER}+tag@localhost") == {
        "file": str(aliases)
    }
    assert aliases.read_text() == original + f"carol: {USER}, bob, {USER}+tag@localhost\n"

    before = aliases.read_bytes()
    for bad in (["dave", "|/bin/sh -c id"], ["dave", "two words"], ["bad name", USER]):
        result = run_ctl(ctld, "alias", "add", *bad)
        assert result.returncode == 65, (bad, result)
        assert "invalid alias" in result.stderr, result.stderr
        assert aliases.read_bytes() == before, f"{bad} changed the file"
    assert rcpt_code(ctld, "dave@localhost") == 550

    assert ok(run_ctl(ctld, "alias", "remove", "alice")).strip() == "alias alice removed"
    assert rcpt_code(ctld, "alice@localhost") == 550
    text = aliases.read_text()
    assert text == original.replace(f"alice: {USER}\n", "") + (
        f"carol: {USER}, bob, {USER}+tag@localhost\n"
    )
    assert text.startswith("# aliases for the control tests: this comment must survive")
    assert "# flaky mail goes to a maildir that fails temporarily\n" in text

    missing = run_ctl(ctld, "alias", "remove", "alice")
    assert missing.returncode == 1 and "no alias" in missing.stderr, missing


def test_alias_add_refuses_targets_mail_could_not_be_delivered_to(ctld: Daemon) -> None:
    """A remote address, a file, a command, or a name that is no user and no alias: mail to
    the alias would be refused at RCPT, so the alias is refused and the file left alone."""
    aliases = ctld.dir / "aliases"
    before = aliases.read_bytes()
    refusals = {
        "friend@example.com": "remote addresses need relaying",
        "/tmp/file": "files and commands are not supported yet",
        "|cmd": "files and commands are not supported yet",
        "nosuchname": "no such user or alias",
        "nosuchname@localhost": "no such user or alias",
    }
    for target, why in refusals.items():
        for name in ("dave", "bob"):  # a new alias, and a target added to an existing one
            result = run_ctl(ctld, "alias", "add", name, USER, target)
            assert result.returncode == 65, (target, result)
            assert f"alias {name!r} not added" in result.stderr, result.stderr
            assert why in result.stderr and repr(target) in result.stderr, result.stderr
            assert aliases.read_bytes() == before, f"{target} changed the file"
    assert rcpt_code(ctld, "dave@localhost") == 550
    assert rcpt_code(ctld, "bob@localhost") == 250

    # a target that is an alias (itself a user's) or a user's sub-address is fine
    assert ok(run_ctl(ctld, "alias", "add", "dave", "alice", f"{USER}+x")).strip() == (
        "alias dave added"
    )
    assert ok(run_ctl(ctld, "alias", "add", "erin", "dave")).strip() == "alias erin added"
    assert rcpt_code(ctld, "erin@localhost") == 250


def test_an_alias_edit_that_would_break_another_alias_is_refused(ctld: Daemon) -> None:
    """postmaster must stay deliverable (RFC 5321 4.5.1): an alias named like its user that
    loops back, or removing an alias others lead to, would leave them nowhere to go."""
    aliases = ctld.dir / "aliases"
    ok(run_ctl(ctld, "alias", "add", "helpers", USER))
    ok(run_ctl(ctld, "alias", "add", "chain", "helpers"))
    before = aliases.read_bytes()
    looped = run_ctl(ctld, "alias", "add", USER, "postmaster")  # postmaster -> USER -> itself
    assert looped.returncode == 65 and "'postmaster' would fail" in looped.stderr, looped
    removed = run_ctl(ctld, "alias", "remove", "helpers")  # chain leads there
    assert removed.returncode == 65 and "'chain' would fail" in removed.stderr, removed
    comment = run_ctl(ctld, "alias", "add", "#c", USER)  # would be written as a comment line
    assert comment.returncode == 65 and "comment" in comment.stderr, comment
    assert aliases.read_bytes() == before
    assert rcpt_code(ctld, "postmaster@localhost") == 250
    assert rcpt_code(ctld, "chain@localhost") == 250
    ok(run_ctl(ctld, "alias", "remove", "chain"))  # in the right order, both go
    ok(run_ctl(ctld, "alias", "remove", "helpers"))


def all_at_once(ctld: Daemon, commands: list[list[str]]) -> None:
    """Run homemailctl commands at the same time; each must succeed."""
    procs = [
        subprocess.Popen(
            [*HOMEMAILCTL, "--socket", str(ctld.socket), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ctl_env(ctld),
        )
        for args in commands
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (out, err)


def test_concurrent_alias_edits_all_land(ctld: Daemon) -> None:
    aliases = ctld.dir / "aliases"
    names = [f"conc{i}" for i in range(12)]
    all_at_once(ctld, [["alias", "add", name, USER] for name in names])
    text = aliases.read_text()
    assert [n for n in names if f"\n{n}: {USER}\n" not in text] == [], text
    listed = ok(run_ctl(ctld, "alias", "list")).splitlines()
    assert {f"{n}: {USER}" for n in names} <= set(listed), listed

    all_at_once(ctld, [["alias", "remove", name] for name in names])
    assert aliases.read_text() == ctld.render(ALIASES)


# -- monitor ---------------------------------------------------------------------------------


def test_monitor_streams_the_daemons_events(ctld: Daemon) -> None:
    text = start_monitor(ctld, "monitor")
    js = start_monitor(ctld, "--json", "monitor")
    try:
        subscribed(ctld, text, r"^paused subsystem=mta$")
        subscribed(ctld, js, r'"event": "paused"')
        t0, j0 = text.mark(), js.mark()

        tok = token()
        msgid = accepted_msgid(
            send(ctld, SENDER, ["alice@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode())
        )
        text.expect(
            rf"^received msgid={msgid} sender={SENDER} size=\d+ nrcpt=1 users=\S+$", since=t0
        )
        text.expect(rf"^delivery evpid={msgid}\w+ rcpt=alice@localhost .*result=Ok ", since=t0)

        [flaky] = defer(ctld, 1)
        text.expect(
            rf"^delivery evpid={flaky.evpid} rcpt=flaky@localhost .*result=TempFail "
            r"status=4\.2\.0 ",
            since=t0,
        )

        looping = (
            f"Delivered-To: {LOCAL_RCPT}\r\nSubject: loop {tok}\r\n\r\nround and round\r\n"
        ).encode()
        loop_id = accepted_msgid(send(ctld, "alice@localhost", [LOCAL_RCPT], looping))
        text.expect(rf"^delivery evpid={loop_id}\w+ .*result=PermFail status=5\.4\.6", since=t0)
        text.expect(rf"^bounce kind=failure evpid={loop_id}\w+ sender=alice@localhost ", since=t0)
        # the bounce is delivered to the sender: then only the deferred envelope is left
        wait_queue(ctld, "held only the deferred envelope", lambda q: list(q) == [flaky.evpid])

        ok(run_ctl(ctld, "remove", flaky.evpid))
        text.expect(r"^queue size=0$", since=t0)

        ok(run_ctl(ctld, "pause", "smtp"))
        ok(run_ctl(ctld, "resume", "smtp"))
        text.expect(r"^paused subsystem=smtp$", since=t0)
        text.expect(r"^resumed subsystem=smtp$", since=t0)
        ok(run_ctl(ctld, "reload"))
        text.expect(rf"^reloaded config={re.escape(str(ctld.config_path))}$", since=t0)

        # the same stream as JSON, one object a line
        js.expect(r'"event": "reloaded"', since=j0)
        events = [json.loads(line) for line in js.lines[j0:]]
        names = [e["event"] for e in events]
        for name in ("received", "delivery", "bounce", "queue", "paused", "resumed", "reloaded"):
            assert name in names, names
        results = {e["data"]["result"] for e in events if e["event"] == "delivery"}
        assert {"Ok", "TempFail", "PermFail"} <= results, results
        [received] = [e for e in events if e["event"] == "received" and e["data"]["msgid"] == msgid]
        assert received["data"]["sender"] == SENDER and received["data"]["nrcpt"] == 1
        assert text.proc.poll() is None and js.proc.poll() is None, "a monitor ended by itself"
    finally:
        text.stop()
        js.stop()


def test_monitor_counters_prints_a_row_a_second(ctld: Daemon) -> None:
    table = start_monitor(ctld, "monitor", "--counters")
    js = start_monitor(ctld, "--json", "monitor", "--counters")
    try:
        header = table.expect(r"queue\.size", timeout=10).string.split()
        assert {"smtp.session", "smtp.session.active", "queue.size"} <= set(header), header
        t0 = table.mark()
        tok = token()
        accepted_msgid(
            send(ctld, SENDER, ["alice@localhost"], f"Subject: {tok}\r\n\r\nx\r\n".encode())
        )
        ctld.wait_for_message(tok)

        def committed() -> bool:
            table.mark()
            cols: list[str] = []
            for index, line in enumerate(table.lines):
                cells = line.split()
                if "queue.commit" in cells:
                    cols = cells
                elif cols and len(cells) == len(cols) and index >= t0:
                    row = dict(zip(cols, cells, strict=True))
                    if row["queue.commit"] == "1":
                        return True
            return False

        assert poll(committed, 6, 0.1), "no row counted the message:\n" + "\n".join(table.lines)
        js.expect(r'"event": "counters"', timeout=5)
        events = [json.loads(line) for line in js.lines]
        counters = [e["data"] for e in events if e["event"] == "counters"]
        assert "queue.size" in counters[0] and "smtp.session" in counters[0], counters[0]
        assert table.proc.poll() is None
    finally:
        table.stop()
        js.stop()


# -- log, encrypt, errors --------------------------------------------------------------------


def test_log_verbose_and_brief(ctld: Daemon) -> None:
    assert ok(run_ctl(ctld, "log", "verbose")).strip() == "logging verbose"
    mark = ctld.log_mark()
    with ctld.raw() as raw:
        raw.reply()
        assert raw.command("EHLO verbose-check.test").code == 250
        assert raw.command("QUIT").code == 221
    ctld.wait_for_log(r"verbose-check\.test", since=mark)  # every command line is logged

    assert ctl_json(ctld, "log", "brief") == {}
    mark = ctld.log_mark()
    with ctld.raw() as raw:
        raw.reply()
        assert raw.command("EHLO brief-check.test").code == 250
        assert raw.command("QUIT").code == 221
    ctld.wait_for_log(r"smtp disconnected", since=mark)
    assert "brief-check" not in ctld.log()[mark:], ctld.log()[mark:]


def test_encrypt_hashes_a_password(daemon: Daemon) -> None:
    """No daemon is needed (this one is never started)."""
    first = ok(run_ctl(daemon, "encrypt", "correct horse")).strip()
    assert re.fullmatch(r"scrypt\$16384\$8\$1\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+", first), first
    assert verify_password("correct horse", first)
    assert not verify_password("correct horsE", first)
    second = ok(run_ctl(daemon, "encrypt", input="correct horse\n")).strip()
    assert second != first and verify_password("correct horse", second)


def test_without_a_daemon_every_verb_says_so_with_69(daemon: Daemon) -> None:
    for args in (["show", "status"], ["show", "queue"], ["schedule", "all"], ["reload"]):
        result = run_ctl(daemon, *args)
        assert result.returncode == 69, (args, result)
        assert "not running" in result.stderr, result.stderr


def test_unknown_commands_are_usage_errors(ctld: Daemon) -> None:
    for args in (["show"], ["pause", "everything"], ["frobnicate"], ["schedule"]):
        result = run_ctl(ctld, *args)
        assert result.returncode == 64, (args, result)
        assert "usage:" in result.stderr
    assert ctld.running


def exchange(daemon: Daemon, *frames: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Send raw frames on the control socket; the replies, and whether the daemon hung up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket))
        data = b""
        for frame in frames:
            s.sendall(frame)
        closed = False
        try:
            while got := s.recv(65536):
                data += got
            closed = True
        except TimeoutError:
            pass
    return [json.loads(line) for line in data.splitlines()], closed


def test_a_refused_request_is_answered_with_its_own_id(daemon: Daemon) -> None:
    """A client matching replies to requests (the tray app) can tell which request was refused."""
    daemon.start()
    replies, closed = exchange(
        daemon,
        b'{"v": 1, "id": 5, "verb": "show status"}\n',
        b'{"v": 1, "id": 6, "verb": "frobnicate"}\n',
    )
    assert [(r["id"], r["ok"]) for r in replies] == [(5, True), (6, False)], replies
    assert replies[1]["error"]["code"] == 400, replies
    assert "frobnicate" in replies[1]["error"]["message"], replies
    assert closed  # a malformed request still costs the client its connection

    for frame, ident, code in (
        (b'{"v": 1, "id": 41, "verb": ["show", "status"]}\n', 41, 400),
        (b'{"v": 1, "id": 42, "verb": "show status", "args": [1]}\n', 42, 400),
        (b'{"v": 2, "id": 43, "verb": "show status"}\n', 43, 426),
        # no id to answer with: 0, which no client uses for a request
        (b'{"v": 1, "verb": "frobnicate"}\n', 0, 400),
        (b'{"v": 1, "id": "44", "verb": "show status"}\n', 0, 400),
        (b"not json\n", 0, 400),
    ):
        replies, closed = exchange(daemon, frame)
        assert [(r["id"], r["error"]["code"]) for r in replies] == [(ident, code)], (frame, replies)
        assert closed, frame
    assert ok(run_ctl(daemon, "show", "status"))


def test_show_queue_streams_a_large_queue(ctld: Daemon) -> None:
    """Hundreds of envelopes stream out in frames under the 64 KiB limit, all of them."""
    ok(run_ctl(ctld, "pause", "mda"))
    body = b"Subject: many\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", ctld.port, timeout=30) as client:
        for _ in range(4):
            for _ in range(90):
                client.sendmail("alice@localhost", ["alice@localhost", "bob@localhost"], body)
            client.rset()
            client.quit()
            client.connect("127.0.0.1", ctld.port)
    queued = queue_json(ctld)
    assert len(queued) >= 360  # at least one envelope for each of the 360 messages
    assert {env["state"] for env in queued.values()} == {"pending"}
    text = ok(run_ctl(ctld, "show", "queue")).splitlines()
    assert len(text) == len(queued)
    ok(run_ctl(ctld, "resume", "mda"))
