"""The control socket: who may ask what, and the daemon's answers (REFERENCE §6).

One Unix socket serves homemailctl, sendmail and the tray app with the protocol of
:mod:`homemail.control_protocol`.  The caller's uid comes from the kernel (SO_PEERCRED on Linux,
LOCAL_PEERCRED on the BSDs), never from the request.  Read-only verbs are open to every local
user, who sees only the envelopes that are theirs (they sent them through sendmail, or they are
the recipient); verbs that change anything need root, the daemon's own uid, or membership of the
``homemail-admin`` group.

What a client sends can only ever cost that client its connection: a malformed frame gets an
error reply and the connection is closed, a frame over 64 KiB is refused without being
buffered, and each uid has a bounded number of connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from homemail import control_protocol as proto
from homemail import log
from homemail.control_protocol import Code, ProtocolError, Request
from homemail.queue import Envelope, format_id, parse_id

if TYPE_CHECKING:
    from homemail.smtpd import Daemon

ADMIN_GROUP = "homemail-admin"
MAX_CONNECTIONS_PER_UID = 32
MAX_CONNECTIONS_PRIVILEGED = 256
CHUNK_ENVELOPES = 100  # ~40 KiB of JSON: under the 64 KiB frame limit
CHUNK_BYTES = 32 * 1024
IDLE_TIMEOUT = 300.0
MAX_UNREAD = 8 << 20  # bytes of replies a client may leave unread before it is dropped


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int
    user: str
    privileged: bool


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(uid, gid, pid) of the process at the other end of a Unix socket."""
    if hasattr(socket, "SO_PEERCRED"):
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", data)
        return uid, gid, pid
    local_peercred = getattr(socket, "LOCAL_PEERCRED", 0x001)  # FreeBSD, macOS: struct xucred
    data = sock.getsockopt(0, local_peercred, struct.calcsize("Iih16i"))
    _version, uid, ngroups, *groups = struct.unpack("Iih16i", data)
    return uid, groups[0] if ngroups else -1, -1


def is_privileged(uid: int, gid: int, user: str) -> bool:
    if uid in (0, os.geteuid()):
        return True
    try:
        admin = grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        return False
    return gid == admin.gr_gid or user in admin.gr_mem


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


def envelope_view(env: Envelope, state: str) -> dict[str, Any]:
    return {
        "id": format_id(env.evpid),
        "msgid": format_id(env.msgid),
        "type": env.type,
        "sender": env.sender,
        "rcpt": env.rcpt,
        "dest": env.dest,
        "user": env.user,
        "ctime": env.ctime,
        "expire": env.expire,
        "next_try": env.next_try,
        "last_try": env.last_try,
        "retry": env.retry,
        "state": state,
        "last_error": env.last_error,
    }


class Monitor:
    """Fan-out of daemon events to subscribed control connections."""

    def __init__(self) -> None:
        self.subscribers: dict[ControlConnection, int] = {}

    def publish(self, name: str, data: dict[str, Any]) -> None:
        if not self.subscribers:
            return
        for conn, req_id in list(self.subscribers.items()):
            if not conn.may_see_event(data):
                continue
            try:
                conn.send(proto.event(req_id, name, data))
            except ProtocolError:  # e.g. text that cannot be encoded: that event is skipped
                continue


