"""The offline spool: atomic writes, and every file the daemon must refuse (REFERENCE §8, the
2015 audit: hard links, symlinks, FIFOs, size limits)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from homemail import offline
from homemail.offline import OfflineError

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def spool(tmp_path: Path) -> str:
    return str(tmp_path / "offline")


def write_one(directory: str, **options: str) -> str:
    return offline.write(
        directory, "a@example.org", ["b@example.org", "c@example.net"], MESSAGE, options
    )


def plant(directory: str, name: str, header: dict[str, object], body: bytes = MESSAGE) -> str:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n" + body)
    return path


def header(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "v": 1,
        "sender": "a@example.org",
        "rcpts": ["b@example.org"],
        "options": {},
        "uid": os.getuid(),
        "time": time.time(),
    }
    base.update(changes)
    return base


def refused(directory: str, name: str, *, expected_uid: int | None = None, **kw: int) -> str:
    with pytest.raises(OfflineError) as info:
        offline.read(directory, name, expected_uid=expected_uid, **kw)
    return str(info.value)


# --- writing and reading ------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    d = spool(tmp_path)
    before = time.time()
    name = write_one(d, notify="SUCCESS,FAILURE", ret="HDRS")
    assert len(name) == 32 and all(c in "0123456789abcdef" for c in name)
    msg = offline.read(d, name, expected_uid=os.getuid())
    assert msg.sender == "a@example.org"
    assert msg.rcpts == ["b@example.org", "c@example.net"]
    assert msg.message == MESSAGE
    assert msg.uid == os.getuid()
    assert msg.name == name
    assert msg.options == {"notify": "SUCCESS,FAILURE", "ret": "HDRS"}
    assert before <= msg.time <= time.time()


def test_file_layout_is_one_json_line_then_the_message(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = offline.write(d, "", ["jörg@bücher.example"], b"x\r\n", {})
    data = Path(d, name).read_bytes()
    first, _, rest = data.partition(b"\n")
    assert first.isascii()
    obj = json.loads(first)
    assert set(obj) == {"v", "sender", "rcpts", "options", "uid", "time"}
    assert obj["v"] == 1 and obj["sender"] == "" and obj["rcpts"] == ["jörg@bücher.example"]
    assert rest == b"x\r\n"
    assert offline.read(d, name, expected_uid=None).sender == ""


def test_binary_message_is_kept_byte_for_byte(tmp_path: Path) -> None:
    d = spool(tmp_path)
    body = bytes(range(256)) * 100 + b"\n.\n\r\n.\r\n"
    name = offline.write(d, "a@example.org", ["b@example.org"], body, {})
    assert offline.read(d, name, expected_uid=None).message == body


def test_modes_and_no_leftovers(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode) == 0o600
    assert os.listdir(d) == [name]


def test_creates_missing_parents(tmp_path: Path) -> None:
    d = str(tmp_path / "state" / "homemail" / "spool" / "offline")
    name = write_one(d)
    assert offline.pending(d) == [name]


def test_write_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "offline"
    link.symlink_to(real)
    with pytest.raises(OfflineError, match="symlink"):
        write_one(str(link))
    assert list(real.iterdir()) == []


def test_write_refuses_a_file_in_place_of_the_directory(tmp_path: Path) -> None:
    (tmp_path / "offline").write_text("x")
    with pytest.raises(OfflineError, match="not a directory"):
        write_one(spool(tmp_path))


@pytest.mark.parametrize(
    ("sender", "rcpts", "options"),
    [
        ("a\r\n@example.org", ["b@example.org"], {}),
        ("a@example.org", [], {}),
        ("a@example.org", ["b@example.org\nRCPT TO:<c@example.org>"], {}),
        ("a@example.org", ["b@example.org\x00"], {}),
        ("a@example.org", [""], {}),
        ("a@example.org", ["b@example.org"], {"notify": "NEVER\r\n"}),
    ],
)
def test_write_refuses_injected_fields(
    tmp_path: Path, sender: str, rcpts: list[str], options: dict[str, str]
) -> None:
    with pytest.raises(OfflineError):
        offline.write(spool(tmp_path), sender, rcpts, MESSAGE, options)


def test_concurrent_writers_get_distinct_files(tmp_path: Path) -> None:
    d = spool(tmp_path)
    names: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            name = write_one(d)
            with lock:
                names.append(name)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 80
    assert sorted(names) == offline.pending(d)


# --- pending, discard, cleanup --------------------------------------------------------------------


def test_pending_skips_dotfiles_and_tolerates_a_missing_directory(tmp_path: Path) -> None:
    d = spool(tmp_path)
    assert offline.pending(d) == []
    a, b = write_one(d), write_one(d)
    Path(d, ".tmp-0123").write_bytes(b"partial")
    Path(d, ".refused-x").write_bytes(b"")
    assert offline.pending(d) == sorted([a, b])


def test_pending_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "abc").write_bytes(b"x")
    (tmp_path / "offline").symlink_to(real)
    with pytest.raises(OSError):
        offline.pending(spool(tmp_path))


def test_discard(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)
    assert offline.discard(d, name)
    assert offline.pending(d) == []
    assert offline.discard(d, name)  # already gone is fine


def test_discard_moves_aside_what_cannot_be_unlinked(tmp_path: Path) -> None:
    d = spool(tmp_path)
    os.makedirs(os.path.join(d, "planted", "sub"))
    assert offline.discard(d, "planted")
    assert offline.pending(d) == []
    assert os.path.isdir(os.path.join(d, ".refused-planted"))


@pytest.mark.parametrize("name", ["", ".tmp-x", "../x", "a/b"])
def test_discard_ignores_names_it_would_never_list(tmp_path: Path, name: str) -> None:
    d = spool(tmp_path)
    write_one(d)
    assert offline.discard(d, name) is False


def test_prepare_dir(tmp_path: Path) -> None:
    d = spool(tmp_path)
    offline.prepare_dir(d)
    offline.prepare_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(OfflineError):
        offline.prepare_dir(str(tmp_path / "link"))


def test_record_location_leaves_a_link_beside_the_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "run" / "control.sock"
    sock.parent.mkdir()
    link = tmp_path / "run" / "control.sock.offline"
    offline.record_location(str(sock), str(tmp_path / "spool" / "offline"))
    assert os.readlink(link) == str(tmp_path / "spool" / "offline")
    monkeypatch.chdir(tmp_path)  # a relative spool is recorded as the absolute path
    offline.record_location(str(sock), "other/offline")
    assert os.readlink(link) == str(tmp_path / "other" / "offline")
    offline.record_location(str(sock), "other/offline")  # the same again: left as it is
    assert os.readlink(link) == str(tmp_path / "other" / "offline")
    assert sorted(os.listdir(sock.parent)) == ["control.sock.offline"]  # no temporary left


def test_record_location_fails_cleanly_over_a_directory(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    (tmp_path / "control.sock.offline").mkdir()
    with pytest.raises(OSError):
        offline.record_location(str(sock), str(tmp_path / "spool"))
    assert sorted(os.listdir(tmp_path)) == ["control.sock.offline"]


def test_cleanup_stale_removes_only_old_tmp_files(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)
    old, fresh = Path(d, ".tmp-old"), Path(d, ".tmp-fresh")
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(Path(d, name), (past, past))
    other = Path(d, ".other")
    other.write_bytes(b"")
    os.utime(other, (past, past))
    assert offline.cleanup_stale(d, 3600) == 1
    assert sorted(os.listdir(d)) == sorted([name, ".tmp-fresh", ".other"])
    assert offline.cleanup_stale(str(tmp_path / "missing"), 1) == 0


def test_cleanup_stale_unlinks_a_symlink_not_its_target(tmp_path: Path) -> None:
    d = spool(tmp_path)
    offline.prepare_dir(d)
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    link = Path(d, ".tmp-link")
    link.symlink_to(target)
    past = time.time() - 7200
    os.utime(link, (past, past), follow_symlinks=False)
    assert offline.cleanup_stale(d, 60) == 1
    assert target.read_bytes() == b"keep"


# --- what the daemon must refuse ------------------------------------------------------------------


def test_refuses_a_symlink(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)
    os.symlink(os.path.join(d, name), os.path.join(d, "0" * 32))
    assert "symlink" in refused(d, "0" * 32)


def test_refuses_a_symlink_to_a_secret(tmp_path: Path) -> None:
    d = spool(tmp_path)
    offline.prepare_dir(d)
    secret = plant(str(tmp_path / "elsewhere"), "secret", header())
    os.symlink(secret, os.path.join(d, "evil"))
    assert "symlink" in refused(d, "evil")


def test_refuses_a_hard_link(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)
    os.link(os.path.join(d, name), os.path.join(tmp_path, "other-link"))
    assert "links" in refused(d, name)


def test_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    d = spool(tmp_path)
    offline.prepare_dir(d)
    os.mkfifo(os.path.join(d, "fifo"))
    assert "regular" in refused(d, "fifo")


def test_refuses_a_directory(tmp_path: Path) -> None:
    d = spool(tmp_path)
    os.makedirs(os.path.join(d, "dir"))
    assert "regular" in refused(d, "dir")


def test_a_message_over_the_size_limit_comes_back_refused_with_its_start(tmp_path: Path) -> None:
    """Not an error: the daemon must bounce it to its sender, who was told it was accepted."""
    d = spool(tmp_path)
    head = b"From: a@example.org\r\nSubject: big\r\n\r\n"
    message = head + b"".join(b"line %05d\r\n" % i for i in range(500))  # 5,527 bytes
    name = offline.write(d, "a@example.org", ["b@example.org", "c@example.net"], message, {})
    item = offline.read(d, name, expected_uid=None, max_message=4096)
    assert item.refused == (
        f"552 5.3.4 Message too big for system: {len(message)} bytes, the limit is 4096"
    )
    assert (item.sender, item.rcpts) == ("a@example.org", ["b@example.org", "c@example.net"])
    assert message.startswith(item.message) and item.message.startswith(head)
    assert len(item.message) <= 4096 and item.message.endswith(b"\r\n")  # whole lines
    whole = offline.read(d, name, expected_uid=None, max_message=len(message))
    assert (whole.refused, whole.message) == ("", message)


def test_of_a_huge_file_only_the_start_is_read(tmp_path: Path) -> None:
    d = spool(tmp_path)
    message = b"Subject: huge\r\n\r\n" + b"y" * 78 + b"\r\n"
    name = offline.write(d, "a@example.org", ["b@example.org"], message, {})
    with open(os.path.join(d, name), "ab") as f:  # grown to 2 MiB past what was written
        f.truncate(2 * 1024 * 1024)
    item = offline.read(d, name, expected_uid=None, max_message=1024)
    assert item.refused.startswith("552 5.3.4 Message too big for system: ")
    assert item.message == message


def test_no_more_than_max_size_is_read_whatever_the_limit(tmp_path: Path) -> None:
    """The root parent reads these files: a configured limit of 1 TiB must not mean 1 TiB."""
    d = spool(tmp_path)
    message = b"Subject: sparse\r\n\r\n"
    name = offline.write(d, "a@example.org", ["b@example.org"], message, {})
    with open(os.path.join(d, name), "ab") as f:  # sparse: costs no disk
        f.truncate(offline.MAX_SIZE + 1)
    item = offline.read(d, name, expected_uid=None, max_message=1 << 40)
    assert item.refused.startswith("552 5.3.4 ")
    assert item.message == message


def test_a_message_over_the_limit_still_gets_every_check(tmp_path: Path) -> None:
    """Also when so far over that only its start is read."""
    d = spool(tmp_path)
    name = offline.write(d, "a@example.org", ["b@example.org"], b"x\r\n" * 4000, {})
    with open(os.path.join(d, name), "ab") as f:
        f.truncate(offline.MAX_HEADER + 100 + 1024 * 1024)
    assert "owned by uid" in refused(d, name, expected_uid=os.getuid() + 1, max_message=100)
    os.link(os.path.join(d, name), os.path.join(d, "other"))
    assert "links" in refused(d, name, max_message=100)
    os.unlink(os.path.join(d, "other"))
    assert offline.read(d, name, expected_uid=None, max_message=100).refused
    forged = "f" * 32  # written for another uid than its owner's
    with open(os.path.join(d, forged), "wb") as f:
        f.write(json.dumps(header(uid=os.getuid() + 1)).encode() + b"\n" + b"y\r\n" * 10)
        f.truncate(offline.MAX_HEADER + 100 + 1024 * 1024)
    assert "written for uid" in refused(d, forged, max_message=100)


def test_encode_and_decode_pass_a_checked_file_on_whole(tmp_path: Path) -> None:
    d = spool(tmp_path)
    rcpts = [f"r{i}@example.org" for i in range(5000)]  # more than a channel record holds
    name = offline.write(d, "a@example.org", rcpts, MESSAGE, {"notify": "NEVER"})
    item = offline.read(d, name, expected_uid=None)
    again = offline.decode(b"".join(offline.encode(item)), name=name, refused="552 5.3.4 x")
    assert again == dataclasses.replace(item, refused="552 5.3.4 x")
    with pytest.raises(OfflineError, match="no header line"):
        offline.decode(b"x" * 100, name=name)
    with pytest.raises(OfflineError, match="CR, LF or NUL"):
        offline.decode(json.dumps(header(rcpts=["a\r\nb"])).encode() + b"\n", name=name)


def test_a_header_that_just_fits_still_decodes_once_written_again(tmp_path: Path) -> None:
    """``1e15`` comes back as ``1000000000000000.0``: a longer line than the file's."""
    d = spool(tmp_path)
    offline.prepare_dir(d)

    def line(pad: int) -> bytes:
        fields = header(sender="s" * pad + "@example.org", time=0)
        text = json.dumps(fields, separators=(",", ":")).replace('"time":0', '"time":1e15')
        return text.encode()

    raw = line(offline.MAX_HEADER - 1 - len(line(0)))
    assert len(raw) == offline.MAX_HEADER - 1
    with open(os.path.join(d, "e" * 32), "wb") as f:
        f.write(raw + b"\n" + MESSAGE)
    item = offline.read(d, "e" * 32, expected_uid=None)
    assert len(offline.encode(item)[0]) > offline.MAX_HEADER
    assert offline.decode(b"".join(offline.encode(item)), name=item.name) == item


