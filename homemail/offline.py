"""Offline spool (placeholder until the real module lands; the ctl work replaces this file)."""

from __future__ import annotations

import os
from dataclasses import dataclass


class OfflineError(Exception):
    pass


@dataclass
class OfflineMessage:
    sender: str
    rcpts: list[str]
    message: bytes
    uid: int


def pending(directory: str) -> list[str]:
    return []


def read(directory: str, name: str, *, expected_uid: int | None, max_size: int) -> OfflineMessage:
    raise OfflineError("not implemented")


def discard(directory: str, name: str) -> None:
    os.unlink(os.path.join(directory, name))


def prepare_dir(directory: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
