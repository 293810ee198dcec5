"""The smtpd.conf grammar: reading, checking and writing homemail's configuration.

This module owns the configuration file format and the ``Config`` object every other part of
the daemon reads. It parses OpenSMTPD's smtpd.conf(5) grammar (the part homemail implements),
refuses the rest clearly, and reports every error as ``FILE:LINE:COL: error: MESSAGE near
'TOKEN'`` with a hint where one helps. ``dump`` writes a ``Config`` back as grammar text.

Errors: as ``smtpd -n`` does, one reading reports them all (``ConfigErrors``, or a plain
``ConfigError`` for one), in reading order, up to ``MAX_ERRORS``.  A statement that fails is
recorded and reading goes on with the next one; a quoted string that is not closed, or a control
character, ends its statement at the end of its line (inside ``{ … }`` too, so the lines after
it are read as statements of their own).  What depends on a failed statement is not reported
again: the uses of a table, action or macro whose declaration failed, and the references inside
a failed statement.  A name used but declared nowhere (or, for a macro, not yet) is reported
once, at its first use; when an ``include`` could not be read, such names are not reported at
all (it may declare them).  ``check_listeners`` runs on a configuration that parsed.

File format (UTF-8), read top to bottom, one statement a line:

- ``#`` starts a comment outside double quotes. A ``\\`` at the end of a line joins the next
  line to it. Inside ``{ … }`` newlines do not end the statement.
- Tokens are separated by whitespace; ``{ } , = < > !`` are tokens of their own. A double-quoted
  string is one token and may hold ``\\"`` and ``\\\\``. A quoted string is never a keyword, so
  names that collide with keywords must be quoted (``action "local" …``); inside ``< >`` and
  ``{ }`` a bare keyword is taken as a name.
- ``NAME = value`` or ``NAME = "value"`` defines a macro; a bare ``$NAME`` token is replaced by
  the macro's value, read again as tokens (``$NAME`` inside a quoted string is text).
- ``include "PATH"`` reads another file in place (a relative path is taken from the including
  file's directory).
- ``table NAME file:PATH`` or ``table NAME PATH`` (a file table, see ``homemail.table`` for its
  format; relative paths are taken from the configuration file's directory),
  ``table NAME { a, b }`` (inline list), ``table NAME { k = v, k2 = v2 }`` (inline map).
- ``listen on localhost|all|socket|ADDRESS|INTERFACE|HOST [port N] [hostname NAME] [tag T]
  [mask-src]``; an interface is its addresses, a host name what it resolves to (see
  ``listen_hosts``, which the daemon binds with too). Two listeners may not bind the same
  address and port.
- ``action NAME maildir ["PATH"]|mbox ["PATH"] [alias <TABLE>] [ttl DURATION]``; the ttl
  is how long the action's envelopes stay queued (instead of ``queue ttl``). A path starting
  with ``~/`` (or ``~`` alone), or relative, is the recipient's home's; ``~NAME`` is refused.
- ``match [!]from any|local|socket|src <T>  [!]for any|local|domain <T>|rcpt-to <T>
  [[!]tag T]  action NAME|reject``; ``from`` and ``for`` default to ``local``.
- ``queue ttl DURATION``, ``bounce warn-interval DURATION[, DURATION…]`` (up to four),
  ``smtp max-message-size SIZE``, ``smtp limit [max-mails N] [max-rcpt N]``,
  ``smtp sub-addr-delim C``.
- Durations are ``N``, ``Ns``, ``Nm``, ``Nh`` or ``Nd``; sizes are bytes, or ``NK``, ``NM``,
  ``NG`` (binary multiples, any case).

OpenSMTPD features homemail does not have yet (TLS, AUTH, relaying, lmtp, mda, …) are
recognised and refused with "not supported yet" rather than misread. Equality of ``Config``,
``Listener``, ``Action`` and ``Match`` ignores source locations, the file name and warnings, so
two configurations compare equal when they mean the same thing.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from homemail.mda import FORMAT_MODIFIERS, FormatError, check_format
from homemail.table import Table, TableError, read_regular_file

__all__ = [
    "KEYWORDS",
    "Action",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "ConfigWarning",
    "Listener",
    "Location",
    "Match",
    "check_listeners",
    "default_config_text",
    "dump",
    "interface_addresses",
    "listen_hosts",
    "open_relay_warnings",
    "parse_file",
    "parse_string",
]

MAX_CONFIG_FILE_SIZE = 16 * 1024 * 1024
MAX_INCLUDE_DEPTH = 32
MAX_DURATION = 3650 * 86400
MAX_SIZE = 1024**4
MAX_COUNT = 2**31 - 1
MAX_ERRORS = 50  # reported in one run; a file that is not a configuration at all stops there


# --- the public types -------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _printable(text: str) -> str:
    """Escape what a terminal should not receive raw (controls, surrogates, bidi marks)."""
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is the message a user sees."""

    def __init__(
        self,
        message: str,
        location: Location | None = None,
        token: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, location, token, hint)
        self.message = message
        self.location = location
        self.token = token
        self.hint = hint

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location is not None else ""
        text = f"{where}error: {self.message}"
        if self.token is not None:
            text += f" near '{_shorten(self.token)}'"
        text = _printable(text)
        if self.hint:
            text += f"\n  hint: {_printable(self.hint)}"
        return text

    @property
    def errors(self) -> list[ConfigError]:
        """Every error found (see ``ConfigErrors``); this one alone."""
        return [self]