@pytest.mark.parametrize("stamp", [b"1" + b"0" * 400, b"1e999", b"-1e999", b"NaN"])
def test_refuses_a_time_that_is_not_a_finite_number(tmp_path: Path, stamp: bytes) -> None:
    """10**400 used to raise OverflowError, out of the root parent's scan."""
    d = spool(tmp_path)
    offline.prepare_dir(d)
    raw = json.dumps(header(time=0), separators=(",", ":")).encode().replace(
        b'"time":0', b'"time":' + stamp
    )
    with open(os.path.join(d, "d" * 32), "wb") as f:
        f.write(raw + b"\n" + MESSAGE)
    assert "finite" in refused(d, "d" * 32)


def test_refuses_a_name_with_a_control_character(tmp_path: Path) -> None:
    """Such a name could not go back over the channel (``offline-done``) in system mode."""
    d = spool(tmp_path)
    name = offline.write(d, "a@example.org", ["b@example.org"], MESSAGE, {})
    os.rename(os.path.join(d, name), os.path.join(d, name + "\n"))
    assert "invalid file name" in refused(d, name + "\n")


def test_refuses_a_missing_file_and_odd_names(tmp_path: Path) -> None:
    d = spool(tmp_path)
    offline.prepare_dir(d)
    refused(d, "0" * 32)
    for name in ("", ".tmp-abc", "../offline/x", "a/b"):
        refused(d, name)


