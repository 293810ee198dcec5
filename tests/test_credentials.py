"""The secrets file: format, atomic replacement, permissions, refusals."""

from __future__ import annotations

import os
import stat

import pytest

from homemail import credentials


def test_store_adds_and_replaces_keeping_comments(tmp_path):
    path = str(tmp_path / "secrets")
    credentials.store(path, "isp", "me@example.org", "p:ss w#rd")
    credentials.store(path, "backup", "other", "x")
    with open(path, "a") as f:
        f.write("# my note\n")
    credentials.store(path, "isp", "me@example.org", "new")
    assert credentials.read(path) == {"isp": ("me@example.org", "new"), "backup": ("other", "x")}
    with open(path) as f:
        text = f.read()
    assert "# my note" in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [n for n in os.listdir(tmp_path) if n != "secrets"] == []


@pytest.mark.parametrize(
    ("label", "user", "password"),
    [
        ("bad label", "u", "p"),
        ("", "u", "p"),
        ("ok", "u:x", "p"),
        ("ok", "", "p"),
        ("ok", "u", ""),
        ("ok", "u", "line\nbreak"),
        ("ok", "u", "nul\0"),
        ("ok\n", "u", "p"),
    ],
)
def test_refuses_what_would_break_the_file(tmp_path, label, user, password):
    with pytest.raises(credentials.CredentialError):
        credentials.store(str(tmp_path / "secrets"), label, user, password)
    assert not (tmp_path / "secrets").exists()
