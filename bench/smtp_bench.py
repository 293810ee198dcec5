"""Throughput benchmark: messages acknowledged per second and time until all are delivered.

Starts the real daemon (user mode, a temporary spool and Maildir, durable queue) on a free
loopback port, then drives it with a small asyncio SMTP client: N concurrent sessions, each
sending messages of SIZE bytes, a new connection per message (or one per session with
``--reuse``).  Reports acknowledged msg/s (first connect to last 250), the time until every
message is in the Maildir, and the daemon's CPU per message.

    .venv/bin/python bench/smtp_bench.py                 # the default cells: 1 and 20 sessions
    .venv/bin/python bench/smtp_bench.py --sessions 20 --messages 2000 --size 4096
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    sessions: int
    size: int
    messages: int
    reuse: bool
    accepted_per_s: float
    delivered_s: float
    cpu_ms_per_msg: float


class Server:
    def __init__(self, workdir: str, extra: list[str]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.maildir = os.path.join(workdir, "Maildir")
        cfg = os.path.join(workdir, "smtpd.conf")
        user = __import__("pwd").getpwuid(os.getuid()).pw_name
        with open(cfg, "w") as f:
            f.write(
                f'table aliases {{ bench = "{user}" }}\n'
                f"listen on 127.0.0.1 port {self.port}\n"
                f'action "local" maildir "{self.maildir}" alias <aliases>\n'
                'match from local for local action "local"\n'
                "smtp limit max-mails 100000\n"
            )
        env = dict(os.environ, HOME=workdir)
        self.log = open(os.path.join(workdir, "daemon.log"), "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homemail.smtpd",
                "run",
                "-f",
                cfg,
                "--spool",
                os.path.join(workdir, "spool"),
                "--socket",
                os.path.join(workdir, "control.sock"),
                "--user-mode",
                *extra,
            ],
            env=env,
            stderr=self.log,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("daemon did not start; see " + self.log.name)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def delivered(self) -> int:
        try:
            return len(os.listdir(os.path.join(self.maildir, "new")))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def smtp_send(port: int, count: int, body: bytes, reuse: bool) -> int:
    ok = 0
    reader = writer = None

    async def expect(code: bytes) -> bytes:
        assert reader is not None
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                if not line.startswith(code):
                    raise RuntimeError(line.decode(errors="replace"))
                return line

    for i in range(count):
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await expect(b"220")
            writer.write(b"EHLO bench.local\r\n")
            await expect(b"250")
        assert writer is not None
        writer.write(b"MAIL FROM:<sender@bench.local>\r\nRCPT TO:<bench@localhost>\r\nDATA\r\n")
        await expect(b"250")
        await expect(b"250")
        await expect(b"354")
        writer.write(body + b".\r\n")
        await expect(b"250")
        ok += 1
        if not reuse or i == count - 1:
            writer.write(b"QUIT\r\n")
            await expect(b"221")
            writer.close()
            await writer.wait_closed()
            writer = None
    return ok


def make_body(size: int) -> bytes:
    head = b"From: <sender@bench.local>\r\nTo: <bench@localhost>\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


async def run_cell(server: Server, sessions: int, messages: int, size: int, reuse: bool) -> Result:
    body = make_body(size)
    before = server.delivered()
    cpu0 = server.cpu_seconds()
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    start = time.perf_counter()
    done = await asyncio.gather(*(smtp_send(server.port, n, body, reuse) for n in per))
    accepted = time.perf_counter() - start
    total = sum(done)
    deadline = time.time() + 300
    while server.delivered() - before < total and time.time() < deadline:
        await asyncio.sleep(0.01)
    delivered = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu0
    return Result(
        sessions, size, total, reuse, total / accepted, delivered, 1000 * cpu / max(1, total)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, action="append")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--reuse", action="store_true", help="one connection per session")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cells = args.sessions or [1, 20]
    workdir = tempfile.mkdtemp(prefix="homemail-bench-")
    try:
        server = Server(workdir, [])
        try:
            asyncio.run(run_cell(server, 4, 100, args.size, args.reuse))  # warm-up
            print(
                f"{'sessions':>8} {'size':>6} {'msgs':>6} {'accepted/s':>11} "
                f"{'all in Maildir (s)':>19} {'CPU ms/msg':>10}"
            )
            for sessions in cells:
                results = [
                    asyncio.run(run_cell(server, sessions, args.messages, args.size, args.reuse))
                    for _ in range(args.runs)
                ]
                rates = [r.accepted_per_s for r in results]
                print(
                    f"{sessions:>8} {args.size:>6} {args.messages:>6} "
                    f"{statistics.median(rates):>11.0f} "
                    f"{statistics.median(r.delivered_s for r in results):>19.2f} "
                    f"{statistics.median(r.cpu_ms_per_msg for r in results):>10.2f}"
                    f"   (accepted/s min {min(rates):.0f} max {max(rates):.0f})"
                )
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
