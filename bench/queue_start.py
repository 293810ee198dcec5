"""The start of the on-disk queue after a crash, with and without ``queue/index``, in seconds.

Builds a spool of N messages already moved into ``queue/`` (one envelope each, 1 KiB), written
directly in the queue's layout (no syncs: it is the reading that is measured), then times
``FsQueue.start()`` plus the walk (``scan()``) in a fresh process that exits without a clean
stop, as a kill -9 leaves the spool:

* ``without index``: no ``queue/index``, so every message directory is read (as every start
  after a crash did before the index was kept up to date);
* ``with index``: the index that walk wrote once it was done (a daemon's, without a clean
  stop's end line), so the start lists the bucket directories and reads nothing else.

With ``--cold`` (as root) the page cache is dropped before each start, so the disk answers.

    .venv/bin/python bench/queue_start.py                     # 100,000 messages, warm cache
    sudo .venv/bin/python bench/queue_start.py --cold --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from homemail.queue import Envelope, format_id, new_evpid, new_msgid  # noqa: E402

START = """
import os, sys, time
sys.path.insert(0, {root!r})
from homemail.queue_fs import FsQueue
t0 = time.monotonic()
q = FsQueue({spool!r})
n = len(q.start())
for batch in q.scan():
    n += len(batch)
print(time.monotonic() - t0, n, q.walk_reads, flush=True)
os._exit(0)  # no clean stop: the spool stays as a crash leaves it
"""


def build(spool: str, count: int) -> None:
    queue_dir = os.path.join(spool, "queue")
    for sub in ("journal", "incoming", "queue"):
        os.makedirs(os.path.join(spool, sub), exist_ok=True)
    body = b"Subject: queued\r\n\r\n" + b"x" * 1000 + b"\r\n"
    now = time.time()
    made = 0
    while made < count:
        msgid = new_msgid()
        name = format_id(msgid)
        msgdir = os.path.join(queue_dir, name[:2], name)
        if os.path.exists(msgdir):
            continue
        os.makedirs(msgdir)
        env = Envelope(
            evpid=new_evpid(msgid),
            sender="a@example.org",
            rcpt="u@localhost",
            dest="u@localhost",
            user="u",
            action="local",
            ctime=now,
            expire=now + 86400,
            src="127.0.0.1",
            helo="client.example.org",
            paused=True,
        )
        with open(os.path.join(msgdir, "message"), "wb") as f:
            f.write(body)
        with open(os.path.join(msgdir, f"{format_id(env.evpid)}.json"), "wb") as f:
            f.write(env.dumps())
        made += 1


def start(spool: str, cold: bool) -> tuple[float, int, int]:
    if cold:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    out = subprocess.run(
        [sys.executable, "-c", START.format(root=ROOT, spool=spool)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each start")
    args = parser.parse_args()
    if args.cold and os.geteuid() != 0:
        parser.error("--cold needs root (it writes /proc/sys/vm/drop_caches)")
    base = tempfile.mkdtemp(prefix="hm-queue-start-")
    spool = os.path.join(base, "spool")
    try:
        t0 = time.monotonic()
        build(spool, args.messages)
        print(f"built {args.messages} messages in {time.monotonic() - t0:.1f} s", flush=True)
        index = os.path.join(spool, "queue", "index")
        results: dict[str, list[float]] = {"without index": [], "with index": []}
        for run in range(args.runs):
            for label in results:
                if label == "without index" and os.path.exists(index):
                    os.unlink(index)  # the walk writes it anew, for the start with it
                seconds, loaded, reads = start(spool, args.cold)
                results[label].append(seconds)
                print(
                    f"run {run + 1}, {label}: {seconds:.2f} s, {loaded} loaded, "
                    f"{reads} message directories read",
                    flush=True,
                )
        cache = "cold" if args.cold else "warm"
        what = f"start after a crash, {args.messages} messages, {cache} cache"
        print(f"\n| {what} | median | min–max |")
        print("|---|---|---|")
        for label, values in results.items():
            print(
                f"| {label} | {statistics.median(values):.2f} s | "
                f"{min(values):.2f}–{max(values):.2f} s |"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
