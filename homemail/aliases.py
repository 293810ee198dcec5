"""Local users and alias expansion (aliases(5) as far as this release goes).

An alias table maps a name to a comma-separated list of targets.  A target is a local user
name, another alias, or ``user@domain`` for a domain this server treats as local.  Expansion
follows aliases recursively up to :data:`MAX_DEPTH` levels, tries ``user+tag`` before ``user``,
and a name that an alias maps to itself ends the recursion as a user (``bob: bob, alice``).

The second half edits an aliases file in place for ``homemailctl alias`` and the tray app:
comments, blank lines and the order of entries are kept, targets are validated (the alias as it
would be is expanded by the caller's rules, so an entry that mail could not be delivered
through is refused before anything is written), and the new file is written to a temporary
file, checked by the table parser and renamed over the old one.
Edits are serialized by a lock of this module: every writer is in one process (the daemon in
user mode, from its threads; the privileged parent in system mode), so two edits at once cannot
each read the old file and the second rename drop the first one's entry.

Which users exist depends on the mode: in user mode only the user running the daemon can receive
mail; in system mode every account does, except root, the daemon's own unprivileged user and
accounts whose home is ``/nonexistent``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import stat
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass

from homemail.address import AddressError, check_local_part, parse_mailbox, split_subaddress
from homemail.table import Table, TableError

MAX_DEPTH = 10
_EDIT_LOCK = threading.Lock()  # one read-modify-write of an aliases file at a time


@dataclass(frozen=True)
class LocalUser:
    name: str
    uid: int
    gid: int
    home: str


class ExpansionError(Exception):
    """``private``: the text tells what an alias holds (for the log and ``alias add``, not for
    an SMTP client)."""

    def __init__(self, code: int, status: str, text: str, *, private: bool = False) -> None:
        super().__init__(text)
        self.code, self.status, self.text, self.private = code, status, text, private

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
    """Who can receive mail here.

    In system mode: every account but root, the daemon's own unprivileged user (``daemon_uid``)
    and accounts whose home says they have none (``nobody``'s ``/nonexistent``, most system
    accounts), whose deliveries could only fail.
    """

    def __init__(
        self, *, user_mode: bool, only: LocalUser | None = None, daemon_uid: int | None = None
    ) -> None:
        self.user_mode = user_mode
        self.only = only or (current_user() if user_mode else None)
        self.daemon_uid = daemon_uid

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
        if entry.pw_uid in (0, self.daemon_uid) or not _has_home(entry.pw_dir):
            return None
        return _from_pwd(entry)


def _has_home(path: str) -> bool:
    """False for the homes that say "no home" (``/nonexistent``, as Debian gives ``nobody``
    and its system accounts).  Any other missing home still receives: an mbox in /var/mail
    needs none, and a Maildir delivery into it fails and is retried."""
    return os.path.isabs(path) and os.path.normpath(path) not in _NO_HOME


_NO_HOME = {"/nonexistent", "/dev/null"}


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
        if split_subaddress(local, delim)[0].lower() == "root":  # the README's rule, told
            raise ExpansionError(550, "5.1.1", "Mail for root is not delivered: alias root")
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
) -> bool:
    """Add the users ``local`` leads to; False when it is neither a user nor an alias."""
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
        return user is not None
    seen = seen | {key}
    for item in (t.strip() for t in value.split(",")):
        if not item:
            continue
        target = item
        if "@" in item:
            name, _, domain = item.rpartition("@")
            if not is_local_domain(domain.lower()):
                raise _undeliverable(key, item, "remote addresses need relaying, not done yet")
            target = name
        try:
            check_local_part(target)
        except AddressError:
            raise _undeliverable(
                key, item, "files, commands and includes are not supported yet"
            ) from None
        if target.startswith(("/", "|")):  # atext, but aliases(5) means a file or a command
            raise _undeliverable(key, item, "files and commands are not supported yet")
        if target.lower() in seen:
            user = users.lookup(split_subaddress(target, delim)[0])
            if user is None:
                raise _undeliverable(key, item, "a loop back to an alias being expanded")
            found.setdefault(user.name, user)
            continue
        if not _expand(target, table, users, delim, is_local_domain, found, depth=depth + 1,
                       seen=seen):
            raise _unknown(key, item)
    return True


def _undeliverable(alias: str, target: str, why: str) -> ExpansionError:
    """A target the alias cannot deliver to: the recipient is refused, never partly dropped."""
    return ExpansionError(
        550, "5.2.4", f"Alias {alias!r} cannot deliver to {target!r}: {why}", private=True
    )


def _unknown(alias: str, target: str) -> ExpansionError:
    return ExpansionError(
        550,
        "5.1.1",
        f"Invalid recipient: alias {alias!r} names {target!r}, no such user or alias",
        private=True,
    )


# -- editing an aliases file in place (homemailctl alias …, the tray app) ---------------------


class AliasEditError(Exception):
    """An alias edit that cannot be made; ``code`` is a control-protocol error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_alias_name(name: str) -> str:
    try:
        check_local_part(name)
    except AddressError as exc:
        raise AliasEditError(400, f"invalid alias name {name!r}: {exc}") from None
    if name.startswith("#"):  # atext, but the line would be a comment
        raise AliasEditError(400, f"invalid alias name {name!r}: it would read as a comment")
    return name.lower()


