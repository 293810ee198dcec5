"""The on-disk queue: commit, recovery, torn writes, segment release and materialization."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from homemail.queue import Envelope, QueueError, format_id, new_evpid, new_msgid
from homemail.queue_fs import HEADER, MAGIC, FsQueue, SpoolInUse, lock_spool
from homemail.queue_ram import RamQueue


def envelopes(n: int = 1, *, rcpt: str = "bob@localhost") -> list[Envelope]:
    msgid = new_msgid()
    now = time.time()
    return [
        Envelope(
            evpid=new_evpid(msgid),
            sender="alice@example.org",
            rcpt=rcpt,
            dest=f"u{i}@localhost",
            user=f"u{i}",
            action="local",
            ctime=now,
            expire=now + 3600,
            next_try=now,
        )
        for i in range(n)
    ]


async def reopen(q: FsQueue, spool: str, **kw: float) -> tuple[FsQueue, list[Envelope]]:
    await q.close()
    q2 = FsQueue(spool, **kw)  # type: ignore[arg-type]
    return q2, q2.load()


@pytest.mark.parametrize("backend", ["fs", "ram"])
async def test_commit_read_remove(tmp_path, backend):
    q = FsQueue(str(tmp_path)) if backend == "fs" else RamQueue()
    q.load()
    envs = envelopes(2)
    body = b"Subject: hi\r\n\r\nbody\r\n"
    await q.commit(body, envs)
    assert q.read_message(envs[0].msgid) == body
    await q.remove(envs[0])
    assert q.read_message(envs[0].msgid) == body
    await q.remove(envs[1])
    with pytest.raises(QueueError):
        q.read_message(envs[0].msgid)
    await q.close()


async def test_recovery_after_restart(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    kept, done, updated = envelopes(), envelopes(), envelopes()
    for envs, body in ((kept, b"kept\r\n"), (done, b"done\r\n"), (updated, b"upd\r\n")):
        await q.commit(body, envs)
    await q.remove(done[0])
    updated[0].retry = 3
    updated[0].last_error = "4.2.0 mailbox busy"
    await q.update(updated[0])
    q, loaded = await reopen(q, spool)
    by_id = {e.evpid: e for e in loaded}
    assert set(by_id) == {kept[0].evpid, updated[0].evpid}
    assert by_id[updated[0].evpid].retry == 3
    assert by_id[updated[0].evpid].last_error == "4.2.0 mailbox busy"
    assert all(e.recovered for e in loaded)
    assert q.read_message(kept[0].msgid) == b"kept\r\n"
    assert q.read_message(updated[0].msgid) == b"upd\r\n"
    await q.close()


async def test_torn_tail_is_ignored_and_nothing_appended_after_it(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    good = envelopes()
    await q.commit(b"good\r\n", good)
    await q.close()
    seg = sorted(os.listdir(tmp_path / "journal"))[-1]
    with open(tmp_path / "journal" / seg, "ab") as f:
        f.write(b"HMQ1M\x00\x00\x00\x40garbage")  # a record cut short by a crash
    q2 = FsQueue(spool)
    loaded = q2.load()
    assert [e.evpid for e in loaded] == [good[0].evpid]
    more = envelopes()
    await q2.commit(b"more\r\n", more)
    q3, loaded = await reopen(q2, spool)
    assert {e.evpid for e in loaded} == {good[0].evpid, more[0].evpid}
    await q3.close()


async def test_corrupt_record_crc_stops_replay_of_that_segment(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    await q.commit(b"first\r\n", envelopes())
    await q.close()
    seg = tmp_path / "journal" / sorted(os.listdir(tmp_path / "journal"))[-1]
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF  # flip a bit in the message bytes
    seg.write_bytes(bytes(data))
    q2 = FsQueue(spool)
    assert q2.load() == []
    await q2.close()


async def test_a_corrupt_record_costs_that_record_only_and_its_segment_is_kept(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    batches = [envelopes() for _ in range(5)]
    for n, envs in enumerate(batches):
        await q.commit(f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode(), envs)
    await q.close()
    seg = tmp_path / "journal" / sorted(os.listdir(tmp_path / "journal"))[-1]
    data = bytearray(seg.read_bytes())
    data[data.index(b"body 1") + 5] ^= 0xFF  # a bad byte in the second message only
    seg.write_bytes(bytes(data))
    q2 = FsQueue(spool)
    loaded = {e.evpid for e in q2.load()}
    assert loaded == {b[0].evpid for n, b in enumerate(batches) if n != 1}
    for env in [b[0] for n, b in enumerate(batches) if n != 1]:
        await q2.remove(env)
    await q2.close()
    q3 = FsQueue(spool, segment_max_age=0.0)
    q3.load()
    await q3.commit(b"rotate\r\n", envelopes())  # the old segment is released...
    await wait_for(lambda: not seg.exists(), "the segment's release")
    assert Path(f"{seg}.corrupt").exists()  # ...and kept, for whoever looks into what it lost
    await q3.close()


@pytest.mark.parametrize("content", [b"[]", b"null", b"garbage{{{", b'{"evpid": 1'])
async def test_an_envelope_file_that_does_not_read_is_set_aside_and_the_rest_loads(
    tmp_path, content
):
    spool = str(tmp_path)
    q = FsQueue(spool, segment_max_age=0.0, materialize_after=0.0)
    q.load()
    batches = [envelopes() for _ in range(4)]
    for envs in batches:
        await q.commit(b"Subject: s\r\n\r\nx\r\n", envs)
    await q.commit(b"rotate\r\n", envelopes())
    await wait_for(lambda: copied_into_queue_dir(tmp_path) >= 4, "the copy into queue/")
    await q.close()
    (tmp_path / "queue" / "index").unlink(missing_ok=True)  # as after a crash: walk queue/
    bad = batches[0][0]
    [bad_file] = [p for p in (tmp_path / "queue").rglob(f"{bad.evpid:016x}*.json")]
    bad_file.write_bytes(content)
    q2 = FsQueue(spool)
    loaded = {e.evpid for e in q2.load()}
    assert {b[0].evpid for b in batches[1:]} <= loaded and bad.evpid not in loaded
    aside = list((tmp_path / "corrupt").iterdir())
    assert aside, "the unreadable envelope's message was deleted, not set aside"
    kept = [p.read_bytes() for p in (tmp_path / "corrupt").rglob("message")]
    assert b"Subject: s\r\n\r\nx\r\n" in kept
    await q2.close()


async def test_delivered_segments_are_released(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool, segment_max_age=0.0, materialize_after=3600)
    q.load()
    envs = envelopes()
    await q.commit(b"x\r\n", envs)
    await q.remove(envs[0])
    # the next commit rotates the aged segment; the old one holds nothing live and goes
    await q.commit(b"y\r\n", envelopes())
    await asyncio.sleep(0.1)
    await q.commit(b"z\r\n", envelopes())
    deadline = time.time() + 5
    while len(os.listdir(tmp_path / "journal")) > 3 and time.time() < deadline:
        await asyncio.sleep(0.05)
    assert len(os.listdir(tmp_path / "journal")) <= 3
    await q.close()


async def test_deferred_message_is_materialized_and_survives(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool, segment_max_age=0.0, materialize_after=0.0)
    q.load()
    envs = envelopes(2)
    await q.commit(b"Subject: deferred\r\n\r\nbody\r\n", envs)
    await q.commit(b"later\r\n", envelopes())  # rotates; the first segment is materialized
    deadline = time.time() + 5
    msgdir = None
    while time.time() < deadline:
        found = [p for p in (tmp_path / "queue").rglob("message")]
        if found:
            msgdir = found[0].parent
            break
        await asyncio.sleep(0.05)
    assert msgdir is not None, "message was not moved into queue/"
    assert (msgdir / "message").read_bytes() == b"Subject: deferred\r\n\r\nbody\r\n"
    envs[0].retry = 5
    await q.update(envs[0])
    await q.remove(envs[1])
    q, loaded = await reopen(q, spool, materialize_after=3600)
    by_id = {e.evpid: e for e in loaded}
    assert envs[1].evpid not in by_id
    assert by_id[envs[0].evpid].retry == 5
    assert q.read_message(envs[0].msgid) == b"Subject: deferred\r\n\r\nbody\r\n"
    await q.remove(by_id[envs[0].evpid])
    assert not msgdir.exists()
    await q.close()


async def a_message_ten_minutes_in_the_journal(spool: Path, clean: bool) -> Envelope:
    """One message committed, the queue stopped (cleanly or as a crash), and its journal
    segment last written ten minutes ago; its envelope."""
    q = FsQueue(str(spool), segment_max_age=0.0, materialize_after=3600)
    q.load()
    old = envelopes()
    await q.commit(b"old\r\n", old)
    await (q.close() if clean else crash(q))
    past = time.time() - 600
    for seg in (spool / "journal").glob("*.log"):
        os.utime(seg, (past, past))
    return old[0]


async def test_a_restart_does_not_make_old_segments_young_again(tmp_path):
    # a segment's age counts from its last write: a daemon restarted more often than
    # materialize_after still copies old messages out of its journal
    old = await a_message_ten_minutes_in_the_journal(tmp_path, clean=True)
    q = FsQueue(str(tmp_path), segment_max_age=0.0, materialize_after=300)
    assert {e.evpid for e in q.load()} == {old.evpid}
    await q.commit(b"new\r\n", envelopes())  # young: stays in the journal
    await wait_for(lambda: copied_into_queue_dir(tmp_path) == 1, "the copy of the old message")
    assert q._messages[old.msgid].segment is None
    await q.close()


async def test_nothing_is_copied_into_queue_dir_while_the_start_walks_it(tmp_path):
    await a_message_ten_minutes_in_the_journal(tmp_path, clean=False)
    q = FsQueue(str(tmp_path), segment_max_age=0.0, materialize_after=300)
    q.start()  # after a crash: queue/ is walked by scan(), which has not run yet
    await q.commit(b"new\r\n", envelopes())  # a pass of the writer thread
    await writer_idle(q)
    await asyncio.sleep(0.3)
    assert copied_into_queue_dir(tmp_path) == 0
    for _ in q.scan():
        pass
    await q.commit(b"newer\r\n", envelopes())
    await wait_for(lambda: copied_into_queue_dir(tmp_path) == 1, "the copy after the walk")
    await q.close()


async def test_a_rewrite_of_the_index_cut_short_leaves_nothing_behind(tmp_path):
    q = FsQueue(str(tmp_path))
    q.load()
    await crash(q)
    (tmp_path / "queue" / "index.tmp").write_bytes(b'{"homemail-queue-index":2}\n{"msgid"')
    q = FsQueue(str(tmp_path))
    q.load()
    assert not (tmp_path / "queue" / "index.tmp").exists()
    await q.close()


def copied_into_queue_dir(spool: Path) -> int:
    return len(list((spool / "queue").rglob("message")))


async def wait_for(predicate, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def all_but_the_last_committed(q: FsQueue, n: int) -> list[list[Envelope]]:
    """The envelopes of n messages "m0" …, all committed but the last (the test's to commit)."""
    queued = [envelopes() for _ in range(n)]
    for i, e in enumerate(queued[:-1]):
        await q.commit(f"m{i}\r\n".encode(), e)
    return queued


async def test_a_commit_is_not_held_behind_copying_a_long_queue_into_queue_dir(
    tmp_path, monkeypatch
):
    """Messages that outlive their segment are copied into queue/ a few at a time: a commit
    that arrives meanwhile is written between two of them, not after the whole copy."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    try:
        queued = await all_but_the_last_committed(q, 60)
        real = queue_fs.write_file_synced

        def slow(path: str, data: bytes) -> None:  # a slow disk: about a second for the 60
            time.sleep(0.008)
            real(path, data)

        monkeypatch.setattr(queue_fs, "write_file_synced", slow)
        q.segment_max_age = q.materialize_after = 0.0
        await q.commit(b"m59\r\n", queued[-1])  # then the segment is sealed and copied
        await wait_for(lambda: copied_into_queue_dir(tmp_path) > 0, "nothing was copied")
        late = envelopes()
        await q.commit(b"late\r\n", late)
        assert copied_into_queue_dir(tmp_path) < len(queued)  # the copy goes on after it
        await wait_for(lambda: copied_into_queue_dir(tmp_path) >= len(queued), "copy stopped")
        q, loaded = await reopen(q, spool, materialize_after=3600)
        assert len(loaded) == len(queued) + 1
        assert q.read_message(late[0].msgid) == b"late\r\n"
        assert q.read_message(queued[59][0].msgid) == b"m59\r\n"
    finally:
        await q.close()




async def test_a_copy_into_queue_dir_syncs_each_file_once_unless_it_changed_meanwhile(
    tmp_path, monkeypatch
):
    """A message copied into queue/ has its envelope files written (and synced) once; only an
    envelope changed while it was copied is written again after the move, and should that
    write fail, the copy is undone and the message, with the change, stays in the journal."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    plain, changed = envelopes(2), envelopes(2)
    await q.commit(b"plain\r\n", plain)
    await q.commit(b"changed\r\n", changed)
    rewrites: list[str] = []
    real_atomic, real_synced = queue_fs.atomic_write, queue_fs.write_file_synced
    disk = {"full": True}
    copying, changed_meanwhile = threading.Event(), threading.Event()

    def atomic(path: str, data: bytes) -> None:
        rewrites.append(os.path.basename(path))
        if disk["full"]:
            raise OSError(28, "No space left on device")
        real_atomic(path, data)

    def synced(path: str, data: bytes) -> None:
        if "/incoming/" in path and path.endswith("message") and b"changed" in data:
            copying.set()  # the scheduler's update() comes while this message is copied
            assert changed_meanwhile.wait(10)
        real_synced(path, data)

    monkeypatch.setattr(queue_fs, "atomic_write", atomic)
    monkeypatch.setattr(queue_fs, "write_file_synced", synced)
    seg = q._segments[0]
    await asyncio.to_thread(q._materialize, seg, plain[0].msgid)
    assert rewrites == []  # written once, in incoming/, synced there
    copy = asyncio.create_task(asyncio.to_thread(q._materialize, seg, changed[0].msgid))
    assert await asyncio.to_thread(copying.wait, 10)
    bumped = Envelope.from_json(changed[1].to_json())
    bumped.retry = 5
    await q.update(bumped)  # journal-resident still: a U record
    changed_meanwhile.set()
    with pytest.raises(OSError):
        await copy
    assert rewrites == [f"{format_id(changed[1].evpid)}.json"]
    name = format_id(changed[0].msgid)
    assert not (tmp_path / "queue" / name[:2] / name).exists()  # undone
    assert q._messages[changed[0].msgid].segment == seg.seq  # still the journal's
    assert changed[0].msgid in seg.live
    await crash(q)  # the journal alone has the change
    q = FsQueue(spool, materialize_after=3600)
    assert {e.evpid: e.retry for e in q.load()} == {
        plain[0].evpid: 0, plain[1].evpid: 0, changed[0].evpid: 0, changed[1].evpid: 5
    }
    assert q.read_message(changed[0].msgid) == b"changed\r\n"
    disk["full"] = False
    seg = next(g for g in q._segments if changed[0].msgid in g.live)
    changed_meanwhile.set()
    await asyncio.to_thread(q._materialize, seg, changed[0].msgid)
    stored = tmp_path / "queue" / name[:2] / name / f"{format_id(changed[1].evpid)}.json"
    assert json.loads(stored.read_bytes())["retry"] == 5
    await q.close()


class _Killed(BaseException):
    """The process dies here."""


async def test_a_crash_while_a_copy_is_undone_loses_nothing(tmp_path, monkeypatch):
    """An undone copy leaves queue/ in one step: killed while its files are being deleted,
    the next start finds no part of it there to take over the journal's whole message."""
    import shutil

    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    envs = envelopes(2)
    await q.commit(b"body\r\n", envs)
    await q.update(Envelope.from_json({**envs[1].to_json(), "retry": 3}))
    real_rmtree = shutil.rmtree
    failed = {"yes": False}

    def atomic(path: str, data: bytes) -> None:  # the rewrite after the move fails
        failed["yes"] = True
        raise OSError(28, "No space left on device")

    def rmtree(path: str, ignore_errors: bool = False) -> None:
        if failed["yes"] and os.path.isdir(path) and "message" in os.listdir(path):
            os.unlink(os.path.join(path, "message"))  # its first unlink, then the kill
            raise _Killed()
        real_rmtree(path, ignore_errors=ignore_errors)

    real_synced = queue_fs.write_file_synced

    def synced(path: str, data: bytes) -> None:  # a change while copying (as update() makes)
        if "/incoming/" in path and path.endswith("message"):
            with q._lock:
                current = q._envelopes[envs[1].evpid]
                q._envelopes[envs[1].evpid] = Envelope.from_json(current.to_json())
        real_synced(path, data)

    monkeypatch.setattr(queue_fs, "write_file_synced", synced)
    monkeypatch.setattr(queue_fs, "atomic_write", atomic)
    monkeypatch.setattr(queue_fs.shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        await asyncio.to_thread(q._materialize, q._segments[0], envs[0].msgid)
    monkeypatch.undo()
    await crash(q)
    q2 = FsQueue(spool, materialize_after=3600)
    assert {e.evpid: e.retry for e in q2.load()} == {envs[0].evpid: 0, envs[1].evpid: 3}
    assert q2.read_message(envs[0].msgid) == b"body\r\n"
    await q2.close()


async def test_a_journal_that_cannot_rotate_says_so_once_and_keeps_taking_mail(
    tmp_path, monkeypatch, capfd
):
    """No inode left for a new segment: maintenance fails at every pass, which is said once
    for each reason (not at every pass, even when two reasons take turns), and commits go on
    into the segment there is."""
    spool = str(tmp_path)
    q = FsQueue(spool, segment_max_age=0.0, materialize_after=3600)
    q.load()
    real = q._open_segment
    passes = [0]

    def no_inode(seq: int) -> None:
        passes[0] += 1
        if passes[0] % 2:
            raise OSError(28, "No space left on device")
        raise OSError(122, "Disk quota exceeded")

    monkeypatch.setattr(q, "_open_segment", no_inode)
    kept = []
    for _ in range(10):  # a maintenance pass after each
        envs = envelopes()
        await q.commit(b"x\r\n", envs)
        kept.append(envs[0].evpid)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0)
    err = capfd.readouterr().err
    assert passes[0] >= 4
    assert err.count("maintenance of the journal failed") == 2, err
    assert "No space left on device" in err and "Disk quota exceeded" in err
    monkeypatch.setattr(q, "_open_segment", real)
    envs = envelopes()
    await q.commit(b"x\r\n", envs)  # its pass rotates
    kept.append(envs[0].evpid)
    await wait_for(lambda: len(q._segments) > 1, "no rotation once an inode is free")
    await asyncio.sleep(0.1)
    assert "maintenance of the journal works again" in capfd.readouterr().err
    q, loaded = await reopen(q, spool)
    assert sorted(e.evpid for e in loaded) == sorted(kept)
    await q.close()

async def test_a_message_whose_copy_fails_keeps_its_segment_and_is_copied_later(
    tmp_path, monkeypatch, capfd
):
    """The others are copied; the failing one is logged and left alone for a while, however
    many commits come meanwhile, then copied; nothing is lost across a restart."""
    import homemail.queue_fs as queue_fs

    monkeypatch.setattr(queue_fs, "COPY_RETRY", 0.5)
    spool = str(tmp_path)
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    try:
        queued = await all_but_the_last_committed(q, 6)  # m0 … m4; m5 starts the copy
        bad = format_id(queued[2][0].msgid)
        real = queue_fs.write_file_synced
        broken = [True]
        attempts: list[str] = []

        def failing_for_one(path: str, data: bytes) -> None:
            if broken[0] and bad in path:
                attempts.append(path)
                raise OSError(5, "Input/output error")
            real(path, data)

        def in_queue_dir(i: int) -> Path:
            name = format_id(queued[i][0].msgid)
            return tmp_path / "queue" / name[:2] / name / "message"

        monkeypatch.setattr(queue_fs, "write_file_synced", failing_for_one)
        q.segment_max_age = q.materialize_after = 0.0
        await q.commit(b"m5\r\n", queued[5])  # (an idle pass may seal the segment before it)
        others = (0, 1, 3, 4)
        await wait_for(lambda: all(in_queue_dir(i).exists() for i in others), "others not copied")
        first = min((tmp_path / "journal").glob("*.log"))
        started = time.monotonic()
        for _ in range(10):  # commits for about a second: a pass after each batch
            await asyncio.gather(*(q.commit(b"more\r\n", envelopes()) for _ in range(10)))
            await asyncio.sleep(0.1)
        err = capfd.readouterr().err
        assert 2 <= len(attempts) <= 1 + (time.monotonic() - started) / 0.5 + 1
        # the message's first failure is said with its id, its retries once in a while
        assert err.count(f"{bad} queue copy-failed") == 1
        assert err.count("messages cannot be copied into queue/: Input/output error") == 1
        assert first.exists()  # its segment stays while one of its messages is not copied
        assert not in_queue_dir(2).exists()
        assert not (tmp_path / "incoming" / bad).exists()  # the failed copy's part is removed
        broken[0] = False
        await asyncio.sleep(0.6)
        await q.commit(b"after\r\n", envelopes())  # the pass after it copies the message
        await wait_for(lambda: not first.exists(), "the segment was never released")
        assert in_queue_dir(2).read_bytes() == b"m2\r\n"
        q, loaded = await reopen(q, spool, materialize_after=3600)
        assert len(loaded) == 6 + 100 + 1
        assert q.read_message(queued[2][0].msgid) == b"m2\r\n"
    finally:
        await q.close()


async def test_a_stale_copy_in_queue_dir_is_replaced(tmp_path):
    """A copy renamed into queue/ whose directory sync failed (the message stayed in the
    journal) does not block the next copy of that message."""
    spool = str(tmp_path)
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    try:
        envs = envelopes()
        await q.commit(b"fresh\r\n", envs)
        name = format_id(envs[0].msgid)
        stale = tmp_path / "queue" / name[:2] / name
        stale.mkdir(parents=True)
        (stale / "message").write_bytes(b"stale\r\n")
        (stale / "junk.json").write_bytes(b"{}")
        q.segment_max_age = q.materialize_after = 0.0
        await q.commit(b"kick\r\n", envelopes())
        await wait_for(lambda: not (stale / "junk.json").exists(), "the stale copy stayed")
        await wait_for(lambda: (stale / f"{format_id(envs[0].evpid)}.json").exists(), "no copy")
        assert (stale / "message").read_bytes() == b"fresh\r\n"
        q, loaded = await reopen(q, spool, materialize_after=3600)
        assert envs[0].evpid in {e.evpid for e in loaded}
        assert q.read_message(envs[0].msgid) == b"fresh\r\n"
    finally:
        await q.close()


async def test_records_appended_to_a_segment_are_synced_before_it_is_closed(
    tmp_path, monkeypatch
):
    """A done record appended without a sync of its own is synced when its segment is
    closed (here by the stop), not left to the page cache of a file nobody syncs again."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    try:
        kept, done = envelopes(), envelopes()
        await q.commit(b"kept\r\n", kept)
        await q.commit(b"done\r\n", done)
        first_fd = q._active_fd
        events: list[str] = []
        real_sync, real_close = os.fdatasync, os.close

        def sync(fd: int) -> None:
            if fd == first_fd:
                events.append("sync")
            real_sync(fd)

        def close(fd: int) -> None:
            if fd == first_fd:
                events.append("close")
            real_close(fd)

        monkeypatch.setattr(queue_fs.os, "fdatasync", sync)
        monkeypatch.setattr(queue_fs.os, "close", close)
        await writer_idle(q)
        await q.remove(done[0])  # appended by the loop: no sync of its own
        events.append("appended")
        q.segment_max_age = 0.0  # the stop's last pass seals the segment, then syncs the new one
    finally:
        await q.close()
    after = events[events.index("appended") :]
    assert after[: after.index("close") + 1] == ["appended", "sync", "close"]  # (fds are reused)
    q, loaded = await reopen(q, spool)
    assert [e.evpid for e in loaded] == [kept[0].evpid]
    await q.close()


def active_segment(spool: str) -> Path:
    return max(Path(spool, "journal").glob("*.log"))


async def test_commits_are_written_over_zeros_ahead_and_a_stop_cuts_them_off(
    tmp_path, monkeypatch
):
    """The active segment is made longer (in zeros, synced before any record is written over
    them) ahead of its records, so that a commit need not change the file's size (its sync
    then writes the data alone); the stop cuts the zeros off, and what was committed reads
    back."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    events: list[str] = []
    real_pwrite, real_sync = os.pwrite, os.fdatasync

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if fd == q._active_fd:
            events.append("record" if any(bytes(data[:64])) else "zeros")
        return real_pwrite(fd, data, offset)

    def sync(fd: int) -> None:
        if fd == q._active_fd:
            events.append("sync")
            # no hole where the record goes: filling one would change the file's blocks again
            assert os.lseek(fd, 0, os.SEEK_HOLE) == os.fstat(fd).st_size
        real_sync(fd)

    monkeypatch.setattr(queue_fs.os, "pwrite", pwrite)
    monkeypatch.setattr(queue_fs.os, "fdatasync", sync)
    committed = []
    await q.commit(b"first\r\n", envelopes())
    assert events == ["zeros", "sync", "record", "sync"]
    size = active_segment(spool).stat().st_size
    assert size >= 1024 * 1024  # zeros ahead of the first record
    for n in range(20):
        envs = envelopes()
        await q.commit(f"Subject: {n}\r\n\r\n{'x' * 4000}\r\n".encode(), envs)
        committed.append(envs[0].evpid)
    assert active_segment(spool).stat().st_size == size  # written over the zeros
    assert "zeros" not in events[1:]
    seg = q._segments[-1]
    await q.commit(b"x" * (seg.room - seg.size - 600), envelopes())  # what is left of the room
    await q.commit(b"y" * 20_000, envelopes())  # more room: the zeros' sync checks for a hole
    assert events.count("zeros") == 2
    await q.close()
    data = active_segment(spool).read_bytes()
    assert not data.endswith(b"\0")  # the stop cut the zeros off
    q, loaded = await reopen(q, spool)
    assert set(committed) <= {e.evpid for e in loaded}
    await q.close()


