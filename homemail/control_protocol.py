"""The control protocol, shared by the daemon, homemailctl and the tray app.  No I/O, stdlib only.

Framing: one JSON object per line (UTF-8, ``\\n``-terminated, at most :data:`MAX_FRAME` bytes).

Request::

    {"v": 1, "id": 7, "verb": "show queue", "args": {...}}

Reply (exactly one per request, same ``id``)::

    {"v": 1, "id": 7, "ok": true, "result": ...}
    {"v": 1, "id": 7, "ok": false, "error": {"code": 403, "message": "..."}}

A request the daemon refuses as malformed (an unknown verb, bad args, another version) is
answered with its own ``id`` too, whenever that id can be read, and the connection is closed
after that reply (requests sent behind it on the same connection get none).  Only an error
about a frame whose id cannot be read (not JSON, too large, no valid ``id``) or about the
connection itself (too many connections) carries ``"id": 0``, which clients therefore never
use for a request.

Events (after a ``monitor`` request is accepted, until the client closes)::

    {"v": 1, "id": 7, "event": "delivery", "data": {...}}

A request with ``"verb": "smtp"`` that is accepted turns the connection into an SMTP session
(local enqueue, used by ``sendmail``); nothing but SMTP is spoken on it afterwards.

Error codes are stable and shared by every client (:class:`Code`).  The protocol version is
:data:`VERSION`; a request with another version is refused with ``Code.VERSION``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

VERSION = 1
MAX_FRAME = 64 * 1024


class Code(IntEnum):
    BAD_REQUEST = 400  # malformed frame or arguments
    FORBIDDEN = 403  # the caller may not do this
    NOT_FOUND = 404  # no such envelope, message, table, alias
    VERSION = 426  # protocol version not supported
    CONFLICT = 409  # e.g. alias exists, or invalid new configuration
    TOO_LARGE = 413  # frame over MAX_FRAME
    TOO_MANY = 429  # too many connections from this uid
    INTERNAL = 500
    UNAVAILABLE = 503  # daemon stopping


class ProtocolError(Exception):
    """A refusal with its code; ``id`` is the id of the request it answers, when known."""

    def __init__(self, code: Code, message: str, *, id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


#: verb → whether it changes state (needs root, the daemon's user or homemail-admin)
VERBS: dict[str, bool] = {
    "show queue": False,
    "show envelope": False,
    "show message": False,
    "show stats": False,
    "show status": False,
    "show config": False,
    "schedule": True,
    "remove": True,
    "pause envelope": True,
    "resume envelope": True,
    "pause smtp": True,
    "resume smtp": True,
    "pause mda": True,
    "resume mda": True,
    "pause mta": True,
    "resume mta": True,
    "reload": True,
    "update table": True,
    "alias list": False,
    "alias add": True,
    "alias remove": True,
    "monitor": False,
    "log verbose": True,
    "log brief": True,
    "secret set": True,
    "smtp": False,
}


@dataclass
class Request:
    id: int
    verb: str
    args: dict[str, Any] = field(default_factory=dict)


def encode(obj: dict[str, Any]) -> bytes:
    try:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise ProtocolError(Code.BAD_REQUEST, f"cannot encode frame: {exc}") from None
    if len(data) + 1 > MAX_FRAME:
        raise ProtocolError(Code.TOO_LARGE, "frame too large")
    return data + b"\n"


def request(id: int, verb: str, /, **args: Any) -> bytes:
    return encode({"v": VERSION, "id": id, "verb": verb, "args": args})


def reply_ok(id: int, result: Any = None) -> bytes:
    return encode({"v": VERSION, "id": id, "ok": True, "result": result})


def reply_error(id: int, code: Code, message: str) -> bytes:
    return encode(
        {"v": VERSION, "id": id, "ok": False, "error": {"code": int(code), "message": message}}
    )


def event(id: int, name: str, data: dict[str, Any]) -> bytes:
    return encode({"v": VERSION, "id": id, "event": name, "data": data})


def _object(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_FRAME:
        raise ProtocolError(Code.TOO_LARGE, "frame too large")
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(Code.BAD_REQUEST, "frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Code.BAD_REQUEST, "frame is not a JSON object")
    return obj


def _check_version(obj: dict[str, Any], ident: int | None = None) -> None:
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        raise ProtocolError(Code.VERSION, f"protocol version {VERSION} required", id=ident)


def _load(line: bytes) -> dict[str, Any]:
    obj = _object(line)
    _check_version(obj)
    return obj


def _request_id(obj: dict[str, Any]) -> int | None:
    ident = obj.get("id")
    if not isinstance(ident, int) or isinstance(ident, bool) or not 0 <= ident < 2**53:
        return None
    return ident


def decode_request(line: bytes) -> Request:
    """Parse one request frame; raises ProtocolError with the code to send back, and with the
    request's id when it could be read (so that the refusal answers that request)."""
    obj = _object(line)
    ident = _request_id(obj)
    _check_version(obj, ident)
    if ident is None:
        raise ProtocolError(Code.BAD_REQUEST, "request id must be a non-negative integer")
    verb = obj.get("verb")
    args = obj.get("args", {})
    if not isinstance(verb, str) or verb not in VERBS:
        raise ProtocolError(Code.BAD_REQUEST, f"unknown verb {str(verb)[:40]!r}", id=ident)
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ProtocolError(Code.BAD_REQUEST, "args must be an object", id=ident)
    return Request(ident, verb, args)


@dataclass
class Reply:
    id: int
    ok: bool
    result: Any = None
    code: int = 0
    message: str = ""
    event: str | None = None  # set for event frames
    data: dict[str, Any] | None = None


def decode_reply(line: bytes) -> Reply:
    """Parse a reply or event frame (client side); raises ProtocolError."""
    obj = _load(line)
    ident = obj.get("id")
    if not isinstance(ident, int):
        raise ProtocolError(Code.BAD_REQUEST, "reply without id")
    if "event" in obj:
        name, data = obj.get("event"), obj.get("data")
        if not isinstance(name, str) or not isinstance(data, dict):
            raise ProtocolError(Code.BAD_REQUEST, "malformed event")
        return Reply(ident, True, event=name, data=data)
    if obj.get("ok") is True:
        return Reply(ident, True, result=obj.get("result"))
    err = obj.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("code"), int):
        raise ProtocolError(Code.BAD_REQUEST, "malformed error reply")
    return Reply(ident, False, code=err["code"], message=str(err.get("message", "")))


def arg_str(req: Request, name: str, *, required: bool = True, default: str = "") -> str:
    value = req.args.get(name, None)
    if value is None:
        if required:
            raise ProtocolError(Code.BAD_REQUEST, f"{req.verb}: missing argument {name!r}")
        return default
    if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
        raise ProtocolError(Code.BAD_REQUEST, f"{req.verb}: argument {name!r} must be one line")
    return value


def arg_list(req: Request, name: str) -> list[str]:
    value = req.args.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ProtocolError(Code.BAD_REQUEST, f"{req.verb}: {name!r} must be a list of strings")
    for v in value:
        if any(c in v for c in "\r\n\x00"):
            raise ProtocolError(Code.BAD_REQUEST, f"{req.verb}: {name!r} must be one line each")
    return value
