"""User mode's delivery process: mailboxes are written by a child of the daemon.

The daemon forks it before anything else, hands it every local delivery over the channel, and
falls back to its own threads if the child goes away; the child never outlives the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest

from homemail import parent

from .conftest import LOCAL_RCPT, Daemon, accepted_msgid, poll, send, token


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def message(tag: str) -> bytes:
    return f"Subject: {tag}\r\nMessage-ID: <{tag}@test>\r\n\r\nbody {tag}\r\n".encode()


def agent_of(daemon: Daemon) -> int:
    assert daemon.proc is not None
    kids = poll(lambda: children(daemon.proc.pid), 10)  # type: ignore[union-attr]
    assert isinstance(kids, list) and len(kids) == 1, f"expected one child, got {kids}"
    agent = kids[0]
    assert os.stat(f"/proc/{agent}").st_uid == os.getuid()
    return agent


def test_the_daemon_has_one_delivery_process_that_delivers(running: Daemon) -> None:
    agent = agent_of(running)
    tag = token()
    accepted_msgid(send(running, "a@example.org", [LOCAL_RCPT], message(tag)))
    running.wait_for_message(tag.encode())
    assert children(running.proc.pid) == [agent]  # type: ignore[union-attr]


def test_messages_sent_at_once_each_land_in_the_maildir_once_and_intact(running: Daemon) -> None:
    """Concurrent deliveries share their syncs; each still lands once, byte for byte."""
    tags = [token() for _ in range(48)]
    failures: list[BaseException] = []

    def client(mine: list[str]) -> None:
        try:
            for tag in mine:
                accepted_msgid(send(running, "a@example.org", [LOCAL_RCPT], message(tag)))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(tags[i::12],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    for tag in tags:
        stored = running.wait_for_message(tag.encode())
        assert f"\nSubject: {tag}\nMessage-ID: <{tag}@test>\n".encode() in stored
        assert stored.endswith(f"\n\nbody {tag}\n".encode())
    assert len(running.maildir_files()) == len(tags)
    assert poll(lambda: os.listdir(running.maildir / "tmp") == [], 5)


def test_a_killed_delivery_process_does_not_stop_delivery(running: Daemon) -> None:
    agent = agent_of(running)
    before = token()
    accepted_msgid(send(running, "a@example.org", [LOCAL_RCPT], message(before)))
    running.wait_for_message(before.encode())
    mark = running.log_mark()
    os.kill(agent, signal.SIGKILL)
    running.wait_for_log(r"the delivery process exited", since=mark)
    after = token()
    accepted_msgid(send(running, "a@example.org", [LOCAL_RCPT], message(after)))
    running.wait_for_message(after.encode())
    assert running.running
    assert len([m for m in running.maildir_messages() if after.encode() in m]) == 1


def test_the_delivery_process_dies_with_the_daemon(running: Daemon) -> None:
    agent = agent_of(running)
    running.kill()
    assert poll(lambda: not alive(agent), 10), "the delivery process outlived a killed daemon"


def test_the_delivery_process_exits_after_a_clean_stop(running: Daemon) -> None:
    agent = agent_of(running)
    assert running.stop() == 0
    assert not alive(agent)


# -- the agent itself, over a socketpair -------------------------------------------------------


def deliver_record(base: Path, **overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "type": "deliver",
        "id": 7,
        "action": "local",
        "method": "maildir",
        "path": str(base / "Maildir"),
        "user": "someone",
        "uid": os.getuid(),
        "gid": os.getgid(),
        "home": str(base),
        "sender": "a@example.org",
        "rcpt": "b@example.org",
        "dest": "b@example.org",
        "evpid": 0x1234567890ABCDEF,
        "ctime": 1_700_000_000,
        "recovered": False,
    }
    record.update(overrides)
    return record


class Agent:
    def __init__(self) -> None:
        self.ours, theirs = parent.channel_pair()
        self.agent = parent.DeliveryAgent(theirs, "test.example", threads=2)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()
        self.ours.settimeout(20)

    def ask(self, record: dict[str, object], body: bytes | None) -> dict[str, object] | None:
        fds = [parent._memfd(body)] if body is not None else []
        try:
            parent.send_record(self.ours, record, fds)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            got = parent.recv_record(self.ours)
        except TimeoutError:
            return None
        assert got is not None
        return got[0]

    def close(self) -> None:
        self.ours.close()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the agent did not stop at EOF"


def test_agent_writes_the_maildir_and_answers(tmp_path: Path) -> None:
    agent = Agent()
    try:
        result = agent.ask(deliver_record(tmp_path), b"Subject: hi\r\n\r\nhello\r\n")
        assert result is not None
        assert result["type"] == "result" and result["id"] == 7 and result["ok"] is True
        (stored,) = list((tmp_path / "Maildir" / "new").iterdir())
        data = stored.read_bytes()
        assert b"hello\n" in data and b"Delivered-To: b@example.org" in data
    finally:
        agent.close()


def test_agent_takes_a_small_message_inside_the_record(tmp_path: Path) -> None:
    agent = Agent()
    try:
        body = b"Subject: inline\r\n\r\n" + b"x" * 3000 + b"\r\n"
        parent.send_record(agent.ours, deliver_record(tmp_path), payload=body)
        got = parent.recv_record(agent.ours)
        assert got is not None and got[0]["ok"] is True, got
        (stored,) = list((tmp_path / "Maildir" / "new").iterdir())
        assert stored.read_bytes().endswith(b"x" * 3000 + b"\n")
        # a payload whose length disagrees with the record is refused whole: no delivery
        bad = deliver_record(tmp_path, id=8, evpid=0x1234567890ABCDED, inline=5)
        data = json.dumps({"v": 1, **bad}).encode()
        agent.ours.send(data + b"\nSubject: too long\r\n")
        other = deliver_record(tmp_path, id=9, evpid=0x1234567890ABCDEE)
        result = agent.ask(other, b"Subject: y\r\n\r\ny\r\n")
        assert result is not None and result["id"] == 9 and result["ok"] is True
        assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 2
    finally:
        agent.close()


def test_a_payload_on_a_record_is_checked_by_recv_record() -> None:
    ours, theirs = parent.channel_pair()
    with ours, theirs:
        for data in (
            b'{"v":1,"type":"deliver","inline":3}\nabcd',  # longer than it says
            b'{"v":1,"type":"deliver"}\nabc',  # a payload nobody announced
            b'{"v":1,"type":"deliver","inline":3}',  # announced, missing
        ):
            ours.send(data)
            with pytest.raises(parent.ChannelError):
                parent.recv_record(theirs)
        ours.send(b'{"v":1,"type":"deliver","inline":3}\nab\n')
        got = parent.recv_record(theirs)
        assert got is not None and got[0]["payload"] == b"ab\n"


def test_agent_refuses_bad_records_with_a_temporary_failure(tmp_path: Path) -> None:
    agent = Agent()
    try:
        for bad in (
            {"method": "pipe"},
            {"uid": -1},
            {"home": 5},
            {"rcpt": "b@example.org\r\nX-Evil: 1"},
            {"evpid": "12"},
        ):
            result = agent.ask(deliver_record(tmp_path, **bad), b"Subject: x\r\n\r\nx\r\n")
            assert result is not None, bad
            assert result["ok"] is False and result["permanent"] is False, (bad, result)
            assert str(result["status"]).startswith("4."), (bad, result)
        assert not (tmp_path / "Maildir").exists()
        # a delivery without its message is dropped unanswered; the next one is answered
        parent.send_record(agent.ours, {**deliver_record(tmp_path), "id": 8})
        result = agent.ask({**deliver_record(tmp_path), "id": 9}, b"Subject: x\r\n\r\nx\r\n")
        assert result is not None and result["id"] == 9 and result["ok"] is True
        assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1
    finally:
        agent.close()


def test_agent_reports_a_mailbox_it_cannot_write(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    agent = Agent()
    try:
        result = agent.ask(
            deliver_record(tmp_path, path=str(blocker / "Maildir")), b"Subject: x\r\n\r\nx\r\n"
        )
        assert result is not None and result["ok"] is False
        assert str(result["status"]).startswith("4.")
    finally:
        agent.close()


def test_agent_expands_the_user_directory_from_the_record(tmp_path: Path) -> None:
    # the user fields of the record become the LocalUser the mda expands %{user.*} with
    agent = Agent()
    try:
        result = agent.ask(
            deliver_record(tmp_path, path="%{user.directory}/Box"), b"Subject: x\r\n\r\nx\r\n"
        )
        assert result is not None and result["ok"] is True, result
        assert len(list((tmp_path / "Box" / "new").iterdir())) == 1
    finally:
        agent.close()


def test_a_sigterm_to_the_whole_group_is_for_the_daemon_alone(running: Daemon) -> None:
    """A service manager stops the process group with SIGTERM: the delivery process lets the
    daemon drain and close the channel, rather than dying in the middle of a delivery."""
    agent = agent_of(running)
    os.kill(agent, signal.SIGTERM)
    tag = token()
    accepted_msgid(send(running, "a@example.org", [LOCAL_RCPT], message(tag)))
    running.wait_for_message(tag.encode())
    assert alive(agent)
    assert children(running.proc.pid) == [agent]  # type: ignore[union-attr]
    assert "the delivery process exited" not in running.log()
    assert running.stop() == 0
    assert poll(lambda: not alive(agent), 10)