def bind_control_socket(path: str, *, private_dir: bool) -> socket.socket:
    """Bind the control socket (world-connectable: access is checked per verb)."""
    parent = os.path.dirname(path) or "."
    above = os.path.dirname(parent)
    in_tmp = private_dir and os.path.basename(above).startswith("homemail-")
    if in_tmp:  # /tmp/homemail-UID (no XDG_RUNTIME_DIR): makedirs would make it 0755
        with contextlib.suppress(FileExistsError):
            os.mkdir(above, 0o700)
    os.makedirs(parent, mode=0o700 if private_dir else 0o755, exist_ok=True)
    if private_dir:  # e.g. /tmp/homemail-UID/homemail: nobody else may own or enter it
        for directory in (parent, above) if in_tmp else (parent,):
            st_dir = os.lstat(directory)
            if (
                stat.S_ISDIR(st_dir.st_mode)
                and st_dir.st_uid == os.geteuid()
                and st_dir.st_mode & 0o077
                and not st_dir.st_mode & 0o022
            ):  # ours, and nobody else could write in it (as an earlier version made it): close
                os.chmod(directory, 0o700)
                st_dir = os.lstat(directory)
            if (
                not stat.S_ISDIR(st_dir.st_mode)
                or st_dir.st_uid != os.geteuid()
                or st_dir.st_mode & 0o077
            ):
                raise OSError(f"{directory} must be a directory of yours with mode 0700")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left over by a daemon that died
        else:
            raise OSError(f"another daemon is answering on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)  # noqa: S103 - access is checked per verb, from peer credentials
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ControlServer:
    def __init__(self, daemon: Daemon, path: str) -> None:
        self.daemon = daemon
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.per_uid: dict[int, int] = {}
        self.monitor = Monitor()

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: ControlConnection(self), sock=sock)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.server = None