class ConfigErrors(ConfigError):
    """Several errors, in the order the configuration is read; ``str()`` has one a line (each
    followed by its hint, if any).  The message, location, token and hint are the first's, so
    that code which expects one error still reads a true one."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.message, first.location, first.token, first.hint)
        self.args = (list(errors),)
        self._errors = list(errors)

    def __str__(self) -> str:
        return "\n".join(str(err) for err in self._errors)

    @property
    def errors(self) -> list[ConfigError]:
        return list(self._errors)


@dataclass(frozen=True)
class ConfigWarning:
    location: Location
    message: str

    def __str__(self) -> str:
        return _printable(f"{self.location}: warning: {self.message}")


@dataclass
class Listener:
    address: str
    port: int | None
    hostname: str | None
    tag: str | None
    mask_src: bool
    location: Location = field(compare=False)


@dataclass
class Action:
    name: str
    method: Literal["maildir", "mbox"]
    path: str | None
    alias: str | None
    ttl: int | None
    location: Location = field(compare=False)


@dataclass
class Match:
    from_kind: Literal["any", "local", "src", "socket"]
    from_negate: bool
    from_table: str | None
    for_kind: Literal["any", "local", "domain", "rcpt-to"]
    for_negate: bool
    for_table: str | None
    tag: str | None
    tag_negate: bool
    action: str | None
    reject: bool
    location: Location = field(compare=False)


@dataclass
class Config:
    path: str = field(compare=False)
    tables: dict[str, Table]
    listeners: list[Listener]
    actions: dict[str, Action]
    matches: list[Match]
    queue_ttl: int = 4 * 86400
    bounce_warn_interval: list[int] = field(default_factory=lambda: [4 * 3600])
    max_message_size: int = 35 * 1024 * 1024
    max_mails: int = 100
    max_rcpt: int = 1000
    sub_addr_delim: str = "+"
    warnings: list[ConfigWarning] = field(default_factory=list, compare=False)


# --- keywords ---------------------------------------------------------------------------------

_TOP = ("action", "bounce", "include", "listen", "match", "queue", "smtp", "table")
_TOP_REFUSED = ("admd", "ca", "filter", "mta", "pki", "proc", "srs")
_LISTEN_ADDRESSES = ("localhost", "all", "socket")
_LISTEN_OPTIONS = ("port", "hostname", "tag", "mask-src")
_LISTEN_REFUSED = (
    "tls",
    "tls-require",
    "smtps",
    "pki",
    "auth",
    "auth-optional",
    "senders",
    "masquerade",
    "ca",
    "filter",
    "proxy-v2",
    "inet4",
    "inet6",
    "family",
    "hostnames",
    "no-dsn",
)
_METHODS = ("maildir", "mbox")
_METHODS_REFUSED = ("lmtp", "mda", "forward-only", "expand-only", "relay")
_ACTION_OPTIONS = ("alias", "ttl")
_ACTION_REFUSED = (
    "virtual",
    "user",
    "userbase",
    "junk",
    "host",
    "backup",
    "tls",
    "no-verify",
    "auth",
    "helo",
    "helo-src",
    "mail-from",
    "src",
    "srs",
    "domain",
    "pki",
    "wrapper",
)
_MATCH_OPTIONS = ("from", "for", "tag", "action", "reject")
_MATCH_REFUSED = ("tls", "auth", "helo", "mail-from")
_FROM_KINDS = ("any", "local", "socket", "src")
_FROM_REFUSED = ("auth", "rdns", "mail-from")
_FOR_KINDS = ("any", "local", "domain", "rcpt-to")
_QUEUE_OPTIONS = ("ttl",)
_QUEUE_REFUSED = ("compression", "encryption")
_BOUNCE_OPTIONS = ("warn-interval",)
_SMTP_OPTIONS = ("max-message-size", "limit", "sub-addr-delim")
_SMTP_REFUSED = ("ciphers",)
_LIMIT_OPTIONS = ("max-mails", "max-rcpt")
_TABLE_BACKENDS_REFUSED = (
    "db",
    "getpwnam",
    "ldap",
    "mysql",
    "passwd",
    "postgres",
    "proc",
    "redis",
    "socketmap",
    "sqlite",
)

KEYWORDS: frozenset[str] = frozenset(
    (
        *_TOP,
        *_TOP_REFUSED,
        "on",
        *_LISTEN_ADDRESSES,
        *_LISTEN_OPTIONS,
        *_LISTEN_REFUSED,
        *_METHODS,
        *_METHODS_REFUSED,
        *_ACTION_OPTIONS,
        *_ACTION_REFUSED,
        *_MATCH_OPTIONS,
        *_MATCH_REFUSED,
        *_FROM_KINDS,
        *_FROM_REFUSED,
        *_FOR_KINDS,
        "regex",
        *_QUEUE_OPTIONS,
        *_QUEUE_REFUSED,
        *_BOUNCE_OPTIONS,
        *_SMTP_OPTIONS,
        *_SMTP_REFUSED,
        *_LIMIT_OPTIONS,
    )
)

_REFUSAL_HINTS = {
    "tls": "homemail cannot use TLS yet; listen on localhost or a trusted network",
    "tls-require": "homemail cannot use TLS yet; listen on localhost or a trusted network",
    "smtps": "homemail cannot use TLS yet; listen on localhost or a trusted network",
    "pki": "homemail cannot use TLS yet, so it has no use for certificates",
    "ca": "homemail cannot use TLS yet, so it has no use for certificates",
    "auth": "homemail cannot authenticate clients yet",
    "auth-optional": "homemail cannot authenticate clients yet",
    "relay": "homemail delivers locally only for now (maildir or mbox)",
    "lmtp": "homemail delivers locally only for now (maildir or mbox)",
    "mda": "homemail delivers locally only for now (maildir or mbox)",
    "forward-only": "homemail delivers locally only for now (maildir or mbox)",
    "expand-only": "homemail delivers locally only for now (maildir or mbox)",
    "virtual": "use 'alias <TABLE>' for now",
}

_MACRO_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_NUMBER = re.compile(r"[0-9]+\Z")
_DURATION = re.compile(r"([0-9]+)([smhd]?)\Z")
_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\Z")
_INTERFACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_BACKEND = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)\Z", re.DOTALL)
_SUB_ADDR_DELIMS = "!#$%&'*+-/=?^_`{|}~"
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _suggest(word: str, candidates: tuple[str, ...] | list[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not found and len(word) >= 3:
        found = [c for c in candidates if c.startswith(word)][:1]
    if not found and word.lower() != word:
        found = difflib.get_close_matches(word.lower(), list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{found[0]}'?" if found else None


# --- the lexer --------------------------------------------------------------------------------

_PUNCT = "{},=<>!"
_SPACE = " \t\r\f\v"


@dataclass(frozen=True)
class _Token:
    kind: Literal["word", "string", "punct"]
    text: str
    loc: Location

    def word(self, *words: str) -> bool:
        return self.kind == "word" and self.text in words

    def punct(self, char: str) -> bool:
        return self.kind == "punct" and self.text == char


def _is_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0


def _continues(rest: str) -> bool:
    """Whether a line that failed ends with a '\\' (blanks and control characters after it
    are passed over: one of those may be the error).  A comment never continues."""
    quoted = escaped = False
    for ch in rest:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return False
    end = len(rest)
    while end and (rest[end - 1] in _SPACE or _is_control(rest[end - 1])):
        end -= 1
    return rest[:end].endswith("\\")


def _lex(text: str, file: str) -> Iterator[tuple[list[_Token], Location, ConfigError | None]]:
    """Yield each statement's tokens, the location of its end, and the error that makes it
    unreadable (or None).  After such an error the rest of its line is skipped and the
    statement ends there, even inside ``{ … }``: the next line is read as a new statement."""
    i = 0
    line = 1
    col = 1
    n = len(text)
    tokens: list[_Token] = []
    depth = 0
    error: ConfigError | None = None

    def to_newline(start: int) -> int:
        """The end of the line, or of the last line it continues with a trailing '\\' (an
        error ends the statement: what it continued into is not read as a new one)."""
        nonlocal line
        start = text.rfind("\n", 0, start) + 1  # the whole line: the '\\' may come before
        end = text.find("\n", start)
        while end >= 0 and _continues(text[start:end]):
            line += 1
            start = end + 1
            end = text.find("\n", start)
        return n if end < 0 else end

    def blank_to_newline(start: int) -> int:
        """Index of the newline if only blanks lie between start and it, else -1."""
        j = start
        while j < n and text[j] in _SPACE:
            j += 1
        return j if j < n and text[j] == "\n" else (j if j == n else -1)

    if text.startswith("\ufeff"):
        i = 1
    while i < n:
        c = text[i]
        if c == "\n":
            i += 1
            if depth == 0:
                yield tokens, Location(file, line, col), error
                tokens = []
                error = None
            line += 1
            col = 1
            continue
        if c in _SPACE:
            i += 1
            col += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == "\\":
            end = blank_to_newline(i + 1)
            if end >= 0:
                i = end + 1
                line += 1
                col = 1
                continue
        start = Location(file, line, col)
        if c == '"':
            i += 1
            col += 1
            chars: list[str] = []
            while True:
                if i >= n or text[i] == "\n":
                    error = error or ConfigError(
                        "unterminated quoted string",
                        start,
                        '"' + "".join(chars),
                        "close the quote on the same line, or end the line with '\\' "
                        "to continue it",
                    )
                    break
                ch = text[i]
                if ch == '"':
                    i += 1
                    col += 1
                    break
                if ch == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    chars.append(text[i + 1])
                    i += 2
                    col += 2
                    continue
                if ch == "\\" and i + 1 < n and text[i + 1] == "\n":
                    i += 2
                    line += 1
                    col = 1
                    continue
                if _is_control(ch) and ch != "\t":
                    error = error or ConfigError(
                        f"control character U+{ord(ch):04X} in a quoted string",
                        Location(file, line, col),
                        None,
                        "remove it; write text only",
                    )
                    break
                chars.append(ch)
                i += 1
                col += 1
            if error is not None:  # the rest of the line cannot be read: the statement ends
                i = to_newline(i)
                depth = 0
                continue
            tokens.append(_Token("string", "".join(chars), start))
            continue
        if c in _PUNCT:
            tokens.append(_Token("punct", c, start))
            if c == "{":
                depth += 1
            elif c == "}":
                depth = max(0, depth - 1)
            i += 1
            col += 1
            continue
        if _is_control(c):
            error = error or ConfigError(
                f"unexpected control character U+{ord(c):04X}", start, None, "remove it"
            )
            i = to_newline(i)
            depth = 0
            continue
        j = i
        while j < n:
            ch = text[j]
            if ch in _SPACE or ch == "\n" or ch in _PUNCT or ch in '"#' or _is_control(ch):
                break
            if ch == "\\" and j > i and blank_to_newline(j + 1) >= 0:
                break
            j += 1
        tokens.append(_Token("word", text[i:j], start))
        col += j - i
        i = j
    if tokens or error is not None:
        yield tokens, Location(file, line, col), error


# --- the parser -------------------------------------------------------------------------------


def _error(tok: _Token, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError(message, tok.loc, tok.text, hint)


def _refused(tok: _Token, what: str | None = None) -> ConfigError:
    subject = what or f"'{tok.text}'"
    hint = _REFUSAL_HINTS.get(tok.text, "remove it from the configuration for now")
    return _error(tok, f"{subject} is not supported yet", hint)


class _Cursor:
    def __init__(self, tokens: list[_Token], end: Location) -> None:
        self.tokens = tokens
        self.pos = 0
        self.end = end

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token | None:
        tok = self.peek()
        if tok is not None:
            self.pos += 1
        return tok

    def need(self, what: str, hint: str | None = None) -> _Token:
        tok = self.take()
        if tok is None:
            raise ConfigError(f"missing {what}", self.end, None, hint)
        return tok

    def finish(self, hint: str | None = None) -> None:
        tok = self.peek()
        if tok is not None:
            raise _error(tok, f"unexpected '{_shorten(tok.text)}'", hint)


def _value(tok: _Token, what: str) -> str:
    """A word or quoted string used as a value (a path, an address, a number)."""
    if tok.kind == "punct":
        raise _error(tok, f"expected {what}, found '{tok.text}'")
    return tok.text


def _name(tok: _Token, what: str) -> str:
    """A name: a quoted string, or a bare word that is not a keyword."""
    if tok.kind == "punct":
        raise _error(tok, f"expected {what}, found '{tok.text}'")
    if tok.kind == "word" and tok.text in KEYWORDS:
        raise _error(
            tok,
            f"'{tok.text}' is a keyword and cannot be used as {what} without quotes",
            f'write "{tok.text}"',
        )
    if not tok.text:
        raise _error(tok, f"{what} cannot be empty")
    return tok.text


def _number(tok: _Token, what: str, low: int, high: int) -> int:
    text = _value(tok, what)
    if not _NUMBER.match(text) or len(text) > 12:
        raise _error(tok, f"{what} must be a number from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise _error(tok, f"{what} must be a number from {low} to {high}")
    return number


def _duration(tok: _Token, what: str) -> int:
    text = _value(tok, what)
    match = _DURATION.match(text)
    if match is None or len(match.group(1)) > 12:
        hint = "write a number with s, m, h or d, such as 4h or 4d"
        if text[-1:] in ("S", "M", "H", "D"):
            hint = f"units are lowercase: write '{text[:-1]}{text[-1].lower()}'"
        elif text[-1:] == "w":
            hint = "weeks are not a unit; write days, such as 7d"
        raise _error(tok, f"{what} is not a valid duration", hint)
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise _error(tok, f"{what} must be longer than zero")
    if seconds > MAX_DURATION:
        raise _error(tok, f"{what} is too long", "the longest duration is 3650d")
    return seconds


def _size(tok: _Token, what: str) -> int:
    text = _value(tok, what)
    match = _SIZE.match(text)
    if match is None or len(match.group(1)) > 15:
        hint = "write bytes, or a number with K, M or G, such as 35M"
        if len(text) > 2 and text[-1] in "bB" and text[-2] in "kKmMgG":
            hint = f"write '{text[:-1]}' (K, M and G are binary multiples)"
        raise _error(tok, f"{what} is not a valid size", hint)
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    if size <= 0:
        raise _error(tok, f"{what} must be larger than zero")
    if size > MAX_SIZE:
        raise _error(tok, f"{what} is too large", "the largest size is 1024G")
    return size


def _check_format(tok: _Token, path: str) -> None:
    """Check the %{…} specifiers of a delivery path template with the delivery's own reader."""
    try:
        check_format(path)
    except FormatError as err:
        if err.word == "%{":
            raise _error(
                tok, "unterminated '%{' in path", "close it with '}', as in %{user.username}"
            ) from None
        if err.choices:
            hint = _suggest(err.word, list(err.choices)) or "known: " + ", ".join(err.choices)
        else:
            hint = "a slice is [START:END], as in %{rcpt.user[0:-4]}; modifiers follow it: " + (
                ", ".join(f":{m}" for m in FORMAT_MODIFIERS)
            )
        raise _error(tok, f"{err} in path", hint) from None


