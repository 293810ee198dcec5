"""Tests for homemail.config: the smtpd.conf grammar, its errors, warnings and dump."""

from __future__ import annotations

from pathlib import Path

import pytest

from homemail.config import (
    MAX_ERRORS,
    Action,
    Config,
    ConfigError,
    ConfigErrors,
    ConfigWarning,
    Listener,
    Location,
    Match,
    alias_tables,
    aliases_file,
    check_listeners,
    default_config_text,
    dump,
    listen_hosts,
    open_relay_warnings,
    parse_file,
    parse_string,
)
from homemail.table import Table

F = "<embedded>"


def parse(text: str) -> Config:
    return parse_string(text)


def fail(text: str, filename: str = F) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_string(text, filename)
    return info.value


def message(text: str) -> str:
    return str(fail(text))


def loc(line: int, column: int, file: str = F) -> Location:
    return Location(file, line, column)


MINIMAL = 'action "local" maildir\nmatch for local action "local"\n'


# --- the error and warning types --------------------------------------------------------------


def test_config_error_str() -> None:
    err = ConfigError("bad thing", Location("/etc/smtpd.conf", 3, 7), "tok", "do this")
    assert str(err) == "/etc/smtpd.conf:3:7: error: bad thing near 'tok'\n  hint: do this"
    assert (err.message, err.token, err.hint) == ("bad thing", "tok", "do this")


def test_config_error_str_without_token_hint_or_location() -> None:
    assert str(ConfigError("x", Location("f", 1, 2))) == "f:1:2: error: x"
    assert str(ConfigError("x")) == "error: x"


def test_config_error_shortens_long_tokens() -> None:
    err = ConfigError("x", Location("f", 1, 1), "a" * 200)
    assert str(err) == "f:1:1: error: x near '" + "a" * 59 + "…'"


def test_config_warning_str() -> None:
    assert str(ConfigWarning(Location("f", 2, 3), "careful")) == "f:2:3: warning: careful"


# --- the lexer --------------------------------------------------------------------------------


def test_comments_and_blank_lines() -> None:
    cfg = parse(
        "# a comment\n\n   # indented\nlisten on localhost # trailing\n"
        'action "local" maildir "/tmp/#not-a-comment"\n'
    )
    assert [x.address for x in cfg.listeners] == ["localhost"]
    assert cfg.actions["local"].path == "/tmp/#not-a-comment"


def test_backslash_continues_a_line() -> None:
    cfg = parse("listen on localhost \\\n    port 2525 \\\n  tag T\nlisten on all\n")
    assert [(x.address, x.port, x.tag) for x in cfg.listeners] == [
        ("localhost", 2525, "T"),
        ("all", None, None),
    ]


def test_backslash_with_trailing_blanks_continues() -> None:
    cfg = parse("listen on localhost \\   \n port 2525\n")
    assert cfg.listeners[0].port == 2525


def test_columns_on_a_continued_line_are_physical() -> None:
    err = fail("listen on localhost \\\n    port 0\n")
    assert err.location == loc(2, 10)
    assert str(err) == (
        "<embedded>:2:10: error: the port must be a number from 1 to 65535 near '0'"
    )


def test_quoted_string_escapes() -> None:
    cfg = parse(r'action "a\"b" maildir "/m\\d\x"' + '\nmatch action "a\\"b"\n')
    assert list(cfg.actions) == ['a"b']
    assert cfg.actions['a"b'].path == "/m\\d\\x"


def test_backslash_newline_inside_a_string() -> None:
    cfg = parse('action "lo\\\ncal" maildir\nmatch action "local"\n')
    assert list(cfg.actions) == ["local"]


def test_unterminated_string() -> None:
    assert message('listen on localhost\naction "local maildir\n') == (
        "<embedded>:2:8: error: unterminated quoted string near '\"local maildir'\n"
        "  hint: close the quote on the same line, or end the line with '\\' to continue it"
    )


def test_unterminated_string_at_end_of_file() -> None:
    assert fail('action "local').location == loc(1, 8)


def test_control_character() -> None:
    err = fail("listen on\x01 localhost\n")
    assert err.location == loc(1, 10)
    assert err.message == "unexpected control character U+0001"


def test_control_character_in_string() -> None:
    err = fail('action "a\x00b" maildir\n')
    assert err.location == loc(1, 10)
    assert err.message == "control character U+0000 in a quoted string"


def test_crlf_line_endings_are_accepted() -> None:
    cfg = parse("listen on localhost port 25\r\n" + MINIMAL.replace("\n", "\r\n"))
    assert cfg.listeners[0].port == 25
    assert "local" in cfg.actions


def test_byte_order_mark_is_ignored() -> None:
    assert parse("\ufefflisten on localhost\n").listeners[0].address == "localhost"


def test_braces_span_lines() -> None:
    cfg = parse("table t {\n  a,   # first\n  b,\n}\n")
    assert cfg.tables["t"].values == ["a", "b"]


def test_empty_text_is_an_empty_config() -> None:
    cfg = parse("")
    assert (cfg.tables, cfg.listeners, cfg.actions, cfg.matches, cfg.warnings) == (
        {},
        [],
        {},
        [],
        [],
    )
    assert cfg.path == "<embedded>"


# --- macros -----------------------------------------------------------------------------------


def test_macros() -> None:
    cfg = parse('lan = "192.168.1.10"\nport_no = 2525\nlisten on $lan port $port_no\n')
    assert (cfg.listeners[0].address, cfg.listeners[0].port) == ("192.168.1.10", 2525)


def test_macro_without_spaces() -> None:
    cfg = parse("p=2525\nlisten on localhost port $p\n")
    assert cfg.listeners[0].port == 2525


def test_macro_value_is_read_again_as_tokens() -> None:
    cfg = parse('opts = "port 2525 mask-src"\nlisten on localhost $opts\n')
    assert (cfg.listeners[0].port, cfg.listeners[0].mask_src) == (2525, True)


def test_macro_with_braces() -> None:
    cfg = parse('nets = "{ 10.0.0.0/8, 192.168.0.0/16 }"\ntable lan $nets\n')
    assert cfg.tables["lan"].values == ["10.0.0.0/8", "192.168.0.0/16"]


def test_macro_is_not_expanded_inside_quotes() -> None:
    cfg = parse('x = "/m"\naction "a" maildir "$x/Maildir"\nmatch action "a"\n')
    assert cfg.actions["a"].path == "$x/Maildir"


def test_macro_defined_from_another_macro() -> None:
    cfg = parse("a = 2525\nb = $a\nlisten on localhost port $b\n")
    assert cfg.listeners[0].port == 2525


def test_macro_can_be_redefined() -> None:
    cfg = parse("p = 1\np = 2\nlisten on localhost port $p\n")
    assert cfg.listeners[0].port == 2


def test_macro_errors_point_at_the_reference() -> None:
    err = fail('p = "0"\nlisten on localhost port $p\n')
    assert (err.location, err.token) == (loc(2, 26), "0")
    assert err.message == "the port must be a number from 1 to 65535"
    err = fail('p = "port"\nlisten on localhost $p\n')
    assert (err.location, err.message) == (loc(2, 23), "missing port number after 'port'")


def test_undefined_macro() -> None:
    assert message("listen on $lan\n") == (
        "<embedded>:1:11: error: undefined macro '$lan' near '$lan'\n"
        "  hint: define it first with lan = \"value\", or quote the text to use a literal '$'"
    )


def test_undefined_macro_suggests_a_close_one() -> None:
    err = fail('lan_addr = "::1"\nlisten on $lan_adr\n')
    assert err.hint == "did you mean '$lan_addr'?"


def test_invalid_macro_reference() -> None:
    err = fail("listen on $1x\n")
    assert (err.location, err.message, err.token) == (loc(1, 11), "invalid macro reference", "$1x")


def test_macro_name_may_not_be_a_keyword() -> None:
    assert message("listen = 1\n") == (
        "<embedded>:1:1: error: 'listen' is a keyword and cannot be a macro name near 'listen'"
    )


