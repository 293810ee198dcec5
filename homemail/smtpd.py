"""The daemon: command line, modes, start-up, reload and shutdown.

``homemail run`` loads the configuration, recovers the queue, binds the listeners and runs the
scheduler until SIGTERM or SIGINT; a second signal forces the exit.  Shutdown stops listening
first, lets open sessions finish for up to :data:`DRAIN_SECONDS`, then lets running deliveries
end; nothing acknowledged is lost because a 250 is only sent once the queue has the message on
disk.  SIGHUP re-reads the configuration; an invalid one is logged and the running one kept.

User mode (any ordinary user; root only with ``--user-mode``) listens on 127.0.0.1:2525 by
default, delivers only to the running user, and keeps its spool under ``$XDG_STATE_HOME`` and its
control socket under ``$XDG_RUNTIME_DIR``.  System mode (started as root) splits into a
privileged parent and an unprivileged worker: see :mod:`homemail.parent`.  This module's Daemon
is the whole daemon in user mode and the worker in system mode.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from homemail import __version__, bounce, credentials, log, mda, offline
from homemail.address import AddressError, host_name, parse_mailbox
from homemail.aliases import AliasEditError, LocalUser, UserDb, current_user
from homemail.aliases import add as aliases_add
from homemail.aliases import remove as aliases_remove
from homemail.config import (
    Action,
    Config,
    ConfigError,
    Listener,
    Location,
    alias_tables,
    aliases_file,
    check_listeners,
    default_aliases_text,
    default_config_text,
    dump,
    parse_file,
    parse_string,
)
from homemail.control import ControlServer, bind_control_socket
from homemail.control_protocol import Code
from homemail.parent import (
    DEFAULT_USER,
    IDLE_TRIM_SECONDS,
    MAX_CHILDREN_PER_USER,
    Parent,
    WorkerChannel,
    channel_pair,
    drop_privileges,
    start_delivery_agent,
    trim_heap,
    worker_user,
)
from homemail.queue import Envelope, Queue, QueueError, new_evpid
from homemail.queue_fs import FsQueue, lock_spool
from homemail.ruleset import LOCAL_SOURCE, Rejected, Ruleset
from homemail.scheduler import NoRoute, Scheduler
from homemail.smtp import (
    ListenerKey,
    MessageRefused,
    Recipient,
    ServerContext,
    Session,
    SmtpServer,
    Transaction,
    bind_listener,
    build_message,
    listener_key,
    log_accepted,
    make_envelopes,
)
from homemail.table import TableError

EX_OK = 0
EX_USAGE = 64
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CONFIG = 78
DRAIN_SECONDS = 10.0
OFFLINE_SCAN_SECONDS = 60.0
MDA_THREADS = 6
USER_MODE_PORT = 2525
SYSTEM_PORT = 25


@dataclass
class Paths:
    spool: str
    socket: str


def user_paths() -> Paths:
    home = os.path.expanduser("~")
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/homemail-{os.getuid()}"
    return Paths(
        spool=os.path.join(state, "homemail", "spool"),
        socket=os.path.join(runtime, "homemail", "control.sock"),
    )


def secrets_path(config_path: str | None, user_mode: bool) -> str:
    """Next to the configuration file; else /etc/homemail or ~/.config/homemail."""
    if config_path is not None:
        return os.path.join(os.path.dirname(os.path.abspath(config_path)), "secrets")
    if not user_mode:
        return SYSTEM_SECRETS
    return os.path.join(os.path.dirname(user_aliases_path()), "secrets")


def local_hostname() -> str:
    return host_name()


def user_aliases_path() -> str:
    home = os.path.expanduser("~")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(config, "homemail", "aliases")


SYSTEM_CONFIG = "/etc/homemail/smtpd.conf"
SYSTEM_SPOOL = "/var/spool/homemail"
SYSTEM_SOCKET = "/run/homemail/control.sock"
SYSTEM_ALIASES = "/etc/mail/aliases"
SYSTEM_SECRETS = "/etc/homemail/secrets"


def system_default_config() -> str:
    """The configuration system mode uses when there is no /etc/homemail/smtpd.conf."""
    lines = []
    if os.path.isfile(SYSTEM_ALIASES):
        lines.append(f'table aliases "file:{SYSTEM_ALIASES}"')
        lines.append('action "local" maildir alias <aliases>')
    else:
        lines.append('action "local" maildir')
    lines += ["listen on localhost", 'match from local for local action "local"']
    return "\n".join(lines) + "\n"


def record_offline_dir(socket_path: str, spool: str) -> None:
    """Leave ``SOCKET.offline`` -> ``SPOOL/offline`` for sendmail while the daemon is down."""
    try:
        offline.record_location(socket_path, os.path.join(spool, "offline"))
    except OSError as exc:
        log.warning(f"cannot record the offline spool beside {socket_path}: {exc}")


def system_mode(user_mode: bool) -> bool:
    """Whether ``run`` starts system mode: as root, unless ``--user-mode``."""
    return os.geteuid() == 0 and not user_mode


def load_config(path: str | None, *, system: bool = False, create: bool = True) -> Config:
    """The file's configuration, or the embedded default.

    User mode's default keeps its aliases in a file it creates on first use; without ``create``
    (a check, which writes nothing) a missing file is read as the default it would be created
    with.  Listeners that would bind the same address and port are refused (ConfigError).
    """
    cfg = _read_config(path, system=system, create=create)
    check_listeners(cfg, SYSTEM_PORT if system else USER_MODE_PORT)
    return cfg


def _read_config(path: str | None, *, system: bool, create: bool) -> Config:
    if path is not None:
        return parse_file(path)
    if system:
        if os.path.exists(SYSTEM_CONFIG):
            return parse_file(SYSTEM_CONFIG)
        return parse_string(system_default_config(), "<embedded>")
    user = current_user().name
    aliases = user_aliases_path()
    if not os.path.exists(aliases):
        if not create:
            return parse_string(default_config_text(user), "<embedded>")
        try:
            os.makedirs(os.path.dirname(aliases), mode=0o700, exist_ok=True)
            with open(aliases, "x", encoding="utf-8") as f:
                f.write(default_aliases_text(user))
        except OSError:
            return parse_string(default_config_text(user), "<embedded>")
    return parse_string(default_config_text(user, aliases), "<embedded>")


Bound = dict[ListenerKey, tuple[Listener, list[socket.socket]]]


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the daemon's event loop: uvloop when the ``speedups`` extra is installed (and
    ``HOMEMAIL_LOOP=asyncio`` is not set), else asyncio's own."""
    try:
        if os.environ.get("HOMEMAIL_LOOP") == "asyncio":
            raise ImportError("asyncio chosen")
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def listener_port(listener: Listener, user_mode: bool) -> int:
    return listener.port or (USER_MODE_PORT if user_mode else SYSTEM_PORT)


