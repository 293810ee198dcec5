"""The systemd unit: valid, hardened, notify-typed, and no restart loop on a config error."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

UNIT = Path(__file__).resolve().parent.parent / "resources" / "systemd" / "homemail.service"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_is_notify_typed_and_stops_on_config_errors():
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["RestartPreventExitStatus"] == "78"  # EX_CONFIG: no restart loop
    assert "HUP" in service["ExecReload"]
    assert service["NoNewPrivileges"] == "yes"


def test_systemd_analyze_verify_finds_only_the_missing_binary():
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (Debian package systemd)"
    result = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True,
                            text=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and "is not executable" not in line]
    assert problems == []


def test_exposure_score_is_better_than_maddys():
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed (Debian package systemd)"
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 3.7  # maddy's unit scores 3.7
