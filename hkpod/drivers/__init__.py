"""The driver registry: shared code picks a driver by name and never imports a driver module directly."""

from __future__ import annotations

import importlib
import platform

from hkpod.drivers.base import Driver
from hkpod.errors import HkpodError

_MODULES = {
    "qemu": "hkpod.drivers.qemu",
    "hyperkit": "hkpod.drivers.hyperkit",
}

DRIVER_NAMES = tuple(_MODULES)


def default_driver_name() -> str:
    """HyperKit on Intel macOS, QEMU everywhere else."""
    if platform.system() == "Darwin" and platform.machine() == "x86_64":
        return "hyperkit"
    return "qemu"


def get_driver(name: str) -> Driver:
    module_name = _MODULES.get(name)
    if module_name is None:
        raise HkpodError(f"unknown driver {name!r}", f"choose one of: {', '.join(DRIVER_NAMES)}")
    module = importlib.import_module(module_name)
    driver_class = getattr(module, "DRIVER", None)
    if driver_class is None:
        raise HkpodError(f"the {name} driver is not available in this version of hkpod", "use --driver qemu")
    driver: Driver = driver_class()
    return driver
