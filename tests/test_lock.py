from __future__ import annotations

import os
from pathlib import Path

import pytest

from hkpod.errors import HkpodError
from hkpod.lock import machine_lock


def test_lock_second_holder_rejected(tmp_path: Path) -> None:
    with machine_lock(tmp_path / "lock", "podman"):
        with pytest.raises(HkpodError) as raised:
            with machine_lock(tmp_path / "lock", "podman"):
                pass
    assert f"pid {os.getpid()}" in raised.value.message


def test_lock_released_after_use(tmp_path: Path) -> None:
    with machine_lock(tmp_path / "lock", "podman"):
        pass
    with machine_lock(tmp_path / "lock", "podman"):
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