class ControlConnection(asyncio.Protocol):
    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.daemon = server.daemon
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.buffer = bytearray()
        self.requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.switched = False
        self.closed = False
        self.released = False
        self.idle: asyncio.TimerHandle | None = None

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

        sock = transport.get_extra_info("socket")
        try:
            uid, gid, pid = peer_credentials(sock)
        except OSError:
            transport.close()
            return
        user = _user_name(uid)
        self.peer = Peer(uid, gid, pid, user, is_privileged(uid, gid, user))
        count = self.server.per_uid.get(uid, 0) + 1
        self.server.per_uid[uid] = count
        limit = MAX_CONNECTIONS_PRIVILEGED if self.peer.privileged else MAX_CONNECTIONS_PER_UID
        if count > limit:
            self.send(proto.reply_error(0, Code.TOO_MANY, "too many connections"))
            self.close()
            return
        self.worker = asyncio.get_running_loop().create_task(self._serve())
        self._touch()

    def _release_slot(self) -> None:
        if self.peer is not None and not self.released:
            self.released = True
            left = self.server.per_uid.get(self.peer.uid, 1) - 1
            if left <= 0:
                self.server.per_uid.pop(self.peer.uid, None)
            else:
                self.server.per_uid[self.peer.uid] = left

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._release_slot()
        self.server.monitor.subscribers.pop(self, None)
        if self.idle is not None:
            self.idle.cancel()
        if self.worker is not None:
            self.worker.cancel()

    def _touch(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self not in self.server.monitor.subscribers:
            self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.closed:
            if self.transport.get_write_buffer_size() > MAX_UNREAD:
                self.close()  # a client that does not read what it asked for
                return
            self.transport.write(frame)

    async def drained(self) -> bool:
        """Wait until the client has read most of what was sent; False if it went away."""
        while (
            not self.closed
            and self.transport is not None
            and self.transport.get_write_buffer_size() > 1 << 20
        ):
            await asyncio.sleep(0.02)
        return not self.closed

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > proto.MAX_FRAME:
                    self.buffer.clear()
                    self.send(proto.reply_error(0, Code.TOO_LARGE, "frame too large"))
                    self.close()
                break
            if end + 1 > proto.MAX_FRAME:
                self.send(proto.reply_error(0, Code.TOO_LARGE, "frame too large"))
                self.close()
                return
            line = bytes(self.buffer[: end + 1])
            del self.buffer[: end + 1]
            self.requests.put_nowait(line)
            self._touch()
            if self.requests.qsize() > 64:  # a client that does not read its replies
                self.close()
                return

    def eof_received(self) -> bool | None:
        self.requests.put_nowait(None)
        return True  # keep the write side open for the replies still due

    # -- requests ----------------------------------------------------------------------------

    async def _serve(self) -> None:
        while not self.closed:
            line = await self.requests.get()
            if line is None:
                self.close()
                return
            try:
                req = proto.decode_request(line)
            except ProtocolError as exc:  # answered with the request's id when it could be read
                ident = exc.id if exc.id is not None else 0
                self.send(proto.reply_error(ident, exc.code, exc.message))
                self.close()
                return
            try:
                await self._dispatch(req)
            except ProtocolError as exc:
                self.send(proto.reply_error(req.id, exc.code, exc.message))
            except Exception as exc:
                log.event("control", "control", "error", verb=req.verb, error=repr(exc))
                self.send(proto.reply_error(req.id, Code.INTERNAL, "internal error"))
            if self.switched:
                return

    async def _dispatch(self, req: Request) -> None:
        assert self.peer is not None
        if proto.VERBS[req.verb] and not self.peer.privileged:
            log.event("control", "control", "refused", verb=req.verb, uid=self.peer.uid)
            raise ProtocolError(Code.FORBIDDEN, f"{req.verb}: permission denied")
        handler = HANDLERS[req.verb]
        if req.verb in QUEUE_VERBS:  # answer for the whole queue, not what is read so far
            await self.daemon.queue_loaded.wait()
        await handler(self, req)

    def owns(self, env: Envelope) -> bool:
        assert self.peer is not None
        return self.peer.privileged or env.uid == self.peer.uid or env.user == self.peer.user

    def may_see_event(self, data: dict[str, Any]) -> bool:
        assert self.peer is not None
        if self.peer.privileged:
            return True
        if "uid" in data or "user" in data or "users" in data:
            users = data.get("users")
            return (
                data.get("uid") == self.peer.uid
                or data.get("user") == self.peer.user
                or (isinstance(users, list) and self.peer.user in users)
            )
        return True

    def visible(self) -> Iterable[Envelope]:
        return (e for e in self.daemon.scheduler.envelopes.values() if self.owns(e))

    def find(self, text: str) -> list[Envelope]:
        """Envelopes named by an evpid, a msgid, or 'all' (only those the caller may see)."""
        if text == "all":
            return list(self.visible())
        try:
            ident = parse_id(text)
        except ValueError as exc:
            raise ProtocolError(Code.BAD_REQUEST, str(exc)) from None
        envs = self.daemon.scheduler.envelopes
        if ident > 0xFFFFFFFF:
            found = [envs[ident]] if ident in envs else []
        else:
            found = [e for e in envs.values() if e.msgid == ident]
        found = [e for e in found if self.owns(e)]
        if not found:
            raise ProtocolError(Code.NOT_FOUND, f"no envelope or message {text}")
        return found

    def state(self, env: Envelope) -> str:
        if env.evpid in self.daemon.scheduler.running:
            return "running"
        return "paused" if env.paused else "pending"

    # -- the switch to SMTP (local enqueue) --------------------------------------------------

    def switch_to_smtp(self) -> None:
        assert self.transport is not None and self.peer is not None
        self.switched = True
        self._release_slot()  # the SMTP session that takes over is not a control connection
        if self.idle is not None:
            self.idle.cancel()
        leftover = bytes(self.buffer)
        self.buffer.clear()
        session = self.daemon.local_session(self.peer.uid, self.peer.user)
        self.transport.set_protocol(session)
        session.connection_made(self.transport)
        if leftover:
            session.data_received(leftover)


Handler = Callable[[ControlConnection, Request], Awaitable[None]]
HANDLERS: dict[str, Handler] = {}


# verbs about the queue's envelopes wait until the daemon has read all of them at start
QUEUE_VERBS = frozenset(
    {
        "show queue",
        "show envelope",
        "show message",
        "schedule",
        "remove",
        "pause envelope",
        "resume envelope",
    }
)


def handles(*verbs: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for verb in verbs:
            HANDLERS[verb] = fn
        return fn

    return register


@handles("show queue")
async def _show_queue(c: ControlConnection, req: Request) -> None:
    items: list[dict[str, Any]] = []
    count = 0
    for env in list(c.visible()):
        items.append(envelope_view(env, c.state(env)))
        if len(items) >= CHUNK_ENVELOPES:
            c.send(proto.event(req.id, "items", {"items": items}))
            count += len(items)
            items = []
            if not await c.drained():  # and let other clients in while a big queue streams
                return
            await asyncio.sleep(0)
    if items:
        c.send(proto.event(req.id, "items", {"items": items}))
        count += len(items)
    c.send(proto.reply_ok(req.id, {"count": count}))


@handles("show envelope")
async def _show_envelope(c: ControlConnection, req: Request) -> None:
    text = proto.arg_str(req, "id")
    envs = c.find(text)
    if text == "all" or len(envs) != 1:
        raise ProtocolError(Code.BAD_REQUEST, "show envelope takes one envelope id")
    env = envs[0]
    view = envelope_view(env, c.state(env))
    view.update(env.to_json())
    view["evpid"] = format_id(env.evpid)
    c.send(proto.reply_ok(req.id, view))


@handles("show message")
async def _show_message(c: ControlConnection, req: Request) -> None:
    text = proto.arg_str(req, "id")
    if text == "all":
        raise ProtocolError(Code.BAD_REQUEST, "show message takes one message id")
    env = c.find(text)[0]
    data = await asyncio.to_thread(c.daemon.queue.read_message, env.msgid)
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = base64.b64encode(data[start : start + CHUNK_BYTES]).decode("ascii")
        c.send(proto.event(req.id, "chunk", {"b64": chunk}))
        if not await c.drained():
            return
    c.send(proto.reply_ok(req.id, {"size": len(data)}))


@handles("show stats")
async def _show_stats(c: ControlConnection, req: Request) -> None:
    c.send(proto.reply_ok(req.id, c.daemon.stats()))


@handles("show status")
async def _show_status(c: ControlConnection, req: Request) -> None:
    c.send(proto.reply_ok(req.id, c.daemon.status()))


@handles("show config")
async def _show_config(c: ControlConnection, req: Request) -> None:
    from homemail.config import dump

    c.send(proto.reply_ok(req.id, {"text": dump(c.daemon.cfg)}))


@handles("schedule")
async def _schedule(c: ControlConnection, req: Request) -> None:
    text = proto.arg_str(req, "id")
    envs = c.find(text)
    if text != "all" and all(env.paused for env in envs):
        raise ProtocolError(
            Code.CONFLICT, f"{text} is paused: resume it first (resume envelope {text})"
        )
    count = 0
    for env in envs:  # a paused one is not scheduled, nor counted
        count += c.daemon.scheduler.schedule_now(env.evpid)
    c.send(proto.reply_ok(req.id, {"count": count}))


@handles("remove")
async def _remove(c: ControlConnection, req: Request) -> None:
    envs = c.find(proto.arg_str(req, "id"))
    count = 0
    for env in envs:
        if await c.daemon.scheduler.remove(env.evpid):
            count += 1
            log.event(
                format_id(env.evpid),
                "control",
                "removed",
                evpid=format_id(env.evpid),
                by=c.peer.user if c.peer else "?",
            )
    c.daemon.publish("queue", {"size": len(c.daemon.scheduler.envelopes)})
    c.send(proto.reply_ok(req.id, {"count": count}))


@handles("pause envelope", "resume envelope")
async def _pause_envelope(c: ControlConnection, req: Request) -> None:
    pause = req.verb.startswith("pause")
    envs = c.find(proto.arg_str(req, "id"))
    for env in envs:
        if env.paused != pause:  # one already so costs no write (a sync, in queue/)
            env.paused = pause
            try:
                await c.daemon.queue.update(env)
            except BaseException:
                env.paused = not pause  # as on disk: "all" again retries it
                raise
        if not pause:
            c.daemon.scheduler.schedule_now(env.evpid)
    c.send(proto.reply_ok(req.id, {"count": len(envs)}))


@handles("pause smtp", "resume smtp", "pause mda", "resume mda", "pause mta", "resume mta")
async def _pause_subsystem(c: ControlConnection, req: Request) -> None:
    action, subsystem = req.verb.split()
    c.daemon.set_paused(subsystem, action == "pause")
    c.send(proto.reply_ok(req.id, {}))


@handles("reload")
async def _reload(c: ControlConnection, req: Request) -> None:
    error = await c.daemon.reload()
    if error is not None:
        raise ProtocolError(Code.CONFLICT, error)
    c.send(proto.reply_ok(req.id, {"reloaded": True}))


@handles("update table")
async def _update_table(c: ControlConnection, req: Request) -> None:
    if req.args.get("aliases") is True:  # newaliases: whichever tables hold the aliases
        updated = await c.daemon.update_aliases()
        if isinstance(updated, tuple):
            raise ProtocolError(updated[0], updated[1])
        c.send(proto.reply_ok(req.id, {"tables": updated}))
        return
    name = proto.arg_str(req, "name")
    error = await c.daemon.update_table(name)
    if error is not None:
        raise ProtocolError(error[0], error[1])
    c.send(proto.reply_ok(req.id, {"table": name}))


@handles("alias list", "alias add", "alias remove")
async def _alias(c: ControlConnection, req: Request) -> None:
    from homemail import aliases as aliases_file

    path = c.daemon.aliases_path()
    if path is None:
        raise ProtocolError(
            Code.CONFLICT,
            "the configuration names no aliases file "
            "(an inline table must be edited in the configuration)",
        )
    try:
        if req.verb == "alias list":
            entries = await asyncio.to_thread(aliases_file.read_entries, path)
            c.send(
                proto.reply_ok(
                    req.id,
                    {"file": path, "aliases": [{"name": n, "targets": t} for n, t in entries]},
                )
            )
            return
        name = proto.arg_str(req, "name")
        targets = proto.arg_list(req, "targets") if req.verb == "alias add" else []
        await c.daemon.edit_alias(path, req.verb.split()[1], name, targets)
    except aliases_file.AliasEditError as exc:
        raise ProtocolError(Code(exc.code), str(exc)) from None
    error = await c.daemon.update_table_by_path(path)
    if error is not None:
        raise ProtocolError(Code.CONFLICT, error)
    log.event(
        "control",
        "control",
        req.verb.replace(" ", "-"),
        name=name,
        by=c.peer.user if c.peer else "?",
    )
    c.send(proto.reply_ok(req.id, {"file": path}))


@handles("monitor")
async def _monitor(c: ControlConnection, req: Request) -> None:
    counters = bool(req.args.get("counters", False))
    c.send(proto.reply_ok(req.id, {"counters": counters}))
    c.server.monitor.subscribers[c] = req.id
    if c.idle is not None:
        c.idle.cancel()
    if not counters:
        return
    before = c.daemon.stats()
    while not c.closed:
        await asyncio.sleep(1.0)
        now = c.daemon.stats()
        delta = {
            k: v - before.get(k, 0)
            for k, v in now.items()
            if isinstance(v, int) and not k.endswith(("active", "size", "uptime"))
        }
        delta.update({k: v for k, v in now.items() if k.endswith(("active", "size"))})
        before = now
        c.send(proto.event(req.id, "counters", delta))


@handles("secret set")
async def _secret_set(c: ControlConnection, req: Request) -> None:
    label = proto.arg_str(req, "label")
    username = proto.arg_str(req, "username")
    password = proto.arg_str(req, "password")
    error = await c.daemon.store_secret(label, username, password)
    if error is not None:
        raise ProtocolError(Code.BAD_REQUEST, error)
    log.event(
        "control", "control", "secret-stored", label=label, by=c.peer.user if c.peer else "?"
    )  # never the password
    c.send(proto.reply_ok(req.id, {"label": label}))


@handles("log verbose", "log brief")
async def _log_level(c: ControlConnection, req: Request) -> None:
    log.set_verbose(req.verb == "log verbose")
    c.send(proto.reply_ok(req.id, {}))


@handles("smtp")
async def _smtp(c: ControlConnection, req: Request) -> None:
    if c.daemon.ctx.paused:
        raise ProtocolError(Code.UNAVAILABLE, "smtp is paused")
    c.send(proto.reply_ok(req.id, {}))
    c.switch_to_smtp()