def bind_listeners(cfg: Config, user_mode: bool, keep: set[ListenerKey] | None = None) -> Bound:
    """Bind every listener of ``cfg`` whose key is not in ``keep``."""
    bound: Bound = {}
    try:
        for listener in cfg.listeners:
            if listener.address == "socket":
                continue  # local enqueue goes through the control socket
            port = listener_port(listener, user_mode)
            key = listener_key(listener, port)
            if (keep is not None and key in keep) or key in bound:
                continue
            bound[key] = (listener, bind_listener(listener.address, port))
    except OSError:
        for _, socks in bound.values():
            for sock in socks:
                sock.close()
        raise
    return bound


def listener_keys(cfg: Config, user_mode: bool) -> dict[ListenerKey, Listener]:
    return {
        listener_key(x, listener_port(x, user_mode)): x
        for x in cfg.listeners
        if x.address != "socket"
    }


class Daemon:
    def __init__(
        self,
        cfg: Config,
        *,
        spool: str,
        socket_path: str,
        user_mode: bool,
        config_path: str | None,
        bound: Bound | None = None,
        control_sock: socket.socket | None = None,
        channel: socket.socket | None = None,
        agent: socket.socket | None = None,
        hostname: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.bound = bound
        self.control_sock = control_sock
        self.channel_sock = channel
        self.channel: WorkerChannel | None = None
        self.agent_sock = agent
        self.agent: WorkerChannel | None = None
        self.config_path = config_path
        self.spool = spool
        self.socket_path = socket_path
        self.user_mode = user_mode
        self.hostname = hostname or local_hostname()
        self._room = -1  # bytes free on the spool's file system (-1: not known), and when seen
        self._room_checked = -1e9
        self._short = False  # what spool_short() last said
        # the system-mode worker runs as the daemon's own user, who gets no mail
        self.users = UserDb(user_mode=user_mode, daemon_uid=None if user_mode else os.geteuid())
        self.queue: Queue = FsQueue(spool)
        # deliveries wait on fsync, not the CPU: enough threads for their syncs to be shared
        self.mda_pool = ThreadPoolExecutor(MDA_THREADS, thread_name_prefix="mda")
        self.scheduler = Scheduler(
            self.queue,
            self.deliver,
            self.submit_bounce,
            hostname=self.hostname,
            warn_intervals=cfg.bounce_warn_interval,
            parallel=MDA_THREADS,
        )
        if channel is not None:  # system mode: deliveries for many users
            self.scheduler.per_user = MAX_CHILDREN_PER_USER
        self.scheduler.notify = self.publish
        self.ctx = self._context(cfg)
        self.server = SmtpServer(self.ctx)
        self.control = ControlServer(self, socket_path)
        self.started = time.time()
        self.mta_paused = False
        self._pickup: asyncio.Future[None] | None = None
        self._pickup_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.queue_loaded = asyncio.Event()  # set once queue/ has been read to the end
        self._loader: asyncio.Task[None] | None = None
        self._signals = 0
        self._socket_listener = Listener(
            "socket", None, None, None, False, Location("<socket>", 0, 0)
        )

    def _context(self, cfg: Config) -> ServerContext:
        ctx = ServerContext(
            hostname=self.hostname,
            ruleset=Ruleset(cfg, self.users, self.hostname),
            max_message_size=cfg.max_message_size,
            max_mails=cfg.max_mails,
            max_rcpt=cfg.max_rcpt,
            queue_ttl=cfg.queue_ttl,
            enqueue=self.enqueue,
        )
        ctx.notify = self.publish
        ctx.new_msgid = self.queue.new_msgid
        ctx.spool_short = self.spool_short
        return ctx

    def spool_short(self) -> bool:
        """Whether the spool's file system has less room than one and a half of the largest
        message (Postfix's rule), when it was last looked at, at most a second ago.  Each
        change between the two is logged (mail is refused from the first to the second)."""
        now = time.monotonic()
        if now >= self._room_checked + 1.0:
            self._room_checked = now
            try:
                st = os.statvfs(self.spool)
            except OSError:
                self._room = -1  # unknown: the commit will tell
            else:
                self._room = st.f_bavail * st.f_frsize
        needed = self.cfg.max_message_size * 3 // 2
        short = 0 <= self._room < needed
        if short != self._short:
            self._short = short
            if short:
                log.error(
                    f"the spool's file system has {self._room} bytes free, less than 1.5 times "
                    f"smtp max-message-size ({needed}): MAIL is refused with 452 4.3.1 until "
                    "there is room"
                )
            else:
                log.event("-", "smtpd", "spool-room", free=self._room, needed=needed)
        return short

    def publish(self, name: str, data: dict[str, object]) -> None:
        self.control.monitor.publish(name, data)

    def local_session(self, uid: int, user: str) -> Session:
        """An SMTP session for local enqueue (sendmail), on a switched control connection."""
        return Session(self.ctx, self._socket_listener, source=LOCAL_SOURCE, uid=uid)

    # -- queue entry points ------------------------------------------------------------------

    async def enqueue(
        self,
        message: bytes,
        envelopes: list[Envelope],
        landed: Callable[[], None] | None = None,
    ) -> None:
        """Commit a message; its deliveries start once the caller's current step is over.

        That step is the session writing its 250, so the reply goes out before the first
        delivery of the message is dispatched.  The commit is shielded: a session cancelled
        while it is in flight (the client vanished) does not leave a committed message
        unscheduled, and ``landed`` is called once such a commit succeeds (the session logs
        its message with it, since it is no longer there to do so after its 250).
        """
        # with one client connected no other commit would share this one's sync: the queue
        # may sync it on the event loop, sparing two thread switches, and then hands back a
        # future already done, which neither ensure_future nor shield makes us wait a step for
        alone = self.ctx.sessions <= 1
        commit = asyncio.ensure_future(self.queue.commit(message, envelopes, alone=alone))
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            commit.add_done_callback(
                lambda _: self._committed(commit, envelopes, orphaned=True, landed=landed)
            )
            raise
        asyncio.get_running_loop().call_soon(self._committed, commit, envelopes)

    def _committed(
        self,
        commit: asyncio.Future[None],
        envelopes: list[Envelope],
        orphaned: bool = False,
        landed: Callable[[], None] | None = None,
    ) -> None:
        if commit.cancelled():
            return
        error = commit.exception()
        if error is not None:
            if orphaned:  # nobody is left to answer 451: say it here
                log.event("-", "queue", "commit-failed", error=str(error), envelopes=len(envelopes))
            return
        if orphaned and landed is not None:
            landed()
        self.scheduler.stats["queue.commit"] += 1
        self.scheduler.schedule(envelopes)

    async def submit_bounce(self, rcpt: str, message: bytes, *, offline: str = "") -> None:
        """Queue a notice for ``rcpt``; ``offline`` names the spool file it answers, if any."""
        try:
            address = parse_mailbox(rcpt)
        except AddressError as exc:
            raise NoRoute(f"bounce recipient unusable: {exc}") from None
        try:
            targets = self.ctx.ruleset.route(LOCAL_SOURCE, address)
        except Rejected as exc:
            raise NoRoute(f"no route for the bounce: {exc.reply}") from None
        msgid = self.queue.new_msgid()
        now = time.time()
        envs = [
            Envelope(
                evpid=new_evpid(msgid),
                sender="",
                rcpt=rcpt,
                dest=t.dest,
                user=t.user,
                action=t.action,
                ctime=now,
                expire=now + (t.ttl or self.cfg.queue_ttl),
                next_try=now,
                bounce=True,
                src="local",
                offline=offline,
            )
            for t in targets
        ]
        await self.enqueue(message, envs)

    async def deliver(self, env: Envelope) -> None:
        action = self.cfg.actions.get(env.action)
        if action is None:
            raise mda.DeliveryError(
                f"action {env.action!r} is no longer configured", permanent=False, status="4.3.5"
            )
        user = self.users.lookup(env.user)
        if user is None:
            raise mda.DeliveryError(
                f"user {env.user!r} cannot receive mail here", permanent=True, status="5.1.1"
            )
        record: dict[str, Any] = {
            "type": "deliver",
            "action": env.action,
            "user": env.user,
            "sender": env.sender,
            "rcpt": env.rcpt,
            "dest": env.dest,
            "evpid": env.evpid,
            "ctime": int(env.ctime),
            "recovered": env.recovered,
            "src": env.src,
        }
        if self.channel is not None:  # system mode: the parent checks it and forks the delivery
            channel = self.channel
        elif self.agent is not None:  # user mode: the delivery process, as this user
            channel = self.agent
            record.update(
                method=action.method, path=action.path, uid=user.uid, gid=user.gid, home=user.home
            )
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.mda_pool, self._deliver_here, action, user, env)
            return
        message = self.queue.cached_message(env.msgid)
        if message is None:
            message = await asyncio.to_thread(self.queue.read_message, env.msgid)
        result = await channel.request(record, message, inline=channel is self.agent)
        if not result.get("ok"):
            raise mda.DeliveryError(
                str(result.get("text", "delivery failed")),
                permanent=bool(result.get("permanent")),
                status=str(result.get("status", "4.3.0")),
            )

    def _deliver_here(self, action: Action, user: LocalUser, env: Envelope) -> None:
        """User mode, in a worker thread: read the message and write the mailbox."""
        message = self.queue.read_message(env.msgid)
        mda.deliver_local(action, user, env, message, self.hostname)

    # -- the offline spool (sendmail while the daemon was down) ------------------------------

    def offline_dir(self) -> str:
        return os.path.join(self.spool, "offline")

    async def pickup_offline(self) -> None:
        """Queue what the offline spool holds: one pickup at a time (start-up, the periodic
        scan and a resume of smtp may overlap), so that no file is queued twice."""
        async with self._pickup_lock:
            directory = self.offline_dir()
            try:
                names = await asyncio.to_thread(offline.pending, directory)
            except OSError:
                return
            for name in names:
                if self.ctx.paused:
                    return
                await self._pickup_one(directory, name)

    async def _pickup_one(self, directory: str, name: str) -> None:
        expected = None if os.geteuid() == 0 else os.geteuid()
        try:
            item = await asyncio.to_thread(
                offline.read,
                directory,
                name,
                expected_uid=expected,
                max_message=self.cfg.max_message_size,
            )
        except offline.OfflineError as exc:
            log.event("offline", "offline", "refused", file=name, reason=str(exc))
            await asyncio.to_thread(offline.discard, directory, name)
            return
        if await self.submit_offline(item):
            await asyncio.to_thread(offline.discard, directory, name)

    async def submit_offline(self, item: offline.OfflineMessage) -> bool:
        """Queue a message sendmail left in the offline spool; False if it must stay there."""
        name = item.name
        if any(e.offline == name for e in self.scheduler.envelopes.values()):
            return True  # queued (or bounced) already, just before a crash
        try:
            if item.sender:
                parse_mailbox(item.sender)
            item.sender.encode("utf-8")
        except (AddressError, UnicodeEncodeError):
            log.event("offline", "offline", "refused", file=name, reason="malformed sender")
            return True  # the same checks as over SMTP: such a file is dropped, not retried
        opts = item.options
        ret = opts.get("ret", "").upper()
        txn = Transaction(
            sender=item.sender,
            smtputf8=opts.get("smtputf8") == "1",
            body="8BITMIME" if opts.get("body", "").upper() == "8BITMIME" else "7BIT",
            ret=ret if ret in ("FULL", "HDRS") else "",
            envid=log.sanitize(opts.get("envid", ""), 100),
        )
        notify = [
            n
            for n in opts.get("notify", "").upper().split(",")
            if n in ("NEVER", "SUCCESS", "FAILURE", "DELAY")
        ]
        if "NEVER" in notify:
            notify = ["NEVER"]
        now = time.time()
        arrived = item.time or now  # when sendmail took it
        if item.refused:  # too large: the whole message goes back to its sender
            log.event("offline", "offline", "refused", file=name, reason=item.refused)
            if "NEVER" in notify:
                return True
            try:
                await self._offline_bounce(
                    item.sender,
                    [(r, item.refused) for r in item.rcpts],
                    item.message,
                    arrived,
                    offline=name,
                )
            except QueueError as exc:  # the file stays, and is taken again later
                log.event("offline", "bounce", "failed", to=f"<{item.sender}>", error=str(exc))
                return False
            return True
        rejected: list[tuple[str, str]] = []
        for rcpt in item.rcpts:
            try:
                address = parse_mailbox(rcpt, allow_bare_postmaster=True)
                targets = self.ctx.ruleset.route(LOCAL_SOURCE, address)
            except AddressError as exc:
                rejected.append((rcpt, f"553 5.1.3 {exc}"))
                continue
            except Rejected as exc:
                rejected.append((rcpt, exc.reply))
                continue
            txn.recipients.append(Recipient(rcpt=str(address), targets=targets, notify=notify))
        msgid = self.queue.new_msgid()
        try:
            message = build_message(
                item.message,
                origin=f"local (uid {item.uid})",
                hostname=self.hostname,
                proto="ESMTP",
                msgid=msgid,
                now=now,
                add_ids=True,
                single_rcpt=txn.recipients[0].rcpt if len(txn.recipients) == 1 else None,
                long_lines=True,  # sendmail's, written while the daemon was down
            )
        except MessageRefused as exc:
            rejected = [(r, exc.reply) for r in item.rcpts]
            txn.recipients = []
            message = item.message
        envelopes = make_envelopes(
            txn, msgid, now=now, ttl=self.cfg.queue_ttl, uid=item.uid, src="local", helo=""
        )
        for env in envelopes:
            env.offline = name
        try:
            if envelopes:
                await self.queue.commit(message, envelopes)
            for rcpt, reply in rejected:
                log.event(
                    "offline", "offline", "rejected", file=name, rcpt=f"<{rcpt}>", result=reply
                )
            if rejected and "NEVER" not in notify:
                try:
                    await self._offline_bounce(item.sender, rejected, item.message, arrived)
                except QueueError as exc:
                    if not envelopes:
                        raise  # nothing taken: the file stays, and is taken again later
                    # the rest is queued, so the file cannot be taken again
                    log.event("offline", "bounce", "dropped", to=f"<{item.sender}>", error=str(exc))
        except QueueError as exc:
            log.event("offline", "offline", "failed", file=name, error=str(exc))
            return False
        if envelopes:
            log_accepted(self.ctx, "offline", msgid, message, txn, envelopes, "ESMTP", item.uid)
            self.scheduler.stats["queue.commit"] += 1
            self.scheduler.schedule(envelopes)
        return True

    async def _offline_bounce(
        self,
        sender: str,
        failed: list[tuple[str, str]],
        original: bytes,
        arrived: float,
        *,
        offline: str = "",
    ) -> None:
        """Bounce offline mail refused for ``failed`` (recipient, reply) to its sender.

        ``arrived`` is when sendmail took it; ``offline`` names the spool file when the notice
        answers all of it (so that a restart before the file is removed does not send two).

        Raises QueueError when the bounce cannot be queued; a sender with no route is logged
        and dropped, as a bounce would be.
        """
        if not sender:
            return
        message = bounce.make_dsn(
            kind="failure",
            reporting_mta=self.hostname,
            sender=sender,
            original=original,
            recipients=[
                bounce.RecipientStatus(
                    final_recipient=rcpt,
                    original_recipient=None,
                    action="failed",
                    status=reply.split(" ")[1] if reply.count(" ") >= 1 else "5.0.0",
                    diagnostic=f"smtp; {reply}",
                    remote_mta=None,
                    last_attempt=time.time(),
                    will_retry_until=None,
                )
                for rcpt, reply in failed
            ],
            arrival_date=arrived,
        )
        try:
            await self.submit_bounce(sender, message, offline=offline)
        except NoRoute as exc:
            log.event("offline", "bounce", "dropped", to=f"<{sender}>", error=str(exc))

    async def _offline_loop(self) -> None:
        while True:
            await asyncio.sleep(OFFLINE_SCAN_SECONDS)
            await self.pickup_offline()

    # -- what the control socket asks --------------------------------------------------------

    def stats(self) -> dict[str, int]:
        stats = dict(self.scheduler.stats)
        stats["smtp.session"] = self.ctx.total_sessions
        stats["smtp.session.active"] = self.ctx.sessions
        stats["queue.size"] = len(self.scheduler.envelopes)
        stats["scheduler.running.active"] = len(self.scheduler.running)
        stats["uptime"] = int(time.time() - self.started)
        return stats

    def status(self) -> dict[str, object]:
        return {
            "smtp": "paused" if self.ctx.paused else "running",
            "mda": "paused" if self.scheduler.paused else "running",
            "mta": "paused" if self.mta_paused else "running",
            "uptime": int(time.time() - self.started),
            "queue": len(self.scheduler.envelopes),
            "queue_loaded": self.queue_loaded.is_set(),
            "version": __version__,
            "mode": "user" if self.user_mode else "system",
            "pid": os.getpid(),
            "config": self.cfg.path,
            "hostname": self.hostname,
        }

    def set_paused(self, subsystem: str, paused: bool) -> None:
        resumed_smtp = subsystem == "smtp" and self.ctx.paused and not paused
        if subsystem == "smtp":
            self.ctx.paused = paused
        elif subsystem == "mda":
            self.scheduler.paused = paused
            self.scheduler.schedule([])
        else:
            self.mta_paused = paused
        log.event("-", "control", "paused" if paused else "resumed", subsystem=subsystem)
        self.publish("paused" if paused else "resumed", {"subsystem": subsystem})
        if resumed_smtp and self.channel is None:  # system mode: the parent reads the spool
            self._pickup = asyncio.ensure_future(self.pickup_offline())

    async def store_secret(self, label: str, username: str, password: str) -> str | None:
        """Keep smarthost credentials (from the tray app); returns None or what is wrong."""
        try:
            credentials.check(label, username, password)
        except credentials.CredentialError as exc:
            return str(exc)
        if self.channel is not None:  # only the parent may write the root-only file
            result = await self.channel.request(
                {"type": "secret", "label": label, "username": username, "password": password}
            )
            return None if result.get("ok") else str(result.get("text", "not stored"))
        path = secrets_path(self.config_path, self.user_mode)
        try:
            await asyncio.to_thread(credentials.store, path, label, username, password)
        except OSError as exc:
            return f"cannot write {path}: {exc.strerror}"
        return None

    async def edit_alias(self, path: str, op: str, name: str, targets: list[str]) -> None:
        """Add to or remove from the aliases file; in system mode the parent writes it."""
        if self.channel is not None:
            result = await self.channel.request(
                {"type": "alias", "op": op, "name": name, "targets": targets}
            )
            if not result.get("ok"):
                status = result.get("status")
                code = int(status) if status in ("400", "404", "409") else 409
                raise AliasEditError(code, str(result.get("text", "alias edit refused")))
            return
        if op == "add":  # checked against the rules as they are when the file is written
            await asyncio.to_thread(aliases_add, path, name, targets, self.ctx.ruleset.check_alias)
        else:
            await asyncio.to_thread(aliases_remove, path, name, self.ctx.ruleset.check_alias)

    def aliases_path(self) -> str | None:
        return aliases_file(self.cfg)

    async def update_table(self, name: str) -> tuple[Code, str] | None:
        table = self.cfg.tables.get(name)
        if table is None:
            return Code.NOT_FOUND, f"no table {name!r}"
        try:
            new = await asyncio.to_thread(table.reloaded)
        except TableError as exc:
            log.error(f"update table {name}: {exc}")
            return Code.CONFLICT, str(exc)
        self.cfg.tables[name] = new
        self.ctx.ruleset = Ruleset(self.cfg, self.users, self.hostname)
        log.event("-", "control", "table-updated", table=name)
        self.publish("table-updated", {"table": name})
        return None

    async def update_aliases(self) -> tuple[Code, str] | list[str]:
        """newaliases: re-read every aliases file the configuration uses; the tables' names
        (none when the aliases are inline, or there are none)."""
        names = [n for n in alias_tables(self.cfg) if self.cfg.tables[n].source is not None]
        for name in names:
            error = await self.update_table(name)
            if error is not None:
                return error
        return names

    async def update_table_by_path(self, path: str) -> str | None:
        for name, table in list(self.cfg.tables.items()):
            if table.source == path:
                error = await self.update_table(name)
                if error is not None:
                    return error[1]
        return None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        envelopes = await asyncio.to_thread(self.queue.start)
        self.scheduler.schedule(envelopes)
        self.spool_short()  # a spool too small for the largest message is said now, not at MAIL
        if self.control_sock is None:
            self.control_sock = bind_control_socket(
                self.socket_path, private_dir=self.socket_path == user_paths().socket
            )
        await self.control.start(self.control_sock)
        if self.channel_sock is None:  # user mode (the parent does this before it forks us):
            # where sendmail leaves mail while we are down, said before the port answers
            await asyncio.to_thread(offline.prepare_dir, self.offline_dir())
            await asyncio.to_thread(record_offline_dir, self.socket_path, self.spool)
        bound = self.bound if self.bound is not None else bind_listeners(self.cfg, self.user_mode)
        self.bound = None
        for key, (listener, socks) in bound.items():
            await self.server.serve(key, listener, socks)
            log.event("-", "smtp", "listening", address=listener.address, port=key[1])
        if self.channel_sock is not None:
            self.channel = WorkerChannel(self.channel_sock)
            self.channel.on_offline = self.submit_offline
            self.channel.on_reload = self.apply_reload
            self.channel.on_lost = self._stop.set
        else:
            await self.pickup_offline()
        if self.agent_sock is not None:
            self.agent = WorkerChannel(self.agent_sock)
            self.agent.on_lost = self._agent_lost
        if self.queue.complete():
            self.queue_loaded.set()
        else:
            self._loader = asyncio.create_task(self._load_queue_dir())
        log.event(
            "-",
            "smtpd",
            "ready",
            version=__version__,
            mode="user" if self.user_mode else "system",
            queued=len(self.scheduler.envelopes),
            loading="no" if self.queue_loaded.is_set() else "queue/",
            spool=self.spool,
            control=self.socket_path,
            uid=os.getuid(),
            loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )
        if self.channel is not None:
            self.channel.send({"type": "ready", "queued": len(self.scheduler.envelopes)})

    async def _load_queue_dir(self) -> None:
        """Walk queue/ (when there was no index) while SMTP and control already serve."""
        started = time.monotonic()
        batches = self.queue.scan()
        loaded = 0
        try:
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                self.scheduler.schedule(batch)
                loaded += len(batch)
        except Exception as exc:  # the walk failed: what it found is scheduled, the rest waits
            log.error(f"reading queue/ failed: {exc!r}; restart to read it again")
            log.event("-", "queue", "loaded", envelopes=loaded, error=type(exc).__name__)
            return
        finally:
            self.queue_loaded.set()
        if not self._stop.is_set():  # (a stop cut the walk short: nothing to say it did)
            log.event(
                "-",
                "queue",
                "loaded",
                envelopes=loaded,
                queued=len(self.scheduler.envelopes),
                read=self.queue.walk_reads,
                seconds=f"{time.monotonic() - started:.1f}",
            )

    def _agent_lost(self) -> None:
        if self.agent is not None and not self._stop.is_set():
            log.error("the delivery process exited: delivering from the daemon's own threads")
        self.agent = None

    async def reload(self) -> str | None:
        """Re-read the configuration; returns None, or why the running one was kept."""
        if self.channel is not None:  # system mode: the parent re-binds, then tells us
            self._reload_result = asyncio.get_running_loop().create_future()
            self.channel.send({"type": "reload-request"})
            result: str | None = await self._reload_result
            return result
        try:
            cfg = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error(f"reload failed, keeping the running configuration: {exc}")
            return str(exc)
        old = listener_keys(self.cfg, self.user_mode)
        new = listener_keys(cfg, self.user_mode)
        gone = old.keys() - new.keys()
        for key in gone:  # first, so that a listener whose settings changed can bind again
            self.server.close_key(key)
        try:
            bound = bind_listeners(cfg, self.user_mode, keep=set(old) & set(new))
        except OSError as exc:  # listen again where we did, and keep the running configuration
            try:
                back = bind_listeners(self.cfg, self.user_mode, keep=old.keys() - gone)
            except OSError as again:
                log.error(f"reload: cannot listen where the running configuration did: {again}")
                back = {}
            for key, (listener, socks) in back.items():
                await self.server.serve(key, listener, socks)
            log.error(f"reload failed, keeping the running configuration: {exc}")
            return str(exc)
        for key, (listener, socks) in bound.items():
            await self.server.serve(key, listener, socks)
        self._use_config(cfg, rebound=sorted(str(k[:2]) for k in bound))
        return None

    async def apply_reload(self, record: dict[str, Any], fds: list[int]) -> None:
        """System mode: the parent re-bound what changed and validated the new configuration."""
        error = record.get("error")
        if isinstance(error, str):
            self._finish_reload(error)
            for fd in fds:
                os.close(fd)
            return
        try:
            cfg = await asyncio.to_thread(load_config, self.config_path, system=True)
        except ConfigError as exc:
            log.error(f"reload failed in the worker, keeping the running configuration: {exc}")
            for fd in fds:
                os.close(fd)
            self._finish_reload(str(exc))
            return
        keys = listener_keys(cfg, self.user_mode)
        for key in record.get("remove", []) or []:
            self.server.close_key(tuple(key))
        for was, now in record.get("moved", []) or []:
            if tuple(now) in keys:
                self.server.rekey(tuple(was), tuple(now), keys[tuple(now)])
        fd_iter = iter(fds)
        for item in record.get("add", []) or []:
            key, count = tuple(item[0]), int(item[1])
            socks = [socket.socket(fileno=next(fd_iter)) for _ in range(count)]
            for sock in socks:
                sock.setblocking(False)
            listener = keys.get(key)
            if listener is None:
                for sock in socks:
                    sock.close()
                continue
            await self.server.serve(key, listener, socks)
        added = record.get("add") or []
        self._use_config(cfg, rebound=[str(item[0][:2]) for item in added])
        self._finish_reload(None)

    def _finish_reload(self, error: str | None) -> None:
        fut = getattr(self, "_reload_result", None)
        if fut is not None and not fut.done():
            fut.set_result(error)

    def _use_config(self, cfg: Config, *, rebound: list[str]) -> None:
        self.cfg = cfg
        fresh = self._context(cfg)
        for name in ("ruleset", "max_message_size", "max_mails", "max_rcpt", "queue_ttl"):
            setattr(self.ctx, name, getattr(fresh, name))
        self.scheduler.warn_intervals = sorted(cfg.bounce_warn_interval)
        log.event("-", "smtpd", "reloaded", config=cfg.path, listeners_rebound=len(rebound))
        self.publish("reloaded", {"config": cfg.path})

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            log.flush()
            os._exit(EX_SOFTWARE)
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if self.channel_sock is None:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        else:
            loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the parent reloads
        await self.start()
        runner = asyncio.create_task(self.scheduler.run())
        trimmer = asyncio.create_task(self._trim_loop())
        scanner = asyncio.create_task(self._offline_loop()) if self.channel is None else None
        status = asyncio.create_task(self._status_loop()) if self.channel is not None else None
        await self._stop.wait()
        log.event("-", "smtpd", "stopping", sessions=self.ctx.sessions)
        self.server.close()
        for task in (scanner, status, trimmer):
            if task is not None:
                task.cancel()
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.ctx.sessions > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.ctx.open):  # past the drain: say so before closing
            session.close_with("4.3.2", "Service shutting down, closing connection", "shutdown")
        await self.control.stop()
        if self._loader is not None:
            self._loader.cancel()  # the walk stops at the queue's close; no index then
        await self.scheduler.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await self.queue.close(release=False)  # the spool stays ours until the exit
        self.mda_pool.shutdown(wait=False)
        if self.channel is not None:
            self.channel.close()
        if self.agent is not None:
            self.agent.close()  # the agent finishes what it has and exits
        log.event("-", "smtpd", "stopped")
        log.flush()

    async def _trim_loop(self) -> None:
        """Once SMTP and deliveries have been quiet for a while, give freed heap back."""
        trimmed_at: tuple[int, int] | None = None
        last: tuple[int, int] | None = None
        while True:
            await asyncio.sleep(IDLE_TRIM_SECONDS)
            now = (self.ctx.total_sessions, sum(self.scheduler.stats.values()))
            if now == last and now != trimmed_at and self.ctx.sessions == 0:
                trim_heap()
                trimmed_at = now
            last = now

    async def _status_loop(self) -> None:
        assert self.channel is not None
        last = -1
        while True:
            await asyncio.sleep(5.0)
            queued = len(self.scheduler.envelopes)
            if queued != last:
                self.channel.send({"type": "status", "queued": queued})
                last = queued


