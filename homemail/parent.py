"""The processes at the far end of the daemon's channel, and the channel itself.

System mode has the privileged parent (below).  User mode has the **delivery agent**
(:class:`DeliveryAgent`): a child the daemon forks before it starts anything else, which takes
the same ``deliver`` records (plus the action's ``method`` and ``path`` and the user's ``uid``,
``gid`` and ``home``, since it keeps no configuration) and writes the mailboxes from a pool of
threads, as the daemon's own user, so that syncing mailboxes never holds the SMTP process's
interpreter lock.  A message of at most :data:`MAX_INLINE` bytes travels to it inside the record
(after the JSON and a newline, its length in ``inline``) rather than as a memfd: fewer system
calls on the SMTP process's one thread.

Started as root, homemail splits itself in two, as OpenSMTPD does:

- the **parent** (this module, root) reads the configuration, binds the listeners and the control
  socket, forks the worker, and then only answers the worker's requests: it never reads a byte
  from the network.  Each local delivery it is asked for runs in a child it forks, which drops to
  the recipient's uid, gid and groups (plus ``mail`` for an mbox right in /var/mail) before it
  touches the mailbox.  Delivery as root is refused.  It also reads the offline spool (files
  users wrote while the daemon was down), whose files only root may read, and hands their
  contents to the worker; and it sends systemd its READY / RELOADING / STOPPING / STATUS
  notifications.
- the **worker** (:mod:`homemail.smtpd`'s Daemon) drops to the unprivileged user (``_homemail`` by
  default) with setgroups, setgid and setuid right after the fork, checks that it cannot get
  root back, and only then starts serving SMTP, the queue, the scheduler and control requests.

**The channel** is a ``SOCK_SEQPACKET`` socketpair: each record is one JSON object (at most
:data:`MAX_RECORD` bytes) with ``"v": 1`` and a ``"type"``, optionally carrying file descriptors
(SCM_RIGHTS).  Worker → parent: ``ready`` {queued}, ``status`` {queued}, ``deliver`` {id, action,
user, sender, rcpt, dest, evpid, ctime, recovered} with the message as one fd (a memfd),
``offline-done`` {name, ok}, ``alias`` {id, op, name, targets} (the parent edits the
aliases file, which the worker may not write), ``secret`` {id, label, username, password}
(stored by the parent in the root-only secrets file) and ``reload-request``.
Parent → worker: ``result`` {id, ok, permanent, status, text}, ``offline`` {name, refused} with
the checked file as one fd (its header line, then the message or, when ``refused``, its start),
``reload`` {add, remove, moved} with the new listeners' sockets as fds (or {error}), and ``stop``.
The parent validates every request it gets: a compromised worker can only ask for deliveries
the configuration allows — an action that exists, a user that exists, has a home directory and
is neither root nor the worker's own user, and a recipient that the rules and aliases really send
to that user with that action.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pwd
import select
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from homemail import credentials, log, mda, offline
from homemail.address import AddressError, parse_mailbox
from homemail.aliases import UserDb
from homemail.config import Config, ConfigError, aliases_file
from homemail.ruleset import Rejected, Ruleset, Source, source_for
from homemail.table import TableError

if TYPE_CHECKING:
    from homemail.queue import Envelope

VERSION = 1
MAX_RECORD = 64 * 1024
MAX_INLINE = 32 * 1024  # messages up to this size go to the delivery agent inside the record
MAX_FDS = 64
MAX_CHILDREN = 8
MAX_CHILDREN_PER_USER = 3  # so that one recipient's stuck deliveries never hold every slot
DELIVERY_SECONDS = 600.0  # a delivery child still running after this is killed (retried later)
FINISH_SECONDS = 30.0  # at stop, deliveries still running after this are killed
MAX_WAITING = 1024
OFFLINE_SCAN_SECONDS = 60.0
IDLE_TRIM_SECONDS = 2.0  # quiet this long, a process gives freed heap back (trim_heap)
DEFAULT_USER = "_homemail"


# -- the channel -------------------------------------------------------------------------------


class ChannelError(Exception):
    pass


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_record(
    sock: socket.socket,
    record: dict[str, Any],
    fds: list[int] | None = None,
    payload: bytes | None = None,
) -> None:
    """One record; ``payload`` (a small message) travels after it, its length in ``inline``."""
    if payload is not None:
        record = {**record, "inline": len(payload)}
    data = json.dumps({"v": VERSION, **record}, ensure_ascii=True).encode()
    if payload is not None:
        data += b"\n" + payload  # JSON with ensure_ascii has no raw newline of its own
    if len(data) > MAX_RECORD:
        raise ChannelError("record too large")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def recv_record(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One record and its fds; None at EOF; raises ChannelError on a malformed record.

    A record sent with a payload has it, as bytes, under ``"payload"``.
    """
    data, ancdata, flags, _ = sock.recvmsg(MAX_RECORD + 1, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_RECORD:
            raise ChannelError("record truncated")
        head, newline, payload = data.partition(b"\n")
        record = json.loads(head)
        if not isinstance(record, dict) or record.get("v") != VERSION:
            raise ChannelError("bad record version")
        if not isinstance(record.get("type"), str):
            raise ChannelError("record without type")
        if newline or "inline" in record:
            if record.get("inline") != len(payload) or not newline:
                raise ChannelError("bad inline payload")
            record["payload"] = payload  # bytes: only ever read here, never sent on
    except (ValueError, RecursionError, ChannelError):
        for fd in fds:
            os.close(fd)
        raise ChannelError("malformed record") from None
    return record, fds


def _text(record: dict[str, Any], name: str, *, empty_ok: bool = False, limit: int = 1024) -> str:
    value = record.get(name)
    if not isinstance(value, str) or len(value) > limit or (not value and not empty_ok):
        raise ChannelError(f"bad field {name!r}")
    if any(c in value for c in "\r\n\x00"):
        raise ChannelError(f"control character in {name!r}")
    return value


def _int(record: dict[str, Any], name: str) -> int:
    value = record.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ChannelError(f"bad field {name!r}")
    return value


# -- privileges --------------------------------------------------------------------------------


def drop_privileges(entry: pwd.struct_passwd, extra_groups: list[int] | None = None) -> None:
    """Become ``entry`` for good: groups, gid, uid; then prove root cannot be regained."""
    groups = (
        os.getgrouplist(entry.pw_name, entry.pw_gid)
        if extra_groups is None
        else [entry.pw_gid, *extra_groups]
    )
    os.setgroups(sorted(set(groups)))
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    if 0 in os.getresuid() or 0 in os.getresgid() or 0 in os.getgroups():
        raise PermissionError("privileges were not dropped")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PermissionError("could regain root after dropping privileges")


# -- systemd -----------------------------------------------------------------------------------


def sd_notify(message: str) -> None:
    """Send a systemd notification if NOTIFY_SOCKET is set (no dependency; errors ignored)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.send(message.encode())


# -- the parent --------------------------------------------------------------------------------


@dataclass
class _Child:
    pid: int
    request_id: int
    pipe: int
    user: str = ""
    deadline: float = 0.0  # monotonic
    output: bytearray = field(default_factory=bytearray)
    killed: bool = False


class Parent:
    """The root process of system mode after the worker has been forked."""

    def __init__(
        self,
        cfg: Config,
        channel: socket.socket,
        *,
        worker_pid: int,
        spool: str,
        hostname: str,
        config_path: str | None,
        worker_uid: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.channel = channel
        self.worker_pid = worker_pid
        self.spool = spool
        self.hostname = hostname
        self.config_path = config_path
        self.users = UserDb(user_mode=False, daemon_uid=worker_uid)
        self.ruleset = Ruleset(cfg, self.users, hostname)
        self.children: dict[int, _Child] = {}  # by pipe fd
        self.signal_fd = -1
        self.forced = False  # a second SIGTERM: nothing is waited for any more
        self.waiting: list[tuple[dict[str, Any], int]] = []  # deliveries over MAX_CHILDREN
        self.selector = selectors.DefaultSelector()
        self.offline_pending: set[str] = set()
        self.stopping = False
        self.next_scan = 0.0
        self.reload_listeners: Any = None  # set by smtpd: binds what changed, returns fds
        self.secrets_path = ""  # set by smtpd: where smarthost credentials are kept

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signal_fd = rfd
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)
        self.selector.register(rfd, selectors.EVENT_READ, "signal")
        self.selector.register(self.channel, selectors.EVENT_READ, "channel")
        status = 0
        while True:
            deadlines = [c.deadline for c in self.children.values() if not c.killed]
            wake = [t for t in (self.next_scan, *deadlines) if t]
            timeout = max(0.0, min(wake) - time.monotonic()) if wake else None
            for key, _ in self.selector.select(timeout):
                if key.data == "signal":
                    for signum in os.read(rfd, 64):
                        self.on_signal(signum)
                elif key.data == "channel":
                    if not self.on_channel():
                        status = self.worker_exit()
                        self.finish()
                        return status
                else:
                    self.on_child_output(key.fd)
            self.kill_overdue()
            if self.next_scan and time.monotonic() >= self.next_scan:
                try:
                    self.scan_offline()
                except Exception as exc:  # a bug or a file nobody foresaw: root must stay up
                    log.event("parent", "offline", "failed", error=repr(exc))

    def on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.stopping:
                self.forced = True
                if self.worker_pid > 0:  # negative once reaped: never a process group
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.worker_pid, signal.SIGKILL)
                return
            self.stopping = True
            sd_notify("STOPPING=1")
            log.event("parent", "smtpd", "stopping")
            # a record, not a signal: under systemd the worker may have had the SIGTERM too,
            # and a second signal would force it out without draining its sessions
            try:
                send_record(self.channel, {"type": "stop"})
            except OSError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.worker_pid, signal.SIGTERM)
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGCHLD:
            self.reap()

    def reload(self) -> None:
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        from homemail.smtpd import load_config

        try:
            cfg = load_config(self.config_path, system=True)
        except ConfigError as exc:
            log.error(f"reload failed, keeping the running configuration: {exc}")
            sd_notify("READY=1\nSTATUS=reload failed; running the previous configuration")
            with contextlib.suppress(OSError, ChannelError):
                send_record(self.channel, {"type": "reload", "error": str(exc)[:4000]})
            return
        add: list[list[Any]] = []
        remove: list[list[Any]] = []
        moved: list[list[Any]] = []
        fds: list[int] = []
        if self.reload_listeners is not None:
            try:
                add, remove, moved, fds = self.reload_listeners(self.cfg, cfg)
            except OSError as exc:  # nothing was bound or closed: all stays as it runs
                log.error(f"reload failed, keeping the running configuration: {exc}")
                sd_notify("READY=1\nSTATUS=reload failed; running the previous configuration")
                with contextlib.suppress(OSError, ChannelError):
                    send_record(self.channel, {"type": "reload", "error": str(exc)[:4000]})
                return
        self.cfg = cfg
        self.ruleset = Ruleset(cfg, self.users, self.hostname)
        record = {"type": "reload", "add": add, "remove": remove, "moved": moved}
        try:
            send_record(self.channel, record, fds)
        finally:
            for fd in fds:
                os.close(fd)
        sd_notify("READY=1")

    def on_channel(self) -> bool:
        try:
            got = recv_record(self.channel)
        except ChannelError as exc:
            log.event("parent", "channel", "refused", reason=str(exc))
            return True
        except OSError:
            return False
        if got is None:
            return False
        record, fds = got
        try:
            self.handle(record, fds)
        except ChannelError as exc:
            log.event(
                "parent", "channel", "refused", type=str(record.get("type"))[:32], reason=str(exc)
            )
            # temporary: a refusal may come from a table the parent has not re-read yet
            self.fail_request(record, fds, f"refused by the parent: {exc}")
        except Exception as exc:  # the parent must outlive anything a request does to it
            log.event(
                "parent", "channel", "error", type=str(record.get("type"))[:32], error=repr(exc)
            )
            self.fail_request(record, fds, "the parent could not carry out the request")
        return True

    def fail_request(self, record: dict[str, Any], fds: list[int], text: str) -> None:
        """A request that could not be carried out: a temporary failure, its fds closed."""
        if isinstance(record.get("id"), int):
            self.reply_result(record["id"], ok=False, permanent=False, status="4.3.0", text=text)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def handle(self, record: dict[str, Any], fds: list[int]) -> None:
        kind = record["type"]
        if kind != "deliver":
            for fd in fds:  # only deliveries carry a descriptor
                os.close(fd)
            fds = []
        if kind == "ready":
            queued = _int(record, "queued")
            sd_notify(f"READY=1\nSTATUS=queue: {queued}\nMAINPID={os.getpid()}")
            self.next_scan = time.monotonic()
        elif kind == "secret":
            ident = _int(record, "id")
            try:
                credentials.store(
                    self.secrets_path,
                    _text(record, "label"),
                    _text(record, "username"),
                    _text(record, "password"),
                )
            except (credentials.CredentialError, OSError) as exc:
                self.reply_result(ident, ok=False, permanent=True, status="5.5.4", text=str(exc))
                return
            log.event("parent", "credentials", "stored", label=record["label"])
            self.reply_result(ident, ok=True, permanent=False, status="2.0.0", text="stored")
        elif kind == "alias":
            self.edit_alias(record)
        elif kind == "reload-request":
            self.reload()
        elif kind == "status":
            sd_notify(f"STATUS=queue: {_int(record, 'queued')}")
        elif kind == "deliver":
            if len(fds) != 1:
                raise ChannelError("deliver needs exactly one message fd")
            self.validate_delivery(record)
            if not self._may_spawn(record["user"]):
                if len(self.waiting) >= MAX_WAITING:
                    raise ChannelError("too many deliveries waiting")
                self.waiting.append((record, fds[0]))
            else:
                self.spawn(record, fds[0])
        elif kind == "offline-done":
            name = _text(record, "name")
            self.offline_pending.discard(name)
            if record.get("ok") is True:
                offline.discard(self.offline_dir(), name)
        else:
            raise ChannelError(f"unknown record type {kind[:32]!r}")

    def edit_alias(self, record: dict[str, Any]) -> None:
        """The worker may not write /etc/mail/aliases: the parent edits the configured file."""
        from homemail import aliases

        ident = _int(record, "id")
        op = _text(record, "op")
        name = _text(record, "name", limit=256)
        targets = record.get("targets")
        if (
            op not in ("add", "remove")
            or not isinstance(targets, list)
            or not all(isinstance(t, str) for t in targets)
        ):
            raise ChannelError("malformed alias edit")
        path = self.aliases_path()
        try:
            if path is None:
                raise aliases.AliasEditError(409, "the configuration names no aliases file")
            if op == "add":  # checked against the rules here, where the file is written
                aliases.add(path, name, targets, self.ruleset.check_alias)
            else:
                aliases.remove(path, name, self.ruleset.check_alias)
        except aliases.AliasEditError as exc:
            self.reply_result(ident, ok=False, permanent=True, status=str(exc.code), text=str(exc))
            return
        log.event("parent", "aliases", f"alias-{op}", name=name, file=path)
        self.reply_result(ident, ok=True, permanent=False, status="2.0.0", text=path)

    def aliases_path(self) -> str | None:
        return aliases_file(self.cfg)

    # -- deliveries --------------------------------------------------------------------------

    def validate_delivery(self, record: dict[str, Any]) -> pwd.struct_passwd:
        _int(record, "id")
        action_name = _text(record, "action")
        user_name = _text(record, "user")
        rcpt = _text(record, "rcpt")
        dest = _text(record, "dest")
        _text(record, "sender", empty_ok=True)
        _int(record, "evpid")
        _int(record, "ctime")
        action = self.cfg.actions.get(action_name)
        if action is None or action.method not in ("maildir", "mbox"):
            raise ChannelError(f"no local delivery action {action_name!r}")
        try:
            entry = pwd.getpwnam(user_name)
        except KeyError:
            raise ChannelError(f"no user {user_name!r}") from None
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise ChannelError("delivery as root is refused: alias root to a person")
        if self.users.lookup(entry.pw_name) is None:
            raise ChannelError(
                f"user {user_name!r} cannot receive mail (the daemon's own, or without a home)"
            )
        try:
            address = parse_mailbox(rcpt, allow_bare_postmaster=True)
        except AddressError:
            raise ChannelError("malformed recipient") from None
        src = record.get("src")
        src = _text(record, "src", empty_ok=True) if src is not None else ""
        if not self._routes_to(address, action_name, entry.pw_name, dest, src):
            # the worker may have re-read a table (alias add, newaliases): so do we, once
            self.refresh_tables()
            if not self._routes_to(address, action_name, entry.pw_name, dest, src):
                raise ChannelError("the configuration does not deliver this recipient to this user")
        return entry

    def _routes_to(self, address: Any, action: str, user: str, dest: str, src: str) -> bool:
        """Whether the rules send ``address`` to ``user`` with ``action``: from where the mail
        came (its client's address, any listener's tag), or, since an alias may have changed
        since the worker expanded it at RCPT, whether they send ``dest`` (that user at the
        recipient's domain) there.  A worker can claim a source, but not make a rule or an
        action deliver to a user it would not deliver to."""
        tags = [None, *sorted({x.tag for x in self.cfg.listeners if x.tag})]
        sources = [Source("socket", ""), Source("remote", "")]
        if src and src != "local":
            sources += [source_for(src, tag) for tag in tags]
        else:
            sources += [Source("socket", "", tag) for tag in tags[1:]]
        addresses = [address]
        with contextlib.suppress(AddressError):
            own = parse_mailbox(dest)  # the user at the recipient's own domain, as RCPT made it
            if own.domain.lower() == (address.domain or self.hostname).lower():
                addresses.append(own)
        for rcpt in addresses:
            for source in sources:
                try:
                    targets = self.ruleset.route(source, rcpt)
                except Rejected:
                    continue
                if any(t.action == action and t.user == user and t.dest == dest for t in targets):
                    return True
        return False

    def refresh_tables(self) -> None:
        for name, table in list(self.cfg.tables.items()):
            if table.source is not None:
                try:
                    self.cfg.tables[name] = table.reloaded()
                except TableError as exc:
                    log.event("parent", "table", "error", table=name, error=str(exc))
        self.ruleset = Ruleset(self.cfg, self.users, self.hostname)

    def spawn(self, record: dict[str, Any], msgfd: int) -> None:
        entry = pwd.getpwnam(record["user"])
        action = self.cfg.actions[record["action"]]
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the delivery child
            code = 0
            try:
                os.close(rfd)
                self.channel.close()
                signal.set_wakeup_fd(-1)
                result = _deliver_as_user(entry, action, record, msgfd, self.hostname)
                os.write(wfd, json.dumps(result).encode())
            except BaseException:
                code = 70
            finally:
                os._exit(code)
        os.close(wfd)
        os.close(msgfd)
        deadline = time.monotonic() + DELIVERY_SECONDS
        self.children[rfd] = _Child(pid, record["id"], rfd, record["user"], deadline)
        self.selector.register(rfd, selectors.EVENT_READ, "child")

    def _may_spawn(self, user: str) -> bool:
        if len(self.children) >= MAX_CHILDREN:
            return False
        return sum(c.user == user for c in self.children.values()) < MAX_CHILDREN_PER_USER

    def kill_overdue(self) -> None:
        """A delivery that outlives DELIVERY_SECONDS (a stopped or hung child, which its user
        could make one) is killed; its end of the pipe then reports a temporary failure."""
        now = time.monotonic()
        for child in self.children.values():
            if not child.killed and now >= child.deadline:
                child.killed = True
                log.event("parent", "mda", "killed", pid=child.pid, user=child.user,
                          reason="time limit")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    def on_child_output(self, fd: int) -> None:
        child = self.children[fd]
        data = os.read(fd, 65536)
        if data:
            child.output += data
            return
        self.selector.unregister(fd)
        os.close(fd)
        del self.children[fd]
        try:
            result = json.loads(child.output)
            self.reply_result(
                child.request_id,
                ok=result["ok"] is True,
                permanent=result["permanent"] is True,
                status=str(result["status"]),
                text=str(result["text"]),
            )
        except (ValueError, KeyError, TypeError):
            self.reply_result(
                child.request_id,
                ok=False,
                permanent=False,
                status="4.3.0",
                text="delivery took too long" if child.killed else "delivery process failed",
            )
        self.reap()
        while True:
            ready = next((i for i, (r, _) in enumerate(self.waiting) if self._may_spawn(r["user"])),
                         None)
            if ready is None:
                break
            record, msgfd = self.waiting.pop(ready)
            try:
                self.spawn(record, msgfd)
            except OSError as exc:  # fork or pipe failed: this one is retried later
                os.close(msgfd)
                self.reply_result(
                    record["id"],
                    ok=False,
                    permanent=False,
                    status="4.3.0",
                    text=f"cannot start the delivery: {exc.strerror}",
                )

    def reply_result(
        self, request_id: int, *, ok: bool, permanent: bool, status: str, text: str
    ) -> None:
        with contextlib.suppress(OSError):
            send_record(
                self.channel,
                {
                    "type": "result",
                    "id": request_id,
                    "ok": ok,
                    "permanent": permanent,
                    "status": status,
                    "text": log.sanitize(text),
                },
            )

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.worker_pid:
                self.worker_pid = -pid  # remembered as gone

    def worker_exit(self) -> int:
        if self.worker_pid > 0:
            _, status = os.waitpid(self.worker_pid, 0)
            return os.waitstatus_to_exitcode(status)
        return 0

    def finish(self) -> None:
        """Wait for the deliveries still running, for FINISH_SECONDS or until another SIGTERM,
        then kill what is left (its envelopes stay queued for the next start)."""
        deadline = time.monotonic() + FINISH_SECONDS
        pids = {child.pid for child in self.children.values()}
        while pids:
            for pid in list(pids):
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    pids.discard(pid)
            if not pids:
                return
            urgent = False
            if self.signal_fd >= 0:
                ready = select.select([self.signal_fd], [], [], 0.1)[0]
                if ready:
                    with contextlib.suppress(OSError):
                        got = os.read(self.signal_fd, 64)
                        urgent = signal.SIGTERM in got or signal.SIGINT in got
            else:
                time.sleep(0.1)
            if urgent or self.forced or time.monotonic() >= deadline:
                for pid in pids:
                    log.event("parent", "mda", "killed", pid=pid, reason="stopping")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = float("inf")

    # -- the offline spool -------------------------------------------------------------------

    def offline_dir(self) -> str:
        return os.path.join(self.spool, "offline")

    def scan_offline(self) -> None:
        self.next_scan = time.monotonic() + OFFLINE_SCAN_SECONDS
        directory = self.offline_dir()
        with contextlib.suppress(OSError):
            offline.cleanup_stale(directory, 86400)
        try:
            names = offline.pending(directory)
        except OSError:
            return
        for name in names:
            if name in self.offline_pending:
                continue
            try:
                item = offline.read(
                    directory, name, expected_uid=None, max_message=self.cfg.max_message_size
                )
            except offline.OfflineError as exc:
                log.event("offline", "offline", "refused", file=name, reason=str(exc))
                offline.discard(directory, name)
                continue
            fd = _memfd(*offline.encode(item))  # the recipients may not fit in a record
            try:
                send_record(
                    self.channel,
                    {"type": "offline", "name": name, "refused": item.refused},
                    [fd],
                )
                self.offline_pending.add(name)
            except (OSError, ChannelError) as exc:
                log.event("offline", "offline", "failed", file=name, error=str(exc))
            finally:
                os.close(fd)


def _memfd(*parts: bytes) -> int:
    """An fd holding ``parts`` one after the other, for passing a message over the channel."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("homemail-message", os.MFD_CLOEXEC)
    else:  # the BSDs: an anonymous temporary file
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    for data in parts:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_fd(fd: int, limit: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise ChannelError("message too large")
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


#: The system mail spools, root's with the group ``mail`` (mode 2775 on Debian).  An mbox right in
#: one of them is written with the group ``mail`` added, as the spool asks; any other mbox (a
#: user's own, even one reached through the user's link to the spool) with the user's groups only.
MAIL_SPOOLS = frozenset({"/var/mail", "/var/spool/mail"})


def in_mail_spool(path: str, spools: frozenset[str] = MAIL_SPOOLS) -> bool:
    """Whether the mbox ``path`` is a file right in a system mail spool.

    The path as a string, not where it leads: its directory must be the spool's own name, which
    root controls (the file name comes from the configuration's template).  A user whose
    ``~/mbx`` is a link to /var/mail gets no ``mail`` group, so cannot create names there.
    """
    return os.path.dirname(path) in spools


def _deliver_as_user(
    entry: pwd.struct_passwd, action: Any, record: dict[str, Any], msgfd: int, hostname: str
) -> dict[str, Any]:
    """Runs in the forked child: become the user, deliver, return the outcome."""
    from homemail.aliases import LocalUser

    user = LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    extra = None  # the user's own groups
    if delivers_to_mail_spool(action, user, record):
        try:
            import grp

            extra = [*os.getgrouplist(entry.pw_name, entry.pw_gid), grp.getgrnam("mail").gr_gid]
        except KeyError:
            extra = None
    drop_privileges(entry, extra)
    message = read_fd(msgfd, 1 << 31)
    return deliver_record(action, user, record, message, hostname)


def delivers_to_mail_spool(action: Any, user: Any, record: dict[str, Any]) -> bool:
    """Whether the ``deliver`` record's mailbox is an mbox right in a system mail spool."""
    if action.method != "mbox":
        return False
    try:
        path = mda.mailbox_of(action, user, _record_envelope(action, user, record))
    except mda.DeliveryError:  # the delivery fails the same way and says so
        return False
    return in_mail_spool(path)


def _record_envelope(action: Any, user: Any, record: dict[str, Any]) -> Envelope:
    from homemail.queue import Envelope

    return Envelope(
        evpid=record["evpid"],
        sender=record["sender"],
        rcpt=record["rcpt"],
        dest=record["dest"],
        user=user.name,
        action=action.name,
        ctime=record["ctime"],
        expire=0,
        recovered=bool(record.get("recovered")),
    )


def deliver_record(
    action: Any, user: Any, record: dict[str, Any], message: bytes, hostname: str
) -> dict[str, Any]:
    """Deliver the message of a ``deliver`` record; the outcome as a ``result`` record's fields."""
    env = _record_envelope(action, user, record)
    try:
        mda.deliver_local(action, user, env, message, hostname)
    except mda.DeliveryError as exc:
        return {"ok": False, "permanent": exc.permanent, "status": exc.status, "text": exc.text}
    except OSError as exc:  # an I/O failure the mda did not classify: try again later
        return {"ok": False, "permanent": False, "status": "4.3.0", "text": str(exc)}
    return {"ok": True, "permanent": False, "status": "2.0.0", "text": "Ok"}


def worker_user(name: str) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        print(
            f"homemail: the unprivileged user {name!r} does not exist; create it with\n"
            f"  useradd --system --home-dir /var/spool/homemail --shell /usr/sbin/nologin "
            f"{name}\nor pass --user NAME",
            file=sys.stderr,
        )
        raise SystemExit(78) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        print(
            f"homemail: the unprivileged user {name!r} must not have uid or gid 0", file=sys.stderr
        )
        raise SystemExit(78)
    return entry


# -- user mode: the delivery agent --------------------------------------------------------------


def start_delivery_agent(hostname: str, threads: int) -> tuple[socket.socket, int]:
    """User mode: fork the process that writes mailboxes; the daemon's end and the agent's pid.

    Called before the daemon has threads, an event loop, listeners or queue files open, so the
    child starts from a clean state.  The agent dies with the daemon (PR_SET_PDEATHSIG): a
    delivery cut short is retried after a restart exactly as one cut short in the daemon was.
    """
    import gc

    ours, theirs = channel_pair()
    sys.stderr.flush()
    # what both processes start with stays shared: the collector would write to every object's
    # header, and each page it touched would become a private copy in each process
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            ours.close()
            # the terminal's ^C and hangups, and a SIGTERM to the whole group (a service
            # manager's stop), are for the daemon, which closes the channel to stop us once its
            # deliveries are done: killed mid-delivery, a copy could be in new/ and its result
            # lost (we die with the daemon anyway, see below)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            _die_with_parent()
            code = DeliveryAgent(theirs, hostname, threads).run()
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    theirs.close()
    return ours, pid


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the daemon died before prctl took effect
        os._exit(0)


_LIBC: list[Any] = []  # the C library, once loaded (None where it cannot be)


def _libc() -> Any:
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL(None))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def trim_heap() -> None:
    """Collect cycles, then give the C heap's free pages back to the system (glibc's malloc_trim).

    After a burst of mail the allocator keeps what the burst freed, mostly in the per-thread
    arenas of the delivery threads; an idle daemon calls this so its footprint goes back down.
    """
    import gc

    gc.collect()  # cycles freed first, so more of the heap is free to give back
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is not None:
        with contextlib.suppress(AttributeError):  # not glibc (musl has no malloc_trim)
            libc.malloc_trim(0)


class DeliveryAgent:
    """User mode's delivery process: ``deliver`` records in, ``result`` records out.

    The daemon hands every local delivery here, so writing and syncing mailboxes runs on another
    CPU and never holds the SMTP process's interpreter lock.  The records are system mode's
    (above), plus the action's ``method`` and ``path`` and the user's ``uid``, ``gid`` and
    ``home``: the agent keeps no configuration, and runs as the daemon's own user.
    """

    def __init__(self, sock: socket.socket, hostname: str, threads: int) -> None:
        import threading

        self.sock = sock
        self.hostname = hostname
        self.threads = threads
        self.send_lock = threading.Lock()

    def run(self) -> int:
        from concurrent.futures import ThreadPoolExecutor

        self.sock.setblocking(True)
        trimmed = True
        with ThreadPoolExecutor(self.threads, thread_name_prefix="mda") as pool:
            while True:
                # quiet for a while after deliveries: hand the memory they used back (the
                # socket itself stays blocking, for the result records the threads send)
                if not trimmed and not select.select([self.sock], [], [], IDLE_TRIM_SECONDS)[0]:
                    trim_heap()
                    trimmed = True
                    continue
                try:
                    got = recv_record(self.sock)
                except ChannelError as exc:
                    log.event("mda", "channel", "error", error=str(exc))
                    continue
                except OSError:
                    break
                if got is None:
                    break
                trimmed = False
                record, fds = got
                if record["type"] == "deliver" and len(fds) + ("payload" in record) == 1:
                    pool.submit(self.deliver, record, fds[0] if fds else None)
                else:
                    for fd in fds:
                        os.close(fd)
        return 0

    def deliver(self, record: dict[str, Any], msgfd: int | None) -> None:
        """One delivery: the message comes as an fd, or inside the record (``payload``)."""
        from homemail.aliases import LocalUser
        from homemail.config import Action, Location

        try:
            request_id = _int(record, "id")
        except ChannelError:
            if msgfd is not None:
                os.close(msgfd)
            return
        try:
            try:
                method: Literal["maildir", "mbox"]
                if record.get("method") == "maildir":
                    method = "maildir"
                elif record.get("method") == "mbox":
                    method = "mbox"
                else:
                    raise ChannelError("bad field 'method'")
                path = record.get("path")
                if path is not None:
                    path = _text(record, "path", limit=4096)
                action = Action(
                    _text(record, "action"), method, path, None, None, Location("<agent>", 0, 0)
                )
                user = LocalUser(
                    _text(record, "user"),
                    _int(record, "uid"),
                    _int(record, "gid"),
                    _text(record, "home", limit=4096),
                )
                for name in ("sender", "rcpt", "dest"):
                    _text(record, name, empty_ok=name == "sender", limit=4096)
                _int(record, "evpid")
                _int(record, "ctime")
                message = record["payload"] if msgfd is None else read_fd(msgfd, 1 << 31)
            finally:
                if msgfd is not None:
                    os.close(msgfd)
            result = deliver_record(action, user, record, message, self.hostname)
        except (ChannelError, OSError) as exc:
            result = {"ok": False, "permanent": False, "status": "4.3.0", "text": str(exc)}
        except Exception as exc:  # a bug: the envelope stays queued and is retried
            result = {"ok": False, "permanent": False, "status": "4.3.0", "text": repr(exc)}
        result["text"] = log.sanitize(str(result["text"]))
        with self.send_lock, contextlib.suppress(OSError, ChannelError):
            send_record(self.sock, {"type": "result", "id": request_id, **result})


# -- the worker's end of the channel -----------------------------------------------------------


class WorkerChannel:
    """The worker's end: asks the parent for deliveries, hears offline mail and reloads."""

    def __init__(self, sock: socket.socket) -> None:
        import asyncio

        self.sock = sock
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 1
        self.on_offline: Any = None  # async (OfflineMessage) -> bool
        self.on_reload: Any = None  # async (record, fds) -> None
        self.on_lost: Any = None  # () -> None: the parent is gone or asks us to stop
        self.loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def send(
        self, record: dict[str, Any], fds: list[int] | None = None, payload: bytes | None = None
    ) -> None:
        for _ in range(1000):
            try:
                send_record(self.sock, record, fds, payload)
                return
            except BlockingIOError:
                time.sleep(0.001)
        raise ChannelError("parent is not reading")

    def _readable(self) -> None:
        import asyncio

        try:
            got = recv_record(self.sock)
        except BlockingIOError:
            return
        except (OSError, ChannelError) as exc:
            log.event("worker", "channel", "error", error=str(exc))
            got = None
        if got is None:
            self.loop.remove_reader(self.sock.fileno())
            for waiting in self.pending.values():
                if not waiting.done():
                    waiting.set_exception(ChannelError("the parent process is gone"))
            if self.on_lost is not None:
                self.on_lost()
            return
        record, fds = got
        kind = record["type"]
        if kind == "result" and isinstance(record.get("id"), int):
            answered = self.pending.pop(record["id"], None)
            if answered is not None and not answered.done():
                answered.set_result(record)
            for fd in fds:
                os.close(fd)
        elif kind == "offline" and self.on_offline is not None and len(fds) == 1:
            self._task = asyncio.ensure_future(self._offline(record, fds[0]))
        elif kind == "stop" and self.on_lost is not None:
            self.on_lost()
        elif kind == "reload" and self.on_reload is not None:
            self._task = asyncio.ensure_future(self.on_reload(record, fds))
        else:
            for fd in fds:
                os.close(fd)

    async def _offline(self, record: dict[str, Any], fd: int) -> None:
        ok = False
        try:
            item = offline.decode(  # the header is checked again, as any input is
                read_fd(fd, 1 << 31),
                name=_text(record, "name"),
                refused=_text(record, "refused", empty_ok=True),
            )
            ok = await self.on_offline(item)
        except Exception as exc:  # the file stays, and the parent must hear of it either way
            known = isinstance(exc, (ChannelError, OSError, offline.OfflineError))
            log.event("worker", "offline", "failed", error=str(exc) if known else repr(exc))
        finally:
            os.close(fd)
        self.send({"type": "offline-done", "name": record.get("name", ""), "ok": ok})

    async def request(
        self, record: dict[str, Any], message: bytes | None = None, *, inline: bool = False
    ) -> dict[str, Any]:
        """Send a request and wait for the other end's result.

        The message goes as an fd (a memfd), or, with ``inline`` and when it is small, inside
        the record: the delivery agent takes both; the system-mode parent only fds.
        """
        ident = self.next_id
        self.next_id += 1
        fut: Any = self.loop.create_future()
        self.pending[ident] = fut
        if message is not None and inline and len(message) <= MAX_INLINE:
            self.send({**record, "id": ident}, payload=message)
        else:
            fd = _memfd(message) if message is not None else None
            try:
                self.send({**record, "id": ident}, [fd] if fd is not None else None)
            finally:
                if fd is not None:
                    os.close(fd)
        result: dict[str, Any] = await fut
        return result
