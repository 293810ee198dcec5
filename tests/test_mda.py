"""Tests for homemail.mda: Maildir and mbox delivery with real files."""

from __future__ import annotations

import calendar
import errno
import fcntl
import mailbox
import multiprocessing
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import homemail.mda as mda
from homemail.mda import Delivery, DeliveryError, deliver_maildir, deliver_mbox, prepare

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@localhost\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b"caf\xc3\xa9 \xff\xfe raw bytes\r\n"
    b"bare\rcr and bare\nlf\r\n"
)


def make_delivery(**kw: object) -> Delivery:
    fields: dict[str, object] = {
        "evpid": 0x1234ABCD00000042,
        "ctime": 1_700_000_000,
        "sender": "alice@example.org",
        "rcpt": "Bob@LocalHost",
        "dest": "bob@localhost",
        "user": "bob",
        "hostname": "mail.example.org",
    }
    fields.update(kw)
    return Delivery(**fields)  # type: ignore[arg-type]


# --- prepare -------------------------------------------------------------------------------------


def test_prepare_prepends_trace_and_converts_crlf() -> None:
    out = prepare(MESSAGE, make_delivery())
    assert out.startswith(b"Return-Path: <alice@example.org>\nDelivered-To: bob@localhost\n")
    assert b"\r\n" not in out
    assert out.endswith(b"bare\rcr and bare\nlf\n")
    assert b"caf\xc3\xa9 \xff\xfe raw bytes\n" in out
    assert out == (
        b"Return-Path: <alice@example.org>\nDelivered-To: bob@localhost\n"
        + MESSAGE.replace(b"\r\n", b"\n")
    )


def test_prepare_null_sender() -> None:
    out = prepare(MESSAGE, make_delivery(sender=""))
    assert out.startswith(b"Return-Path: <>\n")


def test_prepare_keeps_bare_cr_before_lf() -> None:
    out = prepare(b"Subject: x\r\n\r\na\r\r\nb\n\rc\r\n", make_delivery())
    assert out.endswith(b"\n\na\r\nb\n\rc\n")


def test_prepare_trace_values_cannot_inject_lines() -> None:
    out = prepare(MESSAGE, make_delivery(sender="a@b\r\nX-Evil: 1", dest="bob@localhost\n"))
    head = out.split(b"\n\n", 1)[0]
    assert not any(line.startswith(b"X-Evil") for line in head.split(b"\n"))


@pytest.mark.parametrize(
    "header",
    [
        b"Delivered-To: bob@localhost",
        b"delivered-to: <BOB@localhost>",
        b"DELIVERED-TO:   Bob@LocalHost  ",
        b"Delivered-To:\r\n <bob@localhost>",
    ],
)
def test_prepare_loop(header: bytes) -> None:
    message = b"Received: by x\r\n" + header + b"\r\nSubject: loop\r\n\r\nbody\r\n"
    with pytest.raises(DeliveryError) as info:
        prepare(message, make_delivery())
    assert info.value.permanent
    assert info.value.status == "5.4.6"
    assert "loop" in str(info.value)


@pytest.mark.parametrize(
    "message",
    [
        b"Delivered-To: carol@localhost\r\n\r\nbody\r\n",
        b"Subject: x\r\n\r\nDelivered-To: bob@localhost\r\n",  # in the body, not a header
        b"X-Delivered-To: bob@localhost\r\n\r\n",
        b"Delivered-To: bob@localhost.example\r\n\r\n",
    ],
)
def test_prepare_not_a_loop(message: bytes) -> None:
    assert prepare(message, make_delivery()).endswith(message.replace(b"\r\n", b"\n"))


