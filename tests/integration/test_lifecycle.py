"""Starting, reloading and stopping the daemon, and checking configurations."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import (
    DEFAULT_CONFIG,
    HOMEMAIL,
    HOMEMAILCTL,
    LOCAL_RCPT,
    USER,
    Daemon,
    accepted_msgid,
    free_port,
    poll,
    port_open,
    run_homemail,
    send,
    token,
)

WITH_CAROL = DEFAULT_CONFIG.replace('bob = "@USER@"', 'bob = "@USER@", carol = "@USER@"')


def rcpt_code(daemon: Daemon, rcpt: str) -> int:
    with daemon.smtp() as s:
        s.ehlo()
        code, msg = s.mail("x@example.org")
        assert code == 250, msg
        code, _ = s.rcpt(rcpt)
        return code


# -- SIGHUP ----------------------------------------------------------------------------------


def test_sighup_reload_adds_an_alias(running: Daemon) -> None:
    assert rcpt_code(running, "carol@localhost") == 550
    running.write_config(WITH_CAROL)
    mark = running.log_mark()
    running.hup()
    running.wait_for_log(r"smtpd reloaded", since=mark)
    assert rcpt_code(running, "carol@localhost") == 250
    tok = token()
    accepted_msgid(
        send(
            running,
            "x@example.org",
            ["carol@localhost"],
            f"Subject: {tok}\r\n\r\nfor carol\r\n".encode(),
        )
    )
    running.wait_for_message(tok)


def test_sighup_reload_with_a_broken_config_keeps_the_old_one(running: Daemon) -> None:
    running.write_config(WITH_CAROL)
    mark = running.log_mark()
    running.hup()
    running.wait_for_log(r"smtpd reloaded", since=mark)

    running.config_path.write_text(
        running.render(WITH_CAROL) + 'action "oops" maildir "/tmp/x" frobnicate\n'
    )
    mark = running.log_mark()
    running.hup()
    [line] = running.wait_for_log(r"^.*smtpd\.conf:\d+:\d+.*$", since=mark)
    assert "error" in line.group(0).lower(), line.group(0)
    assert running.running
    assert rcpt_code(running, "carol@localhost") == 250  # the old configuration is in force
    tok = token()
    accepted_msgid(
        send(
            running,
            "x@example.org",
            ["carol@localhost", LOCAL_RCPT],
            f"Subject: {tok}\r\n\r\nstill working\r\n".encode(),
        )
    )
    assert poll(lambda: [m for m in running.maildir_messages() if tok.encode() in m], 20)

    # fixing the file and reloading again works
    running.write_config(DEFAULT_CONFIG)
    mark = running.log_mark()
    running.hup()
    running.wait_for_log(r"smtpd reloaded", since=mark)
    assert rcpt_code(running, "carol@localhost") == 550


def test_sighup_reload_keeps_open_sessions(running: Daemon) -> None:
    tok = token()
    with running.smtp() as s:
        s.ehlo()
        assert s.mail("x@example.org")[0] == 250
        assert s.rcpt(LOCAL_RCPT)[0] == 250
        running.write_config(WITH_CAROL)
        mark = running.log_mark()
        running.hup()
        running.wait_for_log(r"smtpd reloaded", since=mark)
        assert s.rcpt("carol@localhost")[0] == 250
        assert s.data(f"Subject: {tok}\r\n\r\nacross a reload\r\n".encode())[0] == 250
    assert poll(lambda: [m for m in running.maildir_messages() if tok.encode() in m], 20)


def test_sighup_moving_the_listener_keeps_its_open_session(running: Daemon) -> None:
    # The reload must not wait for the sessions of a listener it closes (asyncio's wait_closed
    # does from Python 3.12; on 3.11 and uvloop it returns at once), and the address it frees
    # can be bound again while such a session is still open.
    old_port, new_port = running.port, free_port()
    first, second = token(), token()
    with running.smtp() as s:
        s.ehlo()
        assert s.mail("x@example.org")[0] == 250
        mark = running.log_mark()
        running.write_config(DEFAULT_CONFIG.replace("port @PORT@", f"port {new_port}"))
        running.hup()
        running.wait_for_log(r"smtpd reloaded", since=mark)
        assert port_open(new_port)
        assert not port_open(old_port)
        # the session on the listener that went away carries on...
        assert s.rcpt(LOCAL_RCPT)[0] == 250
        assert s.data(f"Subject: {first}\r\n\r\non the old port\r\n".encode())[0] == 250
        # ...and its address can be taken back while it is still open
        mark = running.log_mark()
        running.write_config(DEFAULT_CONFIG)
        running.hup()
        running.wait_for_log(r"smtpd reloaded", since=mark)
        assert port_open(old_port)
        assert not port_open(new_port)
        assert s.noop()[0] == 250
    accepted_msgid(
        send(running, "x@example.org", [LOCAL_RCPT], f"Subject: {second}\r\n\r\nback\r\n".encode())
    )
    running.wait_for_message(first)
    running.wait_for_message(second)


def test_sighup_to_a_port_in_use_keeps_the_running_listener(running: Daemon) -> None:
    import socket

    old_port, new_port = running.port, free_port()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", new_port))
    blocker.listen(1)
    try:
        mark = running.log_mark()
        running.write_config(DEFAULT_CONFIG.replace("port @PORT@", f"port {new_port}"))
        running.hup()
        running.wait_for_log(r"reload failed, keeping the running configuration", since=mark)
        assert port_open(old_port)
        assert rcpt_code(running, LOCAL_RCPT) == 250
    finally:
        blocker.close()
    mark = running.log_mark()
    running.hup()  # tried again, not taken as already done
    running.wait_for_log(r"smtpd reloaded", since=mark)
    assert port_open(new_port) and not port_open(old_port)


# -- SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_exits_zero_and_closes_the_port(running: Daemon) -> None:
    tok = token()
    accepted_msgid(
        send(
            running,
            "x@example.org",
            [LOCAL_RCPT],
            f"Subject: {tok}\r\n\r\nbefore stop\r\n".encode(),
        )
    )
    running.wait_for_message(tok)
    assert running.stop() == 0
    assert not port_open(running.port)
    assert "Traceback" not in running.log()


def test_sigterm_lets_an_open_session_finish(running: Daemon) -> None:
    tok = token()
    with running.smtp() as s:
        s.ehlo()
        assert s.mail("x@example.org")[0] == 250
        assert s.rcpt(LOCAL_RCPT)[0] == 250
        running.signal(signal.SIGTERM)
        # new connections are refused once the daemon stops listening...
        assert poll(lambda: not port_open(running.port), 10), "still listening after SIGTERM"
        # ...but the transaction in progress completes
        code, msg = s.data(f"Subject: {tok}\r\n\r\nfinished during shutdown\r\n".encode())
        assert code == 250, msg
        s.quit()
    assert running.proc is not None
    assert running.proc.wait(30) == 0
    # the accepted message is delivered, now or after the next start
    if not [m for m in running.maildir_messages() if tok.encode() in m]:
        running.start(write=False)
    running.wait_for_message(tok)


def test_sigterm_with_an_idle_session_does_not_hang(running: Daemon) -> None:
    """An idle client does not keep the daemon alive forever (drain has a bound), and is told
    why it is being closed."""
    with running.raw() as c:
        assert c.reply().code == 220
        assert c.command("EHLO client.test").code == 250
        assert running.proc is not None
        running.signal(signal.SIGTERM)
        told = c.reply()
        assert told.code == 421 and told.has_enhanced_code, told
        assert c.replies_until_close() == []
        rc = running.proc.wait(40)
    assert rc == 0
    log = running.log()
    assert "smtp disconnected reason=shutdown" in log
    assert log.index("reason=shutdown") < log.index("smtpd stopped")


def test_the_log_says_how_each_session_ended(running: Daemon) -> None:
    with running.smtp() as s:
        s.ehlo()
        s.quit()
    with running.raw() as c:
        assert c.reply().code == 220  # then the client just goes away
    running.wait_for_log(r"smtp disconnected reason=quit")
    running.wait_for_log(r"smtp disconnected reason=disconnected")


def test_second_signal_forces_the_exit(running: Daemon) -> None:
    """With a session still open the first SIGTERM waits for it; a second one exits at once."""
    with running.raw() as c:
        assert c.reply().code == 220
        running.signal(signal.SIGTERM)
        assert poll(lambda: not port_open(running.port), 10)
        running.signal(signal.SIGTERM)
        assert running.proc is not None
        running.proc.wait(5)  # well before the session drain would end
    assert "second signal: exiting now" in running.log()


# -- start-up --------------------------------------------------------------------------------


def test_user_mode_flag(daemon: Daemon) -> None:
    """As root, no --user-mode means system mode, which needs its unprivileged user (a missing
    one is a clear configuration error); as a user it runs in user mode anyway."""
    daemon.write_config()
    cmd = daemon.command(user_mode=False)
    if os.geteuid() == 0:
        result = subprocess.run(
            [*cmd, "--user", "hm-no-such-user"],
            capture_output=True,
            text=True,
            timeout=30,
            env=daemon.env,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 78, result.stderr
        assert "'hm-no-such-user' does not exist" in result.stderr, result.stderr
        assert "useradd" in result.stderr, result.stderr
        assert not port_open(daemon.port)
    else:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=daemon.env,
        )
        try:
            assert poll(lambda: port_open(daemon.port) or proc.poll() is not None, 20)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        finally:
            proc.terminate()
            proc.wait(20)


def test_the_embedded_default_without_xdg_runtime_dir(tmp_path) -> None:
    """The README's command where no XDG_RUNTIME_DIR is set (su, ssh without a login
    manager, cron): the control socket goes under /tmp/homemail-UID, made 0700 by the daemon
    itself; mail to the user lands in ~/Maildir, and homemailctl finds the daemon."""
    runtime = Path(f"/tmp/homemail-{os.getuid()}")
    aside = None
    if runtime.exists():  # this user's own, from another run: out of the way meanwhile
        aside = runtime.with_name(f"{runtime.name}.aside-{token()}")
        runtime.rename(aside)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LOGNAME": USER}
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen(
        [*HOMEMAIL, "run", *(["--user-mode"] if os.geteuid() == 0 else [])],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        socket_path = runtime / "homemail" / "control.sock"
        assert poll(lambda: socket_path.is_socket() or proc.poll() is not None, 20)
        assert proc.poll() is None, (tmp_path / "log").read_text()
        assert (runtime.stat().st_mode & 0o777, runtime.stat().st_uid) == (0o700, os.getuid())
        assert poll(lambda: port_open(2525), 20), (tmp_path / "log").read_text()
        tok = token()
        with smtplib.SMTP("127.0.0.1", 2525, timeout=20) as s:
            s.sendmail("x@example.org", [LOCAL_RCPT], f"Subject: {tok}\r\n\nhello\r\n")
        new = home / "Maildir" / "new"
        assert poll(lambda: new.is_dir() and any(tok in p.read_text() for p in new.iterdir()), 20)
        status = subprocess.run(
            [*HOMEMAILCTL, "show", "status"], capture_output=True, text=True, timeout=30, env=env
        )
        assert status.returncode == 0 and "smtp: running" in status.stdout, status
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        shutil.rmtree(runtime, ignore_errors=True)
        if aside is not None:
            aside.rename(runtime)


def test_start_logs_listening_and_ready(running: Daemon) -> None:
    # the port accepts a moment before the start-up finishes: wait for the ready line
    running.wait_for_log(r"smtpd ready ")
    log = running.log()
    assert f"smtp listening address=127.0.0.1 port={running.port}" in log
    assert log.index("smtp listening") < log.index("smtpd ready")


def test_a_connection_reset_at_once_is_not_logged_as_local(running: Daemon) -> None:
    import socket
    import struct

    running.wait_for_log(r"smtpd ready ")
    mark = running.log_mark()
    for _ in range(20):  # closed with a reset before the daemon could ask for the peer's name
        sock = socket.create_connection(("127.0.0.1", running.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    with smtplib.SMTP("127.0.0.1", running.port) as client:  # after them in the log
        client.noop()
    running.wait_for_log(r"smtp disconnected ", since=mark, count=21)
    connected = re.findall(r"smtp connected address=(\S+)", running.log()[mark:])
    assert len(connected) >= 21
    assert set(connected) <= {"127.0.0.1", "unknown"}, connected


def test_port_in_use_is_a_clear_error(daemon: Daemon, tmp_path) -> None:
    import socket

    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", daemon.port))
    blocker.listen(1)
    try:
        daemon.write_config()
        result = daemon.run_refused()
    finally:
        blocker.close()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert str(daemon.port) in result.stderr or "in use" in result.stderr.lower(), result.stderr


def test_a_second_daemon_on_the_same_spool_is_refused(running: Daemon, tmp_path) -> None:
    """Two daemons on one spool would replay, deliver and delete each other's journal: the
    second start is refused and the first one keeps every message it acknowledged."""
    second = Daemon(tmp_path / "second")
    second.spool = running.spool
    second.write_config()
    proc = subprocess.Popen(
        second.command(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=second.env,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert poll(lambda: proc.poll() is not None or port_open(second.port), 20)
        started = port_open(second.port)
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, stderr = proc.communicate(timeout=30)
        second.cleanup()
    assert not started, "a second daemon started on a spool in use"
    assert proc.returncode != 0 and "in use by another homemail" in stderr, stderr
    tok = token()
    send(running, "x@example.org", [LOCAL_RCPT], f"Subject: {tok}\r\n\r\nkept\r\n".encode())
    running.restart(kill=True)  # what it acknowledged is in its journal, still there
    running.wait_for_message(tok)


def test_run_with_a_bad_config_exits_78(daemon: Daemon) -> None:
    daemon.config_path.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_path.write_text("listen on 127.0.0.1 port 2525\nlisten in localhost\n")
    result = daemon.run_refused()
    assert result.returncode == 78, result.stderr
    assert f"{daemon.config_path}:2:" in result.stderr, result.stderr


def test_listen_on_an_interface_name(daemon: Daemon) -> None:
    """OpenSMTPD's grammar takes an interface name: lo is 127.0.0.1 (and ::1)."""
    daemon.start(DEFAULT_CONFIG.replace("listen on 127.0.0.1", "listen on lo"))
    tok = token()
    accepted_msgid(
        send(daemon, "alice@localhost", [LOCAL_RCPT], f"Subject: {tok}\r\n\r\nx\r\n".encode())
    )
    daemon.wait_for_message(tok)


