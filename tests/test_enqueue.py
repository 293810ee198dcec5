"""Daemon.enqueue on its own: the commit outlives a cancelled caller, deliveries start after the
caller's step (the session writes its 250 in it), and a failed commit schedules nothing."""

from __future__ import annotations

import asyncio
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_queue_fs import envelopes, writer_idle

from homemail.queue import QueueError
from homemail.smtpd import Daemon


class Queue:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.error: Exception | None = None
        self.alone: list[bool] = []

    async def commit(self, message: bytes, envelopes: list[Any], *, alone: bool = False) -> None:
        self.alone.append(alone)
        await self.release.wait()
        if self.error is not None:
            raise self.error


class Scheduler:
    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.scheduled: list[list[Any]] = []
        self.stats: Counter[str] = Counter()

    def schedule(self, envelopes: list[Any]) -> None:
        self.order.append("schedule")
        self.scheduled.append(envelopes)


def daemon(order: list[str]) -> Any:
    fake = types.SimpleNamespace(
        queue=Queue(), scheduler=Scheduler(order), ctx=types.SimpleNamespace(sessions=0)
    )
    fake._committed = types.MethodType(Daemon._committed, fake)
    return fake


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_deliveries_start_after_the_callers_step() -> None:
    order: list[str] = []
    fake = daemon(order)
    envelopes = [object()]

    async def session() -> None:
        await Daemon.enqueue(fake, b"message", envelopes)
        order.append("250")  # what the session does in the same step

    fake.queue.release.set()
    await session()
    await settle()
    assert order == ["250", "schedule"]
    assert fake.scheduler.scheduled == [envelopes]
    assert fake.scheduler.stats["queue.commit"] == 1


async def test_a_commit_synced_on_the_loop_costs_the_caller_no_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one session the journal syncs the commit on the event loop and hands back a
    finished future: the session goes on to write its 250 without yielding to whatever else is
    ready, and the deliveries are scheduled after that step."""
    import homemail.queue_fs as queue_fs

    monkeypatch.setattr(queue_fs, "INLINE_SLOW", 60.0)  # however slow this machine's syncs
    order: list[str] = []
    fake = daemon(order)
    fake.queue = queue_fs.FsQueue(str(tmp_path))
    fake.queue.load()
    fake.ctx.sessions = 1
    await fake.queue.commit(b"first\r\n", envelopes())  # (the writer makes the first room)
    await writer_idle(fake.queue)
    order.clear()
    mine = envelopes()
    step = Daemon.enqueue(fake, b"message\r\n", mine).__await__()
    with pytest.raises(StopIteration):  # finished within its first step
        next(step)
    assert order == []  # scheduled for after that step, not in it
    await settle()
    assert order == ["schedule"] and fake.scheduler.scheduled[-1] == mine
    await fake.queue.close()


async def test_a_caller_cancelled_during_the_commit_still_has_its_envelopes_scheduled() -> None:
    """...and the message logged: the session that would have logged it after its 250 is gone."""
    fake = daemon([])
    envelopes = [object()]
    landed: list[str] = []
    caller = asyncio.ensure_future(
        Daemon.enqueue(fake, b"message", envelopes, lambda: landed.append("logged"))
    )
    await settle()
    caller.cancel()  # the client vanished with the commit in flight
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert fake.scheduler.scheduled == [] and landed == []
    fake.queue.release.set()  # the commit lands afterwards
    await settle()
    assert fake.scheduler.scheduled == [envelopes]
    assert landed == ["logged"]


async def test_a_caller_that_stays_logs_its_own_message() -> None:
    fake = daemon([])
    fake.queue.release.set()
    landed: list[str] = []
    await Daemon.enqueue(fake, b"message", [object()], lambda: landed.append("logged"))
    await settle()
    assert landed == []  # the session logs it once its 250 is written


async def test_a_failed_commit_schedules_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    fake = daemon([])
    fake.queue.error = QueueError("no space left on device")
    fake.queue.release.set()
    with pytest.raises(QueueError):  # the session answers 451
        await Daemon.enqueue(fake, b"message", [object()])
    await settle()
    assert fake.scheduler.scheduled == []

    fake = daemon([])
    fake.queue.error = QueueError("no space left on device")
    landed: list[str] = []
    caller = asyncio.ensure_future(
        Daemon.enqueue(fake, b"message", [object()], lambda: landed.append("logged"))
    )
    await settle()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    fake.queue.release.set()
    await settle()
    assert fake.scheduler.scheduled == [] and landed == []  # not logged as accepted
    assert "queue commit-failed error=" in capfd.readouterr().err  # nobody else could say it


async def test_a_commit_is_alone_while_one_session_is_connected() -> None:
    """With one SMTP session connected (the committing one) the queue may sync the commit on
    the event loop; with more, the writer thread's group commit is for them to share."""
    fake = daemon([])
    fake.queue.release.set()
    for sessions in (1, 2, 20, 1, 0):
        fake.ctx.sessions = sessions
        await Daemon.enqueue(fake, b"message", [object()])
    assert fake.queue.alone == [True, False, False, True, True]