def _listen_address(tok: _Token) -> str:
    text = _value(tok, "an address after 'on'")
    if tok.kind == "word" and text in KEYWORDS and text not in _LISTEN_ADDRESSES:
        raise _error(
            tok,
            "missing address after 'on'",
            "write 'listen on localhost', 'listen on all', an IP address or an interface",
        )
    if text in _LISTEN_ADDRESSES:
        return text
    if text.startswith("[") and text.endswith("]"):
        raise _error(
            tok, "invalid listen address", f"write IPv6 addresses without brackets: {text[1:-1]}"
        )
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return text
    if len(text) > 253 or not _INTERFACE.match(text):
        raise _error(
            tok,
            "invalid listen address",
            "write localhost, all, socket, an IP address or an interface name",
        )
    return text


def _looks_like_path(tok: _Token) -> bool:
    """A bare word right after a delivery method is its path when it looks like one."""
    return tok.kind == "word" and tok.text not in KEYWORDS and tok.text[:1] in ("/", "~", "%", ".")


@dataclass
class _Ref:
    tok: _Token
    kind: Literal["table", "action"]
    role: str
    seq: int  # the statement it is in, in reading order


class _Consequence(ConfigError):
    """A statement that fails only because of an error already reported (a macro whose
    definition failed): it is dropped without a second message."""


class _TooManyErrors(Exception):
    """MAX_ERRORS were found: reading stops."""