async def test_a_large_record_grows_the_segment_itself(tmp_path):
    """Zeros are written ahead for small records only: for a large one they would cost more
    bytes than the inode's write they spare."""
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    large = b"Subject: large\r\n\r\n" + b"x" * 100_000 + b"\r\n"
    await q.commit(large, envelopes())
    assert active_segment(spool).stat().st_size == q._segments[-1].size  # no zeros
    await q.commit(b"small\r\n", envelopes())
    assert active_segment(spool).stat().st_size > q._segments[-1].size + 512 * 1024
    await q.close()


async def test_after_a_crash_the_zeros_ahead_end_the_replay_and_a_torn_record_is_ignored(
    tmp_path, capfd
):
    """A crash leaves the active segment with zeros after its records (the room written
    ahead): a start replays every record, says nothing of a torn tail, and starts a new
    segment.  A record a crash cut short over the zeros (its end still zeros) is ignored as
    a torn tail; a bad byte in the last whole record costs that record, and the segment is
    kept for whoever looks into it."""
    running = tmp_path / "running"
    q = FsQueue(str(running))
    q.load()
    kept = [envelopes() for _ in range(3)]
    for n, envs in enumerate(kept):
        # (the last one ends in a NUL byte, as a file in the offline spool may)
        await q.commit(f"m{n}\r\n".encode() + b"\0" * (n == 2), envs)
    await writer_idle(q)
    for case in ("clean", "torn", "bad byte"):
        spool = tmp_path / case  # the files as a killed process leaves them
        shutil.copytree(running, spool)
        seg = active_segment(str(spool))
        data = seg.read_bytes()
        assert data.endswith(bytes(4096))
        end = len(data.rstrip(b"\0")) + 1  # (the last message's NUL)
        with open(seg, "r+b") as f:
            if case == "torn":  # its first sectors: the rest never reached the disk
                sector = -(-(end + HEADER.size + 8) // 512) * 512
                written = sector - end - HEADER.size
                f.seek(end)
                f.write(HEADER.pack(MAGIC, ord("M"), written + 100, 16, 12345))
                f.write(b'{"msgid":' + b"1" * (written - 9))
            elif case == "bad byte":  # in the last message (whose last byte is a zero)
                f.seek(end - 3)
                f.write(bytes([data[end - 3] ^ 0xFF]))
        capfd.readouterr()
        q2 = FsQueue(str(spool))
        loaded = sorted(e.evpid for e in q2.load())
        lost = kept[-1] if case == "bad byte" else []
        assert loaded == sorted(envs[0].evpid for envs in kept if envs is not lost)
        more = envelopes()
        await q2.commit(b"more\r\n", more)
        await asyncio.sleep(0)  # (the log's lines of this loop iteration)
        said = capfd.readouterr().err
        assert ("journal-tail" in said) == (case == "torn"), said
        assert ("corrupt-record" in said) == (case == "bad byte"), said
        assert q2._segments[0].corrupt == (case == "bad byte")
        q3, loaded = await reopen(q2, str(spool))
        assert more[0].evpid in {e.evpid for e in loaded}
        assert q3.read_message(more[0].msgid) == b"more\r\n"
        await q3.close()
    await q.close()


async def test_a_full_disk_that_refuses_the_zeros_ahead_still_takes_the_record(
    tmp_path, monkeypatch
):
    """The zeros written ahead are a saving, not a need: when the disk refuses them, what
    they took is given back and the records are written, each one after the last (and read
    back after a restart)."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    real = os.pwrite
    refused: list[int] = []

    def no_room_for_zeros(fd: int, data: bytes, offset: int) -> int:
        if fd == q._active_fd and not any(bytes(data[:64])):
            half = real(fd, data[: len(data) // 2], offset)
            refused.append(half)
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(queue_fs.os, "pwrite", no_room_for_zeros)
    taken = [envelopes() for _ in range(3)]
    for n, envs in enumerate(taken):
        await q.commit(f"taken {n}\r\n".encode(), envs)
        assert len(refused) == n + 1
        seg = active_segment(spool)
        assert seg.stat().st_size == q._segments[-1].size  # nothing left of the zeros
    monkeypatch.setattr(queue_fs.os, "pwrite", real)
    q, loaded = await reopen(q, spool)
    assert sorted(e.evpid for e in loaded) == sorted(envs[0].evpid for envs in taken)
    for n, envs in enumerate(taken):
        assert q.read_message(envs[0].msgid) == f"taken {n}\r\n".encode()
    await q.close()


async def test_envelope_json_escapes_hostile_text(tmp_path):
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    envs = envelopes()
    envs[0].last_error = '550 evil\r\nrcpt: root\x00"}'
    await q.commit(b"x\r\n", envs)
    await q.update(envs[0])
    q, loaded = await reopen(q, spool)
    assert loaded[0].last_error == envs[0].last_error
    assert loaded[0].rcpt == "bob@localhost"
    await q.close()


async def test_group_commit_many_concurrent(tmp_path):
    q = FsQueue(str(tmp_path))
    q.load()
    batches = [envelopes() for _ in range(200)]
    await asyncio.gather(*(q.commit(f"m{i}\r\n".encode(), e) for i, e in enumerate(batches)))
    for i, e in enumerate(batches):
        assert q.read_message(e[0].msgid) == f"m{i}\r\n".encode()
    q, loaded = await reopen(q, str(tmp_path))
    assert len(loaded) == 200
    for i, e in enumerate(batches):
        assert q.read_message(e[0].msgid) == f"m{i}\r\n".encode()
    await q.close()


async def writer_idle(q: FsQueue) -> None:
    """Until the journal's writer thread waits for work: records are then appended directly."""
    deadline = time.monotonic() + 5
    while q._busy or q._pending:
        assert time.monotonic() < deadline, "the writer thread stays busy"
        await asyncio.sleep(0.001)


def appends_on(q: FsQueue, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Record (thread, sync) for each append to the journal."""
    calls: list[tuple[int, bool]] = []
    real = q._append

    def spy(data: bytes, *, sync: bool = False) -> None:
        calls.append((threading.get_ident(), sync))
        real(data, sync=sync)

    monkeypatch.setattr(q, "_append", spy)
    return calls


async def commit_when_idle(
    q: FsQueue,
    appends: list[tuple[int, bool]],
    body: bytes,
    envs: list[Envelope] | None = None,
    *,
    alone: bool,
) -> tuple[int, bool]:
    """Commit once the writer thread waits; the (thread, sync) of the append that wrote it."""
    await writer_idle(q)
    before = len(appends)
    await q.commit(body, envs if envs is not None else envelopes(), alone=alone)
    return appends[before]


@pytest.fixture
def fast_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """However slow this machine's syncs, a commit alone is the event loop's to sync."""
    import homemail.queue_fs as queue_fs

    monkeypatch.setattr(queue_fs, "INLINE_SLOW", 60.0)


async def test_results_recorded_between_and_during_commits_survive_a_restart(
    tmp_path, monkeypatch
):
    """Done and update records reach the journal whether the writer thread is idle (the loop
    appends them) or busy with commits (they queue behind them)."""
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    calls = appends_on(q, monkeypatch)
    first = [envelopes() for _ in range(40)]
    for i, e in enumerate(first):
        await q.commit(f"a{i}\r\n".encode(), e)
    second = [envelopes() for _ in range(40)]

    async def settle(i: int) -> None:
        env = first[i][0]
        if i % 2:
            await q.remove(env)
        else:
            env.retry, env.last_error = i, f"4.2.0 busy {i}"
            await q.update(env)

    await asyncio.gather(
        *(q.commit(f"b{i}\r\n".encode(), e) for i, e in enumerate(second)),
        *(settle(i) for i in range(40)),
    )
    loop_thread = threading.get_ident()
    direct = 0
    for i in range(0, 40, 4):  # with the writer idle: appended on this thread
        await writer_idle(q)
        before = len(calls)
        await q.remove(first[i][0])
        assert calls[before:] == [(loop_thread, False)]
        direct += 1
    third = envelopes()
    await q.commit(b"c\r\n", third)  # after the direct appends: its offset must allow for them
    q._cache.clear()
    assert q.read_message(third[0].msgid) == b"c\r\n"
    assert q.read_message(second[7][0].msgid) == b"b7\r\n"
    assert direct == 10
    q, loaded = await reopen(q, spool)
    by_id = {e.evpid: e for e in loaded}
    expected_first = {first[i][0].evpid: i for i in range(2, 40, 4)}
    assert set(by_id) == set(expected_first) | {e[0].evpid for e in second} | {third[0].evpid}
    for evpid, i in expected_first.items():
        assert (by_id[evpid].retry, by_id[evpid].last_error) == (i, f"4.2.0 busy {i}")
    assert q.read_message(third[0].msgid) == b"c\r\n"
    await q.close()


async def test_a_commit_alone_is_synced_by_the_loop_and_the_others_by_the_writer(
    tmp_path, monkeypatch, fast_disk
):
    """A commit whose caller is alone (one SMTP client) is written and synced on the event
    loop while the writer thread is idle and the record fits in the zeros ahead; any other
    commit, or one that needs room made, goes through the writer thread.  All of them are
    durable when commit returns and read back after a restart."""
    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    await q.commit(b"first\r\n", envelopes())  # (the writer makes the first room)
    calls = appends_on(q, monkeypatch)
    loop_thread = threading.get_ident()
    kept = []

    async def commit(body: bytes, *, alone: bool) -> tuple[int, bool]:
        envs = envelopes()
        call = await commit_when_idle(q, calls, body, envs, alone=alone)
        kept.append((envs[0].evpid, body))
        return call

    assert await commit(b"alone\r\n", alone=True) == (loop_thread, True)
    thread, sync = await commit(b"not alone\r\n", alone=False)
    assert thread != loop_thread and sync
    seg = q._segments[-1]
    filled = await commit(b"y" * (seg.room - seg.size - 2000), alone=True)
    assert filled == (loop_thread, True) and seg.room - seg.size < 2000
    thread, sync = await commit(b"z" * 3000, alone=True)  # no room left: the writer makes it
    assert thread != loop_thread and sync
    assert await commit(b"alone again\r\n", alone=True) == (loop_thread, True)
    q._cache.clear()  # read through the offsets the commits recorded, not the cache
    for evpid, body in kept:
        assert q.read_message(evpid >> 32) == body
    q, loaded = await reopen(q, spool)
    assert {evpid for evpid, _ in kept} <= {e.evpid for e in loaded}
    for evpid, body in kept:
        assert q.read_message(evpid >> 32) == body
    await q.close()


async def test_a_large_commit_alone_grows_the_segment_on_the_loop_until_it_fills_it(
    tmp_path, monkeypatch, fast_disk
):
    """No room is made for a record over ROOM_FOR: a commit alone of one is appended past the
    zeros by the loop, as the writer would; the one that would fill the segment is the
    writer's, whose maintenance then starts a new segment.  All are read back after a
    restart."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    big = queue_fs.ROOM_FOR + 1000
    q = FsQueue(spool, segment_max_bytes=8 * big)
    q.load()
    appends = appends_on(q, monkeypatch)
    loop_thread = threading.get_ident()
    kept = []
    on_loop = []
    while len(q._segments) == 1:
        envs = envelopes()
        body = bytes([65 + len(kept) % 26]) * big
        thread, sync = await commit_when_idle(q, appends, body, envs, alone=True)
        assert sync
        on_loop.append(thread == loop_thread)
        kept.append((envs[0].msgid, body))
        await writer_idle(q)
    assert on_loop[:-1] == [True] * (len(on_loop) - 1) and len(on_loop) >= 6
    assert not on_loop[-1]  # the one that reached the segment's size
    assert os.path.getsize(q._segments[0].path) < 9 * big
    await writer_idle(q)
    envs = envelopes()
    body = b"h" * (queue_fs.INLINE_MAX + 1)  # would hold the loop up: the writer's
    thread, _ = await commit_when_idle(q, appends, body, envs, alone=True)
    assert thread != loop_thread
    kept.append((envs[0].msgid, body))
    q, _ = await reopen(q, spool)
    for msgid, body in kept:
        assert q.read_message(msgid) == body
    await q.close()


async def test_a_commit_given_up_by_its_caller_whose_write_fails_leaves_no_warning(
    tmp_path, monkeypatch
):
    """A caller may stop waiting for a commit through the writer (cancelled, ``wait_for``);
    when the write then fails, nobody is left to read the error, and asyncio must not
    complain of a future whose exception was never retrieved."""
    import gc

    import homemail.queue_fs as queue_fs

    q = FsQueue(str(tmp_path))
    q.load()
    await q.commit(b"first\r\n", envelopes())
    await writer_idle(q)
    loop = asyncio.get_running_loop()
    reported: list[object] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context.get("message")))
    gate = threading.Event()

    def failing(fd: int) -> None:
        gate.wait(5)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(queue_fs.os, "fdatasync", failing)
    fut = q.commit(b"given up\r\n", envelopes(), alone=False)
    assert not fut.done()
    fut.cancel()
    gate.set()
    await writer_idle(q)
    for _ in range(5):
        await asyncio.sleep(0.01)
    monkeypatch.undo()
    await q.commit(b"after\r\n", envelopes())  # the writer lets go of the failed batch
    await writer_idle(q)
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert reported == []
    await q.close()