def test_run_refuses_listeners_on_the_same_address_and_default_port(daemon: Daemon) -> None:
    """Without a port, user mode listens on 2525: the check knows the mode, as run does."""
    daemon.config_path.parent.mkdir(parents=True, exist_ok=True)
    daemon.config_path.write_text("listen on localhost\nlisten on 127.0.0.1 port 2525\n")
    result = daemon.run_refused()
    assert result.returncode == 78, result.stderr
    assert f"{daemon.config_path}:2:11: error: this listener binds 127.0.0.1 port 2525" in (
        result.stderr
    )
    checked = run_homemail("check-config", "--user-mode", "-f", str(daemon.config_path))
    assert checked.returncode == 78, checked
    assert checked.stderr == result.stderr


# -- check-config ----------------------------------------------------------------------------


def test_check_config_ok(tmp_path) -> None:
    cfg = tmp_path / "smtpd.conf"
    cfg.write_text(
        f'table aliases {{ postmaster = "{USER}" }}\n'
        "listen on 127.0.0.1 port 2525\n"
        f'action "local" maildir "{tmp_path}/Maildir" alias <aliases>\n'
        f'action "box" mbox "{tmp_path}/mbox"\n'
        f'table boxrcpts {{ "{USER}@localhost" }}\n'
        'match from local for rcpt-to <boxrcpts> action "box"\n'
        'match from local for local action "local"\n'
        "smtp max-message-size 1M\n"
        "smtp limit max-mails 100 max-rcpt 1000\n"
        "queue ttl 4d\n"
        "bounce warn-interval 4h\n"
    )
    for args in (["check-config", "-f", str(cfg)], ["-n", "-f", str(cfg)]):
        result = run_homemail(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{cfg}: configuration OK", result.stdout


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("listen on 127.0.0.1 port 2525\nlisen on localhost\n", "2:1"),
        ("# comment\n\nlisten on 127.0.0.1 port notaport\n", "3:26"),
        (
            'listen on 127.0.0.1\naction "local" maildir "/tmp/m" alias <nosuch>\n'
            'match for local action "local"\n',
            "2:(39|40)",
        ),
        ('listen on 127.0.0.1\nmatch for local action "nowhere"\n', "2:24"),
        ('listen on 127.0.0.1\ntable t { a = "b"\n', r"[23]:\d+"),
        ("smtp max-message-size lots\n", "1:23"),
        ('listen on 127.0.0.1\n\taction "x" maildir\tfrobnicate\n', r"2:\d+"),
        ('action "x" maildir "/x/%{rcpt.user:badmod}"\n', "1:20"),
        ('action "x" mbox "/x/%{rcpt.user[a:]}"\n', "1:17"),
        ("listen on 999.1.1.1\n", "1:11"),
        ("listen on nosuchif0\n", "1:11"),
        ("listen on localhost port 26201\nlisten on 127.0.0.1 port 26201\n", "2:11"),
    ],
)
def test_check_config_error_has_file_line_column(tmp_path, text: str, where: str) -> None:
    cfg = tmp_path / "smtpd.conf"
    cfg.write_text(text)
    for args in (["check-config", "-f", str(cfg)], ["-n", "-f", str(cfg)]):
        result = run_homemail(*args)
        assert result.returncode == 78, (result.stdout, result.stderr)
        first = result.stderr.splitlines()[0]
        assert re.match(re.escape(str(cfg)) + ":" + where + ": error: ", first), (
            f"expected {cfg}:{where}: error: ..., got {first!r}"
        )
        assert "configuration OK" not in result.stdout


