from __future__ import annotations

from pathlib import Path

import pytest

from hkpod.errors import HkpodError
from hkpod.podman import query_server


def client_script(tmp_path: Path, version: str) -> str:
    """A stand-in podman client that prints VERSION and fails any other call, so no server is reached."""
    script = tmp_path / "podman"
    script.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "podman version {version}" && exit 0\nexit 125\n')
    script.chmod(0o755)
    return str(script)


def test_old_server_names_both_versions(tmp_path: Path) -> None:
    with pytest.raises(HkpodError) as raised:
        query_server(client_script(tmp_path, "4.9.3"), "podman", "3.4.4")
    assert "4.9.3" in raised.value.message
    assert "3.4.4" in raised.value.message


def test_old_client_old_server_tries(tmp_path: Path) -> None:
    # A podman 3 client may talk to a podman 3 server, so the call is made (and fails here).
    with pytest.raises(HkpodError) as raised:
        query_server(client_script(tmp_path, "3.4.4"), "podman", "3.4.4")
    assert "info failed" in raised.value.message
