"""Comparative benchmark: homemail against OpenSMTPD 6.8 and Postfix 3.7 on the same load.

Each run starts one server afresh in a private temporary directory on its own loopback port,
delivering to a Maildir there, warms it up, then drives it with Postfix's smtp-source (or the
asyncio client, ``--client python``) and measures:

* accepted msg/s: messages / seconds from the client's start to its exit (every 250 received);
* all in Maildir: seconds from the client's start until every message is in Maildir/new;
* server CPU ms/msg: utime+stime of the server's whole process tree (children reaped or not)
  from /proc, after the last delivery minus before the load, divided by the messages.

Servers alternate run by run (the order rotates; after each run its files are emptied and set
aside, to be removed when the benchmark ends, and the disk synced, so that no run starts behind
the previous one's writes or deletions), each cell gets --runs runs per server, and
the table gives median, min and max, and the ratios homemail/OpenSMTPD and homemail/Postfix of
the medians.  OpenSMTPD runs with its listen backlog raised to 128 by a preloaded shim
("opensmtpd"); the stock build ("opensmtpd-stock", backlog 5) is measured beside it in the cells
named by --stock-cells with fewer messages, since 20 sessions collapse it to about 8 msg/s.

Prerequisite (root): ``sh bench/setup_peers.sh``.  Then, as root:

    .venv/bin/python bench/compare.py                   # the full matrix (about 10 minutes)
    .venv/bin/python bench/compare.py --quick           # every cell, fewer messages (~7 min)
    .venv/bin/python bench/compare.py --cells 20x4k:new,20x100k:new --runs 5
    .venv/bin/python bench/compare.py --servers homemail,postfix --client python
    .venv/bin/python bench/compare.py --json out.json --markdown out.md

A cell is SESSIONSxSIZE:MODE, MODE ``new`` (a new connection per message) or ``reuse`` (one
connection per session, smtp-source -d).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import stat
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (
    SERVERS,
    SMTP_SOURCE,
    BenchError,
    DnsStub,
    Load,
    LoadTimeout,
    Server,
    exit_on_sigterm,
    peers_ready,
    raise_nofile,
    run_load,
    wait_delivered,
)

ALL_SESSIONS = (1, 20, 100)
ALL_SIZES = (4096, 102400)
ALL_MODES = ("new", "reuse")
# messages per run in the full matrix, by sessions, for 4 KiB; 100 KiB sends half
MESSAGES = {1: 300, 20: 1000, 100: 2000}
QUICK_MESSAGES = {1: 150, 20: 500, 100: 1000}
DEFAULT_STOCK_CELLS = "20x4k:new,100x4k:new"


@dataclass(frozen=True)
class Cell:
    sessions: int
    size: int
    reuse: bool

    @property
    def key(self) -> str:
        return f"{self.sessions}x{self.size // 1024}k:{'reuse' if self.reuse else 'new'}"

    @property
    def title(self) -> str:
        mode = "1 conn/session" if self.reuse else "new conn/msg"
        return f"{self.sessions:>3} sess {self.size // 1024:>3} KiB {mode}"


def parse_size(text: str) -> int:
    t = text.strip().lower()
    if t.endswith("k"):
        return int(t[:-1]) * 1024
    return int(t)


def parse_cell(text: str) -> Cell:
    try:
        shape, _, mode = text.partition(":")
        sessions, _, size = shape.partition("x")
        if mode not in ("", "new", "reuse"):
            raise ValueError(mode)
        return Cell(int(sessions), parse_size(size or "4k"), mode == "reuse")
    except ValueError:
        raise SystemExit(
            f"bad cell {text!r}: want SESSIONSxSIZE:new|reuse, e.g. 20x4k:new"
        ) from None


@dataclass
class Run:
    server: str
    cell: str
    run: int
    messages: int
    accepted_per_s: float = 0.0
    maildir_s: float = 0.0
    cpu_ms_per_msg: float = 0.0
    load1: float = 0.0  # the machine's 1-minute load average just before the run
    wall_s: float = 0.0  # the whole run: start, warm-up, load, drain, stop, clean-up
    error: str = ""


@dataclass
class Summary:
    server: str
    cell: str
    runs: list[Run] = field(default_factory=list)

    def ok(self) -> list[Run]:
        return [r for r in self.runs if not r.error]

    def stat(self, attr: str) -> tuple[float, float, float] | None:
        vals = [getattr(r, attr) for r in self.ok()]
        if not vals:
            return None
        return statistics.median(vals), min(vals), max(vals)


def set_aside(workdir: str, spent: str) -> None:
    """Empty a finished run's files and move its directory into SPENT, removed at the end.

    Removing a run's thousands of files at once would tax the runs after it: on an ext4
    without a journal (this machine's root), a new inode is never one freed in the last 60 s
    (360 s while its inode table block is dirty, ``recently_deleted``), and every file the next
    server creates scans past all of those.  Measured on homemail's delivery process at 20x4k,
    just after the last run's directory was removed: 1.4-1.7 ms of system CPU a message, against
    0.34-0.43 ms with it set aside (bench/RESULTS.md, fourteenth pass).  Truncating frees the
    space but not the inodes.
    """
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never a link's target
    for root, _dirs, files in os.walk(workdir):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), flags)
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        os.ftruncate(fd, 0)
                finally:
                    os.close(fd)
    try:
        os.rename(workdir, os.path.join(spent, os.path.basename(workdir)))
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)


def one_run(
    name: str, cell: Cell, messages: int, client: str, keep: bool, run: int, spent: str
) -> Run:
    wall0 = time.perf_counter()
    result = Run(name, cell.key, run, messages, load1=os.getloadavg()[0])
    workdir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    server: Server = SERVERS[name](workdir)
    try:
        server.start()
        # warm-up: a few messages over the same path, all delivered, before measuring
        warm = Load(min(cell.sessions, 4), min(20, max(4, cell.sessions)), cell.size, cell.reuse)
        run_load(client, server.port, warm)
        wait_delivered(server, warm.messages, 120)
        base = server.delivered()
        cpu0 = server.cpu()
        start = time.perf_counter()
        elapsed = run_load(
            client, server.port, Load(cell.sessions, messages, cell.size, cell.reuse)
        )
        done = wait_delivered(server, base + messages, 300 + messages / 10)
        cpu = server.cpu() - cpu0
        result.accepted_per_s = messages / elapsed
        result.maildir_s = done - start
        result.cpu_ms_per_msg = 1000 * cpu / messages
    except LoadTimeout as exc:
        result.error = f"timeout: {exc}"[:300]
    except (BenchError, OSError) as exc:
        result.error = str(exc)[:300]
    except Exception as exc:  # a timeout of the client, a protocol error …
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        server.stop()
        if keep or result.error:
            print(f"    (kept {workdir})", file=sys.stderr)
        else:
            set_aside(workdir, spent)
        # the next server starts on a quiet disk: what this run left unwritten (a server that
        # never syncs leaves its Maildir and queue in the page cache) and its emptying are
        # written now, not charged to the next run's first syncs
        os.sync()
    result.wall_s = time.perf_counter() - wall0
    return result


def fmt(stat: tuple[float, float, float] | None, digits: int) -> str:
    if stat is None:
        return "failed"
    med, lo, hi = stat
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def ratio(a: tuple[float, float, float] | None, b: tuple[float, float, float] | None) -> str:
    if a is None or b is None or b[0] == 0:
        return "–"
    return f"{a[0] / b[0]:.2f}×"


def render(cells: list[Cell], summaries: dict[tuple[str, str], Summary], servers: list[str]) -> str:
    """A Markdown table: per cell and server, then the ratios of homemail to each peer."""
    labels = {
        "homemail": "homemail",
        "opensmtpd": "OpenSMTPD (backlog 128)",
        "opensmtpd-stock": "OpenSMTPD stock (backlog 5)",
        "postfix": "Postfix",
    }
    rows = [
        "| cell | server | runs | accepted msg/s median (min–max) | all in Maildir s "
        "median (min–max) | server CPU ms/msg median (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells:
        for name in servers:
            s = summaries.get((name, cell.key))
            if s is None:
                continue
            ok = s.ok()
            n = f"{len(ok)}/{len(s.runs)} × {s.runs[0].messages}"
            label = labels.get(name, name)
            rows.append(
                f"| {cell.key} | {label} | {n} | {fmt(s.stat('accepted_per_s'), 0)}"
                f" | {fmt(s.stat('maildir_s'), 2)} | {fmt(s.stat('cpu_ms_per_msg'), 2)} |"
            )
            for r in s.runs:
                if r.error:
                    rows.append(
                        f"| {cell.key} | {labels.get(name, name)} | run {r.run} failed | "
                        f"{r.error.replace('|', '/')} | | |"
                    )
        hm = summaries.get(("homemail", cell.key))
        if hm is None:
            continue
        for peer in ("opensmtpd", "opensmtpd-stock", "postfix"):
            p = summaries.get((peer, cell.key))
            if p is None:
                continue
            # accepted/s: higher is better; Maildir time and CPU: lower is better
            same = hm.runs[0].messages == p.runs[0].messages
            maildir = ratio(hm.stat("maildir_s"), p.stat("maildir_s")) if same else "–"
            rows.append(
                f"| {cell.key} | **homemail / {labels[peer]}** | | "
                f"**{ratio(hm.stat('accepted_per_s'), p.stat('accepted_per_s'))}** | "
                f"{maildir} | {ratio(hm.stat('cpu_ms_per_msg'), p.stat('cpu_ms_per_msg'))} |"
            )
    rows.append(
        "\nRatios are homemail ÷ peer, of the medians: above 1 is better for msg/s, below 1 is "
        "better for the Maildir time and the CPU.  Stock OpenSMTPD runs fewer messages, so its "
        "Maildir time is not compared."
    )
    return "\n".join(rows)


def check_targets(cells: list[Cell], summaries: dict[tuple[str, str], Summary]) -> list[str]:
    """The issue's targets, each met or missed, for the cells that were measured."""
    out: list[str] = []

    def med(name: str, cell: Cell, attr: str) -> float | None:
        s = summaries.get((name, cell.key))
        st = s.stat(attr) if s else None
        return st[0] if st else None

    for cell in cells:
        hm = med("homemail", cell, "accepted_per_s")
        if hm is None:
            continue
        if cell.size <= 4096 or cell.sessions == 20:
            for peer, label in (("opensmtpd", "OpenSMTPD"), ("postfix", "Postfix")):
                want = 1.0
                if cell.key == "20x4k:new":
                    want = 1.3 if peer == "opensmtpd" else 1.1
                p = med(peer, cell, "accepted_per_s")
                if p:
                    got = hm / p
                    verdict = "met" if got >= want else "MISSED"
                    out.append(
                        f"{cell.key}: accepted/s homemail/{label} {got:.2f}× "
                        f"(target ≥ {want:.1f}×) {verdict}"
                    )
        hm_t, pf_t = med("homemail", cell, "maildir_s"), med("postfix", cell, "maildir_s")
        if hm_t is not None and pf_t is not None:
            verdict = "met" if hm_t <= pf_t else "MISSED"
            out.append(
                f"{cell.key}: all in Maildir {hm_t:.2f} s vs Postfix {pf_t:.2f} s "
                f"(target ≤ Postfix) {verdict}"
            )
        cpu = med("homemail", cell, "cpu_ms_per_msg")
        if cpu is not None and cell.size <= 4096:
            verdict = "met" if cpu <= 2.5 else "MISSED"
            out.append(f"{cell.key}: server CPU {cpu:.2f} ms/msg (target ≤ 2.5) {verdict}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="every cell, fewer messages per run")
    parser.add_argument("--cells", help="comma-separated cells, e.g. 1x4k:new,20x100k:reuse")
    parser.add_argument("--sessions", help="comma-separated session counts (default 1,20,100)")
    parser.add_argument("--sizes", help="comma-separated sizes (default 4k,100k)")
    parser.add_argument("--modes", help="comma-separated: new,reuse (default both)")
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per cell and server (default 3; fewer is a smoke test, and the output says so)",
    )
    parser.add_argument("--messages", type=int, help="messages per run (default by sessions)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the default counts")
    parser.add_argument(
        "--servers",
        default="homemail,opensmtpd,postfix,opensmtpd-stock",
        help="comma-separated, from: " + ", ".join(SERVERS),
    )
    parser.add_argument(
        "--stock-cells",
        default=DEFAULT_STOCK_CELLS,
        help="cells where stock OpenSMTPD (backlog 5) runs ('all' or a list; default %(default)s)",
    )
    parser.add_argument(
        "--stock-messages",
        type=int,
        default=0,
        help="messages per stock run (default 5×sessions, at least 20 and at most 300)",
    )
    parser.add_argument("--client", choices=("smtp-source", "python"), default="smtp-source")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="after a server times out, keep running it (default: skip it at that size)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every run as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    args = parser.parse_args()

    if args.cells:
        cells = [parse_cell(c) for c in args.cells.split(",") if c]
    else:
        sessions = [int(s) for s in args.sessions.split(",")] if args.sessions else ALL_SESSIONS
        sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else ALL_SIZES
        modes = args.modes.split(",") if args.modes else ALL_MODES
        cells = [Cell(n, z, m == "reuse") for m in modes for z in sizes for n in sessions]
    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}; known: {', '.join(SERVERS)}")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    peers = [s for s in servers if s != "homemail"]
    if peers or args.client == "smtp-source":
        why = peers_ready()
        if why and args.client == "smtp-source" and not SMTP_SOURCE.exists():
            raise SystemExit(f"{why} (or use --client python)")
        if why and peers:
            raise SystemExit(why)
    stock_cells = (
        None
        if args.stock_cells == "all"
        else {parse_cell(c).key for c in args.stock_cells.split(",") if c}
    )
    raise_nofile()
    exit_on_sigterm()
    table = QUICK_MESSAGES if args.quick else MESSAGES

    def count(name: str, cell: Cell) -> int:
        if name == "opensmtpd-stock":
            return args.stock_messages or max(20, min(5 * cell.sessions, 300))
        if args.messages:
            return args.messages
        base = table.get(cell.sessions, max(100, 15 * cell.sessions))
        if cell.size > 16384:
            base //= 2
        return max(cell.sessions, int(base * args.scale))

    started = time.time()
    shown_servers = [
        s
        for s in servers
        if s != "opensmtpd-stock" or stock_cells is None or any(c.key in stock_cells for c in cells)
    ]
    loop = ""
    if "homemail" in servers:  # the daemon runs from this interpreter's environment
        uvloop = importlib.util.find_spec("uvloop") is not None
        chosen = "uvloop" if uvloop and os.environ.get("HOMEMAIL_LOOP") != "asyncio" else "asyncio"
        loop = f"; homemail's event loop {chosen}"
    print(
        f"# {len(cells)} cells × {args.runs} runs × {shown_servers}; client {args.client}; "
        f"{platform.node()} {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
        f"load average {os.getloadavg()[0]:.2f}{loop}",
        flush=True,
    )
    if args.runs < 3:
        print("# fewer than 3 runs a cell: a smoke test, not a comparison", flush=True)
    dns = DnsStub() if any(s.startswith("opensmtpd") for s in servers) else None
    summaries: dict[tuple[str, str], Summary] = {}
    hung: set[tuple[str, int]] = set()
    spent = tempfile.mkdtemp(prefix="bench-spent-")
    try:
        if dns is not None:
            dns.start()
        for cell in cells:
            here = [
                s
                for s in servers
                if s != "opensmtpd-stock" or stock_cells is None or cell.key in stock_cells
            ]
            for r in range(args.runs):
                k = r % len(here)
                for name in here[k:] + here[:k]:
                    if (name, cell.size) in hung and not args.keep_going:
                        res = Run(name, cell.key, r + 1, count(name, cell))
                        res.error = f"skipped: it hung earlier at {cell.size // 1024} KiB"
                    else:
                        res = one_run(
                            name, cell, count(name, cell), args.client, args.keep, r + 1, spent
                        )
                        if res.error.startswith("timeout"):
                            hung.add((name, cell.size))
                    summaries.setdefault((name, cell.key), Summary(name, cell.key)).runs.append(res)
                    shown = (
                        f"FAILED {res.error}"
                        if res.error
                        else f"{res.accepted_per_s:7.0f} msg/s  Maildir {res.maildir_s:6.2f} s  "
                        f"CPU {res.cpu_ms_per_msg:5.2f} ms/msg  (load {res.load1:.2f})"
                    )
                    print(
                        f"{cell.title}  run {r + 1}  {name:16} {res.messages:5}  {shown}",
                        flush=True,
                    )
    except KeyboardInterrupt:
        print("interrupted; partial results follow", file=sys.stderr)
    finally:
        if dns is not None:
            dns.stop()
        shutil.rmtree(spent, ignore_errors=True)
    table_md = render(cells, summaries, servers)
    if args.runs < 3:
        table_md += "\n\nFewer than 3 runs a cell: a smoke test, not a comparison."
    verdicts = check_targets(cells, summaries)
    if verdicts:
        table_md += "\n\nTargets:\n\n" + "\n".join(f"- {v}" for v in verdicts)
    took = time.time() - started
    print()
    print(table_md)
    print(f"\n# {took / 60:.1f} minutes")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table_md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "client": args.client,
                    "seconds": took,
                    "runs": [asdict(r) for s in summaries.values() for r in s.runs],
                },
                f,
                indent=1,
            )
    failed = sum(1 for s in summaries.values() for r in s.runs if r.error)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
