"""The package is a thin, typed facade: its names, its stubs and its enum agree
with the native module they describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import servercore
from servercore import DisconnectReason, _core

PACKAGE = Path(servercore.__file__).parent


def test_every_public_name_is_exported_and_importable():
    assert set(servercore.__all__) >= {
        "PacketSession", "Session", "Server", "Client", "SendBuffer", "DisconnectReason",
    }
    for name in servercore.__all__:
        assert getattr(servercore, name) is not None


def test_disconnect_reason_mirrors_the_engines_reasons():
    assert [(reason.value, reason.name) for reason in DisconnectReason] == _core.DISCONNECT_REASONS


def test_only_peer_and_code_faults_count_as_faults():
    faults = {reason for reason in DisconnectReason if reason.is_fault}
    routine = set(DisconnectReason) - faults
    assert routine == {
        DisconnectReason.CLOSED_BY_PEER,
        DisconnectReason.RESET,
        DisconnectReason.CLOSED_LOCALLY,
        DisconnectReason.SERVER_SHUTDOWN,
    }
    assert str(DisconnectReason.INVALID_HEADER) == "INVALID_HEADER"


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
    assert (PACKAGE / "_core.pyi").is_file()


def test_the_hand_written_stub_matches_the_runtime_module():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "servercore._core"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_type_checks_strictly_against_its_stub():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(PACKAGE)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
