"""The HyperKit driver package: pure builders and parsers, the driver, and the root supervisor."""

from __future__ import annotations

from hkpod.drivers.hyperkit.driver import HyperkitDriver

DRIVER = HyperkitDriver

__all__ = ["DRIVER", "HyperkitDriver"]
