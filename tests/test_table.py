"""Tests for homemail.table: table files, inline tables, lookups and reloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from homemail.table import Table, TableError


def write(tmp_path: Path, text: str | bytes, name: str = "table") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str | bytes) -> Table:
    return Table.from_file("t", write(tmp_path, text))


def error(tmp_path: Path, text: str | bytes) -> TableError:
    with pytest.raises(TableError) as info:
        load(tmp_path, text)
    return info.value


# --- lists ----------------------------------------------------------------------------------


def test_list_file(tmp_path: Path) -> None:
    table = load(tmp_path, "example.org\n# a comment\n\nExample.NET\n  indented.example\n")
    assert table.kind == "list"
    assert table.values == ["example.org", "Example.NET", "indented.example"]
    assert table.mapping == {}
    assert table.name == "t"
    assert table.source == str(tmp_path / "table")


def test_list_lookup_is_case_insensitive(tmp_path: Path) -> None:
    table = load(tmp_path, "Example.NET\n")
    assert "example.net" in table
    assert "EXAMPLE.net" in table
    assert table.lookup("example.NET") == "example.NET"
    assert table.lookup("other.example") is None
    assert "other.example" not in table
    assert 42 not in table


def test_list_of_addresses_and_networks(tmp_path: Path) -> None:
    table = load(tmp_path, "::1\nfe80::/10\n192.168.1.0/24\n10.0.0.1\n")
    assert table.kind == "list"
    assert table.values == ["::1", "fe80::/10", "192.168.1.0/24", "10.0.0.1"]


def test_list_line_with_two_words_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, "one\ntwo words\n")
    assert err.line == 2
    assert str(err) == (
        f"{tmp_path / 'table'}:2: a list table holds one value a line, this line holds several "
        "(the table is a list because line 1 holds a single value)"
    )


def test_empty_file_is_an_empty_list(tmp_path: Path) -> None:
    table = load(tmp_path, "# nothing here\n\n")
    assert table.kind == "list"
    assert table.values == []
    assert table.entries() == []
    assert "x" not in table


# --- maps -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    ["root bob", "root: bob", "root:bob", "root : bob", "root\tbob", "ROOT:   bob   "],
)
def test_map_separators(tmp_path: Path, line: str) -> None:
    table = load(tmp_path, line + "\n")
    assert table.kind == "map"
    assert table.mapping == {"root": "bob"}


def test_map_values_keep_their_text(tmp_path: Path) -> None:
    table = load(tmp_path, "root: Bob, alice@example.org, |/usr/bin/x --flag\nx: a#b\n")
    assert table.mapping == {"root": "Bob, alice@example.org, |/usr/bin/x --flag", "x": "a#b"}


def test_map_comments(tmp_path: Path) -> None:
    table = load(tmp_path, "# aliases\nroot: bob # the admin\n   # indented comment\nabuse: bob\n")
    assert table.mapping == {"root": "bob", "abuse": "bob"}


def test_map_keys_are_lowercased_and_lookup_is_case_insensitive(tmp_path: Path) -> None:
    table = load(tmp_path, "PostMaster: Bob\n")
    assert table.mapping == {"postmaster": "Bob"}
    assert table.lookup("POSTMASTER") == "Bob"
    assert table.lookup("postmaster") == "Bob"
    assert "postMaster" in table
    assert table.lookup("bob") is None
    assert "bob" not in table


def test_map_keeps_order(tmp_path: Path) -> None:
    table = load(tmp_path, "b: 1\na: 2\nc: 3\n")
    assert list(table.mapping) == ["b", "a", "c"]
    assert table.entries() == ["b", "a", "c"]


def test_map_continuation_lines(tmp_path: Path) -> None:
    table = load(tmp_path, "staff: alice,\n   bob,\n\tcarol\nroot: dave\n")
    assert table.mapping == {"staff": "alice, bob, carol", "root": "dave"}


def test_map_value_given_only_on_continuation_lines(tmp_path: Path) -> None:
    table = load(tmp_path, "staff:\n  alice, bob\n")
    assert table.mapping == {"staff": "alice, bob"}


def test_map_with_ipv6_keys(tmp_path: Path) -> None:
    table = load(tmp_path, "::1 localhost\nfe80::1: link\n")
    assert table.mapping == {"::1": "localhost", "fe80::1": "link"}


def test_map_key_without_value_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, "root: bob\nabuse:\nother: x\n")
    assert (err.line, err.message) == (2, "key 'abuse' has no value")
    assert str(err) == f"{tmp_path / 'table'}:2: key 'abuse' has no value"


def test_map_bare_key_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, "root: bob\nlonely\n")
    assert (err.line, err.message) == (2, "key 'lonely' has no value")


def test_map_last_key_without_value_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, "root: bob\nabuse:")
    assert err.line == 2


def test_map_duplicate_key_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, "root: bob\nRoot: alice\n")
    assert (err.line, err.message) == (2, "key 'root' is given twice (first on line 1)")


def test_map_empty_key_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, "root: bob\n: alice\n")
    assert (err.line, err.message) == (2, "entry has an empty key")


# --- bad bytes and unreadable files -----------------------------------------------------------


def test_nul_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, b"root: bob\nab\0use: bob\n")
    assert (err.line, err.message) == (2, "line holds a NUL character")


def test_cr_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, b"root: bob\r\n")
    assert err.line == 1
    assert "CR character" in err.message


def test_invalid_utf8_is_an_error(tmp_path: Path) -> None:
    err = error(tmp_path, b"root: bob\nabuse: \xff\n")
    assert (err.line, err.message) == (2, "line is not valid UTF-8")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(TableError) as info:
        Table.from_file("t", path)
    assert info.value.line is None
    assert info.value.path == path
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TableError) as info:
        Table.from_file("t", str(tmp_path))
    assert "not a regular file" in str(info.value)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TableError) as info:
        Table.from_file("t", str(fifo))
    assert "not a regular file" in str(info.value)


def test_nul_in_path(tmp_path: Path) -> None:
    with pytest.raises(TableError):
        Table.from_file("t", str(tmp_path) + "/a\0b")


def test_relative_path_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "a\n", "rel")
    monkeypatch.chdir(tmp_path)
    assert Table.from_file("t", "rel").source == str(tmp_path / "rel")


# --- inline tables and reloads ----------------------------------------------------------------


def test_inline_list() -> None:
    table = Table.inline_list("nets", ["192.168.1.0/24", "Example.ORG"])
    assert (table.kind, table.source, table.values, table.mapping) == (
        "list",
        None,
        ["192.168.1.0/24", "Example.ORG"],
        {},
    )
    assert "example.org" in table
    assert table.lookup("EXAMPLE.org") == "EXAMPLE.org"


def test_inline_map() -> None:
    table = Table.inline_map("aliases", [("Root", "Bob"), ("abuse", "bob")])
    assert (table.kind, table.source) == ("map", None)
    assert table.mapping == {"root": "Bob", "abuse": "bob"}
    assert table.lookup("ROOT") == "Bob"
    assert "Abuse" in table


def test_inline_map_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="duplicate key"):
        Table.inline_map("a", [("root", "x"), ("ROOT", "y")])


def test_inline_reloaded_is_self() -> None:
    table = Table.inline_list("a", ["x"])
    assert table.reloaded() is table


def test_reloaded_reads_the_file_again(tmp_path: Path) -> None:
    path = write(tmp_path, "root: bob\n")
    table = Table.from_file("aliases", path)
    write(tmp_path, "root: alice\nabuse: alice\n")
    fresh = table.reloaded()
    assert fresh is not table
    assert fresh.name == "aliases"
    assert fresh.mapping == {"root": "alice", "abuse": "alice"}
    assert table.mapping == {"root": "bob"}


def test_reloaded_raises_on_a_broken_file(tmp_path: Path) -> None:
    path = write(tmp_path, "root: bob\n")
    table = Table.from_file("aliases", path)
    write(tmp_path, "root:\n")
    with pytest.raises(TableError):
        table.reloaded()


def test_tables_compare_by_content(tmp_path: Path) -> None:
    assert Table.inline_list("a", ["x"]) == Table.inline_list("a", ["x"])
    assert Table.inline_list("a", ["x"]) != Table.inline_list("a", ["y"])
    assert load(tmp_path, "a: b\n") == load(tmp_path, "A: b\n")