def test_check_config_hint_for_a_typo(tmp_path) -> None:
    cfg = tmp_path / "smtpd.conf"
    cfg.write_text("lisen on localhost\n")
    result = run_homemail("check-config", "-f", str(cfg))
    assert result.returncode == 78
    assert "  hint:" in result.stderr and "listen" in result.stderr, result.stderr


def test_check_config_missing_file(tmp_path) -> None:
    result = run_homemail("check-config", "-f", str(tmp_path / "absent.conf"))
    assert result.returncode == 78, result
    assert "absent.conf" in result.stderr
    assert "Traceback" not in result.stderr


#: Independent mistakes, and statements that fail only because an earlier one did.
SEVERAL_ERRORS = """\
listen on 127.0.0.1 port @PORT@
lisen on localhost
table aliases file:@DIR@/no-such-aliases
action "local" maildir "@MAILDIR@" alias <aliases>
action "box" mbox "@MBOX@" frobnicate
match from local for rcpt-to <boxrcpts> action "box"
match from local for local action "local"
match from local for domain <boxrcpts> action "local"
smtp max-message-size lots
quoted = "unterminated
queue ttl $quoted
"""


def test_check_config_reports_every_error_and_run_refuses_with_the_same(daemon: Daemon) -> None:
    """As OpenSMTPD's smtpd -n: one run lists every mistake, each as FILE:LINE:COL on a line of
    its own.  A use of a table, action or macro whose declaration failed is not reported again,
    and an unknown table is reported once, where it is first used."""
    cfg = daemon.write_config(SEVERAL_ERRORS)
    checked = run_homemail("check-config", "-f", str(cfg))
    assert checked.returncode == 78, checked
    assert "configuration OK" not in checked.stdout
    lines = checked.stderr.splitlines()
    errors = [line for line in lines if not line.startswith("  hint: ")]
    frobnicate = len(daemon.render('action "box" mbox "@MBOX@" ')) + 1
    assert [e.partition(": error: ")[0] for e in errors] == [
        f"{cfg}:{where}" for where in ("2:1", "3:15", f"5:{frobnicate}", "6:31", "9:23", "10:10")
    ], checked.stderr
    messages = [e.partition(": error: ")[2] for e in errors]
    assert messages[0].startswith("unknown keyword 'lisen'"), messages
    assert messages[1].startswith("cannot load table 'aliases'"), messages
    assert messages[2].startswith("unknown action option 'frobnicate'"), messages
    assert messages[3].startswith("unknown table 'boxrcpts'"), messages
    assert messages[4].startswith("the max-message-size is not a valid size"), messages
    assert messages[5].startswith("unterminated quoted string"), messages

    result = daemon.run_refused()
    assert result.returncode == 78, result
    assert result.stderr == checked.stderr
    assert not port_open(daemon.port)


