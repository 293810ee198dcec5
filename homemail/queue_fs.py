"""On-disk queue backend: a write-ahead journal in front of OpenSMTPD's directory layout.

Layout under the spool directory::

    journal/SEQ.log          append-only segments (SEQ: 16 hex digits, increasing)
    queue/XX/MSGID/message   messages that outlived their journal segment
    queue/XX/MSGID/EVPID.json
    incoming/MSGID/          a message being moved into queue/ (discarded at start)
    queue/index              the envelopes of queue/, written at a clean stop (see below)

**Why a journal.**  On this class of disk a write + fsync + rename costs about as much as 1,000
messages a second allows, and concurrent fsyncs do not batch.  An append plus one fdatasync
costs a tenth of that and covers any number of records, so every message accepted while one sync
is in flight is committed by the next one (group commit): ``commit`` returns — and SMTP answers
250 — only after the fdatasync that covers the message has returned.  ``U`` and ``D`` records
need no sync of their own (a crash that loses one repeats an attempt, never loses mail; the next
commit's sync, the sync before a segment is closed, or a clean stop covers them): while the
writer thread is idle the event loop appends them itself, one write(2) instead of two thread
switches; otherwise they queue behind the thread's work.  Either way no record overtakes another.
A commit whose caller says it is ``alone`` (one SMTP client: no other commit would share its
sync) is written and synced by the event loop itself as well, when the writer is idle and the
records fit in the zeros written ahead (or are too large to have zeros made for them, up to
``INLINE_MAX``, and leave the segment under its size limit): handing it to the thread and back
costs two thread switches, on a fast disk a good part of the sync's own time.  While the loop
syncs, it does nothing else, so this is for fast disks only: while the journal's syncs (the
loop's and the writer's) take ``INLINE_SLOW`` or more on average, commits go through the
writer.  (On a disk that turns slow, the loop still waits for the one or two slow syncs that
raise the average.)

**Segment record format.**  Each record is a 17-byte header ``b"HMQ1"``, a type byte, the length
of a JSON part (u32, big endian), the length of a data part (u32), and a CRC-32 of both parts
(u32); then the JSON, then the data.  Types: ``M`` a message (JSON ``{"msgid", "envelopes":
[...]}``, data = the message), ``U`` an envelope's new state (JSON: the envelope), ``D`` an
envelope done (JSON ``{"evpid"}``).  A record that is short or fails its CRC ends the segment (a
crash mid-append); the daemon always starts a fresh segment, so nothing is appended after it.
The active segment's file runs up to a MiB past its records in zeros written and synced ahead
(cut off when it is sealed): a record written over them leaves the file's size and blocks as
they were, so its fdatasync writes the data alone, not the inode too.  (Only a small synced
write makes room so: the zeros cost as many bytes as the records.)  Replay ends at the zeros.
A write that fails while running is cut back to the last whole record.  After a failed sync
(what was written since the last good one may be missing: the kernel says so once, and the next
sync succeeds), or a failed cut-back, the segment is sealed and a new one opened; when that
fails too, commits are refused until the writer's next try works, since replay would never
reach a record written after a torn one or a hole.  (The U and D records a failed sync lost
cost a repeated attempt, or a delivery repeated after a restart: never a message.)  A
``D`` record that cannot be written (a full disk) is kept and appended by the writer's first
pass that the disk takes: until then a restart would deliver that envelope again.  (The records
of a failed batch may still be whole in the segment sealed that way: a message refused with a
451 can then come back at a start, as a duplicate, never a loss.)

**Lifetime.**  Most messages are delivered within moments, so a sealed segment usually holds no
live message and is simply unlinked.  Segments are released strictly oldest first, because a
``D`` record in a newer segment may cancel a message of an older one.  A message still queued
when its segment is older than ``materialize_after`` seconds is copied (fsync'd) into ``queue/``,
after which its envelopes are JSON files updated in place, and the segment can go.  The writer
thread copies one message, then more until commits are waiting (or for ``MAINTAIN_SLICE`` at
most), writes them, and copies on: with thousands of messages left behind by a paused or
unreachable destination, a 250 waits for one message's copy at most, not for all.  At start
the journal is replayed, then ``queue/`` is read; a message present in both is taken from
``queue/``.

**The index.**  Reading ``queue/`` costs a directory walk and two files per message: tens of
seconds for 100,000 envelopes, and more on a cold cache.  So ``queue/index`` says what ``queue/``
holds, one JSON line each: a header, then ``{"msgid", "envelopes"}`` for a message and its
envelopes, ``{"u": envelope}`` for an envelope's new state, ``{"d": evpid}`` for one done.  A
change to a message already in ``queue/`` is appended before the change is made, and a message
copied there is appended once it is in place, while its segment still holds it; the lines are
synced before that segment is released.  So after a crash of the process the index is never
behind ``queue/``, and after a power loss it lacks at most the last changes to messages still
there, which costs what losing the journal's unsynced ``U`` and ``D`` records costs (an attempt
repeated, an earlier retry), never a message.

- A clean stop rewrites it whole, ending with ``{"end": count}``; a start that finds it so
  trusts it and reads nothing else of ``queue/``.  Before the first change to ``queue/`` after
  that (at the next run, or a delivery that outlived the stop) the end line is cut off and the
  cut synced, so no crash or power loss leaves an index that looks clean and is not.
- Otherwise (a crash) the start lists the bucket directories only, while the daemon serves: a
  message directory the index knows with envelopes is taken from it, one whose envelopes it saw
  all done is removed, any other is read as without an index (a line never written costs a
  read, never a message), and what the index knows but is gone from the disk is dropped.  A
  line cut short at its end is cut off before anything is appended.  No index at all, or one
  that does not read, means that walk for everything.
- After such a walk, and when the appended lines outnumber twice the envelopes, the index is
  rewritten whole, in a thread of its own (the lines appended meanwhile are carried over).
- An index that cannot be written (a full disk) is removed, durably, and the queue runs without
  one until the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from homemail import log
from homemail.queue import Envelope, Queue, QueueError, format_id

HEADER = struct.Struct(">4sBIII")
MAGIC = b"HMQ1"
SEGMENT_MAX_BYTES = 64 * 1024 * 1024
SEGMENT_MAX_AGE = 30.0
MATERIALIZE_AFTER = 60.0
MAINTAIN_SLICE = 0.05  # seconds of copying into queue/ before commits waiting get their turn
COPY_RETRY = 30.0  # seconds before a message whose copy into queue/ failed is tried again
INDEX_VERSION = 2  # 1: the same lines, written only by a clean stop
COMPACT_MIN = 10_000  # lines appended to the index before it may be rewritten whole
SCAN_THREADS = 16  # threads reading queue/ when there is no index
CLOSE_WAIT = 30.0  # seconds a stop waits for the journal's writer thread
CACHE_BYTES = 64 * 1024 * 1024
# zeros written ahead of the active segment's records, so that most syncs write data only
ROOM_AHEAD = 1024 * 1024
# made for synced writes up to this size only: the zeros cost as many bytes as the records
# written over them, which for a larger write costs more than the inode's write it spares
ROOM_FOR = 32 * 1024
_ZEROS = memoryview(bytes(ROOM_AHEAD + ROOM_FOR))  # (room from its end to past a write)
# the journal's syncs taking this long on average (a slow or busy disk): commits go through
# the writer thread, none is synced by the event loop
INLINE_SLOW = 0.005
# nor a record over this size that would grow the file: the loop would wait for its write and
# sync (a MiB: 6 ms here), where the two thread switches it spares are 80-200 µs
INLINE_MAX = 256 * 1024
SYNC_WEIGHT = 0.2  # of the latest sync in that (moving) average


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_synced(path: str, data: bytes) -> None:
    """Write a new file (no symlink followed) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    write_file_synced(tmp, data)
    os.rename(tmp, path)


