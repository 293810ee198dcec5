"""Local users and alias expansion (aliases(5) as far as this release goes).

An alias table maps a name to a comma-separated list of targets.  A target is a local user
name, another alias, or ``user@domain`` for a domain this server treats as local.  Expansion
follows aliases recursively up to :data:`MAX_DEPTH` levels, tries ``user+tag`` before ``user``,
and a name that an alias maps to itself ends the recursion as a user (``bob: bob, alice``).

Which users exist depends on the mode: in user mode only the user running the daemon can receive
mail; in system mode every account with a home directory except root does.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from homemail.address import AddressError, check_local_part, split_subaddress
from homemail.table import Table

MAX_DEPTH = 10


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int
    home: str


class ExpansionError(Exception):
    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(text)
        self.code, self.status, self.text = code, status, text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}"


def _from_pwd(entry: pwd.struct_passwd) -> LocalUser:
    return LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def current_user() -> LocalUser:
    entry = pwd.getpwuid(os.getuid())
    home = os.environ.get("HOME") or entry.pw_dir
    return LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, home)


class UserDb:
    """Who can receive mail here."""

    def __init__(self, *, user_mode: bool, only: LocalUser | None = None) -> None:
        self.user_mode = user_mode
        self.only = only or (current_user() if user_mode else None)

    def lookup(self, name: str) -> LocalUser | None:
        if self.user_mode:
            assert self.only is not None
            return self.only if name.lower() == self.only.name.lower() else None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            try:
                entry = pwd.getpwnam(name.lower())
            except KeyError:
                return None
        if entry.pw_uid == 0:
            return None
        return _from_pwd(entry)


def expand(
    local: str,
    table: Table | None,
    users: UserDb,
    *,
    delim: str,
    is_local_domain: Callable[[str], bool],
) -> list[LocalUser]:
    """Expand a local part into the distinct users who receive it; raises ExpansionError."""
    found: dict[str, LocalUser] = {}
    _expand(local, table, users, delim, is_local_domain, found, depth=0, seen=set())
    if not found:
        raise ExpansionError(550, "5.1.1", "Invalid recipient: no such user")
    return list(found.values())


def _expand(
    local: str,
    table: Table | None,
    users: UserDb,
    delim: str,
    is_local_domain: Callable[[str], bool],
    found: dict[str, LocalUser],
    *,
    depth: int,
    seen: set[str],
) -> None:
    if depth > MAX_DEPTH:
        raise ExpansionError(524, "5.2.4", "Alias expansion too deep")
    key = local.lower()
    value: str | None = None
    if table is not None and key not in seen:
        value = table.lookup(key)
        if value is None:
            base, ext = split_subaddress(key, delim)
            if ext is not None and base not in seen:
                value = table.lookup(base)
                key = base if value is not None else key
    if value is None:
        base, _ = split_subaddress(local, delim)
        user = users.lookup(base)
        if user is not None:
            found.setdefault(user.name, user)
        return
    seen = seen | {key}
    for item in (t.strip() for t in value.split(",")):
        if not item:
            continue
        target = item
        if "@" in item:
            name, _, domain = item.rpartition("@")
            if not is_local_domain(domain.lower()):
                continue  # remote targets arrive with relaying
            target = name
        try:
            check_local_part(target)
        except AddressError:
            continue  # files, commands and includes arrive with the full aliases(5) syntax
        if target.lower() in seen:
            user = users.lookup(split_subaddress(target, delim)[0])
            if user is not None:
                found.setdefault(user.name, user)
            continue
        _expand(target, table, users, delim, is_local_domain, found, depth=depth + 1, seen=seen)