def test_invalid_macro_name() -> None:
    err = fail("my-macro = 1\n")
    assert err.message == "invalid macro name"
    assert err.hint is not None and "letters, digits and '_'" in err.hint


def test_macro_value_must_be_one_token() -> None:
    err = fail("x = a b\n")
    assert (err.location, err.message) == (
        loc(1, 7),
        "the value of macro 'x' must be one word or a quoted string",
    )
    assert err.hint == "put the value in double quotes"


def test_macro_without_value() -> None:
    err = fail("x =\n")
    assert (err.location, err.message) == (loc(1, 4), "missing value for macro 'x'")


def test_macro_value_that_does_not_lex() -> None:
    err = fail('x = "a \\"b"\nlisten on $x\n')
    assert err.location == loc(2, 11)
    assert err.message == "in the value of macro 'x': unterminated quoted string"


# --- include ----------------------------------------------------------------------------------


def test_include(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tables.conf").write_text('nets = "10.0.0.0/8"\ntable lan { $nets }\n')
    (tmp_path / "sub" / "aliases").write_text("root: bob\n")
    (tmp_path / "sub" / "more.conf").write_text('include "tables.conf"\ntable aliases aliases\n')
    main = tmp_path / "smtpd.conf"
    main.write_text(
        'include "sub/more.conf"\n'
        'action "local" maildir alias <aliases>\n'
        'match from src <lan> for local action "local"\n'
    )
    cfg = parse_file(str(main))
    assert cfg.path == str(main)
    assert cfg.tables["lan"].values == ["10.0.0.0/8"]
    assert cfg.tables["aliases"].source == str(tmp_path / "sub" / "aliases")
    assert cfg.tables["aliases"].mapping == {"root": "bob"}


def test_include_absolute_path(tmp_path: Path) -> None:
    inc = tmp_path / "inc.conf"
    inc.write_text("listen on localhost\n")
    cfg = parse(f'include "{inc}"\n')
    assert cfg.listeners[0].address == "localhost"


def test_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    inc = tmp_path / "inc.conf"
    inc.write_text("\n  lisen on localhost\n")
    main = tmp_path / "main.conf"
    main.write_text('include "inc.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_file(str(main))
    assert str(info.value) == (
        f"{inc}:2:3: error: unknown keyword 'lisen' near 'lisen'\n  hint: did you mean 'listen'?"
    )


def test_include_loop(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text('include "b.conf"\n')
    (tmp_path / "b.conf").write_text('listen on localhost\ninclude "a.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_file(str(tmp_path / "a.conf"))
    err = info.value
    assert err.location == Location(str(tmp_path / "b.conf"), 2, 9)
    assert err.message == (
        f"include loop: {tmp_path / 'a.conf'} -> {tmp_path / 'b.conf'} -> {tmp_path / 'a.conf'}"
    )
    assert err.hint == "remove one of the includes"


def test_file_including_itself(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text('include "a.conf"\n')
    with pytest.raises(ConfigError, match="include loop"):
        parse_file(str(tmp_path / "a.conf"))


def test_missing_include(tmp_path: Path) -> None:
    main = tmp_path / "main.conf"
    main.write_text('\ninclude "nope.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_file(str(main))
    assert str(info.value) == (
        f"{main}:2:9: error: cannot read included file '{tmp_path / 'nope.conf'}': "
        "No such file or directory near 'nope.conf'"
    )


def test_include_without_file() -> None:
    err = fail("include\n")
    assert (err.location, err.message) == (loc(1, 8), "missing a file name after 'include'")


def test_include_of_a_directory(tmp_path: Path) -> None:
    err = fail(f'include "{tmp_path}"\n')
    assert "not a regular file" in err.message


# --- every error in one run -------------------------------------------------------------------


def where(err: ConfigError) -> list[tuple[int, int]]:
    """(line, column) of each error found, in the order reported."""
    return [(e.location.line, e.location.column) for e in err.errors if e.location is not None]


def test_every_failing_statement_is_reported_in_reading_order() -> None:
    err = fail(
        'match for local action "nowhere"\n'  # checked at the end, reported in its place
        "lisen on localhost\n"
        "listen on localhost port 0\n" + MINIMAL + "queue ttl forever\n"
    )
    assert isinstance(err, ConfigErrors)
    assert where(err) == [(1, 24), (2, 1), (3, 26), (6, 11)]
    assert [e.message for e in err.errors][:2] == [
        "unknown action 'nowhere'",
        "unknown keyword 'lisen'",
    ]
    assert str(err) == "\n".join(str(e) for e in err.errors)
    assert str(err).splitlines()[1] == '  hint: declare it: action "nowhere" maildir'
    # code that knows of one error only reads the first
    first = err.errors[0]
    assert (err.location, err.message, err.token, err.hint) == (
        first.location,
        first.message,
        first.token,
        first.hint,
    )


def test_a_single_error_is_a_plain_config_error() -> None:
    err = fail("lisen on localhost\n" + MINIMAL)
    assert type(err) is ConfigError
    assert err.errors == [err]


def test_uses_of_a_failed_declaration_are_not_errors_of_their_own() -> None:
    err = fail(
        "table nets { 10.0.0.0/8,, }\n"
        'action "local" maildir frobnicate\n'
        'dir = "a b" c\n'
        'match from src <nets> for local action "local"\n'
        'action "other" maildir $dir\n'
        "path = $dir\n"
        'match for domain <nets> action "other"\n'
        "listen on $path\n"
    )
    assert where(err) == [(1, 25), (2, 24), (3, 13)]


def test_an_unknown_name_is_reported_once_at_its_first_use() -> None:
    err = fail(
        'action "local" maildir alias <nosuch>\n'
        'match for domain <nosuch> action "local"\n'
        'match for local action "gone"\n'
        'match from any for local action "gone"\n'
    )
    assert [(e.location, e.message) for e in err.errors] == [
        (loc(1, 31), "unknown table 'nosuch'"),
        (loc(3, 24), "unknown action 'gone'"),
    ]


def test_an_undefined_macro_is_reported_once_at_its_first_use() -> None:
    err = fail("listen on $addr\nlisten on $addr port 25\nx = $addr\nlisten on $x\n" + MINIMAL)
    assert type(err) is ConfigError
    assert (err.location, err.message) == (loc(1, 11), "undefined macro '$addr'")


def test_what_a_failed_statement_refers_to_is_not_checked() -> None:
    err = fail(MINIMAL + 'match for domain <nosuch> action "local" frobnicate\n')
    assert [e.message for e in err.errors] == ["unknown match option 'frobnicate'"]


def test_a_lex_error_ends_its_line_and_reading_goes_on() -> None:
    err = fail(
        'table t { "a, b }\n'
        "lisen on localhost\n" + MINIMAL + 'x = "a\x01"\n'
        "listen on \x02 localhost\n"
        "smtp max-message-size lots\n"
    )
    assert [(e.location, e.message) for e in err.errors] == [
        (loc(1, 11), "unterminated quoted string"),
        (loc(2, 1), "unknown keyword 'lisen'"),
        (loc(5, 7), "control character U+0001 in a quoted string"),
        (loc(6, 11), "unexpected control character U+0002"),
        (loc(7, 23), "the max-message-size is not a valid size"),
    ]


def test_a_lex_error_on_a_continued_line_ends_the_whole_statement() -> None:
    # the lines a failed line continues with '\' (even with the bad character after the '\')
    # belong to its statement: they are not read as statements of their own
    err = fail(
        "listen on localhost \\\x01\n"
        "  port 2600 \\\n"
        "  tag x\n"
        'x = "a\x01" \\\n'
        "  more\n" + MINIMAL + "lisen on localhost\n"
    )
    assert [(e.location, e.message) for e in err.errors] == [
        (loc(1, 22), "unexpected control character U+0001"),
        (loc(4, 7), "control character U+0001 in a quoted string"),
        (loc(6 + MINIMAL.count("\n"), 1), "unknown keyword 'lisen'"),
    ]


def test_a_failed_line_whose_comment_ends_in_a_backslash_does_not_continue() -> None:
    err = fail('listen on localhost \x01 # "a note" \\\nlisen on localhost\n' + MINIMAL)
    assert [(e.location, e.message) for e in err.errors] == [
        (loc(1, 21), "unexpected control character U+0001"),
        (loc(2, 1), "unknown keyword 'lisen'"),
    ]


def test_errors_of_included_files_in_reading_order(tmp_path: Path) -> None:
    inc = tmp_path / "inc.conf"
    inc.write_text("lisen on localhost\nqueue ttl soon\n")
    main = tmp_path / "main.conf"
    main.write_text('queue ttl x\ninclude "inc.conf"\nsmtp max-message-size y\n' + MINIMAL)
    with pytest.raises(ConfigErrors) as info:
        parse_file(str(main))
    assert [str(e.location) for e in info.value.errors] == [
        f"{main}:1:11",
        f"{inc}:1:1",
        f"{inc}:2:11",
        f"{main}:3:23",
    ]


def test_an_unreadable_include_leaves_unknown_names_unreported(tmp_path: Path) -> None:
    """What it would have declared is unknown: no error for each use of it."""
    main = tmp_path / "main.conf"
    main.write_text(
        'include "missing.conf"\n'
        'action "local" maildir alias <aliases>\n'
        'match for local action "local"\n'
        'match for domain <domains> action "remote"\n'
        "listen on $address\n"
        "lisen on localhost\n"
    )
    with pytest.raises(ConfigErrors) as info:
        parse_file(str(main))
    assert [e.location for e in info.value.errors] == [
        Location(str(main), 1, 9),
        Location(str(main), 6, 1),
    ]


def test_reading_stops_after_max_errors() -> None:
    err = fail("lisen\n" * (MAX_ERRORS + 10) + 'match for local action "nowhere"\n')
    assert len(err.errors) == MAX_ERRORS + 1
    assert [e.message for e in err.errors[:-1]] == ["unknown keyword 'lisen'"] * MAX_ERRORS
    last = err.errors[-1]
    assert (last.location, last.message) == (
        loc(MAX_ERRORS + 1, 1),  # the first error not shown
        f"more than {MAX_ERRORS} errors: stopped reading here",
    )


def test_exactly_max_errors_are_all_shown_with_no_word_of_stopping() -> None:
    err = fail("lisen\n" * MAX_ERRORS)
    assert len(err.errors) == MAX_ERRORS
    assert all(e.message == "unknown keyword 'lisen'" for e in err.errors)


def test_errors_of_references_are_sorted_in_before_the_limit_cuts() -> None:
    """Three unknown actions first, then MAX_ERRORS - 2 statements that fail: the whole file
    is read, and the first MAX_ERRORS in reading order are shown, all three actions among them."""
    text = "".join(f'match for local action "nowhere{i}"\n' for i in range(3))
    text += "lisen\n" * (MAX_ERRORS - 2)
    err = fail(text)
    assert len(err.errors) == MAX_ERRORS + 1
    assert [e.location.line for e in err.errors[:MAX_ERRORS]] == list(range(1, MAX_ERRORS + 1))
    assert err.errors[-1].message == f"more than {MAX_ERRORS} errors: the rest are not shown"
    assert err.errors[-1].location.line == MAX_ERRORS + 1


# --- parse_file -------------------------------------------------------------------------------


def test_parse_file_missing() -> None:
    with pytest.raises(ConfigError) as info:
        parse_file("/nonexistent/smtpd.conf")
    assert info.value.location is None
    assert str(info.value) == (
        "error: cannot read configuration file '/nonexistent/smtpd.conf': No such file or directory"
    )


def test_parse_file_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "smtpd.conf"
    path.write_bytes(b"listen on localhost\nlisten on \xc3\xa9\xff\n")
    with pytest.raises(ConfigError) as info:
        parse_file(str(path))
    assert info.value.location == Location(str(path), 2, 12)
    assert info.value.message == "the file is not valid UTF-8"


def test_parse_string_anchors_relative_paths_at_filename(tmp_path: Path) -> None:
    (tmp_path / "nets").write_text("10.0.0.0/8\n")
    cfg = parse_string("table nets nets\n", str(tmp_path / "smtpd.conf"))
    assert cfg.tables["nets"].source == str(tmp_path / "nets")


# --- tables -----------------------------------------------------------------------------------


def test_file_tables(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("root: bob\n")
    (tmp_path / "domains").write_text("example.org\n")
    cfg = parse_string(
        f"table aliases file:{tmp_path / 'aliases'}\n"
        f'table domains "{tmp_path / "domains"}"\n'
        "table rel file:domains\n",
        str(tmp_path / "smtpd.conf"),
    )
    assert cfg.tables["aliases"] == Table(
        "aliases", "map", str(tmp_path / "aliases"), [], {"root": "bob"}
    )
    assert cfg.tables["domains"].values == ["example.org"]
    assert cfg.tables["rel"].source == str(tmp_path / "domains")


def test_inline_list_table() -> None:
    cfg = parse('table t { a, "b c", local, 10.0.0.0/8, }\n')
    assert cfg.tables["t"] == Table.inline_list("t", ["a", "b c", "local", "10.0.0.0/8"])


def test_inline_map_table() -> None:
    cfg = parse('table t { Root = bob, "mailer-daemon" = "bob smith", user = x }\n')
    assert cfg.tables["t"].kind == "map"
    assert cfg.tables["t"].mapping == {"root": "bob", "mailer-daemon": "bob smith", "user": "x"}


def test_quoted_table_name_may_be_a_keyword() -> None:
    cfg = parse('table "local" { a }\n')
    assert "local" in cfg.tables


def test_table_name_that_is_a_keyword() -> None:
    assert message("table local { a }\n") == (
        "<embedded>:1:7: error: 'local' is a keyword and cannot be used as a table name "
        "without quotes near 'local'\n"
        '  hint: write "local"'
    )


def test_duplicate_table() -> None:
    assert message("table t { a }\n\ntable t { b }\n") == (
        "<embedded>:3:7: error: table 't' is already declared at <embedded>:1:7 near 't'\n"
        "  hint: give each table its own name"
    )


def test_missing_table_file(tmp_path: Path) -> None:
    conf = str(tmp_path / "smtpd.conf")
    err = fail("\ntable aliases file:aliases\n", conf)
    assert str(err) == (
        f"{conf}:2:15: error: cannot load table 'aliases': {tmp_path / 'aliases'}: cannot read: "
        "No such file or directory near 'file:aliases'\n"
        f"  hint: relative paths are taken from {tmp_path}"
    )


def test_bad_line_in_table_file(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("root: bob\nabuse:\n")
    conf = str(tmp_path / "smtpd.conf")
    err = fail(f"table aliases {tmp_path / 'aliases'}\n", conf)
    assert err.location == Location(conf, 1, 15)
    assert err.message == (
        f"cannot load table 'aliases': {tmp_path / 'aliases'}:2: key 'abuse' has no value"
    )
    assert err.hint == f"fix line 2 of {tmp_path / 'aliases'}"


def test_refused_table_backend() -> None:
    assert message("table t db:/etc/mail/aliases.db\n") == (
        "<embedded>:1:9: error: table backend 'db' is not supported yet "
        "near 'db:/etc/mail/aliases.db'\n"
        "  hint: use a file: table"
    )


def test_unknown_table_backend() -> None:
    err = fail("table t fiel:/etc/mail/aliases\n")
    assert err.message == "unknown table backend 'fiel'"
    assert err.hint == "did you mean 'file'?"


def test_empty_file_table_path() -> None:
    assert fail("table t file:\n").message == "empty file name for the table"


def test_table_without_source() -> None:
    err = fail("table t\n")
    assert (err.location, err.message) == (
        loc(1, 8),
        "missing a file or '{ … }' after the table name",
    )


def test_empty_inline_table() -> None:
    assert message("table t { }\n") == (
        "<embedded>:1:9: error: table 't' is empty near '{'\n  hint: table t { a, b }"
    )


def test_inline_table_mixing_lists_and_maps() -> None:
    err = fail("table t { a = b, c }\n")
    assert (err.location, err.message) == (
        loc(1, 18),
        "this table mixes list values and key = value pairs",
    )
    err = fail("table t { c, a = b }\n")
    assert err.location == loc(1, 14)


def test_inline_table_duplicate_key() -> None:
    assert message("table t { a = b, A = c }\n") == (
        "<embedded>:1:18: error: key 'A' is given twice in table 't' near 'A'\n"
        "  hint: the first is at <embedded>:1:11"
    )


def test_inline_table_missing_comma() -> None:
    assert message("table t { a b }\n") == (
        "<embedded>:1:13: error: expected ',' or '}' near 'b'\n  hint: separate entries with ','"
    )


def test_inline_table_missing_closing_brace() -> None:
    assert message("table t { a, b\nlisten on localhost\n") == (
        "<embedded>:2:1: error: expected ',' or '}' near 'listen'\n"
        "  hint: missing '}' to close the table opened at <embedded>:1:9?"
    )


def test_inline_table_missing_closing_brace_at_end_of_file() -> None:
    err = fail("table t { a,")
    assert err.message == "missing '}' to close the table opened at <embedded>:1:9"


def test_inline_table_stray_comma() -> None:
    assert fail("table t { , a }\n").message == "unexpected ','"


def test_inline_table_empty_entries() -> None:
    assert fail('table t { "" }\n').message == "empty table entry"
    assert fail('table t { a = "" }\n').message == "empty value in table"
    assert fail("table t { a = }\n").message == "expected a value, found '}'"


def test_table_trailing_tokens() -> None:
    err = fail("table t { a } extra\n")
    assert (err.location, err.message) == (loc(1, 15), "unexpected 'extra'")


# --- listen -----------------------------------------------------------------------------------


def test_listen_on_an_interface_binds_its_addresses() -> None:
    assert parse("listen on lo port 26201\n").listeners[0].address == "lo"
    hosts = listen_hosts("lo")
    assert "127.0.0.1" in hosts
    assert set(hosts) <= {"127.0.0.1", "::1"}
    assert listen_hosts("localhost")[0] == "127.0.0.1"
    assert listen_hosts("::0001") == ["::1"]


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("999.1.1.1", "'999.1.1.1' is not a valid IPv4 address"),
        (
            "nosuchif0",
            "'nosuchif0' is neither a network interface, an IP address nor a host name that "
            "resolves",
        ),
    ],
)
def test_listen_on_what_is_no_address_interface_or_host(address: str, error: str) -> None:
    err = fail(f"listen on localhost port 2526\nlisten on {address} port 2525\n")
    assert (err.location, err.message, err.token) == (loc(2, 11), error, address)
    assert err.hint is not None and "interfaces here: " in err.hint and "lo" in err.hint


@pytest.mark.parametrize(
    ("first", "second", "host"),
    [
        ("localhost port 26201", "127.0.0.1 port 26201", "127.0.0.1 port 26201"),
        ("127.0.0.1 port 26201", "lo port 26201", "127.0.0.1 port 26201"),
        ("all port 25", "127.0.0.1 port 25", "127.0.0.1 port 25"),
        ("192.168.1.10", "all", "0.0.0.0 on the default port"),
        ("localhost", "127.0.0.1", "127.0.0.1 on the default port"),
    ],
)
def test_listeners_binding_the_same_address_and_port(first: str, second: str, host: str) -> None:
    err = fail(f"listen on {first}\nlisten on {second}\n")
    assert err.location == loc(2, 11)
    assert err.message == f"this listener binds {host}, as does the one at {loc(1, 11)}"
    assert err.hint == "listen on each address once, or give one of them another port"


def test_listeners_on_other_ports_or_families_do_not_collide() -> None:
    cfg = parse(
        "listen on localhost port 25\nlisten on 127.0.0.1 port 26\n"
        "listen on 127.0.0.1\nlisten on 192.168.1.10 port 26\nlisten on socket\n"
    )
    assert len(cfg.listeners) == 5
    check_listeners(parse("listen on 127.0.0.1 port 25\nlisten on ::1 port 25\n"), 25)


def test_a_listener_without_a_port_collides_with_the_modes_default() -> None:
    cfg = parse("listen on localhost\nlisten on 127.0.0.1 port 25\n")
    check_listeners(cfg, 2525)  # user mode: 2525 and 25
    with pytest.raises(ConfigError) as info:
        check_listeners(cfg, 25)  # system mode: 25 twice
    assert str(info.value).startswith(
        "<embedded>:2:11: error: this listener binds 127.0.0.1 port 25, as does the one at "
        "<embedded>:1:11 near '127.0.0.1'"
    )


def test_listen_forms() -> None:
    cfg = parse(
        "listen on localhost\n"
        "listen on all port 25\n"
        "listen on socket mask-src tag SOCK\n"
        "listen on 192.168.1.10 port 587 hostname mail.example.org tag LAN mask-src\n"
        "listen on ::1 port 2525\n"
        "listen on lo port 2526\n"
        'listen on "fe80::1%eth0" port 2527\n'
    )
    assert cfg.listeners == [
        Listener("localhost", None, None, None, False, loc(1, 11)),
        Listener("all", 25, None, None, False, loc(2, 11)),
        Listener("socket", None, None, "SOCK", True, loc(3, 11)),
        Listener("192.168.1.10", 587, "mail.example.org", "LAN", True, loc(4, 11)),
        Listener("::1", 2525, None, None, False, loc(5, 11)),
        Listener("lo", 2526, None, None, False, loc(6, 11)),
        Listener("fe80::1%eth0", 2527, None, None, False, loc(7, 11)),
    ]
    assert cfg.listeners[3].location == loc(4, 11)


def test_listen_options_in_any_order() -> None:
    a = parse("listen on localhost mask-src tag T hostname h.example port 25\n").listeners
    b = parse("listen on localhost port 25 hostname h.example tag T mask-src\n").listeners
    assert a == b


@pytest.mark.parametrize(
    "option",
    [
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
    ],
)
def test_listen_refused_options(option: str) -> None:
    err = fail(f"listen on localhost port 25 {option} x\n")
    assert err.message == f"'{option}' is not supported yet"
    assert err.location == loc(1, 29)
    assert err.token == option
    assert err.hint


def test_listen_tls_hint() -> None:
    assert message("listen on all tls\n") == (
        "<embedded>:1:15: error: 'tls' is not supported yet near 'tls'\n"
        "  hint: homemail cannot use TLS yet; listen on localhost or a trusted network"
    )


def test_listen_unknown_option() -> None:
    assert message("listen on localhost prot 25\n") == (
        "<embedded>:1:21: error: unknown listen option 'prot' near 'prot'\n"
        "  hint: did you mean 'port'?"
    )


def test_listen_unknown_option_without_close_match() -> None:
    err = fail("listen on localhost zzz\n")
    assert err.hint == "listen options are port, hostname, tag and mask-src"


def test_listen_option_twice() -> None:
    assert message("listen on localhost port 25 port 26\n") == (
        "<embedded>:1:29: error: 'port' is given twice near 'port'\n  hint: keep only one"
    )


@pytest.mark.parametrize("port", ["0", "65536", "smtp", "-1", "99999999999999999999999", "2.5"])
def test_listen_bad_port(port: str) -> None:
    err = fail(f"listen on localhost port {port}\n")
    assert err.message == "the port must be a number from 1 to 65535"
    assert err.location == loc(1, 26)


def test_listen_port_limits() -> None:
    cfg = parse("listen on localhost port 1\nlisten on all port 65535\n")
    assert [x.port for x in cfg.listeners] == [1, 65535]


def test_listen_missing_port_number() -> None:
    err = fail("listen on localhost port\n")
    assert (err.location, err.message, err.token) == (
        loc(1, 25),
        "missing port number after 'port'",
        None,
    )


def test_listen_without_on() -> None:
    assert message("listen localhost\n") == (
        "<embedded>:1:8: error: expected 'on' after 'listen' near 'localhost'\n"
        "  hint: listen on localhost"
    )


def test_listen_missing_address() -> None:
    err = fail("listen on port 25\n")
    assert (err.location, err.message) == (loc(1, 11), "missing address after 'on'")
    assert err.hint is not None and "listen on localhost" in err.hint
    assert fail("listen on\n").message == "missing address after 'on'"


@pytest.mark.parametrize("address", ["a/b", "-eth0", '"with space"', "eth0;"])
def test_listen_invalid_address(address: str) -> None:
    err = fail(f"listen on {address}\n")
    assert err.message == "invalid listen address"


def test_listen_bracketed_ipv6() -> None:
    err = fail("listen on [::1]\n")
    assert err.hint == "write IPv6 addresses without brackets: ::1"


def test_listen_invalid_hostname() -> None:
    err = fail('listen on localhost hostname "bad name"\n')
    assert (err.location, err.message) == (loc(1, 30), "invalid host name")


def test_listen_socket_with_port() -> None:
    err = fail("listen on socket port 25\n")
    assert err.message == "'port' makes no sense for 'listen on socket'"


def test_listen_tag_must_be_quoted_when_keyword() -> None:
    assert fail("listen on localhost tag local\n").hint == 'write "local"'
    assert parse('listen on localhost tag "local"\n').listeners[0].tag == "local"


def test_duplicate_listener() -> None:
    assert message("listen on localhost port 25\nlisten on localhost port 25 tag X\n") == (
        "<embedded>:2:11: error: this listener is declared twice near 'localhost'\n"
        "  hint: the first is at <embedded>:1:11"
    )
    cfg = parse("listen on localhost port 25\nlisten on localhost port 26\n")
    assert len(cfg.listeners) == 2


def test_no_listen_line_means_no_listener() -> None:
    assert parse(MINIMAL).listeners == []


# --- action -----------------------------------------------------------------------------------


def test_actions() -> None:
    cfg = parse(
        "table aliases { root = bob }\n"
        'action "local" maildir alias <aliases>\n'
        'action md maildir "~/Mail/%{dest.user:lowercase}" ttl 2d\n'
        "action bare maildir ~/Maildir\n"
        "action box mbox\n"
        'action box2 mbox "/var/spool/mail/%{user.username}" alias <aliases>\n'
        "action ord maildir ttl 4h alias <aliases>\n"
        'match action "local"\nmatch action md\nmatch action bare\nmatch action box\n'
        "match action box2\nmatch action ord\n"
    )
    assert cfg.actions == {
        "local": Action("local", "maildir", None, "aliases", None, loc(2, 8)),
        "md": Action("md", "maildir", "~/Mail/%{dest.user:lowercase}", None, 2 * 86400, loc(3, 8)),
        "bare": Action("bare", "maildir", "~/Maildir", None, None, loc(4, 8)),
        "box": Action("box", "mbox", None, None, None, loc(5, 8)),
        "box2": Action(
            "box2", "mbox", "/var/spool/mail/%{user.username}", "aliases", None, loc(6, 8)
        ),
        "ord": Action("ord", "maildir", None, "aliases", 4 * 3600, loc(7, 8)),
    }
    assert cfg.actions["local"].location == loc(2, 8)
    assert cfg.warnings == []


@pytest.mark.parametrize("method", ["lmtp", "mda", "forward-only", "expand-only", "relay"])
def test_action_refused_methods(method: str) -> None:
    err = fail(f'action "a" {method} "x"\n')
    assert err.message == f"delivery method '{method}' is not supported yet"
    assert (err.location, err.token) == (loc(1, 12), method)


def test_action_relay_hint() -> None:
    assert message('action "relay" relay host smtp+tls://smtp.example.org\n') == (
        "<embedded>:1:16: error: delivery method 'relay' is not supported yet near 'relay'\n"
        "  hint: homemail delivers locally only for now (maildir or mbox)"
    )


@pytest.mark.parametrize(
    "option",
    [
        "virtual <v>",
        "user bob",
        "userbase <u>",
        "junk",
        "host smtp://x",
        "backup",
        "tls",
        "auth <secrets>",
        "helo x",
        "mail-from x",
        "src <x>",
        "relay",
    ],
)
def test_action_refused_options(option: str) -> None:
    err = fail(f'action "a" maildir {option}\n')
    word = option.split()[0]
    assert err.message == f"'{word}' is not supported yet"
    assert (err.location, err.token) == (loc(1, 20), word)


def test_action_unknown_method() -> None:
    assert message('action "a" maildri\n') == (
        "<embedded>:1:12: error: unknown delivery method 'maildri' near 'maildri'\n"
        "  hint: did you mean 'maildir'?"
    )


def test_action_missing_method() -> None:
    err = fail('action "a"\n')
    assert (err.location, err.message, err.hint) == (
        loc(1, 11),
        "missing a delivery method after action 'a'",
        "maildir or mbox",
    )


def test_action_unknown_option() -> None:
    assert message('action "a" maildir alais <aliases>\n') == (
        "<embedded>:1:20: error: unknown action option 'alais' near 'alais'\n"
        "  hint: did you mean 'alias'?"
    )


def test_action_second_path() -> None:
    err = fail('action "a" maildir "/x" "/y"\n')
    assert (err.location, err.hint) == (
        loc(1, 25),
        "an action has one path, right after its method",
    )


def test_action_option_twice() -> None:
    err = fail('action "a" maildir ttl 1d ttl 2d\n')
    assert (err.location, err.message) == (loc(1, 27), "'ttl' is given twice")


def test_action_alias_unknown_table() -> None:
    assert message(
        'table aliases { a = b }\naction "a" maildir alias <alises>\nmatch action "a"\n'
    ) == (
        "<embedded>:2:27: error: unknown table 'alises' near 'alises'\n"
        "  hint: did you mean 'aliases'?"
    )


def test_action_alias_unknown_table_without_close_match() -> None:
    err = fail('action "a" maildir alias <aliases>\n')
    assert err.hint == "declare it: table aliases file:/path"


def test_action_alias_table_may_be_declared_later() -> None:
    cfg = parse('action "a" maildir alias <t>\ntable t { x = y }\nmatch action "a"\n')
    assert cfg.actions["a"].alias == "t"


def test_action_alias_needs_a_map() -> None:
    assert message('table t { a, b }\naction "a" maildir alias <t>\n') == (
        "<embedded>:2:27: error: table 't' is a list, but 'alias' needs a map near 't'\n"
        "  hint: write one 'name: value' entry a line"
    )


def test_action_alias_accepts_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("# none yet\n")
    cfg = parse(
        f'table a "{tmp_path / "aliases"}"\naction "x" maildir alias <a>\nmatch action "x"\n'
    )
    assert cfg.actions["x"].alias == "a"


def test_alias_tables_are_the_ones_the_actions_name(tmp_path: Path) -> None:
    for name in ("myal", "staff"):
        (tmp_path / name).write_text("x: y\n")
    cfg = parse(
        f'table myal "{tmp_path / "myal"}"\ntable staff "file:{tmp_path / "staff"}"\n'
        "table other { a = b }\n"
        'action "a" maildir alias <staff>\naction "b" mbox alias <myal>\n'
        'action "c" maildir alias <staff>\nmatch action "a"\n'
    )
    assert alias_tables(cfg) == ["staff", "myal"]
    assert aliases_file(cfg) == str(tmp_path / "staff")
    cfg = parse('table aliases { a = b }\naction "a" maildir\nmatch action "a"\n')
    assert alias_tables(cfg) == ["aliases"]
    assert aliases_file(cfg) is None


def test_action_alias_without_angle_brackets() -> None:
    err = fail('table aliases { a = b }\naction "a" maildir alias aliases\n')
    assert err.message == "expected a table reference like '<NAME>' after 'alias'"
    assert err.hint == "declare a table and refer to it: alias <aliases>"


def test_action_alias_unclosed_reference() -> None:
    err = fail('table t { a = b }\naction "a" maildir alias <t ttl 4d\n')
    assert (err.location, err.message) == (loc(2, 29), "expected '>' after the table name")


def test_action_bad_ttl() -> None:
    err = fail('action "a" maildir ttl 4x\n')
    assert (err.location, err.message) == (loc(1, 24), "the ttl is not a valid duration")


def test_action_unknown_format_specifier() -> None:
    assert message('action "a" maildir "~/Mail/%{dest.usr}"\n') == (
        "<embedded>:1:20: error: unknown format specifier '%{dest.usr}' in path "
        "near '~/Mail/%{dest.usr}'\n"
        "  hint: did you mean 'dest.user'?"
    )


def test_action_unterminated_format_specifier() -> None:
    assert fail('action "a" maildir "~/Mail/%{dest.user"\n').message == "unterminated '%{' in path"


def test_action_format_specifiers_with_slices() -> None:
    cfg = parse(
        'action "a" maildir "/m/%{rcpt.domain}/%{rcpt.user[0:-4]:strip}"\nmatch action "a"\n'
    )
    assert cfg.actions["a"].path == "/m/%{rcpt.domain}/%{rcpt.user[0:-4]:strip}"


def test_action_path_tilde() -> None:
    assert parse('action "a" mbox "~/inbox"\n').actions["a"].path == "~/inbox"
    assert parse('action "a" maildir "~"\n').actions["a"].path == "~"
    assert message('action "a" maildir "~bob/Maildir"\n') == (
        "<embedded>:1:20: error: only '~/' is expanded in a delivery path near '~bob/Maildir'\n"
        "  hint: '~/' is the recipient's home; write other users' paths in full"
    )
    for home in ("~", "~/"):
        assert message(f'action "a" mbox "{home}"\n').startswith(
            "<embedded>:1:17: error: an mbox is a file, not the home directory"
        )


@pytest.mark.parametrize(
    ("path", "error", "hint"),
    [
        (
            "/x/%{rcpt.user:badmod}",
            "unknown format modifier ':badmod' in path",
            "known: lowercase, uppercase, strip",
        ),
        ("/x/%{rcpt:lowercase|upercase}", "unknown format modifier ':upercase' in path", "did"),
        ("/x/%{rcpt.user[a:b]}", "invalid slice '[a:b]' of '%{rcpt.user}' in path", "a slice"),
        ("/x/%{rcpt.user[2]}", "invalid slice '[2]' of '%{rcpt.user}' in path", "a slice"),
        ("/x/%{rcpt.user[0:2", "unterminated '%{' in path", "close it"),
        ("/x/%{rcpt.user[0:2]x}", "unexpected 'x' after '%{rcpt.user[0:2]' in path", "a slice"),
    ],
)
def test_action_bad_format_modifier_or_slice(path: str, error: str, hint: str) -> None:
    err = fail(f'action "a" maildir "{path}"\n')
    assert (err.location, err.message, err.token) == (loc(1, 20), error, path)
    assert err.hint is not None and err.hint.startswith(hint)


def test_action_format_modifiers_and_slices_that_deliveries_take() -> None:
    for path in ("/x/%{rcpt.user:lowercase|strip}", "/x/%{dest[-4:]}", "/x/%{mbox.from[:3]}"):
        assert parse(f'action "a" mbox "{path}"\n').actions["a"].path == path


def test_action_empty_path() -> None:
    assert fail('action "a" maildir ""\n').message == "empty path"


def test_duplicate_action() -> None:
    assert message('action "a" maildir\naction "a" mbox\n') == (
        "<embedded>:2:8: error: action 'a' is already declared at <embedded>:1:8 near 'a'\n"
        "  hint: give each action its own name"
    )


def test_action_name_keyword() -> None:
    assert message("action local maildir\n") == (
        "<embedded>:1:8: error: 'local' is a keyword and cannot be used as an action name "
        "without quotes near 'local'\n"
        '  hint: write "local"'
    )


# --- match ------------------------------------------------------------------------------------


DECLS = 'table nets { 10.0.0.0/8, "::1" }\ntable doms { example.org }\naction "local" maildir\n'


def test_match_defaults() -> None:
    cfg = parse('action "local" maildir\nmatch action "local"\n')
    assert cfg.matches == [
        Match("local", False, None, "local", False, None, None, False, "local", False, loc(2, 1))
    ]


def test_match_forms() -> None:
    cfg = parse(
        DECLS
        + 'match from any for domain <doms> action "local"\n'
        + "match !from src <nets> !for rcpt-to <doms> !tag LAN reject\n"
        + 'match tag T from socket for any action "local"\n'
        + 'match for local from local action "local"\n'
    )
    assert cfg.matches == [
        Match("any", False, None, "domain", False, "doms", None, False, "local", False, loc(4, 1)),
        Match("src", True, "nets", "rcpt-to", True, "doms", "LAN", True, None, True, loc(5, 1)),
        Match("socket", False, None, "any", False, None, "T", False, "local", False, loc(6, 1)),
        Match("local", False, None, "local", False, None, None, False, "local", False, loc(7, 1)),
    ]


def test_match_negation_with_space() -> None:
    cfg = parse(DECLS + "match ! from src <nets> for domain <doms> reject\n")
    assert cfg.matches[0].from_negate


def test_match_action_declared_later() -> None:
    cfg = parse('match for any action "later"\naction "later" mbox\n')
    assert cfg.matches[0].action == "later"


def test_match_unknown_action() -> None:
    assert message(DECLS + 'match for local action "locl"\n') == (
        "<embedded>:4:24: error: unknown action 'locl' near 'locl'\n  hint: did you mean 'local'?"
    )


def test_match_unknown_action_is_reported_after_the_whole_file() -> None:
    err = fail('match action "nope"\nmatch action "nope2"\naction "x" maildir\n')
    assert (err.location, err.message) == (loc(1, 14), "unknown action 'nope'")
    assert err.hint == 'declare it: action "nope" maildir'


def test_match_unknown_table() -> None:
    err = fail(DECLS + 'match from src <net> action "local"\n')
    assert (err.location, err.message, err.hint) == (
        loc(4, 17),
        "unknown table 'net'",
        "did you mean 'nets'?",
    )


def test_match_src_table_must_hold_addresses() -> None:
    assert message(DECLS + 'match from src <doms> action "local"\n') == (
        "<embedded>:4:17: error: table 'doms' is used with 'from src' but 'example.org' is not "
        "an address or network near 'doms'\n"
        "  hint: a src table lists IP addresses or networks such as 192.168.1.0/24"
    )


def test_match_src_literal_gets_a_hint() -> None:
    err = fail(DECLS + 'match from src 10.0.0.0/8 action "local"\n')
    assert err.message == "expected a table reference like '<NAME>' after 'src'"
    assert err.hint == ("declare a table (table mytable { 10.0.0.0/8 }) and write 'src <mytable>'")


@pytest.mark.parametrize(
    ("rule", "column", "token"),
    [
        ("from auth", 12, "auth"),
        ("from rdns", 12, "rdns"),
        ("from mail-from <doms>", 12, "mail-from"),
    ],
)
def test_match_refused_sources(rule: str, column: int, token: str) -> None:
    err = fail(f'{DECLS}match {rule} action "local"\n')
    assert err.message == f"'from {token}' is not supported yet"
    assert (err.location, err.token) == (loc(4, column), token)


@pytest.mark.parametrize("option", ["tls", "auth", "helo", "mail-from", "!tls"])
def test_match_refused_options(option: str) -> None:
    err = fail(f'{DECLS}match from any {option} action "local"\n')
    assert err.message == f"'{option.lstrip('!')}' is not supported yet"


def test_match_unknown_option() -> None:
    assert message(DECLS + 'match frm any action "local"\n') == (
        "<embedded>:4:7: error: unknown match option 'frm' near 'frm'\n  hint: did you mean 'from'?"
    )


def test_match_unknown_source_and_destination() -> None:
    err = fail(DECLS + 'match from anny action "local"\n')
    assert (err.message, err.hint) == ("unknown source 'anny' after 'from'", "did you mean 'any'?")
    err = fail(DECLS + 'match for domian <doms> action "local"\n')
    assert (err.message, err.hint) == (
        "unknown destination 'domian' after 'for'",
        "did you mean 'domain'?",
    )


def test_match_needs_action_or_reject() -> None:
    assert message(DECLS + "match from any for local\n") == (
        "<embedded>:4:25: error: a match rule needs 'action NAME' or 'reject'\n"
        '  hint: match from local for local action "local"'
    )


def test_match_action_and_reject() -> None:
    err = fail(DECLS + 'match action "local" reject\n')
    assert (err.location, err.message) == (
        loc(4, 22),
        "a match rule takes either 'action NAME' or 'reject', not both",
    )


def test_match_option_twice() -> None:
    err = fail(DECLS + 'match from any from local action "local"\n')
    assert (err.location, err.message) == (loc(4, 16), "'from' is given twice")


def test_match_negated_action() -> None:
    err = fail(DECLS + 'match !action "local"\n')
    assert (err.location, err.message) == (loc(4, 8), "'!' can only negate 'from', 'for' or 'tag'")


def test_match_negated_any() -> None:
    assert fail(DECLS + "match !from any reject\n").message == "'!from any' never matches"
    assert fail(DECLS + "match !for any reject\n").message == "'!for any' never matches"


def test_match_action_name_keyword() -> None:
    assert fail(DECLS + "match action local\n").hint == 'write "local"'


def test_match_missing_table_name() -> None:
    err = fail(DECLS + "match for domain <\n")
    assert err.message == "missing a table name after '<'"


# --- globals ----------------------------------------------------------------------------------


def test_global_defaults() -> None:
    cfg = parse("")
    assert cfg.queue_ttl == 4 * 86400
    assert cfg.bounce_warn_interval == [4 * 3600]
    assert cfg.max_message_size == 35 * 1024 * 1024
    assert (cfg.max_mails, cfg.max_rcpt, cfg.sub_addr_delim) == (100, 1000, "+")


def test_globals() -> None:
    cfg = parse(
        "queue ttl 2d\n"
        "bounce warn-interval 1h, 2h, 30m, 90\n"
        "smtp max-message-size 10M\n"
        "smtp limit max-mails 10 max-rcpt 20\n"
        "smtp sub-addr-delim -\n"
    )
    assert cfg.queue_ttl == 2 * 86400
    assert cfg.bounce_warn_interval == [3600, 7200, 1800, 90]
    assert cfg.max_message_size == 10 * 1024 * 1024
    assert (cfg.max_mails, cfg.max_rcpt, cfg.sub_addr_delim) == (10, 20, "-")
    assert cfg.warnings == []


def test_smtp_limits_on_separate_lines() -> None:
    cfg = parse("smtp limit max-rcpt 5\nsmtp limit max-mails 7\n")
    assert (cfg.max_mails, cfg.max_rcpt) == (7, 5)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("30", 30),
        ("5m", 300),
        ("2h", 7200),
        ("3d", 3 * 86400),
        ("3650d", 3650 * 86400),
    ],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse(f"queue ttl {text}\n").queue_ttl == seconds


@pytest.mark.parametrize(
    ("text", "msg", "hint"),
    [
        ("4D", "the queue ttl is not a valid duration", "units are lowercase: write '4d'"),
        (
            "1w",
            "the queue ttl is not a valid duration",
            "weeks are not a unit; write days, such as 7d",
        ),
        ("4 d", "unexpected 'd'", None),
        (
            "x",
            "the queue ttl is not a valid duration",
            "write a number with s, m, h or d, such as 4h or 4d",
        ),
        ("0d", "the queue ttl must be longer than zero", None),
        ("3651d", "the queue ttl is too long", "the longest duration is 3650d"),
        (
            "-1d",
            "the queue ttl is not a valid duration",
            "write a number with s, m, h or d, such as 4h or 4d",
        ),
        (
            "9" * 40,
            "the queue ttl is not a valid duration",
            "write a number with s, m, h or d, such as 4h or 4d",
        ),
    ],
)
def test_bad_durations(text: str, msg: str, hint: str | None) -> None:
    err = fail(f"queue ttl {text}\n")
    assert (err.message, err.hint) == (msg, hint)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1000", 1000), ("64k", 65536), ("64K", 65536), ("35M", 35 << 20), ("2g", 2 << 30)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse(f"smtp max-message-size {text}\n").max_message_size == size


@pytest.mark.parametrize(
    ("text", "msg", "hint"),
    [
        (
            "35MB",
            "the max-message-size is not a valid size",
            "write '35M' (K, M and G are binary multiples)",
        ),
        (
            "35T",
            "the max-message-size is not a valid size",
            "write bytes, or a number with K, M or G, such as 35M",
        ),
        ("0", "the max-message-size must be larger than zero", None),
        ("1025G", "the max-message-size is too large", "the largest size is 1024G"),
    ],
)
def test_bad_sizes(text: str, msg: str, hint: str | None) -> None:
    err = fail(f"smtp max-message-size {text}\n")
    assert (err.message, err.hint, err.location) == (msg, hint, loc(1, 23))


def test_warn_interval_limit() -> None:
    parse("bounce warn-interval 1h, 2h, 3h, 4h\n")
    err = fail("bounce warn-interval 1h, 2h, 3h, 4h, 5h\n")
    assert (err.location, err.message) == (loc(1, 38), "at most four warn-interval durations")


def test_warn_interval_needs_commas() -> None:
    err = fail("bounce warn-interval 1h 2h\n")
    assert (err.message, err.hint) == (
        "expected ',' between warn-interval durations",
        "bounce warn-interval 1h, 4h",
    )
    assert fail("bounce warn-interval 1h,\n").message == "missing a duration after ','"


def test_unknown_global_options() -> None:
    assert message("queue tll 4d\n") == (
        "<embedded>:1:7: error: unknown queue option 'tll' near 'tll'\n  hint: did you mean 'ttl'?"
    )
    assert fail("bounce warn 4h\n").hint == "did you mean 'warn-interval'?"
    assert fail("smtp max-size 35M\n").hint == "did you mean 'max-message-size'?"
    assert fail("smtp limit max-mail 5\n").hint == "did you mean 'max-mails'?"
    assert fail("smtp limit\n").message == "missing limit after 'smtp limit'"
    assert fail("smtp\n").message == "missing an smtp option after 'smtp'"


@pytest.mark.parametrize("text", ["queue compression", "queue encryption key", "smtp ciphers x"])
def test_refused_global_options(text: str) -> None:
    assert "not supported yet" in fail(text + "\n").message


def test_limit_numbers() -> None:
    err = fail("smtp limit max-mails 0\n")
    assert err.message == "max-mails must be a number from 1 to 2147483647"
    assert fail("smtp limit max-rcpt 5 max-rcpt 6\n").message == "'max-rcpt' is given twice"


@pytest.mark.parametrize("delim", ["-", "+", '"="', '"#"', "_", "~"])
def test_sub_addr_delim(delim: str) -> None:
    assert parse(f"smtp sub-addr-delim {delim}\n").sub_addr_delim == delim.strip('"')


@pytest.mark.parametrize("delim", ["a", "1", "@", "--", '""', '" "', "."])
def test_bad_sub_addr_delim(delim: str) -> None:
    err = fail(f"smtp sub-addr-delim {delim}\n")
    assert err.message == (
        "sub-addr-delim must be a single character that is not a letter, a digit or '@'"
    )
    assert err.location == loc(1, 21)


def test_pki_is_refused() -> None:
    assert message('pki mail.example.org cert "/etc/ssl/x.pem"\n') == (
        "<embedded>:1:1: error: 'pki' is not supported yet near 'pki'\n"
        "  hint: homemail cannot use TLS yet, so it has no use for certificates"
    )


@pytest.mark.parametrize("word", ["mta", "filter", "proc", "srs", "ca", "admd"])
def test_other_refused_statements(word: str) -> None:
    assert fail(f"{word} x\n").message == f"'{word}' is not supported yet"


def test_unknown_keyword() -> None:
    assert message("\n   lsten on localhost\n") == (
        "<embedded>:2:4: error: unknown keyword 'lsten' near 'lsten'\n"
        "  hint: did you mean 'listen'?"
    )
    assert fail("Listen on localhost\n").hint == "did you mean 'listen'?"
    assert fail("frobnicate\n").hint is None


def test_statement_starting_with_a_string_or_punctuation() -> None:
    assert fail('"listen" on localhost\n').message == (
        "a statement must start with a keyword, not a quoted string"
    )
    assert fail("} x\n").message == "unexpected '}'"


def test_global_set_twice_warns() -> None:
    cfg = parse("queue ttl 1d\nqueue ttl 2d\n")
    assert cfg.queue_ttl == 2 * 86400
    assert [str(w) for w in cfg.warnings] == [
        "<embedded>:2:7: warning: 'queue ttl' is set again; the value from <embedded>:1:7 is "
        "replaced"
    ]


# --- warnings ---------------------------------------------------------------------------------


def test_unused_table_and_action() -> None:
    cfg = parse('table t { a }\naction "a" maildir\naction "b" mbox\nmatch action "b"\n')
    assert [str(w) for w in cfg.warnings] == [
        "<embedded>:1:7: warning: table 't' is unused",
        "<embedded>:2:8: warning: action 'a' is unused: no match rule refers to it",
    ]


def test_open_relay_warning_for_any_to_any() -> None:
    cfg = parse('action "a" maildir\nmatch from any for any action "a"\n')
    assert [str(w) for w in cfg.warnings] == [
        "<embedded>:2:1: warning: this rule accepts mail for every domain from anywhere "
        "(action 'a'); use 'for local' or 'for domain <TABLE>'"
    ]
    assert open_relay_warnings(cfg) == cfg.warnings


def test_open_relay_warning_for_relay_actions() -> None:
    cfg = parse('action "a" maildir\nmatch from any for any action "a"\n')
    cfg.actions["a"].method = "relay"  # type: ignore[assignment]  # no relay method exists yet
    assert [str(w) for w in open_relay_warnings(cfg)] == [
        "<embedded>:2:1: warning: open relay: this rule relays mail from anywhere to any domain "
        "(action 'a'); use 'from local' or 'from src <TABLE>'"
    ]


@pytest.mark.parametrize(
    "rule",
    [
        "match from any for any reject",
        'match from local for any action "a"',
        'match from any for local action "a"',
        'match from any !for domain <t> action "a"',
    ],
)
def test_no_open_relay_warning(rule: str) -> None:
    cfg = parse(f'table t {{ x }}\naction "a" maildir\nmatch for domain <t> action "a"\n{rule}\n')
    assert open_relay_warnings(cfg) == []
    assert cfg.warnings == []


# --- default config and dump ------------------------------------------------------------------


def test_default_config_text() -> None:
    text = default_config_text("alice")
    assert text == (
        'table aliases { postmaster = "alice", root = "alice", abuse = "alice", '
        '"mailer-daemon" = "alice" }\n'
        "listen on localhost port 2525\n"
        'action "local" maildir alias <aliases>\n'
        'match from local for local action "local"\n'
    )
    cfg = parse(text)
    assert cfg.tables["aliases"].mapping == {
        "postmaster": "alice",
        "root": "alice",
        "abuse": "alice",
        "mailer-daemon": "alice",
    }
    assert cfg.listeners == [Listener("localhost", 2525, None, None, False, loc(2, 11))]
    assert cfg.actions == {"local": Action("local", "maildir", None, "aliases", None, loc(3, 8))}
    assert cfg.matches == [
        Match("local", False, None, "local", False, None, None, False, "local", False, loc(4, 1))
    ]
    assert cfg.warnings == []


def test_default_config_text_quotes_odd_user_names() -> None:
    cfg = parse(default_config_text('we"ird\\user'))
    assert cfg.tables["aliases"].lookup("root") == 'we"ird\\user'


def test_default_config_text_refuses_empty_user() -> None:
    with pytest.raises(ValueError):
        default_config_text("")


def test_dump_round_trip(tmp_path: Path) -> None:
    (tmp_path / "aliases").write_text("root: bob\n")
    text = (
        f'table aliases "{tmp_path / "aliases"}"\n'
        'table nets { 192.168.0.0/16, "::1" }\n'
        'table doms { "local" = x, example.org = "a b" }\n'
        'listen on localhost port 2525 tag "local" hostname mail.example.org mask-src\n'
        "listen on socket\n"
        'listen on "lo"\n'
        'action "local" maildir "~/Mail/%{dest.user}" alias <aliases> ttl 90m\n'
        'action "box" mbox ttl 61\n'
        'match from src <nets> !for domain <doms> !tag "local" action "local"\n'
        'match !from socket for rcpt-to <doms> action "box"\n'
        "match from any for any reject\n"
        "queue ttl 2d\nbounce warn-interval 1h, 25h\nsmtp max-message-size 1000001\n"
        'smtp limit max-rcpt 7\nsmtp sub-addr-delim "="\n'
    )
    cfg = parse(text)
    again = parse(dump(cfg))
    assert again == cfg
    assert again.listeners == cfg.listeners
    assert again.tables == cfg.tables
    assert again.bounce_warn_interval == [3600, 25 * 3600]
    assert dump(again) == dump(cfg)


def test_dump_text() -> None:
    cfg = parse(default_config_text("bob") + "queue ttl 90m\nsmtp max-message-size 1000\n")
    assert dump(cfg) == (
        "# effective configuration of <embedded>\n"
        "table aliases { postmaster = bob, root = bob, abuse = bob, mailer-daemon = bob }\n"
        "listen on localhost port 2525\n"
        'action "local" maildir alias <aliases>\n'
        'match from local for local action "local"\n'
        "queue ttl 90m\n"
        "bounce warn-interval 4h\n"
        "smtp max-message-size 1000\n"
        "smtp limit max-mails 100 max-rcpt 1000\n"
        'smtp sub-addr-delim "+"\n'
    )


def test_config_equality_ignores_locations_and_path() -> None:
    a = parse_string("listen on localhost\n" + MINIMAL, "a.conf")
    b = parse_string("\n\nlisten   on localhost\n\n" + MINIMAL, "b.conf")
    assert a == b
    assert a.listeners[0].location != b.listeners[0].location


# --- hostile text in messages -----------------------------------------------------------------


def test_messages_escape_what_a_terminal_should_not_get() -> None:
    assert message("lis\u202eten on localhost\n") == (
        "<embedded>:1:1: error: unknown keyword 'lis\\u202eten' near 'lis\\u202eten'\n"
        "  hint: did you mean 'listen'?"
    )


def test_unencodable_paths_are_config_errors() -> None:
    err = fail('include "\ud800"\n')
    assert err.location == loc(1, 9)
    assert "\\ud800" in str(err)
    err = fail('table t "/x\ud800"\n')
    assert err.message.startswith("cannot load table 't'")
    with pytest.raises(ConfigError, match="embedded null byte"):
        parse_file("a\0b")
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        parse_file("\ud800")


def test_table_errors_escape_control_characters(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("a: b\n\x1b[31m:\n")
    err = fail(f'table t "{tmp_path / "t"}"\n')
    assert "\x1b" not in str(err)
    assert "key '\\u001b[31m' has no value" in str(err)
