"""A tiny DNS responder that answers from /etc/hosts, for OpenSMTPD under benchmark.

OpenSMTPD looks up every client's address (PTR, then A to confirm) with its own resolver,
which reads /etc/resolv.conf and skips /etc/hosts.  On a machine whose upstream resolver drops
a query now and then, a lost UDP query stalls that session for the resolver's 5 s timeout,
and the benchmark measures the network's resolver instead of the mail server.  compare.py
runs OpenSMTPD in a private mount namespace whose /etc/resolv.conf points here: a local resolver
that answers at once, like the caching resolver of an ordinary host.  Postfix resolves the same
names through glibc, which reads /etc/hosts first, and homemail does no lookup at all.

Answers A and PTR from /etc/hosts; NODATA for other types of a known name; NXDOMAIN otherwise.

    python bench/dns_stub.py --address 127.53.53.53 [--port 53]
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import struct


def load_hosts(path: str = "/etc/hosts") -> tuple[dict[str, list[bytes]], dict[str, str]]:
    forward: dict[str, list[bytes]] = {}
    reverse: dict[str, str] = {}
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        lines = []
    lines.append("127.0.0.1 localhost")
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        if addr.version != 4:
            continue
        for name in fields[1:]:
            packed = addr.packed
            if packed not in forward.setdefault(name.lower().rstrip("."), []):
                forward[name.lower().rstrip(".")].append(packed)
        reverse.setdefault(addr.reverse_pointer, fields[1].rstrip("."))
    return forward, reverse


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def answer(query: bytes, forward: dict[str, list[bytes]], reverse: dict[str, str]) -> bytes | None:
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    pos, labels = 12, []
    while pos < len(query):
        n = query[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0:
            return None
        labels.append(query[pos : pos + n].decode("ascii", "replace"))
        pos += n
    if pos + 4 > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[pos : pos + 4])
    question = query[12 : pos + 4]
    name = ".".join(labels).lower()
    rd = flags & 0x0100
    rrs: list[bytes] = []
    known = name in forward or name in reverse
    if qclass == 1 and qtype == 1 and name in forward:
        rrs = [b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 3600, 4) + a for a in forward[name]]
    elif qclass == 1 and qtype == 12 and name in reverse:
        target = encode_name(reverse[name])
        rrs = [b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 3600, len(target)) + target]
    rcode = 0 if known else 3
    header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, len(rrs), 0, 0)
    return header + question + b"".join(rrs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.53.53.53")
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args()
    forward, reverse = load_hosts()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.address, args.port))
    print("ready", flush=True)
    while True:
        data, peer = sock.recvfrom(4096)
        reply = answer(data, forward, reverse)
        if reply is not None:
            sock.sendto(reply, peer)


if __name__ == "__main__":
    main()
