"""Mail addresses: the one parser for every address that crosses a boundary.

SMTP paths (``MAIL FROM:<…>``, ``RCPT TO:<…>``), sendmail arguments and alias targets all come
through :func:`parse_mailbox`.  The grammar is deliberately narrower than RFC 5321: the local
part is a dot-atom (letters, digits and ``!#$%&'*+-/=?^_`{|}~``), quoted local parts are refused,
and no address may contain CR, LF, NUL, space or any other control character.  With SMTPUTF8
(RFC 6531) non-ASCII letters are allowed in the local part and the domain.  The domain is a
sequence of LDH labels or an address literal (``[192.0.2.1]``, ``[IPv6:…]``).

``MAIL FROM:<;sleep 66;>`` (CVE-2020-7247) fails here twice over: ``;`` is not atext and the
address has no domain.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

ATEXT_SPECIALS = frozenset("!#$%&'*+-/=?^_`{|}~")
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_ADDRESS = 254


class AddressError(ValueError):
    """An address that cannot be accepted; ``str()`` is safe to put in a reply."""


@dataclass(frozen=True, slots=True)
class Address:
    local: str
    domain: str  # "" only for the bare postmaster recipient

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


def _atext(ch: str, utf8: bool) -> bool:
    if ch.isascii():
        return ch.isalnum() or ch in ATEXT_SPECIALS
    return utf8 and ch.isprintable() and not ch.isspace()


def check_local_part(local: str, *, utf8: bool = True) -> None:
    if not local:
        raise AddressError("empty local part")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise AddressError("local part too long")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise AddressError("malformed local part")
    for ch in local:
        if ch != "." and not _atext(ch, utf8):
            raise AddressError("invalid character in local part")


def check_domain(domain: str, *, utf8: bool = True) -> None:
    if not domain:
        raise AddressError("empty domain")
    if len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
        raise AddressError("domain too long")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("malformed address literal")
        literal = domain[1:-1]
        if "%" in literal:  # no scope ids: nothing but an address belongs in a literal
            raise AddressError("malformed address literal")
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise AddressError("malformed address literal") from None
        return
    for label in domain.rstrip(".").split(".") if domain != "." else [""]:
        if not label or len(label) > 63:
            raise AddressError("malformed domain")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError("malformed domain")
        for ch in label:
            if ch.isascii():
                if not (ch.isalnum() or ch == "-"):
                    raise AddressError("invalid character in domain")
            elif not (utf8 and ch.isalnum()):
                raise AddressError("invalid character in domain")


def parse_mailbox(text: str, *, utf8: bool = True, allow_bare_postmaster: bool = False) -> Address:
    """Parse ``local@domain`` (no angle brackets) into an :class:`Address`."""
    if any(ord(ch) < 0x20 or ch in " \x7f" for ch in text):
        raise AddressError("control character or space in address")
    if len(text.encode("utf-8", "surrogateescape")) > MAX_ADDRESS:
        raise AddressError("address too long")
    local, at, domain = text.rpartition("@")
    if not at:
        if allow_bare_postmaster and text.lower() == "postmaster":
            return Address("postmaster", "")
        raise AddressError("address has no domain")
    check_local_part(local, utf8=utf8)
    check_domain(domain, utf8=utf8)
    return Address(local, domain.lower() if domain.isascii() else domain)


def parse_path(
    text: str, *, null_ok: bool, utf8: bool, allow_bare_postmaster: bool = False
) -> Address | None:
    """Parse an SMTP reverse- or forward-path ``<…>``; returns None for the null path ``<>``.

    A source route (``<@a,@b:user@example.org>``) is accepted and dropped as RFC 5321 asks.
    """
    text = text.strip()
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if null_ok:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        _route, colon, rest = inner.partition(":")
        if not colon:
            raise AddressError("malformed source route")
        inner = rest
    return parse_mailbox(inner, utf8=utf8, allow_bare_postmaster=allow_bare_postmaster)


def split_subaddress(local: str, delim: str) -> tuple[str, str | None]:
    """``bob+tag`` → (``bob``, ``tag``); no delimiter → (local, None)."""
    if delim and delim in local:
        base, _, ext = local.partition(delim)
        if base:
            return base, ext
    return local, None


_LOOPBACK_NAMES = re.compile(r"(localhost|ip6-localhost|ip6-loopback)[0-9]*(\.|$)", re.I)


def host_name() -> str:
    """This machine's name for the banner, ``Received:`` lines and unqualified addresses: the
    resolver's name for it (``box`` → ``box.home.arpa``), else the name it calls itself.
    ``getfqdn()`` answers with the first name of the address the host name maps to, which is
    ``localhost`` (or ``ip6-localhost``, ``localhost6.localdomain6``…) where /etc/hosts puts it
    on a loopback line: such an answer is not taken."""
    own = socket.gethostname()
    fqdn = socket.getfqdn(own)
    for name in (fqdn, own):
        if name is fqdn and _LOOPBACK_NAMES.match(fqdn) and fqdn.lower() != own.lower():
            continue
        try:
            check_domain(name, utf8=False)
        except AddressError:
            continue
        return name
    return "localhost"
