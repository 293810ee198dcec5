"""The DATA reader on its own: terminator, unstuffing, size limit, pushback of pipelined bytes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homemail.smtp import MAX_LINE, Session, _has_long_line, _TooLarge, split_header


async def read(stream: bytes, limit: int = 1 << 20, chunks: int = 7) -> tuple[object, bytes]:
    reader = asyncio.StreamReader()
    step = max(1, len(stream) // chunks)
    for i in range(0, len(stream), step):
        reader.feed_data(stream[i : i + step])
    complete = b"\r\n.\r\n" in b"\r\n" + stream
    if not complete:
        reader.feed_eof()  # a client that went away mid-message
    fake = SimpleNamespace(
        _reader=reader, ctx=SimpleNamespace(max_message_size=limit), _reset_timeout=lambda: None
    )
    try:
        content: object = await Session._read_data(fake)  # type: ignore[arg-type]
    except _TooLarge:
        content = "too large"
    if complete:
        reader.feed_eof()
    rest = await reader.read()
    return content, rest


@pytest.mark.parametrize(
    ("stream", "content", "rest"),
    [
        (b".\r\n", b"", b""),
        (b"a\r\n.\r\n", b"a\r\n", b""),
        (b"a\r\n..b\r\n.\r\nQUIT\r\n", b"a\r\n.b\r\n", b"QUIT\r\n"),
        (b"x\n.\ny\r\n.\r\n", b"x\n.\ny\r\n", b""),
        (b"x\r\n.\ny\r\n.\r\nRSET\r\n", b"x\r\n\ny\r\n", b"RSET\r\n"),
        (b"x\r.\r\r\n.\r\n", b"x\r.\r\r\n", b""),
        (b"a\r\n.\x00\r\n.\r\n", b"a\r\n\x00\r\n", b""),
        (b"no end\r\n", None, b""),
    ],
)
async def test_terminator_and_unstuffing(stream: bytes, content: bytes | None, rest: bytes):
    assert await read(stream) == (content, rest)


async def test_over_the_limit_is_read_to_the_end_and_refused():
    body = b"x" * 76 + b"\r\n"
    content, rest = await read(body * 1000 + b".\r\nQUIT\r\n", limit=10_000, chunks=50)
    assert (content, rest) == ("too large", b"QUIT\r\n")


@pytest.mark.parametrize("extra", [0, 1])
async def test_the_limit_is_on_the_size_after_unstuffing(extra: int):
    """RFC 1870: the doubled dots of the transfer do not count."""
    line = b".dotted line, stuffed on the wire\r\n"  # 35 octets, 36 on the wire
    message = line * 1000 + b"x" * extra + b"\r\n" * bool(extra)
    limit = len(line) * 1000 + 2 * bool(extra)
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    stuffed = b"." + stuffed if stuffed.startswith(b".") else stuffed
    content, rest = await read(stuffed + b".\r\nQUIT\r\n", limit=limit, chunks=40)
    assert rest == b"QUIT\r\n"
    assert content == (message if not extra else "too large")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=40).filter(lambda b: b"\r\n" not in b), max_size=20),
    st.integers(min_value=1, max_value=13),
)
def test_stuffed_lines_come_back_unchanged(lines: list[bytes], chunks: int):
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    content, rest = asyncio.run(read(stuffed + b".\r\nNOOP\r\n", chunks=chunks))
    assert content == message
    assert rest == b"NOOP\r\n"


def longest_line(content: bytes) -> int:
    """The plain definition: the longest CRLF-terminated line, CRLF included."""
    return max(map(len, content.split(b"\r\n"))) + 2


_piece = st.sampled_from([b"x", b"\r", b"\n", b"\r\n", b"x" * 97, b"y" * 499])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_piece, st.integers(min_value=0, max_value=12)), max_size=40))
def test_the_long_line_check_agrees_with_splitting_into_lines(pieces: list[tuple[bytes, int]]):
    content = b"".join(piece * count for piece, count in pieces)
    assert _has_long_line(content) == (longest_line(content) > MAX_LINE)


@pytest.mark.parametrize("length", [997, 998, 999, 1000])
@pytest.mark.parametrize("where", ["first", "middle", "last", "unterminated"])
def test_the_long_line_check_at_the_limit(length: int, where: str):
    line = b"z" * length
    short = b"a" * 70 + b"\r\n"
    content = {
        "first": line + b"\r\n" + short * 30,
        "middle": short * 13 + line + b"\r\n" + short * 17,
        "last": short * 30 + line + b"\r\n",
        "unterminated": short * 30 + line,
    }[where]
    assert _has_long_line(content) == (length > 998)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"Subject: x", b"X-A :b", b"\tmore", b" ", b"no field", b"", b"a b: c"]),
        max_size=8,
    ),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_the_header_section_ends_at_the_first_line_that_is_not_a_field(
    lines: list[bytes], eol: bytes
):
    content = b"".join(line + eol for line in lines)
    headers, body = split_header(content)
    fields = 0
    for line in lines:
        if line in (b"Subject: x", b"X-A :b") or (fields and line in (b"\tmore", b" ")):
            fields += 1
        else:
            break
    assert headers == b"".join(line + eol for line in lines[:fields])
    rest = content[len(headers) :]
    if fields < len(lines) and lines[fields] != b"":  # no empty line: one is put in
        assert body == b"\r\n" + rest
    else:
        assert body == rest


@pytest.mark.parametrize("cut", [1, 2, 3])  # ".\r" | "\n", "." | "\r\n", "\r\n" | ".\r\n"...
async def test_a_message_at_the_limit_is_taken_wherever_the_end_is_cut(cut: int):
    message = b"x" * 98 + b"\r\n"
    message = message * 100  # 10,000 octets: the limit exactly
    reader = asyncio.StreamReader()
    stream = message + b".\r\n"
    reader.feed_data(stream[:-cut])
    fake = SimpleNamespace(
        _reader=reader, ctx=SimpleNamespace(max_message_size=len(message)),
        _reset_timeout=lambda: None,
    )
    task = asyncio.ensure_future(Session._read_data(fake))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    reader.feed_data(stream[-cut:])
    assert await task == message