def header_values_of_every_line(message: bytes, name: bytes) -> list[str]:
    """The plain reading: split the whole message into lines, stop at the first empty one."""
    fields: list[bytes] = []
    for line in message.split(b"\n"):
        line = line.removesuffix(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    return [
        value.decode("utf-8", "surrogateescape").strip()
        for key, sep, value in (f.partition(b":") for f in fields)
        if sep and key.rstrip().lower() == name
    ]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [b"Delivered-To: a@b", b"delivered-to:x", b" folded", b"\tt", b"Subject: s", b"",
             b"\r", b"\n", b"\r\n", b":", b"x"]
        ),
        max_size=30,
    )
)
def test_header_values_read_the_header_section_only_as_a_split_would(pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    assert list(mda._header_values(message, b"delivered-to")) == header_values_of_every_line(
        message, b"delivered-to"
    )


# --- Maildir -------------------------------------------------------------------------------------

NAME = "1700000000.E1234abcd00000042.mail.example.org"


def test_maildir_layout_and_name(tmp_path: Path) -> None:
    maildir = tmp_path / "home" / "bob" / "Maildir"
    path = deliver_maildir(str(maildir), MESSAGE, make_delivery())
    assert path == str(maildir / "new" / NAME)
    for sub in ("tmp", "new", "cur"):
        st = (maildir / sub).stat()
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) & 0o077 == 0
    assert os.listdir(maildir / "tmp") == []
    data = Path(path).read_bytes()
    assert data == prepare(MESSAGE, make_delivery())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_maildir_hostname_escaped(tmp_path: Path) -> None:
    path = deliver_maildir(str(tmp_path), MESSAGE, make_delivery(hostname="a/b:c"))
    assert os.path.basename(path) == "1700000000.E1234abcd00000042.a\\057b\\072c"


def test_maildir_existing_dirs_and_symlinked_maildir(tmp_path: Path) -> None:
    real = tmp_path / "real"
    for sub in ("tmp", "new", "cur"):
        (real / sub).mkdir(parents=True)
    link = tmp_path / "Maildir"
    link.symlink_to(real)
    path = deliver_maildir(str(link), MESSAGE, make_delivery())
    assert (real / "new" / NAME).exists()
    assert path == str(link / "new" / NAME)


def test_maildir_exactly_once(tmp_path: Path) -> None:
    d = make_delivery()
    first = deliver_maildir(str(tmp_path), MESSAGE, d)
    second = deliver_maildir(str(tmp_path), MESSAGE, d)
    assert first == second
    assert os.listdir(tmp_path / "new") == [NAME]
    assert os.listdir(tmp_path / "tmp") == []


def test_maildir_removed_between_deliveries_is_made_again(tmp_path: Path) -> None:
    import shutil

    maildir = tmp_path / "Maildir"
    deliver_maildir(str(maildir), MESSAGE, make_delivery())
    shutil.rmtree(maildir)  # the user cleared it out; the daemon knew it as ready
    path = deliver_maildir(str(maildir), MESSAGE, make_delivery(evpid=0x1234ABCD00000043))
    assert Path(path).read_bytes() == prepare(MESSAGE, make_delivery(evpid=0x1234ABCD00000043))
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    shutil.rmtree(maildir / "new")  # only new/ this time
    deliver_maildir(str(maildir), MESSAGE, make_delivery(evpid=0x1234ABCD00000044))
    assert len(os.listdir(maildir / "new")) == 1


def test_maildir_leftover_tmp_file_is_replaced(tmp_path: Path) -> None:
    d = make_delivery()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / NAME).write_bytes(b"half a message from a crashed attempt")
    path = deliver_maildir(str(tmp_path), MESSAGE, d)
    assert Path(path).read_bytes() == prepare(MESSAGE, d)
    assert os.listdir(tmp_path / "tmp") == []


def test_maildir_recovered_after_reader_moved_it(tmp_path: Path) -> None:
    d = make_delivery()
    first = deliver_maildir(str(tmp_path), MESSAGE, d)
    seen = tmp_path / "cur" / (NAME + ":2,S")
    os.rename(first, seen)
    again = deliver_maildir(str(tmp_path), MESSAGE, make_delivery(recovered=True))
    assert again == str(seen)
    assert os.listdir(tmp_path / "new") == []
    assert os.listdir(tmp_path / "cur") == [NAME + ":2,S"]


def test_maildir_recovered_ignores_other_envelopes(tmp_path: Path) -> None:
    (tmp_path / "cur").mkdir()
    other = NAME.replace("E1234abcd00000042", "E1234abcd00000043")
    assert other != NAME
    (tmp_path / "cur" / (other + ":2,S")).write_bytes(b"other")
    path = deliver_maildir(str(tmp_path), MESSAGE, make_delivery(recovered=True))
    assert path == str(tmp_path / "new" / NAME)


