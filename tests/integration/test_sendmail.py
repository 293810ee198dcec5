"""sendmail, mailq and newaliases end to end, as cron and scripts run them.

``sendmail``, ``mailq`` and ``newaliases`` are symlinks to the homemailctl script in a private
``bin`` directory put first on a cron-like ``PATH``; ``homemailctl sendmail …`` is the same
program under its own name.  With the daemon up, mail goes over the control socket; with the
daemon down it goes to the offline spool and is delivered, exactly once, when the daemon starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import homemail

from .conftest import (
    CTL_SCRIPT,
    HOMEMAIL,
    HOMEMAILCTL,
    USER,
    Daemon,
    LineReader,
    accepted_msgid,
    header_values,
    poll,
    send,
    token,
)

pytestmark = pytest.mark.timeout(120)

CONFIG = """\
# sendmail tests
table aliases file:@DIR@/aliases
table flakyrcpts { "flaky@localhost" }
table hiddenrcpts { "hidden@localhost" }
listen on 127.0.0.1 port @PORT@
action "flaky" maildir "@DIR@/flaky" alias <aliases>
action "hidden" maildir "@DIR@/Hidden" alias <aliases>
action "local" maildir "@MAILDIR@" alias <aliases>
match from local for rcpt-to <flakyrcpts> action "flaky"
match from local for rcpt-to <hiddenrcpts> action "hidden"
match from local for local action "local"
"""

ALIASES = """\
# aliases for the sendmail tests
postmaster: @USER@
alice: @USER@
bob: @USER@
hidden: @USER@
flaky: @USER@
"""


# -- helpers ---------------------------------------------------------------------------------

#: The homemail under test: the links run the virtual environment's script, which would import
#: the installed package instead.
PACKAGE_ROOT = str(Path(homemail.__file__).resolve().parent.parent)


@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    """sendmail, mailq and newaliases: symlinks to the homemailctl script, as a package installs."""
    assert CTL_SCRIPT.exists(), f"no homemailctl script next to {HOMEMAILCTL}"
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("sendmail", "mailq", "newaliases"):
        (d / name).symlink_to(CTL_SCRIPT)
    return d


def prepare(daemon: Daemon) -> Daemon:
    daemon.dir.mkdir(parents=True, exist_ok=True)
    (daemon.dir / "aliases").write_text(daemon.render(ALIASES), encoding="utf-8")
    flaky = daemon.dir / "flaky"
    for sub in ("new", "cur"):
        (flaky / sub).mkdir(parents=True, exist_ok=True)
    (flaky / "tmp").write_bytes(b"not a directory: deliveries here fail temporarily\n")
    daemon.write_config(CONFIG)
    return daemon


@pytest.fixture
def sm(daemon: Daemon) -> Daemon:
    return prepare(daemon).start(write=False)


def cron_env(daemon: Daemon, bindir: Path, **extra: str) -> dict[str, str]:
    """What cron gives a job (a short PATH, HOME, LOGNAME, SHELL), plus the daemon's socket
    (and PYTHONPATH, for the code under test)."""
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(daemon.home),
        "LOGNAME": USER,
        "SHELL": "/bin/sh",
        "HOMEMAIL_SOCKET": str(daemon.socket),
        "PYTHONPATH": PACKAGE_ROOT,
    }
    env.update(extra)
    return env


def shell(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def run(
    args: list[str], env: dict[str, str], stdin: str | bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run(args, input=data, capture_output=True, env=env, timeout=60)


def ok(result: subprocess.CompletedProcess) -> str:  # type: ignore[type-arg]
    out = result.stdout
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout: {out!r}\nstderr: {result.stderr!r}"
    )
    return out.decode() if isinstance(out, bytes) else out


def spooled(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def copies(daemon: Daemon, tok: str, maildir: Path | None = None) -> int:
    return sum(1 for m in daemon.maildir_messages(maildir) if tok.encode() in m)


def barrier(daemon: Daemon) -> None:
    """Send a message and wait for it: whatever was due before has been tried by then."""
    tok = token()
    accepted_msgid(
        send(
            daemon,
            "barrier@example.org",
            ["bob@localhost"],
            f"Subject: {tok}\r\n\r\n.\r\n".encode(),
        )
    )
    daemon.wait_for_message(tok)


def rcpt_code(daemon: Daemon, rcpt: str) -> int:
    with daemon.smtp() as s:
        s.ehlo()
        code, msg = s.mail("x@example.org")
        assert code == 250, msg
        code, _ = s.rcpt(rcpt)
        s.quit()
        return code


def assert_submitted_headers(stored: bytes) -> None:
    """sendmail added what the message lacked: From (the user), Date and Message-ID."""
    [date] = header_values(stored, "date")
    assert re.match(rb"^\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}$", date), date
    [mid] = header_values(stored, "message-id")
    assert re.match(rb"^<[^<>@\s]+@[^<>@\s]+>$", mid), mid


# -- with the daemon up ----------------------------------------------------------------------


def test_cron_pipeline_sendmail_t_oi(sm: Daemon, bindir: Path) -> None:
    tok = token()
    script = (
        f"printf 'To: Alice <alice@localhost>\\nBcc: hidden@localhost\\nSubject: cron {tok}\\n"
        f"\\nhello\\n' | sendmail -t -oi"
    )
    result = shell(script, cron_env(sm, bindir), sm.home)
    assert result.returncode == 0 and result.stderr == "", result

    stored = sm.wait_for_message(tok)
    assert header_values(stored, "to") == [b"Alice <alice@localhost>"]
    assert header_values(stored, "bcc") == [], "Bcc was not removed with -t"
    [sender] = header_values(stored, "from")
    assert re.fullmatch(
        rf"(.* )?<{re.escape(USER)}@[^<>\s]+>|{re.escape(USER)}@\S+".encode(), sender
    ), sender
    assert_submitted_headers(stored)
    return_path = stored.split(b"\n", 1)[0]
    assert re.fullmatch(rf"Return-Path: <{re.escape(USER)}@[^<>\s]+>".encode(), return_path)
    assert stored.rstrip(b"\n").endswith(b"\n\nhello")

    # the Bcc recipient got it too, without the Bcc line
    hidden = sm.wait_for_message(tok, sm.dir / "Hidden")
    assert header_values(hidden, "bcc") == []


def test_sendmail_takes_clustered_flags_and_attached_values(sm: Daemon, bindir: Path) -> None:
    """-U (initial submission) is accepted and ignored; -ti, -tf ADDR and -fADDR are read the
    way Sendmail's getopt reads them."""
    env = cron_env(sm, bindir)
    for flags, sender in (
        ("-U -ti", None),
        ("-Uti -fjob@example.org", "job@example.org"),
        ("-tf job2@example.org -oi", "job2@example.org"),
        ("-itUfjob3@example.org", "job3@example.org"),
    ):
        tok = token()
        message = f"To: alice@localhost\\nSubject: {tok}\\n\\n.\\nafter\\n"
        script = f"printf '{message}' | sendmail {flags}"
        result = shell(script, env, sm.home)
        assert result.returncode == 0 and result.stderr == "", (flags, result)
        stored = sm.wait_for_message(tok)
        assert stored.rstrip(b"\n").endswith(b"\n.\nafter"), (flags, stored)  # -i: dots kept
        return_path = stored.split(b"\n", 1)[0].decode()
        expected = sender or f"{USER}@"
        assert return_path.startswith(f"Return-Path: <{expected}"), (flags, return_path)


