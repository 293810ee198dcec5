"""homemail alone: messages acknowledged per second, time until all are delivered, CPU per message.

A quick loop for work on homemail itself (no root, no peers): starts the real daemon once (user
mode, a temporary spool and Maildir, durable queue) on a free loopback port and drives it with
the asyncio client (or smtp-source when bench/setup_peers.sh has unpacked it, ``--client
smtp-source``).  For the comparison with OpenSMTPD and Postfix, use compare.py.

    .venv/bin/python bench/smtp_bench.py                 # the default cells: 1 and 20 sessions
    .venv/bin/python bench/smtp_bench.py --sessions 20 --messages 2000 --size 4096 --reuse
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import Homemail, Load, exit_on_sigterm, raise_nofile, run_load, wait_delivered


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, action="append")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--reuse", action="store_true", help="one connection per session")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--client", choices=("python", "smtp-source"), default="python")
    args = parser.parse_args()
    cells = args.sessions or [1, 20]
    raise_nofile()
    exit_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="homemail-bench-")
    server = Homemail(workdir)
    try:
        server.start()
        run_load(args.client, server.port, Load(4, 100, args.size, args.reuse))  # warm-up
        wait_delivered(server, 100, 120)
        print(
            f"{'sessions':>8} {'size':>6} {'msgs':>6} {'accepted/s':>11} "
            f"{'all in Maildir (s)':>19} {'CPU ms/msg':>10}"
        )
        for sessions in cells:
            rates, delivered, cpu = [], [], []
            for _ in range(args.runs):
                base, cpu0 = server.delivered(), server.cpu()
                start = time.perf_counter()
                load = Load(sessions, args.messages, args.size, args.reuse)
                elapsed = run_load(args.client, server.port, load)
                done = wait_delivered(server, base + args.messages, 300)
                rates.append(args.messages / elapsed)
                delivered.append(done - start)
                cpu.append(1000 * (server.cpu() - cpu0) / args.messages)
            print(
                f"{sessions:>8} {args.size:>6} {args.messages:>6} "
                f"{statistics.median(rates):>11.0f} {statistics.median(delivered):>19.2f} "
                f"{statistics.median(cpu):>10.2f}"
                f"   (accepted/s min {min(rates):.0f} max {max(rates):.0f})"
            )
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
