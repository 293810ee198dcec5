"""The address parser: what it accepts, what it refuses, and that nothing crashes it."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homemail.address import (
    Address,
    AddressError,
    host_name,
    parse_mailbox,
    parse_path,
    split_subaddress,
)


@pytest.mark.parametrize(
    "path",
    [
        "<;sleep 66;>",
        "<;sleep 66;@example.org>",
        "<a b@example.org>",
        "<root;id@example.org>",
        "<a\r\nb@example.org>",
        "<a\x00b@example.org>",
        "<a@exa mple.org>",
        "<.a@example.org>",
        "<a..b@example.org>",
        "<a@-example.org>",
        "<a@example..org>",
        '<"quoted"@example.org>',
        "<a@[300.1.1.1]>",
        "<nodomain>",
        "a@example.org",
        "<a@example.org",
    ],
)
def test_refused(path):
    with pytest.raises(AddressError):
        parse_path(path, null_ok=True, utf8=True)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("<alice@example.org>", Address("alice", "example.org")),
        ("<Alice@EXAMPLE.org>", Address("Alice", "example.org")),
        ("<a.b+tag@sub.example.org>", Address("a.b+tag", "sub.example.org")),
        ("<x!#$%&'*/=?^_`{|}~-@example.org>", Address("x!#$%&'*/=?^_`{|}~-", "example.org")),
        ("<@relay.example,@b.example:bob@example.org>", Address("bob", "example.org")),
        ("<bob@[192.0.2.1]>", Address("bob", "[192.0.2.1]")),
        ("<bob@[IPv6:2001:db8::1]>", Address("bob", "[ipv6:2001:db8::1]")),
        ("<josé@exämple.org>", Address("josé", "exämple.org")),
    ],
)
def test_accepted(path, expected):
    assert parse_path(path, null_ok=False, utf8=True) == expected


def test_null_path_and_postmaster():
    assert parse_path("<>", null_ok=True, utf8=False) is None
    with pytest.raises(AddressError):
        parse_path("<>", null_ok=False, utf8=False)
    assert (
        str(parse_path("<postmaster>", null_ok=False, utf8=False, allow_bare_postmaster=True))
        == "postmaster"
    )
    with pytest.raises(AddressError):
        parse_path("<postmaster>", null_ok=False, utf8=False)


def test_utf8_needs_smtputf8():
    with pytest.raises(AddressError):
        parse_mailbox("josé@example.org", utf8=False)


def test_lengths():
    with pytest.raises(AddressError):
        parse_mailbox("a" * 65 + "@example.org")
    with pytest.raises(AddressError):
        parse_mailbox("a@" + "b" * 64 + ".org")
    parse_mailbox("a" * 64 + "@example.org")


def test_subaddress():
    assert split_subaddress("bob+lists", "+") == ("bob", "lists")
    assert split_subaddress("bob", "+") == ("bob", None)
    assert split_subaddress("+x", "+") == ("+x", None)


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_never_crashes(text):
    for candidate in (text, f"<{text}>"):
        try:
            result = parse_path(candidate, null_ok=True, utf8=True, allow_bare_postmaster=True)
        except AddressError as exc:
            assert str(exc)
            continue
        if result is not None:
            rendered = str(result)
            assert not any(c in rendered for c in "\r\n\x00 <>;")


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(
        r"[a-z0-9]([a-z0-9.+_-]{0,20}[a-z0-9])?@[a-z0-9]{1,10}(\.[a-z]{2,5}){0,2}", fullmatch=True
    )
)
def test_plain_addresses_round_trip(text):
    if ".." in text.partition("@")[0]:
        return
    assert str(parse_mailbox(text)) == text


@pytest.mark.parametrize(
    ("own", "fqdn", "expected"),
    [
        ("vm", "localhost", "vm"),  # /etc/hosts maps the name to 127.0.0.1 only
        ("vm", "ip6-localhost", "vm"),  # ... or to ::1, first named so
        ("vm", "localhost6.localdomain6", "vm"),
        ("box", "box.home.arpa", "box.home.arpa"),
        ("box", "localhost.localdomain", "box"),
        ("server01", "mail.example.org", "mail.example.org"),  # the resolver's name for it
        ("mail.example.org", "localhost", "mail.example.org"),
        ("localhost.localdomain", "localhost", "localhost.localdomain"),
        ("localhost", "localhost", "localhost"),
        ("bad_name!", "localhost", "localhost"),
        ("bad_name!", "box.example.org", "box.example.org"),
        ("vm", "ip6-loopback", "vm"),
        ("vm", "localhost4.localdomain4", "vm"),
    ],
)
def test_host_name_is_the_fqdn_else_the_machine_name(monkeypatch, own, fqdn, expected):
    monkeypatch.setattr(socket, "gethostname", lambda: own)
    monkeypatch.setattr(socket, "getfqdn", lambda name="": fqdn)
    assert host_name() == expected


def test_host_name_of_a_name_the_resolver_does_not_know(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "mybox")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": name)  # it answers with the name
    assert host_name() == "mybox"