def test_sendmail_takes_lines_longer_than_smtp_allows(sm: Daemon, bindir: Path) -> None:
    """Scripts write long lines (HTML, CSV, a long Subject); local enqueue keeps them whole, up
    and down, while an SMTP client's are still refused (test_rejections)."""
    body = "".join(f"{i:05d}," for i in range(500))  # 3,000 octets on one line
    subject_words = " ".join(["word"] * 300)  # a 1,500-octet header line
    env = cron_env(sm, bindir)
    toks = [token(), token()]
    message = f"Subject: long {toks[0]} {subject_words}\n\n{body}\n"
    result = run([str(bindir / "sendmail"), "-oi", "alice@localhost"], env, message)
    assert result.returncode == 0 and result.stderr == b"", result
    sm.stop()
    offline = sm.spool / "offline"
    env = cron_env(sm, bindir, HOMEMAIL_OFFLINE=str(offline))
    message = f"Subject: long {toks[1]} {subject_words}\n\n{body}\n"
    result = run([str(bindir / "sendmail"), "-oi", "alice@localhost"], env, message)
    assert result.returncode == 0 and result.stderr == b"", result
    sm.start(write=False)
    for tok in toks:
        stored = sm.wait_for_message(tok)
        assert f"\n\n{body}\n".encode() in stored
        assert f"Subject: long {tok} {subject_words}\n".encode() in stored


