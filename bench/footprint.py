"""homemail's footprint: memory at rest and under load, and a large queue at startup.

Measures, on the real daemon in user mode (a temporary spool, Maildir and control socket):

Memory is the daemon's process tree (the SMTP process and, in user mode, the delivery process it
forks): its PSS summed (/proc/PID/smaps_rollup, each shared page divided among the processes
that map it, so the tree's cost to the machine, and what the targets are checked against) and,
beside it, its RSS summed (which counts the pages the fork shares once per process).

* memory idle: 2 s after the daemon is ready, and again 8 s after the 100-session load has
  been delivered (an idle daemon trims its heap after 2-4 quiet seconds);
* memory under 100 sessions: the highest sampled (every 20 ms) while smtp-source (or the
  asyncio client) keeps 100 sessions busy, and the SMTP process's high-water mark (VmHWM);
* memory with 1,000 idle connections: 1,000 clients connected, banner read and EHLO answered,
  then left idle; every connection is checked to be still open (NOOP → 250) afterwards;
* startup with N queued envelopes (default 100,000): the spool is filled over SMTP with mda
  paused (``homemailctl pause mda``), the daemon waits until they have moved from the journal
  into ``queue/`` (as a queue does after a minute or two; a line every 30 s says how many
  have), it is stopped and started again, ``pause mda`` is sent as soon as the port accepts
  (a few envelopes may be delivered before it takes effect: the table counts them), and the
  seconds until the port accepts and until the log says ``smtpd ready`` are
  taken; then once more after a kill -9, which leaves ``queue/index`` without a clean stop's
  end (see homemail/queue_fs.py), until ``smtpd ready`` and until ``queue/`` is loaded (its
  bucket directories listed against the index; ``--cold`` drops the page cache first, as root);
* ``homemailctl show queue`` with those envelopes: seconds until the first line is printed and
  until the listing is complete, and the number of lines.

    .venv/bin/python bench/footprint.py                  # everything, 100,000 envelopes
    .venv/bin/python bench/footprint.py --quick          # 3 restarts become 1, same sizes
    .venv/bin/python bench/footprint.py --skip-queue     # memory only
    .venv/bin/python bench/footprint.py --envelopes 100000 --rcpts 10   # 10,000 messages

Runs as any user (RLIMIT_NOFILE is raised to the hard limit for the client and the daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (
    RECIPIENT,
    SMTP_SOURCE,
    BenchError,
    Homemail,
    Load,
    exit_on_sigterm,
    python_load_async,
    raise_nofile,
    run_load,
    tree_pss,
    tree_rss,
    wait_delivered,
    wait_port,
)

MIB = 1024 * 1024
TARGETS = {
    "idle": 40 * MIB,
    "sessions": 64 * MIB,
    "idle_conns": 100 * MIB,
    "startup": 10.0,
    "first_line": 1.0,
    "show_total": 5.0,
}


def ctl(server: Homemail, *words: str, timeout: float = 600) -> str:
    exe = Path(sys.executable).parent / "homemailctl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "homemail.ctl"]
    proc = subprocess.run(
        [*cmd, "--socket", server.socket, *words],
        capture_output=True,
        timeout=timeout,
        env=server.env(),
    )
    if proc.returncode != 0:
        raise BenchError(f"homemailctl {' '.join(words)}: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def ctl_retry(server: Homemail, *words: str) -> str:
    """ctl(), tried again (and said so) if the first attempt fails."""
    try:
        return ctl(server, *words)
    except BenchError as exc:
        print(f"  warning: {str(exc).strip()}; trying again in 1 s", flush=True)
        time.sleep(1)
        return ctl(server, *words)


def hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


Mem = tuple[int, int]  # (PSS summed over the process tree, RSS summed over it)


def memory(pid: int) -> Mem:
    return tree_pss(pid), tree_rss(pid)


def show(m: Mem) -> str:
    return f"{mib(m[0])} (RSS sum {mib(m[1])})"


def sample_peak(pid: int, stop: threading.Event, out: list[Mem]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            out.append(memory(pid))
        stop.wait(0.02)


def rss_under_load(server: Homemail, client: str, sessions: int, messages: int) -> tuple[Mem, int]:
    stop = threading.Event()
    samples: list[Mem] = []
    t = threading.Thread(target=sample_peak, args=(server.pid, stop, samples), daemon=True)
    base = server.delivered()
    t.start()
    try:
        run_load(client, server.port, Load(sessions, messages, 4096, False))
        wait_delivered(server, base + messages, 300)
    finally:
        stop.set()
        t.join()
    peak = (max((m[0] for m in samples), default=0), max((m[1] for m in samples), default=0))
    return peak, hwm(server.pid)


async def hold_idle(port: int, count: int, settle: float, pid: int) -> tuple[Mem, int]:
    """Open count connections (banner + EHLO each), wait, measure, check all still answer."""
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                raise BenchError("connection closed by the server")
            if line[3:4] != b"-":
                return line

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        line = await reply(reader)
        if not line.startswith(b"220"):
            raise BenchError(f"banner: {line!r}")
        writer.write(b"EHLO idle.bench.localdomain\r\n")
        if not (await reply(reader)).startswith(b"250"):
            raise BenchError("EHLO refused")
        conns.append((reader, writer))

    try:
        for i in range(0, count, 50):  # batches, so a listen backlog of 100 is not the test
            await asyncio.gather(*(one() for _ in range(min(50, count - i))))
        await asyncio.sleep(settle)
        rss = memory(pid)
        alive = 0
        for _, writer in conns:
            writer.write(b"NOOP\r\n")
        for reader, _ in conns:
            with contextlib.suppress(Exception):
                if (await reply(reader)).startswith(b"250"):
                    alive += 1
        return rss, alive
    finally:
        for _, writer in conns:
            writer.close()


def fill_queue(server: Homemail, envelopes: int, rcpts: int, client: str) -> float:
    """Queue envelopes with mda paused; return the seconds it took."""
    ctl_retry(server, "pause", "mda")
    messages = envelopes // rcpts
    start = time.perf_counter()
    if rcpts == 1 and client == "smtp-source":
        run_load("smtp-source", server.port, Load(20, messages, 1024, True))
    else:
        user, _, domain = RECIPIENT.partition("@")
        names = [f"{user}+{i}@{domain}" for i in range(rcpts)]
        _, sent = asyncio.run(
            python_load_async(server.port, Load(20, messages, 1024, True), rcpts=names)
        )
        if sent != messages:
            raise BenchError(f"sent {sent} of {messages} messages")
    return time.perf_counter() - start


def restart(server: Homemail, n: int) -> tuple[float, float, int, float]:
    """Start the daemon on its full spool, then pause mda at once so the queue stays full.

    Returns the seconds from the start until the port accepts, until ``smtpd ready`` (the time
    stamp of that log line), the queued count that line gives, and the seconds until ``pause
    mda`` was acknowledged (deliveries may run until then).
    """
    server.log_path = os.path.join(server.workdir, f"restart-{n}.log")
    wall0 = time.time()
    t0 = time.perf_counter()
    server.proc = subprocess.Popen(
        server.command(),
        env=server.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(server.log_path, "wb"),  # the child owns it
        cwd=server.workdir,
        start_new_session=True,
    )
    port_s = wait_port(server.port, 600, server.proc)
    ctl_retry(server, "pause", "mda")
    paused_s = time.perf_counter() - t0
    deadline = t0 + 600
    while time.perf_counter() < deadline:
        with open(server.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        m = re.search(r"^(\S+) - smtpd ready .*?queued=(\d+)", text, re.MULTILINE)
        if m:
            try:  # the log's local-time stamp, to the millisecond
                ready_s = datetime.fromisoformat(m.group(1)).timestamp() - wall0
            except ValueError:
                ready_s = time.perf_counter() - t0
            return port_s, ready_s, int(m.group(2)), paused_s
        if server.proc.poll() is not None:
            raise BenchError(f"daemon exited: {text[-500:]}")
        time.sleep(0.005)
    raise BenchError("no 'smtpd ready' in the log")


def settle_queue(server: Homemail, messages: int, timeout: float = 900) -> float:
    """Wait until the messages have left the journal for queue/; the seconds it took."""
    t0 = time.perf_counter()
    queue_dir = Path(server.spool) / "queue"
    said = t0
    while time.perf_counter() - t0 < timeout:
        moved = sum(1 for _ in queue_dir.glob("*/*/message"))
        if moved >= messages:
            return time.perf_counter() - t0
        if time.perf_counter() - said >= 30:  # the move takes minutes: not a hang
            said = time.perf_counter()
            print(f"  {moved} of {messages} messages in queue/ after {said - t0:.0f} s", flush=True)
        time.sleep(2)
    raise BenchError(f"only {moved} of {messages} messages reached queue/ in {timeout:.0f} s")


def logged_after(server: Homemail, patterns: list[str], wall0: float) -> tuple[float, int]:
    """Seconds from wall0 to the time stamp of the first log line matching one of the patterns
    (groups: the time stamp, a number), and that number."""
    deadline = time.time() + 900
    while time.time() < deadline:
        with open(server.log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        for pattern in patterns:
            m = re.search(pattern, text, re.MULTILINE)
            if m:
                return datetime.fromisoformat(m.group(1)).timestamp() - wall0, int(m.group(2))
        if server.proc is not None and server.proc.poll() is not None:
            raise BenchError(f"daemon exited: {text[-500:]}")
        time.sleep(0.05)
    raise BenchError(f"none of {patterns} in the log")


def show_queue(server: Homemail) -> tuple[float, float, int]:
    exe = Path(sys.executable).parent / "homemailctl"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "homemail.ctl"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--socket", server.socket, "show", "queue"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=server.env(),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.perf_counter() - t0
    lines = 1 if first else 0
    for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):  # type: ignore[union-attr]
        lines += chunk.count(b"\n")
    proc.wait()
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(
            f"show queue: {proc.stderr.read().decode(errors='replace') if proc.stderr else ''}"
        )
    return t_first, total, lines


def stop_daemon(server: Homemail) -> float:
    assert server.proc is not None
    t0 = time.perf_counter()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(300)
    return time.perf_counter() - t0


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one restart instead of three")
    parser.add_argument("--client", choices=("smtp-source", "python"), default=None)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000, help="messages of the session load")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections to hold")
    parser.add_argument("--envelopes", type=int, default=100_000)
    parser.add_argument("--rcpts", type=int, default=1, help="recipients per queued message")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--skip-queue", action="store_true", help="skip the 100,000-envelope part")
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before the start after kill -9"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE")
    args = parser.parse_args()
    client = args.client or ("smtp-source" if SMTP_SOURCE.exists() else "python")
    restarts = 1 if args.quick else args.restarts
    exit_on_sigterm()
    nofile = raise_nofile(max(65536, 2 * args.idle + 1024))
    if nofile < args.idle + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile}: too low for {args.idle} connections")

    results: dict[str, float | int | str] = {
        "client": client,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows: list[tuple[str, str, str]] = []
    workdir = tempfile.mkdtemp(prefix="bench-footprint-")
    server = Homemail(workdir)
    try:
        server.start()
        time.sleep(2)
        idle0 = memory(server.pid)
        results["pss_idle_start"], results["rss_idle_start"] = idle0
        print(f"memory idle after start: PSS {show(idle0)}", flush=True)

        peak, high = rss_under_load(server, client, args.sessions, args.messages)
        results["pss_sessions_peak"], results["rss_sessions_peak"] = peak
        results["rss_sessions_hwm"] = high
        print(
            f"memory under {args.sessions} sessions: peak PSS {show(peak)}; the SMTP "
            f"process's VmHWM {mib(high)}",
            flush=True,
        )

        time.sleep(8)  # idle: the daemon gives freed heap back after a few quiet seconds
        idle1 = memory(server.pid)
        results["pss_idle_after_load"], results["rss_idle_after_load"] = idle1
        print(f"memory idle after that load: PSS {show(idle1)}", flush=True)

        rss_conns, alive = asyncio.run(hold_idle(server.port, args.idle, 3.0, server.pid))
        results["pss_idle_conns"], results["rss_idle_conns"] = rss_conns
        results["idle_conns_alive"] = alive
        print(
            f"memory with {args.idle} idle connections: PSS {show(rss_conns)} ({alive} still "
            "answering)",
            flush=True,
        )
        time.sleep(1)

        rows += [
            ("PSS idle, after start", show(idle0), f"≤ {mib(TARGETS['idle'])}"),
            (
                f"PSS under {args.sessions} sessions, {args.messages} msgs (peak sampled)",
                f"{show(peak)}; SMTP process VmHWM {mib(high)}",
                f"≤ {mib(TARGETS['sessions'])}",
            ),
            ("PSS idle, after that load", show(idle1), f"≤ {mib(TARGETS['idle'])}"),
            (
                f"PSS holding {args.idle} idle connections ({alive} answered NOOP after)",
                show(rss_conns),
                f"≤ {mib(TARGETS['idle_conns'])}",
            ),
        ]

        if not args.skip_queue:
            before_fill = server.delivered()
            fill = fill_queue(server, args.envelopes, args.rcpts, client)
            results["delivered_during_fill"] = server.delivered() - before_fill
            msgs = args.envelopes // args.rcpts
            print(
                f"queued {args.envelopes} envelopes ({msgs} messages × {args.rcpts}) in "
                f"{fill:.1f} s ({msgs / fill:.0f} msg/s, mda paused; "
                f"{results['delivered_during_fill']} delivered meanwhile)",
                flush=True,
            )
            results["fill_s"] = fill
            results["pss_queued"], results["rss_queued"] = memory(server.pid)
            settled = settle_queue(server, msgs)
            results["settle_s"] = settled
            print(
                f"moved from the journal into queue/ (as a queue older than a minute or two "
                f"is) after {settled:.0f} s more",
                flush=True,
            )
            stop_s = stop_daemon(server)
            results["stop_full_s"] = stop_s
            print(f"stop with the queue full: {stop_s:.1f} s", flush=True)
            starts, readies, firsts, totals = [], [], [], []
            queued = lines = 0
            queueds: list[int] = []
            show_error = ""
            leaks: list[int] = []
            for n in range(restarts):
                before = server.delivered()
                port_s, ready_s, queued, paused_s = restart(server, n)
                queueds.append(queued)
                starts.append(port_s)
                readies.append(ready_s)
                time.sleep(0.5)
                leaked = server.delivered() - before
                leaks.append(leaked)
                try:
                    first, total, lines = show_queue(server)
                    firsts.append(first)
                    totals.append(total)
                    shown = f"first line {first:.2f} s, all {lines} lines {total:.2f} s"
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    show_error = str(exc).strip()[:200]
                    shown = f"FAILED: {show_error}"
                rss_q = memory(server.pid)
                results["pss_after_restart"], results["rss_after_restart"] = rss_q
                print(
                    f"restart {n + 1}: port {port_s:.2f} s, 'smtpd ready' {ready_s:.2f} s "
                    f"(queued={queued}); mda paused at {paused_s:.2f} s, after {leaked} "
                    f"deliveries; show queue: {shown}; PSS {show(rss_q)}",
                    flush=True,
                )
                stop_daemon(server)
            # a crash leaves the index without its end: the start lists queue/ against it
            restart(server, restarts)
            server.proc.kill()  # type: ignore[union-attr]
            server.proc.wait()  # type: ignore[union-attr]
            if args.cold:  # the disk, not the page cache, answers the start's reads
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            crash_wall0 = time.time()
            crash_port, crash_ready, crash_queued, _ = restart(server, restarts + 1)
            crash_loaded, crash_total = logged_after(
                server,
                [  # the walk's end; or nothing to walk
                    r"^(\S+) - queue loaded envelopes=\d+ queued=(\d+) read=\d+",
                    r"^(\S+) - smtpd ready .*queued=(\d+) loading=no",
                ],
                crash_wall0,
            )
            results.update(
                crash_port_s=crash_port, crash_ready_s=crash_ready, crash_loaded_s=crash_loaded
            )
            print(
                f"restart after kill -9: port {crash_port:.2f} s, 'smtpd ready' "
                f"{crash_ready:.2f} s (queued={crash_queued} from the journal), all "
                f"{crash_total} loaded after {crash_loaded:.2f} s",
                flush=True,
            )
            stop_daemon(server)
            med = statistics.median
            results.update(startup_port_s=med(starts), startup_ready_s=med(readies), queued=queued)
            if firsts:
                results.update(show_first_s=med(firsts), show_total_s=med(totals), show_lines=lines)
            if show_error:
                results["show_error"] = show_error
            results["delivered_before_pause"] = max(leaks)

            def spread(v: list[float]) -> str:
                if not v:
                    return f"failed: {show_error}"
                return f"{med(v):.2f} s" + (f" ({min(v):.2f}–{max(v):.2f})" if len(v) > 1 else "")

            rows += [
                (f"fill the queue: {args.envelopes} envelopes, mda paused", f"{fill:.0f} s", ""),
                (
                    "PSS once they are queued",
                    show((int(results["pss_queued"]), int(results["rss_queued"]))),
                    "",
                ),
                ("SIGTERM to exit, queue full", f"{stop_s:.1f} s", ""),
                (
                    f"startup with {'/'.join(map(str, queueds))} queued: port accepts",
                    spread(starts),
                    f"< {TARGETS['startup']:.0f} s",
                ),
                (
                    f"startup with {'/'.join(map(str, queueds))} queued: log says smtpd ready",
                    spread(readies),
                    f"< {TARGETS['startup']:.0f} s",
                ),
                (
                    "startup after kill -9: smtpd ready, serving SMTP and control "
                    f"with {crash_queued} envelopes from the journal",
                    f"{crash_ready:.2f} s",
                    f"< {TARGETS['startup']:.0f} s",
                ),
                (
                    f"startup after kill -9{' (cold cache)' if args.cold else ''}: queue/ "
                    f"loaded, {crash_total} queued",
                    f"{crash_loaded:.2f} s",
                    f"< {TARGETS['startup']:.0f} s",
                ),
                (
                    "homemailctl show queue: first line",
                    spread(firsts),
                    f"< {TARGETS['first_line']:.0f} s",
                ),
                (
                    f"homemailctl show queue: all {lines} lines",
                    spread(totals),
                    f"< {TARGETS['show_total']:.0f} s",
                ),
                (
                    "delivered after a restart before `pause mda` took effect (at most)",
                    str(max(leaks)),
                    "",
                ),
                (
                    "PSS with them loaded",
                    show((int(results["pss_after_restart"]), int(results["rss_after_restart"]))),
                    "",
                ),
            ]
    finally:
        server.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = ["| measure | homemail | target |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print()
    print("\n".join(table))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(table) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