async def test_a_commit_synced_on_the_loop_is_done_when_commit_returns(
    tmp_path, monkeypatch, fast_disk
):
    """So its session writes the 250 in the same step of the event loop; one through the
    writer thread is not done until the writer's sync is."""
    q = FsQueue(str(tmp_path))
    q.load()
    await q.commit(b"first\r\n", envelopes())  # (the writer makes the first room)
    await writer_idle(q)
    alone = envelopes()
    fut = q.commit(b"alone\r\n", alone, alone=True)
    assert fut.done() and fut.exception() is None
    await writer_idle(q)
    other = envelopes()
    fut = q.commit(b"not alone\r\n", other, alone=False)
    assert not fut.done()
    await fut
    q, loaded = await reopen(q, str(tmp_path))
    assert {alone[0].evpid, other[0].evpid} <= {e.evpid for e in loaded}
    await q.close()


async def test_a_slow_disk_has_commits_synced_by_the_writer_until_it_is_fast_again(
    tmp_path, monkeypatch
):
    """While the loop syncs it does nothing else, so a slow or busy disk is the writer's: once
    the journal's syncs (the loop's and the writer's) are slow on average, commits go through
    the writer thread, and back to the loop once its syncs are fast again."""
    import homemail.queue_fs as queue_fs

    monkeypatch.setattr(queue_fs, "INLINE_SLOW", 0.05)
    q = FsQueue(str(tmp_path))
    q.load()
    await q.commit(b"first\r\n", envelopes())
    appends = appends_on(q, monkeypatch)
    loop_thread = threading.get_ident()
    real_sync = os.fdatasync
    slow = [True]

    def sync(fd: int) -> None:
        if slow[0]:
            time.sleep(0.2)
        real_sync(fd)

    monkeypatch.setattr(queue_fs.os, "fdatasync", sync)

    async def on_the_loop() -> bool:
        return (await commit_when_idle(q, appends, b"m\r\n", alone=True))[0] == loop_thread

    while_slow = [await on_the_loop() for _ in range(6)]
    assert while_slow[0]  # (nothing known of the disk yet)
    assert while_slow.count(True) <= 2 and not any(while_slow[2:])
    slow[0] = False
    fast_again = [await on_the_loop() for _ in range(30)]
    assert fast_again[-1] and fast_again.index(True) >= 1  # the writer's fast syncs count too
    await q.close()


