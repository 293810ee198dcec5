"""The daemon: command line, modes, start-up, reload and shutdown.

``homemail run`` loads the configuration, recovers the queue, binds the listeners and runs the
scheduler until SIGTERM or SIGINT; a second signal forces the exit.  Shutdown stops listening
first, lets open sessions finish for up to :data:`DRAIN_SECONDS`, then lets running deliveries
end; nothing acknowledged is lost because a 250 is only sent once the queue has the message on
disk.  SIGHUP re-reads the configuration; an invalid one is logged and the running one kept.

User mode (any ordinary user; root only with ``--user-mode``) listens on 127.0.0.1:2525 by
default, delivers only to the running user, and keeps its spool under ``$XDG_STATE_HOME`` and its
control socket under ``$XDG_RUNTIME_DIR``.  System mode (root, privilege separation) is not part
of this release and is refused with a message saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from homemail import __version__, bounce, log, mda, offline
from homemail.address import AddressError, parse_mailbox
from homemail.aliases import UserDb, current_user
from homemail.config import (
    Config,
    ConfigError,
    Listener,
    Location,
    default_aliases_text,
    default_config_text,
    parse_file,
    parse_string,
)
from homemail.control import ControlServer
from homemail.control_protocol import Code
from homemail.queue import Envelope, Queue, QueueError, new_evpid, new_msgid
from homemail.queue_fs import FsQueue
from homemail.ruleset import LOCAL_SOURCE, Rejected, Ruleset
from homemail.scheduler import Scheduler
from homemail.smtp import (
    MessageRefused,
    Recipient,
    ServerContext,
    Session,
    SmtpServer,
    Transaction,
    build_message,
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


def user_aliases_path() -> str:
    home = os.path.expanduser("~")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return os.path.join(config, "homemail", "aliases")


def load_config(path: str | None) -> Config:
    """The file's configuration, or the embedded user-mode default (creating its aliases)."""
    if path is not None:
        return parse_file(path)
    user = current_user().name
    aliases = user_aliases_path()
    if not os.path.exists(aliases):
        try:
            os.makedirs(os.path.dirname(aliases), mode=0o700, exist_ok=True)
            with open(aliases, "x", encoding="utf-8") as f:
                f.write(default_aliases_text(user))
        except OSError:
            return parse_string(default_config_text(user), "<embedded>")
    return parse_string(default_config_text(user, aliases), "<embedded>")