def test_maildir_recovered_finds_its_copy_under_another_host_name(tmp_path: Path) -> None:
    """The host name may change across a restart; the envelope id is what identifies a copy."""
    (tmp_path / "cur").mkdir()
    renamed = NAME.replace("mail.example.org", "newname.example.org")
    (tmp_path / "cur" / (renamed + ":2,S")).write_bytes(b"delivered before the crash")
    path = deliver_maildir(str(tmp_path), MESSAGE, make_delivery(recovered=True))
    assert path == str(tmp_path / "cur" / (renamed + ":2,S"))
    assert not (tmp_path / "new").exists() or os.listdir(tmp_path / "new") == []


def test_maildir_not_recovered_does_not_scan_cur(tmp_path: Path) -> None:
    # Without recovered=True only new/ is checked: a fresh envelope is never in cur/.
    (tmp_path / "cur").mkdir()
    (tmp_path / "cur" / (NAME + ":2,S")).write_bytes(b"old")
    path = deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    assert path == str(tmp_path / "new" / NAME)


def test_maildir_stale_tmp_symlink_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    maildir = tmp_path / "Maildir"
    (maildir / "tmp").mkdir(parents=True)
    (maildir / "tmp" / NAME).symlink_to(target)
    deliver_maildir(str(maildir), MESSAGE, make_delivery())
    assert target.read_bytes() == b"precious"


def test_maildir_different_envelopes_different_files(tmp_path: Path) -> None:
    a = deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    b = deliver_maildir(str(tmp_path), MESSAGE, make_delivery(evpid=0x1234ABCD00000043))
    assert a != b
    assert len(os.listdir(tmp_path / "new")) == 2


def test_maildir_path_is_a_file(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    maildir.write_bytes(b"not a dir")
    with pytest.raises(DeliveryError) as info:
        deliver_maildir(str(maildir), MESSAGE, make_delivery())
    assert not info.value.permanent
    assert info.value.status == "4.2.0"
    assert "\n" not in str(info.value) and str(tmp_path) not in str(info.value)


@pytest.mark.parametrize("sub", ["tmp", "new", "cur"])
def test_maildir_subdir_not_a_directory(tmp_path: Path, sub: str) -> None:
    (tmp_path / sub).write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    assert not info.value.permanent
    assert info.value.status == "4.2.0"


def test_maildir_link_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(src: str, dst: str) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), dst)

    monkeypatch.setattr(os, "link", denied)
    with pytest.raises(DeliveryError) as info:
        deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    assert info.value.status == "4.2.0" and not info.value.permanent
    assert str(info.value) == "maildir: Permission denied"  # no path in the text
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "new") == []


def test_maildir_without_hard_links_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), dst)

    monkeypatch.setattr(os, "link", unsupported)
    path = deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    assert os.listdir(tmp_path / "new") == [NAME]
    assert os.listdir(tmp_path / "tmp") == []
    assert Path(path).read_bytes() == prepare(MESSAGE, make_delivery())


def test_maildir_loop_writes_nothing(tmp_path: Path) -> None:
    message = b"Delivered-To: bob@localhost\r\n\r\nx\r\n"
    with pytest.raises(DeliveryError) as info:
        deliver_maildir(str(tmp_path / "Maildir"), message, make_delivery())
    assert info.value.permanent and info.value.status == "5.4.6"
    assert not (tmp_path / "Maildir").exists()


def test_maildir_disk_full_is_4_2_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> None:
        os.write(fd, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mda, "_write_all", full)
    with pytest.raises(DeliveryError) as info:
        deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    assert info.value.status == "4.2.2" and not info.value.permanent
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "new") == []


# --- mbox ----------------------------------------------------------------------------------------

FROM_LINE = re.compile(rb"^From (\S+) (\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4})$")