def test_a_file_named_before_the_subcommand_is_the_one_run_uses(daemon: Daemon) -> None:
    """OpenSMTPD's habit, ``homemail -f FILE run``, runs FILE, not the embedded default."""
    command = daemon.command()
    where = command.index("-f")
    config = command[where : where + 2]
    del command[where : where + 2]
    command[command.index("run") : command.index("run")] = config
    daemon.command = lambda **_: command  # type: ignore[method-assign]
    daemon.start()
    tok = token()
    accepted_msgid(
        send(daemon, "alice@localhost", [LOCAL_RCPT], f"Subject: {tok}\r\n\r\nx\r\n".encode())
    )
    daemon.wait_for_message(tok)
    checked = run_homemail("-f", str(daemon.config_path), "check-config")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{daemon.config_path}: configuration OK\n"


def test_two_different_files_before_and_after_the_subcommand_are_refused(tmp_path) -> None:
    for sub in ("run", "check-config"):
        result = run_homemail("-f", str(tmp_path / "a.conf"), sub, "-f", str(tmp_path / "b.conf"))
        assert result.returncode == 2, result
        assert "two configuration files" in result.stderr


def _without_files_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    return env


def test_check_config_writes_nothing(tmp_path) -> None:
    """Without -f, user mode's default names an aliases file run creates; a check does not."""
    home = tmp_path / "home"
    home.mkdir()
    env = _without_files_env(home)
    for extra in ([], ["--user-mode"]) if os.geteuid() == 0 else ([],):
        result = run_homemail("check-config", *extra, env=env)
        assert result.returncode == 0, result.stderr
        assert list(home.iterdir()) == [], f"check-config {extra} wrote {list(home.rglob('*'))}"
    if os.geteuid() == 0:
        assert "does not exist yet" in result.stderr, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="system mode is root's")
