"""In-memory queue backend, for unit tests: same contract as queue_fs, nothing durable."""

from __future__ import annotations

import copy

from homemail.queue import Envelope, Queue, QueueError


class RamQueue(Queue):
    def __init__(self) -> None:
        self.messages: dict[int, bytes] = {}
        self.envelopes: dict[int, Envelope] = {}

    async def commit(
        self, message: bytes, envelopes: list[Envelope], *, alone: bool = False
    ) -> None:
        if not envelopes:
            raise QueueError("message without envelopes")
        self.messages[envelopes[0].msgid] = bytes(message)
        for env in envelopes:
            self.envelopes[env.evpid] = copy.deepcopy(env)

    async def update(self, envelope: Envelope) -> None:
        if envelope.evpid in self.envelopes:
            self.envelopes[envelope.evpid] = copy.deepcopy(envelope)

    async def remove(self, envelope: Envelope) -> None:
        self.envelopes.pop(envelope.evpid, None)
        if not any(e.msgid == envelope.msgid for e in self.envelopes.values()):
            self.messages.pop(envelope.msgid, None)

    def contains(self, msgid: int) -> bool:
        return msgid in self.messages

    def read_message(self, msgid: int) -> bytes:
        try:
            return self.messages[msgid]
        except KeyError:
            raise QueueError(f"message {msgid:08x} not in queue") from None

    def cached_message(self, msgid: int) -> bytes | None:
        return self.messages.get(msgid)

    def load(self) -> list[Envelope]:
        return [copy.deepcopy(e) for e in self.envelopes.values()]