def test_mbox_separator_and_body(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    before = time.time()
    deliver_mbox(str(box), MESSAGE, make_delivery())
    data = box.read_bytes()
    first, rest = data.split(b"\n", 1)
    match = FROM_LINE.match(first)
    assert match, first
    assert match.group(1) == b"alice@example.org"
    stamp = calendar.timegm(time.strptime(match.group(2).decode(), "%a %b %d %H:%M:%S %Y"))
    assert before - 2 <= stamp <= time.time() + 2  # UTC
    assert rest == prepare(MESSAGE, make_delivery()) + b"\n"
    assert stat.S_IMODE(box.stat().st_mode) == 0o600
    assert not (tmp_path / "bob.lock").exists()


def test_mbox_date_is_utc_asctime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "bob"
    monkeypatch.setattr(time, "time", lambda: 1_795_643_749.0)
    deliver_mbox(str(box), MESSAGE, make_delivery(sender=""))
    monkeypatch.setattr(time, "time", lambda: 1_793_840_523.5)
    deliver_mbox(str(box), MESSAGE, make_delivery(sender="", evpid=1))
    data = box.read_bytes()
    assert data.startswith(b"From MAILER-DAEMON Wed Nov 25 21:55:49 2026\n")
    assert b"\n\nFrom MAILER-DAEMON Thu Nov  5 01:02:03 2026\n" in data


def test_mbox_from_quoting(tmp_path: Path) -> None:
    message = (
        b"Subject: quoting\r\n\r\n"
        b"From here\r\n"
        b">From there\r\n"
        b">>From everywhere\r\n"
        b"From\r\n"
        b" From indented\r\n"
        b"Fromage\r\n"
    )
    box = tmp_path / "bob"
    deliver_mbox(str(box), message, make_delivery())
    body = box.read_bytes().split(b"\n\n", 1)[1]
    assert body == (
        b">From here\n>>From there\n>>>From everywhere\nFrom\n From indented\nFromage\n\n"
    )


def test_mbox_adds_missing_final_newline(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    deliver_mbox(str(box), b"Subject: x\r\n\r\nno newline", make_delivery())
    assert box.read_bytes().endswith(b"\n\nno newline\n\n")


def test_mbox_appends_and_parses(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    for i in range(3):
        message = b"Subject: n%d\r\n\r\nFrom me\r\nline\r\n" % i
        deliver_mbox(str(box), message, make_delivery(evpid=i))
    mbox = mailbox.mbox(str(box), create=False)
    try:
        subjects = [m["Subject"] for m in mbox]
        bodies = [m.get_payload() for m in mbox]
    finally:
        mbox.close()
    assert subjects == ["n0", "n1", "n2"]
    assert bodies == [">From me\nline\n"] * 3


def test_mbox_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    box = tmp_path / "bob"
    box.symlink_to(target)
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(box), MESSAGE, make_delivery())
    assert not info.value.permanent and info.value.status == "4.2.0"
    assert "symbolic link" in str(info.value)
    assert target.read_bytes() == b"precious\n"
    assert not (tmp_path / "bob.lock").exists()


def test_mbox_refuses_dangling_symlink(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    box.symlink_to(tmp_path / "nowhere")
    with pytest.raises(DeliveryError):
        deliver_mbox(str(box), MESSAGE, make_delivery())
    assert not (tmp_path / "nowhere").exists()


def test_mbox_refuses_hard_link(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    box.write_bytes(b"From x Thu Jan  1 00:00:00 1970\nSubject: old\n\nold\n\n")
    os.link(box, tmp_path / "elsewhere")
    before = box.read_bytes()
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(box), MESSAGE, make_delivery())
    assert not info.value.permanent and info.value.status == "4.2.0"
    assert "hard link" in str(info.value)
    assert box.read_bytes() == before


def test_mbox_refuses_fifo(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    os.mkfifo(box)
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(box), MESSAGE, make_delivery())
    assert "regular file" in str(info.value)


def test_mbox_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(tmp_path / "nodir" / "bob"), MESSAGE, make_delivery())
    assert not info.value.permanent and info.value.status == "4.2.0"


def test_mbox_loop_writes_nothing(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(box), b"Delivered-To: <bob@localhost>\r\n\r\nx\r\n", make_delivery())
    assert info.value.permanent
    assert not box.exists()


def test_mbox_stale_dotlock_removed(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    lock = tmp_path / "bob.lock"
    lock.write_bytes(b"99999\n")
    old = time.time() - 301
    os.utime(lock, (old, old))
    deliver_mbox(str(box), MESSAGE, make_delivery(), lock_timeout=5)
    assert box.read_bytes().startswith(b"From alice@example.org ")
    assert not lock.exists()


def test_mbox_dotlock_of_a_process_that_is_gone_is_broken_at_once(tmp_path: Path) -> None:
    """A delivery killed while it held the lock: its pid is gone, so the lock is stale well
    before it is five minutes old (it would hold up the mailbox, and a delivery slot, so long)."""
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    box = tmp_path / "bob"
    lock = tmp_path / "bob.lock"
    lock.write_bytes(f"{dead.pid}\n".encode())
    old = time.time() - 5
    os.utime(lock, (old, old))
    deliver_mbox(str(box), MESSAGE, make_delivery(), lock_timeout=1)  # would wait, then fail
    assert box.read_bytes().startswith(b"From alice@example.org ")
    assert not lock.exists()


def test_mbox_fresh_dotlock_waits_then_fails(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    box.write_bytes(b"")
    lock = tmp_path / "bob.lock"
    lock.write_bytes(b"1\n")
    start = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(box), MESSAGE, make_delivery(), lock_timeout=0.3)
    assert time.monotonic() - start >= 0.3
    assert not info.value.permanent and info.value.status == "4.2.0"
    assert "locked" in str(info.value)
    assert box.read_bytes() == b""
    assert lock.read_bytes() == b"1\n"  # somebody else's lock is left alone


def test_mbox_waits_for_dotlock_release(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    lock = tmp_path / "bob.lock"
    lock.write_bytes(b"1\n")
    timer = threading.Timer(0.2, lock.unlink)
    timer.start()
    try:
        deliver_mbox(str(box), MESSAGE, make_delivery(), lock_timeout=10)
    finally:
        timer.join()
    assert box.read_bytes().startswith(b"From ")


def _hold_fcntl_lock(path: str, ready: multiprocessing.synchronize.Event, seconds: float) -> None:
    fd = os.open(path, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    ready.set()
    time.sleep(seconds)
    os.close(fd)


def test_mbox_respects_fcntl_lock(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    box.write_bytes(b"")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_fcntl_lock, args=(str(box), ready, 30))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(DeliveryError) as info:
            deliver_mbox(str(box), MESSAGE, make_delivery(), lock_timeout=0.3)
        assert "locked" in str(info.value)
        assert box.read_bytes() == b""
        assert not (tmp_path / "bob.lock").exists()
    finally:
        holder.terminate()
        holder.join()


def test_mbox_write_failure_truncates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "bob"
    box.write_bytes(b"From x Thu Jan  1 00:00:00 1970\n\nold\n\n")
    before = box.read_bytes()

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[:10])
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(mda, "_write_all", half_then_full)
    with pytest.raises(DeliveryError) as info:
        deliver_mbox(str(box), MESSAGE, make_delivery())
    assert info.value.status == "4.2.2"
    assert box.read_bytes() == before
    assert not (tmp_path / "bob.lock").exists()


def _slow_write_all(fd: int, data: bytes) -> None:
    # Many small writes with yields in between: without locking, deliveries would interleave.
    for start in range(0, len(data), 64):
        os.write(fd, data[start : start + 64])
        time.sleep(0)


def _mbox_worker(path: str, worker: int, count: int, slow: bool = True) -> None:
    if slow:
        mda._write_all = _slow_write_all
    for i in range(count):
        message = _numbered_message(worker, i)
        deliver_mbox(path, message, make_delivery(evpid=worker << 32 | i))


def _numbered_message(worker: int, i: int) -> bytes:
    lines = b"".join(b"line %d of message %d-%d\r\n" % (n, worker, i) for n in range(40))
    return b"Subject: concurrent\r\nX-Seq: %d-%d\r\n\r\nFrom the start\r\n%s>From the end\r\n" % (
        worker,
        i,
        lines,
    )


def _check_mbox(path: Path, workers: int, count: int) -> None:
    mbox = mailbox.mbox(str(path), create=False)
    try:
        seen: dict[str, int] = {}
        for m in mbox:
            seq = m["X-Seq"]
            w, i = (int(x) for x in seq.split("-"))
            body = _numbered_message(w, i).replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
            body = body.replace(b"From the start", b">From the start")
            body = body.replace(b">From the end", b">>From the end")
            payload = m.get_payload(decode=False)
            assert isinstance(payload, str)
            assert payload.encode() == body, seq
            assert m.get_from().startswith("alice@example.org ")
            seen[seq] = seen.get(seq, 0) + 1
    finally:
        mbox.close()
    assert len(seen) == workers * count
    assert set(seen.values()) == {1}


def test_mbox_concurrent_processes(tmp_path: Path) -> None:
    box = tmp_path / "bob"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_mbox_worker, args=(str(box), w, 50)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    _check_mbox(box, 2, 50)
    assert not (tmp_path / "bob.lock").exists()


def test_mbox_concurrent_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = tmp_path / "bob"
    errors: list[BaseException] = []

    monkeypatch.setattr(mda, "_write_all", _slow_write_all)

    def run(w: int) -> None:
        try:
            _mbox_worker(str(box), w, 25, slow=False)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_mbox(box, 4, 25)


def test_delivery_error_is_one_line() -> None:
    e = DeliveryError("bad\r\nthing\x00here", permanent=False, status="4.2.0")
    assert str(e) == "bad thing here"
    assert e.text == str(e)
    assert (e.permanent, e.status) == (False, "4.2.0")


def test_concurrent_deliveries_share_directory_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: 16 deliveries racing into one maildir need fewer than 16 dir fsyncs."""
    import threading
    import time as _time

    from homemail import mda as mda_module

    real_fsync = os.fsync
    dir_syncs = []

    def slow_fsync(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            dir_syncs.append(fd)
            _time.sleep(0.02)  # make the syncs overlap
        real_fsync(fd)

    monkeypatch.setattr(mda_module.os, "fsync", slow_fsync)
    errors: list[BaseException] = []

    def deliver(i: int) -> None:
        try:
            deliver_maildir(str(tmp_path), MESSAGE, make_delivery(evpid=(1 << 32) + i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(os.listdir(tmp_path / "new")) == 16
    assert 1 <= len(dir_syncs) < 16


# --- deliver_local: where the action's path leads ------------------------------------------------


def _deliver_local(method: str, path: str | None, home: Path) -> None:
    from homemail.aliases import LocalUser
    from homemail.config import Action, Location
    from homemail.queue import Envelope

    action = Action("a", method, path, None, None, Location("<test>", 1, 1))  # type: ignore[arg-type]
    user = LocalUser("bob", os.getuid(), os.getgid(), str(home))
    env = Envelope(
        evpid=(5 << 32) | 1,
        sender="alice@example.org",
        rcpt="bob@localhost",
        dest="bob@localhost",
        user="bob",
        action="a",
        ctime=1700000000,
        expire=0,
    )
    mda.deliver_local(action, user, env, MESSAGE, "mail.example.org")


@pytest.mark.parametrize(
    ("method", "path", "lands"),
    [
        ("maildir", "~/TildeMaildir", "TildeMaildir/new"),
        ("maildir", "~/Mail/%{rcpt.user:lowercase}", "Mail/bob/new"),
        ("maildir", "RelMaildir", "RelMaildir/new"),
        ("maildir", None, "Maildir/new"),
        ("mbox", "~/tilde.mbox", "tilde.mbox"),
        ("mbox", "relmbox", "relmbox"),
        ("mbox", "mail/%{user.username}", "mail/bob"),
    ],
)
def test_tilde_and_relative_paths_are_the_recipients_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, path: str | None, lands: str
) -> None:
    home = tmp_path / "home"
    (home / "mail").mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon's working directory is not the home
    _deliver_local(method, path, home)
    target = home / lands
    found = list(target.iterdir()) if method == "maildir" else [target]
    assert len(found) == 1 and b"Delivered-To: bob@localhost\n" in found[0].read_bytes()
    assert list(elsewhere.iterdir()) == []
    assert not (home / "~").exists()


def test_a_lone_tilde_is_the_home_itself(tmp_path: Path) -> None:
    _deliver_local("maildir", "~", tmp_path)
    assert len(list((tmp_path / "new").iterdir())) == 1


# --- path templates: the configuration check reads them as deliveries do ----------------------

SPECS = st.text(alphabet="rcpt.userdomainmbxfoy[]:|-0123456789lowercasestrip%{}XY", max_size=30)


@given(st.sampled_from(sorted(mda.FORMAT_KEYS)), SPECS)
@settings(max_examples=300)
def test_what_the_check_accepts_expands_and_what_it_refuses_fails(key: str, tail: str) -> None:
    template = f"/m/%{{{key}{tail}}}/x"
    values = mda.format_values("a@b.example", "bob+x@c.example", "bob@c.example", "bob", "/h")
    try:
        mda.check_format(template)
    except mda.FormatError:
        with pytest.raises(DeliveryError) as info:
            mda.expand_format(template, values)
        assert info.value.permanent and info.value.status == "5.3.5"
    else:
        try:
            assert "%{" not in mda.expand_format(template, values)
        except DeliveryError as exc:  # a slice may leave "." of a domain, say
            assert exc.text == "unsafe value in a delivery path"


def test_expand_format_modifiers_slices_and_mbox_from() -> None:
    values = mda.format_values("", "Bob+tag@Example.org", "bob@example.org", "bob", "/home/bob")
    assert mda.expand_format("%{rcpt.user:strip|lowercase}", values) == "bob"
    assert mda.expand_format("%{rcpt.domain[0:3]:uppercase}", values) == "EXA"
    assert mda.expand_format("%{dest[-3:]}", values) == "org"
    assert mda.expand_format("%{mbox.from}", values) == "MAILER-DAEMON"
    with pytest.raises(DeliveryError, match="unknown format modifier ':badmod'"):
        mda.expand_format("/x/%{rcpt.user:badmod}", values)


def test_maildir_recovered_finds_a_copy_moved_after_the_first_recovered_delivery(
    tmp_path: Path,
) -> None:
    """The ids of the copies are read once; a copy a reader moves afterwards is still found."""
    before = make_delivery(evpid=0x1234ABCD00000051)
    first = deliver_maildir(str(tmp_path), MESSAGE, before)  # delivered before the restart
    deliver_maildir(str(tmp_path), MESSAGE, make_delivery(recovered=True))  # reads the ids
    seen = tmp_path / "cur" / (os.path.basename(first) + ":2,S")
    os.rename(first, seen)
    again = deliver_maildir(
        str(tmp_path), MESSAGE, make_delivery(evpid=before.evpid, recovered=True)
    )
    assert again == str(seen)
    assert len(os.listdir(tmp_path / "new")) == 1  # the one recovered delivery that had none


def test_maildir_recovered_twice_finds_the_copy_it_made_once_moved(tmp_path: Path) -> None:
    """A recovered delivery done here, then tried again (its result was not recorded) after a
    reader moved the copy: the ids read at the first include what this process wrote since."""
    deliver_maildir(str(tmp_path), MESSAGE, make_delivery(evpid=0x1234ABCD00000061,
                                                          recovered=True))
    d = make_delivery(recovered=True)
    first = deliver_maildir(str(tmp_path), MESSAGE, d)
    seen = tmp_path / "cur" / (NAME + ":2,S")
    os.rename(first, seen)
    assert deliver_maildir(str(tmp_path), MESSAGE, d) == str(seen)
    assert os.listdir(tmp_path / "cur") == [NAME + ":2,S"]


def test_maildir_recovered_copy_its_reader_deleted_is_not_delivered_again(tmp_path: Path) -> None:
    before = make_delivery()
    first = deliver_maildir(str(tmp_path), MESSAGE, before)
    deliver_maildir(str(tmp_path), MESSAGE, make_delivery(evpid=0x1234ABCD00000071,
                                                          recovered=True))  # reads the ids
    os.unlink(first)  # read and deleted meanwhile
    deliver_maildir(str(tmp_path), MESSAGE, make_delivery(recovered=True))
    assert NAME not in os.listdir(tmp_path / "new")
    assert os.listdir(tmp_path / "cur") == []


def test_maildir_recovered_finds_its_copy_through_another_spelling_of_the_path(
    tmp_path: Path,
) -> None:
    """The ids are the maildir's, not its path's: a copy written through a link to it (a home
    reached through a symbolic link, an action's path changed by a reload) is found."""
    real = tmp_path / "Maildir"
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    deliver_maildir(str(real), MESSAGE, make_delivery(evpid=0x1234ABCD00000081, recovered=True))
    d = make_delivery(recovered=True)
    first = deliver_maildir(str(link), MESSAGE, d)  # its result not recorded: tried again
    seen = real / "cur" / (NAME + ":2,S")
    os.rename(first, seen)
    assert deliver_maildir(str(real), MESSAGE, d) == str(seen)
    assert sorted(os.listdir(real / "cur")) == [NAME + ":2,S"]


def test_maildir_ids_read_for_a_recovery_are_let_go_once_it_is_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ids of a big mailbox are not kept (nor new/ looked at for them at every delivery)
    for the rest of the process's life."""
    from homemail import mda

    deliver_maildir(str(tmp_path), MESSAGE, make_delivery(evpid=0x1234ABCD00000091,
                                                          recovered=True))
    assert mda._recovered_ids
    monkeypatch.setattr(mda, "RECOVERED_IDS_SECONDS", 0.0)
    deliver_maildir(str(tmp_path), MESSAGE, make_delivery())
    assert not mda._recovered_ids
