"""Property tests for homemail.config: no input crashes the parser, valid configs round-trip."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homemail.config import (
    KEYWORDS,
    Action,
    Config,
    ConfigError,
    Listener,
    Location,
    Match,
    dump,
    parse_string,
)
from homemail.table import Table

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORKDIR = Path(tempfile.mkdtemp(prefix="homemail-config-props-"))
FILENAME = str(WORKDIR / "smtpd.conf")
NOWHERE = Location(FILENAME, 0, 0)


@pytest.fixture(scope="module", autouse=True)
def _remove_workdir() -> Iterator[None]:
    yield
    shutil.rmtree(WORKDIR, ignore_errors=True)


def parse_or_config_error(text: str) -> Config | None:
    try:
        return parse_string(text, FILENAME)
    except ConfigError as err:
        assert str(err)
        return None


# --- nothing crashes --------------------------------------------------------------------------


@SETTINGS
@given(st.text())
def test_arbitrary_text_raises_only_config_error(text: str) -> None:
    parse_or_config_error(text)


TOKENS = st.one_of(
    st.sampled_from(sorted(KEYWORDS)),
    st.sampled_from([*'{},=<>!"#\\$', "\n", "\\\n", "\r\n", "\t", '""', "$x", "x =", "%{"]),
    st.sampled_from(
        [
            "0",
            "25",
            "65536",
            "4d",
            "35M",
            "1w",
            "localhost",
            "::1",
            "10.0.0.0/8",
            "file:/nonexistent",
            "/dev/null",
            "t",
            "a",
            '"a"',
            '"local"',
            '"x\\"y"',
            "~/Maildir",
            '"%{dest.user}"',
            "include",
            "x",
        ]
    ),
    st.text(min_size=1, max_size=6),
)


@SETTINGS
@given(st.lists(TOKENS, max_size=40))
def test_token_soup_raises_only_config_error(tokens: list[str]) -> None:
    parse_or_config_error(" ".join(tokens))


@SETTINGS
@given(st.lists(TOKENS, max_size=40), st.lists(TOKENS, max_size=10))
def test_grammar_prefix_with_soup_raises_only_config_error(
    tokens: list[str], tail: list[str]
) -> None:
    prefix = (
        'x = "1"\ntable t { a = b }\ntable n { 10.0.0.0/8 }\naction "a" maildir alias <t>\n'
        'match from src <n> for any action "a"\n'
    )
    parse_or_config_error(prefix + " ".join(tokens) + "\n" + " ".join(tail))


# --- valid configurations ---------------------------------------------------------------------


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


BARE_NAMES = st.from_regex(r"[a-z][a-z0-9_.-]{0,7}", fullmatch=True)
ODD_NAMES = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=8
)
NAMES = st.one_of(BARE_NAMES, ODD_NAMES, st.sampled_from(sorted(KEYWORDS)))


def render_name(draw: Any, name: str) -> str:
    """A name bare when the lexer allows it, else (or at random) quoted."""
    safe = all(c.isalnum() or c in "_.-" for c in name) and name.isascii()
    if safe and name not in KEYWORDS and not name.startswith("-") and draw(st.booleans()):
        return name
    return quote(name)


DURATIONS = st.sampled_from([(30, "30s"), (30, "30"), (300, "5m"), (7200, "2h"), (172800, "2d")])
SIZES = st.sampled_from([(1000, "1000"), (65536, "64K"), (65536, "64k"), (10 << 20, "10M")])
NETS = st.sampled_from(["10.0.0.0/8", "192.168.1.0/24", "::1", "fe80::/10", "127.0.0.1"])
VALUES = st.one_of(BARE_NAMES, ODD_NAMES)


@st.composite
def configs(draw: Any) -> tuple[str, Config]:
    lines: list[str] = []
    tables: dict[str, Table] = {}
    used: set[str] = set()

    def fresh(names: Any = NAMES) -> str:
        return str(draw(names.filter(lambda n: n not in used and n.strip() == n and n)))

    def table_line(name: str, body: list[str]) -> None:
        sep = draw(st.sampled_from([", ", ",", " ,\n  "]))
        trailing = draw(st.sampled_from(["", ","]))
        lines.append(f"table {render_name(draw, name)} {{ {sep.join(body)}{trailing} }}")

    nets = []
    for _ in range(draw(st.integers(0, 2))):
        name = fresh()
        used.add(name)
        values = draw(st.lists(NETS, min_size=1, max_size=3))
        tables[name] = Table.inline_list(name, values)
        table_line(name, [quote(v) if ":" in v or draw(st.booleans()) else v for v in values])
        nets.append(name)
    maps = []
    for _ in range(draw(st.integers(0, 2))):
        name = fresh()
        used.add(name)
        keys = draw(st.lists(VALUES, min_size=1, max_size=3, unique_by=str.lower))
        pairs = [(k, draw(VALUES)) for k in keys]
        tables[name] = Table.inline_map(name, pairs)
        table_line(name, [f"{quote(k)} = {quote(v)}" for k, v in pairs])
        maps.append(name)
    lists = []
    for _ in range(draw(st.integers(0, 2))):
        name = fresh()
        used.add(name)
        values = draw(st.lists(VALUES, min_size=1, max_size=3))
        tables[name] = Table.inline_list(name, values)
        table_line(name, [quote(v) for v in values])
        lists.append(name)

    listeners: list[Listener] = []
    seen: set[tuple[bool, int | None]] = set()
    for _ in range(draw(st.integers(0, 3))):
        address = draw(st.sampled_from(["localhost", "all", "socket", "127.0.0.1", "::1", "lo"]))
        port = None if address == "socket" else draw(st.none() | st.integers(1, 65535))
        # these all bind loopback addresses (or the wildcards): one listener a port
        if (address == "socket", port) in seen:
            continue
        seen.add((address == "socket", port))
        hostname = draw(st.none() | st.sampled_from(["mail.example.org", "localhost", "h"]))
        tag = draw(st.none() | NAMES)
        mask = draw(st.booleans())
        listeners.append(Listener(address, port, hostname, tag, mask, NOWHERE))
        options = []
        if port is not None:
            options.append(f"port {port}")
        if hostname is not None:
            options.append(f"hostname {quote(hostname)}")
        if tag is not None:
            options.append(f"tag {render_name(draw, tag)}")
        if mask:
            options.append("mask-src")
        options = draw(st.permutations(options))
        lines.append(" ".join(["listen on", address, *options]))

    actions: dict[str, Action] = {}
    for _ in range(draw(st.integers(0, 3))):
        name = fresh()
        used.add(name)
        method = draw(st.sampled_from(["maildir", "mbox"]))
        path = draw(
            st.none()
            | st.sampled_from(["~/Maildir", "/var/mail/%{user.username}", "/a b/%{dest.user}"])
        )
        alias = draw(st.none() | st.sampled_from(maps)) if maps else None
        ttl = draw(st.none() | DURATIONS)
        actions[name] = Action(name, method, path, alias, ttl[0] if ttl else None, NOWHERE)
        options = []
        if alias is not None:
            options.append(f"alias <{render_name(draw, alias)}>")
        if ttl is not None:
            options.append(f"ttl {ttl[1]}")
        head = ["action", render_name(draw, name), method]
        if path is not None:
            head.append(quote(path))
        lines.append(" ".join(head + draw(st.permutations(options))))

    matches: list[Match] = []
    for _ in range(draw(st.integers(0, 4))):
        options = []
        from_kinds = ["any", "local", "socket"] + (["src"] if nets else [])
        from_kind = draw(st.sampled_from(from_kinds))
        from_negate = from_kind != "any" and draw(st.booleans())
        from_table = draw(st.sampled_from(nets)) if from_kind == "src" else None
        if from_kind != "local" or from_negate or draw(st.booleans()):
            ref = f" <{render_name(draw, from_table)}>" if from_table else ""
            options.append(f"{'!' if from_negate else ''}from {from_kind}{ref}")
        doms = maps + lists
        for_kinds = ["any", "local"] + (["domain", "rcpt-to"] if doms else [])
        for_kind = draw(st.sampled_from(for_kinds))
        for_negate = for_kind != "any" and draw(st.booleans())
        for_table = draw(st.sampled_from(doms)) if for_kind in ("domain", "rcpt-to") else None
        if for_kind != "local" or for_negate or draw(st.booleans()):
            ref = f" <{render_name(draw, for_table)}>" if for_table else ""
            options.append(f"{'!' if for_negate else ''}for {for_kind}{ref}")
        tag = draw(st.none() | NAMES)
        tag_negate = tag is not None and draw(st.booleans())
        if tag is not None:
            options.append(f"{'!' if tag_negate else ''}tag {render_name(draw, tag)}")
        action = draw(st.sampled_from(sorted(actions))) if actions and draw(st.booleans()) else None
        reject = action is None
        options.append("reject" if reject else f"action {render_name(draw, action or '')}")
        matches.append(
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
                NOWHERE,
            )
        )
        lines.append("match " + " ".join(draw(st.permutations(options))))

    expected = Config(FILENAME, tables, listeners, actions, matches)
    if draw(st.booleans()):
        seconds, text = draw(DURATIONS)
        expected.queue_ttl = seconds
        lines.append(f"queue ttl {text}")
    if draw(st.booleans()):
        picked = draw(st.lists(DURATIONS, min_size=1, max_size=4))
        expected.bounce_warn_interval = [s for s, _ in picked]
        lines.append("bounce warn-interval " + ", ".join(t for _, t in picked))
    if draw(st.booleans()):
        size, text = draw(SIZES)
        expected.max_message_size = size
        lines.append(f"smtp max-message-size {text}")
    if draw(st.booleans()):
        expected.max_mails = draw(st.integers(1, 10**6))
        expected.max_rcpt = draw(st.integers(1, 10**6))
        lines.append(f"smtp limit max-mails {expected.max_mails} max-rcpt {expected.max_rcpt}")
    if draw(st.booleans()):
        expected.sub_addr_delim = draw(st.sampled_from(list("-+_=~")))
        lines.append(f"smtp sub-addr-delim {quote(expected.sub_addr_delim)}")

    # Statements may come in any order except that globals set last win; shuffle the
    # declarations (actions and tables may be referred to before they are declared).
    order = draw(st.permutations(range(len(lines))))
    decl = [lines[i] for i in order if not lines[i].startswith(("listen", "match"))]
    rest = [line for line in lines if line.startswith(("listen", "match"))]
    glue = draw(st.sampled_from(["\n", "\n\n", "  # note\n", " \\\n\n"]))
    return glue.join(decl + rest) + "\n", expected


@SETTINGS
@given(configs())
def test_valid_configs_parse_to_the_expected_config(case: tuple[str, Config]) -> None:
    text, expected = case
    cfg = parse_string(text, FILENAME)
    assert cfg == expected


@SETTINGS
@given(configs())
def test_dump_round_trips(case: tuple[str, Config]) -> None:
    text, _ = case
    cfg = parse_string(text, FILENAME)
    dumped = dump(cfg)
    again = parse_string(dumped, FILENAME)
    assert again == cfg
    assert dump(again) == dumped
    assert [w.message for w in again.warnings] == [w.message for w in cfg.warnings]


@SETTINGS
@given(st.lists(st.sampled_from(["a", "b c", "-", "x:y", "#", "\\", '"'])))
def test_quoted_strings_survive_any_content(parts: list[str]) -> None:
    value = "".join(parts) or "v"
    cfg = parse_string(f"table t {{ k = {quote(value)} }}\n", FILENAME)
    assert cfg.tables["t"].mapping == {"k": value}
