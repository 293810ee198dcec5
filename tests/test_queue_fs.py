"""The on-disk queue: commit, recovery, torn writes, segment release and materialization."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from homemail.queue import Envelope, QueueError, new_evpid, new_msgid
from homemail.queue_fs import FsQueue
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


async def test_failed_sync_does_not_hide_later_commits(tmp_path, monkeypatch):
    """A failed fdatasync (disk full, EIO) fails that commit only: what follows is readable
    and survives a restart."""
    import homemail.queue_fs as queue_fs

    q = FsQueue(str(tmp_path))
    q.load()
    real = os.fdatasync
    calls = {"n": 0}

    def failing_once(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(queue_fs.os, "fdatasync", failing_once)
    lost = envelopes()
    with pytest.raises(QueueError):
        await q.commit(b"first\r\n", lost)
    kept = envelopes()
    await q.commit(b"second\r\n", kept)
    assert q.read_message(kept[0].msgid) == b"second\r\n"
    monkeypatch.setattr(queue_fs.os, "fdatasync", real)
    q, loaded = await reopen(q, str(tmp_path))
    assert [e.evpid for e in loaded] == [kept[0].evpid]
    assert q.read_message(kept[0].msgid) == b"second\r\n"
    await q.close()


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