def listener_hosts(listener: Listener) -> list[str]:
    if listener.address == "localhost":
        hosts = ["127.0.0.1"]
        if socket.has_ipv6 and _ipv6_loopback_usable():
            hosts.append("::1")
        return hosts
    if listener.address == "all":
        return ["0.0.0.0", "::"] if socket.has_ipv6 else ["0.0.0.0"]
    return [listener.address]


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class Daemon:
    def __init__(
        self, cfg: Config, *, spool: str, socket_path: str, user_mode: bool, config_path: str | None
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.spool = spool
        self.socket_path = socket_path
        self.user_mode = user_mode
        self.hostname = socket.getfqdn() or socket.gethostname() or "localhost"
        self.users = UserDb(user_mode=user_mode)
        self.queue: Queue = FsQueue(spool)
        self.scheduler = Scheduler(
            self.queue,
            self.deliver,
            self.submit_bounce,
            hostname=self.hostname,
            warn_intervals=cfg.bounce_warn_interval,
        )
        self.scheduler.notify = self.publish
        self.ctx = self._context(cfg)
        self.server = SmtpServer(self.ctx)
        self.control = ControlServer(self, socket_path)
        self.started = time.time()
        self.mta_paused = False
        self._pickup: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._socket_listener = Listener("socket", None, None, None, False,
                                         Location("<socket>", 0, 0))

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
        return ctx

    def publish(self, name: str, data: dict[str, object]) -> None:
        self.control.monitor.publish(name, data)

    def local_session(self, uid: int, user: str) -> Session:
        """An SMTP session for local enqueue (sendmail), on a switched control connection."""
        return Session(self.ctx, self._socket_listener, source=LOCAL_SOURCE, uid=uid)

    # -- queue entry points ------------------------------------------------------------------

    async def enqueue(self, message: bytes, envelopes: list[Envelope]) -> None:
        await self.queue.commit(message, envelopes)
        self.scheduler.stats["queue.commit"] += 1
        self.scheduler.schedule(envelopes)

    async def submit_bounce(self, rcpt: str, message: bytes) -> None:
        try:
            address = parse_mailbox(rcpt)
        except AddressError as exc:
            raise QueueError(f"bounce recipient unusable: {exc}") from None
        try:
            targets = self.ctx.ruleset.route(LOCAL_SOURCE, address)
        except Rejected as exc:
            raise QueueError(f"no route for the bounce: {exc.reply}") from None
        msgid = new_msgid()
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
                expire=now + self.cfg.queue_ttl,
                next_try=now,
                bounce=True,
                src="local",
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
                f"user {env.user!r} does not exist", permanent=True, status="5.1.1"
            )
        message = await asyncio.to_thread(self.queue.read_message, env.msgid)
        await asyncio.to_thread(mda.deliver_local, action, user, env, message, self.hostname)

    # -- the offline spool (sendmail while the daemon was down) ------------------------------

    def offline_dir(self) -> str:
        return os.path.join(self.spool, "offline")

    async def pickup_offline(self) -> None:
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
                offline.read, directory, name, expected_uid=expected,
                max_size=self.cfg.max_message_size + 65536,
            )
        except offline.OfflineError as exc:
            log.event("offline", "offline", "refused", file=name, reason=str(exc))
            await asyncio.to_thread(offline.discard, directory, name)
            return
        if any(e.offline == name for e in self.scheduler.envelopes.values()):
            await asyncio.to_thread(offline.discard, directory, name)  # taken before a crash
            return
        txn = Transaction(sender=item.sender)
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
            txn.recipients.append(Recipient(rcpt=str(address), targets=targets))
        msgid = new_msgid()
        now = time.time()
        try:
            message = build_message(
                item.message, origin=f"local (uid {item.uid})", hostname=self.hostname,
                proto="ESMTP", msgid=msgid, now=now, add_ids=True,
                single_rcpt=txn.recipients[0].rcpt if len(txn.recipients) == 1 else None,
            )
        except MessageRefused as exc:
            rejected = [(r, exc.reply) for r in item.rcpts]
            txn.recipients = []
            message = item.message
        envelopes = make_envelopes(txn, msgid, now=now, ttl=self.cfg.queue_ttl, uid=item.uid,
                                   src="local", helo="")
        for env in envelopes:
            env.offline = name
        try:
            if envelopes:
                await self.queue.commit(message, envelopes)
            for rcpt, reply in rejected:
                log.event("offline", "offline", "rejected", file=name, rcpt=f"<{rcpt}>",
                          result=reply)
                await self._offline_bounce(item.sender, rcpt, reply, item.message, now)
        except QueueError as exc:
            log.event("offline", "offline", "failed", file=name, error=str(exc))
            return
        await asyncio.to_thread(offline.discard, directory, name)
        if envelopes:
            log_accepted(self.ctx, "offline", msgid, message, txn, envelopes, "ESMTP", item.uid)
            self.scheduler.stats["queue.commit"] += 1
            self.scheduler.schedule(envelopes)

    async def _offline_bounce(self, sender: str, rcpt: str, reply: str, original: bytes,
                              now: float) -> None:
        if not sender:
            return
        status = reply.split(" ")[1] if reply.count(" ") >= 1 else "5.0.0"
        message = bounce.make_dsn(
            kind="failure",
            reporting_mta=self.hostname,
            sender=sender,
            original=original,
            recipients=[bounce.RecipientStatus(
                final_recipient=rcpt, original_recipient=None, action="failed", status=status,
                diagnostic=f"smtp; {reply}", remote_mta=None, last_attempt=now,
                will_retry_until=None)],
            arrival_date=now,
        )
        try:
            await self.submit_bounce(sender, message)
        except QueueError as exc:
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
            "version": __version__,
            "mode": "user" if self.user_mode else "system",
            "pid": os.getpid(),
            "config": self.cfg.path,
            "hostname": self.hostname,
        }

    def set_paused(self, subsystem: str, paused: bool) -> None:
        if subsystem == "smtp":
            self.ctx.paused = paused
        elif subsystem == "mda":
            self.scheduler.paused = paused
            self.scheduler.schedule([])
        else:
            self.mta_paused = paused
        log.event("-", "control", "paused" if paused else "resumed", subsystem=subsystem)
        self.publish("paused" if paused else "resumed", {"subsystem": subsystem})
        if subsystem == "smtp" and not paused:
            self._pickup = asyncio.ensure_future(self.pickup_offline())

    def aliases_path(self) -> str | None:
        """The aliases file `alias list|add|remove` edit: table "aliases", else an action's."""
        names = ["aliases"] + [a.alias for a in self.cfg.actions.values() if a.alias]
        for name in names:
            table = self.cfg.tables.get(name)
            if table is not None and table.source is not None:
                return table.source
        return None

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

    async def update_table_by_path(self, path: str) -> str | None:
        for name, table in list(self.cfg.tables.items()):
            if table.source == path:
                error = await self.update_table(name)
                if error is not None:
                    return error[1]
        return None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        envelopes = await asyncio.to_thread(self.queue.load)
        self.scheduler.schedule(envelopes)
        await self.control.start(private_dir=self.socket_path == user_paths().socket)
        for listener in self.cfg.listeners or []:
            port = listener.port or (USER_MODE_PORT if self.user_mode else SYSTEM_PORT)
            await self.server.listen(listener, listener_hosts(listener), port)
            log.event("-", "smtp", "listening", address=listener.address, port=port)
        await asyncio.to_thread(offline.prepare_dir, self.offline_dir())
        await self.pickup_offline()
        log.event(
            "-",
            "smtpd",
            "ready",
            version=__version__,
            mode="user" if self.user_mode else "system",
            queued=len(self.scheduler.envelopes),
            spool=self.spool,
            control=self.socket_path,
        )

    async def reload(self) -> str | None:
        """Re-read the configuration; returns None, or why the running one was kept."""
        try:
            cfg = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error(f"reload failed, keeping the running configuration: {exc}")
            return str(exc)
        changed = _listen_set(cfg) != _listen_set(self.cfg)
        if changed:
            self.server.close()
            await self.server.wait_closed()
        self.cfg = cfg
        fresh = self._context(cfg)
        for name in ("ruleset", "max_message_size", "max_mails", "max_rcpt", "queue_ttl"):
            setattr(self.ctx, name, getattr(fresh, name))
        self.scheduler.warn_intervals = sorted(cfg.bounce_warn_interval)
        if changed:
            for listener in cfg.listeners:
                port = listener.port or (USER_MODE_PORT if self.user_mode else SYSTEM_PORT)
                await self.server.listen(listener, listener_hosts(listener), port)
        log.event("-", "smtpd", "reloaded", config=cfg.path, listeners_rebound=changed)
        self.publish("reloaded", {"config": cfg.path})
        return None

    def request_stop(self) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            os._exit(EX_SOFTWARE)
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        await self.start()
        runner = asyncio.create_task(self.scheduler.run())
        scanner = asyncio.create_task(self._offline_loop())
        await self._stop.wait()
        log.event("-", "smtpd", "stopping", sessions=self.ctx.sessions)
        self.server.close()
        scanner.cancel()
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.ctx.sessions > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.control.stop()
        await self.scheduler.stop()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await self.queue.close()
        log.event("-", "smtpd", "stopped")