def test_homemailctl_sendmail_with_f_and_F(sm: Daemon) -> None:
    tok = token()
    env = cron_env(sm, Path("/nonexistent"))
    result = run(
        [
            *HOMEMAILCTL,
            "sendmail",
            "-f",
            "bounces@example.org",
            "-F",
            "Backup Job",
            "-oi",
            "alice@localhost",
        ],
        env,
        f"Subject: backup {tok}\n\nall done\n.\nthis line is kept with -oi\n",
    )
    ok(result)
    stored = sm.wait_for_message(tok)
    assert stored.startswith(b"Return-Path: <bounces@example.org>\n"), stored[:100]
    assert header_values(stored, "from") == [b"Backup Job <bounces@example.org>"]
    assert_submitted_headers(stored)
    assert b"\n.\nthis line is kept with -oi\n" in stored

    # without -i a line with a single dot ends the message
    tok2 = token()
    ok(
        run(
            [*HOMEMAILCTL, "sendmail", "bob@localhost"],
            env,
            f"Subject: dot {tok2}\n\nbefore\n.\nafter\n",
        )
    )
    stored = sm.wait_for_message(tok2)
    assert stored.rstrip(b"\n").endswith(b"before") and b"after" not in stored


def test_sendmail_bs_speaks_smtp_on_stdin(sm: Daemon, bindir: Path) -> None:
    tok = token()
    dialogue = (
        "EHLO cron.test\r\nMAIL FROM:<script@example.org>\r\nRCPT TO:<alice@localhost>\r\n"
        f"DATA\r\nSubject: bs {tok}\r\n\r\n..dot-stuffed line\r\n.\r\nQUIT\r\n"
    )
    result = run([str(bindir / "sendmail"), "-bs"], cron_env(sm, bindir), dialogue)
    out = ok(result)
    codes = [line[:4] for line in out.split("\r\n") if line]
    assert codes[0] == "220 ", out
    assert codes[-1] == "221 ", out
    finals = [c for c in codes if c[3] == " "]
    assert finals == ["220 ", "250 ", "250 ", "250 ", "354 ", "250 ", "221 "], out
    stored = sm.wait_for_message(tok)
    assert stored.startswith(b"Return-Path: <script@example.org>\n")
    assert b"\n.dot-stuffed line\n" in stored


def test_sendmail_bs_with_lf_line_endings(sm: Daemon, bindir: Path) -> None:
    """As Sendmail does, -bs takes lines ending in LF alone: they reach the daemon as CR LF."""
    tok = token()
    script = (
        "printf 'EHLO me\\nMAIL FROM:<u@localhost>\\nRCPT TO:<alice@localhost>\\nDATA\\n"
        f"Subject: lf {tok}\\n\\nhello\\n.\\nQUIT\\n' | sendmail -bs"
    )
    out = ok(shell(script, cron_env(sm, bindir), sm.home))
    finals = [line[:4] for line in out.splitlines() if line[3:4] == " "]
    assert finals == ["220 ", "250 ", "250 ", "250 ", "354 ", "250 ", "221 "], out
    stored = sm.wait_for_message(tok)
    assert stored.endswith(b"\n\nhello\n"), stored