def test_refuses_a_symlinked_spool_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    name = write_one(str(real))
    (tmp_path / "offline").symlink_to(real)
    refused(spool(tmp_path), name)


def test_refuses_an_owner_other_than_expected(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)
    assert "expected" in refused(d, name, expected_uid=os.getuid() + 1)


def test_refuses_a_header_uid_that_is_not_the_owner(tmp_path: Path) -> None:
    """A user cannot make the daemon believe another user sent the message."""
    d = spool(tmp_path)
    plant(d, "forged", header(uid=os.getuid() + 1))
    assert "uid" in refused(d, "forged")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_refuses_a_file_chowned_to_someone_else(tmp_path: Path) -> None:
    d = spool(tmp_path)
    name = write_one(d)  # header uid 0
    os.chown(os.path.join(d, name), 12345, 12345)
    assert "uid" in refused(d, name)
    assert "expected" in refused(d, name, expected_uid=0)


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"v": True},
        {"v": "1"},
        {"sender": None},
        {"sender": 5},
        {"sender": "a@example.org\r\nRCPT TO:<x@example.org>"},
        {"rcpts": []},
        {"rcpts": "b@example.org"},
        {"rcpts": ["b@example.org", 3]},
        {"rcpts": ["b@example.org\n"]},
        {"rcpts": ["\x00"]},
        {"options": []},
        {"options": {"notify": 1}},
        {"options": {"a": "b\nc"}},
        {"uid": "0"},
        {"uid": -1},
        {"uid": True},
        {"uid": 1.5},
        {"time": "now"},
        {"time": None},
    ],
)
def test_refuses_malformed_headers(tmp_path: Path, changes: dict[str, object]) -> None:
    d = spool(tmp_path)
    plant(d, "bad", header(**changes))
    refused(d, "bad")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"no newline at all",
        b"[1,2]\n",
        b"\xff\xfe\n",
        b"{" * 10 + b"\n",
        b"[" * 100_000 + b"\n",
    ],
)
def test_refuses_garbage(tmp_path: Path, content: bytes) -> None:
    d = spool(tmp_path)
    offline.prepare_dir(d)
    Path(d, "garbage").write_bytes(content)
    refused(d, "garbage")


def test_missing_options_is_fine(tmp_path: Path) -> None:
    d = spool(tmp_path)
    h = header()
    del h["options"]
    plant(d, "old", h)
    assert offline.read(d, "old", expected_uid=None).options == {}


def test_swap_between_lstat_and_open_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file replaced after it was inspected is refused (dev/ino of fstat vs lstat)."""
    d = spool(tmp_path)
    name = write_one(d)
    other = write_one(d)
    real_open = os.open

    def swapping_open(path: str, flags: int, *args: object, **kw: object) -> int:
        if path == name:
            os.rename(other, name, src_dir_fd=kw["dir_fd"], dst_dir_fd=kw["dir_fd"])  # type: ignore[arg-type]
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("homemail.offline.os.open", swapping_open)
    assert "replaced" in refused(d, name)