async def test_an_update_appended_directly_lands_after_one_queued_behind_a_commit(
    tmp_path, monkeypatch
):
    import homemail.queue_fs as queue_fs

    q = FsQueue(str(tmp_path))
    q.load()
    env, other = envelopes(), envelopes()
    await q.commit(b"kept\r\n", env)
    held, release = threading.Event(), threading.Event()
    real_sync = os.fdatasync

    def slow_sync(fd: int) -> None:
        held.set()
        release.wait(5)
        real_sync(fd)

    monkeypatch.setattr(queue_fs.os, "fdatasync", slow_sync)
    commit = asyncio.ensure_future(q.commit(b"other\r\n", other))
    assert await asyncio.to_thread(held.wait, 5)  # the writer is inside a commit's sync
    env[0].retry = 1
    queued = asyncio.ensure_future(q.update(env[0]))
    await asyncio.sleep(0.05)
    assert not queued.done() and len(q._pending) == 1  # behind the commit, not appended
    release.set()
    await asyncio.gather(commit, queued)
    monkeypatch.setattr(queue_fs.os, "fdatasync", real_sync)
    await writer_idle(q)
    env[0].retry = 2
    await q.update(env[0])
    q, loaded = await reopen(q, str(tmp_path))
    assert {e.evpid: e.retry for e in loaded} == {env[0].evpid: 2, other[0].evpid: 0}
    await q.close()


