"""Shared pieces of the benchmarks: the servers under test, the load clients, /proc accounting.

Servers (each in a private temporary directory, on its own loopback port, delivering to a
Maildir there):

* :class:`Homemail` - ``homemail run -f CFG --spool DIR --socket PATH --user-mode``.
* :class:`OpenSMTPD` - Debian's ``smtpd -d -f CFG`` unpacked under ``bench/.peers`` by
  ``setup_peers.sh``, with (``backlog=128``) or without (stock: 5) the listen-backlog shim.
* :class:`Postfix` - a private ``master`` with its own config, queue and data directories,
  ``virtual(8)`` delivering to a Maildir owned by the ``hmbench`` user.

Load clients: Postfix's ``smtp-source`` (unpacked, not installed) and :func:`python_load`, a small
asyncio client that speaks the same lock-step SMTP (no pipelining, as smtp-source) and sends the
same message (four header lines, then SIZE bytes of 80-column lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / ".peers"
POSTFIX = PEERS / "postfix"
POSTFIX_LIB = POSTFIX / "usr/lib/postfix"
SMTP_SOURCE = POSTFIX / "usr/sbin/smtp-source"
OPENSMTPD = PEERS / "opensmtpd"
SHIM = PEERS / "listen_backlog.so"
# OpenSMTPD's compiled-in paths (Debian 6.8): the queue, the control socket, the helpers.
OPENSMTPD_SPOOL = Path("/var/spool/smtpd")
OPENSMTPD_SOCKET = Path("/var/run/smtpd.sock")
OPENSMTPD_LIBEXEC = Path("/usr/libexec/opensmtpd")
OPENSMTPD_LOCK = Path("/var/lib/opensmtpd/.homemail-bench.lock")  # see OpenSMTPD._take_lock
DNS_STUB_ADDRESS = "127.53.53.53"
MAILBOX_USER = "hmbench"  # owner of the peers' Maildirs (they never deliver as root)
SENDER = "bench@localhost"
RECIPIENT = "bench@localhost"
CLIENT_NAME = "bench.localdomain"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A server or a load run failed; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Wait until 127.0.0.1:port accepts; return the seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return time.perf_counter() - start
        except OSError:
            time.sleep(0.01)
    raise BenchError(f"nothing listens on port {port} after {timeout:.0f} s")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the servers started are stopped on the way out."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc accounting --------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def tree_pids(root: int) -> list[int]:
    """root and all its descendants, from a scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _started(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields is not None else None  # starttime: stat(5) field 22


def tree_members(root: int) -> dict[int, str | None]:
    """root's descendants with their start times (which tell a reused pid apart)."""
    return {pid: _started(pid) for pid in tree_pids(root)[1:]}


def kill_leftovers(members: dict[int, str | None], workdir: str) -> None:
    """SIGKILL what is left of a stopped server: its descendants as they were (the same start
    time), and the processes of the benchmark's users whose command line names its directory
    (a helper forked after the list was taken), so that nothing writes into the directory
    while it is removed.  Nobody else's process is touched."""
    mine = {pid for pid, started in members.items() if started and _started(pid) == started}
    users = set()
    for name in (MAILBOX_USER, "opensmtpd", "opensmtpq", "postfix"):
        with contextlib.suppress(KeyError):
            users.add(pwd.getpwnam(name).pw_uid)
    marker = workdir.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # the status file's Uid line: /proc/PID itself is root's once a process has
            # changed its user (not dumpable any more)
            with open(f"/proc/{entry}/status", "rb") as f:
                uid = next((line.split()[2] for line in f if line.startswith(b"Uid:")), b"-1")
            if int(uid) not in users:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker in f.read():
                    mine.add(int(entry))
        except OSError:
            continue
    for pid in mine:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)

    def alive(pid: int) -> bool:
        fields = _stat(pid)
        return fields is not None and fields[0] != "Z"

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(pid) for pid in mine):
        time.sleep(0.02)


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of the process tree, including reaped children."""
    total = 0
    for pid in tree_pids(root):
        fields = _stat(pid)
        if fields is not None:
            # utime stime cutime cstime: fields 14-17 of stat(5), 11-14 after the name
            total += sum(int(x) for x in fields[11:15])
    return total / TICKS


def tree_rss(root: int) -> int:
    """Resident bytes of the process tree (sum of each process's RSS).

    Pages a forked child shares with its parent are counted once per process here: for the
    tree's real cost see :func:`tree_pss`.
    """
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


def tree_pss(root: int) -> int:
    """Proportional resident bytes of the process tree (/proc/PID/smaps_rollup ``Pss``).

    Each shared page is divided among the processes that map it, so the sum over a tree counts
    a page its processes share once: what the tree costs the machine.
    """
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


# -- servers -----------------------------------------------------------------------------------


def count_files(path: str) -> int:
    try:
        with os.scandir(path) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


class Server:
    """One server under test in its own directory; start(), then stop()."""

    name = "?"
    label = "?"

    def __init__(self, workdir: str, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.maildir = os.path.join(workdir, "Maildir")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(workdir, "server.log")
        self._log: object = None

    # subclasses fill these
    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        pass

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 30) -> float:
        """Start the server; return the seconds until its port accepted."""
        self.prepare()
        log = open(self.log_path, "ab")
        self._log = log
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            return wait_port(self.port, timeout, self.proc)
        except BenchError as exc:
            self.stop()
            raise BenchError(f"{self.name}: {exc}; log: {self.tail_log()}") from None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def rss(self) -> int:
        return tree_rss(self.pid)

    def delivered(self) -> int:
        return count_files(os.path.join(self.maildir, "new")) + count_files(
            os.path.join(self.maildir, "cur")
        )

    def tail_log(self, n: int = 8) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:])

    def stop(self) -> None:
        # the server's descendants, including those in sessions of their own (OpenSMTPD's
        # delivery helpers), which the process group's SIGKILL below does not reach
        tree = tree_members(self.proc.pid) if self.proc is not None else {}
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc is not None:
            # leftovers of the session (Postfix children finishing after master): end them
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            kill_leftovers(tree, self.workdir)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None


def homemail_command() -> list[str]:
    exe = Path(sys.executable).parent / "homemail"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "homemail.smtpd"]


class Homemail(Server):
    name = "homemail"
    label = "homemail"

    def __init__(self, workdir: str, port: int | None = None, extra: str = "") -> None:
        super().__init__(workdir, port)
        self.config = os.path.join(workdir, "smtpd.conf")
        self.spool = os.path.join(workdir, "spool")
        self.socket = os.path.join(workdir, "control.sock")
        self.extra = extra

    def prepare(self) -> None:
        user = pwd.getpwuid(os.getuid()).pw_name
        with open(self.config, "w") as f:
            f.write(
                f'table aliases {{ bench = "{user}" }}\n'
                f"listen on 127.0.0.1 port {self.port}\n"
                f'action "local" maildir "{self.maildir}" alias <aliases>\n'
                'match from local for local action "local"\n'
                "smtp limit max-mails 1000000\n" + self.extra
            )

    def command(self) -> list[str]:
        return [
            *homemail_command(),
            "run",
            "-f",
            self.config,
            "--spool",
            self.spool,
            "--socket",
            self.socket,
            "--user-mode",
        ]

    def env(self) -> dict[str, str]:
        return dict(os.environ, HOME=self.workdir)


def _mailbox_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(MAILBOX_USER)
    except KeyError:
        raise BenchError(f"no user {MAILBOX_USER}: run bench/setup_peers.sh as root") from None
    return pw.pw_uid, pw.pw_gid


def _own_maildir(path: str) -> None:
    uid, gid = _mailbox_ids()
    for sub in ("", "tmp", "new", "cur"):
        d = os.path.join(path, sub)
        os.makedirs(d, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)


def peers_ready() -> str | None:
    """Why the peers cannot run here, or None."""
    if os.geteuid() != 0:
        return "the peers need root (they drop privileges to their own users)"
    for path in (SMTP_SOURCE, OPENSMTPD / "usr/sbin/smtpd", POSTFIX_LIB / "sbin/master", SHIM):
        if not path.exists():
            return f"{path} is missing: run bench/setup_peers.sh as root"
    return None


class OpenSMTPD(Server):
    """Debian's OpenSMTPD 6.8 in the foreground; backlog 128 through the shim unless stock."""

    def __init__(self, workdir: str, port: int | None = None, stock: bool = False) -> None:
        super().__init__(workdir, port)
        self.stock = stock
        self.name = "opensmtpd-stock" if stock else "opensmtpd"
        self.label = "OpenSMTPD (backlog 5)" if stock else "OpenSMTPD (backlog 128)"
        self.config = os.path.join(workdir, "smtpd.conf")
        self.resolv = os.path.join(workdir, "resolv.conf")
        self._lock_fd = -1

    @staticmethod
    def check_system() -> None:
        if (
            Path("/usr/sbin/smtpd").exists()
            or Path("/lib/systemd/system/opensmtpd.service").exists()
        ):
            raise BenchError(
                "a system OpenSMTPD is installed: its queue /var/spool/smtpd is compiled in, so "
                "the benchmark will not run a second one beside it"
            )
        try:
            socket.socket(socket.AF_UNIX).connect(str(OPENSMTPD_SOCKET))
        except OSError:
            return
        raise BenchError(f"an OpenSMTPD answers on {OPENSMTPD_SOCKET}: stop it first")

    def prepare(self) -> None:
        self.check_system()
        self._take_lock()
        # the queue path is compiled in: start from an empty one, as the benchmark owns it
        if OPENSMTPD_SPOOL.exists():
            shutil.rmtree(OPENSMTPD_SPOOL)
        with contextlib.suppress(FileNotFoundError):
            OPENSMTPD_SOCKET.unlink()
        helper = OPENSMTPD_LIBEXEC / "mail.maildir"
        if not helper.exists():
            # the maildir action runs /usr/libexec/opensmtpd/mail.maildir (compiled in)
            raise BenchError(f"{OPENSMTPD_LIBEXEC} is missing: run bench/setup_peers.sh as root")
        for parent in helper.resolve().parents:  # it runs as MAILBOX_USER
            if not os.stat(parent).st_mode & 0o001:
                raise BenchError(
                    f"{helper} lies under {parent}, which {MAILBOX_USER} cannot enter: "
                    "run bench/setup_peers.sh again (it copies the helpers there)"
                )
        _own_maildir(self.maildir)
        os.chmod(self.workdir, 0o755)
        with open(self.config, "w") as f:
            f.write(
                f'table aliases {{ bench = "{MAILBOX_USER}" }}\n'
                f"listen on 127.0.0.1 port {self.port}\n"
                f'action "local" maildir "{self.maildir}" alias <aliases>\n'
                'match from local for local action "local"\n'
                # the default, 100 messages per session, would end a one-connection run early
                # (homemail's configuration above raises the same limit; Postfix has none)
                "smtp limit max-mails 1000000\n"
            )
        with open(self.resolv, "w") as f:
            f.write(f"nameserver {DNS_STUB_ADDRESS}\noptions timeout:1 attempts:2\n")

    def command(self) -> list[str]:
        smtpd = OPENSMTPD / "usr/sbin/smtpd"
        # A private mount namespace whose /etc/resolv.conf names the local DNS stub
        # (see dns_stub.py); unshare and sh exec, so the child's pid is smtpd's.
        script = f'mount --bind "{self.resolv}" /etc/resolv.conf && exec "{smtpd}" -d -f "$1"'
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            self.config,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self.stock:
            env["LD_PRELOAD"] = str(SHIM)
            env["LISTEN_BACKLOG_MIN"] = "128"
        return env

    def _take_lock(self) -> None:
        """OpenSMTPD's queue and socket are the machine's, not the checkout's: one benchmark
        at a time runs it (held until stop)."""
        if self._lock_fd >= 0:
            return
        try:
            fd = os.open(OPENSMTPD_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise BenchError(
                f"{OPENSMTPD_LOCK.parent} is missing: run bench/setup_peers.sh as root"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BenchError(
                f"another benchmark is running OpenSMTPD ({OPENSMTPD_LOCK} is locked): its "
                f"queue {OPENSMTPD_SPOOL} is compiled in, so wait for it to end"
            ) from None
        self._lock_fd = fd

    def stop(self) -> None:
        super().stop()
        if self._lock_fd < 0:  # never ours (another benchmark holds them): leave them be
            return
        with contextlib.suppress(FileNotFoundError):
            OPENSMTPD_SOCKET.unlink()
        if OPENSMTPD_SPOOL.exists():
            shutil.rmtree(OPENSMTPD_SPOOL, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1


MASTER_CF = """\
{address} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Queue layout from Postfix's postfix-files: (name, owner is mail_owner, group, mode)
POSTFIX_QUEUE_DIRS = [
    *(
        (d, True, None, 0o700)
        for d in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        )
    ),
    ("maildrop", True, "postdrop", 0o730),
    ("public", True, "postdrop", 0o710),
    ("pid", False, None, 0o755),
]


class Postfix(Server):
    """Postfix 3.7 as Debian builds it, a private master; virtual(8) delivers to a Maildir."""

    name = "postfix"
    label = "Postfix"

    def __init__(self, workdir: str, port: int | None = None) -> None:
        super().__init__(workdir, port)
        self.conf = os.path.join(workdir, "conf")
        self.queue = os.path.join(workdir, "queue")
        self.data = os.path.join(workdir, "data")
        self.log_path = os.path.join(workdir, "maillog")
        self.master_out = os.path.join(workdir, "master.out")

    def prepare(self) -> None:
        import grp

        pf = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
        uid, gid = _mailbox_ids()
        os.chmod(self.workdir, 0o755)
        os.makedirs(self.conf, exist_ok=True)
        os.makedirs(self.queue, exist_ok=True)
        os.chmod(self.queue, 0o755)
        for name, owned, group, mode in POSTFIX_QUEUE_DIRS:
            d = os.path.join(self.queue, name)
            os.makedirs(d, exist_ok=True)
            os.chown(d, pf.pw_uid if owned else 0, postdrop if group else 0)
            os.chmod(d, mode)
        os.makedirs(self.data, exist_ok=True)
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.chmod(self.data, 0o700)
        _own_maildir(self.maildir)
        shutil.copy(POSTFIX / "usr/share/postfix/dynamicmaps.cf", self.conf)
        main = f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
daemon_directory = {POSTFIX_LIB}/sbin
command_directory = {POSTFIX}/usr/sbin
shlib_directory = {POSTFIX_LIB}
meta_directory = {self.conf}
mail_owner = postfix
setgid_group = postdrop
myhostname = {CLIENT_NAME}
mydomain = localdomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = localhost
virtual_mailbox_base = {self.workdir}
virtual_mailbox_maps = inline:{{ {RECIPIENT}=Maildir/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={POSTFIX_LIB}
# the log file must lie under one of these prefixes, or master exits without a word
maillog_file = {self.log_path}
maillog_file_prefixes = {self.workdir}
biff = no
"""
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(main)
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(address=f"127.0.0.1:{self.port}"))

    def command(self) -> list[str]:
        return [str(POSTFIX_LIB / "sbin/master"), "-c", self.conf, "-d"]

    def env(self) -> dict[str, str]:
        return dict(os.environ, LD_LIBRARY_PATH=str(POSTFIX_LIB), MAIL_CONFIG=self.conf)

    def tail_log(self, n: int = 8) -> str:
        text = super().tail_log(n)
        with contextlib.suppress(OSError), open(self.master_out, "rb") as f:
            text += " | " + f.read().decode(errors="replace")[-500:]
        return text

    def start(self, timeout: float = 30) -> float:
        # master's own stdout/stderr (its log goes to maillog via postlogd)
        real_log = self.log_path
        self.log_path = self.master_out
        try:
            return super().start(timeout)
        finally:
            self.log_path = real_log


SERVERS = {
    "homemail": lambda d: Homemail(d),
    "opensmtpd": lambda d: OpenSMTPD(d),
    "opensmtpd-stock": lambda d: OpenSMTPD(d, stock=True),
    "postfix": lambda d: Postfix(d),
}


class DnsStub:
    """The local resolver OpenSMTPD is pointed at (see dns_stub.py)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH / "dns_stub.py"), "--address", DNS_STUB_ADDRESS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            raise BenchError(f"dns_stub.py did not start: {err.strip()[-300:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None


# -- load --------------------------------------------------------------------------------------


@dataclass
class Load:
    sessions: int
    messages: int
    size: int
    reuse: bool  # one connection per session (smtp-source -d) instead of one per message


def smtp_source_argv(port: int, load: Load) -> list[str]:
    argv = [
        str(SMTP_SOURCE),
        "-s", str(load.sessions),
        "-m", str(load.messages),
        "-l", str(load.size),
        "-M", CLIENT_NAME,
        "-f", SENDER,
        "-t", RECIPIENT,
    ]  # fmt: skip
    if load.reuse:
        argv.append("-d")
    return [*argv, f"127.0.0.1:{port}"]


class LoadTimeout(BenchError):
    """The server accepted too slowly (or hung): the client was stopped."""


def load_timeout(load: Load) -> float:
    """How long a load may take: 30 s plus 4 messages a second (stock OpenSMTPD does 6-10)."""
    return 30 + load.messages / 4


def smtp_source_load(port: int, load: Load, timeout: float | None = None) -> float:
    """Run smtp-source; return the seconds from its start to its exit."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(POSTFIX_LIB))
    limit = timeout or load_timeout(load)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            smtp_source_argv(port, load),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=limit,
        )
    except subprocess.TimeoutExpired:
        raise LoadTimeout(
            f"{load.messages} messages not accepted within {limit:.0f} s (hung?)"
        ) from None
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace").strip().splitlines()
        raise BenchError(f"smtp-source exited {proc.returncode}: {' | '.join(out[-3:])}")
    return elapsed


def make_message(size: int, seq: int = 0) -> bytes:
    """Headers like smtp-source's, then SIZE bytes of payload in 80-column lines, dot-safe."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-Id: <{os.getpid()}.{seq}@{CLIENT_NAME}>\r\n\r\n"
    ).encode()
    lines, left, n = [], size, 0
    while left > 0:
        width = min(78, max(0, left - 2))
        lines.append(b"0123456789"[n % 10 : n % 10 + 1] + b"X" * max(0, width - 1) + b"\r\n")
        left -= width + 2
        n += 1
    return head + b"".join(lines)


class SmtpClientError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpClientError("connection closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise SmtpClientError(line.decode(errors="replace").strip())
            return


async def _session(
    port: int, left: list[int], body: bytes, reuse: bool, rcpts: list[str] | None = None
) -> int:
    sent = 0
    reader = writer = None
    rcpt_lines = "".join(f"RCPT TO:<{r}>\r\n" for r in (rcpts or [RECIPIENT])).encode()
    nrcpt = len(rcpts or [RECIPIENT])
    try:
        while left[0] > 0:
            left[0] -= 1
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await _reply(reader, b"220")
                writer.write(f"EHLO {CLIENT_NAME}\r\n".encode())
                await _reply(reader, b"250")
            assert reader is not None
            writer.write(f"MAIL FROM:<{SENDER}>\r\n".encode())
            await _reply(reader, b"250")
            if nrcpt == 1:
                writer.write(rcpt_lines)
                await _reply(reader, b"250")
            else:  # many recipients: pipelined (only used against homemail, which offers it)
                writer.write(rcpt_lines)
                for _ in range(nrcpt):
                    await _reply(reader, b"250")
            writer.write(b"DATA\r\n")
            await _reply(reader, b"354")
            writer.write(body + b".\r\n")
            await _reply(reader, b"250")
            sent += 1
            if not reuse:
                writer.write(b"QUIT\r\n")
                await _reply(reader, b"221")
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                reader = writer = None
        if writer is not None and reader is not None:
            writer.write(b"QUIT\r\n")
            await _reply(reader, b"221")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return sent


async def python_load_async(
    port: int, load: Load, rcpts: list[str] | None = None
) -> tuple[float, int]:
    body = make_message(load.size)
    left = [load.messages]
    start = time.perf_counter()
    sent = await asyncio.gather(
        *(_session(port, left, body, load.reuse, rcpts) for _ in range(load.sessions))
    )
    return time.perf_counter() - start, sum(sent)


def python_load(port: int, load: Load) -> float:
    """The asyncio client; return the seconds from first connect to the last reply."""
    limit = load_timeout(load)
    try:
        elapsed, sent = asyncio.run(asyncio.wait_for(python_load_async(port, load), limit))
    except TimeoutError:
        raise LoadTimeout(
            f"{load.messages} messages not accepted within {limit:.0f} s (hung?)"
        ) from None
    if sent != load.messages:
        raise BenchError(f"python client sent {sent} of {load.messages}")
    return elapsed


def run_load(client: str, port: int, load: Load) -> float:
    if client == "smtp-source":
        return smtp_source_load(port, load)
    return python_load(port, load)


def wait_delivered(server: Server, target: int, timeout: float) -> float:
    """Wait until the Maildir holds target messages; return the time.perf_counter() then."""
    deadline = time.perf_counter() + timeout
    while True:
        n = server.delivered()
        now = time.perf_counter()
        if n >= target:
            return now
        if now > deadline:
            raise BenchError(
                f"{server.name}: only {n} of {target} in the Maildir after {timeout:.0f} s"
            )
        if server.proc is not None and server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited: {server.tail_log()}")
        time.sleep(0.005 if target - n < 50 else 0.02)
