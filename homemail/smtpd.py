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

from homemail import __version__, log, mda
from homemail.address import AddressError, parse_mailbox
from homemail.aliases import UserDb, current_user
from homemail.config import (
    Config,
    ConfigError,
    Listener,
    default_config_text,
    parse_file,
    parse_string,
)
from homemail.queue import Envelope, Queue, QueueError, new_evpid, new_msgid
from homemail.queue_fs import FsQueue
from homemail.ruleset import LOCAL_SOURCE, Rejected, Ruleset
from homemail.scheduler import Scheduler
from homemail.smtp import ServerContext, SmtpServer

EX_OK = 0
EX_USAGE = 64
EX_SOFTWARE = 70
EX_OSERR = 71
EX_CONFIG = 78
DRAIN_SECONDS = 10.0
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


def load_config(path: str | None) -> Config:
    if path is None:
        return parse_string(default_config_text(current_user().name), "<embedded>")
    return parse_file(path)


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
        self.ctx = self._context(cfg)
        self.server = SmtpServer(self.ctx)
        self.started = time.time()
        self._stop = asyncio.Event()
        self._signals = 0

    def _context(self, cfg: Config) -> ServerContext:
        return ServerContext(
            hostname=self.hostname,
            ruleset=Ruleset(cfg, self.users, self.hostname),
            max_message_size=cfg.max_message_size,
            max_mails=cfg.max_mails,
            max_rcpt=cfg.max_rcpt,
            queue_ttl=cfg.queue_ttl,
            enqueue=self.enqueue,
        )

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

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        envelopes = await asyncio.to_thread(self.queue.load)
        for listener in self.cfg.listeners or []:
            port = listener.port or (USER_MODE_PORT if self.user_mode else SYSTEM_PORT)
            await self.server.listen(listener, listener_hosts(listener), port)
            log.event("-", "smtp", "listening", address=listener.address, port=port)
        self.scheduler.schedule(envelopes)
        log.event(
            "-",
            "smtpd",
            "ready",
            version=__version__,
            mode="user" if self.user_mode else "system",
            queued=len(envelopes),
            spool=self.spool,
        )

    async def reload(self) -> bool:
        try:
            cfg = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            log.error(f"reload failed, keeping the running configuration: {exc}")
            return False
        changed = _listen_set(cfg) != _listen_set(self.cfg)
        if changed:
            self.server.close()
            await self.server.wait_closed()
        self.cfg = cfg
        ctx = self._context(cfg)
        self.ctx.__dict__.update(
            {k: v for k, v in ctx.__dict__.items() if k not in ("sessions", "paused")}
        )
        self.scheduler.warn_intervals = sorted(cfg.bounce_warn_interval)
        if changed:
            for listener in cfg.listeners:
                port = listener.port or (USER_MODE_PORT if self.user_mode else SYSTEM_PORT)
                await self.server.listen(listener, listener_hosts(listener), port)
        log.event("-", "smtpd", "reloaded", config=cfg.path, listeners_rebound=changed)
        return True

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
        await self._stop.wait()
        log.event("-", "smtpd", "stopping", sessions=self.ctx.sessions)
        self.server.close()
        deadline = time.monotonic() + DRAIN_SECONDS
        while self.ctx.sessions > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
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
