"""Per-reply latency of one lock-step SMTP session, a new connection per message.

Where a single client's time goes: connect + banner, HELO, MAIL, RCPT, DATA, the message up to
its 250, and QUIT, each the median / mean / 90th percentile over N messages of 4 KiB.  Works
against any server on a loopback port (start one with compare.py's classes, or by hand):

    .venv/bin/python bench/reply_latency.py PORT [N] [RCPT]

RCPT defaults to bench@localhost, which the servers compare.py starts accept (an alias); against
the embedded user-mode configuration give one it knows, such as "$USER@localhost".
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

STEPS = ("connect", "helo", "mail", "rcpt", "data", "message", "quit")


def reply(sock: socket.socket) -> bytes:
    """Read one (possibly multi-line) reply."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) > 1 and len(lines[-2]) > 3 and lines[-2][3:4] == b" ":
            return buf


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("port", type=int, help="the server's port on 127.0.0.1")
    parser.add_argument("count", type=int, nargs="?", default=500, help="messages (default 500)")
    parser.add_argument(
        "rcpt", nargs="?", default="bench@localhost", help="recipient (default bench@localhost)"
    )
    args = parser.parse_args()
    port, count, rcpt = args.port, args.count, args.rcpt
    if count < 1:
        parser.error("count must be at least 1")
    body = b"From: <a@localhost>\r\nTo: <%s>\r\nSubject: latency\r\n\r\n" % rcpt.encode()
    body += (b"x" * 78 + b"\r\n") * 51 + b".\r\n"
    commands = [
        ("helo", b"HELO bench.localdomain\r\n"),
        ("mail", b"MAIL FROM:<a@localhost>\r\n"),
        ("rcpt", b"RCPT TO:<%s>\r\n" % rcpt.encode()),
        ("data", b"DATA\r\n"),
        ("message", body),
        ("quit", b"QUIT\r\n"),
    ]
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", port))
        reply(sock)
        times["connect"].append(time.perf_counter() - t0)
        for step, data in commands:
            t0 = time.perf_counter()
            sock.sendall(data)
            got = reply(sock)
            times[step].append(time.perf_counter() - t0)
            if got[:1] not in (b"2", b"3"):
                raise SystemExit(f"{step}: {got!r}")
        sock.close()
    elapsed = time.perf_counter() - start
    print(f"{count / elapsed:.0f} msg/s over {count} messages")
    for step, values in times.items():
        values.sort()
        p90 = values[int(len(values) * 0.9)]
        print(
            f"{step:8} median {statistics.median(values) * 1e3:6.3f} ms  "
            f"mean {statistics.mean(values) * 1e3:6.3f}  p90 {p90 * 1e3:6.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