class _Parser:
    def __init__(self, main_path: str) -> None:
        self.main_path = main_path
        self.macros: dict[str, str] = {}
        self.tables: dict[str, Table] = {}
        self.table_locs: dict[str, Location] = {}
        self.listeners: list[Listener] = []
        self.listen_hosts: list[tuple[Listener, list[str]]] = []  # what each one binds
        self.actions: dict[str, Action] = {}
        self.matches: list[Match] = []
        self.refs: list[_Ref] = []
        self.globals_at: dict[str, Location] = {}
        self.warnings: list[ConfigWarning] = []
        self.stack: list[str] = []
        # every error, with the number of its statement in reading order (references are
        # checked at the end, and reported in the place of the statement they are in)
        self.errors: list[tuple[int, ConfigError]] = []
        self.seq = 0
        # names whose declaration failed: their uses are not errors of their own
        self.failed: dict[str, set[str]] = {"table": set(), "action": set(), "macro": set()}
        self.stopped = False  # reading stopped at an error past MAX_ERRORS
        self.checking_refs = False
        self.incomplete = False  # an include could not be read: any name may be declared there
        self.queue_ttl = 4 * 86400
        self.bounce_warn_interval = [4 * 3600]
        self.max_message_size = 35 * 1024 * 1024
        self.max_mails = 100
        self.max_rcpt = 1000
        self.sub_addr_delim = "+"

    # files and statements

    def parse_text(self, text: str, file: str, real: str) -> None:
        """Read every statement; one that fails is recorded and reading goes on with the next."""
        self.stack.append(real)
        base = os.path.dirname(real) if real else _cwd()
        for tokens, end, error in _lex(text, file):
            if not tokens and error is None:
                continue
            self.seq += 1
            seq, refs = self.seq, len(self.refs)
            try:
                if error is not None:
                    raise error
                self.statement(tokens, end, base)
            except ConfigError as err:
                del self.refs[refs:]  # what a failed statement refers to is not checked
                self.declaration_failed(tokens)
                self.fail(seq, err)
        self.stack.pop()

    def fail(self, seq: int, err: ConfigError) -> None:
        """Record an error; one more than MAX_ERRORS while reading stops the reading (the
        references, checked once all is read, are all recorded, then sorted in)."""
        if isinstance(err, _Consequence):
            return
        self.errors.append((seq, err))
        if len(self.errors) > MAX_ERRORS and not self.checking_refs:
            self.stopped = True
            raise _TooManyErrors

    def declaration_failed(self, tokens: list[_Token]) -> None:
        """Remember the name a failed table, action or macro statement declares."""
        if len(tokens) >= 2 and tokens[0].kind == "word" and tokens[1].punct("="):
            if _MACRO_NAME.match(tokens[0].text) and tokens[0].text not in KEYWORDS:
                self.macros.pop(tokens[0].text, None)
                self.failed["macro"].add(tokens[0].text)
            return
        if len(tokens) < 2 or not tokens[0].word("table", "action"):
            return
        name: str | None = tokens[1].text
        if tokens[1].kind == "punct":
            return
        if tokens[1].kind == "word" and tokens[1].text.startswith("$"):
            name = self.macros.get(tokens[1].text[1:])
        if name is not None:
            self.failed[tokens[0].text].add(name)

    def statement(self, raw: list[_Token], end: Location, base: str) -> None:
        if len(raw) >= 2 and raw[0].kind == "word" and raw[1].punct("="):
            self.define(raw, end)
            return
        tokens = self.expand(raw)
        if not tokens:
            return
        cur = _Cursor(tokens, end)
        head = cur.need("a statement")
        if head.word("include"):
            self.include(cur, base)
        elif head.word("table"):
            self.table(cur, base)
        elif head.word("listen"):
            self.listen(cur)
        elif head.word("action"):
            self.action(cur)
        elif head.word("match"):
            self.match(cur, head)
        elif head.word("queue"):
            self.queue(cur)
        elif head.word("bounce"):
            self.bounce(cur)
        elif head.word("smtp"):
            self.smtp(cur)
        elif head.word(*_TOP_REFUSED):
            raise _refused(head)
        elif head.kind == "word":
            hint = _suggest(head.text, _TOP)
            if hint is None and head.text.startswith("$"):
                hint = "macros are used as values; define one with NAME = value"
            raise _error(head, f"unknown keyword '{_shorten(head.text)}'", hint)
        elif head.kind == "string":
            raise _error(
                head,
                "a statement must start with a keyword, not a quoted string",
                "statements start with table, listen, action, match, queue, bounce, smtp "
                "or include",
            )
        else:
            raise _error(head, f"unexpected '{head.text}'")

    def define(self, raw: list[_Token], end: Location) -> None:
        name_tok = raw[0]
        name = name_tok.text
        if name in KEYWORDS:
            raise _error(name_tok, f"'{name}' is a keyword and cannot be a macro name")
        if not _MACRO_NAME.match(name):
            raise _error(
                name_tok,
                "invalid macro name",
                "macro names are letters, digits and '_': write NAME = value, use $NAME",
            )
        values = self.expand(raw[2:])
        if not values:
            raise ConfigError(f"missing value for macro '{name}'", end, None, f'{name} = "value"')
        if len(values) > 1 or values[0].kind == "punct":
            raise _error(
                values[1] if len(values) > 1 else values[0],
                f"the value of macro '{name}' must be one word or a quoted string",
                "put the value in double quotes",
            )
        self.macros[name] = values[0].text

    def expand(self, tokens: list[_Token]) -> list[_Token]:
        out: list[_Token] = []
        for tok in tokens:
            if tok.kind != "word" or not tok.text.startswith("$"):
                out.append(tok)
                continue
            name = tok.text[1:]
            if not _MACRO_NAME.match(name):
                raise _error(tok, "invalid macro reference", "quote the text to use a literal '$'")
            if name not in self.macros and (name in self.failed["macro"] or self.incomplete):
                raise _Consequence(f"macro '{name}' is not defined", tok.loc, tok.text)
            if name not in self.macros:
                self.failed["macro"].add(name)  # reported here, at its first use only
                close = difflib.get_close_matches(name, sorted(self.macros), n=1)
                hint = (
                    f"did you mean '${close[0]}'?"
                    if close
                    else f'define it first with {name} = "value", or quote the text to use '
                    "a literal '$'"
                )
                raise _error(tok, f"undefined macro '${name}'", hint)
            for part, _, error in _lex(self.macros[name], tok.loc.file):
                if error is not None:
                    raise _error(tok, f"in the value of macro '{name}': {error.message}")
                out.extend(_Token(p.kind, p.text, tok.loc) for p in part)
        return out

    def include(self, cur: _Cursor, base: str) -> None:
        path_tok = cur.need("a file name after 'include'", 'include "/etc/homemail/more.conf"')
        path = _value(path_tok, "a file name")
        cur.finish()
        if not path:
            raise _error(path_tok, "empty file name after 'include'")
        full = path if os.path.isabs(path) else os.path.join(base, path)
        try:
            real = os.path.realpath(full)
        except (OSError, ValueError) as err:
            raise _error(path_tok, f"cannot read included file: {err}") from None
        if real in self.stack:
            chain = " -> ".join([*self.stack[self.stack.index(real) :], real])
            raise _error(path_tok, f"include loop: {chain}", "remove one of the includes")
        if len(self.stack) >= MAX_INCLUDE_DEPTH:
            raise _error(path_tok, f"includes nested more than {MAX_INCLUDE_DEPTH} deep")
        try:
            text = _read_config(full, path_tok)
        except ConfigError:
            self.incomplete = True
            raise
        self.parse_text(text, full, real)

    # table

    def table(self, cur: _Cursor, base: str) -> None:
        name_tok = cur.need("a table name after 'table'", "table NAME file:/path")
        name = _name(name_tok, "a table name")
        if name in self.tables:
            raise _error(
                name_tok,
                f"table '{name}' is already declared at {self.table_locs[name]}",
                "give each table its own name",
            )
        src = cur.need(
            "a file or '{ … }' after the table name",
            f"table {name} file:/path, or table {name} {{ a, b }}",
        )
        if src.punct("{"):
            table = self.inline_table(cur, name, src)
        else:
            table = self.file_table(src, name, base)
        cur.finish()
        self.tables[name] = table
        self.table_locs[name] = name_tok.loc

    def file_table(self, src: _Token, name: str, base: str) -> Table:
        text = _value(src, "a file or '{ … }'")
        backend = _BACKEND.match(text)
        path = text
        if backend is not None:
            scheme = backend.group(1)
            if scheme == "file":
                path = backend.group(2)
            elif scheme in _TABLE_BACKENDS_REFUSED:
                raise _error(
                    src, f"table backend '{scheme}' is not supported yet", "use a file: table"
                )
            else:
                raise _error(
                    src,
                    f"unknown table backend '{scheme}'",
                    _suggest(scheme, ["file"]) or "write file:PATH for a file table",
                )
        if not path:
            raise _error(src, "empty file name for the table", f"table {name} file:/path")
        full = path if os.path.isabs(path) else os.path.join(base, path)
        try:
            return Table.from_file(name, full)
        except TableError as err:
            hint = None
            if err.line is None and not os.path.isabs(path):
                hint = f"relative paths are taken from {base}"
            elif err.line is not None:
                hint = f"fix line {err.line} of {err.path}"
            raise _error(src, f"cannot load table '{name}': {err}", hint) from None

    def inline_table(self, cur: _Cursor, name: str, open_tok: _Token) -> Table:
        values: list[str] = []
        pairs: list[tuple[str, str]] = []
        seen: dict[str, _Token] = {}
        first_kind: str | None = None
        previous = open_tok
        need_comma = False
        missing = f"'}}' to close the table opened at {open_tok.loc}"
        while True:
            tok = cur.need(missing)
            if tok.punct("}"):
                break
            if tok.punct(","):
                if not need_comma:
                    raise _error(tok, "unexpected ','", "write entries as { a, b }")
                need_comma = False
                previous = tok
                continue
            if need_comma:
                hint = "separate entries with ','"
                if tok.loc.line != previous.loc.line:
                    hint = f"missing '}}' to close the table opened at {open_tok.loc}?"
                raise _error(tok, "expected ',' or '}'", hint)
            key = _value(tok, "a table entry")
            if not key:
                raise _error(tok, "empty table entry")
            nxt = cur.peek()
            if nxt is not None and nxt.punct("="):
                cur.take()
                value_tok = cur.need(f"a value after '{_shorten(key)} ='")
                value = _value(value_tok, "a value")
                if not value:
                    raise _error(value_tok, "empty value in table")
                kind = "map"
                if first_kind == "list":
                    raise _error(tok, "this table mixes list values and key = value pairs")
                lower = key.lower()
                if lower in seen:
                    raise _error(
                        tok,
                        f"key '{_shorten(key)}' is given twice in table '{name}'",
                        f"the first is at {seen[lower].loc}",
                    )
                seen[lower] = tok
                pairs.append((key, value))
                previous = value_tok
            else:
                kind = "list"
                if first_kind == "map":
                    raise _error(tok, "this table mixes list values and key = value pairs")
                values.append(key)
                previous = tok
            first_kind = kind
            need_comma = True
        if first_kind is None:
            raise _error(open_tok, f"table '{name}' is empty", f"table {name} {{ a, b }}")
        if first_kind == "map":
            return Table.inline_map(name, pairs)
        return Table.inline_list(name, values)

    # listen

    def listen(self, cur: _Cursor) -> None:
        on = cur.need("'on' after 'listen'", "listen on localhost")
        if not on.word("on"):
            raise _error(on, "expected 'on' after 'listen'", f"listen on {_shorten(on.text)}")
        addr_tok = cur.need(
            "address after 'on'", "write 'listen on localhost', 'listen on all' or an address"
        )
        address = _listen_address(addr_tok)
        port: int | None = None
        hostname: str | None = None
        tag: str | None = None
        mask_src = False
        seen: dict[str, _Token] = {}
        while (tok := cur.take()) is not None:
            if tok.word(*_LISTEN_OPTIONS):
                if tok.text in seen:
                    raise _error(tok, f"'{tok.text}' is given twice", "keep only one")
                seen[tok.text] = tok
            if tok.word("port"):
                if address == "socket":
                    raise _error(tok, "'port' makes no sense for 'listen on socket'")
                port = _number(cur.need("port number after 'port'"), "the port", 1, 65535)
            elif tok.word("hostname"):
                host_tok = cur.need("a host name after 'hostname'", "hostname mail.example.org")
                hostname = _value(host_tok, "a host name")
                if len(hostname) > 253 or not _HOSTNAME.match(hostname):
                    raise _error(host_tok, "invalid host name", "hostname mail.example.org")
            elif tok.word("tag"):
                tag = _name(cur.need("a tag name after 'tag'"), "a tag name")
            elif tok.word("mask-src"):
                mask_src = True
            elif tok.word(*_LISTEN_REFUSED):
                raise _refused(tok)
            else:
                raise _error(
                    tok,
                    f"unknown listen option '{_shorten(tok.text)}'",
                    _suggest(tok.text, _LISTEN_OPTIONS + _LISTEN_REFUSED)
                    or "listen options are port, hostname, tag and mask-src",
                )
        for other in self.listeners:
            if (other.address, other.port) == (address, port):
                raise _error(
                    addr_tok,
                    "this listener is declared twice",
                    f"the first is at {other.location}",
                )
        listener = Listener(address, port, hostname, tag, mask_src, addr_tok.loc)
        if address != "socket":
            try:
                hosts = listen_hosts(address)
            except ValueError as err:
                raise _error(addr_tok, str(err), _listen_hint()) from None
            _check_overlaps(self.listen_hosts, listener, hosts, None)
            self.listen_hosts.append((listener, hosts))
        self.listeners.append(listener)

    # action

    def action(self, cur: _Cursor) -> None:
        name_tok = cur.need("an action name after 'action'", 'action "local" maildir')
        name = _name(name_tok, "an action name")
        if name in self.actions:
            raise _error(
                name_tok,
                f"action '{name}' is already declared at {self.actions[name].location}",
                "give each action its own name",
            )
        meth = cur.need(f"a delivery method after action '{name}'", "maildir or mbox")
        method: Literal["maildir", "mbox"]
        if meth.word("maildir"):
            method = "maildir"
        elif meth.word("mbox"):
            method = "mbox"
        elif meth.word(*_METHODS_REFUSED):
            raise _refused(meth, f"delivery method '{meth.text}'")
        else:
            raise _error(
                meth,
                f"unknown delivery method '{_shorten(meth.text)}'",
                _suggest(meth.text, _METHODS + _METHODS_REFUSED) or "use maildir or mbox",
            )
        path: str | None = None
        nxt = cur.peek()
        if nxt is not None and (nxt.kind == "string" or _looks_like_path(nxt)):
            cur.take()
            path = nxt.text
            if not path:
                raise _error(nxt, "empty path", f'{method} "~/Maildir"')
            if path.startswith("~") and path != "~" and not path.startswith("~/"):
                raise _error(
                    nxt,
                    "only '~/' is expanded in a delivery path",
                    "'~/' is the recipient's home; write other users' paths in full",
                )
            if method == "mbox" and path.rstrip("/") in ("~", ""):
                raise _error(nxt, "an mbox is a file, not the home directory", 'mbox "~/mbox"')
            _check_format(nxt, path)
        alias: str | None = None
        ttl: int | None = None
        seen: set[str] = set()
        while (tok := cur.take()) is not None:
            if tok.word(*_ACTION_OPTIONS):
                if tok.text in seen:
                    raise _error(tok, f"'{tok.text}' is given twice", "keep only one")
                seen.add(tok.text)
            if tok.word("alias"):
                alias = self.table_ref(cur, tok, "alias")
            elif tok.word("ttl"):
                ttl = _duration(cur.need("a duration after 'ttl'", "ttl 4d"), "the ttl")
            elif tok.word(*_ACTION_REFUSED, *_METHODS_REFUSED):
                raise _refused(tok)
            else:
                if tok.kind == "string" or _looks_like_path(tok):
                    hint: str | None = "an action has one path, right after its method"
                else:
                    hint = _suggest(tok.text, _ACTION_OPTIONS + _ACTION_REFUSED)
                raise _error(
                    tok,
                    f"unknown action option '{_shorten(tok.text)}'",
                    hint or "action options are alias and ttl; quote a path",
                )
        self.actions[name] = Action(name, method, path, alias, ttl, name_tok.loc)

    def table_ref(self, cur: _Cursor, after: _Token, role: str) -> str:
        example = f"{after.text} <NAME>"
        open_tok = cur.need(f"a table after '{after.text}'", example)
        if not open_tok.punct("<"):
            hint = example
            if open_tok.kind != "punct":
                hint = f"declare a table and refer to it: {after.text} <{_shorten(open_tok.text)}>"
                if role in ("src", "domain", "rcpt-to"):
                    hint = (
                        f"declare a table (table mytable {{ {_shorten(open_tok.text)} }}) "
                        f"and write '{after.text} <mytable>'"
                    )
            raise _error(
                open_tok, f"expected a table reference like '<NAME>' after '{after.text}'", hint
            )
        name_tok = cur.need("a table name after '<'", example)
        name = _value(name_tok, "a table name")
        if not name:
            raise _error(name_tok, "empty table name")
        close = cur.need("'>' after the table name", example)
        if not close.punct(">"):
            raise _error(close, "expected '>' after the table name", example)
        self.refs.append(_Ref(name_tok, "table", role, self.seq))
        return name

    # match

    def match(self, cur: _Cursor, head: _Token) -> None:
        from_kind: Literal["any", "local", "src", "socket"] = "local"
        from_negate = False
        from_table: str | None = None
        for_kind: Literal["any", "local", "domain", "rcpt-to"] = "local"
        for_negate = False
        for_table: str | None = None
        tag: str | None = None
        tag_negate = False
        action: str | None = None
        reject = False
        seen: dict[str, _Token] = {}
        while (tok := cur.take()) is not None:
            negate = False
            if tok.punct("!"):
                negate = True
                tok = cur.need("'from', 'for' or 'tag' after '!'")
                if tok.word(*_MATCH_REFUSED):
                    raise _refused(tok)
                if not tok.word("from", "for", "tag"):
                    raise _error(tok, "'!' can only negate 'from', 'for' or 'tag'")
            if tok.word(*_MATCH_OPTIONS):
                key = "action" if tok.text == "reject" else tok.text
                if key in seen:
                    first = seen[key]
                    if first.text != tok.text:
                        raise _error(
                            tok, "a match rule takes either 'action NAME' or 'reject', not both"
                        )
                    raise _error(tok, f"'{tok.text}' is given twice", "keep only one")
                seen[key] = tok
            if tok.word("from"):
                kind_tok = cur.need("a source after 'from'", "from any, from local, from src <T>")
                if kind_tok.word("any"):
                    from_kind = "any"
                elif kind_tok.word("local"):
                    from_kind = "local"
                elif kind_tok.word("socket"):
                    from_kind = "socket"
                elif kind_tok.word("src"):
                    from_kind = "src"
                    from_table = self.table_ref(cur, kind_tok, "src")
                elif kind_tok.word(*_FROM_REFUSED):
                    raise _refused(kind_tok, f"'from {kind_tok.text}'")
                else:
                    raise _error(
                        kind_tok,
                        f"unknown source '{_shorten(kind_tok.text)}' after 'from'",
                        _suggest(kind_tok.text, _FROM_KINDS + _FROM_REFUSED)
                        or "write from any, from local, from socket or from src <TABLE>",
                    )
                if negate and from_kind == "any":
                    raise _error(tok, "'!from any' never matches", "remove the rule")
                from_negate = negate
            elif tok.word("for"):
                kind_tok = cur.need(
                    "a destination after 'for'", "for any, for local, for domain <T>"
                )
                if kind_tok.word("any"):
                    for_kind = "any"
                elif kind_tok.word("local"):
                    for_kind = "local"
                elif kind_tok.word("domain"):
                    for_kind = "domain"
                    for_table = self.table_ref(cur, kind_tok, "domain")
                elif kind_tok.word("rcpt-to"):
                    for_kind = "rcpt-to"
                    for_table = self.table_ref(cur, kind_tok, "rcpt-to")
                else:
                    raise _error(
                        kind_tok,
                        f"unknown destination '{_shorten(kind_tok.text)}' after 'for'",
                        _suggest(kind_tok.text, _FOR_KINDS)
                        or "write for any, for local, for domain <TABLE> or for rcpt-to <TABLE>",
                    )
                if negate and for_kind == "any":
                    raise _error(tok, "'!for any' never matches", "remove the rule")
                for_negate = negate
            elif tok.word("tag"):
                tag = _name(cur.need("a tag name after 'tag'"), "a tag name")
                tag_negate = negate
            elif tok.word("action"):
                name_tok = cur.need("an action name after 'action'", 'action "local"')
                action = _name(name_tok, "an action name")
                self.refs.append(_Ref(name_tok, "action", "match", self.seq))
            elif tok.word("reject"):
                reject = True
            elif tok.word(*_MATCH_REFUSED):
                raise _refused(tok)
            else:
                raise _error(
                    tok,
                    f"unknown match option '{_shorten(tok.text)}'",
                    _suggest(tok.text, _MATCH_OPTIONS + _MATCH_REFUSED)
                    or "match options are from, for, tag, action and reject",
                )
        if action is None and not reject:
            raise ConfigError(
                "a match rule needs 'action NAME' or 'reject'",
                cur.end,
                None,
                'match from local for local action "local"',
            )
        self.matches.append(
            Match(
                from_kind,
                from_negate,
                from_table,
                for_kind,
                for_negate,
                for_table,
                tag,
                tag_negate,
                action,
                reject,
                head.loc,
            )
        )

    # globals

    def set_global(self, key: str, tok: _Token) -> None:
        if key in self.globals_at:
            self.warnings.append(
                ConfigWarning(
                    tok.loc,
                    f"'{key}' is set again; the value from {self.globals_at[key]} is replaced",
                )
            )
        self.globals_at[key] = tok.loc

    def queue(self, cur: _Cursor) -> None:
        tok = cur.need("a queue option after 'queue'", "queue ttl 4d")
        if tok.word("ttl"):
            self.queue_ttl = _duration(
                cur.need("a duration after 'ttl'", "queue ttl 4d"), "the queue ttl"
            )
            self.set_global("queue ttl", tok)
        elif tok.word(*_QUEUE_REFUSED):
            raise _refused(tok)
        else:
            raise _error(
                tok,
                f"unknown queue option '{_shorten(tok.text)}'",
                _suggest(tok.text, _QUEUE_OPTIONS + _QUEUE_REFUSED) or "queue ttl 4d",
            )
        cur.finish()

    def bounce(self, cur: _Cursor) -> None:
        tok = cur.need("a bounce option after 'bounce'", "bounce warn-interval 4h")
        if not tok.word("warn-interval"):
            raise _error(
                tok,
                f"unknown bounce option '{_shorten(tok.text)}'",
                _suggest(tok.text, _BOUNCE_OPTIONS) or "bounce warn-interval 4h",
            )
        values: list[int] = []
        first = cur.need("a duration after 'warn-interval'", "bounce warn-interval 4h")
        values.append(_duration(first, "the warn-interval"))
        while (sep := cur.take()) is not None:
            if not sep.punct(","):
                raise _error(
                    sep,
                    "expected ',' between warn-interval durations",
                    "bounce warn-interval 1h, 4h",
                )
            dur_tok = cur.need("a duration after ','")
            if len(values) == 4:
                raise _error(dur_tok, "at most four warn-interval durations")
            values.append(_duration(dur_tok, "the warn-interval"))
        self.bounce_warn_interval = values
        self.set_global("bounce warn-interval", tok)

    def smtp(self, cur: _Cursor) -> None:
        tok = cur.need("an smtp option after 'smtp'", "smtp max-message-size 35M")
        if tok.word("max-message-size"):
            self.max_message_size = _size(
                cur.need("a size after 'max-message-size'", "smtp max-message-size 35M"),
                "the max-message-size",
            )
            self.set_global("smtp max-message-size", tok)
        elif tok.word("limit"):
            seen: set[str] = set()
            while (opt := cur.take()) is not None:
                if opt.text in seen and opt.word(*_LIMIT_OPTIONS):
                    raise _error(opt, f"'{opt.text}' is given twice", "keep only one")
                if opt.word("max-mails"):
                    self.max_mails = _number(
                        cur.need("a number after 'max-mails'"), "max-mails", 1, MAX_COUNT
                    )
                    self.set_global("smtp limit max-mails", opt)
                elif opt.word("max-rcpt"):
                    self.max_rcpt = _number(
                        cur.need("a number after 'max-rcpt'"), "max-rcpt", 1, MAX_COUNT
                    )
                    self.set_global("smtp limit max-rcpt", opt)
                else:
                    raise _error(
                        opt,
                        f"unknown smtp limit '{_shorten(opt.text)}'",
                        _suggest(opt.text, _LIMIT_OPTIONS)
                        or "smtp limit max-mails 100 max-rcpt 1000",
                    )
                seen.add(opt.text)
            if not seen:
                raise ConfigError(
                    "missing limit after 'smtp limit'",
                    cur.end,
                    None,
                    "smtp limit max-mails 100 max-rcpt 1000",
                )
        elif tok.word("sub-addr-delim"):
            delim_tok = cur.need("a character after 'sub-addr-delim'", "smtp sub-addr-delim +")
            delim = _value(delim_tok, "a character")
            if len(delim) != 1 or delim not in _SUB_ADDR_DELIMS:
                raise _error(
                    delim_tok,
                    "sub-addr-delim must be a single character that is not a letter, a digit "
                    "or '@'",
                    f"one of {_SUB_ADDR_DELIMS} (quote '#', '=', '!' and braces)",
                )
            self.sub_addr_delim = delim
            self.set_global("smtp sub-addr-delim", tok)
        elif tok.word(*_SMTP_REFUSED):
            raise _refused(tok)
        else:
            raise _error(
                tok,
                f"unknown smtp option '{_shorten(tok.text)}'",
                _suggest(tok.text, _SMTP_OPTIONS + _SMTP_REFUSED)
                or "smtp options are max-message-size, limit and sub-addr-delim",
            )
        cur.finish()

    # the end

    def check_refs(self) -> None:
        """Check every reference; a name that is unknown is reported once, at its first use,
        and not at all when its declaration failed (that error says it all)."""
        unknown: set[tuple[str, str]] = set()
        self.checking_refs = True
        for ref in self.refs:
            try:
                self.check_ref(ref, unknown)
            except ConfigError as err:
                self.fail(ref.seq, err)

    def check_ref(self, ref: _Ref, unknown: set[tuple[str, str]]) -> None:
        name = ref.tok.text
        declared = self.actions if ref.kind == "action" else self.tables
        if name not in declared:
            if name in self.failed[ref.kind] or self.incomplete or (ref.kind, name) in unknown:
                return
            unknown.add((ref.kind, name))
            if ref.kind == "action":
                raise _error(
                    ref.tok,
                    f"unknown action '{_shorten(name)}'",
                    _suggest(name, sorted(self.actions))
                    or f'declare it: action "{_shorten(name)}" maildir',
                )
            raise _error(
                ref.tok,
                f"unknown table '{_shorten(name)}'",
                _suggest(name, sorted(self.tables))
                or f"declare it: table {_shorten(name)} file:/path",
            )
        if ref.kind == "table":
            table = self.tables[name]
            if ref.role == "alias" and table.kind != "map" and table.entries():
                raise _error(
                    ref.tok,
                    f"table '{name}' is a list, but 'alias' needs a map",
                    "write one 'name: value' entry a line",
                )
            if ref.role == "src":
                for entry in table.entries():
                    try:
                        ipaddress.ip_network(entry, strict=False)
                    except ValueError:
                        raise _error(
                            ref.tok,
                            f"table '{name}' is used with 'from src' but "
                            f"'{_shorten(entry)}' is not an address or network",
                            "a src table lists IP addresses or networks such as 192.168.1.0/24",
                        ) from None

    def config(self) -> Config:
        """The configuration read, or ConfigError (ConfigErrors for several) with every error."""
        if not self.stopped:  # (what was not read may declare the names used before it)
            self.check_refs()
        if self.errors:
            errors = [err for _, err in sorted(self.errors, key=lambda item: item[0])]
            if len(errors) > MAX_ERRORS:
                first_not_shown = errors[MAX_ERRORS].location
                errors = errors[:MAX_ERRORS]
                errors.append(
                    ConfigError(
                        f"more than {MAX_ERRORS} errors: "
                        + ("stopped reading here" if self.stopped else "the rest are not shown"),
                        first_not_shown,
                    )
                )
            raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
        cfg = Config(
            path=self.main_path,
            tables=self.tables,
            listeners=self.listeners,
            actions=self.actions,
            matches=self.matches,
            queue_ttl=self.queue_ttl,
            bounce_warn_interval=self.bounce_warn_interval,
            max_message_size=self.max_message_size,
            max_mails=self.max_mails,
            max_rcpt=self.max_rcpt,
            sub_addr_delim=self.sub_addr_delim,
        )
        warnings = list(self.warnings)
        used_tables = {a.alias for a in cfg.actions.values()}
        used_tables |= {m.from_table for m in cfg.matches} | {m.for_table for m in cfg.matches}
        for name in cfg.tables:
            if name not in used_tables:
                warnings.append(ConfigWarning(self.table_locs[name], f"table '{name}' is unused"))
        used_actions = {m.action for m in cfg.matches}
        for name, act in cfg.actions.items():
            if name not in used_actions:
                warnings.append(
                    ConfigWarning(
                        act.location, f"action '{name}' is unused: no match rule refers to it"
                    )
                )
        warnings.extend(open_relay_warnings(cfg))
        cfg.warnings = warnings
        return cfg


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:
        return "/"