def _listen_set(cfg: Config) -> list[tuple[str, int | None, str | None, str | None, bool]]:
    return [(x.address, x.port, x.hostname, x.tag, x.mask_src) for x in cfg.listeners]


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
    parser.add_argument("-f", dest="config_top", metavar="FILE", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "-f",
        "--config",
        metavar="FILE",
        help="configuration file (default: the embedded user-mode configuration)",
    )
    run.add_argument("--spool", metavar="DIR", help="queue directory")
    run.add_argument("--socket", metavar="PATH", help="control socket path")
    run.add_argument(
        "--user-mode",
        action="store_true",
        help="run as a single unprivileged process (required to do so as root)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    check = sub.add_parser("check-config", help="check the configuration and exit")
    check.add_argument("-f", "--config", metavar="FILE")
    check.add_argument("-n", action="store_true", help=argparse.SUPPRESS)
    return parser


def check_config(path: str | None) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    for warning in cfg.warnings:
        print(warning, file=sys.stderr)
    print(f"{cfg.path}: configuration OK")
    return EX_OK


def run(args: argparse.Namespace) -> int:
    log.setup(args.verbose)
    if os.geteuid() == 0 and not args.user_mode:
        print(
            "homemail: system mode (running as root with privilege separation) is not "
            "supported yet; run as an ordinary user, or pass --user-mode to run as a "
            "single process",
            file=sys.stderr,
        )
        return EX_CONFIG
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
    daemon = Daemon(
        cfg,
        spool=args.spool or paths.spool,
        socket_path=args.socket or paths.socket,
        user_mode=True,
        config_path=args.config,
    )
    try:
        asyncio.run(daemon.serve())
    except OSError as exc:
        log.error(f"cannot start: {exc}")
        return EX_OSERR
    return EX_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_only or args.command == "check-config":
        return check_config(getattr(args, "config", None) or args.config_top)
    if args.command == "run":
        return run(args)
    parser.print_help(sys.stderr)
    return EX_USAGE


if __name__ == "__main__":
    sys.exit(main())
