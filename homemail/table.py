"""Tables: the named lists and maps that smtpd.conf refers to as ``<name>``.

This module owns the ``Table`` type and the static table backends of OpenSMTPD's table_static:
tables written inline in the configuration (``table NAME { a, b }`` and
``table NAME { k = v }``, built by the config parser through ``Table.inline_list`` and
``Table.inline_map``) and tables read from a file (``table NAME file:/path``, read here by
``Table.from_file``). Lookups are case-insensitive.

Table file format (UTF-8 text, one entry a line):

- ``#`` starts a comment, either as the first non-blank character of a line or after
  whitespace (``key value  # note``); ``#`` inside a word (``a#b``) is text. Blank lines are
  ignored.
- The first entry line decides the kind of the table. If it holds a separator it is a **map**,
  otherwise a **list**:

  - list: one value a line (``192.168.1.0/24``, ``example.org``, ``bob``);
  - map: ``key value``, ``key: value`` or ``key:value`` (aliases(5) style). The key ends at
    the first whitespace or ``:``, and the value is the rest of the line, stripped; the value
    keeps its text (``root: bob, alice`` maps ``root`` to ``bob, alice``). An IP address or
    network before the first whitespace is a whole key (``::1 localhost`` maps ``::1``), and
    a line that is only an IP address or network (``::1``, ``fe80::/10``) is a list value,
    not ``key:value``.

- In a map, a line that starts with whitespace continues the previous entry's value (as in
  aliases(5)); the pieces are joined with a single space.
- Keys are lowercased; values are kept as written. A key whose value is empty once its
  continuation lines are joined, a key given twice, a list line holding two words, and any
  line holding a NUL or CR character are errors (``TableError``, which names the file and the
  line).
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["MAX_TABLE_FILE_SIZE", "Table", "TableError", "read_regular_file"]

MAX_TABLE_FILE_SIZE = 64 * 1024 * 1024

_COMMENT_AFTER_SPACE = re.compile(r"[ \t]#")
_FIRST_WORD = re.compile(r"\S+")


class TableError(Exception):
    """A table file that cannot be read or holds a bad line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return "".join(
            char if char.isprintable() else f"\\u{ord(char):04x}"
            for char in f"{where}: {self.message}"
        )


def read_regular_file(path: str, limit: int) -> bytes:
    """Read a whole regular file of at most ``limit`` bytes.

    FIFOs, devices and directories are refused without blocking. Raises ``OSError`` (with
    ``strerror`` set) or ``ValueError`` (a path holding NUL or unencodable characters).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file", path)
        if st.st_size > limit:
            raise OSError(0, f"file is larger than {limit} bytes", path)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise OSError(0, f"file is larger than {limit} bytes", path)
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _split_entry(text: str) -> tuple[str, str, bool]:
    """Split a stripped entry line into (key, value, has_separator)."""
    first = _FIRST_WORD.match(text)
    assert first is not None
    word = first.group()
    candidate = word[:-1] if word.endswith(":") and len(word) > 1 else word
    if ":" in candidate and _is_ip(candidate):
        rest = text[len(word) :]
        if candidate == word and not rest:
            return candidate, "", False
        value = rest.strip()
        if candidate == word and value.startswith(":"):
            value = value[1:].strip()
        return candidate, value, True
    index = next((i for i, char in enumerate(text) if char == ":" or char.isspace()), -1)
    if index < 0:
        return text, "", False
    key = text[:index]
    rest = text[index:]
    if rest.startswith(":"):
        return key, rest[1:].strip(), True
    value = rest.strip()
    if value.startswith(":"):
        value = value[1:].strip()
    return key, value, True


def _strip_comment(text: str) -> str:
    if text.lstrip().startswith("#"):
        return ""
    match = _COMMENT_AFTER_SPACE.search(text)
    if match is not None:
        text = text[: match.start()]
    return text.rstrip()


def _parse(name: str, path: str, data: bytes) -> Table:
    kind: Literal["list", "map"] | None = None
    kind_line = 0
    values: list[str] = []
    mapping: dict[str, str] = {}
    key_lines: dict[str, int] = {}
    pending: tuple[str, int] | None = None  # map entry whose value may continue

    def finish_pending() -> None:
        if pending is not None and not mapping[pending[0]]:
            raise TableError(path, pending[1], f"key '{pending[0]}' has no value")

    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if b"\0" in raw:
            raise TableError(path, lineno, "line holds a NUL character")
        if b"\r" in raw:
            raise TableError(
                path, lineno, "line holds a CR character (save the file with Unix line endings)"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TableError(path, lineno, "line is not valid UTF-8") from None
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        content = _strip_comment(line)
        if not content.strip():
            continue
        if kind == "map" and content[0] in " \t" and pending is not None:
            key = pending[0]
            piece = content.strip()
            mapping[key] = f"{mapping[key]} {piece}" if mapping[key] else piece
            continue
        text = content.strip()
        key, value, has_separator = _split_entry(text)
        if kind is None:
            kind = "map" if has_separator else "list"
            kind_line = lineno
        if kind == "list":
            if any(char.isspace() for char in text):
                raise TableError(
                    path,
                    lineno,
                    f"a list table holds one value a line, this line holds several "
                    f"(the table is a list because line {kind_line} holds a single value)",
                )
            values.append(text)
            continue
        finish_pending()
        if not key:
            raise TableError(path, lineno, "entry has an empty key")
        key = key.lower()
        if key in mapping:
            raise TableError(
                path, lineno, f"key '{key}' is given twice (first on line {key_lines[key]})"
            )
        mapping[key] = value
        key_lines[key] = lineno
        pending = (key, lineno)
    finish_pending()
    return Table(name, kind or "list", os.path.abspath(path), values, mapping)


@dataclass
class Table:
    """A named list or map. Treat it as immutable: ``reloaded`` builds a new one."""

    name: str
    kind: Literal["list", "map"]
    source: str | None
    values: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict)
    _members: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mapping = {key.lower(): value for key, value in self.mapping.items()}
        self._members = frozenset(value.lower() for value in self.values)

    @classmethod
    def from_file(cls, name: str, path: str) -> Table:
        try:
            data = read_regular_file(path, MAX_TABLE_FILE_SIZE)
        except OSError as err:
            raise TableError(path, None, f"cannot read: {err.strerror or err}") from None
        except ValueError as err:
            raise TableError(path, None, f"cannot read: {err}") from None
        return _parse(name, path, data)

    @classmethod
    def inline_list(cls, name: str, values: list[str]) -> Table:
        return cls(name, "list", None, list(values), {})

    @classmethod
    def inline_map(cls, name: str, pairs: list[tuple[str, str]]) -> Table:
        mapping: dict[str, str] = {}
        for key, value in pairs:
            if key.lower() in mapping:
                raise ValueError(f"duplicate key {key!r} in table {name!r}")
            mapping[key.lower()] = value
        return cls(name, "map", None, [], mapping)

    def lookup(self, key: str) -> str | None:
        if self.kind == "map":
            return self.mapping.get(key.lower())
        return key if key.lower() in self._members else None

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if self.kind == "map":
            return key.lower() in self.mapping
        return key.lower() in self._members

    def entries(self) -> list[str]:
        """The entries a lookup can find: list values, or map keys (lowercased)."""
        return list(self.mapping) if self.kind == "map" else list(self.values)

    def reloaded(self) -> Table:
        if self.source is None:
            return self
        return Table.from_file(self.name, self.source)
