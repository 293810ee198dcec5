"""The match rules: which action a recipient gets, or why it is refused.

Each recipient is checked against the ``match`` lines in order and the first that matches wins
(OpenSMTPD's semantics); no match refuses the recipient.  For a local delivery action the
recipient is expanded through the action's alias table into local users at RCPT time, so an
address that leads to nobody is refused then rather than bounced later.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass

from homemail.address import Address
from homemail.aliases import ExpansionError, UserDb, expand
from homemail.config import Config, Match
from homemail.table import Table


@dataclass(frozen=True)
class Source:
    """Where a message comes from."""

    kind: str  # "local" (loopback), "remote", or "socket" (local enqueue)
    address: str  # IP address, or "" for the socket
    tag: str | None = None


LOCAL_SOURCE = Source("socket", "")


@dataclass(frozen=True)
class Target:
    action: str
    dest: str  # final address, e.g. bob@localhost
    user: str
    ttl: int | None = None  # the action's ttl: its envelopes expire then, not at queue ttl


class Rejected(Exception):
    """A refused recipient: ``reply`` for the client, ``detail`` (if any) only for the log."""

    def __init__(self, code: int, status: str, text: str, detail: str | None = None) -> None:
        super().__init__(text)
        self.code, self.status, self.text, self.detail = code, status, text, detail

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


def source_for(address: str, tag: str | None) -> Source:
    return Source("local" if _is_loopback(address) else "remote", address, tag)


@functools.lru_cache(maxsize=1024)
def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def local_names(cfg: Config, hostname: str) -> set[str]:
    names = {"localhost", "localhost.localdomain", hostname.lower(), "[127.0.0.1]", "[ipv6:::1]"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    for listener in cfg.listeners:
        if listener.hostname:
            names.add(listener.hostname.lower())
        try:
            ip = ipaddress.ip_address(listener.address)
        except ValueError:
            continue
        names.add(f"[{ip}]" if ip.version == 4 else f"[ipv6:{ip}]")
    return names


class Ruleset:
    def __init__(self, cfg: Config, users: UserDb, hostname: str) -> None:
        self.cfg = cfg
        self.users = users
        self.hostname = hostname
        self.local = local_names(cfg, hostname)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().removesuffix(".") in self.local  # "localhost." is localhost

    def check_alias(self, name: str, table: Table) -> None:
        """Expand alias ``name`` of ``table`` as mail to it would be; raises ExpansionError
        when it leads to a target this release cannot deliver to, or to nobody."""
        expand(
            name,
            table,
            self.users,
            delim=self.cfg.sub_addr_delim,
            is_local_domain=self.is_local_domain,
        )

    def _table_has(self, name: str | None, key: str) -> bool:
        table = self.cfg.tables.get(name or "")
        return table is not None and key.lower() in table

    def _src_in(self, name: str | None, address: str) -> bool:
        table = self.cfg.tables.get(name or "")
        if table is None or not address:
            return False
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        entries = table.values if table.kind == "list" else list(table.mapping)
        for entry in entries:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def _matches(self, rule: Match, source: Source, rcpt: Address) -> bool:
        if rule.from_kind == "any":
            ok = True
        elif rule.from_kind == "local":
            ok = source.kind in ("local", "socket")
        elif rule.from_kind == "socket":
            ok = source.kind == "socket"
        else:
            ok = self._src_in(rule.from_table, source.address)
        if ok == rule.from_negate:
            return False
        if rule.for_kind == "any":
            ok = True
        elif rule.for_kind == "local":
            ok = not rcpt.domain or self.is_local_domain(rcpt.domain)
        elif rule.for_kind == "domain":
            ok = self._table_has(rule.for_table, rcpt.domain)
        else:
            ok = self._table_has(rule.for_table, str(rcpt))
        if ok == rule.for_negate:
            return False
        if rule.tag is not None and (source.tag == rule.tag) == rule.tag_negate:
            return False
        return True

    def route(self, source: Source, rcpt: Address) -> list[Target]:
        """The deliveries one recipient turns into; raises Rejected."""
        for rule in self.cfg.matches:
            if not self._matches(rule, source, rcpt):
                continue
            if rule.reject or rule.action is None:
                raise Rejected(550, "5.7.1", "Delivery not authorized, message refused")
            action = self.cfg.actions[rule.action]
            table = self.cfg.tables.get(action.alias) if action.alias else None
            try:
                users = expand(
                    rcpt.local,
                    table,
                    self.users,
                    delim=self.cfg.sub_addr_delim,
                    is_local_domain=self.is_local_domain,
                )
            except ExpansionError as exc:
                if exc.private:  # what an alias holds is nobody's business on the wire
                    raise Rejected(550, "5.1.1", "Recipient address rejected", exc.text) from None
                raise Rejected(exc.code, exc.status, exc.text) from None
            domain = rcpt.domain or self.hostname
            return [Target(action.name, f"{u.name}@{domain}", u.name, action.ttl) for u in users]
        if rcpt.domain and not self.is_local_domain(rcpt.domain):
            raise Rejected(550, "5.7.1", "Relaying denied")
        raise Rejected(550, "5.1.1", "Invalid recipient")
