"""Starting on a big queue: queue/index after a clean stop and after a kill, the walk of queue/
when there is no index.

The spool is filled in-process with the real on-disk queue (messages moved into ``queue/`` as
they are after a minute in the journal), with envelopes paused so that nothing is delivered;
then the real daemon starts on it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from homemail.queue import Envelope, new_evpid
from homemail.queue_fs import FsQueue

from .conftest import LOCAL_RCPT, USER, Daemon, accepted_msgid, poll, run_ctl, send, token

MESSAGES = 1500


def fill(spool: Path, count: int) -> set[str]:
    """``count`` paused messages, all moved into queue/; the spool left as a crash leaves it,
    without queue/index (as an older release's crash did)."""

    async def go() -> set[str]:
        q = FsQueue(str(spool), segment_max_age=0.0, materialize_after=0.0)
        q.load()
        now = time.time()
        ids = set()

        async def one(i: int) -> None:
            msgid = q.new_msgid()
            env = Envelope(
                evpid=new_evpid(msgid),
                sender="a@example.org",
                rcpt=LOCAL_RCPT,
                dest=LOCAL_RCPT,
                user=USER,
                action="local",
                ctime=now,
                expire=now + 86400,
                next_try=now,
                paused=True,
            )
            ids.add(f"{env.evpid:016x}")
            await q.commit(b"Subject: queued %d\r\n\r\nbody\r\n" % i, [env])

        for start in range(0, count, 250):
            await asyncio.gather(*(one(i) for i in range(start, min(count, start + 250))))
        deadline = time.time() + 120
        while time.time() < deadline:
            if len(list((spool / "queue").glob("*/*/message"))) >= count:
                break
            await asyncio.sleep(0.2)
        await q.close()
        (spool / "queue" / "index").unlink(missing_ok=True)  # as after a crash
        return ids

    return asyncio.run(go())


def queue_ids(daemon: Daemon) -> set[str]:
    result = run_ctl(daemon, "--json", "show", "queue")
    assert result.returncode == 0, result.stderr
    return {json.loads(line)["id"] for line in result.stdout.splitlines()}


def test_after_a_crash_the_daemon_serves_while_it_reads_queue_dir(daemon: Daemon) -> None:
    ids = fill(daemon.spool, MESSAGES)
    assert len(list(daemon.spool.glob("queue/*/*/message"))) >= MESSAGES
    daemon.start()
    daemon.wait_for_log(r"smtpd ready .*loading=queue/")
    tag = token()  # new mail is taken and delivered while the walk goes on
    message = f"Subject: {tag}\r\n\r\nx\r\n".encode()
    accepted_msgid(send(daemon, "b@example.org", [LOCAL_RCPT], message))
    daemon.wait_for_message(tag.encode())
    # the queue verbs answer for the whole queue: they wait for the walk
    assert queue_ids(daemon) == ids
    [loaded] = daemon.wait_for_log(r"queue loaded envelopes=(\d+) .*read=(\d+)")
    assert int(loaded.group(1)) == MESSAGES
    assert int(loaded.group(2)) == MESSAGES  # no index: every message directory was read
    # a clean stop writes the index; the next start reads it and does not walk queue/
    assert daemon.stop() == 0
    index = (daemon.spool / "queue" / "index").read_bytes()
    assert index.endswith(b'{"end":%d}\n' % MESSAGES)  # as a clean stop leaves it
    mark = daemon.log_mark()
    daemon.start(write=False)
    [ready] = daemon.wait_for_log(r"smtpd ready .*queued=(\d+) .*loading=no", since=mark)
    assert int(ready.group(1)) == MESSAGES
    assert queue_ids(daemon) == ids
    assert "queue loaded" not in daemon.log()[mark:]


def test_after_a_kill_the_index_spares_the_walk_and_keeps_every_change(daemon: Daemon) -> None:
    ids = fill(daemon.spool, MESSAGES)
    daemon.start()
    daemon.wait_for_log(r"queue loaded envelopes=\d+")  # the walk, then the index written
    removed, resumed, *_ = sorted(ids)
    result = run_ctl(daemon, "remove", removed)
    assert result.returncode == 0, result.stderr
    result = run_ctl(daemon, "resume", "envelope", resumed)
    assert result.returncode == 0, result.stderr
    daemon.wait_for_files(daemon.maildir / "new", 1)
    # done once the delivery has reported back: then its line is in the index
    assert poll(lambda: queue_ids(daemon) == ids - {removed, resumed}, 30)
    daemon.kill()
    mark = daemon.log_mark()
    daemon.start(write=False)
    [loaded] = daemon.wait_for_log(r"queue loaded envelopes=(\d+) .*read=(\d+)", since=mark)
    assert int(loaded.group(1)) == MESSAGES - 2
    assert int(loaded.group(2)) == 0  # every message directory was known from the index
    assert queue_ids(daemon) == ids - {removed, resumed}
    assert len(daemon.maildir_files()) == 1  # and the one delivered is not delivered again
    result = run_ctl(daemon, "resume", "envelope", "all")
    assert result.returncode == 0, result.stderr
    daemon.wait_for_files(daemon.maildir / "new", MESSAGES - 1, timeout=120)
    assert daemon.stop() == 0
    assert len(daemon.maildir_files()) == MESSAGES - 1


def test_a_stop_during_the_walk_loses_nothing(daemon: Daemon) -> None:
    ids = fill(daemon.spool, MESSAGES)
    daemon.start()
    daemon.wait_for_log(r"smtpd ready .*loading=queue/")
    daemon.kill()  # at once, in the middle of the walk (or just after it)
    daemon.start(write=False)
    assert queue_ids(daemon) == ids
    assert daemon.stop() == 0
    daemon.start(write=False)
    assert queue_ids(daemon) == ids
    delivered: list[Path] = daemon.maildir_files()
    assert delivered == []  # every envelope is paused: nothing went out


def test_a_start_that_reads_queue_dir_always_says_when_it_is_done(daemon: Daemon) -> None:
    """After a crash with nothing in queue/ yet (all in the journal), the ready line says
    loading=queue/: the line saying it is loaded follows, with nothing read."""
    daemon.start()
    result = run_ctl(daemon, "pause", "mda")
    assert result.returncode == 0, result.stderr
    tag = token()
    message = f"Subject: {tag}\r\n\r\nx\r\n".encode()
    accepted_msgid(send(daemon, "b@example.org", [LOCAL_RCPT], message))
    daemon.kill()
    mark = daemon.log_mark()
    daemon.start(write=False)
    daemon.wait_for_log(r"smtpd ready .*loading=queue/", since=mark)
    [loaded] = daemon.wait_for_log(r"queue loaded envelopes=(\d+) .*read=(\d+)", since=mark)
    assert (loaded.group(1), loaded.group(2)) == ("0", "0")
    daemon.wait_for_message(tag.encode())  # from the journal, delivered (mda runs again)