# -- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homemail", description="homemail mail server")
    parser.add_argument("--version", action="version", version=f"homemail {__version__}")
    parser.add_argument(
        "-n",
        dest="check_only",
        action="store_true",
        help="check the configuration and exit (same as check-config)",
    )
    parser.add_argument(
        "-f",
        dest="config_top",
        metavar="FILE",
        help="configuration file, for run and check-config (as in 'homemail -n -f FILE')",
    )
    parser.add_argument(
        "-v", dest="verbose_top", action="store_true", help="with -n: as check-config -v"
    )
    parser.add_argument(
        "--user-mode", dest="user_mode_top", action="store_true",
        help="with -n: as check-config --user-mode",
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "-f",
        "--config",
        metavar="FILE",
        help="configuration file (default: the embedded user-mode configuration; "
        f"as root {SYSTEM_CONFIG} if it exists)",
    )
    run.add_argument("--spool", metavar="DIR", help="queue directory")
    run.add_argument("--socket", metavar="PATH", help="control socket path")
    run.add_argument(
        "--user-mode",
        action="store_true",
        help="run in user mode (no privilege separation: every process keeps the "
        "caller's rights), even as root",
    )
    run.add_argument(
        "--user",
        default=DEFAULT_USER,
        metavar="NAME",
        help=f"system mode: the unprivileged user of the worker ({DEFAULT_USER})",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    check = sub.add_parser(
        "check-config",
        help="check the configuration run would use and exit",
        description="Check the configuration 'run' would use, with the same options; "
        "nothing is written.",
    )
    check.add_argument("-f", "--config", metavar="FILE", help="configuration file")
    check.add_argument(
        "--user-mode",
        action="store_true",
        help="as root: check user mode's configuration (as 'run --user-mode' would use)",
    )
    check.add_argument(
        "-v", "--verbose", action="store_true", help="also print the effective configuration"
    )
    check.add_argument("-n", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_config(path: str | None, *, user_mode: bool = False, verbose: bool = False) -> int:
    """Check what ``run`` with the same options would load, without writing anything."""
    system = system_mode(user_mode)
    try:
        cfg = load_config(path, system=system, create=False)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    for warning in cfg.warnings:
        print(warning, file=sys.stderr)
    if path is None and not system and not os.path.exists(user_aliases_path()):
        print(
            f"note: {user_aliases_path()} does not exist yet; 'homemail run' creates it "
            "with these aliases",
            file=sys.stderr,
        )
    if verbose:
        sys.stdout.write(dump(cfg))
    print(f"{cfg.path}: configuration OK")
    return EX_OK


def run(args: argparse.Namespace) -> int:
    log.setup(args.verbose)
    if system_mode(args.user_mode):
        return run_system(args)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    for warning in cfg.warnings:
        log.warning(str(warning))
    paths = user_paths()
    if os.geteuid() == 0:
        log.info("running in user mode as root (--user-mode): deliveries run as root")
    hostname = local_hostname()
    # forked first, while this process has no threads, loop, sockets or queue files
    agent, agent_pid = start_delivery_agent(hostname, MDA_THREADS)
    daemon = Daemon(
        cfg,
        spool=args.spool or paths.spool,
        socket_path=args.socket or paths.socket,
        user_mode=True,
        config_path=args.config,
        agent=agent,
        hostname=hostname,
    )
    try:
        run_loop(daemon.serve())
    except OSError as exc:
        log.error(f"cannot start: {exc}")
        return EX_OSERR
    finally:
        agent.close()
        _reap(agent_pid, DRAIN_SECONDS)
    return EX_OK


def _reap(pid: int, timeout: float) -> None:
    """Wait for a child to exit, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def prepare_system_spool(spool: str, uid: int, gid: int) -> None:
    """Lay out the system spool as OpenSMTPD does, without following any symlink.

    The spool itself is root's (0711), so the worker cannot swap its entries for links that
    would make root chown or chmod something else at the next start; ``journal``, ``queue``
    and ``incoming`` are the worker's (0700); ``offline`` is root's, sticky and world-writable
    (1777) for sendmail, and only the parent reads it.
    """
    os.makedirs(spool, mode=0o711, exist_ok=True)
    _own_directory(spool, 0, 0, 0o711)
    for name in ("journal", "queue", "incoming"):
        _own_directory(os.path.join(spool, name), uid, gid, 0o700)
    _own_directory(os.path.join(spool, "offline"), 0, 0, 0o1777)


def _own_directory(path: str, uid: int, gid: int, mode: int) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def run_system(args: argparse.Namespace) -> int:
    """Root: bind, fork the unprivileged worker, then serve it deliveries (homemail.parent)."""
    try:
        cfg = load_config(args.config, system=True)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    for warning in cfg.warnings:
        log.warning(str(warning))
    entry = worker_user(args.user)
    spool = args.spool or SYSTEM_SPOOL
    socket_path = args.socket or SYSTEM_SOCKET
    try:
        prepare_system_spool(spool, entry.pw_uid, entry.pw_gid)
        os.close(lock_spool(spool))  # in use: say so before binding anything (the worker locks)
        bound = bind_listeners(cfg, user_mode=False)
        control_sock = bind_control_socket(socket_path, private_dir=False)
    except OSError as exc:
        log.error(f"cannot start: {exc}")
        return EX_OSERR
    record_offline_dir(socket_path, spool)
    parent_end, worker_end = channel_pair()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = EX_OK
        try:
            parent_end.close()
            drop_privileges(entry)
            os.environ["HOME"] = entry.pw_dir
            os.environ["USER"] = os.environ["LOGNAME"] = entry.pw_name
            daemon = Daemon(
                cfg,
                spool=spool,
                socket_path=socket_path,
                user_mode=False,
                config_path=args.config,
                bound=bound,
                control_sock=control_sock,
                channel=worker_end,
            )
            run_loop(daemon.serve())
        except BaseException as exc:
            log.error(f"worker: {exc!r}")
            code = EX_SOFTWARE
        finally:
            sys.stderr.flush()
            os._exit(code)
    worker_end.close()
    control_sock.close()  # the parent keeps no listening socket: the worker has them
    for _, socks in bound.values():
        for sock in socks:
            sock.close()
    log.event("parent", "smtpd", "started", worker=pid, user=entry.pw_name)
    parent = Parent(
        cfg,
        parent_end,
        worker_pid=pid,
        worker_uid=entry.pw_uid,
        spool=spool,
        hostname=local_hostname(),
        config_path=args.config,
    )
    parent.reload_listeners = _rebind
    parent.secrets_path = secrets_path(args.config, user_mode=False)
    status = parent.run()
    with contextlib.suppress(OSError):
        os.unlink(socket_path)
    log.event("parent", "smtpd", "stopped", worker_status=status)
    return EX_OK if status == 0 else EX_SOFTWARE


def _rebind(
    old: Config, new: Config
) -> tuple[list[list[Any]], list[list[Any]], list[list[Any]], list[int]]:
    """Parent, on reload: bind the listeners that are new; name those that went away.

    Raises OSError, having bound nothing, when a new listener cannot bind.  A listener whose
    address and port stay while its settings change (hostname, tag, mask-src) cannot be bound
    a second time while the worker holds it: the worker keeps its socket and gives its new
    sessions the new settings (``moved``: [old key, new key] pairs).
    """
    before = listener_keys(old, user_mode=False)
    after = listener_keys(new, user_mode=False)
    gone = before.keys() - after.keys()
    held = {k for k in after.keys() - before.keys() if any(k[:2] == g[:2] for g in gone)}
    bound = bind_listeners(new, user_mode=False, keep=(before.keys() & after.keys()) | held)
    add: list[list[Any]] = []
    fds: list[int] = []
    for key, (_, socks) in bound.items():
        add.append([list(key), len(socks)])
        for sock in socks:
            fds.append(sock.detach())
    remove = [list(key) for key in gone if not any(key[:2] == k[:2] for k in held)]
    moved = [[list(g), list(k)] for k in held for g in gone if g[:2] == k[:2]]
    return add, remove, moved, fds


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # OpenSMTPD's habit: "homemail -f FILE run" is "homemail run -f FILE"
    config = getattr(args, "config", None)
    if args.config_top is not None and config is not None and args.config_top != config:
        parser.error(f"two configuration files: -f {args.config_top} and -f {config}")
    config = config or args.config_top
    if args.check_only or args.command == "check-config":
        return check_config(
            config,
            user_mode=getattr(args, "user_mode", False) or args.user_mode_top,
            verbose=getattr(args, "verbose", False) or args.verbose_top,
        )
    if args.command == "run":
        args.config = config
        return run(args)
    parser.print_help(sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