@dataclass
class _Message:
    """Where a queued message is and which of its envelopes are still queued."""

    msgid: int
    evpids: set[int]
    segment: int | None  # None once materialized into queue/
    offset: int = 0
    length: int = 0


@dataclass
class _Index:
    """What queue/index says."""

    entries: dict[int, dict[int, Envelope]]  # msgid: evpid: envelope
    clean: bool  # a clean stop's, nothing after: queue/ holds exactly this
    changes: int  # "u" and "d" lines


@dataclass
class _Pending:
    records: list[bytes]
    sync: bool
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop
    after: Callable[[_Segment, int], None] | None = None  # (segment, offset past the records)
    end: int = 0


@dataclass
class _Segment:
    seq: int
    path: str
    size: int = 0  # the end of its records
    # the file's own size (the active segment): zeros past ``size``, written ahead
    room: int = 0
    live: set[int] = field(default_factory=set)  # msgids whose M record is here
    sealed_at: float = 0.0
    corrupt: bool = False  # a record did not read: the file is kept when released


def _record(kind: bytes, meta: dict[str, Any], data: bytes = b"") -> bytes:
    js = json.dumps(meta, ensure_ascii=True, separators=(",", ":")).encode()
    crc = zlib.crc32(data, zlib.crc32(js))
    return HEADER.pack(MAGIC, kind[0], len(js), len(data), crc) + js + data


class SpoolInUse(OSError):
    """Another daemon holds the spool."""