async def test_a_failed_direct_append_is_cut_back_and_what_follows_survives(
    tmp_path, monkeypatch
):
    """A done record the loop could only half write (disk full): the writer cuts the torn
    bytes back before anything else, then writes the record once the disk takes it, so the
    envelope does not come back after a restart; later records are readable."""
    import homemail.queue_fs as queue_fs

    q = FsQueue(str(tmp_path))
    q.load()
    kept, later = envelopes(), envelopes()
    await q.commit(b"kept\r\n", kept)
    real = os.pwrite
    loop_thread = threading.get_ident()
    torn: list[int] = []  # the bytes written of the record, then the disk is full

    def half_then_full(fd: int, data: bytes, offset: int) -> int:
        if threading.get_ident() != loop_thread or fd != q._active_fd or len(torn) > 1:
            return real(fd, data, offset)
        if not torn:
            torn.append(real(fd, bytes(data)[: len(data) // 2], offset))
            return torn[0]
        torn.append(0)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue_fs.os, "pwrite", half_then_full)
    await writer_idle(q)
    await q.remove(kept[0])  # delivered: its done record waits for room
    monkeypatch.setattr(queue_fs.os, "pwrite", real)
    assert len(torn) == 2 and torn[0] > 0  # part of the record did reach the file
    await q.commit(b"later\r\n", later)
    q._cache.clear()
    assert q.read_message(later[0].msgid) == b"later\r\n"
    q, loaded = await reopen(q, str(tmp_path))
    assert sorted(e.evpid for e in loaded) == [later[0].evpid]
    assert q.read_message(later[0].msgid) == b"later\r\n"
    await q.close()



async def test_a_done_record_the_full_disk_refused_is_written_when_room_comes_back(
    tmp_path, monkeypatch, capfd
):
    """A delivery settled while the disk is full: its done record is kept and written by the
    writer's next pass that the disk takes, so neither a clean stop after that nor a crash
    delivers the message twice; a stop while the disk is still full says what will happen."""
    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    done, other = envelopes(), envelopes()
    await q.commit(b"done\r\n", done)
    await q.commit(b"other\r\n", other)
    real = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        if fd == q._active_fd:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(queue_fs.os, "pwrite", full)
    await writer_idle(q)
    await q.remove(done[0])  # no error: the delivery happened
    await asyncio.sleep(0.2)
    assert q._unwritten, "the record was dropped while the disk was full"
    monkeypatch.setattr(queue_fs.os, "pwrite", real)
    await wait_for(lambda: not q._unwritten, "the done record written", seconds=15)
    await crash(q)  # no clean stop: the journal alone must say it
    q2 = FsQueue(spool)
    assert [e.evpid for e in q2.load()] == [other[0].evpid]

    q = q2  # (full() refuses the writes to this queue's journal now)
    monkeypatch.setattr(queue_fs.os, "pwrite", full)
    await writer_idle(q2)
    await q2.remove(other[0])
    await q2.close()
    await asyncio.sleep(0)  # (the log's lines of this loop iteration)
    assert "1 done records could not be written" in capfd.readouterr().err
    monkeypatch.setattr(queue_fs.os, "pwrite", real)
    q3 = FsQueue(spool)
    assert [e.evpid for e in q3.load()] == [other[0].evpid]  # (delivered again, as it said)
    await q3.close()


async def test_commits_are_refused_while_a_torn_write_cannot_be_repaired(tmp_path, monkeypatch):
    """A commit's write torn by an I/O error, and neither the cut-back nor a new segment
    works: the commits that follow are refused (a 451 for the client), not appended after
    the torn record where a restart's replay would never reach them; once the disk works
    again the writer repairs the journal and what it acknowledges after that is kept."""
    import errno

    import homemail.queue_fs as queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool)
    q.load()
    first = envelopes()
    await q.commit(b"first\r\n", first)
    real_write, real_truncate, real_open = os.pwrite, os.ftruncate, os.open
    failing = {"on": True, "torn": False}

    def write(fd: int, data: bytes, offset: int) -> int:
        record = bytes(data[:4]) == b"HMQ1"  # (not the zeros written ahead of the records)
        if failing["on"] and fd == q._active_fd and record and not failing["torn"]:
            failing["torn"] = True
            real_write(fd, bytes(data)[:20], offset)
            raise OSError(errno.EIO, "Input/output error")
        return real_write(fd, data, offset)

    def truncate(fd: int, length: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "Input/output error")
        real_truncate(fd, length)

    def open_(path: str, *args: object, **kw: object) -> int:
        if failing["on"] and str(path).endswith(".log"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(queue_fs.os, "pwrite", write)
    monkeypatch.setattr(queue_fs.os, "ftruncate", truncate)
    monkeypatch.setattr(queue_fs.os, "open", open_)
    with pytest.raises(QueueError, match="Input/output error"):
        await q.commit(b"torn\r\n", envelopes())
    with pytest.raises(QueueError, match="the journal cannot be written"):
        await q.commit(b"refused\r\n", envelopes())  # would follow the torn record
    failing["on"] = False  # the disk answers again
    later = envelopes()
    await q.commit(b"later\r\n", later)
    await crash(q)
    q2 = FsQueue(spool)
    loaded = {e.evpid for e in q2.load()}
    assert loaded == {first[0].evpid, later[0].evpid}
    assert q2.read_message(later[0].msgid) == b"later\r\n"

    # a stop while the journal is refusing mail: prompt, and what was acknowledged is kept
    q = q2  # (the faults above look at q's journal)
    failing.update(on=True, torn=False)
    with pytest.raises(QueueError):
        await q2.commit(b"torn again\r\n", envelopes())
    assert q2._broken
    started = time.monotonic()
    await q2.close()
    assert time.monotonic() - started < 10
    failing["on"] = False
    q3 = FsQueue(spool)
    assert {e.evpid for e in q3.load()} == {first[0].evpid, later[0].evpid}
    await q3.close()

async def test_a_failed_commit_after_a_removal_keeps_it_removed(tmp_path, monkeypatch):
    """The journal is cut back to its last good record after a failed sync; a done record
    appended just before (the writer idle) is one of those and stays."""
    import homemail.queue_fs as queue_fs

    q = FsQueue(str(tmp_path))
    q.load()
    calls = appends_on(q, monkeypatch)
    kept, done, failed = envelopes(), envelopes(), envelopes()
    await q.commit(b"kept\r\n", kept)  # holds the segment (one without live mail goes)
    await q.commit(b"done\r\n", done)
    await writer_idle(q)
    await q.remove(done[0])
    assert calls[-1] == (threading.get_ident(), False)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(queue_fs.os, "fdatasync", failing)
    with pytest.raises(QueueError):
        await q.commit(b"failed\r\n", failed)
    monkeypatch.setattr(queue_fs.os, "fdatasync", real)
    q, loaded = await reopen(q, str(tmp_path))
    assert [e.evpid for e in loaded] == [kept[0].evpid]
    await q.close()


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("failing", ["the zeros'", "a record's"])
async def test_failed_sync_does_not_hide_later_commits(
    tmp_path, monkeypatch, fast_disk, failing, alone
):
    """A failed fdatasync (disk full, EIO), of the zeros written ahead or of a record, fails
    that commit only: what follows is readable and survives a restart.  ``alone``: the
    records' syncs, the failed one and a later one, are the event loop's (the zeros are
    always the writer's)."""
    import homemail.queue_fs as queue_fs

    q = FsQueue(str(tmp_path))
    q.load()
    appends = appends_on(q, monkeypatch)
    loop_thread = threading.get_ident()
    earlier = []
    if failing == "a record's":
        earlier = envelopes()
        await q.commit(b"earlier\r\n", earlier)  # (and zeros ahead: the next sync is a record's)
    real = os.fdatasync
    calls = {"n": 0}

    def failing_once(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(queue_fs.os, "fdatasync", failing_once)
    lost = envelopes()
    await writer_idle(q)
    before = len(appends)
    with pytest.raises(QueueError) as failed:
        await q.commit(b"first\r\n", lost, alone=alone)
    assert failed.value.full  # SMTP answers 452 4.3.1, not 451 4.3.0
    if failing == "a record's":
        assert (appends[before][0] == loop_thread) == alone
    kept = [envelopes(), envelopes()]
    await q.commit(b"second\r\n", kept[0])  # (the writer's: room in the new segment)
    thread, _ = await commit_when_idle(q, appends, b"third\r\n", kept[1], alone=alone)
    assert (thread == loop_thread) == alone
    bodies = {kept[0][0].msgid: b"second\r\n", kept[1][0].msgid: b"third\r\n"}
    q._cache.clear()
    for msgid, body in bodies.items():
        assert q.read_message(msgid) == body
    monkeypatch.setattr(queue_fs.os, "fdatasync", real)
    q, loaded = await reopen(q, str(tmp_path))
    expected = [*earlier, *kept[0], *kept[1]]
    assert sorted(e.evpid for e in loaded) == sorted(e.evpid for e in expected)
    for msgid, body in bodies.items():
        assert q.read_message(msgid) == body
    await q.close()


class PageCache:
    """What reaches the disk of the journal's segments, for a power loss: Linux's rules since
    4.13, where a failed writeback leaves its pages clean (their data never written) and the
    error is reported once, by the next fdatasync; a later one succeeds."""

    PAGE = 4096

    def __init__(self, journal: str, monkeypatch: pytest.MonkeyPatch) -> None:
        import homemail.queue_fs as queue_fs

        self.journal = journal
        self.disk: dict[str, bytearray] = {}
        self.dirty: dict[str, set[int]] = {}
        self.fail_next_sync = False
        self.real = (os.pwrite, os.ftruncate, os.fdatasync)
        monkeypatch.setattr(queue_fs.os, "pwrite", self.pwrite)
        monkeypatch.setattr(queue_fs.os, "ftruncate", self.ftruncate)
        monkeypatch.setattr(queue_fs.os, "fdatasync", self.fdatasync)

    def _path(self, fd: int) -> str | None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        if os.path.dirname(path) != self.journal or not path.endswith(".log"):
            return None
        if path not in self.disk:  # first seen: what it holds is on the disk
            self.disk[path] = bytearray(Path(path).read_bytes())
            self.dirty[path] = set()
        return path

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        written = self.real[0](fd, data, offset)
        path = self._path(fd)
        if path and written:
            first, last = offset // self.PAGE, (offset + written - 1) // self.PAGE
            self.dirty[path].update(range(first, last + 1))
        return written

    def ftruncate(self, fd: int, length: int) -> None:
        self.real[1](fd, length)
        path = self._path(fd)
        if path:
            self.dirty[path] = {p for p in self.dirty[path] if p * self.PAGE < length}

    def fdatasync(self, fd: int) -> None:
        path = self._path(fd)
        if path and self.fail_next_sync:
            self.fail_next_sync = False
            self.dirty[path].clear()  # clean now, and never written
            raise OSError(5, "Input/output error")
        self.real[2](fd)
        if path:
            now = Path(path).read_bytes()
            disk = self.disk[path]
            disk.extend(bytes(max(0, len(now) - len(disk))))  # (a hole reads as zeros)
            del disk[len(now) :]
            for p in self.dirty[path]:
                page = slice(p * self.PAGE, (p + 1) * self.PAGE)
                disk[page] = now[page]
            self.dirty[path].clear()

    def power_loss(self, running: Path, crashed: Path) -> None:
        """``crashed``: the spool as the disk holds it."""
        shutil.copytree(running, crashed)
        for path, disk in self.disk.items():
            Path(crashed, "journal", os.path.basename(path)).write_bytes(bytes(disk))


async def unsynced_updates(q: FsQueue, count: int) -> None:
    """Records the loop appends without a sync (each about 400 bytes), dirty in the cache."""
    envs = envelopes()
    await q.commit(b"updated\r\n", envs)
    await writer_idle(q)
    for n in range(count):
        envs[0].retry = n
        envs[0].last_error = "4.2.0 mailbox busy " + "z" * 200
        await q.update(envs[0])


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("failing", ["the zeros'", "a record's"])
async def test_after_a_failed_sync_no_commit_follows_what_may_be_missing(
    tmp_path, monkeypatch, fast_disk, failing, alone
):
    """A failed fdatasync may have lost what was written since the last good one (the
    kernel says so once; the next sync succeeds): the commit it was for is refused, and the
    commits acknowledged after it survive a power loss, since they do not follow the hole.
    ``alone``: the records' syncs, the failed one (a record's) and the last, are the event
    loop's."""
    running = tmp_path / "running"
    q = FsQueue(str(running))
    q.load()
    await q.commit(b"first\r\n", envelopes())
    seg = q._segments[-1]
    if failing == "the zeros'":  # the next commit does not fit in the room ahead
        while seg.room - seg.size > 60_000:
            await q.commit(b"x" * 30_000, envelopes())
        await q.commit(b"x" * (seg.room - seg.size - 20_600), envelopes())
    cache = PageCache(str(running / "journal"), monkeypatch)
    await unsynced_updates(q, 30)  # about 12 KiB
    assert (seg.room - seg.size < 10_000) == (failing == "the zeros'")
    cache.fail_next_sync = True
    await writer_idle(q)
    calls = appends_on(q, monkeypatch)
    loop_thread = threading.get_ident()
    with pytest.raises(QueueError):
        await q.commit(b"refused\r\n" + b"y" * 10_000, envelopes(), alone=alone)
    if failing == "a record's":
        assert (calls[0][0] == loop_thread) == alone
    acked = [envelopes(), envelopes()]
    await q.commit(b"Subject: acked\r\n\r\n" + b"y" * 10_000, acked[0])  # (room in the new file)
    body = b"Subject: acked too\r\n\r\n" + b"y" * 10_000
    thread, _ = await commit_when_idle(q, calls, body, acked[1], alone=alone)
    assert (thread == loop_thread) == alone
    cache.power_loss(running, tmp_path / "crashed")
    await q.close()
    monkeypatch.undo()
    q2 = FsQueue(str(tmp_path / "crashed"))
    assert {acked[0][0].evpid, acked[1][0].evpid} <= {e.evpid for e in q2.load()}
    await q2.close()


@pytest.mark.parametrize("seed", range(24))
async def test_what_was_acknowledged_survives_a_power_loss_after_random_failures(
    tmp_path, monkeypatch, seed
):
    """Commits, updates and removals with failed syncs (the page cache's rules), failed
    segment opens, rotations and direct appends, at random: after a power loss every commit
    acknowledged and not removed is back, with its message."""
    import errno
    import random

    import homemail.queue_fs as queue_fs

    rnd = random.Random(seed)
    running = tmp_path / "running"
    q = FsQueue(
        str(running),
        segment_max_bytes=rnd.choice([20_000, 200_000, 2_000_000]),
        segment_max_age=rnd.choice([0.0, 0.05, 30.0]),
        materialize_after=3600,
    )
    q.load()
    cache = PageCache(str(running / "journal"), monkeypatch)
    real_open = os.open
    failing_opens = [0]

    def open_(path: str, *args: int) -> int:
        if failing_opens[0] and str(path).endswith(".log"):
            failing_opens[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, *args)

    monkeypatch.setattr(queue_fs.os, "open", open_)
    acked: dict[int, bytes] = {}
    live: list[list[Envelope]] = []
    for step in range(120):
        fault = rnd.random()
        if fault < 0.08:
            cache.fail_next_sync = True
        elif fault < 0.11:
            failing_opens[0] = rnd.randint(1, 3)
        if rnd.random() < 0.3:
            await writer_idle(q)  # (so that updates and removals are appended directly)
        op = rnd.random()
        if op < 0.45 or not live:
            envs = envelopes()
            body = f"m{step}\r\n".encode() + b"y" * rnd.choice([10, 3000, 40_000])
            try:
                await q.commit(body, envs, alone=rnd.random() < 0.5)
            except QueueError:
                continue
            acked[envs[0].evpid] = body
            live.append(envs)
        elif op < 0.85:
            envs = rnd.choice(live)
            envs[0].retry += 1
            envs[0].last_error = "4.2.0 busy " + "z" * rnd.randint(0, 600)
            with contextlib.suppress(QueueError):
                await q.update(envs[0])
        else:
            envs = live.pop(rnd.randrange(len(live)))
            await q.remove(envs[0])
            del acked[envs[0].evpid]
        if rnd.random() < 0.1:
            await asyncio.sleep(0.06)  # (time for rotations)
    await writer_idle(q)
    cache.power_loss(running, tmp_path / "crashed")
    await q.close()
    monkeypatch.undo()
    q2 = FsQueue(str(tmp_path / "crashed"))
    loaded = {e.evpid for e in q2.load()}
    assert not set(acked) - loaded, f"{len(set(acked) - loaded)} of {len(acked)} lost"
    for evpid, body in acked.items():
        assert q2.read_message(evpid >> 32) == body
    await q2.close()


async def test_a_segment_whose_entry_may_not_be_on_the_disk_is_not_taken_again(
    tmp_path, monkeypatch
):
    """A new segment whose directory sync failed is not reopened by the retry: that would add
    no entry, so the directory's next sync would succeed without writing the one whose write
    failed, and the commits in it would vanish with it in a power loss."""
    import errno

    import homemail.queue_fs as queue_fs

    running = tmp_path / "running"
    journal = str(running / "journal")
    q = FsQueue(str(running), materialize_after=3600)
    q.load()
    await q.commit(b"first\r\n", envelopes())
    cache = PageCache(journal, monkeypatch)
    durable = set(os.listdir(journal))  # the names whose entries are on the disk
    dirty: set[str] = set()
    failures = [1]
    real_open, real_fsync_dir = os.open, queue_fs.fsync_dir

    def open_(path: str, flags: int, *args: int) -> int:
        new = bool(flags & os.O_CREAT) and not os.path.exists(path)
        fd = real_open(path, flags, *args)
        if new and os.path.dirname(str(path)) == journal:
            dirty.add(os.path.basename(str(path)))
        return fd

    def fsync_dir(path: str) -> None:
        if str(path) == journal and dirty:
            if failures[0]:
                failures[0] -= 1
                dirty.clear()  # the block is clean now, its new entry never written
                raise OSError(errno.EIO, "Input/output error")
            durable.update(dirty)
            dirty.clear()
        real_fsync_dir(path)

    monkeypatch.setattr(queue_fs.os, "open", open_)
    monkeypatch.setattr(queue_fs, "fsync_dir", fsync_dir)
    cache.fail_next_sync = True  # the journal goes on in a new segment: its entry fails
    with pytest.raises(QueueError):
        await q.commit(b"refused\r\n", envelopes())
    acked = envelopes()
    await q.commit(b"acked\r\n", acked)  # after the writer's retry
    crashed = tmp_path / "crashed"
    cache.power_loss(running, crashed)
    for name in os.listdir(crashed / "journal"):
        if name.endswith(".log") and name not in durable:
            os.unlink(crashed / "journal" / name)  # its entry never reached the disk
    await q.close()
    monkeypatch.undo()
    q2 = FsQueue(str(crashed))
    assert acked[0].evpid in {e.evpid for e in q2.load()}
    await q2.close()


async def test_message_ids_stay_unique(tmp_path):
    q = FsQueue(str(tmp_path))
    q.load()
    envs = envelopes()
    await q.commit(b"x\r\n", envs)
    assert q.contains(envs[0].msgid)
    clash = envelopes()
    clash[0].evpid = (envs[0].msgid << 32) | 7
    with pytest.raises(QueueError):
        await q.commit(b"other\r\n", clash)
    assert q.read_message(envs[0].msgid) == b"x\r\n"
    assert not q.contains(q.new_msgid())
    await q.close()


# -- queue/index: what queue/ holds, so that a start need not read it ----------------------------


async def materialized_queue(spool: str, count: int) -> tuple[FsQueue, list[list[Envelope]]]:
    """A queue whose first ``count`` messages have been moved into queue/, and one more
    (last in the list) that is in the journal or moved too."""
    q = FsQueue(spool, segment_max_age=0.0, materialize_after=0.0)
    q.load()
    made = []
    for i in range(count):
        envs = envelopes(2)
        await q.commit(b"Subject: %d\r\n\r\nbody\r\n" % i, envs)
        made.append(envs)
    later = envelopes()
    await q.commit(b"later\r\n", later)  # rotates: the first segment is materialized
    queue_dir = os.path.join(spool, "queue")
    deadline = time.time() + 10
    while time.time() < deadline:
        dirs = [p for p in os.listdir(queue_dir) if os.path.isdir(os.path.join(queue_dir, p))]
        moved = sum(len(os.listdir(os.path.join(queue_dir, d))) for d in dirs)
        if moved >= count and len(os.listdir(os.path.join(spool, "journal"))) == 1:
            return q, [*made, later]  # moved, and their segment released
        await asyncio.sleep(0.05)
    raise AssertionError("messages were not moved into queue/")


async def crash(q: FsQueue) -> None:
    """Stop as a killed process does: without the clean stop's rewrite of the index."""
    q._write_index = lambda: None  # type: ignore[method-assign]
    await q.close()


async def crash_without_index(q: FsQueue, spool: str) -> None:
    """A crash that leaves no index (an older release's, or one removed): queue/ is read."""
    await crash(q)
    Path(spool, "queue", "index").unlink(missing_ok=True)


def ends_clean(index: Path) -> bool:
    """Whether the index is as a clean stop leaves it: nothing after its end line."""
    return re.search(rb'\n\{"end":\d+\}\n\Z', index.read_bytes()) is not None


def files_state(spool: str) -> dict[int, dict[str, object]]:
    """What queue/ itself holds: the envelope files, as the walk at start would read them."""
    found = {}
    for path in Path(spool, "queue").glob("*/*/*.json"):
        data = json.loads(path.read_bytes())
        found[int(data["evpid"])] = data
    return found


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The message directories of queue/ a start reads, from now on."""
    read: list[str] = []
    real = FsQueue._read_msgdir

    def recording(self: FsQueue, path: str) -> tuple[list[Envelope], list[str]]:
        read.append(os.path.basename(path))
        return real(self, path)

    monkeypatch.setattr(FsQueue, "_read_msgdir", recording)
    return read


def on_disk(spool: str) -> int:
    """How many message directories queue/ holds."""
    return len(list(Path(spool, "queue").glob("*/*/message")))


async def retried(q: FsQueue, env: Envelope, times: int, pause: float = 0.0) -> None:
    """``times`` retries of ``env`` recorded, one index line each."""
    for n in range(1, times + 1):
        env.retry = n
        await q.update(env)
        if pause:
            await asyncio.sleep(pause)


def restart(spool: str) -> tuple[FsQueue, dict[int, Envelope]]:
    q = FsQueue(spool, materialize_after=3600)
    return q, {e.evpid: e for e in q.load()}


def as_stored(envs: dict[int, Envelope]) -> dict[int, dict[str, object]]:
    return {evpid: {k: v for k, v in e.to_json().items()} for evpid, e in envs.items()}


async def test_a_clean_stop_writes_an_index_the_next_start_trusts(tmp_path, monkeypatch):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 5)
    made[0][0].retry = 4
    made[0][0].last_error = "4.2.2 mailbox full"
    await q.update(made[0][0])
    await q.remove(made[1][1])
    await q.close()
    expected = files_state(spool)
    assert {e.evpid for envs in made for e in envs} - set(expected) == {made[1][1].evpid}
    assert expected[made[0][0].evpid]["retry"] == 4
    index = tmp_path / "queue" / "index"
    assert ends_clean(index)

    def no_walk(self: FsQueue) -> list[object]:
        raise AssertionError("queue/ was walked although a clean stop's index was there")

    monkeypatch.setattr(FsQueue, "_scan_queue_dir", no_walk)
    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert read == []
    assert {k: v for k, v in as_stored(by_id).items() if k in expected} == expected
    assert made[1][1].evpid not in by_id
    assert all(e.recovered for e in by_id.values())
    assert q2.read_message(made[2][0].msgid) == b"Subject: 2\r\n\r\nbody\r\n"
    await crash(q2)  # the index, kept, serves the start after a crash as well
    monkeypatch.undo()
    read = count_reads(monkeypatch)
    q3, again = restart(spool)
    assert read == []
    assert as_stored(again) == as_stored(by_id)
    await q3.close()


async def test_after_a_crash_the_index_spares_the_reads_and_misses_no_change(
    tmp_path, monkeypatch
):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 6)
    made[0][0].retry = 4  # retried
    made[0][0].next_try = time.time() + 900
    await q.update(made[0][0])
    await q.remove(made[1][1])  # one of two recipients done
    await q.remove(made[2][0])  # both done: the message is gone
    await q.remove(made[2][1])
    made[3][1].paused = True
    await q.update(made[3][1])
    late = envelopes()
    await q.commit(b"late\r\n", late)  # in the journal at the crash
    await crash(q)
    index = tmp_path / "queue" / "index"
    lines = index.read_bytes().splitlines(keepends=True)
    # the index line of one message lost (as a power loss may lose it): its directory is read
    lost = format_id(made[4][0].msgid)
    lines = [line for line in lines if f'"msgid":{made[4][0].msgid},'.encode() not in line]
    index.write_bytes(b"".join(lines))
    # a message directory gone behind the index's back is not loaded from the index
    gone = Path(spool, "queue", format_id(made[5][0].msgid)[:2], format_id(made[5][0].msgid))
    for path in gone.iterdir():
        path.unlink()
    gone.rmdir()

    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert read == [lost]
    expected = {e.evpid: e for envs in made for e in envs}
    for done in (made[1][1], *made[2], *made[5]):
        expected.pop(done.evpid)
    expected[late[0].evpid] = late[0]
    assert set(by_id) == set(expected)
    assert as_stored(by_id) == as_stored(expected)
    assert by_id[made[0][0].evpid].retry == 4
    assert by_id[made[3][1].evpid].paused is True
    assert q2.read_message(made[4][0].msgid) == b"Subject: 4\r\n\r\nbody\r\n"
    assert q2.walk_reads == 1
    await q2.close()


async def test_a_message_whose_envelopes_the_index_saw_done_is_not_delivered_again(
    tmp_path, monkeypatch
):
    """A crash after the index recorded the last envelope done, before its files went."""
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    msgdir = Path(spool, "queue", format_id(made[0][0].msgid)[:2], format_id(made[0][0].msgid))
    kept = {p.name: p.read_bytes() for p in msgdir.iterdir()}
    for env in made[0]:
        await q.remove(env)
    await crash(q)
    msgdir.mkdir()
    for name, data in kept.items():
        (msgdir / name).write_bytes(data)
    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert read == []
    assert not {e.evpid for e in made[0]} & set(by_id)
    assert {e.evpid for e in made[1]} <= set(by_id)
    assert not msgdir.exists()
    await q2.close()


async def test_a_line_cut_short_at_the_end_of_the_index_is_ignored(tmp_path, monkeypatch):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 3)
    await q.remove(made[0][0])
    await crash(q)
    with open(tmp_path / "queue" / "index", "ab") as f:
        f.write(b'{"d":%d' % made[1][0].evpid)  # the append the crash cut
    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert read == []
    expected = {e.evpid for envs in made for e in envs} - {made[0][0].evpid}
    assert expected <= set(by_id)
    await q2.close()


async def test_an_index_that_cannot_be_appended_to_is_removed(tmp_path, monkeypatch):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 3)
    index = tmp_path / "queue" / "index"
    assert index.exists()
    os.close(q._index_fd)
    q._index_fd = os.open(os.devnull, os.O_RDONLY)  # a write to it fails
    made[0][0].retry = 3
    await q.update(made[0][0])
    assert not index.exists(), "an index that missed a change would be trusted wrongly"
    await q.remove(made[1][0])  # no index to append to: the change is still made
    await crash(q)
    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert len(read) == on_disk(spool)  # all of queue/ read again
    assert by_id[made[0][0].evpid].retry == 3
    assert made[1][0].evpid not in by_id
    await q2.close()


async def test_the_index_is_rewritten_whole_as_it_grows(tmp_path, monkeypatch):
    from homemail import queue_fs

    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 3)
    index = tmp_path / "queue" / "index"
    target = made[0][0]
    await retried(q, target, 11)
    grown = len(index.read_bytes().splitlines())
    during = made[2][1]
    real_write = queue_fs.write_file_synced

    def changed_meanwhile(path: str, data: bytes) -> None:
        real_write(path, data)
        if path.endswith("index.tmp"):
            during.paused = True  # a change while the rewrite is being written
            q._update_file(during)

    monkeypatch.setattr(queue_fs, "write_file_synced", changed_meanwhile)
    rewrite = threading.Thread(target=q._compact_index)
    rewrite.start()
    await asyncio.to_thread(rewrite.join, 10)
    lines = index.read_bytes().splitlines()
    assert grown > 11
    # the header, one line a message, and the change made meanwhile: the 11 others folded in
    assert len(lines) == 1 + on_disk(spool) + 1, lines
    assert sum(b'"msgid":' in line for line in lines) == on_disk(spool)
    assert b'{"u":%s}' % during.dumps() in lines  # the change made meanwhile, carried over
    await crash(q)
    monkeypatch.undo()
    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert read == []
    assert by_id[target.evpid].retry == 11
    assert by_id[during.evpid].paused is True
    assert {e.evpid for envs in made for e in envs} <= set(by_id)
    await q2.close()


async def test_a_rewrite_is_started_once_the_index_has_grown(tmp_path, monkeypatch):
    from homemail import queue_fs

    monkeypatch.setattr(queue_fs, "COMPACT_MIN", 5)
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    index = tmp_path / "queue" / "index"
    target = made[0][0]
    await retried(q, target, 39)
    deadline = time.time() + 10
    while time.time() < deadline and (q._compacting or len(index.read_bytes().splitlines()) > 20):
        await asyncio.sleep(0.02)
    assert len(index.read_bytes().splitlines()) <= 20  # not 40 lines and more
    await crash(q)
    q2, by_id = restart(spool)
    assert by_id[target.evpid].retry == 39
    await q2.close()


async def test_a_damaged_index_is_ignored_and_queue_dir_is_read(tmp_path):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 3)
    await q.close()
    index = tmp_path / "queue" / "index"
    text = index.read_bytes()
    lines = text.split(b"\n")
    for damaged in (
        text[: len(text) // 2],  # cut short
        b"\n".join(lines[:2] + lines[3:]),  # a message missing: the count disagrees
        text.replace(b'"homemail-queue-index":2', b'"homemail-queue-index":9'),
        b"\n".join([*lines[:2], b"not json", *lines[2:]]),
        b"not json\n",
    ):
        index.write_bytes(damaged)
        q = FsQueue(spool, materialize_after=3600)
        loaded = {e.evpid for e in q.load()}
        assert {e.evpid for envs in made for e in envs} <= loaded, damaged[:60]
        await q.close()  # writes a good index again
        assert ends_clean(index)


async def test_an_index_of_the_previous_release_is_read(tmp_path, monkeypatch):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await q.close()
    index = tmp_path / "queue" / "index"
    lines = index.read_bytes().split(b"\n")
    assert json.loads(lines[0]) == {"homemail-queue-index": 2}
    count = len(lines) - 3  # header, messages, end line, and the empty rest
    head = b'{"homemail-queue-index":1,"count":%d}' % count
    index.write_bytes(b"\n".join([head, *lines[1:]]))
    read = count_reads(monkeypatch)
    q2 = FsQueue(spool, materialize_after=3600)
    loaded = {e.evpid for e in q2.start()}
    assert q2.complete(), "a clean stop's index of the previous release is read as such"
    assert read == []
    assert {e.evpid for envs in made for e in envs} <= loaded
    await q2.close()


async def test_envelopes_changed_after_an_indexed_start_are_indexed_again(tmp_path):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await q.close()
    q = FsQueue(spool, materialize_after=3600)
    by_id = {e.evpid: e for e in q.load()}
    target = by_id[made[0][0].evpid]
    target.paused = True
    await q.update(target)
    await q.remove(by_id[made[1][0].evpid])
    q, loaded = await reopen(q, spool, materialize_after=3600)
    again = {e.evpid: e for e in loaded}
    assert again[made[0][0].evpid].paused is True
    assert made[1][0].evpid not in again
    assert made[1][1].evpid in again
    await q.close()


async def test_a_change_after_the_clean_stop_is_appended_and_seen(tmp_path, monkeypatch):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await q.close()
    made[0][0].retry = 9  # a delivery that outlived the stop settles now
    await q.update(made[0][0])
    index = tmp_path / "queue" / "index"
    assert not ends_clean(index)
    read = count_reads(monkeypatch)
    q2, by_id = restart(spool)
    assert read == []
    assert by_id[made[0][0].evpid].retry == 9
    assert {e.evpid for envs in made for e in envs} <= set(by_id)
    await q2.close()



async def test_the_daemons_stop_keeps_the_spool_locked_for_what_settles_after_it(tmp_path):
    """The daemon closes its queue with release=False: a delivery that outlived the stop
    settles afterwards, so no second daemon may own the spool before this process exits."""
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await q.close(release=False)
    with pytest.raises(SpoolInUse):
        os.close(lock_spool(spool))
    made[0][0].retry = 9  # the late settle, written while the spool is still this process's
    await q.update(made[0][0])
    with pytest.raises(SpoolInUse):
        os.close(lock_spool(spool))
    os.close(q._spool_lock)  # what the process's exit does
    q2, by_id = restart(spool)
    assert by_id[made[0][0].evpid].retry == 9
    await q2.close()

# -- a start after a crash: queue/ is walked while the daemon serves -----------------------------


@pytest.mark.parametrize("index", ["kept", "lost"])
async def test_after_a_crash_start_returns_the_journal_and_scan_the_rest(tmp_path, index):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 4)
    late = envelopes()
    await q.commit(b"late\r\n", late)  # journal-resident at the crash
    await (crash(q) if index == "kept" else crash_without_index(q, spool))
    dirs = on_disk(spool)
    q2 = FsQueue(spool, materialize_after=3600)
    first = q2.start()
    moved = {e.evpid for envs in made for e in envs}
    assert not q2.complete()
    # a message only on disk so far is already known as taken: no new message may get its id
    assert all(q2.contains(envs[0].msgid) for envs in made)
    rest = [e for batch in q2.scan() for e in batch]
    assert q2.complete()
    assert moved | {late[0].evpid} <= {e.evpid for e in first} | {e.evpid for e in rest}
    assert not moved & {e.evpid for e in first} & {e.evpid for e in rest}, "loaded twice"
    assert all(e.recovered for e in rest)
    assert q2.read_message(made[3][0].msgid) == b"Subject: 3\r\n\r\nbody\r\n"
    assert q2.walk_reads == (0 if index == "kept" else dirs)
    if index == "lost":  # the walk's end wrote the index anew: it knows every message now
        text = (tmp_path / "queue" / "index").read_bytes()
        assert all(b'"msgid":%d,' % envs[0].msgid in text for envs in made)
    await crash(q2)


@pytest.mark.parametrize("index", ["kept", "lost"])
async def test_a_stop_in_the_middle_of_the_walk_loses_nothing(tmp_path, index):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 6)
    await (crash(q) if index == "kept" else crash_without_index(q, spool))
    q2 = FsQueue(spool, materialize_after=3600)
    q2.start()
    walk = q2.scan(batch=1)
    next(walk)
    await q2.close()
    assert not ends_clean(tmp_path / "queue" / "index")
    q3 = FsQueue(spool, materialize_after=3600)
    everything = {e.evpid for e in q3.load()}
    assert {e.evpid for envs in made for e in envs} <= everything
    await q3.close()


async def test_a_message_moved_before_a_crash_is_taken_from_queue_dir_once(tmp_path):
    spool = str(tmp_path)
    journal = tmp_path / "journal"
    q = FsQueue(spool, materialize_after=3600)
    q.load()
    made = [envelopes(2), envelopes()]
    for envs in made:
        await q.commit(b"Subject: moved\r\n\r\nbody\r\n", envs)
    await q.close()
    old_journal = {p.name: p.read_bytes() for p in journal.iterdir()}
    assert any(b"HMQ1M" in data for data in old_journal.values())
    # now they are moved into queue/, and one envelope changes there
    q, loaded = await reopen(q, spool, segment_max_age=0.0, materialize_after=0.0)
    await q.commit(b"rotate\r\n", envelopes())
    deadline = time.time() + 10
    while time.time() < deadline and len(list((tmp_path / "queue").glob("*/*/message"))) < 2:
        await asyncio.sleep(0.05)
    assert len(list((tmp_path / "queue").glob("*/*/message"))) >= 2
    target = next(e for e in loaded if e.evpid == made[0][0].evpid)
    target.retry = 7
    await q.update(target)  # written to its file in queue/, not to the journal
    for lost in (False, True):
        await (crash_without_index(q, spool) if lost else crash(q))
        # with the old segments back, as if their release had not happened
        for name, data in old_journal.items():
            (journal / name).write_bytes(data)
        q = FsQueue(spool, materialize_after=3600)
        again = q.start() + [e for batch in q.scan() for e in batch]
        ids = [e.evpid for e in again]
        assert len(ids) == len(set(ids)), "an envelope was loaded twice"
        assert {e.evpid for envs in made for e in envs} <= set(ids)
        assert {e.evpid: e.retry for e in again}[made[0][0].evpid] == 7
    await q.close()


# -- an index that looks clean must be one -------------------------------------------------------


async def clean_start(spool: str, **kw: float) -> tuple[FsQueue, dict[int, Envelope]]:
    q = FsQueue(spool, **kw)  # type: ignore[arg-type]
    by_id = {e.evpid: e for e in q.start()}
    assert q.complete(), "the start did not take the clean stop's index"
    return q, by_id


async def test_a_message_copied_after_a_clean_start_is_found_after_a_crash(tmp_path, monkeypatch):
    """The copy is renamed into queue/, then the crash comes before its index line."""
    spool = str(tmp_path)
    q, _ = await materialized_queue(spool, 2)
    await q.close()
    q, _ = await clean_start(spool, segment_max_age=0.0, materialize_after=0.0)
    real_append = FsQueue._index_append

    def crash_before_the_line(self: FsQueue, item: dict[str, object]) -> None:
        if "envelopes" not in item:
            real_append(self, item)

    monkeypatch.setattr(FsQueue, "_index_append", crash_before_the_line)
    late = envelopes()
    await q.commit(b"late\r\n", late)
    await q.commit(b"rotate\r\n", envelopes())
    late_dir = Path(spool, "queue", format_id(late[0].msgid)[:2], format_id(late[0].msgid))
    deadline = time.time() + 10
    while time.time() < deadline and not (late_dir / "message").exists():
        await asyncio.sleep(0.02)
    assert (late_dir / "message").exists()
    await crash(q)
    assert not ends_clean(tmp_path / "queue" / "index")
    monkeypatch.undo()
    q2, by_id = restart(spool)
    assert late[0].evpid in by_id
    assert q2.read_message(late[0].msgid) == b"late\r\n"
    await q2.close()


async def test_the_end_line_is_cut_off_durably_before_queue_dir_changes(tmp_path, monkeypatch):
    from homemail import queue_fs

    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await q.close()
    index = tmp_path / "queue" / "index"
    clean_size = index.stat().st_size
    q, by_id = await clean_start(spool, materialize_after=3600)
    events: list[str] = []
    real_sync, real_write = queue_fs.os.fdatasync, queue_fs.atomic_write

    def sync(fd: int) -> None:
        if fd == q._index_fd:
            events.append(f"index synced at {os.fstat(fd).st_size}")
        real_sync(fd)

    def write(path: str, data: bytes) -> None:
        events.append(f"write {os.path.basename(path)}")
        real_write(path, data)

    monkeypatch.setattr(queue_fs.os, "fdatasync", sync)
    monkeypatch.setattr(queue_fs, "atomic_write", write)
    target = by_id[made[0][0].evpid]
    target.retry = 5
    await q.update(target)
    end_line = len(b'{"end":%d}\n' % (len(index.read_bytes().split(b"\n")) - 4))
    assert events[:2] == [
        f"index synced at {clean_size - end_line}",
        f"write {format_id(target.evpid)}.json",
    ]
    monkeypatch.undo()
    await crash(q)
    q2, again = restart(spool)
    assert again[target.evpid].retry == 5
    await q2.close()


async def test_a_segment_goes_only_once_the_lines_of_its_copies_are_synced(tmp_path, monkeypatch):
    from homemail import queue_fs

    spool = str(tmp_path)
    q = FsQueue(spool, segment_max_age=0.0, materialize_after=0.0)
    q.load()
    events: list[str] = []
    real_sync, real_unlink = queue_fs.os.fdatasync, queue_fs.os.unlink

    index = tmp_path / "queue" / "index"

    def sync(fd: int) -> None:
        if os.fstat(fd).st_ino == index.stat().st_ino:
            events.append("index synced")
        real_sync(fd)

    def unlink(path: str, *args: object, **kw: object) -> None:
        if str(path).endswith(".log"):
            events.append("segment released")
        real_unlink(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(queue_fs.os, "fdatasync", sync)
    monkeypatch.setattr(queue_fs.os, "unlink", unlink)
    made = envelopes()
    await q.commit(b"x\r\n", made)
    await q.commit(b"rotate\r\n", envelopes())
    deadline = time.time() + 10
    while time.time() < deadline and "segment released" not in events:
        await asyncio.sleep(0.02)
    monkeypatch.undo()
    assert "segment released" in events
    assert events.index("index synced") < events.index("segment released")
    await q.close()


async def test_a_torn_line_is_cut_off_before_anything_is_appended(tmp_path, monkeypatch):
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await crash(q)
    index = tmp_path / "queue" / "index"
    with open(index, "ab") as f:
        f.write(b'{"u":{"evpid":')  # the append a power loss cut
    q2, by_id = restart(spool)
    target = by_id[made[0][0].evpid]
    target.retry = 2
    await q2.update(target)
    await crash(q2)
    read = count_reads(monkeypatch)
    q3, again = restart(spool)
    assert read == [], "the index did not read: every message was read instead"
    assert again[target.evpid].retry == 2
    await q3.close()


async def test_a_start_with_no_room_for_an_index_runs_without_one(tmp_path, monkeypatch):
    from homemail import queue_fs

    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    await crash_without_index(q, spool)

    def no_room(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue_fs, "atomic_write", no_room)
    q2, by_id = restart(spool)
    assert {e.evpid for envs in made for e in envs} <= set(by_id)
    monkeypatch.undo()
    extra = envelopes()
    await q2.commit(b"still taken\r\n", extra)
    await q2.remove(by_id[made[0][0].evpid])
    await crash(q2)
    assert not (tmp_path / "queue" / "index").exists()
    q3, again = restart(spool)
    assert extra[0].evpid in again
    assert made[0][0].evpid not in again
    await q3.close()


async def test_a_rewrite_that_cannot_be_done_is_not_tried_again_at_every_line(
    tmp_path, monkeypatch
):
    from homemail import queue_fs

    monkeypatch.setattr(queue_fs, "COMPACT_MIN", 5)
    spool = str(tmp_path)
    q, made = await materialized_queue(spool, 2)
    tries: list[float] = []

    def counted(items: object, *, end: bool) -> bytes:
        tries.append(time.monotonic())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FsQueue, "_index_lines", staticmethod(counted))
    target = made[0][0]
    await retried(q, target, 60, pause=0.005)  # the rewrite's thread has time to fail
    threshold = max(5, 2 * len(q._files))
    assert 1 <= len(tries) <= 60 // threshold + 1, len(tries)
    monkeypatch.undo()
    await crash(q)
    q2, by_id = restart(spool)
    assert by_id[target.evpid].retry == 60  # the lines kept being appended meanwhile
    await q2.close()