def test_check_config_as_root_checks_what_run_would_use(tmp_path) -> None:
    from homemail.config import parse_string
    from homemail.smtpd import SYSTEM_CONFIG, system_default_config

    env = _without_files_env(tmp_path)
    system = run_homemail("check-config", "-v", env=env)
    assert system.returncode == 0, system.stderr
    if os.path.exists(SYSTEM_CONFIG):
        assert system.stdout.endswith(f"{SYSTEM_CONFIG}: configuration OK\n")
    else:
        shown = system.stdout.removesuffix("<embedded>: configuration OK\n")
        assert parse_string(shown) == parse_string(system_default_config())
        assert "listen on localhost\n" in shown  # port 25, system mode's
    user = run_homemail("check-config", "-v", "--user-mode", env=env)
    assert user.returncode == 0, user.stderr
    assert "listen on localhost port 2525\n" in user.stdout
    assert user.stdout.endswith("<embedded>: configuration OK\n")


def test_check_config_verbose_prints_the_effective_configuration(tmp_path) -> None:
    from homemail.config import parse_file, parse_string

    cfg = tmp_path / "smtpd.conf"
    cfg.write_text('listen on 127.0.0.1 port 2526\naction "l" maildir ttl 1h\nmatch action "l"\n')
    for args in (
        ["check-config", "-v", "-f", str(cfg)],
        ["-f", str(cfg), "check-config", "-v"],
        ["-n", "-v", "-f", str(cfg)],  # -n is check-config, with its options
    ):
        result = run_homemail(*args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"# effective configuration of {cfg}\n")
        shown = result.stdout.removesuffix(f"{cfg}: configuration OK\n")
        assert shown != result.stdout
        assert parse_string(shown) == parse_file(str(cfg))