def check_alias_target(target: str) -> str:
    """A target this release can deliver to: a user or alias name, or user@domain."""
    try:
        if "@" in target:
            parse_mailbox(target)
        else:
            check_local_part(target)
    except AddressError as exc:
        raise AliasEditError(400, f"invalid alias target {target!r}: {exc}") from None
    return target


def _entry_spans(lines: list[str]) -> list[tuple[str, int, int]]:
    """(lowercased name, first line, one past the last line) of each entry, in file order."""
    spans: list[tuple[str, int, int]] = []
    for i, line in enumerate(lines):
        text = line.rstrip("\n")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        if text[0] in " \t" and spans:
            name, start, _ = spans[-1]
            spans[-1] = (name, start, i + 1)
            continue
        key = re.split(r"[:\s]", text.strip(), maxsplit=1)[0]
        spans.append((key.lower(), i, i + 1))
    return spans


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise AliasEditError(409, f"cannot read {path}: {exc}") from None


def read_entries(path: str) -> list[tuple[str, list[str]]]:
    try:
        table = Table.from_file("aliases", path)
    except TableError as exc:
        raise AliasEditError(409, str(exc)) from None
    return [(k, [t.strip() for t in v.split(",") if t.strip()]) for k, v in table.mapping.items()]


def _write_lines(path: str, lines: list[str]) -> None:
    text = "".join(lines)
    directory = os.path.dirname(path) or "."
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=".aliases-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            if os.geteuid() == 0:
                os.chown(tmp, st.st_uid, st.st_gid)
        else:
            os.chmod(tmp, 0o644)
        Table.from_file("aliases", tmp)  # never install a file the daemon could not read
        os.rename(tmp, path)
    except TableError as exc:
        os.unlink(tmp)
        raise AliasEditError(409, f"the edit would break the file: {exc}") from None
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AliasEditError(409, f"cannot write {path}: {exc.strerror}") from None


#: Expands an alias of a table as mail to it would be (the daemon's rules: its users, local
#: domains and sub-address delimiter); raises ExpansionError when it cannot be delivered.
CheckAlias = Callable[[str, Table], object]


def add(path: str, name: str, targets: list[str], check: CheckAlias | None = None) -> None:
    """Add an alias, or add targets to an existing one, keeping comments and order.

    ``check`` is given the alias and the table as the edit would leave it; when it raises
    ExpansionError the edit is refused (AliasEditError 400) and nothing is written.
    """
    key = check_alias_name(name)
    new = [check_alias_target(t) for t in targets]
    if not new:
        raise AliasEditError(400, "an alias needs at least one target")
    with _EDIT_LOCK:
        _add(path, key, new, check)


def _add(path: str, key: str, new: list[str], check: CheckAlias | None) -> None:
    lines = _read_lines(path)
    table = _current_table(path)
    value = table.mapping.get(key, "")
    current = [t.strip() for t in value.split(",") if t.strip()]
    seen = {c.lower() for c in current}
    merged = ", ".join(current + [t for t in new if t.lower() not in seen])
    if check is not None:
        edited = Table(table.name, "map", table.source, [], {**table.mapping, key: merged})
        try:
            check(key, edited)
        except ExpansionError as exc:
            raise AliasEditError(400, f"alias {key!r} not added: {exc.text}") from None
        _keep_others_deliverable(table, edited, check, f"alias {key!r} not added")
    entry = f"{key}: {merged}\n"
    for name, start, end in _entry_spans(lines):
        if name == key:
            lines[start:end] = [entry]
            break
    else:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(entry)
    _write_lines(path, lines)


def _current_table(path: str) -> Table:
    """The aliases file as the table parser reads it (empty when there is no file yet)."""
    try:
        return Table.from_file("aliases", path)
    except TableError as exc:
        if not os.path.lexists(path):
            return Table("aliases", "map", os.path.abspath(path))
        raise AliasEditError(409, str(exc)) from None


def _keep_others_deliverable(
    before: Table, after: Table, check: CheckAlias, refusal: str
) -> None:
    """Refuse an edit that leaves an alias mail used to reach with nowhere to go (a loop
    through the edited one, or one that names a removed alias)."""
    for other in after.mapping:
        try:
            check(other, after)
        except ExpansionError as broken:
            try:
                check(other, before)
            except ExpansionError:
                continue  # it was broken already: not this edit's doing
            raise AliasEditError(
                400, f"{refusal}: alias {other!r} would fail ({broken.text})"
            ) from None


def remove(path: str, name: str, check: CheckAlias | None = None) -> None:
    """Remove an alias; with ``check``, not one that other aliases still lead to."""
    key = name.lower()
    with _EDIT_LOCK:
        lines = _read_lines(path)
        for entry, start, end in _entry_spans(lines):
            if entry == key:
                if check is not None:
                    table = _current_table(path)
                    rest = {k: v for k, v in table.mapping.items() if k != key}
                    after = Table(table.name, "map", table.source, [], rest)
                    _keep_others_deliverable(table, after, check, f"alias {key!r} not removed")
                del lines[start:end]
                _write_lines(path, lines)
                return
    raise AliasEditError(404, f"no alias {name!r}")