def _read_config(path: str, tok: _Token | None) -> str:
    try:
        data = read_regular_file(path, MAX_CONFIG_FILE_SIZE)
    except OSError as err:
        reason = err.strerror or str(err)
        if tok is None:
            raise ConfigError(f"cannot read configuration file '{path}': {reason}") from None
        raise _error(tok, f"cannot read included file '{path}': {reason}") from None
    except ValueError as err:
        if tok is None:
            raise ConfigError(f"cannot read configuration file '{path}': {err}") from None
        raise _error(tok, f"cannot read included file '{path}': {err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        line_start = data.rfind(b"\n", 0, err.start) + 1
        column = len(data[line_start : err.start].decode("utf-8", "replace")) + 1
        raise ConfigError(
            "the file is not valid UTF-8",
            Location(path, line, column),
            None,
            "save the configuration as UTF-8",
        ) from None


# --- entry points -----------------------------------------------------------------------------


def parse_file(path: str) -> Config:
    """Read and check a configuration file; raise ``ConfigError`` on any problem."""
    text = _read_config(path, None)
    return _parse(text, path, os.path.realpath(path))


def parse_string(text: str, filename: str = "<embedded>") -> Config:
    """Parse configuration text; ``filename`` names it in messages and anchors relative paths."""
    try:
        real = os.path.realpath(filename) if filename != "<embedded>" else ""
    except (OSError, ValueError):
        real = ""
    return _parse(text, filename, real)


def _parse(text: str, filename: str, real: str) -> Config:
    parser = _Parser(filename)
    with contextlib.suppress(_TooManyErrors):
        parser.parse_text(text, filename, real)
    return parser.config()


def open_relay_warnings(cfg: Config) -> list[ConfigWarning]:
    """Warn about rules that take mail from anywhere for any domain."""
    warnings: list[ConfigWarning] = []
    for rule in cfg.matches:
        if rule.reject or rule.action is None:
            continue
        if rule.from_kind != "any" or rule.from_negate:
            continue
        if rule.for_kind != "any" or rule.for_negate:
            continue
        action = cfg.actions.get(rule.action)
        method: str = action.method if action is not None else ""
        if method == "relay":
            message = (
                f"open relay: this rule relays mail from anywhere to any domain "
                f"(action '{rule.action}'); use 'from local' or 'from src <TABLE>'"
            )
        else:
            message = (
                f"this rule accepts mail for every domain from anywhere "
                f"(action '{rule.action}'); use 'for local' or 'for domain <TABLE>'"
            )
        warnings.append(ConfigWarning(rule.location, message))
    return warnings


# --- listen addresses -------------------------------------------------------------------------


def listen_hosts(address: str) -> list[str]:
    """The numeric addresses ``listen on ADDRESS`` binds; raises ValueError with the reason.

    ``localhost`` is 127.0.0.1 and ::1, ``all`` the wildcards 0.0.0.0 and :: (each IPv6 one
    where IPv6 works), an IP address itself, an interface name its addresses (IPv6 link-local
    ones with their ``%SCOPE``), and any other name the addresses it resolves to.  The
    configuration check and the daemon's bind both ask this, so what passes the one is what
    the other binds.
    """
    if address == "localhost":
        return ["127.0.0.1", "::1"] if _ipv6_usable("::1") else ["127.0.0.1"]
    if address == "all":
        return ["0.0.0.0", "::"] if _ipv6_usable("::") else ["0.0.0.0"]
    try:
        return [str(ipaddress.ip_address(address))]
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", address):
        raise ValueError(f"'{address}' is not a valid IPv4 address")
    try:
        socket.if_nametoindex(address)
    except OSError:
        pass
    else:
        found = interface_addresses(address)
        if not found:
            raise ValueError(f"interface '{address}' has no IP address")
        return found
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ValueError(
            f"'{address}' is neither a network interface, an IP address nor a host name that "
            "resolves"
        ) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _listen_hint() -> str:
    try:
        names = sorted(name for _, name in socket.if_nameindex())
    except OSError:
        names = []
    known = f" (interfaces here: {', '.join(names)})" if names else ""
    return f"write localhost, all, an IP address, an interface name{known} or a host name"


def _ipv6_usable(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def interface_addresses(name: str) -> list[str]:
    """The IPv4 and IPv6 addresses of a network interface, as getifaddrs(3) lists them."""
    import ctypes

    class IfAddrs(ctypes.Structure):
        pass

    IfAddrs._fields_ = [
        ("ifa_next", ctypes.POINTER(IfAddrs)),
        ("ifa_name", ctypes.c_char_p),
        ("ifa_flags", ctypes.c_uint),
        ("ifa_addr", ctypes.c_void_p),
        ("ifa_netmask", ctypes.c_void_p),
        ("ifa_dstaddr", ctypes.c_void_p),
        ("ifa_data", ctypes.c_void_p),
    ]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        getifaddrs, freeifaddrs = libc.getifaddrs, libc.freeifaddrs
    except (OSError, AttributeError):
        return []
    head = ctypes.POINTER(IfAddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        return []
    found: list[str] = []
    try:
        node = head
        while node:
            entry = node.contents
            if entry.ifa_name == os.fsencode(name) and entry.ifa_addr:
                text = _sockaddr_address(entry.ifa_addr, name)
                if text is not None and text not in found:
                    found.append(text)
            node = entry.ifa_next
    finally:
        freeifaddrs(head)
    return found


def _sockaddr_address(pointer: int, interface: str) -> str | None:
    """The address in a struct sockaddr, if it is an IPv4 or IPv6 one."""
    import ctypes

    head = ctypes.string_at(pointer, 2)
    # Linux: a 16-bit sa_family; the BSDs: an 8-bit sa_len, then an 8-bit sa_family
    family = int.from_bytes(head, sys.byteorder) if sys.platform.startswith("linux") else head[1]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, ctypes.string_at(pointer, 8)[4:8])
    if family == socket.AF_INET6:
        raw = ctypes.string_at(pointer, 24)[8:24]
        ip = ipaddress.IPv6Address(raw)
        return f"{ip}%{interface}" if ip.is_link_local else str(ip)
    return None


def check_listeners(cfg: Config, default_port: int) -> None:
    """Refuse listeners that would bind an address and port another one binds.

    ``default_port`` is the port of a listener without one (the mode's).  Raises ConfigError at
    the later listener; an address that no longer resolves is one too.
    """
    resolved: list[tuple[Listener, list[str]]] = []
    for listener in cfg.listeners:
        if listener.address == "socket":
            continue
        try:
            hosts = listen_hosts(listener.address)
        except ValueError as err:
            hint = _listen_hint()
            raise ConfigError(str(err), listener.location, listener.address, hint) from None
        _check_overlaps(resolved, listener, hosts, default_port)
        resolved.append((listener, hosts))


def _check_overlaps(
    earlier: list[tuple[Listener, list[str]]],
    listener: Listener,
    hosts: list[str],
    default_port: int | None,
) -> None:
    """Raise ConfigError at ``listener`` when it binds what an earlier one binds.

    Two binds collide on the same port when their addresses are equal, or are of one family and
    one is that family's wildcard.  Without ``default_port`` a listener without a port only
    collides with another without one.
    """
    port = listener.port if listener.port is not None else default_port
    for other, other_hosts in earlier:
        other_port = other.port if other.port is not None else default_port
        if other_port != port:
            continue
        for host in hosts:
            for other_host in other_hosts:
                if _same_bind(host, other_host):
                    where = f"port {port}" if port is not None else "on the default port"
                    raise ConfigError(
                        f"this listener binds {host} {where}, as does the one at "
                        f"{other.location}",
                        listener.location,
                        listener.address,
                        "listen on each address once, or give one of them another port",
                    )


def _same_bind(a: str, b: str) -> bool:
    ip_a, ip_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ip_a.version != ip_b.version:
        return False
    return ip_a == ip_b or ip_a.is_unspecified or ip_b.is_unspecified


# --- writing ----------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_BARE = re.compile(r"[A-Za-z0-9_.:/~%+@-]+\Z")


def _word(text: str, keywords: tuple[str, ...] = ()) -> str:
    """Write a value bare when the lexer reads it back as the same word, else quoted."""
    if _BARE.match(text) and (text not in KEYWORDS or text in keywords):
        return text
    return _quote(text)


def _duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _size_text(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


DEFAULT_ALIASES = ("postmaster", "root", "abuse", "mailer-daemon")


def default_aliases_text(user: str) -> str:
    """The aliases file user mode creates on first start: the usual role names to the user."""
    lines = ["# aliases(5): name: target, target  (homemailctl alias add|remove edits this)"]
    lines += [f"{name}: {user}" for name in DEFAULT_ALIASES]
    return "\n".join(lines) + "\n"


def default_config_text(user: str, aliases_path: str | None = None) -> str:
    """The configuration homemail uses in user mode when there is no file.

    With ``aliases_path`` the aliases live in that file (see :func:`default_aliases_text`),
    otherwise in an inline table.
    """
    if not user:
        raise ValueError("empty user name")
    if any(_is_control(char) for char in user):
        raise ValueError("control character in user name")
    q = _quote(user)
    if aliases_path is not None:
        table = f"table aliases {_quote('file:' + aliases_path)}\n"
    else:
        table = (
            f'table aliases {{ postmaster = {q}, root = {q}, abuse = {q}, '
            f'"mailer-daemon" = {q} }}\n'
        )
    return table + (
        "listen on localhost port 2525\n"
        'action "local" maildir alias <aliases>\n'
        'match from local for local action "local"\n'
    )


def alias_tables(cfg: Config) -> list[str]:
    """The tables that hold aliases: table "aliases", then each action's ``alias <table>``."""
    names = ["aliases"] + [a.alias for a in cfg.actions.values() if a.alias]
    return [name for name in dict.fromkeys(names) if name in cfg.tables]


def aliases_file(cfg: Config) -> str | None:
    """The aliases file `alias list|add|remove` edit: table "aliases", else an action's."""
    for name in alias_tables(cfg):
        source = cfg.tables[name].source
        if source is not None:
            return source
    return None


def dump(cfg: Config) -> str:
    """Write the effective configuration as grammar text that parses back to an equal Config."""
    shown = "".join(char if char.isprintable() else "?" for char in cfg.path)
    out = [f"# effective configuration of {shown}"]
    for name, table in cfg.tables.items():
        if table.source is not None:
            out.append(f"table {_word(name)} {_word('file:' + table.source)}")
        elif table.kind == "map":
            body = ", ".join(f"{_word(k)} = {_word(v)}" for k, v in table.mapping.items())
            out.append(f"table {_word(name)} {{ {body} }}")
        else:
            body = ", ".join(_word(v) for v in table.values)
            out.append(f"table {_word(name)} {{ {body} }}")
    for listener in cfg.listeners:
        words = ["listen on", _word(listener.address, _LISTEN_ADDRESSES)]
        if listener.port is not None:
            words.append(f"port {listener.port}")
        if listener.hostname is not None:
            words.append(f"hostname {_word(listener.hostname)}")
        if listener.tag is not None:
            words.append(f"tag {_word(listener.tag)}")
        if listener.mask_src:
            words.append("mask-src")
        out.append(" ".join(words))
    for action in cfg.actions.values():
        words = ["action", _word(action.name), action.method]
        if action.path is not None:
            words.append(_quote(action.path))
        if action.alias is not None:
            words.append(f"alias <{_word(action.alias)}>")
        if action.ttl is not None:
            words.append(f"ttl {_duration_text(action.ttl)}")
        out.append(" ".join(words))
    for rule in cfg.matches:
        words = ["match"]
        source = "!from" if rule.from_negate else "from"
        if rule.from_kind == "src":
            words.append(f"{source} src <{_word(rule.from_table or '')}>")
        else:
            words.append(f"{source} {rule.from_kind}")
        dest = "!for" if rule.for_negate else "for"
        if rule.for_kind in ("domain", "rcpt-to"):
            words.append(f"{dest} {rule.for_kind} <{_word(rule.for_table or '')}>")
        else:
            words.append(f"{dest} {rule.for_kind}")
        if rule.tag is not None:
            words.append(f"{'!' if rule.tag_negate else ''}tag {_word(rule.tag)}")
        words.append("reject" if rule.reject else f"action {_word(rule.action or '')}")
        out.append(" ".join(words))
    out.append(f"queue ttl {_duration_text(cfg.queue_ttl)}")
    out.append(
        "bounce warn-interval " + ", ".join(_duration_text(d) for d in cfg.bounce_warn_interval)
    )
    out.append(f"smtp max-message-size {_size_text(cfg.max_message_size)}")
    out.append(f"smtp limit max-mails {cfg.max_mails} max-rcpt {cfg.max_rcpt}")
    out.append(f"smtp sub-addr-delim {_quote(cfg.sub_addr_delim)}")
    return "\n".join(out) + "\n"