def test_sendmail_bs_interactive_dialogue(sm: Daemon, bindir: Path) -> None:
    """The same dialogue, each command written after the reply to the previous one."""
    proc = subprocess.Popen(
        [str(bindir / "sendmail"), "-bs"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=cron_env(sm, bindir),
    )
    out = LineReader(proc)
    assert proc.stdin is not None
    tok = token()
    try:
        out.expect(r"^220 ", timeout=10)
        for line, reply in (
            ("EHLO cron.test", r"^250 "),
            ("MAIL FROM:<script@example.org>", r"^250 2\.1\.0"),
            ("RCPT TO:<alice@localhost>", r"^250 2\.1\.5"),
            ("DATA", r"^354 "),
            (f"Subject: bs {tok}\r\n\r\nbody\r\n.", r"^250 2\.0\.0 \w+ Message accepted"),
            ("QUIT", r"^221 "),
        ):
            mark = out.mark()
            proc.stdin.write(line.encode() + b"\r\n")
            proc.stdin.flush()
            out.expect(reply, since=mark, timeout=10)
        proc.stdin.close()
        assert proc.wait(10) == 0
    finally:
        out.stop()
    sm.wait_for_message(tok)


def queue_two_deferred(sm: Daemon, bindir: Path, env: dict[str, str]) -> None:
    """Two messages from cron to flaky@localhost, deferred once each; then mda paused, so that
    nothing changes while outputs are compared."""
    for tok in (token(), token()):
        ok(
            run(
                [str(bindir / "sendmail"), "-oi", "-f", "cron@example.org", "flaky@localhost"],
                env,
                f"Subject: {tok}\n\nx\n",
            )
        )
    sm.wait_for_log(r"rcpt=<flaky@localhost>.*result=TempFail", count=2)
    ok(run([*HOMEMAILCTL, "pause", "mda"], env))


def test_mailq_empty_and_with_deferred_mail(sm: Daemon, bindir: Path) -> None:
    env = cron_env(sm, bindir)
    for args in (["mailq"], ["sendmail", "-bp"]):
        assert ok(shell(" ".join(args), env, sm.home)) == "Mail queue is empty\n", args
    assert ok(run([*HOMEMAILCTL, "mailq"], env)) == "Mail queue is empty\n"

    queue_two_deferred(sm, bindir, env)

    listing = ok(shell("mailq", env, sm.home))
    assert ok(shell("sendmail -bp", env, sm.home)) == listing
    assert ok(run([*HOMEMAILCTL, "mailq"], env)) == listing
    assert listing.startswith("-Queue ID- ")
    assert listing.count("cron@example.org") == 2, listing
    assert listing.count("flaky@localhost") == 2, listing
    assert listing.count("(4.2.0 maildir: tmp is not a directory)") == 2, listing
    assert listing.rstrip("\n").endswith("-- 2 messages, 2 recipients"), listing
    queued = sm.log()
    for msgid in re.findall(r"smtp message msgid=(\w+)", queued):
        assert re.search(rf"^{msgid}\s", listing, re.MULTILINE), (msgid, listing)


def test_newaliases_reloads_the_aliases_table(sm: Daemon, bindir: Path) -> None:
    aliases = sm.dir / "aliases"
    assert rcpt_code(sm, "carol@localhost") == 550
    aliases.write_text(aliases.read_text() + f"carol: {USER}\n")
    env = cron_env(sm, bindir)
    assert ok(shell("newaliases", env, sm.home)) == "aliases: table updated\n"
    assert rcpt_code(sm, "carol@localhost") == 250
    tok = token()
    ok(run([str(bindir / "sendmail"), "-oi", "carol@localhost"], env, f"Subject: {tok}\n\nx\n"))
    sm.wait_for_message(tok)

    aliases.write_text(aliases.read_text() + f"dave: {USER}\n")
    assert ok(shell("sendmail -bi", env, sm.home)) == "aliases: table updated\n"
    assert rcpt_code(sm, "dave@localhost") == 250


NAMED_ALIASES_CONFIG = """\
# alias tables with names of their own
table myal file:@DIR@/aliases
table staff file:@DIR@/staff
table hiddenrcpts { "hidden@localhost" }
listen on 127.0.0.1 port @PORT@
action "hidden" maildir "@DIR@/Hidden" alias <staff>
action "local" maildir "@MAILDIR@" alias <myal>
match from local for rcpt-to <hiddenrcpts> action "hidden"
match from local for local action "local"
"""


def test_newaliases_reloads_alias_tables_of_any_name(daemon: Daemon, bindir: Path) -> None:
    """The alias tables are whatever the actions name: newaliases re-reads each aliases file."""
    prepare(daemon)
    staff = daemon.dir / "staff"
    staff.write_text(f"helpdesk: {USER}\n", encoding="utf-8")
    sm = daemon.start(NAMED_ALIASES_CONFIG)
    env = cron_env(sm, bindir)
    aliases = sm.dir / "aliases"
    assert rcpt_code(sm, "carol@localhost") == 550
    assert rcpt_code(sm, "hidden@localhost") == 550
    aliases.write_text(aliases.read_text() + f"carol: {USER}\n")
    staff.write_text(staff.read_text() + f"hidden: {USER}\n")
    updated = "staff: table updated\nmyal: table updated\n"  # in the order of the actions
    assert ok(shell("newaliases", env, sm.home)) == updated
    assert rcpt_code(sm, "carol@localhost") == 250
    assert rcpt_code(sm, "hidden@localhost") == 250
    tok = token()
    ok(run([str(bindir / "sendmail"), "-oi", "carol@localhost"], env, f"Subject: {tok}\n\nx\n"))
    sm.wait_for_message(tok)

    aliases.write_text(aliases.read_text() + f"dave: {USER}\n")
    assert ok(shell("sendmail -bi", env, sm.home)) == updated
    assert rcpt_code(sm, "dave@localhost") == 250


def test_newaliases_without_an_aliases_file_says_so(daemon: Daemon, bindir: Path) -> None:
    """Not an error (package scripts run newaliases): there is just nothing to re-read."""
    inline = CONFIG.replace("file:@DIR@/aliases", "{ postmaster = @USER@ }")
    sm = prepare(daemon).start(inline)
    for script in ("newaliases", "sendmail -bi"):
        result = shell(script, cron_env(sm, bindir), sm.home)
        assert result.returncode == 0 and result.stderr == "", result
        assert result.stdout == "no aliases file in the configuration: nothing to re-read\n"


def test_json_of_mailq_and_newaliases(sm: Daemon, bindir: Path) -> None:
    """mailq --json prints the lines of homemailctl --json show queue, newaliases --json the
    daemon's result; by their own names and as homemailctl --json mailq|newaliases."""
    env = cron_env(sm, bindir)
    assert ok(shell("mailq --json", env, sm.home)) == ""  # an empty queue: no lines at all
    queue_two_deferred(sm, bindir, env)

    listing = ok(run([*HOMEMAILCTL, "--json", "show", "queue"], env))
    envelopes = [json.loads(line) for line in listing.splitlines()]
    assert [(e["sender"], e["rcpt"]) for e in envelopes] == [
        ("cron@example.org", "flaky@localhost")
    ] * 2, listing
    assert ok(shell("mailq --json", env, sm.home)) == listing
    assert ok(shell("mailq -v --json", env, sm.home)) == listing
    assert ok(run([*HOMEMAILCTL, "--json", "mailq"], env)) == listing

    for args in (["newaliases", "--json"], [*HOMEMAILCTL, "--json", "newaliases"]):
        command = [str(bindir / args[0]), *args[1:]] if args[0] == "newaliases" else args
        assert json.loads(ok(run(command, env))) == {"tables": ["aliases"]}, args
    result = shell("newaliases --yaml", env, sm.home)
    assert result.returncode == 64 and "usage: newaliases [--json]" in result.stderr, result


def test_json_is_refused_by_commands_without_a_json_form(sm: Daemon, bindir: Path) -> None:
    """encrypt, sendmail and show message say --json does not apply, exit 64, and do nothing."""
    env = cron_env(sm, bindir)
    ok(run([*HOMEMAILCTL, "pause", "mda"], env))
    tok = token()
    ok(run([str(bindir / "sendmail"), "-oi", "bob@localhost"], env, f"Subject: {tok}\n\nx\n"))
    listing = ok(run([*HOMEMAILCTL, "--json", "show", "queue"], env))
    (msgid,) = {json.loads(line)["msgid"] for line in listing.splitlines()}
    for command, args in (
        ("encrypt", ["encrypt", "correct horse"]),
        ("sendmail", ["sendmail", "-oi", "bob@localhost"]),
        ("show message", ["show", "message", msgid]),
    ):
        result = run([*HOMEMAILCTL, "--json", *args], env, f"Subject: {token()}\n\nx\n")
        assert result.returncode == 64, (args, result)
        assert result.stdout == b"", (args, result)
        assert f"--json does not apply to {command}: " in result.stderr.decode(), (args, result)
    # the refused sendmail queued nothing, nor spooled anything for later
    assert ok(run([*HOMEMAILCTL, "--json", "show", "queue"], env)) == listing
    assert spooled(sm.spool / "offline") == []
    ok(run([*HOMEMAILCTL, "resume", "mda"], env))
    sm.wait_for_message(tok)


def test_sendmail_q_flushes_the_queue(sm: Daemon, bindir: Path) -> None:
    env = cron_env(sm, bindir)
    toks = [token(), token()]
    for tok in toks:
        ok(run([str(bindir / "sendmail"), "-oi", "flaky@localhost"], env, f"Subject: {tok}\n\nx\n"))
    sm.wait_for_log(r"rcpt=<flaky@localhost>.*result=TempFail", count=2)
    listing = ok(run([*HOMEMAILCTL, "--json", "show", "queue"], env))
    next_tries = [float(x) for x in re.findall(r'"next_try": ([\d.]+)', listing)]
    assert len(next_tries) == 2, listing

    (sm.dir / "flaky" / "tmp").unlink()
    (sm.dir / "flaky" / "tmp").mkdir()
    assert ok(shell("sendmail -q", env, sm.home)) == "2 envelopes scheduled\n"
    for tok in toks:
        sm.wait_for_message(tok, sm.dir / "flaky")
    assert time.time() < min(next_tries), "delivered by the retry timer, not by sendmail -q"


def test_exit_codes_for_bad_recipients(sm: Daemon, bindir: Path) -> None:
    env = cron_env(sm, bindir)
    sendmail = str(bindir / "sendmail")
    bad = run([sendmail, "-oi", "not an address@@"], env, "Subject: x\n\nx\n")
    assert bad.returncode == 65, bad
    assert b"invalid recipient" in bad.stderr

    tok = token()
    refused = run(
        [sendmail, "-oi", "nosuchuser@localhost", "alice@localhost"], env, f"Subject: {tok}\n\nx\n"
    )
    assert refused.returncode == 67, refused
    assert re.search(rb"nosuchuser@localhost: 550 5\.1\.1", refused.stderr), refused.stderr
    sm.wait_for_message(tok)  # the good recipient still gets it

    only_bad = run([sendmail, "-t", "-oi"], env, "To: nobody-here@localhost\nSubject: x\n\nx\n")
    assert only_bad.returncode == 67, only_bad
    no_rcpt = run([sendmail, "-t", "-oi"], env, "Subject: nobody\n\nx\n")
    assert no_rcpt.returncode == 64, no_rcpt
    offline = sm.spool / "offline"
    assert spooled(offline) == [], "a refused message was spooled"


def test_sendmail_while_smtp_is_paused_is_spooled_then_delivered(sm: Daemon, bindir: Path) -> None:
    env = cron_env(sm, bindir, HOMEMAIL_OFFLINE=str(sm.spool / "offline"))
    ok(run([*HOMEMAILCTL, "pause", "smtp"], env))
    tok = token()
    ok(run([str(bindir / "sendmail"), "-oi", "alice@localhost"], env, f"Subject: {tok}\n\nx\n"))
    assert len(spooled(sm.spool / "offline")) == 1
    assert copies(sm, tok) == 0
    ok(run([*HOMEMAILCTL, "resume", "smtp"], env))
    sm.wait_for_message(tok)
    assert poll(lambda: spooled(sm.spool / "offline") == [], 5)


def test_resumes_at_once_queue_each_spooled_message_once(sm: Daemon, bindir: Path) -> None:
    """Pickups of the offline spool that overlap (resumes at once, the periodic scan) must
    not queue a file twice."""
    env = cron_env(sm, bindir, HOMEMAIL_OFFLINE=str(sm.spool / "offline"))
    ok(run([*HOMEMAILCTL, "pause", "smtp"], env))
    toks = [token() for _ in range(12)]
    for tok in toks:
        ok(run([str(bindir / "sendmail"), "-oi", "alice@localhost"], env, f"Subject: {tok}\n\nx\n"))
    ok(run([*HOMEMAILCTL, "pause", "mda"], env))
    resumes = [
        subprocess.Popen([*HOMEMAILCTL, "resume", "smtp"], env=env, stdout=subprocess.DEVNULL)
        for _ in range(6)
    ]
    assert all(p.wait(30) == 0 for p in resumes)
    assert poll(lambda: spooled(sm.spool / "offline") == [], 10)
    listing = ok(run([*HOMEMAILCTL, "--json", "show", "queue"], env))
    assert len(listing.strip().splitlines()) == len(toks), listing
    ok(run([*HOMEMAILCTL, "resume", "mda"], env))
    for tok in toks:
        sm.wait_for_message(tok)  # fails if there are two


# -- with the daemon down --------------------------------------------------------------------


def test_mailq_without_a_daemon_exits_69(daemon: Daemon, bindir: Path) -> None:
    prepare(daemon)
    env = cron_env(daemon, bindir)
    for script in ("mailq", "sendmail -bp", "newaliases", "sendmail -q"):
        result = shell(script, env, daemon.home)
        assert result.returncode == 69, (script, result)
        assert "not running" in result.stderr, result.stderr


def test_sendmail_while_down_is_delivered_once_when_the_daemon_starts(
    daemon: Daemon, bindir: Path
) -> None:
    prepare(daemon)
    offline = daemon.spool / "offline"
    env = cron_env(daemon, bindir, HOMEMAIL_OFFLINE=str(offline))
    tok = token()
    script = (
        f"printf 'To: alice@localhost\\nBcc: hidden@localhost\\nSubject: offline {tok}\\n"
        f"\\nwritten while the daemon was down\\n' | sendmail -t -oi"
    )
    result = shell(script, env, daemon.home)
    assert result.returncode == 0 and result.stderr == "", result
    tok2 = token()
    ok(
        run(
            [*HOMEMAILCTL, "sendmail", "-f", "job@example.org", "-oi", "bob@localhost"],
            env,
            f"Subject: offline {tok2}\n\nsecond\n",
        )
    )
    assert len(spooled(offline)) == 2

    daemon.start(write=False)
    stored = daemon.wait_for_message(tok)
    assert header_values(stored, "bcc") == []
    assert_submitted_headers(stored)
    daemon.wait_for_message(tok, daemon.dir / "Hidden")
    second = daemon.wait_for_message(tok2)
    assert second.startswith(b"Return-Path: <job@example.org>\n")
    assert poll(lambda: spooled(offline) == [], 5), spooled(offline)

    daemon.restart()
    barrier(daemon)
    assert copies(daemon, tok) == 1 and copies(daemon, tok2) == 1
    assert copies(daemon, tok, daemon.dir / "Hidden") == 1
    assert ok(shell("mailq", env, daemon.home)) == "Mail queue is empty\n"


def test_sendmail_while_down_finds_the_spool_of_the_daemon_behind_its_socket(
    daemon: Daemon, bindir: Path
) -> None:
    """The daemon runs with --spool: sendmail knows only its socket (no HOMEMAIL_OFFLINE), and
    still leaves the message where that daemon reads it at its next start."""
    prepare(daemon).start(write=False)
    link = Path(f"{daemon.socket}.offline")
    assert link.is_symlink() and os.readlink(link) == str(daemon.spool / "offline")
    assert daemon.stop() == 0
    assert link.is_symlink() and not daemon.socket.exists()  # left in place at stop

    env = cron_env(daemon, bindir)
    assert "HOMEMAIL_OFFLINE" not in env
    tok = token()
    script = f"printf 'Subject: behind {tok}\\n\\nwhile down\\n' | sendmail -oi alice@localhost"
    result = shell(script, env, daemon.home)
    assert result.returncode == 0 and result.stderr == "", result
    assert len(spooled(daemon.spool / "offline")) == 1
    assert not (daemon.home / ".local").exists(), "written to the default user-mode spool"

    daemon.start(write=False)
    daemon.wait_for_message(tok)
    assert poll(lambda: spooled(daemon.spool / "offline") == [], 5)


def test_sendmail_while_down_of_a_message_over_the_size_limit_bounces_it_at_start(
    daemon: Daemon, bindir: Path
) -> None:
    """sendmail took it (exit 0) while the daemon was down; the daemon's limit refuses it: the
    sender gets a failure notice with the message's headers instead of the mail vanishing."""
    prepare(daemon)
    daemon.write_config(CONFIG + "smtp max-message-size 64K\n")
    offline = daemon.spool / "offline"
    env = cron_env(daemon, bindir, HOMEMAIL_OFFLINE=str(offline))
    tok = token()
    body = "".join(f"line {i:06d} {'x' * 60}\n" for i in range(2000))  # 148,000 bytes
    script = f"sendmail -f {USER}@localhost -oi bob@localhost alice@localhost"
    result = subprocess.run(
        ["/bin/sh", "-c", script],
        input=f"Subject: big {tok}\n\n{body}",
        capture_output=True,
        text=True,
        env=env,
        cwd=daemon.home,
        timeout=60,
    )
    assert result.returncode == 0 and result.stderr == "", result
    assert len(spooled(offline)) == 1

    daemon.start(write=False)
    dsn = daemon.wait_for_message(f"Subject: big {tok}")
    assert dsn.startswith(b"Return-Path: <>\n")
    assert b"Delivery Status Notification (Failure)" in dsn
    for rcpt in (b"bob@localhost", b"alice@localhost"):
        assert b"Final-Recipient: rfc822; " + rcpt in dsn
    assert b"Status: 5.3.4" in dsn
    assert b"Message too big for system" in dsn and b"the limit is 65536" in dsn
    assert b"line 000000" not in dsn  # headers only
    assert poll(lambda: spooled(offline) == [], 5), spooled(offline)
    assert "offline offline refused" in daemon.log()
    barrier(daemon)
    assert copies(daemon, tok) == 1  # the notice only: the message itself was not queued


class DefaultPathsDaemon(Daemon):
    """The daemon with no --spool and no --socket: the user-mode places under XDG dirs."""

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.spool = Path(self.env["XDG_STATE_HOME"]) / "homemail" / "spool"
        self.socket = Path(self.env["XDG_RUNTIME_DIR"]) / "homemail" / "control.sock"

    def command(self, *, user_mode: bool = True) -> list[str]:
        return [*HOMEMAIL, "run", "-f", str(self.config_path), "--user-mode"]


def test_sendmail_with_the_default_user_mode_paths(tmp_path: Path, bindir: Path) -> None:
    daemon = DefaultPathsDaemon(tmp_path / "daemon")
    try:
        prepare(daemon)
        env = {
            "PATH": f"{bindir}:/usr/bin:/bin",
            "HOME": str(daemon.home),
            "LOGNAME": USER,
            "XDG_STATE_HOME": daemon.env["XDG_STATE_HOME"],
            "XDG_RUNTIME_DIR": daemon.env["XDG_RUNTIME_DIR"],
            "PYTHONPATH": PACKAGE_ROOT,
        }
        tok = token()
        result = shell(
            f"printf 'To: alice@localhost\\nSubject: {tok}\\n\\ndown\\n' | sendmail -t -oi",
            env,
            daemon.home,
        )
        assert result.returncode == 0 and result.stderr == "", result
        assert len(spooled(daemon.spool / "offline")) == 1

        daemon.start(write=False)
        assert daemon.socket.is_socket()
        daemon.wait_for_message(tok)
        assert poll(lambda: spooled(daemon.spool / "offline") == [], 5)

        tok2 = token()  # now the daemon is up: straight over its socket
        mark = daemon.log_mark()
        ok(run([str(bindir / "sendmail"), "-oi", "bob@localhost"], env, f"Subject: {tok2}\n\nup\n"))
        daemon.wait_for_message(tok2)
        assert "offline" not in daemon.log()[mark:]
        assert ok(shell("mailq", env, daemon.home)) == "Mail queue is empty\n"

        daemon.restart()
        barrier(daemon)
        assert copies(daemon, tok) == 1 and copies(daemon, tok2) == 1
    finally:
        daemon.cleanup()


def test_offline_sendmail_options_are_applied_at_pickup(daemon: Daemon) -> None:
    """sendmail -N never while the daemon is down: a recipient refused at pickup gets no
    failure notice; without it, the sender gets one."""
    from homemail import offline

    prepare(daemon)
    spool = daemon.spool / "offline"
    quiet, loud = token(), token()
    sender = f"{USER}@localhost"
    for tok, options in ((quiet, {"notify": "never"}), (loud, {})):
        message = f"From: {sender}\r\nSubject: {tok}\r\n\r\nx\r\n".encode()
        offline.write(str(spool), sender, ["nosuchuser@localhost"], message, options)
    daemon.start(write=False)
    dsn = daemon.wait_for_message(loud)
    assert b"Delivery Status Notification (Failure)" in dsn
    assert not [m for m in daemon.maildir_messages() if quiet.encode() in m]
    assert spooled(spool) == []