def test_homemail_cli_entry_point_exists() -> None:
    assert HOMEMAIL, "no way to run homemail"
    result = run_homemail("--version")
    assert result.returncode == 0
    assert "homemail" in result.stdout


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_both_event_loops_serve_smtp_and_control(daemon: Daemon, loop: str) -> None:
    """uvloop is the ``speedups`` extra; without it (or with HOMEMAIL_LOOP=asyncio) the pure
    asyncio loop must do everything the same."""
    if loop == "uvloop":
        import uvloop  # noqa: F401  - the test setup installs the speedups extra
    else:
        daemon.env["HOMEMAIL_LOOP"] = "asyncio"
    daemon.start()
    daemon.wait_for_log(rf"smtpd ready .* loop={loop}")
    tok = token()
    accepted_msgid(
        send(daemon, "alice@localhost", [LOCAL_RCPT], f"Subject: {tok}\r\n\r\nx\r\n".encode())
    )
    daemon.wait_for_message(tok)
    status = subprocess.run(
        [sys.executable, "-m", "homemail.ctl", "--socket", str(daemon.socket), "show", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert "smtp: running" in status.stdout


def test_listen_backlog_is_at_least_128(running: Daemon) -> None:
    """OpenSMTPD's backlog of 5 makes 20 clients that connect at once wait on SYN retransmits."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{running.port}"], capture_output=True, text=True, timeout=10
    ).stdout
    backlogs = [int(line.split()[2]) for line in out.splitlines() if line.startswith("LISTEN")]
    assert backlogs, out
    assert min(backlogs) >= 128, out
