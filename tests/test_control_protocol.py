"""The control protocol: frames round-trip, every refusal has its code, garbage raises only
ProtocolError (REFERENCE §8: malformed input must cost only that client its connection)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homemail import control_protocol as proto
from homemail.control_protocol import Code, ProtocolError, Reply, Request

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def code_of(fn: Any, line: bytes) -> Code:
    with pytest.raises(ProtocolError) as info:
        fn(line)
    assert info.value.message
    return info.value.code


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", sorted(proto.VERBS))
def test_every_verb_round_trips(verb: str) -> None:
    line = proto.request(7, verb, name="all", targets=["a@example.org"])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert proto.decode_request(line) == Request(
        7, verb, {"name": "all", "targets": ["a@example.org"]}
    )


def test_request_without_args_has_empty_args() -> None:
    assert proto.decode_request(proto.request(1, "show stats")).args == {}
    line = frame({"v": 1, "id": 1, "verb": "show stats"})
    assert proto.decode_request(line).args == {}


def test_unicode_survives_and_is_utf8_on_the_wire() -> None:
    line = proto.request(3, "alias add", name="jörg", targets=["jörg@bücher.example"])
    assert "jörg".encode() in line
    assert proto.decode_request(line).args["targets"] == ["jörg@bücher.example"]


def test_reply_ok_round_trip() -> None:
    reply = proto.decode_reply(proto.reply_ok(9, {"count": 3}))
    assert reply == Reply(9, True, result={"count": 3})
    assert proto.decode_reply(proto.reply_ok(1)).result is None


def test_reply_error_round_trip() -> None:
    reply = proto.decode_reply(proto.reply_error(4, Code.FORBIDDEN, "schedule: permission denied"))
    assert (reply.id, reply.ok, reply.code) == (4, False, 403)
    assert reply.message == "schedule: permission denied"
    assert reply.event is None


def test_event_round_trip() -> None:
    reply = proto.decode_reply(proto.event(5, "items", {"items": [{"id": "ab"}]}))
    assert (reply.id, reply.ok, reply.event) == (5, True, "items")
    assert reply.data == {"items": [{"id": "ab"}]}


def test_codes_are_stable() -> None:
    assert {c.name: int(c) for c in Code} == {
        "BAD_REQUEST": 400,
        "FORBIDDEN": 403,
        "NOT_FOUND": 404,
        "VERSION": 426,
        "CONFLICT": 409,
        "TOO_LARGE": 413,
        "TOO_MANY": 429,
        "INTERNAL": 500,
        "UNAVAILABLE": 503,
    }


def test_only_state_changing_verbs_are_marked() -> None:
    readonly = {v for v, mutates in proto.VERBS.items() if not mutates}
    assert readonly == {
        "show queue",
        "show envelope",
        "show message",
        "show stats",
        "show status",
        "show config",
        "alias list",
        "monitor",
        "smtp",
    }


# --- refusals, each with its code --------------------------------------------------------------


def test_encode_refuses_a_frame_over_max_frame() -> None:
    with pytest.raises(ProtocolError) as info:
        proto.request(1, "alias add", name="x" * proto.MAX_FRAME, targets=["y"])
    assert info.value.code == Code.TOO_LARGE


def test_a_frame_just_under_the_limit_is_fine() -> None:
    base = len(proto.request(1, "update table", name=""))
    line = proto.request(1, "update table", name="x" * (proto.MAX_FRAME - base))
    assert len(line) == proto.MAX_FRAME
    assert proto.decode_request(line).args["name"] == "x" * (proto.MAX_FRAME - base)


@pytest.mark.parametrize("fn", [proto.decode_request, proto.decode_reply])
def test_decoding_refuses_oversized_frames(fn: Any) -> None:
    assert code_of(fn, b" " * (proto.MAX_FRAME + 1)) == Code.TOO_LARGE


@pytest.mark.parametrize(
    "line",
    [b"", b"\n", b"{", b"nope\n", b"\xff\xfe\n", b'{"v":1,"id":1,"verb":"show stats"', b"\x00"],
)
@pytest.mark.parametrize("fn", [proto.decode_request, proto.decode_reply])
def test_decoding_refuses_non_json(fn: Any, line: bytes) -> None:
    assert code_of(fn, line) == Code.BAD_REQUEST


@pytest.mark.parametrize("obj", [[], "text", 1, None, [{"v": 1}]])
@pytest.mark.parametrize("fn", [proto.decode_request, proto.decode_reply])
def test_decoding_refuses_non_objects(fn: Any, obj: Any) -> None:
    assert code_of(fn, frame(obj)) == Code.BAD_REQUEST


@pytest.mark.parametrize("version", [None, 0, 2, "1", [1], True, 1.0])
@pytest.mark.parametrize("fn", [proto.decode_request, proto.decode_reply])
def test_decoding_refuses_other_versions(fn: Any, version: Any) -> None:
    obj: dict[str, Any] = {"id": 1, "verb": "show stats", "ok": True}
    if version is not None:
        obj["v"] = version
    assert code_of(fn, frame(obj)) == Code.VERSION


@pytest.mark.parametrize("ident", [None, -1, 2**53, 1.5, "1", True, [1]])
def test_request_id_must_be_a_small_non_negative_integer(ident: Any) -> None:
    obj = {"v": 1, "verb": "show stats"} | ({} if ident is None else {"id": ident})
    assert code_of(proto.decode_request, frame(obj)) == Code.BAD_REQUEST


@pytest.mark.parametrize("verb", [None, "", "SHOW QUEUE", "show  queue", "shutdown", 7, ["smtp"]])
def test_unknown_verbs_are_refused(verb: Any) -> None:
    obj = {"v": 1, "id": 1} | ({} if verb is None else {"verb": verb})
    assert code_of(proto.decode_request, frame(obj)) == Code.BAD_REQUEST


def test_unknown_verb_message_is_bounded() -> None:
    with pytest.raises(ProtocolError) as info:
        proto.decode_request(frame({"v": 1, "id": 1, "verb": "x" * 10000}))
    assert len(info.value.message) < 80


@pytest.mark.parametrize("args", [[], "x", 1, None, ["a"]])
def test_args_must_be_an_object(args: Any) -> None:
    line = frame({"v": 1, "id": 1, "verb": "show stats", "args": args})
    assert code_of(proto.decode_request, line) == Code.BAD_REQUEST


def test_reply_without_id_is_refused() -> None:
    assert code_of(proto.decode_reply, frame({"v": 1, "ok": True})) == Code.BAD_REQUEST
    assert code_of(proto.decode_reply, frame({"v": 1, "id": "1", "ok": True})) == Code.BAD_REQUEST


@pytest.mark.parametrize(
    "obj",
    [
        {"event": 1, "data": {}},
        {"event": "x"},
        {"event": "x", "data": []},
        {"event": None, "data": {}},
    ],
)
def test_malformed_events_are_refused(obj: dict[str, Any]) -> None:
    assert code_of(proto.decode_reply, frame({"v": 1, "id": 1} | obj)) == Code.BAD_REQUEST


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"ok": False},
        {"ok": "true"},
        {"ok": False, "error": "bad"},
        {"ok": False, "error": {"message": "x"}},
        {"ok": False, "error": {"code": "403", "message": "x"}},
    ],
)
def test_malformed_error_replies_are_refused(obj: dict[str, Any]) -> None:
    assert code_of(proto.decode_reply, frame({"v": 1, "id": 1} | obj)) == Code.BAD_REQUEST


def test_error_message_is_always_a_string() -> None:
    reply = proto.decode_reply(frame({"v": 1, "id": 1, "ok": False, "error": {"code": 500}}))
    assert reply.message == ""
    reply = proto.decode_reply(
        frame({"v": 1, "id": 1, "ok": False, "error": {"code": 500, "message": [1]}})
    )
    assert reply.message == "[1]"


# --- argument helpers ----------------------------------------------------------------------------


def req(**args: Any) -> Request:
    return Request(1, "alias add", args)


def test_arg_str() -> None:
    assert proto.arg_str(req(name="bob"), "name") == "bob"
    assert proto.arg_str(req(), "name", required=False, default="d") == "d"
    assert proto.arg_str(req(name=None), "name", required=False) == ""


@pytest.mark.parametrize("value", [None, 1, ["x"], "a\nb", "a\rb", "a\x00b"])
def test_arg_str_refusals(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.arg_str(req(name=value), "name")
    assert info.value.code == Code.BAD_REQUEST


def test_arg_list() -> None:
    assert proto.arg_list(req(targets=["a", "b"]), "targets") == ["a", "b"]


@pytest.mark.parametrize("value", [None, [], "a", [1], ["a", None], ["a\n"], ["\x00"], {"a": 1}])
def test_arg_list_refusals(value: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.arg_list(req(targets=value), "targets")
    assert info.value.code == Code.BAD_REQUEST


# --- property tests: nothing but ProtocolError comes out of a decoder ------------------------


def decode_or_protocol_error(fn: Any, line: bytes) -> None:
    try:
        fn(line)
    except ProtocolError as exc:
        assert isinstance(exc.code, Code)
        assert isinstance(exc.message, str)


@SETTINGS
@given(st.binary(max_size=2048))
def test_decode_request_on_arbitrary_bytes(line: bytes) -> None:
    decode_or_protocol_error(proto.decode_request, line)


@SETTINGS
@given(st.binary(max_size=2048))
def test_decode_reply_on_arbitrary_bytes(line: bytes) -> None:
    decode_or_protocol_error(proto.decode_reply, line)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)

FIELDS = st.sampled_from(["v", "id", "verb", "args", "ok", "result", "error", "event", "data"])


@st.composite
def near_frames(draw: st.DrawFn) -> bytes:
    """JSON objects built from the real field names, with plausible and implausible values."""
    obj: dict[str, Any] = draw(st.dictionaries(FIELDS, JSON, max_size=6))
    if draw(st.booleans()):
        obj["v"] = 1
    if draw(st.booleans()):
        obj["verb"] = draw(st.sampled_from(sorted(proto.VERBS)))
    if draw(st.booleans()):
        obj["error"] = draw(st.dictionaries(st.sampled_from(["code", "message"]), JSON))
    text = json.dumps(obj, allow_nan=True)
    return text.encode() + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


@SETTINGS
@given(near_frames())
def test_decode_request_on_json_objects(line: bytes) -> None:
    decode_or_protocol_error(proto.decode_request, line)


@SETTINGS
@given(near_frames())
def test_decode_reply_on_json_objects(line: bytes) -> None:
    decode_or_protocol_error(proto.decode_reply, line)


@SETTINGS
@given(
    st.integers(0, 2**53 - 1),
    st.sampled_from(sorted(proto.VERBS)),
    st.dictionaries(st.text(max_size=10), JSON, max_size=4),
)
def test_every_encodable_request_decodes_to_itself(
    ident: int, verb: str, args: dict[str, Any]
) -> None:
    try:
        line = proto.request(ident, verb, **args)
    except ProtocolError:
        return
    got = proto.decode_request(line)
    assert (got.id, got.verb) == (ident, verb)
    assert json.dumps(got.args, sort_keys=True) == json.dumps(args, sort_keys=True)


# --- the corner cases that once escaped as other exceptions --------------------------------------


@pytest.mark.parametrize("fn", [proto.decode_request, proto.decode_reply])
def test_deeply_nested_frame_is_a_protocol_error(fn: Any) -> None:
    line = b"[" * 50_000 + b"\n"
    assert len(line) < proto.MAX_FRAME
    assert code_of(fn, line) == Code.BAD_REQUEST


def test_unencodable_argument_is_a_protocol_error() -> None:
    """A lone surrogate (argv bytes that are not UTF-8) cannot go on the wire."""
    with pytest.raises(ProtocolError) as info:
        proto.request(1, "update table", name="bad\udcff")
    assert info.value.code == Code.BAD_REQUEST


def test_request_can_carry_id_and_verb_arguments() -> None:
    """schedule, remove and show envelope take an argument named ``id``."""
    args = {"id": "all", "verb": "x"}
    line = proto.request(3, "schedule", **args)
    assert proto.decode_request(line) == Request(3, "schedule", {"id": "all", "verb": "x"})