def lock_spool(spool: str) -> int:
    """Take the spool's lock (flock on journal/) and return its fd; raises SpoolInUse."""
    fd = os.open(os.path.join(spool, "journal"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolInUse(f"the spool {spool} is in use by another homemail") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class FsQueue(Queue):
    def __init__(
        self,
        spool: str,
        *,
        segment_max_bytes: int = SEGMENT_MAX_BYTES,
        segment_max_age: float = SEGMENT_MAX_AGE,
        materialize_after: float = MATERIALIZE_AFTER,
    ) -> None:
        self.spool = spool
        self.journal_dir = os.path.join(spool, "journal")
        self.queue_dir = os.path.join(spool, "queue")
        self.incoming_dir = os.path.join(spool, "incoming")
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age = segment_max_age
        self.materialize_after = materialize_after
        self._messages: dict[int, _Message] = {}
        self._envelopes: dict[int, Envelope] = {}  # only those of journal-resident messages
        # those of messages in queue/: objects whose state is that of their file (or newer,
        # the scheduler's own objects, whose changes are on their way to it): for the index
        self._files: dict[int, Envelope] = {}
        self._segments: list[_Segment] = []  # oldest first; the last one is active
        self._active_fd = -1
        self._spool_lock = -1  # journal/, flocked while this queue owns the spool
        self._active_opened = 0.0
        self._cache: dict[int, bytes] = {}
        self._cache_bytes = 0
        # _lock guards _pending, _busy, _torn and the state dicts.  The active segment
        # (_active_fd, _segments[-1].size) belongs to the writer thread while _busy is set and
        # to whoever holds _lock while it is not.
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._wakeup = threading.Condition(self._lock)
        self._busy = False  # the writer thread is out of its wait (writing, maintaining, done)
        self._torn = False  # a record the loop appended failed: the writer cuts it back first
        # a failed write could be neither cut back nor left behind for a new segment: nothing
        # may be appended after what may be a torn record (replay stops there), so commits are
        # refused until the writer's next repair works
        self._broken = False
        # an fdatasync of the active segment failed: what was written since the last good one
        # may not be on the disk (the kernel says so once; a sync after that succeeds), so
        # nothing more goes into that segment: a commit there could follow a hole
        self._sync_failed = False
        # done (D) records whose append failed (a full disk): written by the writer's first
        # pass that the disk takes, so that a delivered message does not come back at a start
        self._unwritten: list[bytes] = []
        # why maintenance failed, each reason with when it was last logged (monotonic)
        self._maintenance_errors: dict[str, float] = {}
        self._sync_time = 0.0  # the moving average of the active segment's syncs, in seconds
        self._copy_failed: dict[int, float] = {}  # msgid: when to try its copy again (monotonic)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_maintenance = 0.0
        self._scanning = False  # queue/ not yet walked: ids on disk are not all known
        # queue/index: appended to under _lock; rewritten whole under _index_write_lock
        self._index_fd = -1
        self._index_clean_end = -1  # where a clean stop's end line starts, while it is there
        self._index_dirty = False  # lines appended since the last sync
        self._index_appended = 0  # lines since it was last written whole
        self._index_write_lock = threading.Lock()
        self._compacting = False
        self._indexed: dict[int, list[Envelope]] = {}  # after a crash: what the index knew
        self.walk_reads = 0  # message directories the walk read (not known to the index)

    # -- start and recovery ------------------------------------------------------------------

    def load(self) -> list[Envelope]:
        envelopes = self.start()
        for batch in self.scan():
            envelopes.extend(batch)
        return envelopes

    def _lock_spool(self) -> None:
        """Own the spool: a second daemon on it would replay, deliver and remove the first
        one's journal under its feet.  The lock (on journal/) goes with the process."""
        self._spool_lock = lock_spool(self.spool)

    def start(self) -> list[Envelope]:
        """Replay the journal and read the index; queue/ itself is walked by :meth:`scan`
        unless a clean stop left an index.

        A message both in the journal and in ``queue/`` (a crash after its move) is taken
        from ``queue/`` here, so the walk only adds messages nothing else knows.
        """
        for d in (self.spool, self.journal_dir, self.queue_dir, self.incoming_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._lock_spool()
        for entry in os.listdir(self.incoming_dir):  # moves cut short by a crash
            shutil.rmtree(os.path.join(self.incoming_dir, entry), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):  # a rewrite of the index cut short
            os.unlink(self._index_path() + ".tmp")

        names = sorted(n for n in os.listdir(self.journal_dir) if n.endswith(".log"))
        last_seq = 0
        for name in names:
            try:
                seq = int(name[:-4], 16)
            except ValueError:
                continue
            last_seq = max(last_seq, seq)
            path = os.path.join(self.journal_dir, name)
            # sealed when last written (a segment takes no appends once sealed), not now: else
            # a daemon restarted every minute would never copy anything out of its journal
            sealed_at = min(time.time(), os.stat(path).st_mtime)
            seg = _Segment(seq, path, sealed_at=sealed_at)
            self._replay(seg)
            self._segments.append(seg)

        index = self._read_index() if self._index_ends_clean() else None
        if index is not None and index.clean:  # a clean stop's: queue/ is what it says
            found = [(msgid, list(envs.values())) for msgid, envs in index.entries.items() if envs]
            self._open_index(rewrite=False, clean=True)
        else:  # scan() reads the index, if any, and walks queue/ for the rest
            self._scanning = True
            self._open_index(rewrite=not os.path.exists(self._index_path()))
            found = []
            for msgid in list(self._messages):
                msgdir = self._msgdir(msgid)
                envs, _ = self._read_msgdir(msgdir)  # the walk sets bad ones aside
                if envs and os.path.exists(os.path.join(msgdir, "message")):
                    found.append((msgid, envs))
                elif envs:  # what an older release's removal left: the journal's copy is whole
                    self._discard_copy(msgdir, quiet=True)
        result = self._adopt(found)
        for env in self._envelopes.values():  # ours: the caller gets copies
            copy = Envelope.from_json(env.to_json())
            copy.recovered = True
            result.append(copy)
        self._open_segment(last_seq + 1)
        self._thread = threading.Thread(target=self._run, name="queue-commit", daemon=True)
        self._thread.start()
        return result

    def _adopt(self, found: list[tuple[int, list[Envelope]]]) -> list[Envelope]:
        """Take messages of queue/ into the index (lock held or not yet shared)."""
        result: list[Envelope] = []
        for msgid, env_list in found:
            stale = self._messages.pop(msgid, None)
            if stale is not None:
                for evpid in stale.evpids:
                    self._envelopes.pop(evpid, None)
                for seg in self._segments:
                    seg.live.discard(msgid)
            self._messages[msgid] = _Message(msgid, {e.evpid for e in env_list}, None)
            for env in env_list:  # fresh objects: handed to the caller as they are
                env.recovered = True
                self._files[env.evpid] = env
            result.extend(env_list)
        return result

    def complete(self) -> bool:
        return not self._scanning

    def scan(self, batch: int = 2000) -> Iterator[list[Envelope]]:
        """After :meth:`start` found no index: walk queue/ and yield its envelopes in batches.

        Runs in a thread while the daemon serves: commits meanwhile get message ids that are
        not on disk (see :meth:`contains`), and messages the journal knows are skipped.
        Stops early when the queue is closed; the index is written only after a full walk.
        """
        if not self._scanning:
            return
        index = self._read_index()
        if index is not None:
            self._indexed = {m: list(e.values()) for m, e in index.entries.items()}
            with self._lock:
                self._index_appended += index.changes
        out: list[Envelope] = []
        for msgid, envs in self._scan_queue_dir():
            if self._closing:
                return
            with self._lock:
                if msgid in self._messages:  # from the journal, or moved since the walk began
                    continue
                out.extend(self._adopt([(msgid, envs)]))
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out
        self._scanning = False
        self._indexed = {}
        if index is None or self.walk_reads or self._index_appended > COMPACT_MIN:
            self._compact_index()  # everything is known now: the index says it in one piece

    def _index_path(self) -> str:
        return os.path.join(self.queue_dir, "index")

    def _index_ends_clean(self) -> bool:
        """Whether queue/index ends as a clean stop leaves it (then it is read at once; any
        other is read by the walk, while the daemon serves)."""
        try:
            with open(self._index_path(), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
                tail = f.read()
        except OSError:
            return False
        return tail.endswith(b"}\n") and b'{"end":' in tail.rsplit(b"\n", 2)[-2]

    def _read_index(self) -> _Index | None:
        """What queue/index says queue/ holds; None if there is none or it does not read."""
        try:
            with open(self._index_path(), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error(f"queue: cannot read {self._index_path()}: {exc}; reading queue/")
            return None
        lines = data.split(b"\n")
        torn = lines.pop() != b""  # an append cut short by a crash: the rest is good
        entries: dict[int, dict[int, Envelope]] = {}
        messages = changes = 0
        end = None
        try:
            head = json.loads(lines[0])
            if head.get("homemail-queue-index") not in (1, INDEX_VERSION):
                return None
            for line in lines[1:]:
                item = json.loads(line)
                end = item.get("end")
                if "envelopes" in item:
                    messages += 1
                    envs = [Envelope.from_json(e) for e in item["envelopes"]]
                    entries[int(item["msgid"])] = {e.evpid: e for e in envs}
                elif "u" in item:
                    changes += 1
                    env = Envelope.from_json(item["u"])
                    known = entries.get(env.msgid)
                    if known is not None and env.evpid in known:
                        known[env.evpid] = env
                elif "d" in item:
                    changes += 1
                    evpid = int(item["d"])
                    entries.get(evpid >> 32, {}).pop(evpid, None)
                elif end is None:
                    return None
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return None
        clean = not torn and not changes and end == messages == head.get("count", messages)
        return _Index(entries, clean, changes)

    def _open_index(self, *, rewrite: bool, clean: bool = False) -> None:
        """Open queue/index for appending: a new one (header only) if ``rewrite``; else the
        one there, cut back to its last whole line (lines appended after a torn one would
        not read), noting where its end line starts if ``clean``.  Without one that can be
        written the queue runs without an index (a start after a crash reads queue/)."""
        path = self._index_path()
        try:
            if rewrite:
                header = json.dumps({"homemail-queue-index": INDEX_VERSION}).encode() + b"\n"
                atomic_write(path, header)
                fsync_dir(self.queue_dir)
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            log.error(f"queue: cannot write {path}: {exc}; running without it")
            with contextlib.suppress(OSError):
                os.unlink(path)
                fsync_dir(self.queue_dir)
            return
        self._index_fd = fd
        try:
            size = os.fstat(fd).st_size
            whole = _after_last_line(fd, size)
            if whole != size:
                os.ftruncate(fd, whole)
                os.fdatasync(fd)
            if clean:
                self._index_clean_end = _after_last_line(fd, whole - 1)
        except OSError as exc:
            self._drop_index(exc)

    def _drop_index(self, exc: OSError) -> None:
        """An index that cannot be kept up to date would be trusted wrongly after a crash:
        it is removed, durably (lock held, or not yet shared)."""
        log.error(f"queue: cannot write {self._index_path()}: {exc}; removing it")
        with contextlib.suppress(OSError):
            os.close(self._index_fd)
        self._index_fd = -1
        self._index_clean_end = -1
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._index_path())
            fsync_dir(self.queue_dir)
        except OSError as again:
            log.error(f"queue: cannot remove {self._index_path()}: {again}")

    def _index_unclean(self) -> None:
        """Before the first change to queue/ after a clean stop's index: its end line is
        cut off, durably, so that no crash from here on leaves an index that looks clean."""
        if self._index_fd < 0 or self._index_clean_end < 0:
            return
        try:
            os.ftruncate(self._index_fd, self._index_clean_end)
            os.fdatasync(self._index_fd)
        except OSError as exc:
            self._drop_index(exc)
            return
        self._index_clean_end = -1

    def _index_append(self, item: dict[str, Any]) -> None:
        """Record a change to queue/ (lock held), before it is made."""
        self._index_unclean()
        if self._index_fd < 0:
            return
        line = json.dumps(item, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"
        try:
            _write_all(self._index_fd, line)
        except OSError as exc:
            self._drop_index(exc)
            return
        self._index_dirty = True
        self._index_appended += 1
        if (
            self._index_appended > max(COMPACT_MIN, 2 * len(self._files))
            and not self._compacting
            and not self._scanning
            and not self._closing
        ):
            self._compacting = True
            threading.Thread(target=self._compact_index, name="queue-index", daemon=True).start()

    def _index_sync(self) -> None:
        """Before a segment is released (the writer thread): the lines of the messages copied
        out of it are synced, so that the index never lacks a message the journal no longer
        has (a line lost with a power loss would cost a read; after a message id came back, a
        done message's lines would speak for the new one).  The sync runs on a duplicate of
        the fd, unlocked (the loop's updates take the lock); a rewrite that swaps the file
        meanwhile has synced the new one whole."""
        with self._lock:
            if self._index_fd < 0 or not self._index_dirty:
                return
            fd = os.dup(self._index_fd)
            self._index_dirty = False
        try:
            os.fdatasync(fd)
        except OSError as exc:
            with self._lock:
                self._drop_index(exc)
        finally:
            os.close(fd)

    def _index_items(self) -> list[tuple[int, list[Envelope]]] | None:
        """queue/'s messages and their envelopes (lock held); None if one is not known."""
        items = []
        for msgid, msg in self._messages.items():
            if msg.segment is not None:
                continue
            envs = [self._files.get(e) for e in msg.evpids]
            if any(e is None for e in envs):
                return None
            items.append((msgid, [e for e in envs if e is not None]))
        return items

    @staticmethod
    def _index_lines(items: list[tuple[int, list[Envelope]]], *, end: bool) -> bytes:
        dump = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
        lines = [dump({"homemail-queue-index": INDEX_VERSION})]
        lines.extend(
            dump({"msgid": msgid, "envelopes": [e.to_json() for e in envs]})
            for msgid, envs in items
        )
        if end:
            lines.append(dump({"end": len(items)}))
        return ("\n".join(lines) + "\n").encode()

    def _compact_index(self) -> None:
        """Rewrite the index whole while the daemon runs (not on the loop's thread): the
        snapshot is written and synced unlocked, then the lines appended meanwhile are copied
        after it, synced, and it is renamed into place, locked.  After a failure, or with
        nothing to do, the next try waits for as many lines again."""
        done = False
        try:
            with self._index_write_lock:
                with self._lock:
                    if self._index_fd < 0:
                        return
                    items = self._index_items()
                    mark = os.fstat(self._index_fd).st_size
                if items is None or self._closing:
                    return
                # the envelopes are the scheduler's: one changed meanwhile has its line after mark
                data = self._index_lines(items, end=False)
                path = self._index_path()
                tmp = f"{path}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                write_file_synced(tmp, data)
                with self._lock:
                    if self._index_fd < 0:  # removed meanwhile (an append failed)
                        os.unlink(tmp)
                        return
                    self._index_clean_end = -1  # (a snapshot has no end line)
                    with open(path, "rb") as f:
                        f.seek(mark)
                        tail = f.read()
                    fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
                    try:
                        _write_all(fd, tail)
                        os.fdatasync(fd)
                        os.rename(tmp, path)
                        fsync_dir(self.queue_dir)
                    except BaseException:
                        os.close(fd)
                        raise
                    os.close(self._index_fd)
                    self._index_fd = fd
                    self._index_dirty = False
                    self._index_appended = tail.count(b"\n")
                    done = True
        except OSError as exc:  # the index as it was stays good: lines are still appended
            log.error(f"queue: cannot rewrite {self._index_path()}: {exc}")
        finally:
            if not done:
                with self._lock:
                    self._index_appended = 0
            self._compacting = False

    def _write_index(self) -> None:
        """At a clean stop: the index rewritten whole, with its end line, for a fast start.

        A change to queue/ that still comes after it (a delivery outliving the stop's wait)
        first cuts the end line off (see :meth:`_index_unclean`), so the next start lists
        queue/ (the file stays open until the process exits).
        """
        if self._scanning:  # queue/ was not walked to the end: the index as it is stays
            return
        with self._index_write_lock, self._lock:
            items = self._index_items()
            if items is None or self._index_fd < 0:
                return  # not known here: the next start reads queue/ itself
            data = self._index_lines(items, end=True)
            atomic_write(self._index_path(), data)
            os.close(self._index_fd)  # the file renamed over: appends go to the new one
            self._index_fd = -1
            self._open_index(rewrite=False, clean=True)
            self._index_dirty = False
            self._index_appended = 0
            fsync_dir(self.queue_dir)

    def _replay(self, seg: _Segment) -> None:
        """Apply a segment's records.  A record cut short ends the segment (a torn tail: it
        was never acknowledged), as do the zeros written ahead of the records and a record
        written over them in part; a whole record that does not read, with the next one where
        its lengths say (or only zeros after it), is skipped, logged, and the segment kept as
        ``.corrupt`` when it is released, so that one bad byte costs one record, not every
        record after it."""
        with open(seg.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = 0
            while True:
                header = f.read(HEADER.size)
                if len(header) < HEADER.size:
                    break
                magic, kind, jlen, dlen, crc = HEADER.unpack(header)
                if magic != MAGIC:
                    break
                js = f.read(jlen)
                data_offset = pos + HEADER.size + jlen if kind == ord("M") else 0
                data = f.read(dlen)
                if len(js) < jlen or len(data) < dlen:
                    break
                end = pos + HEADER.size + jlen + dlen
                try:
                    if zlib.crc32(data, zlib.crc32(js)) != crc:
                        raise ValueError("checksum")
                    self._apply(seg, kind, json.loads(js), data_offset, dlen)
                except Exception as exc:  # a bad record, of whatever shape
                    # skipped if the next record is where its lengths say, or nothing but
                    # zeros (those written ahead) or the end of the file follow it; but one
                    # whose end is zeros from a sector's start on, over the zeros, is a write
                    # a crash cut short (the disk took its first sectors, not the rest)
                    following = f.read(len(MAGIC))
                    body = js + data
                    zeros_from = end - len(body) + len(body.rstrip(b"\0"))
                    if following != MAGIC and (
                        _data_end(f, end) > end or (zeros_from < end and zeros_from % 512 == 0)
                    ):
                        break  # its lengths are not to be trusted either: stop here
                    f.seek(end)
                    seg.corrupt = True
                    log.event("-", "queue", "corrupt-record", segment=os.path.basename(seg.path),
                              offset=pos, kind=chr(kind) if 32 < kind < 127 else kind,
                              error=type(exc).__name__)
                pos = end
            tail = _data_end(f, pos) if pos < size else pos  # (not the zeros written ahead)
            if tail > pos:  # a torn tail (a crash mid-write): logged, nothing to keep
                log.event("-", "queue", "journal-tail", segment=os.path.basename(seg.path),
                          ignored=tail - pos, offset=pos)
            seg.size = pos

    def _apply(self, seg: _Segment, kind: int, meta: Any, offset: int, length: int) -> None:
        if kind == ord("M"):
            msgid = int(meta["msgid"])
            envs = [Envelope.from_json(e) for e in meta["envelopes"]]
            self._messages[msgid] = _Message(
                msgid, {e.evpid for e in envs}, seg.seq, offset, length
            )
            for env in envs:
                self._envelopes[env.evpid] = env
            seg.live.add(msgid)
        elif kind == ord("U"):
            env = Envelope.from_json(meta)
            if env.evpid in self._envelopes:
                self._envelopes[env.evpid] = env
        elif kind == ord("D"):
            evpid = int(meta["evpid"])
            if self._envelopes.pop(evpid, None) is not None:
                self._forget(evpid)

    def _scan_queue_dir(self) -> Iterator[tuple[int, list[Envelope]]]:
        buckets = [b.path for b in os.scandir(self.queue_dir) if b.is_dir(follow_symlinks=False)]
        # several buckets at once: on a cold cache the disk answers their reads in parallel
        pool = ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="queue-walk")
        try:
            for found in pool.map(self._scan_bucket, buckets):
                yield from found
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _scan_bucket(self, path: str) -> list[tuple[int, list[Envelope]]]:
        found = []
        reads = 0
        for msgdir in os.scandir(path):
            if self._closing:
                break
            if not msgdir.is_dir(follow_symlinks=False):
                continue
            try:
                msgid = int(msgdir.name, 16)
            except ValueError:
                continue
            if msgid in self._messages:  # a hint only: scan() checks again, locked
                continue
            known = self._indexed.get(msgid)
            if known:  # queue/index knows it: nothing to read
                found.append((msgid, known))
                continue
            if known is not None:  # the index saw its last envelope done (then the crash)
                shutil.rmtree(msgdir.path, ignore_errors=True)
                continue
            reads += 1
            envs, corrupt = self._read_msgdir(msgdir.path)
            if corrupt:
                self._set_aside(msgdir.path, corrupt, whole=not envs)
            if envs:
                found.append((msgid, envs))
            elif not corrupt and msgid not in self._messages:
                shutil.rmtree(msgdir.path, ignore_errors=True)  # its last envelope was done
        with self._lock:
            self.walk_reads += reads
        return found

    def _read_msgdir(self, path: str) -> tuple[list[Envelope], list[str]]:
        """The envelopes of a message directory, and the names of those that do not read."""
        envs: list[Envelope] = []
        corrupt: list[str] = []
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return envs, corrupt
        for entry in entries:
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                try:
                    with open(entry.path, "rb") as f:
                        envs.append(Envelope.from_json(json.load(f)))
                except FileNotFoundError:
                    continue  # done meanwhile
                except Exception:  # truncated, garbage, or JSON of the wrong shape
                    corrupt.append(entry.name)
        return envs, corrupt

    def _set_aside(self, msgdir: str, names: list[str], *, whole: bool) -> None:
        """Move what does not read into SPOOL/corrupt/ (never delete a message), and say so;
        the envelopes that read are delivered as usual."""
        corrupt_dir = os.path.join(self.spool, "corrupt")
        msg = os.path.basename(msgdir)
        try:
            os.makedirs(corrupt_dir, mode=0o700, exist_ok=True)
            if whole:
                os.rename(msgdir, os.path.join(corrupt_dir, f"{msg}.{int(time.time())}"))
            else:
                for name in names:
                    aside = os.path.join(corrupt_dir, f"{msg}.{name}")
                    os.rename(os.path.join(msgdir, name), aside)
                with contextlib.suppress(OSError):
                    copy = os.path.join(corrupt_dir, f"{msg}.message")
                    shutil.copy2(os.path.join(msgdir, "message"), copy)
            fsync_dir(corrupt_dir)
        except OSError as exc:
            log.error(f"queue: cannot set {msgdir} aside: {exc}")
            return
        log.event(msg, "queue", "corrupt", envelopes=",".join(names), moved_to=corrupt_dir)

    # -- the commit thread -------------------------------------------------------------------

    def _open_segment(self, seq: int) -> None:
        while True:
            path = os.path.join(self.journal_dir, f"{seq:016x}.log")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                break
            except FileExistsError:
                # left by an open that failed after making it: its entry in journal/ may never
                # reach the disk (a sync of the directory that failed does not write it again),
                # so the segment's records could vanish with it; the next number is clean
                seq += 1
        try:
            os.fsync(fd)
            fsync_dir(self.journal_dir)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        if self._active_fd >= 0:
            self._seal_active()
            os.close(self._active_fd)
            self._segments[-1].sealed_at = time.time()
        self._active_fd = fd
        self._sync_failed = False
        self._active_opened = time.time()
        self._segments.append(_Segment(seq, path))

    def _seal_active(self) -> None:
        """Sync the active segment's last U and D records (a failed one was cut back), its
        zeros ahead cut off first (zeros left behind are harmless: replay ends at them)."""
        seg = self._segments[-1]
        if seg.room > seg.size:
            with contextlib.suppress(OSError):
                os.ftruncate(self._active_fd, seg.size)
                seg.room = seg.size
        with contextlib.suppress(OSError):
            os.fdatasync(self._active_fd)

    def _submit(
        self,
        records: list[bytes],
        *,
        sync: bool,
        after: Callable[[_Segment, int], None] | None = None,
        alone: bool = False,
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._wakeup:
            if self._closing:
                raise QueueError("queue is closing")
            idle = (
                not (self._busy or self._pending or self._torn or self._broken or self._unwritten)
                and self._thread is not None
            )
            if sync:
                here = idle and alone and self._sync_time < INLINE_SLOW
            else:
                here = idle and after is None
            if here:
                seg = self._segments[-1]
                data = b"".join(records)
                end = seg.size + len(data)
                # Nothing to wait for and nothing ahead of these records: appending them here
                # costs a write(2) (to the page cache, like a log line), plus the fdatasync for a
                # commit no other would share it with, where waking the writer costs two thread
                # switches.  Making room is the writer's; a synced write too large to have room
                # made for it grows the file, as it would on the writer, unless it would hold
                # the loop up or fill the segment (the writer's maintenance then rotates).
                if end <= seg.room or (
                    sync
                    and ROOM_FOR < len(data) <= INLINE_MAX
                    and end < self.segment_max_bytes
                ):
                    try:
                        self._append(data, sync=sync)
                    except OSError as exc:
                        self._torn = True  # the repair syncs, so it is the writer's, before more
                        self._wakeup.notify()
                        fut.set_exception(exc)
                    else:
                        if after is not None:
                            after(seg, seg.size)  # (under _lock: the condition's)
                        fut.set_result(None)
                    return fut
            self._pending.append(_Pending(records, sync, fut, loop, after))
            self._wakeup.notify()
        return fut

    def _run(self) -> None:
        more = False  # maintenance left over from the last pass: no wait before the next
        while True:
            with self._wakeup:
                self._busy = False
                while not (self._pending or self._closing or self._torn or more):
                    self._wakeup.wait(timeout=5.0)
                    if not (self._pending or self._torn):
                        break  # time for maintenance
                self._busy = True
                torn, self._torn = self._torn, False
                batch, self._pending = self._pending, []
                closing = self._closing
            if torn or self._broken:
                self._after_failed_write()
            self._write_unwritten()
            error: BaseException | None = None
            if batch:
                if self._broken:
                    error = QueueError("the journal cannot be written: see the log")
                else:
                    try:
                        self._write_batch(batch)
                    except Exception as exc:  # ENOSPC, EIO, a failed fdatasync …
                        error = exc
                        self._after_failed_write()
                seg = self._segments[-1]
                for item in batch:
                    if error is None and item.after is not None:
                        with self._lock:
                            item.after(seg, item.end)
                    with contextlib.suppress(RuntimeError):  # its loop is gone (a test's end)
                        item.loop.call_soon_threadsafe(_resolve, item.future, error)
            try:
                more = self._maintain()
            except Exception as exc:  # retried at the next pass; the segment stays
                more = False
                self._maintenance_failed(_reason(exc))
            else:
                if self._maintenance_errors and not self._copy_failed:
                    self._maintenance_errors.clear()
                    log.info("queue: maintenance of the journal works again")
            if closing and not batch:
                self._seal_active()  # the unsynced U and D records, at a clean stop
                return

    def _write_unwritten(self) -> None:
        """(The writer thread) Append the done records that failed before, ahead of its batch."""
        if not self._unwritten or self._broken:
            return
        with self._lock:
            records, self._unwritten = self._unwritten, []
        try:
            self._append(b"".join(records))
        except OSError:
            self._after_failed_write()
            with self._lock:
                self._unwritten[:0] = records
        else:
            log.event("-", "queue", "done-records-written", count=len(records))

    def _maintenance_failed(self, text: str) -> None:
        """Say why maintenance fails (no inode for a new segment, no room for a copy …): each
        reason once, then every ten minutes while it lasts (and once it works again, that it
        does)."""
        now = time.monotonic()
        if now - self._maintenance_errors.get(text, -600.0) >= 600:
            if len(self._maintenance_errors) >= 64:  # (reasons are few: a text naming a file?)
                self._maintenance_errors.clear()
            self._maintenance_errors[text] = now
            log.error(f"queue: maintenance of the journal failed (retried): {text}")

    def _write_batch(self, batch: list[_Pending]) -> None:
        seg = self._segments[-1]
        pos = seg.size
        for item in batch:
            pos += sum(len(r) for r in item.records)
            item.end = pos
        data = b"".join(r for item in batch for r in item.records)
        self._append(data, sync=any(item.sync for item in batch))

    def _append(self, data: bytes, *, sync: bool = False) -> None:
        """Append to the active segment (the writer thread, or a caller while it is idle)."""
        seg = self._segments[-1]
        end = seg.size + len(data)
        if end > seg.room and sync and len(data) <= ROOM_FOR:
            self._make_room(seg, end)
        _pwrite_all(self._active_fd, data, seg.size)
        seg.room = max(seg.room, end)  # the file's size (the zeros may have been refused)
        if sync:
            self._sync_active()
        seg.size = end

    def _sync_active(self) -> None:
        start = time.monotonic()
        try:
            os.fdatasync(self._active_fd)
        except OSError:
            self._sync_failed = True
            raise
        finally:  # (never two at once: the loop syncs only while the writer waits)
            self._sync_time += (time.monotonic() - start - self._sync_time) * SYNC_WEIGHT

    def _make_room(self, seg: _Segment, end: int) -> None:
        """Write zeros up to ``ROOM_AHEAD`` past ``end``, and sync them.  Records written over
        them change neither the file's size nor its blocks, so their fdatasync writes their
        data alone, not the inode as well: on this class of disk that is two to three times
        the syncs a second, at half the CPU.  The zeros' own sync is what makes that safe:
        without it, writeback could allocate their blocks and leave the inode written only to
        the block device's cache (ext4 without a journal), which a later fdatasync, seeing
        nothing of the file's own to write, would not write either.  (From the end of the
        room there is, not of the records: a hole where they go would be a change again.)  On
        a full disk the records grow the file themselves; a failed sync is the batch's."""
        start = seg.room
        target = end + ROOM_AHEAD
        try:
            while start < target:
                start += os.pwrite(self._active_fd, _ZEROS[: target - start], start)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            with contextlib.suppress(OSError):  # what was written ahead goes to the records
                os.ftruncate(self._active_fd, max(seg.room, seg.size))
            return
        self._sync_active()
        seg.room = target

    def _after_failed_write(self) -> None:
        """A write or sync failed: no record may follow what may be a torn one.

        After a failed write the segment is cut back to its last good size; after a failed
        sync (what was written since the last good one may be missing: a hole), or if the
        cut-back fails, it is sealed and a new one opened, so replay (which stops at a torn
        record) never hides a later commit.
        """
        seg = self._segments[-1]
        why = "a sync failed" if self._sync_failed else ""
        if not why:
            try:
                os.ftruncate(self._active_fd, seg.size)
                seg.room = seg.size
                self._sync_active()
            except OSError as exc:
                why = f"its cut-back failed: {exc}"
        if why:
            try:
                self._open_segment(seg.seq + 1)
            except OSError as again:
                if not self._broken:
                    log.error(
                        f"queue: after a failed write to the journal ({why}) no new segment "
                        f"can be opened ({again}): mail is refused until one can"
                    )
                self._broken = True
                return
        if self._broken:
            log.info("queue: the journal is repaired: mail is accepted again")
        self._broken = False

    def _maintain(self) -> bool:
        """Rotate the active segment, copy what outlived old segments, release them.

        Copying into ``queue/`` costs several syncs a message, and a paused or unreachable
        destination can leave tens of thousands in a segment, while commits wait for this
        thread.  So a pass tries at least one message, then stops as soon as commits are
        waiting or ``MAINTAIN_SLICE`` seconds are spent, and returns True if it stopped short
        after copying something (the next pass then comes without a wait).  A message whose
        copy fails is logged and left alone for ``COPY_RETRY`` seconds while the others are
        copied; its segment, and so every newer one, stays until it is copied too.
        """
        seg = self._segments[-1]
        if seg.size and (
            seg.size >= self.segment_max_bytes
            or time.time() - self._active_opened >= self.segment_max_age
        ):
            self._open_segment(seg.seq + 1)
        now = time.time()
        deadline = time.monotonic() + MAINTAIN_SLICE
        tried = copied = 0
        released = False
        try:
            while len(self._segments) > 1:
                oldest = self._segments[0]
                with self._lock:
                    live = list(oldest.live)
                if live:
                    # nor while the start's walk of queue/ runs: a copy whose message is done
                    # before the copy's end could be found by the walk and taken for queued
                    if self._scanning or now - oldest.sealed_at < self.materialize_after:
                        return False
                    waiting = False  # a message here whose copy failed lately
                    for msgid in live:
                        if self._copy_failed.get(msgid, 0.0) > time.monotonic():
                            waiting = True
                            continue
                        if tried and (self._pending or time.monotonic() >= deadline):
                            return copied > 0
                        tried += 1
                        try:
                            self._materialize(oldest, msgid)
                        except (OSError, QueueError) as exc:
                            waiting = True
                            again = msgid in self._copy_failed
                            self._copy_failed[msgid] = time.monotonic() + COPY_RETRY
                            if not again:  # its retries are said by the line below
                                log.event(format_id(msgid), "queue", "copy-failed",
                                          error=_reason(exc), retry=f"{COPY_RETRY:.0f}s")
                            else:
                                self._maintenance_failed(
                                    f"messages cannot be copied into queue/: {_reason(exc)}"
                                )
                        else:
                            copied += 1
                            self._copy_failed.pop(msgid, None)
                    if waiting:
                        return False  # this segment stays; a later pass tries again
                self._index_sync()  # what was copied out of it is in the index for good
                if oldest.corrupt:  # kept for whoever looks into what it lost
                    os.replace(oldest.path, oldest.path + ".corrupt")
                else:
                    os.unlink(oldest.path)
                self._segments.pop(0)
                released = True
                for msgid in [m for m in self._copy_failed if m not in self._messages]:
                    del self._copy_failed[msgid]  # removed meanwhile: nothing left to copy
            return False
        finally:
            if released:
                fsync_dir(self.journal_dir)

    def _materialize(self, seg: _Segment, msgid: int) -> None:
        """Copy a journal-resident message into queue/ (fsync'd) so its segment can go."""
        with self._lock:
            msg = self._messages.get(msgid)
            if msg is None or msg.segment != seg.seq:
                seg.live.discard(msgid)
                return
            # the objects as they are now: a change while copying replaces its object
            copied = {e: self._envelopes[e] for e in msg.evpids if e in self._envelopes}
            envs = [Envelope.from_json(env.to_json()) for env in copied.values()]
        data = self._read_journal(msg)
        tmpdir = os.path.join(self.incoming_dir, format_id(msgid))
        shutil.rmtree(tmpdir, ignore_errors=True)
        os.mkdir(tmpdir, 0o700)
        try:
            write_file_synced(os.path.join(tmpdir, "message"), data)
            for env in envs:
                path = os.path.join(tmpdir, f"{format_id(env.evpid)}.json")
                write_file_synced(path, env.dumps())
            fsync_dir(tmpdir)
        except BaseException:  # (a full disk: what was written would only take more room)
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        final = self._msgdir(msgid)
        bucket = os.path.dirname(final)
        if not os.path.isdir(bucket):  # a new bucket: its own entry in queue/ is synced too
            os.makedirs(bucket, mode=0o700, exist_ok=True)
            fsync_dir(self.queue_dir)
        if os.path.lexists(final):  # an earlier copy renamed, then not synced: this one wins
            self._discard_copy(final)
        with self._lock:  # queue/ changes: a clean stop's index no longer says what it holds
            self._index_unclean()
        os.rename(tmpdir, final)
        try:
            fsync_dir(os.path.dirname(final))
        except OSError:  # the message stays in the journal: no copy may outlive it there
            self._discard_copy(final, quiet=True)
            raise
        with self._lock:
            # state changes made while copying are written into the files (only theirs: an
            # unchanged envelope costs no second sync); should one fail, the copy is undone
            # and the message stays in the journal, which has every change
            written = {env.evpid: env for env in envs}
            try:
                for evpid in msg.evpids:
                    current = self._envelopes.get(evpid)
                    if current is not None and current is not copied.get(evpid):
                        atomic_write(self._envpath(evpid), current.dumps())
                        written[evpid] = current
            except OSError:
                self._discard_copy(final, quiet=True)
                raise
            msg.segment = None
            for evpid in list(msg.evpids):
                self._envelopes.pop(evpid, None)
                if evpid in written:
                    self._files[evpid] = written[evpid]
            for env in envs:
                if env.evpid not in msg.evpids:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._envpath(env.evpid))
            seg.live.discard(msgid)
            if not msg.evpids:  # all done while it was copied
                self._discard_copy(final, quiet=True)
                return
            # in place: from now on its segment can go, and the index is what finds it fast
            self._index_append(
                {"msgid": msgid, "envelopes": [self._files[e].to_json() for e in msg.evpids]}
            )

    def _discard_copy(self, final: str, *, quiet: bool = False) -> None:
        """Remove a message's directory from queue/ in one step: renamed into incoming/ (which
        a start empties), the bucket synced, then deleted.  Deleted in place, a crash could
        leave part of it, which a start takes over the journal's whole copy (an envelope or
        the message itself lost).  ``quiet``: on a failure, log it rather than raise."""
        aside = os.path.join(self.incoming_dir, f"{os.path.basename(final)}.discarded")
        try:
            shutil.rmtree(aside, ignore_errors=True)
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                return
            fsync_dir(os.path.dirname(final))
        except OSError as exc:
            if not quiet:
                raise
            log.error(f"queue: cannot remove the copy {final}: {exc}")
            return
        shutil.rmtree(aside, ignore_errors=True)

    # -- paths and reads ---------------------------------------------------------------------

    def _msgdir(self, msgid: int) -> str:
        name = format_id(msgid)
        return os.path.join(self.queue_dir, name[:2], name)

    def _envpath(self, evpid: int) -> str:
        return os.path.join(self._msgdir(evpid >> 32), f"{format_id(evpid)}.json")

    def _read_journal(self, msg: _Message) -> bytes:
        assert msg.segment is not None
        path = os.path.join(self.journal_dir, f"{msg.segment:016x}.log")
        with open(path, "rb") as f:
            f.seek(msg.offset)
            data = f.read(msg.length)
        if len(data) != msg.length:
            raise QueueError(f"message {format_id(msg.msgid)}: journal segment is short")
        return data

    def cached_message(self, msgid: int) -> bytes | None:
        with self._lock:
            return self._cache.get(msgid)

    def read_message(self, msgid: int) -> bytes:
        cached = self.cached_message(msgid)
        if cached is not None:
            return cached
        with self._lock:
            msg = self._messages.get(msgid)
        if msg is None:
            raise QueueError(f"message {format_id(msgid)} is not in the queue")
        try:
            if msg.segment is not None:
                return self._read_journal(msg)
            with open(os.path.join(self._msgdir(msgid), "message"), "rb") as f:
                return f.read()
        except OSError as exc:
            # the message may have moved from the journal to queue/ while we read
            with self._lock:
                moved = self._messages.get(msgid)
            if moved is not None and moved.segment is None and msg.segment is not None:
                with open(os.path.join(self._msgdir(msgid), "message"), "rb") as f:
                    return f.read()
            raise QueueError(f"message {format_id(msgid)}: {exc.strerror}") from exc

    # -- the Queue contract ------------------------------------------------------------------

    def contains(self, msgid: int) -> bool:
        with self._lock:  # both journal-resident and moved messages are indexed here
            if msgid in self._messages:
                return True
        # while queue/ is being walked, a message there may not be indexed yet
        return self._scanning and os.path.lexists(self._msgdir(msgid))

    def commit(
        self, message: bytes, envelopes: list[Envelope], *, alone: bool = False
    ) -> asyncio.Future[None]:
        """A future, and no coroutine: a commit the event loop synced itself (``alone`` and
        the writer idle, see ``_submit``) is done when this returns, so its caller writes the
        250 in the same step of the loop, instead of three steps later (a task's start, its
        end, the caller's wakeup), behind whatever else became ready meanwhile.  A commit
        refused outright (no envelopes, an id in use, the queue closing) raises QueueError
        here; a failed write fails the future with one."""
        if not envelopes:
            raise QueueError("message without envelopes")
        msgid = envelopes[0].msgid
        if msgid in self._messages:
            raise QueueError(f"message id {format_id(msgid)} is in use")
        meta = {"msgid": msgid, "envelopes": [e.to_json() for e in envelopes]}
        rec = _record(b"M", meta, message)
        envs = list(envelopes)  # the scheduler's own objects: their state is current

        def placed(seg: _Segment, end: int) -> None:
            offset = end - len(message)
            self._messages[msgid] = _Message(
                msgid, {e.evpid for e in envs}, seg.seq, offset, len(message)
            )
            for env in envs:
                self._envelopes[env.evpid] = env
            seg.live.add(msgid)
            if self._cache_bytes + len(message) <= CACHE_BYTES:
                self._cache[msgid] = message
                self._cache_bytes += len(message)

        fut = self._submit([rec], sync=True, after=placed, alone=alone)
        out: asyncio.Future[None] = fut.get_loop().create_future()
        if fut.done():
            _settle_commit(fut, out)
        else:
            fut.add_done_callback(lambda done: _settle_commit(done, out))
        return out

    async def update(self, envelope: Envelope) -> None:
        with self._lock:
            msg = self._messages.get(envelope.msgid)
            if msg is None or envelope.evpid not in msg.evpids:
                return
            in_journal = msg.segment is not None
            if in_journal:
                self._envelopes[envelope.evpid] = Envelope.from_json(envelope.to_json())
        if in_journal:
            await self._submit([_record(b"U", envelope.to_json())], sync=False)
        else:
            await asyncio.to_thread(self._update_file, envelope)

    def _update_file(self, envelope: Envelope) -> None:
        with self._lock:
            msg = self._messages.get(envelope.msgid)
            if msg is None or envelope.evpid not in msg.evpids:
                return
            if msg.segment is not None:  # raced with nothing: only journal→dir moves happen
                self._envelopes[envelope.evpid] = Envelope.from_json(envelope.to_json())
                return
            self._index_append({"u": envelope.to_json()})
            try:
                atomic_write(self._envpath(envelope.evpid), envelope.dumps())
            except OSError as exc:
                raise QueueError(f"cannot update envelope: {exc.strerror}") from exc
            self._files[envelope.evpid] = envelope

    async def remove(self, envelope: Envelope) -> None:
        evpid = envelope.evpid
        with self._lock:
            msg = self._messages.get(envelope.msgid)
            if msg is None or evpid not in msg.evpids:
                return
            in_journal = msg.segment is not None
            if in_journal:
                self._envelopes.pop(evpid, None)
                self._forget(evpid)
        if not in_journal:
            await asyncio.to_thread(self._remove_file, evpid)
        # also for a message already moved to queue/: its M record may still be in a segment
        # kept back (a failed release), and must not come back at the next start
        record = _record(b"D", {"evpid": evpid})
        try:
            await self._submit([record], sync=False)
        except (OSError, QueueError) as exc:
            with self._wakeup:  # the writer appends it as soon as the disk takes it
                self._unwritten.append(record)
                self._wakeup.notify()
            log.event(format_id(evpid), "queue", "done-record-deferred", error=_reason(exc),
                      note="until it is written, a restart delivers this envelope again")

    def _remove_file(self, evpid: int) -> None:
        with self._lock:
            msg = self._messages.get(evpid >> 32)
            if msg is None or evpid not in msg.evpids:
                return
            if msg.segment is not None:
                self._envelopes.pop(evpid, None)
                self._forget(evpid)
                return
            self._index_append({"d": evpid})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._envpath(evpid))
            self._forget(evpid)
            if (evpid >> 32) not in self._messages:
                shutil.rmtree(self._msgdir(evpid >> 32), ignore_errors=True)

    def _forget(self, evpid: int) -> None:
        """Drop an envelope from the index (lock held); the message goes with its last one."""
        msgid = evpid >> 32
        self._files.pop(evpid, None)
        msg = self._messages.get(msgid)
        if msg is None:
            return
        msg.evpids.discard(evpid)
        if not msg.evpids:
            del self._messages[msgid]
            data = self._cache.pop(msgid, None)
            if data is not None:
                self._cache_bytes -= len(data)
            if msg.segment is not None:
                for seg in self._segments:
                    if seg.seq == msg.segment:
                        seg.live.discard(msgid)
                        break

    async def close(self, *, release: bool = True) -> None:
        """Stop the writer thread, write the index, and let the spool go.

        ``release=False`` (the daemon's stop) keeps the spool's lock until the process exits:
        a delivery that outlived the stop may still settle, and the walk's threads end only
        with the process, so no second daemon may take the spool before then.  A writer thread
        still busy after CLOSE_WAIT seconds (a hung disk) keeps both its segment's fd and the
        lock in any case: that fd's number must not be reused under it, nor the spool taken.
        """
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, CLOSE_WAIT)
            if self._thread.is_alive():
                log.error("queue: the journal's writer is still busy at the stop")
                return
            if self._unwritten:
                log.error(
                    f"queue: {len(self._unwritten)} done records could not be written (the "
                    "disk is full): those envelopes are delivered again after the restart"
                )
            with contextlib.suppress(OSError):  # nothing can change queue/ any more
                await asyncio.to_thread(self._write_index)  # (else the next start walks it)
        if self._active_fd >= 0:
            os.close(self._active_fd)
            self._active_fd = -1
        if self._spool_lock >= 0 and release:
            os.close(self._spool_lock)
            self._spool_lock = -1


def _reason(exc: Exception) -> str:
    """What went wrong, for the log: an OSError's text without its path, else the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _data_end(f: BinaryIO, pos: int) -> int:
    """The offset past the file's last byte that is not a zero, ``pos`` if none follows it."""
    f.seek(pos)
    end = pos
    while chunk := f.read(1 << 20):
        kept = len(chunk.rstrip(b"\0"))
        if kept:
            end = pos + kept
        pos += len(chunk)
    return end


def _after_last_line(fd: int, end: int) -> int:
    """The offset just past the last newline before ``end`` (0 if there is none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        chunk = os.pread(fd, pos - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def _settle_commit(done: asyncio.Future[None], out: asyncio.Future[None]) -> None:
    """Hand a commit's outcome to the future its caller awaits: a failed write as a QueueError.
    The outcome is read even when the caller gave up (``out`` cancelled): nothing unread."""
    exc = None if done.cancelled() else done.exception()
    if out.done():
        return
    if done.cancelled():
        out.cancel()
    elif isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        error = QueueError(f"cannot write the queue: {exc.strerror}", full=full)
        error.__cause__ = exc
        out.set_exception(error)
    elif exc is not None:
        out.set_exception(exc)
    else:
        out.set_result(None)


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
